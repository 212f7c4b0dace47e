"""Build the ONNX Runtime custom-operator library (``libgspn_ortops.so``) from its C++ sources.

    python -m export.build [--force] [--cpp-host] [--dest DIR]

The library lives inside the package, at ``export/lib/libgspn_ortops.so``: a wheel carries it
there (``setup.py`` builds it when the package is built), and in a source checkout
``python -m export.build`` (run by ``make``) builds it in place. ``export.library_path()`` finds it.

The build needs ONNX Runtime's C/C++ API headers (version 1.21 or newer): ``ORT_INCLUDE_DIR`` if
set, else ``build/ort-headers`` as filled by ``scripts/fetch_ort_headers.sh``. The library links
against nothing from ONNX Runtime; it receives the API table when a session loads it. It is
rebuilt only when a source file, the compiler command or the compiler changes.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from gspn_tvm import isa

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = Path(__file__).resolve().parent / "ortops"
LIBRARY_DIR = Path(__file__).resolve().parent / "lib"
LIBRARY_NAME = "libgspn_ortops.so"
FETCHED_HEADERS = REPO_ROOT / "build" / "ort-headers"
HEADER = "onnxruntime_cxx_api.h"


class BuildError(RuntimeError):
    """The custom-operator library could not be built."""


def find_ort_include_dir() -> Path:
    """The directory holding ``onnxruntime_cxx_api.h``; raises BuildError saying how to get one."""
    configured = os.environ.get("ORT_INCLUDE_DIR")
    if configured:
        path = Path(configured)
        if (path / HEADER).is_file():
            return path
        raise BuildError(
            f"ORT_INCLUDE_DIR={configured} does not contain {HEADER}. Point it at the include/ "
            "folder of an ONNX Runtime release (API 1.21 or newer), or unset it and run "
            "`bash scripts/fetch_ort_headers.sh`."
        )
    for header in sorted(FETCHED_HEADERS.rglob(HEADER)) if FETCHED_HEADERS.is_dir() else []:
        return header.parent
    raise BuildError(
        f"ONNX Runtime C/C++ API headers not found ({HEADER}). Run "
        "`bash scripts/fetch_ort_headers.sh` (downloads Debian's libonnxruntime-dev into "
        f"{FETCHED_HEADERS} without installing anything), or set ORT_INCLUDE_DIR to the include/ "
        "folder of an ONNX Runtime release."
    )


CXX17_PROBE = "#include <optional>\n#include <string_view>\nint main() { std::optional<std::string_view> s; if constexpr (true) { return s.has_value(); } }\n"
SETUP_HELP = (
    "The library needs a C++17 compiler (g++ 7 or newer, or clang++ 5 or newer; set CXX to choose one) "
    "and ONNX Runtime's C/C++ API headers 1.21 or newer: set ORT_INCLUDE_DIR to the include/ folder of an "
    "ONNX Runtime release (unpack onnxruntime-linux-x64-<version>.tgz from the ONNX Runtime releases page), "
    "or run `bash scripts/fetch_ort_headers.sh` on a Debian-based machine."
)


@functools.lru_cache(maxsize=None)
def _accepts(compiler: str, flags: tuple[str, ...]) -> bool:
    """Whether ``compiler`` compiles the C++17 probe with ``flags``."""
    try:
        result = subprocess.run([compiler, "-std=c++17", *flags, "-fsyntax-only", "-x", "c++", "-"],
                                input=CXX17_PROBE, capture_output=True, text=True, timeout=60)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def arch_flags(compiler: str | None = None) -> list[str]:
    """``-march=<level>`` for the x86-64 level this machine's reported features allow (:mod:`gspn_tvm.isa`,
    the same decision as the TVM kernels; ``GSPN_CPU_TARGET`` overrides it). Never ``-march=native``:
    the library runs on any machine of that level. Dropped where the compiler does not know the
    level names (GCC < 11), leaving the compiler's x86-64 baseline."""
    try:
        flags = isa.gcc_march_flags()
    except ValueError as error:  # a GSPN_CPU_TARGET that is not a level, or above this machine
        raise BuildError(str(error)) from None
    if flags and compiler is not None and not _accepts(compiler, tuple(flags)):
        return []
    return flags


def _compiler() -> str:
    """The C++17 compiler (``$CXX``, default ``g++``); BuildError saying what is needed otherwise."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise BuildError(f"C++ compiler {compiler!r} not found. {SETUP_HELP}")
    if not _accepts(compiler, ()):
        raise BuildError(f"{compiler!r} does not compile C++17 (-std=c++17 with <optional>, if constexpr). {SETUP_HELP}")
    return compiler


def _sources() -> list[Path]:
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cc", ".h"))


def _command(compiler: str, include_dir: Path, output: Path) -> list[str]:
    return [
        compiler, "-std=c++17", "-O3", *arch_flags(compiler), "-fPIC", "-shared",
        "-fvisibility=hidden", "-Wall", "-Wextra",
        f"-I{include_dir}",
        *(str(p) for p in _sources() if p.suffix == ".cc"),
        "-o", str(output),
    ]  # fmt: skip


def _fingerprint(command: list[str], compiler: str) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest.update(version.encode())
    digest.update("\0".join(command).encode())
    for source in _sources():
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    include_dir = Path(command[[c.startswith("-I") for c in command].index(True)][2:])
    for header in sorted(include_dir.glob("onnxruntime_*.h")):
        digest.update(header.read_bytes())
    return digest.hexdigest()


def built_library_path(dest: Path | None = None) -> Path:
    """Where the library is (or will be) built: ``dest`` or the package's ``lib/`` folder."""
    return Path(dest or LIBRARY_DIR) / LIBRARY_NAME


def have_sources() -> bool:
    """True in a source checkout (the project's pyproject.toml above the package, the C++ sources
    beside this module); False in an installed wheel, even one that carries the sources."""
    return (REPO_ROOT / "pyproject.toml").is_file() and SOURCE_DIR.is_dir() and any(
        p.suffix == ".cc" for p in SOURCE_DIR.iterdir()
    )


def build_library(force: bool = False, verbose: bool = False, dest: Path | None = None) -> Path:
    """Compile the library into ``dest`` (default: the package's ``lib/``) if its sources, the
    compiler command or the compiler changed (or ``force``); returns its path."""
    compiler = _compiler()
    include_dir = find_ort_include_dir()
    library = built_library_path(dest)
    folder = library.parent
    folder.mkdir(parents=True, exist_ok=True)
    stamp = folder / (LIBRARY_NAME + ".fingerprint")
    with open(folder / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel test workers build once
        command = _command(compiler, include_dir, library)
        fingerprint = _fingerprint(command, compiler)
        if (
            not force
            and library.is_file()
            and stamp.is_file()
            and stamp.read_text().strip() == fingerprint
        ):
            return library
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".so", delete=False) as tmp:
            partial = Path(tmp.name)
        try:
            command = _command(compiler, include_dir, partial)
            if verbose:
                print(" ".join(command), flush=True)
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildError(
                    f"compiling the ONNX Runtime custom-op library failed:\n{' '.join(command)}\n"
                    f"{result.stdout}{result.stderr}"
                )
            os.replace(partial, library)  # atomic: a loader never sees a half-written file
        finally:
            partial.unlink(missing_ok=True)
        stamp.write_text(fingerprint + "\n")
    return library


CPP_HOST_SOURCE_DIR = REPO_ROOT / "examples" / "cpp"
CPP_HOST_BUILD_DIR = REPO_ROOT / "build" / "cpp_host"


def onnxruntime_shared_library() -> Path:
    """The ``libonnxruntime.so.*`` inside the installed onnxruntime wheel."""
    import onnxruntime

    capi = Path(onnxruntime.__file__).resolve().parent / "capi"
    candidates = sorted(capi.glob("libonnxruntime.so*"))
    if not candidates:
        raise BuildError(f"no libonnxruntime.so* in {capi}; is the onnxruntime wheel installed?")
    return candidates[-1]


def build_cpp_host() -> Path:
    """Configure and build ``examples/cpp`` with CMake (incremental); returns the executable."""
    if shutil.which("cmake") is None:
        raise BuildError("cmake not found; install cmake to build the C++ host example")
    include_dir = find_ort_include_dir()
    runtime = onnxruntime_shared_library()
    CPP_HOST_BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with open(CPP_HOST_BUILD_DIR / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        steps = [
            ["cmake", "-S", str(CPP_HOST_SOURCE_DIR), "-B", str(CPP_HOST_BUILD_DIR),
             "-DCMAKE_BUILD_TYPE=Release", f"-DORT_INCLUDE_DIR={include_dir}",
             f"-DORT_LIBRARY={runtime}"],
            ["cmake", "--build", str(CPP_HOST_BUILD_DIR)],
        ]  # fmt: skip
        for step in steps:
            result = subprocess.run(step, capture_output=True, text=True)
            if result.returncode != 0:
                raise BuildError(
                    f"building the C++ host failed:\n{' '.join(step)}\n{result.stdout}{result.stderr}"
                )
    return CPP_HOST_BUILD_DIR / "gspn_onnx_run"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    parser.add_argument("--cpp-host", action="store_true", help="also build examples/cpp")
    parser.add_argument("--dest", type=Path, default=None, help="folder for the library (default: export/lib)")
    args = parser.parse_args(argv)
    try:
        print(build_library(force=args.force, verbose=True, dest=args.dest))
        if args.cpp_host:
            print(build_cpp_host())
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

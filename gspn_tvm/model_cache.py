"""An opt-in on-disk cache of whole models compiled by TVM Relax (``compile_model``, ``compile_onnx``).

Compiling a model takes seconds for the tiny classifier and minutes for GSPN-T; the compiled code
depends only on the model's structure, not on its weights (they stay inputs of ``main``, passed at
run time). Set ``GSPN_RELAX_CACHE_DIR`` to a folder to keep each compiled library there:

    $GSPN_RELAX_CACHE_DIR / <tvm version> / <key>.so   (and <key>.so.sha256 beside it)

The key is the sha256 of the Relax module with its parameters detached (its TVMScript text, which
holds the project's TensorIR kernels), the resolved target, the TVM version, the current
``PassContext`` (opt level, config, required and disabled passes) and the source of this package
(the Relax pipeline and the kernel schedules): a different model, target or compiler misses.
Two models that differ only in their weights share an entry.

An entry is loaded only after its bytes match its checksum file (JSON: the key, the TVM version and
the sha256 of the library); a truncated or corrupt entry is never handed to the dynamic loader: it is
rebuilt, with a logged warning. Writers hold a lock file per entry and publish through a temporary
file and ``os.replace`` (:func:`gspn_tvm.build.export_atomically`), so concurrent processes (pytest
workers, say) compile once. Where the folder cannot be written the model is compiled uncached, with a
warning. Unset (the default), nothing is cached.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import tvm

from .build import checksum_path, entry_lock, export_atomically

logger = logging.getLogger(__name__)

ENV_VAR = "GSPN_RELAX_CACHE_DIR"
_PACKAGE = Path(__file__).resolve().parent


def cache_dir() -> Path | None:
    """The cache folder (``$GSPN_RELAX_CACHE_DIR``), or None where caching is off."""
    folder = os.environ.get(ENV_VAR)
    return Path(folder) if folder else None


@functools.cache  # once per process: the code that runs is the code imported, even if edited since
def _package_source_hash() -> str:
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def entry_key(mod: tvm.IRModule, target: tvm.target.Target) -> str:
    """The cache key of compiling ``mod`` (parameters detached) for ``target`` in the current
    ``tvm.transform.PassContext``."""
    context = tvm.transform.PassContext.current()  # a caller's opt_level or pass config changes the code
    passes = f"{context.opt_level} {context.config} {list(context.required_pass)} {list(context.disabled_pass)}"
    digest = hashlib.sha256()
    for part in (tvm.__version__, json.dumps(target.export(), sort_keys=True, default=str),
                 passes, _package_source_hash(), mod.script()):  # fmt: skip
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _record(key: str) -> dict:
    return {"key": key, "tvm": tvm.__version__}


def _read_entry(path: Path, record: dict) -> tuple[bytes | None, str | None]:
    """``(library bytes, None)`` for an entry whose bytes match its checksum file; ``(None, reason)``
    otherwise (``reason`` None: no entry). Only reads files."""
    if not path.exists() and not path.is_symlink():
        return None, None
    try:
        stored = json.loads(checksum_path(path).read_text())
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "no checksum file beside it"
    except (OSError, ValueError) as error:
        return None, f"unreadable ({error})"
    if not isinstance(stored, dict) or any(stored.get(field) != want for field, want in record.items()):
        return None, "its checksum file is for another entry"
    if hashlib.sha256(data).hexdigest() != stored.get("sha256"):
        return None, "its bytes do not match its checksum (truncated or corrupt)"
    return data, None


def _load_bytes(data: bytes):
    """The library ``data`` loaded through a private temporary file (never the shared entry)."""
    with tempfile.TemporaryDirectory(prefix="gspn-relax-") as folder:
        file = os.path.join(folder, "model.so")
        with open(file, "wb") as handle:
            handle.write(data)
        return tvm.runtime.load_module(file)


def compile_cached(mod: tvm.IRModule, target: tvm.target.Target, compile_fn: Callable[[], object]):
    """``(module to run, library bytes or None, executable or None)``: from the cache where
    ``$GSPN_RELAX_CACHE_DIR`` is set and holds a verified entry for ``mod``/``target``; else
    ``compile_fn()`` (its executable is returned, and cached where the cache is on)."""
    folder = cache_dir()
    if folder is None:
        executable = compile_fn()
        return executable, None, executable
    key = entry_key(mod, target)
    path = folder / tvm.__version__ / f"{key}.so"
    record = _record(key)
    data, problem = _read_entry(path, record)
    if data is None:
        with entry_lock(path):
            data, problem = _read_entry(path, record)  # another process may have built it meanwhile
            if data is None:
                if problem is not None:
                    logger.warning("gspn_tvm: Relax cache entry %s is unusable (%s); rebuilding it", path, problem)
                executable = compile_fn()
                try:
                    export_atomically(executable, path, record)
                except OSError as error:
                    logger.warning("gspn_tvm: cannot write the Relax cache at %s (%s); the model is compiled "
                                   "without caching it", path, error)  # fmt: skip
                return executable, None, executable
    return _load_bytes(data), data, None

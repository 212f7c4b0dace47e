"""The CPU instruction set to generate code for: decided from the features the OS reports.

Every CPU code generator of the project asks this module: the TVM scan kernels and Relax builds
(:func:`llvm_target`) and the ONNX Runtime custom-operator library (:func:`gcc_march_flags`). The
choice comes from the instruction-set features the operating system reports (on Linux the
``flags`` line of ``/proc/cpuinfo``), never from the CPU's model name: a virtual machine often
reports a model (``znver4``, ``sapphirerapids``) whose features the hypervisor does not expose, and
code built for the name dies with ``SIGILL``.

The result is one of the x86-64 micro-architecture levels that LLVM and GCC both know:

    x86-64     the 64-bit baseline (SSE2)
    x86-64-v2  + SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF
    x86-64-v3  + AVX, AVX2, FMA, F16C, BMI1, BMI2, LZCNT, MOVBE, XSAVE
    x86-64-v4  + AVX-512 F, BW, CD, DQ, VL

the highest one whose every feature the machine reports. Where the OS reports nothing (not Linux,
or ``/proc/cpuinfo`` unreadable) it is ``x86-64-v2``; on CPUs other than x86-64 no ``mcpu`` is
named (LLVM's generic CPU for the host triple) and no ``-march`` flag is passed.

Override: the environment variable ``GSPN_CPU_TARGET`` names a level (``x86-64``, ``x86-64-v2``,
``x86-64-v3``, ``x86-64-v4``). A level above what the machine reports is refused (on Linux), and so
is anything that is not a level (``native``, ``znver4``, ``skylake``...): a CPU model name is never
used. On an OS that reports no features the variable states the machine's level. Force the
baseline to emulate a smaller machine: ``GSPN_CPU_TARGET=x86-64-v2``.

Standard library only: the runtime-only artifact loader imports it without torch or the TVM compiler.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

ENV_VAR = "GSPN_CPU_TARGET"
CPUINFO = Path("/proc/cpuinfo")
LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4")
#: Level assumed where the OS reports no features (every x86-64 CPU of the last 15 years has it).
UNREPORTED_LEVEL = "x86-64-v2"

# Feature names as Linux spells them in /proc/cpuinfo (``pni`` is SSE3, ``abm`` is LZCNT,
# ``lahf_lm`` is LAHF/SAHF in 64-bit mode); each level adds to the one before.
_ADDED_FEATURES = {
    "x86-64": ("fpu", "cmov", "cx8", "fxsr", "mmx", "sse", "sse2"),
    "x86-64-v2": ("cx16", "lahf_lm", "popcnt", "pni", "sse4_1", "sse4_2", "ssse3"),
    "x86-64-v3": ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"),
    "x86-64-v4": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def _cumulative() -> dict[str, frozenset[str]]:
    levels, features = {}, set()
    for level in LEVELS:
        features |= set(_ADDED_FEATURES[level])
        levels[level] = frozenset(features)
    return levels


#: Every feature each level requires (its own and those of the levels below it).
LEVEL_FEATURES: dict[str, frozenset[str]] = _cumulative()


def is_x86_64() -> bool:
    """Whether this machine's CPU is x86-64 (the levels apply only there)."""
    return platform.machine().lower() in ("x86_64", "amd64")


def reported_features(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The features the OS reports for this CPU (``flags`` of ``/proc/cpuinfo``), or None where it
    reports none (not Linux, file unreadable, no ``flags`` line)."""
    path = CPUINFO if cpuinfo is None else cpuinfo
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def best_level(features: frozenset[str] | set[str]) -> str | None:
    """The highest level all of whose features are in ``features`` (None below the baseline)."""
    chosen = None
    for level in LEVELS:
        if LEVEL_FEATURES[level] <= features:
            chosen = level
        else:
            break
    return chosen


def _override() -> str | None:
    """The level named by ``GSPN_CPU_TARGET`` (None when unset); ValueError for anything else."""
    value = os.environ.get(ENV_VAR, "").strip()
    if not value:
        return None
    if value not in LEVELS:
        raise ValueError(
            f"{ENV_VAR}: expected one of {', '.join(LEVELS)}; got {value!r}. CPU model names "
            "(and 'native') are refused: they imply features a virtual machine may not expose."
        )
    if not is_x86_64():
        raise ValueError(f"{ENV_VAR}={value}: the x86-64 levels apply to x86-64 CPUs; this one is {platform.machine()!r}")
    return value


def host_features() -> frozenset[str]:
    """The features this machine has, as far as can be known.

    Linux: what the OS reports (with ``GSPN_CPU_TARGET`` checked against it). Elsewhere: the
    features of the level ``GSPN_CPU_TARGET`` names, else of ``x86-64-v2`` (x86-64), else none.
    """
    reported = reported_features() if is_x86_64() else None
    if reported is not None:
        return reported
    if not is_x86_64():
        return frozenset()
    return LEVEL_FEATURES[_override() or UNREPORTED_LEVEL]


def resolve_level() -> str | None:
    """The level to generate code for on this machine (None: not x86-64, no ``mcpu``).

    Raises ValueError when ``GSPN_CPU_TARGET`` is not a level, or names one whose features the
    machine does not report.
    """
    if not is_x86_64():
        _override()  # refuses a level on another architecture
        return None
    forced = _override()
    reported = reported_features()
    if reported is None:
        return forced or UNREPORTED_LEVEL
    if forced is not None:
        missing = sorted(LEVEL_FEATURES[forced] - reported)
        if missing:
            raise ValueError(
                f"{ENV_VAR}={forced}: this machine does not report {', '.join(missing)} "
                f"(its highest level is {best_level(reported) or 'below x86-64'}); code built for "
                f"{forced} would stop with an illegal instruction"
            )
        return forced
    return best_level(reported) or LEVELS[0]


def llvm_target() -> dict:
    """TVM's LLVM target for this machine, e.g. ``{"kind": "llvm", "mcpu": "x86-64-v3"}``."""
    level = resolve_level()
    return {"kind": "llvm", "mcpu": level} if level else {"kind": "llvm"}


def gcc_march_flags() -> list[str]:
    """``["-march=<level>"]`` for GCC/Clang on this machine (empty off x86-64)."""
    level = resolve_level()
    return [f"-march={level}"] if level else []


def required_features(level: str | None) -> frozenset[str]:
    """Features code built for ``level`` may use (empty for None: the generic CPU)."""
    if level is None:
        return frozenset()
    if level not in LEVEL_FEATURES:
        raise ValueError(f"level: expected one of {', '.join(LEVELS)} or None; got {level!r}")
    return LEVEL_FEATURES[level]


def missing_features(required) -> list[str]:
    """Those of ``required`` (feature names as /proc/cpuinfo spells them) this machine lacks, sorted."""
    return sorted(set(required) - host_features())


__all__ = [
    "ENV_VAR",
    "LEVELS",
    "LEVEL_FEATURES",
    "best_level",
    "gcc_march_flags",
    "host_features",
    "llvm_target",
    "missing_features",
    "reported_features",
    "required_features",
    "resolve_level",
]

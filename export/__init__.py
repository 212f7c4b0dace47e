"""ONNX export of GSPN models and the native ONNX Runtime operators ``gspn::GSPNScan`` and
``gspn::GSPNFusedScan``.

``to_onnx`` exports a torch model that uses ``gspn::scan`` (and ``gspn::fused_scan``) either with
the custom operators (``mode="custom"``, run with ``session``, which registers the library built
from ``export/ortops``) or in standard ONNX operators only (``mode="portable"``).
"""

from .onnx_export import MODES, fused_scan_feeds, fused_scan_model, scan_feeds, scan_model, to_onnx
from .portable import make_portable
from .runtime import library_path, session
from .schema import DOMAIN, FUSED_OP_TYPE, OP_TYPE, OP_VERSION, register_onnx_schema



def __getattr__(name: str):
    # export.build is loaded on first use so that `python -m export.build` runs it only once.
    if name in ("BuildError", "build_library"):
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module 'export' has no attribute {name!r}")


__all__ = [
    "DOMAIN",
    "FUSED_OP_TYPE",
    "MODES",
    "OP_TYPE",
    "OP_VERSION",
    "BuildError",
    "build_library",
    "fused_scan_feeds",
    "fused_scan_model",
    "library_path",
    "make_portable",
    "register_onnx_schema",
    "scan_feeds",
    "scan_model",
    "session",
    "to_onnx",
]

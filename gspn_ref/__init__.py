"""gspn_ref: the definition of the Generalized Spatial Propagation Network operator and layer.

``gspn_scan_ref`` and ``gspn_scan_backward_ref`` are the pure-PyTorch reference (SPEC sections 2, 4);
``gspn_scan`` calls the registered operator ``torch.ops.gspn.scan``, whose kernels other backends
may replace; ``GSPN`` is the layer of SPEC section 6. ``gspn_ref.models`` (imported on first use) holds
the paper's classification networks GSPN-T/S/B, weight-compatible with the original code.
"""

from .affinity import affinity_matrix, propagation_matrix
from .directions import DIRECTIONS, is_column, is_reversed, line_count, line_length
from .layer import GRN, GSPN, GSPNBlock, LayerNorm2d, TinyGSPNClassifier, layer_affinity
from .normalize import normalize_weights
from .ops import gspn_scan, scan_backward_op, scan_op
from .scan import accumulation_dtype, gspn_scan_backward_ref, gspn_scan_ref
from .validation import SUPPORTED_DTYPES, validate_scan_args

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``gspn_ref.models`` on first access, so that ``import gspn_ref`` stays cheap.
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DIRECTIONS",
    "GRN",
    "GSPN",
    "GSPNBlock",
    "LayerNorm2d",
    "SUPPORTED_DTYPES",
    "TinyGSPNClassifier",
    "accumulation_dtype",
    "affinity_matrix",
    "gspn_scan",
    "gspn_scan_backward_ref",
    "gspn_scan_ref",
    "is_column",
    "is_reversed",
    "layer_affinity",
    "line_count",
    "line_length",
    "normalize_weights",
    "propagation_matrix",
    "scan_backward_op",
    "scan_op",
    "validate_scan_args",
]

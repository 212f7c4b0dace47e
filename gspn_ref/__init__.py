"""gspn_ref: the definition of the Generalized Spatial Propagation Network operator and layer.

``gspn_scan_ref`` and ``gspn_scan_backward_ref`` are the pure-PyTorch reference (docs/operator.md ("The scan", "The adjoint"));
``gspn_scan`` calls the registered operator ``torch.ops.gspn.scan``, whose kernels other backends
may replace (``gspn_tvm.enable()``; the environment variable ``GSPN_BACKEND=tvm`` takes effect at
``import gspn_tvm``, not at ``import gspn_ref``, which never imports a backend); ``GSPN`` is the layer of docs/operator.md ("The project's layer"). ``gspn_ref.models`` (imported on first use) holds
the paper's classification networks GSPN-T/S/B, weight-compatible with the original code.
"""

from .affinity import affinity_matrix, propagation_matrix
from .directions import DIRECTIONS, is_column, is_reversed, line_count, line_length
from .layer import GRN, GSPN, GSPNBlock, LayerNorm2d, TinyGSPNClassifier, layer_affinity
from .fused import gspn_fused_scan_backward_ref, gspn_fused_scan_ref
from .normalize import normalize_weights, normalize_weights_backward
from .ops import gspn_fused_scan, gspn_scan  # noqa: F401
from .ops import fused_scan_backward_op, fused_scan_op, scan_backward_op, scan_op  # noqa: F401  (plumbing: not in __all__)
from .scan import accumulation_dtype, gspn_scan_backward_ref, gspn_scan_ref
from .validation import SUPPORTED_DTYPES, validate_scan_args  # noqa: F401  (internal: not in __all__)

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
    "gspn_fused_scan",
    "gspn_fused_scan_backward_ref",
    "gspn_fused_scan_ref",
    "gspn_scan",
    "gspn_scan_backward_ref",
    "gspn_scan_ref",
    "is_column",
    "is_reversed",
    "layer_affinity",
    "line_count",
    "line_length",
    "normalize_weights",
    "normalize_weights_backward",
    "propagation_matrix",
]

"""The identity of the ONNX operator of ``gspn::scan`` (docs/operator.md, "The ONNX operator").

The exporter (``export``), the ONNX Runtime library (``export/ortops``, which spells the same
names in C++) and TVM's ONNX importer (``gspn_tvm.compile_onnx``) all read these names from here.
"""

from .directions import DIRECTIONS

DOMAIN = "gspn"
OP_TYPE = "GSPNScan"
OP_VERSION = 1
INPUT_NAMES = ("x", "lam", "gl", "gm", "gr")
OUTPUT_NAMES = ("h",)
#: Values of the ``direction`` attribute (string, required); ``chunk`` (int) defaults to 0.
DIRECTION_VALUES = DIRECTIONS
CHUNK_DEFAULT = 0

#: The fused scan (docs/operator.md, "The fused scan"): same domain, version and attributes.
FUSED_OP_TYPE = "GSPNFusedScan"
FUSED_INPUT_NAMES = ("u", "lam", "al", "am", "ar", "gate", "skip")
FUSED_OUTPUT_NAMES = ("y",)

#!/usr/bin/env bash
# GPU check of the TVM CUDA scan kernels, in two steps (see scripts/gpu_check.py):
#
#   scripts/gpu_check.sh prepare   # here, with the project's .venv: compile the CUDA kernels for sm_90
#                                  # into build/gpu_check/ together with the TVM runtime that loads them
#   scripts/gpu_check.sh run       # on the GPU machine (python3 with torch + CUDA, nothing installed):
#                                  # correctness vs the torch reference, then timings
#
# The device tool carries the ignored folder when asked: run(carry=["build/gpu_check"],
# command="scripts/gpu_check.sh run"). Results are printed and, when $OUT is set, saved to
# $OUT/gpu_check.json.
set -euo pipefail
cd "$(dirname "$0")/.."
ARTIFACT=${GSPN_GPU_ARTIFACT:-build/gpu_check}

case "${1:-}" in
  prepare)
    .venv/bin/python scripts/gpu_check.py prepare --artifact "$ARTIFACT"
    du -sh "$ARTIFACT"
    ;;
  run)
    PY=${PYTHON:-python3}
    SITE=$(mktemp -d /tmp/gspn_gpu_site.XXXXXX)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$ARTIFACT"/wheels/*.whl
    export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export LD_LIBRARY_PATH="$PWD/$ARTIFACT/lib:$SITE/tvm_ffi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    # tvm_ffi would otherwise try to JIT-build a torch extension there; DLPack needs none.
    export TVM_FFI_DISABLE_TORCH_C_DLPACK=1
    PYTHONUNBUFFERED=1 "$PY" scripts/gpu_check.py run --artifact "$ARTIFACT" ${OUT:+--json "$OUT/gpu_check.json"}
    ;;
  *)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac

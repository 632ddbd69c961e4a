#!/usr/bin/env bash
# A separate virtual environment with optimum's ONNX exporter, for benchmarks/transformer_onnx.py (issue 18).
#
# optimum-onnx 0.1.0 (the exporter's home since optimum 2) needs transformers < 4.58, and the main environment
# has transformers 5.x: installing optimum there would downgrade transformers. So optimum lives in its own venv,
# and the benchmark runs its export in a fresh process of that venv's python (--optimum-python, NS_OPTIMUM_PYTHON,
# or /tmp/optimum-env/bin/python when it exists). Nothing here touches the main environment.
#
#   bash benchmarks/optimum_env.sh [VENV_DIR]        # default /tmp/optimum-env; about a minute with warm caches
#
# Pinned: torch as the main environment's (the CPU wheel; pip must not pull CUDA packages), onnx and onnxruntime
# as the main environment's, transformers at the newest release optimum-onnx 0.1.0 accepts. torchvision is left
# out on purpose: transformers imports it when present, and a torchvision that does not match torch fails there.
set -euo pipefail

VENV="${1:-/tmp/optimum-env}"
PYTHON="${PYTHON:-python3}"
PINS=(
  torch==2.13.0
  transformers==4.57.6
  optimum==2.1.0
  optimum-onnx==0.1.0
  onnx==1.23.2
  onnxruntime==1.32.0
)

"$PYTHON" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

# Refuse before installing anything if the resolution would pull CUDA (nvidia-*) wheels or torchvision.
report="$(mktemp)"
trap 'rm -f "$report"' EXIT
pip_ install -qq --dry-run --report "$report" "${PINS[@]}"
"$VENV/bin/python" - "$report" <<'PY'
import json, sys
names = [item["metadata"]["name"].lower() for item in json.load(open(sys.argv[1]))["install"]]
unwanted = [n for n in names if n.startswith("nvidia-") or n in ("torchvision", "triton")]
if unwanted:
    sys.exit(f"optimum_env.sh: the resolution would install {unwanted}; point pip at the CPU torch wheel "
             "(pip config list: find-links / index-url) and run again")
PY

pip_ install -qq "${PINS[@]}"  # -qq: errors only (the local indexes warn about every package they lack)

# The checks the benchmark relies on: the exporter imports, and no torchvision is there for transformers to trip on.
"$VENV/bin/python" -c "from optimum.exporters.onnx import main_export"
if "$VENV/bin/python" -c "import torchvision" 2>/dev/null; then
  echo "optimum_env.sh: torchvision is installed in $VENV; remove it (transformers imports it and fails)" >&2
  exit 1
fi
"$VENV/bin/python" -c "
import importlib.metadata as m
print('optimum env ready:', '$VENV', '; '.join(f'{p} {m.version(p)}' for p in
      ('torch', 'transformers', 'optimum', 'optimum-onnx', 'onnx', 'onnxruntime')))"

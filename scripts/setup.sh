#!/usr/bin/env bash
# Set up rerankd from scratch: a venv, the CPU build of torch, the package with every extra.
# Used by `make`, CI and docker/Dockerfile alike, so the tested install is the shipped one.
#   scripts/setup.sh [VENV_DIR] [EXTRAS]      defaults: .venv  dev,qdrant,milvus,weaviate
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
EXTRAS=${2:-dev,qdrant,milvus,weaviate}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip >/dev/null

# torch first, as the CPU build: a plain `torch` requirement would pull a multi-GB CUDA
# build. RERANKD_TORCH overrides (e.g. a CUDA build in the GPU image).
TORCH_SPEC=${RERANKD_TORCH:-torch==2.13.0}
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi

# grpcio < 1.80 and protobuf < 7 keep weaviate-client 4.23 and the generated stubs happy.
"${PIP[@]}" install -e ".[${EXTRAS}]" "grpcio<1.80" "protobuf<7"
"$VENV/bin/python" -c "import rerankd, torch, onnxruntime; print('rerankd', rerankd.__version__, 'torch', torch.__version__, 'onnxruntime', onnxruntime.__version__)"

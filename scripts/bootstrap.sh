#!/usr/bin/env bash
# Installs what orw_fast needs and builds its extension in place (idempotent; safe to re-run).
#   - torch: kept if present; installed from PyPI only when missing.
#   - triton: CUDA builds of torch bring it; with a CPU torch the wheel is added without its
#     dependencies (it then runs only under TRITON_INTERPRET=1, which the tests set).
#   - torchcfm, torchdiffeq, transformers: --no-deps, because their requirements would replace the
#     installed torch (torchcfm -> torchdyn -> torchvision -> a newer torch); what they need at run
#     time is installed next to them.
#   - the package itself, editable, built against the torch already installed (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pip() { "$PY" -m pip "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip install torch
"$PY" -c "import triton" 2>/dev/null || pip install --no-deps "triton==3.9.0"
pip install --no-deps "torchcfm==1.0.7" "torchdiffeq==0.2.5" "transformers==5.23.0"
pip install ninja pot absl-py "huggingface-hub==2.4.0" "tokenizers==0.23.3" "safetensors==0.8.0" typer
pip install nvidia-dali-cuda130
pip install --no-build-isolation -e ".[test]"

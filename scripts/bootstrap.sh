#!/usr/bin/env bash
# Installs what orw_fast needs and builds its extension in place (idempotent; safe to re-run).
#   - torch: kept if present; torch==2.13.0 (the version the tests run on) only when missing.
#   - triton: CUDA builds of torch bring it; with a CPU torch the wheel is added without its
#     dependencies (it then runs only under TRITON_INTERPRET=1, which the tests set).
#   - torchcfm, torchdiffeq, transformers, diffusers, peft: --no-deps, because their requirements would
#     replace the installed torch (torchcfm -> torchdyn -> torchvision -> a newer torch); everything else
#     they need at run time is installed next to them, by name (accelerate's torch>=2.0 keeps ours).
#   - the package itself, editable, built against the torch already installed (--no-build-isolation).
#   - scripts/check_install.py then proves the install complete: every run-time requirement present
#     (the one left out on purpose, torchcfm's torchdyn, is named there) and every package importing.
# pip's conflict warnings are off (--no-warn-conflicts): the only conflict is that deliberate one, and
# check_install.py reports any other precisely, failing the bootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pip() { "$PY" -m pip --no-input "$@"; }
install() { pip install --no-warn-conflicts "$@"; }

"$PY" -c "import torch" 2>/dev/null || install "torch==2.13.0"
"$PY" -c "import triton" 2>/dev/null || install --no-deps "triton==3.9.0"
install --no-deps "torchcfm==1.0.7" "torchdiffeq==0.2.5" "transformers==5.23.0" "diffusers==0.42.1" "peft==0.21.2"
# their own run-time requirements, without torchdyn (torch is already installed and satisfies them all)
install ninja pot absl-py pandas scipy scikit-learn matplotlib numpy \
    "huggingface-hub==2.4.0" "tokenizers==0.23.3" "safetensors==0.8.0" typer regex pyyaml packaging tqdm \
    importlib_metadata requests pillow psutil "accelerate==1.15.0"
install nvidia-dali-cuda130
install --no-build-isolation -e ".[test]"
"$PY" scripts/check_install.py

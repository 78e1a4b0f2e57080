#!/usr/bin/env bash
# Installs what orw_fast needs and builds its extension in place (idempotent; safe to re-run).
#   - torch: kept if present; installed from PyPI only when missing.
#   - triton: CUDA builds of torch bring it; with a CPU torch the wheel is added without its
#     dependencies (it then runs only under TRITON_INTERPRET=1, which the tests set).
#   - the package itself, editable, built against the torch already installed (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}

"$PY" -c "import torch" 2>/dev/null || "$PY" -m pip install torch
"$PY" -c "import triton" 2>/dev/null || "$PY" -m pip install --no-deps "triton==3.9.0"
"$PY" -m pip install ninja
"$PY" -m pip install --no-build-isolation -e ".[test]"

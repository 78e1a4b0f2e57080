#!/usr/bin/env bash
# Downloads the wheels an offline GPU machine lacks into .whl/ (ignored by git) for benchmarks/run_gpu.sh:
# torchcfm and POT (torchcfm imports it), expecttest (torch.library.opcheck in the tests), and diffusers with
# importlib-metadata for the text-to-image stage (the GPU image has transformers, peft, accelerate,
# huggingface-hub and safetensors at versions diffusers accepts), for CPython 3.12 on x86-64 Linux, the GPU
# image's Python. Versions: those installed here, else the pins below.
#   bash benchmarks/fetch_gpu_wheels.sh [PYTHON_VERSION]      # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || echo "$2"; }
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "torchcfm==$(version torchcfm 1.0.7)" "POT==$(version POT 0.9.7.post1)" "expecttest==$(version expecttest 0.3.0)" \
    "diffusers==$(version diffusers 0.42.1)" "importlib-metadata==$(version importlib-metadata 8.7.0)"
ls -la .whl

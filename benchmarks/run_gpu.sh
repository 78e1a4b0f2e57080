#!/usr/bin/env bash
# The whole GPU run in one command (H100/H200, sm_90): build the extension for the GPU, nvcc resource report
# (registers, spills, 16-byte loads in the SASS), the test suite with its CUDA tests, copy bandwidth and bf16
# matmul rate, the loss / sampler / training-step / text-to-image benchmarks -> benchmarks/results/<device>/ (JSON, CSV,
# Markdown, PNG, logs, run_<date>_<commit>.md with the issue's targets). A failing stage is recorded and the
# run goes on.
#
#   bash benchmarks/run_gpu.sh --quick            # the GPU proof in one 10-minute call (about 6-8 min on an H200), in
#                                                 # this order: build for sm_90 -> the GPU tests (pytest -m gpu) -> copy
#                                                 # bandwidth -> loss at 16M and 64M elements (eager, compile, native,
#                                                 # triton; fp32, bf16) -> training step against the official one ->
#                                                 # SD3.5-medium-size LoRA step (random weights, bf16) with its memory;
#                                                 # each stage's files are packed into $OUT as soon as it ends
#   bash benchmarks/run_gpu.sh --quick --dry-run  # the same plan on the CPU: every stage starts, the benchmarks check
#                                                 # their arguments and list their cases, the GPU tests are collected,
#                                                 # the build skips with a line saying why; nothing is written
#   bash benchmarks/run_gpu.sh                    # everything (estimated 15-25 min on an H100)
# or in parts, e.g. to fit 10-minute calls (a part that finds no CUDA kernel built runs the build stage first):
#   bash benchmarks/run_gpu.sh --stages build,nvcc,hardware,loss      # estimated 5-8 min
#   bash benchmarks/run_gpu.sh --stages tests,sampler                 # estimated 5-9 min
#   bash benchmarks/run_gpu.sh --stages train_step                    # estimated 4-7 min
#   bash benchmarks/run_gpu.sh --stages rollout_error,time_to_target  # rollout accuracy; time to a reward against
#                                                                       the official algorithm (estimated 5-10 min)
#   bash benchmarks/run_gpu.sh --stages t2i                           # text-to-image: SD3.5-medium and FLUX.1-dev
#                                                                       sizes, random weights (estimated 5-10 min)
#   bash benchmarks/run_gpu.sh --stages methods                       # time to a reward across methods (ORW-CFM-W2,
#                                                                       NFT, AWM, Flow-GRPO): not yet timed, about
#                                                                       66 runs x (30 s cap + evaluations), 35-40 min
#   bash benchmarks/run_gpu.sh --smoke                                # every stage, benchmarks at toy sizes
# Each part writes run_<date>_<commit>_<stages>.md; `python benchmarks/run_all.py --report benchmarks/results/<gpu>`
# (no GPU needed) sums the parts up into summary_<date>_<commit>.md with the issue's targets.
# Other options: python benchmarks/run_all.py --help.
#
# On the project's device tool (a copy of the working tree, no internet): first `bash benchmarks/fetch_gpu_wheels.sh`
# here, then one call `OUT=$OUT bash benchmarks/run_gpu.sh --quick` carrying only .whl (the build's ignored outputs,
# build/ and orw_fast/_C*.so, are made there for sm_90 and are not sent), with a time limit that leaves room to rerun
# one stage (e.g. --stages loss).
# Offline GPU machines: torchcfm and POT (and expecttest for the opcheck tests; diffusers for the text-to-image
# stage and tests) may be missing there. On a
# machine with internet run `bash benchmarks/fetch_gpu_wheels.sh` (wheels for CPython 3.12 into .whl/) and
# bring .whl/ along; this script installs them into /tmp/orw_fast_site when the import fails.
# Environment: PYTHON (default python3), ORW_FAST_COMMIT (the commit to record when the checkout has no .git),
# OUT (when set, the results are also packed into $OUT/gpu_results.tar.gz after every stage).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
args=() dry_run=0
for arg in "$@"; do
    case "$arg" in
        -h|--help) exec "$PY" benchmarks/run_all.py --help ;;
        --quick) args+=(--plan proof) ;;
        --smoke) args+=(--quick) ;;
        --dry-run) dry_run=1; args+=(--dry-run) ;;
        *) args+=("$arg") ;;
    esac
done
if [ "$dry_run" = 1 ]; then  # the plan on this machine's CPU: nothing measured or written, no CUDA needed
    export PYTHONUNBUFFERED=1
    exec "$PY" benchmarks/run_all.py --device cpu "${args[@]}"
fi

if ! "$PY" -c "import torchcfm, ot, diffusers, peft, transformers" 2>/dev/null; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        echo "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/orw_fast_site \
            .whl/*.whl && export PYTHONPATH="/tmp/orw_fast_site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "warning: torchcfm / POT / diffusers / peft / transformers are not importable and there is no .whl/" \
             "folder: the sampler, training-step and text-to-image benchmarks and their tests will fail (see" \
             "bash benchmarks/fetch_gpu_wheels.sh)"
    fi
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "error: torch sees no CUDA device; for the CPU run use bash benchmarks/run_cpu.sh" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,temperature.gpu \
    --format=csv 2>/dev/null || true
if [ -z "${ORW_FAST_COMMIT:-}" ] && ! git rev-parse --short HEAD >/dev/null 2>&1; then
    echo "warning: no git checkout here and ORW_FAST_COMMIT is unset: the results will say commit 'unknown'"
fi
export PYTHONUNBUFFERED=1
exec "$PY" benchmarks/run_all.py --device cuda ${OUT:+--archive "$OUT/gpu_results.tar.gz"} "${args[@]}"

#!/usr/bin/env bash
# The CPU benchmark tables (loss, sampler, training step, with the copy bandwidth measured in the same run)
# -> benchmarks/results/<cpu>/. Run it on a quiet machine: about 2-3 minutes on 2 cores.
#
#   bash benchmarks/run_cpu.sh              # all CPU stages
#   bash benchmarks/run_cpu.sh --quick      # smoke run (about a minute)
# Other options: python benchmarks/run_all.py --help
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python}" benchmarks/run_all.py --device cpu "$@"

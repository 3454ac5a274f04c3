#!/usr/bin/env bash
# The one-shot GPU check (see benchmarks/gpu_check.py): build, `pytest -m gpu`,
# the GPU benchmarks and a bf16 training run, all written to OUT_DIR.
#   bash benchmarks/gpu_check.sh OUT_DIR [--dry-run]
set -uo pipefail
cd "$(dirname "$0")/.." && exec python benchmarks/gpu_check.py "$@"

#!/usr/bin/env bash
# GPU acceptance run (issue 15): tests, PEFT agreement, LoRA op and decode-step timings, adapter
# loads; one report in $OUT (or --out DIR, default ./gpu_check_out). Under 8 minutes on one GPU.
#   bash scripts/gpu_check.sh                  # on a GPU machine
#   bash scripts/gpu_check.sh --dry-run        # on CPU with tiny shapes: proves the run works
#   bash scripts/gpu_check.sh --sections op,decode
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m benchmarks.gpu_check "$@"

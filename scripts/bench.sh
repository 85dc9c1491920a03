#!/usr/bin/env bash
# Sets up .venv if missing (installs rdr_jax[test]), then runs the side-by-side benchmarks:
#   scripts/bench.sh [names...] [--quick] [--json OUT] [--repeats N] [--peak-tflops T]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python -m benchmarks "$@"

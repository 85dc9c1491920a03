#!/usr/bin/env bash
# Sets up .venv if missing (installs rdr_jax[test]), then runs the embedded end-to-end demo.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec rdr-jax demo "$@"

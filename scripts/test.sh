#!/usr/bin/env bash
# Sets up .venv if missing (installs rdr_jax[test]), then runs the whole test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# The malloc settings rdr-jax restarts itself with (rdr_jax/runtime.py), set here once for every test process.
GLIBC_TUNABLES="$(python -c 'import os; from rdr_jax.runtime import merged_glibc_tunables as m; print(m(os.environ.get("GLIBC_TUNABLES", "")))')"
export GLIBC_TUNABLES
# Two workers on the 2-core CI machine; every test is independent. The 20 slowest are listed: the suite must stay
# near 20 minutes on 2 cores, and they are the first to trim.
exec python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadfile --durations=20 "$@"

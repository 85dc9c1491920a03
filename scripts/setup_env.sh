#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with its test extra.
# Sourced by scripts/test.sh and scripts/demo.sh so both set up the same way.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
STAMP="$VENV/.rdr_jax_installed"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
# Reinstall when pyproject.toml changed since the last install.
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ]; then
  PIP_ARGS=(--disable-pip-version-check -q)
  # The CPU torch wheel lies on this machine's disk; point pip at it when present.
  if [ -d /opt/wheels ]; then PIP_ARGS+=(--find-links /opt/wheels); fi
  echo "[setup] installing rdr_jax[test] into $VENV (first run takes a few minutes)"
  # (grep drops pip's warnings about this machine's optional local index folders)
  "$VENV/bin/python" -m pip install "${PIP_ARGS[@]}" -e "$ROOT[test]" 2>&1 | { grep -v "is ignored: it is neither" || true; }
  [ "${PIPESTATUS[0]}" -eq 0 ] || { echo "[setup] pip install failed" >&2; exit 1; }
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"

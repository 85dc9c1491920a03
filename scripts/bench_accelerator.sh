#!/usr/bin/env bash
# The whole accelerator check (GPU/TPU) in one run, within a time budget (default 450 s: under 8 minutes on one
# H100-class GPU, the parts that do not fit are reported as skipped):
#
#   scripts/bench_accelerator.sh [OUT_DIR] [--tiny]      OUT_DIR default: $OUT, else ./bench_accelerator_out
#
# In order: the fused-attention tests on the device (when pytest is present and the backend is not the CPU);
# the bf16 DPR train step of the default recipe (attention dropout 0.1, RDR_JAX_ATTENTION=auto); PyTorch's step
# (same loss, no clipping); the encoder's forward throughput (JAX and PyTorch); the train step with the
# reference XLA attention; with scanned layers; without attention dropout. Each part runs in a fresh process
# (cold compile) and appends its JSON line to OUT_DIR/accelerator.jsonl as soon as it ends.
# --tiny: tiny shapes, the code path on a CPU. Needs jax, flax (optax), numpy, and torch + transformers for the
# PyTorch sides: nothing is installed. BENCH_BUDGET_S, PYTHON override the budget (--tiny: 900 s) and the
# interpreter.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${OUT:-$PWD/bench_accelerator_out}"
SHAPES=()
BUDGET=450
SCALE=1  # of each part's time cap
for arg in "$@"; do
  case "$arg" in
    --tiny) SHAPES=(--tiny --layers 1 --batch 4 --lq 8 --lp 16 --encode-batch 8 --steps 2 --warmup 1 --prng rbg
                    --peak-tflops 1)
            BUDGET=900 SCALE=3 ;;  # a busy CPU host: slow process start-up and compiles
    -h|--help) sed -n '2,14p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) OUT_DIR="$arg" ;;
  esac
done
BUDGET="${BENCH_BUDGET_S:-$BUDGET}"
PY="${PYTHON:-python}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
JSONL="$OUT_DIR/accelerator.jsonl"
cd "$ROOT"
left() { echo $((BUDGET - SECONDS)); }

# label, most seconds, then benchmarks.accelerator arguments
part() {
  local label="$1" most=$(($2 * SCALE))
  shift 2
  local t
  t=$(left)
  (( t > most )) && t=$most
  echo "== $label ($t s at most, $(left) s of the budget left)" >&2
  "$PY" -m benchmarks.accelerator --jsonl "$JSONL" --label "$label" --budget-s "$t" "${SHAPES[@]}" "$@"
}

BACKEND="$("$PY" -c 'import jax; print(jax.default_backend())' 2>/dev/null || echo unknown)"
echo "== backend $BACKEND, results in $JSONL" >&2
if [[ "$BACKEND" != cpu ]] && "$PY" -c 'import pytest' 2>/dev/null; then
  timeout "$(( $(left) < 120 ? $(left) : 120 ))" "$PY" -m pytest -q -rs tests/test_attention.py \
    -k "device or replays or lowers" >"$OUT_DIR/attention_tests.txt" 2>&1
  echo "== attention tests on the device: exit $? (see $OUT_DIR/attention_tests.txt)" >&2
fi
part default 170 --parts train
part torch 100 --parts torch_train
part encode 80 --parts encode
part xla_attention 170 --parts train --attention xla
part scan_layers 120 --parts train --scan-layers
part no_attention_dropout 120 --parts train --attention-dropout 0

"$PY" -m benchmarks.accelerator --summarize "$JSONL" | tee "$OUT_DIR/summary.md"
echo "== done in $SECONDS s: $JSONL" >&2

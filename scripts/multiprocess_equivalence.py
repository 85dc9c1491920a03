"""Every task's tiny config trained on 2 local processes x 4 CPU devices (jax.distributed, gloo) against 1 process
x 8 devices: the per-step losses, then the 2-process run resumed from its step-2 checkpoint (batches built by a
grain worker process where the task has ``data.workers``) repeating steps 3-4 bit for bit.

The test suite runs this for RDR, DGR and DPR (tests/test_multiprocess.py); the other tasks cost ~1 min each on
2 cores, over the suite's time budget, so they are checked here, by hand::

    PYTHONPATH=. python scripts/multiprocess_equivalence.py [--workdir DIR] [TASK ...]   (default: all tasks)

Exit status 1 when a task's losses differ by more than a relative 1e-5 or its resume is not bit-exact.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import test_multiprocess as mp  # noqa: E402  (the suite's launch helpers: one way to start the processes)

TASKS = ("dpr", "rdr", "reader", "cross_encoder", "dgr", "seq2seq_index")
NO_WORKERS = {"seq2seq_index"}   # its mixed iterator holds the passages in memory: no data.workers key


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def check(task: str, tmp: Path) -> bool:
    overrides = mp.COMMON + ["train.log_every=1"]
    if task in ("rdr", "dpr"):   # their tiny configs read files the suite writes first
        import harness
        bert = harness.tiny_bert_dir(tmp / "bert")
        data = (harness.write_rdr_jsonl(tmp / "rdr.jsonl", 32, k=4) if task == "rdr"
                else harness.write_biencoder_json(tmp / "dpr.json", 32))
        overrides = harness.tiny_overrides(task, bert, data) + overrides
    runs = mp.run_one_and_two_processes(task, tmp, overrides)
    one, two = losses(runs["single"]), losses(runs["multi"])
    rel = max(abs(one[s] - two[s]) / max(abs(one[s]), 1e-9) for s in one)
    for p in (runs["multi"] / "checkpoints").iterdir():   # back to step 2
        if p.name.isdigit() and int(p.name) > 2:
            shutil.rmtree(p)
    mp.wait_for(task, mp.two_processes(task, runs["multi"],
                                       overrides + ([] if task in NO_WORKERS else ["data.workers=1"])))
    resumed = losses(runs["multi"])
    exact = all(resumed[s] == two[s] for s in range(3, mp.STEPS + 1))
    print(f"{task:14s} 1x8 {[round(one[s], 6) for s in sorted(one)]}  2x4 max rel. diff {rel:.1e}  "
          f"resumed (workers={0 if task in NO_WORKERS else 1}) bit-exact: {exact}", flush=True)
    return rel <= 1e-5 and exact


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks", nargs="*", help=f"tasks to check, of {', '.join(TASKS)} (default: all)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rdr_jax_multiprocess_equivalence"))
    args = p.parse_args()
    unknown = sorted(set(args.tasks) - set(TASKS))
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    shutil.rmtree(args.workdir, ignore_errors=True)
    ok = [check(task, args.workdir / task) for task in args.tasks or TASKS]
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())

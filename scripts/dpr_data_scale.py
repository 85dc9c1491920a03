"""DPR training data at scale, on a CPU (issue 17's scale check; not a test).

  python scripts/dpr_data_scale.py make-json OUT.json [--questions 60000 --passages 10 --words 80]
      a synthetic DPR-layout training JSON (written streamed)
  python scripts/dpr_data_scale.py setup SRC.json [--cache DIR] [--batches 4]
      peak RSS of DPR's training data set-up (DPRData + the first batches), in this process. Runs against any
      checkout (PYTHONPATH=...): a DPRData without ``cache_dir`` (before grain) reads the file whole
  python scripts/dpr_data_scale.py wait [--workers 2] [--steps 40] [--batch-size 16]
      the share of step time the tiny DPR training loop waits for its next batch, batches built on the training
      thread (--workers 0) or by grain worker processes
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river mountain city music history science film battle king queen").split()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_json(out: Path, questions: int, passages: int, words: int) -> None:
    rng = np.random.default_rng(0)
    text = lambda n: " ".join(rng.choice(WORDS, size=n))
    ctx = lambda: {"title": text(2), "text": text(words), "score": 1.0, "title_score": 0, "passage_id": "1"}
    hard = passages // 2
    with out.open("w") as f:
        f.write("[\n")
        for i in range(questions):
            ex = {"dataset": "synthetic", "question": f"{text(8)} {i}?", "answers": [text(2)],
                  "positive_ctxs": [ctx()], "negative_ctxs": [ctx() for _ in range(passages - hard - 1)],
                  "hard_negative_ctxs": [ctx() for _ in range(hard)]}
            f.write(("," if i else "") + json.dumps(ex) + "\n")
        f.write("]\n")
    print(f"{out}: {questions} questions, {out.stat().st_size / 2**20:.0f} MiB")


def setup(src: str, cache: str | None, batches: int) -> None:
    from rdr_jax.data.dpr_data import DPRData
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.tasks.model_setup import MINILM_PACKAGE, resolve_path

    tokenizer = load_tokenizer(resolve_path(MINILM_PACKAGE))
    base = peak_rss_mb()
    kw = dict(max_question_length=256, max_passage_length=256, hard_negatives=1)
    grain = "cache_dir" in inspect.signature(DPRData).parameters
    if grain:
        kw["cache_dir"] = cache or tempfile.mkdtemp()
    start = time.perf_counter()
    data = DPRData(src, tokenizer, **kw)
    built = time.perf_counter() - start
    rng = np.random.default_rng(0)
    for b in range(batches):
        data.make_batch(rng.choice(len(data), 16, replace=False), np.random.default_rng(b))
    print(json.dumps({"path": "grain records" if grain else "whole-file read", "examples": len(data),
                      "set_up_s": round(built, 1), "peak_rss_mb": round(peak_rss_mb()), "rss_before_data_mb": round(base),
                      "file_mb": round(Path(src).stat().st_size / 2**20)}))


class TimedIterator:
    """The task's iterator, timing each ``next`` (the training step waits that long for its batch)."""

    def __init__(self, inner):
        self.inner, self.waits = inner, []

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.inner)
        self.waits.append(time.perf_counter() - start)
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def wait(workers: int, steps: int, batch_size: int, questions: int) -> None:
    from rdr_jax.tasks import load_config
    from rdr_jax.training.loop import make_task, train

    root = Path(__file__).resolve().parents[1]
    work = Path(tempfile.mkdtemp())
    data = work / "train.json"
    make_json(data, questions, 8, 100)
    config = load_config(root / "rdr_jax" / "configs" / "tiny" / "dpr.yaml", overrides=[
        f"workdir={work / 'run'}", f"data.train_file={data}", f"data.workers={workers}", f"train.steps={steps}",
        f"train.batch_size={batch_size}", "data.hard_negatives=7", "data.max_passage_length=128",
        "data.max_question_length=32", f"train.checkpoint_every={steps}", "train.export_final=false",
        "train.tensorboard=false", "train.min_free_gb=0", f"train.log_every={steps}"])
    task = make_task(config)
    it = TimedIterator(task.train_iterator(batch_size, 0))
    next(it)    # the first batch (workers start, dataset converted) is not counted
    it.waits.clear()
    start = time.perf_counter()
    train(config, iterator=it, progress=False)
    total = time.perf_counter() - start
    waits = np.array(it.waits[2:])   # steps 1-2 compile
    steady = total - sum(it.waits[:2])
    print(json.dumps({"workers": workers, "steps": len(waits), "mean_wait_ms": round(1e3 * waits.mean(), 1),
                      "wait_share_after_compile": round(float(waits.sum() / max(steady, 1e-9)), 3),
                      "total_s": round(total, 1)}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-json")
    m.add_argument("out", type=Path)
    m.add_argument("--questions", type=int, default=60000)
    m.add_argument("--passages", type=int, default=10)
    m.add_argument("--words", type=int, default=80)
    s = sub.add_parser("setup")
    s.add_argument("src")
    s.add_argument("--cache", default=None)
    s.add_argument("--batches", type=int, default=4)
    w = sub.add_parser("wait")
    w.add_argument("--workers", type=int, default=2)
    w.add_argument("--steps", type=int, default=40)
    w.add_argument("--batch-size", type=int, default=16)
    w.add_argument("--questions", type=int, default=2000)
    a = p.parse_args(argv)
    if a.cmd == "make-json":
        make_json(a.out, a.questions, a.passages, a.words)
    elif a.cmd == "setup":
        setup(a.src, a.cache, a.batches)
    else:
        wait(a.workers, a.steps, a.batch_size, a.questions)
    return 0


if __name__ == "__main__":
    sys.exit(main())

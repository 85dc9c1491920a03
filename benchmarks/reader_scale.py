"""Host memory of the reader's training set-up at NQ scale, measured on this CPU with synthetic data and a tiny model.

``python -m benchmarks.reader_scale [--questions 2000] [--ctxs 100] [--words 100] [--workdir DIR] [--json OUT]``

Writes DPR's retriever-results layout (``questions`` x ``ctxs`` retrieved passages of ``words`` words, the
third one holding the answer) and measures, each in a fresh subprocess on the code of ``PYTHONPATH``'s first
entry (as :mod:`benchmarks.training_scale`, whose child it runs; for a "before", ``cd /tmp &&
PYTHONPATH=/path/to/main python /path/to/benchmarks/reader_scale.py ...``), the peak RSS (VmHWM) after the
reader task's set-up (data read, first batch built): from the raw file (where a raw file is converted once
into WORKDIR/data_cache, that first run converts it) and again on the same workdir (the conversion reused),
at ``questions`` and at a quarter of them. The growth per question is what a process holds per example;
extrapolated to NQ's 58,880 training questions, per process and for 8 processes per node.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

try:
    from benchmarks.training_scale import NQ_QUESTIONS, PROCESSES_PER_NODE, WORDS, code_and_env, emit, gib, measure
except ImportError:   # run as a script from another checkout (a "before"): its own directory is on sys.path
    from training_scale import NQ_QUESTIONS, PROCESSES_PER_NODE, WORDS, code_and_env, emit, gib, measure


def write_results(path: Path, questions: int, ctxs: int, words: int, seed: int = 3) -> Path:
    """DPR retriever-results JSON, written item by item."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    with path.open("w") as f:
        f.write("[")
        for i in range(questions):
            ctx = [{"id": str(i * ctxs + j), "title": f"title {j}", "text": " ".join(rng.choice(vocab, words)),
                    "score": 1.0, "has_answer": j == 2} for j in range(ctxs)]
            ctx[2]["text"] += " answer"
            ex = {"question": f"who wrote {WORDS[i % 18]} number {i}?", "answers": ["answer"], "ctxs": ctx}
            f.write(("," if i else "") + json.dumps(ex))
        f.write("]")
    return path


# The shipped tiny reader config (of the code measured), at DPR's reader shapes: 24 passages of 256 tokens.
OVERRIDES = ["data.dev_file=null", "data.passages_per_question=24", "data.max_length=256",
             "model.init.num_hidden_layers=1", "model.init.max_position_embeddings=256", "train.batch_size=16",
             "train.tensorboard=false"]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=2000)
    p.add_argument("--ctxs", type=int, default=100, help="retrieved passages per question (DPR's files: 100)")
    p.add_argument("--words", type=int, default=100, help="words per passage text")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rdr_jax_reader_scale"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.workdir
    code, env = code_and_env(work)
    config = Path(code) / "rdr_jax" / "configs" / "tiny" / "reader.yaml"
    few = max(100, args.questions // 4)
    report = {"code": code, "questions": args.questions, "ctxs": args.ctxs, "words": args.words}
    own = {}
    for q in (args.questions, few):
        data = write_results(work / f"results_{q}_{args.ctxs}_{args.words}.json", q, args.ctxs, args.words)
        run_dir = work / f"run_reader_{q}"
        shutil.rmtree(run_dir, ignore_errors=True)    # the first run converts (where the code does)
        for leg in ("first", "again"):
            r = measure({"what": "reader", "config": str(config), "workdir": str(run_dir), "steps": 0,
                         "overrides": [f"data.train_file={data}"] + OVERRIDES}, env, code)
            print(f"[reader_scale] {q} questions, {leg}: {json.dumps(r)}", file=sys.stderr)
            key = f"{q}q_{leg}"
            report.setdefault("file_gib", {})[f"{q}q"] = gib(data.stat().st_size)
            report.setdefault("setup_peak_gib", {})[key] = gib(r["setup"]["VmHWM"])
            report.setdefault("setup_seconds", {})[key] = round(r["setup_s"], 1)
            report["baseline_gib"] = gib(r["baseline"]["VmHWM"])
            own[q, leg] = r["setup"]["VmHWM"] - r["baseline"]["VmHWM"]
    for leg in ("first", "again"):
        per_question = max(0.0, (own[args.questions, leg] - own[few, leg]) / (args.questions - few))
        nq = own[args.questions, leg] + per_question * (NQ_QUESTIONS - args.questions)
        report[leg] = {"setup_bytes_per_question": round(per_question, 1),
                       "nq_setup_over_baseline_per_process_gib": gib(nq),
                       "nq_setup_over_baseline_per_node_gib": gib(nq * PROCESSES_PER_NODE)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()

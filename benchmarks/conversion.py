"""Checkpoint load and save: rdr_jax.from_pretrained / save_pretrained vs transformers' BertModel.

A bert-base-size BertModel (random weights) is saved as safetensors; each side then loads it and saves it
back, in a fresh subprocess per measurement so each process's peak RSS (VmHWM) is its own. Times
exclude interpreter start and imports (reported apart); peak RSS is whole-process, imports included, and
``*_rss_after_import_mb`` gives the baseline to subtract. transformers memory-maps the file and reads no
weight during ``from_pretrained`` (pages come in at the first forward), while ours ends with every weight in
device memory: ``torch_touch_s`` / ``torch_peak_rss_after_touch_mb`` add reading each weight once, for
comparison (not counted in its load time).

Worker mode (used internally): ``python -m benchmarks.conversion worker {jax|torch} SRC DST THREADS``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from benchmarks import common as C
from benchmarks.encoder import BERT_BASE, TINY


def worker(side: str, src: str, dst: str, threads: int) -> dict:
    t0 = time.perf_counter()
    if side == "jax":
        import jax
        import rdr_jax
        import rdr_jax.models.bert  # noqa: F401

        def load():
            model = rdr_jax.from_pretrained(src)
            jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
            return model
    else:
        import torch
        import transformers

        torch.set_num_threads(threads)
        _ = transformers.BertModel  # transformers imports lazily: pay the import here, not in the load time

        def load():
            return transformers.BertModel.from_pretrained(src)
    import_s = time.perf_counter() - t0
    rss_import = C.peak_rss_mb()
    t0 = time.perf_counter()
    model = load()
    load_s = time.perf_counter() - t0
    rss_load = C.peak_rss_mb()
    # transformers memory-maps safetensors: its load reads no weight yet (the first forward pages them in).
    # Reading every weight once gives the cost of a model actually in memory, as ours is after its load.
    t0 = time.perf_counter()
    if side == "torch":
        import torch
        with torch.no_grad():
            sum(float(p.float().sum()) for p in model.state_dict().values())
    touch_s = time.perf_counter() - t0
    rss_touch = C.peak_rss_mb()
    t0 = time.perf_counter()
    model.save_pretrained(dst)
    save_s = time.perf_counter() - t0
    return {"import_s": import_s, "load_s": load_s, "touch_s": touch_s, "save_s": save_s,
            "rss_after_import_mb": rss_import, "peak_rss_after_load_mb": rss_load,
            "peak_rss_after_touch_mb": rss_touch, "peak_rss_after_save_mb": C.peak_rss_mb()}


def run(opts: C.Options) -> list[C.Result]:
    import transformers

    C.configure_torch(opts.threads)
    size = TINY if opts.quick else BERT_BASE
    hf = transformers.BertModel(transformers.BertConfig(**size, vocab_size=30522, max_position_embeddings=512))
    src = C.save_random_hf(hf, Path(opts.workdir) / "bert_checkpoint")
    del hf
    size_mb = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 2**20
    runs: dict[str, list[dict]] = {"jax": [], "torch": []}
    repeats = 1 if opts.quick else max(2, min(opts.repeats, 3))
    for r in range(repeats):
        for side in (("jax", "torch") if r % 2 == 0 else ("torch", "jax")):
            dst = Path(opts.workdir) / f"saved_{side}"
            runs[side].append(C.run_worker("benchmarks.conversion",
                                           ["worker", side, str(src), str(dst), str(opts.threads)], opts.threads))
            shutil.rmtree(dst, ignore_errors=True)

    def med(side, key):
        return statistics.median(x[key] for x in runs[side])

    summary = {f"{side}_{key}": med(side, key) for side in runs for key in runs[side][0]}
    summary.update(checkpoint_mb=size_mb, runs=repeats)
    what = "tiny" if opts.quick else "bert-base"
    for side in runs:  # the load's own memory: the peak over the process's resident size after its imports
        base = summary[f"{side}_rss_after_import_mb"]
        summary[f"{side}_load_rss_mb"] = summary[f"{side}_peak_rss_after_load_mb"] - base
        summary[f"{side}_touched_rss_mb"] = summary[f"{side}_peak_rss_after_touch_mb"] - base
    load_notes = (f"{what} {size_mb:.0f} MB safetensors; peak RSS {summary['jax_peak_rss_after_load_mb']:.0f} vs "
                  f"{summary['torch_peak_rss_after_load_mb']:.0f} MB (after import "
                  f"{summary['jax_rss_after_import_mb']:.0f} vs {summary['torch_rss_after_import_mb']:.0f}: the load "
                  f"adds {summary['jax_load_rss_mb']:.0f} vs {summary['torch_load_rss_mb']:.0f}); "
                  f"transformers' load maps the file without reading it: reading every weight once more takes "
                  f"{1000 * summary['torch_touch_s']:.0f} ms, peak RSS then "
                  f"{summary['torch_peak_rss_after_touch_mb']:.0f} MB (+{summary['torch_touched_rss_mb']:.0f})")
    save_notes = (f"peak RSS {summary['jax_peak_rss_after_save_mb']:.0f} vs "
                  f"{summary['torch_peak_rss_after_save_mb']:.0f} MB (load + save process)")
    return [C.Result(f"conversion: load {what} HF checkpoint", 1000 * summary["jax_load_s"],
                     1000 * summary["torch_load_s"], load_notes, summary),
            C.Result(f"conversion: save {what} as HF safetensors", 1000 * summary["jax_save_s"],
                     1000 * summary["torch_save_s"], save_notes, {})]


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "worker":
        print(json.dumps(worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    else:
        sys.exit("usage: python -m benchmarks.conversion worker {jax|torch} SRC DST THREADS")

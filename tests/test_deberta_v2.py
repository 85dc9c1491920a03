"""DeBERTa-v2/v3 parity with transformers (fp32, highest matmul precision), conversion both ways, and the
relative-position machinery checked on its own."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file
from transformers.models.deberta_v2 import modeling_deberta_v2 as hf_deberta

from hf_reference import max_abs_diff, padded_batch, save_hf_model
from parity import assert_close
from rdr_jax.models import base
from rdr_jax.models.deberta_relative import (build_relative_position, gather_relative, make_log_bucket_position,
                                             relative_score_indices, relative_term, skew, toeplitz_rows)
from rdr_jax.models.deberta_v2 import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2Model

TOL = 1e-5

# deberta-v3-base widths and relative-position settings; only the vocabulary and depth are cut.
V3_BASE = dict(vocab_size=1000, hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
               relative_attention=True, position_buckets=256, max_relative_positions=-1, max_position_embeddings=512,
               pos_att_type="p2c|c2p", share_att_key=True, norm_rel_ebd="layer_norm", position_biased_input=False,
               type_vocab_size=0, layer_norm_eps=1e-7, hidden_act="gelu", num_labels=1)
# v3 layout at toy width, buckets small enough that a 40-token batch reaches the log buckets and the clamp.
V3_TINY = dict(V3_BASE, hidden_size=32, num_attention_heads=4, intermediate_size=48, position_buckets=8,
               max_relative_positions=16)
V3_ONE_LAYER = dict(V3_TINY, num_hidden_layers=1)
# v2-xlarge options: conv layer, separate position projections, absolute positions, token types, factorised
# embeddings, no buckets (raw distances clamped at max_relative_positions), three labels.
V2_XLARGE_TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=37, relative_attention=True, position_buckets=-1, max_relative_positions=8,
                      pos_att_type=["p2c", "c2p"], share_att_key=False, norm_rel_ebd="none", conv_kernel_size=3,
                      conv_groups=2, conv_act="gelu", position_biased_input=True, type_vocab_size=2,
                      embedding_size=24, layer_norm_eps=1e-7, num_labels=3)


def hf_model(cls, config: dict, seed: int = 0):
    torch.manual_seed(seed)
    return cls(transformers.DebertaV2Config(**config, attn_implementation="eager")).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (transformers model, directory it was saved to); built once per module."""
    cache = {}

    def get(name, cls, config):
        if name not in cache:
            model = hf_model(cls, config)
            cache[name] = (model, save_hf_model(model, tmp_path_factory.mktemp(name)))
        return cache[name]

    return get


def hf_forward(model, ids, mask, types=None):
    with torch.no_grad():
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                     token_type_ids=None if types is None else torch.tensor(types), output_hidden_states=True)


@nnx.jit
def _forward(model, ids, mask, types):
    return model(ids, mask, types, output_hidden_states=True)


def jit_forward(model, ids, mask, types=None):
    # One jitted function for the module: models of the same structure and shapes share a compilation.
    return _forward(model, jnp.asarray(ids), jnp.asarray(mask), None if types is None else jnp.asarray(types))


# ---- (c) relative positions on their own ------------------------------------------------------------------------
@pytest.mark.parametrize("buckets,max_position", [(256, 512), (8, 16), (64, 128), (256, 1024), (10, 100)])
def test_log_bucket_position_matches_transformers(buckets, max_position):
    rel = np.arange(-3000, 3001)
    ours = make_log_bucket_position(rel, buckets, max_position)
    # transformers' formula carried out in float64 (its divisions follow torch's default dtype): the buckets of
    # the exact arithmetic, which ours must give at every distance.
    torch.set_default_dtype(torch.float64)
    try:
        exact = hf_deberta.make_log_bucket_position(torch.tensor(rel), buckets, max_position).long().numpy()
    finally:
        torch.set_default_dtype(torch.float32)
    np.testing.assert_array_equal(ours, exact)
    # transformers as it runs, in float32. Its vectorised and scalar log paths can differ by ~1e-5 relative on
    # some CPUs (CI saw -2738 and +2738 land in different buckets within one call), so distances whose
    # log-scaled value lies that close to a bucket boundary are left to the exact comparison above.
    ref = hf_deberta.make_log_bucket_position(torch.tensor(rel), buckets, max_position).long().numpy()
    mid = buckets // 2
    scaled = np.log(np.maximum(np.abs(rel), mid) / mid) / np.log((max_position - 1) / mid) * (mid - 1)
    boundary_gap = np.abs(scaled - np.round(scaled)) / np.maximum(scaled, 1.0)
    clear = (boundary_gap > 1e-4) | (np.abs(rel) <= mid)
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ours[clear], ref[clear])
    # Distances up to max_position - 1 use exactly the bucket range; longer ones are clamped by the caller.
    assert np.abs(ours[np.abs(rel) < max_position]).max() == buckets - 1


@pytest.mark.parametrize("length,buckets,max_position", [(520, 256, 512), (40, 8, 16), (17, -1, -1), (33, -1, 8)])
def test_relative_position_matrix_matches_transformers(length, buckets, max_position):
    states = torch.zeros(1, length, 4)
    ref = hf_deberta.build_relative_position(states, states, buckets, max_position)
    assert ref.shape == (1, length, length)
    np.testing.assert_array_equal(build_relative_position(length, length, buckets, max_position), ref[0].numpy())


def test_gather_and_onehot_read_the_same_entries():
    table = jax.random.normal(jax.random.key(0), (2, 3, 40, 16))
    c2p, p2c = relative_score_indices(40, DebertaV2Config.from_dict(V3_TINY))
    for index in (c2p, p2c):
        expected = np.take_along_axis(np.asarray(table), np.broadcast_to(index, table.shape[:-1] + (40,)), -1)
        np.testing.assert_array_equal(gather_relative(table, jnp.asarray(index), "gather"), expected)
        np.testing.assert_array_equal(gather_relative(table, jnp.asarray(index), "onehot"), expected)


@pytest.mark.parametrize("length", [1, 2, 7, 40, 300])
def test_skew_shifts_each_row_into_place(length):
    """skew(table)[x, y] == table[x, y + L - 1 - x], the relative shift, checked entry by entry."""
    table = np.random.default_rng(length).normal(size=(2, 3, length, 2 * length - 1)).astype(np.float32)
    x, y = np.indices((length, length))
    np.testing.assert_array_equal(skew(jnp.asarray(table)), table[..., x, y + length - 1 - x])
    with pytest.raises(ValueError, match="2L - 1"):
        skew(jnp.asarray(table[..., :-1]))


@pytest.mark.parametrize("length", [5, 40, 300])
def test_skew_relative_term_reads_what_the_gather_reads(length):
    """relative_term's three implementations give out[b, h, x, y] = states[b, x, h] . positions[index[x, y], h]
    for DeBERTa-v3's bucketed c2p and p2c indices (long enough at 300 for the log buckets)."""
    config = DebertaV2Config.from_dict(dict(V3_TINY, position_buckets=64, max_relative_positions=128))
    rng = np.random.default_rng(0)
    states = rng.normal(size=(2, length, 3, 8)).astype(np.float32)
    positions = rng.normal(size=(2 * config.attention_span, 3, 8)).astype(np.float32)
    for index in relative_score_indices(length, config):
        rows = toeplitz_rows(index)
        x, y = np.indices(index.shape)
        np.testing.assert_array_equal(rows[y + length - 1 - x], index)
        expected = np.einsum("bxhd,xyhd->bhxy", states.astype(np.float64), positions[index].astype(np.float64))
        for impl in ("skew", "gather", "onehot"):
            out = relative_term(jnp.asarray(states), jnp.asarray(positions), index, impl)
            np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5, err_msg=impl)
    with pytest.raises(ValueError, match="query - key"):
        toeplitz_rows(np.arange(16).reshape(4, 4))


@pytest.mark.parametrize("term", ["c2p", "p2c"])
def test_each_attention_term_alone_matches_transformers(saved, term):
    """The relative bias of one term against transformers' ``disentangled_attention_bias``, then the model."""
    config = dict(V3_TINY, pos_att_type=term, share_att_key=False)
    hf, path = saved(f"term_{term}", transformers.DebertaV2ForSequenceClassification, config)
    ours = DebertaV2ForSequenceClassification.from_pretrained(path)
    attention = ours.deberta.layers[0].attention
    assert (attention.pos_key_proj is not None) == (term == "c2p")
    assert (attention.pos_query_proj is not None) == (term == "p2c")

    batch, length, heads, head_dim = 2, 40, 4, 8
    q, k = (np.random.RandomState(s).randn(batch, length, heads, head_dim).astype(np.float32) for s in (1, 2))
    rel = np.random.RandomState(3).randn(16, 32).astype(np.float32)
    hf_attention = hf.deberta.encoder.layer[0].attention.self
    to_bh = lambda x: torch.tensor(x).permute(0, 2, 1, 3).reshape(batch * heads, length, head_dim)  # noqa: E731
    rel_pos = hf_deberta.build_relative_position(to_bh(q), to_bh(k), 8, 16)
    with torch.no_grad():
        ref = hf_attention.disentangled_attention_bias(to_bh(q), to_bh(k), rel_pos, torch.tensor(rel), 2)
    c2p, p2c = relative_score_indices(length, ours.config)
    bias = attention.relative_bias(jnp.asarray(q), jnp.asarray(k), jnp.asarray(rel), jnp.asarray(c2p),
                                   jnp.asarray(p2c))
    assert_close(bias.reshape(batch * heads, length, length), ref, atol=TOL)

    ids, mask, _ = padded_batch(2, length, config["vocab_size"], pad_rows=((1, 9),), token_types=False)
    out, ref_out = jit_forward(ours, ids, mask), hf_forward(hf, ids, mask)
    assert_close(out.logits, ref_out.logits, atol=TOL)
    assert_close(out.hidden_states[-1], ref_out.hidden_states[-1], atol=TOL)


# ---- (a), (b) whole-model parity ----------------------------------------------------------------------------------
def test_v3_base_width_parity_beyond_512_tokens(saved):
    hf, path = saved("v3_base", transformers.DebertaV2ForSequenceClassification, V3_BASE)
    ours = DebertaV2ForSequenceClassification.from_pretrained(path)
    assert ours.config.attention_span == 256 and ours.config.max_relative == 512
    ids, mask, _ = padded_batch(2, 520, V3_BASE["vocab_size"], pad_rows=((1, 37),), token_types=False)
    out, ref = jit_forward(ours, ids, mask), hf_forward(hf, ids, mask)
    assert out.logits.shape == (2, 1)
    assert_close(out.logits, ref.logits, atol=TOL)
    assert_close(out.hidden_states[-1], ref.hidden_states[-1], atol=TOL)
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert_close(ours_h, ref_h, atol=TOL)


def test_v2_xlarge_options_parity(saved):
    hf, path = saved("v2_xlarge", transformers.DebertaV2ForSequenceClassification, V2_XLARGE_TINY)
    ours = DebertaV2ForSequenceClassification.from_pretrained(path)
    body = ours.deberta
    assert body.conv is not None and body.embeddings.embed_proj is not None and body.rel_norm is None
    assert body.embeddings.position_embeddings is not None and body.embeddings.token_type_embeddings is not None
    ids, mask, types = padded_batch(3, 40, V2_XLARGE_TINY["vocab_size"], pad_rows=((1, 11), (2, 1)))
    out, ref = jit_forward(ours, ids, mask, types), hf_forward(hf, ids, mask, types)
    assert out.logits.shape == (3, 3)
    assert_close(out.logits, ref.logits, atol=TOL)
    for ours_h, ref_h in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert_close(ours_h, ref_h, atol=TOL)
    # Token types matter in this configuration, so the check above covers them.
    assert max_abs_diff(out.logits, hf_forward(hf, ids, mask).logits) > 1e-4


def test_base_model_parity_and_dispatch(saved):
    hf, path = saved("v3_model", transformers.DebertaV2Model, V3_TINY)
    ours = base.from_pretrained(path)
    assert type(ours) is DebertaV2Model
    ids, mask, _ = padded_batch(2, 40, V3_TINY["vocab_size"], pad_rows=((0, 5),), token_types=False)
    out, ref = jit_forward(ours, ids, mask), hf_forward(hf, ids, mask)
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=TOL)


# ---- (d) the two gather implementations -----------------------------------------------------------------------------
def test_onehot_impl_equals_gather_impl(saved):
    _, path = saved("v3_tiny", transformers.DebertaV2ForSequenceClassification, V3_TINY)
    ids, mask, _ = padded_batch(2, 40, V3_TINY["vocab_size"], token_types=False)
    gather = jit_forward(DebertaV2ForSequenceClassification.from_pretrained(path, relative_attention_impl="gather"),
                         ids, mask)
    for impl in ("onehot", "skew"):
        other = jit_forward(DebertaV2ForSequenceClassification.from_pretrained(path, relative_attention_impl=impl),
                            ids, mask)
        np.testing.assert_allclose(gather.logits, other.logits, atol=1e-6, err_msg=impl)
        np.testing.assert_allclose(gather.hidden_states[-1], other.hidden_states[-1], atol=1e-6, err_msg=impl)
    with pytest.raises(ValueError, match="relative_attention_impl"):
        DebertaV2ForSequenceClassification.from_pretrained(path, relative_attention_impl="scatter")


# ---- (e) conversion both ways --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,hf_cls,ours_cls,config", [
    ("rt_v2_xlarge", transformers.DebertaV2ForSequenceClassification, DebertaV2ForSequenceClassification,
     V2_XLARGE_TINY),
    ("rt_v3_model", transformers.DebertaV2Model, DebertaV2Model, V3_TINY),
])
def test_round_trip_is_bit_exact_and_transformers_loads_it(saved, tmp_path, name, hf_cls, ours_cls, config):
    _, path = saved(name, hf_cls, config)
    ours_cls.from_pretrained(path).save_pretrained(tmp_path)
    original, written = load_file(f"{path}/model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert set(written) == set(original)
    for key, array in original.items():
        assert written[key].shape == array.shape and written[key].dtype == array.dtype, key
        np.testing.assert_array_equal(written[key], array, err_msg=key)
    reloaded, info = hf_cls.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    saved_config = json.loads((tmp_path / "config.json").read_text())
    assert saved_config["architectures"] == [hf_cls.__name__] and saved_config["model_type"] == "deberta-v2"
    assert reloaded.config.pos_att_type == list(DebertaV2Config.from_dict(config).attention_terms)


def test_classifier_starts_from_plain_model_checkpoint(saved):
    _, path = saved("v3_one_layer_model", transformers.DebertaV2Model, V3_ONE_LAYER)
    cross_encoder = DebertaV2ForSequenceClassification.from_pretrained(path)
    body = DebertaV2Model.from_pretrained(path)
    for ours, ref in zip(jax.tree.leaves(nnx.state(cross_encoder.deberta, nnx.Param)),
                         jax.tree.leaves(nnx.state(body.deberta, nnx.Param)), strict=True):
        np.testing.assert_array_equal(ours, ref)
    for head in (cross_encoder.pooler.dense.kernel, cross_encoder.classifier.kernel):
        assert np.all(np.isfinite(head[...])) and np.std(head[...]) > 1e-3  # freshly initialised, not zeros


def test_base_model_loads_classifier_checkpoint_body(saved):
    hf, path = saved("v3_tiny", transformers.DebertaV2ForSequenceClassification, V3_TINY)
    body = DebertaV2Model.from_pretrained(path)
    ids, mask, _ = padded_batch(2, 40, V3_TINY["vocab_size"], token_types=False)
    ref = hf_forward(hf, ids, mask)
    assert_close(jit_forward(body, ids, mask).last_hidden_state, ref.hidden_states[-1], atol=TOL)


# ---- (f) bf16, dropout, remat, config errors ------------------------------------------------------------------------
def test_bf16_forward_is_finite_with_padding(saved):
    hf, path = saved("v3_tiny", transformers.DebertaV2ForSequenceClassification, V3_TINY)
    bf16 = DebertaV2ForSequenceClassification.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids, mask, _ = padded_batch(2, 40, V3_TINY["vocab_size"], pad_rows=((1, 30),), token_types=False)
    out = jit_forward(bf16, ids, mask)
    assert out.logits.dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out.logits, np.float32)))
    assert np.all(np.isfinite(np.asarray(out.hidden_states[-1], np.float32)))
    assert_close(np.asarray(out.logits, np.float32), hf_forward(hf, ids, mask).logits, atol=0.1)


def test_dropout_through_remat(saved):
    """Rematerialised layers draw the same dropout masks as plain ones, and their gradient runs."""
    hf, path = saved("v3_one_layer", transformers.DebertaV2ForSequenceClassification, V3_ONE_LAYER)
    plain = DebertaV2ForSequenceClassification.from_pretrained(path)
    remat = DebertaV2ForSequenceClassification.from_pretrained(path, remat=True)
    ids, mask, _ = padded_batch(2, 40, V3_TINY["vocab_size"], token_types=False)

    def loss(model, rngs, deterministic):
        return jnp.sum(model(ids, mask, rngs=rngs, deterministic=deterministic).logits ** 2)

    train_loss = nnx.jit(loss, static_argnums=2)
    remat_loss = train_loss(remat, nnx.Rngs(dropout=1), False)
    plain_loss = train_loss(plain, nnx.Rngs(dropout=1), False)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    # Dropout is live in that loss: the deterministic model gives another value.
    eval_loss = float((hf_forward(hf, ids, mask).logits ** 2).sum())
    assert abs(float(plain_loss) - eval_loss) > 1e-6
    # The rematerialised backward pass agrees with transformers' gradient of the same loss.
    value, grads = nnx.jit(lambda m: nnx.value_and_grad(loss)(m, None, True))(remat)
    hf.zero_grad()
    (hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits ** 2).sum().backward()
    assert_close(float(value), eval_loss, atol=TOL)
    word_grad = np.asarray(grads["deberta"]["embeddings"]["word_embeddings"]["embedding"][...])
    assert_close(word_grad, hf.deberta.embeddings.word_embeddings.weight.grad, atol=TOL)


@pytest.mark.parametrize("change,field", [(dict(pos_att_type="c2p|p2q"), "pos_att_type"),
                                          (dict(hidden_size=30), "num_attention_heads"),
                                          (dict(conv_kernel_size=3, conv_groups=5), "conv_groups"),
                                          (dict(conv_act="mish"), "conv_act")])
def test_bad_config_is_named(change, field):
    with pytest.raises(ValueError, match=field):
        DebertaV2Config.from_dict(dict(V3_TINY, **change))

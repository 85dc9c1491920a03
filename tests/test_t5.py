"""T5ForConditionalGeneration against transformers: relative buckets, logits, cached decoding, conversion."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers.models.t5.modeling_t5 import T5Attention

from rdr_jax.models.base import from_pretrained
from rdr_jax.models.seq2seq import reorder_cache, sequence_log_probs, shift_right
from rdr_jax.models.t5 import T5ForConditionalGeneration, relative_position_bucket
from parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5
VOCAB = 512
# Original T5 (tied, rescaled output) at t5-small width, but 2 layers and a small vocabulary.
ORIGINAL = dict(vocab_size=VOCAB, d_model=512, d_kv=64, d_ff=2048, num_layers=2, num_heads=8,
                feed_forward_proj="relu", tie_word_embeddings=True, decoder_start_token_id=0)
# T5 v1.1 / Flan-T5 style: gated-GELU, separate lm_head, no rescale; uneven decoder depth.
V1_1 = dict(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=16, relative_attention_max_distance=20,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)


def build_hf(config: dict, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration._from_config(transformers.T5Config(**config),
                                                              attn_implementation="eager")
    if not config["tie_word_embeddings"]:
        # transformers 5 builds lm_head tied whatever the config; a real v1.1 checkpoint has its own matrix.
        hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.05)
    return hf.eval()


@pytest.fixture(scope="module", params=["original", "v1_1"])
def pair(request, tmp_path_factory):
    """(transformers model, its saved directory, our model loaded from it)."""
    config = ORIGINAL if request.param == "original" else V1_1
    hf = build_hf(config)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, T5ForConditionalGeneration.from_pretrained(path)


def padded_batch(seed=0):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(2, VOCAB, (3, 9))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding
    attention_mask[2, :2] = 0  # left padding
    decoder_input_ids = rng.randint(2, VOCAB, (3, 6))
    decoder_input_ids[:, 0] = 0
    decoder_attention_mask = np.ones_like(decoder_input_ids)
    decoder_attention_mask[1, 4:] = 0
    return input_ids, attention_mask, decoder_input_ids, decoder_attention_mask


def hf_logits(hf, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                  decoder_input_ids=torch.tensor(decoder_input_ids),
                  decoder_attention_mask=None if decoder_attention_mask is None else torch.tensor(
                      decoder_attention_mask)).logits.numpy()


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (16, 20), (8, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_transformers(num_buckets, max_distance, bidirectional):
    relative = np.arange(-400, 401)
    expected = T5Attention._relative_position_bucket(torch.tensor(relative), bidirectional=bidirectional,
                                                     num_buckets=num_buckets, max_distance=max_distance).numpy()
    got = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                   max_distance=max_distance)
    np.testing.assert_array_equal(np.asarray(got), expected)
    # The range spans every reachable bucket (bidirectional: "after, distance 0" cannot occur).
    assert len(np.unique(expected)) == num_buckets - int(bidirectional)


def test_logits_match_transformers(pair):
    name, hf, _, model = pair
    assert (model.lm_head is None) == (name == "original")
    assert model.config.scale_decoder_outputs == (name == "original")
    batch = padded_batch()
    expected = hf_logits(hf, *batch)
    out = model(*map(jnp.asarray, batch))
    assert out.logits.shape == expected.shape
    assert_close(np.asarray(out.logits), expected, atol=TOL)
    # No decoder mask: transformers' default (causal only).
    assert_close(np.asarray(model(*batch[:3]).logits), hf_logits(hf, *batch[:3]), atol=TOL)


@pytest.mark.parametrize("pair", ["v1_1"], indirect=True)  # the code paths do not depend on width
def test_cached_decoding_matches_full_forward(pair):
    _, _, _, model = pair
    input_ids, attention_mask, decoder_input_ids, _ = padded_batch(seed=1)
    full = np.asarray(model(input_ids, attention_mask, decoder_input_ids).logits)
    batch, steps = decoder_input_ids.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def scan_decode(state, input_ids, attention_mask, tokens):
        # The cache is the carry of a lax loop: a plain pytree, updated functionally.
        m = nnx.merge(graphdef, state)
        encoder_hidden = m.encode(input_ids, attention_mask)
        cache = m.init_cache(batch, steps + 3, encoder_hidden)

        def step(cache, token):
            logits, cache = m.decode(token[:, None], encoder_hidden, attention_mask, cache)
            return cache, logits[:, 0]

        cache, logits = jax.lax.scan(step, cache, tokens.T)
        return jnp.swapaxes(logits, 0, 1), cache.index

    logits, index = scan_decode(state, input_ids, attention_mask, decoder_input_ids)
    assert int(index) == steps
    assert_close(np.asarray(logits), full, atol=TOL)

    # Eager, cross keys/values recomputed each step, a 2-token prefix then single tokens.
    encoder_hidden = model.encode(input_ids, attention_mask)
    cache = model.init_cache(batch, steps)
    assert cache.cross_keys is None and cache.self_keys[0].shape[2] == steps
    chunks, pieces = [decoder_input_ids[:, :2]] + [decoder_input_ids[:, t:t + 1] for t in range(2, steps)], []
    for chunk in chunks:
        step_logits, cache = model.decode(chunk, encoder_hidden, attention_mask, cache)
        pieces.append(np.asarray(step_logits))
    assert_close(np.concatenate(pieces, axis=1), full, atol=TOL)


@pytest.mark.parametrize("pair", ["v1_1"], indirect=True)  # the code paths do not depend on width
def test_reorder_cache_gathers_rows(pair):
    _, _, _, model = pair
    input_ids, attention_mask, decoder_input_ids, _ = padded_batch(seed=2)
    encoder_hidden = model.encode(input_ids, attention_mask)
    cache = model.init_cache(3, 4, encoder_hidden)
    _, cache = model.decode(decoder_input_ids[:, :2], encoder_hidden, attention_mask, cache)
    order = jnp.array([2, 2, 0])
    moved = reorder_cache(cache, order)
    np.testing.assert_array_equal(np.asarray(moved.self_keys[1]), np.asarray(cache.self_keys[1])[[2, 2, 0]])
    np.testing.assert_array_equal(np.asarray(moved.cross_values[0]), np.asarray(cache.cross_values[0])[[2, 2, 0]])
    assert int(moved.index) == 2
    # Decoding on from the reordered cache equals decoding the reordered rows from scratch.
    logits, _ = model.decode(decoder_input_ids[np.array([2, 2, 0]), 2:3], encoder_hidden[order],
                             attention_mask[np.array([2, 2, 0])], moved)
    full = model(input_ids[[2, 2, 0]], attention_mask[[2, 2, 0]], decoder_input_ids[[2, 2, 0], :3]).logits
    assert_close(np.asarray(logits[:, 0]), np.asarray(full[:, 2]), atol=TOL)


@pytest.mark.parametrize("pair", ["v1_1"], indirect=True)  # the code paths do not depend on width
def test_decoder_rows_sharing_an_encoder_row(pair):
    # Beam search: 2 decoder rows per question read one cached encoder row; the logits equal decoding with the
    # encoder output repeated for every row, and the grouped cache refuses a cross reorder.
    _, _, _, model = pair
    input_ids, attention_mask, decoder_input_ids, _ = padded_batch(seed=4)
    group, steps = 2, 3
    encoder_hidden = model.encode(input_ids, attention_mask)
    rows = np.repeat(np.arange(len(input_ids)), group)
    tokens = np.asarray(decoder_input_ids)[rows[::-1], :steps]  # rows of one question decode different tokens
    shared = model.init_cache(len(rows), steps, encoder_hidden)
    assert shared.cross_keys[0].shape[0] == len(input_ids) and shared.self_keys[0].shape[0] == len(rows)
    repeated = model.init_cache(len(rows), steps, encoder_hidden[rows])
    for t in range(steps):
        got, shared = model.decode(tokens[:, t:t + 1], encoder_hidden, attention_mask, shared)
        want, repeated = model.decode(tokens[:, t:t + 1], encoder_hidden[rows], attention_mask[rows], repeated)
        assert_close(np.asarray(got), np.asarray(want), atol=1e-5)
    with pytest.raises(ValueError, match="cross=False"):
        reorder_cache(shared, jnp.arange(len(rows)))
    with pytest.raises(ValueError, match="multiple of the encoder rows"):
        model.init_cache(len(input_ids) + 1, steps, encoder_hidden)


def test_sequence_log_probs_matches_transformers(pair):
    _, hf, _, model = pair
    input_ids, attention_mask, targets, target_mask = padded_batch(seed=3)
    target_mask[2, 3:] = 0
    decoder_input_ids = shift_right(jnp.where(target_mask == 1, targets, 0), 0, 0)
    assert np.asarray(decoder_input_ids)[0, 0] == model.decoder_start_token_id == 0
    logits = torch.tensor(hf_logits(hf, input_ids, attention_mask, np.asarray(decoder_input_ids)))
    token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    expected = (token * torch.tensor(target_mask)).sum(-1).numpy()
    got = sequence_log_probs(model, input_ids, attention_mask, targets, target_mask)
    assert got.shape == (3,)
    assert_close(np.asarray(got), expected, atol=1e-4)


def test_round_trip_bit_exact_and_loads_in_transformers(pair, tmp_path):
    name, hf, path, model = pair
    model.save_pretrained(tmp_path)
    original, ours = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(ours) == sorted(original)
    assert ("lm_head.weight" in ours) == (name == "v1_1")
    for key, array in original.items():
        assert ours[key].dtype == array.dtype and np.array_equal(ours[key], array), key
    back, info = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True,
                                                                         attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert back.config.scale_decoder_outputs == hf.config.scale_decoder_outputs
    batch = padded_batch(seed=4)
    np.testing.assert_allclose(hf_logits(back.eval(), *batch), hf_logits(hf, *batch), atol=0, rtol=0)
    # The registry picks the class from config.json, and our own output loads back unchanged.
    again = from_pretrained(tmp_path)
    assert isinstance(again, T5ForConditionalGeneration) and (again.lm_head is None) == (name == "original")


def test_checkpoint_variants_of_the_tied_keys(tmp_path):
    """Old checkpoints carry copies of the embedding under every tied name; transformers-5 saves of untied
    models say tie_word_embeddings=true with scale_decoder_outputs=false and their own lm_head."""
    config = dict(V1_1, tie_word_embeddings=True)
    hf = build_hf(config, seed=5)
    hf.save_pretrained(tmp_path / "tied")
    state = load_file(str(tmp_path / "tied" / "model.safetensors"))
    batch = padded_batch(seed=5)

    copies = dict(state, **{k: state["shared.weight"].copy() for k in
                            ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")})
    save_file(copies, str(tmp_path / "tied" / "model.safetensors"), metadata={"format": "pt"})
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "tied")
    assert model.lm_head is None and model.config.scale_decoder_outputs
    assert_close(np.asarray(model(*batch).logits), hf_logits(hf, *batch), atol=TOL)

    untied = dict(state, **{"lm_head.weight": np.random.RandomState(0).normal(0, 0.05, state["shared.weight"].shape)
                            .astype(np.float32)})
    (tmp_path / "untied").mkdir()
    save_file(untied, str(tmp_path / "untied" / "model.safetensors"), metadata={"format": "pt"})
    raw = json.loads((tmp_path / "tied" / "config.json").read_text())
    raw.update(tie_word_embeddings=True, scale_decoder_outputs=False)
    (tmp_path / "untied" / "config.json").write_text(json.dumps(raw))
    model = T5ForConditionalGeneration.from_pretrained(tmp_path / "untied")
    reference = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "untied",
                                                                        attn_implementation="eager").eval()
    assert model.lm_head is not None and not model.config.scale_decoder_outputs
    assert_close(np.asarray(model(*batch).logits), hf_logits(reference, *batch), atol=TOL)


@pytest.mark.parametrize("pair", ["v1_1"], indirect=True)  # the code paths do not depend on width
def test_bfloat16_padded_batch_is_finite(pair):
    _, _, path, _ = pair
    model = T5ForConditionalGeneration.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    logits = model(*padded_batch()).logits
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))

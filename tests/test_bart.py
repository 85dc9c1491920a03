"""BartForConditionalGeneration against transformers: logits, cached decoding, final_logits_bias, conversion."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from rdr_jax.models import layers as L
from rdr_jax.models.bart import BartForConditionalGeneration
from rdr_jax.models.base import from_pretrained
from rdr_jax.models.seq2seq import sequence_log_probs, shift_right
from parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

TOL = 1e-5
VOCAB = 320
BASE = dict(vocab_size=VOCAB, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=40,
            activation_function="gelu", scale_embedding=False)
CONFIGS = {
    "base": BASE,
    # Scaled embeddings, another activation, uneven depths and widths.
    "scaled": dict(BASE, scale_embedding=True, activation_function="relu", encoder_layers=1, decoder_layers=3,
                   decoder_attention_heads=8, encoder_ffn_dim=48),
}


def build_hf(config: dict, seed: int = 0) -> transformers.BartForConditionalGeneration:
    torch.manual_seed(seed)
    hf = transformers.BartForConditionalGeneration._from_config(transformers.BartConfig(**config),
                                                                attn_implementation="eager")
    with torch.no_grad():  # zeros in a fresh model; random here so that conversion of the buffer is checked
        hf.final_logits_bias.normal_()
    return hf.eval()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(transformers model, its saved directory, our model loaded from it)."""
    hf = build_hf(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, path, BartForConditionalGeneration.from_pretrained(path)


def padded_batch(seed=0):
    rng = np.random.RandomState(seed)
    input_ids = rng.randint(3, VOCAB, (3, 10))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 7:] = 0  # right padding
    attention_mask[2, :3] = 0  # left padding
    decoder_input_ids = rng.randint(3, VOCAB, (3, 7))
    decoder_input_ids[:, 0] = 2
    decoder_attention_mask = np.ones_like(decoder_input_ids)
    decoder_attention_mask[0, 5:] = 0
    return input_ids, attention_mask, decoder_input_ids, decoder_attention_mask


def hf_logits(hf, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(input_ids), attention_mask=torch.tensor(attention_mask),
                  decoder_input_ids=torch.tensor(decoder_input_ids),
                  decoder_attention_mask=None if decoder_attention_mask is None else torch.tensor(
                      decoder_attention_mask)).logits.numpy()


def test_logits_match_transformers(pair):
    hf, _, model = pair
    batch = padded_batch()
    expected = hf_logits(hf, *batch)
    out = model(*map(jnp.asarray, batch))
    assert out.logits.shape == expected.shape
    assert_close(np.asarray(out.logits), expected, atol=TOL)
    assert_close(np.asarray(model(*batch[:3]).logits), hf_logits(hf, *batch[:3]), atol=TOL)
    assert_close(np.asarray(out.encoder_last_hidden_state), hf.model.encoder(
        input_ids=torch.tensor(batch[0]), attention_mask=torch.tensor(batch[1])).last_hidden_state.detach().numpy(),
        atol=TOL)


@pytest.mark.parametrize("pair", ["scaled"], indirect=True)
def test_cached_decoding_matches_full_forward(pair):
    _, _, model = pair
    input_ids, attention_mask, decoder_input_ids, _ = padded_batch(seed=1)
    full = np.asarray(model(input_ids, attention_mask, decoder_input_ids).logits)
    batch, steps = decoder_input_ids.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def scan_decode(state, input_ids, attention_mask, tokens):
        m = nnx.merge(graphdef, state)
        encoder_hidden = m.encode(input_ids, attention_mask)
        cache = m.init_cache(batch, steps + 2, encoder_hidden)

        def step(cache, token):
            logits, cache = m.decode(token[:, None], encoder_hidden, attention_mask, cache)
            return cache, logits[:, 0]

        _, logits = jax.lax.scan(step, cache, tokens.T)
        return jnp.swapaxes(logits, 0, 1)

    assert_close(np.asarray(scan_decode(state, input_ids, attention_mask, decoder_input_ids)), full,
                 atol=TOL)
    # Eager, cross keys/values recomputed every step, a 3-token prefix first.
    encoder_hidden = model.encode(input_ids, attention_mask)
    cache = model.init_cache(batch, steps)
    pieces = []
    for chunk in [decoder_input_ids[:, :3]] + [decoder_input_ids[:, t:t + 1] for t in range(3, steps)]:
        logits, cache = model.decode(chunk, encoder_hidden, attention_mask, cache)
        pieces.append(np.asarray(logits))
    assert_close(np.concatenate(pieces, axis=1), full, atol=TOL)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.init_cache(1, model.config.max_position_embeddings + 1)


def test_sequence_log_probs_matches_transformers(pair):
    hf, _, model = pair
    input_ids, attention_mask, targets, target_mask = padded_batch(seed=2)
    decoder_input_ids = np.asarray(shift_right(jnp.where(target_mask == 1, targets, 1), 2, 1))
    assert decoder_input_ids[0, 0] == model.decoder_start_token_id == 2
    logits = torch.tensor(hf_logits(hf, input_ids, attention_mask, decoder_input_ids))
    token = torch.log_softmax(logits, -1).gather(-1, torch.tensor(targets)[..., None])[..., 0]
    expected = (token * torch.tensor(target_mask)).sum(-1).numpy()
    got = sequence_log_probs(model, input_ids, attention_mask, targets, target_mask)
    assert_close(np.asarray(got), expected, atol=1e-4)


def test_round_trip_bit_exact_and_loads_in_transformers(pair, tmp_path):
    hf, path, model = pair
    model.save_pretrained(tmp_path)
    original, ours = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert sorted(ours) == sorted(original) and "final_logits_bias" in ours
    for key, array in original.items():
        assert ours[key].dtype == array.dtype and np.array_equal(ours[key], array), key
    back, info = transformers.BartForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True,
                                                                           attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = padded_batch(seed=3)
    np.testing.assert_allclose(hf_logits(back.eval(), *batch), hf_logits(hf, *batch), atol=0, rtol=0)
    assert isinstance(from_pretrained(tmp_path), BartForConditionalGeneration)


@pytest.mark.parametrize("pair", ["base"], indirect=True)
def test_final_logits_bias_is_a_converted_buffer_not_a_parameter(pair, tmp_path):
    hf, path, model = pair
    assert isinstance(model.final_logits_bias, L.Buffer)
    np.testing.assert_array_equal(np.asarray(model.final_logits_bias[...]), hf.final_logits_bias.numpy())
    params = nnx.state(model, nnx.Param)
    assert "final_logits_bias" not in params and "shared" in params
    # A gradient step on the parameters sees no bias; the orbax checkpoint still carries it.
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(*padded_batch()[:3]).logits.mean()))(params)
    assert "final_logits_bias" not in grads
    model.save_pretrained(tmp_path, format="orbax")
    restored = BartForConditionalGeneration.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(restored.final_logits_bias[...]), hf.final_logits_bias.numpy())


@pytest.mark.parametrize("pair", ["base"], indirect=True)
def test_other_checkpoint_layouts(pair, tmp_path):
    """A BartModel checkpoint (no "model." prefix, no final_logits_bias) and one with every tied copy stored."""
    hf, path, _ = pair
    state = load_file(str(path / "model.safetensors"))
    config = (path / "config.json").read_text()
    batch = padded_batch(seed=4)

    copies = dict(state, **{k: state["model.shared.weight"].copy() for k in
                            ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
                             "lm_head.weight")})
    (tmp_path / "copies").mkdir()
    save_file(copies, str(tmp_path / "copies" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "copies" / "config.json").write_text(config)
    model = BartForConditionalGeneration.from_pretrained(tmp_path / "copies")
    assert_close(np.asarray(model(*batch).logits), hf_logits(hf, *batch), atol=TOL)

    body = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    (tmp_path / "body").mkdir()
    save_file(body, str(tmp_path / "body" / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "body" / "config.json").write_text(config)
    model = BartForConditionalGeneration.from_pretrained(tmp_path / "body")
    assert not np.any(np.asarray(model.final_logits_bias[...]))
    expected = hf_logits(hf, *batch) - hf.final_logits_bias.numpy()
    assert_close(np.asarray(model(*batch).logits), expected, atol=TOL)


@pytest.mark.parametrize("pair", ["base"], indirect=True)
def test_remat_dropout_and_bfloat16(pair):
    _, path, model = pair
    batch = padded_batch(seed=5)
    logits_of = nnx.jit(lambda m, rngs=None: m(*batch, rngs=rngs, deterministic=rngs is None).logits)
    reference = np.asarray(logits_of(model))
    remat = BartForConditionalGeneration.from_pretrained(path, remat=True)
    assert_close(np.asarray(logits_of(remat)), reference, atol=TOL)
    dropped = logits_of(model, nnx.Rngs(dropout=0))
    assert np.abs(np.asarray(dropped) - reference).max() > 1e-3  # config dropout 0.1 is applied
    bf16 = BartForConditionalGeneration.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    logits = logits_of(bf16)
    assert logits.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(logits)))


def test_untied_config_is_refused_clearly():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        BartForConditionalGeneration.config_class.from_dict(dict(BASE, tie_word_embeddings=False))

"""The encoder-decoder stack shared by T5 and BART (rdr_jax.models.seq2seq): rematerialised layers with
dropout on give the training loss and gradients of the plain layers; and the models layer imports nothing
above it."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from rdr_jax.models.bart import BartForConditionalGeneration
from rdr_jax.models.seq2seq import sequence_log_probs
from rdr_jax.models.t5 import T5ForConditionalGeneration

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB = 64
FAMILIES = {
    "t5": (T5ForConditionalGeneration,
           dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.1,
                feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)),
    "bart": (BartForConditionalGeneration,
             dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
                  dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)),
}


def batch():
    rng = np.random.RandomState(0)
    input_ids = rng.randint(3, VOCAB, (3, 9))
    attention_mask = np.ones_like(input_ids)
    attention_mask[1, 6:] = 0
    targets = rng.randint(3, VOCAB, (3, 5))
    target_mask = np.ones_like(targets)
    target_mask[2, 3:] = 0
    return input_ids, attention_mask, targets, target_mask


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_remat_with_dropout_gives_the_same_loss_and_grads(family):
    cls, config = FAMILIES[family]
    inputs = batch()

    def loss(model, rngs):
        return -sequence_log_probs(model, *inputs, rngs=rngs, deterministic=rngs is None).sum()

    def loss_and_grads(remat):
        @nnx.jit
        def run(model):
            return nnx.value_and_grad(lambda m: loss(m, nnx.Rngs(dropout=7)))(model)

        value, grads = run(cls.from_config(config, seed=0, remat=remat))
        return float(value), jax.tree.leaves(nnx.state(grads, nnx.Param))

    plain, remat = loss_and_grads(False), loss_and_grads(True)
    assert plain[0] == pytest.approx(remat[0], rel=1e-6)
    deterministic = float(loss(cls.from_config(config, seed=0), None))
    assert abs(plain[0] - deterministic) > 1e-4  # dropout really ran
    assert len(plain[1]) == len(remat[1])
    for a, b in zip(plain[1], remat[1]):  # the same numbers up to float32 rounding (recomputation fuses differently)
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(b).max())))


def test_models_import_nothing_above_them():
    """models (with convert) is the bottom layer: importing it loads no decoding, data, retrieval, training,
    tasks or losses module (Seq2SeqLM.constrained_beam_search imports rdr_jax.decoding when called)."""
    code = ("import sys, rdr_jax.models; "
            "above = ('data', 'decoding', 'retrieval', 'training', 'tasks', 'commands', 'cli', 'losses'); "
            "loaded = sorted(m for m in sys.modules if m.split('.')[:2][-1] in above and m.startswith('rdr_jax.')); "
            "assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True)

"""Trie-constrained beam search on tiny T5 and BART models: validity, exact scores, transformers' generate."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rdr_jax.decoding import PrefixTrie, constrained_beam_search
from rdr_jax.models.bart import BartForConditionalGeneration
from rdr_jax.models.seq2seq import sequence_log_probs
from rdr_jax.models.t5 import T5ForConditionalGeneration
from parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

VOCAB, BATCH, SOURCE_LEN = 64, 3, 7
NUM_BEAMS, MAX_LEN = 6, 6  # one compiled search per family: every call below uses these shapes
FIRST_TOKEN = 3  # identifiers avoid the special tokens of both families (0-2)


@pytest.fixture(scope="module", params=["t5", "bart"])
def family(request, tmp_path_factory):
    """(name, transformers model, our model loaded from its saved directory, eos, pad)."""
    torch.manual_seed(0)
    if request.param == "t5":
        config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                       decoder_start_token_id=0)
        hf_class, our_class = transformers.T5ForConditionalGeneration, T5ForConditionalGeneration
    else:
        config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                         encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                         decoder_ffn_dim=64, max_position_embeddings=32, forced_eos_token_id=None)
        hf_class, our_class = transformers.BartForConditionalGeneration, BartForConditionalGeneration
    hf = hf_class._from_config(config, attn_implementation="eager").eval()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, our_class.from_pretrained(path), config.eos_token_id, config.pad_token_id


def random_identifiers(rng, count, vocab=VOCAB, max_tokens=MAX_LEN - 1):
    """Identifiers of 1..max_tokens tokens over a few first tokens, so prefixes are shared."""
    return [[int(rng.integers(FIRST_TOKEN, FIRST_TOKEN + 6))]
            + rng.integers(FIRST_TOKEN, vocab, rng.integers(0, max_tokens)).tolist() for _ in range(count)]


def inputs(seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(FIRST_TOKEN, VOCAB, (BATCH, SOURCE_LEN))
    mask = np.ones_like(ids)
    mask[1, 4:] = 0
    return ids, mask


def through_eos(sequences, eos):
    """1 up to and including the first EOS of each row."""
    is_eos = np.asarray(sequences) == eos
    return (np.cumsum(is_eos, axis=-1) - is_eos == 0).astype(np.int32)


_SCORERS = {}


def teacher_forced(model, ids, mask, sequences, eos):
    """Summed log-probs [B, K] of each sequence (K <= NUM_BEAMS), recomputed without the cache by
    seq2seq.sequence_log_probs (jit-compiled once per model at [BATCH * NUM_BEAMS, MAX_LEN])."""
    B, K, L = sequences.shape
    assert B == BATCH and K <= NUM_BEAMS and L == MAX_LEN
    if id(model) not in _SCORERS:
        graphdef, params = nnx.split(model)
        _SCORERS[id(model)] = (params, jax.jit(lambda p, *args: sequence_log_probs(nnx.merge(graphdef, p), *args)))
    params, scorer = _SCORERS[id(model)]
    full = np.full((B, NUM_BEAMS, L), eos)
    full[:, :K] = sequences
    flat = full.reshape(B * NUM_BEAMS, L)
    scores = scorer(params, np.repeat(ids, NUM_BEAMS, 0), np.repeat(mask, NUM_BEAMS, 0), flat, through_eos(flat, eos))
    return np.asarray(scores).reshape(B, NUM_BEAMS)[:, :K]


def check_valid_and_exact(model, trie, ids, mask, sequences, scores, eos, pad):
    sequences, scores = np.asarray(sequences), np.asarray(scores)
    assert sequences.shape == (BATCH, NUM_BEAMS, MAX_LEN) and scores.shape == (BATCH, NUM_BEAMS)
    found = np.isfinite(scores)
    assert (np.diff(np.where(found, scores, -1e30), axis=1) <= 0).all(), "best first"
    ident = trie.lookup(sequences)
    assert (ident[found] >= 0).all(), "every returned sequence is an identifier of the trie"
    assert (sequences[~found] == pad).all()
    for row in range(BATCH):  # distinct identifiers
        assert len(set(ident[row][found[row]])) == found[row].sum()
    # after EOS only padding
    after = (np.cumsum(sequences == eos, axis=-1) - (sequences == eos)) > 0
    assert (sequences[after] == pad).all()
    recomputed = teacher_forced(model, ids, mask, np.where(found[..., None], sequences, eos), eos)
    np.testing.assert_allclose(scores[found], recomputed[found], atol=1e-4, rtol=0)


def hf_constrained_generate(hf, trie_sequences, ids, mask, eos):
    reference = {}
    for seq in trie_sequences:
        node = reference
        for token in list(seq) + [eos]:
            node = node.setdefault(token, {})

    def allowed(batch_id, prefix):
        node = reference
        for token in prefix.tolist()[1:]:  # after the decoder start token
            if token not in node:
                return [eos]  # a beam transformers keeps alive at -1e9; never a real candidate
            node = node[token]
        return list(node) or [eos]

    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=NUM_BEAMS,
                          num_return_sequences=NUM_BEAMS, prefix_allowed_tokens_fn=allowed, max_length=MAX_LEN + 1,
                          length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, forced_bos_token_id=None, forced_eos_token_id=None)
    sequences = out.sequences.numpy()[:, 1:].reshape(BATCH, NUM_BEAMS, -1)
    return sequences, out.sequences_scores.numpy().reshape(BATCH, NUM_BEAMS)


def identifier(sequence, eos):
    sequence = list(sequence)
    return tuple(sequence[:sequence.index(eos) + 1]) if eos in sequence else tuple(sequence)


@pytest.mark.parametrize("seed", range(4))
def test_matches_transformers_generate_with_prefix_allowed_tokens(family, seed):
    name, hf, model, eos, pad = family
    rng = np.random.default_rng(100 + seed)
    sequences = random_identifiers(rng, int(rng.integers(15, 40)))
    trie = PrefixTrie(sequences, eos_token_id=eos)
    ids, mask = inputs(seed)
    ours, scores = constrained_beam_search(model, ids, mask, trie, NUM_BEAMS, MAX_LEN)
    check_valid_and_exact(model, trie, ids, mask, ours, scores, eos, pad)
    hf_sequences, hf_scores = hf_constrained_generate(hf, sequences, ids, mask, eos)
    ours, scores = np.asarray(ours), np.asarray(scores)
    compared = 0
    for row in range(BATCH):
        for beam in range(NUM_BEAMS):
            if hf_scores[row, beam] < -1e8:  # transformers' placeholder beams (see beam_search.py): stop here
                break
            assert identifier(ours[row, beam], eos) == identifier(hf_sequences[row, beam], eos), (name, row, beam)
            assert_close(scores[row, beam], hf_scores[row, beam], atol=1e-4)
            compared += 1
    assert compared >= BATCH * 3, "the comparison covered real beams"


@pytest.mark.parametrize("seed", range(5))
def test_exhaustive_when_beams_cover_every_identifier(family, seed):
    """With at least as many beams as identifiers nothing is pruned: the output is every identifier, ranked by its
    exact score; a short identifier that finished early keeps its place above longer ones that score lower."""
    name, hf, model, eos, pad = family
    rng = np.random.default_rng(seed)
    sequences = random_identifiers(rng, int(rng.integers(2, NUM_BEAMS + 1)))
    unique = sorted({tuple(s) + (eos,) for s in sequences})
    trie = PrefixTrie(sequences, eos_token_id=eos)
    ids, mask = inputs(seed)
    ours, scores = constrained_beam_search(model, ids, mask, trie, NUM_BEAMS, MAX_LEN)
    check_valid_and_exact(model, trie, ids, mask, ours, scores, eos, pad)
    ours, scores = np.asarray(ours), np.asarray(scores)
    padded = np.full((len(unique), MAX_LEN), pad)
    for i, seq in enumerate(unique):
        padded[i, :len(seq)] = seq
    all_scores = teacher_forced(model, ids, mask, np.broadcast_to(padded, (BATCH,) + padded.shape), eos)
    for row in range(BATCH):
        order = np.argsort(-all_scores[row], kind="stable")
        expected = [unique[i] for i in order]
        got = [identifier(s, eos) for s in ours[row, :len(unique)]]
        assert got == expected
        np.testing.assert_allclose(scores[row, :len(unique)], all_scores[row][order], atol=1e-4)
        assert np.isneginf(scores[row, len(unique):]).all(), "missing beams are -inf"


def test_short_identifier_finished_first_is_kept(family):
    """A one-token identifier ends at step 2 while a dozen longer ones sharing its first token go on (and get
    pruned). At step 2 fewer than ``NUM_BEAMS`` continuations exist, so the short one surely finishes; it must then
    stay in the output at its exact rank unless ``NUM_BEAMS`` better identifiers were found."""
    name, hf, model, eos, pad = family
    ids, mask = inputs(7)
    rng = np.random.default_rng(7)
    long_ones = [[5, int(rng.integers(10, 14))] + rng.integers(FIRST_TOKEN, VOCAB, 2).tolist() for _ in range(12)]
    trie = PrefixTrie([[5]] + long_ones, eos_token_id=eos)
    ours, scores = constrained_beam_search(model, ids, mask, trie, NUM_BEAMS, MAX_LEN)
    check_valid_and_exact(model, trie, ids, mask, ours, scores, eos, pad)
    ours, scores = np.asarray(ours), np.asarray(scores)
    short = np.array([[5, eos] + [pad] * (MAX_LEN - 2)] * BATCH)[:, None]
    short_score = teacher_forced(model, ids, mask, short, eos)[:, 0]
    kept = 0
    for row in range(BATCH):
        got = [identifier(s, eos) for s in ours[row]]
        if (5, eos) not in got:
            assert (scores[row] >= short_score[row] - 1e-6).all(), "dropped although better than a returned one"
            continue
        kept += 1
        rank = got.index((5, eos))
        assert abs(scores[row, rank] - short_score[row]) < 1e-4
        assert (scores[row, rank + 1:] <= short_score[row] + 1e-6).all()
    assert kept > 0


def test_rows_with_few_identifiers_and_method_form(family):
    name, hf, model, eos, pad = family
    trie = PrefixTrie([[7, 8], [9]], eos_token_id=eos)
    ids, mask = inputs(3)
    sequences, scores = constrained_beam_search(model, ids, mask, trie, NUM_BEAMS, MAX_LEN)
    check_valid_and_exact(model, trie, ids, mask, sequences, scores, eos, pad)
    assert np.isfinite(np.asarray(scores)[:, :2]).all() and np.isneginf(np.asarray(scores)[:, 2:]).all()
    again, again_scores = model.constrained_beam_search(ids, mask, trie, NUM_BEAMS, MAX_LEN)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(sequences))
    np.testing.assert_array_equal(np.asarray(again_scores), np.asarray(scores))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        constrained_beam_search(model, ids, mask, PrefixTrie([[VOCAB + 5]], eos_token_id=eos), NUM_BEAMS, MAX_LEN)

"""Corpus n-gram identifiers (MINDER): the suffix-array index against brute force on random corpora, the
constrained beam search over it (every output a corpus substring, scores teacher-forced, transformers' generate
with a prefix_allowed_tokens_fn over the same substrings) and SEAL's passage scoring."""

import numpy as np
import pytest
import torch

from parity import assert_close
from rdr_jax.decoding import constrained_beam_search
from rdr_jax.decoding.ngram_passages import ngram_weight, score_passages
from rdr_jax.decoding.substring_index import SubstringIndex
from test_beam_search import BATCH, FIRST_TOKEN, MAX_LEN, NUM_BEAMS, VOCAB, family, identifier, inputs  # noqa: F401
from test_beam_search import teacher_forced

MAX_NGRAM = MAX_LEN - 1   # the beam search tests compile one shape: n-grams + EOS fit MAX_LEN


def random_corpus(rng, passages: int, alphabet: int = 12):
    """Views of random passages over a small alphabet (many shared n-grams), 1-3 views each."""
    views, rows = [], []
    for p in range(passages):
        for _ in range(int(rng.integers(1, 4))):
            views.append(rng.integers(FIRST_TOKEN, FIRST_TOKEN + alphabet, rng.integers(1, 14)).tolist())
            rows.append(p)
    return views, rows


def brute_occurrences(views, ngram):
    n = len(ngram)
    return sum(1 for v in views for i in range(len(v) - n + 1) if v[i:i + n] == list(ngram))


def brute_followers(views, prefix):
    n = len(prefix)
    return {v[i + n] for v in views for i in range(len(v) - n) if v[i:i + n] == list(prefix)}


def is_substring(views, ngram):
    return brute_occurrences(views, ngram) > 0


@pytest.mark.parametrize("seed", range(4))
def test_index_queries_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    views, rows = random_corpus(rng, 20)
    index = SubstringIndex.build(views, rows, vocab_size=VOCAB, eos_token_id=1, max_ngram=MAX_NGRAM)
    assert len(index.suffixes) == sum(map(len, views))
    probes = [v[i:i + n] for v in views for i in range(len(v)) for n in range(1, MAX_NGRAM + 1) if i + n <= len(v)]
    probes += [rng.integers(FIRST_TOKEN, FIRST_TOKEN + 12, rng.integers(1, MAX_NGRAM + 1)).tolist() for _ in range(50)]
    for ngram in probes[::3]:
        assert index.count(ngram) == brute_occurrences(views, ngram), ngram
        allowed = set(index.allowed_tokens(ngram).tolist())
        expected = brute_followers(views, ngram) if len(ngram) < MAX_NGRAM else set()
        if is_substring(views, ngram):
            expected |= {1}                                     # EOS: an n-gram may end anywhere
        assert allowed == expected, ngram
        positions = index.occurrences(ngram)
        assert set(index.passages_of_positions(positions).tolist()) == {
            r for v, r in zip(views, rows) if brute_occurrences([v], ngram)}
    assert set(index.allowed_tokens([]).tolist()) == {t for v in views for t in v}


def test_build_refuses_bad_views():
    with pytest.raises(ValueError, match="EOS"):
        SubstringIndex.build([[5, 1, 6]], [0], vocab_size=VOCAB, eos_token_id=1)
    with pytest.raises(ValueError, match="vocabulary"):
        SubstringIndex.build([[5, VOCAB]], [0], vocab_size=VOCAB, eos_token_id=1)


def hf_generate_over_index(hf, index, ids, mask, eos):
    def allowed(batch_id, prefix):
        tokens = index.allowed_tokens(prefix.tolist()[1:])   # after the decoder start token
        return tokens.tolist() or [eos]

    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=NUM_BEAMS,
                          num_return_sequences=NUM_BEAMS, prefix_allowed_tokens_fn=allowed, max_length=MAX_LEN + 1,
                          length_penalty=0.0, early_stopping=True, do_sample=False, output_scores=True,
                          return_dict_in_generate=True, forced_bos_token_id=None, forced_eos_token_id=None)
    return out.sequences.numpy()[:, 1:].reshape(BATCH, NUM_BEAMS, -1), out.sequences_scores.numpy().reshape(BATCH, NUM_BEAMS)


@pytest.mark.parametrize("seed", range(3))
def test_beam_search_emits_corpus_ngrams_with_exact_scores(family, seed):
    name, hf, model, eos, pad = family
    rng = np.random.default_rng(50 + seed)
    views, rows = random_corpus(rng, 6)
    index = SubstringIndex.build(views, rows, vocab_size=VOCAB, eos_token_id=eos, max_ngram=MAX_NGRAM)
    ids, mask = inputs(seed)
    sequences, scores = constrained_beam_search(model, ids, mask, index, NUM_BEAMS)
    sequences, scores = np.asarray(sequences), np.asarray(scores)
    assert sequences.shape == (BATCH, NUM_BEAMS, MAX_LEN)
    found = np.isfinite(scores)
    assert found.all()   # a corpus has far more than NUM_BEAMS n-grams
    for row in range(BATCH):
        ngrams = [identifier(s, eos) for s in sequences[row]]
        assert len(set(ngrams)) == NUM_BEAMS                      # distinct beams
        for ngram in ngrams:
            assert ngram[-1] == eos and 1 <= len(ngram) - 1 <= MAX_NGRAM
            assert is_substring(views, list(ngram[:-1])), (name, ngram)
        assert (np.diff(scores[row]) <= 1e-6).all()               # best first
    recomputed = teacher_forced(model, ids, mask, sequences, eos)
    assert_close(scores, recomputed, atol=1e-4)
    hf_sequences, hf_scores = hf_generate_over_index(hf, index, ids, mask, eos)
    compared = 0
    for row in range(BATCH):
        for beam in range(NUM_BEAMS):
            if hf_scores[row, beam] < -1e8:
                break
            assert identifier(sequences[row, beam], eos) == identifier(hf_sequences[row, beam], eos), (name, row, beam)
            assert_close(scores[row, beam], hf_scores[row, beam], atol=1e-4)
            compared += 1
    assert compared >= BATCH * 3


def test_passage_scoring_is_seal_intersective():
    # passage 0 holds "5 6 7", passage 1 holds "6 7" and "9", passage 2 holds "9" twice in one view
    views, rows = [[5, 6, 7], [6, 7, 8], [9], [9, 4, 9]], [0, 1, 1, 2]
    index = SubstringIndex.build(views, rows, vocab_size=VOCAB, eos_token_id=1, max_ngram=4)
    total = len(index.suffixes)
    ngrams = [[5, 6, 7, 1], [6, 7, 1], [9, 1], [3, 3, 1]]       # the last occurs nowhere
    log_probs = [-1.0, -0.5, -0.2, -0.1]
    ranked = dict(score_passages(index, ngrams, log_probs))
    w = {tuple(n[:-1]): ngram_weight(lp, index.count(n[:-1]), total) for n, lp in zip(ngrams, log_probs)}
    assert min(w.values()) > 0
    # passage 0: "6 7" lies inside "5 6 7": only the heavier of the two counts there
    assert ranked[0] == pytest.approx(max(w[(5, 6, 7)], w[(6, 7)]))
    assert ranked[1] == pytest.approx(w[(6, 7)] + w[(9,)])
    assert ranked[2] == pytest.approx(w[(9,)])                   # distinct n-grams, not occurrences
    assert set(ranked) == {0, 1, 2}
    assert ngram_weight(-0.01, total, total) == 0.0              # an n-gram everywhere names nothing


def test_both_candidate_paths_give_the_same_beams(family):
    """Short ranges are read directly, long ones searched per vocabulary token: forcing either path (short_range
    1: always the vocabulary search; larger than the corpus: always the direct read) gives the same beams."""
    name, hf, model, eos, pad = family
    rng = np.random.default_rng(7)
    views, rows = random_corpus(rng, 6)
    index = SubstringIndex.build(views, rows, vocab_size=VOCAB, eos_token_id=eos, max_ngram=MAX_NGRAM)
    ids, mask = inputs(7)
    outputs = [constrained_beam_search(model, ids, mask, index.to_device(VOCAB, short_range=r), NUM_BEAMS)
               for r in (1, len(index.suffixes))]
    (a, a_scores), (b, b_scores) = [(np.asarray(s), np.asarray(c)) for s, c in outputs]
    np.testing.assert_array_equal(a, b)
    assert_close(a_scores, b_scores)

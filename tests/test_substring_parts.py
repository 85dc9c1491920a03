"""A corpus n-gram index split into sub-indexes (past 2**31 positions): on random corpora forced into 2-3 parts it
answers as one index over the whole corpus (counts, allowed tokens, passages, SEAL scores), its device union
constrains the search step by step to the same candidates with the same range sizes, the beam search returns
the same n-grams and scores, and the streamed build resumes part by part."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parity import assert_close
from rdr_jax.decoding import constrained_beam_search
from rdr_jax.decoding.ngram_passages import CorpusNgrams, score_passages
from rdr_jax.decoding.substring_index import SubstringIndex
from rdr_jax.decoding.substring_parts import (PartitionedSubstringIndex, build_parts, load_substring_index)
from rdr_jax.decoding.substring_union import DeviceSubstringUnion
from test_beam_search import BATCH, FIRST_TOKEN, NUM_BEAMS, VOCAB, family, inputs  # noqa: F401
from test_substring_index import MAX_NGRAM, random_corpus

EOS = 1


def split_corpus(seed, passages=24, parts=3, eos=EOS):
    """A random corpus, its single index, and the same corpus in ``parts`` parts (their size forced)."""
    rng = np.random.default_rng(seed)
    views, rows = random_corpus(rng, passages)
    positions = sum(len(v) + 1 for v in views)
    settings = dict(vocab_size=VOCAB, eos_token_id=eos, max_ngram=MAX_NGRAM)
    single = SubstringIndex.build(views, rows, **settings)
    split = PartitionedSubstringIndex.build(views, rows, max_part_positions=-(-positions // parts) + 14, **settings)
    return rng, views, rows, single, split


@pytest.mark.parametrize("seed", range(4))
def test_parts_answer_as_one_index(seed):
    rng, views, rows, single, split = split_corpus(seed, parts=2 + seed % 2)
    assert len(split.parts) in (2, 3)
    assert split.num_suffixes == single.num_suffixes
    # whole passages per part, in order
    part_rows = [np.unique(p.view_passage) for p in split.parts]
    assert all(a.max() < b.min() for a, b in zip(part_rows, part_rows[1:]))
    probes = [v[i:i + n] for v in views for i in range(len(v)) for n in range(1, MAX_NGRAM + 1) if i + n <= len(v)]
    probes += [rng.integers(FIRST_TOKEN, FIRST_TOKEN + 12, rng.integers(1, MAX_NGRAM + 1)).tolist() for _ in range(40)]
    for ngram in probes[::4] + [[]]:
        assert split.count(ngram) == single.count(ngram), ngram
        np.testing.assert_array_equal(split.allowed_tokens(ngram), single.allowed_tokens(ngram))
        assert sorted(split.passages_of_positions(split.occurrences(ngram)).tolist()) == sorted(
            single.passages_of_positions(single.occurrences(ngram)).tolist())
    # SEAL scores: the weights use the whole corpus's counts, the overlap rule one passage's positions
    ngrams = [p + [EOS] for p in probes[::7]]
    log_probs = rng.uniform(-3, -0.01, len(ngrams)).tolist()
    ours, reference = score_passages(split, ngrams, log_probs), score_passages(single, ngrams, log_probs)
    assert [r for r, _ in ours] == [r for r, _ in reference]
    assert_close(np.array([s for _, s in ours]), np.array([s for _, s in reference]))


def _range_sizes(state):
    lo, hi = (np.asarray(a) for a in state)
    return (hi - lo).sum(-1) if lo.ndim == 3 else hi - lo


def _log_probs(logits):
    full = jax.nn.log_softmax(logits)
    return lambda tokens: full if tokens is None else jnp.take_along_axis(full, tokens, axis=-1)


@pytest.mark.parametrize("short_range", [1, None])
def test_union_steps_equal_one_index(short_range):
    """Both candidate paths (short_range 1: the vocabulary search; the corpus size: the short-range reads), step
    by step under random log-probabilities: same scores, parents and tokens, and each live beam's ranges in the
    parts hold as many occurrences as its range in the single index."""
    rng, views, rows, single, split = split_corpus(11, passages=30, parts=3)
    short_range = short_range or single.num_suffixes
    one, union = single.to_device(VOCAB, short_range), split.to_device(VOCAB, short_range)
    assert isinstance(union, DeviceSubstringUnion) and len(union.parts) == 3
    B, K = 2, 5
    logits = jnp.asarray(rng.normal(size=(MAX_NGRAM + 1, B, K, VOCAB)), jnp.float32)
    first = jax.jit(lambda index, x: index.first_candidates(_log_probs(x), K, VOCAB))
    step_of = jax.jit(lambda index, x, scores, state, step: index.next_candidates(_log_probs(x), scores, state, K,
                                                                                  step))
    a, b = first(one, logits[0][:, 0]), first(union, logits[0][:, 0])
    for step in range(1, MAX_NGRAM + 2):
        found = np.isfinite(np.asarray(a[0]))
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        for x, y in zip(a[1:3], b[1:3]):   # parents, tokens (of real candidates: padding reads any slot)
            np.testing.assert_array_equal(np.asarray(x)[found], np.asarray(y)[found])
        alive = found & (np.asarray(a[2]) != EOS)
        assert step > MAX_NGRAM or alive.any()
        np.testing.assert_array_equal(np.where(alive, _range_sizes(a[3]), 0), np.where(alive, _range_sizes(b[3]), 0))
        if step > MAX_NGRAM:
            break
        scores = jnp.where(jnp.asarray(alive), a[0], -jnp.inf)
        a = step_of(one, logits[step], scores, a[3], jnp.int32(step))
        b = step_of(union, logits[step], scores, b[3], jnp.int32(step))


@pytest.mark.parametrize("family", ["t5"], indirect=True)   # the search is the model's; one family suffices
def test_beam_search_over_parts_equals_one_index(family):
    name, hf, model, eos, pad = family
    _, views, rows, single, split = split_corpus(5, passages=8, parts=3, eos=eos)
    assert len(split.parts) >= 2
    ids, mask = inputs(5)
    a, a_scores = constrained_beam_search(model, ids, mask, single, NUM_BEAMS)
    b, b_scores = constrained_beam_search(model, ids, mask, split, NUM_BEAMS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_close(np.asarray(b_scores), np.asarray(a_scores))
    assert np.isfinite(np.asarray(a_scores)).all() and np.asarray(a).shape[0] == BATCH


def test_streamed_build_saves_loads_and_resumes(tmp_path):
    _, views, rows, single, split = split_corpus(3, passages=20, parts=3)
    limit = max(len(p.tokens) for p in split.parts)
    settings = dict(vocab_size=VOCAB, eos_token_id=EOS, max_ngram=MAX_NGRAM, max_part_positions=limit)
    built = build_parts(zip(rows, views), tmp_path, **settings)
    loaded = load_substring_index(tmp_path)
    assert isinstance(loaded, PartitionedSubstringIndex) and len(loaded.parts) == len(split.parts)
    for ngram in ([], views[0][:2], views[-1][-3:]):
        assert loaded.count(ngram) == built.count(ngram) == single.count(ngram)
    assert [json.loads((tmp_path / n / "meta.json").read_text())["first_row"]
            for n in json.loads((tmp_path / "meta.json").read_text())["parts"]][0] == 0
    # a stopped build: the last part and the top meta missing; the rerun rebuilds only that part
    stamps = {p: (tmp_path / p / "suffixes.npy").stat().st_mtime_ns for p in ("part-00000", "part-00001")}
    last = f"part-{len(split.parts) - 1:05d}"
    (tmp_path / last / "meta.json").unlink()
    (tmp_path / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_substring_index(tmp_path)
    build_parts(zip(rows, views), tmp_path, **settings)
    assert {p: (tmp_path / p / "suffixes.npy").stat().st_mtime_ns for p in stamps} == stamps
    assert load_substring_index(tmp_path).count(views[-1][-3:]) == single.count(views[-1][-3:])
    ids = [f"p{r}" for r in range(max(rows) + 1)]
    (tmp_path / CorpusNgrams.PASSAGE_IDS).write_text(json.dumps(ids))
    assert isinstance(CorpusNgrams.load(tmp_path).index, PartitionedSubstringIndex)
    # a corpus that fits one part: one ordinary index directory, as before parts existed
    one = build_parts(zip(rows, views), tmp_path / "one", **dict(settings, max_part_positions=10 ** 6))
    assert isinstance(one, SubstringIndex) and (tmp_path / "one" / "suffixes.npy").is_file()
    np.testing.assert_array_equal(load_substring_index(tmp_path / "one").suffixes, single.suffixes)


def test_global_positions_past_int32():
    """A first part of ~2**31 positions (a zero-cost broadcast array: only its length is read) puts the next
    part's positions past int32: occurrences and their passages are int64-correct."""
    big = 2 ** 31 - 2 ** 20
    fake = SubstringIndex(tokens=np.broadcast_to(np.int32(-1), (big,)), suffixes=np.zeros(0, np.int32),
                          view_starts=np.array([0, big], np.int64), view_passage=np.array([0], np.int32),
                          vocab_size=VOCAB, eos_token_id=EOS, max_ngram=MAX_NGRAM)
    small = SubstringIndex.build([[5, 6, 7], [6, 7]], [1, 2], vocab_size=VOCAB, eos_token_id=EOS,
                                 max_ngram=MAX_NGRAM)
    split = PartitionedSubstringIndex([fake, small])
    assert split.offsets.dtype == np.int64 and split.offsets[1] == big
    positions = np.concatenate([small.occurrences([6, 7]) + big, [5]])   # and one in the first part
    assert (positions[:-1] > 2 ** 31 - 2 ** 20).all()
    np.testing.assert_array_equal(split.passages_of_positions(positions), [1, 2, 0])
    with pytest.raises(ValueError, match="in parts"):
        SubstringIndex(tokens=np.broadcast_to(np.int32(-1), (2 ** 31,)), suffixes=np.zeros(0, np.int32),
                       view_starts=np.array([0, 2 ** 31], np.int64), view_passage=np.array([0], np.int32),
                       vocab_size=VOCAB, eos_token_id=EOS, max_ngram=MAX_NGRAM).to_device()
    with pytest.raises(ValueError, match="max_part_positions"):
        PartitionedSubstringIndex.build([[5]], [0], vocab_size=VOCAB, eos_token_id=EOS, max_part_positions=2 ** 31)

"""Passage identifiers: atomic, semantic (hierarchical k-means), titles, TSV; tokenised into a trie and back."""

import jax
import numpy as np
import pytest
import torch
import transformers

from rdr_jax.decoding import constrained_beam_search
from rdr_jax.decoding.identifiers import (PassageIdentifiers, atomic_identifiers, read_identifier_tsv,
                                          semantic_codes, semantic_identifiers, title_identifiers)
from rdr_jax.models.t5 import T5ForConditionalGeneration

jax.config.update("jax_default_matmul_precision", "highest")

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-()"


@pytest.fixture(scope="module")
def t5_tokenizer():
    """A tiny SentencePiece-style (unigram) T5 tokenizer: specials, single characters and the word boundary."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in CHARS] + [("▁", -2.0)]
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


@pytest.fixture(scope="module")
def bart_tokenizer():
    """A byte-level BPE BART tokenizer with no merges (one token per byte); adds <s> ... </s>."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    return transformers.BartTokenizer(vocab=vocab, merges=[])


@pytest.mark.parametrize("which", ["t5", "bart"])
def test_atomic_identifiers_round_trip_through_the_trie(which, t5_tokenizer, bart_tokenizer):
    tokenizer = t5_tokenizer if which == "t5" else bart_tokenizer
    pids = [str(i) for i in (7, 12, 123, 1234, 99, 100)]
    built = PassageIdentifiers.build(atomic_identifiers(pids), tokenizer)
    assert built.identifiers == pids and built.passages == [[p] for p in pids]
    for i, (string, ids) in enumerate(zip(built.identifiers, built.token_ids)):
        assert ids == tokenizer(string)["input_ids"] and ids[-1] == tokenizer.eos_token_id
        assert built.trie.lookup([ids + [tokenizer.pad_token_id] * 3])[0] == i
    assert built.trie.eos_token_id == tokenizer.eos_token_id
    assert built.identifier_of() == {p: i for i, p in enumerate(pids)}


def test_title_identifiers_dedupe_or_group(t5_tokenizer):
    pids = ["p1", "p2", "p3", "p4", "p5"]
    titles = ["norway", "krone", "norway", "norway (2)", "norway"]
    unique = title_identifiers(pids, titles)
    # "norway (2)" is a real title, so the second "norway" skips to (3)
    assert unique == {"p1": "norway", "p2": "krone", "p3": "norway (3)", "p4": "norway (2)", "p5": "norway (4)"}
    assert len(set(unique.values())) == len(pids)
    grouped = PassageIdentifiers.build(title_identifiers(pids, titles, unique=False), t5_tokenizer)
    assert grouped.identifiers == ["norway", "krone", "norway (2)"]
    assert grouped.passages == [["p1", "p3", "p5"], ["p2"], ["p4"]]
    with pytest.raises(ValueError, match="2 titles"):
        title_identifiers(pids, titles[:2])


def test_rank_passages_maps_beams_back(t5_tokenizer):
    built = PassageIdentifiers.build({"a": "x1", "b": "x2", "c": "x1", "d": "y"}, t5_tokenizer)
    pad = t5_tokenizer.pad_token_id

    def row(*ids):
        return [ids_ + [pad] * (8 - len(ids_)) for ids_ in ids]

    x1, x2, y = (built.token_ids[built.identifiers.index(s)] for s in ("x1", "x2", "y"))
    sequences = np.array([row(x2, x1, y), row(y, [pad] * 8, x1)])
    scores = np.array([[-1.0, -2.0, -3.0], [-0.5, -np.inf, -4.0]])
    assert built.rank_passages(sequences, scores) == [
        [("b", -1.0), ("a", -2.0), ("c", -2.0), ("d", -3.0)],
        [("d", -0.5), ("a", -4.0), ("c", -4.0)]]


def blobs(rng, centers, per_center, dim=8, spread=0.01):
    means = rng.normal(size=(centers, dim)) * 10
    return np.concatenate([m + spread * rng.normal(size=(per_center, dim)) for m in means]).astype(np.float32)


def test_semantic_codes_are_hierarchical_unique_and_deterministic():
    rng = np.random.default_rng(0)
    embeddings = blobs(rng, centers=3, per_center=40)
    codes = semantic_codes(embeddings, k=3, c=10, seed=0)
    assert codes == semantic_codes(embeddings, k=3, c=10, seed=0)
    assert len(set(codes)) == len(codes)
    # the first level separates the three blobs exactly
    first = np.array([code[0] for code in codes])
    for blob in range(3):
        assert len(set(first[blob * 40:(blob + 1) * 40])) == 1
    assert len(set(first)) == 3
    # every leaf holds at most c passages, numbered 0..n-1 in input order
    leaves = {}
    for i, code in enumerate(codes):
        leaves.setdefault(code[:-1], []).append((i, code[-1]))
    for members in leaves.values():
        assert len(members) <= 10
        assert [position for _, position in members] == list(range(len(members)))
        assert [i for i, _ in members] == sorted(i for i, _ in members)
    # a corpus no larger than c is one leaf
    assert semantic_codes(embeddings[:5], k=3, c=10) == [(i,) for i in range(5)]


def test_semantic_codes_split_identical_embeddings_and_format(t5_tokenizer):
    same = np.ones((25, 4), np.float32)
    codes = semantic_codes(same, k=2, c=4)
    assert len(set(codes)) == 25 and max(len(c) for c in codes) > 2
    ids = semantic_identifiers([f"p{i}" for i in range(25)], same, k=2, c=4)
    assert ids["p0"] == "-".join(map(str, codes[0]))
    built = PassageIdentifiers.build(ids, t5_tokenizer)
    assert len(built.identifiers) == 25 and built.trie.num_identifiers == 25
    with pytest.raises(ValueError, match="3 passage ids but 25 embeddings"):
        semantic_identifiers(["a", "b", "c"], same)


def test_identifier_tsv(tmp_path, t5_tokenizer):
    path = tmp_path / "ids.tsv"
    path.write_text("id\tidentifier\np1\tab-1\np2\tcd-2\n\np3\tab-1\n")
    mapping = read_identifier_tsv(path)
    assert mapping == {"p1": "ab-1", "p2": "cd-2", "p3": "ab-1"}
    built = PassageIdentifiers.build(mapping, t5_tokenizer)
    assert built.passages == [["p1", "p3"], ["p2"]]
    built.save_tsv(tmp_path / "out.tsv")
    assert read_identifier_tsv(tmp_path / "out.tsv") == mapping
    (tmp_path / "bad.tsv").write_text("p1\tx\np2 no tab\n")
    with pytest.raises(ValueError, match=r"bad.tsv:2: expected"):
        read_identifier_tsv(tmp_path / "bad.tsv")
    (tmp_path / "dup.tsv").write_text("p1\tx\np1\ty\n")
    with pytest.raises(ValueError, match=r"dup.tsv:2: passage 'p1' given a second identifier"):
        read_identifier_tsv(tmp_path / "dup.tsv")


def test_generative_retrieval_end_to_end(tmp_path, t5_tokenizer):
    """Semantic ids of a small corpus -> trie -> constrained beam search on a tiny T5 -> ranked passages."""
    rng = np.random.default_rng(1)
    pids = [f"doc{i}" for i in range(30)]
    built = PassageIdentifiers.build(semantic_identifiers(pids, blobs(rng, 3, 10), k=3, c=4), t5_tokenizer)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0)
    transformers.T5ForConditionalGeneration._from_config(config).save_pretrained(tmp_path)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path)
    questions = t5_tokenizer(["where is 3-1", "krone"], padding=True, return_tensors="np")
    sequences, scores = constrained_beam_search(model, questions["input_ids"], questions["attention_mask"],
                                                built.trie, num_beams=5)
    ranked = built.rank_passages(sequences, scores)
    for row in ranked:
        assert len(row) == 5 and set(p for p, _ in row) <= set(pids)
        assert [s for _, s in row] == sorted((s for _, s in row), reverse=True)

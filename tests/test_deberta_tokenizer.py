"""DeBERTa-v3 cross-encoder inputs from a SentencePiece model, through transformers' DebertaV2Tokenizer.

A tiny unigram model is trained offline with DeBERTa-v3's special-piece layout ([PAD]=0, [CLS]=1, [SEP]=2,
[UNK]=3, [MASK] user-defined), so nothing is downloaded.
"""

import json
import random

import pytest
from transformers import AutoTokenizer, DebertaV2Tokenizer

spm = pytest.importorskip("sentencepiece", reason="sentencepiece is needed to read spm.model")

WORDS = ("the a retrieval passage query answer model question dense sparse index vector score rank teacher "
         "student distill cross encoder relevance neural search document title what is how does").split()
QUERY = "what is dense retrieval"
PASSAGE = "a dense passage index scores the query against every document vector"


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    """A directory holding only spm.model (as DeBERTa-v3 checkpoints ship it)."""
    work, model_dir = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("deberta_spm")
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))) + "." for _ in range(400)]
    (work / "corpus.txt").write_text("\n".join(lines) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(work / "corpus.txt"), model_prefix=str(work / "spm"), model_type="unigram", vocab_size=60,
        hard_vocab_limit=False,
        pad_id=0, pad_piece="[PAD]", bos_id=1, bos_piece="[CLS]", eos_id=2, eos_piece="[SEP]", unk_id=3,
        unk_piece="[UNK]", user_defined_symbols=["[MASK]"], minloglevel=2)
    (model_dir / "spm.model").write_bytes((work / "spm.model").read_bytes())
    return model_dir


@pytest.fixture(scope="module")
def pieces(spm_dir):
    return spm.SentencePieceProcessor(model_file=str(spm_dir / "spm.model"))


@pytest.fixture(scope="module")
def tokenizer(spm_dir):
    return DebertaV2Tokenizer.from_pretrained(spm_dir)


def test_special_tokens_have_deberta_v3_ids(tokenizer, pieces):
    assert (tokenizer.pad_token, tokenizer.cls_token, tokenizer.sep_token, tokenizer.unk_token) == \
        ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.unk_token_id) == \
        (0, 1, 2, 3)
    assert tokenizer.mask_token_id == pieces.piece_to_id("[MASK]")
    assert len(tokenizer) == pieces.get_piece_size()


def test_query_passage_pair_layout(tokenizer, pieces):
    enc = tokenizer(QUERY, PASSAGE)
    query_ids, passage_ids = pieces.encode(QUERY), pieces.encode(PASSAGE)
    # [CLS] query [SEP] passage [SEP], with the SentencePiece ids of each text.
    assert enc["input_ids"] == [1, *query_ids, 2, *passage_ids, 2]
    assert enc["token_type_ids"] == [0] * (len(query_ids) + 2) + [1] * (len(passage_ids) + 1)
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == f"{QUERY} {PASSAGE}"
    assert pieces.unk_id() not in query_ids + passage_ids  # the tiny vocabulary covers these words


def test_padded_truncated_batch(tokenizer, pieces):
    queries, passages = ["dense query", QUERY], ["a title", PASSAGE]
    max_length = len(pieces.encode(QUERY)) + 6
    batch = tokenizer(queries, passages, padding="max_length", truncation="only_second", max_length=max_length)
    for ids, types, mask, query in zip(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                                       queries):
        assert len(ids) == len(types) == len(mask) == max_length
        n = sum(mask)
        assert mask == [1] * n + [0] * (max_length - n)
        assert ids[n:] == [tokenizer.pad_token_id] * (max_length - n) and types[n:] == [0] * (max_length - n)
        assert ids[0] == 1 and ids[n - 1] == 2 and ids.count(2) == 2
        query_ids = pieces.encode(query)
        assert ids[1:len(query_ids) + 1] == query_ids  # the query is never truncated
        assert types[:len(query_ids) + 2] == [0] * (len(query_ids) + 2) and set(types[len(query_ids) + 2:n]) == {1}
    assert sum(batch["attention_mask"][1]) == max_length  # the long passage was cut to fit


def test_saved_tokenizer_reloads_through_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "DebertaV2Tokenizer"
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(reloaded, DebertaV2Tokenizer)
    assert reloaded(QUERY, PASSAGE) == tokenizer(QUERY, PASSAGE)

"""DPR input layouts against transformers' DPR tokenizers and DPR's own conventions."""

import numpy as np
import pytest
import transformers

from rdr_jax.data import tokenization as tk


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.BertTokenizerFast.from_pretrained(minilm_dir)


def test_load_tokenizer_reads_checkpoint_dir(minilm_dir, tmp_path):
    assert tk.load_tokenizer(minilm_dir).convert_tokens_to_ids("[CLS]") == 101
    with pytest.raises(ValueError, match=str(tmp_path)):
        tk.load_tokenizer(tmp_path)


def test_question_and_passage_layouts(tokenizer):
    q = tk.encode_questions(tokenizer, ["who uses the krone?", "a"], max_length=12)
    assert q["input_ids"].shape == (2, 12) and q["input_ids"].dtype == np.int32
    first = tokenizer.convert_ids_to_tokens(q["input_ids"][0][q["attention_mask"][0] == 1])
    assert first == ["[CLS]", "who", "uses", "the", "k", "##rone", "?", "[SEP]"]
    assert (q["input_ids"][1][q["attention_mask"][1] == 0] == tokenizer.pad_token_id).all()
    p = tk.encode_passages(tokenizer, ["Norway"], ["Norway uses the Norwegian krone " * 10], max_length=16)
    tokens = tokenizer.convert_ids_to_tokens(p["input_ids"][0])
    assert tokens[:3] == ["[CLS]", "norway", "[SEP]"] and tokens[-1] == "[SEP]"  # truncated, ends in [SEP]
    assert p["attention_mask"].sum() == 16 and not p["token_type_ids"].any()


def test_bucketing_picks_smallest_fitting_bucket(tokenizer):
    q = tk.encode_questions(tokenizer, ["short"], max_length=64, buckets=(8, 16, 64))
    assert q["input_ids"].shape == (1, 8)
    q = tk.encode_questions(tokenizer, ["word " * 12], max_length=64, buckets=(8, 16, 64))
    assert q["input_ids"].shape == (1, 16)
    assert tk.bucket_length([100], (8, 16)) == 16


def test_reader_inputs_match_transformers_dpr_reader_tokenizer(tokenizer, minilm_dir):
    reference = transformers.DPRReaderTokenizerFast.from_pretrained(minilm_dir)
    question = "What is the currency of Norway?"
    titles = ["Norway", "Norwegian krone"]
    texts = ["Norway uses the Norwegian krone (NOK) as its currency.",
             "The krone is divided into 100 øre and is used in Norway and on Svalbard " * 4]
    ours = tk.encode_reader_inputs(tokenizer, question, titles, texts, max_length=40)
    ref = reference(questions=question, titles=titles, texts=texts, padding="max_length", truncation=True,
                    max_length=40, return_tensors="np")
    assert np.array_equal(ours["input_ids"], ref["input_ids"])
    assert np.array_equal(ours["attention_mask"], ref["attention_mask"])
    start = ours["passage_start"][0]
    before = tokenizer.convert_ids_to_tokens(ours["input_ids"][0][:start])
    assert before[0] == "[CLS]" and before[-1] == "[SEP]" and before.count("[SEP]") == 2
    assert tokenizer.convert_ids_to_tokens(int(ours["input_ids"][0][start])) == "norway"

"""Readers of the raw retrieval files and their TFDS builders, on small hand-written files."""

import gzip
import json
import random
import re

import numpy as np
import pytest

from rdr_jax.data import builders, readers
from rdr_jax.data.tfds_format import load


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _all(source):
    return [source[i] for i in range(len(source))]


def _build_and_load(kind, files, tmp_path, split="train"):
    path = builders.build(kind, files, tmp_path / "data", progress=False)
    return _all(load(path, split))


# --------------------------------------------------------------------------------------- DPR / QA


PASSAGES_TSV = (
    "id\ttext\ttitle\n"
    '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
    "2\tPlain text, with a comma\tAaron\n"
    '3\t"a tab\tinside quotes"\t"Title ""quoted"""\n'
)


def test_dpr_passages_with_header_and_csv_quoting(tmp_path):
    rows = _build_and_load("dpr_passages", {"train": _write(tmp_path / "psgs.tsv", PASSAGES_TSV)}, tmp_path)
    assert rows == [
        {"id": "1", "title": "Aaron", "text": 'Aaron Aaron ( or ; "Ahärôn") is a prophet'},
        {"id": "2", "title": "Aaron", "text": "Plain text, with a comma"},
        {"id": "3", "title": 'Title "quoted"', "text": "a tab\tinside quotes"},
    ]


def test_dpr_passages_gzip_without_header_in_two_files(tmp_path):
    first = tmp_path / "a.tsv.gz"
    with gzip.open(first, "wt", encoding="utf-8") as handle:
        handle.write("wiki:7\tseven\tT7\n")
    second = _write(tmp_path / "b.tsv", "8\teight\tT8\n")
    rows = _build_and_load("dpr_passages", {"train": [first, second]}, tmp_path)
    assert [row["id"] for row in rows] == ["wiki:7", "8"]


def test_qa_tsv_and_jsonl(tmp_path):
    tsv = _write(tmp_path / "nq-test.qa.csv",
                 'who got the first nobel prize in physics\t["Wilhelm Conrad Röntgen"]\n'
                 "when is the next deadpool movie being released\t['May 18 , 2018', \"it's 2018\"]\n")
    jsonl = _write(tmp_path / "dev.jsonl",
                   '{"question": "q1", "answer": ["x", "y"]}\n\n{"question": "q2", "answers": "z"}\n')
    path = builders.build("qa", {"test": tsv, "dev": jsonl}, tmp_path / "data", progress=False)
    assert _all(load(path, "test")) == [
        {"question": "who got the first nobel prize in physics", "answers": ["Wilhelm Conrad Röntgen"]},
        {"question": "when is the next deadpool movie being released", "answers": ["May 18 , 2018", "it's 2018"]},
    ]
    assert _all(load(path, "dev")) == [{"question": "q1", "answers": ["x", "y"]}, {"question": "q2", "answers": ["z"]}]


DPR_TRAIN = [
    {"dataset": "nq_train_psgs_w100", "question": "big question", "answers": ["A"],
     "positive_ctxs": [{"title": "P", "text": "pos text", "score": 1000, "title_score": 1, "passage_id": "11"}],
     "negative_ctxs": [],
     "hard_negative_ctxs": [{"title": "H1", "text": "hard one", "passage_id": 12},
                            {"title": "H2", "text": "hard two", "psg_id": "13"}]},
    {"question": "second", "answers": [], "positive_ctxs": [{"text": "no title"}]},
]


def test_dpr_training_json(tmp_path):
    path = _write(tmp_path / "train.json", json.dumps(DPR_TRAIN, indent=4))
    rows = _build_and_load("dpr_training", {"train": path}, tmp_path)
    assert rows[0]["question"] == "big question" and rows[0]["answers"] == ["A"]
    assert rows[0]["positive_ctxs"] == {"title": ["P"], "text": ["pos text"], "passage_id": ["11"]}
    assert rows[0]["negative_ctxs"] == {"title": [], "text": [], "passage_id": []}
    assert rows[0]["hard_negative_ctxs"] == {"title": ["H1", "H2"], "text": ["hard one", "hard two"],
                                             "passage_id": ["12", "13"]}
    assert rows[1]["positive_ctxs"] == {"title": [""], "text": ["no title"], "passage_id": [""]}
    assert rows[1]["hard_negative_ctxs"]["text"] == []


def test_retriever_results_json(tmp_path):
    results = [{"question": "q", "answers": ["a"], "ctxs": [
        {"id": "wiki:1", "title": "t1", "text": "x1", "score": "80.5", "has_answer": True},
        {"id": 2, "title": "t2", "text": "x2", "score": 79.25, "has_answer": False}]}]
    rows = _build_and_load("retriever_results", {"test": _write(tmp_path / "r.json", json.dumps(results))},
                           tmp_path, split="test")
    ctxs = rows[0]["ctxs"]
    assert rows[0]["question"] == "q" and ctxs["id"] == ["wiki:1", "2"] and ctxs["text"] == ["x1", "x2"]
    np.testing.assert_allclose(ctxs["score"], [80.5, 79.25])
    assert [bool(h) for h in ctxs["has_answer"]] == [True, False]


def test_json_array_streams_across_chunk_boundaries(tmp_path):
    rng = random.Random(0)
    items = [{"question": f"q{i} \u00e9\"", "n": rng.random() * 10 ** rng.randint(-8, 8), "flag": i % 2 == 0,
              "none": None, "list": list(range(i))} for i in range(20)] + [12345, -1.5e-7, "s", True]
    text = json.dumps(items, indent=2)
    path = _write(tmp_path / "a.json", text)
    for chunk_chars in (1, 5, 64, 1 << 20):
        got = list(readers.iter_json_array(path, chunk_chars=chunk_chars))
        assert [item for _, item in got] == items
        # Each item starts on the reported line.
        lines = text.split("\n")
        for line, item in got:
            assert lines[line - 1].strip().startswith(json.dumps(item, indent=2).split("\n")[0])


# --------------------------------------------------------------------------------------- MS MARCO


def test_msmarco_collection_queries_qrels(tmp_path):
    # A stray carriage return inside a passage must not split it; CRLF line ends are dropped.
    collection = tmp_path / "collection.tsv"
    collection.write_bytes('0\tThe "presence" of\n1\tsecond\rpassage\r\n'.encode())
    queries = _write(tmp_path / "queries.train.tsv", "121352\tdefine extreme\n634306\twhat does chattel mean\n")
    trec = _write(tmp_path / "qrels.train.tsv", "1185869\t0\t0\t1\n1185868 0 16 2\n")
    plain = _write(tmp_path / "qrels.dev.tsv", "300674\t7067032\n125705\t7067056\t0\n")
    assert _build_and_load("msmarco_collection", {"train": collection}, tmp_path) == [
        {"id": "0", "title": "", "text": 'The "presence" of'}, {"id": "1", "title": "", "text": "second\rpassage"}]
    assert _build_and_load("msmarco_queries", {"train": queries}, tmp_path) == [
        {"id": "121352", "text": "define extreme"}, {"id": "634306", "text": "what does chattel mean"}]
    path = builders.build("qrels", {"train": trec, "dev": plain}, tmp_path / "data", progress=False)
    assert _all(load(path, "train")) == [{"qid": "1185869", "pid": "0", "relevance": 1},
                                         {"qid": "1185868", "pid": "16", "relevance": 2}]
    assert _all(load(path, "dev")) == [{"qid": "300674", "pid": "7067032", "relevance": 1},
                                       {"qid": "125705", "pid": "7067056", "relevance": 0}]


def test_msmarco_triples_text_and_ids_detected(tmp_path):
    text = _write(tmp_path / "triples.train.small.tsv", "what is x\tx is a letter\tthe sky is blue\n")
    ids = _write(tmp_path / "qidpidtriples.train.full.tsv", "400296\t1540783\t3518497\n400296\t1540783\t4605799\n")
    path = builders.build("msmarco_triples", {"train": text}, tmp_path / "data", progress=False)
    assert path.parent.name == "msmarco_triples"
    assert _all(load(path, "train")) == [{"query": "what is x", "positive": "x is a letter", "negative": "the sky is blue"}]
    path = builders.build("msmarco_triples", {"train": ids}, tmp_path / "data", progress=False)
    assert path.parent.name == "msmarco_triples_ids"
    assert _all(load(path, "train"))[1] == {"qid": "400296", "positive_pid": "1540783", "negative_pid": "4605799"}


def test_teacher_scores_jsonl(tmp_path):
    path = _write(tmp_path / "scores.jsonl", '{"qid": 3, "pids": [10, "11"], "scores": [2.5, -1]}\n')
    rows = _build_and_load("teacher_scores", {"train": path}, tmp_path)
    assert rows[0]["qid"] == "3" and rows[0]["pids"] == ["10", "11"]
    assert rows[0]["scores"].dtype == np.float32
    np.testing.assert_array_equal(rows[0]["scores"], [2.5, -1.0])


# --------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind, name, content, where", [
    ("dpr_passages", "p.tsv", "id\ttext\ttitle\n1\tok\tT\n2\tmissing title\n", r"p\.tsv:3: expected 3"),
    ("qa", "q.csv", 'q1\t["a"]\nq2\tnot a list(\n', r"q\.csv:2: field 'answers'"),
    ("qa", "q.jsonl", '{"question": "q", "answers": ["a"]}\n{"question": "q2"}\n', r"q\.jsonl:2: missing field 'answers'"),
    ("qa", "r.jsonl", '{"question": "q", "answers": ["a"]}\n{"question": 5, "answers": []}\n',
     r"r\.jsonl:2: field 'question' must be a string"),
    ("dpr_training", "t.json", '[\n{"question": "q", "positive_ctxs": []},\n{"question": "q2",\n "positive_ctxs": [{"title": "x"}]}\n]',
     r"t\.json:3: missing field 'positive_ctxs\[0\]\.text'"),
    ("dpr_training", "u.json", '[\n{"question": "q"},\n{"question": "q2",, }\n]', r"u\.json:3: invalid JSON"),
    ("retriever_results", "r.json", '[{"question": "q", "ctxs": [{"id": "1", "score": "high"}]}]',
     r"r\.json:1: field 'ctxs\[0\]\.score' must be a number"),
    ("qrels", "qrels.txt", "1 0 2 1\n1 0 3 yes\n", r"qrels\.txt:2: field 'relevance'"),
    ("msmarco_triples", "tr.tsv", "1\t2\t3\n4\t5\tfive\n", r"tr\.tsv:2: field 'negative_pid'"),
    ("msmarco_collection", "c.tsv", "0\tfine\n1\ttoo\tmany\n", r"c\.tsv:2: expected 2"),
    ("teacher_scores", "s.jsonl", '{"qid": 1, "pids": [1, 2], "scores": [0.5]}\n',
     r"s\.jsonl:1: fields 'pids' and 'scores' differ"),
])
def test_malformed_input_names_file_line_and_field(tmp_path, kind, name, content, where):
    path = _write(tmp_path / name, content)
    with pytest.raises(ValueError, match=where):
        builders.build(kind, {"train": path}, tmp_path / "data", progress=False)
    # Nothing half-written is left behind.
    assert not any(p.is_dir() and any(p.iterdir()) for p in (tmp_path / "data").glob("*"))


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset kind 'nope'"):
        builders.build("nope", {"train": _write(tmp_path / "x", "")}, tmp_path / "data")
    with pytest.raises(FileNotFoundError, match=re.escape("input file not found")):
        builders.build("qa", {"train": tmp_path / "missing.csv"}, tmp_path / "data")

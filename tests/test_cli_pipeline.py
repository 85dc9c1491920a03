"""The retrieval pipeline end to end through the command line, on the embedded data with the real MiniLM.

A subset of the corpus (the first passages and the dev questions whose gold passage is among them) keeps the
CPU time small; the numbers are real retrieval over real text.
"""

import csv
import json

import numpy as np
import pytest

from rdr_jax.cli import main
from rdr_jax.data.embedded_data import load_biencoder, load_passages
from rdr_jax.data.tfds_format import load as load_tfds

N_PASSAGES = 240


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, minilm_dir):
    work = tmp_path_factory.mktemp("cli")
    passages = load_passages()[:N_PASSAGES]
    with open(work / "passages.tsv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text", "title"])
        for p in passages:
            writer.writerow([p["id"], p["text"], p["title"]])
    ids = {p["id"] for p in passages}
    dev = [e for e in load_biencoder("dev") if e["positive_ctxs"][0]["passage_id"] in ids]
    assert len(dev) >= 15
    (work / "dev.jsonl").write_text("".join(json.dumps({"question": e["question"], "answers": e["answers"]}) + "\n"
                                            for e in dev))
    for cls, name in (("DPRContextEncoder", "ctx"), ("DPRQuestionEncoder", "question"), ("DPRReader", "reader")):
        assert main(["convert", str(minilm_dir), str(work / name), "--to", "hf", "--as", cls]) == 0
    return work, len(dev)


def test_encode_index_retrieve_evaluate(workspace, capsys):
    work, n_dev = workspace
    assert main(["encode", "--model", str(work / "ctx"), "--passages", str(work / "passages.tsv"),
                 "--out", str(work / "emb"), "--max-length", "128", "--batch-size", "32",
                 "--shard-size", "100"]) == 0
    meta = json.loads((work / "emb" / "meta.json").read_text())
    assert meta["complete"] and meta["num_passages"] == N_PASSAGES and meta["num_shards"] == 3
    assert main(["index", "--embeddings", str(work / "emb"), "--out", str(work / "index"),
                 "--passages", str(work / "passages.tsv")]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--model", str(work / "question"), "--index", str(work / "index"),
                 "--passages", str(work / "passages.tsv"), "--qa", str(work / "dev.jsonl"),
                 "--out", str(work / "dev.results.json"), "--k", "20"]) == 0
    printed = capsys.readouterr().out
    assert "Top-1" in printed and "Top-20" in printed
    results = json.loads((work / "dev.results.json").read_text())
    assert len(results) == n_dev and all(len(r["ctxs"]) == 20 for r in results)
    assert set(results[0]["ctxs"][0]) == {"id", "title", "text", "score", "has_answer"}
    assert main(["evaluate", "--results", str(work / "dev.results.json"), "--k", "1", "5", "20",
                 "--out", str(work / "recall.json")]) == 0
    print(capsys.readouterr().out)  # the recall table, shown with -s
    recall = json.loads((work / "recall.json").read_text())["dev.results.json"]
    assert recall["1"] <= recall["5"] <= recall["20"]
    assert recall["20"] >= 70.0  # real retrieval: chance would be about 8% at k=20 of 240 passages


def test_read_and_teacher_scores(workspace, capsys):
    work, n_dev = workspace
    results_path = work / "dev.results.json"
    if not results_path.exists():
        pytest.skip("needs test_encode_index_retrieve_evaluate's output")
    assert main(["read", "--model", str(work / "reader"), "--results", str(results_path), "--out",
                 str(work / "answers.jsonl"), "--passages-per-question", "4", "--max-length", "96",
                 "--limit", "6"]) == 0
    answers = [json.loads(line) for line in (work / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 6 and all(a["prediction"] for a in answers)
    results = json.loads(results_path.read_text())
    for a, r in zip(answers, results):
        assert a["passage_id"] in [c["id"] for c in r["ctxs"][:4]]
    assert main(["teacher-scores", "--model", str(work / "reader"), "--results", str(results_path),
                 "--out", str(work / "tfds"), "--name", "teacher", "--top-k", "5", "--max-length", "96",
                 "--limit", "5"]) == 0
    source = load_tfds(work / "tfds" / "teacher", "train")
    assert len(source) == 5
    row = source[0]
    assert len(row["passage_ids"]) == 5 and row["relevance_logits"].shape == (5,)
    assert row["span_scores"].dtype == np.float32 and np.isfinite(row["span_scores"]).all()
    assert list(row["passage_ids"]) == [c["id"] for c in results[0]["ctxs"][:5]]


def test_bad_input_is_one_line_error(workspace, capsys, tmp_path):
    work, _ = workspace
    other = tmp_path / "other.tsv"
    other.write_text("id\ttext\ttitle\n1\tsome text\tT\n")
    code = main(["retrieve", "--model", str(work / "question"), "--index", str(work / "index"),
                 "--passages", str(other), "--qa", str(work / "dev.jsonl"), "--out", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "other.tsv" in err and "index" in err
    code = main(["encode", "--model", str(work / "ctx"), "--passages", str(tmp_path / "missing.tsv"),
                 "--out", str(tmp_path / "e")])
    assert code == 2 and "missing.tsv" in capsys.readouterr().err


def test_results_without_text_read_by_row(workspace, capsys):
    """`retrieve` writes JSONL with passage ids and corpus rows but no text; `teacher-scores` and `rerank` look
    the text up by row in the passages TSV and give what they give on the DPR JSON with text."""
    work, _ = workspace
    if not (work / "emb" / "meta.json").exists():
        pytest.skip("needs test_encode_index_retrieve_evaluate's output")
    assert main(["retrieve", "--model", str(work / "question"), "--index", str(work / "emb"),
                 "--passages", str(work / "passages.tsv"), "--qa", str(work / "dev.jsonl"),
                 "--out", str(work / "dev.results.jsonl"), "--k", "5"]) == 0
    record = json.loads((work / "dev.results.jsonl").read_text().splitlines()[0])
    assert "texts" not in record and len(record["passage_rows"]) == 5
    code = main(["teacher-scores", "--model", str(work / "reader"), "--results", str(work / "dev.results.jsonl"),
                 "--out", str(work / "tfds_rows"), "--name", "teacher", "--top-k", "5", "--max-length", "96",
                 "--limit", "3"])
    assert code == 2 and "--passages" in capsys.readouterr().err     # the text has to come from somewhere
    for name, results, extra in (("jsonl", "dev.results.jsonl", ["--passages", str(work / "passages.tsv")]),
                                 ("json", "dev.results.json", [])):
        assert main(["teacher-scores", "--model", str(work / "reader"), "--results", str(work / results),
                     "--out", str(work / f"tfds_{name}"), "--name", "teacher", "--top-k", "5",
                     "--max-length", "96", "--limit", "3"] + extra) == 0
    by_row, with_text = (load_tfds(work / f"tfds_{n}" / "teacher", "train") for n in ("jsonl", "json"))
    for i in range(3):
        assert list(by_row[i]["passage_ids"]) == list(with_text[i]["passage_ids"])
        assert list(by_row[i]["texts"]) == list(with_text[i]["texts"])
        np.testing.assert_array_equal(by_row[i]["relevance_logits"], with_text[i]["relevance_logits"])

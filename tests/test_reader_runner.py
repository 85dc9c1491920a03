"""The batched reader runner: the device's best span scores against the host reference, several questions per
step against one, and 2 processes x 2 devices against one process (`rdr-jax teacher-scores` / `read`)."""

import json
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import harness
from parity import assert_close
from rdr_jax.cli import main
from rdr_jax.data.embedded_data import load_passages
from rdr_jax.data.tfds_format import load as load_tfds
from rdr_jax.data.tokenization import encode_reader_inputs, load_tokenizer
from rdr_jax.models import DPRReader
from rdr_jax.retrieval.reader import ReaderRunner, read_answers, teacher_score_rows
from rdr_jax.retrieval.span_scores import best_span_scores
from test_multiprocess import cpu_env, free_port


@pytest.fixture(scope="module")
def reader_dir(tmp_path_factory, minilm_dir):
    out = tmp_path_factory.mktemp("reader") / "reader"
    assert main(["convert", str(harness.tiny_bert_dir(out.parent / "bert")), str(out), "--to", "hf",
                 "--as", "DPRReader"]) == 0
    from rdr_jax.convert.hf_io import copy_tokenizer_files
    copy_tokenizer_files(minilm_dir, out)
    return out


def synthetic_results(n: int, k: int, seed: int = 0) -> list[dict]:
    """DPR retriever results over embedded passages; some questions have fewer than ``k`` passages."""
    rng = np.random.default_rng(seed)
    passages = load_passages()[:200]
    results = []
    for q in range(n):
        count = k if q % 3 else max(1, k - 2)
        picked = rng.choice(len(passages), count, replace=False)
        results.append({"question": f"who wrote passage {q} about {passages[picked[0]]['title']}?",
                        "answers": [passages[picked[0]]["title"]],
                        "ctxs": [{"id": passages[i]["id"], "title": passages[i]["title"],
                                  "text": passages[i]["text"], "score": float(-j), "has_answer": j == 0}
                                 for j, i in enumerate(picked)]})
    return results


def test_device_span_scores_equal_the_host_reference(minilm_dir):
    tokenizer = load_tokenizer(minilm_dir)
    texts = ["a passage of some words about things", "", "short", "text with [SEP] inside it and more words",
             " ".join(["long"] * 80)]
    inputs = encode_reader_inputs(tokenizer, "a question?", ["Title"] * len(texts), texts, 48)
    rng = np.random.default_rng(1)
    outputs = {k: rng.normal(size=inputs["input_ids"].shape).astype(np.float32)
               for k in ("start_logits", "end_logits")}
    runner = ReaderRunner.__new__(ReaderRunner)   # only its host reference, no model
    from rdr_jax.retrieval.spans import ReaderSpanSelector
    runner.selector = ReaderSpanSelector(tokenizer, max_answer_length=5)
    expected = runner.best_span_scores(inputs, outputs)
    got = np.asarray(best_span_scores(jnp.asarray(outputs["start_logits"]), jnp.asarray(outputs["end_logits"]),
                                      jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]),
                                      jnp.asarray(inputs["passage_start"]), 5, tokenizer.sep_token_id))
    assert expected[1] == -np.inf and got[1] == -np.inf     # an empty passage has no span
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    assert_close(got[finite], expected[finite])


def test_several_questions_per_step_equal_one(reader_dir):
    tokenizer = load_tokenizer(reader_dir)
    model = DPRReader.from_pretrained(reader_dir)
    results = synthetic_results(7, 4)
    one = ReaderRunner(model, tokenizer, passages_per_question=4, max_length=64, questions_per_step=1)
    three = ReaderRunner(model, tokenizer, passages_per_question=4, max_length=64, questions_per_step=3)
    rows_one = list(teacher_score_rows(one, results, progress=False))
    rows_three = list(teacher_score_rows(three, results, progress=False))
    assert [r["question"] for r in rows_three] == [r["question"] for r in results]
    for a, b, r in zip(rows_one, rows_three, results):
        assert a["passage_ids"] == b["passage_ids"] == [c["id"] for c in r["ctxs"][:4]]
        assert b["relevance_logits"].shape == (min(4, len(r["ctxs"])),)
        assert_close(b["relevance_logits"], a["relevance_logits"])
        assert_close(b["span_scores"], a["span_scores"])
        # and the host reference over one question's full logits
        inputs, outputs = one.run(r["question"], r["ctxs"])
        assert_close(b["span_scores"], one.best_span_scores(inputs, outputs))
    assert len(three.shapes) <= 2    # one rows count, lengths in multiples of 32 up to 64
    answers_one = list(read_answers(one, results, progress=False))
    answers_three = list(read_answers(three, results, progress=False))
    assert [a["prediction"] for a in answers_one] == [a["prediction"] for a in answers_three]
    assert [a["passage_id"] for a in answers_one] == [a["passage_id"] for a in answers_three]


def test_two_processes_equal_one(reader_dir, tmp_path):
    results = synthetic_results(9, 3, seed=2)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(results))

    def command(out, what):
        base = [sys.executable, "-m", "rdr_jax.cli", what, "--model", str(reader_dir), "--results", str(results_path),
                "--max-length", "64", "--questions-per-step", "2", "--no-progress"]
        if what == "teacher-scores":
            return base + ["--out", str(out), "--name", "teacher", "--top-k", "3"]
        return base + ["--out", str(out), "--passages-per-question", "3"]

    port, procs = free_port(), []
    for what, out in (("teacher-scores", tmp_path / "one"), ("read", tmp_path / "one.jsonl")):
        procs.append(subprocess.Popen(command(out, what), env=cpu_env(2), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    for i in range(2):
        procs.append(subprocess.Popen(command(tmp_path / "two", "teacher-scores")
                                      + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                         "--process-id", str(i)], env=cpu_env(2), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    port = free_port()
    procs = [subprocess.Popen(command(tmp_path / "two.jsonl", "read")
                              + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    one, two = load_tfds(tmp_path / "one" / "teacher", "train"), load_tfds(tmp_path / "two" / "teacher", "train")
    assert len(one) == len(two) == len(results)
    for i in range(len(results)):
        assert list(two[i]["passage_ids"]) == list(one[i]["passage_ids"])
        assert_close(two[i]["relevance_logits"], one[i]["relevance_logits"])
        assert_close(two[i]["span_scores"], one[i]["span_scores"])
    answers = [[json.loads(line) for line in (tmp_path / f).read_text().splitlines()]
               for f in ("one.jsonl", "two.jsonl")]
    assert [a["question"] for a in answers[1]] == [r["question"] for r in results]
    assert [a["prediction"] for a in answers[1]] == [a["prediction"] for a in answers[0]]


def test_rerank_two_processes_equal_one(reader_dir, tmp_path):
    """`rdr-jax rerank --results` started on 2 processes x 2 devices writes the same re-ranked results as one
    process (blocks of pairs dealt to processes, scores gathered to process 0)."""
    ce = tmp_path / "ce"
    assert main(["convert", str(reader_dir.parent / "bert"), str(ce), "--to", "hf",
                 "--as", "BertForSequenceClassification"]) == 0
    from rdr_jax.convert.hf_io import copy_tokenizer_files
    copy_tokenizer_files(reader_dir, ce)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(synthetic_results(11, 5, seed=3)))

    def command(out):
        return [sys.executable, "-m", "rdr_jax.cli", "rerank", "--model", str(ce), "--results", str(results_path),
                "--out", str(out), "--max-length", "64", "--batch-size", "4", "--depth", "4", "--k", "1", "4"]

    port = free_port()
    procs = [subprocess.Popen(command(tmp_path / "one.json"), env=cpu_env(2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen(command(tmp_path / "two.json") + ["--coordinator", f"127.0.0.1:{port}",
                                                                 "--num-processes", "2", "--process-id", str(i)],
                               env=cpu_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-4000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert len(one) == len(two) == 11
    for a, b in zip(one, two):
        assert [c["id"] for c in a["ctxs"]] == [c["id"] for c in b["ctxs"]]
        assert_close(np.array([c["score"] for c in b["ctxs"][:4]]), np.array([c["score"] for c in a["ctxs"][:4]]))

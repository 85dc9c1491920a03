"""DSI-style training of a tiny T5 (seq2seq_index) and `rdr-jax generate` end to end on it, plus the DGR
candidate step (generate -> teacher -> DGR data)."""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rdr_jax.commands import generate
from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.retrieval.answers import AnswerMatcher
from rdr_jax.retrieval.metrics import read_trec_run
from rdr_jax.retrieval.retrieve import recall_of_results
import harness
from rdr_jax.tasks import load_config
from rdr_jax.training.loop import train

jax.config.update("jax_default_matmul_precision", "highest")

EMBEDDED = harness.REPO_ROOT / "rdr_jax" / "data" / "embedded"
STEPS = 12


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("seq2seq_index")
    config = load_config(harness.TINY_CONFIGS / "seq2seq_index.yaml",
                         ["model.init.num_layers=1", f"train.steps={STEPS}", "train.checkpoint_every=100",
                          "train.tensorboard=false"], workdir=str(workdir))
    train(config, progress=False)
    metrics = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return workdir, metrics


def test_seq2seq_index_loss_decreases(trained):
    workdir, metrics = trained
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
    losses = [m["loss"] for m in metrics]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses
    assert {"query_loss", "index_loss", "token_accuracy", "exact_match"} <= set(metrics[0])
    assert metrics[-1]["token_accuracy"] > metrics[0]["token_accuracy"]
    # Both kinds of example are in every batch (indexing_ratio 0.5).
    assert all(m["query_loss"] > 0 and m["index_loss"] > 0 for m in metrics)


def test_export_loads_in_transformers(trained):
    import transformers

    out = trained[0] / "final" / "retriever"
    model, info = transformers.T5ForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    lines = (out / "identifiers.tsv").read_text().splitlines()
    assert len(lines) == 2474 and lines[0] == "1\t1"                   # atomic ids of the embedded passages


def run_generate(*argv) -> int:
    parser = argparse.ArgumentParser()
    generate.add_arguments(parser)
    return generate.run(parser.parse_args([str(a) for a in argv]))


def test_generate_end_to_end(trained, tmp_path, capsys):
    model = trained[0] / "final" / "retriever"
    qa = tmp_path / "dev.qa.csv"
    qa.write_text("".join((EMBEDDED / "dev.qa.csv").read_text().splitlines(keepends=True)[:12]))
    out, run = tmp_path / "results.json", tmp_path / "run.trec"
    assert run_generate("--model", model, "--qa", qa, "--passages", EMBEDDED / "passages.tsv", "--out", out,
                        "--run-out", run, "--num-beams", 4, "--batch-size", 8, "--k", 1, 4) == 0
    printed = capsys.readouterr().out

    passages = {p["id"]: p for p in read_dpr_passages(EMBEDDED / "passages.tsv")}
    results = json.loads(out.read_text())
    assert len(results) == 12
    for r in results:
        assert set(r) == {"question", "answers", "ctxs"} and isinstance(r["answers"], list)
        assert 1 <= len(r["ctxs"]) <= 4
        scores = [c["score"] for c in r["ctxs"]]
        assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)   # log-probabilities
        assert len({c["id"] for c in r["ctxs"]}) == len(r["ctxs"])
        for c in r["ctxs"]:
            assert set(c) == {"id", "title", "text", "score", "has_answer"}
            assert c["id"] in passages                                   # every generated id is a real passage
            assert c["title"] == passages[c["id"]]["title"] and c["text"] == passages[c["id"]]["text"]
            assert c["has_answer"] == AnswerMatcher(r["answers"], "string")(c["text"])
    recall = recall_of_results(results, (1, 4))
    row = next(line for line in printed.splitlines() if line.startswith("generative")).split()[1:]
    assert [float(x) for x in row] == [recall["1"], recall["4"]] and '{"recall"' not in printed
    assert "Top-1" in printed and "Top-4" in printed
    trec = read_trec_run(run)
    assert len(trec) == 12 and trec["0"] == {c["id"]: c["score"] for c in results[0]["ctxs"]}

    with pytest.raises(ValueError, match="either --qa"):
        run_generate("--model", model, "--passages", EMBEDDED / "passages.tsv", "--out", out)


def test_beam_scores_are_teacher_forced_passage_scores(trained):
    """The score generate reports for a passage is s(p|q), the score DGR trains on."""
    from rdr_jax.retrieval.generative import load_generative_retriever
    from rdr_jax.decoding.scoring import passage_scores

    retriever = load_generative_retriever(trained[0] / "final" / "retriever", num_beams=3, batch_size=2,
                                          max_question_length=32)
    questions = ["What is the ISO 3166-1 alpha-3 code of Poland?", "What is the Nakfa called in French?"]
    ranked = retriever.search(questions, progress=False)
    ids = retriever.identifiers
    index = ids.identifier_of()
    enc = retriever.tokenizer(questions, max_length=32, truncation=True, padding="max_length", return_tensors="np")
    rows = [ids.token_ids[index[pid]] for row in ranked for pid, _ in row[:3]]
    length = max(map(len, rows))
    t_ids = np.array([r + [0] * (length - len(r)) for r in rows])
    t_mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    scores, _ = nnx.jit(passage_scores)(retriever.model, jnp.asarray(enc["input_ids"]),
                                        jnp.asarray(enc["attention_mask"]), jnp.asarray(t_ids), jnp.asarray(t_mask))
    expected = np.array([[s for _, s in row[:3]] for row in ranked])
    np.testing.assert_allclose(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)


def test_distillation_candidates_feed_dgr(trained, tmp_path):
    """Step 1 (generate --gold) -> step 2 (a teacher re-scores, here a stand-in) -> DGR's data reader."""
    from rdr_jax.data.dgr_data import DGRData

    model = trained[0] / "final" / "retriever"
    examples = json.loads((EMBEDDED / "train.biencoder.json").read_text())[:6]
    gold_file = tmp_path / "gold.json"
    gold_file.write_text(json.dumps(examples))
    out = tmp_path / "candidates.json"
    assert run_generate("--model", model, "--gold", gold_file, "--passages", EMBEDDED / "passages.tsv", "--out", out,
                        "--num-beams", 4, "--batch-size", 8) == 0
    candidates = json.loads(out.read_text())
    for ex, r in zip(examples, candidates):
        gold = ex["positive_ctxs"][0]["passage_id"]
        assert [c["id"] for c in r["ctxs"] if c["is_positive"]] == [gold]   # the gold positive is always there
        assert all(c["identifier"] == c["id"] for c in r["ctxs"])          # atomic identifiers
        assert 4 <= len(r["ctxs"]) <= 5
    # What `rdr-jax rerank --results` writes: standard fields only, score = the teacher's.
    rng = np.random.default_rng(0)
    reranked = [{**r, "ctxs": [{k: c[k] for k in ("id", "title", "text", "has_answer")} | {"score": float(rng.normal())}
                               for c in r["ctxs"]]} for r in candidates]
    (tmp_path / "teacher.json").write_text(json.dumps(reranked))
    data = DGRData(tmp_path / "teacher.json", generate_tokenizer(model), {p["id"]: p["id"] for r in reranked
                                                                          for p in r["ctxs"]},
                   num_candidates=5, max_question_length=32, max_identifier_length=0, stand_in_teacher="none",
                   gold_file=str(gold_file))
    assert len(data) == 6
    for ex, r, cands in zip(examples, reranked, map(data.candidates, range(len(data)))):
        gold = ex["positive_ctxs"][0]["passage_id"]
        assert cands[0]["passage_id"] == gold
        teacher = [c["teacher_score"] for c in cands[1:]]
        assert teacher == sorted(teacher, reverse=True)
        assert {c["passage_id"] for c in cands} == {c["id"] for c in r["ctxs"]}


def generate_tokenizer(model_dir: Path):
    from rdr_jax.data.tokenization import load_tokenizer

    return load_tokenizer(model_dir)


def test_generate_over_corpus_ngrams(trained, tmp_path, capsys):
    """MINDER-style retrieval through `rdr-jax generate --ngram-index`: the index is built from the passages on
    first use and loaded after; every beam is a corpus n-gram and passages are ranked by SEAL's score."""
    from rdr_jax.decoding.ngram_passages import CorpusNgrams

    model = trained[0] / "final" / "retriever"
    lines = (EMBEDDED / "passages.tsv").read_text().splitlines(keepends=True)
    corpus = tmp_path / "passages.tsv"
    corpus.write_text("".join(lines[:301]))                            # header + 300 passages
    qa = tmp_path / "dev.qa.csv"
    qa.write_text("".join((EMBEDDED / "dev.qa.csv").read_text().splitlines(keepends=True)[:6]))
    index_dir, out = tmp_path / "ngrams", tmp_path / "results.json"
    argv = ("--model", model, "--qa", qa, "--passages", corpus, "--out", out, "--ngram-index", index_dir,
            "--max-ngram", 6, "--num-beams", 5, "--batch-size", 8, "--k", 1, 5, 20)
    assert run_generate(*argv) == 0
    ngrams = CorpusNgrams.load(index_dir)
    assert len(ngrams.passage_ids) == 300 and ngrams.index.max_ngram == 6
    passages = {p["id"]: p for p in read_dpr_passages(corpus)}
    results = json.loads(out.read_text())
    assert len(results) == 6
    for r in results:
        scores = [c["score"] for c in r["ctxs"]]
        assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)   # SEAL weights
        assert all(c["id"] in passages for c in r["ctxs"]) and len({c["id"] for c in r["ctxs"]}) == len(scores)
    built = (index_dir / "suffixes.npy").stat().st_mtime_ns
    assert run_generate(*argv) == 0                                     # loads, does not rebuild
    assert (index_dir / "suffixes.npy").stat().st_mtime_ns == built
    assert json.loads(out.read_text()) == results
    with pytest.raises(ValueError, match="not both"):
        run_generate(*argv, "--identifiers", model / "identifiers.tsv")

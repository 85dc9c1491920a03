"""Periodic dev retrieval evaluation (top-k answer recall in metrics.jsonl, best checkpoint by it) and the
FLOPs / MFU accounting of the training loop, on tiny random BERTs and a slice of the embedded corpus."""

import csv
import json

import jax
import numpy as np
import pytest

from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder
from rdr_jax.retrieval.answers import has_answer
from rdr_jax.retrieval.encode import Encoder, encode_corpus, encode_texts
from rdr_jax.retrieval.dev_recall import exact_top_k
from rdr_jax.tasks.model_setup import MINILM_PACKAGE, resolve_path
from rdr_jax.training import flops
import harness
from rdr_jax.training.checkpoints import Checkpointer
from rdr_jax.tasks import load_config
from rdr_jax.training.config import ConfigError
from rdr_jax.training.loop import train

EMBEDDED = harness.REPO_ROOT / "rdr_jax" / "data" / "embedded"
N_TRAIN, N_DEV, N_OTHER = 16, 40, 120
LQ, LP = 24, 64


pytestmark = pytest.mark.usefixtures("compilation_cache")  # the runs share step shapes


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT; a corpus slice (the training questions' passages, the dev questions' gold passages and
    some others) with its index embeddings from the BERT-initialised context encoder; RDR training JSONL
    whose passages carry corpus ids; a dev QA file in DPR's CSV layout."""
    tmp = tmp_path_factory.mktemp("dev_recall")
    bert = harness.tiny_bert_dir(tmp / "bert", dropout=0.0)
    train_ex = json.loads((EMBEDDED / "train.biencoder.json").read_text())[:N_TRAIN]
    dev_ex = json.loads((EMBEDDED / "dev.biencoder.json").read_text())[:N_DEV]
    ids = {c["passage_id"] for ex in train_ex
           for c in ex["positive_ctxs"][:1] + ex["hard_negative_ctxs"] + ex["negative_ctxs"]}
    ids |= {ex["positive_ctxs"][0]["passage_id"] for ex in dev_ex}
    corpus = [p for i, p in enumerate(read_dpr_passages(EMBEDDED / "passages.tsv"))
              if p["id"] in {str(x) for x in ids} or i < N_OTHER]
    passages = tmp / "passages.tsv"
    with passages.open("w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["id", "text", "title"])
        w.writerows([p["id"], p["text"], p["title"]] for p in corpus)

    rng = np.random.default_rng(0)
    lines = []
    for ex in train_ex:
        ctxs = ([dict(c, has_answer=True) for c in ex["positive_ctxs"][:1]]
                + [dict(c, has_answer=False) for c in ex["hard_negative_ctxs"] + ex["negative_ctxs"]])[:4]
        ctxs = [{"id": str(c["passage_id"]), "title": c["title"], "text": c["text"], "has_answer": c["has_answer"],
                 "teacher_score": float(rng.normal() + 3.0 * c["has_answer"])} for c in ctxs]
        lines.append(json.dumps({"question": ex["question"], "answers": ex["answers"], "ctxs": ctxs}))
    rdr = tmp / "rdr.jsonl"
    rdr.write_text("\n".join(lines) + "\n")

    dev_qa = tmp / "dev.qa.csv"
    with dev_qa.open("w", newline="") as f:
        csv.writer(f, delimiter="\t").writerows([ex["question"], json.dumps(ex["answers"])] for ex in dev_ex)

    tokenizer = load_tokenizer(resolve_path(MINILM_PACKAGE))
    embeddings = encode_corpus(Encoder(DPRContextEncoder.from_pretrained(bert), 32), tokenizer, corpus,
                               tmp / "embeddings", max_length=LP, progress=False)
    return {"tmp": tmp, "bert": bert, "rdr": rdr, "dpr": harness.write_biencoder_json(tmp / "dpr.json", 16),
            "passages": passages, "dev_qa": dev_qa, "embeddings": embeddings, "tokenizer": tokenizer,
            "corpus": corpus, "dev": dev_ex}


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def rdr_config(files, workdir, *extra):
    return load_config(harness.TINY_CONFIGS / "rdr.yaml",
                       harness.tiny_overrides("rdr", files["bert"], files["rdr"])
                       + [f"data.passage_embeddings={files['embeddings']}", f"data.dev_qa={files['dev_qa']}",
                          f"data.dev_passages={files['passages']}", "data.top_k=4",
                          f"data.max_question_length={LQ}", f"data.max_passage_length={LP}",
                          "train.batch_size=8", "optim.learning_rate=5e-3", *extra],
                       workdir=str(workdir))


def direct_recall(files, question_vectors, passage_vectors, passage_ids, ks=(1, 5, 20)):
    """Top-k answer recall computed without the task's code: full score matrix (exact products and sums,
    rounded once to float32, as the search defines them), stable sort, has_answer."""
    scores = (question_vectors.astype(np.float64) @ passage_vectors.T.astype(np.float64)).astype(np.float32)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :max(ks)]
    text = {p["id"]: p["text"] for p in files["corpus"]}
    hits = np.array([[has_answer(ex["answers"], text[passage_ids[r]]) for r in row]
                     for ex, row in zip(files["dev"], top)])
    return {f"dev_top{k}": 100.0 * float(np.mean(hits[:, :k].any(axis=1))) for k in ks}


def encode_with(model_dir, cls, files, texts, titles=None) -> np.ndarray:
    """The exported encoder's embeddings, through the program the run's evaluation uses (``Encoder``, batches
    of train.batch_size, no length buckets). These tiny random encoders score many passages within float
    rounding of each other, so a differently compiled forward (eager, padded) can swap ranks at the top-k
    boundary; the forward's own parity is tested elsewhere (test_packing, test_dpr)."""
    encoder = Encoder(cls.from_pretrained(model_dir), 8, devices=jax.local_devices())
    return encode_texts(encoder, files["tokenizer"], texts, titles=titles, max_length=LQ if titles is None else LP,
                        as_questions=titles is None, buckets=(), progress=False)


def dev_questions(files) -> list[str]:
    return [ex["question"] for ex in files["dev"]]


@pytest.fixture(scope="module")
def rdr_run(files):
    workdir = files["tmp"] / "rdr_run"
    result = train(rdr_config(files, workdir, "train.steps=4", "train.eval_every=1", "train.checkpoint_every=1",
                              "train.keep_checkpoints=1", "train.best_metric=dev_top1", "train.best_mode=max"),
                   progress=False)
    return workdir, result, read_metrics(workdir)


def test_rdr_run_logs_dev_recall_equal_to_a_direct_computation(files, rdr_run):
    workdir, result, records = rdr_run
    assert result["step"] == 4
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert set(r) >= {"dev_top1", "dev_top5", "dev_top20"}
        assert 0.0 <= r["dev_top1"] <= r["dev_top5"] <= r["dev_top20"] <= 100.0
    # the last step's numbers from the exported question encoder, the frozen index embeddings, has_answer
    from rdr_jax.retrieval.encode import load_encoded
    vectors, ids = load_encoded(files["embeddings"])
    questions = encode_with(workdir / "final" / "question_encoder", DPRQuestionEncoder, files, dev_questions(files))
    expected = direct_recall(files, questions, vectors, ids)
    for key, value in expected.items():
        assert records[-1][key] == pytest.approx(value, abs=0.006), key
    # step 1 ran at learning rate 0 (warm-up): its numbers are the initial question encoder's
    initial = encode_with(files["bert"], DPRQuestionEncoder, files, dev_questions(files))
    assert records[0]["learning_rate"] == 0.0
    for key, value in direct_recall(files, initial, vectors, ids).items():
        assert records[0][key] == pytest.approx(value, abs=0.006), key
    assert not np.allclose(initial, questions, atol=1e-4)   # and training did move it since


def test_best_metric_dev_top1_keeps_the_best_checkpoint(files, rdr_run):
    workdir, _, records = rdr_run
    top1 = {r["step"]: r["dev_top1"] for r in records}
    kept = Checkpointer(workdir / "checkpoints", keep=1, best_metric="dev_top1", best_mode="max").all_steps()
    best = max(top1.values())
    assert 4 in kept                                   # the latest
    assert len(kept) <= 2
    assert any(top1[s] == best for s in kept)          # and one with the best dev top-1
    for s in kept:
        assert s == 4 or top1[s] == best


def test_flops_logged_once_and_no_mfu_without_a_known_peak(rdr_run):
    _, _, records = rdr_run
    assert records[0]["flops_per_step"] > 0
    assert all("flops_per_step" not in r for r in records[1:])
    if flops.device_peak_flops() is None:   # a CPU
        assert all("mfu" not in r for r in records)


def test_mfu_with_peak_flops_override(files):
    workdir = files["tmp"] / "mfu_run"
    config = rdr_config(files, workdir, "train.steps=2", "data.dev_qa=null").with_overrides("train.peak_flops=1e9")
    train(config, progress=False)
    records = read_metrics(workdir)
    assert len(records) == 2 and "dev_top1" not in records[0]
    f = records[0]["flops_per_step"]
    for r in records:
        # log_every=1: each record's window is one step of batch_size examples
        step_seconds = 8 / r["examples_per_sec"]
        assert r["mfu"] == pytest.approx(f / step_seconds / (1e9 * jax.device_count()), rel=1e-6)


def test_dpr_dev_recall_encodes_the_dev_passages_with_the_trained_context_encoder(files):
    workdir = files["tmp"] / "dpr_run"
    config = load_config(harness.TINY_CONFIGS / "dpr.yaml",
                         harness.tiny_overrides("dpr", files["bert"], files["dpr"])
                         + [f"data.dev_qa={files['dev_qa']}", f"data.dev_passages={files['passages']}",
                            f"data.max_question_length={LQ}", f"data.max_passage_length={LP}",
                            "data.dev_k=[1,5,20]", "train.steps=2", "train.eval_every=2", "train.batch_size=8"],
                         workdir=str(workdir))
    train(config, progress=False)
    last = read_metrics(workdir)[-1]
    corpus = files["corpus"]
    passages = encode_with(workdir / "final" / "context_encoder", DPRContextEncoder, files,
                           [p["text"] for p in corpus], titles=[p["title"] for p in corpus])
    questions = encode_with(workdir / "final" / "question_encoder", DPRQuestionEncoder, files, dev_questions(files))
    expected = direct_recall(files, questions, passages, [p["id"] for p in corpus])
    for key, value in expected.items():
        assert last[key] == pytest.approx(value, abs=0.006), key


def test_exact_top_k_matches_a_full_sort_across_blocks():
    rng = np.random.default_rng(0)
    q, v = rng.normal(size=(7, 5)).astype(np.float32), rng.normal(size=(50, 5)).astype(np.float32)
    expected = np.argsort(-(q @ v.T), axis=1, kind="stable")[:, :6]
    np.testing.assert_array_equal(exact_top_k(q, v, 6, query_block=3, corpus_block=8), expected)
    assert exact_top_k(q, v[:4], 6).shape == (7, 4)
    # ties (repeated passages) go to the lower row, wherever the block boundaries fall
    tied = np.repeat(v[:10], 5, axis=0)
    exact = (q.astype(np.float64) @ tied.T.astype(np.float64)).astype(np.float32)   # identical rows: equal scores
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :12]
    for block in (7, 11, 50):
        np.testing.assert_array_equal(exact_top_k(q, tied, 12, corpus_block=block), expected)


def test_dev_recall_config_errors_name_the_key(files, tmp_path):
    with pytest.raises(ConfigError, match="data.dev_passages"):
        rdr_config(files, tmp_path, f"data.dev_qa={files['dev_qa']}", "data.dev_passages=null")
    with pytest.raises(ConfigError, match="data.dev_k"):
        rdr_config(files, tmp_path, "data.dev_k=[0, 5]")
    with pytest.raises(ConfigError, match="data.dev_match_type"):
        rdr_config(files, tmp_path, "data.dev_match_type=fuzzy")


def test_peak_table():
    assert flops.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.device_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert flops.device_peak_flops("TPU v5 lite") == 197e12
    assert flops.device_peak_flops("NVIDIA L40S") is None
    assert flops.device_peak_flops("cpu") is None
    assert flops.mfu(1e12, 0.5, 1e12, 4) == pytest.approx(0.5)

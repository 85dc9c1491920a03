"""DGR on MINDER's multi-view n-gram identifiers (``data.identifier_kind: ngrams``): the views chosen per
(question, passage), passages read by line offset, s(p) against per-view teacher-forced log-probabilities
computed one by one (fp32), and a few training steps on the tiny config."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import harness
from parity import assert_close
from rdr_jax.data.identifier_views import ViewSpec, best_ngrams, passage_views, view_texts
from rdr_jax.data.passage_lines import PassageLines, passage_offsets
from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.models.seq2seq import sequence_log_probs
from rdr_jax.tasks import load_config
from rdr_jax.training.config import ConfigError
from rdr_jax.training.loop import train

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = harness.TINY_CONFIGS / "dgr_ngrams.yaml"
PASSAGES = harness.TINY_CONFIGS.parents[1] / "data" / "embedded" / "passages.tsv"
pytestmark = pytest.mark.usefixtures("compilation_cache")


def test_best_ngrams_overlap_most_with_the_question():
    body = list(range(10, 22))                      # 12 tokens: 10 .. 21
    question = [13, 15, 19, 20, 99]
    # windows of 3 tokens: [13 14 15], [18 19 20] and [19 20 21] hold 2 question tokens each; ties go to the
    # earlier window, one overlapping a chosen window is passed over ([19 20 21]), the third is the first free one
    assert best_ngrams(question, body, 2, 3) == [[13, 14, 15], [18, 19, 20]]
    assert best_ngrams(question, body, 3, 3) == [[13, 14, 15], [18, 19, 20], [10, 11, 12]]
    assert best_ngrams(question, [5, 6], 2, 5) == [[5, 6]]                # shorter than a window: one view
    assert best_ngrams(question, [], 2, 5) == []
    spec = ViewSpec(ngrams=2, ngram_length=3, pseudo_queries=2)
    assert spec.count == 5
    assert view_texts(spec, {"title": " T ", "text": "body"}, ["who", " ", "what", "x"]) == (" T ", "body",
                                                                                              ["who", "what"])
    assert view_texts(spec, {"title": "  ", "text": "body"})[0] is None
    assert passage_views(spec, question, [7, 8], body[:6], [[1, 2]]) == [[7, 8], [13, 14, 15], [10, 11, 12],
                                                                         [1, 2], None]
    assert passage_views(spec, question, None, [4], []) == [None, [4], None, None, None]


def test_passages_read_by_line_offset(tmp_path):
    rows = list(read_dpr_passages(PASSAGES))
    wanted = {rows[0]["id"], rows[5]["id"], rows[-1]["id"]}
    offsets = passage_offsets(PASSAGES, wanted)
    assert offsets.keys() == wanted
    read = PassageLines(PASSAGES)
    for row in rows:
        if row["id"] in wanted:
            assert read(offsets[row["id"]]) == row
    with pytest.raises(ValueError, match=r"1 passages of the training data are not in it, e\.g\. 'nope'"):
        passage_offsets(PASSAGES, {"nope", rows[1]["id"]})


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.max_identifier_length"):
        load_config(CONFIG, ["data.max_identifier_length=0"], workdir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.passages_file"):
        load_config(CONFIG, ["data.identifiers_file=x.tsv"], workdir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"data\.view_aggregation"):
        load_config(CONFIG, ["data.view_aggregation=max"], workdir=str(tmp_path))


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    from rdr_jax.tasks.dgr import DGRTask

    tmp = tmp_path_factory.mktemp("dgr_ngrams_model")
    return Path(DGRTask(load_config(CONFIG, ["model.init.num_layers=1"], workdir=str(tmp)), tmp).paths()[0])


@pytest.mark.parametrize("aggregation", ["sum", "mean"])
def test_passage_score_aggregates_per_view_log_probs(t5_dir, tmp_path, aggregation):
    """s(p) = the sum (or mean) over p's real views of each view's teacher-forced log-probability, each computed
    on its own; the generation CE = the gold passage's view tokens' mean NLL."""
    from rdr_jax.tasks.dgr import DGRTask

    queries = {p["id"]: [f"who wrote {p['title']}"] for n, p in enumerate(read_dpr_passages(PASSAGES)) if n % 2}
    (tmp_path / "pq.jsonl").write_text("".join(json.dumps({"id": i, "queries": q}) + "\n" for i, q in queries.items()))
    overrides = [f"model.path={t5_dir}", f"data.view_aggregation={aggregation}", "data.pseudo_query_views=1",
                 f"data.pseudo_queries_file={tmp_path / 'pq.jsonl'}"]
    task = DGRTask(load_config(CONFIG, overrides, workdir=str(tmp_path)), tmp_path)
    model = task.build_model()
    data = task.split_data("train")
    batch = data.make_batch(np.array([3, 0]))
    b, k = batch["candidate_mask"].shape
    v = batch["view_mask"].shape[1]
    assert v == 4 and batch["target_ids"].shape[0] == b * k * v
    ids = [c["passage_id"] for i in (3, 0) for c in data.records[i]["candidates"][:k]]
    assert len(ids) == b * k and batch["view_mask"][:, :3].all()
    np.testing.assert_array_equal(batch["view_mask"][:, 3], [i in queries for i in ids])   # the pseudo-query view
    _, metrics = nnx.jit(lambda m, x: task.loss(m, x, rngs=None, deterministic=True))(
        model, jax.tree.map(jnp.asarray, batch))

    one = nnx.jit(sequence_log_probs)
    per_view = np.zeros((b, k, v), np.float64)
    for row in range(b * k * v):
        if batch["target_mask"][row].sum():
            q = row // (k * v)
            per_view.flat[row] = float(one(model.retriever, batch["q_input_ids"][q:q + 1],
                                           batch["q_attention_mask"][q:q + 1], batch["target_ids"][row:row + 1],
                                           batch["target_mask"][row:row + 1])[0])
    views = batch["view_mask"].reshape(b, k, v)
    expected = per_view.sum(-1) if aggregation == "sum" else per_view.sum(-1) / np.maximum(views.sum(-1), 1)

    # every n-gram view is a substring of the corpus n-gram index's views, so the trained model can decode it
    from rdr_jax.decoding.substring_index import SubstringIndex

    passages = [data.passages(c["offset"]) for i in (3, 0) for c in data.records[i]["candidates"][:k]]
    index = SubstringIndex.from_passages(passages, task.tokenizer, pseudo_queries=queries,
                                         max_ngram=task.config.data.max_identifier_length)
    eos = task.tokenizer.eos_token_id
    for row, mask in zip(batch["target_ids"], batch["target_mask"]):
        tokens = [int(t) for t in row[mask == 1] if t != eos]
        assert not tokens or index.count(tokens) > 0, task.tokenizer.decode(tokens)

    from rdr_jax.decoding.scoring import passage_scores
    from rdr_jax.tasks.dgr import view_scores

    s, token = nnx.jit(passage_scores)(model.retriever, batch["q_input_ids"], batch["q_attention_mask"],
                                       batch["target_ids"], batch["target_mask"])
    scores, _, _ = view_scores(s, token, jnp.asarray(batch["target_mask"]), jnp.asarray(batch["view_mask"]),
                               jnp.asarray(batch["candidate_mask"]).astype(bool), aggregation)
    assert_close(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
    gold_tokens = batch["target_mask"].reshape(b, k, v, -1)[:, 0].sum()
    assert_close(float(metrics["generation_loss"]), -per_view[:, 0].sum() / gold_tokens, rtol=1e-5, atol=1e-6)


def test_training_on_views_lowers_the_loss(t5_dir, tmp_path):
    workdir = tmp_path / "run"
    config = load_config(CONFIG, [f"model.path={t5_dir}", "train.steps=4", "train.tensorboard=false",
                                  "train.checkpoint_every=100", "optim.warmup_steps=0"], workdir=str(workdir))
    train(config, progress=False)
    losses = [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
    assert (workdir / "final" / "retriever" / "model.safetensors").is_file()
    assert not (workdir / "final" / "retriever" / "identifiers.tsv").exists()   # any corpus substring names a passage


def test_prepared_offsets_refused_against_another_passages_file(tmp_path):
    """`prepare-data dgr --passages A` keeps line offsets into A; training with passages B stops at once."""
    from rdr_jax.cli import main
    from rdr_jax.data.dgr_data import DGRData
    from rdr_jax.data.seq2seq_inputs import build_word_tokenizer

    lines = PASSAGES.read_text().splitlines(keepends=True)[:21]
    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("".join(lines))
    b.write_text("".join([lines[0]] + lines[:0:-1]))                      # the same passages, other order
    ids = [line.split("\t")[0] for line in lines[1:]]
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps({"question": "q", "candidates": [
        {"passage_id": pid, "teacher_score": float(j), "is_positive": j == 0} for j, pid in enumerate(ids[:3])]}))
    out = tmp_path / "dgr.arrayrecord"
    assert main(["prepare-data", "dgr", str(train), str(out), "--passages", str(a), "--no-progress"]) == 0
    tok = build_word_tokenizer([line for line in lines], "t5")
    kw = dict(num_candidates=3, max_question_length=8, max_identifier_length=12, stand_in_teacher="none",
              gold_file=None, cache_dir=tmp_path / "cache", views=ViewSpec(ngrams=1, ngram_length=4))
    batch = DGRData(out, tok, None, **kw, passages_file=str(a)).make_batch(np.array([0]))
    assert batch["view_mask"].shape == (3, 2) and batch["view_mask"].all()
    with pytest.raises(ValueError, match="prepared with another passages file"):
        DGRData(out, tok, None, **kw, passages_file=str(b)).make_batch(np.array([0]))

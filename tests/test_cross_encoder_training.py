"""Cross-encoder training (task ``cross_encoder``): the task's losses equal the ranking losses of the model's
logits on a hand-made batch (every loss option), training inputs are the re-ranker's, the data readers
(results JSON, MS MARCO teacher JSONL + qrels) build the right lists, the in-step teacher is frozen, the tiny
config trains (loss down, metrics.jsonl, an HF export transformers loads and ``rdr-jax rerank`` uses), and
DeBERTa training sharded data=4 x tensor=2 over 8 simulated devices matches 1 device.
"""

import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from rdr_jax import losses as R
from rdr_jax.retrieval.rerank import CrossEncoderScorer
from rdr_jax.data.cross_encoder_lists import ListSources, query_lists
from rdr_jax.tasks.cross_encoder import LOSSES, ranking_objective
import harness
from rdr_jax.tasks import load_config
from rdr_jax.training.config import ConfigError
from rdr_jax.tasks import get_task_class
from rdr_jax.training.task import ModelBundle
from rdr_jax.training.loop import prepare, train
from rdr_jax.training.state import merge_model

TINY = harness.TINY_CONFIGS / "cross_encoder.yaml"
NO_DROPOUT = ["model.init.hidden_dropout_prob=0.0", "model.init.attention_probs_dropout_prob=0.0",
              "model.init.initializer_range=0.2"]   # wider init: logits that differ between pairs

# Lists of different lengths (list_size 4: the second is padded), teacher ties, labels from has_answer.
RESULTS = [
    {"question": "what is the code of japanese",
     "ctxs": [{"title": "Japanese", "text": "Japanese has the code jpn and ja.", "teacher_score": 2.0,
               "has_answer": True},
              {"title": "French", "text": "French has the code fra.", "teacher_score": 0.5, "has_answer": False},
              {"title": "German", "text": "German is spoken in Germany.", "teacher_score": 0.5, "has_answer": False},
              {"title": "Euro", "text": "The euro is a currency code EUR.", "teacher_score": -1.0,
               "has_answer": False}]},
    {"question": "which currency has the code eur",
     "ctxs": [{"title": "Euro", "text": "The euro has the code EUR.", "teacher_score": 3.0, "has_answer": True},
              {"title": "Yen", "text": "The yen is the currency of Japan.", "teacher_score": 1.0,
               "has_answer": False},
              {"title": "", "text": "A passage without a title about money.", "teacher_score": 1.5,
               "has_answer": False}]},
]


def tiny_config(workdir, *overrides):
    return load_config(TINY, list(overrides), workdir=str(workdir))


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("ce_data") / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RESULTS) + "\n")
    return path


@pytest.fixture(scope="module")
def hand_made(tmp_path_factory, results_file):
    """The tiny DeBERTa task on the hand-made lists with an in-step teacher ("init": a random cross-encoder):
    (trainer, batch with the file's teacher scores, batch for the in-step teacher, student logits [B, K])."""
    workdir = tmp_path_factory.mktemp("ce_hand")
    common = [f"data.train_file={results_file}", "data.stand_in_teacher=null", "task.loss=margin_mse", *NO_DROPOUT]
    trainer = prepare(tiny_config(workdir, *common, "task.teacher_model=init"))
    file_task = get_task_class("cross_encoder")(tiny_config(workdir, *common), workdir)
    batch = next(file_task.train_iterator(2, 0))
    teacher_batch = next(trainer.task.train_iterator(2, 0))
    model = merge_model(trainer.setup)
    out = model.cross_encoder(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                              jnp.asarray(batch["token_type_ids"]))
    logits = np.asarray(out.logits[:, 0]).reshape(2, 4)
    return trainer, batch, teacher_batch, logits


def numpy_distill_ranknet(s, t, mask):
    terms = [np.log1p(np.exp(-(s[b, i] - s[b, j]))) for b in range(s.shape[0]) for i in range(s.shape[1])
             for j in range(s.shape[1]) if mask[b, i] and mask[b, j] and t[b, i] > t[b, j]]
    return float(np.mean(terms))


def test_batch_holds_the_lists_and_the_rerankers_inputs(hand_made):
    trainer, batch, teacher_batch, _ = hand_made
    task, model = trainer.task, merge_model(trainer.setup)
    order = np.argsort([r["question"] for r in RESULTS])   # the iterator shuffles; find each list's row
    rows = {batch["input_ids"][4 * b, 1]: b for b in range(2)}
    assert batch["passage_mask"].sum(1).tolist() in ([4, 3], [3, 4])
    scorer = CrossEncoderScorer(model.cross_encoder, task.tokenizer, max_length=96, buckets=())
    for r in RESULTS:
        texts = [f"{c['title']} {c['text']}" if c["title"] else c["text"] for c in r["ctxs"]]
        enc = scorer.tokenize([r["question"]] * len(texts), texts)
        b = rows[enc["input_ids"][0, 1]]
        n = len(texts)
        for key in ("input_ids", "attention_mask", "token_type_ids"):   # what `rdr-jax rerank` would feed
            np.testing.assert_array_equal(batch[key][4 * b:4 * b + n], enc[key])
        np.testing.assert_array_equal(batch["teacher_scores"][b, :n], [c["teacher_score"] for c in r["ctxs"]])
        np.testing.assert_array_equal(batch["labels"][b, :n], [c["has_answer"] for c in r["ctxs"]])
        assert batch["passage_mask"][b].tolist() == [1] * n + [0] * (4 - n)
    assert len(order) == 2
    assert "teacher_scores" not in teacher_batch   # the in-step teacher reads the student's own inputs
    for key in ("input_ids", "attention_mask", "token_type_ids", "passage_mask", "labels"):
        np.testing.assert_array_equal(teacher_batch[key], batch[key])


@pytest.mark.parametrize("loss", LOSSES)
def test_task_loss_equals_ranking_loss_of_the_logits(hand_made, loss):
    trainer, batch, _, logits = hand_made
    model = ModelBundle(cross_encoder=merge_model(trainer.setup).cross_encoder)   # no in-step teacher
    workdir = trainer.task.workdir
    mask = batch["passage_mask"].astype(bool)
    teacher, labels = batch["teacher_scores"], batch["labels"].astype(bool)
    task = get_task_class("cross_encoder")(load_config(TINY, [f"task.loss={loss}"], workdir=str(workdir)), workdir)
    value, metrics = task.loss(model, {k: jnp.asarray(v) for k, v in batch.items()}, rngs=None, deterministic=True)
    value = float(value)
    assert np.isfinite(value) and value > 0
    if loss == "distill_ranknet":
        expected = numpy_distill_ranknet(logits, teacher, mask)
    elif loss == "margin_mse":   # positive first in every list
        expected = float(R.margin_mse_list(logits, teacher, mask))
        s, t = logits, teacher
        by_hand = [((s[b, 0] - s[b, j]) - (t[b, 0] - t[b, j])) ** 2 for b in range(2) for j in range(1, 4)
                   if mask[b, j]]
        np.testing.assert_allclose(expected, np.mean(by_hand), rtol=1e-5)
    elif loss == "infonce":
        expected = float(R.infonce(logits, 0, mask))
    elif loss == "bce":
        expected = float(R.pointwise_bce(logits, labels, mask))
    else:
        expected = float(R.listwise_kl(logits, teacher, mask))
    np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-7)
    assert set(metrics) <= {"positive_top1", "teacher_top1_agreement"} and metrics
    # The pure objective with padding replaced by garbage gives the same value.
    junk = np.where(mask, logits, np.nan)
    np.testing.assert_allclose(float(ranking_objective(loss, jnp.asarray(junk), jnp.asarray(mask),
                                                       jnp.asarray(teacher), jnp.asarray(labels))),
                               expected, rtol=1e-5, atol=1e-7)


def test_in_step_teacher_is_frozen_and_scores_the_pairs(hand_made):
    trainer, _, batch, _ = hand_made
    task, setup = trainer.task, trainer.setup
    trained = {str(p[0]) for p, _ in nnx.to_flat_state(setup.state["params"])}
    frozen = [p for p, v in nnx.to_flat_state(setup.frozen) if isinstance(v, nnx.Param)]
    assert trained == {"cross_encoder"} and {str(p[0]) for p in frozen} == {"teacher"}, (trained, frozen[:3])
    assert len(frozen) > 10 and "teacher" not in str(jax.tree.structure(setup.state["opt_state"]))
    model = merge_model(setup)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    teacher = np.asarray(model.teacher(jb["input_ids"], jb["attention_mask"], jb["token_type_ids"]).logits[:, 0])
    student = np.asarray(model.cross_encoder(jb["input_ids"], jb["attention_mask"], jb["token_type_ids"]).logits[:, 0])
    assert not np.allclose(teacher, student)
    value, _ = task.loss(model, jb, rngs=None, deterministic=True)   # margin_mse against the teacher's margins
    mask = batch["passage_mask"].astype(bool)
    expected = R.margin_mse_list(student.reshape(2, 4), teacher.reshape(2, 4), mask)
    np.testing.assert_allclose(float(value), float(expected), rtol=1e-5)


def test_msmarco_teacher_lists_keep_the_teachers_top_k(tmp_path):
    (tmp_path / "queries.tsv").write_text("7\twhat is a cross encoder\n8\tunused query\n")
    (tmp_path / "collection.tsv").write_text("".join(f"{p}\tpassage number {p}\n" for p in range(10)))
    (tmp_path / "teacher.jsonl").write_text(json.dumps({"qid": 7, "pids": [1, 2, 3, 4], "scores": [0.1, 0.9, 0.5, 0.7]}))
    (tmp_path / "qrels.tsv").write_text("7 0 3 1\n7 0 2 0\n")
    config = tiny_config(tmp_path / "run", f"data.train_file={tmp_path / 'teacher.jsonl'}",
                         f"data.queries={tmp_path / 'queries.tsv'}", f"data.collection={tmp_path / 'collection.tsv'}",
                         f"data.qrels={tmp_path / 'qrels.tsv'}", "data.list_size=3")
    [q], _ = query_lists(config.data.train_file, ListSources.of_config(config.data))
    assert q["query"] == "what is a cross encoder"
    assert q["passages"] == ["passage number 2", "passage number 4", "passage number 3"]
    assert q["teacher"] == [0.9, 0.7, 0.5] and q["labels"] == [0, 0, 1]
    with pytest.raises(ConfigError, match="data.queries"):
        query_lists(config.data.train_file, ListSources.of_config(
            load_config(TINY, [f"data.train_file={tmp_path / 'teacher.jsonl'}"], workdir=str(tmp_path)).data))


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="task.loss"):
        tiny_config(tmp_path, "task.loss=hinge")
    with pytest.raises(ConfigError, match="model.family"):
        tiny_config(tmp_path, "model.family=t5")
    with pytest.raises(ConfigError, match="stand_in_teacher"):
        tiny_config(tmp_path, "task.teacher_model=init")


def test_plain_bert_checkpoint_gets_a_fresh_one_logit_head(tmp_path, minilm_dir):
    from safetensors.numpy import load_file
    config = tiny_config(tmp_path, f"model.path={minilm_dir}", "model.init=null")
    model = get_task_class("cross_encoder")(config, tmp_path).build_model()
    assert type(model.cross_encoder).__name__ == "BertForSequenceClassification"
    assert model.cross_encoder.config.labels == 1
    exported = model.cross_encoder.to_hf_state_dict()
    original = load_file(os.path.join(minilm_dir, "model.safetensors"))
    key = "encoder.layer.0.attention.self.query.weight"
    np.testing.assert_array_equal(exported["bert." + key], original[key])
    assert exported["classifier.weight"].shape == (1, 384)


def test_tiny_config_trains_exports_and_reranks(tmp_path):
    workdir = tmp_path / "run"
    # From a prepared dataset (`rdr-jax prepare-data ce-lists`; the raw file reads into the same batches:
    # test_cross_encoder_data.py). The same 4 lists every step (max_examples = batch size): the loss must go down.
    from rdr_jax.cli import main
    prepared = tmp_path / "lists.arrayrecord"
    assert main(["prepare-data", "ce-lists", "rdr_jax/data/embedded/train.biencoder.json", str(prepared),
                 "--list-size", "4", "--max-examples", "8", "--no-progress"]) == 0
    config = tiny_config(workdir, f"data.train_file={prepared}", "data.max_examples=4", "train.steps=12",
                         "optim.learning_rate=3e-3", "optim.warmup_steps=0", *NO_DROPOUT[:2])
    result = train(config, progress=False)
    assert result["step"] == 12
    metrics = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 13))
    losses = [m["loss"] for m in metrics]
    assert all(np.isfinite(losses)) and min(losses[-3:]) < losses[0] - 0.05, losses

    final = workdir / "final" / "cross_encoder"
    hf, info = transformers.DebertaV2ForSequenceClassification.from_pretrained(final, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()

    # `rdr-jax rerank` on DPR-style results with the exported directory (its own tokenizer).
    examples = harness.biencoder_examples(3)
    results = [{"question": e["question"], "answers": e["answers"],
                "ctxs": [dict(c, id=str(i), score=float(-i), has_answer=i == 0) for i, c in
                         enumerate(e["positive_ctxs"][:1] + e["hard_negative_ctxs"] + e["negative_ctxs"])]}
               for e in examples]
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["rerank", "--model", str(final), "--results", str(tmp_path / "results.json"),
                 "--out", str(tmp_path / "reranked.json"), "--max-length", "96", "--batch-size", "8"]) == 0
    reranked = json.loads((tmp_path / "reranked.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(final)
    for r in reranked:
        texts = [f"{c['title']} {c['text']}" for c in r["ctxs"]]
        enc = tokenizer([r["question"]] * len(texts), texts, truncation="only_second", max_length=96,
                        padding=True, return_tensors="pt")
        with torch.inference_mode():
            expected = hf(**enc).logits[:, 0].numpy()
        np.testing.assert_allclose([c["score"] for c in r["ctxs"]], expected, atol=1e-4)
        assert [c["score"] for c in r["ctxs"]] == sorted((c["score"] for c in r["ctxs"]), reverse=True)


SHARDED = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from rdr_jax.tasks import load_config
    import harness

    # Exactly zero gradient (Adam would turn rounding noise into full steps): the classifier bias shifts every
    # score of a list equally, and DistillRankNet only sees score differences.
    ZERO_GRADIENT = lambda k: k.endswith("classifier.bias.value")
    workdir = sys.argv[1]
    # One layer keeps the two compiles short; it holds every sharded piece (relative table, c2p/p2c, heads).
    config = load_config(harness.TINY_CONFIGS / "cross_encoder.yaml",
                         ["optim.adam_eps=1e-3", "train.batch_size=4", "model.init.num_hidden_layers=1"],
                         workdir=workdir)
    meshes = {"single": ((1, 1, 1), jax.devices()[:1]), "data4_tensor2": ((4, 1, 2), None)}
    print("RESULT " + json.dumps(harness.steps_on_meshes(config, meshes, 4, 3, ignore=ZERO_GRADIENT)))
""")


def test_deberta_sharded_data4_tensor2_matches_one_device(tmp_path):
    out = harness.run_on_simulated_devices(SHARDED, tmp_path / "run")
    single, sharded = out["single"], out["data4_tensor2"]
    assert all(np.isfinite(single["losses"])) and single["losses"][0] != single["losses"][-1]
    assert sharded["loss_rel_diff"] <= 1e-5, (sharded["losses"], single["losses"])
    assert sharded["param_rel_diff"] <= 1e-5, sharded["worst_param"]
    specs = sharded["specs"]
    query = next(k for k in specs if k.endswith("layers.0.attention.query_proj.kernel.value"))
    assert "tensor" in specs[query], specs[query]          # heads split over 'tensor'
    rel = next(k for k in specs if k.endswith("rel_embeddings.embedding.value"))
    assert "tensor" not in specs[rel]                        # relative-position table replicated

"""The training engine end to end on tiny models: resume exactness, gradient accumulation, config errors,
metrics and HF export."""

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

import harness
from rdr_jax.tasks import load_config
from rdr_jax.training.config import ConfigError
from rdr_jax.training.loop import prepare, train
from rdr_jax.training.partitioning import make_mesh, shard_batch


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("training")
    bert = harness.tiny_bert_dir(tmp / "bert")
    return {
        "tmp": tmp,
        "bert": bert,
        "bert_no_dropout": harness.with_dropout(bert, tmp / "bert_no_dropout", 0.0),
        "dpr": harness.write_biencoder_json(tmp / "dpr.json", 32),
        "rdr": harness.write_rdr_jsonl(tmp / "rdr.jsonl", 32, k=4),
    }


pytestmark = pytest.mark.usefixtures("compilation_cache")


def dpr_config(files, workdir, *extra):
    return load_config(harness.TINY_CONFIGS / "dpr.yaml",
                       harness.tiny_overrides("dpr", files["bert"], files["dpr"])
                       + ["train.checkpoint_every=2", "train.keep_checkpoints=5", "optim.decay_steps=6",
                          "train.batch_size=8", *extra],
                       workdir=str(workdir))


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_resumed_run_equals_uninterrupted_run(files):
    tmp = files["tmp"]
    full = tmp / "full"
    train(dpr_config(files, full, "train.steps=6", f"data.dev_file={files['dpr']}", "train.eval_every=3"),
          progress=False)
    resumed = tmp / "resumed"
    first = train(dpr_config(files, resumed, "train.steps=4"), progress=False)
    assert first["step"] == 4   # as if killed right after the step-4 checkpoint
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    second = train(dpr_config(files, resumed, "train.steps=6"), progress=False)
    assert second["step"] == 6

    for sub in ("question_encoder", "context_encoder"):
        a = load_file(full / "final" / sub / "model.safetensors")
        b = load_file(resumed / "final" / sub / "model.safetensors")
        assert a.keys() == b.keys() and len(a) > 10
        # the export carries the tokenizer it was trained with: inference commands load it as it is
        from rdr_jax.data.tokenization import load_tokenizer
        assert len(load_tokenizer(full / "final" / sub)) == 30522
        for k in a:
            assert np.array_equal(a[k], b[k]), f"{sub}/{k} differs after resuming"
        start = load_file(files["bert"] / "model.safetensors")
        moved = a[f"{'ctx' if sub == 'context_encoder' else 'question'}_encoder.bert_model.encoder.layer.0."
                  "attention.self.query.weight"]
        assert not np.array_equal(moved, start["encoder.layer.0.attention.self.query.weight"])  # it trained

    # metrics.jsonl: one record per logged step, with step, loss and the throughput fields.
    full_metrics = read_metrics(full)
    assert [m["step"] for m in full_metrics] == [1, 2, 3, 4, 5, 6]
    for m in full_metrics:
        assert np.isfinite(m["loss"]) and m["loss"] > 0
        for key in ("learning_rate", "grad_norm", "examples_per_sec", "tokens_per_sec", "accuracy"):
            assert key in m, key
    assert "dev_loss" in full_metrics[2] and "dev_accuracy" in full_metrics[5]
    resumed_metrics = read_metrics(resumed)
    assert [m["step"] for m in resumed_metrics] == [1, 2, 3, 4, 5, 6]
    assert [m["loss"] for m in resumed_metrics] == [m["loss"] for m in full_metrics]
    assert list((full / "tensorboard").iterdir())


def test_gradient_accumulation_equals_one_big_step(files):
    """4 micro-batches of 2 questions == one batch of 8 for RDR's per-question KL (no dropout)."""
    results = {}
    for accum in (1, 4):
        config = load_config(harness.TINY_CONFIGS / "rdr.yaml",
                             harness.tiny_overrides("rdr", files["bert_no_dropout"], files["rdr"])
                             + ["train.batch_size=8", f"train.grad_accum_steps={accum}", "optim.warmup_steps=0",
                                "optim.adam_eps=1e-3"],
                             workdir=str(files["tmp"] / f"accum{accum}"))
        trainer = prepare(config, mesh=make_mesh(1, 1, 1))
        batch = next(trainer.task.train_iterator(8, 0))
        assert batch["passage_mask"].sum() < batch["passage_mask"].size   # padding passages are in the batch
        state, metrics = trainer.train_step(trainer.setup.state, trainer.setup.frozen,
                                            shard_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
        flat = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                jax.tree_util.tree_flatten_with_path(state["params"])[0]}
        results[accum] = ({k: float(v) for k, v in metrics.items()}, flat)
    (m1, p1), (m4, p4) = results[1], results[4]
    # (top1_agreement is an argmax: near-tied scores of a random model may flip under rounding, so not here.)
    for key in ("loss", "kl", "grad_norm"):
        np.testing.assert_allclose(m4[key], m1[key], rtol=1e-5, err_msg=key)
    assert m1["loss"] > 0
    for k in p1:
        if k.endswith("['key']['bias'].value") or "key']['bias']" in k:
            continue  # exactly zero gradient (softmax ignores a per-query shift): Adam steps on rounding noise
        diff = np.max(np.abs(p4[k] - p1[k])) / max(np.max(np.abs(p1[k])), 0.02)
        assert diff <= 1e-5, (k, diff)


def test_split_microbatches_rebases_the_positive_index():
    from rdr_jax.tasks.rdr import RDRTask

    task = RDRTask.__new__(RDRTask)
    b, k, n = 6, 3, 3
    p = np.arange(b * k * 2).reshape(b * k, 2)
    positive = np.array([0, 4, -1, 9, 14, 17], np.int32)
    batch = {"q_input_ids": np.arange(b * 5).reshape(b, 5), "p_input_ids": p, "positive_index": positive,
             "passage_mask": np.ones((b, k))}
    micro = jax.tree.map(np.asarray, task.split_microbatches(batch, n))
    assert micro["q_input_ids"].shape == (n, b // n, 5) and micro["p_input_ids"].shape == (n, b // n * k, 2)
    for i in range(b):
        m, j = i % n, i // n          # question i is row j of micro-batch m
        np.testing.assert_array_equal(micro["q_input_ids"][m, j], batch["q_input_ids"][i])
        np.testing.assert_array_equal(micro["p_input_ids"][m, j * k:(j + 1) * k], p[i * k:(i + 1) * k])
        local = micro["positive_index"][m, j]
        if positive[i] < 0:
            assert local == -1
        else:
            np.testing.assert_array_equal(micro["p_input_ids"][m, local], p[positive[i]])


def test_config_errors_name_the_key(files, tmp_path, capsys):
    base = harness.tiny_overrides("dpr", files["bert"], files["dpr"])
    path = harness.TINY_CONFIGS / "dpr.yaml"
    cases = [("train.stepz=3", "train.stepz"), ("train.steps=abc", "train.steps"), ("train.steps=0", "train.steps"),
             ("optim.learning_rate=-1", "optim.learning_rate"), ("data.hard_negatives=-2", "data.hard_negatives"),
             ("task.temperature=2", "task.temperature"), ("mesh.tensor=0", "mesh.tensor"),
             ("train.grad_accum_steps=3", "train.grad_accum_steps")]
    for override, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(path, base + [override], workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="task.name"):
        load_config(path, base + ["task.name=nosuchtask"], workdir=str(tmp_path))
    # A mesh that does not fit the devices: the error says how many there are.
    config = load_config(path, base + ["mesh.data=3"], workdir=str(tmp_path / "mesh"))
    with pytest.raises(ValueError, match=f"{len(jax.devices())} devices"):
        train(config, progress=False)
    # The command line exits non-zero with the key in a one-line message.
    from rdr_jax.cli import main

    assert main(["train", str(path), "--workdir", str(tmp_path), "--set", "optim.warmup_stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.warmup_stepz" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("task", ["dpr", "rdr"])
def test_unpadded_step_equals_padded_step(files, task):
    """model.unpad: the encoders run on real tokens only; one step gives the padded step's numbers."""
    results = {}
    for unpad in (False, True):
        config = load_config(harness.TINY_CONFIGS / f"{task}.yaml",
                             harness.tiny_overrides(task, files["bert_no_dropout"], files[task])
                             + ["train.batch_size=8", "optim.warmup_steps=0", "optim.adam_eps=1e-3",
                                f"model.unpad={str(unpad).lower()}"],
                             workdir=str(files["tmp"] / f"unpad_{task}_{unpad}"))
        trainer = prepare(config, mesh=make_mesh(1, 1, 1))
        batch = next(trainer.task.train_iterator(8, 0))
        assert ("p_token_position" in batch) == unpad
        if unpad:  # the questions have padding to skip
            assert batch["q_token_position"].shape[0] < batch["q_attention_mask"].size
        state, metrics = trainer.train_step(trainer.setup.state, trainer.setup.frozen,
                                            shard_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
        results[unpad] = ({k: float(v) for k, v in metrics.items()},
                          [np.asarray(x) for x in jax.tree.leaves(state["params"])])
    (m0, p0), (m1, p1) = results[False], results[True]
    np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-5)
    # the norm sums every gradient, zeros of the padding's embedding rows' rounding noise included
    np.testing.assert_allclose(m1["grad_norm"], m0["grad_norm"], rtol=1e-4)
    # Adam divides by sqrt(v): rounding-level gradient differences move parameters by ~1e-5 relative;
    # a wrong gradient would move them by the step itself (lr 1e-3 ~ 2e-2 relative)
    for a, b in zip(p0, p1, strict=True):
        assert np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 0.02) <= 1e-4


def test_unpad_refuses_micro_batches_that_do_not_split_over_the_shards(files, tmp_path):
    """model.unpad packs each micro-batch per data-parallel shard (tests/test_packed_mesh.py): 4 questions per
    micro-batch cannot be split over 8 devices."""
    overrides = harness.tiny_overrides("dpr", files["bert"], files["dpr"]) + [
        "model.unpad=true", "train.batch_size=8", "train.grad_accum_steps=2"]
    load_config(harness.TINY_CONFIGS / "dpr.yaml", overrides, workdir=str(tmp_path))
    with pytest.raises(ConfigError, match="model.unpad.*mesh.data x mesh.fsdp = 8"):
        load_config(harness.TINY_CONFIGS / "dpr.yaml", overrides + ["mesh.data=8"], workdir=str(tmp_path))

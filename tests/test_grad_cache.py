"""GradCache (training/grad_cache.py): the cached step's loss and gradients equal the uncached step's on the same
global batch, on 1 device and on 8 simulated devices, DPR and RDR, fp32.

Two references per case:

- ``plain``: the engine's uncached gradient (``value_and_grad_fn`` without a chunk) of the same batch, on encoders
  without dropout (dropout draws different masks for a chunk than for the whole batch, so only a dropout-free
  model can equal the uncached step exactly);
- ``chunked``: with dropout on, plain autodiff of the same loss whose embeddings are computed per chunk with the
  chunks' dropout keys (:func:`chunked_reference`, every activation kept): GradCache must reproduce it exactly,
  which shows the re-run forward sees the first pass's dropout masks.
"""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import harness
from parity import assert_close


def chunked_reference(task, graphdef, chunk: int):
    """``value_and_grad`` of ``task.loss_from_embeddings`` over the chunks' embeddings (chunk ``i`` with dropout key
    ``fold_in(key, i)``, as GradCache draws them), by plain autodiff through every chunk."""
    from rdr_jax.training.grad_cache import merge_chunks

    def loss(params, frozen, batch, key):
        num_q = batch[task.question_field].shape[0]
        n = num_q // chunk
        chunks = task.split_microbatches(batch, n)
        model = nnx.merge(graphdef, params, frozen)
        embs, targets = [], []
        for i in range(n):
            mb = jax.tree.map(lambda x: x[i], chunks)
            embs.append(task.embed(model, mb, rngs=nnx.Rngs(dropout=jax.random.fold_in(key, i)), deterministic=False))
            targets.append(task.loss_targets(model, mb))
        stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
        out, metrics = task.loss_from_embeddings(model, batch, merge_chunks(stack(embs), num_q),
                                                 merge_chunks(stack(targets), num_q))
        return out.astype(jnp.float32), {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return jax.value_and_grad(loss, has_aux=True)


SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    from rdr_jax.tasks import load_config
    from rdr_jax.training.checkpoints import flatten_state
    from rdr_jax.training.loop import prepare
    from rdr_jax.training.partitioning import make_mesh, shard_batch
    from rdr_jax.training.step import value_and_grad_fn
    import harness
    from parity import assert_close
    from test_grad_cache import chunked_reference

    bert, plain_bert, dpr_data, rdr_data, workdir = sys.argv[1:]
    BATCH, CHUNK = 16, 8     # 2 chunks; a chunk is split over the 8 devices
    MESHES = {"1dev": ((1, 1, 1), jax.devices()[:1]), "8dev": ((4, 2, 1), None)}

    def prepared(task_name, model, mesh_name, extra=()):
        data = dpr_data if task_name == "dpr" else rdr_data
        config = load_config(harness.TINY_CONFIGS / f"{task_name}.yaml",
                             harness.tiny_overrides(task_name, model, data) + list(extra)
                             + [f"train.batch_size={BATCH}", "data.max_question_length=8", "data.max_passage_length=32"],
                             workdir=os.path.join(workdir, task_name, mesh_name))
        shape, devices = MESHES[mesh_name]
        trainer = prepare(config, mesh=make_mesh(*shape, devices=devices))
        batch = shard_batch(next(trainer.task.train_iterator(BATCH, 0)), trainer.mesh)
        args = (trainer.setup.state["params"], trainer.setup.frozen, batch, jax.random.PRNGKey(3))
        return trainer, args

    def run(trainer, args, fn):
        with trainer.mesh:
            (loss, metrics), grads = jax.device_get(jax.jit(fn)(*args))
        return {"loss": loss, **metrics, **flatten_state(grads)[0]}

    def compare(actual, expected, devices):
        errors = []
        for key in expected:
            try:
                assert_close(actual[key], expected[key], what=key)
            except AssertionError as err:
                errors.append(str(err))
        norm = sum(float((v.astype("float64") ** 2).sum()) for k, v in expected.items() if k.endswith(".value")) ** 0.5
        return {"loss": float(actual["loss"]), "grad_norm": norm, "errors": errors, "devices": devices,
                "params": sum(k.endswith(".value") for k in expected)}

    out = {}
    # DPR, dropout on: GradCache on 1 and on 8 devices against plain autodiff through the same chunks
    trainer, args = prepared("dpr", bert, "1dev")
    reference = run(trainer, args, chunked_reference(trainer.task, trainer.setup.graphdef, CHUNK))
    cached = value_and_grad_fn(trainer.task, trainer.setup, trainer.mesh, grad_cache_chunk=CHUNK)
    out["dpr/1dev/chunked"] = compare(run(trainer, args, cached), reference, 1)
    trainer, args = prepared("dpr", bert, "8dev")
    cached = value_and_grad_fn(trainer.task, trainer.setup, trainer.mesh, grad_cache_chunk=CHUNK)
    out["dpr/8dev/chunked"] = compare(run(trainer, args, cached), reference, 8)
    # RDR (both encoders train; KL + the NLL over all the global batch's passages), no dropout: GradCache against
    # the engine's uncached gradient, on 8 devices
    trainer, args = prepared("rdr", plain_bert, "8dev", ["task.nll_weight=0.5", "task.train_context_encoder=true"])
    plain = run(trainer, args, value_and_grad_fn(trainer.task, trainer.setup, trainer.mesh))
    cached = value_and_grad_fn(trainer.task, trainer.setup, trainer.mesh, grad_cache_chunk=CHUNK)
    out["rdr/8dev/plain"] = compare(run(trainer, args, cached), plain, 8)
    print("RESULT " + json.dumps(out))
""")

CASES = ["dpr/1dev/chunked", "dpr/8dev/chunked", "rdr/8dev/plain"]


def one_layer_bert(out_dir, dropout: float):
    """A random 1-layer tiny BERT: the compiled programs (5 here) are what this test's time goes to."""
    from rdr_jax.models.bert import BertModel
    from rdr_jax.tasks.model_setup import save_random_model

    return save_random_model(BertModel, dict(harness.TINY_BERT, num_hidden_layers=1, hidden_dropout_prob=dropout,
                                             attention_probs_dropout_prob=dropout), out_dir, 0)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grad_cache")
    bert = one_layer_bert(tmp / "bert", 0.1)
    plain_bert = harness.with_dropout(bert, tmp / "bert_no_dropout", 0.0)
    dpr_data = harness.write_biencoder_json(tmp / "dpr.json", 16)
    rdr_data = harness.write_rdr_jsonl(tmp / "rdr.jsonl", 16, k=4)
    return harness.run_on_simulated_devices(SCRIPT, bert, plain_bert, dpr_data, rdr_data, tmp / "runs", timeout=1500)


@pytest.mark.parametrize("case", CASES)
def test_cached_step_equals_uncached(results, case):
    r = results[case]
    assert r["devices"] == (8 if "/8dev/" in case else 1)
    assert r["loss"] > 0 and r["grad_norm"] > 0 and r["params"] > 10, r
    assert not r["errors"], "\n".join(r["errors"][:5])


def test_chunks_are_the_interleaved_split():
    """merge_chunks undoes Task.split_microbatches (question i in chunk i % n), split_chunks redoes it."""
    from rdr_jax.training.grad_cache import merge_chunks, split_chunks
    from rdr_jax.training.task import Task

    rng = np.random.default_rng(0)
    batch = {"q_input_ids": jnp.asarray(rng.integers(0, 9, (12, 5))), "p_emb": jnp.asarray(rng.normal(size=(36, 4)))}
    chunks = Task.split_microbatches(Task.__new__(Task), batch, 4)
    assert chunks["p_emb"].shape == (4, 9, 4)
    np.testing.assert_array_equal(chunks["p_emb"][1, 3:6], batch["p_emb"][4 * 3 + 3 * 1: 4 * 3 + 3 * 1 + 3])
    for key, value in batch.items():
        np.testing.assert_array_equal(merge_chunks(chunks[key], 12), value)
        np.testing.assert_array_equal(split_chunks(value, 12, 4), chunks[key])


def test_grad_cache_config_checks(tmp_path):
    from rdr_jax.errors import ConfigError
    from rdr_jax.tasks import load_config

    def build(task, *overrides):
        return load_config(harness.TINY_CONFIGS / f"{task}.yaml", list(overrides), workdir=str(tmp_path))

    assert build("dpr", "train.grad_cache_chunk=4").train.grad_cache_chunk == 4
    assert build("rdr", "train.grad_cache_chunk=2").train.grad_cache_chunk == 2
    assert build("dpr").train.grad_cache_chunk is None
    refused = {("dpr", "train.grad_cache_chunk=3"): "must be divisible by 'train.grad_cache_chunk' (3)",
               ("dpr", "train.grad_cache_chunk=4", "train.grad_accum_steps=2"): "set grad_accum_steps to 1",
               ("rdr", "train.grad_cache_chunk=4", "model.unpad=true"): "'model.unpad' with 'train.grad_cache_chunk' is not supported",
               ("reader", "train.grad_cache_chunk=4"): "task 'reader' has none"}
    for (task, *overrides), message in refused.items():
        with pytest.raises(ConfigError) as err:
            build(task, *overrides)
        assert message in str(err.value) and "\n" not in str(err.value), str(err.value)

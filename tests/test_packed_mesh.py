"""Unpadded (packed) DPR training on a mesh: packing per data-parallel shard and micro-batch gives the padded
1-device step's losses.

Runs in a subprocess with 8 simulated CPU devices (the XLA flag must be set before jax is imported). The
tiny BERT has no dropout (packed and padded activations draw different dropout masks), fp32. Each run takes
one step on the same global batch (one compile per run: the suite's time) and reports its loss and gradient
norm; a run with ``train.grad_accum_steps=2`` is compared with the padded run
with the same accumulation (DPR's in-batch negatives are per micro-batch). Packing, unpacking and their
gradients on a batch split over 8 devices compile to no collective at all: the packed rows never leave the
devices that hold their batch rows.
"""

import textwrap

import pytest

import harness
from parity import assert_close

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    from rdr_jax.tasks import load_config
    from rdr_jax.training.loop import prepare
    from rdr_jax.training.partitioning import make_mesh, shard_batch
    import harness

    bert, data, workdir = sys.argv[1:]
    assert len(jax.devices()) == 8, jax.devices()
    out = {"collectives": harness.packing_collectives(make_mesh(8, 1, 1))}
    # name: (unpad, grad_accum_steps, mesh data x fsdp x tensor, devices)
    runs = {"padded_1dev": (False, 1, (1, 1, 1), jax.devices()[:1]),
            "padded_1dev_accum2": (False, 2, (1, 1, 1), jax.devices()[:1]),
            "packed_data8": (True, 1, (8, 1, 1), None),
            "packed_data2_fsdp2_tensor2_accum2": (True, 2, (2, 2, 2), None)}
    for name, (unpad, accum, shape, devices) in runs.items():
        mesh = dict(zip(("data", "fsdp", "tensor"), shape))
        config = load_config(harness.TINY_CONFIGS / "dpr.yaml", harness.tiny_overrides("dpr", bert, data) + [
            "train.batch_size=8", "optim.warmup_steps=0", "optim.adam_eps=1e-3", f"train.grad_accum_steps={accum}",
            f"model.unpad={str(unpad).lower()}"] + [f"mesh.{k}={v}" for k, v in mesh.items()],
            workdir=os.path.join(workdir, name))
        trainer = prepare(config, mesh=make_mesh(*shape, devices=devices))
        batch = next(trainer.task.train_iterator(8, 0))
        assert ("p_token_position" in batch) == unpad
        args = (trainer.setup.state, trainer.setup.frozen, shard_batch(batch, trainer.mesh), jax.random.PRNGKey(0))
        step = trainer.train_step.lower(*args).compile()
        _, metrics = step(*args)
        out[name] = {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                     "packed_rows": {p: list(batch[f"{p}token_position"].shape) for p in ("q_", "p_")} if unpad else None}
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packed_mesh")
    bert = harness.tiny_bert_dir(tmp / "bert", dropout=0.0)
    data = harness.write_biencoder_json(tmp / "dpr.json", 16)
    return harness.run_on_simulated_devices(SCRIPT, bert, data, tmp / "runs", timeout=900)


@pytest.mark.parametrize("run, reference", [("packed_data8", "padded_1dev"),
                                            ("packed_data2_fsdp2_tensor2_accum2", "padded_1dev_accum2")])
def test_packed_training_on_a_mesh_matches_padded_one_device(mesh_runs, run, reference):
    ref, got = mesh_runs[reference], mesh_runs[run]
    print(f"{run}: loss {got['loss']!r} grad_norm {got['grad_norm']!r}; {reference}: loss {ref['loss']!r} "
          f"grad_norm {ref['grad_norm']!r}; packed rows {got['packed_rows']}")
    assert_close(got["loss"], ref["loss"], atol=1e-5, rtol=1e-5, what=f"{run} loss")
    # the norm sums every gradient entry in another order over the devices
    assert_close(got["grad_norm"], ref["grad_norm"], atol=1e-5, rtol=1e-4, what=f"{run} grad norm")
    # fewer packed rows than padded positions: the real text only (rows x packed rows per row)
    rows = got["packed_rows"]["q_"]
    assert rows[1] < 24   # data.max_question_length of the tiny config


def test_packed_rows_stay_on_their_devices(mesh_runs):
    assert mesh_runs["collectives"] and not any(mesh_runs["collectives"].values()), mesh_runs["collectives"]

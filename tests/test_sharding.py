"""Sharded steps on 8 simulated CPU devices give the numbers of 1 device.

Runs in a subprocess: ``--xla_force_host_platform_device_count`` must be set before jax is imported. DPR and
RDR train 3 steps on the same batches with meshes single (1 device), data=4 x tensor=2 and fsdp=8; losses
and parameters must agree to a relative 1e-5, and the parameters must really be split over the devices.

Adam's first steps are ~sign(gradient): an element whose gradient is near zero can flip on rounding alone.
So the runs use ``adam_eps=1e-3`` (updates continuous in the gradient), parameters are compared relative to
max(|tensor|, 0.02 = the init scale), and the few parameters with an exactly zero gradient are left out.
"""

import textwrap

import pytest

import harness

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import jax
    from rdr_jax.tasks import load_config
    import harness

    # Parameters whose gradient is exactly zero in exact arithmetic, where Adam turns rounding noise into
    # full-size steps (on 1 device as on 8): attention key biases (softmax ignores a per-query shift) and
    # the context encoder's last LayerNorm bias (it shifts every passage score of a question equally).
    ZERO_GRADIENT = lambda k: k.endswith("key.bias.value") or (
        k.startswith("context_encoder.") and k.endswith("layers.1.output_norm.bias.value"))
    bert, dpr_data, rdr_data, workdir = sys.argv[1:]
    assert len(jax.devices()) == 8, jax.devices()
    meshes = {"single": ((1, 1, 1), jax.devices()[:1]), "data4_tensor2": ((4, 1, 2), None),
              "fsdp8": ((1, 8, 1), None)}
    out = {}
    for task, data in (("dpr", dpr_data), ("rdr", rdr_data)):
        extra = ["task.nll_weight=0.5"] if task == "rdr" else []
        config = load_config(harness.TINY_CONFIGS / f"{task}.yaml",
                             harness.tiny_overrides(task, bert, data) + extra + ["train.batch_size=8", "optim.adam_eps=1e-3"],
                             workdir=os.path.join(workdir, task))
        for name, result in harness.steps_on_meshes(config, meshes, 8, 3, ignore=ZERO_GRADIENT).items():
            out[f"{task}/{name}"] = result
    print("RESULT " + json.dumps(out))
""")


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    bert = harness.tiny_bert_dir(tmp / "bert")
    dpr_data = harness.write_biencoder_json(tmp / "dpr.json", 24)
    rdr_data = harness.write_rdr_jsonl(tmp / "rdr.jsonl", 24, k=4)
    return harness.run_on_simulated_devices(SCRIPT, bert, dpr_data, rdr_data, tmp / "runs")


@pytest.mark.parametrize("task", ["dpr", "rdr"])
@pytest.mark.parametrize("mesh", ["data4_tensor2", "fsdp8"])
def test_sharded_steps_match_single_device(sharded_results, task, mesh):
    single = sharded_results[f"{task}/single"]
    result = sharded_results[f"{task}/{mesh}"]
    assert all(loss == loss and loss > 0 for loss in single["losses"]), single["losses"]
    assert single["losses"][0] != single["losses"][-1]   # it trained
    assert result["loss_rel_diff"] <= 1e-5, (result["losses"], single["losses"])
    assert result["param_rel_diff"] <= 1e-5, result["worst_param"]


def test_parameters_are_really_sharded(sharded_results):
    for task in ("dpr", "rdr"):
        single = sharded_results[f"{task}/single"]
        assert single["max_shards"] == 1
        tensor = sharded_results[f"{task}/data4_tensor2"]["specs"]
        fsdp = sharded_results[f"{task}/fsdp8"]["specs"]
        query = next(k for k in tensor if k.endswith("layers.0.query.kernel.value"))
        # [embed, heads, kv]: heads over 'tensor' on data x tensor, embed over 'fsdp' on fsdp=8.
        assert "tensor" in tensor[query] and "fsdp" not in tensor[query], tensor[query]
        assert "fsdp" in fsdp[query], fsdp[query]
        intermediate = next(k for k in tensor if k.endswith("layers.0.intermediate.kernel.value"))
        assert "tensor" in tensor[intermediate]
        word = next(k for k in fsdp if k.endswith("word_embeddings.embedding.value"))
        assert "fsdp" in fsdp[word] and "tensor" in tensor[word]
        norm = next(k for k in fsdp if k.endswith("attention_norm.scale.value"))
        assert "fsdp" not in fsdp[norm] and "tensor" not in tensor[norm]   # norms stay replicated
        assert sharded_results[f"{task}/fsdp8"]["max_shards"] == 8
        assert sharded_results[f"{task}/data4_tensor2"]["max_shards"] == 2

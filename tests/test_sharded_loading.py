"""``from_pretrained(..., mesh=...)`` reads each device's slice of each parameter straight from the checkpoint.

On 8 simulated CPU devices (a subprocess: the XLA flag must be set before jax is imported), tiny BERT and T5
checkpoints written by transformers load with fsdp=8: every sharded parameter has 8 shards of 1/8 each on 8
distinct devices (never the whole parameter on device 0), and every parameter equals the unsharded load
exactly (with scanned layers too), and on a data x fsdp x tensor mesh (heads/mlp split: slices of transposed and
reshaped kernels) and with rules that split the ``kv`` axis (regions that are no box of the source: gathered);
a fresh classifier head and an orbax (native) directory land in the same shardings.

Host memory: a ~85 MB checkpoint (written in 3 safetensors shards with an index) loaded with fsdp=8 must
not need the checkpoint in host memory on top of the parameters: the process's peak RSS (VmHWM) beyond its
resident size after the load stays under a quarter of the checkpoint (the old whole-file read needed all of
it: its transient was the checkpoint itself).
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import harness

COMPARE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from rdr_jax.models import from_pretrained
    from rdr_jax.models.base import flat_params
    from rdr_jax.models.sharding import LOGICAL_AXIS_RULES
    from rdr_jax.training.partitioning import make_mesh

    assert len(jax.devices()) == 8
    fsdp8, mixed = make_mesh(1, 8, 1), make_mesh(2, 2, 2)
    kv_rules = dict(LOGICAL_AXIS_RULES, kv="tensor")   # regions that are not one box of the source tensor
    out = {}
    for name, path in zip(("bert", "t5"), sys.argv[1:3]):
        for scan in (False, True):
            ref = {k: np.asarray(v.get_value()) for k, v in flat_params(from_pretrained(path, scan_layers=scan)).items()}
            cases = {"fsdp8": dict(mesh=fsdp8)}
            if not scan:  # (stacked layers read per layer with the same regions: fsdp=8 covers them)
                cases.update(mixed=dict(mesh=mixed), kv_split=dict(mesh=mixed, rules=kv_rules))
            for case, kw in cases.items():
                model = from_pretrained(path, scan_layers=scan, **kw)
                r = out[f"{name}/scan={scan}/{case}"] = dict(params=0, sharded=0, bad_shards=[], unequal=[],
                                                           whole_on_device0=[])
                for k, v in flat_params(model).items():
                    arr = v.get_value()
                    r["params"] += 1
                    if not np.array_equal(np.asarray(arr), ref[k]) or arr.dtype != ref[k].dtype:
                        r["unequal"].append(k)
                    if all(s is None for s in arr.sharding.spec):
                        continue
                    r["sharded"] += 1
                    shards = arr.addressable_shards
                    expected = arr.sharding.shard_shape(arr.shape)
                    n = int(np.prod(arr.shape)) // int(np.prod(expected))
                    if case == "fsdp8" and (n != 8 or len({s.device for s in shards}) != 8
                                            or any(s.data.shape != expected for s in shards)):
                        r["bad_shards"].append([k, arr.shape, [s.data.shape for s in shards]])
                    if any(s.device == jax.devices()[0] and s.data.shape == arr.shape for s in shards):
                        r["whole_on_device0"].append(k)
        bf16 = from_pretrained(path, mesh=fsdp8, param_dtype=jnp.bfloat16)
        ref = from_pretrained(path, param_dtype=jnp.bfloat16)
        a, b = flat_params(bf16), flat_params(ref)
        out[f"{name}/bf16_unequal"] = [k for k in a if a[k].get_value().dtype != jnp.bfloat16
                                       or not np.array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))]
    # a classifier from a plain BERT checkpoint: its head is initialised freshly, then split like the rest
    from rdr_jax.models import BertForSequenceClassification
    a = flat_params(BertForSequenceClassification.from_pretrained(sys.argv[1], mesh=fsdp8, seed=3))
    b = flat_params(BertForSequenceClassification.from_pretrained(sys.argv[1], seed=3))
    out["fresh_head_unequal"] = [k for k in a if not np.array_equal(np.asarray(a[k].get_value()),
                                                                    np.asarray(b[k].get_value()))]
    out["fresh_head_sharding"] = str(a["classifier.kernel"].get_value().sharding.spec)
    # a native (orbax) directory restores straight into the same shardings
    native = from_pretrained(sys.argv[1]).save_pretrained(sys.argv[3], format="orbax")
    a, b = flat_params(from_pretrained(native, mesh=fsdp8)), flat_params(from_pretrained(sys.argv[1], mesh=fsdp8))
    out["orbax_unequal"] = [k for k in a if a[k].get_value().sharding != b[k].get_value().sharding
                            or not np.array_equal(np.asarray(a[k].get_value()), np.asarray(b[k].get_value()))]
    print("RESULT " + json.dumps(out))
""")

MEMORY = textwrap.dedent("""
    import json, sys
    import jax
    from flax import nnx
    from rdr_jax.models.base import flat_params
    from rdr_jax.models.bert import BertModel
    from rdr_jax.training.partitioning import make_mesh

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    mesh = make_mesh(1, 8, 1)
    BertModel.from_pretrained(sys.argv[2], mesh=mesh)   # compile/trace caches warm, as a long run has them
    model = BertModel.from_pretrained(sys.argv[1], mesh=mesh)
    arrays = [v.get_value() for v in flat_params(model).values()]
    jax.block_until_ready(arrays)
    on_devices = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
    print("RESULT " + json.dumps(dict(peak=rss("VmHWM:"), now=rss("VmRSS:"), on_devices=on_devices)))
""")


def _hf_bert(path, **config):
    import torch
    import transformers

    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**config)).save_pretrained(path)
    return path


def _hf_t5(path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=16, feed_forward_proj="gated-gelu",
                                   tie_word_embeddings=False, decoder_start_token_id=0)
    hf = transformers.T5ForConditionalGeneration(config)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn_like(hf.shared.weight) * 0.05)  # untied, as v1.1
    hf.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_loading")
    bert = _hf_bert(tmp / "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                    max_position_embeddings=64, vocab_size=200)
    return harness.run_on_simulated_devices(COMPARE, bert, _hf_t5(tmp / "t5"), tmp / "bert_orbax")


CASES = [f"{m}/scan={s}/{c}" for m in ("bert", "t5") for s in (False, True) for c in ("fsdp8", "mixed", "kv_split")
         if c == "fsdp8" or not s]


@pytest.mark.parametrize("case", CASES)
def test_sharded_load_equals_unsharded_and_is_split(compared, case):
    r = compared[case]
    assert r["unequal"] == [], f"{case}: parameters differ from the unsharded load: {r['unequal'][:5]}"
    assert r["bad_shards"] == [], f"{case}: not 1/8 per device: {r['bad_shards'][:3]}"
    assert r["whole_on_device0"] == [], f"{case}: whole sharded parameters on device 0: {r['whole_on_device0'][:5]}"
    # fsdp=8 splits every parameter with an embed axis: most of them (not the 1-D norms' and biases' of mlp)
    assert r["sharded"] >= r["params"] // 3, r


@pytest.mark.parametrize("model", ["bert", "t5"])
def test_sharded_bf16_load_equals_unsharded(compared, model):
    assert compared[f"{model}/bf16_unequal"] == []


def test_fresh_head_on_a_mesh_equals_the_unsharded_one(compared):
    assert compared["fresh_head_unequal"] == []
    assert "fsdp" in compared["fresh_head_sharding"]   # [embed, classes]: split over fsdp like the body


def test_orbax_directory_restores_into_the_shardings(compared):
    assert compared["orbax_unequal"] == []


def _write_random_bert(path, **config) -> int:
    """A random BertModel checkpoint written straight from numpy (in 3 shards), without building any model."""
    from flax import nnx

    from rdr_jax.convert import mapping
    from rdr_jax.convert.hf_io import write_safetensors
    from rdr_jax.models.base import flat_params
    from rdr_jax.models.bert import BertConfig, BertModel

    cfg = BertConfig.from_dict(config)
    model = nnx.eval_shape(lambda: BertModel(cfg, rngs=None))
    shapes = {k: v.get_value().shape for k, v in flat_params(model).items()}
    rng = np.random.default_rng(0)
    state = {r.hf: rng.standard_normal(mapping.jax_to_hf(r, np.empty(shapes[r.jax], np.uint8)).shape,
                                       dtype=np.float32) * 0.02 for r in BertModel.hf_rules(cfg)}
    size = sum(a.nbytes for a in state.values())
    write_safetensors(state, path, max_shard_bytes=size // 3 + 1)
    (path / "config.json").write_text(json.dumps(dict(config, model_type="bert", architectures=["BertModel"])))
    return size


def test_sharded_load_holds_no_whole_checkpoint_on_the_host(tmp_path):
    # many tensors, none large (the largest is 1/36 of the checkpoint): at most one tensor's file pages are
    # mapped at a time, so what the load holds beyond the parameters is bounded by the largest tensor
    config = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
                  max_position_embeddings=128, vocab_size=512)
    size = _write_random_bert(tmp_path / "big", **config)
    _write_random_bert(tmp_path / "small", **dict(config, vocab_size=64, num_hidden_layers=1))
    assert (tmp_path / "big" / "model.safetensors.index.json").is_file()
    r = harness.run_on_simulated_devices(MEMORY, tmp_path / "big", tmp_path / "small")
    # The parameters themselves live in host memory here (CPU devices); all of them once, sharded.
    assert r["on_devices"] < 1.1 * size, r
    transient = r["peak"] - r["now"]
    assert transient < 0.25 * size, (f"loading needed {transient / 2**20:.0f} MB beyond the loaded model for a "
                                     f"{size / 2**20:.0f} MB checkpoint: {r}")


@pytest.mark.parametrize("kind, n_in, source_shape, target_shape", [
    ("linear", 1, (12, 8), (8, 3, 4)),     # q/k/v: [out, in] -> [embed, heads, kv]
    ("linear", 2, (8, 12), (3, 4, 8)),     # attention output: [out, in] -> [heads, kv, embed]
    ("linear", 1, (6, 10), (10, 6)),       # a plain dense layer
    ("reshape", 1, (12,), (3, 4)),         # a q/k/v bias
    ("reshape", 1, (3, 4), (12,)),         # several source axes onto one
    ("copy", 1, (10, 6), (10, 6)),
])
def test_any_region_reads_as_the_whole_conversion_sliced(kind, n_in, source_shape, target_shape):
    """Every box of a converted parameter (what a device may ask for, under any rules) read from its source
    tensor alone equals converting the whole tensor and slicing: contiguous reads and gathers alike."""
    from rdr_jax.convert.mapping import Rule
    from rdr_jax.convert.slices import ArrayTensor, tensor_region

    rng = np.random.default_rng(0)
    source = rng.standard_normal(source_shape).astype(np.float32)
    whole = (source.T if kind == "linear" else source).reshape(target_shape)
    rule = Rule("w", "p", kind, n_in)
    for _ in range(40):
        index = []
        for n in target_shape:
            start = int(rng.integers(0, n))
            index.append(slice(start, int(rng.integers(start + 1, n + 1))))
        got = tensor_region(rule, ArrayTensor(source), target_shape, tuple(index), {})
        np.testing.assert_array_equal(got, whole[tuple(index)])

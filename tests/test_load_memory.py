"""Loading a whole (unsharded) checkpoint copies each tensor once, into the buffer the device keeps.

``read_parameter`` (``pread`` into an aligned buffer that jax's CPU ``device_put`` adopts, a block at a time
where a tensor is cast or a stacked kernel transposed) equals the region path that sharded loading uses, for
every kind of rule, source and dtype, with blocks small enough that every tensor spans several. And in a fresh
process, loading a ~27 MB checkpoint raises the peak RSS (VmHWM, reset after a warm-up load) by less than the
parameters' bytes plus one tensor per loading thread and a little slack: no second copy of the model, and no
whole file mapped on top of it.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest

import harness


def _rules_and_sources(tmp_path, in_memory: bool):
    """A few tensors of every kind the name maps use, as safetensors (or numpy) sources, with their rules."""
    from rdr_jax.convert.hf_io import write_safetensors
    from rdr_jax.convert.mapping import Rule
    from rdr_jax.convert.slices import ArrayTensor, open_checkpoint

    rng = np.random.default_rng(0)
    state = {"q.weight": (200, 24), "o.weight": (24, 200), "ffn.weight": (130, 24), "q.bias": (24,),
             "ln.weight": (24,), "emb.weight": (333, 24), "scalar": ()}
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in state.items()}
    for i in range(3):  # one kernel and bias per layer of a stacked (scan_layers) parameter
        state[f"l.{i}.weight"] = rng.standard_normal((40, 24)).astype(np.float32)
        state[f"l.{i}.bias"] = rng.standard_normal((40,)).astype(np.float32)
    write_safetensors(state, tmp_path)
    sources = {k: ArrayTensor(v) for k, v in state.items()} if in_memory else open_checkpoint(tmp_path)
    plan = {  # parameter: (its rules, its shape)
        "q": ([Rule("q.weight", "q", "linear", 1)], (24, 8, 25)),         # [embed, heads, kv]
        "o": ([Rule("o.weight", "o", "linear", 2)], (8, 25, 24)),         # [heads, kv, embed]
        "ffn": ([Rule("ffn.weight", "ffn", "linear")], (24, 130)),
        "q_bias": ([Rule("q.bias", "q_bias", "reshape")], (6, 4)),
        "ln": ([Rule("ln.weight", "ln")], (24,)),
        "emb": ([Rule("emb.weight", "emb")], (333, 24)),
        "scalar": ([Rule("scalar", "scalar")], ()),
        "stacked": ([Rule(f"l.{i}.weight", "stacked", "linear", layer=i) for i in range(3)], (3, 24, 40)),
        "stacked_bias": ([Rule(f"l.{i}.bias", "stacked_bias", "reshape", layer=i) for i in range(3)], (3, 5, 8)),
    }
    return sources, plan


@pytest.mark.parametrize("in_memory", [False, True], ids=["safetensors", "numpy"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_whole_read_equals_the_region_path(tmp_path, monkeypatch, in_memory, dtype):
    import ml_dtypes

    from rdr_jax.convert import slices

    monkeypatch.setattr(slices, "READ_BLOCK_BYTES", 1000)  # 10 rows of 24 floats: several blocks per tensor
    dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    sources, plan = _rules_and_sources(tmp_path, in_memory)
    for name, (rules, shape) in plan.items():
        got = slices.read_parameter(rules, sources, shape, dtype)
        expected = slices.parameter_region(rules, sources, shape, None, {}).astype(dtype)
        assert got.dtype == dtype and got.shape == expected.shape, name
        np.testing.assert_array_equal(got.reshape(-1).view(np.uint8), expected.reshape(-1).view(np.uint8),
                                      err_msg=name)
        assert got.ctypes.data % 64 == 0, name


def test_whole_read_reports_a_truncated_file(tmp_path):
    from rdr_jax.convert.hf_io import CheckpointError
    from rdr_jax.convert.mapping import Rule
    from rdr_jax.convert.slices import SafetensorsTensor, read_parameter

    path = tmp_path / "t.safetensors"
    path.write_bytes(b"\0" * 100)
    source = SafetensorsTensor(path, "w", (10, 4), np.dtype(np.float32), 8)  # 160 bytes of a 100-byte file
    with pytest.raises(CheckpointError, match="t.safetensors: ends inside a tensor"):
        read_parameter([Rule("w", "w")], {"w": source}, (10, 4), np.float32)


MEMORY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import jax
    from rdr_jax.models.base import LOAD_THREADS, flat_params
    from rdr_jax.models.bert import BertModel

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    jax.block_until_ready([v.get_value() for v in flat_params(BertModel.from_pretrained(sys.argv[2])).values()])
    Path("/proc/self/clear_refs").write_text("5")   # VmHWM := VmRSS: the peak of the load alone from here
    before = status("VmRSS:")
    model = BertModel.from_pretrained(sys.argv[1])
    arrays = [v.get_value() for v in flat_params(model).values()]
    jax.block_until_ready(arrays)
    print("RESULT " + json.dumps(dict(before=before, peak=status("VmHWM:"), now=status("VmRSS:"),
                                      params=sum(a.nbytes for a in arrays), threads=LOAD_THREADS,
                                      device=str(arrays[0].device.platform))))
""")


def test_whole_load_peak_rss_is_the_model_plus_a_tensor_per_thread(tmp_path):
    from test_sharded_loading import _write_random_bert

    config = dict(hidden_size=256, num_hidden_layers=8, num_attention_heads=4, intermediate_size=1024,
                  max_position_embeddings=128, vocab_size=2048)
    size = _write_random_bert(tmp_path / "big", **config)
    _write_random_bert(tmp_path / "small", **dict(config, vocab_size=64, num_hidden_layers=1))
    r = harness.run_on_simulated_devices(MEMORY, tmp_path / "big", tmp_path / "small", devices=1)
    assert r["device"] == "cpu" and r["params"] == size, r
    largest = 2048 * 256 * 4   # the word embeddings
    grown, peak = r["now"] - r["before"], r["peak"] - r["before"]
    # (what it keeps: the parameters, on CPU devices in host memory; proves the measurement sees them)
    assert 0.9 * size < grown < size + 8 * 2**20, r
    bound = size + r["threads"] * largest + 8 * 2**20
    assert peak < bound, (f"loading a {size / 2**20:.1f} MB checkpoint raised the peak RSS by "
                          f"{peak / 2**20:.1f} MB (bound {bound / 2**20:.1f} MB): {json.dumps(r)}")

"""Layers stored stacked and run by one scan (``scan_layers``, rdr_jax.models.stacking), and remat policies:
the same parameters, numbers and gradients as the unrolled stack, with dropout on; the same HF files."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file

import rdr_jax
from rdr_jax.models import BertForSequenceClassification, BertModel, DPRContextEncoder, DPRReader
from rdr_jax.models.base import flat_params
from rdr_jax.models.deberta_v2 import DebertaV2ForSequenceClassification
from rdr_jax.models.seq2seq import sequence_log_probs
from rdr_jax.models.config import REMAT_POLICIES, ComputeSettings
from rdr_jax.models.packing import TokenPacking
from rdr_jax.models.stacking import layer_keys
from hf_reference import padded_batch
from parity import assert_close

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2)
LAYER = re.compile(r"\.layers\.(\d+)\.")


def stacked_view(flat: dict) -> dict:
    """An unrolled model's {path: array} with each stack's per-layer arrays stacked under the scanned path."""
    out, layers = {}, {}
    for k, v in flat.items():
        v = np.asarray(v.get_value() if hasattr(v, "get_value") else v)
        m = LAYER.search(k)
        if m is None:
            out[k] = v
        else:
            layers.setdefault(k[:m.start()] + ".layers." + k[m.end():], {})[int(m.group(1))] = v
    for k, by_layer in layers.items():
        out[k] = np.stack([by_layer[i] for i in range(len(by_layer))])
    return out


def plain(flat: dict) -> dict:
    return {k: np.asarray(v.get_value() if hasattr(v, "get_value") else v) for k, v in flat.items()}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scan")
    torch.manual_seed(0)
    transformers.DPRContextEncoder(transformers.DPRConfig(**TINY)).eval().save_pretrained(root / "ctx")
    transformers.DPRReader(transformers.DPRConfig(**TINY)).eval().save_pretrained(root / "reader")
    transformers.BertForSequenceClassification(transformers.BertConfig(**TINY, num_labels=1)).eval() \
        .save_pretrained(root / "cross")
    return root


def test_compute_settings_remat_policy():
    assert ComputeSettings().remat_policy == "everything" and not ComputeSettings().remat
    assert ComputeSettings(remat=True).remat_policy == "nothing_saveable"
    rt = ComputeSettings(remat_policy="dots_saveable")
    assert rt.remat and rt.remat_policy == "dots_saveable"
    assert not ComputeSettings(remat_policy="everything").remat
    assert set(REMAT_POLICIES) == {"everything", "nothing_saveable", "dots_saveable",
                                   "dots_with_no_batch_dims_saveable"}
    with pytest.raises(ValueError, match="remat_policy must be one of"):
        ComputeSettings(remat_policy="save_all")
    with pytest.raises(ValueError, match="remat=True with remat_policy='everything'"):
        ComputeSettings(remat=True, remat_policy="everything")


def test_model_section_options_reach_from_pretrained():
    from rdr_jax.tasks.model_setup import ModelSpec, model_runtime_kwargs

    assert "scan_layers" not in model_runtime_kwargs(ModelSpec())  # the default: unrolled, no remat
    kw = model_runtime_kwargs(ModelSpec(scan_layers=True, remat_policy="dots_saveable"))
    assert kw["scan_layers"] is True and kw["remat_policy"] == "dots_saveable"
    rt = BertModel.from_config(TINY, **kw).compute
    assert rt.scan_layers and rt.remat and rt.remat_policy == "dots_saveable"


def test_random_init_is_the_unrolled_init_stacked():
    unrolled = BertModel.from_config(TINY, seed=3)
    scanned = BertModel.from_config(TINY, seed=3, scan_layers=True)
    a, b = stacked_view(flat_params(unrolled)), plain(flat_params(scanned))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    kernel = flat_params(scanned)["bert.layers.query.kernel"]
    assert kernel.shape == (3, 32, 4, 8)
    assert kernel.get_metadata()["out_sharding"] == ("layers", "embed", "heads", "kv")
    assert flat_params(scanned)["bert.layers.output_norm.scale"].get_metadata()["out_sharding"] == ("layers", "norm")
    assert flat_params(scanned)["bert.embeddings.word_embeddings.embedding"].get_metadata()["out_sharding"] == \
        ("vocab", "embed")


@pytest.mark.parametrize("name,cls", [("ctx", DPRContextEncoder), ("reader", DPRReader),
                                      ("cross", BertForSequenceClassification)])
def test_hf_loads_into_the_stacked_layers_and_saves_the_same_files(hf_dirs, tmp_path, name, cls):
    unrolled = cls.from_pretrained(hf_dirs / name)
    scanned = cls.from_pretrained(hf_dirs / name, scan_layers=True)
    a, b = stacked_view(flat_params(unrolled)), plain(flat_params(scanned))
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    scanned.save_pretrained(tmp_path / "scanned")
    unrolled.save_pretrained(tmp_path / "unrolled")
    original = load_file(hf_dirs / name / "model.safetensors")
    for out in ("scanned", "unrolled"):
        written = load_file(tmp_path / out / "model.safetensors")
        assert written.keys() == original.keys()
        for k in original:
            assert written[k].dtype == original[k].dtype and np.array_equal(written[k], original[k]), (out, k)
    assert (tmp_path / "scanned" / "model.safetensors").read_bytes() == \
        (tmp_path / "unrolled" / "model.safetensors").read_bytes()


def test_dropout_keys_are_per_layer():
    keys = layer_keys(nnx.Rngs(dropout=1), 4, deterministic=False)
    data = jax.random.key_data(keys).reshape(4, -1)
    assert len({tuple(np.asarray(row)) for row in data}) == 4
    assert layer_keys(nnx.Rngs(dropout=1), 4, deterministic=True) is None


def _loss_and_grads(model, call, seed):
    @nnx.jit
    def run(model):
        def loss(m):
            return call(m, nnx.Rngs(dropout=seed) if seed is not None else None)
        return nnx.value_and_grad(loss)(model)

    with jax.default_matmul_precision("highest"):
        value, grads = run(model)
    return float(value), {k: v for k, v in nnx.to_flat_state(nnx.state(grads, nnx.Param))}


def _flat_grads(grads):
    return {".".join(str(p) for p in k): v for k, v in grads.items()}


def _cls_embedding(m, r, batch, probe):
    # DPR's loss reads the [CLS] state: the last layer computes position 0 only (after the scan when scanned)
    return (m(*batch, rngs=r, deterministic=r is None, cls_only=True).pooler_output @ probe).sum()


def _every_hidden_state(m, r, batch, probe):
    # every layer's output, through the scan's per-layer outputs
    states = m(*batch, rngs=r, deterministic=r is None, output_hidden_states=True).hidden_states
    return sum((h @ probe).sum() * (i + 1) for i, h in enumerate(states))


def _packed_cls_embedding(m, r, batch, probe):
    packing = TokenPacking.for_batch(np.asarray(batch[1]))
    return (m(*batch, rngs=r, deterministic=r is None, cls_only=True, packing=packing).pooler_output @ probe).sum()


CASES = {  # name: (checkpoint, class, loss)
    "dpr_cls": ("ctx", DPRContextEncoder, _cls_embedding),
    "dpr_hidden_states": ("ctx", DPRContextEncoder, _every_hidden_state),
    "dpr_packed": ("ctx", DPRContextEncoder, _packed_cls_embedding),
    "reader": ("reader", DPRReader, lambda m, r, batch, probe: (
        m(*batch[:2], rngs=r, deterministic=r is None).start_logits ** 2).sum()),
    "cross_encoder": ("cross", BertForSequenceClassification, lambda m, r, batch, probe: (
        m(*batch, rngs=r, deterministic=r is None).logits ** 2).sum()),
}
# The reader's and the cross-encoder's heads sit outside the scanned stack, which is the DPR encoder's: their
# scanned layout is checked by the HF load/save test above, and the stack under dropout by the DPR cases (the
# suite's time budget is tight; each case costs ~30 s on 2 cores).
HEAD_ONLY = ("reader", "cross_encoder")


_REFERENCES = {}


def _reference(hf_dirs, case, batch, probe):
    """(unrolled loss and grads with dropout, loss without dropout) of ``case``, computed once per case."""
    if case not in _REFERENCES:
        name, cls, loss = CASES[case]
        call = lambda m, r: loss(m, r, batch, probe)
        _REFERENCES[case] = (_loss_and_grads(cls.from_pretrained(hf_dirs / name), call, seed=5),
                             _loss_and_grads(cls.from_pretrained(hf_dirs / name), call, seed=None)[0])
    return _REFERENCES[case]


@pytest.mark.parametrize("case,policy", [("dpr_cls", p) for p in REMAT_POLICIES]
                         + [(c, "dots_saveable") for c in sorted(CASES) if c not in ("dpr_cls", *HEAD_ONLY)])
def test_scanned_equals_unrolled_with_dropout(hf_dirs, case, policy):
    """Forward and gradients in float32 at highest matmul precision, dropout on: the scanned model (and, for
    dots_saveable, the unrolled one under that remat policy) against the unrolled model without remat. Both
    layouts give layer i the same dropout key, so the masks are the same and the numbers agree up to float
    rounding (relative to each gradient's scale: the embedding gradients sum many terms that cancel)."""
    name, cls, loss = CASES[case]
    batch = padded_batch(3, 11, TINY["vocab_size"], seed=4, pad_rows=((1, 4), (2, 7)))
    probe = jnp.asarray(np.random.RandomState(0).randn(TINY["hidden_size"]).astype(np.float32))
    call = lambda m, r: loss(m, r, batch, probe)
    reference, no_dropout = _reference(hf_dirs, case, batch, probe)
    assert abs(reference[0] - no_dropout) > 1e-4 * abs(no_dropout)  # dropout really ran
    runs = [("scanned", _loss_and_grads(cls.from_pretrained(hf_dirs / name, scan_layers=True, remat_policy=policy),
                                        call, seed=5))]
    if policy == "dots_saveable":
        runs.append(("unrolled", _loss_and_grads(cls.from_pretrained(hf_dirs / name, remat_policy=policy), call,
                                                 seed=5)))
    expected = stacked_view(_flat_grads(reference[1]))
    for what, (value, grads) in runs:
        assert value == pytest.approx(reference[0], rel=1e-6, abs=1e-6), what
        got = plain(_flat_grads(grads)) if what == "scanned" else stacked_view(_flat_grads(grads))
        assert got.keys() == expected.keys()
        for k in expected:
            scale = float(np.abs(expected[k]).max())
            assert_close(got[k], expected[k], atol=1e-5 * max(scale, 1.0), rtol=1e-5, what=f"{what} {k}")


def test_scanned_hidden_states_match_transformers(hf_dirs):
    ids, mask, types = padded_batch(2, 13, TINY["vocab_size"], seed=6, pad_rows=((1, 5),))
    hf = transformers.DPRContextEncoder.from_pretrained(hf_dirs / "ctx").eval()
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 token_type_ids=torch.tensor(types), output_hidden_states=True)
    out = DPRContextEncoder.from_pretrained(hf_dirs / "ctx", scan_layers=True)(ids, mask, types,
                                                                               output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(ours, theirs, atol=1e-5, what=f"hidden state {i}")
    assert_close(out.pooler_output, ref.pooler_output, atol=1e-5)


def _traced_matmuls(layers: int, scan: bool) -> int:
    model = BertModel.from_config({**TINY, "num_hidden_layers": layers}, scan_layers=scan)
    ids = jnp.ones((2, 8), jnp.int32)
    graphdef, state = nnx.split(model)

    def loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(ids, cls_only=True).pooler_output)

    return str(jax.make_jaxpr(jax.grad(loss))(state)).count("dot_general")


def test_traced_program_does_not_grow_with_depth():
    # the scanned program holds one layer body (plus the separately run last layer) whatever the depth
    assert _traced_matmuls(2, True) == _traced_matmuls(8, True)
    assert _traced_matmuls(8, False) > 2 * _traced_matmuls(2, False)


# ---- the other families: DeBERTa-v2 (with and without its conv), T5, BART --------------------------------------

def _deberta_loss(m, r):
    ids = np.random.RandomState(0).randint(3, 90, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    out = m(ids, mask, rngs=r, deterministic=r is None, output_hidden_states=True)
    return (out.logits ** 2).sum() + sum((h ** 2).mean() for h in out.hidden_states)


def _seq2seq_loss(m, r):
    from test_seq2seq import batch
    return -sequence_log_probs(m, *batch(), rngs=r, deterministic=r is None).sum()


def _families():
    from test_deberta_v2 import V2_XLARGE_TINY, V3_TINY
    from test_seq2seq import FAMILIES

    dropout = dict(num_hidden_layers=3, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    depth = {"t5": dict(num_layers=3, num_decoder_layers=3), "bart": dict(encoder_layers=3, decoder_layers=3)}
    families = {name: (cls, {**config, **depth[name]}, _seq2seq_loss) for name, (cls, config) in FAMILIES.items()}
    families["deberta_v3"] = (DebertaV2ForSequenceClassification, {**V3_TINY, **dropout}, _deberta_loss)
    families["deberta_v2_conv"] = (DebertaV2ForSequenceClassification, {**V2_XLARGE_TINY, **dropout}, _deberta_loss)
    return families


@pytest.mark.parametrize("family", ["t5", "bart", "deberta_v3", "deberta_v2_conv"])
def test_other_families_scanned_equal_unrolled(tmp_path, family):
    """Parameters, HF files both ways, loss and gradients with dropout (and for seq2seq a cached decoding step)
    of the scanned layout against the unrolled one."""
    cls, config, loss = _families()[family]
    unrolled = cls.from_config(config, seed=0)
    unrolled.save_pretrained(tmp_path / "hf")
    scanned = cls.from_pretrained(tmp_path / "hf", scan_layers=True)
    a, b = stacked_view(flat_params(unrolled)), plain(flat_params(scanned))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    scanned.save_pretrained(tmp_path / "back")
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()

    (value, grads), (scanned_value, scanned_grads) = (_loss_and_grads(m, loss, seed=7) for m in (unrolled, scanned))
    no_dropout = _loss_and_grads(scanned, loss, seed=None)[0]
    assert abs(value - no_dropout) > 1e-4 * abs(no_dropout)  # dropout really ran
    assert scanned_value == pytest.approx(value, rel=1e-6)
    expected, got = stacked_view(_flat_grads(grads)), plain(_flat_grads(scanned_grads))
    assert got.keys() == expected.keys()
    for k in expected:
        assert_close(got[k], expected[k], atol=1e-5 * max(float(np.abs(expected[k]).max()), 1.0), rtol=1e-5, what=k)

    if loss is _seq2seq_loss:  # decoding with a cache visits the stacked layers one slice at a time
        from test_seq2seq import batch
        input_ids, attention_mask = batch()[:2]

        def greedy(m):
            encoded = m.encode(input_ids, attention_mask)
            cache, token, logits = m.init_cache(3, 4, encoded), jnp.zeros((3, 1), jnp.int32), []
            for _ in range(3):
                step, cache = m.decode(token, encoded, attention_mask, cache=cache)
                logits.append(np.asarray(step))
                token = jnp.argmax(step[:, -1:], -1).astype(jnp.int32)
            return np.concatenate(logits, 1)

        with jax.default_matmul_precision("highest"):
            assert_close(greedy(scanned), greedy(unrolled), atol=1e-5, rtol=1e-5)


def test_full_size_configs_scan_and_a_resume_with_the_other_layout_is_refused(tmp_path):
    """The shipped full-size training configs run scanned layers; a workdir trained with the other layout
    refuses to resume in one line naming model.scan_layers and how to resume (null and absent = false)."""
    import yaml

    from rdr_jax.training import faults
    from rdr_jax.training.faults import WorkdirError

    configs = sorted((Path(rdr_jax.__file__).parent / "configs").glob("*.yaml"))
    assert configs and all(yaml.safe_load(p.read_text())["model"]["scan_layers"] is True for p in configs)
    saved = {"task": {"name": "dpr"}, "model": {"init": {"hidden_size": 32}, "remat": False}}  # predates the key
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved))
    for same in (None, False):
        faults.check_same_run(tmp_path, {**saved, "model": {**saved["model"], "scan_layers": same}})
    with pytest.raises(WorkdirError) as err:
        faults.check_same_run(tmp_path, {**saved, "model": {**saved["model"], "scan_layers": True}})
    message = str(err.value)
    assert len(message.splitlines()) == 1 and "model.scan_layers was False" in message
    assert "set model.scan_layers: false" in message

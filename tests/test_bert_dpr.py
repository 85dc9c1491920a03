"""Parity with transformers, exact round trips and clear load errors for the BERT/DPR family."""

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

import rdr_jax
from rdr_jax.convert.hf_io import CheckpointError
from rdr_jax.models import (BertForSequenceClassification, BertModel, DPRContextEncoder, DPRQuestionEncoder,
                            DPRReader)
from hf_reference import padded_batch
from parity import assert_close

TINY = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64, type_vocab_size=2, attn_implementation="eager")
TOL = 1e-5
# The same checks with the layers stored stacked and scanned (rdr_jax.models.stacking).
SCAN = pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])


def _hf(cls, config_cls, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = config_cls(**{**TINY, **overrides})
    return cls(cfg).eval()


def _torch_inputs(ids, mask, types):
    return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))


def _assert_round_trip(jax_model, hf_dir, tmp_path, hf_cls):
    out = tmp_path / "roundtrip"
    jax_model.save_pretrained(out)
    original, written = load_file(f"{hf_dir}/model.safetensors"), load_file(out / "model.safetensors")
    assert set(original) == set(written), set(original) ^ set(written)
    for key in original:
        assert original[key].dtype == written[key].dtype, key
        assert np.array_equal(original[key], written[key]), key
    _, info = hf_cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


@pytest.mark.parametrize("width", ["tiny", "bert-base"])
@SCAN
def test_bert_model_parity_and_round_trip(scan, tmp_path, width):
    overrides = {} if width == "tiny" else dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                                                num_hidden_layers=1)
    hf = _hf(transformers.BertModel, transformers.BertConfig, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    model = rdr_jax.from_pretrained(tmp_path / "hf", scan_layers=scan)
    assert isinstance(model, BertModel)
    ids, mask, types = padded_batch(3, 17, TINY["vocab_size"], pad_rows=((1, 5), (2, 1)))
    with torch.no_grad():
        ref = hf(**_torch_inputs(ids, mask, types), output_hidden_states=True)
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=TOL)
    assert_close(out.pooler_output, ref.pooler_output, atol=TOL)
    assert len(out.hidden_states) == len(ref.hidden_states)
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
        assert_close(ours, theirs, atol=TOL)
    _assert_round_trip(model, tmp_path / "hf", tmp_path, transformers.BertModel)


@pytest.mark.parametrize("num_labels", [1, 3])
@SCAN
def test_bert_sequence_classification_parity(scan, tmp_path, num_labels):
    hf = _hf(transformers.BertForSequenceClassification, transformers.BertConfig, num_labels=num_labels)
    hf.save_pretrained(tmp_path / "hf")
    model = rdr_jax.from_pretrained(tmp_path / "hf", scan_layers=scan)
    assert isinstance(model, BertForSequenceClassification)
    ids, mask, types = padded_batch(4, 12, TINY["vocab_size"], seed=1, pad_rows=((0, 4), (3, 7)))
    with torch.no_grad():
        ref = hf(**_torch_inputs(ids, mask, types)).logits
    logits = model(ids, mask, types).logits
    assert logits.shape == (4, num_labels)
    assert_close(logits, ref, atol=TOL)
    _assert_round_trip(model, tmp_path / "hf", tmp_path, transformers.BertForSequenceClassification)


@SCAN
def test_cross_encoder_starts_from_plain_bert(scan, tmp_path):
    hf = _hf(transformers.BertModel, transformers.BertConfig)
    hf.save_pretrained(tmp_path / "hf")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "hf", scan_layers=scan)
    ids, mask, types = padded_batch(2, 9, TINY["vocab_size"])
    with torch.no_grad():
        ref_pooled = hf(**_torch_inputs(ids, mask, types)).pooler_output
    assert_close(model.bert(ids, mask, types).pooler_output, ref_pooled, atol=TOL)
    classifier = np.asarray(model.classifier.kernel[...])
    assert classifier.shape == (TINY["hidden_size"], 2) and np.abs(classifier).max() > 0  # freshly initialised


@pytest.mark.parametrize("cls_name,projection_dim", [("DPRContextEncoder", 0), ("DPRContextEncoder", 16),
                                                      ("DPRQuestionEncoder", 0), ("DPRQuestionEncoder", 8)])
@SCAN
def test_dpr_encoder_parity_and_round_trip(scan, tmp_path, cls_name, projection_dim):
    hf_cls = getattr(transformers, cls_name)
    hf = _hf(hf_cls, transformers.DPRConfig, projection_dim=projection_dim)
    hf.save_pretrained(tmp_path / "hf")
    model = rdr_jax.from_pretrained(tmp_path / "hf", scan_layers=scan)
    assert type(model).__name__ == cls_name
    ids, mask, types = padded_batch(3, 15, TINY["vocab_size"], seed=2, pad_rows=((2, 6),))
    with torch.no_grad():
        ref = hf(**_torch_inputs(ids, mask, types)).pooler_output
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types)
    assert out.pooler_output.shape == (3, projection_dim or TINY["hidden_size"])
    assert_close(out.pooler_output, ref, atol=TOL)
    _assert_round_trip(model, tmp_path / "hf", tmp_path, hf_cls)


@SCAN
def test_dpr_reader_parity_and_round_trip(scan, tmp_path):
    hf = _hf(transformers.DPRReader, transformers.DPRConfig)
    hf.save_pretrained(tmp_path / "hf")
    model = rdr_jax.from_pretrained(tmp_path / "hf", scan_layers=scan)
    assert isinstance(model, DPRReader)
    n_passages, length = 5, 14
    ids, mask, _ = padded_batch(n_passages, length, TINY["vocab_size"], seed=3, pad_rows=((1, 4), (4, 9)),
                                token_types=False)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    out = model(input_ids=ids, attention_mask=mask)
    assert out.start_logits.shape == ref.start_logits.shape == (n_passages, length)
    assert out.relevance_logits.shape == ref.relevance_logits.shape == (n_passages,)
    for name in ("start_logits", "end_logits", "relevance_logits"):
        assert_close(getattr(out, name), getattr(ref, name), atol=TOL, what=name)
    _assert_round_trip(model, tmp_path / "hf", tmp_path, transformers.DPRReader)


def test_real_minilm_as_bert_and_dpr_context_encoder(minilm_dir):
    tok = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    texts = ["Norway uses the Norwegian krone.", "The ISO 3166-1 alpha-3 code of France is FRA, and its "
             "numeric code is 250."]
    enc = tok(texts, padding=True, return_tensors="np")
    hf = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(**{k: torch.tensor(v) for k, v in enc.items()})
    bert = rdr_jax.from_pretrained(minilm_dir)
    out = bert(**enc)
    assert_close(out.last_hidden_state, ref.last_hidden_state, atol=TOL)
    assert_close(out.pooler_output, ref.pooler_output, atol=TOL)
    ctx = DPRContextEncoder.from_pretrained(minilm_dir)
    emb = ctx(**enc).pooler_output
    assert_close(emb, ref.last_hidden_state[:, 0], atol=TOL)  # DPR's embedding is the [CLS] state
    question = DPRQuestionEncoder.from_pretrained(minilm_dir)
    assert np.array_equal(np.asarray(question(**enc).pooler_output), np.asarray(emb))


def test_question_encoder_starts_from_context_encoder(tmp_path):
    hf = _hf(transformers.DPRContextEncoder, transformers.DPRConfig, projection_dim=8)
    hf.save_pretrained(tmp_path / "ctx")
    question = DPRQuestionEncoder.from_pretrained(tmp_path / "ctx")
    ids = np.array([[5, 6, 7, 8, 9]])
    assert_close(question(ids).pooler_output, hf(input_ids=torch.tensor(ids)).pooler_output, atol=TOL)


def test_dpr_encoder_from_bert_saves_as_dpr(tmp_path, minilm_dir):
    ctx = DPRContextEncoder.from_pretrained(minilm_dir)
    ctx.save_pretrained(tmp_path / "ctx")
    config = json.loads((tmp_path / "ctx" / "config.json").read_text())
    assert config["architectures"] == ["DPRContextEncoder"] and config["model_type"] == "dpr"
    hf, info = transformers.DPRContextEncoder.from_pretrained(tmp_path / "ctx", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = np.array([[101, 2054, 2003, 1996, 3642, 1997, 2605, 102]])
    with torch.no_grad():
        ref = hf.eval()(input_ids=torch.tensor(ids)).pooler_output
    assert_close(ctx(ids).pooler_output, ref, atol=TOL)


@pytest.mark.parametrize("torch_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_load_exactly(tmp_path, torch_dtype):
    import jax.numpy as jnp

    hf = _hf(transformers.BertModel, transformers.BertConfig).to(torch_dtype)
    hf.save_pretrained(tmp_path / "hf")
    jax_dtype = jnp.float16 if torch_dtype == torch.float16 else jnp.bfloat16
    model = rdr_jax.from_pretrained(tmp_path / "hf", param_dtype=jax_dtype, dtype=jnp.float32)
    kernel = np.asarray(model.bert.layers[0].query.kernel[...])
    assert kernel.dtype == jax_dtype
    model.save_pretrained(tmp_path / "out")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)


def test_pytorch_bin_and_sharded_checkpoints(tmp_path):
    hf = _hf(transformers.DPRContextEncoder, transformers.DPRConfig, projection_dim=8)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    hf.config.architectures = ["DPRContextEncoder"]
    hf.config.save_pretrained(tmp_path)
    from_bin = rdr_jax.from_pretrained(tmp_path)
    assert isinstance(from_bin, DPRContextEncoder)
    from_bin.save_pretrained(tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    from_shards = rdr_jax.from_pretrained(tmp_path / "sharded")
    ids = np.array([[5, 6, 7, 8, 9]])
    ref = hf(input_ids=torch.tensor(ids)).pooler_output
    assert_close(from_bin(ids).pooler_output, ref, atol=TOL)
    assert np.array_equal(np.asarray(from_shards(ids).pooler_output), np.asarray(from_bin(ids).pooler_output))
    hf_from_shards, info = transformers.DPRContextEncoder.from_pretrained(tmp_path / "sharded",
                                                                          output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


@SCAN
def test_orbax_format_round_trip(scan, tmp_path):
    hf = _hf(transformers.DPRReader, transformers.DPRConfig)
    hf.save_pretrained(tmp_path / "hf")
    model = rdr_jax.from_pretrained(tmp_path / "hf", scan_layers=scan)
    model.save_pretrained(tmp_path / "native", format="orbax")
    assert (tmp_path / "native" / "orbax").is_dir() and not (tmp_path / "native" / "model.safetensors").exists()
    restored = rdr_jax.from_pretrained(tmp_path / "native", scan_layers=scan)
    assert isinstance(restored, DPRReader)
    restored.save_pretrained(tmp_path / "back")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


# ---- errors name the file, key or shape -------------------------------------------------------------------

@pytest.fixture
def tiny_bert_dir(tmp_path):
    hf = _hf(transformers.BertModel, transformers.BertConfig)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_error_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        rdr_jax.from_pretrained(tmp_path / "empty")


def test_error_missing_weights(tiny_bert_dir):
    (tiny_bert_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found.*model.safetensors"):
        rdr_jax.from_pretrained(tiny_bert_dir)


def test_error_truncated_weights(tiny_bert_dir):
    path = tiny_bert_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated"):
        rdr_jax.from_pretrained(tiny_bert_dir)


@SCAN
def test_error_shape_mismatch_names_both_shapes(scan, tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    config["intermediate_size"] = 40
    (tiny_bert_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"encoder.layer.0.intermediate.dense.weight.*\(48, 32\).*\(40, 32\)"):
        rdr_jax.from_pretrained(tiny_bert_dir, scan_layers=scan)


@SCAN
def test_error_missing_and_unexpected_keys_are_listed(scan, tiny_bert_dir):
    from safetensors.numpy import save_file

    state = load_file(tiny_bert_dir / "model.safetensors")
    state["encoder.layer.0.attention.self.extra.weight"] = np.zeros(3, np.float32)
    del state["encoder.layer.1.output.dense.bias"]
    save_file(state, str(tiny_bert_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as err:
        rdr_jax.from_pretrained(tiny_bert_dir, scan_layers=scan)
    assert "missing keys: encoder.layer.1.output.dense.bias" in str(err.value)
    assert "unexpected keys: encoder.layer.0.attention.self.extra.weight" in str(err.value)


def test_error_unknown_architecture_lists_supported(tiny_bert_dir):
    config = json.loads((tiny_bert_dir / "config.json").read_text())
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (tiny_bert_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unsupported architecture.*GPT2LMHeadModel.*BertModel.*DPRReader"):
        rdr_jax.from_pretrained(tiny_bert_dir)


def test_hub_name_not_in_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="not found in the local Hugging Face cache"):
        rdr_jax.from_pretrained("facebook/dpr-ctx_encoder-single-nq-base")


def test_remat_with_dropout_gives_the_same_loss_and_grads(tmp_path):
    import jax
    from flax import nnx

    hf = _hf(transformers.DPRContextEncoder, transformers.DPRConfig)
    hf.save_pretrained(tmp_path / "hf")
    ids, mask, types = padded_batch(2, 9, TINY["vocab_size"])
    probe = np.random.RandomState(0).randn(TINY["hidden_size"]).astype(np.float32)

    def loss_and_grads(remat):
        model = DPRContextEncoder.from_pretrained(tmp_path / "hf", remat=remat)

        @nnx.jit
        def run(model):
            def loss(m):
                out = m(ids, mask, types, rngs=nnx.Rngs(dropout=7), deterministic=False)
                return (out.pooler_output @ probe).sum()
            return nnx.value_and_grad(loss)(model)

        value, grads = run(model)
        return float(value), jax.tree.leaves(nnx.state(grads, nnx.Param))

    plain, remat = loss_and_grads(False), loss_and_grads(True)
    assert plain[0] == pytest.approx(remat[0], rel=1e-6)
    deterministic = float((DPRContextEncoder.from_pretrained(tmp_path / "hf")(ids, mask, types)
                           .pooler_output @ probe).sum())
    assert abs(plain[0] - deterministic) > 1e-6  # dropout really ran
    for a, b in zip(plain[1], remat[1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)

"""DGR distillation: passage scores vs transformers, the loss vs a numpy computation, the candidate-list data,
sharded (data=4 x tensor=2) vs 1-device steps, and resume equality."""

import json
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
import torch
import transformers
from safetensors.numpy import load_file

from rdr_jax.models.seq2seq import sequence_log_probs
from rdr_jax.data.dgr_data import DGRData, candidate_list, dgr_records, normalise_record
from rdr_jax.data.files import read_json_records
from rdr_jax.data.records import RecordFile
from rdr_jax.decoding.scoring import passage_scores
import harness
from rdr_jax.tasks import load_config
from rdr_jax.training.config import ConfigError
from rdr_jax.training.loop import train
from parity import assert_close

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = harness.TINY_CONFIGS / "dgr.yaml"
ONE_LAYER = ["model.init.num_layers=1"]   # fewer ops to compile on busy CPUs


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """The tiny config's random T5 and word-level tokenizer, built once (model.init, one layer)."""
    from rdr_jax.tasks.dgr import DGRTask

    tmp = tmp_path_factory.mktemp("dgr_model")
    task = DGRTask(load_config(CONFIG, ONE_LAYER, workdir=str(tmp)), tmp)
    return Path(task.paths()[0])


def tiny(t5_dir, *overrides):
    return [f"model.path={t5_dir}", *overrides]


pytestmark = pytest.mark.usefixtures("compilation_cache")


# ---- passage scores vs transformers ----------------------------------------------------------------------------
def _hf_model(family: str):
    torch.manual_seed(0)
    if family == "t5":
        config = transformers.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                       relative_attention_num_buckets=8, decoder_start_token_id=0, dropout_rate=0.0)
        return transformers.T5ForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    config = transformers.BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=32, pad_token_id=1, bos_token_id=0,
                                     eos_token_id=2, decoder_start_token_id=2, dropout=0.0)
    return transformers.BartForConditionalGeneration._from_config(config, attn_implementation="eager").eval()


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_passage_scores_equal_transformers_teacher_forced_log_probs(tmp_path, family):
    from rdr_jax.models import from_pretrained

    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path)
    pad = hf.config.pad_token_id
    b, k, ls, lt = 3, 4, 9, 5
    rng = np.random.default_rng(0)
    q = rng.integers(3, 96, size=(b, ls))
    q_mask = np.ones_like(q)
    q_mask[1, 6:] = 0                                       # padded questions
    q[q_mask == 0] = pad
    lengths = rng.integers(2, lt + 1, size=b * k)
    t_mask = (np.arange(lt)[None, :] < lengths[:, None]).astype(np.int64)
    t = np.where(t_mask == 1, rng.integers(3, 96, size=(b * k, lt)), pad)

    scores, token = nnx.jit(passage_scores)(model, jnp.asarray(q), jnp.asarray(q_mask), jnp.asarray(t),
                                            jnp.asarray(t_mask))
    assert scores.shape == (b, k) and token.shape == (b, k, lt)

    labels = torch.tensor(np.where(t_mask == 1, t, -100))
    with torch.no_grad():
        logits = hf(input_ids=torch.tensor(np.repeat(q, k, 0)), attention_mask=torch.tensor(np.repeat(q_mask, k, 0)),
                    labels=labels).logits
    log_probs = torch.log_softmax(logits.float(), -1)
    gathered = torch.gather(log_probs, -1, labels.clamp(min=0)[..., None])[..., 0].numpy()
    expected = (gathered * t_mask).sum(-1).reshape(b, k)
    assert_close(np.asarray(scores), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(token).sum(-1), np.asarray(scores), rtol=1e-6, atol=1e-6)


# ---- the loss on a hand-made batch vs numpy -----------------------------------------------------------------------
def _dgr_numpy(s, mask, margin, step, weight_pos):
    total, count = 0.0, 0
    for row, m in zip(s, mask):
        n = int(m.sum())
        for i in range(n):
            for j in range(i + 1, n):
                d = max(0.0, row[j] - row[i] + margin + (j - i - 1) * step)
                if d > 0:
                    total += (weight_pos if i == 0 else 1.0 / (i + 1)) * d
                    count += 1
    return total / max(count, 1)


def _ranknet_numpy(s, mask):
    values = [np.log1p(np.exp(-(row[i] - row[j]))) for row, m in zip(s, mask)
              for i in range(int(m.sum())) for j in range(i + 1, int(m.sum()))]
    return float(np.mean(values))


def _kl_numpy(s, t, mask):
    out = []
    for srow, trow, m in zip(s, t, mask):
        n = int(m.sum())
        p = np.exp(trow[:n] - trow[:n].max()); p /= p.sum()
        logq = srow[:n] - srow[:n].max(); logq -= np.log(np.exp(logq).sum())
        out.append(np.sum(p * (np.log(p) - logq)))
    return float(np.mean(out))


@pytest.fixture(scope="module")
def dgr_model(t5_dir, tmp_path_factory):
    from rdr_jax.tasks.dgr import DGRTask

    tmp = tmp_path_factory.mktemp("dgr_loss")
    task = DGRTask(load_config(CONFIG, tiny(t5_dir), workdir=str(tmp)), tmp)
    return tmp, task.build_model(), task.tokenizer


@pytest.mark.parametrize("variant", [("dgr_margin", 300.0, 100.0), ("dgr_margin", 0.5, 0.25), ("ranknet",),
                                     ("listwise_kl",)])
def test_task_loss_equals_numpy(dgr_model, t5_dir, variant):
    from rdr_jax.tasks.dgr import DGRTask

    tmp, model, tok = dgr_model
    overrides = [f"task.ranking_loss={variant[0]}"]
    if len(variant) == 3:
        overrides += [f"task.margin={variant[1]}", f"task.margin_step={variant[2]}"]
    task = DGRTask(load_config(CONFIG, tiny(t5_dir, *overrides), workdir=str(tmp)), tmp)
    questions = ["What is the French name of Japanese?", "Which currency has the code ALL?"]
    identifiers = [["1648", "12", "2399", "7"], ["5", "123", "99", "1"]]
    enc = tok(questions, padding="max_length", max_length=16, return_tensors="np")
    rows = [tok(x)["input_ids"] for ids in identifiers for x in ids]
    lt = max(map(len, rows))
    t_ids = np.array([r + [0] * (lt - len(r)) for r in rows], np.int32)
    t_mask = np.array([[1] * len(r) + [0] * (lt - len(r)) for r in rows], np.int32)
    cmask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.int32)  # question 2 has 3 candidates
    teacher = np.array([[2.0, 1.5, -0.5, 0.3], [1.0, 3.0, 0.5, 0.0]], np.float32)
    batch = {"q_input_ids": enc["input_ids"], "q_attention_mask": enc["attention_mask"], "target_ids": t_ids,
             "target_mask": t_mask, "candidate_mask": cmask, "teacher_scores": teacher}
    loss, metrics = nnx.jit(lambda m, b: task.loss(m, b, rngs=None, deterministic=True))(
        model, jax.tree.map(jnp.asarray, batch))

    retriever = model.retriever
    s = np.asarray(nnx.jit(sequence_log_probs)(retriever, np.repeat(enc["input_ids"], 4, 0),
                                      np.repeat(enc["attention_mask"], 4, 0), t_ids, t_mask)).reshape(2, 4)
    gold_tokens = t_mask.reshape(2, 4, -1)[:, 0].sum()
    ce = -s[:, 0].sum() / gold_tokens
    if variant[0] == "dgr_margin":
        rank = _dgr_numpy(s, cmask, variant[1], variant[2], 3.0)
    elif variant[0] == "ranknet":
        rank = _ranknet_numpy(s, cmask)
    else:
        rank = _kl_numpy(s, teacher, cmask)
    np.testing.assert_allclose(float(metrics["generation_loss"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["ranking_loss"]), rank, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(loss), rank + 500.0 * ce, rtol=1e-5)
    assert rank > 0


def test_config_errors_name_the_key(tmp_path):
    for override, key in (("task.ranking_loss=hinge", "task.ranking_loss"), ("data.num_candidates=1",
                          "data.num_candidates"), ("model.family=gpt", "model.family"),
                          ("data.stand_in_teacher=bm25", "data.stand_in_teacher")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(CONFIG, [override], workdir=str(tmp_path))


# ---- data --------------------------------------------------------------------------------------------------------
class _Tok:
    """Enough of a tokenizer for DGRData: identifiers as digit tokens + EOS (1), questions as char codes."""
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, texts, **kw):
        if kw.get("return_tensors") == "np":
            n = kw["max_length"]
            ids = np.array([[ord(c) % 90 + 2 for c in t[:n]] + [0] * (n - len(t[:n])) for t in texts])
            return {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int32)}
        return {"input_ids": [[int(c) + 2 for c in t if c.isdigit()] + [1] for t in texts]}


def test_candidate_lists_positive_first_then_teacher_order(tmp_path):
    lines = [
        {"question": "q1", "candidates": [
            {"passage_id": "10", "teacher_score": 0.1}, {"passage_id": "11", "teacher_score": 2.0, "is_positive": True},
            {"passage_id": "12", "teacher_score": 0.9}, {"passage_id": "13", "teacher_score": 3.0},
            {"passage_id": "14", "teacher_score": 1.0, "is_positive": True}, {"passage_id": "12", "teacher_score": 0.9}]},
        {"question": "no positive", "candidates": [{"passage_id": "10", "teacher_score": 1.0}]},
        {"question": "q3", "candidates": [{"passage_id": "20", "identifier": "777", "teacher_score": 0.0,
                                            "is_positive": True}, {"passage_id": "10", "teacher_score": 5.0}]},
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    ids = {str(i): str(i) for i in range(10, 15)}
    data = DGRData(path, _Tok(), ids, num_candidates=4, max_question_length=8, max_identifier_length=0,
                   stand_in_teacher="none", gold_file=None)
    assert [data.question(i) for i in range(len(data))] == ["q1", "q3"]   # the one without a positive is skipped
    # best positive first; the other positive is no negative; negatives by teacher score, deduplicated, cut at K
    assert [c["passage_id"] for c in data.candidates(0)] == ["11", "13", "12", "10"]
    assert [c["identifier"] for c in data.candidates(1)] == ["777", "10"]
    batch = data.make_batch(np.array([0, 1]))
    assert batch["target_ids"].shape == (8, 4) and batch["q_input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(batch["candidate_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["teacher_scores"][0], np.float32([2.0, 3.0, 0.9, 0.1]))
    np.testing.assert_array_equal(batch["target_ids"][0], [3, 3, 1, 0])           # "11" + EOS, padded
    np.testing.assert_array_equal(batch["target_ids"][4], [9, 9, 9, 1])           # "777" + EOS
    assert batch["target_mask"][6:].sum() == 0

    ids.pop("13")
    with pytest.raises(ValueError, match=r"passage '13' has no 'identifier'"):
        DGRData(path, _Tok(), ids, num_candidates=4, max_question_length=8, max_identifier_length=0,
                stand_in_teacher="none", gold_file=None)


def test_reranked_results_with_gold_file(tmp_path):
    """The two-step flow's input: retriever results re-scored by the teacher; positives from the gold file."""
    results = [{"question": "q1", "answers": [], "ctxs": [
        {"id": "5", "title": "", "text": "", "score": 1.0, "has_answer": False},
        {"id": "6", "title": "", "text": "", "score": 4.0, "has_answer": True},
        {"id": "7", "title": "", "text": "", "score": 2.0, "has_answer": False}]}]
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "gold.json").write_text(json.dumps([{"question": "q1", "positive_ctxs": [{"passage_id": "7", "text": ""}]}]))
    data = DGRData(tmp_path / "r.json", _Tok(), {p: p for p in "567"}, num_candidates=3, max_question_length=4,
                   max_identifier_length=0, stand_in_teacher="none", gold_file=str(tmp_path / "gold.json"))
    assert [c["passage_id"] for c in data.candidates(0)] == ["7", "6", "5"]
    assert candidate_list([{"passage_id": "1", "teacher_score": 0.0, "is_positive": False}], 3) == []


EMBEDDED_TRAIN = harness.TINY_CONFIGS.parents[1] / "data" / "embedded" / "train.biencoder.json"


def test_prepared_lists_equal_the_whole_file_lists(tmp_path, capsys):
    """`prepare-data dgr` and the data_cache conversion keep per question what the whole-file read builds (the
    candidate lists as before: normalise + candidate_list cut at K), and their batches are the same arrays."""
    from rdr_jax.cli import main

    raw = json.loads(EMBEDDED_TRAIN.read_text())
    raw[2] = dict(raw[2], positive_ctxs=[])                          # no positive: skipped
    src = tmp_path / "train.json"
    src.write_text(json.dumps(raw))
    out = tmp_path / "dgr.arrayrecord"
    assert main(["prepare-data", "dgr", str(src), str(out), "--stand-in-teacher", "lexical_overlap",
                 "--no-progress"]) == 0
    assert f"{len(raw) - 1} dgr records" in capsys.readouterr().out
    kw = dict(num_candidates=3, max_question_length=8, max_identifier_length=0, stand_in_teacher="lexical_overlap",
              gold_file=None)
    ids = {str(c["passage_id"]): str(c["passage_id"]) for r in raw
           for key in ("positive_ctxs", "hard_negative_ctxs", "negative_ctxs") for c in r.get(key) or []}
    whole = DGRData(src, _Tok(), ids, **kw)
    prepared = DGRData(out, _Tok(), ids, **kw, cache_dir=tmp_path / "unused")
    cached = DGRData(src, _Tok(), ids, **kw, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "unused").exists() and len(list((tmp_path / "cache").glob("*.arrayrecord"))) == 1
    old = [candidate_list(normalise_record(r, "x", stand_in_teacher="lexical_overlap", gold=None), 3)
           for r in read_json_records(src, "x")]
    old = [[{k: c[k] for k in ("passage_id", "teacher_score")} for c in cands] for cands in old if cands]
    assert len(prepared) == len(cached) == len(old) == len(raw) - 1
    for data in (whole, prepared, cached):
        assert [[{k: c[k] for k in ("passage_id", "teacher_score")} for c in data.candidates(i)]
                for i in range(len(data))] == old
    idx = np.array([4, 0, 7])
    for key, value in whole.make_batch(idx).items():
        np.testing.assert_array_equal(prepared.make_batch(idx)[key], value, err_msg=key)
        np.testing.assert_array_equal(cached.make_batch(idx)[key], value, err_msg=key)
    assert RecordFile(out, "dgr").meta["records"] == len(raw) - 1


def test_gold_file_streamed_into_prepared_results(tmp_path):
    """Re-ranked results whose positives come from the gold file: the conversion's cache key follows the gold file."""
    results = [{"question": f"q{i}", "answers": [], "ctxs": [
        {"id": str(5 + j), "title": "", "text": "", "score": float((i + 2 * j) % 3)} for j in range(3)]}
        for i in range(3)]
    (tmp_path / "r.json").write_text(json.dumps(results))
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps([{"question": "q0", "positive_ctxs": [{"passage_id": "7"}]},
                                {"question": "q2", "positive_ctxs": [{"passage_id": "5"}, {"passage_id": "9"}]}]))
    records = dgr_records(tmp_path / "r.json", tmp_path / "cache", gold_file=str(gold))
    assert [records[i]["question"] for i in range(len(records))] == ["q0", "q2"]
    assert [c["passage_id"] for c in records[0]["candidates"]] == ["7", "6", "5"]
    assert [c["passage_id"] for c in records[1]["candidates"]][0] == "5"
    gold.write_text(json.dumps([{"question": "q1", "positive_ctxs": [{"passage_id": "6"}]}]))
    records = dgr_records(tmp_path / "r.json", tmp_path / "cache", gold_file=str(gold))
    assert [records[i]["question"] for i in range(len(records))] == ["q1"]


# ---- sharded vs 1 device -----------------------------------------------------------------------------------------
SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    from rdr_jax.tasks import load_config
    import harness

    workdir, model = sys.argv[1:]
    assert len(jax.devices()) == 8, jax.devices()
    config = load_config(harness.TINY_CONFIGS / "dgr.yaml", [f"model.path={model}", "train.batch_size=8",
                         "optim.adam_eps=1e-3", "optim.warmup_steps=0"], workdir=workdir)
    meshes = {"single": ((1, 1, 1), jax.devices()[:1]), "data4_tensor2": ((4, 1, 2), None)}
    print("RESULT " + json.dumps(harness.steps_on_meshes(config, meshes, 8, 2)))
""")


def test_sharded_steps_match_single_device(tmp_path, t5_dir):
    result = harness.run_on_simulated_devices(SCRIPT, tmp_path / "run", t5_dir)
    single, sharded = result["single"], result["data4_tensor2"]
    assert all(np.isfinite(single["losses"])) and single["losses"][0] != single["losses"][-1]
    assert sharded["loss_rel_diff"] <= 1e-5, (sharded["losses"], single["losses"])
    assert sharded["param_rel_diff"] <= 1e-5, sharded["worst_param"]
    assert single["max_shards"] == 1 and sharded["max_shards"] == 2
    shared = next(k for k in sharded["specs"] if k.endswith("shared.embedding.value"))
    assert "tensor" in sharded["specs"][shared]                  # the vocab is split over the tensor axis


# ---- resume ------------------------------------------------------------------------------------------------------
def test_resumed_run_equals_uninterrupted_run(tmp_path, t5_dir):
    """The uninterrupted run reads the raw file (converted into its data_cache); the interrupted one reads the
    `prepare-data dgr` dataset with its batches built by 2 grain worker processes: the same losses and weights."""
    from rdr_jax.cli import main

    base = tiny(t5_dir, "train.checkpoint_every=2", "optim.decay_steps=10", "train.tensorboard=false")
    full = tmp_path / "full"
    train(load_config(CONFIG, base + ["train.steps=3"], workdir=str(full)), progress=False)
    assert len(list((full / "data_cache").glob("*.arrayrecord"))) == 1
    prepared = tmp_path / "train.arrayrecord"
    assert main(["prepare-data", "dgr", str(EMBEDDED_TRAIN), str(prepared), "--stand-in-teacher", "lexical_overlap",
                 "--no-progress"]) == 0
    base += [f"data.train_file={prepared}", "data.workers=2"]
    resumed = tmp_path / "resumed"
    assert train(load_config(CONFIG, base + ["train.steps=2"], workdir=str(resumed)), progress=False)["step"] == 2
    assert train(load_config(CONFIG, base + ["train.steps=3"], workdir=str(resumed)), progress=False)["step"] == 3
    assert not (resumed / "data_cache").exists()

    a = load_file(full / "final" / "retriever" / "model.safetensors")
    b = load_file(resumed / "final" / "retriever" / "model.safetensors")
    start = load_file(t5_dir / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after resuming"
    assert not np.array_equal(a["shared.weight"], start["shared.weight"])      # it trained
    read = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in read(full)] == [m["loss"] for m in read(resumed)]
    assert {"ranking_loss", "generation_loss", "positive_top1"} <= set(read(full)[0])
    # The export is what `rdr-jax generate` reads: tokenizer and identifiers next to the model.
    assert (full / "final" / "retriever" / "identifiers.tsv").is_file()
    assert (full / "final" / "retriever" / "tokenizer.json").is_file()

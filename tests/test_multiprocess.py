"""Multi-process training equals one process: 2 local processes x 4 CPU devices (jax.distributed, gloo) against
1 process x 8 devices, through `rdr-jax train`, on the tiny RDR config with precomputed teacher scores and the
NLL term on (so the re-based ``positive_index`` of process 1's block is exercised), on DGR, and on DPR with
sampled hard negatives (sampled per example, so the same on any process split; questions bucketed to their
own length, agreed between the processes each step); the 2-process DPR run resumed from a checkpoint with its
batches built by grain worker processes repeats its last steps bit for bit.

Tolerances as in tests/test_sharding.py: the same SPMD program runs in both, but cross-process all-reduces
(gloo) may sum in another order, so losses and parameters agree to a relative 1e-5 (parameters relative to
max(|tensor|, 0.02)); Adam's near-sign first steps need ``adam_eps=1e-3``, and the parameters with an exactly
zero gradient (attention key biases) are left out.

Also here, without subprocesses: the data-shard arithmetic (blocks, index re-basing) and corpus encoding split
over processes.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

import harness
from rdr_jax.training.distributed import detect_environment, globalize_index_fields, local_block

STEPS = 4
ZERO_GRADIENT = lambda k: k.endswith("attention.self.key.bias")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
                HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def train_command(task, workdir, overrides):
    cmd = [sys.executable, "-m", "rdr_jax.cli", "train", str(harness.TINY_CONFIGS / f"{task}.yaml"),
           "--workdir", str(workdir), "--no-progress"]
    for item in overrides:
        cmd += ["--set", item]
    return cmd


def two_processes(task, workdir, overrides):
    port = free_port()
    return [subprocess.Popen(train_command(task, workdir, overrides)
                             + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                             env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(2)]


def wait_for(task, procs) -> list[str]:
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=500)
            outputs.append(out)
            assert proc.returncode == 0, f"{task} training process failed:\n{out[-6000:]}"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def run_one_and_two_processes(task, tmp, overrides):
    """1 process x 8 devices and 2 processes x 4 devices, at the same time (all three are mostly idle waits)."""
    single = subprocess.Popen(train_command(task, tmp / "single", overrides), env=cpu_env(8),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = wait_for(task, [single, *two_processes(task, tmp / "multi", overrides)])
    return {"single": tmp / "single", "multi": tmp / "multi", "logs": outputs}


COMMON = [f"train.steps={STEPS}", "train.batch_size=8", "train.checkpoint_every=2", "optim.adam_eps=1e-3",
          "train.tensorboard=false", "train.min_free_gb=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    bert = harness.tiny_bert_dir(tmp / "bert")
    data = harness.write_rdr_jsonl(tmp / "rdr.jsonl", 32, k=4)
    dev_qa, dev_passages = write_dev_recall_files(tmp, 24)
    return run_one_and_two_processes("rdr", tmp, harness.tiny_overrides("rdr", bert, data)
                                     + COMMON + ["task.nll_weight=0.5", f"data.dev_qa={dev_qa}",
                                                 f"data.dev_passages={dev_passages}", "data.dev_k=[1,5]",
                                                 f"train.eval_every={STEPS}"])


def write_dev_recall_files(tmp, n):
    """Dev recall data: the first ``n`` dev questions of the embedded data and their passages (each process
    encodes and ranks its share of them; the top-k are merged)."""
    dev = json.loads((harness.REPO_ROOT / "rdr_jax" / "data" / "embedded" / "dev.biencoder.json").read_text())[:n]
    passages = {str(c["passage_id"]): {"id": str(c["passage_id"]), "title": c["title"], "text": c["text"]}
                for ex in dev for c in ex["positive_ctxs"][:1] + ex["hard_negative_ctxs"] + ex["negative_ctxs"]}
    (tmp / "dev.qa.jsonl").write_text("".join(json.dumps({"question": ex["question"], "answers": ex["answers"]})
                                              + "\n" for ex in dev))
    return tmp / "dev.qa.jsonl", harness.write_passages_tsv(tmp / "dev.passages.tsv", list(passages.values()))


@pytest.fixture(scope="module")
def dgr_runs(tmp_path_factory):
    """DGR's tiny config as is: a random T5 and its tokenizer built from model.init in the (shared) workdir."""
    return run_one_and_two_processes("dgr", tmp_path_factory.mktemp("multiprocess_dgr"), COMMON)


@pytest.fixture(scope="module")
def dpr_runs(tmp_path_factory):
    """DPR (2 hard negatives per question, sampled per example) on 1 x 8 and 2 x 4; then the 2-process run
    resumed from its step-2 checkpoint, its batches built by a grain worker process in each process."""
    tmp = tmp_path_factory.mktemp("multiprocess_dpr")
    bert = harness.tiny_bert_dir(tmp / "bert")
    data = harness.write_biencoder_json(tmp / "dpr.json", 32)
    overrides = harness.tiny_overrides("dpr", bert, data) + COMMON + ["data.hard_negatives=2"]
    runs = run_one_and_two_processes("dpr", tmp, overrides)
    resumed = tmp / "resumed"
    shutil.copytree(runs["multi"], resumed, ignore=shutil.ignore_patterns("final"))
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    runs["resumed_logs"] = wait_for("dpr", two_processes("dpr", resumed, overrides + ["data.workers=1"]))
    runs["resumed"] = resumed
    return runs


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_log_the_losses_of_one(runs):
    single, multi = read_metrics(runs["single"]), read_metrics(runs["multi"])
    # metrics.jsonl is written once (process 0), one record per step
    assert [m["step"] for m in single] == [m["step"] for m in multi] == list(range(1, STEPS + 1))
    assert single[0]["loss"] != single[-1]["loss"]   # it trained
    # grad_norm is a float32 sum of squares over every gradient entry, reduced across devices in another order
    # (8 local devices vs 2 x 4 through gloo): its rounding grows with sqrt(entries) (1.1e-5 relative seen in CI)
    tolerance = {"loss": 1e-5, "kl": 1e-5, "nll": 1e-5, "grad_norm": 5e-5}
    for a, b in zip(multi, single):
        for key, rtol in tolerance.items():
            assert abs(a[key] - b[key]) <= rtol * max(abs(b[key]), 1e-6), (a["step"], key, a[key], b[key])
    # throughput counts the global batch, not one process's block
    assert "data shard 1 of 2" in runs["logs"][2] and "data shard 0 of 1" in runs["logs"][0]


def test_two_processes_measure_the_dev_recall_of_one(runs):
    """Dev recall split over the processes (each encodes and ranks its half of the dev passages, the top-k merged)
    logs the numbers of one process; process 1 took part (the recall is computed on every process)."""
    single, multi = read_metrics(runs["single"]), read_metrics(runs["multi"])
    keys = ("dev_top1", "dev_top5")
    assert all(k in single[-1] for k in keys) and not any(k in single[0] for k in keys)
    assert {k: multi[-1][k] for k in keys} == {k: single[-1][k] for k in keys}
    assert single[-1]["dev_top5"] > 0


def test_two_processes_train_the_parameters_of_one(runs):
    a = load_file(runs["multi"] / "final" / "question_encoder" / "model.safetensors")
    b = load_file(runs["single"] / "final" / "question_encoder" / "model.safetensors")
    start = load_file(runs["single"].parent / "bert" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    worst = max((float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 0.02)), k)
                for k in a if not ZERO_GRADIENT(k))
    assert worst[0] <= 1e-5, worst
    moved = "question_encoder.bert_model.encoder.layer.0.attention.self.query.weight"
    assert not np.allclose(b[moved], start["encoder.layer.0.attention.self.query.weight"])


def test_two_processes_train_dgr_as_one(dgr_runs):
    single, multi = read_metrics(dgr_runs["single"]), read_metrics(dgr_runs["multi"])
    assert [m["step"] for m in single] == [m["step"] for m in multi] == list(range(1, STEPS + 1))
    for a, b in zip(multi, single):
        for key in ("loss", "ranking_loss", "generation_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(abs(b[key]), 1e-6), (a["step"], key, a[key], b[key])
    a = load_file(dgr_runs["multi"] / "final" / "retriever" / "model.safetensors")
    b = load_file(dgr_runs["single"] / "final" / "retriever" / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    worst = max((float(np.max(np.abs(a[k] - b[k])) / max(np.max(np.abs(b[k])), 0.02)), k) for k in a)
    assert worst[0] <= 1e-5, worst


def test_two_processes_train_dpr_as_one_and_resume_exactly(dpr_runs):
    single, multi = read_metrics(dpr_runs["single"]), read_metrics(dpr_runs["multi"])
    assert [m["step"] for m in single] == [m["step"] for m in multi] == list(range(1, STEPS + 1))
    assert single[0]["loss"] != single[-1]["loss"]
    for a, b in zip(multi, single):
        for key, rtol in (("loss", 1e-5), ("accuracy", 1e-6), ("grad_norm", 5e-5)):
            assert abs(a[key] - b[key]) <= rtol * max(abs(b[key]), 1e-6), (a["step"], key, a[key], b[key])
    # the resumed run (steps 3-4 from checkpoint 2, batches from grain workers) logs exactly what the
    # uninterrupted one did, and ends on the same parameters
    resumed = read_metrics(dpr_runs["resumed"])
    assert "resumed from" in dpr_runs["resumed_logs"][0] and "grain worker" in dpr_runs["resumed_logs"][0]
    assert [m["step"] for m in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed[2:], multi[2:]):
        assert {k: a[k] for k in ("loss", "accuracy", "grad_norm")} == {k: b[k] for k in ("loss", "accuracy",
                                                                                          "grad_norm")}
    a = load_file(dpr_runs["resumed"] / "final" / "question_encoder" / "model.safetensors")
    b = load_file(dpr_runs["multi"] / "final" / "question_encoder" / "model.safetensors")
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_two_processes_write_shared_checkpoints(runs):
    for name in ("single", "multi"):
        steps = sorted(int(p.name) for p in (runs[name] / "checkpoints").iterdir() if p.name.isdigit())
        assert steps == [2, 4], (name, steps)
    assert not [p for p in (runs["multi"] / "checkpoints").iterdir() if "tmp" in p.name]


# ---- the data-shard arithmetic, in process --------------------------------------------------------------------

class _Task:
    question_field = "q"
    index_fields = {"positive_index": ("p", "p_emb")}


def _global_batch(b=8, k=3):
    return {"q": np.arange(b)[:, None] * 10, "p": np.arange(b * k)[:, None],
            "positive_index": np.array([i * k + (i % k) if i % 3 else -1 for i in range(b)], np.int32)}


def test_process_blocks_put_together_are_the_global_batch():
    from rdr_jax.data.batching import EpochIterator

    def make_batch(idx, rng):
        k = 3
        return {"q": np.asarray(idx)[:, None] * 10,
                "p": (np.asarray(idx)[:, None] * k + np.arange(k)).reshape(-1, 1),
                "positive_index": (np.arange(len(idx)) * k + 1).astype(np.int32)}

    whole = EpochIterator(20, 8, seed=3, make_batch=make_batch)
    parts = [EpochIterator(20, 8, seed=3, make_batch=make_batch) for _ in range(2)]
    for i, it in enumerate(parts):
        it.set_shard(i, 2)
    for _ in range(5):   # crosses an epoch boundary (20 examples, batches of 8)
        expected = next(whole)
        blocks = [globalize_index_fields(next(it), _Task, i) for i, it in enumerate(parts)]
        for key in expected:
            np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), expected[key], err_msg=key)
    assert parts[0].get_state() == parts[1].get_state() == whole.get_state()
    with pytest.raises(ValueError, match="batch_size=8"):
        EpochIterator(20, 8, 0, make_batch).set_shard(0, 3)


def test_dev_blocks_keep_global_indices():
    batch = _global_batch()
    blocks = [local_block(batch, _Task, i, 2) for i in range(2)]
    for key in batch:
        np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), batch[key])
    assert globalize_index_fields(batch, _Task, 0) is batch   # block 0's local indices are global ones


def test_cluster_environment_detection():
    assert detect_environment({}) is None
    assert detect_environment({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"}) == "SLURM"
    assert detect_environment({"OMPI_COMM_WORLD_SIZE": "4"}) == "Open MPI"
    assert detect_environment({"TPU_WORKER_HOSTNAMES": "a,b"}) == "TPU pod"


def test_cli_rejects_partial_multiprocess_arguments(tmp_path, capsys):
    from rdr_jax.cli import main

    config = str(harness.TINY_CONFIGS / "rdr.yaml")
    assert main(["train", config, "--workdir", str(tmp_path), "--coordinator", "127.0.0.1:1"]) == 2
    assert "--num-processes" in capsys.readouterr().err
    assert main(["train", config, "--workdir", str(tmp_path), "--distributed", "auto", "--coordinator",
                 "127.0.0.1:1", "--num-processes", "2", "--process-id", "0"]) == 2
    assert "--distributed auto" in capsys.readouterr().err


# ---- corpus encoding split over processes ---------------------------------------------------------------------

class _FakeEncoder:
    """Deterministic per-row 'embeddings' of the token ids through the real runner (no trained model: this
    checks the file bookkeeping)."""

    def __init__(self):
        import jax.numpy as jnp
        from flax import nnx

        from rdr_jax.retrieval.runner import InferenceRunner, TokenizePool

        class Features(nnx.Module):
            def __call__(self, ids, mask, types):
                return jnp.stack([(ids * mask).sum(-1), mask.sum(-1), ids[:, 1]], 1).astype(jnp.float32)

        self.runner, self.pool = InferenceRunner(Features(), lambda out: out, 4), TokenizePool(1)


def test_corpus_encoding_split_over_processes_reads_back_in_corpus_order(tmp_path, minilm_dir):
    import transformers

    from rdr_jax.retrieval.encode import encode_corpus, iter_shards, load_encoded

    tokenizer = transformers.BertTokenizerFast.from_pretrained(minilm_dir)
    passages = [{"id": f"p{i}", "title": f"T{i}", "text": "word " * (i % 5) + str(i)} for i in range(23)]
    encode_corpus(_FakeEncoder(), tokenizer, iter(passages), tmp_path / "one", max_length=16, shard_size=5,
                  progress=False)
    split = tmp_path / "split"
    encode_corpus(_FakeEncoder(), tokenizer, iter(passages), split, max_length=16, shard_size=5, progress=False,
                  shard_index=1, shard_count=2)
    assert sorted(p.name for p in split.glob("embeddings-*.npy")) == ["embeddings-00001.npy", "embeddings-00003.npy"]
    with pytest.raises(ValueError, match="incomplete"):
        load_encoded(split)                      # process 0's part is missing
    encode_corpus(_FakeEncoder(), tokenizer, iter(passages), split, max_length=16, shard_size=5, progress=False,
                  shard_index=0, shard_count=2)
    want, want_ids = load_encoded(tmp_path / "one")
    got, got_ids = load_encoded(split)
    assert got_ids == want_ids == [p["id"] for p in passages]
    np.testing.assert_array_equal(got, want)
    assert [ids for _, ids in iter_shards(split)] == [ids for _, ids in iter_shards(tmp_path / "one")]
    with pytest.raises(ValueError, match="other settings"):  # a different split of the same directory
        encode_corpus(_FakeEncoder(), tokenizer, iter(passages), split, max_length=16, shard_size=5,
                      progress=False, shard_index=0, shard_count=3)

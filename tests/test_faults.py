"""Faults: preemption (SIGTERM) then resume equals an uninterrupted run; a partial/broken checkpoint leaves the
previous one restorable; NaN/Inf under train.nan_policy stop and skip; teacher scores that do not match are
refused before any step; a workdir that cannot hold the run is reported at start.

All runs use the tiny RDR config with precomputed teacher scores on one CPU device. The SIGTERM runs are
subprocesses (`rdr-jax train`) with the matmul precision of this process, so their numbers are comparable
bit for bit with the in-process uninterrupted run.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from rdr_jax.data import rdr_data
from rdr_jax.training import faults

import harness
from rdr_jax.tasks import load_config
from rdr_jax.training.loop import make_task, train

STEPS = 12   # long enough that a SIGTERM sent at step 2 lands mid-run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    bert = harness.tiny_bert_dir(tmp / "bert")
    return {"tmp": tmp, "bert": bert, "rdr": harness.write_rdr_jsonl(tmp / "rdr.jsonl", 32, k=4)}


pytestmark = pytest.mark.usefixtures("compilation_cache")


def overrides(files, data=None, *extra):
    return harness.tiny_overrides("rdr", files["bert"], data or files["rdr"]) + [
        "train.batch_size=8", "train.tensorboard=false", "train.min_free_gb=0", *extra]


def config(files, workdir, *extra, data=None):
    return load_config(harness.TINY_CONFIGS / "rdr.yaml", overrides(files, data, *extra), workdir=str(workdir))


def read_metrics(workdir):
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def checkpoint_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(files):
    workdir = files["tmp"] / "uninterrupted"
    train(config(files, workdir, f"train.steps={STEPS}", "train.checkpoint_every=100"), progress=False)
    return workdir


# ---- preemption ----------------------------------------------------------------------------------------------

def test_sigterm_checkpoints_and_resume_equals_uninterrupted(files, uninterrupted):
    workdir = files["tmp"] / "preempted"
    cmd = [sys.executable, "-m", "rdr_jax.cli", "train", str(harness.TINY_CONFIGS / "rdr.yaml"), "--workdir",
           str(workdir), "--no-progress"]
    for item in overrides(files, None, f"train.steps={STEPS}", "train.checkpoint_every=100"):
        cmd += ["--set", item]
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest", HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            steps = [m["step"] for m in read_metrics(workdir)]
            if steps and steps[-1] >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be preempted"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == faults.PREEMPTED_EXIT_CODE, out[-4000:]
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    assert f"checkpoint of step {saved[0]}" in out and "preempted" in out
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, saved[0] + 1))
    assert not (workdir / "final").exists()

    # The same config again resumes and finishes (here in this process: same numerics, no second start-up);
    # the result equals the run nobody interrupted.
    assert train(config(files, workdir, f"train.steps={STEPS}", "train.checkpoint_every=100"),
                 progress=False)["step"] == STEPS
    assert [m["loss"] for m in read_metrics(workdir)] == [m["loss"] for m in read_metrics(uninterrupted)]
    a = load_file(workdir / "final" / "question_encoder" / "model.safetensors")
    b = load_file(uninterrupted / "final" / "question_encoder" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after preemption + resume"


# ---- checkpoints killed mid-write ----------------------------------------------------------------------------

def test_partial_checkpoints_leave_the_previous_one_restorable(files, uninterrupted):
    workdir = files["tmp"] / "partial"
    train(config(files, workdir, "train.steps=2", "train.checkpoint_every=2"), progress=False)
    ckpt = workdir / "checkpoints"
    assert checkpoint_steps(workdir) == [2]
    # A save killed before its rename (orbax's temporary directory) ...
    tmp_dir = ckpt / "4.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpt / "2", tmp_dir)
    shutil.rmtree(tmp_dir / "state")
    # ... and a step directory whose arrays are gone (a truncated copy on a non-atomic filesystem).
    shutil.copytree(ckpt / "2", ckpt / "3")
    for p in (ckpt / "3" / "state").rglob("*"):
        if p.is_file() and "metadata" not in p.name:
            p.unlink()

    result = train(config(files, workdir, "train.steps=4", "train.checkpoint_every=2"), progress=False)
    assert result["step"] == 4
    assert checkpoint_steps(workdir) == [2, 4]
    assert not tmp_dir.exists()
    # steps 3-4 ran from the restored step-2 state: the same losses as the uninterrupted run
    got = {m["step"]: m["loss"] for m in read_metrics(workdir)}
    want = {m["step"]: m["loss"] for m in read_metrics(uninterrupted)}
    assert [got[s] for s in (1, 2, 3, 4)] == [want[s] for s in (1, 2, 3, 4)]


# ---- NaN / Inf -----------------------------------------------------------------------------------------------

class PoisonedBatches:
    """The task's batches, with +inf teacher scores in the batch of step ``bad`` (a test-only data hook)."""

    def __init__(self, cfg, bad: int):
        self.inner = make_task(cfg).train_iterator(cfg.train.batch_size, cfg.train.seed)
        self.bad, self.step = bad, 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        self.step += 1
        if self.step == self.bad:
            batch = dict(batch, teacher_scores=np.full_like(batch["teacher_scores"], np.inf))
        return batch

    def get_state(self):   # the task iterator's own format, so a clean rerun resumes from these checkpoints
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def test_nan_policy_stop_names_the_step_and_keeps_the_last_good_state(files, uninterrupted):
    workdir = files["tmp"] / "nan_stop"
    cfg = config(files, workdir, "train.steps=5", "train.checkpoint_every=100", "train.nan_policy=stop")
    with pytest.raises(faults.NonFiniteLossError, match="step 3") as err:
        train(cfg, iterator=PoisonedBatches(cfg, bad=3), progress=False)
    assert err.value.step == 3
    assert checkpoint_steps(workdir) == [2]           # the last good state
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2]
    # that checkpoint is the uninterrupted run's step 2: resuming on clean data reproduces its step 3
    train(config(files, workdir, "train.steps=3", "train.checkpoint_every=100"), progress=False)
    got = read_metrics(workdir)[-1]
    assert got["step"] == 3 and got["loss"] == read_metrics(uninterrupted)[2]["loss"]


def test_nan_policy_skip_skips_the_update_and_counts_it(files):
    workdir = files["tmp"] / "nan_skip"
    cfg = config(files, workdir, "train.steps=5", "train.checkpoint_every=100", "train.nan_policy=skip")
    result = train(cfg, iterator=PoisonedBatches(cfg, bad=3), progress=False)
    assert result["step"] == 5
    metrics = read_metrics(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [m["skipped_steps"] for m in metrics] == [0, 0, 1, 1, 1]
    assert metrics[2]["loss"] is None                  # logged as null, valid JSON
    assert all(math.isfinite(m["loss"]) for m in metrics if m["step"] != 3)
    assert (workdir / "final" / "question_encoder" / "model.safetensors").is_file()
    final = load_file(workdir / "final" / "question_encoder" / "model.safetensors")
    assert all(np.all(np.isfinite(v)) for v in final.values())   # the bad update never reached the weights


# ---- teacher scores ------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit):
    lines = [json.loads(line) for line in src.read_text().splitlines()]
    edit(lines)
    dst.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    return dst


def _teacher_dataset(files, out_dir, short_row: int):
    """The RDR JSONL as the TFDS teacher-score dataset `rdr-jax teacher-scores` writes, with row ``short_row``
    missing its last relevance logit."""
    from rdr_jax.data.tfds_format import write_dataset
    from rdr_jax.retrieval.reader import teacher_scores_features

    rows = []
    for i, line in enumerate(files["rdr"].read_text().splitlines()):
        r = json.loads(line)
        ctxs = r["ctxs"]
        logits = np.array([c["teacher_score"] for c in ctxs], np.float32)
        rows.append({"question": r["question"], "answers": r["answers"],
                     "passage_ids": [f"p{i}-{k}" for k in range(len(ctxs))], "titles": [c["title"] for c in ctxs],
                     "texts": [c["text"] for c in ctxs], "has_answer": np.array([c["has_answer"] for c in ctxs]),
                     "retriever_scores": np.zeros(len(ctxs), np.float32),
                     "relevance_logits": logits[:-1] if i == short_row else logits,
                     "span_scores": np.zeros(len(ctxs), np.float32)})
    return write_dataset(out_dir, "teacher_scores", teacher_scores_features(), {"train": rows})


@pytest.mark.parametrize("case", ["missing", "infinite", "miscounted"])
def test_mismatched_teacher_scores_are_refused_before_any_step(files, case):
    def edit(records):
        r = records[5]
        if case == "missing":
            del r["ctxs"][1]["teacher_score"]
        else:
            r["ctxs"][0]["teacher_score"] = float("inf")
    if case == "miscounted":
        data, where, message = _teacher_dataset(files, files["tmp"] / "teacher_ds", 5), "row 5", \
            "2 relevance_logits scores for 3 candidates"
    else:
        data = _rewrite(files["rdr"], files["tmp"] / f"teacher_{case}.jsonl", edit)
        where, message = "example 5", {"missing": "no 'teacher_score'", "infinite": "not a finite"}[case]
    workdir = files["tmp"] / f"teacher_{case}"
    with pytest.raises(ValueError, match=where) as err:
        train(config(files, workdir, "train.steps=2", data=str(data)), progress=False)
    assert message in str(err.value)
    assert not read_metrics(workdir) and not (workdir / "checkpoints").exists()


def test_teacher_rows_and_question_lists_must_match():
    row = {"question": "q", "passage_ids": ["1", "2", "3"], "relevance_logits": [0.1, 0.2],
           "titles": ["a", "b", "c"]}
    with pytest.raises(ValueError, match="row 7 .*2 relevance_logits scores for 3 candidates"):
        rdr_data.check_teacher_row(row, 7, "teacher_ds")
    row["relevance_logits"] = [0.1, float("nan"), 0.3]
    with pytest.raises(ValueError, match=r"relevance_logits\[1\]"):
        rdr_data.check_teacher_row(row, 7, "teacher_ds")
    row["relevance_logits"] = [0.1, 0.2, 0.3]
    rdr_data.check_teacher_row(row, 7, "teacher_ds", aligned_fields=("titles",))
    with pytest.raises(ValueError, match="titles entries"):
        rdr_data.check_teacher_row(dict(row, titles=["a"]), 7, "teacher_ds", aligned_fields=("titles",))
    rdr_data.check_same_questions(["a", "b"], ["a", "b"], "train.jsonl", "teacher")
    with pytest.raises(ValueError, match="question 1 is 'c'"):
        rdr_data.check_same_questions(["a", "b"], ["a", "c"], "train.jsonl", "teacher")
    with pytest.raises(ValueError, match="3 questions"):
        rdr_data.check_same_questions(["a", "b"], ["a", "b", "c"], "train.jsonl", "teacher")


# ---- the workdir ---------------------------------------------------------------------------------------------

def test_unwritable_or_full_workdir_is_reported_at_start(files, tmp_path, capsys):
    from rdr_jax.cli import main

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    args = ["train", str(harness.TINY_CONFIGS / "rdr.yaml"), "--no-progress"]
    for item in overrides(files, None, "train.steps=2"):
        args += ["--set", item]
    start = time.perf_counter()
    assert main(args + ["--workdir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot create" in err and str(blocker / "run") in err and len(err.splitlines()) == 1
    assert main(args + ["--workdir", str(tmp_path / "full"), "--set", "train.min_free_gb=1000000000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "GB free" in err and "train.min_free_gb" in err
    assert not (tmp_path / "full" / "metrics.jsonl").exists()
    assert time.perf_counter() - start < 20    # nothing was built or compiled
    if os.geteuid() != 0:   # root writes anywhere: only then can permissions make a directory unwritable
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        assert main(args + ["--workdir", str(locked)]) == 2
        assert "not writable" in capsys.readouterr().err

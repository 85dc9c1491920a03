"""`rdr-jax train` loses no work and writes nothing wrong: Ctrl-C checkpoints like SIGTERM (a second one stops at
once), a resumed run logs no step twice, a workdir holding another run is refused untouched; `--set` takes
several pairs; `--version`, `--quiet`; no JAX backend-probe noise; the lazy subpackages of ``import rdr_jax``.

The first Ctrl-C run is a real `rdr-jax train configs/tiny/dpr.yaml` subprocess (tiny random BERT, embedded data);
the second-Ctrl-C run sends itself both signals from inside a batch, so its timing is fixed.
"""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rdr_jax.cli import build_parser, main
from rdr_jax.training import faults
from rdr_jax.tasks import load_config
from rdr_jax.training.loop import train
from rdr_jax.training.metrics_log import MetricsWriter

ROOT = Path(__file__).resolve().parent.parent
TINY = "configs/tiny/dpr.yaml"
QUICK = ["train.tensorboard=false", "train.min_free_gb=0"]

pytestmark = pytest.mark.usefixtures("compilation_cache")


def read_steps(workdir):
    path = Path(workdir) / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def checkpoint_steps(workdir):
    ckpt = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


class Train:
    """`rdr-jax train` in a subprocess from the repository root, its output collected line by line."""

    def __init__(self, workdir, *sets, cache=None):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env.pop("XLA_FLAGS", None)
        env.pop("JAX_PLATFORMS", None)   # as a user runs it: JAX probes its backends (and must not say so)
        if cache:
            env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        cmd = [sys.executable, "-m", "rdr_jax.cli", "train", TINY, "--workdir", str(workdir), "--no-progress",
               "--set", *QUICK, *sets]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(iter(self.proc.stdout.readline, "")),
                                       daemon=True)
        self.reader.start()

    def wait_for(self, condition, what, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            assert self.proc.poll() is None, f"the run ended before {what}:\n{self.output[-4000:]}"
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output[-4000:]}")

    def saw(self, text):
        return any(text in line for line in list(self.lines))

    def finish(self, timeout=300) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        self.reader.join(timeout=10)
        return self.proc.returncode

    @property
    def output(self):
        return "".join(self.lines)


# ---- Ctrl-C ----------------------------------------------------------------------------------------------------

def test_ctrl_c_checkpoints_exits_75_and_the_rerun_logs_each_step_once(tmp_path, caplog):
    workdir = tmp_path / "run"
    run = Train(workdir, "train.steps=40", "train.checkpoint_every=100", cache=tmp_path / "xla")
    try:
        run.wait_for(lambda: len(read_steps(workdir)) >= 2, "step 2")
        run.proc.send_signal(signal.SIGINT)
        code = run.finish()
    finally:
        if run.proc.poll() is None:
            run.proc.kill()
    out = run.output
    assert code == faults.PREEMPTED_EXIT_CODE, out[-4000:]
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and 2 <= saved[0] < 40, saved            # the step in flight, checkpointed
    assert "SIGINT (Ctrl-C) received" in out and f"checkpoint of step {saved[0]}" in out
    assert "interrupted" not in out and "Traceback" not in out
    assert "Unable to initialize backend" not in out                # JAX's probe of absent backends is not shown
    assert read_steps(workdir) == list(range(1, saved[0] + 1))

    # The same command again (here in-process, with --quiet) resumes there; each step is logged once.
    end = saved[0] + 2
    caplog.set_level(logging.INFO)
    assert main(["--quiet", "train", str(ROOT / TINY), "--workdir", str(workdir), "--no-progress", "--set",
                 *QUICK, f"train.steps={end}", "train.checkpoint_every=100"]) == 0
    assert read_steps(workdir) == list(range(1, end + 1))
    assert not [r for r in caplog.records if r.levelno < logging.WARNING]   # --quiet: warnings and errors only
    assert logging.root.manager.disable == logging.NOTSET              # and only for that command


def test_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path, monkeypatch, capsys):
    """Both Ctrl-Cs arrive while step 3's batch is built on the main thread (real signals, real handlers, the
    real CLI in-process): the first asks for a checkpoint after step 3, the second stops before step 3 runs.
    Sending them from outside (a subprocess) raced the run: on a fast or cache-warm machine the first Ctrl-C's
    checkpoint and exit were done before the second arrived."""
    from rdr_jax.data.dpr_data import DPRData

    calls = []
    make_batch = DPRData.make_batch

    def interrupted_batch(self, idx, rng):
        calls.append(len(idx))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)        # the first handler runs here: checkpoint after this step
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)          # the second raises KeyboardInterrupt here: stop at once
            raise AssertionError("the second Ctrl-C did not stop the run")
        return make_batch(self, idx, rng)

    monkeypatch.setattr(DPRData, "make_batch", interrupted_batch)
    before = signal.getsignal(signal.SIGINT)   # not always Python's default: an xdist worker may ignore SIGINT
    workdir = tmp_path / "run"
    code = main(["train", str(ROOT / TINY), "--workdir", str(workdir), "--no-progress", "--set", *QUICK,
                 "train.steps=40", "train.checkpoint_every=100", "train.log_every=1", "data.workers=0"])
    err = capsys.readouterr().err
    assert code == 130, err[-4000:]
    assert err.strip().splitlines()[-1] == "rdr-jax train: interrupted"
    assert len(calls) == 3
    assert checkpoint_steps(workdir) == []           # the first Ctrl-C alone would have checkpointed step 3
    assert read_steps(workdir) == [1, 2]
    assert signal.getsignal(signal.SIGINT) == before   # the handlers were put back


def test_preemption_watcher_signals(tmp_path):
    """In-process: SIGINT then SIGINT (KeyboardInterrupt), SIGTERM then SIGINT; handlers restored on close."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for first in (signal.SIGINT, signal.SIGTERM):
        watcher = faults.PreemptionWatcher()
        try:
            assert not watcher.requested(1)
            os.kill(os.getpid(), first)
            time.sleep(0.05)   # the handler runs in this (main) thread at the next bytecode
            assert watcher.requested(1)
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        finally:
            watcher.close()
        assert {s: signal.getsignal(s) for s in before} == before


def test_resume_drops_metrics_rows_past_the_checkpoint(tmp_path):
    """A run killed after logging steps past its last checkpoint (kill -9, a second Ctrl-C, a crash): the rerun
    starts from the checkpoint and rewrites those steps, which must not appear twice."""
    workdir = tmp_path / "run"
    cfg = lambda steps: load_config(ROOT / TINY, [*QUICK, f"train.steps={steps}", "train.checkpoint_every=2"],
                                    workdir=str(workdir))
    train(cfg(4), progress=False)
    with (workdir / "metrics.jsonl").open("a") as f:   # steps 5-7 of the killed run, the last one cut off
        f.write('{"step": 5, "loss": 9.0}\n{"step": 6, "loss": 9.0}\n{"step": 7, "lo')
    train(cfg(6), progress=False)
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] != 9.0 for r in rows)
    assert not list(workdir.glob("metrics.jsonl.tmp"))


def test_metrics_writer_keeps_the_file_when_nothing_is_past_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    mtime = path.stat().st_mtime_ns
    MetricsWriter(tmp_path, tensorboard=False, enabled=True, resumed_at=2)
    assert path.stat().st_mtime_ns == mtime
    MetricsWriter(tmp_path, tensorboard=False, enabled=True, resumed_at=0)   # no checkpoint: a fresh start
    assert path.read_text() == ""


# ---- another run's workdir -------------------------------------------------------------------------------------

def snapshot(directory: Path) -> dict:
    """Every path under ``directory`` (itself included) -> (mtime, content hash for files)."""
    out = {}
    for p in [directory, *sorted(directory.rglob("*"))]:
        st = p.lstat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        out[str(p.relative_to(directory))] = (st.st_mtime_ns, digest)
    return out


def test_training_into_another_runs_workdir_is_refused_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "dpr_run"
    train(load_config(ROOT / TINY, [*QUICK, "train.steps=2"], workdir=str(workdir)), progress=False)
    before = snapshot(workdir)
    cases = {  # --set, what the one-line refusal must name
        "cross_encoder.yaml": ([], ["'dpr'", "'cross_encoder'"]),
        "dpr.yaml": (["model.init.hidden_size=64"], ["'dpr'", "model.init", "use another --workdir"]),
    }
    for config, (sets, expected) in cases.items():
        args = ["train", str(ROOT / "configs" / "tiny" / config), "--workdir", str(workdir), "--no-progress",
                "--set", *QUICK, "train.steps=4", *sets]
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(workdir) in err, err
        for text in expected:
            assert text in err, err
        assert snapshot(workdir) == before   # no file added, rewritten or touched


def test_same_run_check_allows_runtime_model_settings(tmp_path):
    cfg = load_config(ROOT / TINY, QUICK, workdir=str(tmp_path)).to_dict()
    faults.check_same_run(tmp_path, cfg)   # no config.yaml yet: a new run
    import yaml

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    cfg["model"].update(remat=True, dtype="bfloat16", unpad=True)
    cfg["train"]["steps"] = 100
    faults.check_same_run(tmp_path, cfg)   # resuming with remat / bf16 / more steps is the same run
    cfg["model"]["param_dtype"] = "bfloat16"
    with pytest.raises(faults.WorkdirError, match="model.param_dtype"):
        faults.check_same_run(tmp_path, cfg)


# ---- the command line ------------------------------------------------------------------------------------------

def test_set_takes_several_pairs_and_repeats(capsys, tmp_path):
    args = build_parser().parse_args(["train", TINY, "--set", "a=1", "b=2", "--set", "c=3", "--no-progress"])
    assert args.overrides == ["a=1", "b=2", "c=3"] and args.config == TINY
    # the second pair of one --set reaches the config (its error names it)
    assert main(["train", str(ROOT / TINY), "--workdir", str(tmp_path), "--set", "train.steps=2",
                 "optim.warmup_stepz=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "optim.warmup_stepz" in err and len(err.splitlines()) == 1
    # the config path after --set: one line saying so, not "the following arguments are required"
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["train", "--set", "train.steps=2", TINY])
    assert exit_info.value.code == 2
    assert "is not KEY=VALUE (write the config path before --set)" in capsys.readouterr().err


def test_version_and_quiet_flags(capsys):
    import rdr_jax

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"rdr-jax {rdr_jax.__version__}" == "rdr-jax 0.1.0"
    assert build_parser().parse_args(["--quiet", "train", TINY]).quiet


def test_documented_top_level_flags_exist():
    """`rdr-jax --flag` lines of the README (tests/test_readme.py checks the subcommands' flags)."""
    import re

    documented = set(re.findall(r"rdr-jax (--[a-z][a-z-]*)", (ROOT / "README.md").read_text()))
    assert {"--version", "--quiet"} <= documented
    options = {o for a in build_parser()._actions for o in a.option_strings}
    assert documented <= options, documented - options


def test_backend_probe_line_is_silenced_but_warnings_pass():
    from rdr_jax.cli import _NoBackendProbeNoise

    def record(level, msg):
        return logging.LogRecord("jax._src.xla_bridge", level, __file__, 1, msg, None, None)

    f = _NoBackendProbeNoise()
    assert not f.filter(record(logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: Failed to open "
                                             "libtpu.so"))
    assert f.filter(record(logging.WARNING, "A Google TPU may be present on this machine, but either a "
                                            "TPU-enabled jaxlib or libtpu is not installed."))
    assert f.filter(record(logging.INFO, "some other JAX line"))


# ---- import rdr_jax --------------------------------------------------------------------------------------------

def test_subpackages_resolve_lazily_after_import_rdr_jax():
    code = """
import importlib, sys
import rdr_jax
assert "jax" not in sys.modules, "import rdr_jax loaded JAX"
names = ["models", "decoding", "data", "retrieval", "training", "tasks", "convert", "losses"]
assert set(names) <= set(dir(rdr_jax))
assert rdr_jax.decoding.PrefixTrie is importlib.import_module("rdr_jax.decoding.trie").PrefixTrie
for name in names:
    assert getattr(rdr_jax, name) is importlib.import_module("rdr_jax." + name), name
assert callable(rdr_jax.losses.dpr_nll)
try:
    rdr_jax.nosuchthing
except AttributeError as e:
    assert "nosuchthing" in str(e)
else:
    raise AssertionError("no AttributeError")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_a_swallowed_second_ctrl_c_still_stops_the_run():
    """The second Ctrl-C's KeyboardInterrupt can land in a callback that swallows it (XLA's GC hook while a step
    compiles, seen in CI): the loop's next check raises it again, before metrics or a checkpoint are written."""
    watcher = faults.PreemptionWatcher()
    try:
        watcher._on_signal(signal.SIGINT, None)            # the first: checkpoint after the step
        assert watcher.requested(1) and not watcher.aborted
        try:
            watcher._on_signal(signal.SIGINT, None)        # the second, raised where something swallows it
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):
            watcher.raise_if_aborted()
        with pytest.raises(KeyboardInterrupt):
            watcher.requested(1)
    finally:
        watcher.close()

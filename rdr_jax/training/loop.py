"""``train(config)``: the generic loop for every task.

Builds the mesh, the task's model(s) and the sharded train state; resumes from the latest checkpoint in
``WORKDIR/checkpoints``; runs jit-compiled steps on batches from the task's iterator; logs to
``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and TensorBoard (``WORKDIR/tensorboard``, when
tensorboardX is installed); evaluates on dev batches every ``train.eval_every`` steps, together with the
task's retrieval metrics (``Task.retrieval_eval``: e.g. ``dev_top1``/``dev_top5``/``dev_top20`` answer recall of the
bi-encoder tasks with ``data.dev_qa``), which ``train.best_metric`` may name; and at the end writes the trained
submodules as Hugging Face directories under ``WORKDIR/final/``.

Compute accounting (``flops.FlopsMeter``): each step's FLOPs are the task's analytic count of its global
batch's shapes (``Task.step_flops``, not XLA's cost analysis, which misses a GPU's cuBLAS GEMMs);
``flops_per_step`` is logged with the first record, ``mfu`` with every record when the device's bf16 peak is
known (``flops.PEAK_BF16_FLOPS``, or ``train.peak_flops`` per device: a CPU has none). Step times exclude the
time spent in evaluation; the first record's window includes compilation.

Host accounting (``host_metrics``) in every record and the progress bar: real and padded tokens/s of the task's
token masks, ``input_wait_share`` (of step time spent waiting for the batch), ``host_peak_rss_gb`` (process 0).

Multi-process (after ``jax.distributed`` is up, see ``distributed.py``): every process runs this same loop;
each reads only its block of every global batch; process 0 alone writes metrics, TensorBoard, config.yaml and
the HF export; all take part in orbax checkpoints. Faults (``faults.py``): the workdir is checked before
anything compiles (and refused when it holds another task's or model's run), SIGTERM and a first Ctrl-C
checkpoint and return ``preempted``, NaN/Inf follow ``train.nan_policy``. A resumed run drops the
``metrics.jsonl`` rows past its checkpoint, so no step is logged twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from rdr_jax.training import distributed, faults, flops, host_metrics
from rdr_jax.training.checkpoints import Checkpointer
from rdr_jax.training.config import Config
from rdr_jax.training.metrics_log import MetricsWriter
from rdr_jax.training.optim import count_params, make_optimizer
from rdr_jax.training.partitioning import make_mesh, shard_batch
from rdr_jax.training.state import TrainSetup, create_train_state, merge_model
from rdr_jax.training.step import make_eval_step, make_train_step
from rdr_jax.training.task import Task

log = logging.getLogger(__name__)


def evaluate(eval_step, params, frozen, batches: Iterable[dict[str, np.ndarray]], mesh, task=None,
             shard: tuple[int, int] = (0, 1)) -> dict[str, float]:
    """Mean of each metric over the dev batches, keys prefixed ``dev_``. Every process reads the whole dev
    batch and places its block (``shard``) of it."""
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        if shard[1] > 1:
            batch = distributed.local_block(batch, task, *shard)
        metrics = jax.device_get(eval_step(params, frozen, shard_batch(batch, mesh)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"dev_{k}": v / n for k, v in sums.items()} if n else {}


class RetrievalEval:
    """``Task.retrieval_eval`` on the current parameters, run on every process (a collective: each process
    searches its share of the dev corpus and the top-k are merged); process 0's numbers are then sent to every
    process (each saves the same checkpoint metrics, which ``train.best_metric`` reads).

    One process: the sharded parameters are merged into the model as they are (the task's encoder reshards
    them onto its devices). Several: every process gathers them to host arrays first (the frozen ones once), as
    no process can address the others' shards, and runs the encoders on its own devices."""

    # JSON of the metrics, broadcast as a fixed-size byte buffer (the other processes do not know the keys)
    BUFFER_BYTES = 8192

    def __init__(self, task: Task, setup: TrainSetup, is_main: bool):
        self.task, self.setup, self.is_main = task, setup, is_main
        self._host_frozen = None

    def __call__(self) -> dict[str, float]:
        if jax.process_count() == 1:
            return dict(self.task.retrieval_eval(merge_model(self.setup)) or {})
        params = distributed.gather_to_host(self.setup.state["params"])
        if self._host_frozen is None:
            self._host_frozen = distributed.gather_to_host(self.setup.frozen)
        model = nnx.merge(self.setup.graphdef, params, self._host_frozen)
        result = dict(self.task.retrieval_eval(model) or {})
        return self._broadcast(result if self.is_main else {})

    def _broadcast(self, result: dict[str, float]) -> dict[str, float]:
        from jax.experimental import multihost_utils

        data = json.dumps({k: float(v) for k, v in result.items()}).encode()
        if len(data) > self.BUFFER_BYTES:
            raise ValueError(f"retrieval_eval returned {len(result)} metrics: too many to share between processes")
        buffer = np.zeros(self.BUFFER_BYTES, np.uint8)
        buffer[:len(data)] = np.frombuffer(data, np.uint8)
        buffer = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
        return json.loads(bytes(buffer[buffer != 0]).decode())


def _restore_iterator(iterator, state, workdir: Path, step: int):
    if state is None:
        return
    if not hasattr(iterator, "set_state"):
        log.warning("%s: the data iterator cannot restore its position; resumed step %d sees the data from "
                    "the start", workdir, step)
        return
    iterator.set_state(state)


@dataclasses.dataclass
class Trainer:
    """Everything a run needs, built from a config: the pieces ``train`` drives (and tests poke at)."""
    config: Config
    mesh: Mesh
    task: Task
    tx: Any
    schedule: Any
    setup: TrainSetup
    train_step: Any


def make_task(config: Config) -> Task:
    return config.task_class(config, Path(config.workdir))


def prepare(config: Config, *, mesh: Mesh | None = None, task: Task | None = None) -> Trainer:
    """Mesh (from ``mesh.*`` unless given), the task's model(s) as a sharded train state, the jit-ed step."""
    t, m = config.train, config.mesh
    if mesh is None:
        mesh = make_mesh(m.data, m.fsdp, m.tensor)
    task = task or make_task(config)
    tx, schedule = make_optimizer(config.optim, t.steps)
    # Process 0 first: a random init model (model.init) is written to the shared workdir once, then read.
    task.mesh = mesh  # build_model loads each parameter's shards straight onto the mesh
    with distributed.main_process_first("build_model"):
        model = task.build_model()
    setup = create_train_state(model, task.trainable_filter(), tx, mesh)
    train_step = make_train_step(task, setup, tx, schedule, mesh, t.grad_accum_steps, t.nan_policy,
                                 t.grad_cache_chunk)
    return Trainer(config, mesh, task, tx, schedule, setup, train_step)


class _DataStates:
    """The iterator's position before each recent step, so a state frozen at an earlier step (nan_policy
    stop, noticed late) is checkpointed with the matching data position."""

    def __init__(self, iterator):
        self.iterator, self.states = iterator, {}

    def record(self, step: int) -> None:
        if hasattr(self.iterator, "get_state"):
            self.states[step] = self.iterator.get_state()

    def at(self, step: int):
        return self.states.get(step)

    def forget_before(self, step: int) -> None:
        self.states = {k: v for k, v in self.states.items() if k >= step}


def train(config: Config, *, iterator=None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns {"step", "metrics" (last logged), "workdir", "preempted"}.

    ``iterator``: any iterator of numpy batch dicts (optionally with ``get_state``/``set_state``), instead of
    the task's own file reader. With several processes it yields this process's block of each global batch
    (index fields local to the block), as the task iterators do.
    """
    workdir = Path(config.workdir)
    t = config.train
    faults.check_same_run(workdir, config.to_dict())   # before anything in the workdir is written
    faults.check_workdir(workdir, t.min_free_gb)    # before anything is built or compiled
    is_main = distributed.is_main_process()
    if is_main:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    mesh = make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    shard = distributed.data_shard(mesh, t.batch_size)
    task = make_task(config)
    if iterator is None:  # read (and validate) the data before building models and compiling
        # (process 0 first: reading may build a random init model and its tokenizer in the shared workdir)
        with distributed.main_process_first("read_data"):
            iterator = task.train_iterator(t.batch_size, t.seed)
        distributed.shard_iterator(iterator, *shard, config.task.name)
    trainer = prepare(config, mesh=mesh, task=task)
    setup, train_step = trainer.setup, trainer.train_step
    log.info("mesh %s; %d trained parameters; data shard %d of %d", dict(mesh.shape),
             count_params(setup.state["params"]), *shard)

    checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing,
                                best_metric=t.best_metric, best_mode=t.best_mode)
    restored = checkpointer.restore_latest(setup.state, setup.state_shardings)
    start = 0
    if restored is not None:
        start, setup.state, data_state = restored
        _restore_iterator(iterator, data_state, workdir, start)
        log.info("resumed from %s at step %d", checkpointer.directory, start)

    eval_step = None
    with distributed.main_process_first("read_dev_data"):   # may convert the dev file into the workdir
        dev_batches = task.dev_batches(t.batch_size) if t.eval_every or t.best_metric else None
    tokenizer = task.tokenizer if shard[1] > 1 else None
    pad_id = (getattr(tokenizer, "pad_token_id", None) or 0) if tokenizer is not None else 0
    if dev_batches is not None:
        eval_step = make_eval_step(task, setup, mesh)
    retrieval_eval = RetrievalEval(task, setup, is_main) if task.has_retrieval_eval() and t.eval_every else None
    if task.has_retrieval_eval() and not t.eval_every:
        log.warning("the task's dev retrieval data is set but train.eval_every is 0: no dev recall is measured")
    meter = flops.FlopsMeter(task, config.get("train.peak_flops") or flops.device_peak_flops(), jax.device_count())
    window_steps = 0
    eval_seconds = 0.0   # time spent evaluating in the current logging window (not step time)
    seed_key = jax.random.PRNGKey(t.seed)
    writer = MetricsWriter(workdir, t.tensorboard, is_main, resumed_at=start)
    watcher = faults.PreemptionWatcher()
    log.info("training steps %d to %d%s", start + 1, t.steps,
             f"; {watcher.handled} checkpoints the step in flight and stops" if watcher.handled else "")
    data_states = _DataStates(iterator)
    last: dict[str, Any] = {}
    skipped_seen = 0
    preempted = False
    window_examples = 0
    window = host_metrics.WindowMeter()   # input wait, real/padded tokens, peak RSS
    window_start = time.perf_counter()
    bar = tqdm(total=t.steps, initial=min(start, t.steps), desc=f"train {config.task.name}", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)

    def stop_if_halted() -> None:
        """nan_policy stop: the state froze at the last good step; checkpoint it and fail naming the bad step."""
        if t.nan_policy != "stop":
            return
        bad = int(jax.device_get(setup.state["halted_at"]))
        if not bad:
            return
        good = bad - 1
        where = "no step had finished, so there is no checkpoint"
        if good > 0:  # the state as it was after step `good`: without the NaN bookkeeping of step `bad`
            scalar = lambda v: jax.device_put(np.int32(v), setup.state_shardings["halted_at"])
            good_state = dict(setup.state, halted_at=scalar(0),
                              nonfinite_steps=scalar(int(jax.device_get(setup.state["nonfinite_steps"])) - 1))
            checkpointer.save(good, good_state, data_states.at(good))
            checkpointer.wait()
            where = f"the last good state (step {good}) is checkpointed in {checkpointer.directory}"
        raise faults.NonFiniteLossError(
            f"step {bad}: the loss or gradients are NaN/Inf (train.nan_policy=stop); {where}. Lower "
            f"optim.learning_rate, check the data of that step, or set train.nan_policy=skip", step=bad)

    try:
        for step in range(start, t.steps):
            data_states.record(step)
            try:
                host_batch = window.next_batch(iterator)
            except StopIteration:
                log.warning("the data iterator ended at step %d (train.steps=%d)", step, t.steps)
                break
            stats = task.batch_stats(host_batch)
            window_examples += stats["examples"] * shard[1]   # per process -> the global batch
            window.add_tokens(stats, shard[1])
            if shard[1] > 1:
                host_batch = distributed.agree_on_lengths(host_batch, pad_id)
                host_batch = distributed.globalize_index_fields(host_batch, task, shard[0])
            batch = shard_batch(host_batch, mesh)
            meter.add(batch)
            setup.state, metrics = train_step(setup.state, setup.frozen, batch, seed_key)
            watcher.raise_if_aborted()
            done = step + 1
            window_steps += 1
            dev = {}
            evaluating = eval_step is not None or retrieval_eval is not None
            if evaluating and t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                stop_if_halted()
                jax.block_until_ready(metrics)   # the step's own time is not counted as evaluation time
                eval_start = time.perf_counter()
                if eval_step is not None:
                    dev = evaluate(eval_step, setup.state["params"], setup.frozen, dev_batches, mesh, task, shard)
                if retrieval_eval is not None:
                    dev.update(retrieval_eval())
                eval_seconds += time.perf_counter() - eval_start
                if t.best_metric and t.best_metric not in dev:
                    raise ValueError(f"train.best_metric={t.best_metric!r} is not among the dev metrics "
                                     f"{sorted(dev)}; name one of them")
            if done % t.log_every == 0 or done == t.steps or dev:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if values.pop("halted_at"):
                    stop_if_halted()
                skipped = int(values.pop("skipped_steps"))
                if t.nan_policy == "skip":
                    values["skipped_steps"] = skipped
                    if skipped > skipped_seen:
                        log.warning("step %d: NaN/Inf loss or gradients: %d update(s) skipped since step %d "
                                    "(%d in all)", done, skipped - skipped_seen, done - t.log_every + 1, skipped)
                    skipped_seen = skipped
                elapsed = max(time.perf_counter() - window_start - eval_seconds, 1e-9)
                values.update(examples_per_sec=window_examples / elapsed, **window.values(elapsed))
                values.update(meter.values(window_steps, elapsed, first=not last))
                values.update(dev)
                watcher.raise_if_aborted()
                writer.write(done, values)
                last = values
                loss = values["loss"]
                bar.set_postfix(loss=f"{loss:.4f}" if math.isfinite(loss) else str(loss),
                                wait=f"{values['input_wait_share']:.0%}", rss=f"{values['host_peak_rss_gb']:.1f}G")
                window_examples = window_steps = 0
                window.reset()
                eval_seconds = 0.0
                window_start = time.perf_counter()
                data_states.forget_before(done)
            preempt = watcher.requested(done)
            if done % t.checkpoint_every == 0 or done == t.steps or preempt:
                stop_if_halted()
                data_state = iterator.get_state() if hasattr(iterator, "get_state") else None
                checkpointer.save(done, setup.state, data_state, metrics=dev or None)
                data_states.forget_before(done)
            bar.update(1)
            if preempt:
                checkpointer.wait()
                log.warning("preempted (%s): checkpoint of step %d written to %s; exiting with code %d. "
                            "Rerun the same command to resume.", watcher.reason, done, checkpointer.directory,
                            faults.PREEMPTED_EXIT_CODE)
                preempted = True
                break
        checkpointer.wait()
        stop_if_halted()
        final_step = int(jax.device_get(setup.state["step"]))
        if t.export_final and final_step >= t.steps and not preempted:
            params = distributed.gather_to_host(setup.state["params"])   # every process takes part
            if is_main:
                task.export(merge_model(setup, params), workdir / "final")
    finally:
        watcher.close()
        bar.close()
        writer.close()
        checkpointer.close()
    return {"step": final_step, "metrics": last, "workdir": str(workdir), "preempted": preempted}

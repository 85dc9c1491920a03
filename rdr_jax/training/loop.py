"""``train(config)``: the generic loop for every task.

Builds the mesh, the task's model(s) and the sharded train state; resumes from the latest checkpoint in
``WORKDIR/checkpoints``; runs jit-compiled steps on batches from the task's iterator; logs to
``WORKDIR/metrics.jsonl`` (one JSON object per logged step) and TensorBoard (``WORKDIR/tensorboard``, when
tensorboardX is installed); evaluates on dev batches every ``train.eval_every`` steps; and at the end writes
the trained submodules as Hugging Face directories under ``WORKDIR/final/``.
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
from jax.sharding import Mesh
from tqdm import tqdm

from rdr_jax.tasks.base import Task, get_task_class
from rdr_jax.training.checkpoints import Checkpointer
from rdr_jax.training.config import Config
from rdr_jax.training.optim import count_params, make_optimizer
from rdr_jax.training.partitioning import make_mesh, shard_batch
from rdr_jax.training.state import TrainSetup, create_train_state, merge_model
from rdr_jax.training.step import make_eval_step, make_train_step

log = logging.getLogger(__name__)


class MetricsWriter:
    """metrics.jsonl (appended, so a resumed run continues the file) + optional TensorBoard."""

    def __init__(self, workdir: Path, tensorboard: bool, enabled: bool):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(workdir / "tensorboard"))
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard logs (pip install tensorboardX)")

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _to_py(v) for k, v in values.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _to_py(v):
    v = np.asarray(v)
    return v.item() if v.ndim == 0 else v.tolist()


def evaluate(eval_step, params, frozen, batches: Iterable[dict[str, np.ndarray]], mesh) -> dict[str, float]:
    """Mean of each metric over the dev batches, keys prefixed ``dev_``."""
    sums: dict[str, float] = {}
    n = 0
    for batch in batches:
        metrics = jax.device_get(eval_step(params, frozen, shard_batch(batch, mesh)))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    return {f"dev_{k}": v / n for k, v in sums.items()} if n else {}


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


def prepare(config: Config, *, mesh: Mesh | None = None) -> Trainer:
    """Mesh (from ``mesh.*`` unless given), the task's model(s) as a sharded train state, the jit-ed step."""
    t, m = config.train, config.mesh
    if mesh is None:
        mesh = make_mesh(m.data, m.fsdp, m.tensor)
    task: Task = get_task_class(config.task.name)(config, Path(config.workdir))
    tx, schedule = make_optimizer(config.optim, t.steps)
    setup = create_train_state(task.build_model(), task.trainable_filter(), tx, mesh)
    train_step = make_train_step(task, setup, tx, schedule, mesh, t.grad_accum_steps)
    return Trainer(config, mesh, task, tx, schedule, setup, train_step)


def train(config: Config, *, iterator=None, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) training; returns {"step", "metrics" (last logged), "workdir"}.

    ``iterator``: any iterator of numpy batch dicts (optionally with ``get_state``/``set_state``), instead of
    the task's own file reader.
    """
    workdir = Path(config.workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    t = config.train
    trainer = prepare(config)
    mesh, task, setup, train_step = trainer.mesh, trainer.task, trainer.setup, trainer.train_step
    log.info("mesh %s; %d trained parameters", dict(mesh.shape), count_params(setup.state["params"]))

    if iterator is None:
        iterator = task.train_iterator(t.batch_size, t.seed)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints, async_save=t.async_checkpointing,
                                best_metric=t.best_metric, best_mode=t.best_mode)
    start = checkpointer.latest_step() or 0
    if start:
        state, data_state = checkpointer.restore(setup.state, setup.state_shardings)
        setup.state = state
        _restore_iterator(iterator, data_state, workdir, start)
        log.info("resumed from %s at step %d", checkpointer.directory, start)

    eval_step = None
    dev_batches = task.dev_batches(t.batch_size) if t.eval_every or t.best_metric else None
    if dev_batches is not None:
        eval_step = make_eval_step(task, setup, mesh)
    seed_key = jax.random.PRNGKey(t.seed)
    writer = MetricsWriter(workdir, t.tensorboard, is_main)
    last: dict[str, Any] = {}
    window_examples = window_tokens = 0
    window_start = time.perf_counter()
    bar = tqdm(total=t.steps, initial=min(start, t.steps), desc=f"train {config.task.name}", unit="step",
               disable=not (progress and is_main), dynamic_ncols=True)
    try:
        for step in range(start, t.steps):
            try:
                host_batch = next(iterator)
            except StopIteration:
                log.warning("the data iterator ended at step %d (train.steps=%d)", step, t.steps)
                break
            stats = task.batch_stats(host_batch)
            window_examples += stats["examples"]
            window_tokens += stats["tokens"]
            setup.state, metrics = train_step(setup.state, setup.frozen, shard_batch(host_batch, mesh), seed_key)
            done = step + 1
            dev = {}
            if eval_step is not None and t.eval_every and (done % t.eval_every == 0 or done == t.steps):
                dev = evaluate(eval_step, setup.state["params"], setup.frozen, dev_batches, mesh)
            if done % t.log_every == 0 or done == t.steps or dev:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(f"step {done}: non-finite metrics {values}")
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                values.update(examples_per_sec=window_examples / elapsed, tokens_per_sec=window_tokens / elapsed,
                              **dev)
                writer.write(done, values)
                last = values
                bar.set_postfix(loss=f"{values['loss']:.4f}")
                window_examples = window_tokens = 0
                window_start = time.perf_counter()
            if done % t.checkpoint_every == 0 or done == t.steps:
                data_state = iterator.get_state() if hasattr(iterator, "get_state") else None
                checkpointer.save(done, setup.state, data_state, metrics=dev or None)
            bar.update(1)
        checkpointer.wait()
        final_step = int(jax.device_get(setup.state["step"]))
        if t.export_final and final_step >= t.steps:
            params = setup.state["params"]
            if jax.process_count() > 1:  # every process takes part in gathering the shards; process 0 writes
                from jax.experimental import multihost_utils
                params = multihost_utils.process_allgather(params, tiled=True)
            if is_main:
                task.export(merge_model(setup, params), workdir / "final")
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    return {"step": final_step, "metrics": last, "workdir": str(workdir)}


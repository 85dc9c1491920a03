"""Orbax checkpoints of the train state and the data iterator's position.

- Saved every ``train.checkpoint_every`` steps (and at the last step), asynchronously: the arrays are
  copied off the devices before ``save`` returns, then written in the background.
- Atomic: orbax writes into a temporary directory (``<step>.orbax-checkpoint-tmp*``) and renames it when
  complete, so a killed run leaves either a whole checkpoint or none; leftover temporary directories are
  removed when the next run starts. A step directory that still cannot be read (a copied or truncated
  checkpoint) is skipped with a warning: ``restore_latest`` falls back to the newest step that restores.
- Multi-process: every process calls ``save``/``restore``; orbax writes each process's shards and process 0
  the metadata and the (global) data-iterator position, and coordinates the commit.
- Kept: the last ``train.keep_checkpoints``, plus the best by ``train.best_metric`` when set.
- Restored straight into the shardings of the current mesh (which may differ from the saving mesh).

The state is stored as a flat ``{"params.question_encoder....": array}`` dict, so orbax only ever sees plain
arrays whatever pytree nodes the optimizer uses; the step's RNG is derived from the seed and the step, so
no RNG state is saved.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def flatten_state(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {}
    for path, leaf in leaves:
        key = jax.tree_util.keystr(path, simple=True, separator=".")
        if key in flat:
            raise ValueError(f"two train-state leaves flatten to the same checkpoint key {key!r}")
        flat[key] = leaf
    return flat, treedef


def unflatten_state(flat: dict[str, Any], like: Any) -> Any:
    keys, treedef = flatten_state(like)
    missing = [k for k in keys if k not in flat]
    if missing:
        raise ValueError(f"checkpoint lacks train-state entries: {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''} (was it written by a different task/config?)")
    return jax.tree_util.tree_unflatten(treedef, [flat[k] for k in keys])


class Checkpointer:
    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True,
                 best_metric: str | None = None, best_mode: str = "min"):
        self.directory = Path(directory).absolute()
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            policies.append(ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[best_metric], reverse=(best_mode == "min"), n=1,
                keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any = None, metrics: dict | None = None) -> bool:
        if step in self.manager.all_steps():
            return False
        flat, _ = flatten_state(state)
        args = ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                  data=ocp.args.JsonSave({"iterator": data_state}))
        return self.manager.save(step, args=args, metrics=metrics, force=True)

    def restore(self, state_like: Any, shardings: Any, step: int | None = None) -> tuple[Any, Any]:
        """(state, data iterator state) of ``step`` (default: the latest), placed with ``shardings``."""
        step = self.manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        flat_like, _ = flatten_state(state_like)
        flat_shardings, _ = flatten_state(shardings)
        target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=flat_shardings[k]) for k, v in flat_like.items()}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except Exception as e:
            raise ValueError(f"{self.directory}: cannot restore checkpoint {step} onto the current model/mesh "
                             f"({type(e).__name__}: {e})") from None
        data = restored["data"] or {}
        return unflatten_state(restored["state"], state_like), data.get("iterator")

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, state_like: Any, shardings: Any) -> tuple[int, Any, Any] | None:
        """(step, state, data state) of the newest checkpoint that restores, or None when there is none.

        A newer step that fails to restore (incomplete files) is reported and skipped; when none restores,
        the newest step's error is raised (e.g. a checkpoint of another model or config)."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        first_error = None
        for step in steps:
            try:
                state, data = self.restore(state_like, shardings, step)
            except ValueError as e:
                first_error = first_error or e
                log.warning("%s: checkpoint %d cannot be restored (%s); trying the previous one",
                            self.directory, step, str(e).splitlines()[0][:300])
                continue
            newer = [s for s in steps if s > step]
            for bad in newer:  # else a rerun reaching that step again would keep the broken one
                log.warning("%s: removing unreadable checkpoint %d", self.directory, bad)
                self.manager.delete(bad)
            return step, state, data
        if first_error is not None:
            raise first_error
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

"""Surviving faults: preemption (SIGTERM) and Ctrl-C, non-finite losses, a full or unwritable workdir, a workdir
holding another run.

- Preemption: SIGTERM (or a first Ctrl-C, SIGINT, on one process) does not kill the run. The step in flight
  finishes, a checkpoint of that step is written (and waited for), a log line says so, and the process exits
  with ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL: "try again"): rerunning the same command resumes, and the
  ``metrics.jsonl`` rows past the restored step are dropped then, so no step is logged twice. A second Ctrl-C
  stops at once (exit 130, no checkpoint). With several processes the notice reaches them all through
  jax.distributed's preemption sync (any process's SIGTERM counts) and they stop at the same step.
- Non-finite loss or gradients (``train.nan_policy``): the step never applies such an update (a ``where`` on
  the finiteness of loss and gradients inside the jit-ed step, no host round-trip). ``skip``: the batch is
  skipped, counted in ``skipped_steps``, and training goes on. ``stop``: the state freezes at the last good
  step; the loop notices at its next host read (every logged step), checkpoints that state and raises
  ``NonFiniteLossError`` naming the step.
- The workdir is checked before anything compiles: it must be creatable, writable, with ``train.min_free_gb``
  free, and not hold another run: when its ``config.yaml`` names another task or another ``model`` section
  (``RUNTIME_MODEL_KEYS`` aside), the run is refused before anything in the workdir changes.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75   # sysexits.h EX_TEMPFAIL: a temporary failure, rerun to continue
NAN_POLICIES = ("stop", "skip")


class NonFiniteLossError(FloatingPointError, ValueError):
    """The loss or gradients of a step were NaN/Inf under ``train.nan_policy: stop``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class WorkdirError(OSError):
    """The workdir cannot hold the run's outputs."""


# ---- workdir -------------------------------------------------------------------------------------------------

def check_workdir(workdir: str | os.PathLike, min_free_gb: float) -> Path:
    """Create ``workdir`` and check it is writable with at least ``min_free_gb`` GB free (before compiling)."""
    workdir = Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir}: cannot create it ({e.strerror or e})") from None
    probe = workdir / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise WorkdirError(f"workdir {workdir}: not writable ({e.strerror or e})") from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free_gb = shutil.disk_usage(workdir).free / 1e9
    if free_gb < min_free_gb:
        raise WorkdirError(f"workdir {workdir}: only {free_gb:.2f} GB free, below train.min_free_gb={min_free_gb} "
                           f"(checkpoints would fail mid-run); free some space or lower train.min_free_gb")
    return workdir


# Model settings that change how the parameters are computed with, not which parameters there are: a resumed
# run may change them (e.g. turn on remat to fit memory).
RUNTIME_MODEL_KEYS = frozenset({"dtype", "remat", "remat_policy", "unpad", "relative_attention_impl"})
# Model keys whose null (or absence: a config.yaml written before the key existed) means false.
FALSE_WHEN_NULL = frozenset({"scan_layers"})
# Why a change of such a key cannot resume, and how to resume anyway.
LAYOUT_KEYS = {"scan_layers": "the checkpoints hold the parameters in the other layer layout (stacked vs per "
                              "layer); to resume this run set model.scan_layers: {saved}, or"}


def check_same_run(workdir: str | os.PathLike, config: dict) -> None:
    """Refuse to train in a workdir whose ``config.yaml`` is another run's: another ``task.name``, or another
    ``model`` section (``RUNTIME_MODEL_KEYS`` aside). Reads only, so a refused run changes nothing there."""
    saved_path = Path(workdir) / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    try:
        saved = yaml.safe_load(saved_path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise WorkdirError(f"workdir {workdir}: its config.yaml cannot be read ({e}); is it another run's? use "
                           f"another --workdir") from None
    new = yaml.safe_load(yaml.safe_dump(config, sort_keys=False))   # the same YAML round trip as the saved one
    saved_task = (saved.get("task") or {}).get("name") if isinstance(saved, dict) else None
    new_task = new["task"]["name"]
    where = f"workdir {workdir} holds a {saved_task!r} run (its config.yaml)"
    advice = "use another --workdir (or delete that config.yaml to reuse the directory anyway)"
    if saved_task != new_task:
        raise WorkdirError(f"{where}; this config is task {new_task!r}: {advice}")
    saved_model, new_model = saved.get("model") or {}, new.get("model") or {}
    value = lambda model, k: (model.get(k) or False) if k in FALSE_WHEN_NULL else model.get(k)
    changed = sorted(k for k in set(saved_model) | set(new_model)
                     if k not in RUNTIME_MODEL_KEYS and value(saved_model, k) != value(new_model, k))
    if changed:
        k = changed[0]
        why = LAYOUT_KEYS[k].format(saved=str(value(saved_model, k)).lower()) + " " if k in LAYOUT_KEYS else ""
        raise WorkdirError(f"{where} with another model: model.{k} was {value(saved_model, k)!r}, this config "
                           f"has {value(new_model, k)!r}: {why}{advice}")


# ---- preemption ----------------------------------------------------------------------------------------------

class PreemptionWatcher:
    """Has a preemption notice (SIGTERM) or a Ctrl-C (SIGINT) arrived? Ask ``requested(step)`` once per step, on
    every process.

    One process: SIGTERM and the first SIGINT set a flag (the step in flight finishes, is checkpointed, and the
    run exits with ``PREEMPTED_EXIT_CODE``); a second SIGINT raises KeyboardInterrupt at once (no checkpoint).
    The previous handlers come back on ``close``. Several processes: jax.distributed's preemption sync manager
    catches SIGTERM in any process and makes every process return True at the same step; a Python SIGTERM
    handler would replace its own, so none is installed, and SIGINT keeps Python's default (KeyboardInterrupt).
    """

    def __init__(self):
        self._flag = threading.Event()
        self.aborted = False      # a second Ctrl-C: stop without a checkpoint
        self.reason = "SIGTERM"   # what asked to stop: SIGTERM or SIGINT (Ctrl-C)
        self.handled = ""         # for the log: which signals checkpoint ("" when none does)
        self._previous: dict[int, Any] = {}
        self._sync = jax.process_count() > 1
        if self._sync:
            try:
                from jax.experimental import multihost_utils
                multihost_utils.reached_preemption_sync_point(-1)   # fails fast if the service is off
            except Exception as e:
                log.warning("multi-process preemption sync unavailable (%s): SIGTERM will not checkpoint", e)
                self._sync = None
            self.handled = "SIGTERM" if self._sync else ""
        elif threading.current_thread() is threading.main_thread():
            self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, self._on_signal),
                              signal.SIGINT: signal.signal(signal.SIGINT, self._on_signal)}
            self.handled = "SIGTERM or Ctrl-C"
        else:
            log.warning("training outside the main thread: no SIGTERM handler, preemption will not checkpoint")

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self._flag.is_set():
            # The second Ctrl-C (or a Ctrl-C after SIGTERM): stop now, no checkpoint. The exception lands wherever
            # the main thread is; in a callback that swallows it (XLA's GC hook, while a step compiles) the
            # loop's next raise_if_aborted() raises it again, before anything is written.
            self.aborted = True
            raise KeyboardInterrupt
        if not self._flag.is_set():
            self.reason = "SIGINT (Ctrl-C)" if signum == signal.SIGINT else "SIGTERM"
            log.warning("%s received: finishing the current step, then checkpointing and exiting (Ctrl-C again "
                        "stops at once, without a checkpoint)", self.reason)
        self._flag.set()

    def raise_if_aborted(self) -> None:
        """KeyboardInterrupt when a second Ctrl-C came, even if its first KeyboardInterrupt was swallowed."""
        if self.aborted:
            raise KeyboardInterrupt

    def requested(self, step: int) -> bool:
        self.raise_if_aborted()
        if self._sync:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


__all__ = ["PREEMPTED_EXIT_CODE", "NAN_POLICIES", "NonFiniteLossError", "WorkdirError", "check_workdir",
           "check_same_run", "RUNTIME_MODEL_KEYS", "PreemptionWatcher"]

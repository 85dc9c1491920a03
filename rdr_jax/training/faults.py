"""Surviving faults: preemption (SIGTERM), non-finite losses, a full or unwritable workdir.

- Preemption: SIGTERM does not kill the run. The step in flight finishes, a checkpoint of that step is written
  (and waited for), a log line says so, and the process exits with ``PREEMPTED_EXIT_CODE`` (75, EX_TEMPFAIL:
  "try again"): rerunning the same command resumes. With several processes the notice reaches them all
  through jax.distributed's preemption sync (any process's SIGTERM counts) and they stop at the same step.
- Non-finite loss or gradients (``train.nan_policy``): the step never applies such an update (a ``where`` on
  the finiteness of loss and gradients inside the jit-ed step, no host round-trip). ``skip``: the batch is
  skipped, counted in ``skipped_steps``, and training goes on. ``stop``: the state freezes at the last good
  step; the loop notices at its next host read (every logged step), checkpoints that state and raises
  ``NonFiniteLossError`` naming the step.
- The workdir is checked before anything compiles: it must be creatable, writable, with ``train.min_free_gb``
  free.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path


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


# ---- preemption ----------------------------------------------------------------------------------------------

class PreemptionWatcher:
    """Has a preemption notice (SIGTERM) arrived? Ask ``requested(step)`` once per step, on every process.

    One process: a SIGTERM handler sets a flag (the previous handler comes back on ``close``). Several
    processes: jax.distributed's preemption sync manager catches SIGTERM in any process and makes every
    process return True at the same step; a Python handler would replace its own, so none is installed.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._sync = jax.process_count() > 1
        if self._sync:
            try:
                from jax.experimental import multihost_utils
                multihost_utils.reached_preemption_sync_point(-1)   # fails fast if the service is off
            except Exception as e:
                log.warning("multi-process preemption sync unavailable (%s): SIGTERM will not checkpoint", e)
                self._sync = None
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        else:
            log.warning("training outside the main thread: no SIGTERM handler, preemption will not checkpoint")

    def _on_sigterm(self, signum, frame):
        if not self._flag.is_set():
            log.warning("SIGTERM received: finishing the current step, then checkpointing and exiting")
        self._flag.set()

    def requested(self, step: int) -> bool:
        if self._sync:
            from jax.experimental import multihost_utils
            return bool(multihost_utils.reached_preemption_sync_point(step))
        return self._flag.is_set()

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = ["PREEMPTED_EXIT_CODE", "NAN_POLICIES", "NonFiniteLossError", "WorkdirError", "check_workdir",
           "PreemptionWatcher"]

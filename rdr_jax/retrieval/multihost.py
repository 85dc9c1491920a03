"""Small host-side collectives for inference commands run on every process of a slice.

Inference splits its inputs over processes and merges on process 0 without a separate step or a shared file
system: each step's small per-process results (scores, answers) travel through ``jax.distributed``'s
collectives (gloo on CPU hosts), not through files.
"""

from __future__ import annotations

import pickle
from typing import Any

import jax
import numpy as np


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in process order, on every process; ``[obj]`` with one process.

    A collective: every process must call it the same number of times. Objects are pickled: only for the
    processes of one program, never for data from elsewhere."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(gathered[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]

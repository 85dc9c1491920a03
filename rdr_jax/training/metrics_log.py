"""``WORKDIR/metrics.jsonl`` and TensorBoard: the training loop's record of every logged step."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


class MetricsWriter:
    """metrics.jsonl (appended, so a resumed run continues the file) + optional TensorBoard.

    ``resumed_at``: the step the run starts from. Rows of later steps (logged after the checkpoint it resumes
    from, by a run that was stopped) are dropped first, so no step appears twice; TensorBoard purges them too."""

    def __init__(self, workdir: Path, tensorboard: bool, enabled: bool, resumed_at: int = 0):
        self.enabled = enabled
        self.path = workdir / "metrics.jsonl"
        self.tb = None
        if enabled:
            self.drop_rows_after(resumed_at)
        if enabled and tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(str(workdir / "tensorboard"), purge_step=resumed_at + 1)
            except ImportError:
                log.warning("tensorboardX is not installed: no TensorBoard logs (pip install tensorboardX)")

    def drop_rows_after(self, step: int) -> None:
        """Keep the rows of steps <= ``step`` (atomically: a temporary file renamed over the old one)."""
        if not self.path.is_file():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        kept = []
        for line in lines:
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):   # a line cut off by a kill mid-write
                continue
            if row_step <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        if kept == lines:
            return
        log.info("%s: dropping %d row(s) after step %d (logged after the checkpoint this run resumes from)",
                 self.path, len(lines) - len(kept), step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

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
    v = v.item() if v.ndim == 0 else v.tolist()
    return None if isinstance(v, float) and not math.isfinite(v) else v   # NaN/Inf: null (valid JSON)

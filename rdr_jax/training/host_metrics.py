"""What the host spends on a training run, for the loop's log: this process's peak resident memory, the time a
step waited for its batch, and real vs padded tokens.

Peak RSS is ``VmHWM`` of ``/proc/self/status`` (the kernel's high-water mark of resident pages, file-backed
pages of a memory-mapped encoding included), or ``getrusage``'s ``ru_maxrss`` where there is no /proc. The
input wait is measured around ``next(iterator)`` on the training thread: with a prefetching pipeline it is
the time the step really stood still for data; with batches built on the training thread it is their cost.
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_kib(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024   # bytes on macOS, KiB on Linux


def rss_bytes() -> dict[str, int]:
    """Resident now: ``rss`` and, where /proc tells, ``anon`` (the process's own) and ``file`` (mapped files,
    shared through the page cache) bytes."""
    out = {}
    for key, name in (("VmRSS", "rss"), ("RssAnon", "anon"), ("RssFile", "file")):
        kib = _status_kib(key)
        if kib is not None:
            out[name] = kib * 1024
    return out


class WindowMeter:
    """Per logging window: seconds spent waiting for batches, and real/padded tokens (``Task.batch_stats``)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.wait_seconds = 0.0
        self.tokens = self.padded_tokens = 0

    def next_batch(self, iterator):
        """``next(iterator)``, its time added to the window's wait (StopIteration passes through)."""
        start = time.perf_counter()
        try:
            return next(iterator)
        finally:
            self.wait_seconds += time.perf_counter() - start

    def add_tokens(self, stats: dict[str, int], processes: int) -> None:
        self.tokens += stats["tokens"] * processes          # this process's block -> the global batch
        self.padded_tokens += stats.get("padded_tokens", stats["tokens"]) * processes

    def values(self, elapsed: float) -> dict[str, float]:
        """The window's metrics over ``elapsed`` seconds of training (evaluation left out): real and padded
        tokens/s, the share of padding, the share of the time spent waiting for data, peak RSS in GiB."""
        elapsed = max(elapsed, 1e-9)
        return {"tokens_per_sec": self.tokens / elapsed, "padded_tokens_per_sec": self.padded_tokens / elapsed,
                "padding_share": 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0,
                "input_wait_share": min(self.wait_seconds / elapsed, 1.0),
                "host_peak_rss_gb": peak_rss_bytes() / 2**30}

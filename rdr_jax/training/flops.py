"""Model FLOPs utilisation (MFU) against a device's peak, and XLA's own count of a step's FLOPs.

The trainer's MFU (``FlopsMeter``) divides the task's analytic count (``Task.step_flops``, :mod:`rdr_jax.training.model_flops`)
by the step time: XLA's cost analysis misses the GEMMs a GPU hands to cuBLAS (an H200 reported 1.10 TFLOP for
an 18.7 TFLOP bert-base DPR step). ``step_flops`` here, XLA's count, is kept as the cross-check of the
analytic count on CPU (tests/test_model_flops.py) and for the accelerator benchmark's report.

``step_flops`` counts ``jitted.lower(*args)``: jit caches the trace and the lowering, so a call that follows
reuses them and nothing compiles twice. The lowered (pre-partitioning) module is used rather than the
compiled one because:

- the compiled module is the per-device SPMD program: its FLOPs shrink with the mesh size, and replicated
  work (a tensor-parallel layer norm) is counted once per device; the lowered module is the whole global
  step, counted once, which is what MFU divides by ``peak x number of devices``;
- XLA counts a while loop's body once whatever its trip count, and gradient accumulation is a scan over the
  micro-batches: the lowered module always keeps that scan as one loop, so scaling by
  ``grad_accum_steps`` is exact but for the optimizer update's few FLOPs per parameter (then over-counted).

The compiled module's cost (x device count) is the fallback where the lowered one is unavailable. Best
effort: ``None`` when XLA reports nothing, and callers then log no FLOPs.

Peaks are dense bf16 FLOP/s per device, looked up by ``jax.devices()[0].device_kind``; a CPU (or any
device not in the table) has no known peak, so no ``mfu`` is logged unless ``train.peak_flops`` is set.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import jax

log = logging.getLogger(__name__)

# (regular expression searched in the lower-cased device_kind, peak dense bf16 FLOP/s per device); first match
# wins, so the more specific names (PCIe, v5 lite) come before the general ones.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"h100.*pcie", 756e12),
    (r"h100", 989e12),          # SXM ("NVIDIA H100 80GB HBM3")
    (r"h200", 989e12),
    (r"a100", 312e12),
    (r"\bl4\b", 121e12),         # not L40/L40S
    (r"tpu v4", 275e12),
    (r"tpu v5 ?(lite|e\b)", 197e12),
    (r"tpu v5", 459e12),        # v5p reports itself as "TPU v5" (or "TPU v5p")
)


def _cost_flops(cost: Any) -> float | None:
    """The ``flops`` entry of a cost analysis: a dict, or a list with one dict per device/module (older jax)."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost:
        return None
    try:
        flops = float(cost.get("flops", 0.0))
    except (AttributeError, TypeError, ValueError):
        return None
    return flops if flops > 0 else None


def step_flops(jitted, args: Sequence[Any], grad_accum_steps: int = 1) -> float | None:
    """Global FLOPs of one call of ``jitted(*args)`` (a ``jax.jit`` object), or None when unavailable."""
    try:
        lowered = jitted.lower(*args)
    except Exception as e:  # e.g. not a jax.jit object
        log.info("no FLOPs estimate: cannot lower the train step (%s: %s)", type(e).__name__, e)
        return None
    flops = None
    try:
        flops = _cost_flops(lowered.cost_analysis())
    except Exception as e:
        log.debug("lowered cost analysis unavailable (%s: %s)", type(e).__name__, e)
    if flops is None:
        try:  # the per-device program: times the devices it runs on (jit caches it for the step's own call)
            flops = _cost_flops(lowered.compile().cost_analysis())
            flops = flops * jax.device_count() if flops else None
        except Exception as e:
            log.debug("compiled cost analysis unavailable (%s: %s)", type(e).__name__, e)
    if flops is None:
        log.info("no FLOPs estimate: XLA reports no cost analysis for the train step on %s",
                 jax.devices()[0].platform)
        return None
    return flops * max(int(grad_accum_steps), 1)


def device_peak_flops(device_kind: str | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind (default: the first device), None when unknown."""
    kind = (device_kind if device_kind is not None else jax.devices()[0].device_kind).lower()
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, kind):
            return peak
    return None


def mfu(flops_per_step: float | None, seconds_per_step: float, peak_per_device: float | None,
        num_devices: int) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak of all devices; None when anything is unknown."""
    if not flops_per_step or not peak_per_device or seconds_per_step <= 0 or num_devices < 1:
        return None
    return flops_per_step / seconds_per_step / (peak_per_device * num_devices)


class FlopsMeter:
    """The trainer's compute accounting over a logging window: ``add`` each step's global batch (the task's
    analytic ``step_flops`` of its shapes: host arithmetic, no tracing), then ``values`` gives the record's
    ``flops_per_step`` (the window's mean, with the first record only) and ``mfu``, and starts a new window.
    A task without a count (``step_flops`` None) logs neither."""

    def __init__(self, task, peak_per_device: float | None, num_devices: int):
        self.task, self.peak, self.devices = task, peak_per_device, num_devices
        self.counting, self.window = True, 0.0

    def add(self, batch) -> None:
        if not self.counting:
            return
        count = self.task.step_flops({k: tuple(v.shape) for k, v in batch.items()})
        if count is None:
            self.counting = False
            log.info("no flops_per_step/mfu: task %r gives no analytic FLOP count (Task.step_flops)",
                     getattr(self.task, "name", type(self.task).__name__))
        self.window += count or 0.0

    def values(self, steps: int, seconds: float, *, first: bool) -> dict[str, float]:
        out = {}
        if self.counting and steps:
            per_step = self.window / steps
            if first:
                out["flops_per_step"] = per_step
            utilisation = mfu(per_step, seconds / steps, self.peak, self.devices)
            if utilisation is not None:
                out["mfu"] = utilisation
        self.window = 0.0
        return out


__all__ = ["step_flops", "device_peak_flops", "mfu", "FlopsMeter", "PEAK_BF16_FLOPS"]

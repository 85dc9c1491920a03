"""Timing, memory and reporting shared by every benchmark.

The machine's cores may be shared with other work, so the two frameworks are timed interleaved
(A B B A A B ...) and summarised by medians: load hits both sides alike and the ratio stays fair.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


@dataclasses.dataclass
class Options:
    quick: bool = False
    repeats: int = 5
    warmup: int = 1
    threads: int = 2
    peak_tflops: float | None = None
    workdir: Path = Path(".")
    progress: bool = True


@dataclasses.dataclass
class Result:
    """One row of the table. ``ratio`` = torch_ms / jax_ms (> 1: rdr_jax is faster)."""
    name: str
    jax_ms: float | None
    torch_ms: float | None
    notes: str = ""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        if self.jax_ms and self.torch_ms:
            return self.torch_ms / self.jax_ms
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "jax_ms": self.jax_ms, "torch_ms": self.torch_ms, "ratio": self.ratio,
                "notes": self.notes, **self.extra}


# ---- timing ------------------------------------------------------------------------------------------------
def block(x):
    """Wait for JAX's asynchronous dispatch (no-op on numpy / torch values)."""
    import jax

    return jax.block_until_ready(x)


def timed(fn: Callable[[], Any]) -> float:
    """Seconds for one call, results waited for."""
    t0 = time.perf_counter()
    block(fn())
    return time.perf_counter() - t0


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                desc: str = "") -> dict[str, list[float]]:
    """Seconds per call of each function, calls interleaved; the order flips every round (ABBA) so
    neither side always runs right after the other."""
    from tqdm import tqdm

    names = list(fns)
    for _ in range(warmup):
        for name in names:
            block(fns[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in tqdm(range(repeats), desc=desc or "timing", unit="round", leave=False,
                  disable=not sys.stderr.isatty()):
        for name in (names if r % 2 == 0 else names[::-1]):
            times[name].append(timed(fns[name]))
    return times


def median_ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


def spread(seconds: list[float]) -> dict[str, float]:
    """min / max ms: how noisy the shared machine was during the measurement."""
    return {"min_ms": 1000.0 * min(seconds), "max_ms": 1000.0 * max(seconds), "n": len(seconds)}


# ---- compute accounting ------------------------------------------------------------------------------------
def compiled_flops(compiled) -> float | None:
    """FLOPs of one call of a compiled XLA executable (``jitted.lower(...).compile()``), if XLA reports it."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def bert_forward_flops(config: dict, batch: int, length: int) -> float:
    """Analytic FLOPs of a BERT forward (every position of every layer, no pooler): the trainer's count
    (``rdr_jax.training.model_flops.bert_encoder``) of a config dict."""
    from rdr_jax.models.bert import BertConfig
    from rdr_jax.training.model_flops import bert_encoder

    return bert_encoder(BertConfig.from_dict(dict(config)), batch, length).total


def dpr_step_flops(config: dict, num_q: int, lq: int, lp: int, remat: bool = False,
                   full_last_layer: bool = False) -> float:
    """Analytic FLOPs of one DPR training step (both towers trained, two passages per question): the count the
    trainer logs MFU with (``rdr_jax.tasks.dpr.dpr_step_flops``: [CLS] only in the last layer, 3 x forward,
    the in-batch scores). ``full_last_layer``: every position of the last layer, the work transformers' towers
    do."""
    from rdr_jax.models.dpr import DPRConfig
    from rdr_jax.tasks.dpr import dpr_step_flops as count

    cfg = DPRConfig.from_dict(dict(config))
    if full_last_layer:
        from rdr_jax.training import model_flops as F

        towers = F.dpr_encoder(cfg, num_q, lq, cls_only=False) + F.dpr_encoder(cfg, 2 * num_q, lp, cls_only=False)
        return 3 * towers.total + 3 * F.matmul(num_q, F.embedding_dim(cfg), 2 * num_q)
    return count(cfg, cfg, num_q, lq, 2 * num_q, lp, remat=remat)


def mfu(flops: float | None, seconds: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation against the given peak; None when any input is missing."""
    if not flops or not seconds or not peak_tflops:
        return None
    return flops / seconds / (peak_tflops * 1e12)


def compute_extra(flops: float | None, jax_ms: float, torch_ms: float, peak_tflops: float | None) -> dict:
    out: dict[str, Any] = {"flops": flops}
    if flops:
        out["jax_gflops_per_s"] = flops / (jax_ms / 1000) / 1e9
        out["torch_gflops_per_s"] = flops / (torch_ms / 1000) / 1e9
    jax_mfu, torch_mfu = mfu(flops, jax_ms / 1000, peak_tflops), mfu(flops, torch_ms / 1000, peak_tflops)
    if jax_mfu is not None:
        out["jax_mfu"], out["torch_mfu"] = jax_mfu, torch_mfu
    return out


# ---- memory ------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident set size so far.

    Reads VmHWM from /proc (Linux): ``getrusage``'s ru_maxrss survives fork+exec, so a fresh worker would
    report its parent's peak when that was higher.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_worker(module: str, args: list[str], threads: int) -> dict:
    """Run ``python -m module args`` in a fresh process (its own peak RSS) and parse the JSON it prints last."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          cwd=str(Path(__file__).resolve().parents[1]))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {module} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    last = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not last:
        raise RuntimeError(f"worker {module} {' '.join(args)} printed no JSON result:\n{proc.stdout[-2000:]}")
    return json.loads(last[-1])


# ---- set-up ------------------------------------------------------------------------------------------------
def configure_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    return torch


def torch_device() -> str:
    """"cuda" where PyTorch sees a GPU (``benchmarks.accelerator`` on a GPU machine), else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(device: str) -> None:
    """Wait for PyTorch's queued GPU work, so a host clock times it (no-op on the CPU)."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def save_random_hf(model, out_dir: Path) -> Path:
    """Save a transformers model (random weights) as safetensors; both frameworks then load this file."""
    model.save_pretrained(str(out_dir))
    return out_dir


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random ids, every row padded after a random length in [length/2, length] (as real batches are)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, vocab, size=(batch, length), dtype=np.int32)
    lengths = rng.integers(max(2, length // 2), length + 1, size=batch)
    lengths[0] = length  # the longest row fills the batch, as bucketing guarantees
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
    ids[:, 0] = 101  # [CLS]
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def to_torch(batch: dict[str, np.ndarray]):
    import torch

    return {k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()}


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def environment(threads: int) -> dict[str, Any]:
    import jax
    import torch

    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor())
    except OSError:
        cpu = platform.processor()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": f"{jax.devices()[0].platform}: {cpu}",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "threads": threads,
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or __import__("jaxlib").__version__,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "torch_attention": "transformers' default (sdpa) for BERT/DPR; eager for T5 and DeBERTa",
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: OpenMP default)"),
        "torch_num_threads": torch.get_num_threads(),
        "method": "interleaved A/B timing with the order flipped each round, medians reported; "
                  "cores may be shared with other processes",
    }


# ---- report ------------------------------------------------------------------------------------------------
def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def table(results: list[Result]) -> str:
    rows = [("benchmark", "rdr_jax ms", "torch ms", "torch/jax", "notes")]
    for r in results:
        rows.append((r.name, _fmt(r.jax_ms), _fmt(r.torch_ms), _fmt(r.ratio, 2), r.notes))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [row[j].rjust(widths[j]) for j in (1, 2, 3)] + [row[4]]
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|---|")
    return "\n".join(lines)


# ---- the JAX side of a forward benchmark -------------------------------------------------------------------
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class CompiledForward:
    """An rdr_jax model's inference forward, jit-compiled ahead of time for one static batch shape.

    Compilation is timed on its own (``compile_s``) so the timed calls are pure execution. With ``packed``
    the model runs unpadded (``rdr_jax.models.packing``), as rdr_jax's encode/rerank/reader runners do on one
    device; building the packing maps on the host is part of every timed call.
    """

    def __init__(self, model, batch: dict[str, np.ndarray], outputs: Callable, packed: bool = False,
                 model_kwargs: dict | None = None):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        graphdef, state = nnx.split(model)

        model_kwargs = dict(model_kwargs or {})

        def forward(state, input_ids, attention_mask, token_type_ids, packing):
            kw = model_kwargs if packing is None else {**model_kwargs, "packing": packing}
            return outputs(nnx.merge(graphdef, state)(input_ids, attention_mask, token_type_ids, **kw))

        self.state, self.packed, self.mask = state, packed, batch["attention_mask"]
        self.inputs = [jnp.asarray(batch[k]) for k in MODEL_INPUTS]
        t0 = time.perf_counter()
        self.compiled = jax.jit(forward).lower(state, *self.inputs, self._packing()).compile()
        self.compile_s = time.perf_counter() - t0
        self.flops = compiled_flops(self.compiled)

    def _packing(self):
        from rdr_jax.models.packing import TokenPacking
        return TokenPacking.for_batch(self.mask) if self.packed else None

    def __call__(self):
        return self.compiled(self.state, *self.inputs, self._packing())

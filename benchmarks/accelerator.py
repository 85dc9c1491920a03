"""Accelerator measurements (run on a GPU/TPU machine), each beside the PyTorch original on the same device:

1. ``train``: a bf16 DPR training step at bert-base size through the project's training engine (``DPRTask`` +
   ``make_train_step``: both towers train, dropout on, AdamW, fp32 master weights), MFU against the device's
   bf16 peak from the analytic count the trainer logs (``Task.step_flops``, ``rdr_jax.training.model_flops``),
   XLA's cost analysis reported beside it; ``torch_train``: two BertModels under bf16 autocast, the same loss,
   ``torch.optim.AdamW``, no gradient clipping on either side;
2. ``encode``: bert-base DPR context-encoder throughput (bf16 forward, passages/s), JAX and PyTorch;
3. ``beam``: the T5 constrained beam search of ``benchmarks.beam_search`` (fp32, both sides on the device).

    python -m benchmarks.accelerator [--parts train torch_train encode] [--jsonl out.jsonl] [--attention xla]

Each part runs in a fresh Python process (JAX's persistent compilation cache off), so ``jax_compile_s`` is a
cold compile, reported apart from the timed steps; its JSON line is printed and appended to ``--jsonl`` as soon
as the part ends, so a part that runs out of time (``--part-timeout``) loses only itself.
``scripts/bench_accelerator.sh`` runs the whole GPU/TPU check (default recipe, attention variants, PyTorch,
encoder) within a time budget. Steps are timed back to back (the queue kept full, as in training) and divided:
``steps`` calls, one wait at the end. Not part of ``python -m benchmarks`` (that suite is CPU-side).

Imports are lazy: the module and its parts need jax, flax, optax, numpy, (torch, transformers for the PyTorch
sides) and this repository only, as on a bare accelerator machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common as C
from rdr_jax.models.attention import ATTENTION_ENV

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)
PARTS = ("train", "torch_train", "encode", "beam")
TINY_BERT = dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def per_call_ms(fn, wait, calls: int) -> float:
    """Milliseconds per call of ``calls`` back-to-back calls, with one wait at the end."""
    t0 = time.perf_counter()
    for _ in range(calls):
        out = fn()
    wait(out)
    return 1000 * (time.perf_counter() - t0) / calls


def full_batch(num_q: int, lq: int, lp: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Every row full length: the FLOPs are the model's, with no padding to argue about."""
    rng = np.random.default_rng(seed)
    return {"q_input_ids": rng.integers(1000, 30000, (num_q, lq), dtype=np.int32),
            "q_attention_mask": np.ones((num_q, lq), np.int32),
            "p_input_ids": rng.integers(1000, 30000, (2 * num_q, lp), dtype=np.int32),
            "p_attention_mask": np.ones((2 * num_q, lp), np.int32),
            "positive_index": (np.arange(num_q) * 2).astype(np.int32)}


def jax_train(args, workdir: Path) -> dict:
    import jax
    from benchmarks.train_step import engine_step
    from rdr_jax.training.flops import step_flops

    model = dict(init=dict(args.model), dtype="bfloat16", remat=args.remat)
    if args.scan_layers:
        model["scan_layers"] = True
    t0 = time.perf_counter()
    setup, step, sharding, task = engine_step(workdir, **model)
    batch = task.batch_maker(lambda idx, rng: full_batch(args.batch, args.lq, args.lp))(None, None)
    batch = jax.device_put(batch, sharding)
    state, frozen, key = setup.state, setup.frozen, jax.random.key(0, impl=args.prng)
    out = {"jax_setup_s": round(time.perf_counter() - t0, 2), "scan_layers": args.scan_layers,
           # what the trainer logs MFU with: the task's analytic count
           "trainer_flops_per_step": task.step_flops({k: tuple(v.shape) for k, v in batch.items()})}
    t0 = time.perf_counter()
    lowered = step.lower(state, frozen, batch, key)
    out["jax_lower_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    # cold: a fresh process with JAX's persistent compilation cache off (see main)
    out["jax_compile_s"] = round(time.perf_counter() - t0, 2)
    # XLA's counts of the lowered and the compiled program, a cross-check only (on a GPU both miss the GEMMs)
    out.update(xla_lowered_flops=step_flops(step, (state, frozen, batch, key)),
               xla_compiled_flops=C.compiled_flops(compiled), **hlo_counts(compiled))
    try:
        memory = compiled.memory_analysis()
        out["jax_temp_gib"] = round(memory.temp_size_in_bytes / 2 ** 30, 2)
    except Exception:  # not every backend reports it
        pass

    def one():
        nonlocal state
        state, metrics = compiled(state, frozen, batch, key)
        return metrics

    out["jax_first_loss"] = float(jax.block_until_ready(one())["loss"])
    for _ in range(args.warmup):
        jax.block_until_ready(one())
    out["jax_train_step_ms"] = round(per_call_ms(one, jax.block_until_ready, args.steps), 2)
    out["jax_last_loss"] = float(one()["loss"])
    out.update(_mfu("jax_train", out["trainer_flops_per_step"], out["jax_train_step_ms"], args.peak))
    return out


def hlo_counts(compiled) -> dict:
    """Instruction counts of the compiled program's HLO (all computations): fusions, dots, custom calls (cuDNN
    attention and cuBLAS GEMMs on a GPU, Mosaic kernels on a TPU), whiles (scanned stacks) and rng ops: what
    the compiler made of the step, comparable across attention paths and backends."""
    try:
        text = compiled.as_text()
    except Exception:
        return {}
    ops = {"fusion": " fusion(", "dot": " dot(", "custom_call": " custom-call(", "while": " while(",
           "rng": " rng-bit-generator("}
    counts = {f"hlo_{name}s": text.count(pattern) for name, pattern in ops.items()}
    counts["hlo_cudnn_attention_calls"] = text.count('custom_call_target="__cudnn$fmha')
    return counts


def torch_train(args) -> dict:
    """``benchmarks.train_step.TorchTrainer`` (the CPU suite's PyTorch step) on the device, under bf16 autocast."""
    import torch
    import transformers
    from benchmarks.train_step import TorchTrainer

    dev = C.torch_device()
    cfg = transformers.BertConfig(**args.model)
    step = TorchTrainer([transformers.BertModel(cfg, add_pooling_layer=False) for _ in range(2)],
                        full_batch(args.batch, args.lq, args.lp), device=dev, autocast=torch.bfloat16)
    for _ in range(args.warmup + 1):
        step()
    ms = per_call_ms(step, lambda _: C.torch_sync(dev), args.steps)
    # transformers computes every position of the last layer: its own work is the full-encoder count
    flops = C.dpr_step_flops(args.model, args.batch, args.lq, args.lp, full_last_layer=True)
    return {"torch": torch.__version__, "torch_device": dev, "torch_train_step_ms": round(ms, 2),
            "torch_flops_per_step": flops, **_mfu("torch_train", flops, ms, args.peak)}


def encoder_throughput(args) -> dict:
    """bert-base DPR context encoder forward in bf16 ([CLS] embeddings): passages/s for JAX and PyTorch."""
    import jax
    import jax.numpy as jnp
    import torch
    import transformers
    from flax import nnx
    from rdr_jax.models import DPRConfig, DPRContextEncoder

    rows, length = args.encode_batch, args.lp
    model = nnx.jit(lambda: DPRContextEncoder(DPRConfig.from_dict(dict(args.model)), dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    ids = jnp.asarray(np.random.default_rng(1).integers(1000, 30000, (rows, length), dtype=np.int32))
    mask = jnp.ones_like(ids)
    fwd = jax.jit(lambda p, i, m: nnx.merge(graphdef, p)(i, m).pooler_output).lower(params, ids, mask).compile()
    for _ in range(args.warmup + 1):
        jax.block_until_ready(fwd(params, ids, mask))
    jax_ms = per_call_ms(lambda: fwd(params, ids, mask), jax.block_until_ready, args.steps)

    dev = C.torch_device()
    m = transformers.BertModel(transformers.BertConfig(**args.model), add_pooling_layer=False).to(dev).eval()
    t_ids, t_mask = torch.as_tensor(np.asarray(ids), dtype=torch.int64).to(dev), torch.ones(rows, length, device=dev)

    def fwd_t():
        with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
            return m(input_ids=t_ids, attention_mask=t_mask).last_hidden_state[:, 0]

    for _ in range(args.warmup + 1):
        fwd_t()
    torch_ms = per_call_ms(fwd_t, lambda _: C.torch_sync(dev), args.steps)
    flops = C.bert_forward_flops(args.model, rows, length)
    return {"encode_rows": rows, "encode_length": length, "jax_encode_ms": round(jax_ms, 2),
            "torch_encode_ms": round(torch_ms, 2), "jax_passages_per_s": round(rows / jax_ms * 1000),
            "torch_passages_per_s": round(rows / torch_ms * 1000),
            "encode_ratio_torch_over_jax": round(torch_ms / jax_ms, 3), "encode_analytic_flops": flops,
            **_mfu("jax_encode", flops, jax_ms, args.peak), **_mfu("torch_encode", flops, torch_ms, args.peak)}


def _mfu(what: str, flops, ms: float | None, peak: float | None) -> dict:
    """``{what}_mfu``: analytic FLOPs / time / peak (nothing when a number is missing)."""
    if not flops or not peak or not ms:
        return {}
    return {f"{what}_mfu": round(flops / (ms / 1000) / peak, 4)}


def beam_search(args, workdir: Path) -> dict:
    from benchmarks import beam_search as B

    result = B.constrained_search(C.Options(quick=args.tiny, repeats=args.repeats, workdir=workdir,
                                            progress=False))
    return {f"beam_{k}": v for k, v in result.to_dict().items() if k != "model"}


def header(args) -> dict:
    import jax
    from rdr_jax.training.flops import device_peak_flops

    args.peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops()
    return {"label": args.label, "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "flax": __import__("flax").__version__, "peak_flops": args.peak,
            "model": args.model, "batch_questions": args.batch, "lq": args.lq, "lp": args.lp,
            "steps_timed": args.steps, "prng": args.prng, "attention": os.environ.get(ATTENTION_ENV, "auto"),
            "remat": args.remat}


def run_part(name: str, args) -> dict:
    """One part in this process: the header and the part's numbers, or ``error``."""
    out = {"part": name, **header(args)}
    work = Path(tempfile.mkdtemp())
    parts = {"train": lambda: jax_train(args, work / "train"), "torch_train": lambda: torch_train(args),
             "encode": lambda: encoder_throughput(args), "beam": lambda: beam_search(args, work / "beam")}
    t0 = time.perf_counter()
    try:
        out.update(parts[name]())
    except Exception as e:  # reported in the part's line; the other parts run in their own processes
        out["error"] = f"{type(e).__name__}: {e}"
    out["part_wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def run_in_child(name: str, argv: list[str], timeout: float) -> dict:
    """``name`` in a fresh process (cold compile: JAX's persistent compilation cache off), its JSON line parsed;
    a timeout or a crash becomes an ``error`` line."""
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", JAX_COMPILATION_CACHE_DIR="",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "benchmarks.accelerator", *argv, "--parts", name, "--in-process"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=str(Path(__file__).resolve().parents[1]))
    except subprocess.TimeoutExpired:
        return {"part": name, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"part": name, "error": f"exit {proc.returncode}: {proc.stderr[-1500:]}",
                "part_wall_s": round(time.perf_counter() - t0, 2)}
    return json.loads(lines[-1])


def emit(result: dict, jsonl: Path | None) -> None:
    """Print one part's line and append it to ``jsonl`` now: a later timeout cannot lose it."""
    line = json.dumps(result)
    print(line, flush=True)
    if jsonl is not None:
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        with jsonl.open("a") as f:
            f.write(line + "\n")


def _first(row: dict, *keys: str):
    return next((row[k] for k in keys if k in row), None)


def summarize(lines: list[dict]) -> str:
    """A markdown table of JSON lines (one row per part), the train rows' time also as a ratio to PyTorch's."""
    torch_ms = next((r["torch_train_step_ms"] for r in lines if "torch_train_step_ms" in r), None)
    rows = ["| label | part | attention | step / forward ms | MFU | compile s | torch/jax | note |",
            "|---|---|---|---|---|---|---|---|"]
    for r in lines:
        ms = _first(r, "jax_train_step_ms", "torch_train_step_ms", "jax_encode_ms")
        mfu = _first(r, "jax_train_mfu", "torch_train_mfu", "jax_encode_mfu")
        ratio = (round(torch_ms / r["jax_train_step_ms"], 3) if torch_ms and "jax_train_step_ms" in r
                 else r.get("encode_ratio_torch_over_jax"))
        note = r.get("error", "")[:80]
        if not note and "hlo_cudnn_attention_calls" in r:
            note = f"cuDNN attention calls {r['hlo_cudnn_attention_calls']}, fusions {r['hlo_fusions']}"
        rows.append(f"| {r.get('label', '')} | {r.get('part', '')} | {r.get('attention', '')} | {'' if ms is None else ms} | "
                    f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {r.get('jax_compile_s', '')} | "
                    f"{ratio or ''} | {note} |")
    return "\n".join(rows)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (bf16 dense) for MFU; default: rdr_jax.training.flops' table by device kind")
    p.add_argument("--batch", type=int, default=64, help="questions per DPR step (2 passages each)")
    p.add_argument("--lq", type=int, default=32)
    p.add_argument("--lp", type=int, default=256)
    p.add_argument("--remat", action="store_true", help="the engine's model.remat (recompute layers in backward)")
    p.add_argument("--scan-layers", action="store_true", help="the engine's model.scan_layers (one scanned layer)")
    p.add_argument("--encode-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="back-to-back calls timed per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="interleaved beam-search calls per side")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: bert-base's 12)")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="attention_probs_dropout_prob (default 0.1, the training recipe's)")
    p.add_argument("--attention", choices=("auto", "xla", "cudnn", "pallas"), default=None,
                   help=f"sets {ATTENTION_ENV} for the parts (default: the environment's, else auto)")
    p.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg", "unsafe_rbg"],
                   help="PRNG of the step's dropout key")
    p.add_argument("--label", default="", help="a name for this run in each JSON line")
    p.add_argument("--jsonl", type=Path, default=None, help="append each part's JSON line to this file")
    p.add_argument("--part-timeout", type=float, default=600, help="seconds one part may take, compile included")
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for all the parts of this call: each part's timeout is cut to what is left, and a "
                        "part that cannot get 20 s is reported as skipped")
    p.add_argument("--in-process", action="store_true",
                   help="run the parts in this process (warm caches after the first; no timeout)")
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes: a smoke run of the code on a CPU")
    p.add_argument("--summarize", type=Path, default=None, metavar="JSONL",
                   help="print a markdown table of a results file and exit")
    return p


def main(argv=None) -> list[dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    if args.summarize:
        lines = [json.loads(line) for line in args.summarize.read_text().splitlines() if line.startswith("{")]
        print(summarize(lines))
        return lines
    if args.attention:
        os.environ[ATTENTION_ENV] = args.attention
    args.model = dict(TINY_BERT if args.tiny else BERT_BASE)
    if args.layers:
        args.model["num_hidden_layers"] = args.layers
    if args.attention_dropout is not None:
        args.model["attention_probs_dropout_prob"] = args.attention_dropout
    child_argv = _child_argv(argv)
    deadline = None if args.budget_s is None else time.monotonic() + args.budget_s
    results = []
    for name in args.parts:
        timeout = args.part_timeout if deadline is None else min(args.part_timeout, deadline - time.monotonic())
        if timeout < 20:
            result = {"part": name, "error": "skipped: the time budget is spent"}
        elif args.in_process:
            result = run_part(name, args)
        else:
            result = run_in_child(name, child_argv, timeout)
        result.setdefault("label", args.label)
        emit(result, args.jsonl)
        results.append(result)
    return results


def _child_argv(argv: list[str]) -> list[str]:
    """``argv`` without what the parent handles: ``--parts`` and its values, ``--jsonl``/``--part-timeout`` and
    theirs (the parent writes each line once)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.split("=")[0] in ("--jsonl", "--part-timeout", "--budget-s", "--parts"):
            i += 1
            if "=" in a:
                continue
            while i < len(argv) and not argv[i].startswith("--") and (a == "--parts" or argv[i - 1] == a):
                i += 1
            continue
        out.append(a)
        i += 1
    return out


if __name__ == "__main__":
    main()

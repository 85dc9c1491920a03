"""Accelerator measurements (run on a GPU/TPU machine), each beside the PyTorch original on the same device:

1. a bf16 DPR training step at bert-base size through the project's training engine (``DPRTask`` +
   ``make_train_step``: both towers train, dropout on, AdamW, fp32 master weights), MFU against the device's
   bf16 peak from the analytic count the trainer logs (``C.dpr_step_flops``; the same FLOPs credited to both
   sides, though transformers also computes every position of the last layer), XLA's cost analysis reported
   beside it; PyTorch: two BertModels under bf16 autocast, the same loss, ``torch.optim.AdamW``;
2. bert-base DPR context-encoder throughput (bf16 forward, passages/s);
3. the T5 constrained beam search of ``benchmarks.beam_search`` (fp32, both sides on the device).

    python -m benchmarks.accelerator [--peak-tflops 989] [--batch 64] [--json out.json]

Steps are timed back to back (the queue kept full, as in training) and divided: ``steps`` calls, one wait at
the end. Not part of ``python -m benchmarks`` (that suite is CPU-side); it needs an accelerator to mean anything.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common as C
from rdr_jax.models.layers import ATTENTION_ENV

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

    setup, step, sharding, task = engine_step(workdir, init=dict(args.model), dtype="bfloat16",
                                              remat=args.remat)
    batch = task.batch_maker(lambda idx, rng: full_batch(args.batch, args.lq, args.lp))(None, None)
    batch = jax.device_put(batch, sharding)
    state, frozen, key = setup.state, setup.frozen, jax.random.key(0, impl=args.prng)
    # what the trainer logs MFU with (the task's analytic count), beside XLA's counts of the lowered and the
    # compiled program (on a GPU both miss the cuBLAS GEMMs)
    out = {"trainer_flops_per_step": task.step_flops({k: tuple(v.shape) for k, v in batch.items()}),
           "xla_lowered_flops": step_flops(step, (state, frozen, batch, key))}
    t0 = time.perf_counter()
    compiled = step.lower(state, frozen, batch, key).compile()
    out.update(jax_compile_s=round(time.perf_counter() - t0, 2), xla_compiled_flops=C.compiled_flops(compiled))
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
    return out


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
    return {"torch": torch.__version__, "torch_device": dev, "torch_train_step_ms": round(ms, 2)}


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
            **_mfu_pair("encode", flops, jax_ms, torch_ms, args.peak)}


def _mfu_pair(what: str, flops, jax_ms: float, torch_ms: float | None, peak: float | None) -> dict:
    if not flops or not peak:
        return {}
    out = {f"jax_{what}_mfu": round(flops / (jax_ms / 1000) / peak, 4)}
    if torch_ms:
        out[f"torch_{what}_mfu"] = round(flops / (torch_ms / 1000) / peak, 4)
    return out


def beam_search(args, workdir: Path) -> dict:
    from benchmarks import beam_search as B

    result = B.constrained_search(C.Options(quick=args.tiny, repeats=args.repeats, workdir=workdir,
                                            progress=False))
    return {f"beam_{k}": v for k, v in result.to_dict().items() if k != "model"}


def run(args) -> dict:
    import jax
    from rdr_jax.training.flops import device_peak_flops

    args.peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops()
    out = {"label": args.label, "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
           "flax": __import__("flax").__version__, "peak_flops": args.peak, "model": args.model,
           "batch_questions": args.batch, "lq": args.lq, "lp": args.lp, "steps_timed": args.steps,
           "prng": args.prng, "attention": os.environ.get(ATTENTION_ENV, "xla"), "remat": args.remat,
           "analytic_flops_per_step": C.dpr_step_flops(args.model, args.batch, args.lq, args.lp,
                                                      remat=args.remat)}
    work = Path(tempfile.mkdtemp())
    parts = {"train": lambda: jax_train(args, work / "train"), "torch_train": lambda: torch_train(args),
             "encode": lambda: encoder_throughput(args), "beam": lambda: beam_search(args, work / "beam")}
    for name in args.parts:
        try:
            out.update(parts[name]())
        except Exception as e:  # one part failing must not lose the others' numbers
            out[f"{name}_error"] = f"{type(e).__name__}: {e}"
    if "jax_train_step_ms" in out:
        # MFU counts the model's FLOPs (analytic); XLA's count adds the optimizer and elementwise work
        out.update(_mfu_pair("train", out["analytic_flops_per_step"], out["jax_train_step_ms"],
                             out.get("torch_train_step_ms"), args.peak))
        if "torch_train_step_ms" in out:
            out["train_ratio_torch_over_jax"] = round(out["torch_train_step_ms"] / out["jax_train_step_ms"], 3)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak (bf16 dense) for MFU; default: rdr_jax.training.flops' table by device kind")
    p.add_argument("--batch", type=int, default=64, help="questions per DPR step (2 passages each)")
    p.add_argument("--lq", type=int, default=32)
    p.add_argument("--lp", type=int, default=256)
    p.add_argument("--remat", action="store_true", help="the engine's model.remat (recompute layers in backward)")
    p.add_argument("--encode-batch", type=int, default=512)
    p.add_argument("--steps", type=int, default=20, help="back-to-back calls timed per measurement")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="interleaved beam-search calls per side")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--layers", type=int, default=None, help="encoder layers (default: bert-base's 12)")
    p.add_argument("--attention-dropout", type=float, default=None,
                   help="attention_probs_dropout_prob (default 0.1); 0 lets the step use fused attention")
    p.add_argument("--prng", default="threefry2x32", choices=["threefry2x32", "rbg", "unsafe_rbg"],
                   help="PRNG of the step's dropout key")
    p.add_argument("--label", default="", help="a name for this run in the JSON")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="tiny models and shapes: a smoke run of the code on a CPU")
    args = p.parse_args(argv)
    args.model = dict(TINY_BERT if args.tiny else BERT_BASE)
    if args.layers:
        args.model["num_hidden_layers"] = args.layers
    if args.attention_dropout is not None:
        args.model["attention_probs_dropout_prob"] = args.attention_dropout
    out = run(args)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return out


if __name__ == "__main__":
    main()

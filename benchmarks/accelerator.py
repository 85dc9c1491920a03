"""Accelerator measurements (run on a GPU/TPU machine): a bf16 DPR training step at bert-base size through
the project's training engine, with FLOPs from XLA's cost analysis and MFU against the device's peak, and
bert-base encoder throughput; each beside the PyTorch original (bf16 autocast) on the same device.

    python -m benchmarks.accelerator --peak-tflops 989 [--batch 64] [--json out.json]

Not part of ``python -m benchmarks`` (that suite is CPU-side); it needs an accelerator to mean anything.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def jax_train_step(workdir: Path, model: dict, num_q: int, lq: int, lp: int, dtype: str):
    """The engine's DPR step (both encoders train, dropout on, AdamW), bf16 compute, fp32 master weights."""
    import jax
    from rdr_jax.tasks.dpr import DPRTask, MODEL_DEFAULTS
    from rdr_jax.training.config import Config
    from rdr_jax.training.optim import make_optimizer
    from rdr_jax.training.partitioning import batch_sharding, make_mesh
    from rdr_jax.training.state import create_train_state
    from rdr_jax.training.step import make_train_step
    from rdr_jax.training.config import load_config

    config = load_config(Path(__file__).resolve().parent.parent / "configs" / "tiny" / "dpr.yaml",
                         [f"model.dtype={dtype}", f"model.init={json.dumps(model)}"], workdir=str(workdir))
    task = DPRTask(config, workdir)
    mesh = make_mesh(-1, 1, 1)
    tx, schedule = make_optimizer(config.optim, 1000)
    setup = create_train_state(task.build_model(), task.trainable_filter(), tx, mesh)
    step = make_train_step(task, setup, tx, schedule, mesh, 1)
    rng = np.random.default_rng(0)
    batch = {"q_input_ids": rng.integers(1000, 30000, (num_q, lq), dtype=np.int32),
             "q_attention_mask": np.ones((num_q, lq), np.int32),
             "p_input_ids": rng.integers(1000, 30000, (2 * num_q, lp), dtype=np.int32),
             "p_attention_mask": np.ones((2 * num_q, lp), np.int32),
             "positive_index": (np.arange(num_q) * 2).astype(np.int32)}
    batch = jax.device_put(batch, batch_sharding(mesh))
    return setup, step, batch


def run(args) -> dict:
    import jax

    out = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "batch_questions": args.batch,
           "lq": args.lq, "lp": args.lp, "peak_tflops": args.peak_tflops}
    work = Path(tempfile.mkdtemp())
    setup, step, batch = jax_train_step(work, args.model, args.batch, args.lq, args.lp, "bfloat16")
    state = setup.state
    t0 = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    out["jax_compile_and_first_step_s"] = round(time.perf_counter() - t0, 2)
    flops = None
    try:
        cost = step.lower(state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        flops = float(cost.get("flops", 0.0)) or None
    except Exception as e:  # cost analysis is best effort across jax versions
        out["cost_analysis_error"] = f"{type(e).__name__}: {e}"

    def one():
        nonlocal state
        state, m = step(state, batch)
        jax.block_until_ready(m)

    for _ in range(3):
        one()
    jax_ms = _median_ms(one, args.repeats)
    tokens = args.batch * args.lq + 2 * args.batch * args.lp
    out.update(jax_train_step_ms=round(jax_ms, 2), xla_flops_per_step=flops,
               jax_tokens_per_s=round(tokens / jax_ms * 1000))
    if flops and args.peak_tflops:
        out["jax_mfu"] = round(flops / (jax_ms / 1000) / (args.peak_tflops * 1e12), 4)
    out.update(torch_side(args, tokens, flops))
    out.update(encoder_throughput(args))
    return out


def torch_side(args, tokens, flops) -> dict:
    try:
        import torch
        import transformers
    except ImportError:
        return {"torch": "not installed"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = transformers.BertConfig(**args.model)
    q, p = transformers.BertModel(cfg).to(dev), transformers.BertModel(cfg).to(dev)
    opt = torch.optim.AdamW(list(q.parameters()) + list(p.parameters()), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    qi = torch.randint(1000, 30000, (args.batch, args.lq), generator=g).to(dev)
    pi = torch.randint(1000, 30000, (2 * args.batch, args.lp), generator=g).to(dev)
    target = torch.arange(args.batch, device=dev) * 2

    def step():
        with torch.autocast(dev, dtype=torch.bfloat16):
            qe = q(input_ids=qi).last_hidden_state[:, 0]
            pe = p(input_ids=pi).last_hidden_state[:, 0]
            loss = torch.nn.functional.cross_entropy((qe @ pe.T).float(), target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(q.parameters()) + list(p.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        step()
    ms = _median_ms(step, args.repeats)
    out = {"torch": torch.__version__, "torch_train_step_ms": round(ms, 2)}
    if flops and args.peak_tflops:
        out["torch_mfu_same_flops"] = round(flops / (ms / 1000) / (args.peak_tflops * 1e12), 4)
    return out


def encoder_throughput(args) -> dict:
    """bert-base DPR context encoder forward in bf16: passages/s for JAX and PyTorch."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from rdr_jax.models import DPRConfig, DPRContextEncoder

    rows, length = args.encode_batch, args.lp
    model = nnx.jit(lambda: DPRContextEncoder(DPRConfig.from_dict(dict(args.model)), dtype=jnp.bfloat16,
                                              rngs=nnx.Rngs(0)))()
    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, ids, m: nnx.merge(graphdef, p)(ids, m).pooler_output)
    ids = jnp.asarray(np.random.default_rng(1).integers(1000, 30000, (rows, length), dtype=np.int32))
    mask = jnp.ones_like(ids)
    jax.block_until_ready(fwd(params, ids, mask))
    jax_ms = _median_ms(lambda: jax.block_until_ready(fwd(params, ids, mask)), args.repeats)
    out = {"encode_rows": rows, "encode_length": length, "jax_encode_ms": round(jax_ms, 2),
           "jax_passages_per_s": round(rows / jax_ms * 1000)}
    try:
        import torch
        import transformers

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        m = transformers.BertModel(transformers.BertConfig(**args.model)).to(dev).eval()
        ti = torch.as_tensor(np.asarray(ids)).to(dev)

        def fwd_t():
            with torch.inference_mode(), torch.autocast(dev, dtype=torch.bfloat16):
                m(input_ids=ti).last_hidden_state[:, 0]
            if dev == "cuda":
                torch.cuda.synchronize()

        for _ in range(3):
            fwd_t()
        t_ms = _median_ms(fwd_t, args.repeats)
        out.update(torch_encode_ms=round(t_ms, 2), torch_passages_per_s=round(rows / t_ms * 1000),
                   encode_ratio_torch_over_jax=round(t_ms / jax_ms, 3))
    except Exception as e:
        out["torch_encode_error"] = f"{type(e).__name__}: {e}"
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (bf16 dense), for MFU")
    p.add_argument("--batch", type=int, default=64, help="questions per DPR step (2 passages each)")
    p.add_argument("--lq", type=int, default=32)
    p.add_argument("--lp", type=int, default=256)
    p.add_argument("--encode-batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--tiny", action="store_true", help="a tiny BERT: a smoke run of the code path on a CPU")
    args = p.parse_args(argv)
    args.model = dict(BERT_BASE, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128) if args.tiny else dict(BERT_BASE)
    out = run(args)
    if "torch_train_step_ms" in out:
        out["train_ratio_torch_over_jax"] = round(out["torch_train_step_ms"] / out["jax_train_step_ms"], 3)
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()

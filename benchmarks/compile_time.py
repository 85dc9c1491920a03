"""Compile time of a DPR-like training step against depth, unrolled vs scanned layers (``scan_layers``).

    python -m benchmarks.compile_time                     # layers 2 and 12, unrolled and scanned
    python -m benchmarks.compile_time --layers 2 6 12 --remat-policy nothing_saveable --json out.json
    python -m benchmarks.compile_time --engine            # the training engine's whole step instead

Each measurement runs in a fresh process with JAX's persistent compilation cache off, so every one compiles
cold. The program: ``jax.jit(jax.value_and_grad(loss))`` over a question encoder and a context encoder
(``DPRQuestionEncoder``/``DPRContextEncoder``, bert-base width: hidden 768, 12 heads, FFN 3072, vocab 30522),
``batch`` questions of ``lq`` tokens, a positive and a hard negative passage of ``lp`` tokens each, dropout on,
in-batch negatives NLL, gradients of both encoders. Parameters are shapes only (``nnx.eval_shape``): nothing
is initialised or run. Reported: ``trace_s`` (tracing + lowering to StableHLO), ``compile_s`` (XLA), their
sum ``total_s``, and per depth the ratio deepest/shallowest of ``total_s``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BERT_BASE = dict(vocab_size=30522, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                 max_position_embeddings=512, type_vocab_size=2)


def measure_engine(layers: int, scan: bool, batch: int, lq: int, lp: int, remat_policy: str | None) -> dict:
    """One cold compile of the training engine's DPR step (``benchmarks.accelerator --parts train``'s program:
    bf16, AdamW, the task's own loss) in this process."""
    import tempfile
    from pathlib import Path

    import jax
    from benchmarks.accelerator import full_batch
    from benchmarks.train_step import engine_step

    model = {"init": {**BERT_BASE, "num_hidden_layers": layers}, "dtype": "bfloat16"}
    if scan:
        model["scan_layers"] = True
    if remat_policy:
        model["remat_policy"] = remat_policy
    with tempfile.TemporaryDirectory() as workdir:
        setup, step, sharding, task = engine_step(Path(workdir), **model)
        data = jax.device_put(task.batch_maker(lambda idx, rng: full_batch(batch, lq, lp))(None, None), sharding)
        t0 = time.perf_counter()
        lowered = step.lower(setup.state, setup.frozen, data, jax.random.key(0))
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
    return {"layers": layers, "scan_layers": scan, "remat_policy": remat_policy or "everything", "batch": batch,
            "lq": lq, "lp": lp, "engine": True, "trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "jax": jax.__version__, "backend": jax.default_backend()}


def measure(layers: int, scan: bool, batch: int, lq: int, lp: int, remat_policy: str | None) -> dict:
    """One cold compile in this process (call it in a fresh one)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from rdr_jax.models import DPRContextEncoder, DPRQuestionEncoder
    from rdr_jax.models.dpr import DPRConfig

    config = DPRConfig.from_dict({**BERT_BASE, "num_hidden_layers": layers})
    compute = dict(scan_layers=scan, remat_policy=remat_policy)
    question = nnx.eval_shape(lambda: DPRQuestionEncoder(config, rngs=nnx.Rngs(0), **compute))
    context = nnx.eval_shape(lambda: DPRContextEncoder(config, rngs=nnx.Rngs(1), **compute))
    (q_def, q_params), (c_def, c_params) = nnx.split(question), nnx.split(context)

    def loss(q_params, c_params, batch, key):
        rngs = nnx.Rngs(dropout=key)
        q = nnx.merge(q_def, q_params)(batch["q_ids"], batch["q_mask"], rngs=rngs, deterministic=False,
                                       cls_only=True).pooler_output
        p = nnx.merge(c_def, c_params)(batch["p_ids"], batch["p_mask"], rngs=rngs, deterministic=False,
                                       cls_only=True).pooler_output
        scores = q @ p.T                                   # [batch, 2 * batch]: positive i at column i
        log_probs = jax.nn.log_softmax(scores, axis=-1)
        return -jnp.mean(log_probs[jnp.arange(q.shape[0]), jnp.arange(q.shape[0])])

    ids = lambda n, length: jax.ShapeDtypeStruct((n, length), jnp.int32)
    batch_shapes = {"q_ids": ids(batch, lq), "q_mask": ids(batch, lq), "p_ids": ids(2 * batch, lp),
                    "p_mask": ids(2 * batch, lp)}
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    t0 = time.perf_counter()
    lowered = step.lower(q_params, c_params, batch_shapes, jax.random.key(0))
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    return {"layers": layers, "scan_layers": scan, "remat_policy": remat_policy or "everything", "batch": batch,
            "lq": lq, "lp": lp, "trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2),
            "total_s": round(t2 - t0, 2), "jax": jax.__version__, "backend": jax.default_backend()}


def run_fresh(layers: int, scan: bool, args) -> dict:
    env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false", JAX_COMPILATION_CACHE_DIR="")
    cmd = [sys.executable, "-m", "benchmarks.compile_time", "--one", "--layers", str(layers), "--batch",
           str(args.batch), "--lq", str(args.lq), "--lp", str(args.lp)]
    if scan:
        cmd.append("--scan")
    if args.remat_policy:
        cmd += ["--remat-policy", args.remat_policy]
    if args.engine:
        cmd.append("--engine")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 12])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--lq", type=int, default=8)
    p.add_argument("--lp", type=int, default=32)
    p.add_argument("--remat-policy", default=None,
                   help="a ComputeSettings.remat_policy (default: none, i.e. 'everything')")
    p.add_argument("--scan", action="store_true", help="with --one: the scanned layout")
    p.add_argument("--only", choices=["unrolled", "scanned"], help="measure one layout only")
    p.add_argument("--engine", action="store_true",
                   help="the training engine's whole DPR step (bf16, AdamW: benchmarks.accelerator's train part) "
                        "instead of the bare value_and_grad")
    p.add_argument("--one", action="store_true", help="measure once in this process (what each child runs)")
    p.add_argument("--json", help="write every row to this file")
    args = p.parse_args(argv)
    if args.one:
        fn = measure_engine if args.engine else measure
        print(json.dumps(fn(args.layers[0], args.scan, args.batch, args.lq, args.lp, args.remat_policy)))
        return 0
    layouts = [s for s in (False, True) if args.only is None or args.only == ("scanned" if s else "unrolled")]
    rows = []
    for scan in layouts:
        for layers in args.layers:
            row = run_fresh(layers, scan, args)
            rows.append(row)
            print(f"{'scanned' if scan else 'unrolled':9s} layers {layers:3d}: trace+lower {row['trace_s']:7.2f} s, "
                  f"XLA compile {row['compile_s']:7.2f} s, total {row['total_s']:7.2f} s", flush=True)
    for scan in layouts:
        by_depth = {r["layers"]: r["total_s"] for r in rows if r["scan_layers"] == scan}
        deep, shallow = max(by_depth), min(by_depth)
        if deep != shallow:
            print(f"{'scanned' if scan else 'unrolled'}: {deep} vs {shallow} layers: "
                  f"{by_depth[deep] / by_depth[shallow]:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

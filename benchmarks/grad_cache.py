"""Peak device memory of a DPR training step with and without GradCache (``train.grad_cache_chunk``), from XLA's
memory analysis of the compiled step (``jax.jit(step).lower(...).compile().memory_analysis()``: nothing runs).

    python -m benchmarks.grad_cache                       # MiniLM-size random BERT, B = 16, Lq 32, Lp 128
    python -m benchmarks.grad_cache --batch 32 --factor 8 --layers 12 --hidden 768 --dtype bfloat16

Three programs of the engine's step (``make_train_step``: both encoders train, dropout on, AdamW): uncached on
``B`` questions, uncached on ``factor x B``, and cached on ``factor x B`` with chunks of ``B``. Reported per
program: XLA's temp bytes (activations and other scratch: what grows with the batch), argument and output bytes
(parameters, optimizer state, the batch), and their sum. The cached ``factor x B`` step's temp bytes should be
close to the uncached ``B`` step's, while the uncached ``factor x B`` step's grow about ``factor`` times.
``python -m benchmarks grad_cache`` runs it (``--quick``: a tiny BERT) and also times one call of each step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import common as C


def build_step(workdir: Path, batch: int, chunk: int | None, init: dict, dtype: str):
    """(compiled step, its arguments) of the engine's DPR step on a global batch of ``batch`` questions."""
    import jax
    import optax
    from rdr_jax.tasks.dpr import DPRTask
    from rdr_jax.training.config import build_config
    from rdr_jax.training.partitioning import batch_sharding, make_mesh
    from rdr_jax.training.state import create_train_state
    from rdr_jax.training.step import make_train_step

    config = build_config({"workdir": str(workdir), "task": {"name": "dpr"}, "model": {"init": init, "dtype": dtype},
                           "data": {"train_file": "unused"},
                           "train": {"steps": 1, "batch_size": batch, "seed": 0, "grad_cache_chunk": chunk}},
                          DPRTask, source="benchmark")
    task = DPRTask(config, workdir)
    mesh = make_mesh(devices=jax.devices()[:1])
    tx = optax.adamw(1e-5)
    setup = create_train_state(task.build_model(), task.trainable_filter(), tx, mesh)
    step = make_train_step(task, setup, tx, lambda _: 1e-5, mesh, grad_cache_chunk=chunk)
    return step, setup, batch_sharding(mesh)


def measure(workdir: Path, batch: int, chunk: int | None, init: dict, dtype: str, lq: int, lp: int,
            time_it: bool) -> dict:
    import jax
    from benchmarks.accelerator import full_batch

    step, setup, sharding = build_step(workdir, batch, chunk, init, dtype)
    data = jax.device_put(full_batch(batch, lq, lp), sharding)
    args = (setup.state, setup.frozen, data, jax.random.key(0))
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    out = {"batch": batch, "grad_cache_chunk": chunk, "compile_s": round(time.perf_counter() - t0, 2)}
    mem = compiled.memory_analysis()
    for name in ("temp", "argument", "output", "alias"):
        out[f"{name}_bytes"] = int(getattr(mem, f"{name}_size_in_bytes", 0) or 0) if mem is not None else None
    if mem is not None:   # donated state: outputs alias the arguments
        out["peak_bytes"] = out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
    if time_it:
        state, metrics = compiled(*args)
        jax.block_until_ready(metrics["loss"])
        t0 = time.perf_counter()
        _, metrics = compiled(state, *args[1:])
        out["loss"] = float(metrics["loss"])
        out["step_ms"] = (time.perf_counter() - t0) * 1e3
    return out


def compare(workdir: Path, batch: int, factor: int, init: dict, dtype: str, lq: int, lp: int,
            time_it: bool = False) -> list[dict]:
    """The three programs (module docstring), each compiled in its own temporary workdir."""
    rows = []
    for name, b, chunk in ((f"uncached B={batch}", batch, None), (f"uncached {factor}B={factor * batch}", factor * batch, None),
                           (f"cached {factor}B={factor * batch}, chunk {batch}", factor * batch, batch)):
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            rows.append({"name": name, **measure(Path(tmp), b, chunk, init, dtype, lq, lp, time_it)})
    base = rows[0]["temp_bytes"]
    for row in rows:
        row["temp_vs_uncached_B"] = round(row["temp_bytes"] / base, 3) if base else None
    return rows


def model_init(hidden: int, layers: int, heads: int) -> dict:
    return dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                max_position_embeddings=512, vocab_size=30522)


def run(opts: C.Options) -> list[C.Result]:
    """``python -m benchmarks grad_cache``: MiniLM-size (or, with --quick, tiny) encoders; the step times are of
    one call each on this machine's devices."""
    if opts.quick:
        init, batch, factor, lq, lp = model_init(32, 1, 4), 2, 4, 8, 16   # a smoke run of the code path
    else:
        init, batch, factor, lq, lp = model_init(384, 6, 12), 8, 8, 32, 128
    rows = compare(opts.workdir, batch, factor, init, "float32", lq, lp, time_it=True)
    return [C.Result(f"dpr step {row['name']}", row["step_ms"], None,
                     f"temp {row['temp_bytes'] / 2 ** 20:.1f} MiB ({row['temp_vs_uncached_B']}x uncached B)",
                     extra=row) for row in rows]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.grad_cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=16, help="B: questions of the uncached step (and the chunk)")
    p.add_argument("--factor", type=int, default=8, help="the large batch is factor x B")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--lq", type=int, default=32)
    p.add_argument("--lp", type=int, default=128)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--time", action="store_true", help="also run each step twice and time the second call")
    p.add_argument("--json", type=Path, help="write the rows to this file")
    args = p.parse_args(argv)
    import jax

    with tempfile.TemporaryDirectory(prefix="rdr_jax_grad_cache_") as tmp:
        rows = compare(Path(tmp), args.batch, args.factor, model_init(args.hidden, args.layers, args.heads),
                       args.dtype, args.lq, args.lp, args.time)
    report = {"device": jax.devices()[0].device_kind, "backend": jax.default_backend(), "dtype": args.dtype,
              "hidden": args.hidden, "layers": args.layers, "lq": args.lq, "lp": args.lp, "rows": rows}
    for row in rows:
        print(f"{row['name']:<34} temp {row['temp_bytes'] / 2 ** 20:9.1f} MiB ({row['temp_vs_uncached_B']}x)  "
              f"arguments {row['argument_bytes'] / 2 ** 20:8.1f} MiB  compile {row['compile_s']} s"
              + (f"  step {row['step_ms']:.0f} ms" if "step_ms" in row else ""))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return rows


if __name__ == "__main__":
    main()

"""``python -m benchmarks [names...] [--quick] [--json OUT] [--repeats N] [--peak-tflops T]``

Runs the named benchmarks (all by default), prints a table (rdr_jax ms, torch ms, torch/jax: > 1 means
rdr_jax is faster) and optionally writes every number as JSON.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

if __name__ == "__main__":  # the process set-up of the rdr-jax command (rdr_jax.runtime): PyTorch gains from it too
    from rdr_jax import runtime

    runtime.tune_host_process()

from benchmarks import BENCHMARKS  # noqa: E402
from benchmarks import common as C  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", metavar="NAME", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: a smoke run, not a measurement")
    p.add_argument("--json", type=Path, metavar="OUT", help="write all numbers to this JSON file")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 5; 2 with --quick)")
    p.add_argument("--threads", type=int, default=2, help="PyTorch intra-op threads and FAISS threads (default 2)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s, to report MFU (omitted when not given)")
    p.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE", "default"), default="PASSIVE",
                   help="OpenMP wait policy for PyTorch's threads (default PASSIVE: with shared cores, OpenMP's "
                        "default spin-waiting makes small PyTorch ops 100x slower; 'default' leaves it unset)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "torch" in sys.modules and args.omp_wait_policy != "default":
        print("[bench] warning: torch already imported; --omp-wait-policy has no effect", file=sys.stderr)
    if args.omp_wait_policy != "default":  # read by libgomp when torch loads, so set before any import of torch
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    names = args.names or list(BENCHMARKS)
    try:  # transformers' per-load key reports (the MiniLM checkpoint's unused pooler) are noise here
        import transformers
        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory(prefix="rdr_jax_bench_", dir=args.workdir) as tmp:
        opts = C.Options(quick=args.quick, repeats=args.repeats or (2 if args.quick else 5), threads=args.threads,
                         peak_tflops=args.peak_tflops, workdir=Path(tmp))
        report = {"environment": C.environment(args.threads), "quick": args.quick, "repeats": opts.repeats,
                  "peak_tflops": args.peak_tflops, "results": [], "errors": {}}
        results: list[C.Result] = []
        for name in names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                module_results = importlib.import_module(f"benchmarks.{name}").run(opts)
            except Exception as e:  # one failing benchmark must not hide the others' numbers
                traceback.print_exc()
                report["errors"][name] = f"{type(e).__name__}: {e}"
                continue
            for r in module_results:
                r.extra.setdefault("benchmark", name)
            results.extend(module_results)
            print(f"[bench] {name} done in {time.perf_counter() - t0:.0f}s\n{C.table(module_results)}",
                  file=sys.stderr, flush=True)
        report["results"] = [r.to_dict() for r in results]
    env = report["environment"]
    print(f"\n{env['date']}  {env['device']}  ({env['cpu_count']} cores, threads={env['threads']}, "
          f"jax {env['jax']}, torch {env['torch']}, fp32)")
    print("Timings interleaved JAX/PyTorch, medians of", opts.repeats, "(cores may be shared with other work).")
    print(C.table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"[bench] wrote {args.json}", file=sys.stderr)
    if report["errors"]:
        print(f"[bench] failed: {report['errors']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

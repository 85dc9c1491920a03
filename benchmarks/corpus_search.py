"""Corpus-scale exact search: rdr_jax's device search (retrieval/device_search.py) vs FAISS flat, same vectors.

Synthetic passage vectors (default 2M x 768, float16 on disk, the layout ``rdr-jax encode --fp16`` writes, in
shards of 100k rows) and questions (corpus rows plus noise). Every stage runs in a fresh subprocess, so its peak
resident memory (``VmHWM`` of /proc/self/status) is its own:

- ``device``: ``DeviceSearch`` loads the vectors onto the JAX devices (here: the CPU) in their storage dtype and
  searches the questions (top-100, float32 scores). The process runs with rdr-jax's malloc settings, as
  ``rdr-jax retrieve`` does. Peak RSS is reported against the float16 bytes of the vectors (target <= 1.2x).
- ``faiss_flat``: ``PassageIndex.build(kind="flat")`` (float32: FAISS holds twice the float16 bytes) and
  search with ``--threads`` OpenMP threads, without the malloc settings, as ``rdr-jax index`` runs.
- ``faiss_flat_malloc_tuned``: the same build with the malloc settings, to show what ``rdr_jax/runtime.py``
  keeps away from ``rdr-jax index`` (skipped with ``--no-malloc-comparison`` or when 3.5x the float32 bytes do
  not fit in the available memory).

Reported per stage: build (load) time, queries/s, peak RSS / vector bytes, the top-100 agreement with the other
side, and the same extrapolated to 21M x 768 (time linear in rows; memory: the process's baseline plus the
measured growth above it, scaled by the rows).

``python -m benchmarks corpus_search`` (2M rows; ``--quick``: 20k x 64), or with its own options:
``python -m benchmarks.corpus_search --rows 2000000 --dim 768 --queries 512 --threads 2 [--json OUT]``.
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

SHARD_ROWS = 100_000
TARGET_ROWS = 21_000_000
K = 100


def vm_hwm_bytes() -> int:
    """Peak resident set size of this process (VmHWM), bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def write_vectors(out_dir: Path, rows: int, dim: int, seed: int = 0) -> Path:
    """An encoding directory of float16 unit-norm rows, written one shard at a time. One Gaussian shard is drawn;
    every other shard is it with its columns permuted and their signs flipped at random (distinct, equally
    distributed vectors, at the cost of a copy instead of a draw: drawing 2M x 768 normals takes minutes here)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((min(SHARD_ROWS, rows), dim), dtype=np.float32)
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float16)
    shards = 0
    for start in range(0, rows, SHARD_ROWS):
        n = min(SHARD_ROWS, rows - start)
        block = base[:n] if shards == 0 else base[:n, rng.permutation(dim)] * rng.choice(
            np.array([-1, 1], np.float16), dim)
        np.save(out_dir / f"embeddings-{shards:05d}.npy", np.ascontiguousarray(block))
        (out_dir / f"ids-{shards:05d}.json").write_text(json.dumps([str(i) for i in range(start, start + n)]))
        shards += 1
    (out_dir / "meta.json").write_text(json.dumps({"complete": True, "num_shards": shards, "dim": dim,
                                                   "num_passages": rows, "dtype": "float16"}))
    return out_dir


def make_queries(encoding: Path, n: int, seed: int = 1) -> np.ndarray:
    """Rows of the first shard plus noise: each question has real neighbours."""
    first = np.load(encoding / "embeddings-00000.npy", mmap_mode="r")
    rng = np.random.default_rng(seed)
    picked = np.asarray(first[np.sort(rng.choice(len(first), n, replace=len(first) < n))], np.float32)
    return picked + 0.05 * rng.standard_normal(picked.shape, dtype=np.float32)


# ---- stages (each in its own process) ------------------------------------------------------------------------

def stage_device(encoding: Path, queries: np.ndarray, threads: int, out: Path) -> dict:
    import jax

    from rdr_jax.retrieval.device_search import DeviceSearch

    jax.numpy.zeros(1).block_until_ready()
    baseline = vm_hwm_bytes()
    t0 = time.perf_counter()
    search = DeviceSearch(encoding, query_batch=256, progress=False)
    search.embeddings.block_until_ready()
    build = time.perf_counter() - t0
    search.search(queries[:search.query_batch], K)  # compile
    t0 = time.perf_counter()
    scores, rows = search.search(queries, K)
    seconds = time.perf_counter() - t0
    np.save(out, rows)
    return {"build_s": build, "search_s": seconds, "baseline_rss": baseline, "devices": len(search.devices),
            "backend": jax.default_backend(), "device_bytes": search.nbytes}


def stage_faiss(encoding: Path, queries: np.ndarray, threads: int, out: Path) -> dict:
    import faiss

    from rdr_jax.retrieval.index import PassageIndex

    faiss.omp_set_num_threads(threads)
    baseline = vm_hwm_bytes()
    t0 = time.perf_counter()
    index = PassageIndex.build(encoding, "flat", progress=False)
    build = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = list(index.search_rows(queries, K, batch_size=256))
    seconds = time.perf_counter() - t0
    np.save(out, np.concatenate([r for _, r in parts]))
    return {"build_s": build, "search_s": seconds, "baseline_rss": baseline, "threads": threads}


STAGES = {"device": stage_device, "faiss_flat": stage_faiss, "faiss_flat_malloc_tuned": stage_faiss}


def run_stage(name: str, encoding: Path, queries_path: Path, threads: int, workdir: Path) -> dict:
    from rdr_jax import runtime

    env = {k: v for k, v in os.environ.items()
           if k not in ("GLIBC_TUNABLES", "RDR_JAX_REEXECUTED", "RDR_JAX_USER_GLIBC_TUNABLES")}
    if name != "faiss_flat":  # rdr-jax retrieve's settings; rdr-jax index runs without them
        env["GLIBC_TUNABLES"] = runtime.merged_glibc_tunables("")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # FAISS's OpenMP threads must not spin on shared cores
    out = workdir / f"{name}.rows.npy"
    cmd = [sys.executable, "-m", "benchmarks.corpus_search", "--stage", name, "--encoding", str(encoding),
           "--queries-file", str(queries_path), "--threads", str(threads), "--stage-out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STAGE ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"stage {name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return {**json.loads(lines[-1][6:]), "rows_file": str(out)}


def available_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(rows: int, dim: int, n_queries: int, threads: int, workdir: Path, compare_malloc: bool = True
            ) -> list[C.Result]:
    t0 = time.perf_counter()
    encoding = write_vectors(workdir / "vectors", rows, dim)
    write_s = time.perf_counter() - t0
    queries = make_queries(encoding, n_queries)
    np.save(workdir / "queries.npy", queries)
    fp16_bytes, fp32_bytes = rows * dim * 2, rows * dim * 4
    stages = ["device", "faiss_flat"]
    if compare_malloc and available_bytes() > 3.5 * fp32_bytes:
        stages.append("faiss_flat_malloc_tuned")
    measured = {}
    for name in stages:
        print(f"[corpus_search] {name}: {rows:,} x {dim} ...", file=sys.stderr, flush=True)
        measured[name] = run_stage(name, encoding, workdir / "queries.npy", threads, workdir)
    device_rows = np.load(measured["device"]["rows_file"])
    results = []
    for name, m in measured.items():
        held = fp16_bytes if name == "device" else fp32_bytes
        qps = n_queries / m["search_s"]
        found = np.load(m["rows_file"])
        same = float(np.mean(found == device_rows))
        extra = {"stage": name, "rows": rows, "dim": dim, "queries": n_queries, "k": K, "threads": threads,
                 "queries_per_s": qps, "build_s": m["build_s"], "write_vectors_s": write_s,
                 "peak_rss_bytes": m["peak_rss"], "baseline_rss_bytes": m["baseline_rss"], "vector_bytes": held,
                 "peak_rss_over_vector_bytes": m["peak_rss"] / held,
                 "top100_identical_to_device": same,
                 "extrapolated_21M": {"queries_per_s": qps * rows / TARGET_ROWS,
                                      "build_s": m["build_s"] * TARGET_ROWS / rows,
                                      "vector_bytes": held * TARGET_ROWS / rows,
                                      # the process's own baseline plus what grew with the vectors, scaled
                                      "peak_rss_bytes": m["baseline_rss"] + (m["peak_rss"] - m["baseline_rss"])
                                      * TARGET_ROWS / rows},
                 **{k: v for k, v in m.items() if k in ("devices", "backend", "device_bytes")}}
        notes = (f"{rows:,}x{dim} ({'fp16' if name == 'device' else 'fp32'} {held / 2**30:.2f} GiB): "
                 f"{qps:,.0f} q/s, build {m['build_s']:.1f}s, peak RSS {m['peak_rss'] / held:.2f}x, "
                 f"top-100 = device {same:.4f}; at 21M: {extra['extrapolated_21M']['queries_per_s']:,.1f} q/s, "
                 f"{extra['extrapolated_21M']['peak_rss_bytes'] / 2**30:.0f} GiB")
        results.append(C.Result(f"corpus search: {name} (ms/query)", 1000.0 / qps, None, notes, extra))
    return results


def run(opts: C.Options) -> list[C.Result]:
    rows, dim, n_queries = (20_000, 64, 64) if opts.quick else (2_000_000, 768, 512)
    rows = int(os.environ.get("RDR_BENCH_SEARCH_ROWS", rows))
    return measure(rows, dim, n_queries, opts.threads, Path(opts.workdir), compare_malloc=not opts.quick)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.corpus_search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=2_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads (XLA:CPU uses every core)")
    p.add_argument("--no-malloc-comparison", action="store_true",
                   help="skip the FAISS build under rdr-jax's malloc settings")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--stage", choices=tuple(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--encoding", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--queries-file", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--stage-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stage:
        info = STAGES[args.stage](args.encoding, np.load(args.queries_file), args.threads, args.stage_out)
        print("STAGE " + json.dumps({**info, "peak_rss": vm_hwm_bytes()}), flush=True)
        return 0
    with tempfile.TemporaryDirectory(prefix="rdr_jax_corpus_search_", dir=args.workdir) as tmp:
        results = measure(args.rows, args.dim, args.queries, args.threads, Path(tmp),
                          compare_malloc=not args.no_malloc_comparison)
    print(C.table(results))
    for r in results:
        print(r.name, json.dumps(r.extra, default=float))
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

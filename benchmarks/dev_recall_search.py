"""Dev recall's search during training: the host's ``exact_top_k`` over the memory-mapped encoding (what process 0
alone ran before) vs ``SplitSearch`` on the devices (each process's rows held on its devices once per run, the
candidates rescored exactly), same vectors, same top-k rows.

``python -m benchmarks.dev_recall_search [--passages 1000000] [--dim 768] [--queries 1000] [--k 20]
[--devices 8] [--workdir DIR] [--json OUT]``

Synthetic fp16 encoding (``training_scale.write_encoding``: 50k-row shards, ``rdr-jax encode``'s layout) and
questions (corpus rows plus noise, so the top-k is not a near-tie everywhere). One fresh subprocess with
``--devices`` simulated CPU devices (``XLA_FLAGS``) measures: the host search's time; the device search's load
(once per training run) and search time (per evaluation, first call including compilation, then a second call);
the questions that fell back to the host; whether both return the same rows. Extrapolated to NQ (21M passages)
with 8 processes: the host time linear in the rows on one process (as before), the device time linear in each
process's rows (21M / 8) on hardware like this one's (this CPU, all cores shared by the 8 simulated devices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from benchmarks.training_scale import NQ_PASSAGES, PROCESSES_PER_NODE, emit, write_encoding

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    args = json.loads(sys.argv[1])
    from rdr_jax.retrieval.dev_recall import exact_top_k
    from rdr_jax.retrieval.device_search import DeviceSearch
    from rdr_jax.retrieval.passage_embeddings import PassageEmbeddings
    from rdr_jax.retrieval.split_search import ProcessRows, SplitSearch
    emb = PassageEmbeddings(args["encoding"])
    rng = np.random.default_rng(0)
    rows = rng.integers(0, len(emb), args["queries"])
    q = (emb.rows(rows) + rng.normal(size=(args["queries"], emb.shape[1]))).astype(np.float32)
    out = {}
    t = time.perf_counter()
    host = exact_top_k(q, emb, args["k"])
    out["host_s"] = time.perf_counter() - t
    t = time.perf_counter()
    device = DeviceSearch(args["encoding"], progress=False)
    out["device_load_s"] = time.perf_counter() - t
    out["devices"] = len(device.devices)
    search = SplitSearch(ProcessRows.of_process(emb), len(emb), device)
    for name in ("device_first_s", "device_s"):
        t = time.perf_counter()
        _, got = search.search(q, args["k"])
        out[name] = time.perf_counter() - t
    out["fallbacks"] = search.fallbacks // 2
    out["same_rows"] = bool((got == host).all())
    print("RESULT " + json.dumps(out), flush=True)
""")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/rdr_jax_dev_recall_search"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    encoding = write_encoding(args.workdir / f"enc_{args.passages}_{args.dim}", args.passages, args.dim)
    code = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=code,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps({"encoding": str(encoding), "queries": args.queries,
                                                                    "k": args.k})],
                          env=env, cwd=code, capture_output=True, text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    r = json.loads(line[len("RESULT "):])
    scale = NQ_PASSAGES / args.passages
    report = {"passages": args.passages, "dim": args.dim, "queries": args.queries, "k": args.k, **r,
              "speedup_per_evaluation": round(r["host_s"] / r["device_s"], 2),
              "nq_host_s": round(r["host_s"] * scale, 1),
              "nq_device_per_evaluation_s_8_processes": round(r["device_s"] * scale / PROCESSES_PER_NODE, 1),
              "nq_device_load_once_s_8_processes": round(r["device_load_s"] * scale / PROCESSES_PER_NODE, 1)}
    return emit(report, args.json)


if __name__ == "__main__":
    main()

"""`rdr-jax encode` on several processes equals one process: 2 processes x 4 CPU devices under jax.distributed
(gloo) reading their rows of a corpus store, 1 process x 8 devices reading the TSV, and 1 process x 1 device
(this one) all write the same embeddings (fp32 rounding aside: rows meet other batch neighbours and shard
sizes) and the same ids into one complete encoding directory each, without a merge step.
"""

import json
import subprocess
import sys

import numpy as np

import harness
from parity import assert_close
from test_multiprocess import cpu_env, free_port

MAX_LENGTH = 64


def test_two_processes_and_eight_devices_encode_like_one_device(tmp_path, minilm_dir):
    from rdr_jax.cli import main
    from rdr_jax.data.embedded_data import load_passages
    from rdr_jax.retrieval.encode import load_encoded

    model = harness.tiny_encoder_dir(tmp_path / "bert", minilm_dir)
    passages = load_passages()[:70]
    tsv = harness.write_passages_tsv(tmp_path / "passages.tsv", passages)
    assert main(["tokenize", "--passages", str(tsv), "--tokenizer", str(model), "--out", str(tmp_path / "store"),
                 "--max-length", str(MAX_LENGTH), "--no-progress"]) == 0
    common = ["--model", str(model), "--max-length", str(MAX_LENGTH), "--shard-size", "15", "--batch-size", "16"]
    cli = [sys.executable, "-m", "rdr_jax.cli", "encode"]
    port = free_port()
    procs = [subprocess.Popen(cli + ["--passages", str(tsv), "--out", str(tmp_path / "eight"), *common],
                              env=cpu_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    procs += [subprocess.Popen(cli + ["--passages", str(tmp_path / "store"), "--out", str(tmp_path / "two"), *common,
                                      "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                      "--process-id", str(i)],
                               env=cpu_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
              for i in range(2)]
    try:
        assert main(["encode", "--passages", str(tsv), "--out", str(tmp_path / "one"), *common]) == 0
        logs = [p.communicate(timeout=300)[0] for p in procs]
        for proc, log in zip(procs, logs):
            assert proc.returncode == 0, log[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    want, want_ids = load_encoded(tmp_path / "one")
    assert want_ids == [p["id"] for p in passages]
    for name in ("eight", "two"):
        got, got_ids = load_encoded(tmp_path / name)
        assert got_ids == want_ids, name
        assert_close(got, want, what=f"{name} vs one device")
    meta = json.loads((tmp_path / "two" / "meta.json").read_text())
    assert meta["complete"] and meta["num_shards"] == 5 and meta["num_passages"] == 70
    assert "process 1/2" in logs[2] and "process 0/2" in logs[1]
    written = sorted(p.name for p in (tmp_path / "two").iterdir())
    assert not [n for n in written if "tmp" in n or n.startswith("done-")], written
    assert np.isfinite(want).all()

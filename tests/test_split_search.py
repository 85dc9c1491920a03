"""Exact top-k over a corpus split between processes (rdr_jax/retrieval/split_search.py) and the dev recall built on
it: on 1 process x 8 simulated devices and on 2 processes x 4 devices (jax.distributed, gloo), the device search
(candidates rescored exactly) and the host search both give exactly ``exact_top_k``'s rows and scores over the whole
corpus, ties included (identical passages: score descending, row ascending), and ``DevRecall`` the same numbers as
``exact_top_k`` on one process.

The corpus is the embedded passages with synthetic fp16 vectors (a dev question's vector is its gold passage's
plus noise, so the recall is neither 0 nor 100), some passages repeated to make exact ties.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import harness
from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.retrieval.dev_recall import DevRecall, exact_top_k_scores
from test_multiprocess import cpu_env, free_port
from test_retrieval_pipeline import _write_shards

EMBEDDED = harness.REPO_ROOT / "rdr_jax" / "data" / "embedded"
DIM, K = 24, 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("split_search")
    passages = list(read_dpr_passages(EMBEDDED / "passages.tsv"))
    ids = [p["id"] for p in passages]
    rng = np.random.RandomState(0)
    vectors = rng.randn(len(ids), DIM).astype(np.float16)
    vectors[1000:1040] = vectors[7]                 # 41 identical passages: wider than the candidates' margin
    vectors[1500:1503] = vectors[1200]
    _write_shards(tmp / "emb", vectors, ids, shard_size=700)
    row = {pid: i for i, pid in enumerate(ids)}
    dev = [ex for ex in json.loads((EMBEDDED / "dev.biencoder.json").read_text())
           if str(ex["positive_ctxs"][0]["passage_id"]) in row][:120]
    with open(tmp / "dev.qa.jsonl", "w", encoding="utf-8") as f:
        for ex in dev:
            f.write(json.dumps({"question": ex["question"], "answers": ex["answers"]}) + "\n")
    gold = vectors[[row[str(ex["positive_ctxs"][0]["passage_id"])] for ex in dev]].astype(np.float32)
    queries = gold + 0.9 * rng.randn(*gold.shape).astype(np.float32)
    queries[:3] = vectors[7]                       # their top 20 is a 41-way exact tie
    queries[3:5] = vectors[1200]
    np.save(tmp / "q.npy", queries)
    return tmp, vectors, queries


SCRIPT = """
import json, sys
from rdr_jax.training import distributed
root, result, mode = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "two":
    distributed.initialize(None, sys.argv[4], 2, int(sys.argv[5]))
import jax, numpy as np
from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.retrieval.dev_recall import DevRecall
from rdr_jax.retrieval.device_search import DeviceSearch
from rdr_jax.retrieval.passage_embeddings import PassageEmbeddings
from rdr_jax.retrieval.split_search import ProcessRows, SplitSearch
queries = np.load(root + "/q.npy")
emb = PassageEmbeddings(root + "/emb")
rows = ProcessRows.of_process(emb)
device = DeviceSearch(root + "/emb", chunk_rows=64, query_batch=32, progress=False)
out = {"devices": len(device.devices), "rows": [rows.start, rows.stop]}
for name, search in (("device", SplitSearch(rows, len(emb), device, query_block=50)),
                     ("host", SplitSearch(rows, len(emb), None, query_block=50))):
    scores, top = search.search(queries, %(k)d)
    out[name] = {"scores": scores.tolist(), "rows": top.tolist(), "fallbacks": search.fallbacks}
# the dev recall of an encoding as the training loop computes it (every process calls; process 0 answers)
passages = list(read_dpr_passages(%(passages)r))
dev = DevRecall(root + "/dev.qa.jsonl", %(passages)r, [1, 5, %(k)d])
out["recall"] = dev(queries, SplitSearch(rows, len(emb), device), emb.ids)
# the encoded-per-process path: this process's rows only, as an array
mine = np.asarray(emb.rows(np.arange(rows.start, rows.stop)))
out["recall_local"] = dev(queries, SplitSearch(ProcessRows(mine, rows.start, rows.stop, rows.start), len(emb)),
                          [p["id"] for p in passages])
open(result, "w").write(json.dumps(out))
"""


def test_device_and_host_split_search_equal_exact_top_k_on_one_and_two_processes(corpus):
    tmp, vectors, queries = corpus
    script = SCRIPT % {"k": K, "passages": str(EMBEDDED / "passages.tsv")}
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.getcwd(), os.environ.get("PYTHONPATH")]))
    port = free_port()
    # results and logs go to files: a process blocked on a full pipe would hold the other at shutdown
    cmds = [([sys.executable, "-c", script, str(tmp), str(tmp / "one.json"), "one"], 8)]
    cmds += [([sys.executable, "-c", script, str(tmp), str(tmp / f"two{i}.json"), "two", f"127.0.0.1:{port}",
               str(i)], 4) for i in range(2)]
    logs = [open(tmp / f"log{i}.txt", "w") for i in range(3)]
    procs = [subprocess.Popen(cmd, env=dict(cpu_env(devices), PYTHONPATH=path), stdout=log,
                              stderr=subprocess.STDOUT) for (cmd, devices), log in zip(cmds, logs)]
    outputs = []
    try:
        for i, (proc, (cmd, _)) in enumerate(zip(procs, cmds)):
            proc.wait(timeout=300)
            logs[i].close()
            assert proc.returncode == 0, (tmp / f"log{i}.txt").read_text()[-4000:]
            outputs.append(json.loads(open(cmd[4]).read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    want_scores, want_rows = exact_top_k_scores(queries, vectors, K)
    assert len(set(want_scores[0].tolist())) < K // 2   # the 41 identical passages tie in its top 20
    one, first, second = outputs
    assert one["devices"] == 8 and first["devices"] == second["devices"] == 4
    assert first["rows"] == [0, len(vectors) // 2] and second["rows"] == [len(vectors) // 2, len(vectors)]
    for result in outputs:
        for name in ("device", "host"):
            np.testing.assert_array_equal(np.array(result[name]["rows"]), want_rows, err_msg=name)
            np.testing.assert_array_equal(np.array(result[name]["scores"], np.float32), want_scores, err_msg=name)
        # the device ranked most questions; the tied ones fell back to the host, which kept them exact
        assert result["device"]["fallbacks"] < len(queries) // 4 and result["host"]["fallbacks"] == 0
    # the 41-way tie (rows 7, 1000-1039) lies in process 0's half: its 3 questions could not be proven there
    assert one["device"]["fallbacks"] >= 3 and first["device"]["fallbacks"] >= 3
    dev = DevRecall(tmp / "dev.qa.jsonl", EMBEDDED / "passages.tsv", [1, 5, K])
    ids = [p["id"] for p in read_dpr_passages(EMBEDDED / "passages.tsv")]
    want = dev(queries, vectors, ids)
    assert 5 < want["dev_top1"] < want[f"dev_top{K}"] < 100, want
    for result in (one, first):   # process 0 answers; process 1 returns {} (the loop broadcasts process 0's)
        assert result["recall"] == want and result["recall_local"] == want
    assert second["recall"] == second["recall_local"] == {}

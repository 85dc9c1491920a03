"""Exact search on the devices (rdr_jax/retrieval/device_search.py) against FAISS flat inner product, on 1 device,
8 simulated CPU devices and 2 processes x 4 devices (jax.distributed, gloo); `rdr-jax retrieve --index <encoding
dir>` against the FAISS flat path; the streamed JSONL / DPR JSON / TREC outputs read back by `rdr-jax evaluate`.

Scores are float32 dot products of the same (exactly upcast) vectors, summed in another order than FAISS's BLAS:
equal to a few float32 ulps of their magnitude. Random Gaussian vectors make exact ties improbable, so the ids
must be identical.
"""

import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pytest
import transformers

import harness
from parity import assert_close
from rdr_jax.cli import main
from rdr_jax.convert.hf_io import copy_tokenizer_files
from rdr_jax.retrieval.device_search import DeviceSearch, merge_top_k, process_rows
from rdr_jax.retrieval.metrics import read_trec_run
from test_multiprocess import cpu_env, free_port
from test_retrieval_pipeline import _write_shards

SIZES = (300, 16)  # rows, dim; shards of 128 rows (the last one short)


def faiss_flat(vectors: np.ndarray, queries: np.ndarray, k: int):
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors.astype(np.float32))
    return index.search(queries.astype(np.float32), k)


@pytest.fixture(scope="module")
def encodings(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device_search")
    rng = np.random.RandomState(0)
    vectors = rng.randn(*SIZES).astype(np.float32)
    ids = [f"p{i}" for i in range(SIZES[0])]
    out = {}
    for dtype in (np.float32, np.float16):
        name = np.dtype(dtype).name
        _write_shards(tmp / name, vectors.astype(dtype), ids, shard_size=128)
        out[name] = (tmp / name, vectors.astype(dtype))
    return out, rng.randn(37, SIZES[1]).astype(np.float32)


@pytest.mark.parametrize("dtype,ks", [("float32", (10, 1000)), ("float16", (100,))])
def test_one_device_equals_faiss_flat(encodings, dtype, ks):
    (path, vectors), queries = encodings[0][dtype], encodings[1]
    # chunks of 64 rows: several chunks, a padded last chunk; 16 questions per step: a padded last batch
    search = DeviceSearch(path, chunk_rows=64, query_batch=16, progress=False)
    assert search.embeddings.dtype == np.dtype(dtype) and search.nbytes == 320 * 16 * np.dtype(dtype).itemsize
    for k in ks:  # 100 > a chunk; 1000 > the corpus: capped at 300
        scores, rows = search.search(queries, k)
        expected_scores, expected_rows = faiss_flat(vectors, queries, min(k, SIZES[0]))
        np.testing.assert_array_equal(rows, expected_rows)
        assert_close(scores, expected_scores, atol=1e-5, rtol=1e-5, what=f"scores at k={k}")


def test_host_merge_and_process_split():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0]], np.float32)
    rows = np.array([[4, 9, 2, -1, 7]])
    merged_scores, merged_rows = merge_top_k(scores, rows, 4)
    assert merged_rows.tolist() == [[2, 9, 7, 4]] and merged_scores.tolist() == [[3.0, 3.0, 2.0, 1.0]]
    assert [process_rows(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 10)]


EIGHT_DEVICES = """
import json, sys
import jax, numpy as np
from rdr_jax.retrieval.device_search import DeviceSearch
queries = np.load(sys.argv[1])
out = {}
for path in sys.argv[2:]:
    search = DeviceSearch(path, chunk_rows=16, query_batch=8, progress=False)
    scores, rows = search.search(queries, 20)
    out[path] = {"scores": scores.tolist(), "rows": rows.tolist(), "devices": len(search.devices)}
print("RESULT " + json.dumps(out))
"""


# ---- the command line ---------------------------------------------------------------------------------------

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=64, projection_dim=0)
FILLER = "north south river mountain old new great small island coast city lake forest plain".split()
WORDS = ["krone", "euro", "yen", "peso", "rupee", "franc", "dollar", "pound", "lira", "won", "real", "rand"]


@pytest.fixture(scope="module")
def cli(tmp_path_factory, minilm_dir):
    """Tiny random DPR encoders, 90 passages in uneven shards of 40 (fp32 and fp16), flat FAISS indexes of both."""
    import torch

    root = tmp_path_factory.mktemp("device_search_cli")
    torch.manual_seed(0)
    for name, cls in (("ctx", transformers.DPRContextEncoder), ("question", transformers.DPRQuestionEncoder)):
        cls(transformers.DPRConfig(**TINY)).eval().save_pretrained(root / name)
        copy_tokenizer_files(minilm_dir, root / name)
    rng = np.random.RandomState(0)
    with open(root / "passages.tsv", "w", encoding="utf-8") as f:
        f.write("id\ttext\ttitle\n")
        for i in range(90):
            filler = " ".join(rng.choice(FILLER, 6))
            f.write(f"d{i}\tcountry {i} {filler} pays with the {WORDS[i % 12]}\tCountry {i}\n")
    (root / "qa.jsonl").write_text("".join(json.dumps({"question": f"what does country {i} pay with?",
                                                       "answers": [WORDS[i % 12]]}) + "\n" for i in range(0, 60, 3)))
    common = ["--model", str(root / "ctx"), "--passages", str(root / "passages.tsv"), "--max-length", "24",
              "--batch-size", "16", "--shard-size", "40"]
    assert main(["encode", *common, "--out", str(root / "emb")]) == 0
    shutil.copytree(root / "emb", root / "emb16")  # the same encoding stored as float16 (as --fp16 writes it)
    for path in (root / "emb16").glob("embeddings-*.npy"):
        np.save(path, np.load(path).astype(np.float16))
    meta = json.loads((root / "emb16" / "meta.json").read_text())
    (root / "emb16" / "meta.json").write_text(json.dumps({**meta, "dtype": "float16"}))
    for name in ("", "16"):
        assert main(["index", "--embeddings", str(root / f"emb{name}"), "--out", str(root / f"index{name}")]) == 0
    return root


def retrieve(root, index, out, *extra):
    return ["retrieve", "--model", str(root / "question"), "--index", str(root / index), "--passages",
            str(root / "passages.tsv"), "--qa", str(root / "qa.jsonl"), "--out", str(out), "--k", "10",
            "--max-length", "16", *map(str, extra)]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_same_ranking(a, b, tol=1e-5):
    """Same scores (to float32 rounding) and the same passages at each rank, ties aside: passages whose scores
    are within ``tol`` of each other may swap places (summation order), and a tie at rank k may pick either."""
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        sa, sb = np.array(ra["scores"]), np.array(rb["scores"])
        assert_close(sa, sb, atol=tol, rtol=tol, what=f"scores of question {ra['qid']}")
        for i, (ia, ib) in enumerate(zip(ra["passage_ids"], rb["passage_ids"])):
            if ia != ib:
                tied = np.abs(sb - sb[i]) <= 2 * tol * max(1.0, abs(sb[i]))
                assert tied.sum() > 1, (ra["qid"], i, ia, ib)
                assert ia in [rb["passage_ids"][j] for j in np.flatnonzero(tied)] or tied[-1], (ra["qid"], i, ia)


def test_retrieve_on_an_encoding_equals_faiss_flat_and_round_trips(cli, tmp_path, capsys):
    assert main(retrieve(cli, "emb", tmp_path / "dev.jsonl", "--trec-out", tmp_path / "dev.trec",
                         "--chunk-rows", "16", "--query-batch", "8", "--workers", "2")) == 0
    assert main(retrieve(cli, "index", tmp_path / "faiss.jsonl", "--workers", "0")) == 0
    assert main(retrieve(cli, "emb", tmp_path / "dev.json", "--workers", "0")) == 0
    device, flat = read_jsonl(tmp_path / "dev.jsonl"), read_jsonl(tmp_path / "faiss.jsonl")
    assert len(device) == 20 and set(device[0]) == {"qid", "question", "answers", "passage_ids", "passage_rows",
                                                    "scores", "has_answer"}
    assert_same_ranking(device, flat)
    hits = sum(any(r["has_answer"]) for r in device)
    assert 0 < hits < 20  # random encoders: some questions find their answer in 10 of 90 passages, not all
    dpr = json.loads((tmp_path / "dev.json").read_text())  # DPR layout, passage text looked up by row
    assert_same_ranking([{"qid": str(i), "passage_ids": [c["id"] for c in r["ctxs"]],
                          "scores": [c["score"] for c in r["ctxs"]]} for i, r in enumerate(dpr)], device)
    assert dpr[0]["ctxs"][0]["text"].startswith(f"country {dpr[0]['ctxs'][0]['id'][1:]} ")
    run = read_trec_run(tmp_path / "dev.trec")
    assert {q: dict(zip(r["passage_ids"], r["scores"])) for q, r in ((r["qid"], r) for r in device)} == run
    capsys.readouterr()
    tables = []
    for name in ("dev.jsonl", "dev.json", "faiss.jsonl"):
        assert main(["evaluate", "--results", str(tmp_path / name), "--k", "1", "5", "10",
                     "--out", str(tmp_path / f"{name}.recall")]) == 0
        tables.append(json.loads((tmp_path / f"{name}.recall").read_text())[name])
    assert tables[0] == tables[1] == tables[2]
    assert tables[0]["10"] == 100.0 * hits / 20


def test_eight_devices_and_two_processes_equal_faiss_flat(encodings, cli, tmp_path):
    """At once: the library on 8 simulated CPU devices (fp32 and fp16 encodings), and `rdr-jax retrieve` as 2
    processes x 4 devices (jax.distributed, gloo), each process holding half of the fp16 encoding."""
    found, queries = encodings
    np.save(tmp_path / "q.npy", queries)
    paths = [str(found[d][0]) for d in ("float32", "float16")]
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.getcwd(), os.environ.get("PYTHONPATH")]))
    eight = subprocess.Popen([sys.executable, "-c", EIGHT_DEVICES, str(tmp_path / "q.npy"), *paths],
                             env=dict(cpu_env(8), PYTHONPATH=path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "rdr_jax.cli",
                               *retrieve(cli, "emb16", tmp_path / "two.jsonl", "--chunk-rows", "8", "--workers", "0",
                                         "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                         "--process-id", str(i))],
                              env=dict(cpu_env(4), PYTHONPATH=path), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for proc in [eight, *procs]:
            out, _ = proc.communicate(timeout=300)
            assert proc.returncode == 0, out[-4000:]
            outputs.append(out)
    finally:
        for proc in [eight, *procs]:
            if proc.poll() is None:
                proc.kill()
    result = json.loads([line for line in outputs[0].splitlines() if line.startswith("RESULT ")][-1][7:])
    for dtype, p in zip(("float32", "float16"), paths):
        expected_scores, expected_rows = faiss_flat(found[dtype][1], queries, 20)
        assert result[p]["devices"] == 8
        np.testing.assert_array_equal(np.array(result[p]["rows"]), expected_rows)
        assert_close(np.array(result[p]["scores"], np.float32), expected_scores, atol=1e-5, rtol=1e-5, what=dtype)
    assert main(retrieve(cli, "index16", tmp_path / "faiss16.jsonl", "--workers", "0")) == 0
    assert_same_ranking(read_jsonl(tmp_path / "two.jsonl"), read_jsonl(tmp_path / "faiss16.jsonl"))


def test_ivf_defaults_scale_with_the_corpus(encodings):
    from rdr_jax.retrieval.index import default_nlist, default_train_size, random_sample

    assert [default_nlist(n) for n in (300, 100_000, 2_000_000, 21_000_000, 10**10)] == [4, 1024, 4096, 16384, 65536]
    assert default_train_size(16384) == 64 * 16384 and default_train_size(4) == 65536
    path, vectors = encodings[0]["float32"]
    sample = random_sample(path, 50, seed=3)  # rows from every shard, not the first ones only
    rows = [int(np.flatnonzero((vectors == s).all(axis=1))[0]) for s in sample]
    assert len(set(rows)) == 50 and max(rows) >= 256 and min(rows) < 128

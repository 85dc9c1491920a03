"""RDR at corpus scale: the frozen passage vectors memory-mapped (fp16 kept fp16, rows converted per lookup),
ids mapped to rows without a table of every corpus id, teacher data held as arrays without passage text, and
the dev search streaming over the shards; each checked against the plain in-memory computation, and the
host memory each takes measured against the corpus size."""

import json
import tracemalloc

import numpy as np
import pytest

import harness
from rdr_jax.data.id_hash import id_hashes
from rdr_jax.data.rdr_data import RDRData
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.retrieval.dev_recall import exact_top_k
from rdr_jax.retrieval.passage_embeddings import PassageEmbeddings
from rdr_jax.tasks.model_setup import MINILM_PACKAGE, resolve_path


def write_encoding(out_dir, vectors: np.ndarray, ids: list[str], shard_size: int):
    """An encoding directory as ``rdr-jax encode`` leaves it: shards of vectors and ids, a complete meta.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = range(0, len(vectors), shard_size)
    for n, start in enumerate(shards):
        np.save(out_dir / f"embeddings-{n:05d}.npy", vectors[start:start + shard_size])
        (out_dir / f"ids-{n:05d}.json").write_text(json.dumps(ids[start:start + shard_size]))
    (out_dir / "meta.json").write_text(json.dumps({"complete": True, "num_passages": len(vectors),
                                                   "num_shards": len(shards), "dim": vectors.shape[1],
                                                   "shard_size": shard_size}))
    return out_dir


@pytest.fixture(scope="module")
def encoding(tmp_path_factory):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(230, 16)).astype(np.float16)
    ids = [f"wiki:{i * 7 + 3}" for i in range(len(vectors))]
    return write_encoding(tmp_path_factory.mktemp("enc") / "e", vectors, ids, shard_size=50), vectors, ids


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_path(MINILM_PACKAGE))


def test_id_hashes_do_not_depend_on_the_batch_they_are_hashed_in():
    a = id_hashes(["1", "22", "wiki:5", "é"])
    b = id_hashes(["wiki:5", "a much longer id than the others", "1", "22"])
    assert a[2] == b[0] and a[0] == b[2] and a[1] == b[3]
    assert len(np.unique(id_hashes([str(i) for i in range(100_000)]))) == 100_000
    assert id_hashes(["ab"])[0] != id_hashes(["ba"])[0] != id_hashes(["b"])[0]


def test_passage_vectors_are_memory_mapped_fp16_and_looked_up_by_row(encoding):
    path, vectors, ids = encoding
    emb = PassageEmbeddings(path)
    assert emb.shape == vectors.shape and emb.dtype == np.float16 and len(emb.shards) == 5
    assert all(isinstance(s, np.memmap) for s in emb.shards)
    rows = np.array([229, 0, 50, 49, -1, 120, 120, 3])
    got = emb.rows(rows)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[rows >= 0], vectors[rows[rows >= 0]].astype(np.float32))
    assert not got[4].any()                                    # padding
    with pytest.raises(IndexError, match="past the encoding's 230"):
        emb.rows([230])
    assert emb.ids_of([229, 0, 51]) == [ids[229], ids[0], ids[51]] and emb.ids[120] == ids[120]
    want = np.array([[ids[5], ids[200]], [ids[5], "not-there"]])
    np.testing.assert_array_equal(emb.rows_of(id_hashes(want.reshape(-1)).reshape(2, 2)), [[5, 200], [5, -1]])


def test_repeated_id_in_the_encoding_is_refused(encoding, tmp_path):
    _, vectors, ids = encoding
    doubled = write_encoding(tmp_path / "d", vectors[:80], ids[:60] + ids[10:30], shard_size=50)
    with pytest.raises(ValueError, match=r"'wiki:73' \(row 60\) is not unique"):
        PassageEmbeddings(doubled).rows_of(id_hashes([ids[10]]))


def rdr_jsonl(path, ids, rows_instead=False, n=12, k=4):
    rng = np.random.default_rng(1)
    lines = []
    for i in range(n):
        chosen = rng.choice(len(ids), size=k - (i % 3 == 0), replace=False)
        ctxs = [{"title": f"t{r}", "text": f"text of passage {r}", "teacher_score": float(rng.normal()),
                 "has_answer": bool(j == 1), **({"row": int(r)} if rows_instead else {"id": ids[r]})}
                for j, r in enumerate(chosen)]
        lines.append(json.dumps({"question": f"question {i}?", "answers": ["x"], "ctxs": ctxs}))
    path.write_text("\n".join(lines) + "\n")
    return path


def make_data(path, tokenizer, embeddings=None, **kw):
    return RDRData(str(path), tokenizer, top_k=4, max_question_length=16, max_passage_length=24,
                   need_teacher_scores=True, need_positive=True, reader_length=kw.pop("reader_length", None),
                   embeddings=embeddings, **kw)


def test_rdr_batches_look_passages_up_by_row_without_text(encoding, tokenizer, tmp_path):
    path, vectors, ids = encoding
    emb = PassageEmbeddings(path)
    by_id = make_data(rdr_jsonl(tmp_path / "ids.jsonl", ids), tokenizer, emb)
    by_row = make_data(rdr_jsonl(tmp_path / "rows.jsonl", ids, rows_instead=True), tokenizer, emb)
    assert by_id.titles is None and by_id.texts is None        # no passage text held
    np.testing.assert_array_equal(by_id.rows, by_row.rows)
    idx = np.array([3, 0, 7, 11])
    batch = by_id.make_batch(idx)
    records = [json.loads(line) for line in (tmp_path / "ids.jsonl").read_text().splitlines()]
    for b, i in enumerate(idx):          # against the records: vectors, mask, scores, positive
        ctxs = records[i]["ctxs"]
        for j in range(4):
            got = batch["p_emb"][b * 4 + j]
            if j < len(ctxs):
                np.testing.assert_array_equal(got, vectors[ids.index(ctxs[j]["id"])].astype(np.float32))
                assert batch["teacher_scores"][b, j] == np.float32(ctxs[j]["teacher_score"])
            else:
                assert not got.any() and batch["passage_mask"][b, j] == 0
        assert batch["passage_mask"][b].sum() == len(ctxs)
        assert batch["positive_index"][b] == b * 4 + 1
    assert "p_input_ids" not in batch
    # without the encoding the texts are tokenised; with an in-step reader they are kept for it
    plain = make_data(tmp_path / "ids.jsonl", tokenizer)
    assert "p_input_ids" in plain.make_batch(idx) and plain.rows is None
    reader = make_data(tmp_path / "ids.jsonl", tokenizer, emb, reader_length=48)
    assert {"p_emb", "r_input_ids"} <= set(reader.make_batch(idx))


def test_unknown_passage_id_or_row_is_named(encoding, tokenizer, tmp_path):
    path, _, ids = encoding
    emb = PassageEmbeddings(path)
    bad = tmp_path / "bad.jsonl"
    record = {"question": "q?", "ctxs": [{"id": ids[0], "teacher_score": 1.0}, {"id": "wiki:nope", "teacher_score": 0.0}]}
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"example 0, ctxs\[1\]: passage id 'wiki:nope' is not in it"):
        make_data(bad, tokenizer, emb)
    record["ctxs"][1] = {"row": 230, "teacher_score": 0.0}
    bad.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=r"ctxs\[1\]: row 230 is past its 230 passages"):
        make_data(bad, tokenizer, emb)


def test_exact_top_k_streams_over_the_shards_as_the_full_search_ranks(encoding, tmp_path):
    path, vectors, ids = encoding
    rng = np.random.default_rng(2)
    q = rng.normal(size=(9, 16)).astype(np.float32)
    tied = np.concatenate([vectors, vectors[:40]])             # repeats straddling shard boundaries
    tied_path = write_encoding(tmp_path / "tied", tied, ids + [f"x{i}" for i in range(40)], shard_size=37)
    exact = (q.astype(np.float64) @ tied.astype(np.float64).T).astype(np.float32)
    expected = np.argsort(-exact, axis=1, kind="stable")[:, :15]
    emb = PassageEmbeddings(tied_path)
    for block in (8, 37, 1000):
        np.testing.assert_array_equal(exact_top_k(q, emb, 15, corpus_block=block), expected)


def test_host_memory_does_not_follow_the_corpus(tmp_path, tokenizer):
    """Opening a 32 MB encoding, mapping the data's ids to rows, building batches and searching it allocate a
    small fraction of the corpus (traced Python/numpy allocations; the map's pages are the kernel's)."""
    n, dim = 200_000, 80
    vectors = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float16, shape=(n, dim))
    vectors[:] = np.random.default_rng(3).normal(size=(n, dim)).astype(np.float16)
    ids = [str(i + 1) for i in range(n)]
    path = write_encoding(tmp_path / "big", vectors, ids, shard_size=20_000)
    corpus = n * dim * 2
    data_file = rdr_jsonl(tmp_path / "big.jsonl", ids, n=64)
    q = np.random.default_rng(4).normal(size=(4, dim)).astype(np.float32)
    tracemalloc.start()
    try:
        emb = PassageEmbeddings(path)
        data = make_data(data_file, tokenizer, emb)
        batch = data.make_batch(np.arange(8))
        top = exact_top_k(q, emb, 5, corpus_block=4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch["p_emb"].shape == (32, dim) and top.shape == (4, 5)
    # ids -> rows reads one 20k-id shard at a time (~3 MB), the search holds a float64 block of 4096 x 80 (2.6 MB)
    assert peak < corpus / 4, (peak, corpus)


def test_teacher_dataset_rows_read_without_text_equal_the_jsonl(encoding, tokenizer, tmp_path):
    """The TFDS dataset ``rdr-jax teacher-scores`` writes (texts included) gives the same batches as the JSONL,
    its texts dropped as it is read."""
    from rdr_jax.data.tfds_format import write_dataset
    from rdr_jax.retrieval.reader import teacher_scores_features

    path, _, ids = encoding
    jsonl = rdr_jsonl(tmp_path / "ids.jsonl", ids)
    rows = []
    for line in jsonl.read_text().splitlines():
        r = json.loads(line)
        ctxs = r["ctxs"]
        rows.append({"question": r["question"], "answers": r["answers"], "passage_ids": [c["id"] for c in ctxs],
                     "titles": [c["title"] for c in ctxs], "texts": [c["text"] for c in ctxs],
                     "has_answer": np.array([c["has_answer"] for c in ctxs]),
                     "retriever_scores": np.zeros(len(ctxs), np.float32),
                     "relevance_logits": np.array([c["teacher_score"] for c in ctxs], np.float32),
                     "span_scores": np.zeros(len(ctxs), np.float32)})
    dataset = write_dataset(tmp_path / "tfds", "teacher", teacher_scores_features(), {"train": rows})
    emb = PassageEmbeddings(path)
    from_tfds, from_jsonl = make_data(dataset, tokenizer, emb), make_data(jsonl, tokenizer, emb)
    assert from_tfds.titles is None and from_tfds.texts is None
    idx = np.arange(len(rows))
    a, b = from_tfds.make_batch(idx), from_jsonl.make_batch(idx)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

"""Corpus encoding (resume), FAISS indexes (exact search, id checks) and the retrieval results layout."""

import json

import numpy as np
import pytest
import transformers

from rdr_jax.models import DPRContextEncoder
from rdr_jax.retrieval.encode import Encoder, encode_corpus, load_encoded
from rdr_jax.retrieval.index import PassageIndex
from rdr_jax.retrieval.retrieve import lookup_passages, recall_of_results, retrieval_results


def _write_shards(out_dir, embeddings, ids, shard_size):
    out_dir.mkdir(parents=True)
    n = 0
    for n, start in enumerate(range(0, len(ids), shard_size)):
        np.save(out_dir / f"embeddings-{n:05d}.npy", embeddings[start:start + shard_size])
        (out_dir / f"ids-{n:05d}.json").write_text(json.dumps(ids[start:start + shard_size]))
    (out_dir / "meta.json").write_text(json.dumps({"complete": True, "num_shards": n + 1,
                                                   "dim": embeddings.shape[1], "num_passages": len(ids)}))


@pytest.fixture
def random_encoding(tmp_path):
    rng = np.random.RandomState(0)
    embeddings = rng.randn(300, 16).astype(np.float32)
    ids = [f"p{i}" for i in range(300)]
    _write_shards(tmp_path / "emb", embeddings, ids, shard_size=128)
    return tmp_path / "emb", embeddings, ids


def test_flat_index_is_exact_inner_product_top_k(random_encoding, tmp_path):
    emb_dir, embeddings, ids = random_encoding
    PassageIndex.build(emb_dir, "flat", progress=False).save(tmp_path / "index")
    index = PassageIndex.load(tmp_path / "index")
    queries = np.random.RandomState(1).randn(7, 16).astype(np.float32)
    scores, found = index.search(queries, k=10, batch_size=3)
    dots = queries @ embeddings.T
    expected = np.argsort(-dots, axis=1)[:, :10]
    assert found == [[ids[j] for j in row] for row in expected]
    np.testing.assert_allclose(scores, np.take_along_axis(dots, expected, axis=1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,options", [("hnsw", {"hnsw_m": 16}), ("ivfpq", {"nlist": 4, "pq_m": 4})])
def test_approximate_indexes_find_the_exact_best(random_encoding, tmp_path, kind, options):
    emb_dir, embeddings, ids = random_encoding
    PassageIndex.build(emb_dir, kind, progress=False, **options).save(tmp_path / kind)
    index = PassageIndex.load(tmp_path / kind)
    assert index.kind == kind
    queries = embeddings[:20] * 3  # each query's best passage is its own row
    _, found = index.search(queries, k=5, nprobe=4)
    hits = sum(ids[i] in row for i, row in enumerate(found))
    assert hits >= (20 if kind == "hnsw" else 16)


def test_index_id_mapping_is_checked_against_corpus(random_encoding):
    emb_dir, _, ids = random_encoding
    index = PassageIndex.build(emb_dir, "flat", progress=False)
    index.check_against_corpus(iter(ids))
    with pytest.raises(ValueError, match=r"passage 3 has id 'x'.*index row 2 is 'p2'"):
        index.check_against_corpus(iter(ids[:2] + ["x"] + ids[3:]), source="corpus.tsv")
    with pytest.raises(ValueError, match="has 299 passages but the index has 300"):
        index.check_against_corpus(iter(ids[:-1]))


def test_incomplete_encoding_is_refused(random_encoding):
    emb_dir, _, _ = random_encoding
    meta = json.loads((emb_dir / "meta.json").read_text())
    (emb_dir / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    with pytest.raises(ValueError, match="incomplete"):
        PassageIndex.build(emb_dir)


@pytest.fixture(scope="module")
def tiny_ctx_encoder(tmp_path_factory, minilm_dir):
    import torch

    torch.manual_seed(0)
    cfg = transformers.DPRConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=37, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("ctx")
    transformers.DPRContextEncoder(cfg).save_pretrained(path)
    return DPRContextEncoder.from_pretrained(path), transformers.BertTokenizerFast.from_pretrained(minilm_dir)


def _passages(n):
    return [{"id": str(i), "title": f"Title {i}", "text": f"passage number {i} " + "word " * (i % 7)}
            for i in range(n)]


def test_interrupted_encoding_resumes_to_the_same_result(tmp_path, tiny_ctx_encoder):
    model, tokenizer = tiny_ctx_encoder
    encoder = Encoder(model, batch_size=4)
    passages = _passages(25)

    def dies_after(n):
        for i, p in enumerate(passages):
            if i == n:
                raise KeyboardInterrupt("killed")
            yield p

    with pytest.raises(KeyboardInterrupt):
        encode_corpus(encoder, tokenizer, dies_after(17), tmp_path / "resumed", max_length=32, shard_size=10,
                      progress=False)
    assert (tmp_path / "resumed" / "embeddings-00000.npy").is_file()
    assert not (tmp_path / "resumed" / "embeddings-00001.npy").exists()
    encode_corpus(encoder, tokenizer, iter(passages), tmp_path / "resumed", max_length=32, shard_size=10,
                  progress=False)
    encode_corpus(encoder, tokenizer, iter(passages), tmp_path / "straight", max_length=32, shard_size=10,
                  progress=False)
    resumed, resumed_ids = load_encoded(tmp_path / "resumed")
    straight, straight_ids = load_encoded(tmp_path / "straight")
    assert resumed_ids == straight_ids == [p["id"] for p in passages]
    np.testing.assert_array_equal(resumed, straight)
    with pytest.raises(ValueError, match="other settings"):
        encode_corpus(encoder, tokenizer, iter(passages), tmp_path / "resumed", max_length=64, shard_size=10,
                      progress=False)


def test_encoder_matches_unbatched_model_and_fp16_option(tmp_path, tiny_ctx_encoder):
    from rdr_jax.data.tokenization import encode_passages

    model, tokenizer = tiny_ctx_encoder
    passages = _passages(6)
    encode_corpus(Encoder(model, batch_size=4), tokenizer, iter(passages), tmp_path / "e16", max_length=32,
                  shard_size=100, fp16=True, progress=False)
    assert np.load(tmp_path / "e16" / "embeddings-00000.npy").dtype == np.float16
    got, _ = load_encoded(tmp_path / "e16")
    batch = encode_passages(tokenizer, [p["title"] for p in passages], [p["text"] for p in passages], 32)
    direct = np.asarray(model(**batch).pooler_output)
    np.testing.assert_allclose(got, direct, rtol=2e-3, atol=2e-3)  # float16 storage


def test_retrieval_results_layout_and_recall():
    passages = {"1": {"id": "1", "title": "Norway", "text": "Norway uses the krone."},
                "2": {"id": "2", "title": "France", "text": "France uses the euro."}}
    questions = [{"question": "currency of norway?", "answers": ["krone"]},
                 {"question": "currency of france?", "answers": ["euro"]}]
    scores = np.array([[2.0, 1.0], [3.0, 0.5]])
    results = retrieval_results(questions, scores, [["1", "2"], ["1", "2"]], passages)
    assert results[0]["ctxs"][0] == {"id": "1", "title": "Norway", "text": "Norway uses the krone.",
                                     "score": 2.0, "has_answer": True}
    assert [c["has_answer"] for c in results[1]["ctxs"]] == [False, True]
    assert recall_of_results(results, (1, 2)) == {"1": 50.0, "2": 100.0}
    with pytest.raises(ValueError, match="not in the corpus"):
        lookup_passages(iter(passages.values()), {"1", "3"})

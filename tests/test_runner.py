"""The inference runner (rdr_jax.retrieval.runner) and the tokenised corpus store (rdr_jax.data.corpus_store).

The runner sorts rows by length, pads each batch to a multiple of ``length_step`` and keeps two batches in
flight; its outputs must equal the model run on every row padded to ``max_length`` (fp32 rounding aside:
attention over fewer padded keys sums in another order), come back in row order, and compile no more shapes
than it announces. The store must hold exactly the TSV's rows and the encoder's token ids, and `rdr-jax encode`
from a store must equal `rdr-jax encode` from the TSV.
"""


import jax.numpy as jnp
import numpy as np
import pytest

import harness
from parity import assert_close
from rdr_jax.data.token_rows import TokenRows, passage_rows

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory, minilm_dir):
    return harness.tiny_encoder_dir(tmp_path_factory.mktemp("tiny") / "bert", minilm_dir)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_encoder_dir):
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRContextEncoder

    return DPRContextEncoder.from_pretrained(tiny_encoder_dir), load_tokenizer(tiny_encoder_dir)


def _random_rows(n: int, seed: int) -> TokenRows:
    rng = np.random.default_rng(seed)
    return TokenRows([[101, *rng.integers(1000, 20000, int(k)), 102] for k in rng.integers(1, MAX_LENGTH + 20, n)])


def _reference(model, rows: TokenRows) -> dict:
    """Every row padded to MAX_LENGTH in one batch: the old, padding-heavy path."""
    ids = np.zeros((len(rows), MAX_LENGTH), np.int32)
    mask = np.zeros_like(ids)
    for i, seq in enumerate(rows.input_ids):
        seq = list(seq)[:MAX_LENGTH]
        ids[i, :len(seq)], mask[i, :len(seq)] = seq, 1
    out = model(ids, mask, np.zeros_like(ids))
    return {"cls": np.asarray(out.pooler_output), "hidden": np.asarray(out.last_hidden_state), "mask": mask}


def test_runner_returns_rows_in_order_with_few_compiled_shapes(model_and_tokenizer):
    from rdr_jax.retrieval.runner import InferenceRunner

    model, _ = model_and_tokenizer
    runner = InferenceRunner(model, lambda o: {"cls": o.pooler_output.astype(jnp.float32),
                                               "hidden": o.last_hidden_state.astype(jnp.float32)},
                             batch_size=8, length_step=16, per_token=("hidden",), measure_busy=True)
    chunks = [("a", _random_rows(37, 0)), ("empty", TokenRows([])), ("b", _random_rows(20, 1))]
    results = list(runner.map(chunks, max_length=MAX_LENGTH))
    assert [key for key, _ in results] == ["a", "empty", "b"]
    assert results[1][1] is None
    for (key, rows), (_, out) in zip(chunks, results):
        if not len(rows):
            continue
        want = _reference(model, rows)
        assert_close(out["cls"], want["cls"], what=f"chunk {key} embeddings")
        real = want["mask"][..., None].astype(bool)
        assert out["hidden"].shape == want["hidden"].shape
        assert_close(np.where(real, out["hidden"], 0), np.where(real, want["hidden"], 0), what=f"chunk {key} states")
    # 4 announced shapes (16, 32, 48, 64 tokens x 8 rows); every batch is one of them
    assert runner.compiled_shapes(MAX_LENGTH) == [(8, 16), (8, 32), (8, 48), (8, 64)]
    assert runner.stats.shapes <= set(runner.compiled_shapes(MAX_LENGTH))
    assert 1 <= runner.compilations <= 4
    assert runner.stats.rows == 57 and runner.stats.batches == 5 + 3
    assert 0 < runner.stats.padding_share < 1 and runner.stats.busy_s > 0


def test_runner_finishes_earlier_chunks_before_raising_a_reading_error(model_and_tokenizer):
    from rdr_jax.retrieval.runner import InferenceRunner

    model, _ = model_and_tokenizer
    runner = InferenceRunner(model, lambda o: o.pooler_output, batch_size=4)

    def chunks():
        yield 0, _random_rows(10, 2)
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for key, out in runner.map(chunks(), max_length=MAX_LENGTH):
            got.append((key, out.shape))
    assert got == [(0, (10, 32))]


@pytest.fixture(scope="module")
def corpus_tsv(tmp_path_factory):
    from rdr_jax.data.embedded_data import load_passages

    passages = load_passages()[:90]
    passages[3] = {**passages[3], "title": "Ünïcödé — title", "text": "ü " * 200}  # truncated, multi-byte
    return harness.write_passages_tsv(tmp_path_factory.mktemp("corpus") / "passages.tsv", passages), passages


def test_corpus_store_holds_the_tsv_rows_and_the_encoder_tokens(tmp_path, corpus_tsv, model_and_tokenizer):
    from rdr_jax.data.corpus_store import CorpusStore, build_corpus_store, is_corpus_store

    tsv, passages = corpus_tsv
    _, tokenizer = model_and_tokenizer
    out = build_corpus_store(tsv, tokenizer, tmp_path / "store", max_length=MAX_LENGTH, workers=2, chunk_rows=16,
                             progress=False)
    assert is_corpus_store(out) and not (tmp_path / "store.partial").exists()
    store = CorpusStore(out)
    assert len(store) == len(passages) and store.meta["token_dtype"] == "uint16"
    assert store.ids() == [p["id"] for p in passages] and store.ids(5, 9) == [p["id"] for p in passages[5:9]]
    assert store.passage(3) == {"id": passages[3]["id"], "title": passages[3]["title"], "text": passages[3]["text"]}
    want = passage_rows(tokenizer, [p["title"] for p in passages], [p["text"] for p in passages], MAX_LENGTH)
    got = store.token_rows(0, len(store))
    assert [list(map(int, x)) for x in got.input_ids] == [list(x) for x in want.input_ids]
    assert len(got.input_ids[3]) == MAX_LENGTH
    store.check_tokenizer(tokenizer, MAX_LENGTH)
    with pytest.raises(ValueError, match="--max-length 64, not 32"):
        store.check_tokenizer(tokenizer, 32)
    with pytest.raises(IndexError):
        store.passage(len(store))


def test_encode_from_a_store_equals_encode_from_the_tsv(tmp_path, corpus_tsv, tiny_encoder_dir, model_and_tokenizer):
    from rdr_jax.cli import main
    from rdr_jax.data.tokenization import encode_passages
    from rdr_jax.retrieval.encode import load_encoded

    tsv, passages = corpus_tsv
    assert main(["tokenize", "--passages", str(tsv), "--tokenizer", str(tiny_encoder_dir), "--out",
                 str(tmp_path / "store"), "--max-length", str(MAX_LENGTH), "--no-progress"]) == 0
    common = ["--model", str(tiny_encoder_dir), "--max-length", str(MAX_LENGTH), "--shard-size", "40",
              "--batch-size", "16"]
    assert main(["encode", "--passages", str(tmp_path / "store"), "--out", str(tmp_path / "from_store"), *common]) == 0
    assert main(["encode", "--passages", str(tsv), "--out", str(tmp_path / "from_tsv"), *common]) == 0
    got, got_ids = load_encoded(tmp_path / "from_store")
    want, want_ids = load_encoded(tmp_path / "from_tsv")
    assert got_ids == want_ids == [p["id"] for p in passages]
    np.testing.assert_array_equal(got, want)
    model, tokenizer = model_and_tokenizer
    batch = encode_passages(tokenizer, [p["title"] for p in passages], [p["text"] for p in passages], MAX_LENGTH)
    assert_close(got, np.asarray(model(**batch).pooler_output), what="embeddings vs every row padded")
    # the store and the TSV are the same corpus: an encoding started from one resumes from the other
    assert main(["encode", "--passages", str(tsv), "--out", str(tmp_path / "from_store"), *common]) == 0
    assert main(["encode", "--passages", str(tmp_path / "store"), "--out", str(tmp_path / "short"),
                 *common, "--max-length", "32"]) == 2  # the store was tokenised to 64 tokens
    assert not (tmp_path / "short").exists()

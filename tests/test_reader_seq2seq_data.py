"""Reader and seq2seq_index training data read by index: `prepare-data reader` / `prepare-data seq2seq_index`
keep what the whole-file read gives; the reader trains on a prepared file, whose batches are the raw file's;
batches resume exactly (built by 2 grain worker processes); the blocks of 2 (and 3) processes put
together are the 1-process batch, for the reader's stand-in negatives and for seq2seq_index's mixed batches
(a process's block may hold indexing rows, retrieval rows or both)."""

import json

import numpy as np
import pytest
import transformers

import harness
from rdr_jax.data.batching import EpochIterator
from rdr_jax.data.indexing_data import IndexingData, MixedIterator, query_records
from rdr_jax.data.reader_data import ReaderData, reader_records
from rdr_jax.data.records import RecordFile
from rdr_jax.errors import ConfigError

EMBEDDED = harness.REPO_ROOT / "rdr_jax" / "data" / "embedded"


def retriever_results(n: int) -> list[dict]:
    """DPR's retriever-results layout from the bi-encoder examples: the positive among the retrieved passages
    (not first), one question with no passage holding the answer and one without answers (both skipped), and
    questions with fewer retrieved passages than a batch uses (stand-ins fill them)."""
    out = []
    for i, ex in enumerate(harness.biencoder_examples(n)):
        negatives = [dict(c, has_answer=False) for c in ex.get("hard_negative_ctxs", []) + ex.get("negative_ctxs", [])]
        ctxs = negatives[:1] + [dict(c, has_answer=True) for c in ex["positive_ctxs"][:1]] + negatives[1:]
        if i % 3 == 0:
            ctxs = ctxs[:2]
        out.append({"question": ex["question"], "answers": ex.get("answers") or ["x"], "ctxs": ctxs})
    out[4]["ctxs"] = [dict(c, has_answer=False) for c in out[4]["ctxs"]]
    out[6]["answers"] = []
    return out


@pytest.fixture(scope="module")
def results_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("reader") / "results.json"
    path.write_text(json.dumps(retriever_results(24)))
    return path


@pytest.fixture(scope="module")
def bert_tokenizer(minilm_dir):
    return transformers.BertTokenizerFast.from_pretrained(minilm_dir)


def reader(path, tokenizer, cache_dir=None, passages=4):
    return ReaderData(str(path), tokenizer, passages=passages, max_length=48, max_spans=3, cache_dir=cache_dir)


def test_prepare_data_reader_and_seq2seq_round_trip(results_file, tmp_path, capsys):
    from rdr_jax.cli import main

    out = tmp_path / "reader.arrayrecord"
    assert main(["prepare-data", "reader", str(results_file), str(out), "--max-negatives", "2", "--no-progress"]) == 0
    assert "22 reader records" in capsys.readouterr().out
    whole = reader_records(results_file, max_negatives=2)
    prepared = RecordFile(out, "reader")
    assert [prepared[i] for i in range(len(prepared))] == whole and len(whole) == 22
    assert prepared.meta["max_negatives"] == 2 and max(len(r["negatives"]) for r in whole) == 2
    first = retriever_results(24)[0]
    assert whole[0]["positive"] == [first["ctxs"][1]["title"], first["ctxs"][1]["text"]]   # the one with the answer
    assert whole[0]["negatives"] == [[first["ctxs"][0]["title"], first["ctxs"][0]["text"]]]
    with pytest.raises(ConfigError, match="--max-negatives 4"):   # 5 passages need 4 negatives kept
        reader(out, None, passages=5)

    train = EMBEDDED / "train.biencoder.json"
    out = tmp_path / "dsi.arrayrecord"
    assert main(["prepare-data", "seq2seq_index", str(train), str(out), "--no-progress"]) == 0
    whole = query_records(train)
    prepared = query_records(out, tmp_path / "unused")     # a prepared file is read as is
    assert [prepared[i] for i in range(len(prepared))] == whole and not (tmp_path / "unused").exists()
    raw = json.loads(train.read_text())
    assert whole[0] == {"question": raw[0]["question"],
                        "positive_ids": [str(c["passage_id"]) for c in raw[0]["positive_ctxs"]]}


def test_reader_trains_on_a_prepared_file_with_the_raw_files_batches(results_file, tmp_path):
    """The task given the raw file (converted into WORKDIR/data_cache) and given `prepare-data`'s output yields
    the same batches (so the same losses: one training compile, not two), and training runs on the prepared one."""
    from rdr_jax.cli import main
    from rdr_jax.tasks import load_config
    from rdr_jax.training.loop import make_task, train

    prepared = tmp_path / "reader.arrayrecord"
    assert main(["prepare-data", "reader", str(results_file), str(prepared), "--no-progress"]) == 0
    configs, batches = {}, {}
    for name, data in (("raw", results_file), ("prepared", prepared)):
        configs[name] = load_config(harness.TINY_CONFIGS / "reader.yaml",
                                    [f"data.train_file={data}", "data.dev_file=null", "model.init.num_hidden_layers=1",
                                     "data.max_length=48", "train.steps=2", "train.checkpoint_every=100",
                                     "train.tensorboard=false"], workdir=str(tmp_path / name))
        it = make_task(configs[name]).train_iterator(8, configs[name].train.seed)
        batches[name] = [next(it) for _ in range(3)]     # crosses an epoch (22 examples, batches of 8)
    for want, got in zip(batches["raw"], batches["prepared"]):
        assert want.keys() == got.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    assert list((tmp_path / "raw" / "data_cache").glob("results.json.*.arrayrecord"))
    assert not (tmp_path / "prepared" / "data_cache").exists()
    train(configs["prepared"], progress=False)
    metrics = [json.loads(x) for x in (tmp_path / "prepared" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)


def test_reader_prepared_batches_resume_and_split_like_the_whole_read(results_file, bert_tokenizer, tmp_path):
    whole_read = reader(results_file, bert_tokenizer)
    d = reader(results_file, bert_tokenizer, tmp_path)          # 3 negatives: stand-ins for the short questions
    assert isinstance(d.examples, RecordFile) and len(d) == len(whole_read) == 22
    ref = EpochIterator(len(d), 6, 2, whole_read.make_batch)
    batches = [next(ref) for _ in range(5)]                    # crosses an epoch (22 examples, batches of 6)
    harness.assert_blocks_are_batches(harness.process_shards(lambda: EpochIterator(len(d), 6, 2, d.make_batch), 2),
                                      batches)
    resumed = EpochIterator(len(d), 6, 2, d.make_batch, workers=2)     # batches built by 2 grain processes
    resumed.set_state({"epoch": 0, "position": 12})
    for want in batches[2:]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)
    assert resumed.get_state() == ref.get_state() == {"epoch": 1, "position": 12}
    resumed.close()


@pytest.fixture(scope="module")
def indexing(tmp_path_factory):
    from rdr_jax.data.seq2seq_inputs import build_word_tokenizer, read_passages
    from rdr_jax.decoding.identifiers import atomic_identifiers

    passages = read_passages(EMBEDDED / "passages.tsv")
    mapping = atomic_identifiers(p["id"] for p in passages[::2])      # half the passages have an identifier
    tokenizer = build_word_tokenizer([t for p in passages[:200] for t in (p["title"], p["text"])], "t5")
    kw = dict(max_input_length=24, max_identifier_length=0, index_with_title=True)
    train = str(EMBEDDED / "train.biencoder.json")
    return (IndexingData(passages, train, mapping, tokenizer, **kw),
            IndexingData(passages, train, mapping, tokenizer, cache_dir=tmp_path_factory.mktemp("dsi"), **kw))


def test_seq2seq_index_holds_rows_not_the_corpus_and_reads_questions_by_index(indexing):
    whole, prepared = indexing
    assert isinstance(prepared.questions, RecordFile) and isinstance(whole.questions, list)
    assert whole.passages is prepared.passages                  # one copy of the corpus: the task's list
    assert whole.num_index == (len(whole.passages) + 1) // 2 and whole.num_queries == prepared.num_queries > 0
    assert whole.num_queries < len(whole.questions)             # gold passages without an identifier: skipped
    assert whole.target_length == prepared.target_length > 1
    p = whole.passages[int(whole.index_rows[1])]
    assert whole.index_text(1) == f"{p['title'].strip()} {p['text']}" and whole.index_rows[1] == 2
    batch = prepared.make_batch(np.array([0, 1]), np.array([0]))
    assert batch["is_query"].tolist() == [0, 0, 1] and batch["target_ids"].shape == (3, prepared.target_length)


@pytest.mark.parametrize("count", [2, 3])
def test_seq2seq_index_process_blocks_are_the_one_process_batch_and_resume(indexing, count):
    whole, prepared = indexing
    ref = MixedIterator(whole, 4, 2, 5, True)        # blocks of 3 (2 processes): indexing rows, then mixed
    parts = harness.process_shards(lambda: MixedIterator(prepared, 4, 2, 5, True), count)
    batches = [next(ref) for _ in range(4)]
    blocks = harness.assert_blocks_are_batches(parts, batches)
    assert [b["is_query"].sum() for b in blocks] == ([0, 2] if count == 2 else [0, 0, 2])
    state = ref.get_state()
    assert set(state) == {"index", "query"} and parts[-1].get_state() == state
    resumed = MixedIterator(prepared, 4, 2, 5, True)
    resumed.set_state(json.loads(json.dumps(parts[0].get_state())))     # through a checkpoint's JSON
    expected, got = next(ref), next(resumed)
    assert resumed.step == 5 and all(np.array_equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="batch_size=6"):
        MixedIterator(prepared, 4, 2, 5, True).set_shard(0, 4)

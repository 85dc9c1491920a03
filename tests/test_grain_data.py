"""The training data path: raw DPR JSON -> a prepared array_record dataset (the `prepare-data` command, or
converted once into a cache), read by index; batches from grain (on the calling thread, or in worker
processes) equal to the plan's, split over processes into blocks that put together are the 1-process batch
(hard negatives sampled per example, not per process), resumed exactly, questions padded to their own
length buckets."""

import json

import numpy as np
import pytest
import transformers

import harness
from rdr_jax.data.batching import BatchPlan, EpochIterator
from rdr_jax.data.dpr_data import DPRData, dpr_records
from rdr_jax.data.records import RecordFile
from rdr_jax.errors import ConfigError


@pytest.fixture(scope="module")
def dpr_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("grain") / "train.json"
    examples = harness.biencoder_examples(40)
    examples[3] = dict(examples[3], positive_ctxs=[])          # skipped, as DPR does
    examples[5] = {k: v for k, v in examples[5].items() if k not in ("hard_negative_ctxs", "negative_ctxs")}
    path.write_text(json.dumps(examples))
    return path


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return transformers.BertTokenizerFast.from_pretrained(minilm_dir)


def data(path, tokenizer, cache_dir=None, **kw):
    return DPRData(str(path), tokenizer, max_question_length=24, max_passage_length=48, hard_negatives=2,
                   cache_dir=cache_dir, **kw)


def test_prepared_records_equal_the_whole_file_read(dpr_file, tmp_path, caplog):
    whole = dpr_records(dpr_file)
    with caplog.at_level("INFO"):
        prepared = dpr_records(dpr_file, tmp_path)
    assert "converting" in caplog.text and len(prepared) == len(whole) == 39
    assert [prepared[i] for i in range(len(prepared))] == whole
    built = next(tmp_path.glob("*.arrayrecord"))
    stamp = built.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level("INFO"):
        again = dpr_records(dpr_file, tmp_path)      # converted once: reused
    assert "converting" not in caplog.text and built.stat().st_mtime_ns == stamp
    assert again[7] == whole[7]
    assert len(RecordFile(built, "dpr")) == 39
    with pytest.raises(ConfigError, match="prepared 'dpr' dataset"):
        RecordFile(built, "cross_encoder")


def test_prepare_data_command(dpr_file, tmp_path, capsys):
    from rdr_jax.cli import main

    out = tmp_path / "nq.arrayrecord"
    assert main(["prepare-data", "dpr", str(dpr_file), str(out), "--no-progress"]) == 0
    assert "39 dpr records" in capsys.readouterr().out
    assert main(["prepare-data", "dpr", str(dpr_file), str(out)]) == 2            # exists: refused
    assert "--force" in capsys.readouterr().err
    assert main(["prepare-data", "dpr", str(dpr_file), str(tmp_path / "x.json")]) == 2
    assert json.loads((tmp_path / "nq.arrayrecord.json").read_text())["records"] == 39
    assert dpr_records(out, tmp_path / "unused")[0] == dpr_records(dpr_file)[0]   # a prepared file is read as is
    assert not (tmp_path / "unused").exists()


def test_process_blocks_equal_the_one_process_batch(dpr_file, tokenizer, tmp_path):
    """Hard negatives (and the stand-ins of the example without its own) drawn per example: the blocks of 2
    processes put together are the 1-process batch, through the prepared dataset."""
    d = data(dpr_file, tokenizer, tmp_path)
    whole = EpochIterator(len(d), 8, 3, d.make_batch)
    parts = [EpochIterator(len(d), 8, 3, d.make_batch) for _ in range(2)]
    for i, it in enumerate(parts):
        it.set_shard(i, 2)
    for _ in range(6):   # crosses an epoch boundary (39 examples, batches of 8)
        expected = next(whole)
        blocks = [next(it) for it in parts]
        q = max(b["q_input_ids"].shape[1] for b in blocks)
        for key in ("p_input_ids", "p_attention_mask"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in blocks]), expected[key], err_msg=key)
        for key in ("q_input_ids", "q_attention_mask"):   # blocks are padded to one length in the loop
            got = np.concatenate([np.pad(b[key], ((0, 0), (0, q - b[key].shape[1]))) for b in blocks])
            np.testing.assert_array_equal(got, expected[key], err_msg=key)
    assert parts[1].get_state() == whole.get_state() == {"epoch": 1, "position": 16}


def test_resume_and_worker_processes_give_the_same_batches(dpr_file, tokenizer, tmp_path):
    d = data(dpr_file, tokenizer, tmp_path)
    ref = EpochIterator(len(d), 8, 5, d.make_batch)
    batches = [next(ref) for _ in range(7)]
    plan = BatchPlan(len(d), 8, 5)
    np.testing.assert_array_equal(batches[5]["q_input_ids"], d.make_batch(*plan.batch(5))["q_input_ids"])
    state = dict(ref.get_state())
    # after 4 batches: the last of epoch 0
    harness.assert_resumes(EpochIterator(len(d), 8, 5, d.make_batch), {"epoch": 0, "position": 32}, batches[4:], state)
    harness.assert_resumes(EpochIterator(len(d), 8, 5, d.make_batch, workers=2, prefetch=2),
                           {"epoch": 0, "position": 16}, batches[2:], state)


def test_questions_and_passages_have_their_own_buckets(dpr_file, tokenizer):
    d = data(dpr_file, tokenizer, question_buckets=[8, 16, 32], passage_buckets=[32])
    assert d.q_buckets == (8, 16, 24) and d.p_buckets == (32, 48)
    batch = d.make_batch(np.arange(8), np.random.default_rng(0))
    lengths = batch["q_attention_mask"].sum(1)
    assert batch["q_input_ids"].shape[1] == min(b for b in d.q_buckets if b >= lengths.max())
    assert batch["q_input_ids"].shape[1] < batch["p_input_ids"].shape[1]
    assert data(dpr_file, tokenizer).make_batch(np.arange(8), np.random.default_rng(0))["q_input_ids"].shape[1] == 24


def test_reader_stand_in_negatives_do_not_depend_on_the_process_split(dpr_file, tokenizer):
    from rdr_jax.data.reader_data import ReaderData

    d = ReaderData(str(dpr_file), tokenizer, passages=5, max_length=48, max_spans=3)   # 3 negatives: 1 stand-in
    whole = EpochIterator(len(d), 8, 1, d.make_batch)
    harness.assert_blocks_are_batches(harness.process_shards(lambda: EpochIterator(len(d), 8, 1, d.make_batch), 2),
                                      [next(whole) for _ in range(2)])

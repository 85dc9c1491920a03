"""The cross-encoder's training data as a random-access dataset: `rdr-jax prepare-data ce-triples | ce-lists`
writes the lists training reads (texts of id sources resolved from the collection by byte offset), equal to the
lists read whole; the task reads a prepared file and a raw one (converted once into WORKDIR/data_cache) into the
same batches and losses; grain workers and a resumed iterator give the same batches, and 2 process blocks put
together are the 1-process batch."""

import json

import numpy as np
import pytest

import harness
from rdr_jax.cli import main
from rdr_jax.data.batching import EpochIterator
from rdr_jax.data.cross_encoder_lists import ListSources, list_records, query_lists
from rdr_jax.data.records import RecordFile
from rdr_jax.data.tokenization import passage_text
from rdr_jax.errors import ConfigError
from rdr_jax.tasks import get_task_class, load_config

TINY = harness.TINY_CONFIGS / "cross_encoder.yaml"
PASSAGES = {p: f"passage {p} about topic {p % 7}" for p in range(0, 60, 2)}   # ids with gaps
QUERIES = {q: f"question {q} on topic {q % 7}" for q in range(100, 112)}


def rows(path):
    r = RecordFile(path)
    return [r[i] for i in range(len(r))]


@pytest.fixture(scope="module")
def marco(tmp_path_factory):
    d = tmp_path_factory.mktemp("marco")
    rng = np.random.default_rng(0)
    (d / "collection.tsv").write_text("".join(f"{p}\t{t}\n" for p, t in PASSAGES.items()))
    (d / "queries.tsv").write_text("".join(f"{q}\t{t}\n" for q, t in QUERIES.items()))
    pids, qids = list(PASSAGES), list(QUERIES)
    triples = [(qids[i % 12], *(int(p) for p in rng.choice(pids, 2, replace=False))) for i in range(20)]
    (d / "triples.ids.tsv").write_text("".join(f"{q}\t{a}\t{b}\n" for q, a, b in triples))
    (d / "triples.text.tsv").write_text("".join(f"{QUERIES[q]}\t{PASSAGES[a]}\t{PASSAGES[b]}\n"
                                                for q, a, b in triples))
    lists = [{"qid": q, "pids": [int(p) for p in rng.choice(pids, 6, replace=False)],
              "scores": rng.normal(size=6).round(3).tolist()} for q in qids]
    (d / "teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lists))
    (d / "qrels.tsv").write_text("".join(f"{r['qid']} 0 {r['pids'][0]} 1\n" for r in lists))
    return d, triples, lists


def test_prepare_data_ce_formats_round_trip(marco, tmp_path, capsys):
    d, triples, lists = marco
    ids = ["--queries", str(d / "queries.tsv"), "--collection", str(d / "collection.tsv"), "--no-progress"]
    out = tmp_path / "ids.arrayrecord"
    assert main(["prepare-data", "ce-triples", str(d / "triples.ids.tsv"), str(out), *ids]) == 0
    assert "20 ce-triples records" in capsys.readouterr().out
    expected = [{"query": QUERIES[q], "passages": [PASSAGES[a], PASSAGES[b]], "labels": [1, 0]} for q, a, b in triples]
    assert rows(out) == expected
    assert main(["prepare-data", "ce-triples", str(d / "triples.text.tsv"), str(tmp_path / "text.arrayrecord"),
                 "--no-progress"]) == 0
    assert rows(tmp_path / "text.arrayrecord") == expected

    out = tmp_path / "teacher.arrayrecord"
    assert main(["prepare-data", "ce-lists", str(d / "teacher.jsonl"), str(out), *ids, "--qrels",
                 str(d / "qrels.tsv"), "--list-size", "3"]) == 0
    want = []
    for r in lists:
        best = sorted(zip(r["scores"], r["pids"], range(6)), key=lambda x: -x[0])[:3]
        want.append({"query": QUERIES[r["qid"]], "passages": [PASSAGES[p] for _, p, _ in best],
                     "teacher": [s for s, _, _ in best], "labels": [int(i == 0) for _, _, i in best]})
    assert rows(out) == want
    meta = RecordFile(out).meta
    assert (meta["format"], meta["list_size"], meta["without_teacher"], meta["without_labels"]) == ("ce-lists", 3,
                                                                                                      None, None)
    # The same lists read whole (library use) and through a cache.
    sources = ListSources(str(d / "queries.tsv"), str(d / "collection.tsv"), str(d / "qrels.tsv"), list_size=3)
    assert query_lists(str(d / "teacher.jsonl"), sources)[0] == want
    cached, cached_meta = query_lists(str(d / "teacher.jsonl"), sources, tmp_path / "cache")
    assert [cached[i] for i in range(len(cached))] == want and cached_meta["list_size"] == 3

    examples = harness.biencoder_examples(6)
    (tmp_path / "bi.json").write_text(json.dumps(examples))
    assert main(["prepare-data", "ce-lists", str(tmp_path / "bi.json"), str(tmp_path / "bi.arrayrecord"),
                 "--list-size", "4", "--max-examples", "5", "--no-progress"]) == 0
    want = [{"query": e["question"], "passages": [passage_text(c) for c in (
        e["positive_ctxs"][:1] + e["hard_negative_ctxs"] + e["negative_ctxs"])[:4]], "labels": [1, 0, 0, 0]}
        for e in examples[:5]]
    assert rows(tmp_path / "bi.arrayrecord") == want
    capsys.readouterr()

    # Ids without the files to resolve them, an id the collection lacks: one-line errors naming them.
    assert main(["prepare-data", "ce-triples", str(d / "triples.ids.tsv"), str(tmp_path / "x.arrayrecord")]) == 2
    assert "--queries" in capsys.readouterr().err
    (tmp_path / "bad.tsv").write_text(f"{triples[0][0]}\t{triples[0][1]}\t3\n")   # odd pids are not in it
    assert main(["prepare-data", "ce-triples", str(tmp_path / "bad.tsv"), str(tmp_path / "y.arrayrecord"), *ids]) == 2
    err = capsys.readouterr().err
    assert "bad.tsv: triple 1: id '3' is not in --collection" in err, err
    assert not (tmp_path / "y.arrayrecord").exists()


def task_for(workdir, *overrides):
    config = load_config(TINY, ["model.init.hidden_dropout_prob=0.0",
                                "model.init.attention_probs_dropout_prob=0.0", *overrides], workdir=str(workdir))
    return get_task_class("cross_encoder")(config, workdir)


def test_task_reads_a_prepared_file_as_the_raw_one(tmp_path, caplog):
    """Same batches (lists, stand-in teacher scores, labels), hence the same first losses, from the embedded
    bi-encoder JSON (converted once into WORKDIR/data_cache) and from its prepared dataset (which
    test_cross_encoder_training.py's tiny run trains from)."""
    raw = "rdr_jax/data/embedded/train.biencoder.json"
    prepared = tmp_path / "embedded.arrayrecord"
    assert main(["prepare-data", "ce-lists", raw, str(prepared), "--list-size", "4", "--no-progress"]) == 0
    with caplog.at_level("INFO"):
        from_raw = task_for(tmp_path / "raw", f"data.train_file={raw}", "task.loss=margin_mse")
        raw_batches = from_raw.train_iterator(4, 0)
    assert "converting" in caplog.text and len(list((tmp_path / "raw" / "data_cache").glob("*.arrayrecord"))) == 1
    from_prepared = task_for(tmp_path / "prep", f"data.train_file={prepared}", "task.loss=margin_mse")
    prep_batches = from_prepared.train_iterator(4, 0)
    for step in range(3):
        a, b = next(raw_batches), next(prep_batches)
        assert sorted(a) == sorted(b) and {"teacher_scores", "labels"} <= set(a)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"step {step}: {key}")
        assert a["teacher_scores"].any() and a["labels"][:, 0].all()
    with pytest.raises(ConfigError, match="data.list_size' 6 is more than the 4"):
        task_for(tmp_path / "prep", f"data.train_file={prepared}", "data.list_size=6").split_data("train")


def test_workers_resume_and_process_blocks_give_the_one_process_batches(marco, tmp_path):
    d, _, _ = marco
    task = task_for(tmp_path, f"data.train_file={d / 'teacher.jsonl'}", f"data.queries={d / 'queries.tsv'}",
                    f"data.collection={d / 'collection.tsv'}", f"data.qrels={d / 'qrels.tsv'}",
                    "data.stand_in_teacher=null", "task.loss=margin_mse", "data.max_length=24")
    data = task.split_data("train")
    assert len(data) == 12 and data.k == 4
    ref = EpochIterator(len(data), 4, 5, data.make_batch)
    batches = [next(ref) for _ in range(5)]          # crosses an epoch boundary (3 batches per epoch)
    state = ref.get_state()
    harness.assert_resumes(EpochIterator(len(data), 4, 5, data.make_batch, workers=2, prefetch=2),
                           {"epoch": 0, "position": 8}, batches[2:], state)
    harness.assert_blocks_are_batches(
        harness.process_shards(lambda: EpochIterator(len(data), 4, 5, data.make_batch), 2), batches)
    # The teacher's best first, padded lists masked: the batch holds the file's scores.
    row = data.examples[0]
    assert row["teacher"] == sorted(row["teacher"], reverse=True)


def test_missing_teacher_scores_are_refused_before_training(marco, tmp_path):
    d, _, _ = marco
    task = task_for(tmp_path, f"data.train_file={d / 'triples.text.tsv'}", "data.stand_in_teacher=null")
    with pytest.raises(ValueError, match="example 0 .* has no teacher scores: set task.teacher_model"):
        task.split_data("train")
    records = list(list_records(d / "triples.text.tsv", ListSources(max_examples=3)))
    assert len(records) == 3


def test_texts_by_id_reads_rows_by_offset(tmp_path):
    from rdr_jax.data.id_texts import TextsById
    from rdr_jax.errors import FormatError

    (tmp_path / "ints.tsv").write_text("5\tfive\n\n9\tnine\twith a tab\n0\tzero\n")
    texts = TextsById(tmp_path / "ints.tsv", "--collection")
    assert (texts["5"], texts[0], texts.get(5, "here")) == ("five", "zero", "five")
    for missing in ("7", "05", "x", "100"):   # "05" is not the row of id 5: ids are matched as strings
        with pytest.raises(KeyError):
            texts[missing]
    with pytest.raises(FormatError, match="id '9' has 3 tab-separated fields"):
        texts["9"]
    with pytest.raises(ValueError, match="list 3: id '7' is not in --collection"):
        texts.get("7", "list 3")
    (tmp_path / "names.tsv").write_text("12\ttwelve\ndoc-a\tA\n007\tseven\n")   # any id that is not an integer
    names = TextsById(tmp_path / "names.tsv", "data.collection")
    assert (names["12"], names["doc-a"], names["007"]) == ("twelve", "A", "seven")
    with pytest.raises(KeyError):
        names["7"]
    for rows in ("1\ta\n2\tb\n1\tc\n", "a\t1\nb\t2\na\t3\n"):
        (tmp_path / "dup.tsv").write_text(rows)
        with pytest.raises(FormatError, match=f"duplicate id '{rows[0]}'"):
            TextsById(tmp_path / "dup.tsv", "data.collection")
    with pytest.raises(ConfigError, match="uncompressed"):
        TextsById(tmp_path / "x.tsv.gz", "data.collection")

"""Index-mined hard negatives (rdr-jax mine-negatives): no mined negative holds an answer or is gold, they are
the retriever's own top survivors in rank order, and the output is DPR training JSON again."""

import json

import pytest

from rdr_jax.cli import main
from rdr_jax.data.dpr_data import DPRData
from rdr_jax.data.embedded_data import embedded_dir
from rdr_jax.data.readers import read_dpr_training
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.retrieval.answers import has_answer
from rdr_jax.retrieval.mining import MiningStats, mine_example

from harness import tiny_encoder_dir

K, NEGATIVES = 30, 5


@pytest.fixture(scope="module")
def mined(tmp_path_factory, minilm_dir):
    """The whole embedded train split mined with a tiny random encoder over the whole embedded corpus, and the
    same questions retrieved by `rdr-jax retrieve` (the reference ranking and has_answer)."""
    root = tmp_path_factory.mktemp("mining")
    model = tiny_encoder_dir(root / "encoder", minilm_dir)
    data = embedded_dir()
    train = data / "train.biencoder.json"
    assert main(["encode", "--model", str(model), "--passages", str(data / "passages.tsv"), "--out",
                 str(root / "emb"), "--max-length", "64", "--batch-size", "64"]) == 0
    examples = list(read_dpr_training(train))
    with open(root / "train.qa.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps({"question": e["question"], "answers": e["answers"]}) + "\n")
    common = ["--model", str(model), "--passages", str(data / "passages.tsv"), "--k", str(K), "--max-length", "32"]
    assert main(["retrieve", *common, "--index", str(root / "emb"), "--qa", str(root / "train.qa.jsonl"),
                 "--out", str(root / "train.results.jsonl"), "--workers", "0"]) == 0
    assert main(["mine-negatives", *common, "--embeddings", str(root / "emb"), "--train", str(train),
                 "--out", str(root / "train.mined.json"), "--negatives", str(NEGATIVES)]) == 0
    results = [json.loads(line) for line in (root / "train.results.jsonl").read_text().splitlines()]
    return root, model, examples, results, json.loads((root / "train.mined.json").read_text())


def test_mined_negatives_hold_no_answer_and_no_gold_and_follow_the_ranking(mined):
    root, _, examples, results, out = mined
    assert len(out) == len(examples) == len(results) == 1100
    assert not (root / "train.mined.json.tmp").exists()
    kept = 0
    for example, result, record in zip(examples, results, out):
        assert record["question"] == example["question"] and record["answers"] == example["answers"]
        assert record["positive_ctxs"] == example["positive_ctxs"]
        assert record["negative_ctxs"] == example["negative_ctxs"]
        gold = {c["passage_id"] for c in example["positive_ctxs"]}
        negatives = record["hard_negative_ctxs"]
        for ctx in negatives:
            assert ctx["passage_id"] not in gold
            assert not has_answer(example["answers"], ctx["text"]), (example["question"], ctx["passage_id"])
        # exactly the first survivors of the retriever's own ranking, in order
        expected = [pid for pid, hit in zip(result["passage_ids"], result["has_answer"])
                    if not hit and pid not in gold][:NEGATIVES]
        assert [c["passage_id"] for c in negatives] == expected
        kept += len(negatives)
    assert kept > 0.9 * NEGATIVES * len(examples)  # a 2475-passage corpus leaves enough negatives to mine
    dropped = sum(any(r["has_answer"][:NEGATIVES]) for r in results)
    assert dropped > 0  # the filter had something to remove: the property above is not vacuous


def test_mined_file_round_trips_and_trains(mined):
    root, model, _, _, out = mined
    again = list(read_dpr_training(root / "train.mined.json"))
    assert [{k: r[k] for k in ("question", "answers", "positive_ctxs", "negative_ctxs")} for r in again] == \
        [{k: r[k] for k in ("question", "answers", "positive_ctxs", "negative_ctxs")} for r in out]
    assert [[{k: c[k] for k in ("title", "text", "passage_id")} for c in r["hard_negative_ctxs"]] for r in again] == \
        [[{k: c[k] for k in ("title", "text", "passage_id")} for c in r["hard_negative_ctxs"]] for r in out]
    data = DPRData(str(root / "train.mined.json"), load_tokenizer(model), max_question_length=16,
                   max_passage_length=32, hard_negatives=2)
    import numpy as np

    batch = data.make_batch(np.arange(4), np.random.default_rng(0))
    assert batch["p_input_ids"].shape[0] == 4 * 3


def test_mine_example_drops_gold_and_answers_and_keeps_originals_on_request():
    example = {"question": "capital of France?", "answers": ["Paris"],
               "positive_ctxs": [{"title": "France", "text": "its capital is Paris", "passage_id": "1"},
                                 {"title": "", "text": "a positive without id", "passage_id": ""}],
               "negative_ctxs": [], "hard_negative_ctxs": [{"title": "x", "text": "old", "passage_id": "9"},
                                                           {"title": "y", "text": "dup", "passage_id": "3"}]}
    candidates = [{"id": "1", "title": "France", "text": "its capital is Paris", "score": 9.0},   # gold by id
                  {"id": "2", "title": "Paris", "text": "PARIS, the city", "score": 8.0},         # answer (any case)
                  {"id": "7", "title": "", "text": "a positive without id", "score": 7.5},        # gold by text
                  {"id": "3", "title": "Lyon", "text": "Lyon is a city", "score": 7.0},
                  {"id": "4", "title": "Nice", "text": "Nice is a city", "score": 6.0},
                  {"id": "5", "title": "Metz", "text": "never read", "score": 5.0}]
    stats = MiningStats()
    record = mine_example(example, iter(candidates), negatives=2, stats=stats)
    assert [c["passage_id"] for c in record["hard_negative_ctxs"]] == ["3", "4"]
    assert record["hard_negative_ctxs"][0] == {"title": "Lyon", "text": "Lyon is a city", "passage_id": "3",
                                               "score": 7.0}
    assert (stats.dropped_gold, stats.dropped_answer, stats.kept, stats.short) == (2, 1, 2, 0)
    record = mine_example(example, iter(candidates), negatives=3, keep_original=True, stats=stats)
    assert [c["passage_id"] for c in record["hard_negative_ctxs"]] == ["3", "4", "5", "9"]  # "3" not twice
    record = mine_example(example, iter(candidates[:3]), negatives=3, stats=stats)
    assert record["hard_negative_ctxs"] == []
    assert (stats.questions, stats.without_negatives, stats.short) == (3, 1, 1)
    regex = mine_example(example, iter(candidates), negatives=2, match_type="regex", stats=MiningStats())
    assert [c["passage_id"] for c in regex["hard_negative_ctxs"]] == ["3", "4"]


def test_mine_negatives_refuses_its_own_input_and_a_foreign_encoder(mined, tmp_path, capsys):
    root, model, _, _, _ = mined
    train = root / "train.mined.json"
    args = ["mine-negatives", "--model", str(model), "--embeddings", str(root / "emb"), "--passages",
            str(embedded_dir() / "passages.tsv"), "--train", str(train)]
    assert main([*args, "--out", str(train)]) != 0
    assert "is the --train file" in capsys.readouterr().err
    assert main([*args[:4], str(root), *args[5:], "--out", str(tmp_path / "x.json")]) != 0
    assert "not an encoding directory" in capsys.readouterr().err


def test_two_processes_mine_the_file_of_one(mined, tmp_path):
    """`rdr-jax mine-negatives` as 2 processes x 4 CPU devices (jax.distributed, gloo; each holds half of the
    encoding, process 0 writes) writes the same bytes as 1 process x 4 devices. Both encode the questions with the
    same per-device program (4 local devices) and score the same chunk shapes (--chunk-rows 64), so the device
    scores are the same floats and equal files show the split over processes and the merge on process 0 are exact."""
    import subprocess
    import sys

    from test_multiprocess import cpu_env, free_port

    root, model, examples = mined[0], mined[1], mined[2]
    train = tmp_path / "train.json"   # 96 questions keep the three processes' start-up the bulk of the time
    train.write_text(json.dumps(examples[:96]))
    cmd = [sys.executable, "-m", "rdr_jax.cli", "mine-negatives", "--model", str(model), "--passages",
           str(embedded_dir() / "passages.tsv"), "--k", str(K), "--max-length", "32", "--embeddings",
           str(root / "emb"), "--train", str(train), "--negatives", str(NEGATIVES), "--chunk-rows", "64",
           "--query-batch", "32", "--batch-size", "32"]
    port = free_port()
    runs = [cmd + ["--out", str(tmp_path / "one.json")]]
    runs += [cmd + ["--out", str(tmp_path / "two.json"), "--coordinator", f"127.0.0.1:{port}", "--num-processes",
                    "2", "--process-id", str(i)] for i in range(2)]
    logs = [open(tmp_path / f"log{i}.txt", "w") for i in range(3)]  # files, not pipes: no process blocks on one
    procs = [subprocess.Popen(c, env=cpu_env(4), stdout=log, stderr=subprocess.STDOUT) for c, log in zip(runs, logs)]
    try:
        for i, proc in enumerate(procs):
            proc.wait(timeout=300)
            logs[i].close()
            assert proc.returncode == 0, (tmp_path / f"log{i}.txt").read_text()[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    one, two = (tmp_path / "one.json").read_bytes(), (tmp_path / "two.json").read_bytes()
    assert one == two and len(json.loads(one)) == 96
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".json" or p.name.endswith(".tmp")) == \
        ["one.json", "train.json", "two.json"]
    assert "[mine-negatives]" in (tmp_path / "log1.txt").read_text()   # process 0 wrote and reported
    assert "[mine-negatives]" not in (tmp_path / "log2.txt").read_text()

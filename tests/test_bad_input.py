"""Inference commands on bad input: exit 2 with one line naming the problem, and nothing written.

Tiny random DPR models (one layer, hidden 32) with the real MiniLM tokenizer keep each command fast; the
checks are about what is refused, not about retrieval quality (tests/test_cli_pipeline.py has that).
"""

import csv
import json
import logging

import pytest
import torch
import transformers

from rdr_jax.cli import main
from rdr_jax.convert.hf_io import CheckpointError, copy_tokenizer_files

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=512)
PASSAGES = [(str(i), f"passage {i} about the country number {i}", f"Title {i}") for i in range(1, 7)]


def write_tsv(path, rows, header=("id", "text", "title")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def snapshot(path):
    """Every file under ``path`` with its bytes (to assert that a refused command wrote nothing)."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def fails(capsys, argv, *needles):
    """Runs the command; it must exit 2 with exactly one stderr line, an error naming every needle."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"rdr-jax {argv[0]}: error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def work(tmp_path_factory, minilm_dir):
    root = tmp_path_factory.mktemp("bad_input")
    torch.manual_seed(0)
    models = {}
    for name, cls, config in (("ctx", transformers.DPRContextEncoder, TINY),
                              ("question", transformers.DPRQuestionEncoder, TINY),
                              ("reader", transformers.DPRReader, TINY),
                              ("question48", transformers.DPRQuestionEncoder, {**TINY, "hidden_size": 48})):
        cls(transformers.DPRConfig(**config)).eval().save_pretrained(root / name)
        copy_tokenizer_files(minilm_dir, root / name)
        models[name] = root / name
    transformers.DPRContextEncoder(transformers.DPRConfig(**TINY)).save_pretrained(root / "no_tokenizer")
    models["no_tokenizer"] = root / "no_tokenizer"
    transformers.RobertaModel(transformers.RobertaConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=130)).save_pretrained(root / "roberta")
    copy_tokenizer_files(minilm_dir, root / "roberta")
    models["roberta"] = root / "roberta"
    transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)).save_pretrained(root / "t5")
    models["t5"] = root / "t5"
    passages = write_tsv(root / "passages.tsv", PASSAGES)
    assert main(["encode", "--model", str(models["ctx"]), "--passages", str(passages), "--out", str(root / "emb"),
                 "--max-length", "32", "--batch-size", "4", "--shard-size", "4"]) == 0
    assert main(["index", "--embeddings", str(root / "emb"), "--out", str(root / "index")]) == 0
    qa = root / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"country number {i}?", "answers": [str(i)]}) + "\n"
                          for i in range(1, 4)))
    assert main(["retrieve", "--model", str(models["question"]), "--index", str(root / "index"), "--passages",
                 str(passages), "--qa", str(qa), "--out", str(root / "results.json"), "--k", "3",
                 "--max-length", "16"]) == 0
    return {"root": root, "passages": passages, "qa": qa, "results": root / "results.json", **models}


# ---- model directories without their tokenizer ----------------------------------------------------------------

def test_model_directory_without_tokenizer_is_refused(work, capsys, tmp_path):
    fails(capsys, ["encode", "--model", work["no_tokenizer"], "--passages", work["passages"],
                   "--out", tmp_path / "emb"], work["no_tokenizer"], "no tokenizer files")
    assert not (tmp_path / "emb").exists()
    fails(capsys, ["retrieve", "--model", work["no_tokenizer"], "--index", work["root"] / "index",
                   "--passages", work["passages"], "--qa", work["qa"], "--out", tmp_path / "r.json"],
          "no tokenizer files")
    assert not (tmp_path / "r.json").exists()


def test_tokenizer_far_smaller_than_the_model_vocabulary_is_refused(work, capsys, tmp_path):
    model = tmp_path / "small_vocab"
    model.mkdir()
    (model / "config.json").write_bytes((work["ctx"] / "config.json").read_bytes())
    (model / "model.safetensors").write_bytes((work["ctx"] / "model.safetensors").read_bytes())
    (model / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    fails(capsys, ["encode", "--model", model, "--passages", work["passages"], "--out", tmp_path / "emb"],
          model, "vocab_size is 30522")
    assert not (tmp_path / "emb").exists()


def test_save_pretrained_writes_the_tokenizer(work, tmp_path):
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import DPRContextEncoder

    model = DPRContextEncoder.from_pretrained(work["ctx"])
    tokenizer = load_tokenizer(work["ctx"])
    model.save_pretrained(tmp_path / "with_object", tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "with_dir", tokenizer=work["ctx"])
    model.save_pretrained(tmp_path / "without")
    for name in ("with_object", "with_dir"):
        loaded = load_tokenizer(tmp_path / name)
        assert loaded("norway")["input_ids"] == tokenizer("norway")["input_ids"]
        assert loaded.unk_token_id not in loaded("norway krone")["input_ids"]
    with pytest.raises(ValueError, match="no tokenizer files"):
        load_tokenizer(tmp_path / "without")
    with pytest.raises(ValueError, match="no tokenizer files"):
        model.save_pretrained(tmp_path / "bad", tokenizer=tmp_path / "without")
    assert not (tmp_path / "bad").exists()


# ---- encode resume checks the corpus --------------------------------------------------------------------------

def test_encode_into_an_encoding_of_another_corpus_is_refused(work, capsys, tmp_path):
    other = write_tsv(tmp_path / "other.tsv", [(f"o{i}", f"other text {i}", "T") for i in range(22)])
    before = snapshot(work["root"] / "emb")
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", other, "--out", work["root"] / "emb",
                   "--max-length", "32", "--batch-size", "4", "--shard-size", "4"], "another corpus", "other.tsv")
    assert snapshot(work["root"] / "emb") == before
    # an encoding from before corpus fingerprints: the shards' ids give it away, and nothing is rewritten
    old = tmp_path / "old_emb"
    old.mkdir()
    for name, data in before.items():
        (old / name).write_bytes(data)
    meta = json.loads((old / "meta.json").read_text())
    del meta["corpus"]
    (old / "meta.json").write_text(json.dumps(meta))
    before_old = snapshot(old)
    code = main(["encode", "--model", str(work["ctx"]), "--passages", str(other), "--out", str(old),
                 "--max-length", "32", "--batch-size", "4", "--shard-size", "4"])
    assert code == 2 and "another corpus" in capsys.readouterr().err
    assert snapshot(old) == before_old


def test_encode_rerun_on_the_same_corpus_still_resumes(work, capsys):
    assert main(["encode", "--model", str(work["ctx"]), "--passages", str(work["passages"]), "--out",
                 str(work["root"] / "emb"), "--max-length", "32", "--batch-size", "4", "--shard-size", "4"]) == 0
    assert f"encoded {len(PASSAGES)} passages" in capsys.readouterr().out


# ---- wrong model family ---------------------------------------------------------------------------------------

def test_wrong_architecture_is_refused_in_one_line(work, capsys, tmp_path):
    for model, found in ((work["t5"], "T5ForConditionalGeneration"), (work["reader"], "DPRReader"),
                         (work["roberta"], "RobertaModel")):
        line = fails(capsys, ["encode", "--model", model, "--passages", work["passages"], "--out", tmp_path / "e"],
                     f"is a {found}, not a DPR encoder")
        assert len(line) < 400
    assert not (tmp_path / "e").exists()
    fails(capsys, ["read", "--model", work["ctx"], "--results", work["results"], "--out", tmp_path / "a.jsonl"],
          "is a DPRContextEncoder, not a DPR reader")
    assert not (tmp_path / "a.jsonl").exists()


def test_from_pretrained_refuses_another_family_and_warns_on_a_related_one(work, minilm_dir, caplog):
    from rdr_jax.models import BertModel, DPRContextEncoder, DPRReader

    with pytest.raises(CheckpointError, match="'roberta' checkpoint"):
        DPRContextEncoder.from_pretrained(work["roberta"])
    with pytest.raises(CheckpointError, match="'t5' checkpoint"):
        BertModel.from_pretrained(work["t5"])
    with caplog.at_level(logging.WARNING):
        DPRContextEncoder.from_pretrained(minilm_dir)
    assert "'bert'" in caplog.text and "DPRContextEncoder" in caplog.text
    with pytest.raises(CheckpointError, match="qa_outputs.*random"):
        DPRReader.from_pretrained(work["ctx"], allow_fresh_heads=False)
    DPRReader.from_pretrained(work["ctx"])  # training starts a reader from an encoder: allowed, with a warning


def test_reader_commands_refuse_fresh_heads(work, capsys, tmp_path):
    config = json.loads((work["ctx"] / "config.json").read_text())
    headless = tmp_path / "headless"
    headless.mkdir()
    (headless / "config.json").write_text(json.dumps({**config, "architectures": ["DPRReader"]}))
    (headless / "model.safetensors").write_bytes((work["ctx"] / "model.safetensors").read_bytes())
    copy_tokenizer_files(work["ctx"], headless)
    fails(capsys, ["read", "--model", headless, "--results", work["results"], "--out", tmp_path / "a.jsonl",
                   "--passages-per-question", "2", "--max-length", "32"], "qa_outputs", "random")
    assert not (tmp_path / "a.jsonl").exists()


# ---- empty corpora, k deeper than the results -----------------------------------------------------------------

@pytest.mark.parametrize("content", ["", "id\ttext\ttitle\n", "\n\n"])
def test_empty_corpus_is_refused(work, capsys, tmp_path, content):
    empty = tmp_path / "empty.tsv"
    empty.write_text(content)
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", empty, "--out", tmp_path / "emb"],
          "empty.tsv", "no passages")
    assert not (tmp_path / "emb").exists()


def test_index_refuses_an_encoding_without_passages(work, capsys, tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "meta.json").write_text(json.dumps({"complete": True, "num_passages": 0, "num_shards": 0, "dim": None}))
    fails(capsys, ["index", "--embeddings", emb, "--out", tmp_path / "index"], "no passages")
    assert not (tmp_path / "index").exists()


def test_evaluate_k_deeper_than_the_results(work, capsys, tmp_path):
    assert main(["evaluate", "--results", str(work["results"]), "--k", "1", "3", "100",
                 "--out", str(tmp_path / "recall.json")]) == 0
    captured = capsys.readouterr()
    assert "Top-3" in captured.out and "Top-100" not in captured.out
    assert "--k 100" in captured.err and "at most 3 passages" in captured.err
    assert set(json.loads((tmp_path / "recall.json").read_text())["results.json"]) == {"1", "3"}
    fails(capsys, ["evaluate", "--results", work["results"], "--k", "100", "--out", tmp_path / "r2.json"],
          "deeper than the results")
    assert not (tmp_path / "r2.json").exists()
    assert main(["evaluate", "--results", str(work["results"])]) == 0  # default ks: those the depth allows
    assert "Top-5" not in capsys.readouterr().out


# ---- duplicate ids, headers by name ---------------------------------------------------------------------------

def test_duplicate_passage_ids_are_refused(work, capsys, tmp_path):
    duplicated = write_tsv(tmp_path / "dup.tsv", PASSAGES + [("3", "again", "T")])
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", duplicated, "--out", tmp_path / "emb"],
          f"{duplicated}:8:", "duplicate passage id '3'", "line 4")
    assert not (tmp_path / "emb").exists()


def test_passages_header_is_read_by_name(tmp_path):
    from rdr_jax.data.readers import read_dpr_passages

    swapped = write_tsv(tmp_path / "swapped.tsv", [(text, pid, title) for pid, text, title in PASSAGES],
                        header=("text", "id", "title"))
    assert [(p["id"], p["text"], p["title"]) for p in read_dpr_passages(swapped)] == PASSAGES


# ---- crashes that became errors -------------------------------------------------------------------------------

def test_question_encoder_of_another_dimension(work, capsys, tmp_path):
    fails(capsys, ["retrieve", "--model", work["question48"], "--index", work["root"] / "index", "--passages",
                   work["passages"], "--qa", work["qa"], "--out", tmp_path / "r.json"], "dim 48", "dim 32")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize("length,needle", [("9999", "max_position_embeddings (512)"), ("3", "no room for text")])
def test_max_length_out_of_the_model_range(work, capsys, tmp_path, length, needle):
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", work["passages"], "--out", tmp_path / "emb",
                   "--max-length", length], f"--max-length {length}", needle)
    assert not (tmp_path / "emb").exists()


def test_faiss_options_are_checked_before_faiss_sees_them():
    from rdr_jax.retrieval.index import new_index

    for options in ({"hnsw_m": 0}, {"nlist": 0}, {"pq_m": -1}):
        kind = "hnsw" if "hnsw_m" in options else "ivfpq"
        with pytest.raises(ValueError, match=next(iter(options))):
            new_index(kind, 32, **options)


def test_ivfpq_nlist_above_the_passage_count(work, capsys, tmp_path):
    fails(capsys, ["index", "--embeddings", work["root"] / "emb", "--out", tmp_path / "i", "--kind", "ivfpq",
                   "--nlist", "64", "--pq-m", "4"], "--nlist 64")
    assert not (tmp_path / "i").exists()


def test_bad_utf8_names_file_and_line(work, capsys, tmp_path):
    tsv = tmp_path / "bad.tsv"
    tsv.write_bytes(b"id\ttext\ttitle\n1\tfine\tT\n2\tbad \xff byte\tT\n")
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", tsv, "--out", tmp_path / "emb"],
          f"{tsv}:3: not valid UTF-8")
    assert not (tmp_path / "emb").exists()
    qa = tmp_path / "qa.csv"
    qa.write_bytes(b'good question\t["a"]\n' * 3 + b'bad \xfe question\t["b"]\n')
    fails(capsys, ["retrieve", "--model", work["question"], "--index", work["root"] / "index", "--passages",
                   work["passages"], "--qa", qa, "--out", tmp_path / "r.json"], f"{qa}:4: not valid UTF-8")
    assert not (tmp_path / "r.json").exists()


def test_outputs_are_checked_before_any_work(work, capsys, tmp_path):
    out_dir = tmp_path / "a_directory"
    out_dir.mkdir()
    fails(capsys, ["retrieve", "--model", work["question"], "--index", work["root"] / "index", "--passages",
                   work["passages"], "--qa", work["qa"], "--out", out_dir], "--out", "is a directory")
    assert list(tmp_path.iterdir()) == [out_dir] and not any(out_dir.iterdir())  # no a_directory.tmp
    a_file = tmp_path / "file"
    a_file.write_text("x")
    fails(capsys, ["encode", "--model", work["ctx"], "--passages", work["passages"], "--out", a_file],
          "is a file")
    fails(capsys, ["evaluate", "--results", work["results"], "--out", a_file / "recall.json"], "is a file")
    fails(capsys, ["read", "--model", work["reader"], "--results", work["results"], "--out", out_dir],
          "is a directory")
    fails(capsys, ["index", "--embeddings", work["root"] / "emb", "--out", work["root"] / "reader"],
          "not an index directory")
    assert a_file.read_text() == "x"


def test_teacher_scores_into_an_existing_dataset(work, capsys, tmp_path):
    argv = ["teacher-scores", "--model", work["reader"], "--results", work["results"], "--out", tmp_path / "data",
            "--name", "teacher", "--top-k", "2", "--max-length", "32"]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path / "data")
    fails(capsys, argv, tmp_path / "data" / "teacher", "--overwrite")
    assert snapshot(tmp_path / "data") == before
    assert main([str(a) for a in argv + ["--overwrite", "--limit", "1"]]) == 0
    from rdr_jax.data.tfds_format import load as load_tfds
    assert len(load_tfds(tmp_path / "data" / "teacher", "train")) == 1


def test_convert_refuses_to_mix_formats(work, capsys, tmp_path):
    orbax = tmp_path / "orbax"
    assert main(["convert", str(work["ctx"]), str(orbax), "--to", "orbax"]) == 0
    capsys.readouterr()
    before = snapshot(orbax)
    fails(capsys, ["convert", work["ctx"], orbax, "--to", "hf"], "an orbax checkpoint", "mix formats")
    assert snapshot(orbax) == before
    fails(capsys, ["convert", work["ctx"], work["root"] / "emb", "--to", "hf"], "not a checkpoint")
    assert main(["convert", str(orbax), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert main(["convert", str(orbax), str(tmp_path / "hf"), "--to", "hf"]) == 0  # same format: replaced


def test_progress_bars_count_every_row(capsys):
    from rdr_jax.data.files import select_by_id

    rows = [{"id": str(i)} for i in range(60)]
    assert len(select_by_id(iter(rows), {"59", "3"}, "passages", "--passages p")) == 2
    assert "60 rows" in capsys.readouterr().err  # tqdm's iterator showed 59: it counts a row on the next one


def test_generate_prints_no_stray_json():
    import inspect

    from rdr_jax.commands import generate

    assert "json.dumps" not in inspect.getsource(generate.run)


def test_write_results_leaves_no_temporary_file(tmp_path):
    from rdr_jax.retrieval.retrieve import write_results

    (tmp_path / "out").mkdir()
    with pytest.raises(OSError):
        write_results(tmp_path / "out", [])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

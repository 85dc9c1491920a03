"""The embedded QA set in rdr_jax/data/embedded/: layouts, counts, answers, determinism, loader."""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import subprocess
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

import pytest
import regex

from rdr_jax.data import embedded_data
from rdr_jax.data.embedded_data import EmbeddedDataError

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO_ROOT / "scripts" / "build_embedded_data.py"
DATA_DIR = embedded_data.embedded_dir()
MANIFEST = json.loads((DATA_DIR / "manifest.json").read_text(encoding="utf-8"))
SHIPPED_FILES = sorted(MANIFEST["files"]) + ["manifest.json"]
MAX_ANSWER_PASSAGES = 4  # the build script's limit on passages holding an answer

# DPR's has_answer, written out here so the data are checked against the rule itself and not only
# against this project's implementation of it (which is checked too, when present).
_DPR_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                           flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)


def dpr_tokens(text: str) -> tuple[str, ...]:
    return tuple(m.group().lower() for m in _DPR_TOKEN.finditer(unicodedata.normalize("NFD", text)))


def contains(tokens: tuple[str, ...], sub: tuple[str, ...]) -> bool:
    return any(tokens[i:i + len(sub)] == sub for i in range(len(tokens) - len(sub) + 1))


def local_has_answer(answers: list[str], text: str) -> bool:
    tokens = dpr_tokens(text)
    return any(contains(tokens, dpr_tokens(a)) for a in answers)


try:
    from rdr_jax.retrieval.answers import has_answer as project_has_answer
except ImportError:  # written by another part of the project; the local rule suffices
    project_has_answer = None


def gold_has_answer(answers: list[str], text: str) -> bool:
    found = local_has_answer(answers, text)
    if project_has_answer is not None:
        assert project_has_answer(answers, text) == found, (answers, text)
    return found


@pytest.fixture(scope="module")
def passages():
    return embedded_data.load_passages()


@pytest.fixture(scope="module")
def qas():
    return {split: embedded_data.load_qas(split) for split in embedded_data.QA_SPLITS}


@pytest.fixture(scope="module")
def biencoder():
    return {split: embedded_data.load_biencoder(split) for split in embedded_data.BIENCODER_SPLITS}


@pytest.fixture(scope="module")
def passage_index(passages):
    """Passage tokens and a first-token index, to find every passage holding an answer quickly."""
    tokens = [dpr_tokens(p["text"]) for p in passages]
    by_token = defaultdict(set)
    for i, toks in enumerate(tokens):
        for t in toks:
            by_token[t].add(i)

    def passages_with(answers: list[str]) -> set[int]:
        hits = set()
        for answer in answers:
            sub = dpr_tokens(answer)
            hits |= {i for i in by_token.get(sub[0], ()) if contains(tokens[i], sub)}
        return hits

    return passages_with


# ---------------------------------------------------------------------------------------------
# Layouts and counts.

def test_passages_layout(passages):
    raw = (DATA_DIR / "passages.tsv").read_text(encoding="utf-8").split("\n")
    assert raw[0] == "id\ttext\ttitle"
    assert raw[-1] == "" and all(line.count("\t") == 2 for line in raw[1:-1])
    assert 1500 <= len(passages) <= 4000
    assert [p["id"] for p in passages] == [str(i) for i in range(1, len(passages) + 1)]
    for p in passages:
        assert p["title"] and p["title"] == p["title"].strip()
        assert 25 <= len(p["text"].split()) <= 90, p
        assert '"' not in p["text"], p  # no csv quoting needed by any DPR-style reader
    # Many passages share a template, so retrieval cannot lean on the wording.
    openings = defaultdict(int)
    for p in passages:
        openings[" ".join(p["text"].split()[len(p["title"].split()):][:4])] += 1
    assert max(openings.values()) >= 500


def test_qa_layout_and_counts(qas):
    minimum = {"train": 1000, "dev": 250, "test": 250}
    for split, rows in qas.items():
        assert len(rows) >= minimum[split], split
        lines = (DATA_DIR / f"{split}.qa.csv").read_text(encoding="utf-8").splitlines()
        assert len(lines) == len(rows)
        for line, row in zip(lines, rows):
            question, answers = line.split("\t")
            # DPR reads the answer column with eval/ast.literal_eval.
            assert ast.literal_eval(answers) == row["answers"] and question == row["question"]
            assert question.endswith("?") and all(a.strip() == a and a for a in row["answers"])
    total_bytes = sum(f["bytes"] for f in MANIFEST["files"].values())
    assert total_bytes < 3.5e6


def test_no_duplicate_questions(qas):
    seen = {}
    for split, rows in qas.items():
        pairs = [(r["question"], split) for r in rows]
        assert len(set(pairs)) == len(pairs), f"duplicate questions in {split}"
        for question, _ in pairs:
            assert question not in seen, f"{question!r} is in {seen.get(question)} and {split}"
            seen[question] = split


def test_biencoder_layout(passages, qas, biencoder):
    by_id = {p["id"]: p for p in passages}
    for split, entries in biencoder.items():
        # The same questions, in the same order, as the split's qa.csv.
        assert [(e["question"], e["answers"]) for e in entries] == \
            [(q["question"], q["answers"]) for q in qas[split]]
        for e in entries:
            assert set(e) == {"question", "answers", "positive_ctxs", "negative_ctxs",
                              "hard_negative_ctxs"}
            assert len(e["positive_ctxs"]) == 1
            assert 2 <= len(e["negative_ctxs"]) <= 5 and 1 <= len(e["hard_negative_ctxs"]) <= 3
            ids = [c["passage_id"] for key in ("positive_ctxs", "negative_ctxs",
                                               "hard_negative_ctxs") for c in e[key]]
            assert len(set(ids)) == len(ids)
            for key in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
                for ctx in e[key]:
                    assert set(ctx) == {"title", "text", "passage_id"}
                    source = by_id[ctx["passage_id"]]
                    assert (ctx["title"], ctx["text"]) == (source["title"], source["text"])


# ---------------------------------------------------------------------------------------------
# Answers.

def test_gold_passages_hold_the_answers(biencoder):
    for split, entries in biencoder.items():
        for e in entries:
            assert gold_has_answer(e["answers"], e["positive_ctxs"][0]["text"]), (split, e)
            for ctx in e["negative_ctxs"] + e["hard_negative_ctxs"]:
                assert not gold_has_answer(e["answers"], ctx["text"]), (split, e["question"], ctx)


def test_hard_negatives_share_the_template_and_words(biencoder):
    def template(text: str) -> str:
        # Every kind of passage says which standard it belongs to early on.
        return regex.search(r"ISO \d+(-\d)?", text).group()

    def words(text: str) -> set[str]:
        return {t for t in dpr_tokens(text) if t.isalnum()}

    more_overlap = 0
    entries = biencoder["train"]
    for e in entries:
        positive = e["positive_ctxs"][0]["text"]
        hard, random_neg = e["hard_negative_ctxs"][0], e["negative_ctxs"][0]
        assert template(hard["text"]) == template(positive)
        q = words(e["question"])
        more_overlap += len(q & words(hard["title"] + " " + hard["text"])) > \
            len(q & words(random_neg["title"] + " " + random_neg["text"]))
    assert more_overlap > 0.9 * len(entries)


def test_every_question_is_answerable_and_specific(qas, passage_index):
    # Test questions ship without their gold passage (as NQ's do): an answer must be in some
    # passage, and in few of them, or top-k answer recall would be meaningless.
    for split, rows in qas.items():
        for row in rows:
            holders = passage_index(row["answers"])
            assert 1 <= len(holders) <= MAX_ANSWER_PASSAGES, (split, row, len(holders))


def test_no_gold_passage_in_two_splits(biencoder):
    gold = {split: {e["positive_ctxs"][0]["passage_id"] for e in entries}
            for split, entries in biencoder.items()}
    assert not gold["train"] & gold["dev"]


# ---------------------------------------------------------------------------------------------
# Provenance and determinism.

def test_manifest_matches_shipped_files(passages, qas):
    for name, entry in MANIFEST["files"].items():
        data = (DATA_DIR / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], name
        assert len(data) == entry["bytes"], name
    counts = MANIFEST["counts"]
    assert counts["passages"] == len(passages)
    assert {s: counts[s] for s in qas} == {s: len(rows) for s, rows in qas.items()}
    assert MANIFEST["pycountry_version"] in (DATA_DIR / "README.md").read_text(encoding="utf-8")


def test_build_is_deterministic(tmp_path):
    installed = importlib.metadata.version("pycountry")
    if installed != MANIFEST["pycountry_version"]:
        pytest.skip(f"the files were built with pycountry {MANIFEST['pycountry_version']}, "
                    f"{installed} is installed; its ISO data may differ")
    if not BUILD_SCRIPT.is_file():
        pytest.skip(f"{BUILD_SCRIPT} is not here (installed package without the repository)")
    for attempt in ("a", "b"):
        subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(tmp_path / attempt)],
                       check=True, capture_output=True, text=True)
    for name in SHIPPED_FILES:
        built = (tmp_path / "a" / name).read_bytes()
        assert built == (tmp_path / "b" / name).read_bytes(), f"two builds differ in {name}"
        assert built == (DATA_DIR / name).read_bytes(), \
            f"{name} differs from a fresh build: rerun scripts/build_embedded_data.py"
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(SHIPPED_FILES)


# ---------------------------------------------------------------------------------------------
# Loader errors (the readers' malformed-row errors are tested in test_builders.py).

def test_loader_rejects_unknown_splits():
    with pytest.raises(EmbeddedDataError, match="unknown split 'test'"):
        embedded_data.load_biencoder("test")

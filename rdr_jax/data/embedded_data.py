"""Readers for DPR's file layouts, and the small QA set shipped in rdr_jax/data/embedded/.

The embedded set (built by scripts/build_embedded_data.py from pycountry's ISO data; see its
README.md) uses DPR's layouts, so the same readers work on DPR's own downloads:

- passages: `id<TAB>text<TAB>title` with a header line (psgs_w100.tsv),
- questions: `question<TAB>["answer", ...]` without a header (nq-test.qa.csv; the answer list is
  a JSON or Python list literal),
- bi-encoder training data: a JSON list of {"question", "answers", "positive_ctxs",
  "negative_ctxs", "hard_negative_ctxs"} (biencoder-nq-train.json).

Malformed rows raise EmbeddedDataError naming the file and line.
"""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

QA_SPLITS = ("train", "dev", "test")
BIENCODER_SPLITS = ("train", "dev")
PASSAGES_HEADER = ["id", "text", "title"]
_CONTEXT_LISTS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")


class EmbeddedDataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


def embedded_dir() -> Path:
    return Path(__file__).resolve().parent / "embedded"


def _embedded_file(name: str) -> Path:
    path = embedded_dir() / name
    if not path.is_file():
        raise EmbeddedDataError(f"{path}: missing; rebuild it with "
                                f"`python scripts/build_embedded_data.py`")
    return path


def _check_split(split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise EmbeddedDataError(f"unknown split {split!r}; expected one of {', '.join(allowed)}")


def read_passages_tsv(path: str | Path) -> list[dict]:
    """Rows of a DPR passage file as {"id", "text", "title"} (ids kept as strings)."""
    path = Path(path)
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header != PASSAGES_HEADER:
            raise EmbeddedDataError(f"{path}:1: header is {header!r}, expected "
                                    f"{'<TAB>'.join(PASSAGES_HEADER)!r}")
        passages = []
        for row in reader:
            if len(row) != 3:
                raise EmbeddedDataError(f"{path}:{reader.line_num}: {len(row)} tab-separated "
                                        f"fields, expected 3 (id, text, title)")
            pid, text, title = row
            if not pid or not text:
                raise EmbeddedDataError(f"{path}:{reader.line_num}: empty id or text")
            passages.append({"id": pid, "text": text, "title": title})
    return passages


def _parse_answers(raw: str, where: str) -> list[str]:
    try:
        answers = json.loads(raw)
    except json.JSONDecodeError:
        try:  # DPR's own files write Python list literals with single quotes
            answers = ast.literal_eval(raw)
        except (ValueError, SyntaxError) as e:
            raise EmbeddedDataError(f"{where}: answers {raw!r} are not a list literal: {e}") \
                from None
    if not isinstance(answers, list) or not answers or \
            not all(isinstance(a, str) and a for a in answers):
        raise EmbeddedDataError(f"{where}: answers must be a non-empty list of non-empty "
                                f"strings, got {raw!r}")
    return answers


def read_qa_csv(path: str | Path) -> list[dict]:
    """Rows of an NQ-open style file as {"question", "answers"}."""
    path = Path(path)
    qas = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line:
                continue
            question, sep, raw_answers = line.rpartition("\t")
            if not sep or not question:
                raise EmbeddedDataError(f"{path}:{line_no}: expected "
                                        f"'question<TAB>[answers]', got {line[:80]!r}")
            qas.append({"question": question,
                        "answers": _parse_answers(raw_answers, f"{path}:{line_no}")})
    return qas


def _check_biencoder_entry(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise EmbeddedDataError(f"{where}: expected an object, got {type(entry).__name__}")
    for key in ("question", "answers", *_CONTEXT_LISTS):
        if key not in entry:
            raise EmbeddedDataError(f"{where}: missing key {key!r}")
    for key in _CONTEXT_LISTS:
        for j, ctx in enumerate(entry[key]):
            if not isinstance(ctx, dict) or "text" not in ctx or "title" not in ctx:
                raise EmbeddedDataError(f"{where}: {key}[{j}] needs 'title' and 'text'")
    if not entry["positive_ctxs"]:
        raise EmbeddedDataError(f"{where}: positive_ctxs is empty")


def read_biencoder_json(path: str | Path) -> list[dict]:
    """DPR's bi-encoder training list; entries are checked for the keys training reads."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as e:
        raise EmbeddedDataError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if not isinstance(entries, list):
        raise EmbeddedDataError(f"{path}: expected a JSON list of questions")
    # The embedded files hold one entry per line after the opening bracket, so entry i is on
    # line i + 2; for other files the index still identifies the entry.
    one_per_line = text.count("\n") == len(entries) + 2
    for i, entry in enumerate(entries):
        where = f"{path}:{i + 2}" if one_per_line else f"{path}: entry {i}"
        _check_biencoder_entry(entry, where)
    return entries


def load_passages() -> list[dict]:
    return read_passages_tsv(_embedded_file("passages.tsv"))


def load_qas(split: str) -> list[dict]:
    _check_split(split, QA_SPLITS)
    return read_qa_csv(_embedded_file(f"{split}.qa.csv"))


def load_biencoder(split: str) -> list[dict]:
    _check_split(split, BIENCODER_SPLITS)
    return read_biencoder_json(_embedded_file(f"{split}.biencoder.json"))

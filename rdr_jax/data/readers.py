"""Streaming parsers of the raw files retrieval datasets come in.

Every reader is a generator of plain example dicts (str / int / float / lists), reading one row or
one JSON object at a time, so multi-GB files (DPR's 21M-row passages TSV, its several-GB training
JSON) never sit in memory. Files ending in `.gz` are decompressed on the fly.

A malformed row raises `ValueError("FILE:LINE: ...")` naming the field, before anything deeper
in the stack sees it.

Longer than 400 lines, kept as one file: every reader shares the same row checks, error messages and
streaming helpers (open_text, the chunked JSON reader), and callers find each dataset's reader here.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

# JSON is read in chunks of this many characters; an object larger than a chunk just takes
# several chunks.
_JSON_CHUNK_CHARS = 1 << 20
# A literal, number or escape cut by a chunk end makes the decoder fail at most this many
# characters before the end of the buffer ('tru', '\\u00e').
_JSON_CUT_MARGIN = 8


from rdr_jax.errors import FormatError  # noqa: F401  (re-exported: readers raise it)


class _Utf8Text:
    """A text file whose decoding errors name the file and line (`FILE:LINE: not valid UTF-8`) instead of
    "'utf-8' codec can't decode byte 0xff in position 3634" (a position inside the decoder's chunk)."""

    def __init__(self, handle: TextIO, path: Path):
        self._handle, self._path = handle, path

    def _error(self) -> FormatError:
        line, column, byte = _first_invalid_utf8(self._path)
        if line is None:
            return FormatError(self._path, None, "not valid UTF-8")
        return FormatError(self._path, line, f"not valid UTF-8 (byte 0x{byte:02x} at column {column})")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._handle)
        except UnicodeDecodeError:
            raise self._error() from None

    def read(self, size: int = -1) -> str:
        try:
            return self._handle.read(size)
        except UnicodeDecodeError:
            raise self._error() from None

    def readline(self, size: int = -1) -> str:
        try:
            return self._handle.readline(size)
        except UnicodeDecodeError:
            raise self._error() from None

    def __getattr__(self, name: str):
        return getattr(self._handle, name)


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _first_invalid_utf8(path: Path) -> tuple[int | None, int | None, int | None]:
    """(line, 1-based byte column, byte) of the first byte that is not UTF-8 (read again only on an error)."""
    with _open_binary(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return line_number, error.start + 1, raw[error.start]
    return None, None, None


def open_text(path: str | os.PathLike, newline: str = "\n") -> TextIO:
    """Opens a UTF-8 text file, gunzipping `.gz`; bytes that are not UTF-8 raise `FILE:LINE: not valid UTF-8`.

    Lines end at "\n" only (a stray "\r" inside a MS MARCO passage must not split it); the csv
    readers pass newline="" as the csv module requires.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".gz":
        return _Utf8Text(io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline=newline), path)
    return _Utf8Text(open(path, encoding="utf-8", newline=newline), path)


def _base_suffix(path: str | os.PathLike) -> str:
    """File type suffix, ignoring a trailing .gz: 'a.jsonl.gz' -> '.jsonl'."""
    path = Path(path)
    if path.suffix == ".gz":
        path = path.with_suffix("")
    return path.suffix.lower()


def _allow_long_csv_fields() -> None:
    # The csv module's default 128 KiB field limit is below some real passages (whole documents).
    limit = sys.maxsize
    while True:
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 10


# ---------------------------------------------------------------------------------------------
# Field checks shared by the JSON readers.


def _require(record: dict, key: str, path, line: int, context: str = "") -> Any:
    if key not in record:
        raise FormatError(path, line, f"missing field {context + key!r}")
    return record[key]


def _as_text(value: Any, field: str, path, line: int, *, allow_number: bool = False) -> str:
    if isinstance(value, str):
        return value
    if allow_number and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise FormatError(path, line, f"field {field!r} must be a string, got {type(value).__name__}: {value!r:.80}")


def _as_text_list(value: Any, field: str, path, line: int, *, allow_number: bool = False) -> list[str]:
    if isinstance(value, str):  # a single answer written as a string
        return [value]
    if not isinstance(value, list):
        raise FormatError(path, line, f"field {field!r} must be a list of strings, got {type(value).__name__}")
    return [_as_text(item, f"{field}[{i}]", path, line, allow_number=allow_number) for i, item in enumerate(value)]


def _as_float(value: Any, field: str, path, line: int) -> float:
    # DPR writes retrieval scores both as numbers and as numeric strings.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    raise FormatError(path, line, f"field {field!r} must be a number, got {value!r:.80}")


def _as_bool(value: Any, field: str, path, line: int) -> bool:
    if isinstance(value, bool):
        return value
    if value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise FormatError(path, line, f"field {field!r} must be a boolean, got {value!r:.80}")


def _as_object(value: Any, field: str, path, line: int) -> dict:
    if not isinstance(value, dict):
        raise FormatError(path, line, f"{field} must be a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------------------------------------
# Incremental JSON.


def iter_json_array(path: str | os.PathLike, chunk_chars: int = _JSON_CHUNK_CHARS) -> Iterator[tuple[int, Any]]:
    """Yields `(line, item)` for each item of a top-level JSON array, reading in chunks.

    `line` is the 1-based line where the item starts. Only one item (plus one chunk) is held in
    memory at a time, so a several-GB array streams.
    """
    decoder = json.JSONDecoder()
    with open_text(path) as handle:
        buffer = ""
        position = 0       # index into buffer
        line = 1           # line number at buffer[position]
        eof = False

        def refill() -> bool:
            nonlocal buffer, position, eof
            if eof:
                return False
            chunk = handle.read(chunk_chars)
            if not chunk:
                eof = True
                return False
            buffer = buffer[position:] + chunk
            position = 0
            return True

        def skip_space() -> None:
            # Advances over whitespace (counting lines); refills until a non-space char or EOF.
            nonlocal position, line
            while True:
                while position < len(buffer) and buffer[position] in " \t\r\n":
                    if buffer[position] == "\n":
                        line += 1
                    position += 1
                if position < len(buffer) or not refill():
                    return

        skip_space()
        if position >= len(buffer):
            raise FormatError(path, line, "empty file, expected a JSON array")
        if buffer[position] != "[":
            raise FormatError(path, line, f"expected a JSON array ('['), found {buffer[position]!r}")
        position += 1
        skip_space()
        if position < len(buffer) and buffer[position] == "]":
            return
        while True:
            start_line = line
            while True:
                try:
                    item, end = decoder.raw_decode(buffer, position)
                except json.JSONDecodeError as error:
                    # An item cut by the chunk end fails at (or a few characters before) the end of
                    # the buffer, or inside a string; read more then. Anywhere else it is malformed,
                    # and reporting it at once avoids reading the rest of a large file first.
                    cut_by_chunk = (error.pos >= len(buffer) - _JSON_CUT_MARGIN
                                    or error.msg.startswith("Unterminated string"))
                    if cut_by_chunk and refill():
                        continue
                    bad_line = start_line + buffer.count("\n", position, error.pos)
                    raise FormatError(path, bad_line, f"invalid JSON: {error.msg}") from None
                # A bare number cut by the chunk end decodes as a shorter number ('-1' of '-1.5').
                number_may_continue = (isinstance(item, (int, float)) and not isinstance(item, bool)
                                       and (end >= len(buffer) or buffer[end] in "0123456789+-.eE"))
                if number_may_continue and refill():
                    continue
                break
            line += buffer.count("\n", position, end)
            position = end
            yield start_line, item
            skip_space()
            if position >= len(buffer):
                raise FormatError(path, line, "unexpected end of file inside the JSON array (missing ']')")
            if buffer[position] == "]":
                position += 1
                skip_space()
                if position < len(buffer):
                    raise FormatError(path, line, f"unexpected data after the JSON array: {buffer[position:position + 20]!r}")
                return
            if buffer[position] != ",":
                raise FormatError(path, line, f"expected ',' or ']' between array items, found {buffer[position]!r}")
            position += 1
            skip_space()


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """Yields `(line, object)` for each non-blank line of a JSON-lines file."""
    with open_text(path) as handle:
        for line_number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise FormatError(path, line_number, f"invalid JSON: {error.msg} (column {error.colno})") from None
            yield line_number, _as_object(record, "line", path, line_number)


def _iter_tsv_fields(path: str | os.PathLike) -> Iterator[tuple[int, list[str]]]:
    """Plain tab-separated lines (MS MARCO files have no csv quoting); skips blank lines."""
    with open_text(path) as handle:
        for line_number, text in enumerate(handle, start=1):
            text = text.rstrip("\r\n")
            if text.strip():
                yield line_number, text.split("\t")


# ---------------------------------------------------------------------------------------------
# DPR / open-domain QA.


DPR_PASSAGE_COLUMNS = ("id", "text", "title")


def dpr_passages_header(row: list[str]) -> dict[str, int] | None:
    """Column positions by name when ``row`` is a header naming id, text and title (in any order), else None."""
    names = [field.strip().lower() for field in row]
    if sorted(names) == sorted(DPR_PASSAGE_COLUMNS):
        return {name: names.index(name) for name in DPR_PASSAGE_COLUMNS}
    return None


def dpr_passage_rows(reader, path, each_row=None) -> Iterator[tuple[int, list[str], dict[str, int]]]:
    """``(line, fields, columns)`` of each passage row of a ``csv.reader`` over a DPR passages TSV: blank lines
    skipped, a header row read by name (:func:`dpr_passages_header`; without one the columns are id, text,
    title), a row of other than 3 fields refused as ``FILE:LINE``. ``each_row(line)`` sees every row first,
    blank ones included (a caller's own per-line check)."""
    columns = {name: i for i, name in enumerate(DPR_PASSAGE_COLUMNS)}
    first = True
    for row in reader:
        line = reader.line_num
        if each_row is not None:
            each_row(line)
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if first:
            first = False
            header = dpr_passages_header(row)
            if header is not None:
                columns = header
                continue
        if len(row) != 3:
            raise FormatError(path, line, f"expected 3 tab-separated fields (id, text, title), got {len(row)}")
        yield line, row, columns


def read_dpr_passages(path: str | os.PathLike, *, check_duplicates: bool = True) -> Iterator[dict]:
    """DPR passages TSV (`id<TAB>text<TAB>title`, csv quoting as in psgs_w100.tsv, header optional).

    A header row is read by name (`text<TAB>id<TAB>title` works); without one the columns are id, text,
    title. A passage id seen before raises `FILE:LINE: duplicate passage id` naming both lines.
    Yields {"id": str, "title": str, "text": str}.
    """
    _allow_long_csv_fields()
    seen: set[str] = set()
    with open_text(path, newline="") as handle:
        for line, row, columns in dpr_passage_rows(csv.reader(handle, delimiter="\t"), path):
            passage_id = row[columns["id"]].strip()
            if not passage_id:
                raise FormatError(path, line, "empty field 'id'")
            if check_duplicates:
                if passage_id in seen:
                    earlier = _first_line_of_id(path, passage_id, columns["id"])
                    raise FormatError(path, line, f"duplicate passage id {passage_id!r:.80} (first on line {earlier})")
                seen.add(passage_id)
            yield {"id": passage_id, "title": row[columns["title"]], "text": row[columns["text"]]}


def _first_line_of_id(path, passage_id: str, column: int) -> int | None:
    with open_text(path, newline="") as handle:
        reader = csv.reader(handle, delimiter="\t")
        for row in reader:
            if len(row) > column and row[column].strip() == passage_id:
                return reader.line_num
    return None


def _parse_answer_list(text: str, path, line: int) -> list[str]:
    # DPR's NQ files hold JSON lists; TriviaQA's hold Python reprs (single quotes).
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise FormatError(path, line, f"field 'answers' is not a list literal: {text!r:.80}") from None
    return _as_text_list(value, "answers", path, line)


def read_qa(path: str | os.PathLike, delimiter: str = "\t") -> Iterator[dict]:
    """Open-domain QA pairs: DPR's `question<TAB>["ans", ...]` CSV/TSV, or JSONL
    `{"question", "answer"|"answers"}` (.jsonl / .json). Yields {"question": str, "answers": [str]}.
    """
    if _base_suffix(path) in (".jsonl", ".json"):
        for line, record in iter_jsonl(path):
            question = _as_text(_require(record, "question", path, line), "question", path, line)
            if "answers" in record:
                answers = _as_text_list(record["answers"], "answers", path, line)
            elif "answer" in record:
                answers = _as_text_list(record["answer"], "answer", path, line)
            else:
                raise FormatError(path, line, "missing field 'answers' (or 'answer')")
            yield {"question": question, "answers": answers}
        return
    _allow_long_csv_fields()
    with open_text(path, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != 2:
                raise FormatError(path, line, f"expected 2 fields (question, answers) separated by "
                                              f"{delimiter!r}, got {len(row)}")
            yield {"question": row[0], "answers": _parse_answer_list(row[1], path, line)}


def _dpr_context(value: Any, field: str, path, line: int) -> dict:
    ctx = _as_object(value, f"field {field!r}", path, line)
    passage_id = ctx.get("passage_id", ctx.get("psg_id", ""))
    return {
        "title": _as_text(ctx.get("title", ""), f"{field}.title", path, line),
        "text": _as_text(_require(ctx, "text", path, line, f"{field}."), f"{field}.text", path, line),
        "passage_id": _as_text(passage_id, f"{field}.passage_id", path, line, allow_number=True),
    }


DPR_CONTEXT_LISTS = ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs")


def read_dpr_training(path: str | os.PathLike) -> Iterator[dict]:
    """DPR bi-encoder training JSON: a list of {question, answers, positive_ctxs, negative_ctxs,
    hard_negative_ctxs}, contexts {title, text, passage_id?}. Streams the array.
    """
    for line, value in iter_json_array(path):
        record = _as_object(value, "array item", path, line)
        example = {
            "question": _as_text(_require(record, "question", path, line), "question", path, line),
            "answers": _as_text_list(record.get("answers", []), "answers", path, line),
        }
        for key in DPR_CONTEXT_LISTS:
            contexts = record.get(key, [])
            if not isinstance(contexts, list):
                raise FormatError(path, line, f"field {key!r} must be a list, got {type(contexts).__name__}")
            example[key] = [_dpr_context(ctx, f"{key}[{i}]", path, line) for i, ctx in enumerate(contexts)]
        yield example


def read_retriever_results(path: str | os.PathLike) -> Iterator[dict]:
    """DPR retriever output JSON: a list of {question, answers, ctxs: [{id, title, text, score,
    has_answer}]}. Streams the array."""
    for line, value in iter_json_array(path):
        record = _as_object(value, "array item", path, line)
        contexts = record.get("ctxs", [])
        if not isinstance(contexts, list):
            raise FormatError(path, line, f"field 'ctxs' must be a list, got {type(contexts).__name__}")
        ctxs = []
        for i, ctx_value in enumerate(contexts):
            field = f"ctxs[{i}]"
            ctx = _as_object(ctx_value, f"field {field!r}", path, line)
            ctxs.append({
                "id": _as_text(_require(ctx, "id", path, line, field + "."), f"{field}.id", path, line, allow_number=True),
                "title": _as_text(ctx.get("title", ""), f"{field}.title", path, line),
                "text": _as_text(ctx.get("text", ""), f"{field}.text", path, line),
                "score": _as_float(_require(ctx, "score", path, line, field + "."), f"{field}.score", path, line),
                "has_answer": _as_bool(ctx.get("has_answer", False), f"{field}.has_answer", path, line),
            })
        yield {
            "question": _as_text(_require(record, "question", path, line), "question", path, line),
            "answers": _as_text_list(record.get("answers", []), "answers", path, line),
            "ctxs": ctxs,
        }


# ---------------------------------------------------------------------------------------------
# MS MARCO.


def _id_text_rows(path, id_name: str) -> Iterator[tuple[int, str, str]]:
    for line, fields in _iter_tsv_fields(path):
        if len(fields) != 2:
            raise FormatError(path, line, f"expected 2 tab-separated fields ({id_name}, text), got {len(fields)}")
        if not fields[0].strip():
            raise FormatError(path, line, f"empty field {id_name!r}")
        yield line, fields[0].strip(), fields[1]


def read_msmarco_collection(path: str | os.PathLike, *, check_duplicates: bool = True) -> Iterator[dict]:
    """MS MARCO collection.tsv (`pid<TAB>text`). Yields the passages schema {"id", "title": "", "text"}
    so a MS MARCO corpus and a DPR corpus go through the same encoding code. A repeated pid raises
    `FILE:LINE: duplicate passage id`."""
    seen: set[str] = set()
    for line, pid, text in _id_text_rows(path, "pid"):
        if check_duplicates:
            if pid in seen:
                earlier = next(n for n, other, _ in _id_text_rows(path, "pid") if other == pid)
                raise FormatError(path, line, f"duplicate passage id {pid!r:.80} (first on line {earlier})")
            seen.add(pid)
        yield {"id": pid, "title": "", "text": text}


def read_msmarco_queries(path: str | os.PathLike) -> Iterator[dict]:
    """MS MARCO queries TSV (`qid<TAB>text`). Yields {"id", "text"}."""
    for _, qid, text in _id_text_rows(path, "qid"):
        yield {"id": qid, "text": text}


QRELS_FORMS = ("auto", "trec")


def read_qrels(path: str | os.PathLike, form: str = "auto") -> Iterator[dict]:
    """Relevance judgements, yielding {"qid", "pid", "relevance": int}. ``form="trec"``: exactly TREC's
    `qid 0 pid rel` (what trec_eval reads; a missing column is an error, not another layout); ``"auto"`` also
    takes TSV `qid pid rel` / `qid pid` (relevance 1), as MS MARCO ships them."""
    for _, row in iter_qrels(path, form):
        yield row


def iter_qrels(path: str | os.PathLike, form: str = "auto") -> Iterator[tuple[int, dict]]:
    """(line number, judgement) of :func:`read_qrels`, for callers whose own checks name the line."""
    if form not in QRELS_FORMS:
        raise ValueError(f"qrels form must be one of {QRELS_FORMS}, got {form!r}")
    with open_text(path) as handle:
        for line, text in enumerate(handle, start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) == 4:
                qid, _, pid, relevance = fields
            elif form == "trec":
                raise FormatError(path, line, f"expected 4 columns 'qid 0 docid relevance', got {len(fields)}")
            elif len(fields) == 3:
                qid, pid, relevance = fields
            elif len(fields) == 2:
                (qid, pid), relevance = fields, "1"
            else:
                raise FormatError(path, line, f"expected 'qid 0 pid rel' (TREC) or 'qid pid [rel]', got {len(fields)} fields")
            try:
                relevance_value = int(relevance)
            except ValueError:
                raise FormatError(path, line, f"field 'relevance' must be an integer, got {relevance!r}") from None
            yield line, {"qid": qid, "pid": pid, "relevance": relevance_value}


TRIPLES_FORMS = ("auto", "text", "ids")


def detect_triples_form(path: str | os.PathLike) -> str:
    """'ids' when the first row's three fields are all integers (`qid pid+ pid-`), else 'text'."""
    for line, fields in _iter_tsv_fields(path):
        if len(fields) != 3:
            raise FormatError(path, line, f"expected 3 tab-separated fields, got {len(fields)}")
        return "ids" if all(field.strip().isdigit() for field in fields) else "text"
    raise FormatError(path, None, "empty triples file")


def read_msmarco_triples(path: str | os.PathLike, form: str = "auto") -> Iterator[dict]:
    """MS MARCO training triples: text `query<TAB>positive<TAB>negative` -> {"query", "positive",
    "negative"}; ids `qid<TAB>pid+<TAB>pid-` -> {"qid", "positive_pid", "negative_pid"}."""
    if form not in TRIPLES_FORMS:
        raise ValueError(f"triples form must be one of {TRIPLES_FORMS}, got {form!r}")
    if form == "auto":
        form = detect_triples_form(path)
    for line, fields in _iter_tsv_fields(path):
        if len(fields) != 3:
            raise FormatError(path, line, f"expected 3 tab-separated fields, got {len(fields)}")
        if form == "text":
            yield {"query": fields[0], "positive": fields[1], "negative": fields[2]}
            continue
        names = ("qid", "positive_pid", "negative_pid")
        for name, field in zip(names, fields):
            if not field.strip().isdigit():
                raise FormatError(path, line, f"field {name!r} must be an integer id, got {field!r:.80}")
        yield dict(zip(names, (field.strip() for field in fields)))


def read_teacher_scores(path: str | os.PathLike) -> Iterator[dict]:
    """Teacher-scored candidate lists, JSONL {"qid", "pids": [...], "scores": [...]}.
    Yields {"qid": str, "pids": [str], "scores": [float]}."""
    for line, record in iter_jsonl(path):
        qid = _as_text(_require(record, "qid", path, line), "qid", path, line, allow_number=True)
        pids = _as_text_list(_require(record, "pids", path, line), "pids", path, line, allow_number=True)
        raw_scores = _require(record, "scores", path, line)
        if not isinstance(raw_scores, list):
            raise FormatError(path, line, f"field 'scores' must be a list of numbers, got {type(raw_scores).__name__}")
        scores = [_as_float(score, f"scores[{i}]", path, line) for i, score in enumerate(raw_scores)]
        if len(pids) != len(scores):
            raise FormatError(path, line, f"fields 'pids' and 'scores' differ in length ({len(pids)} vs {len(scores)})")
        bad = [i for i, score in enumerate(scores) if not math.isfinite(score)]
        if bad:
            raise FormatError(path, line, f"field 'scores[{bad[0]}]' is not finite: {scores[bad[0]]}")
        yield {"qid": qid, "pids": pids, "scores": scores}

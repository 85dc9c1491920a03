"""Retriever results written and read as streams: JSONL, DPR's JSON layout, TREC runs.

Nothing here holds all results: a search yields batches of ``(scores, rows)``; the passages of those rows are
read from the passages TSV by byte offset (:class:`PassageRows`, one ``int64`` per passage, built in the same
pass that checks the TSV against the index), ``has_answer`` is computed in worker processes over chunks of
questions (order kept), and each question's record is appended to the output as it comes.

Layouts:

- JSONL (``.jsonl``), one question per line: ``{"qid", "question", "answers", "passage_ids", "passage_rows",
  "scores", "has_answer"}`` (+ ``"titles"``, ``"texts"`` when asked for); ``passage_rows`` are the passages'
  rows in the corpus (TSV or corpus store), so the commands that need the text look it up by row
  (:func:`iter_results`).
- DPR JSON (``.json``), the retriever-results file of DPR's reader: ``[{"question", "answers", "ctxs": [{"id",
  "title", "text", "score", "has_answer"}]}]``, written item by item (title/text can be left out).
- TREC run: ``qid Q0 passage_id rank score tag``; the question id is its 0-based row in the questions file.
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import os
from array import array
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from rdr_jax.data.readers import dpr_passage_rows, iter_jsonl, read_retriever_results
from rdr_jax.errors import FormatError
from rdr_jax.retrieval.answers import AnswerMatcher, default_tokenizer

FORMATS = ("jsonl", "dpr")


def results_format(path: str | os.PathLike) -> str:
    """``dpr`` for a ``.json`` path, else ``jsonl``."""
    return "dpr" if Path(path).suffix.lower() == ".json" else "jsonl"


# ---- passages by row ----------------------------------------------------------------------------------------

class PassageRows:
    """Byte offset of each passage row of a DPR passages TSV, so a row's passage is read with one seek."""

    def __init__(self, path: str | os.PathLike, offsets: np.ndarray, columns: dict[str, int]):
        self.path, self.offsets, self.columns = Path(path), offsets, columns

    def __len__(self) -> int:
        return len(self.offsets)

    @classmethod
    def scan(cls, path: str | os.PathLike, expected_ids: Iterable[str] | None = None, expected_count: int = 0, *,
             source: str = "corpus", what: str = "the index") -> "PassageRows":
        """One pass over the TSV: every row's offset, and its id checked against ``expected_ids`` (the rows of
        the index or encoding, in order; None: not checked); a mismatch is refused as
        ``check_ids_against_corpus`` words it."""
        from tqdm import tqdm

        offsets = array("q")
        expected = iter(expected_ids or ())
        columns = {"id": 0, "text": 1, "title": 2}
        lines = _LineOffsets(path)
        consumed, n = [0], 0

        def one_line_each(line: int) -> None:
            if lines.count - consumed[0] != 1:
                raise FormatError(path, line, "a quoted field spans several lines; passages must be one per line")
            consumed[0] = lines.count

        rows = dpr_passage_rows(csv.reader(lines, delimiter="\t"), path, one_line_each)
        for line, row, columns in tqdm(rows, desc="reading passages", unit=" rows", mininterval=2.0, delay=2.0):
            n += 1
            offsets.append(lines.last_offset)
            if expected_ids is None:
                continue
            pid = row[columns["id"]].strip()
            want = next(expected, None)
            if want is None:
                raise ValueError(f"{source}: has more passages than {what} ({expected_count}); {what} is stale, "
                                 "rebuild it")
            if pid != want:
                raise ValueError(f"{source}: passage {n} has id {pid!r} but {what.split()[-1]} row {n - 1} is "
                                 f"{want!r}; {what} was built from another corpus")
        if expected_ids is not None and n != expected_count:
            raise ValueError(f"{source}: has {n} passages but {what} has {expected_count}")
        return cls(path, np.frombuffer(offsets, np.int64), columns)

    def reader(self):
        """A function corpus row -> ``{id, title, text}`` (one open file, one seek per passage)."""
        read = _PassageReader(str(self.path), self.columns)
        return lambda row: read(self.offsets[row])


class _LineOffsets:
    """Text lines of a file for ``csv.reader``, remembering where the last row started."""

    def __init__(self, path):
        self.handle = open(path, "rb")
        self.path, self.offset, self.last_offset, self.count = path, 0, 0, 0

    def __iter__(self):
        return self

    def __next__(self) -> str:
        raw = self.handle.readline()
        if not raw:
            self.handle.close()
            raise StopIteration
        self.last_offset, self.count = self.offset, self.count + 1
        self.offset += len(raw)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise FormatError(self.path, self.count, f"not valid UTF-8 ({error.reason})") from None


class _PassageReader:
    """Reads passages by byte offset (one per worker process)."""

    def __init__(self, path: str, columns: dict[str, int]):
        self.handle, self.columns = open(path, "rb"), columns

    def __call__(self, offset: int) -> dict:
        self.handle.seek(int(offset))
        row = next(csv.reader([self.handle.readline().decode("utf-8")], delimiter="\t"))
        c = self.columns
        return {"id": row[c["id"]].strip(), "title": row[c["title"]], "text": row[c["text"]]}


# ---- formatting in workers ----------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(path: str, columns: dict[str, int], options: dict) -> None:
    _WORKER.update(reader=_PassageReader(path, columns), options=options, tokenizer=default_tokenizer())


def _format_chunk(task) -> tuple[str, str, list[int]]:
    """(result records, TREC lines, first answer rank per question: -1 for none) of a chunk of questions."""
    questions, scores, offsets, rows = task
    read, options = _WORKER["reader"], _WORKER["options"]
    out, trec, first_hits = io.StringIO(), io.StringIO(), []
    for (qid, qa), row_scores, row_offsets, corpus_rows in zip(questions, scores, offsets, rows):
        matcher = AnswerMatcher(qa["answers"], options["match"], _WORKER["tokenizer"])
        passages = [read(o) for o in row_offsets if o >= 0]
        hits = [bool(matcher(p["text"])) for p in passages]
        first_hits.append(hits.index(True) if True in hits else -1)
        row_scores = [float(s) for s in row_scores[:len(passages)]]
        if options["format"] == "jsonl":
            record = {"qid": qid, "question": qa["question"], "answers": list(qa["answers"]),
                      "passage_ids": [p["id"] for p in passages],
                      "passage_rows": [int(r) for r in corpus_rows[:len(passages)]], "scores": row_scores,
                      "has_answer": hits}
            if options["text"]:
                record.update(titles=[p["title"] for p in passages], texts=[p["text"] for p in passages])
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            ctxs = [{"id": p["id"], **({"title": p["title"], "text": p["text"]} if options["text"] else {}),
                     "score": s, "has_answer": h} for p, s, h in zip(passages, row_scores, hits)]
            out.write(json.dumps({"question": qa["question"], "answers": list(qa["answers"]), "ctxs": ctxs},
                                 ensure_ascii=False, indent=1))
            out.write("\x00")  # item separator, replaced by ",\n" when written
        if options["trec"]:
            for rank, (p, s) in enumerate(zip(passages, row_scores), start=1):
                trec.write(f"{qid} Q0 {p['id']} {rank} {s!r} {options['tag']}\n")
    return out.getvalue(), trec.getvalue(), first_hits


class _AtomicText:
    """A text file written to ``PATH.tmp`` and renamed on success (nothing half-written is left as PATH)."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.tmp, "w", encoding="utf-8")

    def finish(self, ok: bool) -> None:
        self.handle.close()
        if ok:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_results_stream(batches: Iterable[tuple[np.ndarray, np.ndarray]], questions: Sequence[dict],
                         passages: PassageRows, out: str | os.PathLike, *, fmt: str | None = None,
                         with_text: bool | None = None, match_type: str = "string", trec_out=None,
                         tag: str = "rdr_jax", workers: int = 0, chunk_questions: int = 64) -> np.ndarray:
    """Write the results of ``batches`` (``(scores [n, k], rows [n, k])`` for consecutive questions) as they
    come; returns each question's first answer rank (-1: none), the input of :func:`answer_recall`.

    ``with_text`` defaults to True for the DPR layout (its readers expect the passage text) and False for JSONL.
    ``workers`` > 1 matches answers in that many processes (spawned: no fork of a JAX process)."""
    out = Path(out)
    fmt = fmt or results_format(out)
    if fmt not in FORMATS:
        raise ValueError(f"results format must be one of {FORMATS}, got {fmt!r}")
    options = {"format": fmt, "text": (fmt == "dpr") if with_text is None else with_text, "match": match_type,
               "trec": trec_out is not None, "tag": tag}
    init_args = (str(passages.path), passages.columns, options)

    def tasks() -> Iterator:
        q = 0
        for scores, rows in batches:
            offsets = np.where(rows >= 0, passages.offsets[np.maximum(rows, 0)], -1)
            for s in range(0, len(rows), chunk_questions):
                n = len(rows[s:s + chunk_questions])
                yield ([(str(q + s + i), questions[q + s + i]) for i in range(n)], scores[s:s + n], offsets[s:s + n],
                       rows[s:s + n])
            q += len(rows)

    files = [_AtomicText(out)] + ([_AtomicText(Path(trec_out))] if trec_out is not None else [])
    first_hits = array("q")
    ok, pool = False, None
    try:
        if workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, init_args)
            chunks = pool.imap(_format_chunk, tasks())
        else:
            _init_worker(*init_args)
            chunks = map(_format_chunk, tasks())
        first = True
        if fmt == "dpr":
            files[0].handle.write("[\n")
        for text, trec, hits in chunks:
            if fmt == "dpr":
                items = [item for item in text.split("\x00") if item]
                if items:
                    files[0].handle.write(("" if first else ",\n") + ",\n".join(items))
                    first = False
            else:
                files[0].handle.write(text)
            if trec_out is not None:
                files[1].handle.write(trec)
            first_hits.extend(hits)
        if fmt == "dpr":
            files[0].handle.write("\n]\n")
        ok = True
    finally:
        if pool is not None:
            pool.terminate() if not ok else pool.close()
            pool.join()
        for f in files:
            f.finish(ok)
    return np.frombuffer(first_hits, np.int64)


# ---- reading ------------------------------------------------------------------------------------------------

def _first_char(path) -> str:
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        while True:
            chunk = f.read(4096)
            if not chunk:
                return ""
            stripped = chunk.lstrip()
            if stripped:
                return stripped[0]


def iter_result_hits(path: str | os.PathLike) -> Iterator[list[bool]]:
    """``has_answer`` of each question's passages, best first, from a results file in either layout, streamed
    (DPR JSON through an incremental parser: one item in memory at a time)."""
    if _first_char(path) == "[":
        for record in read_retriever_results(path):
            yield [c["has_answer"] for c in record["ctxs"]]
        return
    for line, record in iter_jsonl(path):
        if "has_answer" in record:
            hits = record["has_answer"]
        elif "ctxs" in record and isinstance(record["ctxs"], list):
            hits = [c.get("has_answer") if isinstance(c, dict) else None for c in record["ctxs"]]
        else:
            raise FormatError(path, line, "missing field 'has_answer' (or 'ctxs')")
        if not isinstance(hits, list) or not all(isinstance(h, bool) for h in hits):
            raise FormatError(path, line, "field 'has_answer' must be a list of true/false")
        yield hits


def first_hit_ranks_of(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(first answer rank per question, -1 for none; the deepest question's passage count) of a results file."""
    ranks, depth = array("q"), 0
    for hits in iter_result_hits(path):
        ranks.append(hits.index(True) if True in hits else -1)
        depth = max(depth, len(hits))
    return np.frombuffer(ranks, np.int64), depth


# ---- results with their passages ----------------------------------------------------------------------------

class PassageLookup:
    """Passages by corpus row, from a corpus store (``rdr-jax tokenize``; memory-mapped) or a passages TSV (byte
    offsets: one pass to build, 8 bytes per passage)."""

    def __init__(self, path: str | os.PathLike):
        from rdr_jax.data.corpus_store import CorpusStore, is_corpus_store

        self.path = Path(path)
        if is_corpus_store(self.path):
            self.get = CorpusStore(self.path).passage
        else:
            self.get = PassageRows.scan(self.path).reader()


def iter_results(path: str | os.PathLike, passages: str | os.PathLike | PassageLookup | None = None
                 ) -> Iterator[dict]:
    """Retriever results in DPR's layout (``{question, answers, ctxs: [{id, title, text, score, has_answer}]}``),
    streamed from either file layout. JSONL records without text get it from ``passages`` by
    ``passage_rows`` (each looked-up id checked against the record's), so results files need not carry it."""
    if _first_char(path) == "[":
        yield from read_retriever_results(path)
        return
    lookup = passages if passages is None or isinstance(passages, PassageLookup) else None
    for line, record in iter_jsonl(path):
        for field in ("question", "passage_ids", "scores"):
            if field not in record:
                raise FormatError(path, line, f"missing field {field!r}")
        ids, n = record["passage_ids"], len(record["passage_ids"])
        if "texts" in record:
            titles, texts = record.get("titles") or [""] * n, record["texts"]
        else:
            if passages is None:
                raise ValueError(f"{path}: results without passage text; give the passages (--passages TSV or "
                                 "corpus store) to read it from")
            if "passage_rows" not in record:
                raise FormatError(path, line, "no 'texts' and no 'passage_rows' to look the passages up by")
            lookup = lookup or PassageLookup(passages)
            found = [lookup.get(int(r)) for r in record["passage_rows"]]
            for pid, p in zip(ids, found):
                if p["id"] != str(pid):
                    raise FormatError(path, line, f"passage row holds id {p['id']!r} in {lookup.path}, the results "
                                                  f"say {pid!r}: other passages than the retrieval's")
            titles, texts = [p["title"] for p in found], [p["text"] for p in found]
        hits = record.get("has_answer") or [False] * n
        yield {"question": record["question"], "answers": list(record.get("answers") or []),
               "ctxs": [{"id": str(i), "title": t, "text": x, "score": float(s), "has_answer": bool(h)}
                        for i, t, x, s, h in zip(ids, titles, texts, record["scores"], hits)]}

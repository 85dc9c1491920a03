"""Passages of a DPR passages TSV read by the byte offset of their line: the offsets of only the passages a
dataset names are found in one streaming pass (when the dataset is prepared), and a training process then reads
each passage it needs with one seek, holding no part of the corpus (a picklable reader: each grain worker opens
the file itself)."""

from __future__ import annotations

import csv
from pathlib import Path

from rdr_jax.data.files import require_file
from rdr_jax.data.readers import DPR_PASSAGE_COLUMNS, dpr_passages_header
from rdr_jax.errors import FormatError


def _fields(raw: bytes, path, line: int) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FormatError(path, line, f"not valid UTF-8 ({error.reason})") from None
    return next(csv.reader([text.rstrip("\r\n")], delimiter="\t"), [])


def _columns(path: Path) -> dict[str, int]:
    with open(path, "rb") as f:
        header = dpr_passages_header(_fields(f.readline(), path, 1))
    return header or {name: i for i, name in enumerate(DPR_PASSAGE_COLUMNS)}


def passage_offsets(path, wanted: set[str], key: str = "data.passages_file") -> dict[str, int]:
    """{passage id: byte offset of its line} for the ``wanted`` ids, in one pass over the TSV (passages one per
    line, as psgs_w100.tsv); a wanted id the file lacks is refused by name."""
    from tqdm import tqdm

    path = require_file(path, key)
    columns, found, offset = _columns(path), {}, 0
    with open(path, "rb") as f:
        for line, raw in enumerate(tqdm(f, desc="finding passages", unit=" rows", mininterval=2.0, delay=2.0), 1):
            start, offset = offset, offset + len(raw)
            if not raw.strip() or (line == 1 and dpr_passages_header(_fields(raw, path, 1))):
                continue
            fields = _fields(raw, path, line)
            if len(fields) != 3:
                raise FormatError(path, line, f"expected 3 tab-separated fields (id, text, title) on one line, got "
                                              f"{len(fields)}")
            pid = fields[columns["id"]].strip()
            if pid in wanted:
                found.setdefault(pid, start)
    missing = wanted - found.keys()
    if missing:
        raise ValueError(f"'{key}' {path}: {len(missing)} passages of the training data are not in it, e.g. "
                         f"{sorted(missing)[0]!r}")
    return found


class PassageLines:
    """``reader(offset) -> {id, title, text}`` over one passages TSV; the file is opened on first use."""

    def __init__(self, path, key: str = "data.passages_file"):
        self.path = require_file(path, key)
        self.columns = _columns(self.path)
        self._handle = None

    def __call__(self, offset: int) -> dict:
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(int(offset))
        fields = _fields(self._handle.readline(), self.path, 0)
        c = self.columns
        return {"id": fields[c["id"]].strip(), "title": fields[c["title"]], "text": fields[c["text"]]}

    def __getstate__(self):
        return {**self.__dict__, "_handle": None}

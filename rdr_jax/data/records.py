"""Training examples as a random-access dataset: array_record files of JSON records, built once from a
task's raw file, read one record at a time.

Why array_record: grain reads it natively (``ArrayRecordDataSource``), a record is found by index without
reading the others (``group_size:1``), and nothing is held in memory beyond the file index, so every process
and every grain worker opens the same file and reads only the examples of its own batches. The records stay
JSON (a task's examples are nested lists of passages of varying length; a fixed-shape memory map would need
one array per field and an offsets table for each): one ``json.loads`` per example is cheap beside tokenising it.

A prepared dataset is ``NAME.arrayrecord`` plus ``NAME.arrayrecord.json`` (format, record count, the source it
was built from). ``prepared_records`` accepts either a prepared file or a raw one; a raw one is converted once
into a cache directory (keyed by its path, size and modification time) and reused afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

from rdr_jax.data.files import iter_json_records, resolve_data_path
from rdr_jax.errors import ConfigError

log = logging.getLogger(__name__)

SUFFIX = ".arrayrecord"
VERSION = 1


def meta_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_prepared(path: str | Path) -> bool:
    return str(path).endswith(SUFFIX)


class RecordFile:
    """The records of a prepared dataset by index (``len``, ``[i]`` -> the decoded record). Picklable: a grain
    worker reopens the file instead of copying it."""

    def __init__(self, path: str | Path, expect_format: str | tuple[str, ...] | None = None):
        self.path = Path(path)
        meta = meta_path(self.path)
        if not self.path.is_file() or not meta.is_file():
            raise ConfigError(f"{self.path}: no prepared dataset here (expected it and {meta.name}; build it with "
                              "`rdr-jax prepare-data`)")
        self.meta = json.loads(meta.read_text())
        allowed = (expect_format,) if isinstance(expect_format, str) else expect_format
        if allowed and self.meta.get("format") not in allowed:
            raise ConfigError(f"{self.path}: a prepared {self.meta.get('format')!r} dataset, but this task reads "
                              f"{' or '.join(map(repr, allowed))} data")
        self._source = None

    def _open(self):
        if self._source is None:
            import grain
            self._source = grain.sources.ArrayRecordDataSource(str(self.path))
        return self._source

    def __len__(self) -> int:
        return int(self.meta["records"])

    def __getitem__(self, i: int) -> dict:
        return json.loads(self._open()[int(i)])

    def __getstate__(self):
        return {"path": self.path, "meta": self.meta, "_source": None}


def write_records(records: Iterable[dict], out: Path, fmt: str, source: str, progress: bool = True,
                  meta: dict | None = None) -> int:
    """Write ``records`` to ``out`` (via a temporary file renamed at the end: an interrupted build leaves no
    dataset that looks complete); returns the count. ``meta``: extra keys for the ``.json`` beside it, read once
    the records are consumed (so a streaming converter can fill in what it saw, e.g. which fields every record
    has)."""
    from array_record.python import array_record_module
    from tqdm import tqdm

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
    count = 0
    try:
        for record in tqdm(records, desc=f"preparing {fmt} records", unit=" rec", mininterval=2.0,
                           disable=None if progress else True):   # None: shown on a terminal only
            writer.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode())
            count += 1
    finally:
        writer.close()
    if not count:
        tmp.unlink(missing_ok=True)
        raise ValueError(f"{source}: no usable {fmt} examples")
    os.replace(tmp, out)
    meta = {**(meta or {}), "format": fmt, "version": VERSION, "records": count, "source": str(source)}
    meta_path(out).write_text(json.dumps(meta, indent=1) + "\n")
    return count


def stream_converted(path: Path, convert: Callable[[object, str], dict | None]) -> Iterator[dict]:
    """``convert(raw record, where)`` over a JSON array / JSONL file streamed record by record; None skips."""
    for line, raw in iter_json_records(path):
        record = convert(raw, f"{path}:{line}")
        if record is not None:
            yield record


def file_key(path: str | Path) -> str:
    """A file's identity for a cache key: its resolved path, size and modification time."""
    path = Path(path)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def cache_name(path: Path, fmt: str, options: str = "") -> str:
    """``options``: whatever else the records depend on (other files' :func:`file_key`, settings)."""
    key = f"{file_key(path)}|{fmt}|{VERSION}" + (f"|{options}" if options else "")
    return f"{path.name}.{hashlib.sha1(key.encode()).hexdigest()[:12]}{SUFFIX}"


def prepared_records(path: str | Path, fmt: str | tuple[str, ...],
                     convert: Callable[[object, str], dict | None] | None, cache_dir: str | Path, what: str, *,
                     stream: Callable[[Path, dict], Iterable[dict]] | None = None, options: str = "",
                     meta: dict | None = None) -> RecordFile:
    """The prepared dataset of ``path``: itself when it is one, else its conversion in ``cache_dir`` (built
    here the first time, with a log line). ``fmt``: the format written (a prepared file may be any of a tuple's;
    the first is written). Records come from ``convert`` per JSON record, or from ``stream(path, meta)`` for
    sources that are not JSON records or need other files (``meta``: extra keys it fills in for the ``.json``);
    ``options`` names what else they depend on, so a change converts again; ``meta``: the conversion's own
    settings saved in the ``.json`` (e.g. how many negatives a record keeps)."""
    path = resolve_data_path(path)
    if is_prepared(path):
        return RecordFile(path, fmt)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    written = fmt if isinstance(fmt, str) else fmt[0]
    out = Path(cache_dir) / cache_name(path, written, options)
    if not (out.is_file() and meta_path(out).is_file()):
        log.info("%s: converting to a random-access dataset %s (once; `rdr-jax prepare-data` builds it ahead)",
                 path, out)
        info: dict = dict(meta or {})
        records = stream(path, info) if stream is not None else stream_converted(path, convert)
        write_records(records, out, written, str(path), meta=info)
    return RecordFile(out, fmt)


__all__ = ["RecordFile", "write_records", "stream_converted", "prepared_records", "is_prepared", "file_key", "SUFFIX"]

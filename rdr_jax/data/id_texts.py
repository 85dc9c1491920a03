"""Texts of an ``id<TAB>text`` TSV (MS MARCO's collection.tsv) looked up by id through each line's byte offset,
so converting training data that names passages by id holds 8-16 bytes per passage instead of its text.

Why offsets: resolving the texts of 39M MS MARCO triples (or of teacher lists) needs any of the 8.8M passages;
holding them all as Python strings costs several GB, a dict of ids to offsets ~1 GB, and integer ids (MS
MARCO's) a table indexed by id, 8 bytes per id value (~70 MB). A lookup is one seek plus one line read; the
file is the operating system's page cache.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import numpy as np

from rdr_jax.errors import ConfigError, FormatError


class TextsById:
    """``texts[id]`` -> the text of the row with that id (one pass over ``path`` to index it). ``option`` names
    the config key or flag that gave the file, for errors."""

    def __init__(self, path: str | os.PathLike, option: str):
        from tqdm import tqdm

        self.path, self.option = Path(path), option
        if self.path.suffix == ".gz":
            raise ConfigError(f"{option} {self.path}: give the uncompressed file (passages are read by byte offset)")
        int_ids, offsets, by_name = array("q"), array("q"), None
        position = 0
        with open(self.path, "rb") as handle, tqdm(desc=f"indexing {self.path.name}", unit=" rows", mininterval=2.0,
                                                   delay=2.0) as bar:
            for raw in handle:
                tab = raw.find(b"\t")
                key = raw[:tab].strip() if tab > 0 else b""
                if key:
                    if by_name is None and key.isdigit() and (key[:1] != b"0" or key == b"0"):
                        int_ids.append(int(key))
                        offsets.append(position)
                    else:   # an id that is not an integer: index every row by its id string instead
                        if by_name is None:
                            by_name = {str(i): o for i, o in zip(int_ids, offsets)}
                        name = key.decode("utf-8")
                        if name in by_name:
                            raise FormatError(self.path, None, f"duplicate id {name!r:.80}")
                        by_name[name] = position
                    bar.update(1)
                position += len(raw)
        self._by_name, self._handle = by_name, None
        if by_name is None:
            ids, starts = np.frombuffer(int_ids, np.int64), np.frombuffer(offsets, np.int64)
            self._table = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
            self._table[ids] = starts
            if len(ids) and np.count_nonzero(self._table >= 0) != len(ids):
                dup = int(np.flatnonzero(np.bincount(ids) > 1)[0])
                raise FormatError(self.path, None, f"duplicate id {str(dup)!r}")

    def _offset(self, key: str) -> int:
        if self._by_name is not None:
            return self._by_name.get(key, -1)
        canonical = key.isdigit() and (key[:1] != "0" or key == "0")   # "07" is not the row of id 7
        return int(self._table[int(key)]) if canonical and int(key) < len(self._table) else -1

    def __getitem__(self, key) -> str:
        key = str(key).strip()
        offset = self._offset(key)
        if offset < 0:
            raise KeyError(key)
        if self._handle is None:
            self._handle = open(self.path, "rb")
        self._handle.seek(offset)
        fields = self._handle.readline().decode("utf-8").rstrip("\r\n").split("\t")
        if len(fields) != 2:
            raise FormatError(self.path, None, f"the row of id {key!r:.80} has {len(fields)} tab-separated fields, "
                                               "expected 2 (id, text)")
        return fields[1]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def get(self, key, where: str) -> str:
        """``self[key]``, or a one-line error naming ``where`` the id came from."""
        try:
            return self[key]
        except KeyError:
            raise ValueError(f"{where}: id {str(key)!r:.80} is not in {self.option} {self.path}") from None


__all__ = ["TextsById"]

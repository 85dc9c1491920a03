"""Locating and reading whole data files named in a config: the embedded data's ``rdr_jax/...`` paths, JSON
lists and JSONL, and streaming id lookups in large TSVs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from rdr_jax.data import readers
from rdr_jax.errors import ConfigError, FormatError


def resolve_data_path(path: str | Path) -> Path:
    """A data file path; ``rdr_jax/...`` paths (the embedded data in configs) also resolve against the
    installed package, so the tiny configs run from any directory."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_absolute() and path.parts and path.parts[0] == "rdr_jax":
        candidate = Path(__file__).resolve().parents[2] / path
        if candidate.exists():
            return candidate
    return path


def require_file(value: str | Path | None, key: str, why: str = "") -> Path:
    """The existing file named by config key ``key``; a ConfigError naming the key when it is unset or missing."""
    if not value:
        raise ConfigError(f"'{key}' must be set" + (f": {why}" if why else ""))
    path = resolve_data_path(value)
    if not path.is_file():
        raise ConfigError(f"'{key}': {path}: file not found")
    return path


def read_json_records(path: str | Path, what: str) -> list[dict]:
    """A whole JSON list (``.json``) or JSON-lines (``.jsonl``) file of examples, for files small enough to hold."""
    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples")
    return data


def iter_json_records(path: Path) -> Iterator[tuple[int, object]]:
    """(line, record) of a JSONL file or of a JSON array streamed record by record (never read whole)."""
    if readers._base_suffix(path) == ".jsonl":
        yield from readers.iter_jsonl(path)
    else:
        yield from readers.iter_json_array(path)


def select_by_id(rows: Iterable[dict], wanted: set[str], what: str, source) -> dict:
    """Stream ``rows`` (dicts with "id") once, keeping only the wanted ids; errors name the missing ones."""
    from tqdm import tqdm

    found = {}
    # updated by hand: tqdm's iterator counts a row only once the next one is asked for, so breaking out
    # after the last wanted row showed "59 rows" for 60
    with tqdm(desc=f"reading {what}", unit=" rows", mininterval=2.0) as bar:
        for row in rows:
            bar.update(1)
            if row["id"] in wanted:
                found[row["id"]] = row
                if len(found) == len(wanted):
                    break
    missing = sorted(wanted - set(found))
    if missing:
        raise ValueError(f"{source}: {len(missing)} {what} of the run are missing (e.g. {missing[:3]})")
    return found


__all__ = ["resolve_data_path", "require_file", "read_json_records", "iter_json_records", "select_by_id",
           "FormatError"]

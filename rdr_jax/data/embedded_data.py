"""Readers for DPR's file layouts, and the small QA set shipped in rdr_jax/data/embedded/.

The embedded set (built by scripts/build_embedded_data.py from pycountry's ISO data; see its
README.md) uses DPR's layouts, so the same readers work on DPR's own downloads:

- passages: `id<TAB>text<TAB>title` with a header line (psgs_w100.tsv),
- questions: `question<TAB>["answer", ...]` without a header (nq-test.qa.csv; the answer list is
  a JSON or Python list literal),
- bi-encoder training data: a JSON list of {"question", "answers", "positive_ctxs",
  "negative_ctxs", "hard_negative_ctxs"} (biencoder-nq-train.json).

The parsing is rdr_jax.data.readers' (malformed rows raise FormatError naming the file and line).
"""

from __future__ import annotations

from pathlib import Path

from rdr_jax.data import readers

QA_SPLITS = ("train", "dev", "test")
BIENCODER_SPLITS = ("train", "dev")


class EmbeddedDataError(ValueError):
    """A shipped data file is missing, or a split does not exist."""


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


def load_passages() -> list[dict]:
    """{"id", "title", "text"} per passage, in file order."""
    return list(readers.read_dpr_passages(_embedded_file("passages.tsv")))


def load_qas(split: str) -> list[dict]:
    """{"question", "answers"} per question."""
    _check_split(split, QA_SPLITS)
    return list(readers.read_qa(_embedded_file(f"{split}.qa.csv")))


def load_biencoder(split: str) -> list[dict]:
    """DPR bi-encoder training entries (question, answers, positive/negative/hard-negative ctxs)."""
    _check_split(split, BIENCODER_SPLITS)
    return list(readers.read_dpr_training(_embedded_file(f"{split}.biencoder.json")))

"""TFDS builders for the files retrieval users have: one feature schema and one reader per kind.

    build("dpr_passages", {"train": "psgs_w100.tsv"}, data_dir)
    build("dpr_training", {"train": "biencoder-nq-train.json.gz", "dev": "biencoder-nq-dev.json"}, data_dir)

writes DATA_DIR/NAME/1.0.0 (NAME defaults to the kind) and returns that directory; read it back
with `rdr_jax.data.tfds_format.load(path, split)` or `tfds.data_source(NAME, data_dir=DATA_DIR)`.

Ids (passage, query) are stored as text everywhere: DPR ids look like "123" or "wiki:123", MS MARCO
ids are integers; text keeps both exact. A dataset's row number is its random-access index.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from rdr_jax.data import readers
from rdr_jax.data.tfds_format import DEFAULT_VERSION, DatasetWriter

Text = tfds.features.Text
ListOf = tfds.features.Sequence


def _passage_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"id": Text(), "title": Text(), "text": Text()})


def _qa_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"question": Text(), "answers": ListOf(Text())})


def _dpr_training_features() -> tfds.features.FeaturesDict:
    context = {"title": Text(), "text": Text(), "passage_id": Text()}
    return tfds.features.FeaturesDict({
        "question": Text(),
        "answers": ListOf(Text()),
        **{key: ListOf(dict(context)) for key in readers.DPR_CONTEXT_LISTS},
    })


def _retriever_results_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "question": Text(),
        "answers": ListOf(Text()),
        "ctxs": ListOf({
            "id": Text(), "title": Text(), "text": Text(),
            "score": tfds.features.Scalar(np.float32),
            "has_answer": tfds.features.Scalar(np.bool_),
        }),
    })


def _queries_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"id": Text(), "text": Text()})


def _qrels_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"qid": Text(), "pid": Text(), "relevance": tfds.features.Scalar(np.int32)})


def _triples_text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"query": Text(), "positive": Text(), "negative": Text()})


def _triples_ids_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"qid": Text(), "positive_pid": Text(), "negative_pid": Text()})


def _teacher_scores_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({
        "qid": Text(),
        "pids": ListOf(Text()),
        "scores": tfds.features.Tensor(shape=(None,), dtype=np.float32),
    })


@dataclasses.dataclass(frozen=True)
class BuilderSpec:
    """How to turn one kind of raw file into a TFDS dataset."""

    features: Callable[[], tfds.features.FeaturesDict]
    reader: Callable[..., Iterator[dict]]
    description: str


BUILDERS: dict[str, BuilderSpec] = {
    "dpr_passages": BuilderSpec(_passage_features, readers.read_dpr_passages,
                                "DPR passages (id, title, text) from a psgs_w100-style TSV."),
    "qa": BuilderSpec(_qa_features, readers.read_qa,
                      "Open-domain QA pairs (question, answers) from DPR's CSV/TSV or JSONL."),
    "dpr_training": BuilderSpec(_dpr_training_features, readers.read_dpr_training,
                                "DPR bi-encoder training data (question, answers, positive/negative/"
                                "hard-negative contexts)."),
    "retriever_results": BuilderSpec(_retriever_results_features, readers.read_retriever_results,
                                     "DPR retriever results (question, answers, ranked ctxs with scores "
                                     "and has_answer)."),
    "msmarco_collection": BuilderSpec(_passage_features, readers.read_msmarco_collection,
                                      "MS MARCO passages in the passages schema (id, title='', text)."),
    "msmarco_queries": BuilderSpec(_queries_features, readers.read_msmarco_queries,
                                   "MS MARCO queries (id, text)."),
    "qrels": BuilderSpec(_qrels_features, readers.read_qrels,
                         "Relevance judgements (qid, pid, relevance)."),
    "msmarco_triples": BuilderSpec(_triples_text_features,
                                   functools.partial(readers.read_msmarco_triples, form="text"),
                                   "MS MARCO training triples as text (query, positive, negative)."),
    "msmarco_triples_ids": BuilderSpec(_triples_ids_features,
                                       functools.partial(readers.read_msmarco_triples, form="ids"),
                                       "MS MARCO training triples as ids (qid, positive_pid, negative_pid)."),
    "teacher_scores": BuilderSpec(_teacher_scores_features, readers.read_teacher_scores,
                                  "Teacher-scored candidate lists (qid, pids, scores)."),
}


def _as_paths(value: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(item) for item in value]


def resolve_kind(kind: str, files: Mapping[str, object]) -> str:
    """`msmarco_triples` files hold either text or ids; the first file's first row decides."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(sorted(BUILDERS))}")
    if kind == "msmarco_triples":
        first_file = _as_paths(next(iter(files.values())))[0]
        if readers.detect_triples_form(first_file) == "ids":
            return "msmarco_triples_ids"
    return kind


def build(
    kind: str,
    files: Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]],
    data_dir: str | os.PathLike,
    *,
    name: str | None = None,
    version: str = DEFAULT_VERSION,
    overwrite: bool = False,
    progress: bool = True,
    **writer_options,
) -> Path:
    """Builds a TFDS dataset of `kind` from raw `files` (split name -> file or list of files,
    read in order); returns DATA_DIR/NAME/VERSION. Inputs are streamed; the dataset appears only
    once complete."""
    if not files:
        raise ValueError("no input files given (expected a mapping split -> file)")
    split_paths = {split: _as_paths(paths) for split, paths in files.items()}
    for split, paths in split_paths.items():
        if not paths:
            raise ValueError(f"split {split!r}: no input files")
        for path in paths:
            if not path.is_file():
                raise FileNotFoundError(f"split {split!r}: input file not found: {path}")
    kind = resolve_kind(kind, files)
    spec = BUILDERS[kind]
    sources = "; ".join(f"{split}: {', '.join(map(str, paths))}" for split, paths in split_paths.items())
    with DatasetWriter(data_dir, name or kind, spec.features(), version=version,
                       description=f"{spec.description} Built by rdr_jax from {sources}.",
                       overwrite=overwrite, progress=progress, **writer_options) as writer:
        for split, paths in split_paths.items():
            writer.write_split(split, itertools.chain.from_iterable(spec.reader(path) for path in paths))
    return writer.path

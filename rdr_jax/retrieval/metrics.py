"""The papers' evaluation metrics, TREC run/qrels I/O, and result tables.

Open-domain QA (DPR, RDR): top-k answer recall from ranked `has_answer` lists and reader exact
match, both in percentages as the papers' tables report them.

Passage ranking (MS MARCO, TREC DL, BEIR): MRR@k, nDCG@k and Recall@k computed as trec_eval does,
so the numbers agree with trec_eval / pytrec_eval / ir-measures:

- A query's documents are ranked by score descending, ties broken by docid descending (trec_eval
  sorts on (score, docno) both descending); the rank column of a run file is ignored.
- A document is relevant when its qrels grade is > 0 (trec_eval's default relevance_level 1 on
  integer grades); unjudged documents count as non-relevant.
- nDCG@k: gain = the grade itself (linear, trec_eval's ndcg_cut), discount log2(rank + 1); the
  ideal DCG is built from that query's positive grades in the qrels.
- Averaging: over every query in the qrels, as `trec_eval -c` and ir-measures do. A query in the
  qrels but absent from the run scores 0; a query whose judgments are all non-relevant scores 0
  (trec_eval keeps it in the mean); a query in the run but not in the qrels is ignored.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from rdr_jax.data.readers import iter_qrels
from rdr_jax.errors import FormatError
from rdr_jax.retrieval.answers import exact_match_score

DEFAULT_TOP_K = (1, 5, 20, 50, 100)

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


# ---------------------------------------------------------------- open-domain QA


def first_hit_ranks(hits: Sequence[Sequence[bool]]) -> np.ndarray:
    """0-based rank of each question's first answer-bearing passage; -1 when there is none."""
    ranks = np.full(len(hits), -1, dtype=np.int64)
    for q, question_hits in enumerate(hits):
        hit_positions = np.flatnonzero(np.asarray(question_hits, dtype=bool))
        if hit_positions.size:
            ranks[q] = hit_positions[0]
    return ranks


def top_k_answer_recall(
    hits: Sequence[Sequence[bool]],
    ks: Iterable[int] = DEFAULT_TOP_K,
    decimals: int | None = 2,
) -> dict[str, float]:
    """Percentage of questions with an answer among their first k passages, for each k.

    `hits[q]` lists `has_answer` for question q's passages, best first. A question with fewer than
    k passages counts what it has. Returns {"1": 45.87, "5": ...} (rounded to `decimals`).
    """
    return answer_recall_from_ranks(first_hit_ranks(hits), ks, decimals)


def answer_recall_from_ranks(ranks: np.ndarray, ks: Iterable[int] = DEFAULT_TOP_K,
                             decimals: int | None = 2) -> dict[str, float]:
    """:func:`top_k_answer_recall` from each question's first answer rank (0-based, -1: none), the form a
    streamed results file is reduced to."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("top_k_answer_recall: no questions to evaluate")
    ks = list(ks)
    for k in ks:
        if int(k) != k or k < 1:
            raise ValueError(f"top_k_answer_recall: k must be a positive integer, got {k!r}")
    found = ranks >= 0
    result = {}
    for k in ks:
        value = 100.0 * float(np.mean(found & (ranks < k)))
        result[str(int(k))] = round(value, decimals) if decimals is not None else value
    return result


def reader_exact_match(
    predictions: Sequence[str],
    answers_per_question: Sequence[Sequence[str]],
    decimals: int | None = 2,
) -> float:
    """Reader EM in percent: share of predictions matching one of their question's answers."""
    if len(predictions) != len(answers_per_question):
        raise ValueError(
            f"reader_exact_match: {len(predictions)} predictions for "
            f"{len(answers_per_question)} questions"
        )
    if not predictions:
        raise ValueError("reader_exact_match: no questions to evaluate")
    matches = [exact_match_score(p, a) for p, a in zip(predictions, answers_per_question)]
    value = 100.0 * sum(matches) / len(matches)
    return round(value, decimals) if decimals is not None else value


# ---------------------------------------------------------------- passage ranking


def rank_documents(scores: Mapping[str, float]) -> list[str]:
    """Docids best first, in trec_eval's order: score descending, then docid descending."""
    return [docid for docid, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)]


def reciprocal_rank(ranking: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    for rank, docid in enumerate(ranking[:k], start=1):
        if judgments.get(docid, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg(ranking: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    gains = [judgments.get(docid, 0) for docid in ranking[:k]]
    dcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1) if g > 0)
    ideal = sorted((g for g in judgments.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg > 0 else 0.0


def recall(ranking: Sequence[str], judgments: Mapping[str, int], k: int) -> float:
    num_relevant = sum(1 for g in judgments.values() if g > 0)
    if num_relevant == 0:
        return 0.0
    return sum(1 for docid in ranking[:k] if judgments.get(docid, 0) > 0) / num_relevant


_MEASURES = {"mrr": reciprocal_rank, "rr": reciprocal_rank, "ndcg": ndcg, "r": recall, "recall": recall}
_MEASURE_NAME = re.compile(r"^(?P<name>[A-Za-z]+)@(?P<k>[0-9]+)$")


def _parse_measure(measure: str):
    match = _MEASURE_NAME.match(measure)
    if match is None or match["name"].lower() not in _MEASURES or int(match["k"]) < 1:
        raise ValueError(
            f"unknown measure {measure!r}: expected MRR@k, nDCG@k or R@k (Recall@k), k >= 1"
        )
    return _MEASURES[match["name"].lower()], int(match["k"])


def evaluate_run(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    measures: Sequence[str] = ("MRR@10", "nDCG@10", "R@100"),
    as_percent: bool = True,
    per_query: bool = False,
):
    """Mean of each measure over the queries of `qrels` (see the module notes for conventions).

    `qrels[qid][docid] = grade`, `run[qid][docid] = score` (pytrec_eval's layout). Returns
    {measure: mean}, in percent by default as the papers report them (fractions with
    `as_percent=False`); with `per_query=True` also {qid: {measure: value}} as a second value.
    """
    if not qrels:
        raise ValueError("evaluate_run: the qrels hold no queries")
    parsed = [(measure, *_parse_measure(measure)) for measure in measures]
    scale = 100.0 if as_percent else 1.0
    per_query_values: dict[str, dict[str, float]] = {}
    for qid, judgments in qrels.items():
        ranking = rank_documents(run.get(qid, {}))
        per_query_values[qid] = {name: scale * fn(ranking, judgments, k) for name, fn, k in parsed}
    means = {
        name: float(np.mean([values[name] for values in per_query_values.values()]))
        for name, _, _ in parsed
    }
    return (means, per_query_values) if per_query else means


# ---------------------------------------------------------------- TREC files


def _rows(path: str | os.PathLike):
    from rdr_jax.data.readers import open_text  # bytes that are not UTF-8: FILE:LINE errors

    with open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            fields = line.split()
            if fields:
                yield line_number, fields


def read_trec_run(path: str | os.PathLike) -> Run:
    """Read a TREC run file (`qid Q0 docid rank score tag` per line) into {qid: {docid: score}}."""
    run: Run = {}
    for line_number, fields in _rows(path):
        where = f"{os.fspath(path)}, line {line_number}"
        if len(fields) != 6:
            raise ValueError(
                f"{where}: expected 6 columns 'qid Q0 docid rank score tag', got {len(fields)}"
            )
        qid, _, docid, _, score, _ = fields
        try:
            value = float(score)
        except ValueError:
            raise ValueError(f"{where}: score {score!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{where}: score {score!r} is not finite")
        scores = run.setdefault(qid, {})
        if docid in scores:
            raise ValueError(f"{where}: document {docid!r} appears twice for query {qid!r}")
        scores[docid] = value
    return run


def read_qrels(path: str | os.PathLike) -> Qrels:
    """Read a TREC qrels file (`qid iteration docid relevance` per line) into {qid: {docid: rel}}."""
    qrels: Qrels = {}
    for line, row in iter_qrels(path, form="trec"):
        judgments = qrels.setdefault(row["qid"], {})
        if row["pid"] in judgments:
            raise FormatError(path, line, f"document {row['pid']!r} is judged twice for query {row['qid']!r}")
        judgments[row["pid"]] = row["relevance"]
    return qrels


def _atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write through a temporary file and rename, so an interrupted write never leaves half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _check_field(value: str, what: str) -> None:
    if not value or any(ch.isspace() for ch in value):
        raise ValueError(f"{what} {value!r} must be non-empty and contain no white space")


def format_trec_run(run: Mapping[str, Mapping[str, float]], tag: str = "rdr_jax", depth: int | None = None) -> str:
    _check_field(tag, "run tag")
    lines = []
    for qid, scores in run.items():
        _check_field(qid, "query id")
        for rank, docid in enumerate(rank_documents(scores)[:depth], start=1):
            _check_field(docid, f"docid of query {qid!r}")
            lines.append(f"{qid} Q0 {docid} {rank} {float(scores[docid])!r} {tag}\n")
    return "".join(lines)


def write_trec_run(
    path: str | os.PathLike,
    run: Mapping[str, Mapping[str, float]],
    tag: str = "rdr_jax",
    depth: int | None = None,
) -> None:
    """Write `run` as a TREC run file, each query ranked in trec_eval's order (top `depth`)."""
    _atomic_write_text(path, format_trec_run(run, tag, depth))


def write_qrels(path: str | os.PathLike, qrels: Mapping[str, Mapping[str, int]]) -> None:
    lines = []
    for qid, judgments in qrels.items():
        _check_field(qid, "query id")
        for docid, grade in judgments.items():
            _check_field(docid, f"docid of query {qid!r}")
            lines.append(f"{qid} 0 {docid} {int(grade)}\n")
    _atomic_write_text(path, "".join(lines))


# ---------------------------------------------------------------- result tables


def _column_title(key: str) -> str:
    return f"Top-{key}" if key.isdigit() else key


def format_results_table(
    results: Mapping[str, Mapping[str, float]], decimals: int = 2, row_title: str = ""
) -> str:
    """Plain-text table, one row per entry of `results` ({row: {column: value}}), columns aligned.

    Digit keys (top-k recall) are titled "Top-k"; other keys are used as they are. A value missing
    from a row shows as "-".
    """
    columns: list[str] = []
    for values in results.values():
        columns.extend(key for key in values if key not in columns)
    header = [row_title] + [_column_title(c) for c in columns]
    body = [
        [str(row)] + [f"{values[c]:.{decimals}f}" if c in values else "-" for c in columns]
        for row, values in results.items()
    ]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join([render(header), rule] + [render(line) for line in body]) + "\n"


def write_results_json(
    path: str | os.PathLike, results: Mapping[str, Mapping[str, float]], decimals: int | None = 2
) -> None:
    """Write {row: {column: value}} as JSON in the seed tables' layout, e.g.
    {"before": {"1": 45.87, "5": ..., "20": ...}, "after": {...}}; written atomically."""
    document = {
        str(row): {
            str(key): (round(float(value), decimals) if decimals is not None else float(value))
            for key, value in values.items()
        }
        for row, values in results.items()
    }
    _atomic_write_text(path, json.dumps(document, indent=2) + "\n")

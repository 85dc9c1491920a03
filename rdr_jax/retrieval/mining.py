"""Hard negatives mined with the model's own index (DPR's "adversarial" hard negatives, DPR-adv-hn).

For each training question, the passages the trained retriever ranks highest are candidates; a candidate is
dropped when it contains an answer (``has_answer``, the same matcher as evaluation: a passage with the answer
is not a negative, whatever the gold passage is) or is a gold positive (same passage id, or the same text when
the positive has no id). The first ``negatives`` survivors, in rank order, become the question's
``hard_negative_ctxs``; the output is DPR's training JSON again, so round 2 trains on it unchanged.

The output is written item by item to ``OUT.tmp`` and renamed when complete: a stopped run leaves no
half-written training file under the final name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from rdr_jax.retrieval.answers import AnswerMatcher, default_tokenizer


@dataclass
class MiningStats:
    """What a mining run kept and dropped, summed over the questions."""

    questions: int = 0
    kept: int = 0                 # mined hard negatives written
    without_negatives: int = 0    # questions left with no mined negative
    short: int = 0                # questions with fewer mined negatives than asked
    dropped_answer: int = 0       # candidates dropped because they contain an answer
    dropped_gold: int = 0         # candidates dropped because they are a gold positive
    wanted: int = 0
    per_question: list[int] = field(default_factory=list)

    @property
    def mean_kept(self) -> float:
        return self.kept / self.questions if self.questions else 0.0

    def summary(self) -> str:
        return (f"{self.questions} questions, {self.mean_kept:.2f} mined hard negatives per question on average "
                f"(asked {self.wanted}); {self.short} with fewer than asked, {self.without_negatives} with none; "
                f"candidates dropped: {self.dropped_answer} containing an answer, {self.dropped_gold} gold")


def _gold_keys(example: dict) -> tuple[set[str], set[str]]:
    """(passage ids, texts) of the gold positives; a positive without an id is recognised by its text."""
    ids = {str(c["passage_id"]) for c in example.get("positive_ctxs", []) if c.get("passage_id")}
    texts = {c["text"] for c in example.get("positive_ctxs", []) if not c.get("passage_id")}
    return ids, texts


def mine_example(example: dict, candidates: Iterable[dict], *, negatives: int, match_type: str = "string",
                 keep_original: bool = False, stats: MiningStats | None = None, tokenizer=None) -> dict:
    """``example`` (a DPR training record) with ``hard_negative_ctxs`` replaced by the first ``negatives``
    of ``candidates`` (``{id, title, text, score?}``, best first) that hold no answer and are not gold.
    ``keep_original`` appends the example's own hard negatives after the mined ones (ids not repeated)."""
    stats = stats if stats is not None else MiningStats()
    matcher = AnswerMatcher(example.get("answers", []), match_type, tokenizer or default_tokenizer())
    gold_ids, gold_texts = _gold_keys(example)
    mined: list[dict] = []
    for passage in candidates:
        if len(mined) >= negatives:
            break  # the rest is not read: matching is the costly part on the host
        pid = str(passage["id"])
        if pid in gold_ids or passage["text"] in gold_texts:
            stats.dropped_gold += 1
            continue
        if matcher(passage["text"]):
            stats.dropped_answer += 1
            continue
        ctx = {"title": passage.get("title", ""), "text": passage["text"], "passage_id": pid}
        if "score" in passage:
            ctx["score"] = float(passage["score"])
        mined.append(ctx)
    hard = list(mined)
    if keep_original:
        seen = {c["passage_id"] for c in mined}
        hard += [c for c in example.get("hard_negative_ctxs", []) if not c.get("passage_id")
                 or str(c["passage_id"]) not in seen]
    stats.questions += 1
    stats.wanted = negatives
    stats.kept += len(mined)
    stats.per_question.append(len(mined))
    stats.short += len(mined) < negatives
    stats.without_negatives += not mined
    return {"question": example["question"], "answers": list(example.get("answers", [])),
            "positive_ctxs": list(example.get("positive_ctxs", [])),
            "negative_ctxs": list(example.get("negative_ctxs", [])), "hard_negative_ctxs": hard}


def ranked_passages(batches: Iterable[tuple[np.ndarray, np.ndarray]], passage: Callable[[int], dict]
                    ) -> Iterator[Iterator[dict]]:
    """Per question, its retrieved passages best first, read lazily by corpus row (``passage(row)`` ->
    ``{id, title, text}``) so that mining reads only the candidates it looks at."""
    def one(scores, rows):
        for s, r in zip(scores, rows):
            if r >= 0:
                yield {**passage(int(r)), "score": float(s)}

    for scores, rows in batches:
        for s, r in zip(scores, rows):
            yield one(s, r)


def write_training_json(records: Iterable[dict], out: str | os.PathLike) -> int:
    """DPR training JSON (an array, one example per line), streamed to ``OUT.tmp`` and renamed when complete;
    the number of examples written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    n, ok = 0, False
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("[\n")
            for record in records:
                f.write(("" if n == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
                n += 1
            f.write("\n]\n")
        ok = True
    finally:
        if ok:
            os.replace(tmp, out)
        else:
            tmp.unlink(missing_ok=True)
    return n


def mine_negatives(examples: Iterable[dict], batches: Iterable[tuple[np.ndarray, np.ndarray]],
                   passage: Callable[[int], dict], out: str | os.PathLike, *, negatives: int,
                   match_type: str = "string", keep_original: bool = False) -> MiningStats:
    """Mine every example's hard negatives from its search results (``batches`` of ``(scores, rows)`` for the
    examples in order) and write the new training file; the counts."""
    if negatives < 0:
        raise ValueError(f"negatives must be >= 0, got {negatives}")
    stats, tokenizer = MiningStats(), default_tokenizer()
    ranked = ranked_passages(batches, passage)

    def records():
        for i, example in enumerate(examples):
            candidates = next(ranked, None)
            if candidates is None:
                raise ValueError(f"search results end at question {i}: fewer results than training examples")
            yield mine_example(example, candidates, negatives=negatives, match_type=match_type,
                               keep_original=keep_original, stats=stats, tokenizer=tokenizer)
        if next(ranked, None) is not None:
            raise ValueError(f"more search results than the {stats.questions} training examples")

    write_training_json(records(), out)
    return stats

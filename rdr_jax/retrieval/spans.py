"""DPR reader span selection: from reader logits to ranked answer strings.

Reader input rows are `[CLS] question [SEP] title [SEP] passage` (no trailing [SEP]), padded on the
right. For one question with M passages this module:

1. orders the passages by relevance logit, best first (ties: lower passage index first);
2. in each passage, scores every span (i, j) of the passage segment (after the second [SEP], before
   padding) with j - i + 1 <= max_answer_length as start[i] + end[j];
3. walks the spans by score (ties: enumeration order, start then length, as Python's stable sort in
   DPR and transformers) and keeps the best ones that neither contain nor are contained in a span
   already kept, up to `num_spans_per_passage`;
4. extends each kept span to whole words (a span starting on a '##' piece moves left to the word
   start, one ending before a '##' piece moves right) and decodes it;
5. stops after the passage in which `num_spans` answers have been collected.

The span logic is DPR's `get_best_spans` (dpr/data/reader_data.py): the score of an extended span
stays that of the span before extension, and the nesting test of later spans is against the
extended span, as there.

Where transformers' `DPRReaderTokenizer(Fast).decode_best_spans` differs (so the two agree only
when these do not come into play):
- it never extends word pieces to whole words;
- its passage offset is `input_ids.index(sep, 2) + 1`, which for any non-empty question is the
  position after the *first* [SEP], so its spans may lie in the title and on the second [SEP]; here
  spans are always inside the passage text;
- its `max_answer_length` defaults to 64 (DPR and this module: 10);
- it decodes with special tokens kept, where DPR (and this module) skip them, which only matters
  for an [UNK] inside the passage.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from tqdm.auto import tqdm


class SpanPrediction(NamedTuple):
    text: str
    span_score: float  # start_logit[start] + end_logit[end] of the span before word extension
    relevance_score: float  # the passage's relevance logit
    passage_index: int  # row of the question's passages
    start_index: int  # inclusive, position in that row's input_ids (after word extension)
    end_index: int  # inclusive


def _subword_table(tokenizer) -> np.ndarray:
    """Boolean lookup id -> is a WordPiece continuation ('##' piece), as DPR's is_sub_word_id."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return np.array(
        [tok is not None and (tok.startswith("##") or tok.startswith(" ##")) for tok in tokens],
        dtype=bool,
    )


def best_spans_in_passage(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    max_answer_length: int,
    top_spans: int,
    is_subword: np.ndarray | None = None,
) -> list[tuple[int, int, float]]:
    """Best non-nested spans of one passage segment, as (start, end, score), best first.

    `start_logits`/`end_logits` cover the passage segment only; indices are relative to it.
    `is_subword[t]` marks '##' pieces of the segment; when given, kept spans are extended to whole
    words (DPR). Without it this is transformers' `_get_best_spans`.
    """
    length = len(start_logits)
    if length == 0 or top_spans <= 0:
        return []
    start = np.asarray(start_logits, dtype=np.float64)
    end = np.asarray(end_logits, dtype=np.float64)
    width = min(max_answer_length, length)
    # scores[i, d] is the span (i, i + d); row-major flattening is DPR's enumeration order.
    starts = np.arange(length)[:, None]
    ends = starts + np.arange(width)[None, :]
    valid = ends < length
    scores = start[:, None] + end[np.minimum(ends, length - 1)]
    flat_starts, flat_ends, flat_scores = starts.repeat(width, 1)[valid], ends[valid], scores[valid]
    order = np.argsort(-flat_scores, kind="stable")

    chosen: list[tuple[int, int]] = []
    spans: list[tuple[int, int, float]] = []
    for index in order:
        s, e = int(flat_starts[index]), int(flat_ends[index])
        if any(s <= cs <= ce <= e or cs <= s <= e <= ce for cs, ce in chosen):
            continue
        if is_subword is not None:
            while s > 0 and is_subword[s]:
                s -= 1
            while e < length - 1 and is_subword[e + 1]:
                e += 1
        chosen.append((s, e))
        spans.append((s, e, float(flat_scores[index])))
        if len(chosen) == top_spans:
            break
    return spans


class ReaderSpanSelector:
    """Turns DPR reader outputs into ranked answer spans; build once per tokenizer.

    `tokenizer` is the reader's WordPiece tokenizer (transformers' BertTokenizer(Fast) or
    DPRReaderTokenizer(Fast)): its [SEP] and [PAD] ids locate the passage segment, its vocabulary
    tells '##' pieces, and it decodes the answers.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_answer_length: int = 10,
        num_spans: int = 16,
        num_spans_per_passage: int = 4,
        extend_word_pieces: bool = True,
    ) -> None:
        for name, value in (
            ("max_answer_length", max_answer_length),
            ("num_spans", num_spans),
            ("num_spans_per_passage", num_spans_per_passage),
        ):
            if int(value) != value or value < 1:
                raise ValueError(f"ReaderSpanSelector: {name} must be a positive integer, got {value!r}")
        if tokenizer.sep_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("ReaderSpanSelector: the tokenizer needs a sep_token_id and a pad_token_id")
        self.tokenizer = tokenizer
        self.max_answer_length = int(max_answer_length)
        self.num_spans = int(num_spans)
        self.num_spans_per_passage = int(num_spans_per_passage)
        self.extend_word_pieces = extend_word_pieces
        self.sep_token_id = tokenizer.sep_token_id
        self.pad_token_id = tokenizer.pad_token_id
        self._is_subword = _subword_table(tokenizer)

    def passage_segment(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> tuple[int, int]:
        """[begin, end) of the passage text in one reader input row.

        Begins after the second [SEP]; ends at the padding (the attention mask's length when given,
        else the first [PAD] after the passage start) or at a trailing [SEP] if the row has one.
        """
        ids = np.asarray(input_ids)
        seps = np.flatnonzero(ids == self.sep_token_id)
        if seps.size < 2:
            raise ValueError(
                "reader input row has fewer than two [SEP] tokens; expected "
                "'[CLS] question [SEP] title [SEP] passage'"
            )
        begin = int(seps[1]) + 1
        if attention_mask is not None:
            end = int(np.asarray(attention_mask).astype(bool).sum())
        else:
            pads = np.flatnonzero(ids[begin:] == self.pad_token_id)
            end = begin + int(pads[0]) if pads.size else len(ids)
        if seps.size > 2 and begin <= seps[2] < end:
            end = int(seps[2])
        return begin, max(begin, end)

    def select(
        self,
        input_ids: Any,
        start_logits: Any,
        end_logits: Any,
        relevance_logits: Any,
        attention_mask: Any | None = None,
        passage_mask: Any | None = None,
    ) -> list[SpanPrediction]:
        """Ranked spans for one question: arrays [M, L] (ids, logits, mask) and [M] (relevance).

        `passage_mask[m] = False` marks a padding passage, which is skipped (DPR skips the empty
        passages that fill a question's M slots).
        """
        input_ids = np.asarray(input_ids)
        start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
        relevance_logits = np.asarray(relevance_logits)
        if input_ids.ndim != 2 or start_logits.shape != input_ids.shape or end_logits.shape != input_ids.shape:
            raise ValueError(
                f"input_ids, start_logits and end_logits must all be [passages, length]; got "
                f"{input_ids.shape}, {start_logits.shape}, {end_logits.shape}"
            )
        if relevance_logits.shape != input_ids.shape[:1]:
            raise ValueError(
                f"relevance_logits must be [passages] = {input_ids.shape[:1]}, got {relevance_logits.shape}"
            )
        if attention_mask is not None:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must be {input_ids.shape}, got {attention_mask.shape}")
        if passage_mask is not None and np.shape(passage_mask) != relevance_logits.shape:
            raise ValueError(f"passage_mask must be {relevance_logits.shape}, got {np.shape(passage_mask)}")
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= len(self._is_subword)):
            raise ValueError(f"input_ids outside the tokenizer's vocabulary of {len(self._is_subword)}")

        predictions: list[SpanPrediction] = []
        for passage in np.argsort(-relevance_logits.astype(np.float64), kind="stable"):
            passage = int(passage)
            if passage_mask is not None and not passage_mask[passage]:
                continue
            ids = input_ids[passage]
            try:
                begin, end = self.passage_segment(ids, None if attention_mask is None else attention_mask[passage])
            except ValueError as error:
                raise ValueError(f"passage {passage}: {error}") from None
            segment_ids = ids[begin:end]
            spans = best_spans_in_passage(
                start_logits[passage, begin:end],
                end_logits[passage, begin:end],
                self.max_answer_length,
                self.num_spans_per_passage,
                self._is_subword[segment_ids] if self.extend_word_pieces else None,
            )
            for s, e, score in spans:
                text = self.tokenizer.decode(segment_ids[s : e + 1].tolist(), skip_special_tokens=True)
                predictions.append(
                    SpanPrediction(
                        text=text,
                        span_score=score,
                        relevance_score=float(relevance_logits[passage]),
                        passage_index=passage,
                        start_index=begin + s,
                        end_index=begin + e,
                    )
                )
            if len(predictions) >= self.num_spans:
                break
        return predictions[: self.num_spans]

    def select_batch(
        self,
        input_ids: Any,
        start_logits: Any,
        end_logits: Any,
        relevance_logits: Any,
        attention_mask: Any | None = None,
        passage_mask: Any | None = None,
        progress: bool = False,
    ) -> list[list[SpanPrediction]]:
        """`select` for each question of a batch: arrays [Q, M, L] and [Q, M]."""
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 3:
            raise ValueError(f"input_ids must be [questions, passages, length], got {input_ids.shape}")
        start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
        relevance_logits = np.asarray(relevance_logits)
        if start_logits.ndim != 3 or end_logits.ndim != 3 or relevance_logits.ndim != 2:
            raise ValueError(
                "start_logits and end_logits must be [questions, passages, length] and "
                f"relevance_logits [questions, passages]; got {start_logits.shape}, "
                f"{end_logits.shape}, {relevance_logits.shape}"
            )
        results = []
        for q in tqdm(range(input_ids.shape[0]), desc="selecting spans", disable=not progress):
            try:
                results.append(
                    self.select(
                        input_ids[q],
                        start_logits[q],
                        end_logits[q],
                        relevance_logits[q],
                        None if attention_mask is None else np.asarray(attention_mask)[q],
                        None if passage_mask is None else np.asarray(passage_mask)[q],
                    )
                )
            except ValueError as error:
                raise ValueError(f"question {q}: {error}") from None
        return results

"""DPR's exact model inputs from transformers' fast tokenizers, padded to static shapes for jit.

- question encoder: ``[CLS] question [SEP]``
- context encoder:  ``[CLS] title [SEP] text [SEP]`` (DPR's BertTensorizer with a title)
- reader:           ``[CLS] question [SEP] title [SEP] text`` with no trailing [SEP] (transformers'
  DPRReaderTokenizer), truncated to ``max_length``.

Token types are all zero, as DPR's training code feeds them (``segments = zeros_like(ids)``) and as
DPRReaderTokenizer returns them.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import numpy as np

from rdr_jax.convert.hf_io import VOCABULARY_FILES, has_tokenizer_files


# A tokenizer this much smaller than the model's embedding table is not the model's tokenizer. Models pad
# vocab_size up (T5: 32100 tokens for 32128 rows, DeBERTa-v3: 128001 for 128100), never by half.
MIN_VOCABULARY_FRACTION = 0.5


def load_tokenizer(model_dir: str | os.PathLike, *, tokenizer_dir: str | os.PathLike | None = None):
    """The fast tokenizer saved with a checkpoint (tokenizer.json / vocab.txt ...); never downloads.

    Refuses (ValueError naming the directory) a directory without tokenizer vocabulary files, and a tokenizer
    whose vocabulary is far smaller than the ``vocab_size`` of the model's config.json: transformers would
    otherwise build a tokenizer of a handful of special tokens and map every word to [UNK]. The tokenizer is
    read from ``tokenizer_dir`` when given (checked against ``model_dir``'s config.json).
    """
    import json

    from transformers import AutoTokenizer

    from rdr_jax.convert.hf_io import resolve_model_dir

    model_dir = resolve_model_dir(model_dir)  # a directory, or a hub name in the local cache
    source = resolve_model_dir(tokenizer_dir) if tokenizer_dir is not None else model_dir
    if not has_tokenizer_files(source):
        raise ValueError(f"{source}: no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); save the model "
                         "with save_pretrained(dir, tokenizer=...) or copy its base model's tokenizer files there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{source}: cannot load the tokenizer: {message}") from None
    config = model_dir / "config.json"
    vocab_size = None
    if config.is_file():
        try:
            vocab_size = json.loads(config.read_text()).get("vocab_size")
        except (json.JSONDecodeError, AttributeError):
            vocab_size = None
    if isinstance(vocab_size, int) and len(tokenizer) < MIN_VOCABULARY_FRACTION * vocab_size:
        raise ValueError(f"{source}: the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{vocab_size}; it is not this model's tokenizer (its vocabulary files are missing or "
                         "incomplete)")
    return tokenizer


def _to_arrays(input_ids: list[list[int]], pad_id: int, length: int) -> dict[str, np.ndarray]:
    ids = np.full((len(input_ids), length), pad_id, np.int32)
    mask = np.zeros((len(input_ids), length), np.int32)
    for row, seq in enumerate(input_ids):
        seq = seq[:length]
        ids[row, :len(seq)] = seq
        mask[row, :len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


# Padded lengths a batch is rounded up to: few compiled shapes, little padding for short inputs.
DEFAULT_BUCKETS = (32, 64, 128, 256)


def bucket_length(lengths: Sequence[int], buckets: Sequence[int]) -> int:
    """The smallest bucket that holds the longest sequence (the largest bucket truncates)."""
    longest = max(lengths, default=1)
    for b in sorted(buckets):
        if longest <= b:
            return b
    return max(buckets)


def encode_questions(tokenizer, questions: Sequence[str], max_length: int,
                     buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``[CLS] question [SEP]`` rows padded to ``max_length`` (or the smallest fitting bucket)."""
    ids = tokenizer(list(questions), truncation=True, max_length=max_length)["input_ids"]
    length = bucket_length([len(x) for x in ids], buckets) if buckets else max_length
    return _to_arrays(ids, tokenizer.pad_token_id, length)


def encode_passages(tokenizer, titles: Sequence[str] | None, texts: Sequence[str], max_length: int,
                    buckets: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """``[CLS] title [SEP] text [SEP]`` rows (``[CLS] text [SEP]`` without titles); truncation keeps the
    final [SEP] as DPR does."""
    texts = list(texts)
    if titles is None:
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    else:
        ids = tokenizer(list(titles), texts, truncation="only_second", max_length=max_length)["input_ids"]
    length = bucket_length([len(x) for x in ids], buckets) if buckets else max_length
    return _to_arrays(ids, tokenizer.pad_token_id, length)


def encode_reader_inputs(tokenizer, question: str | Sequence[str], titles: Sequence[str], texts: Sequence[str],
                         max_length: int) -> dict[str, np.ndarray]:
    """Reader inputs exactly as transformers' DPRReaderTokenizer builds them, one row per passage; ``question``
    is one question for all rows or one per row. Also ``passage_start`` [rows]: the index of the first text
    token (spans start there)."""
    questions = [question] * len(titles) if isinstance(question, str) else list(question)
    if len(questions) != len(titles) or len(titles) != len(texts):
        raise ValueError(f"reader inputs: {len(questions)} questions, {len(titles)} titles and {len(texts)} texts "
                         "must pair up")
    question_and_titles = tokenizer(questions, list(titles))["input_ids"]
    text_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    ids = [(qt + t)[:max_length] for qt, t in zip(question_and_titles, text_ids)]
    out = _to_arrays(ids, tokenizer.pad_token_id, max_length)
    out["passage_start"] = np.array([min(len(qt), max_length) for qt in question_and_titles], np.int32)
    return out


def passage_text(passage: str | Mapping) -> str:
    """A passage as a cross-encoder reads it: ``title text`` when there is a title (DPR corpora), else the
    text (MS MARCO)."""
    if isinstance(passage, str):
        return passage
    title, text = passage.get("title", "") or "", passage["text"]
    return f"{title} {text}" if title.strip() else text

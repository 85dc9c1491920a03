"""Inputs and targets of generative retrievers (T5/BART): tokenizers (a pretrained one, or a small one built from
the data for a random model), identifier token sequences (EOS-terminated, exactly the trie's), padding."""

from __future__ import annotations

import string
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from rdr_jax.data.files import resolve_data_path
from rdr_jax.data.readers import read_dpr_passages
from rdr_jax.errors import ConfigError


def build_word_tokenizer(texts: Iterable[str], family: str, max_words: int = 4000):
    """A small tokenizer for random models trained from scratch on the given texts (offline stand-in for the
    pretrained SentencePiece/BPE vocabularies).

    T5: a unigram (SentencePiece-style) vocabulary of the ``max_words`` most frequent alphabetic words plus every
    single character seen, so digits (atomic ids, codes) split into single-character tokens and any text is
    covered. BART: byte-level BPE without merges (one token per byte).
    """
    import transformers  # heavy: only when a random model needs a tokenizer

    texts = list(texts)
    if family == "bart":
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
        for ch in bytes_to_unicode().values():
            vocab.setdefault(ch, len(vocab))
        return transformers.BartTokenizer(vocab=vocab, merges=[])
    words = Counter(w for t in texts for w in t.split() if w.isalpha())
    chars = sorted((set("".join(texts)) | set(string.printable)) - set(string.whitespace))
    # Whole words score higher than their spelling, so the unigram model prefers them.
    vocab = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
             + [("\u2581" + w, -5.0) for w, _ in words.most_common(max_words)]
             + [(c, -10.0) for c in chars])
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0)


def load_seq2seq_tokenizer(path: str):
    from transformers import AutoTokenizer  # heavy: only when a generative task loads its tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}); set 'model.tokenizer'") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{path}: the tokenizer has no EOS token; generative identifiers need one")
    return tokenizer


def tokenize_identifiers(tokenizer, strings: Sequence[str]) -> list[list[int]]:
    """Token ids of identifier strings, EOS-terminated: the same rule as ``PassageIdentifiers.build``, so the
    training targets are exactly the trie's sequences."""
    eos = tokenizer.eos_token_id
    out = []
    for start in range(0, len(strings), 10_000):
        for ids in tokenizer(list(strings[start:start + 10_000]))["input_ids"]:
            ids = list(ids)
            if not ids or ids[-1] != eos:
                ids.append(eos)
            out.append(ids)
    return out


def read_passages(path) -> list[dict]:
    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: passages file ('data.passages_file') not found")
    return list(read_dpr_passages(path))


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad_id: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"{what} {i} has {len(row)} tokens, more than the {length} allowed "
                             f"('data.max_identifier_length'); a cut identifier would not be in the trie")
        ids[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return ids, mask


def encode_inputs(tokenizer, texts: Sequence[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(list(texts), max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

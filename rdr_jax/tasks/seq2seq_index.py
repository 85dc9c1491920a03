"""DSI-style training of a generative retriever (T5 / BART), and the pieces the generative tasks share.

A generative retriever maps a question to the identifier of a passage (an atomic id, a title, a semantic code;
see :mod:`rdr_jax.decoding.identifiers`). DSI (Tay et al., 2022) trains it on two kinds of example, mixed in
every batch:

- indexing:  passage text (``title text``)  -> the passage's identifier
- retrieval: question                       -> the identifier of its gold passage

with the teacher-forced cross-entropy of the identifier tokens (EOS included), averaged over the tokens of the
batch (transformers' ``labels`` loss). ``data.indexing_ratio`` is the share of indexing examples in a batch.

Batch (``B`` examples)::

    input_ids, attention_mask   [B, Ls]   passage text or question
    target_ids, target_mask     [B, Lt]   identifier tokens + EOS, padded
    is_query                    [B]       1 = retrieval example, 0 = indexing example (for the split metrics)

Data: the passages TSV (DPR layout ``id<TAB>text<TAB>title``) and DPR's bi-encoder training JSON whose
positive contexts carry ``passage_id`` (the embedded data does). Identifiers: ``data.identifiers_file`` (a
``passage_id<TAB>identifier`` TSV, :func:`~rdr_jax.decoding.identifiers.read_identifier_tsv`), else built
from the passages by ``data.identifier_kind`` (``atomic`` or ``title``) and written to
``WORKDIR/identifiers.tsv``. The export (``WORKDIR/final/retriever/``) holds the model, its tokenizer and
``identifiers.tsv``: what ``rdr-jax generate`` needs.

Shared with :mod:`rdr_jax.tasks.dgr`: the model/tokenizer set-up (``model.path`` or a tiny random model from
``model.init`` with a word-level tokenizer built from the data, since no pretrained T5/BART tokenizer is
available offline), identifier tokenisation, and the teacher-forced scoring functions
:func:`identifier_token_log_probs` and :func:`passage_scores`.
"""

from __future__ import annotations

import logging
import string
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rdr_jax.decoding.identifiers import atomic_identifiers, read_identifier_tsv, title_identifiers
from rdr_jax.models.seq2seq import Seq2SeqLM, shift_right
from rdr_jax.tasks.base import ModelBundle, register_task, resolve_path
from rdr_jax.tasks.batches import DevBatches, EpochIterator, FileDataTask
from rdr_jax.tasks.dpr import (model_runtime_kwargs, read_json_records, resolve_data_path,
                               save_random_model)
from rdr_jax.training.config import REQUIRED, ConfigError

log = logging.getLogger(__name__)

# The trained submodule's name (and the export directory WORKDIR/final/retriever/).
RETRIEVER = "retriever"
IDENTIFIERS_TSV = "identifiers.tsv"

GENERATOR_MODEL_DEFAULTS = {
    "path": None,        # HF dir of a T5ForConditionalGeneration / BartForConditionalGeneration (t5-base, bart-large,
                         # or a trained base retriever); its tokenizer is read from the same directory
    "family": "t5",      # with model.init: t5 | bart
    "tokenizer": None,   # a tokenizer directory (default: model.path, or one built from the data for model.init)
    "init": None,        # without model.path: a T5/BART config dict; a random model is built in WORKDIR/init/
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": False,
}

IDENTIFIER_DATA_DEFAULTS = {
    "passages_file": None,      # DPR passages TSV (id, text, title)
    "identifiers_file": None,   # passage_id<TAB>identifier TSV; else built from passages_file by identifier_kind
    "identifier_kind": "atomic",  # atomic | title
    "max_identifier_length": 0,   # target tokens (EOS included); 0 = the longest identifier in the data
}

FAMILIES = ("t5", "bart")
IDENTIFIER_KINDS = ("atomic", "title")


# ---- tokenizer and model set-up --------------------------------------------------------------------------------
def build_word_tokenizer(texts: Iterable[str], family: str, max_words: int = 4000):
    """A small tokenizer for random models trained from scratch on the given texts (offline stand-in for the
    pretrained SentencePiece/BPE vocabularies).

    T5: a unigram (SentencePiece-style) vocabulary of the ``max_words`` most frequent alphabetic words plus every
    single character seen, so digits (atomic ids, codes) split into single-character tokens and any text is
    covered. BART: byte-level BPE without merges (one token per byte).
    """
    import transformers

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
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ConfigError(f"{path}: cannot load a tokenizer ({type(e).__name__}: {e}); set 'model.tokenizer'") from None
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"{path}: the tokenizer has no EOS token; generative identifiers need one")
    return tokenizer


def build_random_generator(init: dict, family: str, out_dir: Path, seed: int, tokenizer) -> Path:
    """A random T5/BART from ``model.init`` saved (with its tokenizer) as an HF directory, once: a resumed run
    reuses it. Token ids come from the tokenizer; the vocabulary is rounded up to a multiple of 128 (as t5's
    32128) so it splits evenly over tensor-parallel devices."""
    from rdr_jax.models import BartForConditionalGeneration, T5ForConditionalGeneration

    if (out_dir / "config.json").is_file():
        return out_dir
    init = dict(init)
    init.setdefault("vocab_size", -(-len(tokenizer) // 128) * 128)
    if init["vocab_size"] < len(tokenizer):
        raise ConfigError(f"'model.init.vocab_size' {init['vocab_size']} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens")
    init.setdefault("pad_token_id", tokenizer.pad_token_id)
    init.setdefault("eos_token_id", tokenizer.eos_token_id)
    if family == "t5":
        init.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
        cls = T5ForConditionalGeneration
    else:
        init.setdefault("bos_token_id", tokenizer.bos_token_id)
        init.setdefault("decoder_start_token_id", tokenizer.eos_token_id)
        init.setdefault("forced_eos_token_id", tokenizer.eos_token_id)
        cls = BartForConditionalGeneration
    save_random_model(cls, init, out_dir, seed)
    tokenizer.save_pretrained(out_dir)
    log.info("built a random %s from model.init in %s", family, out_dir)
    return out_dir


# ---- identifiers -----------------------------------------------------------------------------------------------
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
    from rdr_jax.data.readers import read_dpr_passages

    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: passages file ('data.passages_file') not found")
    return list(read_dpr_passages(path))


def identifier_mapping(data_cfg, passages: list[dict] | None) -> dict[str, str]:
    """{passage_id: identifier string} from ``data.identifiers_file`` or, failing that, built from the passages
    by ``data.identifier_kind``."""
    if data_cfg.identifiers_file:
        path = resolve_data_path(data_cfg.identifiers_file)
        if not path.is_file():
            raise ConfigError(f"{path}: identifiers file ('data.identifiers_file') not found")
        return read_identifier_tsv(path)
    if passages is None:
        raise ConfigError("set 'data.identifiers_file' (passage_id<TAB>identifier) or 'data.passages_file' "
                          "(identifiers are then built by 'data.identifier_kind')")
    if data_cfg.identifier_kind == "atomic":
        return atomic_identifiers(p["id"] for p in passages)
    return title_identifiers([p["id"] for p in passages], [p["title"] for p in passages])


def write_identifier_tsv(mapping: dict[str, str], path: Path) -> Path:
    import os

    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for pid, identifier in mapping.items():
            f.write(f"{pid}\t{identifier}\n")
    os.replace(tmp, path)
    return path


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


# ---- teacher-forced scoring ------------------------------------------------------------------------------------
def identifier_token_log_probs(model, encoder_hidden, encoder_mask, target_ids, target_mask, *, rngs=None,
                               deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """Per-token log-probabilities ``[N, Lt]`` of ``target_ids`` given the encoder output (0 where
    ``target_mask`` is 0), and whether each target token is the model's argmax ``[N, Lt]`` (bool).

    The same computation as :func:`rdr_jax.models.seq2seq.sequence_log_probs` (decoder inputs = targets shifted
    right behind the start token, float32 log-softmax), starting from an encoder output.
    """
    mask = jnp.asarray(target_mask).astype(bool)
    targets = jnp.where(mask, jnp.asarray(target_ids), model.pad_token_id)
    decoder_input_ids = shift_right(targets, model.decoder_start_token_id, model.pad_token_id)
    logits, _ = model.decode(decoder_input_ids, encoder_hidden, encoder_mask, rngs=rngs, deterministic=deterministic)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets) & mask
    return jnp.where(mask, token, 0.0), correct


def passage_scores(model, input_ids, attention_mask, target_ids, target_mask, *, rngs=None,
                   deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
    """s(p|q): the summed log-probability of each candidate's identifier given its question (teacher forced).

    ``input_ids``/``attention_mask`` ``[B, Ls]`` (one row per question), ``target_ids``/``target_mask``
    ``[B*K, Lt]`` (question ``i``'s K candidates at rows ``i*K .. i*K+K-1``). Each question is encoded once and
    its encoder output broadcast over its K candidates (K times less encoder work than repeating the question;
    the candidates of a question are also scored against the same encoder dropout mask, so their scores compare
    like with like). Returns ``(scores [B, K], token_log_probs [B, K, Lt])``.
    """
    b = input_ids.shape[0]
    k = target_ids.shape[0] // b
    if k * b != target_ids.shape[0]:
        raise ValueError(f"{target_ids.shape[0]} target rows are not a multiple of the {b} questions")
    hidden = model.encode(input_ids, attention_mask, rngs=rngs, deterministic=deterministic)
    hidden = jnp.repeat(hidden, k, axis=0)
    mask = jnp.repeat(jnp.asarray(attention_mask), k, axis=0)
    token, _ = identifier_token_log_probs(model, hidden, mask, target_ids, target_mask, rngs=rngs,
                                          deterministic=deterministic)
    return token.sum(-1).reshape(b, k), token.reshape(b, k, -1)


# ---- the shared task base --------------------------------------------------------------------------------------
class GenerativeTask(FileDataTask):
    """Model, tokenizer and identifiers of a generative retriever (one trained submodule, ``retriever``)."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._paths: tuple[str, str] | None = None
        self._tokenizer = None
        self._passages: list[dict] | None = None

    @classmethod
    def validate_generator_config(cls, c):
        m, d = c["model"], c["data"]
        if m["family"] not in FAMILIES:
            raise ConfigError(f"'model.family' must be one of {', '.join(FAMILIES)}, got {m['family']!r}")
        if not (m["path"] or m["init"]):
            raise ConfigError("set 'model.path' (a T5/BART directory) or 'model.init' (a config dict for a random model)")
        if d["identifier_kind"] not in IDENTIFIER_KINDS:
            raise ConfigError(f"'data.identifier_kind' must be one of {', '.join(IDENTIFIER_KINDS)}, "
                              f"got {d['identifier_kind']!r}")
        if d["max_identifier_length"] < 0:
            raise ConfigError(f"'data.max_identifier_length' must be >= 0, got {d['max_identifier_length']!r}")

    def tokenizer_texts(self) -> list[str]:
        """Texts a tokenizer for a random model is built from (only used with model.init)."""
        return [t for p in (self.passages or []) for t in (p["title"], p["text"])]

    @property
    def passages(self) -> list[dict] | None:
        if self._passages is None and self.config.data.passages_file:
            self._passages = read_passages(self.config.data.passages_file)
        return self._passages

    def paths(self) -> tuple[str, str]:
        """(model directory, tokenizer directory)."""
        if self._paths is None:
            m = self.config.model
            if m.path:
                model_dir = resolve_path(m.path)
            else:
                out = self.workdir / "init" / m.family
                if m.tokenizer:
                    tokenizer = load_seq2seq_tokenizer(resolve_path(m.tokenizer))
                elif (out / "config.json").is_file():
                    tokenizer = None
                else:
                    tokenizer = build_word_tokenizer(self.tokenizer_texts(), m.family)
                model_dir = str(out if tokenizer is None else
                                build_random_generator(dict(m.get("init")), m.family, out, self.config.train.seed, tokenizer))
            self._paths = (model_dir, resolve_path(m.tokenizer) or model_dir)
        return self._paths

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_seq2seq_tokenizer(self.paths()[1])
        return self._tokenizer

    def build_model(self) -> ModelBundle:
        from rdr_jax.models import from_pretrained

        model_dir = self.paths()[0]
        model = from_pretrained(model_dir, **model_runtime_kwargs(self.config.model))
        if not isinstance(model, Seq2SeqLM):
            raise ConfigError(f"'model.path' {model_dir}: is a {type(model).__name__}, not a T5/BART "
                              "conditional-generation model")
        if len(self.tokenizer) > model.config.vocab_size:
            raise ConfigError(f"{model_dir}: the tokenizer has {len(self.tokenizer)} tokens, more than the model's "
                              f"vocabulary of {model.config.vocab_size}")
        return ModelBundle(**{RETRIEVER: model})

    def trainable_submodules(self):
        return (RETRIEVER,)

    def identifiers_tsv(self) -> Path | None:
        """The identifiers the run trained on, as a TSV (written once into the workdir when built here)."""
        d = self.config.data
        if d.identifiers_file:
            return resolve_data_path(d.identifiers_file)
        if not d.passages_file:
            return None
        path = self.workdir / IDENTIFIERS_TSV
        if not path.is_file():
            self.workdir.mkdir(parents=True, exist_ok=True)
            write_identifier_tsv(identifier_mapping(d, self.passages), path)
        return path

    def export(self, model: ModelBundle, out_dir) -> list[Path]:
        """``out_dir/retriever/``: the model (HF format), its tokenizer and ``identifiers.tsv``."""
        import shutil

        target = Path(out_dir) / RETRIEVER
        written = getattr(model, RETRIEVER).save_pretrained(target)
        self.tokenizer.save_pretrained(target)
        tsv = self.identifiers_tsv()
        if tsv is not None and tsv.is_file():
            shutil.copyfile(tsv, target / IDENTIFIERS_TSV)
        return [written]


def sequence_cross_entropy(token_log_probs: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over the unmasked target tokens (0 when there are none)."""
    mask = mask.astype(jnp.float32)
    return -jnp.sum(token_log_probs * mask) / jnp.maximum(jnp.sum(mask), 1.0)


# ---- DSI data --------------------------------------------------------------------------------------------------
class IndexingData:
    """Indexing (passage -> identifier) and retrieval (question -> gold identifier) examples."""

    def __init__(self, passages: list[dict], train_file: str | None, mapping: dict[str, str], tokenizer, *,
                 max_input_length: int, max_identifier_length: int, index_with_title: bool):
        self.tokenizer, self.length = tokenizer, max_input_length
        self.index_texts, index_ids = [], []
        for p in passages:
            if p["id"] in mapping:
                title = p["title"].strip()
                self.index_texts.append(f"{title} {p['text']}" if index_with_title and title else p["text"])
                index_ids.append(mapping[p["id"]])
        self.questions, query_ids = [], []
        if train_file:
            skipped = 0
            for i, r in enumerate(read_json_records(train_file, "seq2seq_index training data")):
                if not isinstance(r, dict) or "question" not in r:
                    raise ValueError(f"{train_file}: example {i} has no 'question' field")
                gold = [c.get("passage_id") for c in r.get("positive_ctxs") or []]
                gold = [str(g) for g in gold if g is not None and str(g) in mapping]
                if not gold:
                    skipped += 1
                    continue
                self.questions.append(r["question"])
                query_ids.append(mapping[gold[0]])
            if skipped:
                log.info("%s: %d questions without a positive passage_id among the identifiers were skipped",
                         train_file, skipped)
        strings = list(dict.fromkeys(index_ids + query_ids))
        tokens = dict(zip(strings, tokenize_identifiers(tokenizer, strings)))
        self.index_targets = [tokens[s] for s in index_ids]
        self.query_targets = [tokens[s] for s in query_ids]
        longest = max(len(t) for t in tokens.values()) if tokens else 1
        self.target_length = max_identifier_length or longest

    def make_batch(self, index_idx: np.ndarray, query_idx: np.ndarray) -> dict[str, np.ndarray]:
        texts = [self.index_texts[int(i)] for i in index_idx] + [self.questions[int(i)] for i in query_idx]
        targets = [self.index_targets[int(i)] for i in index_idx] + [self.query_targets[int(i)] for i in query_idx]
        ids, mask = encode_inputs(self.tokenizer, texts, self.length)
        t_ids, t_mask = pad_rows(targets, self.target_length, self.tokenizer.pad_token_id, "identifier")
        is_query = np.concatenate([np.zeros(len(index_idx), np.int32), np.ones(len(query_idx), np.int32)])
        return {"input_ids": ids, "attention_mask": mask, "target_ids": t_ids, "target_mask": t_mask,
                "is_query": is_query}


class MixedIterator:
    """Batches of ``n_index`` indexing + ``n_query`` retrieval examples, each kind drawn from its own
    per-epoch permutation; the state of both streams makes resuming exact."""

    def __init__(self, data: IndexingData, n_index: int, n_query: int, seed: int, shuffle: bool):
        take = lambda idx, rng: idx
        self.data = data
        self.index = EpochIterator(len(data.index_texts), n_index, seed, take, shuffle) if n_index else None
        self.query = EpochIterator(len(data.questions), n_query, seed + 7919, take, shuffle) if n_query else None

    def __iter__(self):
        return self

    def __next__(self):
        empty = np.zeros((0,), np.int64)
        return self.data.make_batch(next(self.index) if self.index else empty,
                                    next(self.query) if self.query else empty)

    def get_state(self) -> dict:
        return {"index": self.index.get_state() if self.index else None,
                "query": self.query.get_state() if self.query else None}

    def set_state(self, state: dict) -> None:
        for name in ("index", "query"):
            if getattr(self, name) is not None and state.get(name) is not None:
                getattr(self, name).set_state(state[name])


class _QueryDevSet:
    """Dev questions -> gold identifiers, for DevBatches."""

    def __init__(self, data: IndexingData):
        self.data = data

    def __len__(self):
        return len(self.data.questions)

    def make_batch(self, idx, rng=None):
        return self.data.make_batch(np.zeros((0,), np.int64), idx)


@register_task
class Seq2SeqIndexTask(GenerativeTask):
    name = "seq2seq_index"
    question_field = "input_ids"

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED},
            "model": dict(GENERATOR_MODEL_DEFAULTS),
            "data": {**IDENTIFIER_DATA_DEFAULTS, "passages_file": REQUIRED, "train_file": None, "dev_file": None,
                     "indexing_ratio": 0.5, "max_input_length": 128, "index_with_title": True, "shuffle": True},
        }

    @classmethod
    def validate_config(cls, c):
        cls.validate_generator_config(c)
        d = c["data"]
        if not 0.0 <= d["indexing_ratio"] <= 1.0:
            raise ConfigError(f"'data.indexing_ratio' must be in [0, 1], got {d['indexing_ratio']!r}")
        if d["indexing_ratio"] < 1.0 and not d["train_file"]:
            raise ConfigError("'data.indexing_ratio' < 1 needs 'data.train_file' (questions with positive "
                              "passage ids) for the retrieval examples")
        if d["max_input_length"] < 4:
            raise ConfigError(f"'data.max_input_length' must be >= 4, got {d['max_input_length']!r}")

    def tokenizer_texts(self):
        texts = super().tokenizer_texts()
        if self.config.data.train_file:
            texts += [r.get("question", "") for r in read_json_records(self.config.data.train_file, "training data")]
        return texts

    def _data(self, questions_file) -> IndexingData:
        d = self.config.data
        mapping = identifier_mapping(d, self.passages)
        self.identifiers_tsv()
        return IndexingData(self.passages, questions_file, mapping, self.tokenizer,
                            max_input_length=d.max_input_length, max_identifier_length=d.max_identifier_length,
                            index_with_title=d.index_with_title)

    def split(self, batch_size: int) -> tuple[int, int]:
        n_index = int(round(batch_size * self.config.data.indexing_ratio))
        return n_index, batch_size - n_index

    def train_iterator(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        n_index, n_query = self.split(batch_size)
        data = self._data(self.config.data.train_file if n_query else None)
        if not data.index_texts:
            raise ValueError(f"{self.config.data.passages_file}: no passage has an identifier")
        if n_query and not data.questions:
            raise ValueError(f"{self.config.data.train_file}: no question has a positive passage with an identifier")
        return MixedIterator(data, n_index, n_query, seed, self.config.data.shuffle)

    def dev_batches(self, batch_size):
        if not self.config.data.dev_file:
            return None
        return DevBatches(_QueryDevSet(self._data(self.config.data.dev_file)), batch_size)

    def loss(self, model, batch, *, rngs, deterministic):
        retriever = getattr(model, RETRIEVER)
        hidden = retriever.encode(batch["input_ids"], batch["attention_mask"], rngs=rngs, deterministic=deterministic)
        token, correct = identifier_token_log_probs(retriever, hidden, batch["attention_mask"], batch["target_ids"],
                                                    batch["target_mask"], rngs=rngs, deterministic=deterministic)
        mask = batch["target_mask"].astype(bool)
        query = batch["is_query"].astype(bool)[:, None] & mask
        index = ~batch["is_query"].astype(bool)[:, None] & mask
        loss = sequence_cross_entropy(token, mask)
        exact = jnp.all(correct | ~mask, axis=-1).astype(jnp.float32)   # every identifier token is the argmax
        return loss, {"query_loss": sequence_cross_entropy(token, query),
                      "index_loss": sequence_cross_entropy(token, index),
                      "token_accuracy": jnp.sum(correct) / jnp.maximum(jnp.sum(mask), 1),
                      "exact_match": jnp.mean(exact)}

    def batch_stats(self, batch):
        return {"examples": int(batch["input_ids"].shape[0]),
                "tokens": int(np.sum(batch["attention_mask"]) + np.sum(batch["target_mask"]))}


__all__ = ["Seq2SeqIndexTask", "GenerativeTask", "passage_scores", "identifier_token_log_probs",
           "tokenize_identifiers", "build_word_tokenizer", "sequence_cross_entropy"]

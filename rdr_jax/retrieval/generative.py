"""Run a generative retriever over questions: trie-constrained beam search -> identifiers -> ranked passages.

Each question is encoded and decoded with :meth:`~rdr_jax.models.seq2seq.Seq2SeqLM.constrained_beam_search`
over the prefix trie of the passage identifiers; each beam's identifier names one or more passages, which are
ranked by the beam's summed log-probability (:meth:`PassageIdentifiers.rank_passages`). Output: DPR's
retriever-results JSON (``question, answers, ctxs: [{id, title, text, score, has_answer}]``, via
:func:`rdr_jax.retrieval.retrieve.retrieval_results`) and optionally a TREC run. ``rdr-jax generate`` is the
command line (:mod:`rdr_jax.commands.generate`).

DGR's two-step distillation data flow (Li et al., 2024), on top of a trained base retriever
(e.g. ``task.name: seq2seq_index``):

1. Candidates: :func:`candidates_for_distillation` (``rdr-jax generate --gold train.biencoder.json``) runs
   the base retriever over the training questions and writes, per question, its own top-k passages with
   the gold positive(s) added when the beam missed them and marked ``is_positive`` (retriever-results
   JSON, plus ``is_positive`` and ``identifier`` on each ctx).
2. Teacher: ``rdr-jax rerank --model CROSS_ENCODER --results train.candidates.json --out
   train.teacher.json`` scores every candidate with the cross-encoder (``score`` becomes the teacher's).
   Re-ranking keeps only the standard ctx fields, so the DGR config names the gold positives again with
   ``data.gold_file: train.biencoder.json`` and trains on ``data.train_file: train.teacher.json``
   (see configs/dgr_nq.yaml).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from rdr_jax.decoding.identifiers import PassageIdentifiers, read_identifier_tsv
from rdr_jax.decoding.ngram_passages import CorpusNgrams
from rdr_jax.decoding.corpus_views import passage_views
from rdr_jax.decoding.substring_parts import DEFAULT_PART_POSITIONS, build_parts

IDENTIFIERS_TSV = "identifiers.tsv"


class GenerativeRetriever:
    """A seq2seq model, its tokenizer and the passage identifiers (whole identifiers in a trie, or every corpus
    n-gram: :class:`~rdr_jax.decoding.ngram_passages.CorpusNgrams`), searched in fixed-shape batches (the last
    batch is padded, so one compiled search serves every batch)."""

    def __init__(self, model, tokenizer, identifiers: PassageIdentifiers | CorpusNgrams, *, num_beams: int = 10,
                 max_length: int | None = None, batch_size: int = 16, max_question_length: int = 64):
        if num_beams < 1 or batch_size < 1 or max_question_length < 2:
            raise ValueError(f"num_beams ({num_beams}), batch_size ({batch_size}) must be >= 1 and "
                             f"max_question_length ({max_question_length}) >= 2")
        self.model, self.tokenizer, self.identifiers = model, tokenizer, identifiers
        self.num_beams, self.batch_size, self.max_question_length = num_beams, batch_size, max_question_length
        identifiers.check_vocabulary(model.config.vocab_size)
        self.max_length = max_length or identifiers.max_length
        self.device_trie = identifiers.constraint(model.config.vocab_size)

    def search(self, questions: Sequence[str], *, progress: bool = True) -> list[list[tuple[str, float]]]:
        """Ranked ``(passage_id, beam log-probability)`` lists, one per question."""
        ranked: list[list[tuple[str, float]]] = []
        bar = tqdm(total=len(questions), desc="generating", unit="q", disable=not progress)
        for start in range(0, len(questions), self.batch_size):
            chunk = list(questions[start:start + self.batch_size])
            padded = chunk + [chunk[-1]] * (self.batch_size - len(chunk))
            enc = self.tokenizer(padded, max_length=self.max_question_length, truncation=True,
                                 padding="max_length", return_tensors="np")
            sequences, scores = self.model.constrained_beam_search(
                enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32), self.device_trie,
                self.num_beams, self.max_length)
            ranked += self.identifiers.rank_passages(np.asarray(sequences), np.asarray(scores))[:len(chunk)]
            bar.update(len(chunk))
        bar.close()
        return ranked


def load_generative_retriever(model_dir: str | os.PathLike, identifiers: str | os.PathLike | None = None, *,
                              dtype: str = "float32", tokenizer_dir: str | os.PathLike | None = None,
                              ngram_index: str | os.PathLike | None = None, passages=None, ngram_top_k: int = 100,
                              max_ngram: int = 10, pseudo_queries: dict | None = None,
                              ngram_part_positions: int = DEFAULT_PART_POSITIONS, **kwargs) -> GenerativeRetriever:
    """A trained retriever directory (model + tokenizer, as the generative tasks export it); identifiers from
    the TSV given, else ``MODEL_DIR/identifiers.tsv``. With ``ngram_index`` (a directory) every corpus n-gram is
    an identifier: the index there is loaded, or built from ``passages`` (title and body views, plus
    ``pseudo_queries``: passage id -> queries) and saved there first."""

    from rdr_jax.convert.hf_io import resolve_model_dir
    from rdr_jax.data.tokenization import load_tokenizer
    from rdr_jax.models import from_pretrained
    from rdr_jax.models.config import dtype_from_name
    from rdr_jax.models.seq2seq import Seq2SeqLM

    model_dir = resolve_model_dir(model_dir)
    tokenizer = load_tokenizer(model_dir, tokenizer_dir=tokenizer_dir)
    model = from_pretrained(model_dir, dtype=dtype_from_name(dtype, "--dtype"),
                            allow_fresh_heads=False)
    if not isinstance(model, Seq2SeqLM):
        raise ValueError(f"--model {model_dir}: is a {type(model).__name__}, not a T5/BART generation model")
    if ngram_index is not None:
        ngrams = load_or_build_ngrams(ngram_index, tokenizer, passages, max_ngram=max_ngram,
                                      pseudo_queries=pseudo_queries, top_k=ngram_top_k,
                                      part_positions=ngram_part_positions)
        return GenerativeRetriever(model, tokenizer, ngrams, **kwargs)
    if identifiers is None:
        identifiers = Path(model_dir) / IDENTIFIERS_TSV
        if not identifiers.is_file():
            raise FileNotFoundError(f"{model_dir}: no {IDENTIFIERS_TSV}; pass the identifiers TSV (--identifiers)")
    identifiers = Path(identifiers)
    if not identifiers.is_file():
        raise FileNotFoundError(f"--identifiers {identifiers}: no such file")
    built = PassageIdentifiers.build(read_identifier_tsv(identifiers), tokenizer, progress=True)
    return GenerativeRetriever(model, tokenizer, built, **kwargs)


def load_or_build_ngrams(index_dir: str | os.PathLike, tokenizer, passages=None, *, max_ngram: int = 10,
                         pseudo_queries: dict | None = None, top_k: int = 100,
                         part_positions: int = DEFAULT_PART_POSITIONS) -> CorpusNgrams:
    """The corpus n-gram index in ``index_dir``, built there from ``passages`` (``{id, title, text}``) when the
    directory holds none yet (logged: at 21M passages this is the long step, done once), streamed into parts
    of at most ``part_positions`` token positions (:mod:`rdr_jax.decoding.substring_parts`); a stopped build
    rerun keeps the parts it finished."""
    import logging

    index_dir = Path(index_dir)
    if (index_dir / "meta.json").is_file():
        ngrams = CorpusNgrams.load(index_dir, top_k=top_k)
        if ngrams.index.vocab_size != len(tokenizer):
            raise ValueError(f"--ngram-index {index_dir}: built for a vocabulary of {ngrams.index.vocab_size} "
                             f"tokens, the model's tokenizer has {len(tokenizer)}")
        return ngrams
    if passages is None:
        raise ValueError(f"--ngram-index {index_dir}: no index there yet, and no passages to build it from")
    passages = list(passages.values()) if isinstance(passages, Mapping) else list(passages)
    logging.getLogger(__name__).info("building the n-gram index of %d passages into %s", len(passages), index_dir)
    ids = [p["id"] for p in passages]
    CorpusNgrams.save_passage_ids(index_dir, ids)   # before the parts: meta.json, written last, marks it complete
    views = passage_views(passages, tokenizer, pseudo_queries=pseudo_queries)
    index = build_parts(views, index_dir, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                        max_ngram=max_ngram, max_part_positions=part_positions)
    return CorpusNgrams(index, ids, top_k=top_k)


def _passages_of(ranked: Sequence[Sequence[tuple[str, float]]], passages: Iterable[dict] | Mapping[str, dict],
                 extra: Iterable[str] = ()) -> dict[str, dict]:
    from rdr_jax.retrieval.retrieve import lookup_passages

    wanted = {pid for row in ranked for pid, _ in row} | set(extra)
    if isinstance(passages, Mapping):
        missing = wanted - set(passages)
        if missing:
            raise ValueError(f"{len(missing)} generated passage ids are not in the passages (e.g. {sorted(missing)[:3]})")
        return {pid: passages[pid] for pid in wanted}
    try:
        return lookup_passages(passages, wanted)
    except ValueError as e:
        raise ValueError(f"{e} (the identifiers name passages of another corpus)") from None


def generate_results(retriever: GenerativeRetriever, questions: Sequence[dict],
                     passages: Iterable[dict] | Mapping[str, dict], *, match_type: str = "string",
                     progress: bool = True) -> list[dict]:
    """DPR retriever-results for ``questions`` (``{question, answers}``): ctxs in beam order with ``score`` =
    the beam's log-probability and ``has_answer``."""
    from rdr_jax.retrieval.retrieve import retrieval_results

    ranked = retriever.search([q["question"] for q in questions], progress=progress)
    found = _passages_of(ranked, passages)
    return retrieval_results(questions, [[s for _, s in row] for row in ranked], [[p for p, _ in row] for row in ranked],
                             found, match_type)


def results_to_run(results: Sequence[dict], qids: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    """``{qid: {passage_id: score}}`` for a TREC run; qids default to the question's position."""
    qids = qids or [str(i) for i in range(len(results))]
    return {qid: {c["id"]: c["score"] for c in r["ctxs"]} for qid, r in zip(qids, results)}


def candidates_for_distillation(retriever: GenerativeRetriever, examples: Sequence[dict],
                                passages: Iterable[dict] | Mapping[str, dict], *, k: int | None = None,
                                match_type: str = "string", progress: bool = True) -> list[dict]:
    """Step 1 of DGR's data flow: the retriever's own top-``k`` candidates for training questions.

    ``examples``: DPR bi-encoder records (``question``, ``answers``, ``positive_ctxs`` with ``passage_id``).
    Returns retriever-results records whose ctxs are the beam's passages (at most ``k``; default: all beams)
    followed by any gold positive the beam missed (scored just below the last beam), every ctx with
    ``is_positive`` and ``identifier``. The cross-encoder teacher then scores them
    (``rdr-jax rerank --results``); :class:`rdr_jax.tasks.dgr.DGRTask` trains on the result.
    """
    from rdr_jax.retrieval.retrieve import retrieval_results

    questions = [{"question": e["question"], "answers": list(e.get("answers") or [])} for e in examples]
    golds = [[str(c["passage_id"]) for c in e.get("positive_ctxs") or [] if c.get("passage_id") is not None]
             for e in examples]
    ranked = retriever.search([q["question"] for q in questions], progress=progress)
    rows_ids, rows_scores = [], []
    for row, gold in zip(ranked, golds):
        row = list(row[:k] if k else row)
        ids = [p for p, _ in row]
        scores = [s for _, s in row]
        floor = (min(scores) if scores else 0.0) - 1.0
        for pid in gold:
            if pid not in ids:
                ids.append(pid)
                scores.append(floor)
        rows_ids.append(ids)
        rows_scores.append(scores)
    found = _passages_of([[(p, 0.0) for p in ids] for ids in rows_ids], passages)
    results = retrieval_results(questions, rows_scores, rows_ids, found, match_type)
    if not isinstance(retriever.identifiers, PassageIdentifiers):   # n-grams name no single identifier
        for r, gold in zip(results, golds):
            for c in r["ctxs"]:
                c["is_positive"] = c["id"] in gold
        return results
    identifier_of = retriever.identifiers.identifier_of()
    for r, gold in zip(results, golds):
        for c in r["ctxs"]:
            c["is_positive"] = c["id"] in gold
            index = identifier_of.get(c["id"])
            if index is not None:
                c["identifier"] = retriever.identifiers.identifiers[index]
    return results


__all__ = ["GenerativeRetriever", "load_generative_retriever", "generate_results", "results_to_run",
           "candidates_for_distillation"]

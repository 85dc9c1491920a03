"""DGR's training data: per question a candidate list ``[positive, negatives sorted by the teacher score]`` with
the teacher's scores and each candidate's identifier tokens, from candidate JSONL, re-ranked retriever results
(gold positives from ``data.gold_file``), or DPR bi-encoder JSON scored by the lexical-overlap stand-in.

The lists are built once into a prepared dataset (:mod:`rdr_jax.data.records`, format ``dgr``: ``rdr-jax
prepare-data dgr``, or converted into ``WORKDIR/data_cache`` on first use) and read by index; the gold file is
streamed for its passage ids only, and identifiers are tokenised per batch, so a process holds none of the files."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

import numpy as np

from rdr_jax.data.files import iter_json_records, read_json_records, require_file, resolve_data_path
from rdr_jax.data.identifier_views import ViewSpec, passage_views, view_texts
from rdr_jax.data.passage_lines import PassageLines, passage_offsets
from rdr_jax.data.records import file_key, prepared_records, stream_converted
from rdr_jax.data.seq2seq_inputs import encode_inputs, pad_rows, tokenize_identifiers
from rdr_jax.data.stand_in_teacher import lexical_overlap
from rdr_jax.errors import ConfigError

log = logging.getLogger(__name__)

FORMAT = "dgr"


def _candidates_from_biencoder(r: dict) -> list[dict]:
    """A bi-encoder example's passages as candidates scored by the lexical-overlap stand-in teacher."""
    out = []
    for key, positive in (("positive_ctxs", True), ("hard_negative_ctxs", False), ("negative_ctxs", False)):
        for c in (r.get(key) or [])[:1] if positive else (r.get(key) or []):
            if c.get("passage_id") is None:
                continue
            text = f"{c.get('title') or ''} {c.get('text') or ''}"
            out.append({"passage_id": str(c["passage_id"]), "is_positive": positive,
                        "teacher_score": lexical_overlap(r["question"], text)})
    return out


def stream_gold_ids(path) -> dict[str, set[str]]:
    """question text -> passage ids of its ``positive_ctxs`` (DPR bi-encoder JSON), streamed record by record:
    only the ids are kept (tens of MB at NQ), never the file's passages (~15 GB)."""
    gold: dict[str, set[str]] = {}
    for _, r in iter_json_records(require_file(path, "data.gold_file", "the gold positives")):
        if not isinstance(r, dict):
            continue
        ids = {str(c["passage_id"]) for c in r.get("positive_ctxs") or []
               if isinstance(c, dict) and c.get("passage_id") is not None}
        gold.setdefault(r.get("question", ""), set()).update(ids)
    return gold


def normalise_record(r: dict, where: str, *, stand_in_teacher: str, gold: dict | None) -> list[dict]:
    """The record's candidates as ``[{passage_id, identifier?, teacher_score, is_positive}]``."""
    if not isinstance(r, dict) or not isinstance(r.get("question"), str):
        raise ValueError(f"{where} has no 'question' string")
    if "candidates" in r:
        cands = r["candidates"]
        if not isinstance(cands, list):
            raise ValueError(f"{where}: 'candidates' must be a list")
        out = []
        for k, c in enumerate(cands):
            if not isinstance(c, dict) or c.get("passage_id") is None or "teacher_score" not in c:
                raise ValueError(f"{where}, candidates[{k}] needs 'passage_id' and 'teacher_score'")
            out.append({"passage_id": str(c["passage_id"]), "identifier": c.get("identifier"),
                        "teacher_score": float(c["teacher_score"]), "is_positive": bool(c.get("is_positive"))})
            if c.get("pseudo_queries"):   # MINDER's pseudo-query views (identifier_kind: ngrams)
                out[-1]["pseudo_queries"] = [str(q) for q in c["pseudo_queries"]]
        return out
    if "ctxs" in r:
        golds = (gold or {}).get(r["question"], set())
        out = []
        for k, c in enumerate(r["ctxs"]):
            if not isinstance(c, dict) or c.get("id") is None or "score" not in c:
                raise ValueError(f"{where}, ctxs[{k}] needs 'id' and 'score' (the teacher's)")
            pid = str(c["id"])
            out.append({"passage_id": pid, "identifier": c.get("identifier"), "teacher_score": float(c["score"]),
                        "is_positive": bool(c.get("is_positive")) or pid in golds})
        return out
    if "positive_ctxs" in r:
        if stand_in_teacher != "lexical_overlap":
            raise ConfigError(f"{where} is a DPR bi-encoder example: it has no teacher scores. Give candidates "
                              "scored by a cross-encoder (see rdr_jax.retrieval.generative), or set "
                              "'data.stand_in_teacher: lexical_overlap' for a smoke run")
        return _candidates_from_biencoder(r)
    raise ValueError(f"{where} has none of 'candidates', 'ctxs' or 'positive_ctxs'")


def candidate_list(cands: list[dict], k: int | None = None) -> list[dict]:
    """``[positive, negatives by teacher score]`` (at most k; None: all), or [] when there is no positive."""
    positives = [c for c in cands if c["is_positive"]]
    if not positives:
        return []
    positive = max(positives, key=lambda c: c["teacher_score"])
    positive_ids = {c["passage_id"] for c in positives}
    seen, negatives = set(), []
    for c in sorted((c for c in cands if c["passage_id"] not in positive_ids),
                    key=lambda c: -c["teacher_score"]):   # stable: ties keep the file's order
        if c["passage_id"] not in seen:
            seen.add(c["passage_id"])
            negatives.append(c)
    return [positive] + (negatives if k is None else negatives[:k - 1])


def dgr_record(raw, where: str, *, stand_in_teacher: str = "none", gold: dict | None = None) -> dict | None:
    """A DGR training example as the prepared dataset keeps it: the question and its whole ordered candidate
    list (positive first, then the negatives by teacher score; ``data.num_candidates`` cuts it when read) of
    ``{passage_id, identifier (None: named by the identifiers file), teacher_score}``; None for a question
    without a positive (skipped, as before)."""
    cands = candidate_list(normalise_record(raw, where, stand_in_teacher=stand_in_teacher, gold=gold))
    if not cands:
        return None
    kept = []
    for c in cands:
        kept.append({"passage_id": c["passage_id"], "identifier": c.get("identifier") or None,
                     "teacher_score": c["teacher_score"]})
        if c.get("pseudo_queries"):
            kept[-1]["pseudo_queries"] = c["pseudo_queries"]
    return {"question": raw["question"], "candidates": kept}


def conversion_options(stand_in_teacher: str, gold_file, passages_file=None, pseudo_queries_file=None) -> str:
    """What a conversion depends on beside the source file (the cache key's ``options``)."""
    key = lambda f: file_key(resolve_data_path(f)) if f else ""
    return (f"stand_in_teacher={stand_in_teacher}|gold={key(gold_file)}|passages={key(passages_file)}"
            f"|pseudo_queries={key(pseudo_queries_file)}")


def stream_pseudo_queries(path, wanted: set[str]) -> dict[str, list[str]]:
    """{passage id: queries} of the ``wanted`` passages from a JSONL of ``{id, queries: [...]}`` rows (the layout
    of ``rdr-jax generate --pseudo-queries``), streamed: the other passages' queries are not kept."""
    out: dict[str, list[str]] = {}
    path = require_file(path, "data.pseudo_queries_file")
    for line, row in iter_json_records(path):
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("queries"), list):
            raise ValueError(f"{path}:{line}: not {{id, queries: [...]}}")
        if str(row["id"]) in wanted:
            out.setdefault(str(row["id"]), []).extend(map(str, row["queries"]))
    return out


def with_passages(records, passages_file, pseudo_queries_file=None) -> Iterator[dict]:
    """The records with each candidate's passage line offset in ``passages_file`` and, from
    ``pseudo_queries_file``, its passage's pseudo-queries (unless the candidate has its own). ``records()``
    is iterated twice: for the passage ids it names, then to write."""
    wanted = {c["passage_id"] for r in records() for c in r["candidates"]}
    offsets = passage_offsets(passages_file, wanted)
    queries = stream_pseudo_queries(pseudo_queries_file, wanted) if pseudo_queries_file else {}
    for r in records():
        cands = []
        for c in r["candidates"]:
            c = {**c, "offset": offsets[c["passage_id"]]}
            if not c.get("pseudo_queries") and queries.get(c["passage_id"]):
                c["pseudo_queries"] = queries[c["passage_id"]]
            cands.append(c)
        yield {**r, "candidates": cands}


def dgr_stream(path, *, stand_in_teacher: str = "none", gold_file=None, passages_file=None,
               pseudo_queries_file=None) -> Iterator[dict]:
    """The prepared records of a raw DGR training file, streamed (the gold file's ids first, when given). With
    ``passages_file`` each candidate also gets the byte offset of its passage's line there (the views of
    ``identifier_kind: ngrams`` are read by it) and its pseudo-queries (:func:`with_passages`)."""
    gold = stream_gold_ids(gold_file) if gold_file else None
    records = lambda: stream_converted(Path(path), lambda raw, where: dgr_record(
        raw, where, stand_in_teacher=stand_in_teacher, gold=gold))
    return with_passages(records, passages_file, pseudo_queries_file) if passages_file else records()


def dgr_records(path, cache_dir=None, *, stand_in_teacher: str = "none", gold_file=None, passages_file=None,
                pseudo_queries_file=None):
    """The examples of a DGR training file (raw or prepared ``.arrayrecord``) by index; ``cache_dir=None`` reads
    a small file whole instead (library use)."""
    if cache_dir is not None:
        return prepared_records(path, FORMAT, dgr_record, cache_dir, "DGR training data",
                                options=conversion_options(stand_in_teacher, gold_file, passages_file,
                                                           pseudo_queries_file),
                                stream=lambda p, meta: dgr_stream(p, stand_in_teacher=stand_in_teacher, gold_file=gold_file,
                                                            passages_file=passages_file,
                                                            pseudo_queries_file=pseudo_queries_file))
    gold = stream_gold_ids(gold_file) if gold_file else None
    out = [r for r in (dgr_record(r, f"{path}: example {i}", stand_in_teacher=stand_in_teacher, gold=gold)
                       for i, r in enumerate(read_json_records(path, "DGR training data"))) if r is not None]
    return list(with_passages(lambda: out, passages_file, pseudo_queries_file)) if passages_file else out


class DGRData:
    """Candidate lists per question read by index; the identifiers of a batch's candidates tokenised with it."""

    def __init__(self, path, tokenizer, identifiers: dict[str, str] | None, *, num_candidates: int,
                 max_question_length: int, max_identifier_length: int, stand_in_teacher: str,
                 gold_file: str | None, cache_dir=None, views: ViewSpec | None = None, passages_file=None,
                 pseudo_queries_file=None):
        if views is not None and not (passages_file and max_identifier_length):
            raise ConfigError("identifier views ('data.identifier_kind: ngrams') need 'data.passages_file' and "
                              "'data.max_identifier_length' > 0 (views are cut to it)")
        self.records = dgr_records(path, cache_dir, stand_in_teacher=stand_in_teacher, gold_file=gold_file,
                                   passages_file=passages_file if views is not None else None,
                                   pseudo_queries_file=pseudo_queries_file if views is not None else None)
        if not len(self.records):
            raise ValueError(f"{path}: no question has a positive candidate ('is_positive', or 'data.gold_file')")
        self.path, self.tokenizer, self.identifiers = path, tokenizer, identifiers
        self.k, self.lq, self.views = num_candidates, max_question_length, views
        self.passages = PassageLines(passages_file) if views is not None else None
        if views is not None and "offset" not in self.records[0]["candidates"][0]:
            raise ValueError(f"{path}: a prepared dataset without passage offsets; rebuild it with "
                             "`rdr-jax prepare-data dgr --passages PASSAGES_TSV` for identifier views")
        self.target_length = max_identifier_length or self._longest_identifier()

    def __len__(self):
        return len(self.records)

    def question(self, i: int) -> str:
        return self.records[int(i)]["question"]

    def candidates(self, i: int) -> list[dict]:
        """Example ``i``'s first K candidates, each with its identifier (inline, else from the identifiers)."""
        cands = self.records[int(i)]["candidates"][:self.k]
        for c in cands:
            if not c.get("identifier"):
                if self.identifiers is None or c["passage_id"] not in self.identifiers:
                    raise ValueError(f"{self.path}: example {i}: passage {c['passage_id']!r} has no 'identifier' and "
                                     "is not in the identifiers ('data.identifiers_file' / 'data.passages_file')")
                c["identifier"] = self.identifiers[c["passage_id"]]
        return cands

    def _longest_identifier(self) -> int:
        """The longest candidate identifier in tokens (``data.max_identifier_length: 0``): one pass over the
        examples, which also finds any unnamed passage before training starts. Set the length to skip it."""
        from tqdm import tqdm

        longest, chunk = 0, set()
        for i in tqdm(range(len(self)), desc="identifier lengths", unit=" q", mininterval=2.0, delay=2.0,
                      disable=len(self) < 10_000 or None):
            chunk.update(c["identifier"] for c in self.candidates(i))
            if len(chunk) >= 10_000 or i == len(self) - 1:
                longest = max([longest, *map(len, tokenize_identifiers(self.tokenizer, sorted(chunk)))])
                chunk = set()
        if len(self) >= 10_000:
            log.info("%s: the longest identifier has %d tokens (set 'data.max_identifier_length' to skip this pass)",
                     self.path, longest)
        return longest

    def make_batch(self, idx: np.ndarray, rng=None) -> dict[str, np.ndarray]:
        if self.views is not None:
            return self._view_batch(idx)
        b, k = len(idx), self.k
        pad = self.tokenizer.pad_token_id
        strings = []
        cmask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        for row, i in enumerate(idx):
            cands = self.candidates(int(i))
            cmask[row, :len(cands)] = 1
            teacher[row, :len(cands)] = [c["teacher_score"] for c in cands]
            strings += [c["identifier"] for c in cands] + [None] * (k - len(cands))
        distinct = list(dict.fromkeys(s for s in strings if s is not None))
        tokens = dict(zip(distinct, tokenize_identifiers(self.tokenizer, distinct))) if distinct else {}
        targets = [tokens[s] if s is not None else [] for s in strings]
        q_ids, q_mask = encode_inputs(self.tokenizer, [self.question(int(i)) for i in idx], self.lq)
        t_ids, t_mask = pad_rows(targets, self.target_length, pad, "identifier")
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "target_ids": t_ids, "target_mask": t_mask,
                "candidate_mask": cmask, "teacher_scores": teacher}

    def _view_batch(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """The batch with a view axis: candidate ``j`` of question ``i`` has its V views at target rows
        ``(i*K + j)*V ..``; ``view_mask [B*K, V]`` marks the real ones (a missing view, or a padding candidate's,
        is an empty row). Views are cut to ``max_identifier_length - 1`` tokens + EOS: a prefix of a corpus
        n-gram is still one."""
        b, k, spec = len(idx), self.k, self.views
        cmask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        texts: list[str] = []   # tokenised in one call: each question, then its candidates' title?, body, queries
        plan = []               # per question: (its text's position, per candidate (title?, body, [queries]) positions)
        for row, i in enumerate(idx):
            cands = self.records[int(i)]["candidates"][:k]
            cmask[row, :len(cands)] = 1
            teacher[row, :len(cands)] = [c["teacher_score"] for c in cands]
            plan.append((len(texts), []))
            texts.append(self.question(int(i)))
            for c in cands:
                passage = self.passages(c["offset"])
                if passage["id"] != c["passage_id"]:
                    raise ValueError(f"{self.path}: example {i}: passage {c['passage_id']!r} is not at its recorded "
                                     f"offset in {self.passages.path} (found {passage['id']!r}): the dataset was "
                                     "prepared with another passages file; rebuild it with this one")
                title, body, queries = view_texts(spec, passage, c.get("pseudo_queries"))
                start = len(texts)
                texts += ([title] if title is not None else []) + [body] + queries
                positions = list(range(start, len(texts)))
                plan[-1][1].append((positions[0] if title is not None else None,
                                    positions[int(title is not None)], positions[1 + int(title is not None):]))
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        eos, cut = self.tokenizer.eos_token_id, self.target_length - 1
        rows: list[list[int]] = []
        for q, candidates in plan:
            for title, body, queries in candidates:
                views = passage_views(spec, ids[q], None if title is None else ids[title], ids[body],
                                      [ids[j] for j in queries])
                rows += [list(v[:cut]) + [eos] if v else [] for v in views]
            rows += [[]] * (spec.count * (k - len(candidates)))
        t_ids, t_mask = pad_rows(rows, self.target_length, self.tokenizer.pad_token_id, "view")
        q_ids, q_mask = encode_inputs(self.tokenizer, [self.question(int(i)) for i in idx], self.lq)
        view_mask = np.array([len(r) > 0 for r in rows], np.int32).reshape(b * k, spec.count)
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "target_ids": t_ids, "target_mask": t_mask,
                "view_mask": view_mask, "candidate_mask": cmask, "teacher_scores": teacher}

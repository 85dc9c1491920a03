"""DGR: distil a cross-encoder teacher's ranking into a generative retriever (Li et al., ACL Findings 2024).

For each training question, a list ``[positive, negatives sorted by the teacher score, best first]`` of K
candidate passages. The student's passage score is s(p|q) = the summed log-probability of p's identifier given
the question, teacher forced (:func:`rdr_jax.decoding.scoring.passage_scores`: each question encoded once,
its encoder output broadcast over its K candidates). Loss::

    task.ranking_weight x ranking(s)  +  task.generation_weight x CE(gold identifier | question)

``task.ranking_loss``: ``dgr_margin`` (default; DGR's released margin hinge: m = 300, n = 100, weight 3 on
pairs with the positive, 1/(i+1) otherwise, mean over violated pairs: :func:`rdr_jax.losses.dgr_margin_ranknet`),
``ranknet`` (logistic loss over the same order) or ``listwise_kl`` (KL of the teacher's softmax to the
student's). CE is the mean over the gold identifier's tokens in the batch; ``generation_weight`` 500 as
released. (The hinge and the batch-level means are not sums over questions, so gradient accumulation only
approximates one big step here.)

Batch (``B`` questions, ``K`` candidates each, question ``i``'s at rows ``i*K .. i*K+K-1``, positive first)::

    q_input_ids, q_attention_mask   [B, Lq]
    target_ids, target_mask         [B * K, Lt]   candidate identifier tokens + EOS
    candidate_mask                  [B, K]        1 = a real candidate (padding at the end of the list)
    teacher_scores                  [B, K]

Data (``data.train_file``), one of:

- JSONL ``{question, answers?, candidates: [{passage_id, identifier?, teacher_score, is_positive?}]}``;
- DPR retriever-results JSON as ``rdr-jax rerank --results`` writes it (``ctxs: [{id, score, ...}]``, ``score``
  being the cross-encoder's): the two-step flow of :mod:`rdr_jax.retrieval.generative` (the generative
  retriever's own candidates, then the teacher). The gold positives are the ctxs marked ``is_positive`` or,
  since re-ranking keeps only the standard fields, the ``positive_ctxs`` passage ids of the question in
  ``data.gold_file`` (DPR bi-encoder JSON, matched by question text);
- DPR bi-encoder JSON (positive, hard and other negatives with ``passage_id``) with
  ``data.stand_in_teacher: lexical_overlap``: teacher score = share of the question's words found in the
  passage. A deterministic STAND-IN so the pipeline runs on the embedded data without a cross-encoder; it is
  not a teacher worth distilling.

or a prepared dataset (``.arrayrecord``) that ``rdr-jax prepare-data dgr SRC OUT [--gold-file F]
[--stand-in-teacher lexical_overlap]`` builds from any of them: per question the ordered candidate list, read by
index. A raw file is converted once into ``WORKDIR/data_cache`` (keyed by the file, the gold file and the
stand-in teacher); nothing is read whole, and identifiers are tokenised per batch.

Multi-view identifiers (``data.identifier_kind: ngrams``, MINDER's, on which DGR's released code builds): each
candidate passage is named by V views, tokenised as the corpus n-gram index tokenises its views (so each
n-gram view is a substring it can decode): its title, ``data.ngram_views`` body n-grams of ``data.ngram_length``
tokens (the non-overlapping spans holding the most question tokens, as SEAL/MINDER choose training targets;
deterministic: :mod:`rdr_jax.data.identifier_views`) and ``data.pseudo_query_views`` of the candidate's
``pseudo_queries`` (inline in candidate JSONL, else from ``data.pseudo_queries_file``, the JSONL ``{id, queries}``
that ``rdr-jax generate --pseudo-queries`` indexes; only the candidates' queries are kept, in the records).
The batch grows a view axis: ``target_ids``/``target_mask`` ``[B*K*V, Lt]`` (candidate ``j`` of question ``i`` at
rows ``(i*K + j)*V ..``) and ``view_mask [B*K, V]`` (0: a missing view). s(p) = the aggregation
(``data.view_aggregation``) of the views' teacher-forced log-probabilities, and the CE runs over the gold
passage's views. Default ``mean``: a sum grows more negative with every view a passage has, so a
passage without a title (or with fewer pseudo-queries) would outrank one with them for having fewer terms; the
mean keeps passages with different view counts comparable (``sum`` adds them up, as SEAL sums its n-gram weights).
The passages come from ``data.passages_file`` by the byte offset of their line, found once when the data is
prepared (``prepare-data dgr --passages``), never as a per-process dict of the corpus. Views are cut to
``data.max_identifier_length`` (required) - 1 tokens + EOS: a prefix of a corpus n-gram is still one. No
``identifiers.tsv`` is exported: after training, ``rdr-jax generate --ngram-index`` decodes any corpus substring.
The single-identifier path (no ``view_mask``) is unchanged.

Candidates without an ``identifier`` are named through ``data.identifiers_file`` (passage_id<TAB>identifier)
or identifiers built from ``data.passages_file`` by ``data.identifier_kind``. Per question the positive is the
best-scored positive candidate; other positives are left out of the list (they are not negatives); questions
without a positive are skipped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rdr_jax import losses
from rdr_jax.data.dgr_data import DGRData, dgr_records
from rdr_jax.decoding.scoring import passage_scores
from rdr_jax.data.identifier_views import ViewSpec
from rdr_jax.tasks.generative import (IDENTIFIER_KINDS, RETRIEVER, GenerativeTask, GeneratorModel, IdentifierData,
                                      identifier_mapping)
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import TrainFiles, register_task

RANKING_LOSSES = ("dgr_margin", "ranknet", "listwise_kl")
STAND_IN_TEACHERS = ("none", "lexical_overlap")
VIEW_AGGREGATIONS = ("mean", "sum")


def ranking_loss(name: str, scores, teacher, mask, t) -> jax.Array:
    if name == "dgr_margin":
        return losses.dgr_margin_ranknet(scores, mask, margin=t.margin, margin_step=t.margin_step,
                                         positive_weight=t.positive_weight)
    if name == "ranknet":
        return losses.dgr_ranknet(scores, mask)
    return losses.listwise_kl(scores, teacher, mask, t.temperature)


def view_scores(view_scores_, token, target_mask, view_mask, candidate_mask, aggregation: str):
    """s(p) from per-view scores ``[B, K*V]``: the mean (or sum) over p's real views (``view_mask [B*K, V]``); and
    the gold (first) candidate's view tokens ``[B, V, Lt]`` with their mask, for the generation CE."""
    b, k = candidate_mask.shape
    views = view_mask.reshape(b, k, -1).astype(jnp.float32)
    v = views.shape[-1]
    total = jnp.sum(view_scores_.reshape(b, k, v) * views, axis=-1)
    scores = total if aggregation == "sum" else total / jnp.maximum(jnp.sum(views, axis=-1), 1.0)
    gold_mask = target_mask.reshape(b, k, v, -1)[:, 0] * candidate_mask[:, :1, None]
    return scores, token.reshape(b, k, v, -1)[:, 0], gold_mask


@dataclasses.dataclass(frozen=True)
class DGRSettings(TaskSection):
    ranking_loss: str = option("dgr_margin", choices=RANKING_LOSSES)
    margin: float = option(300.0, min=0, doc="dgr_margin: m")
    margin_step: float = option(100.0, min=0, doc="dgr_margin: n")
    positive_weight: float = option(3.0, min=0, doc="dgr_margin: weight of pairs with the positive")
    temperature: float = option(1.0, doc="> 0: listwise_kl")
    ranking_weight: float = option(1.0, min=0)
    generation_weight: float = option(500.0, min=0, doc="weight of the gold identifier's CE (500 as released)")

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True)
class DGRDataConfig(IdentifierData, TrainFiles):
    gold_file: str | None = option(None, doc="DPR bi-encoder JSON naming the gold passages of re-ranked results")
    num_candidates: int = option(10, min=2, doc="K: the positive and K-1 negatives")
    max_question_length: int = option(64, min=4)
    stand_in_teacher: str = option("none", choices=STAND_IN_TEACHERS)
    identifier_kind: str = option("atomic", choices=IDENTIFIER_KINDS + ("ngrams",),
                                  doc="atomic | title: one identifier per passage; ngrams: MINDER's views (title, "
                                      "body n-grams, pseudo-queries) read from data.passages_file")
    ngram_views: int = option(3, min=0, doc="ngrams: body n-grams per passage (those overlapping the question most)")
    ngram_length: int = option(10, min=1, doc="ngrams: tokens per body n-gram (the n-gram index's max_ngram)")
    pseudo_query_views: int = option(0, min=0, doc="ngrams: views from a candidate's 'pseudo_queries' (inline in "
                                                   "candidate JSONL, or from data.pseudo_queries_file)")
    pseudo_queries_file: str | None = option(None, doc="ngrams: JSONL {id, queries: [...]} (as `rdr-jax generate "
                                                       "--pseudo-queries` reads): the passages' pseudo-queries")
    view_aggregation: str = option("mean", choices=VIEW_AGGREGATIONS,
                                   doc="ngrams: s(p) = mean | sum of the views' log-probabilities")

    def view_spec(self) -> ViewSpec | None:
        if self.identifier_kind != "ngrams":
            return None
        return ViewSpec(ngrams=self.ngram_views, ngram_length=self.ngram_length,
                        pseudo_queries=self.pseudo_query_views)


@register_task
class DGRTask(GenerativeTask):
    name = "dgr"
    token_mask_fields = ("q_attention_mask", "target_mask")

    @classmethod
    def config_sections(cls):
        return {"task": DGRSettings, "model": GeneratorModel, "data": DGRDataConfig}

    @classmethod
    def validate_config(cls, c):
        super().validate_config(c)
        d = c.data
        if d.identifier_kind == "ngrams":
            if not d.passages_file or d.identifiers_file:
                raise ConfigError("'data.identifier_kind: ngrams' reads the views from 'data.passages_file' (set it, "
                                  "and leave 'data.identifiers_file' unset)")
            if not d.max_identifier_length:
                raise ConfigError("'data.identifier_kind: ngrams' needs 'data.max_identifier_length' > 0 (views are "
                                  "cut to it; e.g. the n-gram index's max_ngram + 1)")

    def tokenizer_texts(self):
        """The passages' texts and the training questions, read from the prepared dataset (only a random model's
        tokenizer is built from them; with model.path nothing is read)."""
        d = self.config.data
        # the same conversion (cache entry) as training reads
        records = dgr_records(d.train_file, self.data_cache, stand_in_teacher=d.stand_in_teacher, gold_file=d.gold_file,
                              passages_file=d.passages_file if d.view_spec() else None,
                              pseudo_queries_file=d.pseudo_queries_file if d.view_spec() else None)
        return super().tokenizer_texts() + [records[i]["question"] for i in range(len(records))]

    def _data(self, path) -> DGRData:
        d = self.config.data
        identifiers, views = None, d.view_spec()
        if views is None and (d.identifiers_file or d.passages_file):
            identifiers = identifier_mapping(d, self.passages)
            self.identifiers_tsv()
        return DGRData(path, self.tokenizer, identifiers, num_candidates=d.num_candidates,
                       max_question_length=d.max_question_length, max_identifier_length=d.max_identifier_length,
                       stand_in_teacher=d.stand_in_teacher, gold_file=d.gold_file, cache_dir=self.data_cache,
                       views=views, passages_file=d.passages_file, pseudo_queries_file=d.pseudo_queries_file)

    def identifiers_tsv(self):
        """None with n-gram views: any corpus substring is an identifier (``rdr-jax generate --ngram-index``)."""
        return None if self.config.data.view_spec() else super().identifiers_tsv()


    def step_flops(self, batch_shapes):
        """Each question encoded once; its output repeated over its K candidates before the decoder, so the
        cross keys/values are projected for every candidate row (``decoding.scoring.passage_scores``)."""
        candidates = batch_shapes["target_ids"][0]
        return self.retriever_step_flops(*batch_shapes["q_input_ids"], *batch_shapes["target_ids"],
                                         cross_rows=candidates)

    def loss(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        retriever = getattr(model, RETRIEVER)
        scores, token = passage_scores(retriever, batch["q_input_ids"], batch["q_attention_mask"], batch["target_ids"],
                                       batch["target_mask"], rngs=rngs, deterministic=deterministic)
        mask = batch["candidate_mask"].astype(bool)
        b, k = mask.shape
        if "view_mask" in batch:
            scores, gold_tokens, gold_mask = view_scores(scores, token, batch["target_mask"], batch["view_mask"], mask,
                                                         self.config.data.view_aggregation)
        else:
            gold_tokens = token[:, 0]
            gold_mask = batch["target_mask"].reshape(b, k, -1)[:, 0] * mask[:, :1]
        rank = ranking_loss(t.ranking_loss, scores, batch["teacher_scores"], mask, t)
        generation = losses.sequence_cross_entropy(gold_tokens, gold_mask)
        loss = t.ranking_weight * rank + t.generation_weight * generation
        masked = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        return loss, {"ranking_loss": rank, "generation_loss": generation,
                      "positive_top1": jnp.mean((jnp.argmax(masked, -1) == 0).astype(jnp.float32))}

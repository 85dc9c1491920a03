"""RDR: distil a DPR reader's passage relevance into the retriever (Yang & Seo, 2020).

For each question, its top-K retrieved passages; the student score is the retriever's dot product
``q . p``, the teacher score is the reader's relevance logit. Loss = KL(softmax(teacher / T) ||
softmax(student / T)) over the K passages (``losses.rdr_kl``), plus optionally ``task.nll_weight`` x DPR's
NLL of the gold positive among all passages of the batch. Only the question encoder trains by default, so
the passage index stays valid (``task.train_context_encoder: true`` trains both).

Batch (``B`` questions, ``K`` passages each, question ``i``'s at rows ``i*K .. i*K+K-1``)::

    q_input_ids, q_attention_mask   [B, Lq]
    p_input_ids, p_attention_mask   [B * K, Lp]   (or p_emb [B * K, E]: precomputed index embeddings)
    teacher_scores                  [B, K]     precomputed reader relevance logits
    passage_mask                    [B, K]     1 = a real passage, 0 = padding (fewer than K retrieved)
    positive_index                  [B]        (optional) row of the gold positive, -1 = none
    r_input_ids, r_attention_mask   [B * K, Lr] (with task.teacher_model) reader inputs
                                               ``[CLS] q [SEP] title [SEP] text``: the teacher runs in the step

Data (``data.train_file``): the TFDS teacher-score dataset ``rdr-jax teacher-scores`` writes (a directory;
teacher score = the reader's relevance logit, or relevance + best span score with
``data.teacher_score: relevance+span``), or a JSONL of ``{question, answers, ctxs: [{title, text,
teacher_score, has_answer?}]}``, top-K first. With ``data.passage_embeddings`` (the directory ``rdr-jax
encode`` wrote for the index) and a frozen context encoder, the passages are not re-encoded in the step:
their index embeddings are looked up, which is exact (the frozen encoder would reproduce them) and far cheaper.
A DPR bi-encoder JSON is also read (ctxs = its positive, hard negatives, then negatives; the positive has
``has_answer``); it carries no teacher scores, so it needs ``task.teacher_model``. ``task.teacher_model: init``
builds a random DPRReader from ``model.init`` (a smoke test of the in-step teacher, not a real teacher).

Dev recall (``Task.retrieval_eval``, every ``train.eval_every`` steps): with ``data.dev_qa`` (DPR's QA CSV/TSV or
JSONL) and ``data.dev_passages`` (the passages TSV of the index), the current question encoder's top-k answer
recall (``dev_top{k}`` for ``data.dev_k``, default [1, 5, 20]) over ``data.passage_embeddings`` (else over the
dev passages encoded once by the frozen context encoder, or at every evaluation when it trains). Select the
best checkpoint by it with ``train.best_metric: dev_top1`` and ``train.best_mode: max``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from rdr_jax import losses
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder, DPRReader
from rdr_jax.tasks.base import ModelBundle, register_task, resolve_path
from rdr_jax.data.tokenization import encode_reader_inputs
from rdr_jax.tasks.dpr import (BI_ENCODER_MODEL_DEFAULTS, DEV_RECALL_DEFAULTS, BiEncoderTask, DevRecall,
                               batch_packing, check_dev_recall_config, check_min, check_unpad_config,
                               encode, model_runtime_kwargs,
                               passage_arrays, question_arrays, read_json_records, resolve_data_path,
                               save_random_model)
from rdr_jax.training.config import REQUIRED, ConfigError
from rdr_jax.training.faults import check_teacher_records, check_teacher_row

log = logging.getLogger(__name__)


def from_biencoder_record(r: dict) -> dict:
    """A DPR bi-encoder example as an RDR record (no teacher scores)."""
    positives = [dict(c, has_answer=True) for c in (r.get("positive_ctxs") or [])[:1]]
    ctxs = positives + list(r.get("hard_negative_ctxs") or []) + list(r.get("negative_ctxs") or [])
    return {"question": r.get("question"), "answers": r.get("answers", []), "ctxs": ctxs}


def records_from_teacher_dataset(path, split: str, score: str) -> list[dict]:
    """RDR records from the TFDS dataset written by ``rdr-jax teacher-scores``."""
    from rdr_jax.data.tfds_format import load as load_tfds

    if score not in ("relevance", "relevance+span"):
        raise ConfigError(f"'data.teacher_score' must be 'relevance' or 'relevance+span', got {score!r}")
    records = []
    fields = ("relevance_logits", "span_scores") if score == "relevance+span" else ("relevance_logits",)
    source = load_tfds(path, split)
    for i in range(len(source)):  # a random-access source: index it (iterating runs past its end)
        row = source[i]
        # zip below would silently drop passages whose scores are missing: refuse instead
        check_teacher_row(row, i, f"{path} ({split})", fields, aligned_fields=("titles", "texts", "has_answer"))
        teacher = np.asarray(row["relevance_logits"], np.float32)
        if score == "relevance+span":
            teacher = teacher + np.asarray(row["span_scores"], np.float32)
        ctxs = [{"id": pid, "title": title, "text": text, "teacher_score": float(t), "has_answer": bool(h)}
                for pid, title, text, t, h in zip(row["passage_ids"], row["titles"], row["texts"], teacher,
                                                  row["has_answer"])]
        records.append({"question": row["question"], "answers": list(row["answers"]), "ctxs": ctxs})
    return records


def load_records(path, split: str, score: str) -> list[dict]:
    path = resolve_data_path(path)
    if path.is_dir():
        return records_from_teacher_dataset(path, split, score)
    records = read_json_records(path, "RDR training data")
    if records and isinstance(records[0], dict) and "ctxs" not in records[0] and "positive_ctxs" in records[0]:
        records = [from_biencoder_record(r) for r in records]
    return records


class PassageEmbeddings:
    """Index embeddings by passage id (``rdr-jax encode``'s output), for a frozen context encoder."""

    def __init__(self, encoding_dir):
        from rdr_jax.retrieval.encode import load_encoded

        self.vectors, self.ids = load_encoded(resolve_data_path(encoding_dir))
        self.row = {pid: i for i, pid in enumerate(self.ids)}

    def lookup(self, passage_ids: list[str | None]) -> np.ndarray:
        out = np.zeros((len(passage_ids), self.vectors.shape[1]), np.float32)
        for i, pid in enumerate(passage_ids):
            if pid is not None:
                if pid not in self.row:
                    raise ValueError(f"passage id {pid!r} is not in data.passage_embeddings")
                out[i] = self.vectors[self.row[pid]]
        return out


class RDRData:
    def __init__(self, path: str, tokenizer, *, top_k: int, max_question_length: int, max_passage_length: int,
                 need_teacher_scores: bool, need_positive: bool, reader_length: int | None, split: str = "train",
                 teacher_score: str = "relevance", embeddings: PassageEmbeddings | None = None):
        records = load_records(path, split, teacher_score)
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "question" not in r or not isinstance(r.get("ctxs"), list):
                raise ValueError(f"{path}: example {i} needs 'question' and a 'ctxs' list")
            if not r["ctxs"]:
                raise ValueError(f"{path}: example {i} ({r['question']!r}) has no passages in 'ctxs'")
        if need_teacher_scores:  # missing, non-finite or miscounted teacher scores: refused before any step
            check_teacher_records(records, str(path), top_k)
        for i, r in enumerate(records):
            if embeddings is not None:
                for k, ctx in enumerate(r["ctxs"][:top_k]):
                    if ctx.get("id") is None:
                        raise ValueError(f"{path}: example {i}, ctxs[{k}] has no passage 'id' to look up in "
                                         "data.passage_embeddings")
        self.records, self.tokenizer, self.k = records, tokenizer, top_k
        self.lq, self.lp = max_question_length, max_passage_length
        self.need_teacher_scores, self.need_positive, self.reader_length = (
            need_teacher_scores, need_positive, reader_length)
        self.embeddings = embeddings

    def __len__(self):
        return len(self.records)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        b, k = len(idx), self.k
        questions, titles, texts, q_of_passage, passage_ids = [], [], [], [], []
        teacher = np.zeros((b, k), np.float32)
        pmask = np.zeros((b, k), np.int32)
        positive = np.full((b,), -1, np.int32)
        for row, i in enumerate(idx):
            r = self.records[int(i)]
            questions.append(r["question"])
            ctxs = r["ctxs"][:k]
            for j in range(k):
                ctx = ctxs[j] if j < len(ctxs) else {}
                titles.append(ctx.get("title") or "")
                texts.append(ctx.get("text") or "")
                passage_ids.append(str(ctx["id"]) if j < len(ctxs) and ctx.get("id") is not None else None)
                q_of_passage.append(r["question"])
                if j < len(ctxs):
                    pmask[row, j] = 1
                    teacher[row, j] = float(ctx.get("teacher_score", 0.0))
                    if positive[row] < 0 and ctx.get("has_answer"):
                        positive[row] = row * k + j
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        batch = {"q_input_ids": q_ids, "q_attention_mask": q_mask, "passage_mask": pmask}
        if self.embeddings is not None:
            batch["p_emb"] = self.embeddings.lookup(passage_ids)
        else:
            batch["p_input_ids"], batch["p_attention_mask"] = passage_arrays(self.tokenizer, titles, texts, self.lp)
        if self.need_teacher_scores:
            batch["teacher_scores"] = teacher
        if self.need_positive:
            batch["positive_index"] = positive
        if self.reader_length:
            reader = encode_reader_inputs(self.tokenizer, q_of_passage, titles, texts, self.reader_length)
            batch["r_input_ids"], batch["r_attention_mask"] = reader["input_ids"], reader["attention_mask"]
        return batch


def build_random_reader(model_cfg, out_dir, seed: int):
    if (out_dir / "config.json").is_file():
        return out_dir
    init = dict(model_cfg.get("init") or {})
    if not init:
        raise ConfigError("'task.teacher_model: init' needs 'model.init' (a BERT config dict)")
    init.setdefault("vocab_size", 30522)
    save_random_model(DPRReader, init, out_dir, seed)
    return out_dir


@register_task
class RDRTask(BiEncoderTask):
    name = "rdr"
    index_fields = {"positive_index": ("p_input_ids", "p_emb")}

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED, "train_context_encoder": False, "temperature": 1.0,
                     "scale_by_temperature_squared": False, "nll_weight": 0.0,
                     # A DPRReader directory: its relevance logits, computed in the step, are the teacher.
                     "teacher_model": None},
            "model": dict(BI_ENCODER_MODEL_DEFAULTS),
            "data": {"train_file": REQUIRED, "dev_file": None, "train_split": "train", "dev_split": "dev",
                     "teacher_score": "relevance", "passage_embeddings": None, "top_k": 100,
                     "max_question_length": 256, "max_passage_length": 256, "max_reader_length": 350,
                     "shuffle": True, **DEV_RECALL_DEFAULTS},
        }

    @classmethod
    def validate_config(cls, c):
        t, d = c["task"], c["data"]
        if not t["temperature"] or t["temperature"] <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {t['temperature']!r}")
        if t["nll_weight"] < 0:
            raise ConfigError(f"'task.nll_weight' must be >= 0, got {t['nll_weight']!r}")
        check_min(d, "data", ("top_k",), 1)
        check_min(d, "data", ("max_question_length", "max_passage_length", "max_reader_length"), 4)
        check_dev_recall_config(d)
        check_unpad_config(c)
        if d["passage_embeddings"] and t["train_context_encoder"]:
            raise ConfigError("'data.passage_embeddings' needs a frozen context encoder "
                              "('task.train_context_encoder: false'): trained passages must be re-encoded")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._embeddings = None

    @property
    def teacher_path(self):
        value = self.config.task.teacher_model
        if value == "init":
            return str(build_random_reader(self.config.model, self.workdir / "init" / "reader",
                                           self.config.train.seed + 1))
        return resolve_path(value)

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model)
        models = dict(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                      context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))
        if self.teacher_path:
            models["teacher"] = DPRReader.from_pretrained(self.teacher_path, **kw)
        return ModelBundle(**models)

    def trainable_submodules(self):
        return ("question_encoder", "context_encoder") if self.config.task.train_context_encoder \
            else ("question_encoder",)

    def teacher_scores(self, model, batch, num_questions: int) -> jax.Array:
        if "teacher" in model.names:
            if "r_input_ids" not in batch:
                raise ValueError("task.teacher_model is set but the batch has no reader inputs 'r_input_ids'")
            out = model.teacher(batch["r_input_ids"], batch["r_attention_mask"], deterministic=True)
            scores = out.relevance_logits.reshape(num_questions, -1)
        elif "teacher_scores" in batch:
            scores = batch["teacher_scores"]
        else:
            raise ValueError("the batch has no 'teacher_scores' and task.teacher_model is not set")
        return jax.lax.stop_gradient(scores.astype(jnp.float32))

    def loss(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic, packing=batch_packing(batch, "q_"))
        if "p_emb" in batch:  # the index's embeddings of the frozen context encoder
            p = batch["p_emb"]
        else:
            p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                       deterministic=deterministic or not t.train_context_encoder,
                       packing=batch_packing(batch, "p_"))
        if not t.train_context_encoder:
            p = jax.lax.stop_gradient(p)
        num_q = q.shape[0]
        mask = batch["passage_mask"].astype(bool)
        student = jnp.einsum("be,bke->bk", q.astype(jnp.float32), p.astype(jnp.float32).reshape(num_q, -1, p.shape[-1]),
                             precision=jax.lax.Precision.HIGHEST)
        teacher = self.teacher_scores(model, batch, num_q)
        kl = losses.rdr_kl(student, teacher, mask, t.temperature, t.scale_by_temperature_squared)
        neg = jnp.finfo(jnp.float32).min
        agree = (jnp.argmax(jnp.where(mask, student, neg), -1) == jnp.argmax(jnp.where(mask, teacher, neg), -1))
        metrics = {"kl": kl, "top1_agreement": jnp.mean(agree.astype(jnp.float32))}
        loss = kl
        if t.nll_weight > 0:
            if "positive_index" not in batch:
                raise ValueError("task.nll_weight > 0 needs 'positive_index' in the batch")
            nll = losses.dpr_nll(q, p, batch["positive_index"], passage_mask=mask.reshape(-1))
            metrics["nll"] = nll
            loss = loss + t.nll_weight * nll
        return loss, metrics

    def dev_passage_embeddings(self, model, dev: DevRecall) -> tuple[np.ndarray, list[str]]:
        """The frozen index embeddings (``data.passage_embeddings``) when given: exact for the frozen context
        encoder, and no corpus encoding per evaluation. Else the dev passages encoded (see BiEncoderTask)."""
        if not self.config.data.passage_embeddings:
            return super().dev_passage_embeddings(model, dev)
        if self._embeddings is None:
            self._embeddings = PassageEmbeddings(self.config.data.passage_embeddings)
        return self._embeddings.vectors, self._embeddings.ids

    def _data(self, path, split) -> RDRData:
        d, t = self.config.data, self.config.task
        if d.passage_embeddings and self._embeddings is None:
            self._embeddings = PassageEmbeddings(d.passage_embeddings)
        return RDRData(path, self.tokenizer, top_k=d.top_k, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, need_teacher_scores=not self.teacher_path,
                       need_positive=t.nll_weight > 0,
                       reader_length=d.max_reader_length if self.teacher_path else None, split=split,
                       teacher_score=d.teacher_score, embeddings=self._embeddings)

    def split_data(self, split: str) -> RDRData:
        d = self.config.data
        return self._data(getattr(d, f"{split}_file"), getattr(d, f"{split}_split"))

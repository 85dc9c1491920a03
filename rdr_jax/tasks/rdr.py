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
The vectors are memory-mapped (fp16 stays fp16, rows converted per batch) and the data keeps passage rows,
not texts (a ctx's ``row`` in the encoding, or its ``id``, mapped to a row once at set-up): per-process memory
does not grow with the corpus beyond the map. A DPR bi-encoder JSON is also read (ctxs = its positive, hard negatives, then negatives; the positive has
``has_answer``); it carries no teacher scores, so it needs ``task.teacher_model``. ``task.teacher_model: init``
builds a random DPRReader from ``model.init`` (a smoke test of the in-step teacher, not a real teacher).

Dev recall (``Task.retrieval_eval``, every ``train.eval_every`` steps): with ``data.dev_qa`` (DPR's QA CSV/TSV or
JSONL) and ``data.dev_passages`` (the passages TSV of the index), the current question encoder's top-k answer
recall (``dev_top{k}`` for ``data.dev_k``, default [1, 5, 20]) over ``data.passage_embeddings`` (else over the
dev passages encoded once by the frozen context encoder, or at every evaluation when it trains). Over
``data.passage_embeddings`` every process holds its share of the vectors on its devices for the run
(``data.dev_search: device``, 1/processes of the encoding's bytes per process) and the ranking is exactly the
host's ``exact_top_k`` over the whole encoding. Select the
best checkpoint by it with ``train.best_metric: dev_top1`` and ``train.best_mode: max``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from rdr_jax import losses
from rdr_jax.data.rdr_data import RDRData
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder, DPRReader
from rdr_jax.retrieval.dev_recall import DevRecall
from rdr_jax.retrieval.device_search import DeviceSearch
from rdr_jax.retrieval.passage_embeddings import PassageEmbeddings
from rdr_jax.retrieval.split_search import ProcessRows, SplitSearch
from rdr_jax.tasks.bi_encoder import (BiEncoderData, BiEncoderTask, EncoderModel, encode,
                                      packed_tokens)
from rdr_jax.tasks.model_setup import model_runtime_kwargs, random_model_dir, resolve_path
from rdr_jax.training import model_flops as F
from rdr_jax.training.config import ConfigError, TaskSection, option
from rdr_jax.training.task import ModelBundle, register_task


@dataclasses.dataclass(frozen=True)
class RDRSettings(TaskSection):
    train_context_encoder: bool = option(False, doc="also train the context encoder (the index must be rebuilt)")
    temperature: float = option(1.0, doc="> 0: softmax temperature of teacher and student scores")
    scale_by_temperature_squared: bool = option(False)
    nll_weight: float = option(0.0, min=0, doc="weight of DPR's NLL of the gold positive, added to the KL")
    teacher_model: str | None = option(None, doc="a DPRReader directory: its relevance logits, computed in the "
                                                 "step, are the teacher; 'init': a random reader (smoke test)")

    def check(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"'task.temperature' must be > 0, got {self.temperature!r}")


@dataclasses.dataclass(frozen=True)
class RDRDataConfig(BiEncoderData):
    train_split: str = option("train", doc="the split of a teacher-score dataset directory")
    dev_split: str = option("dev")
    teacher_score: str = option("relevance", choices=("relevance", "relevance+span"))
    passage_embeddings: str | None = option(None, doc="the directory `rdr-jax encode` wrote: frozen passage "
                                                      "vectors looked up instead of re-encoded")
    dev_search: str = option("device", choices=("device", "host"),
                             doc="dev recall over data.passage_embeddings: each process's share of the vectors "
                                 "held on its devices for the run (exact: candidates rescored on the host), or "
                                 "ranked on the host from the memory map (no device memory; slow at 21M)")
    dev_chunk_rows: int = option(16384, min=8, doc="dev_search: device: passages scored per matmul on a device")
    top_k: int = option(100, min=1, doc="passages per question")
    max_reader_length: int = option(350, min=4, doc="reader input length (with task.teacher_model)")


@register_task
class RDRTask(BiEncoderTask):
    name = "rdr"
    index_fields = {"positive_index": ("p_input_ids", "p_emb")}

    @classmethod
    def config_sections(cls):
        return {"task": RDRSettings, "model": EncoderModel, "data": RDRDataConfig}

    @classmethod
    def validate_config(cls, c):
        super().validate_config(c)
        if c.data.passage_embeddings and c.task.train_context_encoder:
            raise ConfigError("'data.passage_embeddings' needs a frozen context encoder "
                              "('task.train_context_encoder: false'): trained passages must be re-encoded")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._embeddings = None
        self._dev_search = None     # SplitSearch over data.passage_embeddings, built at the first evaluation

    @property
    def teacher_path(self):
        value = self.config.task.teacher_model
        if value == "init":   # a smoke test of the in-step teacher, not a real teacher
            return str(random_model_dir(DPRReader, self.config.model.init, self.workdir / "init" / "reader",
                                        self.config.train.seed + 1, what="'task.teacher_model: init'"))
        return resolve_path(value)

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model, self.mesh)
        models = dict(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                      context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))
        if self.teacher_path:
            models["teacher"] = DPRReader.from_pretrained(self.teacher_path, **kw)
        return self.bundle(**models)

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

    def step_flops(self, batch_shapes):
        """The question encoder (trained), the context encoder (trained, frozen: 1 x forward, or absent with
        ``p_emb``), the in-step teacher reader (1 x forward), and the student's ``q . p`` scores (and the NLL's
        in-batch scores per micro-batch), whose backward has one matmul per side that trains."""
        t = self.config.task
        (q_config, compute), (c_config, _) = self.model_specs["question_encoder"], self.model_specs["context_encoder"]
        num_q, q_len = batch_shapes["q_input_ids"]
        k = batch_shapes["passage_mask"][1]
        again = bool(self.config.train.grad_cache_chunk)    # GradCache re-runs the trained encoders' forward
        questions = F.dpr_encoder(q_config, num_q, q_len, tokens=packed_tokens(batch_shapes, "q_"))
        flops = F.train_flops(questions, trained=True, remat=F.recomputes_layers(compute)) + again * questions.total
        if "p_input_ids" in batch_shapes:
            passages = F.dpr_encoder(c_config, *batch_shapes["p_input_ids"], tokens=packed_tokens(batch_shapes, "p_"))
            flops += F.train_flops(passages, trained=t.train_context_encoder, remat=F.recomputes_layers(compute))
            flops += again * t.train_context_encoder * passages.total
        sides = 2 + t.train_context_encoder           # forward + one backward matmul per trained side
        dim = F.embedding_dim(q_config)
        flops += sides * F.matmul(num_q * k, dim, 1)
        if t.nll_weight > 0:
            flops += sides * F.matmul(num_q, dim, num_q * k) / self.config.train.grad_accum_steps
        if "teacher" in self.model_specs:
            flops += F.dpr_reader(self.model_specs["teacher"][0], *batch_shapes["r_input_ids"]).total
        return flops

    def embed(self, model, batch, *, rngs, deterministic):
        t = self.config.task
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic, packing=self.packing(batch, "q_"))
        if "p_emb" in batch:  # the index's embeddings of the frozen context encoder
            p = batch["p_emb"]
        else:
            p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                       deterministic=deterministic or not t.train_context_encoder,
                       packing=self.packing(batch, "p_"))
        if not t.train_context_encoder:
            p = jax.lax.stop_gradient(p)
        return {"q": q, "p": p}

    def loss_targets(self, model, batch):
        """The teacher's scores ``[B, K]``: the in-step reader is frozen, so under GradCache it runs chunk by
        chunk in the forward pass only."""
        return {"teacher": self.teacher_scores(model, batch, batch["q_input_ids"].shape[0])}

    def loss_from_embeddings(self, model, batch, embeddings, targets):
        t = self.config.task
        q, p = embeddings["q"], embeddings["p"]
        num_q = q.shape[0]
        mask = batch["passage_mask"].astype(bool)
        student = jnp.einsum("be,bke->bk", q.astype(jnp.float32), p.astype(jnp.float32).reshape(num_q, -1, p.shape[-1]),
                             precision=jax.lax.Precision.HIGHEST)
        teacher = targets["teacher"]
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

    def loss(self, model, batch, *, rngs, deterministic):
        return self.embed_loss(model, batch, rngs=rngs, deterministic=deterministic)

    def dev_passage_embeddings(self, model, dev: DevRecall):
        """The frozen index embeddings (``data.passage_embeddings``) when given: exact for the frozen context
        encoder, and no corpus encoding per evaluation. Each process's share of the rows (``process_rows``) is
        loaded onto its devices once (``data.dev_search: device``, kept for the run) and searched there, the
        candidates rescored exactly from the memory map (``split_search``); or ranked on the host from the map
        (``host``). Ids are read on demand. Else the dev passages encoded (see BiEncoderTask)."""
        d = self.config.data
        if not d.passage_embeddings:
            return super().dev_passage_embeddings(model, dev)
        if self._dev_search is None:
            embeddings = self.passage_embeddings()
            rows = ProcessRows.of_process(embeddings)
            device = DeviceSearch(embeddings.path, chunk_rows=d.dev_chunk_rows, progress=False) \
                if d.dev_search == "device" else None
            self._dev_search = SplitSearch(rows, len(embeddings), device)
        return self._dev_search, self.passage_embeddings().ids

    def passage_embeddings(self) -> PassageEmbeddings:
        """``data.passage_embeddings`` memory-mapped, opened once (the page cache is shared by every process)."""
        if self._embeddings is None:
            self._embeddings = PassageEmbeddings(self.config.data.passage_embeddings)
        return self._embeddings

    def _data(self, path, split) -> RDRData:
        d, t = self.config.data, self.config.task
        return RDRData(path, self.tokenizer, top_k=d.top_k, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, need_teacher_scores=not self.teacher_path,
                       need_positive=t.nll_weight > 0,
                       reader_length=d.max_reader_length if self.teacher_path else None, split=split,
                       teacher_score=d.teacher_score,
                       embeddings=self.passage_embeddings() if d.passage_embeddings else None)

    def split_data(self, split: str) -> RDRData:
        d = self.config.data
        return self._data(getattr(d, f"{split}_file"), getattr(d, f"{split}_split"))

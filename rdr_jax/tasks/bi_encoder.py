"""What the tasks that train DPR encoders (``dpr``, ``rdr``) share: the model section (encoder paths or a random
BERT, dtypes, remat, unpadded encoders), the tokenizer, the embedding of a batch, and dev top-k answer recall.

Dev recall (``Task.retrieval_eval``, every ``train.eval_every`` steps): with ``data.dev_qa`` and
``data.dev_passages``, top-k answer recall (``dev_top{k}``, ``data.dev_k``) of the current encoders, the dev
passages being re-encoded by the (training) context encoder at every evaluation: meant for a small dev corpus
(the embedded one: seconds); evaluate a full Wikipedia index offline (``rdr-jax encode``/``retrieve``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.packing import TokenPacking
from rdr_jax.retrieval.answers import MATCH_TYPES
from rdr_jax.retrieval.dev_recall import DevRecall
from rdr_jax.retrieval.encode import Encoder, encode_texts
from rdr_jax.tasks.model_setup import ModelSpec, encoder_paths
from rdr_jax.training.config import ConfigError, option
from rdr_jax.training.task import FileDataTask, TrainFiles

@dataclasses.dataclass(frozen=True)
class EncoderModel(ModelSpec):
    """The ``model`` section of the bi-encoder tasks."""
    question_encoder: str | None = option(None, doc="HF dir: a DPR question encoder, or a plain BertModel (how "
                                                    "DPR starts); default: a random BERT from model.init")
    context_encoder: str | None = option(None, doc="HF dir; defaults to question_encoder")
    unpad: bool = option(False, doc="encoders run on real tokens only (one device, no grad accumulation); each "
                                    "distinct packed size (at most 16 per batch shape) compiles once")


@dataclasses.dataclass(frozen=True)
class BiEncoderData(TrainFiles):
    """The bi-encoder tasks' data section: input lengths, and for dev top-k answer recall a QA file, the passages whose ids the
    index uses (their text decides has_answer), the k of top-k recall and DPR's match type ("regex" for
    CuratedTREC)."""
    dev_qa: str | None = option(None)
    dev_passages: str | None = option(None)
    dev_k: list[int] = option([1, 5, 20], min=1)
    dev_match_type: str = option("string", choices=MATCH_TYPES)
    max_question_length: int = option(256, min=4)
    max_passage_length: int = option(256, min=4)

    def check(self) -> None:
        if self.dev_qa and not self.dev_passages:
            raise ConfigError("'data.dev_qa' needs 'data.dev_passages' (the passages TSV of the dev index): "
                              "has_answer is decided on the passage text")
        if not self.dev_k:
            raise ConfigError("'data.dev_k' must be a non-empty list of positive integers, got []")


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


def packed_tokens(batch_shapes: dict, prefix: str) -> int | None:
    """Packed rows of the ``{prefix}`` encoder input in a batch's shapes (``add_packing``'s ``token_position``
    map, under ``model.unpad``), or None: what the position-wise layers run on, for ``step_flops``."""
    shape = batch_shapes.get(f"{prefix}token_position")
    return None if shape is None else int(shape[0])


def encode(encoder, ids, mask, *, rngs, deterministic, packing: TokenPacking | None = None):
    # the embedding is the [CLS] state: the last layer computes that row alone
    return encoder(ids, mask, rngs=rngs, deterministic=deterministic, cls_only=True,
                   packing=packing).pooler_output


class BiEncoderTask(FileDataTask):
    """Shared by the tasks that train DPR encoders: model paths (or a random BERT) and the tokenizer."""

    @classmethod
    def validate_config(cls, c):
        if c.model.unpad and c.train.grad_accum_steps > 1:
            raise ConfigError("'model.unpad' packs each whole batch; it cannot be split into "
                              f"'train.grad_accum_steps' ({c.train.grad_accum_steps}) micro-batches")
        if c.model.unpad and c.train.grad_cache_chunk:
            raise ConfigError("'model.unpad' packs each whole batch; it cannot be split into "
                              f"'train.grad_cache_chunk' ({c.train.grad_cache_chunk}) chunks")

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

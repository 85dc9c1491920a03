"""What the tasks that train DPR encoders (``dpr``, ``rdr``) share: the model section (encoder paths or a random
BERT, dtypes, remat, unpadded encoders), the tokenizer, the embedding of a batch, and dev top-k answer recall.

Dev recall (``Task.retrieval_eval``, every ``train.eval_every`` steps): with ``data.dev_qa`` and
``data.dev_passages``, top-k answer recall (``dev_top{k}``, ``data.dev_k``) of the current encoders, the dev
passages being re-encoded by the (training) context encoder at every evaluation: meant for a small dev corpus
(the embedded one: seconds); evaluate a full Wikipedia index offline (``rdr-jax encode``/``retrieve``), or give
RDR the frozen index (``data.passage_embeddings``: searched on the devices). Every process encodes and ranks its
share of the dev passages; the per-process top-k are merged into exactly the one-process ranking.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from rdr_jax.data.tokenization import load_tokenizer
from rdr_jax.models.packing import TokenPacking, block_maps, packed_per_row
from rdr_jax.retrieval.answers import MATCH_TYPES
from rdr_jax.retrieval.dev_recall import DevRecall
from rdr_jax.retrieval.device_search import process_rows
from rdr_jax.retrieval.encode import Encoder, encode_texts
from rdr_jax.retrieval.split_search import ProcessRows, SplitSearch
from rdr_jax.tasks.model_setup import ModelSpec, encoder_paths
from rdr_jax.training.config import ConfigError, option
from rdr_jax.training.partitioning import mesh_shape
from rdr_jax.training.task import FileDataTask, TrainFiles

@dataclasses.dataclass(frozen=True)
class EncoderModel(ModelSpec):
    """The ``model`` section of the bi-encoder tasks."""
    question_encoder: str | None = option(None, doc="HF dir: a DPR question encoder, or a plain BertModel (how "
                                                    "DPR starts); default: a random BERT from model.init")
    context_encoder: str | None = option(None, doc="HF dir; defaults to question_encoder")
    unpad: bool = option(False, doc="encoders run on real tokens only, packed per data-parallel shard and "
                                    "micro-batch; each distinct packed size (at most 16 per batch shape) compiles once")


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


def add_packing(batch: dict[str, np.ndarray], *, shard_questions: int | None = None, micro_batches: int = 1,
                prefixes=("q_", "p_"), question_field: str = "q_input_ids", agree=None) -> dict[str, np.ndarray]:
    """Host side (``model.unpad``): the packing maps of each ``{prefix}attention_mask``, as batch fields
    (``{prefix}token_position`` ``[rows, per_row]``, ``{prefix}position_row`` ``[rows, length]``: row-aligned,
    so they shard and split into micro-batches like the batch, see :func:`rdr_jax.models.packing.block_maps`).

    Each block of rows that one data-parallel shard holds in one micro-batch is packed on its own:
    ``shard_questions`` questions per shard (default: the whole batch is one shard), ``micro_batches`` =
    ``train.grad_accum_steps``, the micro-batches taking question ``i`` to micro-batch ``i % micro_batches``
    as ``Task.split_microbatches`` does. The batch may be one process's block of the global batch.
    ``agree(per_row) -> per_row``: with several processes, the largest value over all of them (every
    process's fields must have one shape)."""
    num_q = np.asarray(batch[question_field]).shape[0]
    shard_questions = num_q if shard_questions is None else shard_questions
    if num_q % shard_questions or shard_questions % micro_batches:
        raise ValueError(f"model.unpad: a batch of {num_q} questions cannot be packed per data-parallel shard of "
                         f"{shard_questions} questions in {micro_batches} micro-batches (train.grad_accum_steps)")
    out = dict(batch)
    for prefix in prefixes:
        key = f"{prefix}attention_mask"
        if key not in batch:
            continue
        mask = np.asarray(batch[key])
        group = mask.shape[0] // num_q
        # rows in (micro-batch, shard) order: the blocks that the devices hold once the step splits the batch
        order = np.arange(mask.shape[0]).reshape(num_q // micro_batches, micro_batches, group)
        order = order.swapaxes(0, 1).reshape(-1)
        blocks = micro_batches * (num_q // shard_questions)
        per_row = packed_per_row(mask[order], blocks)
        if agree is not None:
            per_row = int(agree(per_row))
        for name, value in zip(PACKED_FIELDS, block_maps(mask[order], blocks, per_row)):
            field = np.empty_like(value)
            field[order] = value
            out[f"{prefix}{name}"] = field
    return out


def batch_packing(batch, prefix: str, shards: int = 1) -> TokenPacking | None:
    """The :class:`TokenPacking` that :func:`add_packing` put in a (traced) batch or micro-batch split over
    ``shards`` data-parallel devices, or None."""
    if f"{prefix}token_position" not in batch:
        return None
    return TokenPacking.from_rows(batch[f"{prefix}token_position"], batch[f"{prefix}position_row"], shards)


def packed_tokens(batch_shapes: dict, prefix: str) -> int | None:
    """Packed rows of the ``{prefix}`` encoder input in a batch's shapes (``add_packing``'s ``token_position``
    map, under ``model.unpad``: rows x packed rows per row), or None: what the position-wise layers run on, for
    ``step_flops``."""
    shape = batch_shapes.get(f"{prefix}token_position")
    return None if shape is None else int(np.prod(shape))


def data_parallel_shards(config) -> int:
    """Devices the batch's rows are split over (mesh data x fsdp), as ``make_mesh`` resolves the config."""
    data, fsdp, _ = mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, jax.device_count())
    return data * fsdp


def agree_across_processes(value: int) -> int:
    """The largest ``value`` over all processes (a small all-gather; no-op with one process)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.asarray(value, np.int32))))


def encode(encoder, ids, mask, *, rngs, deterministic, packing: TokenPacking | None = None):
    # the embedding is the [CLS] state: the last layer computes that row alone
    return encoder(ids, mask, rngs=rngs, deterministic=deterministic, cls_only=True,
                   packing=packing).pooler_output


class BiEncoderTask(FileDataTask):
    """Shared by the tasks that train DPR encoders: model paths (or a random BERT) and the tokenizer."""

    @classmethod
    def validate_config(cls, c):
        # each micro-batch is packed per data-parallel shard: its questions must split evenly over the shards
        micro = c.train.batch_size // max(1, c.train.grad_accum_steps)
        if c.model.unpad and c.train.grad_accum_steps > 1 and micro % max(1, c.mesh.data * c.mesh.fsdp):
            raise ConfigError(f"'model.unpad' packs each micro-batch per data-parallel shard: its {micro} questions "
                              f"(train.batch_size / train.grad_accum_steps) do not split over mesh.data x mesh.fsdp "
                              f"= {c.mesh.data * c.mesh.fsdp} devices")
        if c.model.unpad and c.train.grad_cache_chunk:
            raise ConfigError("'model.unpad' with 'train.grad_cache_chunk' is not supported: GradCache's chunks "
                              "would each need their own packing maps; set one of them off")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self._paths = None
        self._tokenizer = None
        self._dev_recall: DevRecall | None = None          # built at the first retrieval_eval
        self._dev_encoders: dict[str, Encoder] = {}
        self._dev_passage_cache: tuple[SplitSearch, list[str]] | None = None

    def batch_maker(self, make_batch):
        """``make_batch``, adding the packing maps of the encoders' inputs when ``model.unpad`` is set: one block
        per data-parallel shard and micro-batch (:func:`add_packing`); the batch may be this process's block."""
        if not self.config.model.unpad:
            return make_batch
        t = self.config.train
        shards = self.packing_shards
        if t.batch_size % (shards * t.grad_accum_steps):
            raise ConfigError(f"'model.unpad' packs per data-parallel shard and micro-batch: train.batch_size="
                              f"{t.batch_size} does not split into {shards} shards x {t.grad_accum_steps} "
                              "micro-batches (train.grad_accum_steps)")
        return lambda idx, rng: add_packing(make_batch(idx, rng), shard_questions=t.batch_size // shards,
                                            micro_batches=t.grad_accum_steps, agree=agree_across_processes)

    @property
    def packing_shards(self) -> int:
        """Blocks the packing maps are cut in: the data-parallel devices of the run's mesh."""
        return data_parallel_shards(self.config)

    def packing(self, batch, prefix: str) -> TokenPacking | None:
        """The (traced) batch's packing of the ``{prefix}`` encoder input, or None (see :func:`add_packing`)."""
        return batch_packing(batch, prefix, self.packing_shards if self.config.model.unpad else 1)

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
        search over the dev passages' embeddings (``dev_passage_embeddings``), split over the processes: a
        collective that every process calls; process 0 returns the numbers, the others ``{}``."""
        if not self.has_retrieval_eval():
            return None
        d = self.config.data
        if self._dev_recall is None:
            self._dev_recall = DevRecall(d.dev_qa, d.dev_passages, d.dev_k, d.dev_match_type)
        dev = self._dev_recall
        questions = encode_texts(self._dev_encoder("question_encoder", model), self.tokenizer, dev.questions,
                                 max_length=d.max_question_length, as_questions=True, buckets=(), progress=False)
        search, ids = self.dev_passage_embeddings(model, dev)
        return dev(questions, search, ids)

    def dev_passage_embeddings(self, model, dev: DevRecall) -> tuple[SplitSearch, list[str]]:
        """(search over the dev passages' embeddings, passage ids): this process encodes its share of the dev
        passages (``process_rows``) with the current context encoder, again at every evaluation while it trains
        (fine for a small dev corpus; for a large one freeze it), once when it is frozen; they are ranked on the
        host (``exact_top_k`` over its rows) and merged over the processes."""
        trained = "context_encoder" in self.trainable_submodules()
        if self._dev_passage_cache is not None and not trained:
            return self._dev_passage_cache
        passages = dev.passages()
        start, stop = process_rows(len(passages), jax.process_index(), jax.process_count())
        mine = passages[start:stop]
        encoder = self._dev_encoder("context_encoder", model)
        vectors = encode_texts(encoder, self.tokenizer, [p["text"] for p in mine], titles=[p["title"] for p in mine],
                               max_length=self.config.data.max_passage_length, buckets=(), progress=False) \
            if mine else np.zeros((0, self._dev_dim(model)), np.float32)
        search = SplitSearch(ProcessRows(vectors, start, stop, source_first=start), len(passages))
        self._dev_passage_cache = (search, [p["id"] for p in passages])
        return self._dev_passage_cache

    def _dev_dim(self, model) -> int:
        """The context encoder's embedding width, for a process with no dev passage to encode."""
        return int(encode_texts(self._dev_encoder("context_encoder", model), self.tokenizer, ["x"], titles=[""],
                                max_length=self.config.data.max_passage_length, buckets=(),
                                progress=False).shape[1])

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

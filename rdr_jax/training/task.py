"""The interface between the training engine and a training objective, and the registry of objectives.

The engine (``rdr_jax.training``) knows nothing of any model. A task:

- declares its config sections (``task``, ``model``, ``data``) as typed dataclasses;
- builds its model(s) as one ``nnx.Module`` whose direct children are named submodules
  (``question_encoder``, ``context_encoder``, ``teacher``, ...), and says which of them train;
- maps a batch dict of arrays to a scalar loss and a dict of scalar metrics;
- gives iterators of numpy batch dicts (optionally with ``get_state()``/``set_state()`` for exact resume);
- exports the trained submodules in Hugging Face format;
- counts the FLOPs of one training step from its batch's shapes (``step_flops``), for the logged MFU.

Batches are dicts of arrays whose leading axis is per-question, grouped: a field with ``G`` rows per
question has ``B * G`` rows, question ``i`` owning rows ``i*G .. i*G+G-1``. Fields listed in
``index_fields`` hold row indices into another field (e.g. ``positive_index`` into the passages); they are
re-based when the batch is split into micro-batches.

Objectives register with ``@register_task``; the engine never imports them (``rdr_jax.tasks`` finds the built-in
ones by name), so a user's own objective plugs in the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rdr_jax.data.batching import DevBatches, EpochIterator
from rdr_jax.training.config import Config, Section, TaskSection, option

log = logging.getLogger(__name__)

TASKS: dict[str, type["Task"]] = {}


def register_task(cls):
    """Class decorator: make ``cls`` the task named ``cls.name`` in config files (``task.name``)."""
    TASKS[cls.name] = cls
    return cls


class ModelBundle(nnx.Module):
    """The task's models as named children, so one split/merge covers them all."""

    def __init__(self, **submodules: nnx.Module):
        for name, module in submodules.items():
            setattr(self, name, module)
        self.names = tuple(submodules)


class Task:
    name: ClassVar[str]
    # Batch field whose leading size is the number of questions (examples) in the batch.
    question_field: ClassVar[str] = "q_input_ids"
    # {index field: the field whose rows it indexes (or a tuple of alternatives, the first present is used)}
    index_fields: ClassVar[dict[str, str | tuple[str, ...]]] = {}
    # Batch fields that are token masks (1 = a real token, 0 = padding), for the real vs padded tokens/s the
    # loop logs; None: every ``*attention_mask`` field.
    token_mask_fields: ClassVar[tuple[str, ...] | None] = None
    # The training mesh, set by the engine before build_model: models load straight onto it, each parameter
    # sharded as the train state holds it (``from_pretrained(..., mesh=self.mesh)``). None outside training.
    mesh = None

    def __init__(self, config, workdir: str | Path):
        self.config = config
        self.workdir = Path(workdir)

    # ---- config ----------------------------------------------------------------------------------------------
    @classmethod
    def config_sections(cls) -> dict[str, type[Section]]:
        """The task's typed config sections: ``{"task": ..., "model": ..., "data": ...}`` (frozen dataclasses whose
        fields are declared with ``training.config.option``: type, default, bounds, allowed values)."""
        return {"task": TaskSection, "model": Section, "data": Section}

    @classmethod
    def validate_config(cls, config: Config) -> None:
        """Cross-section checks: raise ConfigError naming the key when a combination of values cannot work."""

    # ---- model -----------------------------------------------------------------------------------------------
    def build_model(self) -> ModelBundle:
        raise NotImplementedError

    def trainable_submodules(self) -> tuple[str, ...]:
        raise NotImplementedError

    def bundle(self, **models: nnx.Module) -> ModelBundle:
        """``ModelBundle(**models)``, remembering each model's config and compute settings (``model_specs``:
        ``{name: (config, ComputeSettings)}``) for :meth:`step_flops`; no reference to the modules is kept."""
        self.model_specs = {name: (m.config, m.compute) for name, m in models.items()}
        return ModelBundle(**models)

    # ---- compute accounting ----------------------------------------------------------------------------------
    def step_flops(self, batch_shapes: dict[str, tuple[int, ...]]) -> float | None:
        """Analytic FLOPs of one training step on a global batch of these shapes (``{field: shape}``), from the
        models' configs (``model_specs``, set by :meth:`bundle` in ``build_model``): see
        :mod:`rdr_jax.training.model_flops` for what is counted. The loop logs ``flops_per_step`` and ``mfu``
        from it; None (the default, e.g. a user's task that does not count) logs neither."""
        return None

    def trainable_filter(self):
        """nnx filter selecting the trained parameters: everything else is frozen (no optimizer state)."""
        names = set(self.trainable_submodules())
        return lambda path, x: isinstance(x, nnx.Param) and bool(path) and str(path[0]) in names

    # ---- objective -------------------------------------------------------------------------------------------
    def loss(self, model: ModelBundle, batch: dict[str, jax.Array], *, rngs: nnx.Rngs | None,
             deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError

    # ---- cached in-batch negatives (optional: train.grad_cache_chunk, training/grad_cache.py) ----------------
    def embed(self, model: ModelBundle, batch: dict[str, jax.Array], *, rngs: nnx.Rngs | None,
              deterministic: bool) -> dict[str, jax.Array]:
        """The embeddings through which alone ``loss`` depends on the trained parameters and the batch's rows:
        ``{name: [rows, ...]}``, rows grouped per question like batch fields. Implemented by the tasks that
        support GradCache (with :meth:`loss_from_embeddings`)."""
        raise NotImplementedError

    def loss_targets(self, model: ModelBundle, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        """Per-question inputs of the loss that frozen models compute in the step (no gradient), e.g. RDR's
        in-step teacher: under GradCache run once per chunk, in the forward pass only. Default: none."""
        return {}

    def loss_from_embeddings(self, model: ModelBundle, batch: dict[str, jax.Array], embeddings: dict[str, jax.Array],
                             targets: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``loss`` given the whole batch's :meth:`embed` and :meth:`loss_targets` outputs."""
        raise NotImplementedError

    def embed_loss(self, model, batch, *, rngs, deterministic):
        """``loss`` as the composition GradCache splits: embed, targets, loss from embeddings."""
        embeddings = self.embed(model, batch, rngs=rngs, deterministic=deterministic)
        return self.loss_from_embeddings(model, batch, embeddings, self.loss_targets(model, batch))

    @classmethod
    def supports_grad_cache(cls) -> bool:
        return cls.embed is not Task.embed and cls.loss_from_embeddings is not Task.loss_from_embeddings

    def split_microbatches(self, batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
        """Split into ``n`` micro-batches (new leading axis), question ``i`` going to micro-batch ``i % n``.

        Interleaving keeps every micro-batch spread over all data-parallel devices. Losses that are means
        over independent questions give exactly the full batch's gradient when averaged.
        """
        num_q = batch[self.question_field].shape[0]
        if num_q % n:
            raise ValueError(f"batch of {num_q} questions is not divisible into {n} micro-batches")
        per = num_q // n
        groups = {}
        out = {}
        for key, value in batch.items():
            if value.shape[0] % num_q:
                raise ValueError(f"batch field {key!r}: {value.shape[0]} rows is not a multiple of the "
                                 f"{num_q} questions")
            g = groups[key] = value.shape[0] // num_q
            x = value.reshape((per, n, g) + value.shape[1:])
            x = jnp.swapaxes(x, 0, 1)
            out[key] = x.reshape((n, per * g) + value.shape[1:])
        for key, targets in self.index_fields.items():
            if key not in batch:
                continue
            targets = (targets,) if isinstance(targets, str) else targets
            g = groups[next(t for t in targets if t in groups)]
            q = jnp.arange(num_q)
            local = batch[key] - q * g + (q // n) * g   # question i sits at position i // n of its micro-batch
            local = jnp.where(batch[key] < 0, batch[key], local)
            out[key] = jnp.swapaxes(local.reshape(per, n), 0, 1)
        return out

    # ---- data ------------------------------------------------------------------------------------------------
    def train_iterator(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def dev_batches(self, batch_size: int) -> Iterable[dict[str, np.ndarray]] | None:
        """Batches for periodic dev evaluation (loss and metrics, deterministic), or None."""
        return None

    # ---- retrieval evaluation (optional) ---------------------------------------------------------------------
    def has_retrieval_eval(self) -> bool:
        """Whether ``retrieval_eval`` has something to measure (its dev data is configured). The loop asks
        before it gathers sharded parameters for it."""
        return False

    def retrieval_eval(self, model: ModelBundle) -> dict[str, float] | None:
        """The pipeline's metrics of the current model on a dev set, e.g. ``{"dev_top1": 45.2, "dev_top5": ..}``
        (top-k answer recall, percent), or None.

        Called by the loop every ``train.eval_every`` steps and at the last step, on every process (so it may
        split its work over them and gather, e.g. ``split_search``), with the current parameters merged into
        ``model`` (host arrays when there are several processes: use ``jax.local_devices()``). Process 0's
        numbers are sent to all processes and go to metrics.jsonl and TensorBoard, and ``train.best_metric`` may
        name one of them (with ``train.best_mode: max``)."""
        return None

    def batch_stats(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        """Examples (questions), real (non-padding) tokens and padded tokens (the masks' sizes) of the token masks
        (``token_mask_fields``) in a host batch, for throughput logging."""
        fields = self.token_mask_fields
        masks = [v for k, v in batch.items() if (k in fields if fields is not None else k.endswith("attention_mask"))]
        return {"examples": int(batch[self.question_field].shape[0]),
                "tokens": sum(int(np.count_nonzero(m)) for m in masks),
                "padded_tokens": sum(int(np.size(m)) for m in masks)}

    # ---- export ----------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer the task's models read, saved beside them by ``export``; None when there is none."""
        return None

    def export(self, model: ModelBundle, out_dir: str | Path) -> list[Path]:
        """Write each trained submodule as a Hugging Face directory ``out_dir/<submodule>/``, with the tokenizer it
        was trained with: the inference commands refuse a model directory without one."""
        written = []
        for name in self.trainable_submodules():
            written.append(getattr(model, name).save_pretrained(Path(out_dir) / name, tokenizer=self.tokenizer))
        return written


@dataclasses.dataclass(frozen=True)
class TrainFiles(Section):
    """``data.train_file`` / ``data.dev_file`` of a FileDataTask (its subclasses add keys)."""
    train_file: str = option(doc="the training examples")
    dev_file: str | None = option(None, doc="dev examples for the periodic dev loss")
    shuffle: bool = option(True)
    workers: int = option(0, min=0, doc="grain worker processes building training batches ahead of the step "
                                        "(0: built on the training thread when needed)")
    prefetch: int = option(2, min=1, doc="batches each worker builds ahead")


class FileDataTask(Task):
    """A task whose examples come from ``data.train_file`` and ``data.dev_file``.

    ``split_data("train" | "dev")`` returns an object with ``len()`` and ``make_batch(indices, rng)``; by
    default ``self._data(path)`` of the split's file. ``batch_maker`` may wrap the training batches' builder
    (the bi-encoders add packing maps there).
    """

    def _data(self, path):
        raise NotImplementedError

    def split_data(self, split: str):
        return self._data(getattr(self.config.data, f"{split}_file"))

    def batch_maker(self, make_batch):
        return make_batch

    @property
    def data_cache(self) -> Path:
        """Where raw data files are converted to random-access datasets (once; see ``data/records.py``)."""
        return self.workdir / "data_cache"

    def train_iterator(self, batch_size: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
        data = self.split_data("train")
        d = self.config.data
        return EpochIterator(len(data), batch_size, seed, self.batch_maker(data.make_batch), shuffle=d.shuffle,
                             workers=getattr(d, "workers", 0), prefetch=getattr(d, "prefetch", 2))

    def dev_batches(self, batch_size):
        if not self.config.data.dev_file:
            return None
        return DevBatches(self.split_data("dev"), batch_size)

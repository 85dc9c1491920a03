"""grain input pipelines: global per-epoch shuffle, per-process shards, bucketed static shapes,
resumable iteration.

    dataset = training_dataset(load(dir, "train"), batch_size=32, seed=0, map_fn=tokenize)
    iterator = iter(dataset)
    batch = next(iterator)
    state = iterator.get_state()   # a small JSON-able dict: save it with the checkpoint
    ...
    iterator = iter(dataset); iterator.set_state(state)   # continues with the very next batch

Order of operations, and why:
  source -> shuffle(seed)      one global permutation per epoch (grain folds the epoch into the seed)
         -> shard slice        process i takes positions i, i+n, ... of each epoch's permutation, so
                               the processes partition every epoch
         -> repeat(epochs)     epochs follow each other without a gap
         -> map(map_fn)        only this process's examples are turned into features
         -> batch(pad)         token fields padded to the smallest bucket that fits, so jit sees a
                               few fixed shapes
Everything up to the batch is a function of the example index, so an iterator's state is just
the next index and restoring it replays exactly what an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

DEFAULT_BUCKETS = (32, 64, 128, 256)
# Keys padded to a bucket: these names, or names ending in "_" + one of them ("question_input_ids").
DEFAULT_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= length; the largest bucket when none fits (the caller truncates)."""
    for bucket in buckets:
        if length <= bucket:
            return bucket
    return buckets[-1]


@dataclasses.dataclass(frozen=True)
class PadToBucket:
    """grain `batch_fn`: stacks examples (flat dicts of arrays) into a batch of static shapes.

    Sequence keys (see DEFAULT_SEQUENCE_KEYS) may differ in their last dimension: they are padded
    with their pad value (0 unless `pad_values` names the key or its suffix) up to the smallest
    bucket holding the batch's longest item, and truncated at the largest bucket. Every other key
    must have the same shape in every example.
    """

    buckets: tuple[int, ...] = DEFAULT_BUCKETS
    sequence_keys: tuple[str, ...] = DEFAULT_SEQUENCE_KEYS
    pad_values: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        buckets = tuple(int(bucket) for bucket in self.buckets)
        if not buckets or any(bucket <= 0 for bucket in buckets) or list(buckets) != sorted(set(buckets)):
            raise ValueError(f"buckets must be positive, increasing and non-empty, got {self.buckets}")
        object.__setattr__(self, "buckets", buckets)
        object.__setattr__(self, "sequence_keys", tuple(self.sequence_keys))
        pad_values = self.pad_values.items() if isinstance(self.pad_values, Mapping) else self.pad_values
        object.__setattr__(self, "pad_values", tuple((str(key), value) for key, value in pad_values))

    def is_sequence_key(self, key: str) -> bool:
        return any(key == name or key.endswith("_" + name) for name in self.sequence_keys)

    def pad_value(self, key: str) -> Any:
        for name, value in self.pad_values:
            if key == name:
                return value
        for name, value in self.pad_values:
            if key.endswith("_" + name):
                return value
        return 0

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
        if not examples:
            raise ValueError("cannot batch zero examples")
        keys = list(examples[0])
        for index, example in enumerate(examples):
            if list(example) != keys:
                raise ValueError(f"example {index} of the batch has keys {sorted(example)}, "
                                 f"the first has {sorted(keys)}")
        batch = {}
        for key in keys:
            values = [np.asarray(example[key]) for example in examples]
            batch[key] = self._pad_and_stack(key, values) if self.is_sequence_key(key) else self._stack(key, values)
        return batch

    @staticmethod
    def _stack(key: str, values: list[np.ndarray]) -> np.ndarray:
        shapes = {value.shape for value in values}
        if len(shapes) > 1:
            raise ValueError(f"field {key!r} has different shapes across the batch {sorted(shapes)}; "
                             "name it in sequence_keys to pad it, or pad it in map_fn")
        return np.stack(values)

    def _pad_and_stack(self, key: str, values: list[np.ndarray]) -> np.ndarray:
        leading = {value.shape[:-1] for value in values}
        if any(value.ndim == 0 for value in values) or len(leading) > 1:
            raise ValueError(f"sequence field {key!r} must be arrays [..., length] with the same leading "
                             f"shape in every example, got shapes {sorted({v.shape for v in values})}")
        length = bucket_length(max(value.shape[-1] for value in values), self.buckets)
        dtype = np.result_type(*values)
        out = np.full((len(values), *values[0].shape[:-1], length), self.pad_value(key), dtype=dtype)
        for row, value in enumerate(values):
            kept = value[..., :length]
            out[row, ..., : kept.shape[-1]] = kept
        return out


def _mark_absl_flags_parsed() -> None:
    # grain 0.2.18's worker processes read an absl flag, which fails in programs that do not run
    # absl.app (google/grain#1355, fixed after 0.2.18); marking the flags parsed keeps their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    shard_index = jax.process_index() if shard_index is None else int(shard_index)
    shard_count = jax.process_count() if shard_count is None else int(shard_count)
    if shard_count < 1 or not 0 <= shard_index < shard_count:
        raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index={shard_index}, "
                         f"shard_count={shard_count}")
    return shard_index, shard_count


def examples_per_shard(num_examples: int, shard_count: int, drop_remainder: bool = True) -> int:
    """Examples one shard sees per epoch (the largest shard's count when not dropping)."""
    return num_examples // shard_count if drop_remainder else -(-num_examples // shard_count)


def steps_per_epoch(num_examples: int, batch_size: int, shard_count: int = 1) -> int:
    """Full batches per epoch for each process (batch_size is the per-process batch)."""
    return examples_per_shard(num_examples, shard_count) // batch_size


def training_dataset(
    source,
    *,
    batch_size: int,
    seed: int,
    map_fn: Callable[[Any], Mapping[str, Any]] | None = None,
    num_epochs: int | None = None,
    shuffle: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    batch_fn: Callable[[Sequence[Any]], Any] | None = None,
    read_options: grain.ReadOptions | None = None,
    worker_count: int = 0,
) -> grain.IterDataset:
    """The input pipeline over a random-access `source` (len, __getitem__; e.g. tfds_format.load).

    batch_size: per-process batch. seed: the shuffle seed (each epoch gets its own permutation).
    num_epochs: None repeats forever. shard_index/shard_count: this process's share, defaulting to
    jax.process_index()/process_count(). drop_remainder: drop the epoch's examples that do not
    divide evenly among shards and the last partial batch, so every process runs the same number of
    steps with the same shapes (training); False keeps every example once per epoch (evaluation).
    batch_fn: defaults to PadToBucket(). worker_count > 0 moves the work into grain worker
    processes (map_fn and source must then be picklable; close() the iterator when done).

    Returns a grain IterDataset; `iter()` of it gives a DatasetIterator with get_state/set_state.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    num_examples = len(source)
    per_shard = examples_per_shard(num_examples, shard_count, drop_remainder)
    if per_shard == 0:
        raise ValueError(f"source has {num_examples} examples, fewer than the {shard_count} shards")

    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    if shard_count > 1:
        # Slicing beyond one epoch continues into the next epoch's permutation (grain's slice
        # maps index i of epoch e to e * len(parent) + ...), so shards stay disjoint every epoch.
        stop = shard_count * per_shard if drop_remainder else num_examples
        dataset = dataset[shard_index:stop:shard_count]
    dataset = dataset.repeat(num_epochs)
    if map_fn is not None:
        dataset = dataset.map(map_fn)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder, batch_fn=batch_fn or PadToBucket())
    iter_dataset = dataset.to_iter_dataset(read_options or grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if worker_count > 0:
        _mark_absl_flags_parsed()
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter_dataset

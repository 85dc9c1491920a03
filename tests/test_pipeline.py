"""The grain training pipeline: seeded global shuffle, shards, bucketed shapes, resumable state."""

import json

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rdr_jax.data import tfds_format
from rdr_jax.data.pipeline import PadToBucket, bucket_length, steps_per_epoch, training_dataset

NUM_EXAMPLES = 23


def _length(example_id):
    # Mostly short, every third one up to 262 long: several buckets, and truncation at 256.
    return 1 + (example_id * 41) % 300 if example_id % 3 == 0 else 1 + example_id


def _to_features(example):
    length = _length(int(example["id"]))
    ids = np.arange(1, length + 1, dtype=np.int32)
    return {"example_id": np.int64(example["id"]), "input_ids": ids, "attention_mask": np.ones_like(ids)}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    features = tfds.features.FeaturesDict({"id": tfds.features.Scalar(np.int64), "text": tfds.features.Text()})
    path = tfds_format.write_dataset(data_dir, "toy", features,
                                     {"train": ({"id": i, "text": f"t{i}"} for i in range(NUM_EXAMPLES))},
                                     max_shard_examples=10, progress=False)
    return tfds_format.load(path, "train")


def _ids(batches):
    return [batch["example_id"].tolist() for batch in batches]


def _take(dataset, n):
    iterator = iter(dataset)
    return [next(iterator) for _ in range(n)]


def _pipeline(source, **overrides):
    options = dict(batch_size=4, seed=0, map_fn=_to_features, shard_index=0, shard_count=1)
    options.update(overrides)
    return training_dataset(source, **options)


def test_same_seed_same_order_different_seed_different(source):
    first = _ids(_take(_pipeline(source, seed=7), 10))
    assert first == _ids(_take(_pipeline(source, seed=7), 10))
    assert first != _ids(_take(_pipeline(source, seed=8), 10))
    flat = [i for batch in first for i in batch]
    assert flat[:NUM_EXAMPLES] != sorted(flat[:NUM_EXAMPLES])  # actually shuffled


def test_each_epoch_is_a_new_permutation(source):
    batches = _ids(_pipeline(source, batch_size=1, num_epochs=3))
    flat = [i for batch in batches for i in batch]
    epochs = [flat[k * NUM_EXAMPLES:(k + 1) * NUM_EXAMPLES] for k in range(3)]
    assert len(flat) == 3 * NUM_EXAMPLES
    for epoch in epochs:
        assert sorted(epoch) == list(range(NUM_EXAMPLES))
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


def test_shards_partition_every_epoch(source):
    shard_count = 3
    per_shard = NUM_EXAMPLES // shard_count
    shards = []
    for shard_index in range(shard_count):
        batches = _ids(_pipeline(source, batch_size=1, num_epochs=2, shard_index=shard_index,
                                 shard_count=shard_count))
        shards.append([i for batch in batches for i in batch])
    assert all(len(shard) == 2 * per_shard for shard in shards)
    for epoch in range(2):
        seen = [i for shard in shards for i in shard[epoch * per_shard:(epoch + 1) * per_shard]]
        assert len(seen) == len(set(seen)) == shard_count * per_shard  # disjoint, remainder dropped
    # Without dropping, the shards together hold every example exactly once.
    everything = []
    for shard_index in range(shard_count):
        batches = _pipeline(source, batch_size=5, num_epochs=1, shuffle=False, drop_remainder=False,
                            shard_index=shard_index, shard_count=shard_count)
        everything += [i for batch in _ids(batches) for i in batch]
    assert sorted(everything) == list(range(NUM_EXAMPLES))


def test_restored_state_yields_exactly_the_remaining_batches(source):
    dataset = _pipeline(source, num_epochs=3)
    uninterrupted = list(dataset)
    assert len(uninterrupted) == 3 * NUM_EXAMPLES // 4
    iterator = iter(dataset)
    for _ in range(7):  # crosses the first epoch boundary
        next(iterator)
    state = json.loads(json.dumps(iterator.get_state()))  # survives a checkpoint as JSON
    resumed = iter(_pipeline(source, num_epochs=3))
    resumed.set_state(state)
    remaining = list(resumed)
    assert len(remaining) == len(uninterrupted) - 7
    for got, expected in zip(remaining, uninterrupted[7:]):
        assert got.keys() == expected.keys()
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])


def test_batches_have_only_bucket_shapes(source):
    buckets = (32, 64, 128, 256)
    shapes, truncated = set(), False
    for batch in _take(_pipeline(source, seed=3, batch_size=2), 30):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape[0] == 2 and ids.shape == mask.shape and ids.shape[1] in buckets
        lengths = [_length(i) for i in batch["example_id"].tolist()]
        assert ids.shape[1] == bucket_length(max(lengths), buckets)
        for row, length in enumerate(lengths):
            kept = min(length, buckets[-1])
            truncated |= length > kept
            np.testing.assert_array_equal(ids[row, :kept], np.arange(1, kept + 1))
            assert not ids[row, kept:].any() and mask[row, :kept].all() and not mask[row, kept:].any()
        shapes.add(ids.shape)
    assert len(shapes) >= 3  # the lengths above really span several buckets
    assert truncated


def test_pad_to_bucket_pads_2d_fields_and_rejects_ragged_others():
    pad = PadToBucket(buckets=(4, 8), pad_values={"input_ids": -1})
    batch = pad([{"ctx_input_ids": np.ones((2, 3), np.int32), "label": 1},
                 {"ctx_input_ids": np.ones((2, 5), np.int32), "label": 0}])
    assert batch["ctx_input_ids"].shape == (2, 2, 8) and batch["ctx_input_ids"].dtype == np.int32
    assert (batch["ctx_input_ids"][0, :, 3:] == -1).all() and (batch["ctx_input_ids"][1, :, :5] == 1).all()
    np.testing.assert_array_equal(batch["label"], [1, 0])
    with pytest.raises(ValueError, match="field 'scores' has different shapes"):
        pad([{"scores": np.zeros(2)}, {"scores": np.zeros(3)}])
    with pytest.raises(ValueError, match="increasing"):
        PadToBucket(buckets=(64, 32))


def test_argument_checks_and_steps(source):
    assert steps_per_epoch(NUM_EXAMPLES, batch_size=4, shard_count=3) == 1
    with pytest.raises(ValueError, match="shard_index < shard_count"):
        _pipeline(source, shard_index=2, shard_count=2)
    with pytest.raises(ValueError, match="fewer than the 30 shards"):
        _pipeline(source, shard_index=0, shard_count=30)


def test_worker_processes_give_the_same_batches_and_resume(source):
    in_process = _ids(_pipeline(source, num_epochs=1))
    dataset = _pipeline(source, num_epochs=1, worker_count=1)
    iterator = iter(dataset)
    try:
        first = [next(iterator) for _ in range(2)]
        state = iterator.get_state()
        rest = list(iterator)
    finally:
        iterator.close()
    assert _ids(first + rest) == in_process
    resumed = iter(dataset)
    try:
        resumed.set_state(state)
        assert _ids(list(resumed)) == in_process[2:]
    finally:
        resumed.close()

"""TFDS array_record datasets written and read without TensorFlow, through the official tfds API."""

import importlib.util
import json
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from rdr_jax.data import tfds_format


def _features():
    return tfds.features.FeaturesDict({
        "id": tfds.features.Scalar(np.int64),
        "text": tfds.features.Text(),
        "token_ids": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        "answers": tfds.features.Sequence(tfds.features.Text()),
        "ctxs": tfds.features.Sequence({"title": tfds.features.Text(),
                                        "score": tfds.features.Scalar(np.float32)}),
    })


def _example(i):
    return {
        "id": i,
        "text": f"passage {i} – naïve",
        "token_ids": list(range(i)),
        "answers": [f"a{j}" for j in range(i % 3)],
        "ctxs": [{"title": f"t{i}-{j}", "score": i + j / 4} for j in range(i % 2 + 1)],
    }


def test_tensorflow_is_not_installed():
    assert importlib.util.find_spec("tensorflow") is None


def test_round_trip_through_official_tfds_api(tmp_path):
    path = tfds_format.write_dataset(
        tmp_path, "toy", _features(),
        {"train": (_example(i) for i in range(7)), "validation": (_example(i) for i in range(10, 12))},
        max_shard_examples=3, progress=False)
    assert path == tmp_path / "toy" / "1.0.0"

    files = sorted(p.name for p in path.iterdir())
    assert "dataset_info.json" in files and "features.json" in files
    shards = [f for f in files if f.startswith("toy-train.")]
    assert shards == [f"toy-train.array_record-{i:05d}-of-00003" for i in range(3)]
    info = json.loads((path / "dataset_info.json").read_text())
    assert info["fileFormat"] == "array_record"
    train_info = next(s for s in info["splits"] if s["name"] == "train")
    assert [int(n) for n in train_info["shardLengths"]] == [3, 3, 1]
    assert not [p for p in tmp_path.joinpath("toy").iterdir() if p.name.startswith(".")]

    # tfds.data_source by name and data_dir, as a user of TFDS would call it.
    source = tfds.data_source("toy", split="train", data_dir=str(tmp_path))
    assert len(source) == 7
    for i in range(7):
        example = source[i]
        expected = _example(i)
        assert example["id"] == i
        assert example["text"] == expected["text"].encode()
        assert isinstance(example["token_ids"], np.ndarray) and example["token_ids"].dtype == np.int32
        np.testing.assert_array_equal(example["token_ids"], expected["token_ids"])
        assert example["answers"] == [a.encode() for a in expected["answers"]]
        assert example["ctxs"]["title"] == [c["title"].encode() for c in expected["ctxs"]]
        np.testing.assert_allclose(example["ctxs"]["score"], [c["score"] for c in expected["ctxs"]])

    builder_sources = tfds.builder_from_directory(str(path)).as_data_source()
    assert len(builder_sources["validation"]) == 2
    assert builder_sources["validation"][1]["id"] == 11
    assert "tensorflow" not in sys.modules


def test_load_decodes_text_and_resolves_version_dir(tmp_path):
    tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": (_example(i) for i in range(4))},
                              progress=False)
    source = tfds_format.load(tmp_path / "toy", "train")  # the NAME dir with one version
    assert len(source) == 4
    example = source[2]
    assert example["text"] == _example(2)["text"]
    assert example["answers"] == ["a0", "a1"] and example["ctxs"]["title"] == ["t2-0"]
    assert source[3]["ctxs"]["title"] == ["t3-0", "t3-1"]
    assert isinstance(example["id"], int)
    raw = tfds_format.load(tmp_path / "toy" / "1.0.0", "train", decode_text=False)
    assert raw[0]["text"] == _example(0)["text"].encode()
    with pytest.raises(KeyError, match="'test' not in dataset"):
        tfds_format.load(tmp_path / "toy", "test")
    with pytest.raises(FileNotFoundError, match="no TFDS dataset"):
        tfds_format.load(tmp_path / "missing", "train")


def test_interrupted_build_leaves_nothing(tmp_path):
    def examples():
        for i in range(5):
            yield _example(i)
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed mid-build"):
        tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": examples()},
                                  max_shard_examples=2, progress=False)
    assert list((tmp_path / "toy").iterdir()) == []


def test_existing_dataset_kept_unless_overwrite(tmp_path):
    first = tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": [_example(1)]}, progress=False)
    with pytest.raises(FileExistsError, match="already exists"):
        tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": [_example(2)]}, progress=False)
    assert tfds_format.load(first, "train")[0]["id"] == 1
    tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": [_example(2), _example(3)]},
                              overwrite=True, progress=False)
    source = tfds_format.load(first, "train")
    assert [source[i]["id"] for i in range(len(source))] == [2, 3]
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["1.0.0"]


def test_bad_example_and_empty_split_errors(tmp_path):
    bad = dict(_example(2), token_ids=[[1, 2]])  # 2-D where the feature is 1-D
    with pytest.raises(ValueError, match=re.escape("split 'train', example 1: cannot encode")):
        tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": [_example(1), bad]}, progress=False)
    with pytest.raises(ValueError, match="split 'train': no examples"):
        tfds_format.write_dataset(tmp_path, "toy", _features(), {"train": []}, progress=False)
    with pytest.raises(ValueError, match="invalid TFDS dataset name"):
        tfds_format.DatasetWriter(tmp_path, "9toy", _features())
    assert list((tmp_path / "toy").iterdir()) == []

"""Datasets in TFDS's on-disk format (array_record shards), written and read without TensorFlow.

Layout written, the one `tfds.data_source(name, data_dir=...)` and
`tfds.builder_from_directory(dir).as_data_source()` read::

    DATA_DIR/NAME/VERSION/
        dataset_info.json
        features.json
        NAME-SPLIT.array_record-00000-of-00003
        ...

Examples are encoded by the tfds `FeaturesDict` itself and serialised as `tf.train.Example`
protos by tfds's own `ExampleSerializer`, which builds them from the proto modules tfds ships
(`tensorflow_datasets.proto`), so no TensorFlow is needed on either side. Records are written with
`group_size:1`, as tfds does, so every example can be read at random.

Writing streams: examples go to disk as they come and shards close when they reach a size, so a
21M-row corpus never sits in memory. A build goes into a hidden temporary directory next to the
target and is renamed into place only when every split and the metadata are written, so an
interrupted build leaves nothing that looks like a dataset.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import dataset_info as tfds_dataset_info
from tensorflow_datasets.core import example_serializer
from tensorflow_datasets.core import naming as tfds_naming
from tensorflow_datasets.core import splits as tfds_splits
from tensorflow_datasets.core import utils as tfds_utils
from tqdm.auto import tqdm

FILE_FORMAT = "array_record"
DEFAULT_VERSION = "1.0.0"
# tfds recommends shards well under 1 GiB; 256 MiB keeps the file count small for a 21M-row corpus.
DEFAULT_MAX_SHARD_BYTES = 256 * 1024 * 1024
# What tfds's name and shard-file patterns accept (tensorflow_datasets/core/naming.py).
_DATASET_NAME = re.compile(r"[a-zA-Z]\w*")
_SPLIT_NAME = re.compile(r"\w[\w-]*")


def shard_filename(name: str, split: str, index: int, num_shards: int) -> str:
    """tfds's default template: {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}."""
    return f"{name}-{split}.{FILE_FORMAT}-{index:05d}-of-{num_shards:05d}"


class _SplitWriter:
    """Streams serialised examples of one split into size-bounded array_record shards.

    The total number of shards is only known at the end, so shards are written under provisional
    names and renamed to tfds's `-XXXXX-of-YYYYY` names by `finish`.
    """

    def __init__(self, directory: Path, name: str, split: str, max_shard_bytes: int,
                 max_shard_examples: int | None):
        self._directory = directory
        self._name = name
        self._split = split
        self._max_shard_bytes = max_shard_bytes
        self._max_shard_examples = max_shard_examples
        self._writer = None
        self._provisional_paths: list[Path] = []
        self.shard_lengths: list[int] = []
        self.num_bytes = 0
        self._shard_bytes = 0

    def _open_shard(self) -> None:
        path = self._directory / f".{self._name}-{self._split}.shard-{len(self._provisional_paths):05d}"
        self._provisional_paths.append(path)
        self._writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")
        self.shard_lengths.append(0)
        self._shard_bytes = 0

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def write(self, record: bytes) -> None:
        if self._writer is None:
            self._open_shard()
        self._writer.write(record)
        self.shard_lengths[-1] += 1
        self._shard_bytes += len(record)
        self.num_bytes += len(record)
        full_by_bytes = self._shard_bytes >= self._max_shard_bytes
        full_by_count = (self._max_shard_examples is not None
                         and self.shard_lengths[-1] >= self._max_shard_examples)
        if full_by_bytes or full_by_count:
            self._close_shard()

    def finish(self) -> None:
        self._close_shard()
        num_shards = len(self._provisional_paths)
        for index, path in enumerate(self._provisional_paths):
            path.rename(self._directory / shard_filename(self._name, self._split, index, num_shards))

    def abort(self) -> None:
        self._close_shard()


class DatasetWriter:
    """Writes one TFDS dataset (several splits) in array_record format, atomically.

    Use as a context manager::

        with DatasetWriter(data_dir, "dpr_passages", features) as writer:
            writer.write_split("train", examples)
        writer.path  # DATA_DIR/dpr_passages/1.0.0

    On an exception inside the block the temporary directory is removed and nothing is renamed.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        name: str,
        features: tfds.features.FeaturesDict,
        *,
        version: str = DEFAULT_VERSION,
        description: str = "",
        overwrite: bool = False,
        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
        max_shard_examples: int | None = None,
        progress: bool = True,
    ):
        if not _DATASET_NAME.fullmatch(name):
            raise ValueError(f"invalid TFDS dataset name {name!r}: use letters, digits and underscores, "
                             "starting with a letter")
        self.name = name
        self.features = features
        self.version = str(tfds_utils.Version(version))
        self.description = description
        self.path = Path(data_dir) / name / self.version
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"dataset already exists: {self.path} (pass overwrite=True to replace it)")
        self._overwrite = overwrite
        self._max_shard_bytes = max_shard_bytes
        self._max_shard_examples = max_shard_examples
        self._progress = progress
        self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        self._split_infos: list[tfds_splits.SplitInfo] = []
        self._tmp_path: Path | None = None

    def __enter__(self) -> DatasetWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp_path = self.path.parent / f".{self.version}.incomplete-{uuid.uuid4().hex}"
        self._tmp_path.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self._finalize()
        elif self._tmp_path is not None:
            shutil.rmtree(self._tmp_path, ignore_errors=True)

    def serialize(self, example: Mapping[str, Any]) -> bytes:
        return self._serializer.serialize_example(self.features.encode_example(example))

    def write_split(self, split: str, examples: Iterable[Mapping[str, Any]], *, total: int | None = None) -> int:
        """Streams `examples` into the split's shards; returns the number written."""
        if self._tmp_path is None:
            raise RuntimeError("DatasetWriter.write_split must be called inside a `with` block")
        if any(info.name == split for info in self._split_infos):
            raise ValueError(f"split {split!r} of dataset {self.name!r} was already written")
        if not _SPLIT_NAME.fullmatch(split):
            raise ValueError(f"invalid split name {split!r}: use letters, digits, '_' and '-'")
        writer = _SplitWriter(self._tmp_path, self.name, split, self._max_shard_bytes, self._max_shard_examples)
        bar = tqdm(examples, total=total, desc=f"{self.name}/{split}", unit=" rows", unit_scale=True,
                   disable=not self._progress, mininterval=1.0)
        try:
            for index, example in enumerate(bar):
                try:
                    record = self.serialize(example)
                except Exception as error:  # re-raised with the place it happened
                    raise ValueError(f"dataset {self.name!r}, split {split!r}, example {index}: "
                                     f"cannot encode with the dataset's features: {error}") from error
                writer.write(record)
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        if not writer.shard_lengths:
            # tfds's array_record source refuses a split without files, so an empty split is unreadable.
            raise ValueError(f"dataset {self.name!r}, split {split!r}: no examples (empty input?)")
        writer.finish()
        template = tfds_naming.ShardedFileTemplate(data_dir=self.path, dataset_name=self.name, split=split,
                                                   filetype_suffix=FILE_FORMAT)
        self._split_infos.append(tfds_splits.SplitInfo(name=split, shard_lengths=writer.shard_lengths,
                                                       num_bytes=writer.num_bytes, filename_template=template))
        return sum(writer.shard_lengths)

    def _finalize(self) -> None:
        if not self._split_infos:
            shutil.rmtree(self._tmp_path, ignore_errors=True)
            raise ValueError(f"dataset {self.name!r}: no split was written")
        identity = tfds_dataset_info.DatasetIdentity(
            name=self.name, version=tfds_utils.Version(self.version), data_dir=os.fspath(self.path),
            module_name=__name__)
        info = tfds_dataset_info.DatasetInfo(
            builder=identity, description=self.description, features=self.features,
            split_dict=tfds_splits.SplitDict(self._split_infos),
            # Examples keep the order they were read in; shuffling is the input pipeline's job.
            disable_shuffling=True)
        info.set_file_format(FILE_FORMAT)
        info.write_to_directory(self._tmp_path)
        self._move_into_place()

    def _move_into_place(self) -> None:
        old = None
        if self.path.exists():
            if not self._overwrite:
                shutil.rmtree(self._tmp_path, ignore_errors=True)
                raise FileExistsError(f"dataset appeared while writing: {self.path}")
            old = self.path.parent / f".{self.version}.replaced-{uuid.uuid4().hex}"
            self.path.rename(old)
        self._tmp_path.rename(self.path)
        self._tmp_path = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_dataset(
    data_dir: str | os.PathLike,
    name: str,
    features: tfds.features.FeaturesDict,
    splits: Mapping[str, Iterable[Mapping[str, Any]]],
    **writer_options,
) -> Path:
    """Writes every split of `splits` (split name -> iterable of example dicts); returns the dataset dir."""
    with DatasetWriter(data_dir, name, features, **writer_options) as writer:
        for split, examples in splits.items():
            writer.write_split(split, examples)
    return writer.path


def _decode_text(value: Any) -> Any:
    """tfds returns Text features as bytes; the pipeline wants str."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {key: _decode_text(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_decode_text(item) for item in value]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode_text(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


class TextDecodedSource:
    """A random-access source (len, __getitem__) over a tfds data source, with text as `str`.

    Picklable (it holds only the tfds source), so grain may hand it to worker processes.
    """

    def __init__(self, source):
        self._source = source

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return _decode_text(self._source[index])

    def __getitems__(self, indices):
        return [_decode_text(example) for example in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"TextDecodedSource({self._source!r})"


def resolve_dataset_dir(path: str | os.PathLike) -> Path:
    """Accepts DATA_DIR/NAME/VERSION, or DATA_DIR/NAME when it holds exactly one version."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    if path.is_dir():
        versions = sorted(child for child in path.iterdir()
                          if not child.name.startswith(".") and (child / "dataset_info.json").is_file())
        if len(versions) == 1:
            return versions[0]
        if len(versions) > 1:
            raise ValueError(f"{path} holds several versions ({', '.join(v.name for v in versions)}): "
                             "pass the version directory")
    raise FileNotFoundError(f"no TFDS dataset at {path}: expected a directory with dataset_info.json")


def load(data_dir: str | os.PathLike, split: str, *, decode_text: bool = True):
    """Random-access source (len, __getitem__) of one split, read through the official tfds API.

    `data_dir` is the dataset directory (DATA_DIR/NAME/VERSION, or DATA_DIR/NAME with one version).
    Values come back as numpy arrays / python scalars; Text features as `str` unless
    `decode_text=False` (then bytes, as tfds gives them).
    """
    directory = resolve_dataset_dir(data_dir)
    builder = tfds.builder_from_directory(os.fspath(directory))
    if split not in builder.info.splits:
        raise KeyError(f"split {split!r} not in dataset {directory} (splits: {', '.join(builder.info.splits)})")
    source = builder.as_data_source(split=split)
    return TextDecodedSource(source) if decode_text else source

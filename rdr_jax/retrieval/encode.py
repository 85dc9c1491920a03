"""Corpus and question encoding with a DPR encoder, through the inference runner (rdr_jax.retrieval.runner).

The corpus is written in shards (``embeddings-00000.npy`` + ``ids-00000.json``) so an interrupted run
resumes at the first missing shard; each shard is written to a temporary name and renamed. Several processes
split the shards between them (``encode_corpus(..., shard_index=, shard_count=)``): independent jobs mark their
part done and the last one marks the encoding complete; processes of one ``jax.distributed`` run leave that to
the caller, which calls :func:`finish_encoding` on process 0 after a barrier. The passages come from a TSV
stream or a tokenised :class:`~rdr_jax.data.corpus_store.CorpusStore`, of which a process reads only its
shards' rows.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from rdr_jax.data.corpus_store import CorpusStore, corpus_fingerprint
from rdr_jax.data.token_rows import passage_rows, question_rows
from rdr_jax.data.tokenization import DEFAULT_BUCKETS
from rdr_jax.models.packing import TokenPacking
from rdr_jax.retrieval.runner import DEFAULT_LENGTH_STEP, InferenceRunner, TokenizePool

META = "meta.json"
__all__ = ["DEFAULT_BUCKETS", "ShardedRunner", "Encoder", "encode_texts", "encode_corpus", "finish_encoding",
           "corpus_fingerprint", "check_encoding_dir", "complete_encoding_meta", "load_encoded", "encoded_ids",
           "iter_shards", "completed_shards"]

# Texts per chunk handed to the runner: rows are sorted by length within a chunk, so a large chunk pads little.
TEXT_CHUNK = 8192


class ShardedRunner:
    """Applies a model to fixed-size batches, data-parallel over every device, and returns numpy arrays.

    The batch is padded to a multiple of the device count (and callers bucket the length), so jit compiles
    once per shape; parameters are replicated, rows sharded over a 1-D ``data`` mesh. ``output_fn`` picks the
    arrays to return from the model output (a pytree of ``[rows, ...]`` arrays).

    On one device, a model that ``supports_packing`` runs on the batch's real tokens only
    (:mod:`rdr_jax.models.packing`; up to ``TokenPacking.for_batch``'s 16 compiled sizes per batch shape).
    Over several devices the rows stay padded: packed rows would not line up with the row sharding.
    """

    INPUTS = ("input_ids", "attention_mask", "token_type_ids")

    def __init__(self, model: nnx.Module, output_fn, batch_size: int, devices: Sequence | None = None,
                 model_kwargs: dict | None = None):
        devices = list(devices or jax.local_devices())  # this process's chips: a multi-host slice too
        model_kwargs = dict(model_kwargs or {})
        self.mesh = Mesh(np.array(devices), ("data",))
        n = len(devices)
        self.batch_size = max(n, (batch_size + n - 1) // n * n)
        self.row_sharding = NamedSharding(self.mesh, P("data"))
        self.packs = n == 1 and getattr(model, "supports_packing", False)
        graphdef, params = nnx.split(model)
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))

        @jax.jit
        def apply(params, input_ids, attention_mask, token_type_ids, packing):
            kw = model_kwargs if packing is None else {**model_kwargs, "packing": packing}
            return output_fn(nnx.merge(graphdef, params)(input_ids, attention_mask, token_type_ids, **kw))

        self._apply = apply

    def __call__(self, batch: dict[str, np.ndarray]):
        rows = batch["input_ids"].shape[0]
        if rows > self.batch_size:
            parts = [self({k: v[i:i + self.batch_size] for k, v in batch.items()})
                     for i in range(0, rows, self.batch_size)]
            return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        padded = {k: np.zeros((self.batch_size,) + batch[k].shape[1:], batch[k].dtype) for k in self.INPUTS}
        for k in padded:
            padded[k][:rows] = batch[k]
        padded["attention_mask"][rows:, 0] = 1  # keep padding rows well-defined
        arrays = [jax.device_put(padded[k], self.row_sharding) for k in self.INPUTS]
        packing = TokenPacking.for_batch(padded["attention_mask"]) if self.packs else None
        return jax.tree.map(lambda x: np.asarray(x)[:rows], self._apply(self.params, *arrays, packing))


class Encoder:
    """Embeds rows with a DPR encoder's ``pooler_output`` (float32 ``[rows, dim]``) through an
    :class:`~rdr_jax.retrieval.runner.InferenceRunner` over this process's devices.

    The embedding is the [CLS] state, so a BERT-family encoder computes only that row in its last layer.
    ``tokenize_workers`` threads tokenise ahead of the devices (default: one per core)."""

    def __init__(self, model: nnx.Module, batch_size: int, devices: Sequence | None = None, *,
                 length_step: int = DEFAULT_LENGTH_STEP, tokenize_workers: int | None = None,
                 measure_busy: bool = False):
        kw = {"cls_only": True} if getattr(model, "supports_packing", False) else None
        self.runner = InferenceRunner(model, lambda out: out.pooler_output.astype(jnp.float32), batch_size,
                                      devices=devices, model_kwargs=kw, length_step=length_step,
                                      measure_busy=measure_busy)
        self.pool = TokenizePool(tokenize_workers)

    @property
    def batch_size(self) -> int:
        return self.runner.batch_size

    @property
    def mesh(self) -> Mesh:
        return self.runner.mesh

    @property
    def params(self):
        return self.runner.params

    @params.setter
    def params(self, value) -> None:  # the training loop swaps in new weights: same graph, no recompilation
        self.runner.params = value


def encode_texts(encoder: Encoder, tokenizer, texts: Sequence[str], *, titles: Sequence[str] | None = None,
                 max_length: int = 256, as_questions: bool = False, buckets: Sequence[int] | None = None,
                 progress: bool = True, desc: str = "encoding") -> np.ndarray:
    """Embeddings ``[len(texts), dim]`` float32 for questions or passages, in the order of ``texts``.

    ``buckets=()`` pads every batch to ``max_length`` (one compiled shape): the training loop's dev evaluation
    and the exported encoder's check then run one program; otherwise batches pad to the runner's length step."""
    texts = list(texts)
    if titles is not None and len(titles) != len(texts):
        raise ValueError(f"encode_texts: {len(titles)} titles for {len(texts)} texts")

    def tokenize(span: range):
        def piece(rows: list[int]):
            chunk = [texts[i] for i in rows]
            if as_questions:
                return question_rows(tokenizer, chunk, max_length)
            return passage_rows(tokenizer, None if titles is None else [titles[i] for i in rows], chunk, max_length)
        return encoder.pool.rows(piece, list(span))

    chunks = ((start, range(start, min(start + TEXT_CHUNK, len(texts)))) for start in range(0, len(texts), TEXT_CHUNK))
    out = []
    with tqdm(total=len(texts), desc=desc, unit="txt", disable=not progress) as bar:
        step = max_length if buckets is not None and not len(buckets) else None
        for _, emb in encoder.runner.map(chunks, max_length=max_length, prepare=tokenize, length_step=step):
            out.append(emb)
            bar.update(len(emb))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _shard_paths(out_dir: Path, index: int) -> tuple[Path, Path]:
    return out_dir / f"embeddings-{index:05d}.npy", out_dir / f"ids-{index:05d}.json"


def completed_shards(out_dir: Path) -> int:
    n = 0
    while all(p.is_file() for p in _shard_paths(out_dir, n)):
        n += 1
    return n


def _done_path(out_dir: Path, index: int, count: int) -> Path:
    return out_dir / f"done-{index:05d}-of-{count:05d}.json"


def _same_corpus(recorded: dict, corpus: dict) -> bool:
    return all(recorded.get(k) == corpus.get(k) for k in ("size", "sha256_head_tail"))


def check_encoding_dir(out_dir: Path, *, model_name: str, max_length: int, shard_size: int, fp16: bool,
                       shard_count: int = 1, corpus: dict | None = None) -> dict:
    """The settings an encoding records; refuses an ``out_dir`` holding an encoding made with other settings
    or of another corpus (callers check this before loading the model)."""
    settings = {"model": model_name, "max_length": max_length, "shard_size": shard_size,
                "dtype": "float16" if fp16 else "float32"}
    if shard_count > 1:
        settings["process_shards"] = shard_count
    meta_path = Path(out_dir) / META
    if meta_path.is_file():
        previous = json.loads(meta_path.read_text())
        changed = {k: (previous.get(k), v) for k, v in settings.items() if previous.get(k) != v}
        if changed:
            raise ValueError(f"{out_dir}: holds an encoding made with other settings {changed}; "
                             "use another output directory")
        recorded = previous.get("corpus")
        if corpus is not None and recorded is not None and not _same_corpus(recorded, corpus):
            raise ValueError(f"{out_dir}: holds an encoding of another corpus ({recorded.get('path')}, "
                             f"{recorded.get('size')} bytes), not {corpus['path']} ({corpus['size']} bytes); "
                             "use another output directory")
    return settings


def encode_corpus(encoder: Encoder, tokenizer, passages: Iterable[dict] | CorpusStore, out_dir: str | os.PathLike, *,
                  max_length: int = 256, shard_size: int = 50_000, fp16: bool = False, total: int | None = None,
                  model_name: str = "", progress: bool = True, shard_index: int = 0, shard_count: int = 1,
                  corpus: dict | None = None, finalize: bool = True) -> Path:
    """Encode ``passages`` (dicts with id, title, text, or a :class:`CorpusStore`) into shards under
    ``out_dir``; resumable.

    A rerun skips the shards already on disk; the input must be the same corpus: ``corpus`` (a
    :func:`corpus_fingerprint` of the passages file; a store's own ``source`` by default) is recorded in
    meta.json and a different corpus is refused before anything is written, and every shard on disk is checked
    against the passage ids of its rows. Split over processes (``shard_index`` of ``shard_count``), each
    process encodes the shard files ``g`` with ``g % shard_count == shard_index`` (file names are the global
    shard numbers: no collisions), reading only those rows from a store. With ``finalize`` (independent jobs)
    each marks its part done and the last to finish marks the encoding complete; without it (the processes of
    one ``jax.distributed`` run) the caller calls :func:`finish_encoding` once every process has returned.
    """
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, shard_count={shard_count})")
    if shard_size < 1 or max_length < 1:
        raise ValueError(f"shard_size ({shard_size}) and max_length ({max_length}) must be >= 1")
    out_dir = Path(out_dir)
    store = passages if isinstance(passages, CorpusStore) else None
    if store is not None:
        store.check_tokenizer(tokenizer, max_length)
        corpus = corpus or store.source
        total = len(store)
    settings = check_encoding_dir(out_dir, model_name=model_name, max_length=max_length, shard_size=shard_size,
                                  fp16=fp16, shard_count=shard_count if finalize else 1, corpus=corpus)
    meta_path = out_dir / META
    if store is None:
        passages = iter(passages)
        first = next(passages, None)
        if first is None:
            raise ValueError("no passages to encode (the corpus is empty)")
        passages = itertools.chain([first], passages)
    if corpus is not None:
        settings["corpus"] = corpus
    done = completed_shards(out_dir)
    if done and shard_count == 1:
        print(f"[encode] resuming: {done} shard(s) ({done * shard_size} passages) already in {out_dir}")
    meta_written = False

    def start_writing():  # nothing is written (meta.json included) until a shard is about to be
        nonlocal meta_written
        if not meta_written and (not meta_path.is_file() or shard_count == 1):
            out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(meta_path, json.dumps({**settings, "complete": False}, indent=2))
        meta_written = True

    bar = tqdm(total=total, desc="encoding passages" + (f" (part {shard_index + 1}/{shard_count})"
                                                        if shard_count > 1 else ""),
               unit="psg", disable=not progress, smoothing=0.1)
    seen = {"shards": 0, "rows": 0}

    def pending():
        """(shard, ids) and its rows for each shard this process still has to encode; runs on the runner's
        producer thread, so reading the TSV overlaps the devices."""
        shards = (((g, start, min(start + shard_size, len(store))) for g, start in
                   enumerate(range(0, len(store), shard_size))) if store is not None else
                  ((g, rows, None) for g, rows in enumerate(iter(lambda: list(itertools.islice(passages, shard_size)), []))))
        for g, rows, stop in shards:
            emb_path, ids_path = _shard_paths(out_dir, g)
            mine = g % shard_count == shard_index
            on_disk = emb_path.is_file() and ids_path.is_file()
            size = (stop - rows) if store is not None else len(rows)
            if mine or on_disk:  # another process's shard not on disk: its rows are never read from a store
                ids = store.ids(rows, stop) if store is not None else [r["id"] for r in rows]
                if on_disk:
                    _check_shard_ids(ids_path, ids, seen["rows"])
                if mine and not on_disk:
                    yield (g, ids), (rows, stop)
            if not (mine and not on_disk):
                bar.update(size)
            seen["shards"], seen["rows"] = g + 1, seen["rows"] + size

    def prepare(payload):
        rows, stop = payload
        if store is not None:
            return store.token_rows(rows, stop)
        return encoder.pool.rows(lambda chunk: passage_rows(tokenizer, [r["title"] for r in chunk],
                                                            [r["text"] for r in chunk], max_length), rows)

    encoded, t0, dim = 0, time.time(), None
    for (g, ids), emb in encoder.runner.map(pending(), max_length=max_length, prepare=prepare):
        start_writing()
        emb_path, ids_path = _shard_paths(out_dir, g)
        _atomic_save_npy(emb_path, emb.astype(np.float16 if fp16 else np.float32))
        _atomic_write(ids_path, json.dumps(ids))
        encoded += len(ids)
        dim = dim or int(emb.shape[1])
        bar.update(len(ids))
    bar.close()
    shard, count = seen["shards"], seen["rows"]
    if completed_shards(out_dir) > shard:
        raise ValueError(f"{out_dir}: holds {completed_shards(out_dir)} shards but the corpus fills {shard}; "
                         "it is an encoding of a longer corpus, use another output directory")
    start_writing()
    if not finalize:
        return out_dir
    if dim is None:
        dim = next((int(np.load(_shard_paths(out_dir, g)[0], mmap_mode="r").shape[1])
                    for g in range(shard_index, shard, shard_count) if _shard_paths(out_dir, g)[0].is_file()), None)
    elapsed = max(time.time() - t0, 1e-9)
    _atomic_write(_done_path(out_dir, shard_index, shard_count),
                  json.dumps({"num_passages": count, "num_shards": shard, "dim": dim}))
    parts = [_done_path(out_dir, i, shard_count) for i in range(shard_count)]
    if all(p.is_file() for p in parts):  # the last process to finish marks the whole encoding complete
        dims = [json.loads(p.read_text())["dim"] for p in parts]
        meta = {**settings, "complete": True, "num_passages": count, "num_shards": shard,
                "dim": next((d for d in dims if d is not None), None),
                "passages_per_sec_last_run": round(encoded / elapsed, 1)}
        _atomic_write(meta_path, json.dumps(meta, indent=2))
    return out_dir


def finish_encoding(out_dir: str | os.PathLike, num_shards: int) -> dict:
    """Marks an encoding complete once every one of its ``num_shards`` shards is on disk (the processes of one
    run have all returned from :func:`encode_corpus` with ``finalize=False``); returns the meta written."""
    out_dir = Path(out_dir)
    meta = json.loads((out_dir / META).read_text())
    if completed_shards(out_dir) != num_shards:
        raise ValueError(f"{out_dir}: {completed_shards(out_dir)} of {num_shards} shards are on disk; a process "
                         "stopped early, rerun the same command to finish")
    count = sum(len(json.loads(_shard_paths(out_dir, g)[1].read_text())) for g in range(num_shards))
    dim = int(np.load(_shard_paths(out_dir, 0)[0], mmap_mode="r").shape[1])
    meta.update(complete=True, num_passages=count, num_shards=num_shards, dim=dim)
    _atomic_write(out_dir / META, json.dumps(meta, indent=2))
    return meta


def _check_shard_ids(ids_path: Path, ids: list[str], offset: int) -> None:
    """A shard already on disk must hold the passages the corpus has at its place (resume of the same corpus)."""
    stored = json.loads(ids_path.read_text())
    if stored != ids:
        at = next((i for i, (a, b) in enumerate(zip(stored, ids)) if a != b), min(len(stored), len(ids)))
        found = ids[at] if at < len(ids) else "(end of corpus)"
        held = stored[at] if at < len(stored) else "(end of shard)"
        raise ValueError(f"{ids_path.parent}: {ids_path.name} holds passage {held!r} at corpus row {offset + at + 1} "
                         f"but the corpus has {found!r}; it is an encoding of another corpus, use another output "
                         "directory")


def complete_encoding_meta(out_dir: Path) -> dict:
    """The meta.json of a finished encoding; a clear error for a missing or unfinished one."""
    meta_path = out_dir / META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {META}; not an encoding directory (run `rdr-jax encode`)")
    meta = json.loads(meta_path.read_text())
    if not meta.get("complete"):
        raise ValueError(f"{out_dir}: encoding is incomplete; rerun `rdr-jax encode` to finish it")
    if not meta.get("num_passages") or not meta.get("dim"):
        raise ValueError(f"{out_dir}: the encoding holds no passages; encode a non-empty corpus")
    return meta


def load_encoded(out_dir: str | os.PathLike) -> tuple[np.ndarray, list[str]]:
    """All shards of an encoding: (embeddings [N, dim] float32, passage ids)."""
    out_dir = Path(out_dir)
    meta = complete_encoding_meta(out_dir)
    embs, ids = [], []
    for i in range(meta["num_shards"]):
        emb_path, ids_path = _shard_paths(out_dir, i)
        embs.append(np.load(emb_path).astype(np.float32))
        ids.extend(json.loads(ids_path.read_text()))
    return np.concatenate(embs), ids


def encoded_ids(out_dir: str | os.PathLike) -> list[str]:
    """The passage ids of a finished encoding, in corpus order (the ids files only, no embeddings)."""
    out_dir = Path(out_dir)
    meta = complete_encoding_meta(out_dir)
    ids: list[str] = []
    for i in range(meta["num_shards"]):
        ids.extend(json.loads(_shard_paths(out_dir, i)[1].read_text()))
    return ids


def iter_shards(out_dir: Path) -> Iterator[tuple[np.ndarray, list[str]]]:
    for i in range(completed_shards(out_dir)):
        emb_path, ids_path = _shard_paths(out_dir, i)
        yield np.load(emb_path).astype(np.float32), json.loads(ids_path.read_text())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # processes sharing the directory never share a tmp
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)

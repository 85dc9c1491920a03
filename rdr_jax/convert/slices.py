"""Checkpoint tensors read lazily, and any region of a model parameter read from them alone.

A checkpoint is opened as ``{HF name: source}``: a source knows its shape and reads one box (a tuple of
slices) of its tensor. A safetensors file's header is parsed here (8-byte length, JSON of dtype, shape and
byte offsets: the documented format) and its tensors are read as numpy views of a memory map, mapped per
parameter and dropped after it, so the pages read leave the process with it: no copy beyond the one into the
device buffer (``safe_open(...).get_slice`` would copy every region once more first). ``pytorch_model.bin``
is memory-mapped by torch where its format allows.

A parameter is its HF tensor through a :class:`~rdr_jax.convert.mapping.Rule`: copied, reshaped, or
(``linear``) transposed then reshaped; a stacked parameter (scan_layers) is one tensor per layer along a
leading axis. :func:`parameter_region` gives the part of the parameter that a ``jax.make_array_from_callback``
index asks for: it groups the parameter's axes with the (transposed) source axes they were reshaped from,
reads the source box covering the region, and gathers inside it only where the region is not one box. With
the sharding rules (heads, embed, mlp, vocab split) a device's region is always a box of the source: only
that is read.

A whole parameter (no mesh) is copied once, into the buffer it keeps on the device. A kernel kept in its dtype
goes through ``jnp.asarray`` of its transposed memory-map view (:func:`plain_transpose`: jax's C++ transpose,
only that tensor's pages mapped meanwhile). Anything else goes through :func:`read_parameter`: ``pread``
straight into a 64-byte-aligned host buffer, which jax's CPU ``device_put`` adopts as the device buffer (no
second copy, no page of the file mapped); a cast or a stacked kernel goes a block at a time through the loading
thread's scratch blocks. The process holds the parameters plus a tensor or a block per loading thread.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import threading
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from rdr_jax.convert.hf_io import CheckpointError, checkpoint_files, torch_to_numpy
from rdr_jax.convert.mapping import Rule

# safetensors dtype names -> numpy (bf16 as ml_dtypes.bfloat16, as safetensors' numpy API returns it)
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64", "I32": "int32",
                       "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


@dataclasses.dataclass(frozen=True)
class SafetensorsTensor:
    """One tensor of a safetensors file: ``read`` gives a view of its box in the file's memory map (no copy)."""
    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int  # of the tensor's first byte in the file

    def read(self, box: tuple[slice, ...], handles: dict) -> np.ndarray:
        mm = handles.get(self.path)
        if mm is None:
            with open(self.path, "rb") as f:
                mm = handles[self.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return np.ndarray(self.shape, self.dtype, buffer=mm, offset=self.offset)[box]

    def read_rows(self, lo: int, hi: int, out: np.ndarray) -> np.ndarray:
        """Rows ``lo:hi`` (of the leading axis) read into ``out`` (contiguous, this tensor's dtype, at least
        that many elements): the view of ``out`` that holds them, shaped as rows."""
        row = math.prod(self.shape[1:])
        dest = out.reshape(-1)[:(hi - lo) * row]
        _pread_into(self.path, self.offset + lo * row * self.dtype.itemsize, dest)
        return dest.reshape((hi - lo,) + tuple(self.shape[1:]))


def _pread_into(path: Path, offset: int, dest: np.ndarray) -> None:
    """Fill the contiguous ``dest`` with the file's bytes from ``offset`` (``pread``: no mapping, GIL released,
    short reads continued)."""
    view = memoryview(dest.reshape(-1).view(np.uint8))
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{path}: ends inside a tensor (byte {offset + done}); is it truncated?")
            done += n
    finally:
        os.close(fd)


def _safetensors_header(path: Path) -> dict[str, SafetensorsTensor]:
    """The tensors a safetensors file holds, from its header (8-byte length, JSON of dtype/shape/offsets)."""
    import ml_dtypes

    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= size - 8:
                raise ValueError(f"header length {n} does not fit the file's {size} bytes")
            header = json.loads(f.read(n))
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(ml_dtypes.bfloat16) if info["dtype"] == "BF16" else np.dtype(
                _SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise ValueError(f"tensor {name} ({info['dtype']} {list(shape)}) has bytes {begin}..{end} of "
                                 f"{size - 8 - n}")
            out[name] = SafetensorsTensor(path, name, shape, dtype, 8 + n + begin)
        return out
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e}); is it truncated?") \
            from None


@dataclasses.dataclass(frozen=True)
class ArrayTensor:
    """A tensor already in memory (a torch checkpoint, or one a model class adds): numpy or torch."""
    value: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.value.shape)

    def read(self, box: tuple[slice, ...], handles: dict) -> np.ndarray:
        part = self.value[box] if box else self.value
        return part if isinstance(part, np.ndarray) else torch_to_numpy(part)

    def read_rows(self, lo: int, hi: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``lo:hi``: a view where the value is numpy (``out`` is not needed: it is in memory already)."""
        return self.read((slice(lo, hi),) if self.shape else (), {})


def close_handles(handles: dict) -> None:
    """Forget the memory maps opened while loading one parameter: unmapped (their pages leave the process's
    resident memory) once the last view into them is gone."""
    handles.clear()


def open_checkpoint(model_dir: Path) -> dict[str, Any]:
    """``{HF name: source}`` of a checkpoint directory (sharded or not); no tensor data is read."""
    sources: dict[str, Any] = {}
    for path in checkpoint_files(model_dir):
        if path.name.endswith(".safetensors"):
            sources.update(_safetensors_header(path))
        else:
            sources.update({k: ArrayTensor(v) for k, v in _torch_state(path).items()})
    return sources


def _torch_state(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pytorch_model.bin needs torch (pip install torch), "
                              "or convert the checkpoint to safetensors") from None
    for mapped in (True, False):  # memory-mapped where the file is a zip checkpoint (torch >= 1.6 format)
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)
        except Exception as e:  # torch raises many types for a damaged zip/pickle
            error = e
    raise CheckpointError(f"{path}: cannot read PyTorch checkpoint ({type(error).__name__}: {error})") from None


def as_source(value) -> Any:
    """A source for a value a model class's ``adapt_state_dict`` put into the checkpoint dict itself."""
    return value if isinstance(value, (SafetensorsTensor, ArrayTensor)) else ArrayTensor(np.asarray(value))


# ---- regions ---------------------------------------------------------------------------------------------------
def _groups(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """Consecutive axes of ``src`` and ``dst`` (same size) that a row-major reshape maps onto each other."""
    groups, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        a, b, pa, pb = [], [], 1, 1
        if i < len(src):
            a.append(i); pa *= src[i]; i += 1
        if j < len(dst):
            b.append(j); pb *= dst[j]; j += 1
        while pa != pb:
            if pa < pb and i < len(src):
                a.append(i); pa *= src[i]; i += 1
            elif pb < pa and j < len(dst):
                b.append(j); pb *= dst[j]; j += 1
            else:
                raise ValueError(f"cannot reshape {tuple(src)} to {tuple(dst)}")
        groups.append((a, b))
    return groups


def _bounds(index, shape: Sequence[int]) -> list[tuple[int, int]]:
    out = []
    for k, size in enumerate(shape):
        s = index[k] if index is not None and k < len(index) else slice(None)
        start, stop, step = s.indices(size)
        if step != 1:
            raise ValueError(f"a strided region {index} is not supported")
        out.append((start, stop))
    return out


def tensor_region(rule: Rule, source, target_shape: Sequence[int], index, handles: dict) -> np.ndarray:
    """Region ``index`` of the parameter ``rule`` makes of ``source`` (transposed and/or reshaped), reading only
    the source box that covers it."""
    target_shape = tuple(target_shape)
    bounds = _bounds(index, target_shape)
    linear = rule.kind == "linear"
    pre = tuple(source.shape[::-1]) if linear else tuple(source.shape)  # the array the reshape starts from
    groups = _groups(pre, target_shape)
    box: list[slice] = [slice(None)] * len(pre)
    picks = []  # per group: (offset, count) of a contiguous run, or the flat indices to gather
    for src_axes, dst_axes in groups:
        ranges = [np.arange(*bounds[a]) for a in dst_axes]
        if len(dst_axes) == 1:
            flat = ranges[0] if ranges else np.zeros(1, np.int64)
        else:
            flat = np.ravel_multi_index(np.ix_(*ranges), [target_shape[a] for a in dst_axes]).ravel()
        if flat.size == 0:
            picks.append((0, 0))
            continue
        inner = math.prod(pre[a] for a in src_axes[1:])
        if src_axes:
            lo, hi = int(flat[0]) // inner, int(flat[-1]) // inner + 1
            box[src_axes[0]] = slice(lo, hi)
            flat = flat - lo * inner
        contiguous = int(flat[-1]) - int(flat[0]) + 1 == flat.size
        picks.append((int(flat[0]), flat.size) if contiguous else flat)
    source_box = tuple(box[::-1]) if linear else tuple(box)
    region = source.read(source_box, handles)
    if linear:
        region = region.T
    # one axis per group (the group's source axes flattened: all but its first are whole), then pick inside
    region = region.reshape([math.prod(region.shape[a] for a in src) for src, _ in groups])
    for axis, pick in enumerate(picks):
        if isinstance(pick, tuple):
            if pick != (0, region.shape[axis]):
                region = region[(slice(None),) * axis + (slice(pick[0], pick[0] + pick[1]),)]
        else:
            region = np.take(region, pick, axis=axis)
    return region.reshape([hi - lo for lo, hi in bounds])


def parameter_region(rules: Sequence[Rule], sources: Mapping[str, Any], target_shape: Sequence[int], index,
                     handles: dict) -> np.ndarray:
    """Region ``index`` of one parameter, in the checkpoint's dtype: often a (transposed) view into a memory map
    held by ``handles``, so to be copied before :func:`close_handles`.

    ``rules``: the parameter's one rule, or for a stacked parameter its rule per layer (``Rule.layer``)."""
    if rules[0].layer is None:
        out = tensor_region(rules[0], sources[rules[0].hf], target_shape, index, handles)
    else:
        by_layer = {r.layer: r for r in rules}
        lo, hi = _bounds(index, target_shape)[0]
        rest = tuple(index[1:]) if index is not None else None
        out = np.stack([tensor_region(by_layer[i], sources[by_layer[i].hf], target_shape[1:], rest, handles)
                        for i in range(lo, hi)])
    return out


def aligned_empty(shape: Sequence[int], dtype) -> np.ndarray:
    """A new array whose data starts on a 64-byte boundary: jax's CPU ``device_put`` adopts such an array
    without copying it (it copies any other). From 1 MB up it is an anonymous memory map of its own: numpy's
    allocator asks for transparent huge pages there, and on a host whose memory is fragmented (a full page
    cache) the kernel compacts memory at every first touch (measured: a bert-base load's reads took 2x the CPU
    time); a map of its own also goes back to the system when the parameter is dropped, where rdr_jax's malloc
    settings keep freed heap memory resident."""
    dtype, size = np.dtype(dtype), math.prod(shape)
    nbytes = size * dtype.itemsize
    raw = _own_map(nbytes, np.uint8) if nbytes >= _OWN_MAP_BYTES else np.empty(nbytes + 64, np.uint8)
    start = -raw.ctypes.data % 64  # (a map starts on a page)
    return raw[start:start + nbytes].view(dtype).reshape(tuple(shape))


_OWN_MAP_BYTES = 1 << 20


def owned_copy(region: np.ndarray, dtype) -> np.ndarray:
    """``region`` cast to ``dtype`` in a new 64-byte-aligned array (:func:`aligned_empty`; jax must never adopt
    a view into a memory map about to be closed)."""
    out = aligned_empty(region.shape, dtype)
    np.copyto(out, region, casting="unsafe")
    return out


# Bytes of a tensor read per step into a thread's scratch buffer when it is transposed or cast; and rows of a
# kernel transposed per block (64 rows of a bert-base kernel: 2.6x faster than numpy's whole-array transposed copy).
READ_BLOCK_BYTES = 4 << 20
TRANSPOSE_ROWS = 64


def plain_transpose(rules: Sequence[Rule], sources: Mapping[str, Any], dtype) -> bool:
    """Whether the parameter is one safetensors tensor transposed and kept in its dtype (an unstacked kernel):
    ``jnp.asarray`` of the transposed view of the memory map is then the one copy needed (jax's C++ transpose,
    only that tensor's pages mapped meanwhile; measured 20% less CPU time than :func:`read_parameter` on a
    bert-base load). Not with a cast: jax converts on the device, compiling a conversion per shape that leaves
    ~100 MB resident after a bert-base load in bf16; :func:`read_parameter` casts in numpy."""
    source = sources[rules[0].hf]
    return (len(rules) == 1 and rules[0].kind == "linear" and isinstance(source, SafetensorsTensor)
            and source.dtype == np.dtype(dtype))


def read_parameter(rules: Sequence[Rule], sources: Mapping[str, Any], target_shape: Sequence[int],
                   dtype) -> np.ndarray:
    """The whole parameter in ``dtype``, in a new 64-byte-aligned array that nothing else references (for
    ``jax.device_put`` to adopt). ``rules`` as for :func:`parameter_region`; the host memory needed beyond the
    result is one block of :data:`READ_BLOCK_BYTES`."""
    out = aligned_empty(target_shape, dtype)
    for rule in rules:
        _read_whole(rule, sources[rule.hf], out if rule.layer is None else out[rule.layer])
    return out


def _read_whole(rule: Rule, source, dest: np.ndarray) -> None:
    """Fill the contiguous ``dest`` (the parameter, or its layer's slice) with ``source`` through ``rule``."""
    shape = tuple(source.shape)
    rows, row = (shape[0], math.prod(shape[1:])) if shape else (1, 1)
    if rule.kind != "linear" and isinstance(source, SafetensorsTensor) and source.dtype == dest.dtype:
        _pread_into(source.path, source.offset, dest)  # same element order and dtype: straight into place
        return
    itemsize = source.dtype.itemsize if isinstance(source, SafetensorsTensor) else 0
    step = max(1, READ_BLOCK_BYTES // max(1, row * itemsize)) if itemsize else rows
    if rule.kind == "linear":  # [out, in] -> [in, out]: a block of rows becomes a block of columns
        step = max(TRANSPOSE_ROWS, step - step % TRANSPOSE_ROWS)
    step = min(rows, step)
    scratch = _scratch("read", step * row, source.dtype) if itemsize else None
    if rule.kind != "linear":
        flat = dest.reshape(-1)
        for lo in range(0, rows, step):
            hi = min(rows, lo + step)
            block = source.read_rows(lo, hi, scratch) if shape else source.read((), {})
            flat[lo * row:hi * row] = block.reshape(-1)
        return
    # A block is cast first (contiguous: fast), then transposed as raw bits (a plain copy): 7x faster than a
    # transposing cast in one numpy assignment (fp32 -> bf16, measured on a bert-base FFN kernel).
    bits = np.dtype(f"u{dest.dtype.itemsize}")
    columns, cast = dest.reshape(row, rows).view(bits), _scratch("cast", step * row, dest.dtype)
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        block = read = source.read_rows(lo, hi, scratch)
        if read.dtype != dest.dtype or not read.flags.c_contiguous:
            block = cast[:(hi - lo) * row].reshape(read.shape)
            np.copyto(block, read, casting="unsafe")
        block = block.view(bits)
        for b in range(0, hi - lo, TRANSPOSE_ROWS):
            columns[:, lo + b:lo + b + TRANSPOSE_ROWS] = block[b:b + TRANSPOSE_ROWS].T


_THREAD = threading.local()


def _scratch(name: str, size: int, dtype) -> np.ndarray:
    """This thread's scratch block ``name``, at least ``size`` elements of ``dtype``: mapped once per thread and
    reused for every tensor it reads (a fresh map per tensor faulted its pages in again: +50% CPU time on a
    bert-base bf16 load), apart from the heap (from malloc, blocks freed between the parameters' buffers leave
    holes that the process keeps resident: +30 MB measured with rdr_jax's malloc settings and 2 threads).
    Released with the thread (the loader's pool threads end with the load)."""
    dtype, blocks = np.dtype(dtype), _THREAD.__dict__.setdefault("blocks", {})
    if name not in blocks or blocks[name].size < size * dtype.itemsize:
        blocks[name] = _own_map(size * dtype.itemsize, np.uint8)
    return blocks[name][:size * dtype.itemsize].view(dtype)


def _own_map(size: int, dtype) -> np.ndarray:
    """``size`` elements of ``dtype`` in an anonymous memory map of their own (unmapped when dropped)."""
    dtype = np.dtype(dtype)
    return np.frombuffer(mmap.mmap(-1, max(1, size) * dtype.itemsize), dtype)

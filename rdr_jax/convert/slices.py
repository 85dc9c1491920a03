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
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
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


def owned_copy(region: np.ndarray, dtype) -> np.ndarray:
    """``region`` cast to ``dtype`` in a new 64-byte-aligned array: jax's CPU device_put adopts such an array
    without copying it again (and must never adopt a view into a memory map about to be closed)."""
    dtype = np.dtype(dtype)
    raw = np.empty(region.size * dtype.itemsize + 64, np.uint8)
    start = -raw.ctypes.data % 64
    out = raw[start:start + region.size * dtype.itemsize].view(dtype).reshape(region.shape)
    np.copyto(out, region, casting="unsafe")
    return out

"""Reading and writing Hugging Face checkpoint files as numpy arrays.

Which files a checkpoint directory holds (sharded checkpoints through their ``*.index.json``) and writing
safetensors; tensors are read region by region in :mod:`rdr_jax.convert.slices` (safetensors through the numpy
API, no torch needed, bf16 as ``ml_dtypes.bfloat16``; ``pytorch_model.bin`` needs torch, ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_SINGLE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable or does not fit the model. The message names the file or key."""


def resolve_model_dir(name_or_path: str | os.PathLike) -> Path:
    """A local directory, or a hub name already in the local huggingface_hub cache (never downloads)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a model directory, got a file")
    name = str(name_or_path)
    looks_like_hub_name = name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if not looks_like_hub_name:
        raise CheckpointError(f"{name}: no such model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached: say so plainly instead of a hub stack trace
        raise CheckpointError(
            f"{name}: no such directory, and not found in the local Hugging Face cache "
            f"(this tool never downloads; fetch it with `huggingface-cli download {name}` first)") from None


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The weight files of a checkpoint directory, safetensors preferred."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid shard index ({e})") from None
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            for f in files:
                if not f.is_file():
                    raise CheckpointError(f"{f}: shard listed in {index.name} is missing")
            return files
    for single in (SAFETENSORS_SINGLE, TORCH_SINGLE):
        if (model_dir / single).is_file():
            return [model_dir / single]
    raise CheckpointError(
        f"{model_dir}: no weights found (looked for {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, "
        f"{TORCH_SINGLE}, {TORCH_INDEX})")


def torch_to_numpy(tensor) -> np.ndarray:
    """Exact conversion, including bfloat16 (which numpy lacks natively)."""
    import torch
    import ml_dtypes

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def write_safetensors(state: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                      max_shard_bytes: int | None = None) -> list[Path]:
    """Writes ``model.safetensors`` (or shards plus an index past ``max_shard_bytes``) atomically."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in state.items():
        nbytes = array.nbytes
        if max_shard_bytes and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = np.ascontiguousarray(array)
        size += nbytes
    metadata = {"format": "pt"}  # transformers checks for this key
    if len(shards) == 1:
        names = [SAFETENSORS_SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    written = []
    for name, shard in zip(names, shards):
        target = out_dir / name
        tmp = target.with_suffix(".tmp")
        save_file(shard, str(tmp), metadata=metadata)
        os.replace(tmp, target)
        written.append(target)
    if len(shards) > 1:
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in state.values()))},
                 "weight_map": {k: n for n, shard in zip(names, shards) for k in shard}}
        (out_dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    return written


# Files any of which holds a tokenizer's vocabulary (fast tokenizer, WordPiece, BPE, SentencePiece).
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spm.model", "spiece.model",
                    "sentencepiece.bpe.model")
# Everything a checkpoint directory's tokenizer consists of (copied along with the model).
TOKENIZER_FILES = VOCABULARY_FILES + ("tokenizer_config.json", "special_tokens_map.json", "merges.txt")


def has_tokenizer_files(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds a tokenizer: a vocabulary file, or a tokenizer_config.json naming one."""
    return any((Path(directory) / name).is_file() for name in VOCABULARY_FILES + ("tokenizer_config.json",))


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    """Keep the tokenizer beside converted weights so the output directory is self-contained."""
    import shutil

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)

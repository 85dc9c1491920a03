"""Shared argument types and checks of the ``rdr-jax`` commands.

Numeric flags take one of the range-checked types below instead of ``int``/``float``, so a value out of range
is an argparse error (exit 2, one line, no traceback) before anything runs. Each type carries its range
(``minimum``, ``exclusive_minimum``) for tests that walk the parser. Output locations are checked before any work by
:func:`output_file` / :func:`output_dir`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


class RangedNumber:
    """An argparse ``type``: parses ``kind`` (int or float) and checks ``value >= minimum`` (``>`` when
    ``exclusive_minimum``)."""

    def __init__(self, kind: type, minimum: float, description: str, *, exclusive_minimum: bool = False):
        self.kind, self.minimum, self.description = kind, minimum, description
        self.exclusive_minimum = exclusive_minimum
        self.__name__ = description  # argparse names the type in "invalid <name> value: ..."

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.description}, got {text!r}") from None
        if self.kind is float and value != value:  # NaN compares false with every bound
            raise argparse.ArgumentTypeError(f"expected {self.description}, got {text!r}")
        if not self.accepts(value):
            raise argparse.ArgumentTypeError(f"expected {self.description}, got {text}")
        return value

    def accepts(self, value) -> bool:
        return value > self.minimum if self.exclusive_minimum else value >= self.minimum

    def __repr__(self) -> str:
        return self.description


positive_int = RangedNumber(int, 1, "an integer >= 1")
nonnegative_int = RangedNumber(int, 0, "an integer >= 0")
positive_float = RangedNumber(float, 0.0, "a number > 0", exclusive_minimum=True)
nonnegative_float = RangedNumber(float, 0.0, "a number >= 0")


def int_at_least(minimum: int) -> RangedNumber:
    return RangedNumber(int, minimum, f"an integer >= {minimum}")


# ---- output locations ---------------------------------------------------------------------------------------

def _check_parent(option: str, path: Path) -> None:
    parent = path.absolute().parent
    while not parent.exists():  # created on write: the first existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {path}: cannot write into {parent} (permission denied)")


def output_file(option: str, path: str | os.PathLike | None) -> Path | None:
    """Refuse an output file location that cannot be written (a directory, under a file, read-only), before
    any work is done."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a directory; give a file path")
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"{option} {path}: file is not writable")
    _check_parent(option, path)
    return path


def output_dir(option: str, path: str | os.PathLike, *, marker: str | None = None, what: str = "") -> Path:
    """Refuse an output directory that is a file, cannot be created, or (with ``marker``) is a non-empty
    directory without ``marker`` in it, i.e. not a previous output of the same kind."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: is a file; give a directory")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{option} {path}: directory is not writable")
        if marker is not None and not (path / marker).exists() and any(path.iterdir()):
            raise ValueError(f"{option} {path}: is a non-empty directory that is not {what or 'an output of this command'} "
                             f"(no {marker}); give a new or empty directory")
    else:
        _check_parent(option, path)
    return path


def input_file(option: str, path: str | os.PathLike | None) -> Path | None:
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path}: no such file")
    return path


# ---- model directories --------------------------------------------------------------------------------------

def model_config(option: str, path) -> tuple[Path, dict]:
    """The resolved model directory and its config.json, read before anything heavy is loaded."""
    from rdr_jax.convert.hf_io import resolve_model_dir
    from rdr_jax.models.config import read_config_json

    model_dir = resolve_model_dir(path)
    return model_dir, read_config_json(model_dir)


def check_architecture(option: str, model_dir: Path, config: dict, accepted: tuple[str, ...], what: str) -> None:
    """Refuse a checkpoint whose config.json names architectures none of which this command reads."""
    architectures = config.get("architectures") or []
    if architectures and not any(a in accepted for a in architectures):
        raise ValueError(f"{option} {model_dir}: is a {'/'.join(architectures)}, not {what} "
                         f"({' or '.join(accepted)})")


def check_max_length(option: str, value: int, model_dir: Path, config: dict, flag: str = "--max-length") -> None:
    """Refuse a length the model's position embeddings cannot hold, before any work."""
    positions = config.get("max_position_embeddings")
    if config.get("position_biased_input", True) is False:  # DeBERTa-v2/v3: relative positions only
        positions = None
    if isinstance(positions, int) and value > positions:
        raise ValueError(f"{flag} {value}: longer than {option} {model_dir}'s max_position_embeddings "
                         f"({positions})")


def check_room_for_text(value: int, tokenizer, *, pair: bool, flag: str = "--max-length") -> None:
    """Refuse a length that leaves no token for text after the special tokens."""
    special = tokenizer.num_special_tokens_to_add(pair=pair)
    if value <= special + int(pair):
        raise ValueError(f"{flag} {value}: leaves no room for text after {special} special tokens "
                         f"(use at least {special + int(pair) + 1})")


def add_distributed_arguments(parser, what: str = "training") -> None:
    """The multi-process flags every command that runs a model takes (``rdr-jax train`` and the inference
    commands alike): an explicit coordinator, or ``--distributed auto`` from the cluster's environment."""
    parser.add_argument("--coordinator", metavar="HOST:PORT",
                        help=f"multi-process {what}: address of process 0 (jax.distributed)")
    parser.add_argument("--num-processes", type=positive_int, help=f"multi-process {what}: number of processes")
    parser.add_argument("--process-id", type=nonnegative_int, help=f"multi-process {what}: this process's index")
    parser.add_argument("--distributed", choices=("auto", "off"), default="off",
                        help="auto: start jax.distributed from the environment (TPU pod slice, SLURM srun, "
                             "Open MPI mpirun); off (default): one process unless --coordinator is given")


def start_distributed(args) -> bool:
    """Starts ``jax.distributed`` as :func:`add_distributed_arguments`' flags ask; True with several processes."""
    from rdr_jax.training import distributed

    return distributed.initialize(args.distributed, args.coordinator, args.num_processes, args.process_id)


def compute_dtype(name: str):
    """``--dtype``: ``auto`` is bfloat16 on accelerators (the forward's matmuls; logits come back float32)."""
    import jax

    from rdr_jax.models.config import dtype_from_name

    if name == "auto":
        name = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
    return dtype_from_name(name, "--dtype")

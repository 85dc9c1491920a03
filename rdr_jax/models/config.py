"""Model configs: the fields a family reads from Hugging Face's config.json, with the rest kept verbatim; and
:class:`ComputeSettings`, how a model computes (dtypes, remat, scanned layers), which is not part of the config.

Unknown keys are preserved so that ``save_pretrained`` writes back a config.json that transformers reads
as it read the original.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

import jax.numpy as jnp

# Compute dtypes by the names the command line and task configs use.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str, what: str):
    """``DTYPES[name]``; ValueError naming ``what`` (the option or field being read), the allowed names and
    the bad value otherwise."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{what} must be one of {sorted(DTYPES)}, got {name!r}") from None


# DeBERTa's ways of computing its relative-position terms (see rdr_jax.models.deberta_relative).
RELATIVE_ATTENTION_IMPLS = ("skew", "gather", "onehot")

# What a rematerialised layer keeps for the backward pass, by the names of ``jax.checkpoint_policies``:
# "everything" is no remat (every activation kept), "nothing_saveable" full remat (only the layer's input kept),
# "dots_saveable" keeps every matmul output, "dots_with_no_batch_dims_saveable" those without batch dimensions
# (the projections, not attention's score/context matmuls).
REMAT_POLICIES = ("everything", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")


@dataclasses.dataclass(frozen=True)
class ComputeSettings:
    """How a model computes, as opposed to what it is (the config); one for every family.

    ``dtype``: the compute dtype; ``param_dtype``: the storage dtype of the parameters; ``remat``: recompute
    each layer's activations in the backward pass instead of keeping them; ``remat_policy``: what a
    rematerialised layer keeps, one of :data:`REMAT_POLICIES` (None: ``"nothing_saveable"`` with ``remat``,
    ``"everything"`` without; a policy other than ``"everything"`` turns ``remat`` on); ``scan_layers``: the
    identical layers of a stack are stored stacked (a leading ``layers`` axis) and run by one ``scan`` over one
    traced layer body, so compile time does not grow with depth (every family; see
    :mod:`rdr_jax.models.stacking`); ``relative_attention_impl``: DeBERTa only (other families ignore it), one
    of :data:`RELATIVE_ATTENTION_IMPLS`, same numbers each.
    """
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    remat: bool = False
    relative_attention_impl: str = "skew"
    remat_policy: str | None = None
    scan_layers: bool = False

    def __post_init__(self):
        if self.relative_attention_impl not in RELATIVE_ATTENTION_IMPLS:
            raise ValueError(f"relative_attention_impl must be one of {RELATIVE_ATTENTION_IMPLS}, "
                             f"got {self.relative_attention_impl!r}")
        if self.remat_policy is None:
            object.__setattr__(self, "remat_policy", "nothing_saveable" if self.remat else "everything")
        elif self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        elif self.remat and self.remat_policy == "everything":
            raise ValueError("remat=True with remat_policy='everything' (which is no remat): choose one")
        object.__setattr__(self, "remat", self.remat_policy != "everything")


@dataclasses.dataclass
class ModelConfig:
    model_type: ClassVar[str] = ""
    architectures: list[str] | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        config = cls(**known, extra=extra)
        config.validate()
        return config

    @classmethod
    def from_json_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(read_config_json(path))

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name != "extra":
                out[f.name] = getattr(self, f.name)
        out["model_type"] = self.model_type
        return out

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError naming the field when a value cannot work."""


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config.json not found (is this a Hugging Face model directory?)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data

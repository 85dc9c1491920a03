"""Name maps between Hugging Face tensor names and NNX parameter paths, and the exact transforms between them.

A family declares its map as a list of :class:`Rule` (one per tensor); the generic code here applies it
both ways, checks coverage and shapes, and reports missing/unexpected keys by name. Transforms are only
transposes and reshapes, so HF -> JAX -> HF is bit-exact.

A family always names layer ``i``'s parameters ``<stack>.<i>.<name>``. When the model stores that stack's
layers stacked (``<stack>.<name>`` with a leading layers axis, ``rdr_jax.models.stacking``), :func:`stack_rules`
turns those rules into rules onto slice ``i`` of the stacked parameter: one generic rule for every family.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from rdr_jax.convert.hf_io import CheckpointError


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str            # Hugging Face tensor name
    jax: str           # NNX parameter path, dot-joined ("encoder.layer.0.attention.query.kernel")
    kind: str = "copy"  # "copy" | "linear" (transpose [out,in] -> [in,out], reshaped) | "reshape"
    n_in: int = 1      # for "linear": how many leading kernel axes are inputs (2 for [heads, kv, embed])
    hf_shape: tuple[int, ...] | None = None  # for "reshape"/"linear" back to HF when it is not recoverable
    layer: int | None = None  # set by stack_rules: the HF tensor is slice ``layer`` of the stacked ``jax``


def linear(hf_prefix: str, jax_prefix: str, *, n_in: int = 1, bias: bool = True) -> list[Rule]:
    """An ``nn.Linear`` (weight [out, in], bias [out]) onto a :class:`~rdr_jax.models.layers.Dense`."""
    rules = [Rule(f"{hf_prefix}.weight", f"{jax_prefix}.kernel", "linear", n_in)]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", f"{jax_prefix}.bias", "reshape"))
    return rules


def layer_norm(hf_prefix: str, jax_prefix: str, bias: bool = True) -> list[Rule]:
    rules = [Rule(f"{hf_prefix}.weight", f"{jax_prefix}.scale")]
    if bias:
        rules.append(Rule(f"{hf_prefix}.bias", f"{jax_prefix}.bias"))
    return rules


def embedding(hf_name: str, jax_prefix: str) -> list[Rule]:
    return [Rule(hf_name, f"{jax_prefix}.embedding")]


def stack_rules(rules: list[Rule], model_paths: Iterable[str]) -> list[Rule]:
    """``rules`` for a model whose parameter paths are ``model_paths``: a rule onto ``<stack>.<i>.<name>`` that
    the model lacks, where it has ``<stack>.<name>`` (its layers stored stacked), becomes the rule onto slice
    ``i`` of that parameter (``Rule.layer``). Other rules are returned as they are."""
    paths = set(model_paths)
    out = []
    for r in rules:
        if r.jax not in paths:
            parts = r.jax.split(".")
            for k, part in enumerate(parts):
                stacked = ".".join(parts[:k] + parts[k + 1:])
                if part.isdigit() and stacked in paths:
                    r = dataclasses.replace(r, jax=stacked, layer=int(part))
                    break
        out.append(r)
    return out


def check_source_shape(rule: Rule, source_shape: Sequence[int], target_shape: Sequence[int]) -> None:
    """Raise CheckpointError when the HF tensor's shape cannot become the parameter's through ``rule``."""
    source_shape, target_shape = tuple(source_shape), tuple(target_shape)
    if rule.kind == "linear" and len(source_shape) != 2:
        raise CheckpointError(f"{rule.hf}: expected a 2-D weight, got shape {source_shape}")
    if (math.prod(source_shape) != math.prod(target_shape)
            or (rule.kind == "copy" and source_shape != target_shape)):
        expected = jax_to_hf(rule, np.empty(target_shape, np.uint8)).shape
        raise CheckpointError(
            f"{rule.hf}: checkpoint shape {source_shape} does not match the shape {tuple(expected)} the config "
            f"implies (model parameter {rule.jax} {target_shape}); check config.json against the weights")


def jax_to_hf(rule: Rule, array: np.ndarray) -> np.ndarray:
    if rule.kind == "linear":
        n_in = int(np.prod(array.shape[:rule.n_in]))
        return np.ascontiguousarray(array.reshape(n_in, -1).T)
    if rule.kind == "reshape":
        return array.reshape(rule.hf_shape if rule.hf_shape else (-1,))
    return array


def normalize_legacy_names(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Old TF-converted BERT checkpoints name LayerNorm parameters gamma/beta."""
    out = {}
    for name, array in state.items():
        if name.endswith(".gamma"):
            name = name[: -len(".gamma")] + ".weight"
        elif name.endswith(".beta"):
            name = name[: -len(".beta")] + ".bias"
        out[name] = array
    return out


def _short_list(names: Iterable[str], limit: int = 20) -> str:
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def check_rules_against_checkpoint(rules: list[Rule], state: Mapping[str, np.ndarray],
                                   target_shapes: Mapping[str, tuple], *, source: str,
                                   ignore_unexpected: Iterable[str] = (), allow_missing: Iterable[str] = ()) -> None:
    """Raise CheckpointError listing the missing/unexpected keys of an HF state dict for a model.

    ``allow_missing`` are glob patterns of JAX paths that may stay at their initial value (a new head on a
    pretrained body); the caller reports them.
    """
    allow_missing, ignore_unexpected = tuple(allow_missing), tuple(ignore_unexpected)
    unmapped = set(target_shapes) - {r.jax for r in rules}
    if unmapped:  # a bug in a family's name map, not in the user's checkpoint
        raise AssertionError(f"name map does not cover parameters: {_short_list(unmapped)}")
    missing = [r.hf for r in rules if r.hf not in state
               and not any(fnmatch.fnmatch(r.jax, p) for p in allow_missing)]
    used = {r.hf for r in rules}
    unexpected = [k for k in state if k not in used and not any(fnmatch.fnmatch(k, p) for p in ignore_unexpected)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_short_list(unexpected)}")
    if problems:
        raise CheckpointError(f"{source}: checkpoint does not match the model; " + "; ".join(problems))


def parameter_rules(rules: list[Rule], state: Mapping[str, Any], target_shapes: Mapping[str, tuple],
                    **check_options) -> dict[str, list[Rule]]:
    """Check the checkpoint (see :func:`check_rules_against_checkpoint`; ``state`` maps HF names to anything
    with a ``shape``), then ``{jax path: its rules}`` for every parameter the checkpoint has: one rule, or a
    stacked parameter's rule per layer in layer order (all layers present)."""
    check_rules_against_checkpoint(rules, state, target_shapes, **check_options)
    out: dict[str, list[Rule]] = {}
    for r in rules:
        if r.hf in state:
            out.setdefault(r.jax, []).append(r)
    for path, found in out.items():
        shape = tuple(target_shapes[path])
        if found[0].layer is None:
            check_source_shape(found[0], state[found[0].hf].shape, shape)
            continue
        found.sort(key=lambda r: r.layer)
        if [r.layer for r in found] != list(range(shape[0])):
            raise CheckpointError(f"{path}: the checkpoint has layers {[r.layer for r in found]} "
                                  f"of {shape[0]} ({', '.join(r.hf for r in found[:2])}, ...)")
        for r in found:
            check_source_shape(r, state[r.hf].shape, shape[1:])
    return out


def apply_rules_to_hf(rules: list[Rule], params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [r.jax for r in rules if r.jax not in params]
    if missing:
        raise AssertionError(f"model has no parameters {_short_list(missing)}")
    return {r.hf: jax_to_hf(r, np.asarray(params[r.jax]) if r.layer is None else np.asarray(params[r.jax])[r.layer])
            for r in rules}

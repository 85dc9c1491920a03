"""Optimizer: AdamW with linear warm-up then linear decay, global-norm clipping and a weight-decay mask.

Weight decay applies only to matrices that multiply activations and to embedding tables (parameters named
``kernel`` or ``embedding``); biases and LayerNorm scales/biases are not decayed, as in BERT/DPR training
(``no_decay = ["bias", "LayerNorm.weight"]``).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

DECAYED_PARAM_NAMES = ("kernel", "embedding")


def learning_rate_schedule(learning_rate: float, warmup_steps: int, decay_steps: int,
                           end_factor: float = 0.0) -> optax.Schedule:
    """0 -> lr over ``warmup_steps`` (linear), then lr -> lr * end_factor by step ``decay_steps`` (linear)."""
    warmup_steps = min(warmup_steps, decay_steps)
    end = learning_rate * end_factor
    if warmup_steps == 0:
        return optax.linear_schedule(learning_rate, end, max(decay_steps, 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps),
         optax.linear_schedule(learning_rate, end, max(decay_steps - warmup_steps, 1))],
        [warmup_steps])


def decay_mask(params: Any) -> Any:
    """True for the parameters weight decay applies to (see the module docstring)."""
    def is_decayed(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", last))
        if name == "value":  # nnx.Variable's own child; the parameter's name is the one before it
            last = path[-2]
            name = getattr(last, "key", getattr(last, "name", last))
        return str(name) in DECAYED_PARAM_NAMES

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def make_optimizer(optim_cfg, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    decay_steps = optim_cfg.decay_steps or total_steps
    schedule = learning_rate_schedule(optim_cfg.learning_rate, optim_cfg.warmup_steps, decay_steps,
                                      optim_cfg.end_learning_rate_factor)
    parts = []
    if optim_cfg.max_grad_norm:
        parts.append(optax.clip_by_global_norm(optim_cfg.max_grad_norm))
    parts.append(optax.adamw(schedule, b1=optim_cfg.adam_b1, b2=optim_cfg.adam_b2, eps=optim_cfg.adam_eps,
                             weight_decay=optim_cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


def count_params(params: Any) -> int:
    return sum(x.size for x in jax.tree.leaves(params))


__all__ = ["learning_rate_schedule", "decay_mask", "make_optimizer", "count_params"]

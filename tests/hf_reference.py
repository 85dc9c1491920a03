"""Builders of small transformers reference models with random weights, saved to a directory."""

from __future__ import annotations

import numpy as np


def save_hf_model(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


def padded_batch(batch: int, length: int, vocab: int, *, seed: int = 0, pad_rows=((1, 3),), token_types=True):
    """Random ids with some rows right-padded (row, n_pad) and token types 1 on the second half."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, vocab, size=(batch, length))
    mask = np.ones((batch, length), np.int64)
    for row, n_pad in pad_rows:
        mask[row, length - n_pad:] = 0
        ids[row, length - n_pad:] = 0
    types = np.zeros((batch, length), np.int64)
    if token_types:
        types[:, length // 2:] = 1
        types *= mask
    return ids, mask, types


def max_abs_diff(jax_array, torch_tensor) -> float:
    return float(np.abs(np.asarray(jax_array, np.float64) - torch_tensor.detach().numpy().astype(np.float64)).max())

"""The constraint of a corpus split into sub-indexes (:mod:`rdr_jax.decoding.substring_parts`): the beam search
constrained to the UNION of their substrings.

A beam's state is one suffix range per part, ``(lo [..., P], hi [..., P])`` (an empty range where the n-gram
does not occur in that part). A token is allowed when it follows the beam's n-gram in any part, and its child
state is the child range in every part; EOS when the n-gram occurs in any part. With the same candidates (token
and score) in the same order as one index over the whole corpus (sorted tokens, EOS last on the short-range
path; vocabulary order on the other), the search returns the same beams.

Cost per step: the vocabulary path searches each part (``P x beams x vocab x log2(S / P)`` gathers, about ``P``
times one index's); the short-range path reads ``P x short_range`` tokens per beam, sorts them to merge the
parts' columns (carrying each entry's part) and reads each distinct token's run in every part from per-part
cumulative counts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from rdr_jax.decoding.substring_index import DeviceSubstringIndex
from rdr_jax.decoding.trie import top_k_padded

_PAST = jnp.iinfo(jnp.int32).max   # a column slot past a range's end: sorts after every token


@struct.dataclass
class DeviceSubstringUnion:
    """Device parts (each :class:`DeviceSubstringIndex`, its own int32 positions), a jit argument."""
    parts: tuple[DeviceSubstringIndex, ...]
    eos_token_id: int = struct.field(pytree_node=False)
    vocab_size: int = struct.field(pytree_node=False)
    max_ngram: int = struct.field(pytree_node=False)
    min_ngram: int = struct.field(pytree_node=False)
    short_range: int = struct.field(pytree_node=False)

    @classmethod
    def of(cls, parts: list[DeviceSubstringIndex]) -> "DeviceSubstringUnion":
        first = parts[0]
        for part in parts[1:]:
            if (part.eos_token_id, part.vocab_size, part.max_ngram, part.min_ngram, part.short_range) != (
                    first.eos_token_id, first.vocab_size, first.max_ngram, first.min_ngram, first.short_range):
                raise ValueError("the parts of an n-gram index differ in EOS, vocabulary, n-gram lengths or "
                                 "short range: they were built with different settings")
        return cls(tuple(parts), first.eos_token_id, first.vocab_size, first.max_ngram, first.min_ngram,
                   first.short_range)

    @property
    def max_length(self) -> int:
        return self.max_ngram + 1

    def initial_state(self, shape: tuple[int, ...]):
        shape = shape + (len(self.parts),)
        return (jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.int32))

    def _candidates(self, scores, bounds, occurs, count: int, depth):
        """As :meth:`DeviceSubstringIndex._candidates` with ``bounds [B, K, P, V + 1]``: allowed in any part."""
        B, K, V = scores.shape
        P = len(self.parts)
        allowed = jnp.any(bounds[..., 1:] > bounds[..., :-1], axis=2) & (depth < self.max_ngram)
        eos = (jnp.arange(V) == self.eos_token_id) & (depth >= self.min_ngram) & occurs[..., None]
        scores = jnp.where(allowed | eos, scores, -jnp.inf)
        top_scores, index = top_k_padded(scores.reshape(B, K * V), count)
        index = jnp.minimum(index, K * V - 1)   # padding columns (-inf) read any real slot
        parent, token = index // V, index % V
        flat = jnp.moveaxis(bounds, 2, -1).reshape(B, K * (V + 1), P)
        at = (parent * (V + 1) + token)[..., None]
        pick = lambda offset: jnp.take_along_axis(flat, at + offset, axis=1)   # [B, count, P]
        return top_scores, parent, token, (pick(0), pick(1))

    def first_candidates(self, log_probs, count: int, vocab_size: int):
        scores = log_probs(None)[:, None, :]
        roots = jnp.stack([part.root_bounds for part in self.parts])              # [P, V + 1]
        bounds = jnp.broadcast_to(roots, scores.shape[:2] + roots.shape)
        return self._candidates(scores, bounds, jnp.ones(scores.shape[:2], bool), count, 0)

    def next_candidates(self, log_probs, alive_scores, state, count: int, step):
        """The short-range path when every live beam's range is short in every part, else the vocabulary path
        (both exact, as for one index)."""
        lo, hi = state
        short = jnp.all((hi - lo <= self.short_range) | ~jnp.isfinite(alive_scores)[..., None])

        def by_vocabulary(_):
            bounds = jnp.stack([part._bounds(lo[..., p], hi[..., p], step) for p, part in enumerate(self.parts)],
                               axis=2)
            return self._candidates(log_probs(None) + alive_scores[..., None], bounds, jnp.any(hi > lo, axis=-1),
                                    count, step)

        return jax.lax.cond(short, lambda _: self._run_candidates(log_probs, alive_scores, lo, hi, count, step),
                            by_vocabulary, None)

    def _run_candidates(self, log_probs, alive_scores, lo, hi, count: int, depth):
        """Every part's (sorted) column over its short range; the distinct tokens of all of them are the allowed
        tokens, each one's child range in part ``p`` the run of that token in ``p``'s column."""
        B, K, P = lo.shape
        R = self.short_range
        j = jnp.arange(R)
        columns = []
        for p, part in enumerate(self.parts):
            index = lo[..., p, None] + j                                   # [B, K, R]
            last = part.suffixes.shape[0] - 1
            token = part.tokens[part.suffixes[jnp.clip(index, 0, last)] + depth]
            columns.append(jnp.where(index < hi[..., p, None], token, _PAST))
        columns = jnp.stack(columns, axis=2).reshape(B, K, P * R)       # part p's sorted column at p * R
        labels = jnp.broadcast_to(jnp.repeat(jnp.arange(P, dtype=jnp.int32), R), columns.shape)
        merged, labels = jax.lax.sort((columns, labels), dimension=-1, num_keys=1)
        M = P * R
        previous = jnp.concatenate([jnp.full((B, K, 1), -2, merged.dtype), merged[..., :-1]], axis=-1)
        following = jnp.concatenate([merged[..., 1:], jnp.full((B, K, 1), -2, merged.dtype)], axis=-1)
        allowed = (merged != previous) & (merged >= 0) & (merged != _PAST) & (depth < self.max_ngram)
        tokens = jnp.where(allowed, merged, 0)                             # [B, K, M]
        # A run of token t starting at merged slot i: part p's entries before i are its entries < t, so its
        # child range starts there; the run's end closes it. Counts per part by a cumulative sum, no search.
        inclusive = jnp.cumsum(labels[..., None] == jnp.arange(P), axis=2, dtype=jnp.int32)   # [B, K, M, P]
        before = inclusive - (labels[..., None] == jnp.arange(P))
        end_at = jax.lax.cummin(jnp.where(merged != following, jnp.arange(M), M), axis=2, reverse=True)
        through = jnp.take_along_axis(inclusive, jnp.minimum(end_at, M - 1)[..., None], axis=2)
        child_lo = lo[..., None, :] + before                               # [B, K, M, P]
        child_hi = lo[..., None, :] + through
        scores = jnp.where(allowed, log_probs(tokens) + alive_scores[..., None], -jnp.inf)
        eos = jnp.full((B, K, 1), self.eos_token_id, jnp.int32)
        eos_ok = jnp.any(hi > lo, axis=-1)[..., None] & (depth >= self.min_ngram)
        eos_scores = jnp.where(eos_ok, log_probs(eos) + alive_scores[..., None], -jnp.inf)
        scores = jnp.concatenate([scores, eos_scores], axis=-1)           # [B, K, M + 1]
        tokens = jnp.concatenate([tokens, eos], axis=-1)
        child_lo = jnp.concatenate([child_lo, lo[..., None, :]], axis=2)  # EOS keeps the parent's ranges
        child_hi = jnp.concatenate([child_hi, hi[..., None, :]], axis=2)
        width = P * R + 1
        top_scores, flat = top_k_padded(scores.reshape(B, K * width), count)
        flat = jnp.minimum(flat, K * width - 1)
        pick = lambda a: jnp.take_along_axis(a.reshape(B, K * width, P), flat[..., None], axis=1)
        return (top_scores, flat // width, jnp.take_along_axis(tokens.reshape(B, K * width), flat, axis=1),
                (pick(child_lo), pick(child_hi)))


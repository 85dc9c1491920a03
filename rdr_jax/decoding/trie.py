"""A prefix trie over token-id identifiers, stored as flat arrays that constrained decoding reads inside jit.

Layout (CSR). Nodes are numbered breadth first: the root is 0, then every node of depth 1, of depth 2, ...,
each depth in lexicographic order of its prefix. With that numbering a node's children are consecutive, sorted
by token, and node ``n > 0`` is the target of edge ``n - 1``, so the edges need no child array:

- ``offsets [num_nodes + 1]``: node ``n``'s edges are ``offsets[n] : offsets[n + 1]``;
- ``tokens [num_nodes - 1]``: the token of each edge (sorted within a node); the child of edge ``e`` is ``e + 1``;
- ``end_nodes`` / ``end_identifiers``: the nodes where an identifier ends (reached by its EOS edge), sorted, and
  the index (in the input list) of the identifier that ends there (the first one when the input repeats one).

A node is terminal when its incoming edge is EOS, so "finished" is "EOS chosen". Identifiers that do not end
with EOS get it appended. Building is vectorised numpy (sort the padded identifiers, find each row's longest
common prefix with the previous one, number the new prefixes); a million identifiers take seconds.

Inside jit (:class:`DeviceTrie`): a batch of nodes gathers each node's edge slice, padded to the largest
out-degree below the root (``edges``: tokens and children), which beam search scores directly; the root keeps a
dense mask. ``allowed_mask`` scatters the slices into a ``[..., vocab]`` boolean mask, and the child for a
chosen token is a fixed-length binary search of the slice. No host callback per step.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

PAD = -1  # pads identifiers in the sort; smaller than every token, so a shorter prefix sorts first


def _lower_bound(xp, tokens, start, end, target, iterations: int):
    """First edge in ``[start, end)`` whose token is >= ``target`` (``end`` if none), elementwise over arrays.

    A fixed number of halvings (enough for the largest slice) so the same code runs in numpy and under jit.
    """
    lo, hi = start, end
    last = max(tokens.shape[0] - 1, 0)
    for _ in range(iterations):
        mid = (lo + hi) // 2
        smaller = (mid < hi) & (tokens[xp.minimum(mid, last)] < target)
        lo = xp.where(smaller, mid + 1, lo)
        hi = xp.where(smaller | (mid >= hi), hi, mid)
    return lo


def _child(xp, offsets, tokens, nodes, token, iterations: int):
    """The child of each node along ``token``; -1 where the node has no such edge or the node is -1."""
    valid = nodes >= 0
    n = xp.where(valid, nodes, 0)
    start, end = offsets[n], offsets[n + 1]
    edge = _lower_bound(xp, tokens, start, end, token, iterations)
    last = max(tokens.shape[0] - 1, 0)
    found = valid & (edge < end) & (tokens[xp.minimum(edge, last)] == token)
    return xp.where(found, edge + 1, -1)


def _bucket(size: int, minimum: int = 1) -> int:
    """The next power of two >= ``size`` (and >= ``minimum``)."""
    return max(1 << max(size - 1, 0).bit_length(), minimum)


# Smallest device shapes: small tries (tests, demos) then share one compiled search whatever their exact size.
MIN_ARRAY, MIN_DEGREE = 1024, 8


def _search_iterations(max_degree: int) -> int:
    return max(1, math.ceil(math.log2(max_degree + 1)))


@struct.dataclass
class DeviceTrie:
    """The trie's arrays on device, a pytree usable as a jit argument (the int fields are static).

    The root, whose out-degree is often in the thousands (every first token), keeps a dense allowed mask, so the
    per-node slices gathered for the other nodes are only as wide as the largest non-root out-degree.
    """
    offsets: jax.Array    # int32 [num_nodes + 1]
    tokens: jax.Array     # int32 [num_edges]
    root_mask: jax.Array  # bool [largest token + 1]: the tokens the root allows
    eos_token_id: int = struct.field(pytree_node=False)
    max_degree: int = struct.field(pytree_node=False)  # slice width: the largest out-degree below the root
    search_iterations: int = struct.field(pytree_node=False)

    def edges(self, nodes: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(tokens, children)``, each ``nodes.shape + (max_degree,)``: the edges leaving each node below the
        root, in token order, -1 past the node's last edge, for node -1 and for the root (see ``root_mask``)."""
        below_root = nodes > 0
        n = jnp.where(below_root, nodes, 0)
        start = self.offsets[n]
        end = jnp.where(below_root, self.offsets[n + 1], start)
        edge = start[..., None] + jnp.arange(self.max_degree, dtype=start.dtype)
        present = edge < end[..., None]
        tokens = jnp.where(present, self.tokens[jnp.minimum(edge, self.tokens.shape[0] - 1)], -1)
        return tokens, jnp.where(present, edge + 1, -1)

    def root_allowed(self, vocab_size: int) -> jax.Array:
        """Boolean ``[vocab_size]``: the first tokens of the identifiers."""
        root = self.root_mask[:vocab_size]
        return jnp.pad(root, (0, vocab_size - root.shape[0]))

    def allowed_mask(self, nodes: jax.Array, vocab_size: int) -> jax.Array:
        """Boolean ``nodes.shape + (vocab_size,)``: the tokens that continue each node (none for node -1)."""
        tokens, _ = self.edges(nodes)
        columns = jnp.where(tokens >= 0, tokens, vocab_size).reshape(-1, self.max_degree)  # vocab_size: dropped
        rows = jnp.arange(columns.shape[0])[:, None]
        mask = jnp.zeros((columns.shape[0], vocab_size), bool).at[rows, columns].set(True, mode="drop")
        mask = mask.reshape(nodes.shape + (vocab_size,))
        return jnp.where((nodes == 0)[..., None], self.root_allowed(vocab_size), mask)

    def child(self, nodes: jax.Array, token: jax.Array) -> jax.Array:
        return _child(jnp, self.offsets, self.tokens, nodes, token, self.search_iterations)

    def is_end(self, nodes: jax.Array) -> jax.Array:
        return (nodes > 0) & (self.tokens[jnp.maximum(nodes - 1, 0)] == self.eos_token_id)

    # ---- the constraint interface of constrained beam search (rdr_jax.decoding.beam_search) ----------------
    def initial_state(self, shape: tuple[int, ...]) -> jax.Array:
        """Every beam at the root."""
        return jnp.zeros(shape, jnp.int32)

    def first_candidates(self, log_probs, count: int, vocab_size: int):
        """First step, one row per question at the root, whose allowed tokens are a dense mask: the best
        ``count`` continuations as ``(scores, parent, token, child)``, each ``[B, count]``."""
        scores = jnp.where(self.root_allowed(vocab_size), log_probs(None), -jnp.inf)
        top_scores, token = top_k_padded(scores, count)
        token = jnp.minimum(token, vocab_size - 1)
        return top_scores, jnp.zeros_like(token), token, self.child(jnp.zeros_like(token), token)

    def next_candidates(self, log_probs, alive_scores, nodes, count: int, step=None):
        """Later steps: each beam's candidates are its node's edges (``max_degree`` wide, not the vocabulary),
        so the top-k reads ``K * max_degree`` scores. Same order as over ``K * V``: edges are sorted by token."""
        B, K = alive_scores.shape
        tokens, children = self.edges(nodes)  # [B, K, D]
        D = tokens.shape[-1]
        scores = jnp.where(tokens >= 0, log_probs(jnp.maximum(tokens, 0)) + alive_scores[..., None], -jnp.inf)
        top_scores, index = top_k_padded(scores.reshape(B, K * D), count)
        index = jnp.minimum(index, K * D - 1)  # padding columns (-inf) read any real slot
        pick = lambda a: jnp.take_along_axis(a.reshape(B, K * D), index, axis=1)
        return top_scores, index // D, pick(tokens), pick(children)


def top_k_padded(scores: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``lax.top_k`` over the last axis, -inf padded to at least ``k`` columns."""
    if scores.shape[-1] < k:
        scores = jnp.pad(scores, ((0, 0), (0, k - scores.shape[-1])), constant_values=-jnp.inf)
    return jax.lax.top_k(scores, k)


def _padded(sequences) -> tuple[np.ndarray, np.ndarray]:
    """``(matrix [N, max_len] padded with PAD, lengths [N])`` from a list of sequences or a 2-D array."""
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        matrix = sequences.astype(np.int64)
        return matrix, np.full(len(matrix), matrix.shape[1], np.int64)
    sequences = [np.asarray(s).reshape(-1) if isinstance(s, np.ndarray) else s for s in sequences]
    lengths = np.fromiter(map(len, sequences), np.int64, count=len(sequences))
    flat = np.fromiter(itertools.chain.from_iterable(sequences), np.int64, count=int(lengths.sum()))
    width = int(lengths.max(initial=0))
    matrix = np.full((len(sequences), width), PAD, np.int64)
    matrix[np.arange(width)[None, :] < lengths[:, None]] = flat
    return matrix, lengths


def _with_eos(matrix: np.ndarray, lengths: np.ndarray, eos_token_id: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    rows = np.arange(len(matrix))
    last = np.where(lengths > 0, matrix[rows, np.maximum(lengths - 1, 0)], PAD)
    if eos_token_id is None:
        ends = np.unique(last)
        if len(ends) != 1 or ends[0] == PAD:
            raise ValueError("PrefixTrie: the identifiers do not all end with one EOS token; pass eos_token_id= "
                             f"(found last tokens {ends[:5].tolist()}...)")
        eos_token_id = int(ends[0])
    missing = last != eos_token_id
    if missing.any():  # append EOS where absent
        matrix = np.concatenate([matrix, np.full((len(matrix), 1), PAD, matrix.dtype)], axis=1)
        matrix[rows[missing], lengths[missing]] = eos_token_id
        lengths = lengths + missing
    inner = (matrix == eos_token_id) & (np.arange(matrix.shape[1])[None, :] < (lengths - 1)[:, None])
    if inner.any():
        row = int(np.argmax(inner.any(axis=1)))
        raise ValueError(f"PrefixTrie: identifier {row} contains EOS ({eos_token_id}) before its end: "
                         f"{matrix[row, :lengths[row]].tolist()}")
    if (matrix[matrix != PAD] < 0).any():
        raise ValueError("PrefixTrie: token ids must be non-negative")
    return matrix, lengths, eos_token_id


def _lexicographic_order(matrix: np.ndarray) -> np.ndarray:
    """Stable argsort of the rows, column 0 most significant. Several small-token columns are packed into one
    int64 key first (PAD -> 0, token t -> t + 1), so the sort runs over a few keys instead of every column."""
    bits = max(1, int(matrix.max(initial=0) + 1).bit_length())
    per_key = max(1, 63 // bits)
    shifted = matrix.astype(np.int64) + 1
    keys = []
    for start in range(0, matrix.shape[1], per_key):
        key = np.zeros(len(matrix), np.int64)
        for column in range(start, start + per_key):
            key <<= bits
            if column < matrix.shape[1]:
                key |= shifted[:, column]
        keys.append(key)
    return np.lexsort(keys[::-1])


class PrefixTrie:
    """Prefix trie of token-id identifiers, built on the host, read by constrained beam search on device.

    ``PrefixTrie(sequences, eos_token_id=None)``: ``sequences`` is a list of token-id lists (or a 2-D int array
    with no padding). Without ``eos_token_id`` every identifier must already end with one common token, taken as
    EOS; with it, EOS is appended where absent. Identifier ``i`` of the input is found back with
    :meth:`lookup` (repeated identifiers map to their first index).
    """

    def __init__(self, sequences: Sequence[Sequence[int]] | np.ndarray, eos_token_id: int | None = None):
        if len(sequences) == 0:
            raise ValueError("PrefixTrie: no identifiers given")
        matrix, lengths = _padded(sequences)
        matrix, lengths, self.eos_token_id = _with_eos(matrix, lengths, eos_token_id)
        self.num_sequences = len(matrix)
        self.max_length = int(lengths.max())  # longest identifier, EOS included
        dtype = np.int32 if matrix.max() < 2 ** 31 else np.int64
        matrix = matrix.astype(dtype)
        self._build(matrix, lengths)
        self._device: DeviceTrie | None = None

    def _build(self, matrix: np.ndarray, lengths: np.ndarray):
        count, width = matrix.shape
        order = _lexicographic_order(matrix)
        rows = matrix[order]
        differs = rows[1:] != rows[:-1]
        common = np.where(differs.any(axis=1), differs.argmax(axis=1), width)  # longest common prefix with row above
        common = np.concatenate([[0], common])
        # Column-major from here on: every step below works one depth at a time.
        columns = np.ascontiguousarray(rows.T)
        # new[d, r]: sorted row r is the first with its prefix of length d + 1, i.e. it opens a node at depth d + 1
        new = (np.arange(width)[:, None] >= common[None, :]) & (columns != PAD)
        del differs, common, rows
        per_depth = new.sum(axis=1)
        first_id = 1 + np.concatenate([[0], np.cumsum(per_depth)[:-1]])
        # node id of every row's prefix of length d + 1 (rows sharing a prefix are consecutive after the sort)
        index_dtype = np.int32 if 1 + int(per_depth.sum()) < 2 ** 31 else np.int64
        node_of = np.cumsum(new, axis=1, dtype=index_dtype)
        node_of += (first_id - 1).astype(index_dtype)[:, None]
        node_tokens, parents = [], []
        for d in range(width):
            node_tokens.append(columns[d][new[d]])
            parents.append(np.zeros(int(per_depth[d]), index_dtype) if d == 0 else node_of[d - 1][new[d]])
        node_tokens, parents = np.concatenate(node_tokens), np.concatenate(parents)
        self.num_nodes = len(node_tokens) + 1
        degree = np.bincount(parents, minlength=self.num_nodes)
        self.offsets = np.concatenate([[0], np.cumsum(degree)]).astype(index_dtype)
        self.tokens = node_tokens.astype(np.int32)
        self.max_token = int(self.tokens.max())
        self.max_degree = int(degree.max())
        # where each identifier ends; the first of repeated identifiers (the stable sort keeps input order) names it
        last = lengths[order] - 1
        sorted_rows = np.arange(count)
        first = new[last, sorted_rows]
        ends = node_of[last[first], sorted_rows[first]]
        by_node = np.argsort(ends)
        self.end_nodes = ends[by_node].astype(index_dtype)
        self.end_identifiers = order[first][by_node].astype(np.int32 if count < 2 ** 31 else np.int64)
        self.num_identifiers = len(self.end_nodes)

    # ---- host-side queries -------------------------------------------------------------------------------
    @property
    def num_edges(self) -> int:
        return len(self.tokens)

    @property
    def children(self) -> np.ndarray:
        """The child node of every edge (implicit in the breadth-first numbering: edge ``e`` -> node ``e + 1``)."""
        return np.arange(1, self.num_nodes, dtype=self.offsets.dtype)

    @property
    def nbytes(self) -> int:
        """Host memory of the trie's arrays, in bytes (the device copy holds ``offsets`` and ``tokens`` only)."""
        return sum(a.nbytes for a in (self.offsets, self.tokens, self.end_nodes, self.end_identifiers))

    @property
    def device_nbytes(self) -> int:
        return self.offsets.nbytes + self.tokens.nbytes

    def allowed_tokens(self, node: int) -> np.ndarray:
        """The sorted tokens that continue ``node``."""
        return self.tokens[self.offsets[node]:self.offsets[node + 1]]

    def child(self, nodes, token) -> np.ndarray:
        """The child of each node along ``token`` (-1 if none); arrays broadcast."""
        nodes, token = np.asarray(nodes), np.asarray(token)
        return _child(np, self.offsets, self.tokens, nodes, token, _search_iterations(self.max_degree))

    def is_end(self, nodes) -> np.ndarray:
        nodes = np.asarray(nodes)
        return (nodes > 0) & (self.tokens[np.maximum(nodes - 1, 0)] == self.eos_token_id)

    def walk(self, sequences) -> np.ndarray:
        """The node reached by each row of ``sequences [..., L]`` (-1 if it leaves the trie), stopping at EOS:
        tokens after the first EOS (padding) are ignored."""
        sequences = np.asarray(sequences)
        nodes = np.zeros(sequences.shape[:-1], np.int64)
        for step in range(sequences.shape[-1]):
            stepped = self.child(nodes, sequences[..., step])
            nodes = np.where(self.is_end(nodes), nodes, stepped)
        return nodes

    def lookup(self, sequences) -> np.ndarray:
        """The input index of the identifier each row of ``sequences [..., L]`` spells (-1 if none)."""
        nodes = self.walk(sequences)
        position = np.clip(np.searchsorted(self.end_nodes, nodes), 0, len(self.end_nodes) - 1)
        found = (nodes >= 0) & (self.end_nodes[position] == nodes)
        return np.where(found, self.end_identifiers[position], -1)

    def to_device(self) -> DeviceTrie:
        """The arrays as jnp arrays (made once and kept).

        Array lengths and the out-degree bound are rounded up to powers of two (padding nodes have no edges), so
        tries of similar size share one compiled search instead of each triggering a new compilation.
        """
        if self._device is None:
            offsets = np.full(_bucket(len(self.offsets), MIN_ARRAY), self.offsets[-1], self.offsets.dtype)
            offsets[:len(self.offsets)] = self.offsets
            tokens = np.full(_bucket(len(self.tokens), MIN_ARRAY), np.iinfo(np.int32).max, np.int32)
            tokens[:len(self.tokens)] = self.tokens
            root_mask = np.zeros(_bucket(self.max_token + 1, MIN_ARRAY), bool)
            root_mask[self.allowed_tokens(0)] = True
            inner_degree = int(np.diff(self.offsets[1:]).max(initial=1))
            self._device = DeviceTrie(offsets=jnp.asarray(offsets), tokens=jnp.asarray(tokens),
                                      root_mask=jnp.asarray(root_mask), eos_token_id=self.eos_token_id,
                                      max_degree=_bucket(inner_degree, MIN_DEGREE),
                                      search_iterations=_search_iterations(_bucket(self.max_degree, 2 * MIN_DEGREE)))
        return self._device

    def __len__(self) -> int:
        return self.num_identifiers

    def __repr__(self) -> str:
        return (f"PrefixTrie({self.num_identifiers} identifiers, {self.num_nodes} nodes, max degree "
                f"{self.max_degree}, eos {self.eos_token_id}, {self.nbytes / 2 ** 20:.1f} MiB)")

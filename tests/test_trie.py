"""PrefixTrie against a Python dict-of-dicts trie, on the host and inside jit; scale and memory."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rdr_jax.decoding import PrefixTrie

EOS = 1


QUERIES, MASK_VOCAB = 512, 48


@jax.jit
def device_queries(device_trie, nodes, tokens):
    return device_trie.allowed_mask(nodes, MASK_VOCAB), device_trie.child(nodes, tokens)


def dict_trie(sequences, eos=EOS):
    root = {}
    for seq in sequences:
        node = root
        for token in list(seq) + ([] if seq and seq[-1] == eos else [eos]):
            node = node.setdefault(int(token), {})
    return root


def random_sequences(rng, count, vocab, max_len):
    """Random identifiers over a small vocabulary so prefixes are shared (EOS-free; the trie appends it)."""
    return [rng.integers(2, vocab, rng.integers(0, max_len + 1)).tolist() for _ in range(count)]


def walk_pairs(reference, trie, node=0, prefix=()):
    """(prefix, reference dict node, trie node) for every node of the reference trie."""
    yield prefix, reference, node
    for token, child in reference.items():
        yield from walk_pairs(child, trie, int(trie.child(node, token)), prefix + (token,))


@pytest.mark.parametrize("seed", range(40))
def test_matches_dict_trie_on_host_and_device(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(4, 40))
    sequences = random_sequences(rng, int(rng.integers(1, 60)), vocab, int(rng.integers(1, 7)))
    assert vocab < MASK_VOCAB
    trie = PrefixTrie(sequences, eos_token_id=EOS)
    reference = dict_trie(sequences)
    pairs = list(walk_pairs(reference, trie))
    assert trie.num_nodes == len(pairs)
    assert trie.num_identifiers == len({tuple(s) for s in sequences})
    assert trie.max_degree == max(len(ref) for _, ref, _ in pairs)
    nodes = np.array([node for _, _, node in pairs])
    assert sorted(nodes.tolist()) == list(range(trie.num_nodes))  # every node reached once
    for prefix, ref, node in pairs:
        assert trie.allowed_tokens(node).tolist() == sorted(ref), prefix
        assert bool(trie.is_end(node)) == (len(prefix) > 0 and prefix[-1] == EOS)
    # absent edges
    assert (trie.child(nodes, vocab + 3) == -1).all()
    assert (trie.child(-1, 2) == -1)

    # the same queries inside jit on the device arrays (fixed shapes: one compilation per trie size bucket)
    device = trie.to_device()
    queries = np.full(QUERIES, -1)
    queries[:len(nodes)] = nodes
    tokens = rng.integers(0, vocab + 1, QUERIES)
    mask, children = device_queries(device, jnp.asarray(queries), jnp.asarray(tokens))
    expected = np.zeros((QUERIES, MASK_VOCAB), bool)
    for row, (_, ref, _) in enumerate(pairs):
        expected[row, list(ref)] = True
    np.testing.assert_array_equal(np.asarray(mask), expected)  # node -1 (padding rows): nothing allowed
    np.testing.assert_array_equal(np.asarray(children), trie.child(queries, tokens))


def test_lookup_maps_sequences_back_to_first_input_index():
    sequences = [[5, 6], [5], [7, 8, 9], [5, 6], [2, 1]]
    trie = PrefixTrie(sequences, eos_token_id=EOS)
    padded = np.array([[5, 6, 1, 0], [5, 1, 0, 0], [7, 8, 9, 1], [2, 1, 0, 0], [5, 7, 1, 0], [5, 6, 0, 0]])
    # [5, 6] repeats: index 0 names it; [5, 7] is no identifier; [5, 6] without EOS is unfinished
    assert trie.lookup(padded).tolist() == [0, 1, 2, 4, -1, -1]
    assert trie.num_identifiers == 4 and trie.num_sequences == 5
    assert trie.max_length == 4


def test_eos_inferred_appended_and_checked():
    assert PrefixTrie([[3, 2], [4, 2]]).eos_token_id == 2
    with pytest.raises(ValueError, match="eos_token_id"):
        PrefixTrie([[3, 2], [4, 5]])
    with pytest.raises(ValueError, match="identifier 1 contains EOS"):
        PrefixTrie([[3], [1, 4]], eos_token_id=1)
    with pytest.raises(ValueError, match="no identifiers"):
        PrefixTrie([], eos_token_id=1)
    trie = PrefixTrie([[], [3]], eos_token_id=1)  # an empty identifier is just EOS
    assert trie.allowed_tokens(0).tolist() == [1, 3]


def test_csr_layout_and_padded_device_arrays():
    trie = PrefixTrie([[4, 5], [4, 6], [3]], eos_token_id=1)
    # breadth first: root, then depth 1 {3, 4}, depth 2 {3-EOS, 4-5, 4-6}, depth 3 {4-5-EOS, 4-6-EOS}
    assert trie.offsets.tolist() == [0, 2, 3, 5, 5, 6, 7, 7, 7]
    assert trie.tokens.tolist() == [3, 4, 1, 5, 6, 1, 1]
    np.testing.assert_array_equal(trie.children, np.arange(1, 8))
    assert trie.nbytes == trie.offsets.nbytes + trie.tokens.nbytes + trie.end_nodes.nbytes + \
        trie.end_identifiers.nbytes
    device = trie.to_device()
    assert device.offsets.shape == (1024,) and device.tokens.shape == (1024,) and device.max_degree == 8
    assert np.flatnonzero(np.asarray(device.root_mask)).tolist() == [3, 4]
    assert trie.to_device() is device


def test_100k_identifiers_build_fast_and_report_memory():
    """Scale check (the 1M-identifier measurement is benchmarks/trie_scale.py)."""
    rng = np.random.default_rng(0)
    count, vocab = 100_000, 32_000
    lengths = rng.integers(4, 9, count)
    flat = rng.integers(2, vocab, int(lengths.sum()))
    sequences = np.split(flat, np.cumsum(lengths)[:-1])
    start = time.perf_counter()
    trie = PrefixTrie(sequences, eos_token_id=EOS)
    seconds = time.perf_counter() - start
    assert seconds < 10, f"building 100k identifiers took {seconds:.1f}s"
    assert trie.num_identifiers == len({tuple(s) for s in sequences})
    # memory is linear in the edges: about 4 bytes of offsets + 4 of tokens per node, 8 per identifier
    assert trie.nbytes == 8 * trie.num_nodes + 8 * trie.num_identifiers
    assert trie.nbytes < 12 * (lengths.sum() + count) + 8 * count
    # spot-check identifiers round-trip
    picks = rng.integers(0, count, 200)
    padded = np.zeros((200, 10), np.int64)
    for row, i in enumerate(picks):
        padded[row, :lengths[i]] = sequences[i]
        padded[row, lengths[i]] = EOS
    found = trie.lookup(padded)
    for i, f in zip(picks, found):
        np.testing.assert_array_equal(sequences[f], sequences[i])

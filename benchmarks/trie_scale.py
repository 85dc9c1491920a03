"""Build time and memory of the identifier PrefixTrie at scale, and the cost of one constrained step's trie work.

``python -m benchmarks.trie_scale [--count 1000000] [--vocab 32000] [--min-len 4] [--max-len 8]``

Random identifiers of ``min-len``..``max-len`` tokens (EOS appended) over ``vocab`` tokens: prints the build
time (from Python lists, as a tokenizer returns them), the node count, host and device bytes, and the time of a
jit-compiled allowed-mask + child lookup for a batch of nodes.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from rdr_jax.decoding import PrefixTrie


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--vocab", type=int, default=32_000)
    p.add_argument("--min-len", type=int, default=4)
    p.add_argument("--max-len", type=int, default=8)
    p.add_argument("--rows", type=int, default=64, help="nodes per mask/child query (batch x beams)")
    args = p.parse_args(argv)

    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_len, args.max_len + 1, args.count)
    flat = rng.integers(2, args.vocab, int(lengths.sum()))
    sequences = [s.tolist() for s in np.split(flat, np.cumsum(lengths)[:-1])]

    start = time.perf_counter()
    trie = PrefixTrie(sequences, eos_token_id=1)
    build_s = time.perf_counter() - start

    device = trie.to_device()
    nodes = jnp.asarray(rng.integers(0, trie.num_nodes, args.rows))
    tokens = jnp.asarray(rng.integers(0, args.vocab, args.rows))
    query = jax.jit(lambda t, n, k: (t.allowed_mask(n, args.vocab), t.child(n, k)))
    jax.block_until_ready(query(device, nodes, tokens))
    start = time.perf_counter()
    for _ in range(20):
        jax.block_until_ready(query(device, nodes, tokens))
    query_ms = (time.perf_counter() - start) / 20 * 1e3

    result = dict(identifiers=trie.num_identifiers, nodes=trie.num_nodes, max_degree=trie.max_degree,
                  build_seconds=round(build_s, 2), host_bytes=trie.nbytes, device_bytes=trie.device_nbytes,
                  host_mib=round(trie.nbytes / 2 ** 20, 1), mask_and_child_ms=round(query_ms, 3),
                  rows=args.rows)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()

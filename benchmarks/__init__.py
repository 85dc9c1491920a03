"""Side-by-side speed benchmarks of rdr_jax against the transformers PyTorch originals.

Run ``python -m benchmarks [names...] [--quick] [--json OUT]``; see benchmarks/README.md.
"""

BENCHMARKS = ("encoder", "reader", "corpus_encoding", "search", "conversion", "train_step", "rerank", "beam_search",
              "grad_cache")

"""Side-by-side speed benchmarks of rdr_jax against the transformers PyTorch originals.

Run ``python -m benchmarks [names...] [--quick] [--json OUT]``; see benchmarks/README.md.
"""

BENCHMARKS = ("encoder", "reader", "teacher_scores", "corpus_encoding", "search", "corpus_search", "conversion",
              "train_step", "rerank", "beam_search", "ngram_index", "training_scale", "grad_cache")

"""Index embeddings by passage id (the directory ``rdr-jax encode`` writes), for training with a frozen context
encoder: its embeddings are looked up instead of recomputed."""

from __future__ import annotations

import numpy as np

from rdr_jax.data.files import resolve_data_path
from rdr_jax.retrieval.encode import load_encoded


class PassageEmbeddings:
    """Index embeddings by passage id (``rdr-jax encode``'s output), for a frozen context encoder."""

    def __init__(self, encoding_dir):
        self.vectors, self.ids = load_encoded(resolve_data_path(encoding_dir))
        self.row = {pid: i for i, pid in enumerate(self.ids)}

    def lookup(self, passage_ids: list[str | None]) -> np.ndarray:
        out = np.zeros((len(passage_ids), self.vectors.shape[1]), np.float32)
        for i, pid in enumerate(passage_ids):
            if pid is not None:
                if pid not in self.row:
                    raise ValueError(f"passage id {pid!r} is not in data.passage_embeddings")
                out[i] = self.vectors[self.row[pid]]
        return out

"""Training objectives as pure functions of arrays, float32 whatever the model's dtype.

- :mod:`rdr_jax.losses.contrastive`: DPR's in-batch negatives, RDR's reader-to-retriever distillation, the DPR
  reader's relevance and span losses;
- :mod:`rdr_jax.losses.ranking`: ranking and distillation objectives for cross-encoders and generative
  retrievers;
- :mod:`rdr_jax.losses.generation`: the teacher-forced cross-entropy of generative retrievers' identifiers;
- :mod:`rdr_jax.losses.masking`: the masked mean and mask value both share.

Every name is available here: ``from rdr_jax import losses; losses.dpr_nll(...)``, ``losses.infonce(...)``.
"""

from rdr_jax.losses.contrastive import (dot_scores, dpr_nll, dpr_nll_from_scores, in_batch_accuracy, rdr_kl,
                                        reader_losses)
from rdr_jax.losses.generation import sequence_cross_entropy
from rdr_jax.losses.masking import NEG, masked_mean
from rdr_jax.losses.ranking import (dgr_margin_ranknet, dgr_ranknet, distill_ranknet, infonce, listwise_kl,
                                    margin_mse, margin_mse_list, pointwise_bce)

__all__ = [
    "NEG", "masked_mean",
    "dot_scores", "dpr_nll", "dpr_nll_from_scores", "in_batch_accuracy", "rdr_kl", "reader_losses",
    "distill_ranknet", "margin_mse", "margin_mse_list", "infonce", "pointwise_bce", "listwise_kl",
    "dgr_margin_ranknet", "dgr_ranknet", "sequence_cross_entropy",
]

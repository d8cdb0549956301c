"""Synthetic tasks of the paper's toy experiments (Xu et al., KV Shifting Attention, arXiv 2411.19574),
deterministic by seed / torch.Generator.

induction  App. D induction-head data (most-recent-occurrence rule; fixes the printed generator)
ngram      Fig. 3 3-gram memory task
theorem3   Theorem 3 loss and its (α1, β1) landscape (Fig. 2)
hopk       App. H hop-k (Sanford, Hsu & Telgarsky 2024)
igsm       App. I iGSM-style grade-school math (Ye et al. 2024), own re-implementation

Mask convention (induction, ngram, igsm): mask[b, p] scores the prediction of token p + 1.
hop-k instead labels each position directly (targets[b, p] is read from the output at p).
"""

from kvshift.tasks import hopk, igsm, induction, ngram, theorem3
from kvshift.tasks.common import accuracy

__all__ = ["induction", "ngram", "theorem3", "hopk", "igsm", "accuracy"]

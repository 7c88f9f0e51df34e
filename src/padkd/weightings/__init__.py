"""How samples count: a weighting reduces per-sample discrepancies to one scalar loss.

`uniform` is what every existing distillation method does. `pad` learns a variance per sample
(and per element) and minimises the Gaussian negative log-likelihood `d/σ² + log σ²`. The
hard-mining family (`focal`, `ohem`, `softmax_hard`, `polynomial`, ...) are the hand-made weightings
the PAD paper argues against; their weights are detached and normalised to mean 1 in the batch.
`entropy` (EA-KD) and `wsld` are the published schemes since PAD that read the task's logits and labels;
`inverse_discrepancy` and `variance_memory` are PAD's ceiling (its optimum 1/d, with no head).
"""

from padkd.weightings.base import WEIGHTINGS, SampleWeighting, Uniform, WeightedLoss, Weighting
from padkd.weightings.ceiling import InverseDiscrepancy, VarianceMemory
from padkd.weightings.hard_mining import OHEM, DiscardHardest, Focal, Polynomial, SoftmaxEasy, SoftmaxHard
from padkd.weightings.heads import DimensionHead, LinearHead, MapsHead, TokenHead, VarianceHead, pooled
from padkd.weightings.logits import EntropyAware, WeightedSoftLabels
from padkd.weightings.pad import DEFAULT_LOG_VAR_FLOOR, DEFAULT_WARMUP_STEPS, PAD

__all__ = ["WEIGHTINGS", "Weighting", "WeightedLoss", "SampleWeighting", "Uniform", "Focal", "OHEM", "SoftmaxHard",
           "SoftmaxEasy", "Polynomial", "DiscardHardest", "PAD", "DEFAULT_LOG_VAR_FLOOR", "DEFAULT_WARMUP_STEPS",
           "VarianceHead", "LinearHead", "MapsHead", "TokenHead", "DimensionHead", "pooled", "EntropyAware",
           "WeightedSoftLabels", "InverseDiscrepancy", "VarianceMemory"]

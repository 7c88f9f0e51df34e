"""Methods on the networks' outputs (logits)."""

from __future__ import annotations

from torch import Tensor
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.methods.base import METHODS, Method


@METHODS.register("kd")
class KD(Method):
    """Hinton KD: sample i's discrepancy is `T² · KL(softmax(t_i/T) ‖ softmax(s_i/T))`.

    The T² factor keeps gradient magnitudes comparable across temperatures; the batch mean of these
    discrepancies equals `KLDivLoss(reduction="batchmean") · T²`.
    """

    reference = "Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. arXiv 1503.02531, 2015"

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, student: Tensor, teacher: Tensor, batch: Batch) -> Tensor:  # type: ignore[override]
        t = self.temperature
        log_p_s = F.log_softmax(student.float() / t, dim=1)
        log_p_t = F.log_softmax(teacher.float() / t, dim=1)
        return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * (t * t)

"""The method contract: `forward(student, teacher, batch)` → per-sample discrepancies `[B]` or `[B, E]`.

What every registered method must satisfy (checked for all of them, plugins included, by
`tests/test_contract.py`):
- dim 0 is the sample (the weighting unit); values are >= 0. A method whose loss has a part that
  can be negative or that no sample owns (VID's `log σ²_c`) declares `signed = True` and returns that
  part as `Discrepancy.unweighted`, which is added after the weighting;
- gradients reach the student and the method's own modules, never the teacher;
- in eval mode no state changes (memory banks, running statistics);
- permuting the batch permutes the rows (relational methods: rows and, for `[B, B]`, columns);
- fp16/bf16 features work (reductions in fp32); batch sizes 1 and 2 work or fail with a clear message;
- a multi-part method (RKD's distance and angle, DKD's two parts, AT's layers) returns one element per
  part at its published scale and sets `Discrepancy(..., sum_elements=True)`, so a sample's discrepancy
  is the sum of its parts and `uniform` gives the method's usual loss.

Each method also says what its elements are (`elements`) and whether it decomposes per sample at all
(`unit`); weightings refuse what they cannot weight at config check (`Weighting.check`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from padkd.batch import Batch
from padkd.context import BuildContext, Features
from padkd.discrepancy import Discrepancy
from padkd.registry import Registry

METHODS: Registry[Method] = Registry("method")


class Method(nn.Module):
    """Base class of distillation methods. Subclasses never reduce over the batch dimension.

    `build(ctx)` creates modules whose shapes depend on the tapped features or on the data
    (connectors, regressors, memory banks) before the optimizer exists; their parameters train with
    the student, are checkpointed, and are dropped on export.
    """

    #: The paper the method comes from (shown by `padkd list methods`).
    reference: str = ""
    #: The term weight β used when a config gives none: the CRD benchmark's value for the method.
    default_weight: float = 1.0
    #: "fixed": element e means the same thing in every batch (a feature dimension, a layer, a part);
    #: "exchangeable": elements are partners such as row j of a pairwise loss, and E follows the batch.
    #: PAD's `per_element` mode needs fixed elements.
    elements: Literal["fixed", "exchangeable"] = "fixed"
    #: "sample": the discrepancy decomposes per sample; "batch": only its batch mean means anything
    #: (a per-class statistic, for example), so only the `uniform` weighting accepts it.
    unit: Literal["sample", "batch"] = "sample"
    #: For a batch-level method: how to get a per-sample variant (shown when a weighting refuses it).
    per_sample_fix: str = ""
    #: True when the method returns an unweighted part (`Discrepancy.unweighted`) beside d >= 0.
    signed: bool = False
    #: Epochs over which the term's weight ramps up linearly (DKD's warm-up); 0 for none.
    warmup_epochs: float = 0.0
    #: False for rank-local state that the method keeps consistent itself (a memory bank updated
    #: from all ranks): the engine then never broadcasts this method's buffers.
    sync_buffers: bool = True
    #: True when some forwards leave some of the method's parameters unused (DDP must know).
    unused_parameters: bool = False
    #: True when the discrepancies are random given the inputs (sampled negatives): the contract test
    #: then checks batch permutation on distributions of rows, not on values.
    stochastic: bool = False

    @classmethod
    def example_features(cls, batch_size: int, generator: torch.Generator) -> tuple[Features, Features]:
        """Student and teacher features of the kind this method reads (default: 10-way logits), so the
        registry-wide contract test can exercise every method, plugins included."""
        return (torch.randn(batch_size, 10, generator=generator), torch.randn(batch_size, 10, generator=generator))

    def __init__(self) -> None:
        # An explicit signature (nn.Module's takes **kwargs): the registry then rejects unknown options.
        super().__init__()

    def build(self, ctx: BuildContext) -> None:
        """Create modules whose shapes depend on the features or the data (default: none)."""

    def forward(self, student: Features, teacher: Features, batch: Batch) -> Tensor | Discrepancy:
        raise NotImplementedError

    def connector_output(self, student: Features) -> Tensor | None:
        """The student's features after the method's own connector (a hint's linear map), for a learned
        weighting that reads them (term `embedding: connector`); None for methods without one."""
        return None

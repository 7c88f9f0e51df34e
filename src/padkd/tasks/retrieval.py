"""Metric learning (image retrieval): embeddings trained with a metric loss, evaluated by Recall@K, MAP@R,
R-precision and NMI.

The protocol is that of RKD (Park et al., Relational Knowledge Distillation, CVPR 2019): train on the
first half of the classes, retrieve among the unseen second half. Every test sample is a query against
all the others (the query itself excluded); Recall@K is the percentage of queries with a sample of their
own class among their K nearest neighbours (Euclidean distance on the model's L2-normalised output).
MAP@R and R-precision (Musgrave et al., A Metric Learning Reality Check, ECCV 2020) look at the query's
first R neighbours, R being the number of other samples of its class.

Nearest neighbours are exact. The torch search runs in blocks of `chunk_size` queries, so the full
N × N distance matrix never exists (Stanford Online Products: 60k × 60k); ties in distance go to the
lower dataset index. With faiss installed (`pip install padkd[faiss]`), CPU searches use its exact
`IndexFlatL2` (its own order among exact ties).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from padkd.batch import Batch
from padkd.distributed import all_gather_cat, broadcast_object, is_distributed
from padkd.errors import PadkdError
from padkd.tasks.base import TASKS, Evaluator, Task

Search = Literal["auto", "torch", "faiss"]


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_neighbours(x: Tensor, k: int, chunk_size: int) -> Tensor:
    """Exact k nearest other rows of `x` by Euclidean distance, in blocks of `chunk_size` query rows;
    among equal distances the lower index comes first."""
    n = x.shape[0]
    squared = (x * x).sum(1)
    out = torch.empty(n, k, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        rows = torch.arange(stop - start, device=x.device)
        d = squared[start:stop, None] + squared[None, :] - 2 * x[start:stop] @ x.T
        d[rows, rows + start] = float("inf")  # the query is not its own neighbour
        kth = d.topk(k, dim=1, largest=False).values[:, -1:]
        # Everything closer than the k-th distance, then the lowest indices among those at exactly that distance.
        closer = d < kth
        tied = d == kth
        room = k - closer.sum(1, keepdim=True)
        take = closer | (tied & (tied.cumsum(1, dtype=torch.int32) <= room))
        picked = take.nonzero()[:, 1].view(stop - start, k)  # ascending index within each row
        order = d.gather(1, picked).argsort(dim=1, stable=True)
        out[start:stop] = picked.gather(1, order)
    return out


def _faiss_neighbours(x: Tensor, k: int) -> Tensor:
    """Exact k nearest other rows with faiss's `IndexFlatL2`: k + 1 results, the query's own row removed."""
    import faiss

    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    index = faiss.IndexFlatL2(data.shape[1])
    index.add(data)
    _, found = index.search(data, k + 1)
    found_t = torch.from_numpy(found).long()
    own = found_t == torch.arange(len(found_t))[:, None]
    own[~own.any(1), -1] = True  # an exact duplicate ranked before the query pushed it out: drop the last
    return found_t[~own].view(len(found_t), k).to(x.device)


def nearest_neighbours(embeddings: Tensor, k: int, chunk_size: int = 1024, search: Search = "auto") -> Tensor:
    """`[N, k]` indices of each row's k nearest other rows (Euclidean), nearest first; exact search.

    `search`: "torch" (blocks of `chunk_size` queries, ties to the lower index), "faiss" (IndexFlatL2),
    or "auto" (faiss for CPU tensors when it is installed, torch otherwise)."""
    x = embeddings.detach().float()
    n = x.shape[0]
    if n < 2 or not 1 <= k < n:
        raise ValueError(f"nearest neighbours need 1 <= k < N samples, got k={k} and N={n}")
    if not torch.isfinite(x).all():
        raise PadkdError("retrieval evaluation: the embeddings contain NaN or inf (did training diverge?)")
    if search == "faiss" and not _faiss_available():
        raise PadkdError("task.search: faiss is not installed; pip install 'padkd[faiss]' or use search: torch")
    if search == "faiss" or (search == "auto" and x.device.type == "cpu" and _faiss_available()):
        return _faiss_neighbours(x, k)
    return _torch_neighbours(x, k, chunk_size)


def recall_at(neighbours: Tensor, labels: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Recall@K in percent: the share of queries with a same-class sample among their first K neighbours."""
    hits = labels[neighbours] == labels[:, None]
    return {f"recall@{k}": 100.0 * float(hits[:, :k].any(1).double().mean()) for k in ks}


def r_metrics(neighbours: Tensor, labels: Tensor) -> dict[str, float]:
    """MAP@R and R-precision in percent, as pytorch-metric-learning's `AccuracyCalculator` computes them.

    R is the number of other samples of the query's class, and `neighbours` (`[N, k]`, nearest first)
    must hold at least the largest R columns. R-precision: the share of the first R neighbours of the
    query's class. MAP@R: the mean over those R ranks of the precision at each rank holding one of its
    class (0 at the others). Queries alone in their class have no R and are left out (NaN if all are)."""
    _, label_ids = torch.unique(labels, return_inverse=True)
    r = torch.bincount(label_ids)[label_ids] - 1
    depth = int(r.max())
    if neighbours.shape[1] < depth:
        raise ValueError(f"MAP@R needs the {depth} nearest neighbours of each query, got {neighbours.shape[1]}")
    if depth == 0:
        return {"map@r": float("nan"), "r_precision": float("nan")}
    ranks = torch.arange(1, depth + 1, device=labels.device)
    relevant = (labels[neighbours[:, :depth]] == labels[:, None]) & (ranks[None, :] <= r[:, None])
    hits = relevant.cumsum(1)
    average_precision = ((hits * relevant).double() / ranks).sum(1) / r
    precision = relevant.sum(1).double() / r
    kept = r > 0
    return {"map@r": 100.0 * float(average_precision[kept].mean()),
            "r_precision": 100.0 * float(precision[kept].mean())}


def clustering_nmi(embeddings: Tensor, labels: Tensor, seed: int = 0, n_init: int = 10) -> float:
    """Normalised mutual information (arithmetic mean normalisation, scikit-learn's default) between the
    labels and a k-means clustering of the embeddings into as many clusters as there are labels.

    k-means++ runs `n_init` times from `seed` and keeps the lowest inertia: one run's NMI moves by
    several points with the seed on the same embeddings, ten (scikit-learn's default before 1.4) much less."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    y = labels.cpu().numpy()
    n_clusters = len(np.unique(y))
    clusters = KMeans(n_clusters=n_clusters, n_init=n_init, random_state=seed).fit_predict(
        embeddings.detach().float().cpu().numpy())
    return float(normalized_mutual_info_score(y, clusters))


def retrieval_metrics(embeddings: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 2, 4, 8), with_nmi: bool = True,
                      chunk_size: int = 1024, search: Search = "auto", with_map_at_r: bool = True,
                      nmi_n_init: int = 10) -> dict[str, float]:
    """Recall@K (percent) for every K in `ks` and, if asked, MAP@R and R-precision (percent) and NMI,
    over one set of embeddings (all queries); one exact search serves Recall@K and MAP@R."""
    n = embeddings.shape[0]
    k = min(max(ks), n - 1)
    if with_map_at_r:
        k = max(k, int(torch.unique(labels, return_counts=True)[1].max()) - 1)
    found = nearest_neighbours(embeddings, k, chunk_size, search)
    labels = labels.to(found.device)
    metrics = recall_at(found, labels, ks)
    if with_map_at_r:
        metrics.update(r_metrics(found, labels))
    if with_nmi:
        metrics["nmi"] = clustering_nmi(embeddings, labels, n_init=nmi_n_init)
    return metrics


class RetrievalEvaluator(Evaluator):
    """Keeps every embedding of the split; `compute()` gathers them from all ranks (in dataset order),
    computes `metrics(embeddings, labels)` on rank 0 and shares the result."""

    def __init__(self, metrics: Callable[[Tensor, Tensor], dict[str, float]]) -> None:
        self.metrics = metrics
        self.parts: dict[str, list[Tensor]] = {"embedding": [], "label": [], "index": []}

    def update(self, output: Tensor, batch: Batch) -> None:
        self.parts["embedding"].append(output.detach().float())
        self.parts["label"].append(batch.targets.detach())
        self.parts["index"].append(batch.index.detach().to(output.device))

    def compute(self) -> dict[str, float]:
        if not self.parts["embedding"]:
            raise PadkdError("retrieval evaluation: this process saw no samples of the split")
        gathered = {key: all_gather_cat(torch.cat(values)) for key, values in self.parts.items()}
        order = gathered["index"].argsort()  # rank order → dataset order: the same result with any world size
        metrics: Any = None
        if not is_distributed() or dist.get_rank() == 0:
            metrics = self.metrics(gathered["embedding"][order], gathered["label"][order])
        return broadcast_object(metrics)  # type: ignore[return-value]


@TASKS.register("retrieval")
class Retrieval(Task):
    """Metric learning: a metric loss on L2-normalised embeddings; Recall@K, MAP@R, R-precision and NMI
    on unseen classes.

    `loss`: `triplet_distance_weighted` (margin triplet with distance-weighted negatives, Wu et al. 2017,
    the RKD teachers' loss), `triplet_batch_hard` (hardest positive and negative per anchor, Hermans et
    al. 2017) or `multi_similarity` (Wang et al. 2019, with its pair miner); all from
    pytorch-metric-learning. Triplet losses average over every mined triplet (RKD's reduction).
    `map_at_r`: also MAP@R and R-precision (the search then keeps each query's R nearest neighbours, an
    `[N, max R]` index matrix); `nmi_n_init`: k-means initialisations behind NMI.
    Model factories receive `in_channels` only; the embedding size is a model option.
    """

    primary_metric = "recall@1"
    model_fields = frozenset({"in_channels"})

    def __init__(
        self,
        loss: Literal["triplet_distance_weighted", "triplet_batch_hard", "multi_similarity"]
        = "triplet_distance_weighted",
        margin: float = 0.2,
        cutoff: float = 0.5,
        nonzero_loss_cutoff: float = 1.4,
        ms_alpha: float = 2.0,
        ms_beta: float = 50.0,
        ms_base: float = 0.5,
        ms_epsilon: float = 0.1,
        recall_at: tuple[int, ...] = (1, 2, 4, 8),
        map_at_r: bool = True,
        nmi: bool = True,
        nmi_n_init: int = 10,
        chunk_size: int = 1024,
        search: Search = "auto",
        record_neighbours: int = 4,
    ) -> None:
        if 1 not in recall_at or min(recall_at) < 1:
            raise ValueError(f"recall_at must hold positive K values including 1 (recall@1 selects models), "
                             f"got {list(recall_at)}")
        if chunk_size < 1 or record_neighbours < 1 or nmi_n_init < 1:
            raise ValueError("chunk_size, record_neighbours and nmi_n_init must be >= 1")
        from pytorch_metric_learning import losses, miners, reducers

        self.chunk_size, self.search, self.record_neighbours = chunk_size, search, record_neighbours
        self.metrics = functools.partial(retrieval_metrics, ks=tuple(sorted(set(recall_at))), with_nmi=nmi,
                                         chunk_size=chunk_size, search=search, with_map_at_r=map_at_r,
                                         nmi_n_init=nmi_n_init)
        self.metric_loss: Any
        self.miner: Any
        if loss == "multi_similarity":
            self.metric_loss = losses.MultiSimilarityLoss(alpha=ms_alpha, beta=ms_beta, base=ms_base)
            self.miner = miners.MultiSimilarityMiner(epsilon=ms_epsilon)
        else:
            self.metric_loss = losses.TripletMarginLoss(margin=margin, reducer=reducers.MeanReducer())
            self.miner = miners.BatchHardMiner() if loss == "triplet_batch_hard" else \
                miners.DistanceWeightedMiner(cutoff=cutoff, nonzero_loss_cutoff=nonzero_loss_cutoff)

    def loss(self, output: Tensor, batch: Batch) -> Tensor:
        embeddings = output.float()
        labels = batch.targets
        return self.metric_loss(embeddings, labels, self.miner(embeddings, labels))

    def evaluator(self) -> Evaluator:
        return RetrievalEvaluator(self.metrics)

    def record_columns(self, student: Tensor, teacher: Tensor | None, batch: Batch) -> dict[str, Tensor]:
        # The embeddings ride along as `[B, D]` columns; `finish_records` turns them into neighbour columns.
        row = {"target": batch.targets, "_student": student.float()}
        if teacher is not None:
            row["_teacher"] = teacher.float()
        return row

    def finish_records(self, table: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per query: its nearest neighbours' dataset indices (`student_nn1`, ...) among all samples of the
        split and whether the first is of its class (`student_correct`); the same for the teacher."""
        out = {key: value for key, value in table.items() if not key.startswith("_")}
        labels = table["target"]
        for role in ("student", "teacher"):
            if f"_{role}" not in table:
                continue
            k = min(self.record_neighbours, len(labels) - 1)
            found = nearest_neighbours(table[f"_{role}"], k, self.chunk_size, self.search)
            for j in range(k):
                out[f"{role}_nn{j + 1}"] = table["index"][found[:, j]]
            out[f"{role}_correct"] = (labels[found[:, 0]] == labels).int()
        return out

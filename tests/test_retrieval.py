"""Metric learning: Recall@K, MAP@R, R-precision and NMI, exact chunked search, the P×K sampler, the data
readers, the models, the similarity term and a tiny end-to-end run of the retrieval task."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from padkd.batch import Batch
from padkd.data import DATASETS
from padkd.data.samplers import SAMPLERS
from padkd.discrepancy import Discrepancy
from padkd.errors import PadkdError
from padkd.methods import METHODS
from padkd.models import MODELS
from padkd.taps import Taps
from padkd.tasks import TASKS
from padkd.tasks.retrieval import clustering_nmi, nearest_neighbours, r_metrics, recall_at, retrieval_metrics
from padkd.weightings import WEIGHTINGS

# ---------------------------------------------------------------- Recall@K, MAP@R, R-precision and NMI


def test_recall_on_points_of_a_line() -> None:
    # Positions 0, 1, 3, 10, 11, 13.5 with labels 0 1 0 1 1 0. Nearest others, by hand:
    # q0: 1 2 3 4 5 (first own class at rank 2)   q1: 0 2 3 4 5 (rank 3)   q2: 1 0 3 4 5 (rank 2)
    # q3: 4 5 2 1 0 (rank 1)   q4: 3 5 2 1 0 (rank 1)   q5: 4 3 2 1 0 (rank 3)
    x = torch.tensor([[0.0, 0], [1, 0], [3, 0], [10, 0], [11, 0], [13.5, 0]])
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    found = nearest_neighbours(x, 5, search="torch")
    assert found.tolist() == [[1, 2, 3, 4, 5], [0, 2, 3, 4, 5], [1, 0, 3, 4, 5], [4, 5, 2, 1, 0], [3, 5, 2, 1, 0],
                              [4, 3, 2, 1, 0]]
    metrics = retrieval_metrics(x, labels, (1, 2, 4, 8), with_nmi=False, with_map_at_r=False, search="torch")
    assert metrics == pytest.approx({"recall@1": 100 * 2 / 6, "recall@2": 100 * 4 / 6, "recall@4": 100.0,
                                     "recall@8": 100.0})  # K beyond N − 1 = 5 others: every other sample


def test_map_at_r_and_r_precision_by_hand_with_a_query_alone_in_its_class() -> None:
    # The six points above plus one of its own class far away (30, 0): it is never among anyone's first
    # R = 2 neighbours and has no R itself, so it is left out. Each class has 3 samples: R = 2 for all six.
    # First two neighbours (class match): q0: 1 2 (no, yes)  q1: 0 2 (no, no)  q2: 1 0 (no, yes)
    # q3: 4 5 (yes, no)  q4: 3 5 (yes, no)  q5: 4 3 (no, no).
    # R-precision per query: 1/2 0 1/2 1/2 1/2 0. AP@R: precision at each matching rank, summed, over R:
    # q0 (1/2)/2, q1 0, q2 (1/2)/2, q3 (1/1)/2, q4 (1/1)/2, q5 0.
    x = torch.tensor([[0.0, 0], [1, 0], [3, 0], [10, 0], [11, 0], [13.5, 0], [30, 0]])
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 2])
    metrics = retrieval_metrics(x, labels, (1,), with_nmi=False, search="torch")
    assert metrics["r_precision"] == pytest.approx(100 * (4 * 0.5) / 6)
    assert metrics["map@r"] == pytest.approx(100 * (0.25 + 0.25 + 0.5 + 0.5) / 6)
    # Class 7 has four samples (R = 3), sample 2 is alone. Matches among the first three neighbours:
    # q0 ranks 1, 3: AP@R (1/1 + 2/3)/3, R-precision 2/3; q1 and q4 ranks 2, 3: (1/2 + 2/3)/3, 2/3; q3 all: 1, 1.
    neighbours = torch.tensor([[1, 2, 3, 4], [2, 0, 3, 4], [0, 1, 3, 4], [0, 1, 4, 2], [2, 3, 0, 1]])
    one = r_metrics(neighbours, torch.tensor([7, 7, 9, 7, 7]))
    assert one["map@r"] == pytest.approx(100 * ((1 + 2 / 3) / 3 + 2 * (1 / 2 + 2 / 3) / 3 + 1) / 4)
    assert one["r_precision"] == pytest.approx(100 * (3 * 2 / 3 + 1) / 4)
    alone = r_metrics(torch.tensor([[1], [0]]), torch.tensor([0, 1]))
    assert math.isnan(alone["map@r"]) and math.isnan(alone["r_precision"])
    with pytest.raises(ValueError, match="2 nearest neighbours"):
        r_metrics(torch.tensor([[1], [0], [0]]), torch.tensor([5, 5, 5]))


def _digits_5_to_9() -> tuple[torch.Tensor, torch.Tensor]:
    """Real, fixed embeddings: scikit-learn's digits 5–9 (896 images), pixels as unit 64-d vectors."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keep = y >= 5
    return F.normalize(torch.tensor(x[keep], dtype=torch.float32), dim=1), torch.tensor(y[keep])


def _pml_r_metrics(x: torch.Tensor, labels: torch.Tensor, knn_func: object) -> dict[str, float]:
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    calculator = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"), k="max_bin_count",
                                    knn_func=knn_func, device=torch.device("cpu"))
    found = calculator.get_accuracy(x, labels)
    return {"map@r": 100 * found["mean_average_precision_at_r"], "r_precision": 100 * found["r_precision"]}


def test_map_at_r_equals_pytorch_metric_learning_with_its_own_search() -> None:
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.inference import CustomKNN

    # Random directions: no two distances so close that float32 could order them differently.
    g = torch.Generator().manual_seed(4)
    x = F.normalize(torch.randn(200, 16, generator=g), dim=1)
    labels = torch.randint(0, 9, (200,), generator=g)
    labels[0] = 42  # a query alone in its class: left out by both
    ours = retrieval_metrics(x, labels, (1,), with_nmi=False, search="torch")
    theirs = _pml_r_metrics(x, labels, CustomKNN(LpDistance(normalize_embeddings=False)))
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs, rel=1e-12, abs=0)


def test_map_at_r_equals_pytorch_metric_learning_on_real_embeddings_with_ties() -> None:
    # Integer pixels give exact distance ties, which each search may order its own way; handing
    # pytorch-metric-learning padkd's neighbours compares the metrics themselves.
    x, labels = _digits_5_to_9()

    def our_search(query: torch.Tensor, k: int, reference: torch.Tensor, ref_includes_query: bool):  # noqa: ANN202
        assert ref_includes_query and query is reference
        return None, nearest_neighbours(query, k, search="torch")

    ours = retrieval_metrics(x, labels, (1,), with_nmi=False, search="torch")
    theirs = _pml_r_metrics(x, labels, our_search)
    assert {k: ours[k] for k in theirs} == pytest.approx(theirs, rel=1e-12, abs=0)
    assert 0 < ours["map@r"] < ours["r_precision"] < 100


def test_ties_go_to_the_lower_index_and_the_query_is_excluded() -> None:
    # a = b = (0, 0) and c = d = (1, 0): each query has a twin at distance 0 (never itself) and two
    # samples tied at distance 1, taken in index order. Labels a0 b1 c1 d0.
    x = torch.tensor([[0.0, 0], [0, 0], [1, 0], [1, 0]])
    labels = torch.tensor([0, 1, 1, 0])
    found = nearest_neighbours(x, 3, chunk_size=1, search="torch")
    assert found.tolist() == [[1, 2, 3], [0, 2, 3], [3, 0, 1], [2, 0, 1]]
    assert recall_at(found, labels, (1, 2, 3)) == pytest.approx({"recall@1": 0.0, "recall@2": 50.0, "recall@3": 100.0})


def test_chunked_search_equals_one_block_and_a_brute_force_sort() -> None:
    x = torch.randn(150, 8, generator=torch.Generator().manual_seed(0))
    blocks = nearest_neighbours(x, 10, chunk_size=7, search="torch")
    whole = nearest_neighbours(x, 10, chunk_size=10_000, search="torch")
    d = torch.cdist(x.double(), x.double())
    d.fill_diagonal_(math.inf)
    brute = d.argsort(dim=1, stable=True)[:, :10]
    assert torch.equal(blocks, whole) and torch.equal(blocks, brute)


def test_faiss_search_equals_the_exact_torch_search() -> None:
    pytest.importorskip("faiss")
    x = torch.randn(120, 16, generator=torch.Generator().manual_seed(1))
    assert torch.equal(nearest_neighbours(x, 8, search="faiss"), nearest_neighbours(x, 8, search="torch"))


def test_nmi_of_three_separated_clusters_against_the_labels() -> None:
    # Clusters A = {0, 1}, B = {2, 3}, C = {4, 5} far apart; labels 0 0 1 1 1 2 (3 labels → 3 clusters).
    centres = torch.tensor([[0.0, 0], [100, 0], [0, 100]])
    x = centres.repeat_interleave(2, 0) + 0.01 * torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    counts = np.array([[2, 0, 0], [0, 2, 0], [0, 1, 1]], dtype=float) / 6  # p(cluster, label)
    pc, py = counts.sum(1), counts.sum(0)
    mutual = sum(p * math.log(p / (pc[i] * py[j])) for (i, j), p in np.ndenumerate(counts) if p > 0)
    entropy = [-sum(p * math.log(p) for p in dist if p > 0) for dist in (pc, py)]
    assert clustering_nmi(x, labels) == pytest.approx(mutual / (sum(entropy) / 2))


def test_nmi_hardly_moves_with_the_k_means_seed() -> None:
    # Same embeddings, 20 seeds. Measured: one k-means++ run per seed spreads NMI over 0.572–0.780 (0.208);
    # the default 10 runs, lowest inertia kept, over 0.766–0.783 (0.017).
    x, labels = _digits_5_to_9()
    seeds = range(20)
    default = [clustering_nmi(x, labels, seed=s) for s in seeds]
    single = [clustering_nmi(x, labels, seed=s, n_init=1) for s in seeds]
    assert max(default) - min(default) < 0.025
    assert max(single) - min(single) > 0.15  # the spread the several initialisations remove
    assert clustering_nmi(x, labels, seed=3) == default[3]  # deterministic per seed


def test_the_evaluator_orders_samples_by_index_whatever_the_batch_order() -> None:
    task = TASKS.create("retrieval", {"search": "torch"}, "task")
    x = torch.tensor([[0.0, 0], [0, 0], [1, 0], [1, 0]])
    labels = torch.tensor([0, 1, 1, 0])
    evaluator = task.evaluator()
    for part in ([3, 1], [2, 0]):  # the tie-breaking above needs dataset order back
        i = torch.tensor(part)
        evaluator.update(x[i], Batch(inputs=x[i], targets=labels[i], index=i))
    metrics = evaluator.compute()
    assert metrics["recall@1"] == 0.0 and metrics["recall@2"] == 50.0 and metrics["recall@8"] == 100.0
    assert metrics["map@r"] == metrics["r_precision"] == 0.0  # R = 1: every first neighbour is of another class
    assert 0.0 <= metrics["nmi"] <= 1.0


def _evaluator_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x, labels = _digits_5_to_9()
        order = torch.randperm(len(labels) - 1, generator=torch.Generator().manual_seed(0))
        mine = order[rank::world]  # each rank a scrambled shard of 895 samples: 448 and 447
        evaluator = TASKS.create("retrieval", {"search": "torch", "chunk_size": 50}, "task").evaluator()
        for part in mine.split(100):
            evaluator.update(x[part], Batch(inputs=x[part], targets=labels[part], index=part))
        torch.save(evaluator.compute(), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch
def test_metrics_gathered_from_two_ranks_equal_one_process(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_evaluator_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    x, labels = _digits_5_to_9()
    single = retrieval_metrics(x[:-1], labels[:-1], chunk_size=10_000, search="torch")
    assert ranks[0] == ranks[1] == single
    assert set(single) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}


# ---------------------------------------------------------------- task losses


def _unit(n: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


def test_batch_hard_triplet_loss_matches_its_formula() -> None:
    e = _unit(12, 5, 0).requires_grad_(True)
    y = torch.arange(4).repeat_interleave(3)
    task = TASKS.create("retrieval", {"loss": "triplet_batch_hard", "margin": 0.3}, "task")
    loss = task.loss(e, Batch(inputs=e, targets=y, index=torch.arange(12)))
    d = torch.cdist(e.detach().double(), e.detach().double())
    same = y[:, None] == y[None, :]
    hardest_pos = torch.where(same & ~torch.eye(12, dtype=torch.bool), d, -math.inf).max(1).values
    hardest_neg = torch.where(~same, d, math.inf).min(1).values
    expected = (hardest_pos - hardest_neg + 0.3).clamp_min(0).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    loss.backward()
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_multi_similarity_loss_matches_its_formula() -> None:
    e = _unit(10, 4, 1)
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    alpha, beta, lam, eps = 2.0, 10.0, 0.5, 0.1
    task = TASKS.create("retrieval", {"loss": "multi_similarity", "ms_alpha": alpha, "ms_beta": beta, "ms_base": lam,
                                     "ms_epsilon": eps}, "task")
    loss = task.loss(e, Batch(inputs=e, targets=y, index=torch.arange(10)))
    s = (e @ e.T).double()
    total = 0.0
    for i in range(10):  # Wang et al. 2019: mine pairs with ε, then the soft positive and negative terms
        pos = [s[i, j] for j in range(10) if j != i and y[j] == y[i]]
        neg = [s[i, j] for j in range(10) if y[j] != y[i]]
        kept_pos = [p for p in pos if p - eps < max(neg)]
        kept_neg = [n for n in neg if n + eps > min(pos)]
        total += math.log(1 + sum(math.exp(-alpha * (p - lam)) for p in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (n - lam)) for n in kept_neg)) / beta
    assert float(loss) == pytest.approx(total / 10, rel=1e-4)


def test_distance_weighted_triplets_are_zero_when_classes_are_apart() -> None:
    # Two antipodal pairs of classes: every negative lies beyond the margin, so no triplet has a loss.
    e = torch.tensor([[1.0, 0], [1, 0], [-1, 0], [-1, 0]])
    y = torch.tensor([0, 0, 1, 1])
    task = TASKS.create("retrieval", {}, "task")
    torch.manual_seed(0)
    assert float(task.loss(e, Batch(inputs=e, targets=y, index=torch.arange(4)))) == 0.0
    close = _unit(12, 8, 2).requires_grad_(True)
    loss = task.loss(close, Batch(inputs=close, targets=torch.arange(4).repeat_interleave(3), index=torch.arange(12)))
    assert torch.isfinite(loss) and float(loss.detach()) > 0
    loss.backward()
    assert close.grad is not None


def test_task_options_are_checked() -> None:
    with pytest.raises(PadkdError, match="recall_at"):
        TASKS.create("retrieval", {"recall_at": [2, 4]}, "task")
    with pytest.raises(PadkdError, match="loss"):
        TASKS.create("retrieval", {"loss": "contrastive"}, "task")
    with pytest.raises(PadkdError, match="nmi_n_init"):
        TASKS.create("retrieval", {"nmi_n_init": 0}, "task")


# ---------------------------------------------------------------- the P×K sampler


def _sampler(targets: torch.Tensor, batch_size: int = 12, seed: int = 0, rank: int = 0, world: int = 1,
             **options: object):
    return SAMPLERS.create("m_per_class", {"samples_per_class": 3, **options}, "data.sampler", size=len(targets),
                          seed=seed, rank=rank, world=world, batch_size=batch_size, targets=targets)


TARGETS = torch.arange(6).repeat(12)[torch.randperm(72, generator=torch.Generator().manual_seed(0))]


def test_batches_hold_p_classes_times_k_samples() -> None:
    sampler = _sampler(TARGETS)
    sampler.set_epoch(3)
    order = list(sampler)
    assert len(order) == len(sampler) == 6 * 12  # 6 classes × 4 groups of 3 = 24 groups = 6 batches of 4 groups
    assert len(set(order)) == len(order)  # one pass: every sample once
    for b in range(0, len(order), 12):
        counts = torch.bincount(TARGETS[order[b:b + 12]], minlength=6)
        assert sorted(counts.tolist()) == [0, 0, 3, 3, 3, 3]


def test_resume_from_any_start_gives_the_rest_of_the_epoch() -> None:
    sampler = _sampler(TARGETS)
    sampler.set_epoch(7)
    full = list(sampler)
    for start in (0, 5, 12, 36, 71, 72):
        again = _sampler(TARGETS)
        again.set_epoch(7, start=start)
        assert list(again) == full[start:] and len(again) == len(full) - start


def test_epochs_and_seeds_change_the_order_and_nothing_else_does() -> None:
    def order(key: int, seed: int = 0) -> list[int]:
        sampler = _sampler(TARGETS, seed=seed)
        sampler.set_epoch(key)
        return list(sampler)

    torch.manual_seed(123)  # the global RNG plays no part
    first = order(1)
    torch.manual_seed(456)
    assert order(1) == first
    assert order(2) != first and order(1, seed=1) != first


def test_ranks_get_disjoint_batches() -> None:
    parts = []
    for rank in range(2):
        sampler = _sampler(TARGETS, rank=rank, world=2)
        sampler.set_epoch(0)
        parts.append(list(sampler))
    assert len(parts[0]) == len(parts[1]) == 36
    assert not set(parts[0]) & set(parts[1])


def test_a_pass_never_repeats_a_sample_whatever_the_class_sizes() -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        sizes = torch.randint(3, 30, (8,), generator=g)
        sizes[0] = 100  # one class larger than the number of batches: it cannot fill them all
        targets = torch.arange(8).repeat_interleave(sizes)
        targets = targets[torch.randperm(len(targets), generator=g)]
        sampler = _sampler(targets)
        sampler.set_epoch(0)
        order = list(sampler)
        assert len(set(order)) == len(order) == len(sampler)
        for b in range(0, len(order), 12):
            assert sorted(torch.bincount(targets[order[b:b + 12]], minlength=8).tolist())[-4:] == [3, 3, 3, 3]


def test_small_classes_are_filled_and_epochs_may_span_passes() -> None:
    targets = torch.tensor([0] * 2 + [1] * 6 + [2] * 6 + [3] * 6)  # class 0 has fewer than K = 3 samples
    sampler = _sampler(targets, batch_size=6, batches_per_epoch=10)
    sampler.set_epoch(0)
    order = list(sampler)
    assert len(order) == 60
    for b in range(0, 60, 6):
        chunk = order[b:b + 6]
        assert sorted(torch.bincount(targets[chunk], minlength=4).tolist()) == [0, 0, 3, 3]


@pytest.mark.parametrize(("options", "batch_size", "targets", "message"), [
    ({"samples_per_class": 5}, 12, TARGETS, "must divide"),
    ({"samples_per_class": 1}, 12, TARGETS, "needs 12 classes"),
    ({}, 12, None, "needs the training labels"),
])
def test_sampler_errors_are_one_line(options: dict, batch_size: int, targets: torch.Tensor | None,
                                     message: str) -> None:
    with pytest.raises(PadkdError, match=message) as err:
        SAMPLERS.create("m_per_class", options, "data.sampler", size=72, seed=0, rank=0, world=1,
                       batch_size=batch_size, targets=targets)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- data readers on files in the real formats


def _image(path: Path, seed: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (10, 14, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


SMALL = {"resize": 12, "crop": 8}


def _check_splits(data, train_labels: list[int], test_labels: list[int]) -> None:  # noqa: ANN001
    assert data.val is None and data.in_channels == 3
    assert data.train.labels.tolist() == train_labels and data.test.labels.tolist() == test_labels
    assert data.train_targets.tolist() == train_labels
    image, label, index = data.test[1]
    assert image.shape == (3, 8, 8) and int(label) == test_labels[1] and index == 1
    first = data.eval_train[0][0]
    assert torch.equal(first, data.eval_train[0][0])  # evaluation transforms are deterministic


def test_cub_reader(tmp_path: Path) -> None:
    folder = tmp_path / "CUB_200_2011"
    names = ["001.A/a1.jpg", "001.A/a2.jpg", "100.B/b1.jpg", "101.C/c1.jpg", "200.D/d1.jpg", "101.C/c2.jpg"]
    classes = [1, 1, 100, 101, 200, 101]
    for i, name in enumerate(names):
        _image(folder / "images" / name, i)
    folder.joinpath("images.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    folder.joinpath("image_class_labels.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    data = DATASETS.create("cub200", {"root": str(tmp_path), **SMALL}, "data")
    _check_splits(data, [0, 0, 99], [100, 199, 100])
    assert data.test.paths[0] == folder / "images" / "101.C/c1.jpg"


def test_cars_reader(tmp_path: Path) -> None:
    from scipy.io import savemat

    classes = [1, 98, 99, 196, 50]
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(f, "O") for f in fields])
    for i, c in enumerate(classes):
        path = f"car_ims/{i + 1:06d}.jpg"
        _image(tmp_path / path, i)
        annotations[0, i] = (path, 1, 2, 9, 7, c, i % 2)
    names = np.empty((1, 196), dtype=object)
    names[0, :] = [f"make model {k}" for k in range(196)]
    savemat(tmp_path / "cars_annos.mat", {"annotations": annotations, "class_names": names})
    data = DATASETS.create("cars196", {"root": str(tmp_path), **SMALL}, "data")
    _check_splits(data, [0, 97, 49], [98, 195])
    assert data.train.paths[1] == tmp_path / "car_ims/000002.jpg"


def test_sop_reader(tmp_path: Path) -> None:
    folder = tmp_path / "Stanford_Online_Products"
    header = "image_id class_id super_class_id path\n"
    train = [(1, 1, 1, "bicycle_final/1_0.JPG"), (2, 1, 1, "bicycle_final/1_1.JPG"), (3, 2, 2, "chair_final/2_0.JPG")]
    test = [(4, 11319, 1, "bicycle_final/9_0.JPG"), (5, 11320, 3, "table_final/8_0.JPG")]
    for rows, name in ((train, "Ebay_train.txt"), (test, "Ebay_test.txt")):
        for row in rows:
            _image(folder / row[3], row[0])
        folder.joinpath(name).write_text(header + "".join(" ".join(map(str, r)) + "\n" for r in rows))
    data = DATASETS.create("sop", {"root": str(folder), **SMALL}, "data")
    _check_splits(data, [0, 0, 1], [11318, 11319])


@pytest.mark.parametrize(("name", "missing"), [("cub200", "images.txt"), ("cars196", "cars_annos.mat"),
                                                ("sop", "Ebay_train.txt")])
def test_missing_files_are_one_line_errors(tmp_path: Path, name: str, missing: str) -> None:
    with pytest.raises(PadkdError, match=missing) as err:
        DATASETS.create(name, {"root": str(tmp_path)}, "data")
    assert "\n" not in str(err.value)


def test_digits_class_split() -> None:
    data = DATASETS.create("digits_retrieval", {}, "data")
    assert data.val is None
    assert set(data.train_targets.tolist()) == {0, 1, 2, 3, 4}
    assert set(data.test.labels.tolist()) == {5, 6, 7, 8, 9}
    assert len(data.train) + len(data.test) == 1797


def test_mnist_class_split_on_idx_files(tmp_path: Path) -> None:
    import numpy as np

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)

    def idx(array: np.ndarray) -> bytes:
        header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        return header + array.astype(np.uint8).tobytes()

    train_labels, test_labels = np.arange(20) % 10, np.arange(10)[::-1]
    (raw / "train-images-idx3-ubyte").write_bytes(idx(np.full((20, 28, 28), 7)))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx(train_labels))
    (raw / "t10k-images-idx3-ubyte").write_bytes(idx(np.full((10, 28, 28), 9)))
    (raw / "t10k-labels-idx1-ubyte").write_bytes(idx(test_labels))
    data = DATASETS.create("mnist_retrieval", {"root": str(tmp_path), "test_subset": 3}, "data")
    assert data.val is None and sorted(data.train_targets.tolist()) == sorted([0, 1, 2, 3, 4] * 2)
    assert data.test.labels.tolist() == [9, 8, 7]  # the first three test images of classes 5-9, in file order
    assert len(data.train) == 10 and data.in_channels == 1


# ---------------------------------------------------------------- models


def test_cnn_embedding_is_unit_norm_with_named_taps() -> None:
    model = MODELS.create("cnn_embedding", {"widths": [4, 8], "embedding_dim": 6}, "model", in_channels=1)
    taps = Taps(model, {"pooled", "embedding", "stage2"}, "student")
    with taps.capture():
        out = model(torch.randn(3, 1, 8, 8))
    values = taps.values(out)
    assert out.shape == (3, 6) and torch.allclose(out.norm(dim=1), torch.ones(3))
    assert values["pooled"].shape == (3, 8) and values["stage2"].shape == (3, 8, 4, 4)
    torch.testing.assert_close(F.normalize(values["embedding"], dim=1), out)


def test_torchvision_embedding_loads_local_weights(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    model = MODELS.create("torchvision_embedding", {"arch": "resnet18", "embedding_dim": 4,
                                                   "weights_path": str(tmp_path / "resnet18.pth")}, "m", in_channels=3)
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    assert model.embedding.in_features == 512 and model.padkd_taps["stage4"] == "backbone.layer4"
    assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(PadkdError, match="not found") as err:
        MODELS.create("torchvision_embedding", {"arch": "resnet18", "weights_path": str(tmp_path / "no.pth")}, "m",
                     in_channels=3)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- the similarity term


def test_similarity_rows_average_to_the_batch_loss() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(7, 5, generator=g), torch.randn(7, 9, generator=g)
    method = METHODS.create("similarity", {}, "method")
    d = Discrepancy.of(method(s, t, Batch(inputs=s, targets=torch.zeros(7), index=torch.arange(7))))
    expected = sum((F.cosine_similarity(s[i], s[j], dim=0) - F.cosine_similarity(t[i], t[j], dim=0)) ** 2
                   for i in range(7) for j in range(7) if i != j) / (7 * 6)
    assert float(d.reduce_elements().mean()) == pytest.approx(float(expected), rel=1e-5)
    assert float(WEIGHTINGS.create("uniform", {}, "w")(d).loss) == pytest.approx(float(expected), rel=1e-5)


# ---------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_and_distill_through_the_cli(tmp_path: Path, write_yaml) -> None:  # noqa: ANN001
    from padkd.cli import main

    base = {"device": "cpu", "task": {"name": "retrieval", "record_neighbours": 2},
            "data": {"name": "digits_retrieval", "batch_size": 20,
                     "sampler": {"name": "m_per_class", "samples_per_class": 4, "batches_per_epoch": 3}},
            "log": {"tensorboard": False, "progress": "none"}, "records": {"splits": ["test"]}}
    teacher_model = {"name": "cnn_embedding", "widths": [8], "embedding_dim": 8}
    teacher = write_yaml(tmp_path / "teacher.yaml", {**base, "output_dir": str(tmp_path / "teacher"),
                                                      "student": {"model": teacher_model},
                                                      "stages": [{"epochs": 1, "optimizer": {"name": "adamw"}}]})
    assert main(["train", str(teacher), "--quiet"]) == 0
    term = {"method": {"name": "similarity"}, "weighting": {"name": "pad", "mode": "per_sample"}}
    student = write_yaml(tmp_path / "student.yaml", {
        **base, "output_dir": str(tmp_path / "student"),
        "teacher": {"model": teacher_model, "checkpoint": str(tmp_path / "teacher")},
        "student": {"model": {"name": "cnn_embedding", "widths": [4], "embedding_dim": 4}},
        "stages": [{"epochs": 1, "optimizer": {"name": "adamw"}, "terms": [term]}]})
    assert main(["train", str(student), "--quiet"]) == 0
    final = json.loads((tmp_path / "student" / "final.json").read_text())
    assert final["primary_metric"] == "recall@1" and final["best_val"] is None  # no val split: the last epoch
    assert set(final["last"]) == {"recall@1", "recall@2", "recall@4", "recall@8", "map@r", "r_precision", "nmi"}
    with open(tmp_path / "student" / "records" / "0-main-test.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    target = {int(r["index"]): int(r["target"]) for r in rows}
    assert len(rows) == len(target) == len(DATASETS.create("digits_retrieval", {}, "data").test)
    for r in rows:  # the first neighbour is another sample, and `student_correct` says whether it shares the class
        assert int(r["student_nn1"]) != int(r["index"])
        assert int(r["student_correct"]) == int(target[int(r["student_nn1"])] == int(r["target"]))
        assert "teacher_nn2" in r and "similarity.log_var" in r


@pytest.mark.slow
def test_retrieval_demo_smoke(tmp_path: Path) -> None:
    import json

    from padkd.cli import main
    from padkd.demos.retrieval import run_retrieval_demo

    results = run_retrieval_demo(tmp_path / "demo", seeds=2, quick=True, quiet=True, methods=("none", "l2", "pad_l2"))
    assert set(results["metrics"]["pad_l2"]) == {"0", "1"}
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "PAD-L2 − embedding L2" in report and (tmp_path / "demo" / "neighbours.png").stat().st_size > 0
    # The default methods (student alone, RKD, PAD-RKD) through `padkd demo --task retrieval`.
    assert main(["demo", "--task", "retrieval", "--quick", "--seeds", "1", "--quiet", "--out",
                 str(tmp_path / "cli")]) == 0
    assert set(json.loads((tmp_path / "cli" / "results.json").read_text())["metrics"]) >= {"none", "rkd", "pad_rkd"}
    with pytest.raises(PadkdError, match="unknown method"):
        run_retrieval_demo(tmp_path / "other", quick=True, methods=("none", "kd"))

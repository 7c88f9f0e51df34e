"""Batch: a pytree of inputs and targets with dataset indices; collation for stacked and listed items."""

from __future__ import annotations

import torch

from padkd.batch import Batch, list_collate, stack_collate, tree_leaves, tree_map


def test_to_moves_every_tensor_of_nested_inputs_targets_and_extras() -> None:
    batch = Batch(inputs=[torch.ones(2, 3), {"a": torch.zeros(1)}], targets=[{"boxes": torch.ones(1, 4)}],
                  index=torch.tensor([3, 7]), extras={"sizes": (torch.tensor([4, 5]), "meta")})
    moved = batch.to("meta")
    assert [t.device.type for t in tree_leaves(moved.inputs) + tree_leaves(moved.targets)] == ["meta"] * 3
    assert moved.index.device.type == "meta" and moved.extras["sizes"][0].device.type == "meta"
    assert moved.extras["sizes"][1] == "meta" and isinstance(moved.extras["sizes"], tuple)
    assert len(moved) == 2 and batch.inputs[0].device.type == "cpu"  # the original is untouched


def test_tree_map_keeps_container_types_and_non_tensor_leaves() -> None:
    tree = {"x": [torch.tensor(1.0), (torch.tensor(2.0), 3)], "name": "n"}
    doubled = tree_map(lambda t: t * 2, tree)
    assert doubled["name"] == "n" and doubled["x"][1][1] == 3 and isinstance(doubled["x"][1], tuple)
    assert [float(t) for t in tree_leaves(doubled)] == [2.0, 4.0]


def test_stack_and_list_collate() -> None:
    items = [(torch.full((2,), float(i)), i % 2, 10 + i) for i in range(3)]
    stacked = stack_collate(items)
    assert stacked.inputs.shape == (3, 2) and stacked.targets.tolist() == [0, 1, 0]
    assert stacked.index.tolist() == [10, 11, 12] and stacked.index.dtype == torch.long
    images = [(torch.zeros(3, 4 + i, 5), {"boxes": torch.zeros(i, 4)}, i) for i in range(2)]
    listed = list_collate(images)
    assert [x.shape[1] for x in listed.inputs] == [4, 5] and listed.targets[1]["boxes"].shape == (1, 4)
    assert listed.index.tolist() == [0, 1]


def test_replace_changes_one_field() -> None:
    batch = Batch(torch.zeros(1), torch.ones(1), torch.tensor([0]))
    other = batch.replace(inputs=torch.full((1,), 5.0))
    assert float(other.inputs) == 5.0 and other.targets is batch.targets and float(batch.inputs) == 0.0

"""A tiny token data set for the language tests (registered by them until the text data sets are on main):
a deterministic "grammar" of repeating phrases so that a 1-layer GPT learns it in a few steps."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from padkd.data import DATASETS, DataSplits

VOCAB = 32
BLOCK = 16


class TokenBlocks(Dataset):
    """Blocks of `BLOCK` tokens; every fourth block is cut short and padded (labels -100, mask 0)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB - 1, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(BLOCK)) % (VOCAB - 1) + 1  # 0 is the padding token
        self.mask = torch.ones(n, BLOCK, dtype=torch.long)
        for i in range(0, n, 4):
            cut = 6 + i % 7
            self.mask[i, cut:] = 0
            self.ids[i, cut:] = 0
        self.n_tokens = int(self.mask.sum())
        self.n_bytes = 2 * self.n_tokens  # as if each token covered two bytes of text

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, labels, i


def register() -> None:
    """Register `tiny_tokens` (once)."""
    if "tiny_tokens" in DATASETS:
        return

    @DATASETS.register("tiny_tokens")
    def tiny_tokens(n_train: int = 64, n_val: int = 16) -> DataSplits:
        """Synthetic token blocks (tests only)."""
        return DataSplits(train=TokenBlocks(n_train, 0), val=TokenBlocks(n_val, 1), test=TokenBlocks(n_val, 2),
                          in_channels=0, num_classes=VOCAB)

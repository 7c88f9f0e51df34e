"""PAD in your own training loop: weight an L2 hint between a student and a frozen teacher.

Runs in a few seconds on scikit-learn's digits:  python examples/own_loop.py
"""

import torch
from torch import nn
from torch.nn import functional as F

from padkd import PAD, set_threads
from padkd.data import DATASETS

set_threads()  # padkd's thread policy (docs/speed.md): on a busy machine, more threads than idle cores is slower
torch.manual_seed(0)
data = DATASETS.create("digits")
x, y = data.train.images, data.train.labels

teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32), nn.ReLU())
teacher_head = nn.Linear(32, 10)
student = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 32))
student_head = nn.Linear(32, 10)

# 1. Train the teacher briefly, then freeze it.
opt = torch.optim.Adam([*teacher.parameters(), *teacher_head.parameters()], lr=1e-2)
for _ in range(200):
    opt.zero_grad()
    F.cross_entropy(teacher_head(teacher(x)), y).backward()
    opt.step()
teacher.requires_grad_(False).eval()

# 2. Distil: per-element squared error d [B, 32], weighted by PAD's learned variance.
pad = PAD(32)  # variance head on the 32-d student embedding; log σ² per sample and element
opt = torch.optim.Adam([*student.parameters(), *student_head.parameters(), *pad.parameters()], lr=1e-2)
for _ in range(200):
    emb = student(x)
    with torch.no_grad():
        target = teacher(x)
    d = (emb - target).pow(2)                      # per-sample, per-element discrepancy
    loss = F.cross_entropy(student_head(emb), y) + pad(d, emb).loss
    opt.zero_grad()
    loss.backward()
    opt.step()

with torch.no_grad():
    accuracy = (student_head(student(data.test.images)).argmax(1) == data.test.labels).float().mean()
    sigma2 = pad.log_var(student(data.test.images)).exp().mean(1)  # per-sample σ² (small = prime)
print(f"student test accuracy {100 * accuracy:.1f}%, median σ² {sigma2.median():.4f}")

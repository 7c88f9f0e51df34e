"""torch.distributed helpers: torchrun environment → process group, rank-0 checks, reductions and
gathers. With one process everything degrades to plain local code."""

from __future__ import annotations

import atexit
import os

import torch
import torch.distributed as dist
from torch import Tensor


def init_from_env(device: torch.device) -> tuple[int, int]:
    """Join the process group torchrun describes (WORLD_SIZE > 1); returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        # A group left alive at interpreter exit can abort the process while its threads are torn down
        # ("terminate called without an active exception", seen under gloo): padkd's group ends with it.
        atexit.register(_destroy)
    return dist.get_rank(), dist.get_world_size()


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collectives need their tensors: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: dict[str, Tensor]) -> dict[str, Tensor]:
    """Sum each scalar across ranks (in one collective); identity on a single process. Every rank must
    pass the same keys (a rank without data passes zeros)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    flat = torch.stack([values[k].detach().float().reshape(()).to(_comm_device()) for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat.unbind(), strict=True))


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's `tensor` along dim 0, rank order (sizes may differ); no autograd.

    Memory banks use it to apply every rank's samples; evaluators to see the whole split."""
    if not is_distributed():
        return tensor
    device = tensor.device
    local = tensor.detach().to(_comm_device())
    sizes = [torch.zeros((), dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor(local.shape[0], device=local.device))
    longest = int(max(sizes))
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)] for part, n in zip(parts, sizes, strict=True)]).to(device)


def all_gather_object(obj: object) -> list[object]:
    """Every rank's picklable `obj`, in rank order (e.g. detections for COCO evaluation)."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's `obj` on every rank (e.g. a set-up error message, so all ranks stop alike)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_tensors(tensors: list[Tensor]) -> None:
    """Copy rank 0's values of `tensors` (BatchNorm statistics) to every rank, in place."""
    if is_distributed():
        for tensor in tensors:
            if tensor.device == _comm_device():
                dist.broadcast(tensor, src=0)
            else:
                moved = tensor.to(_comm_device())
                dist.broadcast(moved, src=0)
                tensor.copy_(moved)

"""Multi-process training with ``torch.distributed`` (launch with ``torchrun --nproc_per_node=N``).

Data-parallel design (theory §7.4: "from a laptop CPU to many GPUs"): every rank draws the
SAME global batch k from ``step_generator(seed, k)`` and keeps its slice ``rank``; DDP averages
the gradients.  With equal slices, the mean of the per-rank mean losses is the global batch
mean, so N ranks with global batch B take the same steps as one process with batch B (up to
float summation order), and exact resume is unchanged.  Only rank 0 writes files.

Pair generation (reflow) shards the same way: shard s of a pair store is a function of
(settings, s) alone, so rank r can produce the shards s = r, r + N, ... (:func:`rank_shards`) and
the union is exactly the single-process store.

Nothing here touches global state unless asked: :func:`init_from_env` starts the process group
only when the torchrun environment says WORLD_SIZE > 1.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rectflow.errors import ConfigError

__all__ = [
    "DistInfo",
    "env_world_size",
    "planned_world_size",
    "init_from_env",
    "info",
    "is_distributed",
    "is_main_process",
    "barrier",
    "check_divisible",
    "rank_slice",
    "slice_batch",
    "rank_shards",
    "all_reduce_mean",
    "destroy",
    "PROCESS_GROUP_TIMEOUT",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun sets it), 1 when absent."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE must be an integer, got {os.environ.get('WORLD_SIZE')!r}") from None


def planned_world_size() -> int:
    """The running process group's size, else WORLD_SIZE from the environment (before init)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def is_distributed() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def info() -> DistInfo:
    """The current rank / world size (0 / 1 without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def is_main_process() -> bool:
    return info().is_main


# How long a collective waits for the slowest rank.  NCCL's default (10 minutes) is shorter than a
# pair-generation barrier can be: ranks with unequal shard counts finish minutes apart.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=2)


def init_from_env(backend: str | None = None, device: str | torch.device | None = None) -> DistInfo:
    """Start the default process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT) when WORLD_SIZE > 1; otherwise do nothing.  Already initialised: no-op.

    Backend: nccl for CUDA, gloo otherwise.  On CUDA the process's device is set to
    ``cuda:LOCAL_RANK``.
    """
    if dist.is_available() and dist.is_initialized():
        return info()
    if env_world_size() <= 1:
        return DistInfo()
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        if dev.index is not None:
            raise ConfigError(f"device {dev} under torchrun with {env_world_size()} ranks would put every rank on one GPU; "
                              "use 'cuda' or 'auto' (rank r takes cuda:LOCAL_RANK)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend or ("nccl" if dev.type == "cuda" else "gloo"), timeout=PROCESS_GROUP_TIMEOUT)
    return info()


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def destroy() -> None:
    """Tear down the default process group if one is running."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def check_divisible(batch_size: int, world_size: int) -> int:
    """The per-rank batch B / N; ConfigError when B is not divisible by N."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if batch_size % world_size:
        raise ConfigError(
            f"train.batch_size {batch_size} is not divisible by the world size {world_size}; "
            f"use a multiple of {world_size} (the global batch is split evenly across ranks)"
        )
    return batch_size // world_size


def rank_slice(n: int, rank: int, world_size: int) -> slice:
    """The rows [rank * n/N, (rank + 1) * n/N) of a global batch of n (n divisible by N)."""
    per = check_divisible(n, world_size)
    return slice(rank * per, (rank + 1) * per)


def slice_batch(batch: Any, rank: int, world_size: int) -> Any:
    """This rank's slice along dim 0 of every tensor in a batch (a tensor, tuple, NamedTuple, list
    or dict of them; non-tensors and 0-d tensors are kept whole)."""
    if world_size == 1:
        return batch
    if isinstance(batch, Tensor):
        return batch[rank_slice(batch.shape[0], rank, world_size)] if batch.dim() > 0 else batch
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(slice_batch(b, rank, world_size) for b in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(b, rank, world_size) for b in batch)
    if isinstance(batch, dict):
        return {k: slice_batch(v, rank, world_size) for k, v in batch.items()}
    return batch


def rank_shards(n_shards: int, rank: int, world_size: int) -> range:
    """Shards s = rank, rank + N, ... of ``n_shards`` (round-robin: balanced, and the union over
    ranks is every shard exactly once)."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank must lie in [0, {world_size}), got {rank}")
    return range(rank, n_shards, world_size)


def all_reduce_mean(x: Tensor) -> Tensor:
    """The mean of x over ranks (x itself without a process group); returns a new tensor."""
    if not is_distributed():
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / dist.get_world_size()

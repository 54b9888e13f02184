"""Multi-process training under `torchrun` on torch.distributed: DDP or FSDP2 (`fully_shard`), gloo on CPU and
NCCL on GPU.

Every process reads the whole dataset and draws the same global batch (the seeded sampler); process r trains on
examples r, r + world, ... of it. The loss of each process is its summed token loss over the global batch's token
count times the world size, so the averaging all-reduce of DDP / FSDP2 leaves exactly the single-process
gradient of the global batch: N processes step like one process with the same global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed.loading import join_torchrun_group

STRATEGIES = ("ddp", "fsdp")


@dataclass
class Dist:
    """This process's place in the job (world 1, rank 0 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "ddp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, indices: torch.Tensor) -> torch.Tensor:
        """This process's examples of a global batch."""
        return indices[self.rank :: self.world]

    def mean(self, value: float) -> float:
        """The mean of a per-process number over the job."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return float(t) / self.world

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def setup(strategy: str, device: str | None) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1), else a single process.
    Returns this process's Dist and its device (cuda:LOCAL_RANK with NCCL when CUDA is there, else gloo on CPU)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(strategy=strategy), torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    return Dist(rank, world, local_rank, strategy), join_torchrun_group(use_cuda)


def wrap(model: nn.Module, ctx: Dist, device: torch.device) -> nn.Module:
    """The module the training step runs: DDP around the model, or the model itself sharded in place by FSDP2
    (each decoder layer its own unit, then the root). A single process gets the model unchanged."""
    if not ctx.active:
        return model
    if ctx.strategy == "ddp":
        ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def full_state_dict(model: nn.Module, ctx: Dist) -> dict[str, Any] | None:
    """FSDP2: the whole (unsharded) model state, gathered on every process (a collective). Else None."""
    if not (ctx.active and ctx.strategy == "fsdp"):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: Dist) -> dict[str, Any]:
    """The optimizer's state to save. FSDP2: gathered whole (a collective; plain tensors keyed by parameter name,
    so a resume may use another process count); else the optimizer's own state_dict."""
    if not (ctx.active and ctx.strategy == "fsdp"):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], ctx: Dist) -> None:
    """Restore what optimizer_state saved (FSDP2: each process keeps its shard of the whole state)."""
    if not (ctx.active and ctx.strategy == "fsdp"):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def shutdown(ctx: Dist) -> None:
    if ctx.active and dist.is_initialized():
        dist.destroy_process_group()

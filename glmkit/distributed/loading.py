"""Joining the process group, reading each rank's slices of a checkpoint and gathering them back."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .plan import Shard, TensorParallelError, shard_model

TORCHRUN_HINT = ("launch every rank with torchrun (`torchrun --nproc-per-node N script.py`) or call "
                 "torch.distributed.init_process_group first")  # fmt: skip


def tensor_parallel_group(tp_plan: str | None, tp_size: int | None, device_mesh: Any,
                          device_map: Any) -> tuple[dist.ProcessGroup, torch.device]:  # fmt: skip
    """The process group the model is split over (every rank of the default group, or the 1-D / "tp"
    dimension of `device_mesh`) and this rank's device; the default group is started from torchrun's
    environment when there is none (gloo on CPU, NCCL on CUDA)."""
    if tp_plan not in (None, "auto"):
        raise ValueError(f"tp_plan must be 'auto' (glmkit's plan for the family), got {tp_plan!r}")
    if device_map is not None:
        raise TensorParallelError("tensor parallelism places every shard itself: do not pass device_map "
                                  "together with tp_plan / tp_size / device_mesh")  # fmt: skip
    if device_mesh is not None:
        group, device = _mesh_group(device_mesh)
    else:
        _init_default_group()
        group = dist.group.WORLD
        device = _rank_device(dist.get_backend(group))
    world = dist.get_world_size(group)
    if tp_size is not None and tp_size != world:
        raise TensorParallelError(f"tp_size={tp_size} but the tensor-parallel group has {world} ranks: glmkit "
                                  "splits the model over the whole group (pass a device_mesh with a 'tp' "
                                  "dimension of that size to use part of the ranks)")  # fmt: skip
    return group, device


def _init_default_group() -> None:
    if dist.is_initialized():
        return
    missing = [k for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise TensorParallelError(f"tensor parallelism needs a process group, and there is none and no torchrun "
                                  f"environment ({', '.join(missing)} unset): {TORCHRUN_HINT}")  # fmt: skip
    join_torchrun_group(torch.cuda.is_available())


def join_torchrun_group(cuda: bool) -> torch.device:
    """Join the default process group torchrun's environment describes (once) and return this rank's device:
    NCCL on the GPU torchrun gave it (LOCAL_RANK), or gloo on the CPU. Shared by tensor parallelism and training."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _rank_device(backend: str) -> torch.device:
    """NCCL ranks use the GPU torchrun gave them (LOCAL_RANK), else the current one; gloo ranks the CPU."""
    if "nccl" not in backend:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))


def _mesh_group(mesh: Any) -> tuple[dist.ProcessGroup, torch.device]:
    if mesh.ndim != 1:
        if "tp" not in (mesh.mesh_dim_names or ()):
            raise TensorParallelError(f"device_mesh has {mesh.ndim} dimensions and none named 'tp': pass a 1-D mesh "
                                      "or name the tensor-parallel dimension 'tp'")  # fmt: skip
        mesh = mesh["tp"]
    return mesh.get_group(), _rank_device("nccl" if mesh.device_type == "cuda" else "gloo")


class ShardedReader:
    """A WeightReader look-alike that shows and reads this rank's slice of every sharded weight (the
    others whole). Slices come from the reader's `get_slice` where it has one (safetensors: only those
    bytes are read); a reader without it (the original GLM-4 layout) reads the tensor and cuts it."""

    def __init__(self, reader: Any, shards: dict[str, Shard], rank: int):
        self.reader, self.shards, self.rank = reader, shards, rank
        self.directory, self.files = reader.directory, reader.files

    def keys(self) -> list[str]:
        return self.reader.keys()

    def dtype(self, name: str) -> torch.dtype | None:
        return self.reader.dtype(name)

    def floating_dtype(self) -> torch.dtype | None:
        return self.reader.floating_dtype()

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self.reader.shape(name))
        shard = self.shards.get(name)
        if shard is None:
            return shape
        return (*shape[: shard.dim], sum(b - a for a, b in shard.per_rank[self.rank]), *shape[shard.dim + 1 :])

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        shard = self.shards.get(name)
        if shard is None:
            return self.reader.get(name) if dtype is None else self.reader.get(name, dtype)
        parts = [self._read(name, shard.dim, a, min(b, shard.full), dtype) for a, b in shard.per_rank[self.rank]]
        padding = sum(b - a for a, b in shard.per_rank[self.rank]) - sum(p.shape[shard.dim] for p in parts)
        if padding:  # the last vocabulary shard's rows past the vocabulary
            shape = list(parts[0].shape)
            shape[shard.dim] = padding
            parts.append(parts[0].new_zeros(shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=shard.dim)

    def _read(self, name: str, dim: int, start: int, stop: int, dtype: torch.dtype | None) -> torch.Tensor:
        start = min(start, stop)
        if hasattr(self.reader, "get_slice"):
            return self.reader.get_slice(name, dim, start, stop, dtype)
        whole = self.reader.get(name) if dtype is None else self.reader.get(name, dtype)
        return whole.narrow(dim, start, stop - start).clone()


def shard_for_loading(model: nn.Module, reader: Any, group: dist.ProcessGroup, device: torch.device) -> ShardedReader:
    """Split the meta-device `model` over `group` and return the reader of this rank's weights. Every rank's
    torch RNG is seeded alike (a seed drawn on the first rank): sampling must pick the same token on every
    rank, or their steps (and collectives) part ways."""
    seed = torch.randint(0, 2**62, (1,), device=device)
    dist.broadcast(seed, dist.get_global_rank(group, 0), group=group)
    torch.manual_seed(int(seed))
    shards = shard_model(model, group)
    ours, _ = model._checkpoint_name_map(reader.keys())  # our name -> the checkpoint's
    by_checkpoint_name = {ours[name]: shard for name, shard in shards.items() if name in ours}
    return ShardedReader(reader, by_checkpoint_name, dist.get_rank(group))


def gather_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on the group's first rank (None on the others): every sharded
    parameter is gathered there, one at a time, and put back together from the plan's ranges."""
    group, shards = model.tp_group, model.tp_shards
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    state = model.state_dict()
    for name, shard in shards.items():
        local = state[name].detach().contiguous()
        parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, parts, dst=dist.get_global_rank(group, 0), group=group)
        if rank == 0:
            state[name] = _assemble(parts, shard)
    return state if rank == 0 else None


def _assemble(parts: list[torch.Tensor], shard: Shard) -> torch.Tensor:
    shape = list(parts[0].shape)
    shape[shard.dim] = shard.full
    whole = parts[0].new_empty(shape)
    for part, ranges in zip(parts, shard.per_rank):
        offset = 0
        for a, b in ranges:
            n = min(b, shard.full) - a
            if n > 0:
                whole.narrow(shard.dim, a, n).copy_(part.narrow(shard.dim, offset, n))
            offset += b - a
    return whole

"""Tensor parallelism on torch.distributed: `from_pretrained(path, tp_plan="auto")` under torchrun."""

from .loading import gather_state_dict, shard_for_loading, tensor_parallel_group
from .plan import Shard, TensorParallelError, shard_model

__all__ = ["Shard", "TensorParallelError", "gather_state_dict", "shard_for_loading", "shard_model",
           "tensor_parallel_group"]  # fmt: skip

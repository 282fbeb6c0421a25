"""G under DeepSpeed ZeRO-3: held in the weights' own partitions, gathered one layer at a time when needed.

ZeRO-3 keeps 1/W of every weight on each of the W ranks (DeepSpeed's layout: the weight flattened, padded to a
multiple of W, rank r holding elements [r·s, (r+1)·s), s = padded numel / W) and gathers a layer's weight around
its forward and backward. The validation gradient G is one more copy of the weights, so it is kept the same way:

    partition = reduce_scatter_sum(full_grad, param)   # this rank's slice of the sum over ranks (fp32)
    full = gather(partition, param)                    # (param's shape), every rank taking part

Both are collectives: every rank calls them for the same parameters in the same order (the trainer runs the same
model on every rank, so hooks fire in the same order everywhere). At world size 1 they are copies.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def is_partitioned(param: nn.Parameter) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 manages (its .data may be empty outside forward/backward)."""
    return hasattr(param, "ds_id")


def is_gathered(param: nn.Parameter) -> bool:
    """True when the parameter's whole value is there to read: not ZeRO-3, or gathered and the gather finished
    (a prefetch still in flight has the full shape but not yet the values)."""
    if not is_partitioned(param):
        return True
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return param.ds_status == ZeroParamStatus.AVAILABLE


def full_shape(param: nn.Parameter) -> tuple[int, ...]:
    """The parameter's real shape (ZeRO-3: its `ds_shape`; .shape may be (0,))."""
    return tuple(param.ds_shape) if is_partitioned(param) else tuple(param.shape)


def _group_and_size(param: nn.Parameter) -> tuple[object, int]:
    """The process group ZeRO-3 partitions the parameter over, and its size W (1 without torch.distributed)."""
    if not dist.is_initialized():
        return None, 1
    group = getattr(param, "ds_process_group", None)
    return group, dist.get_world_size(group=group)


def partition_numel(param: nn.Parameter) -> int:
    """Elements of one rank's partition: ceil(numel / W)."""
    _, world = _group_and_size(param)
    return -(-param.ds_numel // world)


@torch.no_grad()
def reduce_scatter_sum(grad: torch.Tensor, param: nn.Parameter, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(partition_numel,) in `dtype`: this rank's partition of grad summed over ranks (the padding tail is 0)."""
    group, world = _group_and_size(param)
    size = partition_numel(param)
    flat = torch.zeros(size * world, dtype=dtype, device=grad.device)
    flat[: grad.numel()] = grad.reshape(-1)
    if world == 1:
        return flat
    mine = torch.empty(size, dtype=dtype, device=grad.device)
    dist.reduce_scatter_tensor(mine, flat, group=group)
    return mine


@torch.no_grad()
def gather(partition: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
    """The whole tensor (param's ds_shape, partition's dtype) from every rank's partition."""
    group, world = _group_and_size(param)
    if world == 1:
        flat = partition
    else:
        flat = torch.empty(partition.numel() * world, dtype=partition.dtype, device=partition.device)
        dist.all_gather_into_tensor(flat, partition.contiguous(), group=group)
    return flat[: param.ds_numel].view(full_shape(param))

"""DTensor params (FSDP2, tensor parallel): the step runs on each rank's local shards.

AdEMAMix is element-wise, so a sharded step is the plain step applied to the local shards of a
param, its grad and its states, which all share the param's mesh and placements. The optimizer
and the functional API unwrap DTensors to their local tensors before any backend runs, rather
than giving our ops a DTensor sharding strategy: every backend then sees plain tensors and runs
one launch per (device, dtype) group as it does without DTensors, with none of DTensor's
per-op dispatch over thousands of tensors at every step (and no use of DTensor's internal
strategy registry, which differs between torch versions). States are DTensors with the param's
mesh and placements, so that get_optimizer_state_dict and torch.distributed.checkpoint save and
reshard them; step counts stay plain tensors, as torch's AdamW keeps them under FSDP2.
"""
import torch
from torch import Tensor

__all__ = ["check_grad", "describe", "is_dtensor", "local", "local_lists", "map_local",
           "same_layout", "zeros_state"]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without distributed support has no DTensor
    DTensor = None


def is_dtensor(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the same storage, no copy, under no_grad), else t."""
    return t.to_local() if is_dtensor(t) else t


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Both plain, or both DTensors on one mesh with the same placements."""
    if is_dtensor(a) != is_dtensor(b):
        return False
    return not is_dtensor(a) or (a.device_mesh == b.device_mesh and a.placements == b.placements)


def describe(t: Tensor) -> str:
    if not is_dtensor(t):
        return "a plain tensor"
    return f"a DTensor on {t.device_mesh} with placements {t.placements}"


def zeros_state(p: Tensor, dtype: torch.dtype) -> Tensor:
    """A zero state for param p: a DTensor laid out like p (uneven shards included), else a plain
    tensor like p."""
    if not is_dtensor(p):
        return torch.zeros_like(p, dtype=dtype, memory_format=torch.preserve_format)
    shard = torch.zeros_like(p.to_local(), dtype=dtype, memory_format=torch.preserve_format)
    return DTensor.from_local(shard, p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def map_local(t: Tensor, fn) -> Tensor:
    """fn applied to t, or for a DTensor to its local shard, re-wrapped with t's layout."""
    if not is_dtensor(t):
        return fn(t)
    return DTensor.from_local(fn(t.to_local()), t.device_mesh, t.placements, run_check=False,
                              shape=t.shape, stride=t.stride())


def check_grad(p: Tensor, g: Tensor, index) -> None:
    if not same_layout(p, g):
        raise RuntimeError(f"param {index} is {describe(p)} but its grad is {describe(g)}: a "
                           "grad must be laid out like its param")


def local_lists(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs):
    """The functional API's lists with every DTensor replaced by its local shard, after checking
    that each grad and state is laid out like its param. Returns them unchanged when no param is
    a DTensor (and no grad or state is one either)."""
    states = [(name, xs) for name, xs in (("exp_avg_fast", exp_avg_fasts),
                                          ("exp_avg_slow", exp_avg_slows),
                                          ("exp_avg_sq", exp_avg_sqs)) if xs]
    if DTensor is None or not any(
            isinstance(t, DTensor) for xs in (params, grads, *(x for _, x in states)) for t in xs):
        return params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs
    for i, (p, g) in enumerate(zip(params, grads)):
        check_grad(p, g, i)
        for name, xs in states:
            if not same_layout(p, xs[i]):
                raise RuntimeError(f"{name} {i} is {describe(xs[i])} but its param is "
                                   f"{describe(p)}: a state must be laid out like its param")
    return ([local(t) for t in params], [local(t) for t in grads],
            [local(t) for t in exp_avg_fasts], [local(t) for t in exp_avg_slows],
            [local(t) for t in exp_avg_sqs])

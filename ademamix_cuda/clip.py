"""Gradient clipping folded into the step: the total norm in one read of the grads, and the
clip coefficient applied inside the update kernels, where the grads are read anyway.

torch's `clip_grad_norm_` reads every grad for the norm, then reads and writes every grad to
scale it (12 B per fp32 element). Here the norm reads each grad once (4 B) and the step divides
each grad by a device scalar it already reads for GradScaler: `grad_scale / clip_coef`. No host
sync; the grads in memory are left as they are.
"""
import math
from collections import defaultdict

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends
from .dtensor import is_dtensor, local

__all__ = ["grad_norm", "clip_scale", "check_norm_type"]

_KERNEL_NORMS = (2.0, math.inf)


def check_norm_type(norm_type) -> float:
    norm_type = float(norm_type)
    if not norm_type > 0.0:
        raise ValueError(f"norm_type must be positive or inf, got {norm_type}")
    return norm_type


def _kernel_partials(name, grads, inf):
    if name == "cuda":
        return torch.ops.ademamix.grad_norm_partials(grads, inf)
    from .triton_kernels import grad_norm_partials

    return grad_norm_partials(grads, inf)


def _power_sum(grads, norm_type, backend):
    """sum |g|^p over plain tensors on one device (max |g| for p = inf), as a 0-d tensor, in
    fp32 (fp64 for fp64 grads) whatever the grads' dtype."""
    inf = math.isinf(norm_type)
    name = backends.resolve(backend, grads[0].device)
    kernel = name in ("cuda", "triton") and norm_type in _KERNEL_NORMS
    parts = []
    grouped = Optimizer._group_tensors_by_device_and_dtype([grads])
    for (_, dtype), ([group], _) in grouped.items():
        if kernel:
            partials = _kernel_partials(name, group, inf)
            if partials.numel() == 0:  # only empty grads
                continue
        else:
            group = [g for g in group if g.numel()]  # nothing to add (and no inf-norm in torch)
            if not group:
                continue
            partials = torch.stack(torch._foreach_norm(
                group, norm_type, dtype=torch.promote_types(dtype, torch.float32)))
            if not inf:
                partials = partials.pow(norm_type)
        parts.append(partials.amax() if inf else partials.sum())
    if not parts:
        return torch.zeros((), device=grads[0].device)
    stacked = _stack(parts)
    return stacked.amax() if inf else stacked.sum()


def _accumulation_dtype(t):
    return torch.promote_types(t.dtype, torch.float32)  # fp32, or fp64 for fp64 grads


def _stack(values):
    dtype = max((_accumulation_dtype(v) for v in values), key=lambda d: torch.finfo(d).bits)
    return torch.stack([v.to(dtype) for v in values])


def _global(value, layout, inf):
    """A rank's partial power sum of DTensor shards with `layout` (mesh, placements), reduced
    over the mesh dimensions the grads are sharded on (replicas hold the same values)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh, placements = layout
    partial = Partial("max" if inf else "sum")
    spec = [partial if isinstance(pl, Shard) else Replicate() for pl in placements]
    return DTensor.from_local(value, mesh, spec, run_check=False).full_tensor()


def grad_norm(grads, norm_type=2.0, *, backend="auto") -> Tensor:
    """The total norm of `grads`, the number torch.nn.utils.clip_grad_norm_ returns: a 0-d
    float32 tensor on the first grad's device, computed without a host sync.

    With the cuda and triton backends and norm_type 2 or inf, one launch per (device, dtype)
    group reads each grad once; other norms and the torch backends use torch._foreach_norm.
    DTensor grads (FSDP2, HSDP) contribute their local shards, reduced across the mesh: the
    norm of the whole, unsharded gradient.
    """
    norm_type = check_norm_type(norm_type)
    inf = math.isinf(norm_type)
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.zeros(())
    first_device = local(grads[0]).device
    by_layout = defaultdict(list)  # (device, mesh, placements) -> local tensors
    for g in grads:
        layout = (g.device_mesh, tuple(g.placements)) if is_dtensor(g) else None
        by_layout[(local(g).device, layout)].append(local(g))
    sums = []
    for (_, layout), tensors in by_layout.items():
        value = _power_sum(tensors, norm_type, backend)
        if layout is not None:
            value = _global(value, layout, inf)
        sums.append(value.to(first_device))
    total = _stack(sums)
    return total.amax() if inf else total.sum().pow(1.0 / norm_type)


def clip_scale(norm: Tensor, max_norm: float, grad_scale: Tensor | None) -> Tensor:
    """What the step divides the grads by to clip them as torch does, GradScaler's unscale
    included: grad_scale / min(1, max_norm / (norm / grad_scale + 1e-6)). `norm` is the norm
    of the grads in memory (scaled, when a GradScaler scaled them)."""
    if grad_scale is None:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        return coef.reciprocal()
    scale = grad_scale.reshape(()).to(norm.device, torch.float32)
    coef = torch.clamp(max_norm / (norm / scale + 1e-6), max=1.0)
    return scale / coef

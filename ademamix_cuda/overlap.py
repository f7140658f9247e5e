"""Refusing a call in which two tensors that the step writes share memory.

A param, state or step count listed twice (or two views of one buffer) would be updated twice
(the torch paths), or raced on by the kernels' blocks (a shared step count is incremented
anywhere from once to n times on a GPU). Grads are only read, so grads may share memory with
each other, but not with anything the step writes. The kernels make the same check in C++ when
they build a launch plan.
"""
import torch
from torch import Tensor

__all__ = ["LIST_NAMES", "check_disjoint"]

# The tensor lists of a step, in the order every interface uses.
LIST_NAMES = ("params", "grads", "exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs", "state_steps",
              "exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs")
_GRADS = LIST_NAMES.index("grads")


def _span(t: Tensor) -> int:
    """Bytes from t's first element to just past its last (its nbytes when it is dense)."""
    if t.is_contiguous() or t.numel() == 0:
        return t.nbytes
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def check_disjoint(lists) -> None:
    """Raises RuntimeError naming two tensors of `lists` (ordered as LIST_NAMES) that share memory
    where at least one of them is written by the step. Empty tensors own no memory; tensors on
    different devices never share it."""
    regions = {}  # device -> (starts, ends, owners)
    for k, tensors in enumerate(lists):
        for i, t in enumerate(tensors):
            span = _span(t)
            if span:
                starts, ends, owners = regions.setdefault(t.device, ([], [], []))
                start = t.data_ptr()
                starts.append(start)
                ends.append(start + span)
                owners.append((k, i))
    for starts, ends, owners in regions.values():
        _check_sorted_sweep(starts, ends, owners)


def _check_sorted_sweep(starts, ends, owners):
    if len(starts) < 2:
        return
    start = torch.tensor(starts, dtype=torch.int64)
    order = torch.argsort(start)
    start = start[order]
    end = torch.tensor(ends, dtype=torch.int64)[order]
    # reach[j]: the region that ends last among the first j + 1 (sorted by start). A region that
    # starts before that end overlaps it; of every overlapping pair, one shows up as such a pair.
    reach_end, reach = torch.cummax(end, dim=0)
    for j in (start[1:] < reach_end[:-1]).nonzero().flatten().tolist():
        a = owners[int(order[reach[j]])]
        b = owners[int(order[j + 1])]
        if a[0] != _GRADS or b[0] != _GRADS:
            raise RuntimeError(
                f"{LIST_NAMES[a[0]]}[{a[1]}] and {LIST_NAMES[b[0]]}[{b[1]}] share memory; each "
                "param, state and step count of a call needs memory of its own (is a tensor "
                "listed twice?)")

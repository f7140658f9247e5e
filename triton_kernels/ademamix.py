"""The AdEMAMix step as one multi-tensor Triton launch, registered as ademamix_triton::step_.

Every tensor is cut into chunks of CHUNK_SIZE elements; each chunk is a row of a device int64 table
(addresses of its param, grad, m1, m2, nu slices and of its step counter, and its length), and the
update kernel runs one program per row. A tiny kernel first increments the step counters. Tables
are built once per set of tensor storages and cached (see "Launch plans").
"""
import contextlib
import math
import os
from itertools import chain, count
from operator import attrgetter
from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..overlap import check_disjoint

# Tuning (SPEC.md, multi-tensor probe on one H100): chunk 16384 / block 2048 / 8 warps beat
# 8192 / 1024 / 4. 8-16K-element chunks give enough programs to balance hundreds of uneven tensors.
# The sweep belongs to bench/; it may set these module attributes (plans are keyed on CHUNK_SIZE).
CHUNK_SIZE = 16384  # elements per program; a multiple of 8 keeps every chunk 16-byte aligned
BLOCK_SIZE = 2048   # elements per loop iteration of a program
NUM_WARPS = 8
_STEP_BLOCK = 1024  # step counters per program of the increment kernel
_MAX_PLANS = 8      # cached tables (one per parameter set/dtype group; a few more for churn)

# Columns of a chunk row. Addresses already point at the chunk's first element.
_P = tl.constexpr(0)
_G = tl.constexpr(1)
_M1 = tl.constexpr(2)
_M2 = tl.constexpr(3)
_NU = tl.constexpr(4)
_STEP = tl.constexpr(5)
_LEN = tl.constexpr(6)
_ROW = tl.constexpr(8)  # padded to 64 bytes

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _expm1(x):
    # fp32 expm1: exp(x) - 1 cancels for small |x| (bias corrections with beta2 = 0.999 start at
    # 1e-3), and libdevice.expm1 does not run in the interpreter. Below 0.5 the Taylor series to
    # x^9 is exact to 1e-9 relative; above, exp(x) - 1 has no cancellation (|result| > 0.39).
    s = tl.minimum(tl.maximum(x, -0.5), 0.5)  # keeps the unused branch finite (x may be -inf)
    taylor = s * (1.0 + s * (0.5 + s * (1.6666666666666666e-1 + s * (4.1666666666666664e-2 + s * (
        8.3333333333333332e-3 + s * (1.3888888888888889e-3 + s * (1.9841269841269841e-4 + s * (
            2.4801587301587302e-5 + s * 2.7557319223985893e-6))))))))
    return tl.where(tl.abs(x) < 0.5, taylor, tl.exp(x) - 1.0)


@triton.jit
def _schedules(t, ln_beta1, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
               beta3_warmup, alpha_warmup, HAS_M1: tl.constexpr):
    """Per-chunk scalars of step t: 1/bc1, 1/sqrt(bc2), alpha_t, beta3_t, 1 - beta3_t.

    A warmup of 0 means none: t >= 1 is never below it.
    """
    inv_bc1 = 1.0
    if HAS_M1:
        inv_bc1 = 1.0 / -_expm1(t * ln_beta1)  # bc1 = 1 - beta1^t
    inv_sqrt_bc2 = 1.0 / tl.sqrt_rn(-_expm1(t * ln_beta2))
    # The clamps change nothing inside a warmup; outside they keep the unused values finite.
    alpha_t = tl.where(t < alpha_warmup, alpha * t / tl.maximum(alpha_warmup, 1.0), alpha)
    # beta3 warmup: half-life interpolated linearly from beta1's to beta3's, 0.5^(1/(x+1)).
    a = tl.minimum(t / tl.maximum(beta3_warmup, 1.0), 1.0)
    y = 1.0 / ((1.0 - a) * f_beta1 + a * f_beta3 + 1.0)
    one_minus_b3_warm = -_expm1(y * ln_half)
    in_warmup = t < beta3_warmup
    one_minus_b3 = tl.where(in_warmup, one_minus_b3_warm, one_minus_beta3)
    b3 = tl.where(in_warmup, 1.0 - one_minus_b3_warm, beta3)
    return inv_bc1, inv_sqrt_bc2, alpha_t, b3, one_minus_b3


@triton.jit
def _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_scale, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                     inv_sqrt_bc2, alpha_t, eps, weight_decay, HAS_M1: tl.constexpr,
                     MAXIMIZE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, MASKED: tl.constexpr):
    """The AdEMAMix element update of one block: fp32 arithmetic whatever the param dtype."""
    mask = None
    if MASKED:
        mask = offs < n
    p_in = tl.load(p_ptr + offs, mask=mask)
    p = p_in.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if HAS_GRAD_SCALE:
        g = tl.div_rn(g, grad_scale)
    if MAXIMIZE:
        g = -g
    if HAS_M1:
        m1 = beta1 * tl.load(m1_ptr + offs, mask=mask) + one_minus_beta1 * g
        tl.store(m1_ptr + offs, m1, mask=mask)
    else:
        m1 = g  # beta1 == 0: the fast EMA is the gradient, no buffer
    m2 = b3 * tl.load(m2_ptr + offs, mask=mask) + one_minus_b3 * g
    nu = beta2 * tl.load(nu_ptr + offs, mask=mask) + one_minus_beta2 * g * g
    denom = tl.sqrt_rn(nu) * inv_sqrt_bc2 + eps
    update = tl.div_rn(m1 * inv_bc1 + alpha_t * m2, denom) + weight_decay * p  # wd on p before step
    tl.store(p_ptr + offs, (p - lr * update).to(p_in.dtype), mask=mask)
    tl.store(m2_ptr + offs, m2, mask=mask)
    tl.store(nu_ptr + offs, nu, mask=mask)


@triton.jit
def _row_ptr(row, col: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = tl.load(row + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The host checked every address of this launch. Proven 16-byte alignment is what lets the
        # compiler emit vector loads. The hint goes on the pointer: on the integer before the cast
        # it is lost (int-to-pointer drops alignment facts; PTX checked with triton 3.6 and 3.8).
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _ademamix_kernel(table_ptr, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1,
                     ln_beta1, beta2, one_minus_beta2, ln_beta2, beta3, one_minus_beta3, f_beta1,
                     f_beta3, ln_half, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                     P_DTYPE: tl.constexpr, HAS_M1: tl.constexpr, MAXIMIZE: tl.constexpr,
                     LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                     HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    # Python floats arrive as fp32 from eager launches but may be fp64 from compiled callers.
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    ln_beta1 = tl.cast(ln_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    ln_beta2 = tl.cast(ln_beta2, tl.float32)
    beta3 = tl.cast(beta3, tl.float32)
    one_minus_beta3 = tl.cast(one_minus_beta3, tl.float32)
    f_beta1 = tl.cast(f_beta1, tl.float32)
    f_beta3 = tl.cast(f_beta3, tl.float32)
    ln_half = tl.cast(ln_half, tl.float32)
    alpha = tl.cast(alpha, tl.float32)
    beta3_warmup = tl.cast(beta3_warmup, tl.float32)
    alpha_warmup = tl.cast(alpha_warmup, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    if LR_IS_TENSOR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr, tl.float32)
    grad_scale = 1.0
    if HAS_GRAD_SCALE:
        grad_scale = tl.load(grad_scale_ptr).to(tl.float32)

    row = table_ptr + tl.program_id(0).to(tl.int64) * _ROW
    p_ptr = _row_ptr(row, _P, P_DTYPE, ALIGNED)
    g_ptr = _row_ptr(row, _G, P_DTYPE, ALIGNED)
    m1_ptr = _row_ptr(row, _M1, tl.float32, ALIGNED)
    m2_ptr = _row_ptr(row, _M2, tl.float32, ALIGNED)
    nu_ptr = _row_ptr(row, _NU, tl.float32, ALIGNED)
    t = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32)))  # already incremented
    n = tl.load(row + _LEN).to(tl.int32)  # < CHUNK_SIZE: offsets in a chunk fit in 32 bits
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) != 0, 0, n)  # skip: nothing read, nothing written

    inv_bc1, inv_sqrt_bc2, alpha_t, b3, one_minus_b3 = _schedules(
        t, ln_beta1, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
        beta3_warmup, alpha_warmup, HAS_M1)

    # Full blocks unmasked (vector loads), then the masked tail in half blocks (at most two).
    # A masked block is scalar accesses, each element with its own predicate, and costs more
    # registers than a full one: a whole masked block pushed ptxas (triton 3.8, bf16/fp16 params
    # with m1) to a spill at 80 registers, or past 80 (fewer programs per SM). Half blocks halve
    # the tail's live values; the full blocks' code is unchanged (tests/test_codegen.py).
    n_full = n // BLOCK
    for i in range(0, n_full):
        offs = tl.max_contiguous(tl.multiple_of(i * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_scale, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                         inv_sqrt_bc2, alpha_t, eps, weight_decay, HAS_M1, MAXIMIZE,
                         HAS_GRAD_SCALE, False)
    for start in range(n_full * BLOCK, n, BLOCK // 2):
        offs = tl.max_contiguous(
            tl.multiple_of(start + tl.arange(0, BLOCK // 2), BLOCK // 2), BLOCK // 2)
        _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_scale, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                         inv_sqrt_bc2, alpha_t, eps, weight_decay, HAS_M1, MAXIMIZE,
                         HAS_GRAD_SCALE, True)


@triton.jit
def _increment_steps_kernel(step_addrs_ptr, n_steps, found_inf_ptr, HAS_FOUND_INF: tl.constexpr,
                            BLOCK: tl.constexpr):
    # A launch of its own: inside the update kernel, one tensor's chunks would race on its counter.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_steps
    step_ptrs = tl.load(step_addrs_ptr + offs, mask=mask, other=0).to(tl.pointer_type(tl.float32))
    inc = 1.0
    if HAS_FOUND_INF:
        inc = tl.where(tl.load(found_inf_ptr) != 0, 0.0, 1.0)
    tl.store(step_ptrs, tl.load(step_ptrs, mask=mask) + inc, mask=mask)


@triton.jit
def _norm_kernel(table_ptr, partials_ptr, P_DTYPE: tl.constexpr, INF: tl.constexpr,
                 ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """One program per chunk row: the chunk's sum of squares (or, INF, its largest magnitude,
    NaN kept) in fp32, into partials[row]."""
    pid = tl.program_id(0)
    row = table_ptr + pid.to(tl.int64) * _ROW
    g_ptr = _row_ptr(row, _G, P_DTYPE, ALIGNED)
    n = tl.load(row + _LEN).to(tl.int32)
    acc = tl.zeros((BLOCK,), tl.float32)
    nan = tl.zeros((BLOCK,), tl.int32)
    # Full blocks unmasked (vector loads), then at most one masked tail.
    n_full = n // BLOCK
    for start in range(0, n_full * BLOCK + (n % BLOCK > 0) * BLOCK, BLOCK):
        offs = tl.max_contiguous(tl.multiple_of(start + tl.arange(0, BLOCK), BLOCK), BLOCK)
        if start < n_full * BLOCK:
            x = tl.load(g_ptr + offs).to(tl.float32)
        else:
            x = tl.load(g_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
        if INF:
            acc = tl.maximum(acc, tl.abs(x))
            nan = nan | (x != x).to(tl.int32)
        else:
            acc += x * x
    if INF:
        out = tl.where(tl.max(nan, 0) > 0, float("nan"), tl.max(acc, 0))
    else:
        out = tl.sum(acc, 0)
    tl.store(partials_ptr + pid, out)


# ---------------------------------------------------------------------------------------------
# Launch plans.
#
# A plan is the int64 table for one exact set of storages: chunk rows of the 16-byte aligned
# tensors, then chunk rows of the others, then one step-counter address per tensor. It is cached
# under the (data_ptr, numel) of every tensor, so a replaced grad (zero_grad(set_to_none=True)
# reallocates them), a load_state_dict (new state tensors) or a resized param is a new key, while
# grads that land on the same addresses again reuse the table. The key also holds every dtype and
# stride, so the full per-tensor checks run exactly when a plan is built: a hit is a set of
# tensors that passed them.
#
# CUDA graphs: a graph replays the kernels with the table's address, so a plan a capture used is
# kept as long as the process (_graph_plans). A plan missed during a capture (torch's recipe for
# whole-network capture allocates the grads from the graph's pool, at new addresses) is uploaded
# by a copy recorded in the graph, from a pinned host copy, into memory outside the graph's pool
# (the extension's ademamix::_upload_in_graph). Such a plan is `pending` until an eager call has
# uploaded it too: before that, only its graph's replays write it.


class _Layout:
    """How a table is made, kept so that its grad column can be rewritten when only the grads
    moved: per row the owning tensor and the chunk's byte offset in the grad; per tensor the
    grad's bytes and 16-byte alignment; the memory the step writes, as sorted disjoint
    [start, end) intervals."""
    __slots__ = ("steps_offset", "launches", "owner", "grad_offset", "grad_bytes", "grad_aligned",
                 "written_start", "written_end")

    def __init__(self, steps_offset, launches, owner, grad_offset, grad_bytes, grad_aligned,
                 written_start, written_end):
        self.steps_offset = steps_offset
        self.launches = launches  # [(first table element, number of chunks, aligned)]
        self.owner = owner
        self.grad_offset = grad_offset
        self.grad_bytes = grad_bytes
        self.grad_aligned = grad_aligned
        self.written_start = written_start
        self.written_end = written_end


class _Plan:
    __slots__ = ("table", "host", "layout", "step_addrs", "launches", "pending", "captured",
                 "streams", "last_use")

    def __init__(self, table, host, layout, pending, stream):
        self.table = table
        self.host = host  # the CPU table
        self.layout = layout
        self.step_addrs = table[layout.steps_offset:]
        self.launches = [(table[o:o + c * 8], c, a) for o, c, a in layout.launches if c]
        self.pending = pending
        self.captured = False
        self.streams = {stream}  # the streams whose use of the table its memory waits for
        self.last_use = 0


_plans: "dict[tuple, _Plan]" = {}
_graph_plans: "list[_Plan]" = []  # read by CUDA graphs: never freed
_data_ptr, _numel, _stride = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.stride
_is_contiguous, _dtype = torch.Tensor.is_contiguous, attrgetter("dtype")
_use_clock = count(1)  # LRU order without re-hashing the long key on every hit


def _capturing(device):
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_tensors(params, grads, m1s, m2s, nus, steps, device):
    dtype = params[0].dtype
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"ademamix_triton: params must be float32, bfloat16 or float16, "
                        f"got {dtype}")
    for i, (p, g, m2, nu, s) in enumerate(zip(params, grads, m2s, nus, steps)):
        if p.dtype != dtype:
            raise TypeError(f"ademamix_triton: one param dtype per call: params[0] is {dtype}, "
                            f"params[{i}] is {p.dtype}; group the tensors by dtype")
        named = [("params", p), ("grads", g), ("exp_avg_slows", m2), ("exp_avg_sqs", nu)]
        if m1s:
            named.append(("exp_avg_fasts", m1s[i]))
        for name, x in named + [("state_steps", s)]:
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"ademamix_triton: {name}[{i}] is {type(x).__name__}, not a Tensor")
            if x.device != device:
                raise RuntimeError(f"ademamix_triton: all tensors must be on one device: "
                                   f"params[0] is on {device}, {name}[{i}] on {x.device}")
            if x.layout != torch.strided:
                raise RuntimeError(f"ademamix_triton: {name}[{i}] has layout {x.layout}; "
                                   "only dense tensors are supported")
        if g.dtype != dtype or g.shape != p.shape:
            raise RuntimeError(f"ademamix_triton: grads[{i}] ({g.dtype}, {tuple(g.shape)}) must "
                               f"match params[{i}] ({p.dtype}, {tuple(p.shape)})")
        for name, x in named[2:]:
            if x.dtype != torch.float32 or x.shape != p.shape:
                raise RuntimeError(f"ademamix_triton: {name}[{i}] must be float32 of shape "
                                   f"{tuple(p.shape)}, got {x.dtype} {tuple(x.shape)}")
        for name, x in named:
            if not x.is_contiguous():
                raise RuntimeError(f"ademamix_triton: {name}[{i}] must be contiguous")
        if s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"ademamix_triton: state_steps[{i}] must be a one-element float32 "
                               f"tensor, got {s.dtype} with {s.numel()} elements")
    try:
        check_disjoint((params, grads, m1s, m2s, nus, steps))
    except RuntimeError as e:
        raise RuntimeError(f"ademamix_triton: {e}") from None


def _check_grads(grads, device):
    dtype = grads[0].dtype
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"ademamix_triton: grads must be float32, bfloat16 or float16, got {dtype}")
    for i, g in enumerate(grads):
        if not isinstance(g, torch.Tensor):
            raise TypeError(f"ademamix_triton: grads[{i}] is {type(g).__name__}, not a Tensor")
        if g.device != device or g.dtype != dtype:
            raise RuntimeError(f"ademamix_triton: grads[{i}] is {g.dtype} on {g.device}; grads[0] "
                               f"is {dtype} on {device} (one dtype and device per call)")
        if g.layout != torch.strided or not g.is_contiguous():
            raise RuntimeError(f"ademamix_triton: grads[{i}] must be dense and contiguous")


def _plan(params, grads, m1s, m2s, nus, steps, device):
    dense = list(chain(params, grads, m1s, m2s, nus))
    flat = dense + steps
    try:
        # What _check_tensors depends on, per tensor, in C-level passes: address, element count,
        # dtype and strides (with numel and contiguity they pin the shape, so a view of the same
        # storage with another shape is a new key and gets checked).
        ptrs, numels = tuple(map(_data_ptr, flat)), tuple(map(_numel, flat))
        key = (device, CHUNK_SIZE, len(params), bool(m1s), ptrs, numels,
               tuple(map(_dtype, flat)), tuple(map(_stride, dense)))
        dense_ok = all(map(_is_contiguous, dense))
    except (RuntimeError, TypeError, AttributeError):  # not a tensor, sparse, no storage
        dense_ok = False
    check = lambda: _check_tensors(params, grads, m1s, m2s, nus, steps, device)  # noqa: E731
    if not dense_ok:
        check()  # names the culprit
        raise RuntimeError("ademamix_triton: every tensor must be dense and contiguous")
    return _lookup(key, device, check, lambda capturing: _new_plan(
        ptrs, numels[:len(params)], bool(m1s), params[0].element_size(), device, capturing))


def _norm_plan(grads, device):
    """The plan of a gradient norm: the step's table layout with the grads in every data column
    (only the grad column and the lengths are read) and no step counts."""
    try:
        ptrs, numels = tuple(map(_data_ptr, grads)), tuple(map(_numel, grads))
        key = ("norm", device, CHUNK_SIZE, ptrs, numels, tuple(map(_dtype, grads)),
               tuple(map(_stride, grads)))
        dense_ok = all(map(_is_contiguous, grads))
    except (RuntimeError, TypeError, AttributeError):
        dense_ok = False
    check = lambda: _check_grads(grads, device)  # noqa: E731
    if not dense_ok:
        check()
        raise RuntimeError("ademamix_triton: every grad must be dense and contiguous")
    no_steps = (0,) * len(grads)
    return _lookup(key, device, check, lambda capturing: _new_plan(
        ptrs * 4 + no_steps, numels, False, grads[0].element_size(), device, capturing))


def _lookup(key, device, check, build):
    """The cached plan of `key`, or build(capturing) after check() on a miss."""
    capturing = _capturing(device)
    plan = _plans.get(key)
    # A pending plan is written by its own graph's replays only: another capture needs its own.
    if plan is None or (capturing and plan.pending):
        if plan is None:
            check()
        plan = build(capturing)
        if len(_plans) >= _MAX_PLANS and key not in _plans:
            # least recently used (by value: hashing the long keys again costs more)
            del _plans[min(_plans.items(), key=lambda item: item[1].last_use)[0]]
        _plans[key] = plan
    _use(plan, device, capturing)
    return plan


def _use(plan, device, capturing):
    """Everything a launch on the current stream needs of `plan` before it is enqueued."""
    plan.last_use = next(_use_clock)
    if device.type != "cuda":
        return
    if capturing:
        if not plan.captured:
            plan.captured = True
            _graph_plans.append(plan)
        return
    if plan.pending:
        plan.table.copy_(plan.host)
        plan.pending = False
    stream = torch.cuda.current_stream(device)
    if stream not in plan.streams:
        plan.table.record_stream(stream)  # the memory is not reused before this stream is done
        plan.streams.add(stream)


def _upload_in_graph(host, device):
    try:
        upload = torch.ops.ademamix._upload_in_graph
    except (AttributeError, RuntimeError):
        raise RuntimeError(
            "ademamix_triton: these tensors have no launch plan yet and a CUDA graph is being "
            "captured. Building one during a capture needs the compiled extension "
            "ademamix_cuda._C (it uploads the table from outside the graph's memory pool): build "
            "it, or run one eager step with the same tensors before the capture.") from None
    return upload(host, device)


def _new_plan(ptrs, numels, has_m1, elem_size, device, capturing):
    if CHUNK_SIZE % 8:
        raise ValueError("ademamix_triton: CHUNK_SIZE must be a multiple of 8 "
                         "(chunks must start 16-byte aligned)")
    n = len(numels)
    addr = torch.tensor(ptrs, dtype=torch.int64).view(-1, n)  # one row per list
    if not has_m1:
        addr = torch.cat([addr[:2], torch.zeros_like(addr[:1]), addr[2:]])  # m1 = 0: never read
    data, step = addr[:5], addr[5]
    numel = torch.tensor(numels, dtype=torch.int64)
    elem_sizes = torch.tensor([elem_size, elem_size, 4, 4, 4], dtype=torch.int64)
    aligned = (data % 16 == 0).all(dim=0)

    parts, launches, owners, starts, offset = [], [], [], [], 0
    for is_aligned in (True, False):
        idx = (aligned == is_aligned).nonzero().flatten()
        counts = (numel[idx] + CHUNK_SIZE - 1) // CHUNK_SIZE  # empty tensors get no chunk
        owner = torch.repeat_interleave(idx, counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        start = (torch.arange(owner.numel()) - first) * CHUNK_SIZE  # in elements
        rows = torch.zeros(owner.numel(), 8, dtype=torch.int64)
        rows[:, 0:5] = data[:, owner].T + start[:, None] * elem_sizes
        rows[:, 5] = step[owner]
        rows[:, 6] = torch.clamp(numel[owner] - start, max=CHUNK_SIZE)
        parts.append(rows.flatten())
        launches.append((offset, rows.shape[0], is_aligned))
        owners.append(owner)
        starts.append(start)
        offset += rows.numel()
    host = torch.cat(parts + [step])
    nbytes = numel[None, :] * elem_sizes[:, None]  # per list and tensor
    written = [0, 2, 3, 4] if has_m1 else [0, 3, 4]
    w_start = torch.cat([data[written].flatten(), step])
    w_size = torch.cat([nbytes[written].flatten(), torch.full_like(step, 4)])
    w_start, w_size = w_start[w_size > 0], w_size[w_size > 0]
    order = torch.argsort(w_start)
    layout = _Layout(offset, launches, torch.cat(owners), torch.cat(starts) * elem_size,
                     nbytes[1], data[1] % 16 == 0, w_start[order], (w_start + w_size)[order])
    return _Plan(_table_on(host, device, capturing), host, layout, capturing,
                 torch.cuda.current_stream(device) if device.type == "cuda" else None)


def _table_on(host, device, capturing):
    """The table `host` on `device`: the CPU table itself, a capture's upload, or an eager copy."""
    if device.type != "cuda":
        return host
    if capturing:
        return _upload_in_graph(host, device)
    # Pinned + non_blocking: no host sync; the pinned block is held until the copy is done.
    return host.pin_memory().to(device, non_blocking=True)


def _with_grads(plan, grad_ptrs, device, capturing):
    """`plan` with its grad column moved to the grads at `grad_ptrs` (of the same dtypes, shapes
    and contiguity as before), or None if a grad's alignment changed or a grad overlaps memory
    the step writes (the full path then re-checks and names it)."""
    lay = plan.layout
    g = torch.tensor(grad_ptrs, dtype=torch.int64)
    if not torch.equal(g % 16 == 0, lay.grad_aligned):
        return None
    # The last written interval starting before a grad's end overlaps it if it ends after its
    # start (the written intervals are disjoint, so their ends are sorted too).
    before = torch.searchsorted(lay.written_start, g + lay.grad_bytes) - 1
    ends = lay.written_end[before.clamp(min=0)]
    if ((before >= 0) & (ends > g) & (lay.grad_bytes > 0)).any():
        return None
    host = plan.host.clone()
    host[:lay.steps_offset].view(-1, 8)[:, _G.value] = g[lay.owner] + lay.grad_offset
    return _Plan(_table_on(host, device, capturing), host, lay, capturing,
                 torch.cuda.current_stream(device) if device.type == "cuda" else None)


# ---------------------------------------------------------------------------------------------
# The op.


def _check_scalar_tensor(name, x, device):
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or x.numel() != 1 or not x.is_floating_point():
        raise RuntimeError(f"ademamix_triton: {name} must be a one-element floating-point tensor")
    if x.device != device:
        raise RuntimeError(f"ademamix_triton: {name} is on {x.device}, the params on {device}")


def _half_life(beta):
    # f(b) of the beta3 schedule; +1e-8 keeps beta = 0 finite.
    return math.log(0.5) / math.log(beta + 1e-8) - 1.0


def _device_guard(device):
    # The device's current stream: capture checks, table upload, launches.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(plan, n, dtype, lr, lr_tensor, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup,
            eps, weight_decay, maximize, grad_scale, found_inf):
    """Enqueues the step of the n tensors of `plan` (params of `dtype`) on the current stream."""
    has_m1 = beta1 != 0.0
    any_ptr = plan.table  # stands in for absent optional tensors; never read
    _increment_steps_kernel[(triton.cdiv(n, _STEP_BLOCK),)](
        plan.step_addrs, n, found_inf if found_inf is not None else any_ptr,
        HAS_FOUND_INF=found_inf is not None, BLOCK=_STEP_BLOCK)
    # Constants in double, rounded once to fp32 (1 - 0.9999 in fp32 would be 3e-4 off).
    for rows, n_chunks, aligned in plan.launches:
        _ademamix_kernel[(n_chunks,)](
            rows, float(lr), lr_tensor if lr_tensor is not None else any_ptr,
            grad_scale if grad_scale is not None else any_ptr,
            found_inf if found_inf is not None else any_ptr,
            beta1, 1.0 - beta1, math.log(beta1) if has_m1 else 0.0,
            beta2, 1.0 - beta2, math.log(beta2) if beta2 > 0.0 else -math.inf,
            beta3, 1.0 - beta3, _half_life(beta1), _half_life(beta3), math.log(0.5),
            float(alpha), float(beta3_warmup or 0), float(alpha_warmup or 0), float(eps),
            float(weight_decay),
            P_DTYPE=_PARAM_DTYPES[dtype], HAS_M1=has_m1, MAXIMIZE=bool(maximize),
            LR_IS_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, ALIGNED=aligned, BLOCK=BLOCK_SIZE,
            num_warps=NUM_WARPS)


def _run(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, lr_tensor,
         beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
         grad_scale, found_inf):
    """Checks, plans and launches one step; returns the plan (None when there are no params)."""
    n = len(params)
    has_m1 = beta1 != 0.0
    for name, xs in (("grads", grads), ("exp_avg_slows", exp_avg_slows),
                     ("exp_avg_sqs", exp_avg_sqs), ("state_steps", state_steps)):
        if len(xs) != n:
            raise ValueError(f"ademamix_triton: {len(xs)} {name} for {n} params")
    if len(exp_avg_fasts) != (n if has_m1 else 0):
        raise ValueError(f"ademamix_triton: {len(exp_avg_fasts)} exp_avg_fasts for {n} params "
                         f"with beta1={beta1} (beta1 == 0 takes an empty list, else one per param)")
    for name, b in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"ademamix_triton: {name} must be in [0, 1), got {b}")
    if n == 0:
        return None
    device = params[0].device
    if device.type != ("cpu" if _INTERPRETED else "cuda"):
        # The interpreter dereferences the table's addresses on the host: CPU tensors only.
        raise RuntimeError(f"ademamix_triton: tensors on {device}; this process runs Triton "
                           + ("interpreted (TRITON_INTERPRET=1): CPU tensors only" if _INTERPRETED
                              else "compiled: CUDA tensors only (CPU needs TRITON_INTERPRET=1 "
                                   "set before import)"))
    for name, x in (("lr", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        _check_scalar_tensor(name, x, device)
    with _device_guard(device):
        plan = _plan(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps,
                     device)
        _launch(plan, n, params[0].dtype, lr, lr_tensor, beta1, beta2, beta3, alpha, beta3_warmup,
                alpha_warmup, eps, weight_decay, maximize, grad_scale, found_inf)
    return plan


def _step_impl(params: List[torch.Tensor], grads: List[torch.Tensor],
               exp_avg_fasts: List[torch.Tensor], exp_avg_slows: List[torch.Tensor],
               exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor], lr: float,
               lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float, beta3: float,
               alpha: float, beta3_warmup: Optional[int], alpha_warmup: Optional[int], eps: float,
               weight_decay: float, maximize: bool, grad_scale: Optional[torch.Tensor],
               found_inf: Optional[torch.Tensor]) -> None:
    """The op's body. lr_tensor, when given, replaces lr (custom ops have no overloads)."""
    _run(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, lr_tensor,
         beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
         grad_scale, found_inf)


# What torch.compile, export and dispatch modes see: one opaque node that mutates its lists.
_step_op = torch.library.custom_op(
    "ademamix_triton::step_", _step_impl,
    mutates_args=("params", "exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs", "state_steps"))


@_step_op.register_fake
def _step_op_fake(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr,
                  lr_tensor, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
                  weight_decay, maximize, grad_scale, found_inf):
    return None


def _op_args(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, beta1,
             beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
             grad_scale, found_inf):
    """The op's arguments, normalized, from the functional signature."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    return (list(params), list(grads), list(exp_avg_fasts or ()), list(exp_avg_slows),
            list(exp_avg_sqs), list(state_steps), 0.0 if lr_tensor is not None else float(lr),
            lr_tensor, float(beta1), float(beta2), float(beta3), float(alpha),
            None if beta3_warmup is None else int(beta3_warmup),
            None if alpha_warmup is None else int(alpha_warmup), float(eps), float(weight_decay),
            bool(maximize), grad_scale, found_inf)


def _traced():
    """Under torch.compile or a dispatch mode, the step must be the op (one opaque node)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _bump_versions(args):
    # What the op wrapper would do per tensor (for autograd's in-place checks), in one call.
    torch.autograd.graph.increment_version(list(chain(args[0], args[2], args[3], args[4],
                                                      args[5])))


def ademamix_step_(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, *, lr,
                   beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                   maximize, grad_scale=None, found_inf=None):
    """One AdEMAMix step over all tensors, in place, in one launch (two with misaligned views).

    Tensor lists in the order params, grads, exp_avg_fasts (empty when beta1 == 0),
    exp_avg_slows, exp_avg_sqs, state_steps, all contiguous on one device (CUDA, or CPU under
    TRITON_INTERPRET=1). params/grads: one of float32, bfloat16, float16; states float32;
    state_steps one-element float32 tensors, incremented here unless found_inf is nonzero.
    lr: float or one-element tensor on the device; grad_scale divides the grads; found_inf
    nonzero skips the step entirely. Nothing is synchronized with the host.
    """
    args = _op_args(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr,
                    beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                    maximize, grad_scale, found_inf)
    with torch.no_grad():  # a mutation of leaf params, not something to differentiate
        if _traced():
            _step_op(*args)
        else:
            # Plain eager tensors: the same implementation without the op wrapper, whose per-tensor
            # Python work (a version bump per tensor, alias checks) costs more than the kernel
            # itself with thousands of tensors.
            _run(*args)
            _bump_versions(args)


def _norm_partials_impl(grads: List[torch.Tensor], inf_norm: bool) -> torch.Tensor:
    """One fp32 partial per chunk of the grads: sums of squares, or (inf_norm) largest
    magnitudes. Empty grads have no chunk."""
    if not grads:
        return torch.empty(0)
    device = grads[0].device
    if device.type != ("cpu" if _INTERPRETED else "cuda"):
        raise RuntimeError(f"ademamix_triton: grads on {device}; this process runs Triton "
                           + ("interpreted: CPU tensors only" if _INTERPRETED else "compiled: "
                              "CUDA tensors only"))
    with _device_guard(device):
        plan = _norm_plan(grads, device)
        n_rows = plan.layout.steps_offset // 8
        partials = torch.empty(n_rows, dtype=torch.float32, device=device)
        for (rows, n_chunks, aligned), (offset, _, _) in zip(
                plan.launches, [spec for spec in plan.layout.launches if spec[1]]):
            first = offset // 8
            _norm_kernel[(n_chunks,)](rows, partials[first:first + n_chunks],
                                      P_DTYPE=_PARAM_DTYPES[grads[0].dtype], INF=bool(inf_norm),
                                      ALIGNED=aligned, BLOCK=BLOCK_SIZE, num_warps=NUM_WARPS)
    return partials


_norm_op = torch.library.custom_op("ademamix_triton::grad_norm_partials", _norm_partials_impl,
                                   mutates_args=())


@_norm_op.register_fake
def _norm_op_fake(grads, inf_norm):
    n = sum(-(-g.numel() // CHUNK_SIZE) for g in grads)
    return grads[0].new_empty((n,), dtype=torch.float32) if grads else torch.empty(0)


def grad_norm_partials(grads, inf_norm=False):
    """One fp32 partial of the gradient norm per chunk of `grads` (all on one device, one dtype,
    contiguous): sums of squares, or with inf_norm the largest magnitudes (NaN kept). The total
    2-norm is the square root of their sum; the inf-norm their max. One launch (two with
    misaligned views); the grads are only read."""
    grads = list(grads)
    with torch.no_grad():
        if _traced():
            return _norm_op(grads, bool(inf_norm))
        return _norm_partials_impl(grads, bool(inf_norm))


class Stepper:
    """The Triton step of one set of tensors that stays the same from step to step (an optimizer's
    param group), with the host work of a step cut to what can change between steps.

    The first call checks everything and builds the launch plan, as ademamix_step_ does. A later
    call reads only the params' addresses and sizes and the grads' addresses and contiguity (a
    grad's shape, dtype and device are its param's: torch checks that when a grad is set).
    Same addresses: the same plan. Grads elsewhere (zero_grad(set_to_none=True) and a new
    backward): the plan's grad column is rewritten, after checking that no grad overlaps memory
    the step writes. Anything else takes ademamix_step_'s path. Hyperparameters are not
    validated here: the caller does that.
    """

    def __init__(self, params, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps):
        self._lists = (list(params), list(exp_avg_fasts or ()), list(exp_avg_slows),
                       list(exp_avg_sqs), list(state_steps))
        self._params_key = None  # the params' addresses and sizes the plan was checked with
        self._grad_ptrs = None
        self._plan = None

    def step(self, grads, *, lr, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
             weight_decay, maximize, grad_scale=None, found_inf=None):
        params, m1s, m2s, nus, steps = self._lists
        args = _op_args(params, grads, m1s, m2s, nus, steps, lr, beta1, beta2, beta3, alpha,
                        beta3_warmup, alpha_warmup, eps, weight_decay, maximize, grad_scale,
                        found_inf)
        with torch.no_grad():
            if _traced():
                _step_op(*args)
                return
            grads = args[1]
            try:
                params_key = (tuple(map(_data_ptr, params)), tuple(map(_numel, params)))
                grad_ptrs = tuple(map(_data_ptr, grads))
                known = params_key == self._params_key and all(map(_is_contiguous, grads))
            except (RuntimeError, TypeError, AttributeError):  # e.g. a sparse grad
                params_key, grad_ptrs, known = None, None, False
            plan = self._launch_known(args, grad_ptrs) if known else None
            if plan is None:
                plan = _run(*args)
                self._params_key = params_key
            self._plan, self._grad_ptrs = plan, grad_ptrs
            _bump_versions(args)

    def _launch_known(self, args, grad_ptrs):
        """Launches with the plan of these params (its grads moved if need be); None if the
        grads cannot simply be moved."""
        params = self._lists[0]
        device = params[0].device
        with _device_guard(device):
            capturing = _capturing(device)
            plan = self._plan
            # A pending plan is written by its own graph's replays only: another capture needs
            # its own (the grad column rewrite makes one).
            if grad_ptrs != self._grad_ptrs or (capturing and plan.pending):
                plan = _with_grads(plan, grad_ptrs, device, capturing)
                if plan is None:
                    return None
            for name, x in (("lr", args[7]), ("grad_scale", args[17]), ("found_inf", args[18])):
                _check_scalar_tensor(name, x, device)
            _use(plan, device, capturing)
            _launch(plan, len(params), params[0].dtype, *args[6:])
        return plan

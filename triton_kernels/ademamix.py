"""The AdEMAMix step as one multi-tensor Triton launch, registered as ademamix_triton::step_.

Every tensor is cut into chunks of CHUNK_SIZE elements; each chunk is a row of a device int64 table
(addresses of its param, grad, m1, m2, nu slices and of its step counter, its length, and what
keys its random bits), and the update kernel runs one program per row. A tiny kernel first
increments the step counters. Tables are built once per set of tensor storages and cached (see
"Launch plans").

The math is csrc/ademamix.h's, operation by operation (the same fp32 operations in the same order,
IEEE divisions and square roots, no fused multiply-adds, the same expm1 and random bits), so every
backend computes the same bits: interpreted Triton those of the op's CPU kernel.

8-bit states (ademamix_cuda/quant.py): a call with uint8 codes builds rows of _QROW columns (the
chunk's absmax addresses and a flag) and runs _ademamix_8bit_kernel, which branches per row: rows
with 8-bit states dequantize, update in fp32 as above and requantize per block of 256 with the
new absmax; the other rows run the float-state path. Calls without them are unchanged.
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
# CHUNK_SIZE is a power of two >= 8: every chunk starts 16-byte aligned, and none straddles a
# multiple of 2**32 elements (a chunk's random bits have one key for the high word of the index).
CHUNK_SIZE = 16384  # elements per program
BLOCK_SIZE = 2048   # elements per loop iteration of a program
# The same for the variants that round stochastically (bf16 states, param_sr): 4 elements a
# thread, not 8. With 8, the random bits pushed ptxas (triton 3.8) past 100 registers (or to spills
# at 80), and fp32 params next to bf16 states needed a layout change through shared memory.
SR_BLOCK_SIZE = 1024
# Elements per loop iteration of a row with 8-bit states (whole absmax blocks: a multiple of 256):
# the fp32 values of m1, m2, nu and the param live together until each block's absmax is known.
# With 2048 (8 a thread) ptxas (triton 3.8, sm_90) spilled under the 80-register cap.
QUANT_BLOCK_SIZE = 1024
NUM_WARPS = 8
# The update kernel is built for this many resident programs per SM, as the CUDA kernel is by its
# __launch_bounds__: its registers are capped at what they allow (80 for 8 warps). Uncapped,
# ptxas (triton 3.6) gave bf16/fp16 params with m1 100 registers, where 3.8 fits 80 unspilled.
MIN_PROGRAMS_PER_SM = 3
# The 8-bit kernel: 2 (128 registers), as the CUDA kernel's 8-bit variants. Its stochastic
# rounding's random words spilled 8-24 bytes under the 80-register cap of 3.
MIN_PROGRAMS_PER_SM_QUANT = 2
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
_KEY = tl.constexpr(7)  # (tensor's index in the call << _START_BITS) | chunk's first element
_ROW = tl.constexpr(8)  # padded to 64 bytes
# Tables of calls with 8-bit states (_ademamix_8bit_kernel) have rows of _QROW columns: the eight
# above, then the addresses of the chunk's first absmax of m1, m2, nu (0 in rows without 8-bit
# states) and whether the row's states are 8-bit (1) or of the call's float state dtype (0).
_A1 = tl.constexpr(8)
_A2 = tl.constexpr(9)
_ANU = tl.constexpr(10)
_QUANT = tl.constexpr(11)
_QROW = tl.constexpr(12)
_START_BITS = tl.constexpr(40)
_START_MASK = tl.constexpr(2**_START_BITS.value - 1)

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_PARAM_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_STATE_DTYPES = (torch.float32, torch.bfloat16)

# expm1_f32's constants (csrc/ademamix.h), from their exact fp32 values: 1/k! of the Taylor
# series, log2(e), and ln(2) in two parts.
_INV_FACT3 = tl.constexpr(float.fromhex("0x1.555556p-3"))
_INV_FACT4 = tl.constexpr(float.fromhex("0x1.555556p-5"))
_INV_FACT5 = tl.constexpr(float.fromhex("0x1.111112p-7"))
_INV_FACT6 = tl.constexpr(float.fromhex("0x1.6c16c2p-10"))
_INV_FACT7 = tl.constexpr(float.fromhex("0x1.a01a02p-13"))
_INV_FACT8 = tl.constexpr(float.fromhex("0x1.a01a02p-16"))
_INV_FACT9 = tl.constexpr(float.fromhex("0x1.71de3ap-19"))
_LOG2E = tl.constexpr(float.fromhex("0x1.715476p+0"))
_LN2_HI = tl.constexpr(float.fromhex("0x1.63p-1"))
_LN2_LO = tl.constexpr(float.fromhex("-0x1.bd0106p-13"))


@triton.jit
def _expm1(x):
    # csrc/ademamix.h expm1_f32: x = k ln2 + r, expm1(r) by its Taylor series to r^9, then
    # expm1(x) = 2^k expm1(r) + (2^k - 1). Below -30 it is -1 (x = -inf, for beta2 = 0, included).
    x = tl.maximum(x, -30.0)
    k = tl.floor(x * _LOG2E + 0.5)
    r = (x - k * _LN2_HI) - k * _LN2_LO
    q = _INV_FACT8 + r * _INV_FACT9
    q = _INV_FACT7 + r * q
    q = _INV_FACT6 + r * q
    q = _INV_FACT5 + r * q
    q = _INV_FACT4 + r * q
    q = _INV_FACT3 + r * q
    q = 0.5 + r * q
    em1 = r + (r * r) * q
    scale = ((k.to(tl.int32) + 127) << 23).to(tl.float32, bitcast=True)
    return scale * em1 + (scale - 1.0)


@triton.jit
def _schedules(t, ln_beta1, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
               beta3_warmup, alpha_warmup, HAS_M1: tl.constexpr):
    """csrc/ademamix.h step_scalars of step t: 1/bc1, 1/sqrt(bc2), alpha_t, beta3_t, 1 - beta3_t.

    A warmup of 0 means none: t >= 1 is never below it.
    """
    inv_bc1 = 1.0
    if HAS_M1:
        inv_bc1 = tl.div_rn(1.0, -_expm1(t * ln_beta1))  # bc1 = 1 - beta1^t
    inv_sqrt_bc2 = tl.div_rn(1.0, tl.sqrt_rn(-_expm1(t * ln_beta2)))
    # The clamps change nothing inside a warmup; outside they keep the unused values finite.
    alpha_t = tl.where(t < alpha_warmup,
                       tl.div_rn(alpha * t, tl.maximum(alpha_warmup, 1.0)), alpha)
    # beta3 warmup: half-life interpolated linearly from beta1's to beta3's, 0.5^(1/(x+1)).
    a = tl.minimum(tl.div_rn(t, tl.maximum(beta3_warmup, 1.0)), 1.0)
    x = (1.0 - a) * f_beta1 + a * f_beta3
    one_minus_b3_warm = -_expm1(tl.div_rn(ln_half, x + 1.0))
    in_warmup = t < beta3_warmup
    one_minus_b3 = tl.where(in_warmup, one_minus_b3_warm, one_minus_beta3)
    b3 = tl.where(in_warmup, 1.0 - one_minus_b3_warm, beta3)
    return inv_bc1, inv_sqrt_bc2, alpha_t, b3, one_minus_b3


# Stochastic rounding: csrc/ademamix.h mix32, sr_keys and round_bf16_sr, in uint32 arithmetic
# (multiplies wrap mod 2**32, shifts are logical).


@triton.jit
def _mix32(x):
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _sr_keys(seed_lo, seed_hi, tensor, t, e_hi):
    """The keys (k0, k1) of the random bits of a chunk: tensor `tensor` of the call, step t,
    element indices with high word e_hi."""
    tensor_key = _mix32(seed_hi ^ _mix32(seed_lo ^ _mix32(tensor ^ 0x9E3779B9)))
    step_key = _mix32(tensor_key ^ _mix32(t))
    k0 = _mix32(step_key ^ _mix32(e_hi))
    return k0, _mix32(k0 ^ 0x85EBCA6B)


@triton.jit
def _round_bf16_sr(x, r):
    # fp32 -> bf16 bits, r & 0xFFFF added below the kept bits (unbiased). NaN and Inf keep their
    # class: a NaN plus r could carry into the sign (0x7FFFFFFF + 0xFFFF -> -0.0), a truncated NaN
    # could read as Inf, so a NaN gets its quiet bit.
    b = x.to(tl.uint32, bitcast=True)
    finite = (b & 0x7F800000) != 0x7F800000
    quiet = tl.where((b & 0x007FFFFF) != 0, 0x0040, 0)
    return tl.where(finite, (b + (r & 0xFFFF)) >> 16, (b >> 16) | quiet).to(tl.uint16)


@triton.jit
def _from_bf16_bits(x):
    """bf16 stored as its bits (uint16) -> fp32, exactly (<< 16)."""
    return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


# The interpreter re-patches triton.language at every call of a jit function (~0.35 ms), so the
# block update calls the bf16 helpers only in the variants that have bf16 arrays: the fp32 path
# runs as fast interpreted as it did before them.
@triton.jit
def _slow_moments_and_param(p, g, m1, m2, nu, lr, beta2, one_minus_beta2, b3, one_minus_b3,
                            inv_bc1, inv_sqrt_bc2, alpha_t, eps, weight_decay):
    """csrc/ademamix.h ademamix_update after the fast EMA (m1: the new one, or g when beta1 == 0),
    in fp32: the new param, m2 and nu. Both update kernels' element math."""
    m2 = b3 * m2 + one_minus_b3 * g
    nu = beta2 * nu + (one_minus_beta2 * g) * g
    denom = tl.sqrt_rn(nu) * inv_sqrt_bc2 + eps
    update = tl.div_rn(m1 * inv_bc1 + alpha_t * m2, denom) + weight_decay * p  # wd on p before step
    return p - lr * update, m2, nu


@triton.jit
def _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_mult, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                     inv_sqrt_bc2, alpha_t, eps, weight_decay, first_lo, k0, k1,
                     HAS_M1: tl.constexpr, SCALE_GRAD: tl.constexpr, BF16_STATES: tl.constexpr,
                     PARAM_SR: tl.constexpr, MASKED: tl.constexpr):
    """csrc/ademamix.h ademamix_update of one block, fp32 whatever the storage, and the writes
    with the random bits of update_groups: m1 r0 & 0xFFFF, m2 r0 >> 16, nu r1 & 0xFFFF, the param
    r1 >> 16. Stores of fp32 values to bf16/fp16 params round to nearest even."""
    mask = None
    if MASKED:
        mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    if PARAM_SR:
        p = _from_bf16_bits(p)
    p = p.to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if SCALE_GRAD:
        g = g * grad_mult
    r0, r1 = 0, 0
    if BF16_STATES or PARAM_SR:
        e_lo = first_lo + offs.to(tl.uint32)  # the low word of the element's index in its tensor
        r1 = _mix32(e_lo ^ k1)
        if BF16_STATES:
            r0 = _mix32(e_lo ^ k0)
    # Each state is loaded, updated and (m1) stored in turn: fewer live values than all loads
    # first, which spilled the unaligned fp32 variant (scalar accesses).
    if HAS_M1:
        m1 = tl.load(m1_ptr + offs, mask=mask)
        if BF16_STATES:
            m1 = _from_bf16_bits(m1)
        m1 = beta1 * m1 + one_minus_beta1 * g
        if BF16_STATES:
            tl.store(m1_ptr + offs, _round_bf16_sr(m1, r0), mask=mask)
        else:
            tl.store(m1_ptr + offs, m1, mask=mask)
    else:
        m1 = g  # beta1 == 0: the fast EMA is the gradient, no buffer
    m2 = tl.load(m2_ptr + offs, mask=mask)
    nu = tl.load(nu_ptr + offs, mask=mask)
    if BF16_STATES:
        m2 = _from_bf16_bits(m2)
        nu = _from_bf16_bits(nu)
    p, m2, nu = _slow_moments_and_param(p, g, m1, m2, nu, lr, beta2, one_minus_beta2, b3,
                                        one_minus_b3, inv_bc1, inv_sqrt_bc2, alpha_t, eps,
                                        weight_decay)
    if PARAM_SR:
        p = _round_bf16_sr(p, r1 >> 16)
    tl.store(p_ptr + offs, p, mask=mask)
    if BF16_STATES:
        m2 = _round_bf16_sr(m2, r0 >> 16)
        nu = _round_bf16_sr(nu, r1)
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


def _update_options(programs_per_sm=MIN_PROGRAMS_PER_SM):
    """Compile options of the update kernels' launches: NUM_WARPS, the register cap of
    `programs_per_sm` resident programs (64K registers an SM, allocated 8 a thread at a time), and
    no fp fusion: no multiply-add is contracted, as in the other backends."""
    regs = 65536 // (programs_per_sm * NUM_WARPS * 32) // 8 * 8
    return dict(num_warps=NUM_WARPS, maxnreg=min(regs, 255), enable_fp_fusion=False)


@triton.jit
def _prologue(row, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1, ln_beta1,
              beta2, one_minus_beta2, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half,
              alpha, beta3_warmup, alpha_warmup, eps, weight_decay, seed_lo, seed_hi,
              HAS_M1: tl.constexpr, MAXIMIZE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
              HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, NEED_KEYS: tl.constexpr):
    """What a program of the update kernels computes before its chunk: the scalars in fp32, the
    step's scalars (_schedules), the chunk's length (0 when found_inf skips the step) and, with
    NEED_KEYS, the keys of its random bits."""
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
    grad_mult = 1.0
    if HAS_GRAD_SCALE:
        grad_mult = tl.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32))
    if MAXIMIZE:
        grad_mult = -grad_mult

    t = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32)))  # already incremented
    n = tl.load(row + _LEN).to(tl.int32)  # < CHUNK_SIZE: offsets in a chunk fit in 32 bits
    if HAS_FOUND_INF:
        n = tl.where(tl.load(found_inf_ptr) != 0, 0, n)  # skip: nothing read, nothing written

    inv_bc1, inv_sqrt_bc2, alpha_t, b3, one_minus_b3 = _schedules(
        t, ln_beta1, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
        beta3_warmup, alpha_warmup, HAS_M1)
    first_lo, k0, k1 = 0, 0, 0
    if NEED_KEYS:
        key = tl.load(row + _KEY)
        chunk_start = key & _START_MASK
        k0, k1 = _sr_keys(seed_lo.to(tl.uint32, bitcast=True), seed_hi.to(tl.uint32, bitcast=True),
                          (key >> _START_BITS).to(tl.uint32), t.to(tl.uint32),
                          (chunk_start >> 32).to(tl.uint32))
        first_lo = (chunk_start & 0xFFFFFFFF).to(tl.uint32)
    return (lr, grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, n,
            inv_bc1, inv_sqrt_bc2, alpha_t, b3, one_minus_b3, first_lo, k0, k1)


@triton.jit
def _update_rows(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, n, lr, grad_mult, beta1, one_minus_beta1,
                 beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1, inv_sqrt_bc2, alpha_t, eps,
                 weight_decay, first_lo, k0, k1, HAS_M1: tl.constexpr, SCALE_GRAD: tl.constexpr,
                 BF16_STATES: tl.constexpr, PARAM_SR: tl.constexpr, BLOCK: tl.constexpr):
    """The chunk of a row with float states (fp32, or bf16 as their bits): full blocks unmasked
    (vector loads), then the masked tail in half blocks (at most two).

    A masked block is scalar accesses, each element with its own predicate, and costs more
    registers than a full one: a whole masked block pushed ptxas (triton 3.8, bf16/fp16 params
    with m1) to a spill at 80 registers, or past 80 (fewer programs per SM). Half blocks halve
    the tail's live values; the full blocks' code is unchanged (tests/test_codegen.py)."""
    n_full = n // BLOCK
    for i in range(0, n_full):
        offs = tl.max_contiguous(tl.multiple_of(i * BLOCK + tl.arange(0, BLOCK), BLOCK), BLOCK)
        _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_mult, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                         inv_sqrt_bc2, alpha_t, eps, weight_decay, first_lo, k0, k1, HAS_M1,
                         SCALE_GRAD, BF16_STATES, PARAM_SR, False)
    for start in range(n_full * BLOCK, n, BLOCK // 2):
        offs = tl.max_contiguous(
            tl.multiple_of(start + tl.arange(0, BLOCK // 2), BLOCK // 2), BLOCK // 2)
        _ademamix_update(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, offs, n, lr, grad_mult, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                         inv_sqrt_bc2, alpha_t, eps, weight_decay, first_lo, k0, k1, HAS_M1,
                         SCALE_GRAD, BF16_STATES, PARAM_SR, True)


# The seed words are int32 bit patterns, unspecialized: one compiled kernel for every seed.
@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _ademamix_kernel(table_ptr, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1,
                     ln_beta1, beta2, one_minus_beta2, ln_beta2, beta3, one_minus_beta3, f_beta1,
                     f_beta3, ln_half, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                     seed_lo, seed_hi, P_DTYPE: tl.constexpr, HAS_M1: tl.constexpr,
                     MAXIMIZE: tl.constexpr, LR_IS_TENSOR: tl.constexpr,
                     HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                     BF16_STATES: tl.constexpr, PARAM_SR: tl.constexpr, ALIGNED: tl.constexpr,
                     BLOCK: tl.constexpr):
    # BF16_STATES: m1, m2, nu are bf16 (accessed as their bits), written with stochastic
    # rounding; PARAM_SR: so are the (bf16) params.
    row = table_ptr + tl.program_id(0).to(tl.int64) * _ROW
    (lr, grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, n, inv_bc1,
     inv_sqrt_bc2, alpha_t, b3, one_minus_b3, first_lo, k0, k1) = _prologue(
        row, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1, ln_beta1, beta2,
        one_minus_beta2, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
        beta3_warmup, alpha_warmup, eps, weight_decay, seed_lo, seed_hi, HAS_M1, MAXIMIZE,
        LR_IS_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, BF16_STATES or PARAM_SR)
    S_DTYPE: tl.constexpr = tl.uint16 if BF16_STATES else tl.float32
    p_ptr = _row_ptr(row, _P, tl.uint16 if PARAM_SR else P_DTYPE, ALIGNED)
    g_ptr = _row_ptr(row, _G, P_DTYPE, ALIGNED)
    m1_ptr = _row_ptr(row, _M1, S_DTYPE, ALIGNED)
    m2_ptr = _row_ptr(row, _M2, S_DTYPE, ALIGNED)
    nu_ptr = _row_ptr(row, _NU, S_DTYPE, ALIGNED)
    _update_rows(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, n, lr, grad_mult, beta1, one_minus_beta1,
                 beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1, inv_sqrt_bc2, alpha_t, eps,
                 weight_decay, first_lo, k0, k1, HAS_M1, HAS_GRAD_SCALE or MAXIMIZE, BF16_STATES,
                 PARAM_SR, BLOCK)


# ---------------------------------------------------------------------------------------------
# 8-bit blockwise states (ademamix_cuda/quant.py): uint8 codes, one fp32 absmax per _QBLOCK
# consecutive elements. A code's value and a value's code are integer operations on the fp32 bits
# (no table, no gather): magnitude code k of a map whose 1.0 is code `top` has the value whose
# bits are (k + _Q_ONE - top) << _Q_SHIFT (k = 0: 0).

_QBLOCK = tl.constexpr(256)  # quant.BLOCK; CHUNK_SIZE is a multiple: no block straddles chunks
_Q_SHIFT = tl.constexpr(19)  # 23 - quant.MANTISSA_BITS
_Q_ONE = tl.constexpr(2032)  # the bits of 1.0 >> _Q_SHIFT
# the smallest nonzero magnitude of the signed (top 127) and unsigned (top 255) maps
_Q_SMALLEST_SIGNED = tl.constexpr(float.fromhex("0x1.2p-8"))
_Q_SMALLEST_UNSIGNED = tl.constexpr(float.fromhex("0x1.2p-16"))


@triton.jit
def _values_of(codes, absmax, SIGNED: tl.constexpr):
    """uint8 codes [NB, _QBLOCK] -> fp32 values: the code's value times its block's absmax [NB]."""
    c = codes.to(tl.int32)
    TOP: tl.constexpr = 127 if SIGNED else 255
    k = c & 127 if SIGNED else c
    v = ((k + (_Q_ONE - TOP)) << _Q_SHIFT).to(tl.float32, bitcast=True)
    v = tl.where(k == 0, 0.0, v)
    if SIGNED:
        v = tl.where(c >= 128, -v, v)
    return v * absmax[:, None]


@triton.jit
def _codes_of(x, valid, r, SIGNED: tl.constexpr, MASKED: tl.constexpr):
    """fp32 values [NB, _QBLOCK] -> (uint8 codes, fp32 absmax [NB]): each block's largest
    magnitude among its valid elements (NaN if one is NaN), and each value over it rounded
    stochastically to a code with the low 16 bits of r (uint32, x's shape; NaN: code 0): on the
    grid r << 3 added below the 19 mantissa bits a code drops; below the smallest magnitude up
    with probability x / smallest (the unsigned map: every x > 0 at least code 1)."""
    TOP: tl.constexpr = 127 if SIGNED else 255
    SMALLEST: tl.constexpr = _Q_SMALLEST_SIGNED if SIGNED else _Q_SMALLEST_UNSIGNED
    # One integer max per block: the bits of non-negative floats order as they do, with every
    # NaN above +Inf (0x7F800000), so the largest bits are the absmax or tell of a NaN.
    mag = tl.abs(x).to(tl.int32, bitcast=True)
    if MASKED:
        mag = tl.where(valid, mag, 0)
    top = tl.max(mag, axis=1)
    absmax = tl.where(top > 0x7F800000, float("nan"), top.to(tl.float32, bitcast=True))
    q = tl.div_rn(x, absmax[:, None])  # |q| <= 1; NaN where absmax is 0 or NaN
    a = tl.abs(q) if SIGNED else q
    r16 = r & 0xFFFF
    # a's bits as uint32 (wrapping only for a NaN, whose code is 0 below)
    grid = ((a.to(tl.uint32, bitcast=True) + (r16 << 3)) >> _Q_SHIFT).to(tl.int32) - (_Q_ONE - TOP)
    if SIGNED:
        below = tl.where(r16.to(tl.float32) < tl.div_rn(a, SMALLEST) * 65536.0, 1, 0)
    else:
        below = 1
    code = tl.where(a >= SMALLEST, grid, tl.where(a > 0.0, below, 0))
    if SIGNED:
        code = code | tl.where((q < 0.0) & (code != 0), 128, 0)  # zero has the one code 0
    return code.to(tl.uint8), absmax


@triton.jit
def _ademamix_update_8bit(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, a1_ptr, a2_ptr, anu_ptr, i, n, lr,
                          grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, b3,
                          one_minus_b3, inv_bc1, inv_sqrt_bc2, alpha_t, eps, weight_decay,
                          first_lo, k0, k1, HAS_M1: tl.constexpr, SCALE_GRAD: tl.constexpr,
                          PARAM_SR: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Tile i (BLOCK elements: NB blocks of _QBLOCK) of a chunk with 8-bit states: dequantize,
    _ademamix_update's fp32 math (the same operations in the same order; the param written as
    there), quantize with the new absmax of each block; the random bits are bf16 states' (m1:
    r0's low half, m2: its high half, nu: r1's low half, the param with PARAM_SR: r1's high)."""
    NB: tl.constexpr = BLOCK // _QBLOCK
    blocks = i * NB + tl.arange(0, NB)  # the blocks' indices in the chunk
    offs = blocks[:, None] * _QBLOCK + tl.arange(0, _QBLOCK)[None, :]
    e_lo = first_lo + offs.to(tl.uint32)  # the low word of the element's index in its tensor
    mask, bmask = None, None
    if MASKED:
        mask = offs < n
        bmask = blocks * _QBLOCK < n
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if SCALE_GRAD:
        g = g * grad_mult
    if HAS_M1:
        m1 = _values_of(tl.load(m1_ptr + offs, mask=mask), tl.load(a1_ptr + blocks, mask=bmask),
                        True)
        m1 = beta1 * m1 + one_minus_beta1 * g
        m1_codes, m1_absmax = _codes_of(m1, mask, _mix32(e_lo ^ k0), True, MASKED)
        tl.store(m1_ptr + offs, m1_codes, mask=mask)
        tl.store(a1_ptr + blocks, m1_absmax, mask=bmask)
    else:
        m1 = g  # beta1 == 0: the fast EMA is the gradient, no buffer
    m2 = _values_of(tl.load(m2_ptr + offs, mask=mask), tl.load(a2_ptr + blocks, mask=bmask), True)
    nu = _values_of(tl.load(nu_ptr + offs, mask=mask), tl.load(anu_ptr + blocks, mask=bmask),
                    False)
    # the param is loaded last: fewer live values while m1 is requantized
    p = tl.load(p_ptr + offs, mask=mask)
    if PARAM_SR:
        p = _from_bf16_bits(p)
    p, m2, nu = _slow_moments_and_param(p.to(tl.float32), g, m1, m2, nu, lr, beta2,
                                        one_minus_beta2, b3, one_minus_b3, inv_bc1, inv_sqrt_bc2,
                                        alpha_t, eps, weight_decay)
    r1 = _mix32(e_lo ^ k1)
    if PARAM_SR:
        p = _round_bf16_sr(p, r1 >> 16)
    tl.store(p_ptr + offs, p, mask=mask)
    m2_codes, m2_absmax = _codes_of(m2, mask, _mix32(e_lo ^ k0) >> 16, True, MASKED)
    tl.store(m2_ptr + offs, m2_codes, mask=mask)
    tl.store(a2_ptr + blocks, m2_absmax, mask=bmask)
    nu_codes, nu_absmax = _codes_of(nu, mask, r1, False, MASKED)
    tl.store(nu_ptr + offs, nu_codes, mask=mask)
    tl.store(anu_ptr + blocks, nu_absmax, mask=bmask)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _ademamix_8bit_kernel(table_ptr, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1,
                          one_minus_beta1, ln_beta1, beta2, one_minus_beta2, ln_beta2, beta3,
                          one_minus_beta3, f_beta1, f_beta3, ln_half, alpha, beta3_warmup,
                          alpha_warmup, eps, weight_decay, seed_lo, seed_hi,
                          P_DTYPE: tl.constexpr, HAS_M1: tl.constexpr, MAXIMIZE: tl.constexpr,
                          LR_IS_TENSOR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                          HAS_FOUND_INF: tl.constexpr, BF16_STATES: tl.constexpr,
                          PARAM_SR: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                          QTILE: tl.constexpr):
    """_ademamix_kernel over a table of _QROW columns, whose rows with _QUANT set have 8-bit
    states (uint8 codes at _M1, _M2, _NU; their absmax at _A1, _A2, _ANU, at the chunk's first
    block), processed QTILE elements (QTILE // _QBLOCK absmax blocks) at a time; the other rows are
    _ademamix_kernel's (states of the call's float state dtype: BF16_STATES or fp32)."""
    row = table_ptr + tl.program_id(0).to(tl.int64) * _QROW
    (lr, grad_mult, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, n, inv_bc1,
     inv_sqrt_bc2, alpha_t, b3, one_minus_b3, first_lo, k0, k1) = _prologue(
        row, lr, lr_ptr, grad_scale_ptr, found_inf_ptr, beta1, one_minus_beta1, ln_beta1, beta2,
        one_minus_beta2, ln_beta2, beta3, one_minus_beta3, f_beta1, f_beta3, ln_half, alpha,
        beta3_warmup, alpha_warmup, eps, weight_decay, seed_lo, seed_hi, HAS_M1, MAXIMIZE,
        LR_IS_TENSOR, HAS_GRAD_SCALE, HAS_FOUND_INF, True)
    SCALE_GRAD: tl.constexpr = HAS_GRAD_SCALE or MAXIMIZE
    p_ptr = _row_ptr(row, _P, tl.uint16 if PARAM_SR else P_DTYPE, ALIGNED)
    g_ptr = _row_ptr(row, _G, P_DTYPE, ALIGNED)
    # Names assigned in both branches of a run-time `if` must keep their types: the 8-bit
    # branch's are its own.
    if tl.load(row + _QUANT) != 0:
        q1_ptr = _row_ptr(row, _M1, tl.uint8, ALIGNED)
        q2_ptr = _row_ptr(row, _M2, tl.uint8, ALIGNED)
        qnu_ptr = _row_ptr(row, _NU, tl.uint8, ALIGNED)
        a1_ptr = tl.load(row + _A1).to(tl.pointer_type(tl.float32))
        a2_ptr = tl.load(row + _A2).to(tl.pointer_type(tl.float32))
        anu_ptr = tl.load(row + _ANU).to(tl.pointer_type(tl.float32))
        q_full = n // QTILE
        for i in range(0, q_full):
            _ademamix_update_8bit(p_ptr, g_ptr, q1_ptr, q2_ptr, qnu_ptr, a1_ptr, a2_ptr, anu_ptr,
                                  i, n, lr, grad_mult, beta1, one_minus_beta1, beta2,
                                  one_minus_beta2, b3, one_minus_b3, inv_bc1, inv_sqrt_bc2,
                                  alpha_t, eps, weight_decay, first_lo, k0, k1, HAS_M1, SCALE_GRAD,
                                  PARAM_SR, False, QTILE)
        for i in range(q_full, tl.cdiv(n, QTILE)):  # the masked tail: at most one tile
            _ademamix_update_8bit(p_ptr, g_ptr, q1_ptr, q2_ptr, qnu_ptr, a1_ptr, a2_ptr, anu_ptr,
                                  i, n, lr, grad_mult, beta1, one_minus_beta1, beta2,
                                  one_minus_beta2, b3, one_minus_b3, inv_bc1, inv_sqrt_bc2,
                                  alpha_t, eps, weight_decay, first_lo, k0, k1, HAS_M1, SCALE_GRAD,
                                  PARAM_SR, True, QTILE)
    else:
        S_DTYPE: tl.constexpr = tl.uint16 if BF16_STATES else tl.float32
        m1_ptr = _row_ptr(row, _M1, S_DTYPE, ALIGNED)
        m2_ptr = _row_ptr(row, _M2, S_DTYPE, ALIGNED)
        nu_ptr = _row_ptr(row, _NU, S_DTYPE, ALIGNED)
        _update_rows(p_ptr, g_ptr, m1_ptr, m2_ptr, nu_ptr, n, lr, grad_mult, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, b3, one_minus_b3, inv_bc1,
                     inv_sqrt_bc2, alpha_t, eps, weight_decay, first_lo, k0, k1, HAS_M1,
                     SCALE_GRAD, BF16_STATES, PARAM_SR, BLOCK)


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
                 "written_start", "written_end", "width", "state_dtype")

    def __init__(self, steps_offset, launches, owner, grad_offset, grad_bytes, grad_aligned,
                 written_start, written_end, width=_ROW.value, state_dtype=None):
        self.steps_offset = steps_offset
        self.launches = launches  # [(first table element, number of chunks, aligned)]
        self.owner = owner
        self.grad_offset = grad_offset
        self.grad_bytes = grad_bytes
        self.grad_aligned = grad_aligned
        self.written_start = written_start
        self.written_end = written_end
        self.width = width  # columns of a row: _ROW, or _QROW (8-bit states, their kernel)
        self.state_dtype = state_dtype  # the float state dtype of the call (None: norm plans)


class _Plan:
    __slots__ = ("table", "host", "layout", "step_addrs", "launches", "pending", "captured",
                 "streams", "last_use")

    def __init__(self, table, host, layout, pending, stream):
        self.table = table
        self.host = host  # the CPU table
        self.layout = layout
        self.step_addrs = table[layout.steps_offset:]
        self.launches = [(table[o:o + c * layout.width], c, a) for o, c, a in layout.launches
                         if c]
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


_ABSMAX_NAMES = ("exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs")
_STATE_NAMES = ("exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs")


def _state_dtype(m2s):
    """The call's float state dtype: that of its first exp_avg_slows that is not 8-bit (uint8
    codes); float32 when every state is 8-bit (or a non-tensor is in the list: named later)."""
    for m2 in m2s:
        dtype = getattr(m2, "dtype", torch.float32)
        if dtype != torch.uint8:
            return dtype
    return torch.float32


def _check_tensors(params, grads, m1s, m2s, nus, steps, device, absmaxs=None):
    """absmaxs: the three absmax lists (exp_avg_fast_absmaxs empty without m1) of a call with
    8-bit states, or None."""
    dtype = params[0].dtype
    if dtype not in _PARAM_DTYPES:
        raise TypeError(f"ademamix_triton: params must be float32, bfloat16 or float16, "
                        f"got {dtype}")
    # One float state dtype per call, that of the first exp_avg_slows that is not uint8 (a
    # non-tensor is named below); uint8 states are 8-bit codes, with absmax lists.
    first = next((i for i, m2 in enumerate(m2s)
                  if not isinstance(m2, torch.Tensor) or m2.dtype != torch.uint8), None)
    state_dtype = _state_dtype(m2s)
    if first is not None and isinstance(m2s[first], torch.Tensor) \
            and state_dtype not in _STATE_DTYPES:
        raise TypeError(f"ademamix_triton: states must be float32 or bfloat16 (or uint8 8-bit "
                        f"codes, with absmax lists), got {state_dtype} for exp_avg_slows[{first}]")
    for i, (p, g, m2, nu, s) in enumerate(zip(params, grads, m2s, nus, steps)):
        if p.dtype != dtype:
            raise TypeError(f"ademamix_triton: one param dtype per call: params[0] is {dtype}, "
                            f"params[{i}] is {p.dtype}; group the tensors by dtype")
        named = [("params", p), ("grads", g), ("exp_avg_slows", m2), ("exp_avg_sqs", nu)]
        if m1s:
            named.append(("exp_avg_fasts", m1s[i]))
        abs_named = []
        if absmaxs is not None:
            abs_named = [(name, xs[i]) for name, xs in zip(_ABSMAX_NAMES, absmaxs) if xs]
        for name, x in named + [("state_steps", s)] + abs_named:
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
        quantized = m2.dtype == torch.uint8
        if quantized and absmaxs is None:
            raise TypeError(f"ademamix_triton: exp_avg_slows[{i}] is uint8 (8-bit codes) but the "
                            f"call has no absmax lists: pass exp_avg_fast_absmaxs (with m1), "
                            f"exp_avg_slow_absmaxs and exp_avg_sq_absmaxs, one per param")
        for name, x in named[2:]:
            if quantized and x.dtype != torch.uint8:
                raise TypeError(f"ademamix_triton: {name}[{i}] must be uint8 8-bit codes "
                                f"(exp_avg_slows[{i}] is), got {x.dtype}")
            want = torch.uint8 if quantized else state_dtype
            if x.dtype != want or x.shape != p.shape:
                raise RuntimeError(f"ademamix_triton: {name}[{i}] must be {want} (one float state "
                                   f"dtype per call: that of the first exp_avg_slows that is not "
                                   f"8-bit, or uint8 codes where exp_avg_slows[{i}] is) of shape "
                                   f"{tuple(p.shape)}, got {x.dtype} {tuple(x.shape)}")
        for name, x in abs_named:
            if quantized:
                want = (-(-p.numel() // _QBLOCK.value),)
                if x.dtype != torch.float32 or tuple(x.shape) != want:
                    raise RuntimeError(
                        f"ademamix_triton: {name}[{i}] must be a float32 absmax of shape "
                        f"{list(want)} (one per {_QBLOCK.value} elements of params[{i}], "
                        f"{p.numel()} elements), got {x.dtype} {list(x.shape)}")
            elif x.numel() != 0:
                raise RuntimeError(
                    f"ademamix_triton: {name}[{i}] has {x.numel()} elements, but the states of "
                    f"params[{i}] are {m2.dtype}, not 8-bit: its absmax must be empty")
        for name, x in named + abs_named:
            if not x.is_contiguous():
                raise RuntimeError(f"ademamix_triton: {name}[{i}] must be contiguous")
        if s.dtype != torch.float32 or s.numel() != 1:
            raise RuntimeError(f"ademamix_triton: state_steps[{i}] must be a one-element float32 "
                               f"tensor, got {s.dtype} with {s.numel()} elements")
    try:
        check_disjoint((params, grads, m1s, m2s, nus, steps))
    except RuntimeError as e:
        raise RuntimeError(f"ademamix_triton: {e}") from None
    if absmaxs is not None:
        _check_absmax_disjoint(params, grads, m1s, m2s, nus, steps, absmaxs)


def _check_absmax_disjoint(params, grads, m1s, m2s, nus, steps, absmaxs):
    """check_disjoint's check of the absmax tensors (written) against every tensor of the call."""
    spans = []
    names = ("params", "grads") + _STATE_NAMES + ("state_steps",) + _ABSMAX_NAMES
    for k, xs in enumerate((params, grads, m1s, m2s, nus, steps) + tuple(absmaxs)):
        for i, x in enumerate(xs):
            if x.numel():
                start = x.data_ptr()
                spans.append((start, start + x.numel() * x.element_size(), k, i))
    spans.sort()
    reach = None  # the span reaching furthest so far
    for span in spans:
        if reach is not None and span[0] < reach[1] and (reach[2] >= 6 or span[2] >= 6):
            raise RuntimeError(
                f"ademamix_triton: {names[reach[2]]}[{reach[3]}] and {names[span[2]]}[{span[3]}] "
                "share memory; each param, state, absmax and step count of a call needs memory "
                "of its own (is a tensor listed twice?)")
        if reach is None or span[1] > reach[1]:
            reach = span


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


def _plan(params, grads, m1s, m2s, nus, steps, device, absmaxs=None):
    """absmaxs: as _check_tensors takes them."""
    dense = list(chain(params, grads, m1s, m2s, nus))
    absmax_flat = list(chain(*absmaxs)) if absmaxs is not None else []
    flat = dense + steps + absmax_flat
    try:
        # What _check_tensors depends on, per tensor, in C-level passes: address, element count,
        # dtype and strides (with numel and contiguity they pin the shape, so a view of the same
        # storage with another shape is a new key and gets checked).
        ptrs, numels = tuple(map(_data_ptr, flat)), tuple(map(_numel, flat))
        key = (device, CHUNK_SIZE, len(params), bool(m1s), absmaxs is not None, ptrs, numels,
               tuple(map(_dtype, flat)), tuple(map(_stride, dense + absmax_flat)))
        dense_ok = all(map(_is_contiguous, dense + absmax_flat))
    except (RuntimeError, TypeError, AttributeError):  # not a tensor, sparse, no storage
        dense_ok = False
    check = lambda: _check_tensors(params, grads, m1s, m2s, nus, steps, device,  # noqa: E731
                                   absmaxs)
    if not dense_ok:
        check()  # names the culprit
        raise RuntimeError("ademamix_triton: every tensor must be dense and contiguous")
    n = len(params)
    quant = None
    if absmaxs is not None:
        a_ptrs = ptrs[len(dense) + n:]
        if not m1s:
            a_ptrs = (0,) * n + a_ptrs
        quantized = tuple(m2.dtype == torch.uint8 for m2 in m2s)
        # no 8-bit state: the plain table and kernel (the absmax are empty, nothing to write)
        quant = (quantized, a_ptrs) if any(quantized) else None
    state_dtype = _state_dtype(m2s)
    state_size = state_dtype.itemsize
    return _lookup(key, device, check, lambda capturing: _new_plan(
        ptrs[:len(dense) + n], numels[:n], bool(m1s), params[0].element_size(), state_size,
        device, capturing, quant, state_dtype))


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
    size = grads[0].element_size()
    return _lookup(key, device, check, lambda capturing: _new_plan(
        ptrs * 4 + no_steps, numels, False, size, size, device, capturing))


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


def _new_plan(ptrs, numels, has_m1, elem_size, state_size, device, capturing, quant=None,
              state_dtype=None):
    """quant: None (no 8-bit states: rows of _ROW columns), or (per tensor whether its states are
    8-bit, the addresses of the absmax of m1 (0 without m1), of m2, of nu: one list after the
    other): rows of _QROW columns, for _ademamix_8bit_kernel."""
    if CHUNK_SIZE < 8 or CHUNK_SIZE & (CHUNK_SIZE - 1) or (quant is not None
                                                            and CHUNK_SIZE % _QBLOCK.value):
        raise ValueError("ademamix_triton: CHUNK_SIZE must be a power of two >= 8 (chunks must "
                         "start 16-byte aligned and not straddle a multiple of 2**32 elements), "
                         f"and a multiple of {_QBLOCK.value} with 8-bit states")
    n, bits = len(numels), _START_BITS.value
    if n > 2**(63 - bits) or max(numels) > 2**bits:
        raise ValueError(f"ademamix_triton: at most 2**{63 - bits} tensors of at most 2**{bits} "
                         f"elements (the random-bit keys of the chunk rows)")
    addr = torch.tensor(ptrs, dtype=torch.int64).view(-1, n)  # one row per list
    if not has_m1:
        addr = torch.cat([addr[:2], torch.zeros_like(addr[:1]), addr[2:]])  # m1 = 0: never read
    data, step = addr[:5], addr[5]
    numel = torch.tensor(numels, dtype=torch.int64)
    # bytes per element, per list and tensor
    elem_sizes = torch.tensor([elem_size, elem_size] + [state_size] * 3,
                              dtype=torch.int64)[:, None].repeat(1, n)
    width = _ROW.value
    if quant is not None:
        width = _QROW.value
        quantized = torch.tensor(quant[0], dtype=torch.bool)
        absmax = torch.tensor(quant[1], dtype=torch.int64).view(3, n)
        elem_sizes[2:, quantized] = 1
    aligned = (data % 16 == 0).all(dim=0)

    parts, launches, owners, starts, offset = [], [], [], [], 0
    for is_aligned in (True, False):
        idx = (aligned == is_aligned).nonzero().flatten()
        counts = (numel[idx] + CHUNK_SIZE - 1) // CHUNK_SIZE  # empty tensors get no chunk
        owner = torch.repeat_interleave(idx, counts)
        first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        start = (torch.arange(owner.numel()) - first) * CHUNK_SIZE  # in elements
        rows = torch.zeros(owner.numel(), width, dtype=torch.int64)
        rows[:, 0:5] = data[:, owner].T + start[:, None] * elem_sizes[:, owner].T
        rows[:, 5] = step[owner]
        rows[:, 6] = torch.clamp(numel[owner] - start, max=CHUNK_SIZE)
        rows[:, 7] = (owner << bits) | start
        if quant is not None:
            q = quantized[owner]
            # the chunk's first absmax: CHUNK_SIZE / _QBLOCK fp32 per chunk
            rows[:, 8:11] = torch.where(q[:, None], absmax[:, owner].T
                                        + (start // _QBLOCK.value * 4)[:, None], 0)
            rows[:, 11] = q.to(torch.int64)
        parts.append(rows.flatten())
        launches.append((offset, rows.shape[0], is_aligned))
        owners.append(owner)
        starts.append(start)
        offset += rows.numel()
    host = torch.cat(parts + [step])
    nbytes = numel[None, :] * elem_sizes  # per list and tensor
    written = [0, 2, 3, 4] if has_m1 else [0, 3, 4]
    w_start = torch.cat([data[written].flatten(), step])
    w_size = torch.cat([nbytes[written].flatten(), torch.full_like(step, 4)])
    if quant is not None:
        a_lists = [0, 1, 2] if has_m1 else [1, 2]
        a_bytes = ((numel + _QBLOCK.value - 1) // _QBLOCK.value * 4) * quantized
        w_start = torch.cat([w_start, absmax[a_lists].flatten()])
        w_size = torch.cat([w_size, a_bytes.repeat(len(a_lists))])
    w_start, w_size = w_start[w_size > 0], w_size[w_size > 0]
    order = torch.argsort(w_start)
    layout = _Layout(offset, launches, torch.cat(owners), torch.cat(starts) * elem_size,
                     nbytes[1], data[1] % 16 == 0, w_start[order], (w_start + w_size)[order],
                     width, state_dtype)
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
    host[:lay.steps_offset].view(-1, lay.width)[:, _G.value] = g[lay.owner] + lay.grad_offset
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


def _check_sr(dtype, state_dtype, sr_seed, param_sr, quant=False):
    """The stochastic-rounding options against the dtypes (csrc/ademamix_ops.cpp's checks);
    quant: some states are 8-bit (written with SR)."""
    if param_sr and dtype != torch.bfloat16:
        raise ValueError(f"ademamix_triton: param_sr (stochastic rounding of the params) needs "
                         f"bfloat16 params, got {dtype}")
    if state_dtype == torch.bfloat16 or param_sr or quant:
        if sr_seed is None:
            raise ValueError("ademamix_triton: sr_seed is required with bfloat16 or 8-bit states "
                             "or param_sr (it keys the random bits of the stochastic rounding)")
        if not 0 <= sr_seed < 2**63:
            raise ValueError(f"ademamix_triton: sr_seed must be in [0, 2**63), got {sr_seed}")


def _launch(plan, n, dtype, state_dtype, lr, lr_tensor, beta1, beta2, beta3, alpha, beta3_warmup,
            alpha_warmup, eps, weight_decay, maximize, grad_scale, found_inf, sr_seed, param_sr):
    """Enqueues the step of the n tensors of `plan` (params of `dtype`, states of `state_dtype`)
    on the current stream."""
    quant = plan.layout.width == _QROW.value
    _check_sr(dtype, state_dtype, sr_seed, param_sr, quant)
    has_m1 = beta1 != 0.0
    bf16_states = state_dtype == torch.bfloat16
    # The seed's words as int32 bit patterns: a kernel int's type (i32, i64) follows its value.
    seed = sr_seed or 0
    seed_lo, seed_hi = ((seed & 0xFFFFFFFF) ^ 2**31) - 2**31, seed >> 32
    any_ptr = plan.table  # stands in for absent optional tensors; never read
    _increment_steps_kernel[(triton.cdiv(n, _STEP_BLOCK),)](
        plan.step_addrs, n, found_inf if found_inf is not None else any_ptr,
        HAS_FOUND_INF=found_inf is not None, BLOCK=_STEP_BLOCK)
    # Constants in double, rounded once to fp32 (1 - 0.9999 in fp32 would be 3e-4 off).
    kernel = _ademamix_8bit_kernel if quant else _ademamix_kernel
    block = SR_BLOCK_SIZE if bf16_states or param_sr else BLOCK_SIZE
    extra = {}
    if quant:
        if QUANT_BLOCK_SIZE % _QBLOCK.value or QUANT_BLOCK_SIZE & (QUANT_BLOCK_SIZE - 1):
            raise ValueError(f"ademamix_triton: QUANT_BLOCK_SIZE must be a power of two and a "
                             f"multiple of {_QBLOCK.value}, got {QUANT_BLOCK_SIZE}")
        # Its float rows (small tensors, typically) in SR_BLOCK_SIZE blocks: with BLOCK_SIZE,
        # bf16 params next to the 8-bit branch spilled (triton 3.8, sm_90, 80 registers).
        block, extra = SR_BLOCK_SIZE, dict(QTILE=QUANT_BLOCK_SIZE)
    for rows, n_chunks, aligned in plan.launches:
        kernel[(n_chunks,)](
            rows, float(lr), lr_tensor if lr_tensor is not None else any_ptr,
            grad_scale if grad_scale is not None else any_ptr,
            found_inf if found_inf is not None else any_ptr,
            beta1, 1.0 - beta1, math.log(beta1) if has_m1 else 0.0,
            beta2, 1.0 - beta2, math.log(beta2) if beta2 > 0.0 else -math.inf,
            beta3, 1.0 - beta3, _half_life(beta1), _half_life(beta3), math.log(0.5),
            float(alpha), float(beta3_warmup or 0), float(alpha_warmup or 0), float(eps),
            float(weight_decay), seed_lo, seed_hi,
            P_DTYPE=_PARAM_DTYPES[dtype], HAS_M1=has_m1, MAXIMIZE=bool(maximize),
            LR_IS_TENSOR=lr_tensor is not None, HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None, BF16_STATES=bf16_states, PARAM_SR=bool(param_sr),
            ALIGNED=aligned, BLOCK=block, **extra,
            **_update_options(MIN_PROGRAMS_PER_SM_QUANT if quant else MIN_PROGRAMS_PER_SM))


def _run(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, lr_tensor,
         beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
         grad_scale, found_inf, sr_seed, param_sr, exp_avg_fast_absmaxs=None,
         exp_avg_slow_absmaxs=None, exp_avg_sq_absmaxs=None):
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
    absmaxs = _absmax_lists(n, has_m1, exp_avg_fast_absmaxs, exp_avg_slow_absmaxs,
                            exp_avg_sq_absmaxs)
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
                     device, absmaxs)
        _launch(plan, n, params[0].dtype, plan.layout.state_dtype, lr, lr_tensor, beta1, beta2,
                beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize, grad_scale,
                found_inf, sr_seed, param_sr)
    return plan


def _absmax_lists(n, has_m1, m1_absmaxs, m2_absmaxs, nu_absmaxs):
    """The call's absmax lists (exp_avg_fast_absmaxs empty without m1), or None when it has none
    (no 8-bit states)."""
    lists = [list(xs) if xs is not None else [] for xs in (m1_absmaxs, m2_absmaxs, nu_absmaxs)]
    if not any(lists):
        return None
    wants = (n if has_m1 else 0, n, n)
    for name, xs, want in zip(_ABSMAX_NAMES, lists, wants):
        if len(xs) != want:
            raise ValueError(
                f"ademamix_triton: {len(xs)} {name} for {n} params "
                f"{'with m1' if has_m1 else 'without m1 (beta1 == 0)'}: the absmax lists are all "
                f"empty (no 8-bit states) or hold one entry per param (exp_avg_fast_absmaxs: "
                f"none without m1)")
    return lists


def _step_impl(params: List[torch.Tensor], grads: List[torch.Tensor],
               exp_avg_fasts: List[torch.Tensor], exp_avg_slows: List[torch.Tensor],
               exp_avg_sqs: List[torch.Tensor], state_steps: List[torch.Tensor], lr: float,
               lr_tensor: Optional[torch.Tensor], beta1: float, beta2: float, beta3: float,
               alpha: float, beta3_warmup: Optional[int], alpha_warmup: Optional[int], eps: float,
               weight_decay: float, maximize: bool, grad_scale: Optional[torch.Tensor],
               found_inf: Optional[torch.Tensor], sr_seed: Optional[int] = None,
               param_sr: bool = False, exp_avg_fast_absmaxs=None, exp_avg_slow_absmaxs=None,
               exp_avg_sq_absmaxs=None) -> None:
    """The op's body. lr_tensor, when given, replaces lr (custom ops have no overloads)."""
    _run(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, lr_tensor,
         beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
         grad_scale, found_inf, sr_seed, param_sr, exp_avg_fast_absmaxs, exp_avg_slow_absmaxs,
         exp_avg_sq_absmaxs)


# What torch.compile, export and dispatch modes see: one opaque node that mutates its lists. The
# schema is spelled out: inference has no optional tensor lists (the absmax lists of 8-bit
# states; None or empty: no 8-bit states).
_STEP_SCHEMA = (
    "(Tensor(a0!)[] params, Tensor[] grads, Tensor(a2!)[] exp_avg_fasts, "
    "Tensor(a3!)[] exp_avg_slows, Tensor(a4!)[] exp_avg_sqs, Tensor(a5!)[] state_steps, "
    "float lr, Tensor? lr_tensor, float beta1, float beta2, float beta3, float alpha, "
    "SymInt? beta3_warmup, SymInt? alpha_warmup, float eps, float weight_decay, bool maximize, "
    "Tensor? grad_scale, Tensor? found_inf, SymInt? sr_seed=None, bool param_sr=False, "
    "Tensor(a21!)[]? exp_avg_fast_absmaxs=None, Tensor(a22!)[]? exp_avg_slow_absmaxs=None, "
    "Tensor(a23!)[]? exp_avg_sq_absmaxs=None) -> ()")
_step_op = torch.library.custom_op(
    "ademamix_triton::step_", _step_impl,
    mutates_args=("params", "exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs", "state_steps",
                  "exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs"),
    schema=_STEP_SCHEMA)


@_step_op.register_fake
def _step_op_fake(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr,
                  lr_tensor, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
                  weight_decay, maximize, grad_scale, found_inf, sr_seed=None, param_sr=False,
                  exp_avg_fast_absmaxs=None, exp_avg_slow_absmaxs=None, exp_avg_sq_absmaxs=None):
    return None


def _op_args(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr, beta1,
             beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize,
             grad_scale, found_inf, sr_seed, param_sr, exp_avg_fast_absmaxs=None,
             exp_avg_slow_absmaxs=None, exp_avg_sq_absmaxs=None):
    """The op's arguments, normalized, from the functional signature (absmax lists: None when
    all are empty)."""
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    absmaxs = [list(xs) if xs is not None else [] for xs in (exp_avg_fast_absmaxs,
                                                            exp_avg_slow_absmaxs,
                                                            exp_avg_sq_absmaxs)]
    absmaxs = absmaxs if any(absmaxs) else [None, None, None]
    return (list(params), list(grads), list(exp_avg_fasts or ()), list(exp_avg_slows),
            list(exp_avg_sqs), list(state_steps), 0.0 if lr_tensor is not None else float(lr),
            lr_tensor, float(beta1), float(beta2), float(beta3), float(alpha),
            None if beta3_warmup is None else int(beta3_warmup),
            None if alpha_warmup is None else int(alpha_warmup), float(eps), float(weight_decay),
            bool(maximize), grad_scale, found_inf, None if sr_seed is None else int(sr_seed),
            bool(param_sr), *absmaxs)


def _traced():
    """Under torch.compile or a dispatch mode, the step must be the op (one opaque node)."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def _bump_versions(args):
    # What the op wrapper would do per tensor (for autograd's in-place checks), in one call.
    torch.autograd.graph.increment_version(list(chain(args[0], args[2], args[3], args[4],
                                                      args[5], *(xs or () for xs in args[21:]))))


def ademamix_step_(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, *, lr,
                   beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                   maximize, grad_scale=None, found_inf=None, sr_seed=None, param_sr=False,
                   exp_avg_fast_absmaxs=None, exp_avg_slow_absmaxs=None, exp_avg_sq_absmaxs=None):
    """One AdEMAMix step over all tensors, in place, in one launch (two with misaligned views).

    Tensor lists in the order params, grads, exp_avg_fasts (empty when beta1 == 0),
    exp_avg_slows, exp_avg_sqs, state_steps, all contiguous on one device (CUDA, or CPU under
    TRITON_INTERPRET=1). params/grads: one of float32, bfloat16, float16; states all float32 or
    all bfloat16 (written with stochastic rounding); state_steps one-element float32 tensors,
    incremented here unless found_inf is nonzero. lr: float or one-element tensor on the device;
    the grads are multiplied by 1/grad_scale; found_inf nonzero skips the step entirely.
    sr_seed (an int in [0, 2**63)) keys the random bits of stochastic rounding: required with
    bfloat16 states or param_sr (bfloat16 params written with stochastic rounding too). Nothing
    is synchronized with the host.

    8-bit states (ademamix_cuda/quant.py): a param whose exp_avg_slows entry is uint8 has uint8
    codes of its shape as m1 (if any), m2 and nu, with one float32 absmax per 256 elements each
    (contiguous, shape (ceil(numel / 256),)) in exp_avg_fast_absmaxs (with m1),
    exp_avg_slow_absmaxs and exp_avg_sq_absmaxs: one entry per param, empty (0 elements) for the
    params with float states, which are then all of one dtype (float32 or bfloat16). None or empty
    lists: no 8-bit states. Codes are rounded to nearest (no random bits), in the same launch as
    the float states.
    """
    args = _op_args(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr,
                    beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay,
                    maximize, grad_scale, found_inf, sr_seed, param_sr, exp_avg_fast_absmaxs,
                    exp_avg_slow_absmaxs, exp_avg_sq_absmaxs)
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

    def __init__(self, params, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps,
                 exp_avg_fast_absmaxs=None, exp_avg_slow_absmaxs=None, exp_avg_sq_absmaxs=None):
        self._lists = (list(params), list(exp_avg_fasts or ()), list(exp_avg_slows),
                       list(exp_avg_sqs), list(state_steps))
        self._absmaxs = (exp_avg_fast_absmaxs, exp_avg_slow_absmaxs, exp_avg_sq_absmaxs)
        self._params_key = None  # the params' addresses and sizes the plan was checked with
        self._grad_ptrs = None
        self._plan = None

    def step(self, grads, *, lr, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
             weight_decay, maximize, grad_scale=None, found_inf=None, sr_seed=None,
             param_sr=False):
        params, m1s, m2s, nus, steps = self._lists
        args = _op_args(params, grads, m1s, m2s, nus, steps, lr, beta1, beta2, beta3, alpha,
                        beta3_warmup, alpha_warmup, eps, weight_decay, maximize, grad_scale,
                        found_inf, sr_seed, param_sr, *self._absmaxs)
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
            _launch(plan, len(params), params[0].dtype, plan.layout.state_dtype, *args[6:21])
        return plan

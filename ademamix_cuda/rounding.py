"""Stochastic rounding fp32 -> bf16 and its random bits, in torch ops.

This mirrors csrc/ademamix.h (mix32, sr_keys, sr_bits, round_bf16_sr) bit for bit, so that the
torch paths ("foreach", "single") and the tests draw the same random bits as the kernels. The
bits are a counter-based hash of (seed, tensor index in the call, step, element index): no
thread, block or launch geometry enters. uint32 arithmetic runs in int64 tensors (or Python
ints, for the keys): both multipliers are below 2**31, so `(x * C) & MASK32` with x < 2**32
never overflows int64.

The element index is an element's offset in its tensor's memory: for a contiguous tensor its
flat (row-major) index; for a dense tensor with another layout (channels_last, a transpose) the
order the kernels walk it in. A tensor with gaps (which the kernels reject) falls back to the
row-major index.
"""
import torch
from torch import Tensor

__all__ = ["MASK32", "SEED_LIMIT", "WRITES", "bits_of", "check_seed", "derive_seed", "mix32",
           "random_words", "round_bf16_sr", "sr_to_bf16", "sub_call_seed"]

MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**63  # seeds are ints in [0, 2**63): they fit the op schema's int64
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads small indices over the seed space

# Which 16 bits of an element's two random words (r0, r1) each write takes: (word, shift).
WRITES = {"exp_avg_fast": (0, 0), "exp_avg_slow": (0, 16), "exp_avg_sq": (1, 0), "param": (1, 16)}


def mix32(x):
    """The bijective 32-bit hash of csrc/ademamix.h, on an int64 tensor of values < 2**32 (or on
    a Python int: the same operations, used for the per-tensor keys)."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & MASK32
    return x ^ (x >> 15)


def check_seed(seed) -> None:
    """Raises ValueError unless seed is None or an int in [0, 2**63)."""
    if seed is not None:
        _check_uint("sr_seed", seed, SEED_LIMIT)


def derive_seed(seed: int, k: int) -> int:
    """The k-th seed derived from `seed` (k = 0 gives seed itself): param group k's, or a
    dtype sub-call's."""
    return (seed ^ (k * _GOLDEN)) % SEED_LIMIT


def _check_uint(name, value, bound):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < bound:
        raise ValueError(f"{name} must be an int in [0, 2**{bound.bit_length() - 1}), got {value!r}")


def random_words(seed: int, tensor_index: int, step: int, numel: int,
                 device: str | torch.device = "cpu") -> tuple[Tensor, Tensor]:
    """(r0, r1): int64 tensors of `numel` uint32 words, element e of a tensor taking element e
    of both. `step` is the step being taken (the new step count)."""
    e = torch.arange(numel, dtype=torch.int64, device=device)
    return _words_at(seed, tensor_index, step, e, wide=numel > 2**32)


def _words_at(seed, tensor_index, step, e, *, wide):
    """random_words of the elements at indices e; `wide`: some index is 2**32 or more."""
    _check_uint("sr_seed", seed, SEED_LIMIT)
    _check_uint("tensor_index", tensor_index, 2**32)
    _check_uint("step", step, 2**32)
    tensor_key = mix32((seed >> 32) ^ mix32((seed & MASK32) ^ mix32(tensor_index ^ 0x9E3779B9)))
    step_key = mix32(tensor_key ^ mix32(step))
    # The keys depend on the high word of the index only: one Python int below 2**32 elements.
    e_hi, e_lo = (e >> 32, e & MASK32) if wide else (0, e)
    k0 = mix32(step_key ^ mix32(e_hi))
    k1 = mix32(k0 ^ 0x85EBCA6B)
    return mix32(e_lo ^ k0), mix32(e_lo ^ k1)


def _dense(t: Tensor) -> bool:
    """No gaps and no overlaps: the strides, sorted, are those of a contiguous tensor."""
    if t.is_contiguous() or t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for st, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def bits_of(words: tuple[Tensor, Tensor], which: str, like: Tensor) -> Tensor:
    """The 16 random bits of write `which` (a key of WRITES) for every element of `like`, as an
    int64 tensor of like's shape: `words` are random_words of like's numel, taken in like's
    memory order."""
    word, shift = WRITES[which]
    r = words[word] >> shift
    if _dense(like):
        # Element e of memory sits at like's strides from the start, so r viewed with them
        # puts r[e] at that element's logical position.
        return r.as_strided(like.shape, like.stride())
    return r.view(like.shape)


def round_bf16_sr(x: Tensor, r: Tensor) -> Tensor:
    """float32 x -> bfloat16, rounded up with probability equal to the dropped fraction, using
    the low 16 bits of the int64 r (shape of x; callers shift). NaN stays NaN (quiet bit set),
    +-Inf stays +-Inf."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_bf16_sr takes float32 values, got {x.dtype}")
    b = x.view(torch.int32).to(torch.int64) & MASK32
    # A finite b is at most 0xFF7FFFFF, so b + r never wraps; a carry into the exponent is a
    # correct round up (to the next binade, or to Inf past the largest bf16).
    rounded = (b + (r & 0xFFFF)) >> 16
    # Non-finite values are kept: a NaN's payload plus r could carry into the sign
    # (0x7FFFFFFF + 0xFFFF -> -0.0), and a truncated NaN could read as an Inf.
    quiet = ((b & 0x007FFFFF) != 0).to(torch.int64) << 6  # 0x0040 for a NaN
    kept = (b >> 16) | quiet
    out = torch.where((b & 0x7F800000) != 0x7F800000, rounded, kept)
    # [0, 2**16) -> the int16 of the same bits (two's complement), then read as bf16
    return ((out ^ 0x8000) - 0x8000).to(torch.int16).view(torch.bfloat16)


def sr_to_bf16(x: Tensor, seed: int, tensor_index: int, step: int, which: str) -> Tensor:
    """x (any float tensor, converted to float32) rounded to bfloat16 as the kernels write
    `which` ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq" or "param") of tensor `tensor_index`
    of a call at step `step`; bf16 of x's shape."""
    x = x.to(torch.float32)
    words = random_words(seed, tensor_index, step, x.numel(), x.device)
    return round_bf16_sr(x, bits_of(words, which, x))


def sub_call_seed(seed: int, first_index: int) -> int:
    """The seed of one dtype's sub-call when a call with several param dtypes is split: keyed by
    the smallest index of the call's lists it holds, so sub-calls draw unrelated bits even
    though their tensor indices all restart at 0."""
    return derive_seed(seed, first_index + 1)

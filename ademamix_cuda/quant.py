"""8-bit blockwise states: the code maps, quantization and dequantization in torch ops.

A state tensor of 8-bit codes (uint8, its param's shape) comes with one fp32 absmax per block of
BLOCK consecutive elements (in memory order; the last block may be shorter). An element's value
is absmax[block] * value(code). m1 and m2 use the signed map, nu the unsigned one.

The maps are float grids with four mantissa bits: every nonzero magnitude is (1 + j/16) * 2**e,
so a code's value, and the code nearest a value, come from integer operations on the fp32 bits
(no table, no search), exactly alike in every backend; a block's largest element is stored
exactly (code value 1.0).
- signed (m1, m2): bit 7 is the sign, bits 0-6 the magnitude: 0, then 127 values from 0.0044
  (2**-7.8) up to 1.0, 16 per octave. Zero has the one code 0.
- unsigned (nu): 0, then 255 values from 1.7e-5 (2**-15.8) up to 1.0, below the square of the
  signed map's reach (nu is a mean of squares).
Spacing is 1/32 to 1/16 of a value.

Every write rounds stochastically (SR), with the random bits of bf16 states (ademamix_cuda.rounding:
the same 16 bits per state and element in every backend): up to the next code with probability
equal to the value's fraction of the spacing, so a write is unbiased and errs by less than one
spacing. Below the signed map's smallest magnitude an m rounds to 0 or the smallest; a nonzero nu
always takes at least the smallest (a nu read back as 0 under a nonzero m would step the element
by m / eps; rounding such a nu up only shortens its step). SR was chosen over rounding to nearest,
and four mantissa bits over three, from bench/state_precision.py's measurements (bench/NOTES.md,
"8-bit states"): nearest leaves each element's error fixed where the first write put it (the
later increments are too small to move a code) and drifted twice as far from the fp32-state run.
Each block's absmax is the largest magnitude of its new values, NaN propagating (the whole block
then reads back NaN); an all-zero block has absmax 0 and codes 0.

csrc/ademamix.h and triton_kernels/ademamix.py implement the same functions; these are the torch
paths' and the tests'.
"""
import torch
from torch import Tensor

__all__ = ["BLOCK", "MIN_8BIT_SIZE", "n_blocks", "code_map", "codes_of",
           "values_of", "quantize_blockwise", "dequantize_blockwise", "check_absmax"]

BLOCK = 256  # elements per absmax
MIN_8BIT_SIZE = 4096  # tensors with fewer elements keep unquantized states (bitsandbytes' default)
MANTISSA_BITS = 4
_SHIFT = 23 - MANTISSA_BITS  # fp32 mantissa bits dropped
_ONE = 127 << MANTISSA_BITS  # the bits of 1.0 >> _SHIFT
SIGNED_TOP, UNSIGNED_TOP = 127, 255  # the magnitude codes of 1.0


def n_blocks(numel: int) -> int:
    return (numel + BLOCK - 1) // BLOCK


def _magnitude(k: Tensor, top: int) -> Tensor:
    """The value of magnitude code k (int64 tensor, 0 <= k <= top)."""
    bits = ((k + (_ONE - top)) << _SHIFT).to(torch.int32).view(torch.float32)
    return torch.where(k == 0, torch.zeros_like(bits), bits)


def _magnitude_code(x: Tensor, top: int, r: Tensor) -> Tensor:
    """The magnitude code (int64) of fp32 x in [0, 1] rounded stochastically with the 16 random
    bits of int64 r: within the grid, r << 3 added below the 19 mantissa bits a code drops; below
    the smallest magnitude, up with probability x / smallest (the unsigned map: every x > 0 gets
    code 1). 0 and NaN give 0."""
    r = r & 0xFFFF
    grid = ((x.view(torch.int32).to(torch.int64) + (r << 3)) >> _SHIFT) - (_ONE - top)
    smallest = _magnitude(torch.ones((), dtype=torch.int64), top).item()
    if top == UNSIGNED_TOP:
        below = torch.ones_like(grid)
    else:
        below = (r.to(torch.float32) < (x / smallest) * 65536.0).to(torch.int64)
    zero = torch.zeros_like(grid)
    return torch.where(x >= smallest, grid, torch.where(x > 0, below, zero))


def code_map(signed: bool, device="cpu") -> Tensor:
    """The 256 fp32 values of the codes."""
    k = torch.arange(256, dtype=torch.int64, device=device)
    if signed:
        mag = _magnitude(k & 127, SIGNED_TOP)
        return torch.where(k >= 128, -mag, mag)
    return _magnitude(k, UNSIGNED_TOP)


def codes_of(values: Tensor, absmax: Tensor, signed: bool, random: Tensor) -> Tensor:
    """fp32 values (n_blocks x BLOCK) over their blocks' absmax (n_blocks), rounded
    stochastically with the low 16 bits of the int64 `random` (values' shape): uint8 codes."""
    x = values / absmax[:, None]  # |x| <= 1; NaN where absmax is 0 or NaN: code 0
    if signed:
        mag = _magnitude_code(x.abs(), SIGNED_TOP, random)
        negative = (x < 0) & (mag != 0)  # zero has one code: 0
        return (mag | (negative.to(torch.int64) << 7)).to(torch.uint8)
    return _magnitude_code(x, UNSIGNED_TOP, random).to(torch.uint8)


def values_of(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """uint8 codes (n_blocks x BLOCK) -> fp32 values."""
    return code_map(signed, codes.device)[codes.long()] * absmax[:, None]


def _blocks(flat: Tensor) -> Tensor:
    pad = (-flat.numel()) % BLOCK
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, BLOCK)


def quantize_blockwise(x: Tensor, signed: bool, random: Tensor) -> tuple[Tensor, Tensor]:
    """A float tensor -> (uint8 codes of x's shape, contiguous; fp32 absmax of n_blocks(numel)),
    x taken in row-major order (8-bit states are contiguous), rounded with the 16 random bits of
    `random` (int64, x's shape; rounding.bits_of gives the kernels' bits)."""
    blocks = _blocks(x.detach().to(torch.float32).reshape(-1))
    absmax = blocks.abs().amax(dim=1)
    codes = codes_of(blocks, absmax, signed, _blocks(random.reshape(-1)))
    return codes.reshape(-1)[:x.numel()].view(x.shape), absmax


def check_absmax(codes: Tensor, absmax: Tensor, what: str = "an 8-bit state") -> None:
    """Raises unless codes (uint8) and absmax (fp32, one per block) fit each other."""
    if codes.dtype != torch.uint8:
        raise TypeError(f"{what}: codes must be uint8, got {codes.dtype}")
    want = (n_blocks(codes.numel()),)
    if absmax.dtype != torch.float32 or tuple(absmax.shape) != want:
        raise ValueError(f"{what}: {codes.numel()} codes need a float32 absmax of shape "
                         f"{list(want)} (one per {BLOCK} elements), got {absmax.dtype}"
                         f"{list(absmax.shape)}")


def dequantize_blockwise(codes: Tensor, absmax: Tensor, signed: bool) -> Tensor:
    """The inverse of quantize_blockwise: fp32 of codes' shape."""
    check_absmax(codes, absmax)
    out = values_of(_blocks(codes.reshape(-1)), absmax, signed)
    return out.reshape(-1)[:codes.numel()].view(codes.shape)

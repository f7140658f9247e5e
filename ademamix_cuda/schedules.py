"""The AdEMAMix schedules and bias corrections, as plain functions of the step count.

`t` is the step count after the increment: the first step has t = 1. Everything is computed in
Python floats (double precision); the kernels recompute the same quantities on the device.
"""
import math

LN_HALF = math.log(0.5)


def half_life(beta: float) -> float:
    """f(beta) = ln(0.5) / ln(beta + 1e-8) - 1: the half-life of an EMA in steps, minus one.

    The 1e-8 keeps beta = 0 legal (the beta3 warm-up starts from beta1, which may be 0).
    """
    return LN_HALF / math.log(beta + 1e-8) - 1.0


def alpha_at(t: float, alpha: float, warmup: int | None) -> float:
    """alpha grows linearly from 0 to `alpha` over `warmup` steps."""
    if warmup is not None and t < warmup:
        return alpha * t / warmup
    return alpha


def beta3_at(t: float, beta1: float, beta3: float, warmup: int | None) -> float:
    """beta3 grows from beta1 to beta3 over `warmup` steps, linearly in half-life."""
    if warmup is not None and t < warmup:
        a = t / warmup
        x = (1.0 - a) * half_life(beta1) + a * half_life(beta3)
        return 0.5 ** (1.0 / (x + 1.0))
    return beta3


def bias_corrections(t: float, beta1: float, beta2: float) -> tuple[float, float]:
    """(1 - beta1**t, 1 - beta2**t)."""
    return 1.0 - beta1**t, 1.0 - beta2**t

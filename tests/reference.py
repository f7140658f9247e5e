"""A float64 reference of AdEMAMix, written from SPEC.md for the tests.

It is independent of the package code: every backend is compared against it. Two layers:

- `reference_step`: one step for one tensor, from any-dtype inputs, returning float64 results. The
  teacher-forced tests (bf16/fp16 params) call it directly on the backend's current tensors.
- `ReferenceAdEMAMix`: a torch.optim.Optimizer with the interface and state layout of the paper
  authors' PyTorch class (constructor arguments, param_group keys, state['step'] a Python int,
  'exp_avg_fast' None when beta1 == 0, states `zeros_like(p)`), so its state_dict stands in for the
  authors' class in the compatibility tests. It computes in float64 whatever p's dtype and writes
  back with `Tensor.copy_` (round to nearest even).
"""
import math

import torch

__all__ = ["alpha_at", "beta3_at", "reference_step", "ReferenceAdEMAMix"]

_LN_HALF = math.log(0.5)


def _half_life(beta):
    # f(b) = ln(0.5) / ln(b + 1e-8) - 1; the +1e-8 keeps beta1 == 0 legal as the schedule's start
    return _LN_HALF / math.log(beta + 1e-8) - 1.0


def _half_life_inv(x):
    # f_inv(x) = 0.5 ** (1 / (x + 1))
    return 0.5 ** (1.0 / (x + 1.0))


def alpha_at(t, alpha, alpha_warmup):
    """alpha_t for the step with counter t (t = 1 on the first step)."""
    if alpha_warmup is not None and t < alpha_warmup:
        return alpha * t / alpha_warmup
    return alpha


def beta3_at(t, beta1, beta3, beta3_warmup):
    """beta3_t: linear in half-life from beta1 (t = 0) to beta3 (t = beta3_warmup)."""
    if beta3_warmup is not None and t < beta3_warmup:
        a = t / beta3_warmup
        return _half_life_inv((1.0 - a) * _half_life(beta1) + a * _half_life(beta3))
    return beta3


def _as_float(x):
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


@torch.no_grad()
def reference_step(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, step, *, lr, beta1, beta2,
                   beta3, alpha, beta3_warmup, alpha_warmup, eps, weight_decay, maximize=False,
                   grad_scale=None):
    """One AdEMAMix step in float64.

    `step` is the count BEFORE this step (int or 0-d tensor); the step uses t = step + 1.
    `exp_avg_fast` must be None when beta1 == 0. Inputs (any device) are not modified.
    Returns (param, exp_avg_fast or None, exp_avg_slow, exp_avg_sq) as new float64 CPU tensors, and t.
    """
    t = int(_as_float(step)) + 1
    lr = _as_float(lr)
    p = param.detach().to("cpu", torch.float64)
    g = grad.detach().to("cpu", torch.float64)
    if grad_scale is not None:
        g = g / _as_float(grad_scale)
    if maximize:
        g = -g
    alpha_t = alpha_at(t, alpha, alpha_warmup)
    beta3_t = beta3_at(t, beta1, beta3, beta3_warmup)
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t

    if beta1 != 0.0:
        if exp_avg_fast is None:
            raise ValueError("reference_step: exp_avg_fast is required when beta1 != 0")
        m1 = beta1 * exp_avg_fast.detach().to("cpu", torch.float64) + (1.0 - beta1) * g
    else:
        if exp_avg_fast is not None:
            raise ValueError("reference_step: exp_avg_fast must be None when beta1 == 0")
        m1 = g
    m2 = beta3_t * exp_avg_slow.detach().to("cpu", torch.float64) + (1.0 - beta3_t) * g
    nu = beta2 * exp_avg_sq.detach().to("cpu", torch.float64) + (1.0 - beta2) * g * g

    denom = nu.sqrt() / math.sqrt(bc2) + eps
    update = (m1 / bc1 + alpha_t * m2) / denom + weight_decay * p
    p_new = p - lr * update
    return p_new, (m1 if beta1 != 0.0 else None), m2, nu, t


class ReferenceAdEMAMix(torch.optim.Optimizer):
    """float64 AdEMAMix with the authors' class interface and state layout (see module docstring)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0, maximize=False):
        if not 0.0 <= _as_float(lr):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not 0.0 <= alpha:
            raise ValueError(f"Invalid alpha value: {alpha}")
        # Exactly the authors' param_group keys, so state_dict() looks like theirs; 'maximize' is an
        # extension for parity configs and only appears when asked for.
        defaults = dict(lr=lr, betas=betas, eps=eps, alpha=alpha, beta3_warmup=beta3_warmup,
                        alpha_warmup=alpha_warmup, weight_decay=weight_decay)
        if maximize:
            defaults["maximize"] = True
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2, beta3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdEMAMix does not support sparse gradients.")
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg_fast"] = (torch.zeros_like(p, memory_format=torch.preserve_format)
                                             if beta1 != 0.0 else None)
                    state["exp_avg_slow"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                p_new, m1, m2, nu, t = reference_step(
                    p, p.grad, state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"],
                    state["step"], lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3,
                    alpha=group["alpha"], beta3_warmup=group["beta3_warmup"],
                    alpha_warmup=group["alpha_warmup"], eps=group["eps"],
                    weight_decay=group["weight_decay"], maximize=group.get("maximize", False))
                # a loaded state may carry a 0-d tensor step: store the authors' Python int
                state["step"] = t
                if m1 is not None:
                    state["exp_avg_fast"].copy_(m1)
                state["exp_avg_slow"].copy_(m2)
                state["exp_avg_sq"].copy_(nu)
                p.copy_(p_new)
        return loss

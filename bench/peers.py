"""The implementations the benchmark compares ours with.

Written here: an AdEMAMix in the authors' style (a Python for-loop of torch ops per tensor, states
in the param dtype, exactly the step of SPEC.md), the same step with torch._foreach ops, and that
foreach step under torch.compile. Imported when present: apex FusedAdam, bitsandbytes AdEMAMix
(32-bit and 8-bit states). torch.optim.AdamW (fused, foreach, for-loop) is the Adam yardstick.

Every factory takes (params, device) and returns a torch.optim.Optimizer whose `state[p]` holds
the state tensors, which the benchmark reads to count the bytes a step moves. A factory raises
Unavailable when the implementation cannot run here.
"""
import importlib
import math
import time

import torch
from torch.optim import Optimizer

LR = 1e-3
BETAS3 = (0.9, 0.999, 0.9999)
ALPHA = 2.0
EPS = 1e-8
# Non-zero, so no implementation gets to skip the decay term.
WEIGHT_DECAY = 0.01
HYPERPARAMETERS = dict(lr=LR, betas=BETAS3, alpha=ALPHA, eps=EPS, weight_decay=WEIGHT_DECAY)
MAX_GRAD_NORM = 1.0  # the clipping rows: the usual value in LLM training


class Unavailable(Exception):
    """The implementation cannot run here; the message says why ("not installed", ...)."""


def _import(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Unavailable("not installed") from None
    except Exception as e:  # a broken install (missing CUDA libs, ...) is as good as absent
        raise Unavailable(f"not importable: {type(e).__name__}: {e}") from None


def _need_cuda(device):
    if torch.device(device).type != "cuda":
        raise Unavailable("not available: CUDA only")


def importable(module):
    """None if `module` imports, else the reason it does not."""
    try:
        _import(module)
    except Unavailable as e:
        return str(e)
    return None


class _AdEMAMixBase(Optimizer):
    def __init__(self, params, lr=LR, betas=BETAS3, alpha=ALPHA, eps=EPS, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, eps=eps,
                                      weight_decay=weight_decay))

    def _init_state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg_fast"] = torch.zeros_like(p)
            state["exp_avg_slow"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state


class AuthorsStyleAdEMAMix(_AdEMAMixBase):
    """AdEMAMix as the authors' PyTorch class computes it: one tensor at a time, one torch op per
    term, states like p. No warm-ups (the benchmark uses none). The baseline of "x vs authors"."""

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, eps, alpha = group["lr"], group["weight_decay"], group["eps"], group["alpha"]
            beta1, beta2, beta3 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self._init_state(p)
                state["step"] += 1
                t = state["step"]
                bc1 = 1 - beta1**t
                bc2 = 1 - beta2**t
                m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
                m1.mul_(beta1).add_(g, alpha=1 - beta1)
                m2.mul_(beta3).add_(g, alpha=1 - beta3)
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (nu.sqrt() / math.sqrt(bc2)).add_(eps)
                update = (m1.div(bc1) + alpha * m2) / denom
                update.add_(p, alpha=wd)
                p.add_(-lr * update)


def _foreach_ademamix(params, grads, m1s, m2s, nus, steps, lr, beta1, beta2, beta3, alpha, eps,
                      weight_decay):
    """The step with torch._foreach ops over a group's tensors. Step counts are device tensors,
    so torch.compile sees no host values that change between steps (and compiles once)."""
    torch._foreach_add_(steps, 1)
    bc1 = torch._foreach_pow(beta1, steps)
    torch._foreach_neg_(bc1)
    torch._foreach_add_(bc1, 1)
    bc2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bc2_sqrt)
    torch._foreach_add_(bc2_sqrt, 1)
    torch._foreach_sqrt_(bc2_sqrt)
    torch._foreach_mul_(m1s, beta1)
    torch._foreach_add_(m1s, grads, alpha=1 - beta1)
    torch._foreach_mul_(m2s, beta3)
    torch._foreach_add_(m2s, grads, alpha=1 - beta3)
    torch._foreach_mul_(nus, beta2)
    torch._foreach_addcmul_(nus, grads, grads, value=1 - beta2)
    denom = torch._foreach_sqrt(nus)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(m1s, bc1)
    torch._foreach_add_(update, m2s, alpha=alpha)
    torch._foreach_div_(update, denom)
    torch._foreach_add_(update, params, alpha=weight_decay)
    torch._foreach_add_(params, update, alpha=-lr)


class ForeachAdEMAMix(_AdEMAMixBase):
    """AdEMAMix with torch._foreach ops over every tensor of a group at once (eager)."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self._step_fn = _foreach_ademamix

    def _init_state(self, p):
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg_fast"] = torch.zeros_like(p)
            state["exp_avg_slow"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            states = [self._init_state(p) for p in params]
            beta1, beta2, beta3 = group["betas"]
            self._step_fn(
                params, [p.grad for p in params], [s["exp_avg_fast"] for s in states],
                [s["exp_avg_slow"] for s in states], [s["exp_avg_sq"] for s in states],
                [s["step"] for s in states], group["lr"], beta1, beta2, beta3, group["alpha"],
                group["eps"], group["weight_decay"])


class CompiledForeachAdEMAMix(ForeachAdEMAMix):
    """The same foreach step compiled by torch.compile. The first step() compiles; its wall time
    is kept in `compile_seconds`."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        # A cold compile every time: dynamo's per-function cache (which would also count the
        # earlier sets against its recompile limit) is reset, and inductor's on-disk caches,
        # which would make a second run's compile time look short, are not used.
        import torch._dynamo
        import torch._inductor.config

        torch._dynamo.reset()
        try:
            torch._inductor.config.force_disable_caches = True
        except AttributeError:
            pass
        self._step_fn = torch.compile(_foreach_ademamix, fullgraph=True)
        self.compile_seconds = None

    @torch.no_grad()
    def step(self):
        first = self.compile_seconds is None
        t0 = time.perf_counter()
        super().step()
        if first:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.compile_seconds = time.perf_counter() - t0


def authors_style(params, device):
    return AuthorsStyleAdEMAMix(params, **HYPERPARAMETERS)


def foreach_ademamix(params, device):
    return ForeachAdEMAMix(params, **HYPERPARAMETERS)


def compiled_foreach_ademamix(params, device):
    return CompiledForeachAdEMAMix(params, **HYPERPARAMETERS)


def _adam_kwargs():
    return dict(lr=LR, betas=BETAS3[:2], eps=EPS, weight_decay=WEIGHT_DECAY)


def adamw_fused(params, device):
    return torch.optim.AdamW(params, fused=True, **_adam_kwargs())


def adamw_fused_capturable(params, device):
    _need_cuda(device)
    return torch.optim.AdamW(params, fused=True, capturable=True, **_adam_kwargs())


def adamw_foreach(params, device):
    return torch.optim.AdamW(params, foreach=True, **_adam_kwargs())


def adamw_for_loop(params, device):
    return torch.optim.AdamW(params, foreach=False, fused=False, **_adam_kwargs())


def apex_fused_adam(params, device):
    optimizers = _import("apex.optimizers")
    _need_cuda(device)
    return optimizers.FusedAdam(params, adam_w_mode=True, **_adam_kwargs())


def _bnb_ademamix(params, device, bits):
    bnb = _import("bitsandbytes")
    cls = getattr(bnb.optim, f"AdEMAMix{bits}bit", None)
    if cls is not None:
        return cls(params, **HYPERPARAMETERS)
    if not hasattr(bnb.optim, "AdEMAMix"):
        raise Unavailable(f"not available: bitsandbytes {getattr(bnb, '__version__', '?')} "
                          "has no AdEMAMix")
    return bnb.optim.AdEMAMix(params, optim_bits=bits, **HYPERPARAMETERS)


def bnb_ademamix_32bit(params, device):
    return _bnb_ademamix(params, device, 32)


def bnb_ademamix_8bit(params, device):
    return _bnb_ademamix(params, device, 8)

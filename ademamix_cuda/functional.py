"""The functional AdEMAMix step: one call updates many parameters in place.

`ademamix()` validates its arguments, then hands the tensor lists to one backend:

- "cuda":    the compiled op `torch.ops.ademamix.step_` (one pass over all tensors),
- "triton":  the Triton kernels in `ademamix_cuda.triton_kernels` (one pass over all tensors),
- "foreach": torch._foreach_* ops over the lists (several passes, any device),
- "single":  the same torch ops applied one tensor at a time (any device, the slowest).

Lists travel in the order params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps.
The kernel backends check the tensors themselves (in C++ or once per cached launch plan); the
torch paths are checked here.

States are float32, or bfloat16 (all three of a call: half the state memory). bf16 states, and
bf16 params with param_rounding="stochastic", are written back with stochastic rounding (SR):
16 random bits are added below the bits a bf16 keeps, so a value rounds up with probability equal
to the fraction dropped and the rounding is unbiased (a bf16 slow EMA rounded to nearest stalls:
0.9999 * m rounds back to m). The random bits are a hash of (sr_seed, the tensor's index in the
call's lists, the step being taken, the element's index in its tensor); no thread, block or
launch geometry enters, so every backend draws the same bits (ademamix_cuda.rounding, which
mirrors csrc/ademamix.h). The kernel backends compute the same fp32 operations and agree bit for
bit; the torch paths draw the same bits, but their fp32 arithmetic is torch's (other rounding of
intermediate results, step scalars in fp64), so they agree with the kernels within tolerance, and
bit for bit only where their fp32 values agree.
"""
import functools
import math
from collections.abc import Sequence
from types import SimpleNamespace

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, quant, rounding
from .clip import check_norm_type, clip_scale, grad_norm
from .dtensor import local_lists
from .overlap import check_disjoint
from .schedules import alpha_at, beta3_at, bias_corrections

__all__ = ["ademamix", "check_hyperparameters", "grad_norm"]

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def check_hyperparameters(*, lr, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
                          weight_decay):
    """Raises ValueError naming the first hyperparameter out of its domain."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr as a tensor must have one element, got shape {list(lr.shape)}")
        # A device lr is not read back here (that would synchronize with the device), nor a
        # traced one under torch.compile.
        if (lr.device.type == "cpu" and not torch.compiler.is_compiling()
                and not lr.item() >= 0.0):
            raise ValueError(f"Invalid learning rate: {lr.item()} (must be >= 0)")
    elif not lr >= 0.0:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    for i, beta in enumerate((beta1, beta2, beta3)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if not alpha >= 0.0:
        raise ValueError(f"Invalid alpha value: {alpha} (must be >= 0)")
    if not weight_decay >= 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    for name, warmup in (("beta3_warmup", beta3_warmup), ("alpha_warmup", alpha_warmup)):
        if warmup is not None and not warmup > 0:
            raise ValueError(f"Invalid {name}: {warmup} (must be a positive number of steps or None)")


def _check_tensors(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps):
    """Full per-tensor checks for the torch paths (the kernels make the same checks natively)."""
    device = params[0].device
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.is_complex():
            raise TypeError(f"AdEMAMix does not support complex parameters (param {i} is {p.dtype})")
        if g.is_sparse:
            raise RuntimeError(f"AdEMAMix does not support sparse gradients (grad {i})")
        if p.device != device or g.device != device:
            raise RuntimeError(
                f"all params and grads of one call must be on one device: param 0 is on {device}, "
                f"param {i} on {p.device}, grad {i} on {g.device}")
        if g.shape != p.shape or g.dtype != p.dtype:
            raise RuntimeError(
                f"grad {i} must match its param: grad is {g.dtype}{list(g.shape)}, "
                f"param is {p.dtype}{list(p.shape)}")
        for name, states in (("exp_avg_fast", exp_avg_fasts), ("exp_avg_slow", exp_avg_slows),
                             ("exp_avg_sq", exp_avg_sqs)):
            if states and (states[i].shape != p.shape or states[i].device != device):
                raise RuntimeError(
                    f"{name} {i} must have its param's shape and device: it is {list(states[i].shape)} "
                    f"on {states[i].device}, the param is {list(p.shape)} on {device}")
        if state_steps[i].numel() != 1:
            raise RuntimeError(f"state_steps[{i}] must hold one number, got shape {list(state_steps[i].shape)}")


def ademamix(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avg_fasts: Sequence[Tensor | None] | None,
    exp_avg_slows: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    state_steps: Sequence[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    beta3: float,
    alpha: float,
    beta3_warmup: int | None,
    alpha_warmup: int | None,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    max_grad_norm: float | None = None,
    norm_type: float = 2.0,
    total_norm: Tensor | None = None,
    backend: str = "auto",
    sr_seed: int | None = None,
    param_rounding: str = "nearest",
    exp_avg_fast_absmaxs: Sequence[Tensor | None] | None = None,
    exp_avg_slow_absmaxs: Sequence[Tensor | None] | None = None,
    exp_avg_sq_absmaxs: Sequence[Tensor | None] | None = None,
) -> Tensor | None:
    """One AdEMAMix step, in place, for every (param, grad, states, step) of the lists.

    `state_steps` are 0-d float32 tensors counting the steps taken; each is incremented before it
    is used (the first step has t = 1), unless `found_inf` is nonzero, which skips the whole step.
    When beta1 == 0, `exp_avg_fasts` is None (or a list of None): no fast EMA exists.
    `grad_scale` divides every gradient (GradScaler's unscale, fused into the step).

    `max_grad_norm` clips the gradients as torch.nn.utils.clip_grad_norm_ would, inside the step
    (the grads in memory are left as they are): by the total `norm_type` norm of this call's grads
    (taken in one read of them; see grad_norm), or by `total_norm` when given (e.g. grad_norm over
    the grads of several calls). With a grad_scale, the norm is that of the unscaled grads.
    Returns the total norm of the grads as they are in memory when clipping, else None.

    The states of one call are all float32 or all bfloat16 (then the params must be float32,
    bfloat16 or float16). bf16 states are written with stochastic rounding (see the module doc),
    and so are bf16 params when `param_rounding` is "stochastic" ("nearest", the default, rounds
    them to nearest even). `sr_seed`, an int in [0, 2**63), keys the random bits, which also
    depend on the tensor's index in the lists, the step and the element's index (never on how a
    backend splits the work): the same seed and lists give the same bits on every backend. It is
    required with bf16 states or stochastic param rounding and ignored otherwise; a caller
    stepping the same tensors in several calls (param groups) should give each call its own
    seed. A call holding several param dtypes with SR on runs as one sub-call per dtype, each
    with a seed derived from sr_seed (rounding.sub_call_seed).

    8-bit states (ademamix_cuda.quant): a param whose exp_avg_slow is uint8 has all its states as
    uint8 codes (contiguous, its shape; the param contiguous too) and one float32 absmax per 256
    elements in exp_avg_fast_absmaxs / exp_avg_slow_absmaxs / exp_avg_sq_absmaxs (lists with one
    entry per param: None, or an empty tensor, for the params with unquantized states). Every
    backend reads, updates and requantizes them in the same pass, with stochastic rounding (the
    random bits of bf16 states: sr_seed is required); the others keep the call's unquantized
    state dtype.
    """
    check_hyperparameters(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha,
                          beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup, eps=eps,
                          weight_decay=weight_decay)
    if param_rounding not in ("nearest", "stochastic"):
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got {param_rounding!r}")
    rounding.check_seed(sr_seed)
    param_sr = param_rounding == "stochastic"
    n = len(params)
    if exp_avg_fasts is None or all(m is None for m in exp_avg_fasts):
        if beta1 != 0.0:
            raise ValueError(f"exp_avg_fasts are required when beta1 != 0 (beta1 = {beta1})")
        exp_avg_fasts = []
    elif beta1 == 0.0:
        raise ValueError("beta1 == 0 uses no exp_avg_fast buffers: pass None")
    elif any(m is None for m in exp_avg_fasts):
        raise ValueError(f"exp_avg_fasts holds None for some params but beta1 = {beta1} != 0")
    lengths = [len(grads), len(exp_avg_fasts) if beta1 != 0.0 else n, len(exp_avg_slows),
               len(exp_avg_sqs), len(state_steps)]
    if any(length != n for length in lengths):
        raise ValueError(f"the tensor lists must have one entry per param ({n}); got lengths "
                         f"grads {lengths[0]}, exp_avg_fasts {lengths[1]}, exp_avg_slows {lengths[2]}, "
                         f"exp_avg_sqs {lengths[3]}, state_steps {lengths[4]}")
    if max_grad_norm is not None and not max_grad_norm > 0.0:
        raise ValueError(f"max_grad_norm must be positive, got {max_grad_norm}")
    norm_type = check_norm_type(norm_type)
    if n == 0:
        return None
    absmaxs = _absmax_lists(n, beta1, exp_avg_fast_absmaxs, exp_avg_slow_absmaxs,
                            exp_avg_sq_absmaxs)
    _check_rounding(params, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, absmaxs, sr_seed=sr_seed,
                    param_sr=param_sr)
    norm = None
    if max_grad_norm is not None:
        norm = total_norm if total_norm is not None else grad_norm(grads, norm_type,
                                                                   backend=backend)
        grad_scale = clip_scale(norm, float(max_grad_norm), grad_scale)
    params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs = local_lists(
        params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs)
    if backend not in ("auto",) + backends.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of 'auto', "
                         f"{', '.join(map(repr, backends.BACKENDS))}")
    lists = [list(params), list(grads), list(exp_avg_fasts), list(exp_avg_slows), list(exp_avg_sqs),
             list(state_steps)] + _empty_for_none(absmaxs, params[0].device)
    device = lists[0][0].device
    name = backends.resolve(backend, device)
    if name in ("single", "foreach"):
        _check_tensors(*lists[:6])
        check_disjoint(lists)
    else:
        # The kernels check the rest; a device mix must be caught before dispatch, which would
        # route a call holding one meta tensor to the (no-op) fake kernel.
        devices = {t.device for tensors in lists[:5] for t in tensors}
        if len(devices) > 1:
            raise RuntimeError("all tensors of one call must be on one device, got "
                               f"{sorted(map(str, devices))}")
    dtype = lists[0][0].dtype
    run(name, lists, one_dtype=all(p.dtype == dtype for p in lists[0]), lr=lr, beta1=beta1,
        beta2=beta2, beta3=beta3, alpha=alpha, beta3_warmup=beta3_warmup, alpha_warmup=alpha_warmup,
        eps=eps, weight_decay=weight_decay, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf, sr_seed=sr_seed, param_sr=param_sr)
    return norm


_ABSMAX_NAMES = ("exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs")


def _absmax_lists(n, beta1, *given):
    """The three absmax lists as lists ([] when absent; the fast one [] when beta1 == 0)."""
    out = []
    for name, absmax in zip(_ABSMAX_NAMES, given):
        absmax = [] if absmax is None or (beta1 == 0.0 and name == _ABSMAX_NAMES[0]) else list(absmax)
        if absmax and len(absmax) != n:
            raise ValueError(f"{name} must have one entry per param ({n}), got {len(absmax)}")
        out.append(absmax)
    return out


def _empty_for_none(absmaxs, device):
    """The absmax lists with None entries as empty tensors (what the kernels take)."""
    if not any(a is None for lst in absmaxs for a in lst):
        return [list(lst) for lst in absmaxs]
    empty = torch.empty(0, dtype=torch.float32, device=device)
    return [[empty if a is None else a for a in lst] for lst in absmaxs]


def unquantized_dtype(exp_avg_slows) -> torch.dtype:
    """The state dtype of a call's params with unquantized states (float32 if all are 8-bit)."""
    return next((s.dtype for s in exp_avg_slows if s.dtype != torch.uint8), torch.float32)


def _check_rounding(params, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, absmaxs, *, sr_seed,
                    param_sr):
    """The state dtypes, the 8-bit states' absmax, and the stochastic rounding arguments of a
    call (exp_avg_fasts may be [])."""
    fallback = unquantized_dtype(exp_avg_slows)
    bf16_states = fallback == torch.bfloat16
    for i, slow in enumerate(exp_avg_slows):
        quantized = slow.dtype == torch.uint8
        for name, states in (("exp_avg_fasts", exp_avg_fasts), ("exp_avg_sqs", exp_avg_sqs),
                             ("exp_avg_slows", exp_avg_slows)):
            dtype = states[i].dtype if states else None
            if states and (dtype == torch.uint8) != quantized:
                raise TypeError(f"{name}[{i}] is {dtype} but exp_avg_slows[{i}] is {slow.dtype}: a "
                                "param's states are all 8-bit codes (uint8) or none is")
            if states and not quantized and (dtype == torch.bfloat16) != bf16_states:
                raise TypeError(
                    f"the unquantized states of one call must be all float32 or all bfloat16: "
                    f"the first is {fallback} but {name}[{i}] is {dtype}")
        for name, states, lst in zip(_ABSMAX_NAMES, (exp_avg_fasts, exp_avg_slows, exp_avg_sqs),
                                     absmaxs):
            if not states:
                continue
            absmax = lst[i] if lst else None
            if quantized:
                if absmax is None:
                    raise ValueError(f"params[{i}] has 8-bit states: {name}[{i}] is required")
                quant.check_absmax(states[i], absmax, f"{name}[{i}]")
                if absmax.device != params[i].device:
                    raise RuntimeError(f"{name}[{i}] is on {absmax.device}, its param on "
                                       f"{params[i].device}")
                if not (params[i].is_contiguous() and states[i].is_contiguous()):
                    raise RuntimeError(f"params[{i}] and its 8-bit states must be contiguous (their "
                                       f"blocks are runs of {quant.BLOCK} elements)")
            elif absmax is not None and absmax.numel() != 0:
                raise ValueError(f"{name}[{i}] must be None or empty: params[{i}] has {fallback} "
                                 "states")
        if (quantized or bf16_states) and params[i].dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{'8-bit' if quantized else 'bfloat16'} states need float32, "
                            f"bfloat16 or float16 params: params[{i}] is {params[i].dtype}")
    if param_sr:
        for i, p in enumerate(params):
            if p.dtype != torch.bfloat16:
                raise TypeError(f"param_rounding='stochastic' needs bfloat16 params: params[{i}] "
                                f"is {p.dtype}")
    if sr_seed is None and (bf16_states or param_sr or any(s.dtype == torch.uint8
                                                            for s in exp_avg_slows)):
        raise ValueError("sr_seed is required with bfloat16 or 8-bit states or "
                         "param_rounding='stochastic' (it keys the random bits of the stochastic "
                         "rounding)")


def run(name, lists, *, one_dtype, stepper=None, sr_seed=None, param_sr=False, **hyper):
    """Runs backend `name` on checked `lists` (exp_avg_fasts an empty list when beta1 == 0).

    `one_dtype` says all params share a dtype; else the kernel backends run once per dtype, and
    with stochastic rounding (bf16 states or `param_sr`) every backend does, each sub-call with
    its own seed (rounding.sub_call_seed) and tensor indices from 0, as the kernels number them.
    `stepper`: a triton_kernels.Stepper made for exactly these lists, whose host work per step is
    smaller (the optimizer keeps one per param group).
    """
    # bf16 states are all of a call's unquantized states; 8-bit ones come with absmax lists
    stochastic = (param_sr or lists[3][0].dtype in (torch.bfloat16, torch.uint8)
                  or (any(lists[6:]) and any(m.dtype in (torch.bfloat16, torch.uint8)
                                             for m in lists[3])))
    sr = dict(sr_seed=sr_seed if stochastic else None, param_sr=param_sr)
    if stepper is not None:
        _triton_step(*lists, stepper=stepper, **sr, **hyper)
        return
    torch_path = name in ("single", "foreach")
    if torch_path:
        kernel = functools.partial(_torch_step, per_tensor=(name == "single"))
    else:
        kernel = _cuda_step if name == "cuda" else _triton_step
    if one_dtype or (torch_path and not stochastic):
        kernel(*lists, **sr, **hyper)
        return
    present = [i for i, tensors in enumerate(lists) if tensors]
    grouped = Optimizer._group_tensors_by_device_and_dtype([lists[i] for i in present],
                                                           with_indices=True)
    for group_lists, indices in grouped.values():
        call = [[] for _ in lists]
        for i, group_list in zip(present, group_lists):
            call[i] = group_list
        if stochastic:
            sr["sr_seed"] = rounding.sub_call_seed(sr_seed, min(indices))
        kernel(*call, **sr, **hyper)


def _absmax_kwargs(absmaxs):
    """The absmax lists as the kernels' keyword arguments (none when no state is 8-bit)."""
    if not any(absmaxs):
        return {}
    return dict(zip(_ABSMAX_NAMES, absmaxs))


def _cuda_step(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, *absmaxs,
               lr, **hyper):
    op = torch.ops.ademamix.step_
    if isinstance(lr, Tensor):
        if lr.device == params[0].device:
            op = op.tensor_lr
        else:
            lr = lr.item()  # a CPU lr for device params: reading it costs no device sync
    op(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr=lr,
       **_absmax_kwargs(absmaxs), **hyper)


def _triton_step(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, *absmaxs,
                 lr, stepper=None, **hyper):
    from .triton_kernels import ademamix_step_

    if isinstance(lr, Tensor) and lr.device != params[0].device:
        lr = lr.item()
    if stepper is not None:
        stepper.step(grads, lr=lr, **hyper)
        return
    ademamix_step_(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps, lr=lr,
                   **_absmax_kwargs(absmaxs), **hyper)


# The torch ops of the update, applied one tensor at a time ("single") or over tensor lists with
# per-tensor scalars as lists ("foreach"): the same names, so the math below is written once.
_OP_NAMES = ("mul_", "add_", "addcmul_", "div_", "mul", "div", "sqrt")
_PER_TENSOR_OPS = SimpleNamespace(**{name: getattr(Tensor, name) for name in _OP_NAMES})
_FOREACH_OPS = SimpleNamespace(**{name: getattr(torch, f"_foreach_{name}") for name in _OP_NAMES})


def _add_scaled_(ops, x, y, scale):
    """x += scale * y, with scale a float or (foreach only) a list of floats."""
    if isinstance(scale, list):
        ops.add_(x, ops.mul(y, scale))
    else:
        ops.add_(x, y, alpha=scale)


def _update(ops, p, g, m1, m2, nu, *, lr, beta1, beta2, beta3_t, one_minus_beta3_t, alpha_t, bc1,
            sqrt_bc2, eps, weight_decay):
    """The AdEMAMix update written once for torch: `ops` applies each op per tensor or per list.

    The scalars that depend on the step (beta3_t, alpha_t, bc1, sqrt_bc2) are floats, or lists of
    floats (one per tensor) when a list's tensors are at different steps.
    """
    if m1 is None:
        m1 = g
    else:
        ops.mul_(m1, beta1)
        ops.add_(m1, g, alpha=1.0 - beta1)
    ops.mul_(m2, beta3_t)
    _add_scaled_(ops, m2, g, one_minus_beta3_t)
    ops.mul_(nu, beta2)
    ops.addcmul_(nu, g, g, value=1.0 - beta2)
    denom = ops.sqrt(nu)
    ops.div_(denom, sqrt_bc2)
    ops.add_(denom, eps)
    update = ops.div(m1, bc1)
    _add_scaled_(ops, update, m2, alpha_t)
    ops.div_(update, denom)
    if weight_decay != 0.0:
        ops.add_(update, p, alpha=weight_decay)
    ops.add_(p, update, alpha=-lr)


def _step_scalars(t, *, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup):
    """The scalars of step t that _update takes."""
    beta3_t = beta3_at(t, beta1, beta3, beta3_warmup)
    bc1, bc2 = bias_corrections(t, beta1, beta2)
    return dict(beta3_t=beta3_t, one_minus_beta3_t=1.0 - beta3_t,
                alpha_t=alpha_at(t, alpha, alpha_warmup), bc1=bc1, sqrt_bc2=math.sqrt(bc2))


_SIGNED = {"exp_avg_fast": True, "exp_avg_slow": True, "exp_avg_sq": False}  # 8-bit code maps


def _torch_step(params, grads, exp_avg_fasts, exp_avg_slows, exp_avg_sqs, state_steps,
                exp_avg_fast_absmaxs=(), exp_avg_slow_absmaxs=(), exp_avg_sq_absmaxs=(), *,
                per_tensor, lr, beta1, beta2, beta3, alpha, beta3_warmup, alpha_warmup, eps,
                weight_decay, maximize, grad_scale, found_inf, sr_seed=None, param_sr=False):
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = float(lr)
    # Low-precision params, bf16 states and 8-bit states are updated through fp32 copies.
    low = [p.dtype in _LOW_PRECISION for p in params]
    work_params = [p.float() if is_low else p for p, is_low in zip(params, low)]
    work_grads = [g.float() if is_low else g for g, is_low in zip(grads, low)]
    bf16_states = unquantized_dtype(exp_avg_slows) == torch.bfloat16
    quantized = [m.dtype == torch.uint8 for m in exp_avg_slows]
    states = {"exp_avg_fast": exp_avg_fasts, "exp_avg_slow": exp_avg_slows,
              "exp_avg_sq": exp_avg_sqs}
    absmaxs = dict(zip(states, (exp_avg_fast_absmaxs, exp_avg_slow_absmaxs, exp_avg_sq_absmaxs)))

    def work_state(which, i, m):
        if quantized[i]:
            return quant.dequantize_blockwise(m, absmaxs[which][i], _SIGNED[which])
        return m.float() if bf16_states else m

    work_states = {k: [work_state(k, i, m) for i, m in enumerate(v)] for k, v in states.items()}
    work_fasts, work_slows, work_sqs = work_states.values()
    if grad_scale is not None:
        scale = grad_scale.reshape(())  # a [1]-shaped scale must not turn 0-d grads into [1]
        work_grads = [g / scale.to(g.device) for g in work_grads]
    if maximize:
        work_grads = [-g for g in work_grads]
    torch._foreach_add_(state_steps, 1.0)
    steps = torch.stack(state_steps).tolist()  # one read of all step counts
    hyper = dict(beta1=beta1, beta2=beta2, beta3=beta3, alpha=alpha, beta3_warmup=beta3_warmup,
                 alpha_warmup=alpha_warmup)
    constants = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    uniform = all(t == steps[0] for t in steps)  # the usual case: one set of scalars
    per_step = [_step_scalars(t, **hyper) for t in (steps[:1] if uniform else steps)]
    fasts = work_fasts or [None] * len(params)
    if per_tensor:
        for i, (p, g, m1, m2, nu) in enumerate(zip(work_params, work_grads, fasts, work_slows,
                                                   work_sqs)):
            _update(_PER_TENSOR_OPS, p, g, m1, m2, nu, **per_step[0 if uniform else i], **constants)
    else:
        grouped = Optimizer._group_tensors_by_device_and_dtype(
            [work_params, work_grads, work_slows, work_sqs] + ([fasts] if work_fasts else []),
            with_indices=True)
        for group_lists, indices in grouped.values():
            p, g, m2, nu = group_lists[:4]
            m1 = group_lists[4] if work_fasts else None
            scalars = per_step[0] if uniform else {
                k: [per_step[i][k] for i in indices] for k in per_step[0]}
            _update(_FOREACH_OPS, p, g, m1, m2, nu, **scalars, **constants)
    for i, (p, work, is_low) in enumerate(zip(params, work_params, low)):
        sr_states = bf16_states and not quantized[i]
        if sr_states or param_sr or quantized[i]:
            # the kernels' bits: tensor i of this call, the new step, the element's index
            words = rounding.random_words(sr_seed, i, int(steps[i]), p.numel(), p.device)
        for which, tensors in states.items():
            if tensors and quantized[i]:
                codes, absmax = quant.quantize_blockwise(
                    work_states[which][i], _SIGNED[which],
                    rounding.bits_of(words, which, tensors[i]))
                tensors[i].copy_(codes)
                absmaxs[which][i].copy_(absmax)
            elif tensors and sr_states:
                m = tensors[i]
                m.copy_(rounding.round_bf16_sr(work_states[which][i],
                                               rounding.bits_of(words, which, m)))
        if param_sr:
            p.copy_(rounding.round_bf16_sr(work, rounding.bits_of(words, "param", p)))
        elif is_low:
            p.copy_(work)  # rounds to nearest even

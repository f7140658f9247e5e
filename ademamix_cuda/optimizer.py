"""AdEMAMix as a torch.optim.Optimizer: a drop-in replacement for the authors' class."""
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import backends, bnb_compat, functional, quant, rounding
from .clip import check_norm_type, clip_scale
from .dtensor import check_grad, describe, is_dtensor, local, map_local, same_layout, zeros_state
from .overlap import check_disjoint

__all__ = ["AdEMAMix", "AdEMAMix8bit"]

_STATE_TENSORS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
_ABSMAX = {key: f"{key}_absmax" for key in _STATE_TENSORS}  # 8-bit states' absmax keys
_SIGNED = {"exp_avg_fast": True, "exp_avg_slow": True, "exp_avg_sq": False}
_KERNEL_BACKENDS = ("cuda", "triton")
# Settings of how a group runs and stores its states, not of the optimization: a loaded
# state_dict keeps ours (its states are converted to our state dtype).
_EXECUTION_KEYS = ("backend", "state_dtype", "param_rounding", "min_8bit_size", "small_state_dtype")
_STATE_DTYPE_NAMES = {torch.float32: "float32", "float32": "float32", "fp32": "float32",
                      torch.bfloat16: "bfloat16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                      torch.uint8: "8bit", "8bit": "8bit", "uint8": "8bit"}
_SMALL_STATE_DTYPES = ("float32", "bfloat16")  # of the tensors an 8-bit group keeps unquantized
_PARAM_ROUNDINGS = ("nearest", "stochastic")


def _state_dtype(p: Tensor, group: dict | str = "float32") -> torch.dtype:
    """The dtype of p's states in `group` (or under a state_dtype setting): uint8 codes for 8-bit
    states (tensors of at least min_8bit_size elements; smaller ones take small_state_dtype);
    bf16 when asked for (written with stochastic rounding); otherwise fp32 for bf16/fp16 params
    (a plain bf16 slow EMA stalls), else the param dtype."""
    setting = group if isinstance(group, str) else group["state_dtype"]
    if setting == "8bit":
        if p.numel() >= group["min_8bit_size"]:
            return torch.uint8
        setting = _STATE_DTYPE_NAMES[group["small_state_dtype"]]
    if setting == "bfloat16":
        return torch.bfloat16
    return torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype


def _default_seed() -> int:
    """From torch's seed (torch.manual_seed makes a run reproducible) without drawing from its
    generator, so creating the optimizer leaves the random numbers of the program unchanged."""
    return rounding.derive_seed(0, torch.initial_seed())


def _to_state_dtype(value: Tensor, absmax: Tensor | None, dtype: torch.dtype, device, seed: int,
                    index: int, step: int, key: str) -> tuple[Tensor, Tensor | None]:
    """A copy of saved state `value` (with its absmax when 8-bit codes) as a state of `dtype` on
    `device`, and the new absmax (None unless dtype is uint8): codes and absmax are copied as
    they are; otherwise exact, except to bf16 from fp32 (or wider) and to 8-bit codes, which
    round stochastically with the random bits of (seed, index, step)."""
    value = value.detach()
    if value.dtype == torch.uint8:
        if dtype == torch.uint8:
            return (value.to(device=device, copy=True),
                    absmax.detach().to(device=device, dtype=torch.float32, copy=True))
        value = quant.dequantize_blockwise(value, absmax.detach().to(value.device), _SIGNED[key])
    if dtype == torch.uint8:
        value = value.to(device)
        words = rounding.random_words(seed, index, step, value.numel(), device)
        return quant.quantize_blockwise(value, _SIGNED[key], rounding.bits_of(words, key, value))
    if dtype != torch.bfloat16 or value.dtype == torch.bfloat16:
        return value.to(device=device, dtype=dtype, copy=True), None
    return map_local(value, lambda t: rounding.sr_to_bf16(t.to(device), seed, index, step,
                                                          key)), None


@dataclass
class _Plan:
    """The lists one group hands to the backend, kept while the group's shape does not change."""

    has_grad: list  # which of group["params"] had a grad when the plan was made
    dtensors: list  # the group's params with grads, where some are DTensors; else None
    beta1_zero: bool
    backend_setting: str
    state_dtype: str
    backend: str
    one_dtype: bool
    params: list  # local shards of DTensor params (what the backends update)
    exp_avg_fasts: list
    exp_avg_slows: list
    exp_avg_sqs: list
    state_steps: list
    absmaxs: list  # the three absmax lists ([] when no state is 8-bit)
    min_8bit_size: int
    stepper: object  # the Triton backend's per-group launcher, else None


class AdEMAMix(Optimizer):
    """AdEMAMix (Pagliardini, Ablin, Grangier, ICLR 2025): Adam plus a slow EMA of the gradients.

    Arguments, defaults and state keys ("step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq") are
    those of the authors' PyTorch class, and so are the numbers. `t_alpha` / `t_beta3` are
    accepted as aliases of `alpha_warmup` / `beta3_warmup`.

    Gradient clipping by the global norm, fused into the step (the grads in memory are left as
    they are; torch.nn.utils.clip_grad_norm_ scales them in place): call clip_grad_norm_(max_norm)
    before step(), or set max_grad_norm to clip at every step; last_grad_norm holds the norm the
    last clipping step used (a tensor, of the grads as they were in memory).

    backend: "auto" (the CUDA kernel for cuda tensors when the extension is built, else the
    Triton kernel, else foreach; foreach for other devices), "cuda", "triton", "foreach" or
    "single". An explicit backend that cannot run raises an error naming what is missing.

    Low-memory states: state_dtype=torch.bfloat16 (or "bf16") stores m1, m2 and nu in bf16 (6
    bytes per param instead of 12); the math stays fp32 and every state is written back with
    stochastic rounding (SR), which keeps the slow EMA unbiased where round-to-nearest would
    stall it. param_rounding="stochastic" writes bf16 params with SR too (pure-bf16 training
    without an fp32 master copy). The random bits are a hash of (sr_seed, the tensor's index in
    its group's call, the step, the element index): the same in every backend, whatever the
    launch geometry. sr_seed (an int in [0, 2^63)) defaults to one derived from
    torch.initial_seed() (no draw from torch's generator), so torch.manual_seed makes a run
    reproducible; each param group gets its own seed, saved in its state_dict entry.
    load_state_dict converts saved states to this optimizer's state dtype: bf16 to fp32 exactly,
    fp32 to bf16 by SR keyed by the group's seed, the param's index in its group and its step.

    8-bit states: state_dtype="8bit" (or torch.uint8) stores each of m1, m2 and nu as uint8 codes
    with one fp32 absmax per 256 elements (ademamix_cuda.quant; state keys "exp_avg_fast" etc.
    hold the codes, "exp_avg_fast_absmax" etc. the absmax): about 3 bytes per param instead of
    12. Params with fewer than min_8bit_size (4096) elements keep small_state_dtype states
    ("float32" or "bfloat16"), stepped in the same launch. Every backend dequantizes, updates
    and requantizes in the same pass. 8-bit states need contiguous params (no DTensors).
    load_state_dict converts between 8-bit, bf16 and fp32 states in both directions, and takes a
    bitsandbytes AdEMAMix state_dict (ademamix_cuda.bnb_compat) as it is.
    """

    _step_supports_amp_scaling = True

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=2.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.0, *, maximize=False, backend="auto",
                 max_grad_norm=None, norm_type=2.0, t_alpha=None, t_beta3=None,
                 state_dtype=torch.float32, param_rounding="nearest", sr_seed=None,
                 min_8bit_size=quant.MIN_8BIT_SIZE, small_state_dtype="float32"):
        alpha_warmup = _alias("alpha_warmup", alpha_warmup, "t_alpha", t_alpha)
        beta3_warmup = _alias("beta3_warmup", beta3_warmup, "t_beta3", t_beta3)
        rounding.check_seed(sr_seed)
        self._base_seed = _default_seed() if sr_seed is None else sr_seed
        defaults = dict(lr=lr, betas=betas, alpha=alpha, beta3_warmup=beta3_warmup,
                        alpha_warmup=alpha_warmup, eps=eps, weight_decay=weight_decay,
                        maximize=maximize, backend=backend, state_dtype=state_dtype,
                        param_rounding=param_rounding, sr_seed=None, min_8bit_size=min_8bit_size,
                        small_state_dtype=small_state_dtype)
        if max_grad_norm is not None and not max_grad_norm > 0.0:
            raise ValueError(f"max_grad_norm must be positive or None, got {max_grad_norm}")
        self.max_grad_norm = max_grad_norm
        self.norm_type = check_norm_type(norm_type)
        self.last_grad_norm: Tensor | None = None
        self._clip = None  # (max_norm, norm) armed by clip_grad_norm_ for the next step()
        self._plans: dict[int, _Plan] = {}
        self.backend_used: str | None = None
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _check_group(group)
            _check_precision(group)
        except ValueError:
            self.param_groups.pop()
            raise
        group["state_dtype"] = _STATE_DTYPE_NAMES[group["state_dtype"]]
        group["small_state_dtype"] = _STATE_DTYPE_NAMES[group["small_state_dtype"]]
        if group["sr_seed"] is None:
            # the optimizer's seed for the first group, distinct ones for the others
            group["sr_seed"] = rounding.derive_seed(self._base_seed, len(self.param_groups) - 1)
        self._plans.clear()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._base_seed = getattr(self, "_base_seed", _default_seed())
        for index, group in enumerate(self.param_groups):
            for key, value in self.defaults.items():
                group.setdefault(key, value)
            if group["sr_seed"] is None:  # a state from before the option, or from elsewhere
                group["sr_seed"] = rounding.derive_seed(self._base_seed, index)
        self._plans = {}
        self.backend_used = getattr(self, "backend_used", None)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        clip, self._clip = self._clip, None
        if clip is None and self.max_grad_norm is not None:
            clip = (self.max_grad_norm, self._grad_norm(self.norm_type))
        if clip is not None:
            self.last_grad_norm = clip[1]
            grad_scale = clip_scale(clip[1], clip[0], grad_scale)
        for index, group in enumerate(self.param_groups):
            grads = [p.grad for p in group["params"]]
            plan = self._plan(index, group, grads)
            if plan is None:
                continue
            if not all(plan.has_grad):
                grads = [g for g in grads if g is not None]
            if plan.dtensors is not None:
                plan, grads = self._local_grads(index, group, plan, grads)
            beta1, beta2, beta3 = group["betas"]
            scale = grad_scale
            if clip is not None and scale.device != plan.params[0].device:
                scale = scale.to(plan.params[0].device)  # a group on another device
            param_sr = group["param_rounding"] == "stochastic"
            random = param_sr or group["state_dtype"] != "float32"  # bf16 and 8-bit states
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, beta3=beta3, alpha=group["alpha"],
                         beta3_warmup=group["beta3_warmup"], alpha_warmup=group["alpha_warmup"],
                         eps=group["eps"], weight_decay=group["weight_decay"],
                         maximize=group["maximize"], grad_scale=scale, found_inf=found_inf,
                         sr_seed=group["sr_seed"] if random else None, param_sr=param_sr)
            functional.check_hyperparameters(**{k: hyper[k] for k in _HYPER_KEYS})
            lists = [plan.params, grads, plan.exp_avg_fasts, plan.exp_avg_slows, plan.exp_avg_sqs,
                     plan.state_steps] + plan.absmaxs
            if plan.backend not in _KERNEL_BACKENDS:
                functional._check_tensors(*lists[:6])
            functional.run(plan.backend, lists, one_dtype=plan.one_dtype, stepper=plan.stepper,
                           **hyper)
            self.backend_used = plan.backend
        return loss

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm, norm_type=2.0, error_if_nonfinite=False):
        """Clips the grads of the next step() by their total norm, as
        torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type) would, and returns that norm
        (a 0-d tensor, no host sync unless error_if_nonfinite). The clipping happens inside
        step(): the grads in memory are not changed. The norm is taken over every param of every
        group that has a grad, in one read of the grads (cuda and triton backends, norm_type 2
        or inf); DTensor grads give the norm of the whole gradient. With a GradScaler that did
        not unscale_ first, the norm returned is that of the scaled grads, and step() clips
        the unscaled ones by the unscaled norm."""
        if not max_norm > 0.0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        norm = self._grad_norm(check_norm_type(norm_type))
        if error_if_nonfinite and torch.logical_or(norm.isnan(), norm.isinf()):
            raise RuntimeError(
                f"The total norm of order {float(norm_type)} for gradients from `parameters` is "
                "non-finite, so it cannot be clipped. To disable this error and scale the "
                "gradients by the non-finite norm anyway, set `error_if_nonfinite=False`")
        self._clip = (float(max_norm), norm)
        return norm

    def _grad_norm(self, norm_type):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        settings = {g["backend"] for g in self.param_groups}
        backend = settings.pop() if len(settings) == 1 else "auto"
        return functional.grad_norm(grads, norm_type, backend=backend)

    def _local_grads(self, index, group, plan, grads):
        """The local shards of a DTensor group's grads, checked against their params. The plan is
        rebuilt if a param's local shard is no longer the one it holds (FSDP2 replaces them,
        e.g. when a module is moved)."""
        for i, (p, g) in enumerate(zip(plan.dtensors, grads)):
            check_grad(p, g, i)
        if not all(map(lambda p, shard: local(p) is shard, plan.dtensors, plan.params)):
            del self._plans[index]
            plan = self._plan(index, group, [p.grad for p in group["params"]])
        return plan, [local(g) for g in grads]

    def _plan(self, index, group, grads):
        """The cached lists of a group, rebuilt when its params with grads, beta1 == 0 or backend
        changed (or after load_state_dict / add_param_group)."""
        has_grad = [g is not None for g in grads]
        beta1_zero = group["betas"][0] == 0.0
        plan = self._plans.get(index)
        if (plan is not None and plan.has_grad == has_grad and plan.beta1_zero == beta1_zero
                and plan.backend_setting == group["backend"]
                and plan.state_dtype == group["state_dtype"]
                and plan.min_8bit_size == group["min_8bit_size"]):
            return plan
        if not any(has_grad):
            return None
        params = [p for p, has in zip(group["params"], has_grad) if has]
        positions = [i for i, has in enumerate(has_grad) if has]
        grads = [g for g in grads if g is not None]
        _check_precision(dict(group, params=params))
        group["state_dtype"] = _STATE_DTYPE_NAMES[group["state_dtype"]]  # may be set by hand
        group["small_state_dtype"] = _STATE_DTYPE_NAMES[group["small_state_dtype"]]
        # Check everything before the first state is created: a bad call changes nothing.
        for i, (p, g) in enumerate(zip(params, grads)):
            check_grad(p, g, i)
            if p.is_complex():
                raise TypeError(f"AdEMAMix does not support complex parameters (got {p.dtype})")
            if g.is_sparse:
                raise RuntimeError("AdEMAMix does not support sparse gradients")
            if g.shape != p.shape or g.dtype != p.dtype or g.device != p.device:
                raise RuntimeError(
                    f"a grad must match its param: grad is {g.dtype}{list(g.shape)} on {g.device}, "
                    f"param is {p.dtype}{list(p.shape)} on {p.device}")
            if _state_dtype(p, group) == torch.uint8 and (is_dtensor(p) or not p.is_contiguous()):
                raise ValueError(f"8-bit states need a contiguous plain tensor param, got "
                                 f"{describe(p)} (put it in a group with state_dtype 'float32' "
                                 f"or 'bfloat16')")
        dtensors = params if any(map(is_dtensor, params)) else None
        params, grads = [local(p) for p in params], [local(g) for g in grads]
        check_disjoint([params, grads])  # a param listed twice would share its states too
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise RuntimeError("all params of one param group must be on one device, got "
                               f"{sorted(map(str, devices))}")
        device = params[0].device
        backend = backends.resolve(group["backend"], device)
        step_device = device if backend in _KERNEL_BACKENDS else torch.device("cpu")
        for p, position in zip(dtensors or params, positions):
            self._init_state(p, beta1_zero, step_device, group, position)
        states = [self.state[p] for p in dtensors or params]
        lists = dict(params=params,
                     exp_avg_fasts=[] if beta1_zero else [local(s["exp_avg_fast"]) for s in states],
                     exp_avg_slows=[local(s["exp_avg_slow"]) for s in states],
                     exp_avg_sqs=[local(s["exp_avg_sq"]) for s in states],
                     state_steps=[s["step"] for s in states])
        absmaxs = []
        if any(_ABSMAX["exp_avg_slow"] in s for s in states):
            empty = torch.empty(0, dtype=torch.float32, device=device)
            absmaxs = [[s.get(_ABSMAX[key], empty) for s in states]
                       for key in _STATE_TENSORS if not (beta1_zero and key == "exp_avg_fast")]
            if beta1_zero:
                absmaxs.insert(0, [])
        one_dtype = len({p.dtype for p in params}) == 1
        stepper = None
        if backend == "triton" and one_dtype:
            from .triton_kernels import Stepper

            stepper = Stepper(*lists.values(), *absmaxs)
        plan = _Plan(has_grad=has_grad, dtensors=dtensors, beta1_zero=beta1_zero,
                     backend_setting=group["backend"], state_dtype=group["state_dtype"],
                     backend=backend, one_dtype=one_dtype, stepper=stepper, absmaxs=absmaxs,
                     min_8bit_size=group["min_8bit_size"], **lists)
        self._plans[index] = plan
        return plan

    def _init_state(self, p, beta1_zero, step_device, group, position):
        """Creates p's state, or brings it to the group's settings (step device and dtype, the
        state dtype: converted as load_state_dict converts, a new fast EMA)."""
        state = self.state[p]
        dtype = _state_dtype(p, group)

        def zeros(key):
            if dtype == torch.uint8:
                state[_ABSMAX[key]] = torch.zeros(quant.n_blocks(p.numel()), dtype=torch.float32,
                                                  device=p.device)
            return zeros_state(p, dtype)

        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
            state["exp_avg_fast"] = None if beta1_zero else zeros("exp_avg_fast")
            state["exp_avg_slow"] = zeros("exp_avg_slow")
            state["exp_avg_sq"] = zeros("exp_avg_sq")
            return
        step = state["step"]
        if not isinstance(step, Tensor):  # the authors' class counts steps in a Python int
            state["step"] = torch.tensor(float(step), dtype=torch.float32, device=step_device)
        elif step.device != step_device or step.dtype != torch.float32:
            state["step"] = step.to(device=step_device, dtype=torch.float32)
        for key in _STATE_TENSORS:
            value = state.get(key)
            if isinstance(value, Tensor) and value.dtype != dtype:
                self._set_state(state, key, value, state.get(_ABSMAX[key]), dtype, p, group,
                                position)
        if not beta1_zero and state.get("exp_avg_fast") is None:
            state["exp_avg_fast"] = zeros("exp_avg_fast")  # beta1 became nonzero: it starts now

    @staticmethod
    def _set_state(state, key, value, absmax, dtype, p, group, position):
        """state[key] (and its absmax key) from `value` converted to `dtype` (_to_state_dtype)."""
        state[key], new_absmax = _to_state_dtype(value, absmax, dtype, p.device, group["sr_seed"],
                                                 position, int(state["step"]), key)
        if new_absmax is None:
            state.pop(_ABSMAX[key], None)
        else:
            state[_ABSMAX[key]] = new_absmax

    def load_state_dict(self, state_dict):
        if bnb_compat.is_bitsandbytes_state_dict(state_dict):
            state_dict = bnb_compat.from_bitsandbytes(state_dict)
        _check_state_dict(self, state_dict)
        kept = [{k: g[k] for k in _EXECUTION_KEYS + ("sr_seed",)} for g in self.param_groups]
        for saved_group, ours in zip(state_dict["param_groups"], kept):
            if saved_group.get("sr_seed") is not None:  # the saved run's seed continues
                ours["sr_seed"] = saved_group["sr_seed"]
        saved_states = state_dict["state"]
        super().load_state_dict(state_dict)
        for group, ours in zip(self.param_groups, kept):
            group.update(ours)
        # torch casts state tensors to the param dtype (bf16 states for bf16 params, losing bits)
        # and may alias the given tensors: take our own copies of the saved values instead, in
        # our state dtype.
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        groups = list(chain.from_iterable([g] * len(g["params"]) for g in self.param_groups))
        in_group = list(chain.from_iterable(range(len(g["params"])) for g in self.param_groups))
        position = _positions(state_dict)
        for index, saved in saved_states.items():
            n = position[index]
            p, group = params[n], groups[n]
            state = self.state[p]
            step = saved["step"]
            state["step"] = (step.detach().to(dtype=torch.float32, copy=True) if isinstance(step, Tensor)
                             else torch.tensor(float(step), dtype=torch.float32))
            dtype = _state_dtype(p, group)
            for key in _STATE_TENSORS:
                state.pop(_ABSMAX[key], None)  # torch's copy of it, if any
                if isinstance(saved.get(key), Tensor):
                    self._set_state(state, key, saved[key], saved.get(_ABSMAX[key]), dtype, p,
                                    group, in_group[n])
        self._plans.clear()


_HYPER_KEYS = ("lr", "beta1", "beta2", "beta3", "alpha", "beta3_warmup", "alpha_warmup", "eps",
               "weight_decay")


def _alias(name, value, alias, alias_value):
    if alias_value is None:
        return value
    if value is not None and value != alias_value:
        raise ValueError(f"{name}={value} and its alias {alias}={alias_value} disagree")
    return alias_value


def _check_precision(group):
    """The group's state dtype and param rounding, against its params."""
    state_dtype, rounding_mode = group["state_dtype"], group["param_rounding"]
    if state_dtype not in _STATE_DTYPE_NAMES:
        raise ValueError(f"state_dtype must be torch.float32, torch.bfloat16 or torch.uint8 (or "
                         f"'float32', 'bfloat16', 'fp32', 'bf16', '8bit'), got {state_dtype!r}")
    small = group["small_state_dtype"]
    if _STATE_DTYPE_NAMES.get(small) not in _SMALL_STATE_DTYPES:
        raise ValueError(f"small_state_dtype must be float32 or bfloat16, got {small!r}")
    size = group["min_8bit_size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"min_8bit_size must be an int >= 0, got {size!r}")
    if rounding_mode not in _PARAM_ROUNDINGS:
        raise ValueError(f"param_rounding must be 'nearest' or 'stochastic', got {rounding_mode!r}")
    rounding.check_seed(group.get("sr_seed"))
    for p in group["params"]:
        if rounding_mode == "stochastic" and p.dtype != torch.bfloat16:
            raise ValueError(f"param_rounding='stochastic' rounds bf16 params; this group holds a "
                             f"{p.dtype} param (use 'nearest', or bf16 params)")
        name = {"bfloat16": "bf16", "8bit": "8-bit"}.get(_STATE_DTYPE_NAMES[state_dtype])
        if name and p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"{name} states need float32, bfloat16 or float16 params, got "
                             f"{p.dtype}")


def _check_group(group):
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 3:
        raise ValueError(f"betas must be (beta1, beta2, beta3), got {betas!r}")
    functional.check_hyperparameters(
        lr=group["lr"], beta1=betas[0], beta2=betas[1], beta3=betas[2], alpha=group["alpha"],
        beta3_warmup=group["beta3_warmup"], alpha_warmup=group["alpha_warmup"], eps=group["eps"],
        weight_decay=group["weight_decay"])
    if group["backend"] not in ("auto",) + backends.BACKENDS:
        raise ValueError(f"unknown backend {group['backend']!r}: choose one of 'auto', "
                         f"{', '.join(map(repr, backends.BACKENDS))}")


def _check_state_dict(optimizer, state_dict):
    """Raises ValueError for a state_dict that is not an AdEMAMix state of these params."""
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state_dict: expected the keys 'state' and 'param_groups'")
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"the state_dict has {len(saved_groups)} param groups, this optimizer {len(groups)}")
    sizes = [len(g["params"]) for g in groups]
    saved_sizes = [len(g["params"]) for g in saved_groups]
    if sizes != saved_sizes:
        raise ValueError(f"the state_dict's param groups hold {saved_sizes} params, this optimizer's {sizes}")
    params, beta1_of = [], []
    for group, saved_group in zip(groups, saved_groups):
        missing = [k for k in ("lr", "betas", "alpha", "eps", "weight_decay") if k not in saved_group]
        if missing:
            raise ValueError(f"not an AdEMAMix state_dict: a param group lacks {missing}")
        _check_group({**optimizer.defaults, **saved_group, "backend": group["backend"]})
        params += group["params"]
        beta1_of += [saved_group["betas"][0]] * len(group["params"])
    position = _positions(state_dict)
    for index, saved in state_dict["state"].items():
        if index not in position:
            raise ValueError(f"the state_dict holds state for parameter {index!r}, which this optimizer lacks")
        p = params[position[index]]
        missing = [k for k in ("step", "exp_avg_slow", "exp_avg_sq") if k not in saved]
        if missing:
            raise ValueError(f"not an AdEMAMix state: parameter {index} lacks {missing} "
                             f"(it has {sorted(saved)})")
        for key in _STATE_TENSORS:
            value = saved.get(key)
            if value is None:
                if key != "exp_avg_fast" or beta1_of[position[index]] != 0.0:
                    raise ValueError(f"parameter {index}: {key!r} is missing but beta1 = {beta1_of[position[index]]}")
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape:
                shape = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"parameter {index}: {key!r} has shape {shape}, the parameter {list(p.shape)}")
            if not same_layout(value, p):
                raise ValueError(f"parameter {index}: {key!r} is {describe(value)} but the parameter "
                                 f"is {describe(p)}: a state must be laid out like its param")
            if value.dtype == torch.uint8:
                absmax = saved.get(_ABSMAX[key])
                if not isinstance(absmax, Tensor):
                    raise ValueError(f"parameter {index}: {key!r} holds 8-bit codes but the state "
                                     f"has no {_ABSMAX[key]!r}")
                try:
                    quant.check_absmax(value, absmax, f"parameter {index}: {key!r}")
                except (TypeError, ValueError) as e:
                    raise ValueError(str(e)) from None


def _positions(state_dict):
    """Saved param id -> position in the flattened param groups. Like torch's load_state_dict, the
    saved groups' "params" lists map onto ours in order: ids are ints from state_dict(), FQNs from
    torch.distributed.checkpoint's get/set_optimizer_state_dict."""
    ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    return {pid: n for n, pid in enumerate(ids)}


class AdEMAMix8bit(AdEMAMix):
    """AdEMAMix with 8-bit states, taking the constructor arguments of bitsandbytes'
    `bnb.optim.AdEMAMix8bit` (and its defaults: alpha 5, weight_decay 0.01) for people migrating:
    t_alpha and t_beta3 are the warmups of alpha and beta3, min_8bit_size the smallest tensor
    with 8-bit states (smaller ones keep fp32 states). Paged states do not exist here
    (is_paged=True is refused). Any other AdEMAMix keyword (backend, max_grad_norm,
    small_state_dtype, ...) passes through. A bitsandbytes AdEMAMix state_dict loads as it is
    (see ademamix_cuda.bnb_compat for the conversion)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha=None,
                 t_beta3=None, eps=1e-8, weight_decay=1e-2, min_8bit_size=quant.MIN_8BIT_SIZE,
                 is_paged=False, **kwargs):
        if is_paged:
            raise ValueError("is_paged=True: paged optimizer states (bitsandbytes' unified-memory "
                             "paging) are not supported; 8-bit states already take ~3 bytes per "
                             "param")
        if "state_dtype" in kwargs:
            raise TypeError("AdEMAMix8bit stores 8-bit states; use AdEMAMix(state_dtype=...) for "
                            "another state dtype")
        super().__init__(params, lr=lr, betas=betas, alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3,
                         eps=eps, weight_decay=weight_decay, state_dtype="8bit",
                         min_8bit_size=min_8bit_size, **kwargs)

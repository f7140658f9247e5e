"""Shared helpers for the tests: backend/device support, data generation, comparisons.

Tolerances (SPEC.md, "Numerics"), and why they hold:

- FP32_RTOL = 1e-5, norm-wise per tensor (||out - ref|| / ||ref||) for fp32 kernels against the
  float64 reference over >= 20 free-running steps. One step rounds each stored value a handful of
  times in fp32 (about 4 roundings of 2**-24 = 6e-8 each, with the host passing 1 - beta and the bias
  corrections accurate to fp32), so one step adds <= 2.4e-7 relative error to a state; over 25
  steps even a worst-case linear accumulation gives 25 * 2.4e-7 = 6e-6 < 1e-5, and the data are
  built so that no sum cancels (each gradient element keeps its sign; params start at magnitudes
  in [1, 2] and move by < 0.5), which keeps the condition number of every accumulated quantity
  below ~2. Measured: <= 1.2e-6 on the torch backends.
- FP64_RTOL = 1e-12 for fp64 params on the torch backends: the same bound with 2**-53 in place of
  2**-24 is ~1e-14; 1e-12 leaves room for a different but exact-in-double order of operations and
  still catches any formula difference (the smallest term of the update, eps = 1e-8 against a
  denominator of ~1e-2, moves params by ~1e-6 relative).
- bf16/fp16 params (teacher forced, one step at a time): the new param within 1 ulp of the param
  dtype at the exact result (round to nearest gives <= 0.5 ulp; the Triton interpreter truncates,
  giving < 1 ulp), plus the fp32 error made before the final rounding: ~4 roundings of 2**-24 of
  |p_old| + |lr * update| (this matters only where p lands near zero and its ulp becomes tiny).
  States are fp32 there and get FP32_STEP_RTOL = 1e-5 for a single step (the bound above is 2.4e-7).
"""
import contextlib
import importlib.util
import math
import os
from dataclasses import dataclass, field

import pytest
import torch

import ademamix_cuda
from reference import ReferenceAdEMAMix, reference_step

BACKENDS = ("single", "foreach", "cuda", "triton")
KERNEL_BACKENDS = ("cuda", "triton")
TORCH_BACKENDS = ("single", "foreach")
STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()
DEVICES = ("cpu", "cuda")

FP32_RTOL = 1e-5
FP64_RTOL = 1e-12
FP32_STEP_RTOL = 1e-5

# param dtypes each backend supports (CONTRACT.md: kernels take fp32 | bf16 | fp16; fp64 params
# only on the pure torch paths)
DTYPES = {
    "single": (torch.float64, torch.float32, torch.bfloat16),
    "foreach": (torch.float64, torch.float32, torch.bfloat16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
}
LOW_PRECISION = (torch.bfloat16, torch.float16)
_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23, torch.float64: 52}


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def extension_built():
    return importlib.util.find_spec("ademamix_cuda._C") is not None


def triton_installed():
    return importlib.util.find_spec("triton") is not None


def environment_skip_reason(backend, device="cpu"):
    """Why this machine cannot run (backend, device), or None. Only missing hardware or software."""
    if device == "cuda" and not HAS_CUDA:
        return "needs a CUDA device (torch.cuda.is_available() is False)"
    if backend == "cuda" and not extension_built():
        return "the CUDA extension ademamix_cuda._C is not built (pip install --no-build-isolation -e .)"
    if backend == "triton":
        if not triton_installed():
            return "triton is not installed"
        if device == "cpu" and not TRITON_INTERPRETED:
            return ("Triton runs CPU tensors only under TRITON_INTERPRET=1 "
                    "(this run compiles Triton for the GPU)")
        if device == "cuda" and TRITON_INTERPRETED:
            return "TRITON_INTERPRET=1 is set: GPU Triton cases need compiled Triton"
    return None


def require_backend(backend, device="cpu"):
    """Skip for a missing GPU/extension/triton; otherwise the package must report the backend usable."""
    reason = environment_skip_reason(backend, device)
    if reason is not None:
        pytest.skip(reason)
    ok, why = ademamix_cuda.backends.available()[backend]
    # not a skip: the software is here, so "unavailable" would be a package bug
    assert ok, f"backend {backend!r} reported unavailable although its requirements are present: {why}"


def requires_gpu(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")(fn))


@contextlib.contextmanager
def cpu_gpu_blocks():
    """The op's CPU calls run the GPU stand-in (the CUDA kernel's block function, blocks in a
    shuffled order) instead of the fast CPU kernel."""
    old = torch.ops.ademamix._cpu_gpu_blocks(True)
    try:
        yield
    finally:
        torch.ops.ademamix._cpu_gpu_blocks(old)


def backend_params(devices=DEVICES, dtypes=None, backends=BACKENDS):
    """pytest.param list of (backend, device, dtype) for the supported combinations."""
    out = []
    for backend in backends:
        for device in devices:
            for dtype in DTYPES[backend]:
                if dtypes is not None and dtype not in dtypes:
                    continue
                out.append(pytest.param(backend, device, dtype,
                                        id=f"{backend}-{device}-{dtype_name(dtype)}"))
    return out


# ---------------------------------------------------------------------------------------------
# data

def _signed_uniform(shape, lo, hi, gen):
    mag = lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return sign * mag


def make_param_values(shapes, seed, lo=1.0, hi=2.0):
    """float64 CPU values, |x| in [lo, hi] with random signs (kept away from 0, see module doc)."""
    gen = torch.Generator().manual_seed(seed)
    return [_signed_uniform(s, lo, hi, gen) for s in shapes]


class GradSource:
    """Fresh random gradients every step: g = s * (d + 0.5 * randn).

    randn is drawn anew each step and s = 10**U(-2, 1) varies per tensor and step (magnitudes from
    1e-2 to 10); d is a fixed per-element offset with |d| in [1, 2], so each element's gradient keeps
    its sign and the EMAs never cancel to ~0 (which would make a relative comparison ill-conditioned
    for the 1-element tensors).
    """

    def __init__(self, shapes, seed):
        self.shapes = [tuple(s) for s in shapes]
        self.gen = torch.Generator().manual_seed(seed)
        self.offsets = [_signed_uniform(s, 1.0, 2.0, self.gen) for s in self.shapes]

    def next(self):
        out = []
        for shape, d in zip(self.shapes, self.offsets):
            s = 10.0 ** (-2.0 + 3.0 * torch.rand((), generator=self.gen, dtype=torch.float64).item())
            out.append(s * (d + 0.5 * torch.randn(shape, generator=self.gen, dtype=torch.float64)))
        return out


def random_states(shapes, seed, beta1_zero=False):
    """Non-zero states to start from, so a kernel that ignores what it reads is caught."""
    gen = torch.Generator().manual_seed(seed)
    m1 = None if beta1_zero else [0.3 * _signed_uniform(s, 1.0, 2.0, gen) for s in shapes]
    m2 = [0.05 * _signed_uniform(s, 1.0, 2.0, gen) for s in shapes]
    nu = [0.5 + torch.rand(s, generator=gen, dtype=torch.float64) for s in shapes]
    return m1, m2, nu


# ---------------------------------------------------------------------------------------------
# comparisons

def rel_err(actual, expected):
    a = actual.detach().to("cpu", torch.float64)
    e = expected.detach().to("cpu", torch.float64)
    den = e.norm().item()
    num = (a - e).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def assert_rel_close(actual, expected, rtol, what):
    assert actual is not None, f"{what}: missing"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    a = actual.detach().to("cpu", torch.float64)
    assert not torch.isnan(a).any(), f"{what}: NaN in the output"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


def ulp(x64, dtype):
    """Spacing of `dtype` at the magnitude of the float64 values x64 (subnormal spacing near 0)."""
    bits = _MANTISSA_BITS[dtype]
    finfo = torch.finfo(dtype)
    ax = x64.abs()
    _, e = torch.frexp(ax)  # ax = m * 2**e, m in [0.5, 1): the binade starts at 2**(e - 1)
    spacing = torch.ldexp(torch.ones_like(ax), (e - 1 - bits).to(torch.float64))
    sub = finfo.smallest_normal * 2.0 ** -bits
    return torch.where(ax < finfo.smallest_normal, torch.full_like(ax, sub), spacing)


def assert_within_ulp(actual, expected64, dtype, slack64, what):
    """|actual - expected| <= 1 ulp(dtype) at expected + slack64 (the fp32 error before rounding)."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    a = actual.detach().to("cpu", torch.float64)
    assert tuple(a.shape) == tuple(expected64.shape), f"{what}: shape mismatch"
    assert not torch.isnan(a).any(), f"{what}: NaN in the output"
    diff = (a - expected64).abs()
    bound = ulp(expected64, dtype) + slack64
    bad = diff > bound
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements beyond 1 ulp; first at flat index {i}: "
            f"got {a.flatten()[i].item()!r}, reference {expected64.flatten()[i].item()!r}, "
            f"ulp {ulp(expected64, dtype).flatten()[i].item():.3e}")


def fp32_slack(p_old64, p_new64):
    # ~4 fp32 roundings of the operands of p - lr * update before the final rounding to the dtype
    return 4 * 2.0 ** -24 * (p_old64.abs() + (p_new64 - p_old64).abs())


def bits_equal(a, b):
    """Bitwise equality (NaN-safe) of two tensors of the same dtype/shape."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    view = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
    return torch.equal(a.detach().contiguous().view(view).cpu(), b.detach().contiguous().view(view).cpu())


# ---------------------------------------------------------------------------------------------
# optimizer inputs (in the spirit of torch's OptimizerInput)

PARAM_SHAPES = ((), (0,), (1,), (3,), (4097,), (33, 65), (70001,))


def param_shapes(backend, device, dtype):
    """PARAM_SHAPES, except for the Triton interpreter with bf16/fp16 params (~2.6 s per 1e6
    elements there): the > 65536-element tensor becomes 16385 elements, which still spans two
    16384-element chunks. fp32 keeps 70001 on every backend; on a GPU every dtype does."""
    if backend == "triton" and device == "cpu" and dtype in LOW_PRECISION:
        return PARAM_SHAPES[:-1] + ((16385,),)
    return PARAM_SHAPES


@dataclass
class OptimizerInput:
    desc: str
    kwargs: dict
    # per-group overrides: list of (indices of PARAM_SHAPES, dict); None = one group of all params
    groups: list = None
    lr_tensor: bool = False
    beta1_zero_params: tuple = field(default_factory=tuple)

    def build_kwargs(self, device):
        kw = dict(self.kwargs)
        if self.lr_tensor:
            kw["lr"] = torch.tensor(kw.get("lr", 1e-3), dtype=torch.float32, device=device)
        return kw

    def build_groups(self, params):
        if self.groups is None:
            return list(params)
        return [dict(over, params=[params[i] for i in idx]) for idx, over in self.groups]


OPTIMIZER_INPUTS = [
    OptimizerInput("default", {}),
    OptimizerInput("weight_decay", {"lr": 1e-2, "weight_decay": 0.1}),
    # eps comparable to sqrt(nu) for the 1e-2 gradients: shows where eps enters the denominator
    OptimizerInput("large_eps", {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01}),
    # beta3 = 0.99 and alpha = 5 make the slow EMA a large part of the update, so alpha_t and
    # beta3_t errors show in the params; both schedules end inside the run
    OptimizerInput("warmups", {"lr": 1e-2, "betas": (0.9, 0.999, 0.99), "alpha": 5.0,
                               "beta3_warmup": 7, "alpha_warmup": 5, "weight_decay": 0.1}),
    OptimizerInput("beta1_zero", {"lr": 1e-2, "betas": (0.0, 0.999, 0.995), "alpha": 4.0,
                                  "beta3_warmup": 6, "weight_decay": 0.1},
                   beta1_zero_params=tuple(range(len(PARAM_SHAPES)))),
    OptimizerInput("tensor_lr", {"lr": 1e-2, "betas": (0.9, 0.99, 0.995), "alpha_warmup": 10,
                                 "weight_decay": 0.1}, lr_tensor=True),
    OptimizerInput("maximize", {"lr": 1e-2, "betas": (0.9, 0.99, 0.999), "weight_decay": 0.1,
                                "maximize": True}),
    OptimizerInput(
        "param_groups", {"lr": 1e-2, "weight_decay": 0.1},
        groups=[
            ((0, 1, 2), {}),
            ((3, 4), {"lr": 3e-3, "betas": (0.8, 0.99, 0.99), "alpha": 6.0, "alpha_warmup": 4,
                      "beta3_warmup": 9, "eps": 1e-6, "weight_decay": 0.0}),
            ((5, 6), {"lr": 5e-3, "betas": (0.0, 0.99, 0.995), "alpha": 3.0, "weight_decay": 0.05}),
        ],
        beta1_zero_params=(5, 6)),
]


def reference_kwargs(kwargs):
    """Our constructor kwargs minus the ones ReferenceAdEMAMix does not take."""
    return {k: v for k, v in kwargs.items()
            if k not in ("backend", "max_grad_norm", "norm_type")}


def make_pair(shapes, dtype, device, backend, kwargs, seed, groups_fn=None, lo=1.0, hi=2.0):
    """(params, opt, ref_params, ref): ours on `dtype`/`device`, the reference on float64 copies."""
    values = make_param_values(shapes, seed, lo, hi)
    params = [torch.nn.Parameter(v.to(dtype).to(device)) for v in values]
    ref_params = [torch.nn.Parameter(p.detach().to("cpu", torch.float64).clone()) for p in params]
    groups_fn = groups_fn or (lambda ps: list(ps))
    opt = ademamix_cuda.AdEMAMix(groups_fn(params), backend=backend, **kwargs)
    ref_kw = dict(kwargs)
    if isinstance(ref_kw.get("lr"), torch.Tensor):
        ref_kw["lr"] = ref_kw["lr"].detach().cpu().clone()
    ref = ReferenceAdEMAMix(groups_fn(ref_params), **reference_kwargs(ref_kw))
    return params, opt, ref_params, ref


def set_grads(params, ref_params, grads64):
    """Give ours the gradients in the param dtype, and the reference exactly the same (rounded) values."""
    for p, rp, g in zip(params, ref_params, grads64):
        p.grad = g.to(p.dtype).to(p.device)
        rp.grad = p.grad.detach().to("cpu", torch.float64).clone()


def sync_reference(params, opt, ref_params, ref):
    """Teacher forcing: copy our current params and states into the float64 reference."""
    with torch.no_grad():
        for p, rp in zip(params, ref_params):
            rp.copy_(p.detach().to("cpu", torch.float64))
            st = opt.state.get(p, {})
            if len(st) == 0:
                ref.state[rp] = {}
                continue
            ref.state[rp] = {
                "step": int(st["step"]),
                "exp_avg_fast": (None if st["exp_avg_fast"] is None
                                 else st["exp_avg_fast"].detach().to("cpu", torch.float64).clone()),
                "exp_avg_slow": st["exp_avg_slow"].detach().to("cpu", torch.float64).clone(),
                "exp_avg_sq": st["exp_avg_sq"].detach().to("cpu", torch.float64).clone(),
            }


def expected_state_dtype(param_dtype):
    return torch.float32 if param_dtype in LOW_PRECISION else param_dtype


def check_state_layout(p, st, backend, t, beta1_zero, what):
    """CONTRACT.md state layout after t steps."""
    assert set(st) >= {"step", *STATE_KEYS}, f"{what}: state keys {sorted(st)}"
    step = st["step"]
    assert isinstance(step, torch.Tensor) and step.dim() == 0 and step.dtype == torch.float32, (
        f"{what}: state['step'] must be a 0-d float32 tensor, got {step!r}")
    want_dev = p.device if backend in KERNEL_BACKENDS else torch.device("cpu")
    assert step.device == want_dev, f"{what}: step on {step.device}, expected {want_dev}"
    assert float(step) == t, f"{what}: step {float(step)} != {t}"
    if beta1_zero:
        assert st["exp_avg_fast"] is None, f"{what}: exp_avg_fast must be None when beta1 == 0"
    for k in STATE_KEYS:
        if beta1_zero and k == "exp_avg_fast":
            continue
        s = st[k]
        assert s.shape == p.shape, f"{what}: {k} shape {tuple(s.shape)} != {tuple(p.shape)}"
        assert s.dtype == expected_state_dtype(p.dtype), f"{what}: {k} dtype {s.dtype}"
        assert s.device == p.device, f"{what}: {k} on {s.device}, param on {p.device}"


def compare_to_reference(params, opt, ref_params, ref, dtype, rtol, what, teacher_forced=False,
                         old_params64=None):
    """Params and every state of ours against the reference, after the same step."""
    for i, (p, rp) in enumerate(zip(params, ref_params)):
        st, rst = opt.state[p], ref.state[rp]
        tag = f"{what} param[{i}] shape {tuple(p.shape)}"
        if teacher_forced:
            assert_within_ulp(p, rp.detach(), dtype, fp32_slack(old_params64[i], rp.detach()),
                              f"{tag} param")
        else:
            assert_rel_close(p, rp.detach(), rtol, f"{tag} param")
        assert int(float(st["step"])) == rst["step"], f"{tag}: step {st['step']} != {rst['step']}"
        for k in STATE_KEYS:
            if rst[k] is None:
                assert st[k] is None, f"{tag}: {k} should be None"
                continue
            assert_rel_close(st[k], rst[k], FP32_STEP_RTOL if teacher_forced else rtol, f"{tag} {k}")


def snapshot(params, opt):
    """Deep copy of params and optimizer state, for 'nothing changed' checks."""
    return ([p.detach().clone() for p in params],
            {id(p): {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v)
                     for k, v in opt.state[p].items()} for p in params if p in opt.state})


def assert_unchanged(params, opt, snap, what):
    before_params, before_state = snap
    for i, (p, b) in enumerate(zip(params, before_params)):
        assert bits_equal(p.detach(), b), f"{what}: param[{i}] changed"
    after_state = {id(p): opt.state[p] for p in params if p in opt.state and len(opt.state[p])}
    assert set(after_state) <= set(before_state), f"{what}: state created for a param"
    for pid, st in before_state.items():
        now = opt.state.get(next(p for p in params if id(p) == pid), {})
        assert set(now) == set(st), f"{what}: state keys changed {sorted(st)} -> {sorted(now)}"
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert isinstance(now[k], torch.Tensor) and bits_equal(now[k], v), (
                    f"{what}: state {k!r} changed")
            else:
                assert now[k] == v, f"{what}: state {k!r} changed"


# ---------------------------------------------------------------------------------------------
# functional-API inputs


class Lists:
    """Functional-API tensor lists (random non-zero states) and their float64 reference copies."""

    def __init__(self, shapes, dtype, device, seed, beta1_zero=False, start_step=0,
                 step_device=None):
        values = make_param_values(shapes, seed, 1.0, 2.0)
        m1, m2, nu = random_states(shapes, seed + 1, beta1_zero)
        self.params = [v.to(dtype).to(device) for v in values]
        self.m1 = [] if beta1_zero else [v.float().to(device) for v in m1]
        self.m2 = [v.float().to(device) for v in m2]
        self.nu = [v.float().to(device) for v in nu]
        step_device = step_device or device
        self.steps = [torch.tensor(float(start_step), device=step_device) for _ in shapes]
        self.ref = [[t.detach().to("cpu", torch.float64).clone() for t in lst]
                    for lst in (self.params, self.m1, self.m2, self.nu)]
        self.ref_t = [start_step] * len(shapes)
        self.beta1_zero = beta1_zero

    def args(self, grads):
        return (self.params, grads, self.m1, self.m2, self.nu, self.steps)

    def tensors(self):
        return [*self.params, *self.m1, *self.m2, *self.nu, *self.steps]

    def reference_step(self, grads, grad_scale=None, **hyper):
        rp, rm1, rm2, rnu = self.ref
        for i in range(len(rp)):
            rp[i], m1, rm2[i], rnu[i], self.ref_t[i] = reference_step(
                rp[i], grads[i].cpu(), None if self.beta1_zero else rm1[i], rm2[i], rnu[i], self.ref_t[i],
                grad_scale=grad_scale, **hyper)
            if not self.beta1_zero:
                rm1[i] = m1

    def check(self, rtol, what):
        for i in range(len(self.params)):
            tag = f"{what} tensor[{i}] shape {tuple(self.params[i].shape)}"
            step = float(self.steps[i])
            assert step == self.ref_t[i], f"{tag}: step {step} != {self.ref_t[i]}"
            assert_rel_close(self.params[i], self.ref[0][i], rtol, f"{tag} param")
            if not self.beta1_zero:
                assert_rel_close(self.m1[i], self.ref[1][i], rtol, f"{tag} exp_avg_fast")
            assert_rel_close(self.m2[i], self.ref[2][i], rtol, f"{tag} exp_avg_slow")
            assert_rel_close(self.nu[i], self.ref[3][i], rtol, f"{tag} exp_avg_sq")


def step_device_for(backend, device):
    return device if backend in KERNEL_BACKENDS else "cpu"

"""Bad input: each case raises a clear error (checked with match=) and changes nothing.

Where a case can follow a good step, it does: the state then exists, and a backend that caches
launch plans or tensor lists between steps must still check what it is given.
"""
import copy
import subprocess
import sys
import textwrap

import pytest
import torch

import ademamix_cuda
from helpers import (BACKENDS, KERNEL_BACKENDS, GradSource, assert_unchanged, bits_equal,
                     make_param_values, require_backend, snapshot)

SHAPES = ((4,), (3, 5))
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.999, alpha=2.0, beta3_warmup=None,
             alpha_warmup=None, eps=1e-8, weight_decay=0.1)


def stepped_optimizer(backend, n_steps=1, dtype=torch.float32):
    params = [torch.nn.Parameter(v.to(dtype)) for v in make_param_values(SHAPES, seed=71)]
    opt = ademamix_cuda.AdEMAMix(params, lr=1e-2, weight_decay=0.1, backend=backend)
    grads = GradSource(SHAPES, seed=72)
    for _ in range(n_steps):
        for p, g in zip(params, grads.next()):
            p.grad = g.to(dtype)
        opt.step()
    for p, g in zip(params, grads.next()):
        p.grad = g.to(dtype)
    return params, opt


class FunctionalCall:
    """A valid functional call on CPU tensors (random states), to be broken one argument at a time."""

    def __init__(self, backend, dtype=torch.float32, shapes=SHAPES):
        self.backend = backend
        vals = make_param_values(shapes, seed=81)
        gen = torch.Generator().manual_seed(82)
        self.params = [v.to(dtype) for v in vals]
        self.grads = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
        self.m1 = [torch.randn(s, generator=gen) for s in shapes]
        self.m2 = [torch.randn(s, generator=gen) for s in shapes]
        self.nu = [torch.rand(s, generator=gen) + 0.5 for s in shapes]
        self.steps = [torch.tensor(2.0) for _ in shapes]

    def lists(self):
        return [self.params, self.grads, self.m1, self.m2, self.nu, self.steps]

    def snapshot(self):
        return [[t.clone() for t in lst] for lst in (self.params, self.m1, self.m2, self.nu, self.steps)]

    def assert_unchanged(self, snap, what):
        for name, lst, before in zip(("params", "exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs",
                                      "state_steps"),
                                     (self.params, self.m1, self.m2, self.nu, self.steps), snap):
            for i, (t, b) in enumerate(zip(lst, before)):
                if t.device.type == "meta":
                    continue
                assert bits_equal(t, b), f"{what}: {name}[{i}] changed"

    def __call__(self, **overrides):
        kw = dict(HYPER, backend=self.backend)
        kw.update(overrides)
        ademamix_cuda.functional.ademamix(self.params, self.grads, self.m1, self.m2, self.nu,
                                          self.steps, **kw)


# ---------------------------------------------------------------------------------------------
# tensors


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_grad(backend):
    require_backend(backend)
    params, opt = stepped_optimizer(backend)
    p = params[1]
    idx = torch.tensor([[0, 2], [1, 4]])
    p.grad = torch.sparse_coo_tensor(idx, torch.tensor([1.0, -2.0]), p.shape)
    snap = snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"(?i)sparse"):
        opt.step()
    assert_unchanged(params, opt, snap, "sparse grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_complex_param(backend):
    require_backend(backend)
    real = torch.nn.Parameter(torch.randn(4))
    cplx = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    real.grad = torch.randn(4)
    cplx.grad = torch.randn(3, dtype=torch.complex64)
    before = [real.detach().clone(), cplx.detach().clone()]
    with pytest.raises((TypeError, ValueError, RuntimeError), match=r"(?i)complex"):
        opt = ademamix_cuda.AdEMAMix([real, cplx], backend=backend)
        opt.step()
    assert bits_equal(real.detach(), before[0]) and bits_equal(cplx.detach(), before[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_on_different_devices(backend):
    """One functional call with a cpu and a meta param: refused before anything runs."""
    require_backend(backend)
    call = FunctionalCall(backend)
    s = SHAPES[1]
    call.params[1] = torch.empty(s, device="meta")
    call.grads[1] = torch.empty(s, device="meta")
    call.m1[1] = torch.empty(s, device="meta")
    call.m2[1] = torch.empty(s, device="meta")
    call.nu[1] = torch.empty(s, device="meta")
    snap = call.snapshot()
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)device|meta"):
        call()
    call.assert_unchanged(snap, "mixed devices")


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_fast_ema_with_nonzero_beta1(backend):
    """beta1 != 0 needs an exp_avg_fast for every param: a None among them is refused up front."""
    require_backend(backend)
    call = FunctionalCall(backend)
    fasts = call.m1
    call.m1 = [fasts[0], None] + fasts[2:]
    snap = [[t.clone() for t in lst] for lst in (call.params, fasts, call.m2, call.nu, call.steps)]
    with pytest.raises(ValueError, match=r"(?i)exp_avg_fast.*beta1"):
        call()
    call.m1 = fasts
    call.assert_unchanged(snap, "a None exp_avg_fast")


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "after_a_good_call"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_shape_mismatch(backend, cached):
    require_backend(backend)
    call = FunctionalCall(backend)
    if cached:
        call()  # a good call first: cached launch plans must not skip the check
    good = call.grads[1]
    # same storage and element count as the good grad, wrong shape (3, 5) -> (5, 3)
    call.grads[1] = good.view(5, 3)
    snap = call.snapshot()
    with pytest.raises((RuntimeError, ValueError), match=r"(?i)shape|match"):
        call()
    call.assert_unchanged(snap, "grad shape mismatch")


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "after_a_good_call"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_dtype_mismatch(backend, cached):
    require_backend(backend)
    call = FunctionalCall(backend)
    if cached:
        call()
    good = call.grads[1]
    # bf16 grad for an fp32 param, sharing the good grad's storage start and element count
    call.grads[1] = good.view(torch.bfloat16).view(-1)[:good.numel()].view(good.shape)
    assert call.grads[1].data_ptr() == good.data_ptr()
    snap = call.snapshot()
    with pytest.raises((RuntimeError, TypeError, ValueError), match=r"(?i)dtype|match|float"):
        call()
    call.assert_unchanged(snap, "grad dtype mismatch")


# Ways one call can name the same memory twice where the step writes it. Each edits a call on
# SAME_SHAPES in place: entries 0 and 1 have one shape, so any list may repeat across them.
SAME_SHAPES = ((4,), (4,), (3, 5))


def _overlapping_params(call):
    buf = torch.cat([call.params[0], call.params[1][:2]])
    call.params[0], call.params[1] = buf[:4], buf[2:6]  # two views sharing two elements


SHARED_MEMORY = {
    "step_listed_twice": lambda c: c.steps.__setitem__(1, c.steps[0]),
    "param_listed_twice": lambda c: c.params.__setitem__(1, c.params[0]),
    "exp_avg_fast_shared": lambda c: c.m1.__setitem__(1, c.m1[0]),
    "exp_avg_slow_shared": lambda c: c.m2.__setitem__(1, c.m2[0]),
    "exp_avg_sq_is_a_param": lambda c: c.nu.__setitem__(0, c.params[1]),
    "grad_is_another_param": lambda c: c.grads.__setitem__(1, c.params[0]),
    "overlapping_param_views": _overlapping_params,
}


@pytest.mark.parametrize("case", SHARED_MEMORY)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_memory_in_one_call(backend, case):
    """Anything the step writes, listed twice or overlapping another tensor of the call, is
    refused (on a GPU the blocks would race, and a shared step count would be counted anywhere
    from once to n times), in every backend, also after a good call has cached a plan."""
    require_backend(backend)
    call = FunctionalCall(backend, shapes=SAME_SHAPES)
    call()
    SHARED_MEMORY[case](call)
    snap = call.snapshot()
    with pytest.raises(RuntimeError, match=r"(?i)share memory"):
        call()
    call.assert_unchanged(snap, case)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_grads_are_allowed(backend):
    """Grads are only read: two params may share one grad tensor (their states stay apart)."""
    require_backend(backend)
    call = FunctionalCall(backend, shapes=SAME_SHAPES)
    call.grads[1] = call.grads[0]
    twin = FunctionalCall(backend, shapes=SAME_SHAPES)
    twin.grads[1] = twin.grads[0].clone()
    for _ in range(3):
        call()
        twin()
    for mine, theirs in zip(call.snapshot(), twin.snapshot()):
        for a, b in zip(mine, theirs):
            assert bits_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_listed_twice_in_a_group(backend):
    """torch only warns about a duplicated param; the optimizer refuses to step it (the two
    entries would share one state) and creates no state."""
    require_backend(backend)
    params = [torch.nn.Parameter(v.float()) for v in make_param_values(SAME_SHAPES, seed=73)]
    with pytest.warns(UserWarning, match=r"(?i)duplicate"):
        opt = ademamix_cuda.AdEMAMix([params[0], params[1], params[0]], backend=backend)
    for p, g in zip(params, GradSource(SAME_SHAPES, seed=74).next()):
        p.grad = g.float()
    snap = snapshot(params, opt)
    with pytest.raises(RuntimeError, match=r"(?i)share memory"):
        opt.step()
    assert_unchanged(params, opt, snap, "duplicated param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_shape_mismatch_in_loaded_state_dict(backend):
    require_backend(backend)
    params, opt = stepped_optimizer(backend, n_steps=2)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_sq"] = torch.ones(15)  # param 1 is (3, 5): same numel, wrong shape
    snap = snapshot(params, opt)
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)shape"):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap, "wrong-shape state")
    opt.step()  # still usable, with its own state
    assert int(float(opt.state[params[1]]["step"])) == 3


# ---------------------------------------------------------------------------------------------
# hyperparameters

BAD_HYPER = [
    ("lr", {"lr": -1e-3}, r"(?i)learning rate|\blr\b"),
    ("eps", {"eps": -1e-8}, r"(?i)eps"),
    ("beta1_neg", {"betas": (-0.1, 0.999, 0.9999)}, r"(?i)beta"),
    ("beta1_one", {"betas": (1.0, 0.999, 0.9999)}, r"(?i)beta"),
    ("beta2_neg", {"betas": (0.9, -0.1, 0.9999)}, r"(?i)beta"),
    ("beta2_one", {"betas": (0.9, 1.0, 0.9999)}, r"(?i)beta"),
    ("beta3_neg", {"betas": (0.9, 0.999, -0.1)}, r"(?i)beta"),
    ("beta3_one", {"betas": (0.9, 0.999, 1.0)}, r"(?i)beta"),
    ("alpha", {"alpha": -1.0}, r"(?i)alpha"),
    ("weight_decay", {"weight_decay": -0.1}, r"(?i)weight.?decay"),
    ("beta3_warmup_zero", {"beta3_warmup": 0}, r"(?i)beta3_warmup"),
    ("beta3_warmup_neg", {"beta3_warmup": -5}, r"(?i)beta3_warmup"),
    ("alpha_warmup_zero", {"alpha_warmup": 0}, r"(?i)alpha_warmup"),
    ("alpha_warmup_neg", {"alpha_warmup": -5}, r"(?i)alpha_warmup"),
]


@pytest.mark.parametrize("name,kwargs,match", BAD_HYPER, ids=[b[0] for b in BAD_HYPER])
def test_bad_hyperparameter_in_constructor(name, kwargs, match):
    p = torch.nn.Parameter(torch.randn(4))
    before = p.detach().clone()
    with pytest.raises(ValueError, match=match):
        ademamix_cuda.AdEMAMix([p], **kwargs)
    assert bits_equal(p.detach(), before)


@pytest.mark.parametrize("name,kwargs,match", BAD_HYPER, ids=[b[0] for b in BAD_HYPER])
def test_bad_hyperparameter_in_added_group(name, kwargs, match):
    params, opt = stepped_optimizer("single")
    extra = torch.nn.Parameter(torch.randn(4))
    n_groups = len(opt.param_groups)
    snap = snapshot(params, opt)
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": [extra], **kwargs})
    assert len(opt.param_groups) == n_groups, "the bad group was kept"
    assert_unchanged(params, opt, snap, f"bad {name} in add_param_group")


def _functional_kwargs(kwargs):
    out = {}
    for k, v in kwargs.items():
        if k == "betas":
            out.update(beta1=v[0], beta2=v[1], beta3=v[2])
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("name,kwargs,match", BAD_HYPER, ids=[b[0] for b in BAD_HYPER])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_hyperparameter_in_functional(backend, name, kwargs, match):
    require_backend(backend)
    call = FunctionalCall(backend)
    snap = call.snapshot()
    with pytest.raises(ValueError, match=match):
        call(**_functional_kwargs(kwargs))
    call.assert_unchanged(snap, f"bad {name}")


def test_unknown_backend_in_constructor():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    before = p.detach().clone()
    with pytest.raises(ValueError, match=r"(?i)backend.*no_such_backend"):
        opt = ademamix_cuda.AdEMAMix([p], backend="no_such_backend")
        opt.step()
    assert bits_equal(p.detach(), before)


def test_unknown_backend_in_functional():
    call = FunctionalCall("no_such_backend")
    snap = call.snapshot()
    with pytest.raises(ValueError, match=r"(?i)backend.*no_such_backend"):
        call()
    call.assert_unchanged(snap, "unknown backend")


# An explicit kernel backend whose software is missing: run in a fresh interpreter where the
# extension and triton cannot be imported (whatever this machine has), so the package's own
# availability logic decides.
_MISSING_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.modules["ademamix_cuda._C"] = None   # import of the extension fails
    sys.modules["triton"] = None             # import of triton fails
    import torch, ademamix_cuda
    backend = sys.argv[1]
    ok, why = ademamix_cuda.backends.available("cpu")[backend]
    assert not ok, f"{backend} reported available without its software: {why}"
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    before = p.detach().clone()
    opt = None
    try:
        opt = ademamix_cuda.AdEMAMix([p], backend=backend)
        opt.step()
    except (RuntimeError, ValueError, ImportError) as e:
        assert torch.equal(p.detach(), before), "param changed"
        assert opt is None or all(len(s) == 0 for s in opt.state.values()), "state created"
        print("ERROR:", type(e).__name__, e)
    else:
        raise SystemExit(f"explicit backend {backend!r} without its software did not raise")
""")


@pytest.mark.parametrize("backend,missing", [("cuda", r"(?i)extension|_C"), ("triton", r"(?i)triton")])
def test_explicit_backend_that_cannot_run(backend, missing):
    r = subprocess.run([sys.executable, "-c", _MISSING_SCRIPT, backend], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"stdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR:")
    import re

    assert re.search(missing, line), f"the error does not name what is missing: {line}"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_explicit_backend_unavailable_monkeypatched(backend, monkeypatch):
    """Same, in-process: availability patched to 'missing' makes an explicit backend raise."""
    reason = f"{backend} is missing here (patched by the test)"
    real_why_not = ademamix_cuda.backends.why_not

    def why_not(name, device):
        return reason if name == backend else real_why_not(name, device)

    monkeypatch.setattr(ademamix_cuda.backends, "why_not", why_not)
    assert ademamix_cuda.backends.available("cpu")[backend] == (False, reason)
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"patched by the test"):
        opt = ademamix_cuda.AdEMAMix([p], backend=backend)
        opt.step()
    assert bits_equal(p.detach(), before)

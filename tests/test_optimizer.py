"""The optimizer class: closure, zero_grad, params without grads, per-group hyperparameters,
defaults and aliases, `python -m ademamix_cuda.info`, importing without triton or the extension."""
import subprocess
import sys
import textwrap

import pytest
import torch

import ademamix_cuda
from helpers import (BACKENDS, FP32_RTOL, GradSource, bits_equal, compare_to_reference,
                     make_pair, make_param_values, require_backend, set_grads)
from reference import ReferenceAdEMAMix


def test_defaults_are_the_authors():
    p = torch.nn.Parameter(torch.randn(3))
    g = ademamix_cuda.AdEMAMix([p]).param_groups[0]
    r = ReferenceAdEMAMix([torch.nn.Parameter(torch.randn(3))]).param_groups[0]
    for key in ("lr", "betas", "alpha", "beta3_warmup", "alpha_warmup", "eps", "weight_decay"):
        assert g[key] == r[key], f"default {key}: {g[key]!r} != the authors' {r[key]!r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_returns_loss_and_steps(backend):
    require_backend(backend)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in model.parameters()]
    opt = ademamix_cuda.AdEMAMix(model.parameters(), lr=1e-2, backend=backend)
    ref = ReferenceAdEMAMix(ref_params, lr=1e-2)
    x = torch.randn(10, 6)
    calls = []

    def closure():
        opt.zero_grad()
        loss = model(x).square().sum()
        loss.backward()
        calls.append(loss.detach().clone())
        return loss

    for k in range(20):
        loss = opt.step(closure)
        assert torch.equal(loss.detach(), calls[-1]), "step(closure) must return the closure's loss"
        for p, rp in zip(model.parameters(), ref_params):
            rp.grad = p.grad.detach().double()
        ref.step()
        compare_to_reference(list(model.parameters()), opt, ref_params, ref, torch.float32,
                             FP32_RTOL, f"closure step {k + 1}")
    assert len(calls) == 20
    assert opt.step() is None  # no closure: returns None


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_grad(backend):
    require_backend(backend)
    params = [torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(2, 3))]
    opt = ademamix_cuda.AdEMAMix(params, backend=backend)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in params)


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_without_grad_are_skipped(backend):
    """A param without grad: untouched, no state created; the others step as the reference does,
    also when the set of params with grads changes between steps."""
    require_backend(backend)
    shapes = ((5,), (3, 4), (7,))
    params, opt, ref_params, ref = make_pair(shapes, torch.float32, "cpu", backend,
                                             {"lr": 1e-2, "weight_decay": 0.1}, seed=181)
    grads = GradSource(shapes, seed=182)
    idle_before = params[1].detach().clone()
    for k in range(1, 21):
        g = grads.next()
        set_grads(params, ref_params, g)
        with_grad = [0, 2] if k <= 10 else [0, 1, 2] if k % 3 else [1]
        for i in range(3):
            if i not in with_grad:
                params[i].grad = None
                ref_params[i].grad = None
        opt.step()
        ref.step()
        if k <= 10:
            assert params[1] not in opt.state or len(opt.state[params[1]]) == 0, "state created without grad"
            assert bits_equal(params[1].detach(), idle_before), "a param without grad changed"
        live = [i for i in range(3) if ref_params[i] in ref.state]
        compare_to_reference([params[i] for i in live], opt, [ref_params[i] for i in live], ref,
                             torch.float32, FP32_RTOL, f"step {k}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_group_hyperparameters(backend):
    """Two groups with different hyperparameters equal two separate reference optimizers."""
    require_backend(backend)
    shapes = ((5,), (3, 4))
    vals = make_param_values(shapes, seed=191)
    params = [torch.nn.Parameter(v.float()) for v in vals]
    g1 = {"lr": 1e-2, "betas": (0.9, 0.999, 0.99), "alpha": 5.0, "alpha_warmup": 4, "weight_decay": 0.1}
    g2 = {"lr": 3e-3, "betas": (0.0, 0.99, 0.995), "alpha": 2.0, "beta3_warmup": 6, "eps": 1e-6}
    opt = ademamix_cuda.AdEMAMix([{"params": [params[0]], **g1}, {"params": [params[1]], **g2}],
                                 backend=backend)
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    refs = [ReferenceAdEMAMix([ref_params[0]], **g1), ReferenceAdEMAMix([ref_params[1]], **g2)]
    grads = GradSource(shapes, seed=192)
    for k in range(1, 21):
        set_grads(params, ref_params, grads.next())
        opt.step()
        for r in refs:
            r.step()
        for i in range(2):
            compare_to_reference([params[i]], opt, [ref_params[i]], refs[i], torch.float32,
                                 FP32_RTOL, f"group {i} step {k}")
    assert opt.state[params[1]]["exp_avg_fast"] is None


def test_warmup_aliases():
    p = [torch.nn.Parameter(torch.randn(3))]
    a = ademamix_cuda.AdEMAMix(p, t_alpha=5, t_beta3=7).param_groups[0]
    b = ademamix_cuda.AdEMAMix(p, alpha_warmup=5, beta3_warmup=7).param_groups[0]
    assert (a["alpha_warmup"], a["beta3_warmup"]) == (5, 7)
    assert (b["alpha_warmup"], b["beta3_warmup"]) == (5, 7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_warmup_aliases_give_the_same_numbers(backend):
    require_backend(backend)
    shapes = ((6,), (2, 3))
    vals = make_param_values(shapes, seed=201)
    pa = [torch.nn.Parameter(v.float()) for v in vals]
    pb = [torch.nn.Parameter(v.float()) for v in vals]
    kw = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=5.0, backend=backend)
    oa = ademamix_cuda.AdEMAMix(pa, t_alpha=5, t_beta3=7, **kw)
    ob = ademamix_cuda.AdEMAMix(pb, alpha_warmup=5, beta3_warmup=7, **kw)
    grads = GradSource(shapes, seed=202)
    for _ in range(10):
        for x, y, g in zip(pa, pb, grads.next()):
            x.grad = g.float()
            y.grad = g.float()
        oa.step()
        ob.step()
    for x, y in zip(pa, pb):
        assert bits_equal(x.detach(), y.detach())


def test_info_names_every_backend():
    r = subprocess.run([sys.executable, "-m", "ademamix_cuda.info"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for name in BACKENDS:
        assert name in r.stdout, f"`python -m ademamix_cuda.info` does not mention {name!r}:\n{r.stdout}"


_IMPORT_WITHOUT = textwrap.dedent("""
    import sys
    for name in sys.argv[1:]:
        sys.modules[name] = None   # any import of it fails
    import torch, ademamix_cuda
    avail = ademamix_cuda.backends.available("cpu")
    p = torch.nn.Parameter(torch.randn(5))
    p.grad = torch.randn(5)
    opt = ademamix_cuda.AdEMAMix([p])           # backend="auto" must still work
    opt.step()
    assert opt.backend_used in ("single", "foreach", "cuda", "triton")
    for b in ("single", "foreach"):
        assert avail[b][0], avail[b]
    print({k: v[0] for k, v in avail.items()}, opt.backend_used)
""")


@pytest.mark.parametrize("missing,backend", [("triton", "triton"), ("ademamix_cuda._C", "cuda")])
def test_import_without_optional_parts(missing, backend):
    r = subprocess.run([sys.executable, "-c", _IMPORT_WITHOUT, missing], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"import without {missing} failed:\n{r.stderr}"
    avail = eval(r.stdout.strip().splitlines()[-1].rsplit(" ", 1)[0])
    assert avail[backend] is False, f"{backend} reported available without {missing}"

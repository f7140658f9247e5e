"""Gradient clipping fused into the step: the norm (one read of the grads) and the clipped step
against torch.nn.utils.clip_grad_norm_ followed by the float64 reference step, for every backend;
with GradScaler, non-finite grads, the max_grad_norm option and the functional API.

Tolerances: the norm is a sum of squares in fp32 (per thread, then in a tree over the threads
and chunks), at most ~64 terms deep for these tensors, so ~64 * 2**-24 = 4e-6 relative at worst
against float64: FP32_RTOL (1e-5). The clipped step multiplies each grad by 1 / (1 / coef)
instead of coef (two more roundings): the FP32_RTOL bound of the parity tests still holds.
"""
import math

import pytest
import torch

import ademamix_cuda
from ademamix_cuda.functional import ademamix, grad_norm
from helpers import (BACKENDS, FP32_RTOL, KERNEL_BACKENDS, GradSource, Lists, assert_rel_close,
                     bits_equal, dtype_name, make_pair, make_param_values, require_backend,
                     requires_gpu, set_grads)
from reference import ReferenceAdEMAMix

SHAPES = ((), (5,), (33, 65), (4097,), (40000,))
KWARGS = {"lr": 1e-2, "weight_decay": 0.1, "betas": (0.9, 0.999, 0.99), "alpha": 5.0}
# GradSource's grads on SHAPES have 2-norms from 25 to 2900: some steps clip, some do not.
MAX_NORM = 350.0


def _torch_norm(grads, norm_type):
    # torch has no inf-norm of an empty tensor; an empty grad adds nothing to any norm
    return torch.nn.utils.get_total_norm([g.double() for g in grads if g.numel()], norm_type)


# max_norm near the median of each norm over the 20 steps' grads
@pytest.mark.parametrize("norm_type,max_norm", [(2.0, 350.0), (math.inf, 10.0), (3.0, 90.0)],
                         ids=["l2", "inf", "l3"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_then_step_matches_torch(backend, norm_type, max_norm):
    """opt.clip_grad_norm_ + opt.step() == torch's clip_grad_norm_ + the reference step, params
    and every state, 20 steps; the returned norm is torch's; the grads are left untouched."""
    require_backend(backend)
    params, opt, ref_params, ref = make_pair(SHAPES, torch.float32, "cpu", backend, KWARGS,
                                             seed=401)
    grads = GradSource(SHAPES, seed=402)
    clipped = set()
    for k in range(1, 21):
        set_grads(params, ref_params, grads.next())
        before = [p.grad.clone() for p in params]
        norm = opt.clip_grad_norm_(max_norm, norm_type)
        opt.step()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm, norm_type)
        ref.step()
        clipped.add(bool(ref_norm > max_norm))
        assert norm.dtype == torch.float32 and norm.dim() == 0
        assert_rel_close(norm, ref_norm, FP32_RTOL, f"step {k} norm")
        for i, (p, rp, b) in enumerate(zip(params, ref_params, before)):
            assert bits_equal(p.grad, b), f"step {k}: grad[{i}] was changed"
            assert_rel_close(p, rp, FP32_RTOL, f"step {k} param[{i}]")
            for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                assert_rel_close(opt.state[p][key], ref.state[rp][key], FP32_RTOL,
                                 f"step {k} param[{i}] {key}")
    assert clipped == {True, False}, "the run must have steps that clip and steps that do not"


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_option_is_clip_grad_norm_at_every_step(backend):
    require_backend(backend)
    make = lambda **kw: make_pair(SHAPES, torch.float32, "cpu", backend, {**KWARGS, **kw},  # noqa: E731
                                  seed=411)[:2]
    params_a, opt_a = make(max_grad_norm=MAX_NORM, norm_type=math.inf)
    params_b, opt_b = make()
    grads = GradSource(SHAPES, seed=412)
    for k in range(8):
        g = grads.next()
        for pa, pb, x in zip(params_a, params_b, g):
            pa.grad, pb.grad = x.float(), x.float()
        opt_a.step()
        norm = opt_b.clip_grad_norm_(MAX_NORM, math.inf)
        opt_b.step()
        assert bits_equal(opt_a.last_grad_norm, norm) and bits_equal(opt_b.last_grad_norm, norm)
        for pa, pb in zip(params_a, params_b):
            assert bits_equal(pa.detach(), pb.detach()), f"step {k}"
            for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                assert bits_equal(opt_a.state[pa][key], opt_b.state[pb][key])


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_with_grad_scaler(backend):
    """GradScaler that does not unscale_ first: clip_grad_norm_ returns the norm of the scaled
    grads, step() clips the unscaled grads by the unscaled norm; an inf grad skips the step."""
    require_backend(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    params = list(model.parameters())
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    opt = ademamix_cuda.AdEMAMix(params, backend=backend, **KWARGS)
    ref = ReferenceAdEMAMix(ref_params, **KWARGS)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    max_norm = 2.5  # the grads of this loss have norms from 1.6 to 4.9 here
    clipped = set()
    for k in range(1, 16):
        opt.zero_grad()
        scale = scaler.get_scale()
        scaler.scale(model(torch.randn(8, 16)).square().mean() * 10).backward()
        inject = k == 6
        if inject:
            params[1].grad[0] = math.inf
        else:
            for p, rp in zip(params, ref_params):
                rp.grad = p.grad.detach().double() / scale
        norm = opt.clip_grad_norm_(max_norm)
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if inject:
            for p, b in zip(params, before):
                assert bits_equal(p.detach(), b), f"step {k}: inf grads must skip the step"
            continue
        ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, max_norm)
        clipped.add(bool(ref_norm > max_norm))
        assert_rel_close(norm / scale, ref_norm, FP32_RTOL, f"step {k} norm")
        ref.step()
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            assert_rel_close(p, rp, FP32_RTOL, f"step {k} param[{i}]")
    assert clipped == {True, False}


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_grad_is_clipped_like_torch(backend, value):
    """No GradScaler: a NaN grad makes the norm NaN and every clipped grad NaN; an inf grad makes
    it inf, the coefficient 0, the inf grad NaN and the others 0. The fused clip propagates that
    exactly as torch's clip_grad_norm_ followed by our step does."""
    require_backend(backend)
    runs = []
    for fused in (True, False):
        params, opt, _, _ = make_pair(SHAPES, torch.float32, "cpu", backend, KWARGS, seed=421)
        for p, g in zip(params, GradSource(SHAPES, seed=422).next()):
            p.grad = g.float()
        params[3].grad[17] = value
        if fused:
            opt.clip_grad_norm_(MAX_NORM)
        else:
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        runs.append([p.detach() for p in params])
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a.isnan(), b.isnan()), f"param[{i}]: NaN positions differ"
        assert_rel_close(a[~a.isnan()], b[~b.isnan()].double(), FP32_RTOL, f"param[{i}]")
    assert runs[0][3].isnan().any()


def test_error_if_nonfinite_refuses_and_clips_nothing():
    require_backend("foreach")
    params, opt, _, _ = make_pair(SHAPES, torch.float32, "cpu", "foreach", KWARGS, seed=431)
    for p, g in zip(params, GradSource(SHAPES, seed=432).next()):
        p.grad = g.float()
    params[0].grad.fill_(math.nan)
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.clip_grad_norm_(MAX_NORM, error_if_nonfinite=True)
    assert opt._clip is None


@pytest.mark.parametrize("max_norm,norm_type", [(0.0, 2.0), (-1.0, 2.0), (1.0, 0.0)],
                         ids=["zero", "negative", "norm_type"])
def test_bad_clip_arguments(max_norm, norm_type):
    params, opt, _, _ = make_pair(SHAPES, torch.float32, "cpu", "foreach", KWARGS, seed=441)
    with pytest.raises(ValueError, match="max_norm|norm_type"):
        opt.clip_grad_norm_(max_norm, norm_type)
    with pytest.raises(ValueError, match="max_grad_norm|norm_type"):
        ademamix_cuda.AdEMAMix(params, max_grad_norm=max_norm, norm_type=norm_type)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("norm_type", [2.0, math.inf], ids=["l2", "inf"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_norm_against_float64(backend, device, norm_type, dtype):
    """grad_norm over empty, tiny, multi-chunk and misaligned grads, and mixed dtypes (one launch
    per dtype): the float64 norm of the same values; a NaN anywhere gives NaN."""
    require_backend(backend, device)
    gen = torch.Generator().manual_seed(451)
    values = [torch.randn(s, generator=gen).to(dtype) for s in ((0,), (), (7,), (3 * 16384 + 5,))]
    values.append(torch.randn(20001, generator=gen).to(dtype)[1:])  # misaligned
    values.append(torch.randn(300, generator=gen))  # another dtype when dtype is not fp32
    grads = [v.to(device) for v in values]
    norm = grad_norm(grads, norm_type, backend=backend)
    assert norm.device == grads[0].device
    assert_rel_close(norm, _torch_norm(values, norm_type), FP32_RTOL, "norm")
    grads[3][12345] = math.nan
    assert grad_norm(grads, norm_type, backend=backend).isnan()


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_clipping(backend):
    """ademamix(..., max_grad_norm=) returns the norm and steps as torch's clip_grad_norm_ and an
    unclipped call; total_norm= clips by a norm taken elsewhere."""
    require_backend(backend)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.1)
    fused, unfused, given = (Lists(SHAPES, torch.float32, "cpu", seed=461,
                                   step_device="cpu") for _ in range(3))
    source = GradSource(SHAPES, seed=462)
    for k in range(5):
        g = [x.float() for x in source.next()]
        norm = ademamix(*fused.args(g), max_grad_norm=MAX_NORM, backend=backend, **hyper)
        assert_rel_close(norm, _torch_norm(g, 2.0), FP32_RTOL, f"step {k} norm")
        holders = [torch.nn.Parameter(torch.empty_like(x)) for x in g]
        for h, x in zip(holders, g):
            h.grad = x.clone()
        torch.nn.utils.clip_grad_norm_(holders, MAX_NORM)
        clipped = [h.grad for h in holders]
        assert ademamix(*unfused.args(clipped), backend=backend, **hyper) is None
        ademamix(*given.args(g), max_grad_norm=MAX_NORM, total_norm=norm, backend=backend,
                 **hyper)
        for a, b, c in zip(fused.tensors(), unfused.tensors(), given.tensors()):
            assert_rel_close(a, b.double(), FP32_RTOL, f"step {k}")
            assert bits_equal(a, c), f"step {k}: total_norm= differs from the norm taken inside"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_clipped_step_compiles_fullgraph(backend):
    """torch.compile(fullgraph=True) of a clipped functional step: the same bits as eager."""
    require_backend(backend)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.1)

    def step(params, grads, m1, m2, nu, steps):
        return ademamix(params, grads, m1, m2, nu, steps, max_grad_norm=MAX_NORM / 10,
                        backend=backend, **hyper)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    shapes = ((5,), (33, 65))
    eager, comp = (Lists(shapes, torch.float32, "cpu", seed=471) for _ in range(2))
    source = GradSource(shapes, seed=472)
    for k in range(3):
        g = [x.float() for x in source.next()]
        assert bits_equal(step(*eager.args(g)), compiled(*comp.args(g))), f"step {k}: norm"
        for a, b in zip(eager.tensors(), comp.tensors()):
            assert bits_equal(a, b), f"step {k}: compiled differs from eager"


@pytest.mark.parametrize("inf_norm", [False, True], ids=["l2", "inf"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_opcheck_norm_partials(backend, inf_norm):
    require_backend(backend)
    gen = torch.Generator().manual_seed(481)
    grads = [torch.randn(s, generator=gen) for s in ((5,), (0,), (40000,), (3, 7))]
    if backend == "cuda":
        op = torch.ops.ademamix.grad_norm_partials.default
    else:
        import ademamix_cuda.triton_kernels  # noqa: F401  (registers the Triton op)
        op = torch.ops.ademamix_triton.grad_norm_partials.default
    torch.library.opcheck(op, (grads, inf_norm))


@requires_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_clip_and_step_in_a_cuda_graph(backend):
    """clip_grad_norm_ + step() captured in one CUDA graph (no host sync): replays with new
    grads match eager clipping steps."""
    require_backend(backend, "cuda")
    values = [v.cuda() for v in make_param_values(SHAPES, seed=491)]
    eager_params = [torch.nn.Parameter(v.float().clone()) for v in values]
    graph_params = [torch.nn.Parameter(v.float().clone()) for v in values]
    opt_eager = ademamix_cuda.AdEMAMix(eager_params, backend=backend, **KWARGS)
    opt_graph = ademamix_cuda.AdEMAMix(graph_params, backend=backend, **KWARGS)
    static = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static):
        p.grad = g
    source = GradSource(SHAPES, seed=492)

    def feed():
        for p, sg, g in zip(eager_params, static, source.next()):
            p.grad = g.float().cuda()
            sg.copy_(p.grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            feed()
            for opt in (opt_eager, opt_graph):
                opt.clip_grad_norm_(MAX_NORM)
                opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm = opt_graph.clip_grad_norm_(MAX_NORM)
        opt_graph.step()
    for k in range(10):
        feed()
        eager_norm = opt_eager.clip_grad_norm_(MAX_NORM)
        opt_eager.step()
        graph.replay()
        torch.cuda.synchronize()
        assert bits_equal(norm, eager_norm), f"replay {k}: norm"
        for i, (a, b) in enumerate(zip(eager_params, graph_params)):
            assert bits_equal(a.detach(), b.detach()), f"replay {k}: param[{i}]"

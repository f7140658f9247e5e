"""Op-level tests: opcheck of both custom ops, torch.compile, GradScaler semantics, misaligned views,
many tensors; and, on a GPU, CUDA graphs, Triton against CUDA, and one tensor over 2**31 elements."""
import math

import pytest
import torch

import ademamix_cuda
from helpers import (BACKENDS, FP32_RTOL, FP32_STEP_RTOL, HAS_CUDA, KERNEL_BACKENDS, GradSource,
                     Lists, assert_rel_close, assert_within_ulp, bits_equal, compare_to_reference,
                     dtype_name, fp32_slack, make_pair, make_param_values, random_states,
                     require_backend, requires_gpu, set_grads, step_device_for)
from reference import reference_step

HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
             alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False)

# ---------------------------------------------------------------------------------------------
# opcheck


def _schema_call(op, values):
    """(args, kwargs) for `op` from a dict of values by argument name, following its schema, so the
    test states what it passes by name and fails clearly if the schema names something unknown."""
    args, kwargs = [], {}
    for a in op._schema.arguments:
        if a.name not in values:
            assert a.has_default_value(), f"{op}: no test value for argument {a.name!r}"
            continue
        if a.kwarg_only:
            kwargs[a.name] = values[a.name]
        else:
            args.append(values[a.name])
    return tuple(args), kwargs


OPCHECK_CASES = [
    pytest.param(torch.float32, 0.9, False, False, id="fp32"),
    pytest.param(torch.bfloat16, 0.9, True, False, id="bf16-tensor_lr"),
    pytest.param(torch.float32, 0.0, False, True, id="fp32-beta1_zero-scaler"),
    pytest.param(torch.float16, 0.9, True, True, id="fp16-tensor_lr-scaler"),
]


def _opcheck_values(dtype, beta1, tensor_lr, scaler, device):
    shapes = ((), (3,), (0,), (5, 7))
    lists = Lists(shapes, dtype, device, seed=91, beta1_zero=beta1 == 0.0)
    gen = torch.Generator().manual_seed(92)
    grads = [torch.randn(s, generator=gen).to(dtype).to(device) for s in shapes]
    lr = torch.tensor(1e-2, device=device) if tensor_lr else 1e-2
    values = dict(params=lists.params, grads=grads, exp_avg_fasts=lists.m1,
                  exp_avg_slows=lists.m2, exp_avg_sqs=lists.nu, state_steps=lists.steps,
                  lr=lr, beta1=beta1, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
                  alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False,
                  grad_scale=torch.tensor([4.0], device=device) if scaler else None,
                  found_inf=torch.zeros(1, device=device) if scaler else None)
    return values


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype,beta1,tensor_lr,scaler", OPCHECK_CASES)
def test_opcheck_cuda_op(device, dtype, beta1, tensor_lr, scaler):
    require_backend("cuda", device)
    values = _opcheck_values(dtype, beta1, tensor_lr, scaler, device)
    op = torch.ops.ademamix.step_.tensor_lr if tensor_lr else torch.ops.ademamix.step_.default
    args, kwargs = _schema_call(op, values)
    torch.library.opcheck(op, args, kwargs)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype,beta1,tensor_lr,scaler", OPCHECK_CASES)
def test_opcheck_triton_op(device, dtype, beta1, tensor_lr, scaler):
    require_backend("triton", device)
    import ademamix_cuda.triton_kernels  # noqa: F401  (registers ademamix_triton::step_)

    values = _opcheck_values(dtype, beta1, tensor_lr, scaler, device)
    # the Triton op takes lr as a float plus an optional tensor that overrides it
    values["lr_tensor"] = values["lr"] if tensor_lr else None
    values["lr"] = 0.0 if tensor_lr else values["lr"]
    op = torch.ops.ademamix_triton.step_.default
    args, kwargs = _schema_call(op, values)
    torch.library.opcheck(op, args, kwargs)


# ---------------------------------------------------------------------------------------------
# torch.compile


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, device, lr_kind):
    require_backend(backend, device)
    shapes = ((), (7,), (33, 65))
    hyper = dict(HYPER)
    lr = torch.tensor(1e-2, device=device) if lr_kind == "tensor" else 1e-2
    del hyper["lr"]

    def step(params, grads, m1, m2, nu, steps, lr):
        ademamix_cuda.functional.ademamix(params, grads, m1, m2, nu, steps, lr=lr,
                                          backend=backend, **hyper)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    eager = Lists(shapes, torch.float32, device, seed=101)
    comp = Lists(shapes, torch.float32, device, seed=101)
    grads = GradSource(shapes, seed=102)
    for k in range(4):
        g = [x.float().to(device) for x in grads.next()]
        step(*eager.args(g), lr)
        compiled(*comp.args(g), lr)
        eager.reference_step(g, lr=1e-2, **hyper)
        for a, b in zip(eager.tensors(), comp.tensors()):
            assert bits_equal(a, b), f"compiled step {k + 1} differs from eager"
    comp.ref, comp.ref_t = eager.ref, eager.ref_t
    comp.check(FP32_RTOL, f"compiled {backend}")


# ---------------------------------------------------------------------------------------------
# GradScaler: found_inf skips the whole step, grad_scale divides g


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_found_inf_and_grad_scale(backend, device):
    require_backend(backend, device)
    shapes = ((), (5,), (33, 65), (4097,))
    sdev = step_device_for(backend, device)
    lists = Lists(shapes, torch.float32, device, seed=111, start_step=2, step_device=sdev)
    grads = GradSource(shapes, seed=112)
    skip_at = {3, 7, 8, 15}
    scales = [2.0 ** 10, 3.0, 0.5, 1.0]
    for k in range(1, 22):
        scale = scales[k % len(scales)]
        g = [(x * scale).float().to(device) for x in grads.next()]
        found = 1.0 if k in skip_at else 0.0
        before = [t.clone() for t in lists.tensors()]
        # one-element tensors, shaped [1] (CONTRACT.md) or [] (what torch.amp.GradScaler makes)
        shape = (1,) if k % 2 else ()
        ademamix_cuda.functional.ademamix(
            *lists.args(g), backend=backend, grad_scale=torch.full(shape, scale, device=device),
            found_inf=torch.full(shape, found, device=device), **HYPER)
        if found:
            for a, b in zip(lists.tensors(), before):
                assert bits_equal(a, b), f"step {k}: found_inf = 1 must change nothing"
            continue
        lists.reference_step(g, grad_scale=scale, **HYPER)
        lists.check(FP32_RTOL, f"{backend} step {k} (grad_scale {scale})")


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_grad_scale_found_inf_attributes(backend):
    """The optimizer reads self.grad_scale / self.found_inf (how GradScaler hands them over)."""
    require_backend(backend)
    shapes = ((), (5,), (33, 65))
    params, opt, ref_params, ref = make_pair(shapes, torch.float32, "cpu", backend, {"lr": 1e-2},
                                             seed=121)
    grads = GradSource(shapes, seed=122)
    for k in range(1, 22):
        scale = 2.0 ** (k % 5)
        g = grads.next()
        set_grads(params, ref_params, g)
        for p in params:
            p.grad.mul_(scale)
        shape = (1,) if k % 2 else ()  # [1] (CONTRACT.md) or [] (torch.amp.GradScaler)
        opt.grad_scale = torch.full(shape, scale)
        opt.found_inf = torch.full(shape, 1.0 if k in (4, 5) else 0.0)
        before = [p.detach().clone() for p in params]
        before_steps = [float(opt.state[p]["step"]) if p in opt.state else 0.0 for p in params]
        opt.step()
        del opt.grad_scale, opt.found_inf
        if k in (4, 5):
            for p, b, s in zip(params, before, before_steps):
                assert bits_equal(p.detach(), b), f"step {k}: skipped step changed a param"
                assert float(opt.state[p]["step"]) == s, f"step {k}: skipped step counted"
            continue
        ref.step()  # reference grads are the unscaled ones
        compare_to_reference(params, opt, ref_params, ref, torch.float32, FP32_RTOL,
                             f"{backend} step {k}")


@pytest.mark.parametrize("unscale_first", [False, True], ids=["fused_unscale", "unscale_"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_grad_scaler_end_to_end(backend, unscale_first):
    """torch.amp.GradScaler on CPU: inf grads skip exactly one step, the rest match the reference
    run on the unscaled gradients (scales are powers of 2, so unscaling is exact)."""
    require_backend(backend)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    params = list(model.parameters())
    ref_params = [torch.nn.Parameter(p.detach().double().clone()) for p in params]
    opt = ademamix_cuda.AdEMAMix(params, lr=1e-2, weight_decay=0.1, backend=backend)
    from reference import ReferenceAdEMAMix

    ref = ReferenceAdEMAMix(ref_params, lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=3)
    n_skipped = 0
    for k in range(1, 22):
        x = torch.randn(8, 16)
        opt.zero_grad()
        scale = scaler.get_scale()
        loss = model(x).square().mean()
        scaler.scale(loss).backward()
        inject = k in (6, 13)
        if inject:
            params[1].grad[0] = math.inf
        else:
            for p, rp in zip(params, ref_params):
                rp.grad = p.grad.detach().double() / scale
        if unscale_first:
            scaler.unscale_(opt)
        before = [p.detach().clone() for p in params]
        scaler.step(opt)
        scaler.update()
        if inject:
            n_skipped += 1
            for p, b in zip(params, before):
                assert bits_equal(p.detach(), b), f"step {k}: inf grads must skip the step"
            assert scaler.get_scale() == scale / 2
            continue
        ref.step()
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            assert int(float(opt.state[p]["step"])) == k - n_skipped
            assert_rel_close(p, rp, FP32_RTOL, f"{backend} step {k} param[{i}]")
            for key in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                assert_rel_close(opt.state[p][key], ref.state[rp][key], FP32_RTOL,
                                 f"{backend} step {k} param[{i}] {key}")


# ---------------------------------------------------------------------------------------------
# misaligned views and many tensors

MISALIGNED_SHAPES = ((1,), (3,), (17,), (4097,), (33, 65), (9000,))


def _packed_views(values, dtype, device, first=1, align=1, sentinel=float("nan")):
    """Views into ONE buffer, each starting `first` elements past a multiple of `align` elements
    (e.g. first 1: 4 or 2 bytes off 16-byte alignment), back to back, with poisoned elements
    before, between and after: a kernel writing outside a view shows."""
    starts, end = [], first
    for v in values:
        start = (end - first + align - 1) // align * align + first
        starts.append(start)
        end = start + v.numel()
    buf = torch.full((end + 3,), sentinel, dtype=dtype, device=device)
    views = []
    for v, start in zip(values, starts):
        view = buf[start:start + v.numel()].view(v.shape)
        view.copy_(v)
        views.append(view)
    return buf, views


# (first, align) in elements for params and grads, then for the fp32 states.
VIEW_LAYOUTS = {
    # every view 4 (fp32) or 2 (bf16) bytes off 16-byte alignment: the scalar path
    "offset1": ((1, 1), (1, 1)),
    # 2-byte params 8 bytes off 16-byte alignment, states aligned: the CUDA kernel's vector path
    # reads 4 params (8 bytes) per access, so it must take these; Triton's needs 16 bytes
    "params_8B": ((4, 8), (4, 4)),
}


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "offset1"), (torch.bfloat16, "offset1"),
                                          (torch.bfloat16, "params_8B")],
                         ids=["float32", "bfloat16", "bfloat16-params_8B"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_misaligned_views(backend, device, dtype, layout):
    require_backend(backend, device)
    shapes = MISALIGNED_SHAPES
    values = make_param_values(shapes, seed=131)
    m1_0, m2_0, nu_0 = random_states(shapes, seed=132)
    param_layout, state_layout = VIEW_LAYOUTS[layout]
    p_buf, params = _packed_views(values, dtype, device, *param_layout)
    m1_buf, m1 = _packed_views(m1_0, torch.float32, device, *state_layout)
    m2_buf, m2 = _packed_views(m2_0, torch.float32, device, *state_layout)
    nu_buf, nu = _packed_views(nu_0, torch.float32, device, *state_layout)
    assert params[0].storage_offset() == param_layout[0]
    steps = [torch.tensor(0.0, device=step_device_for(backend, device)) for _ in shapes]
    ref = [[t.to("cpu", torch.float64).clone() for t in lst] for lst in (params, m1, m2, nu)]
    ref_t = [0] * len(shapes)
    grads = GradSource(shapes, seed=133)
    bufs = (p_buf, m1_buf, m2_buf, nu_buf)
    edges = [(b[:1].clone(), b[-2:].clone()) for b in bufs]
    teacher_forced = dtype != torch.float32
    for k in range(1, 21):
        g_buf, g = _packed_views(grads.next(), dtype, device, *param_layout)
        if teacher_forced:
            ref = [[t.to("cpu", torch.float64).clone() for t in lst] for lst in (params, m1, m2, nu)]
        old = [t.clone() for t in ref[0]]
        ademamix_cuda.functional.ademamix(params, g, m1, m2, nu, steps, backend=backend, **HYPER)
        for b, (head, tail) in zip(bufs, edges):
            assert bits_equal(b[:1], head) and bits_equal(b[-2:], tail), f"step {k}: wrote outside the views"
        for i in range(len(shapes)):
            ref[0][i], ref[1][i], ref[2][i], ref[3][i], ref_t[i] = reference_step(
                ref[0][i], g[i].cpu(), ref[1][i], ref[2][i], ref[3][i], ref_t[i], **HYPER)
            tag = f"{backend} step {k} view[{i}] shape {shapes[i]}"
            if teacher_forced:
                assert_within_ulp(params[i], ref[0][i], dtype, fp32_slack(old[i], ref[0][i]), f"{tag} param")
            else:
                assert_rel_close(params[i], ref[0][i], FP32_RTOL, f"{tag} param")
            rtol = FP32_STEP_RTOL if teacher_forced else FP32_RTOL
            for name, mine, r in (("exp_avg_fast", m1, ref[1]), ("exp_avg_slow", m2, ref[2]),
                                  ("exp_avg_sq", nu, ref[3])):
                assert_rel_close(mine[i], r[i], rtol, f"{tag} {name}")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_many_tensors_one_call(backend, device):
    """300 small tensors (some empty, sizes 0..200) in one call, 20 steps against the reference
    (3 under the Triton interpreter, where each of the ~300 programs costs ~10 ms; the Triton
    backend's 20-step check is test_parity)."""
    require_backend(backend, device)
    n_steps = 3 if backend == "triton" and device == "cpu" else 20
    gen = torch.Generator().manual_seed(141)
    sizes = torch.randint(0, 201, (300,), generator=gen).tolist()
    shapes = [(n,) for n in sizes]
    lists = Lists(shapes, torch.float32, device, seed=142, step_device=step_device_for(backend, device))
    grads = GradSource(shapes, seed=143)
    for k in range(1, n_steps + 1):
        g = [x.float().to(device) for x in grads.next()]
        ademamix_cuda.functional.ademamix(*lists.args(g), backend=backend, **HYPER)
        lists.reference_step(g, **HYPER)
        lists.check(FP32_RTOL, f"{backend} step {k}")


# ---------------------------------------------------------------------------------------------
# GPU only


@requires_gpu
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_cuda_graph_capture_replay_matches_eager(backend):
    require_backend(backend, "cuda")
    shapes = ((), (5,), (33, 65), (4097,), (70001,))
    kwargs = dict(betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=7, alpha_warmup=5,
                  weight_decay=0.1)
    values = make_param_values(shapes, seed=151)
    eager_params = [torch.nn.Parameter(v.float().cuda()) for v in values]
    graph_params = [torch.nn.Parameter(v.float().cuda()) for v in values]
    lr_eager = torch.tensor(1e-2, device="cuda")
    lr_graph = torch.tensor(1e-2, device="cuda")
    opt_eager = ademamix_cuda.AdEMAMix(eager_params, lr=lr_eager, backend=backend, **kwargs)
    opt_graph = ademamix_cuda.AdEMAMix(graph_params, lr=lr_graph, backend=backend, **kwargs)
    static_grads = [torch.zeros_like(p) for p in graph_params]
    for p, g in zip(graph_params, static_grads):
        p.grad = g
    grads = GradSource(shapes, seed=152)

    def next_inputs(k):
        gs = grads.next()
        lr = 1e-2 * (0.5 + 0.5 * math.cos(k / 7.0))  # a changing schedule, fed through the tensor
        lr_eager.fill_(lr)
        lr_graph.fill_(lr)
        for p, sg, g in zip(eager_params, static_grads, gs):
            p.grad = g.float().cuda()
            sg.copy_(p.grad)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs do it
        for k in range(3):
            next_inputs(k)
            opt_eager.step()
            opt_graph.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt_graph.step()
    for k in range(3, 25):
        next_inputs(k)
        opt_eager.step()
        graph.replay()
        torch.cuda.synchronize()
        for i, (a, b) in enumerate(zip(eager_params, graph_params)):
            assert bits_equal(a.detach(), b.detach()), f"replay {k}: param[{i}] differs from eager"
            sa, sb = opt_eager.state[a], opt_graph.state[b]
            for key in ("step", "exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                assert bits_equal(sa[key], sb[key]), f"replay {k}: param[{i}] {key} differs"
        assert float(opt_graph.state[graph_params[0]]["step"]) == k + 1


@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_triton_matches_cuda_on_gpu(dtype):
    """Identical CUDA inputs, 50 steps: the two kernels agree to fp32 rounding (both are also
    checked against the reference in test_parity). bf16 params are teacher forced: before each
    step the Triton side is re-synced from the CUDA side, and one step may differ by 1 ulp
    (two round-to-nearest results of fp32 values a few fp32 ulps apart)."""
    for b in KERNEL_BACKENDS:
        require_backend(b, "cuda")
    shapes = ((1024, 1024), (4097,), (50304, 16), (3,), ())
    lists = {b: Lists(shapes, dtype, "cuda", seed=161) for b in KERNEL_BACKENDS}
    grads = GradSource(shapes, seed=162)
    for k in range(1, 51):
        g = [x.to(dtype).cuda() for x in grads.next()]
        if dtype != torch.float32:
            for dst, src in zip(lists["triton"].tensors(), lists["cuda"].tensors()):
                dst.copy_(src)
        for b in KERNEL_BACKENDS:
            ademamix_cuda.functional.ademamix(*lists[b].args(g), backend=b, **HYPER)
        c, t = lists["cuda"], lists["triton"]
        for i in range(len(shapes)):
            tag = f"step {k} tensor[{i}]"
            if dtype == torch.float32:
                assert_rel_close(t.params[i], c.params[i].double(), FP32_RTOL, f"{tag} param")
            else:
                ulp_bound = torch.zeros_like(c.params[i], dtype=torch.float64).cpu()
                assert_within_ulp(t.params[i], c.params[i].double().cpu(), dtype, ulp_bound, f"{tag} param")
            for name in ("m1", "m2", "nu"):
                assert_rel_close(getattr(t, name)[i], getattr(c, name)[i].double(), FP32_RTOL,
                                 f"{tag} {name}")
            assert float(t.steps[i]) == float(c.steps[i]) == k


@requires_gpu
@pytest.mark.slow
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_tensor_over_2_31_elements(backend):
    """One fp32 tensor of 2**31 + 1025 elements: 64-bit indexing. p, g, m1, m2, nu take
    5 * 4 B * 2.15e9 = 43 GB (fits an 80 GB H100). Checked in windows at the start, across the
    2**31 boundary and at the tail, against the reference computed on those windows."""
    require_backend(backend, "cuda")
    n = 2 ** 31 + 1025
    free, _ = torch.cuda.mem_get_info()
    if free < 5 * 4 * n + 2 ** 30:
        pytest.skip(f"needs {5 * 4 * n / 2**30:.0f} GiB free on the GPU, {free / 2**30:.0f} GiB free")
    gen = torch.Generator(device="cuda").manual_seed(171)
    p = torch.empty(n, device="cuda").uniform_(1.0, 2.0, generator=gen)
    g = torch.empty(n, device="cuda").normal_(generator=gen)
    m1 = torch.empty(n, device="cuda").normal_(generator=gen).mul_(0.1)
    m2 = torch.empty(n, device="cuda").normal_(generator=gen).mul_(0.01)
    nu = torch.empty(n, device="cuda").uniform_(0.5, 1.5, generator=gen)
    steps = [torch.tensor(0.0, device="cuda")]
    windows = [slice(0, 8192), slice(2 ** 31 - 8192, 2 ** 31 + 8192), slice(n - 9000, n)]
    ref = [[t[w].double().cpu() for w in windows] for t in (p, m1, m2, nu)]
    g_windows = [g[w].double().cpu() for w in windows]
    t_ref = 0
    for k in range(1, 3):
        ademamix_cuda.functional.ademamix([p], [g], [m1], [m2], [nu], steps, backend=backend, **HYPER)
        torch.cuda.synchronize()
        for j, w in enumerate(windows):
            rp, rm1, rm2, rnu, t = reference_step(ref[0][j], g_windows[j], ref[1][j], ref[2][j],
                                                  ref[3][j], t_ref, **HYPER)
            ref[0][j], ref[1][j], ref[2][j], ref[3][j] = rp, rm1, rm2, rnu
            for name, mine, r in (("param", p, rp), ("exp_avg_fast", m1, rm1),
                                  ("exp_avg_slow", m2, rm2), ("exp_avg_sq", nu, rnu)):
                assert_rel_close(mine[w], r, FP32_RTOL, f"step {k} window {j} {name}")
        t_ref = t
        assert float(steps[0]) == k


# ---------------------------------------------------------------------------------------------
# non-finite gradients (no found_inf): propagate exactly as in the float64 reference


def _assert_same_nonfinite(actual, expected64, rtol, what):
    a = actual.detach().to("cpu", torch.float64)
    for name, fa, fe in (("NaN", torch.isnan(a), torch.isnan(expected64)),
                         ("+inf", a == math.inf, expected64 == math.inf),
                         ("-inf", a == -math.inf, expected64 == -math.inf)):
        assert torch.equal(fa, fe), f"{what}: {name} positions differ from the reference"
    finite = torch.isfinite(expected64)
    assert_rel_close(a[finite], expected64[finite], rtol, f"{what} (finite part)")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_grads_propagate(backend, device):
    require_backend(backend, device)
    shapes = ((7,), (4097,))
    lists = Lists(shapes, torch.float32, device, seed=181, step_device=step_device_for(backend, device))
    grads = GradSource(shapes, seed=182)
    for k in range(1, 4):
        g = [x.float() for x in grads.next()]
        if k == 1:
            g[0][1], g[0][4], g[0][5] = math.nan, math.inf, -math.inf
            g[1][100], g[1][4096] = math.inf, math.nan
        g = [x.to(device) for x in g]
        ademamix_cuda.functional.ademamix(*lists.args(g), backend=backend, **HYPER)
        lists.reference_step(g, **HYPER)
        for i in range(len(shapes)):
            tag = f"{backend} step {k} tensor[{i}]"
            for name, mine, r in (("param", lists.params, lists.ref[0]),
                                  ("exp_avg_fast", lists.m1, lists.ref[1]),
                                  ("exp_avg_slow", lists.m2, lists.ref[2]),
                                  ("exp_avg_sq", lists.nu, lists.ref[3])):
                _assert_same_nonfinite(mine[i], r[i], FP32_RTOL, f"{tag} {name}")

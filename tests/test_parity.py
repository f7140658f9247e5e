"""One parity harness: every backend x device x param dtype x optimizer input against the float64
reference (tests/reference.py), params AND every state compared after every step.

fp32/fp64 params run free (the reference never sees our numbers); bf16/fp16 params are teacher
forced: before each step the reference is re-synced from our params and states, and one step is
compared (params within 1 ulp, fp32 states within 1e-5). Tolerances: see tests/helpers.py.
"""
import pytest
import torch

import ademamix_cuda
from helpers import (FP32_RTOL, FP64_RTOL, LOW_PRECISION, OPTIMIZER_INPUTS, GradSource,
                     assert_rel_close, assert_within_ulp, backend_params, check_state_layout,
                     compare_to_reference, fp32_slack, make_pair, make_param_values,
                     param_shapes, random_states, require_backend, set_grads, sync_reference)
from reference import reference_step

N_STEPS = 24  # > 20, and past both warmups (7 and 5) of the "warmups" input

# 3583 = 2048 + 1535: a Triton program's masked tail of more than half a block
SMALL_SHAPES = ((), (0,), (1,), (3,), (4097,), (33, 65), (3583,))


@pytest.mark.parametrize("optim_input", OPTIMIZER_INPUTS, ids=lambda o: o.desc)
@pytest.mark.parametrize("backend,device,dtype", backend_params())
def test_parity(backend, device, dtype, optim_input):
    require_backend(backend, device)
    teacher_forced = dtype in LOW_PRECISION
    rtol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    # low precision: small params, so one step moves them by many ulps (see helpers.GradSource)
    lo, hi = (0.05, 0.2) if teacher_forced else (1.0, 2.0)
    kwargs = optim_input.build_kwargs(device)
    shapes = param_shapes(backend, device, dtype)
    params, opt, ref_params, ref = make_pair(shapes, dtype, device, backend, kwargs, seed=7,
                                             groups_fn=optim_input.build_groups, lo=lo, hi=hi)
    grads = GradSource(shapes, seed=11)
    for step in range(1, N_STEPS + 1):
        set_grads(params, ref_params, grads.next())
        if teacher_forced:
            sync_reference(params, opt, ref_params, ref)
        old = [rp.detach().clone() for rp in ref_params]
        opt.step()
        ref.step()
        assert opt.backend_used == backend, f"asked for {backend!r}, ran {opt.backend_used!r}"
        what = f"{optim_input.desc} step {step}"
        for i, p in enumerate(params):
            check_state_layout(p, opt.state[p], backend, step, i in optim_input.beta1_zero_params,
                               f"{what} param[{i}]")
        compare_to_reference(params, opt, ref_params, ref, dtype, rtol, what,
                             teacher_forced=teacher_forced, old_params64=old)


@pytest.mark.parametrize("beta1_zero_form", ["nonzero_beta1", "None", "list_of_None"])
@pytest.mark.parametrize("backend,device,dtype",
                         backend_params(dtypes=(torch.float32, torch.bfloat16)))
def test_functional_parity(backend, device, dtype, beta1_zero_form):
    """ademamix_cuda.functional.ademamix on lists, from random (non-zero) states and per-tensor
    step counts, so wrong reads, a shared step count or a schedule off by one all show."""
    require_backend(backend, device)
    beta1_zero = beta1_zero_form != "nonzero_beta1"
    hyper = dict(lr=1e-2, beta1=0.0 if beta1_zero else 0.9, beta2=0.999, beta3=0.99, alpha=5.0,
                 beta3_warmup=9, alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False)
    teacher_forced = dtype in LOW_PRECISION
    lo, hi = (0.05, 0.2) if teacher_forced else (1.0, 2.0)
    shapes = SMALL_SHAPES
    values = make_param_values(shapes, seed=3, lo=lo, hi=hi)
    m1_0, m2_0, nu_0 = random_states(shapes, seed=4, beta1_zero=beta1_zero)
    state_dtype = torch.float32
    params = [v.to(dtype).to(device) for v in values]
    m1 = None if beta1_zero else [v.to(state_dtype).to(device) for v in m1_0]
    m2 = [v.to(state_dtype).to(device) for v in m2_0]
    nu = [v.to(state_dtype).to(device) for v in nu_0]
    step_device = device if backend in ("cuda", "triton") else "cpu"
    # different counts per tensor: each tensor crosses the warmups at its own step
    start = [0, 1, 3, 5, 8, 2, 6]
    steps = [torch.tensor(float(s), dtype=torch.float32, device=step_device) for s in start]
    if beta1_zero_form == "None":
        m1_arg = None
    elif beta1_zero_form == "list_of_None":
        m1_arg = [None] * len(params)
    else:
        m1_arg = m1
    # the float64 reference state, exactly what we handed over (rounded to the storage dtypes)
    r_p = [p.to("cpu", torch.float64) for p in params]
    r_m1 = None if beta1_zero else [m.to("cpu", torch.float64) for m in m1]
    r_m2 = [m.to("cpu", torch.float64) for m in m2]
    r_nu = [m.to("cpu", torch.float64) for m in nu]
    r_t = list(start)
    grads = GradSource(shapes, seed=5)
    for k in range(1, 22):
        g = [x.to(dtype).to(device) for x in grads.next()]
        if teacher_forced:  # re-sync the reference from our tensors
            r_p = [p.to("cpu", torch.float64) for p in params]
            r_m1 = None if beta1_zero else [m.to("cpu", torch.float64) for m in m1]
            r_m2 = [m.to("cpu", torch.float64) for m in m2]
            r_nu = [m.to("cpu", torch.float64) for m in nu]
        old = [x.clone() for x in r_p]
        ademamix_cuda.functional.ademamix(params, g, m1_arg, m2, nu, steps, backend=backend, **hyper)
        for i in range(len(params)):
            r_p[i], new_m1, r_m2[i], r_nu[i], r_t[i] = reference_step(
                r_p[i], g[i], None if beta1_zero else r_m1[i], r_m2[i], r_nu[i], r_t[i], **hyper)
            if not beta1_zero:
                r_m1[i] = new_m1
            tag = f"step {k} tensor[{i}] shape {tuple(params[i].shape)}"
            assert float(steps[i]) == r_t[i], f"{tag}: step count {float(steps[i])} != {r_t[i]}"
            if teacher_forced:
                assert_within_ulp(params[i], r_p[i], dtype, fp32_slack(old[i], r_p[i]), f"{tag} param")
            else:
                assert_rel_close(params[i], r_p[i], FP32_RTOL, f"{tag} param")
            if not beta1_zero:
                assert_rel_close(m1[i], r_m1[i], FP32_RTOL, f"{tag} exp_avg_fast")
            assert_rel_close(m2[i], r_m2[i], FP32_RTOL, f"{tag} exp_avg_slow")
            assert_rel_close(nu[i], r_nu[i], FP32_RTOL, f"{tag} exp_avg_sq")
        if m1_arg is not None and beta1_zero:
            assert all(x is None for x in m1_arg)


@pytest.mark.parametrize("backend", ["auto"])
def test_auto_backend_resolves(backend):
    """backend="auto" runs one of the named backends and gets the reference's numbers."""
    shapes = ((5,), (17, 3))
    params, opt, ref_params, ref = make_pair(shapes, torch.float32, "cpu", backend,
                                             {"lr": 1e-2, "weight_decay": 0.1}, seed=1)
    grads = GradSource(shapes, seed=2)
    for step in range(1, 21):
        set_grads(params, ref_params, grads.next())
        opt.step()
        ref.step()
        assert opt.backend_used in ("single", "foreach", "cuda", "triton"), opt.backend_used
        compare_to_reference(params, opt, ref_params, ref, torch.float32, FP32_RTOL, f"auto step {step}")

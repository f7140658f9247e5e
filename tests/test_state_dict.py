"""state_dict: exact round trips, moving between backends, and compatibility both ways with the
authors' class (ReferenceAdEMAMix stands in for it: same param_group keys, int steps, states like p)."""
import copy
import io

import pytest
import torch

import ademamix_cuda
from helpers import (BACKENDS, FP32_RTOL, FP64_RTOL, GradSource, assert_rel_close,
                     assert_unchanged, backend_params, bits_equal, check_state_layout,
                     compare_to_reference, make_pair, make_param_values, require_backend,
                     set_grads, snapshot)
from reference import ReferenceAdEMAMix

SHAPES = ((), (5,), (33, 65), (4097,))
KWARGS = {"lr": 1e-2, "betas": (0.9, 0.999, 0.99), "alpha": 5.0, "beta3_warmup": 12,
          "alpha_warmup": 8, "weight_decay": 0.1}
K_BEFORE = 5   # steps before saving: inside both warmups, so the loaded step count matters
K_AFTER = 16   # steps after loading (21 in all)


def two_groups(ps):
    # the second group has beta1 == 0: its exp_avg_fast is None and must round-trip as None
    return [{"params": ps[:2]}, {"params": ps[2:], "betas": (0.0, 0.99, 0.995)}]


def serialize(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def assert_same_bits(params_a, opt_a, params_b, opt_b, what):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert bits_equal(a.detach(), b.detach()), f"{what}: param[{i}] differs"
        sa, sb = opt_a.state[a], opt_b.state[b]
        assert set(sa) == set(sb), f"{what}: state keys {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            if va is None or vb is None:
                assert va is None and vb is None, f"{what}: param[{i}] {k}: {va!r} vs {vb!r}"
            else:
                assert va.device == vb.device, f"{what}: param[{i}] {k} device {va.device} vs {vb.device}"
                assert bits_equal(va, vb), f"{what}: param[{i}] {k} differs ({va.dtype} vs {vb.dtype})"


@pytest.mark.parametrize("backend,device,dtype",
                         backend_params(dtypes=(torch.float32, torch.bfloat16)))
def test_round_trip_is_exact(backend, device, dtype):
    require_backend(backend, device)
    values = make_param_values(SHAPES, seed=21)
    params = [torch.nn.Parameter(v.to(dtype).to(device)) for v in values]
    opt = ademamix_cuda.AdEMAMix(two_groups(params), backend=backend, **KWARGS)
    grads = GradSource(SHAPES, seed=22)

    def give(ps, gs):
        for p, g in zip(ps, gs):
            p.grad = g.to(dtype).to(device)

    for _ in range(K_BEFORE):
        give(params, grads.next())
        opt.step()
    sd = serialize(opt.state_dict())
    params2 = clone_params(params)
    opt2 = ademamix_cuda.AdEMAMix(two_groups(params2), backend=backend, **KWARGS)
    opt2.load_state_dict(sd)
    # right after loading: the same states, dtypes (fp32 for bf16 params) and step placement
    for i, p in enumerate(params2):
        check_state_layout(p, opt2.state[p], backend, K_BEFORE, i >= 2, f"loaded param[{i}]")
    assert_same_bits(params, opt, params2, opt2, "after load")
    for step in range(K_AFTER):
        gs = grads.next()
        give(params, gs)
        give(params2, gs)
        opt.step()
        opt2.step()
        assert opt2.backend_used == backend
        assert_same_bits(params, opt, params2, opt2, f"step {K_BEFORE + step + 1} after the round trip")


CROSS = [("foreach", dst) for dst in ("single", "cuda", "triton")] + \
        [(src, "foreach") for src in ("single", "cuda", "triton")]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("src,dst", CROSS, ids=[f"{s}-to-{d}" for s, d in CROSS])
def test_across_backends(src, dst, device):
    require_backend(src, device)
    require_backend(dst, device)
    params, opt, ref_params, ref = make_pair(SHAPES, torch.float32, device, src, KWARGS, seed=31,
                                             groups_fn=two_groups)
    grads = GradSource(SHAPES, seed=32)
    for _ in range(K_BEFORE):
        set_grads(params, ref_params, grads.next())
        opt.step()
        ref.step()
    sd = serialize(opt.state_dict())
    params2 = clone_params(params)
    opt2 = ademamix_cuda.AdEMAMix(two_groups(params2), backend=dst, **KWARGS)
    opt2.load_state_dict(sd)
    for step in range(K_BEFORE + 1, K_BEFORE + K_AFTER + 1):
        set_grads(params2, ref_params, grads.next())
        opt2.step()
        ref.step()
        assert opt2.backend_used == dst, f"loaded into {dst!r} but ran {opt2.backend_used!r}"
        for i, p in enumerate(params2):
            check_state_layout(p, opt2.state[p], dst, step, i >= 2, f"{src}->{dst} param[{i}]")
        compare_to_reference(params2, opt2, ref_params, ref, torch.float32, FP32_RTOL,
                             f"{src}->{dst} step {step}")


def _authors_params(dtype, device, seed):
    return [torch.nn.Parameter(v.to(dtype).to(device)) for v in make_param_values(SHAPES, seed)]


AUTHORS_CASES = backend_params(dtypes=(torch.float64, torch.float32))


@pytest.mark.parametrize("backend,device,dtype", AUTHORS_CASES)
def test_authors_state_dict_loads_into_ours(backend, device, dtype):
    """The authors' class state (Python int steps, no 'maximize'/'backend' keys) continues in ours."""
    require_backend(backend, device)
    tol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    ref_params = _authors_params(dtype, device, seed=41)
    ref = ReferenceAdEMAMix(two_groups(ref_params), **KWARGS)
    grads = GradSource(SHAPES, seed=42)
    for _ in range(K_BEFORE):
        for p, g in zip(ref_params, grads.next()):
            p.grad = g.to(dtype).to(device)
        ref.step()
    sd = ref.state_dict()
    assert all(isinstance(s["step"], int) for s in sd["state"].values())
    assert "maximize" not in sd["param_groups"][0]
    params = clone_params(ref_params)
    opt = ademamix_cuda.AdEMAMix(two_groups(params), backend=backend, **KWARGS)
    opt.load_state_dict(copy.deepcopy(sd))
    for step in range(K_BEFORE + 1, K_BEFORE + K_AFTER + 1):
        for p, rp, g in zip(params, ref_params, grads.next()):
            p.grad = g.to(dtype).to(device)
            rp.grad = p.grad.clone()
        opt.step()
        ref.step()
        assert opt.backend_used == backend
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            st, rst = opt.state[p], ref.state[rp]
            check_state_layout(p, st, backend, step, i >= 2, f"authors->ours param[{i}]")
            assert_rel_close(p, rp, tol, f"authors->ours step {step} param[{i}]")
            for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                if rst[k] is None:
                    assert st[k] is None, f"param[{i}] {k} should be None"
                else:
                    assert_rel_close(st[k], rst[k], tol, f"authors->ours step {step} param[{i}] {k}")


@pytest.mark.parametrize("backend,device,dtype", AUTHORS_CASES)
def test_ours_state_dict_loads_into_authors(backend, device, dtype):
    """Our state (0-d tensor steps, extra group keys) loads into the authors' class and continues."""
    require_backend(backend, device)
    tol = FP64_RTOL if dtype == torch.float64 else FP32_RTOL
    params = _authors_params(dtype, device, seed=51)
    opt = ademamix_cuda.AdEMAMix(two_groups(params), backend=backend, **KWARGS)
    grads = GradSource(SHAPES, seed=52)
    for _ in range(K_BEFORE):
        for p, g in zip(params, grads.next()):
            p.grad = g.to(dtype).to(device)
        opt.step()
    ref_params = clone_params(params)
    ref = ReferenceAdEMAMix(two_groups(ref_params), **KWARGS)
    ref.load_state_dict(serialize(opt.state_dict()))
    for i, rp in enumerate(ref_params):
        rst = ref.state[rp]
        assert int(rst["step"]) == K_BEFORE
        for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
            if i >= 2 and k == "exp_avg_fast":
                assert rst[k] is None
            else:
                assert bits_equal(rst[k], opt.state[params[i]][k]), f"param[{i}] {k} not loaded as saved"
    for step in range(K_BEFORE + 1, K_BEFORE + K_AFTER + 1):
        for p, rp, g in zip(params, ref_params, grads.next()):
            p.grad = g.to(dtype).to(device)
            rp.grad = p.grad.clone()
        opt.step()
        ref.step()
        for i, (p, rp) in enumerate(zip(params, ref_params)):
            st, rst = opt.state[p], ref.state[rp]
            assert rst["step"] == step and int(float(st["step"])) == step
            assert_rel_close(rp, p, tol, f"ours->authors step {step} param[{i}]")
            for k in ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq"):
                if st[k] is None:
                    assert rst[k] is None
                else:
                    assert_rel_close(rst[k], st[k], tol, f"ours->authors step {step} param[{i}] {k}")


def _stepped_optimizer(backend, steps=2):
    values = make_param_values(SHAPES, seed=61)
    params = [torch.nn.Parameter(v.to(torch.float32)) for v in values]
    opt = ademamix_cuda.AdEMAMix(two_groups(params), backend=backend, **KWARGS)
    grads = GradSource(SHAPES, seed=62)
    for _ in range(steps):
        for p, g in zip(params, grads.next()):
            p.grad = g.to(torch.float32)
        opt.step()
    return params, opt


def _groups_without_params(opt):
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_groups_equal(before, opt, what):
    after = _groups_without_params(opt)
    assert len(before) == len(after), f"{what}: param_groups changed"
    for b, a in zip(before, after):
        assert set(b) == set(a), f"{what}: param_group keys changed"
        for k in b:
            if isinstance(b[k], torch.Tensor):
                assert bits_equal(b[k], a[k]), f"{what}: param_group {k!r} changed"
            else:
                assert b[k] == a[k], f"{what}: param_group {k!r} changed {b[k]!r} -> {a[k]!r}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_state_dict_is_rejected(backend):
    require_backend(backend)
    params, opt = _stepped_optimizer(backend)
    adam_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    adam = torch.optim.Adam([{"params": adam_params[:2]}, {"params": adam_params[2:]}], lr=1e-3)
    for p in adam_params:
        p.grad = torch.randn_like(p)
    adam.step()
    snap = snapshot(params, opt)
    groups = copy.deepcopy(_groups_without_params(opt))
    with pytest.raises((ValueError, KeyError, RuntimeError, TypeError),
                       match=r"(?i)exp_avg_slow|exp_avg_fast|ademamix|betas|alpha"):
        opt.load_state_dict(adam.state_dict())
    assert_unchanged(params, opt, snap, "after rejecting Adam's state_dict")
    _assert_groups_equal(groups, opt, "after rejecting Adam's state_dict")


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_state_shape_is_rejected(backend):
    require_backend(backend)
    params, opt = _stepped_optimizer(backend)
    sd = copy.deepcopy(opt.state_dict())
    sd["state"][1]["exp_avg_fast"] = torch.zeros(4, dtype=torch.float32)  # param 1 is (5,)
    snap = snapshot(params, opt)
    groups = copy.deepcopy(_groups_without_params(opt))
    with pytest.raises((ValueError, RuntimeError), match=r"(?i)shape"):
        opt.load_state_dict(sd)
    assert_unchanged(params, opt, snap, "after rejecting a wrong-shape state")
    _assert_groups_equal(groups, opt, "after rejecting a wrong-shape state")

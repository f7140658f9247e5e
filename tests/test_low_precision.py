"""bf16 states and bf16 params written with stochastic rounding (SR).

- SR itself: unbiased where round-to-nearest is not, non-finite values kept.
- The random bits: one counter-based generator (ademamix_cuda.rounding mirrors csrc/ademamix.h),
  the same bits in every backend. Where the fp32 arithmetic of a step is exact in every backend,
  all four backends (and the GPU stand-in) write the same bf16 bits as the generator predicts.
- The kernel backends on the CPU (the op's CPU kernel in each build, the GPU stand-in, the Triton
  interpreter) produce the same bits for any step: their fp32 math is the same operations in the
  same order, with no contracted multiply-adds.
- Every backend against the float64 reference, teacher forced: each SR write lies within one bf16
  ulp of the exact value (SR picks one of its two bf16 neighbours).
- The slow EMA does not stall: 20k steps with beta3 = 0.9999 track the fp32 run where a plain
  bf16 state stalls.
"""
import contextlib

import pytest
import torch

import ademamix_cuda
from ademamix_cuda import rounding
from ademamix_cuda.functional import ademamix
from helpers import (FP32_STEP_RTOL, GradSource, assert_rel_close, assert_within_ulp,
                     bits_equal, cpu_gpu_blocks, fp32_slack, make_param_values, random_states,
                     require_backend, requires_gpu)

STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
SEED = 0x5DEECE66D
# Tails shorter than every vector width, two chunks, an empty tensor and a 0-d one.
SHAPES = ((), (0,), (1,), (7,), (33, 65), (16385,))
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
             alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False)
# (param dtype, state dtype, param rounding)
PRECISIONS = {
    "fp32-params-bf16-states": (torch.float32, torch.bfloat16, "nearest"),
    "bf16-params-sr-bf16-states": (torch.bfloat16, torch.bfloat16, "stochastic"),
    "bf16-params-sr-fp32-states": (torch.bfloat16, torch.float32, "stochastic"),
}


def _lists(shapes, param_dtype, state_dtype, seed, beta1_zero=False, start_step=3):
    """Functional-API lists: params |x| in [1, 2], non-zero random states, step counts."""
    values = make_param_values(shapes, seed)
    m1, m2, nu = random_states(shapes, seed + 1, beta1_zero)
    return dict(params=[v.to(param_dtype) for v in values],
                exp_avg_fasts=[] if beta1_zero else [v.to(state_dtype) for v in m1],
                exp_avg_slows=[v.to(state_dtype) for v in m2],
                exp_avg_sqs=[v.to(state_dtype) for v in nu],
                state_steps=[torch.tensor(float(start_step)) for _ in shapes])


def _clone(lists):
    return {k: [t.clone() for t in v] for k, v in lists.items()}


def _step(lists, grads, backend, **hyper):
    ademamix(lists["params"], grads, lists["exp_avg_fasts"] or None, lists["exp_avg_slows"],
             lists["exp_avg_sqs"], lists["state_steps"], backend=backend, **hyper)


@contextlib.contextmanager
def _as(backend):
    """Runs functional calls of `backend`; "gpu_blocks" is the op's GPU stand-in, "baseline" the
    op's CPU kernel built for the baseline instruction set."""
    if backend == "gpu_blocks":
        with cpu_gpu_blocks():
            yield "cuda"
        return
    if backend == "baseline":
        torch.ops.ademamix._set_cpu_kernel(0, 0)
        try:
            yield "cuda"
        finally:
            ademamix_cuda.backends.CPU_KERNEL = ademamix_cuda.backends._load_cpu_kernel()
        return
    yield backend


def _require(backend):
    require_backend("cuda" if backend in ("gpu_blocks", "baseline") else backend)


# ---------------------------------------------------------------------------------------------
# stochastic rounding itself


def test_stochastic_rounding_is_unbiased():
    """10^6 roundings of 1 + 5/16 ulp (through the op's kernel: beta3 = 0 makes m2 the grad
    exactly) average to it within 3 standard errors; round-to-nearest is off by 5/16 ulp."""
    require_backend("cuda")
    n, ulp = 10**6, 2.0**-7
    value = 1.0 + 5 / 16 * ulp
    lists = _lists([(n,)], torch.float32, torch.bfloat16, seed=1, start_step=0)
    grads = [torch.full((n,), value)]
    _step(lists, grads, "cuda", lr=0.0, beta1=0.5, beta2=0.0, beta3=0.0, alpha=0.0,
          beta3_warmup=None, alpha_warmup=None, eps=1e-8, weight_decay=0.0, sr_seed=SEED)
    m2 = lists["exp_avg_slows"][0]
    assert set(m2.double().unique().tolist()) == {1.0, 1.0 + ulp}, "SR must pick a neighbour"
    stderr = ulp * (5 / 16 * 11 / 16 / n) ** 0.5
    bias = m2.double().mean().item() - value
    assert abs(bias) < 3 * stderr, f"SR mean off by {bias / stderr:.1f} standard errors"
    nearest = torch.full((n,), value).to(torch.bfloat16).double().mean().item() - value
    assert abs(nearest) > 100 * stderr, "round-to-nearest must show its bias here"
    # the generator predicts those bits
    expected = rounding.sr_to_bf16(grads[0], SEED, 0, 1, "exp_avg_slow")
    assert bits_equal(m2, expected), "the op's SR bits differ from rounding.sr_to_bf16"


def test_stochastic_rounding_keeps_non_finite_values():
    patterns = torch.tensor([0x7FC00000, 0x7FFFFFFF, 0xFF800001 - 2**32, 0x7F800001,
                             0x7F800000, 0xFF800000 - 2**32, 0x00000000, 0x80000000 - 2**32],
                            dtype=torch.int64).to(torch.int32)
    x = patterns.view(torch.float32)
    for r in (0, 1, 0x8000, 0xFFFF):
        out = rounding.round_bf16_sr(x, torch.full(x.shape, r, dtype=torch.int64)).float()
        assert out[:4].isnan().all(), f"r={r:#x}: a NaN became {out[:4].tolist()}"
        assert out[4].item() == float("inf") and out[5].item() == float("-inf"), f"r={r:#x}"
        assert bits_equal(out[6:], x[6:]), f"r={r:#x}: +-0 must stay +-0"


def test_non_finite_values_through_the_kernels():
    """NaN and Inf grads reach bf16 states as NaN and Inf in the op's kernel and the stand-in,
    with the bits the generator predicts."""
    require_backend("cuda")
    g = torch.tensor([float("nan"), float("inf"), float("-inf"), 1.0, -3.5, 3.0e38, 1e-40])
    g[0:1].view(torch.int32).fill_(0x7FFFFFFF)  # the NaN whose payload would carry into the sign
    for backend in ("cuda", "gpu_blocks"):
        lists = _lists([g.shape], torch.float32, torch.bfloat16, seed=2, start_step=0)
        with _as(backend) as name:
            _step(lists, [g], name, lr=0.0, beta1=0.5, beta2=0.0, beta3=0.0, alpha=0.0,
                  beta3_warmup=None, alpha_warmup=None, eps=1e-8, weight_decay=0.0, sr_seed=SEED)
        m2 = lists["exp_avg_slows"][0]
        assert m2[0].isnan() and m2[1] == float("inf") and m2[2] == float("-inf"), backend
        assert bits_equal(m2, rounding.sr_to_bf16(g, SEED, 0, 1, "exp_avg_slow")), backend


# ---------------------------------------------------------------------------------------------
# the same random bits everywhere


EXACT_BACKENDS = ("cuda", "baseline", "gpu_blocks", "triton", "foreach", "single")


@pytest.mark.parametrize("backend", EXACT_BACKENDS)
def test_every_backend_draws_the_generators_bits(backend):
    """beta1 = 1/2, beta2 = beta3 = 0, lr = 0: m1 = m1/2 + g/2, m2 = g and nu = g*g are one
    rounding of exact values in every backend, so each state's bf16 bits are what
    rounding.sr_to_bf16 gives for them: the same tensor index, step, element index and bits."""
    _require(backend)
    shapes = SHAPES
    lists = _lists(shapes, torch.float32, torch.bfloat16, seed=3, start_step=4)
    grads_src = GradSource(shapes, seed=4)
    hyper = dict(lr=0.0, beta1=0.5, beta2=0.0, beta3=0.0, alpha=0.0, beta3_warmup=None,
                 alpha_warmup=None, eps=1e-8, weight_decay=0.0, sr_seed=SEED)
    for t in (5, 6):
        grads = [g.float() for g in grads_src.next()]
        expected = {
            "exp_avg_fast": [m.float() * 0.5 + g * 0.5 for m, g in zip(lists["exp_avg_fasts"], grads)],
            "exp_avg_slow": grads,
            "exp_avg_sq": [g * g for g in grads]}
        with _as(backend) as name:
            _step(lists, grads, name, **hyper)
        for key, name_ in zip(STATE_KEYS, ("exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs")):
            for i, (got, want) in enumerate(zip(lists[name_], expected[key])):
                assert bits_equal(got, rounding.sr_to_bf16(want, SEED, i, t, key)), (
                    f"{backend} step {t}: {key}[{i}] (shape {tuple(got.shape)}) differs")


def test_the_bits_depend_on_seed_step_tensor_and_element():
    words = {(seed, i, t): rounding.random_words(seed, i, t, 4096)
             for seed in (0, 1, SEED) for i in (0, 1) for t in (1, 2)}
    pairs = list(words.items())
    for a in range(len(pairs)):
        for b in range(a + 1, len(pairs)):
            same = (pairs[a][1][0] == pairs[b][1][0]).float().mean().item()
            assert same < 0.01, f"{pairs[a][0]} and {pairs[b][0]} share {same:.1%} of their words"
        r0, r1 = pairs[a][1]
        assert r0.unique().numel() > 4090 and r1.unique().numel() > 4090
        for word in (r0, r1):  # every bit is a fair coin: 4096 draws, 5 standard deviations
            bits = torch.stack([(word >> k) & 1 for k in range(32)]).double().mean(dim=1)
            assert ((bits - 0.5).abs() < 5 * 0.5 / 4096**0.5).all(), bits


# ---------------------------------------------------------------------------------------------
# the kernel backends on the CPU: the same bits for any step

KERNELS_ON_CPU = (("cuda", "cpu"), ("baseline", "cpu"), ("gpu_blocks", "cpu"), ("triton", "cpu"))
# On a GPU: the CUDA kernel and compiled Triton against the op's CPU kernel.
KERNELS_ON_GPU = (("cuda", "cpu"), ("cuda", "cuda"), ("triton", "cuda"))
VARIANTS = {
    "default": {},
    "beta1_zero": dict(beta1=0.0),
    "scaler": dict(scaler=True),
    "tensor_lr_maximize": dict(tensor_lr=True, maximize=True),
}
BIT_PRECISIONS = dict(PRECISIONS, **{"fp32-params-fp32-states": (torch.float32, torch.float32,
                                                                 "nearest")})
# Round-to-nearest bf16/fp16 params: the same bits everywhere but in the Triton interpreter,
# which truncates fp32 -> bf16 (compiled Triton rounds to nearest even).
GPU_PRECISIONS = dict(BIT_PRECISIONS, **{
    "bf16-params-bf16-states": (torch.bfloat16, torch.bfloat16, "nearest"),
    "fp16-params-fp32-states": (torch.float16, torch.float32, "nearest")})


def _same_bits_across(kernels, precision, variant):
    """Four steps (the scaler variant skips one through found_inf) from the same inputs on every
    (backend, device) of `kernels`: every param, state and step count bit for bit the same as the
    first's. One param is a view at an odd offset (the kernels' unaligned paths)."""
    param_dtype, state_dtype, param_rounding = GPU_PRECISIONS[precision]
    opts = VARIANTS[variant]
    hyper = dict(HYPER, beta1=opts.get("beta1", HYPER["beta1"]),
                 maximize=opts.get("maximize", False), sr_seed=SEED, param_rounding=param_rounding)
    start = _lists(SHAPES, param_dtype, state_dtype, seed=5, beta1_zero=hyper["beta1"] == 0.0)
    base = torch.empty(1 + 300, dtype=param_dtype)  # params[-1]: a view 1 element in
    base[1:] = make_param_values([(300,)], seed=6)[0].to(param_dtype)
    for name in ("exp_avg_fasts", "exp_avg_slows", "exp_avg_sqs"):
        if start[name]:
            start[name].append(torch.rand(300).to(state_dtype))
    start["state_steps"].append(torch.tensor(3.0))
    grads_src = GradSource(SHAPES + ((300,),), seed=7)
    grads = [[g.to(param_dtype) for g in grads_src.next()] for _ in range(4)]
    results = []
    for backend, device in kernels:
        lists = {k: [t.to(device, copy=True) for t in v] for k, v in start.items()}
        lists["params"].append(base.to(device, copy=True)[1:])
        for k, g in enumerate(grads):
            g = [x.to(device) for x in g]
            extra = {}
            if opts.get("scaler"):
                g = [x * 2.0 ** k for x in g]
                extra = dict(grad_scale=torch.tensor(2.0 ** k, device=device),
                             found_inf=torch.tensor(float(k == 2), device=device))
            lr = torch.tensor(hyper["lr"], device=device) if opts.get("tensor_lr") else hyper["lr"]
            with _as(backend) as name:
                _step(lists, g, name, **dict(hyper, lr=lr), **extra)
        results.append(lists)
    for (backend, device), lists in zip(kernels[1:], results[1:]):
        for name, tensors in results[0].items():
            for i, (a, b) in enumerate(zip(tensors, lists[name])):
                assert bits_equal(a, b), (f"{backend} on {device} vs {kernels[0]}: {name}[{i}] "
                                          f"differs")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", BIT_PRECISIONS)
def test_kernel_backends_compute_the_same_bits(precision, variant):
    """The op's CPU kernel (AVX2 and baseline builds), the GPU stand-in and the Triton
    interpreter: their fp32 math is the same operations in the same order, so any step gives
    the same bits, stochastic rounding included."""
    for backend, device in KERNELS_ON_CPU:
        _require(backend)
    _same_bits_across(KERNELS_ON_CPU, precision, variant)


@requires_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", GPU_PRECISIONS)
def test_gpu_kernels_compute_the_cpu_kernels_bits(precision, variant):
    """The CUDA kernel and compiled Triton on the GPU give the op's CPU kernel's bits."""
    for backend, device in KERNELS_ON_GPU:
        require_backend(backend, device)
    _same_bits_across(KERNELS_ON_GPU, precision, variant)


# ---------------------------------------------------------------------------------------------
# against the float64 reference, teacher forced


@pytest.mark.parametrize("backend", ("cuda", "triton", "foreach", "single"))
@pytest.mark.parametrize("precision", PRECISIONS)
def test_matches_reference_within_one_bf16_ulp(backend, precision):
    """Six steps, each from our own (rounded) state: every value written by SR is within one
    bf16 ulp of the float64 result (plus the fp32 error made before rounding), fp32 values within
    FP32_STEP_RTOL, for the optimizer with weight decay and both warmups."""
    require_backend(backend)
    from reference import reference_step

    param_dtype, state_dtype, param_rounding = PRECISIONS[precision]
    values = make_param_values(SHAPES, seed=8)
    params = [torch.nn.Parameter(v.to(param_dtype)) for v in values]
    kwargs = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=9, alpha_warmup=6,
                  weight_decay=0.1)
    opt = ademamix_cuda.AdEMAMix(params, backend=backend, state_dtype=state_dtype,
                                 param_rounding=param_rounding, sr_seed=SEED, **kwargs)
    grads = GradSource(SHAPES, seed=9)
    hyper = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
                 alpha_warmup=6, eps=1e-8, weight_decay=0.1)
    for k in range(6):
        for p, g in zip(params, grads.next()):
            p.grad = g.to(param_dtype)
        before = [(p.detach().clone(), {key: (v.clone() if torch.is_tensor(v) else v)
                                        for key, v in opt.state[p].items()}) for p in params]
        opt.step()
        for i, (p, (p_old, st_old)) in enumerate(zip(params, before)):
            tag = f"{backend} {precision} step {k + 1} tensor[{i}]"
            if not st_old:  # the first step starts from zero states
                st_old = {key: torch.zeros(p.shape) for key in STATE_KEYS}
                st_old["step"] = 0
            ref = reference_step(p_old, p.grad, st_old["exp_avg_fast"], st_old["exp_avg_slow"],
                                 st_old["exp_avg_sq"], st_old["step"], **hyper)
            st = opt.state[p]
            for key, got, want, old in zip(STATE_KEYS, (st[k_] for k_ in STATE_KEYS), ref[1:4],
                                           (st_old[k_] for k_ in STATE_KEYS)):
                assert got.dtype == state_dtype, f"{tag}: {key} is {got.dtype}"
                if state_dtype == torch.bfloat16:
                    assert_within_ulp(got, want, torch.bfloat16,
                                      fp32_slack(old.double(), want), f"{tag} {key}")
                else:
                    assert_rel_close(got, want, FP32_STEP_RTOL, f"{tag} {key}")
            if param_dtype == torch.bfloat16:
                assert_within_ulp(p, ref[0], torch.bfloat16,
                                  fp32_slack(p_old.double(), ref[0]), f"{tag} param")
            else:
                assert_rel_close(p, ref[0], FP32_STEP_RTOL, f"{tag} param")


# ---------------------------------------------------------------------------------------------
# the slow EMA does not stall


def test_slow_ema_does_not_stall():
    """20k steps of a constant gradient spread over [0.1, 1] with beta3 = 0.9999, through the
    op's CPU kernel: the mean of every bf16 state over the elements is within 0.1 % of the fp32
    run's, and the per-element error of m2 stays near what SR's noise predicts. A plain bf16 m2
    (round to nearest) stalls far below: the test can fail."""
    require_backend("cuda")
    from bench.state_precision import stall_run

    fp32 = stall_run(torch.float32, steps=20_000, n=4096)
    sr = stall_run(torch.bfloat16, steps=20_000, n=4096)
    nearest = stall_run("nearest", steps=20_000, n=4096)
    for key in STATE_KEYS:
        rel = sr[key].double().mean() / fp32[key].double().mean() - 1.0
        assert abs(rel) < 1e-3, f"bf16 SR {key}: mean {rel:+.2e} off the fp32 run's"
    err = (sr["exp_avg_slow"].double() / fp32["exp_avg_slow"].double() - 1.0).abs()
    # SR of m + d, with the increment d = (1 - beta3)(g - m) far below the bf16 spacing u, lands
    # on a neighbour with variance ~u |d|; the EMA keeps that noise for ~1 / (2 (1 - beta3))
    # steps, so its relative variance is ~(u / m)(g - m) / (2 m): with u / m <= 2^-7 and
    # (g - m) / m = 0.16 at the end, a relative std of <= 2.5 %, a mean |error| of <= 2 %, and
    # a largest of ~4 std over 4096 elements (measured: 2.0 % and 8.7 %, see README). A stall
    # would be ~90 %.
    assert err.mean() < 0.03 and err.max() < 0.15, (err.mean().item(), err.max().item())
    rel_nearest = nearest["exp_avg_slow"].double().mean() / fp32["exp_avg_slow"].double().mean()
    assert rel_nearest < 0.5, f"plain bf16 m2 reached {rel_nearest:.2f} of fp32: no stall?"


# ---------------------------------------------------------------------------------------------
# state_dict: bf16 states as they are, conversions both ways, the seed saved


SD_SHAPES = ((), (5,), (33, 65), (4097,))
SD_KWARGS = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=12, alpha_warmup=8,
                 weight_decay=0.1)


def _two_groups(ps):
    return [{"params": ps[:2]}, {"params": ps[2:], "betas": (0.0, 0.99, 0.995)}]


def _trained(state_dtype, backend="cuda", steps=3, sr_seed=SEED):
    values = make_param_values(SD_SHAPES, seed=11)
    params = [torch.nn.Parameter(v.float()) for v in values]
    opt = ademamix_cuda.AdEMAMix(_two_groups(params), backend=backend, state_dtype=state_dtype,
                                 sr_seed=sr_seed, **SD_KWARGS)
    grads = GradSource(SD_SHAPES, seed=12)
    _train(params, opt, grads, steps)
    return params, opt, grads


def _train(params, opt, grads, steps):
    for _ in range(steps):
        for p, g in zip(params, grads.next()):
            p.grad = g.float()
        opt.step()


def _fresh(params, state_dtype, backend="cuda", sr_seed=1):
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return copies, ademamix_cuda.AdEMAMix(_two_groups(copies), backend=backend,
                                          state_dtype=state_dtype, sr_seed=sr_seed, **SD_KWARGS)


def _serialize(sd):
    import io

    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same(params_a, opt_a, params_b, opt_b, what):
    for i, (a, b) in enumerate(zip(params_a, params_b)):
        assert bits_equal(a.detach(), b.detach()), f"{what}: param[{i}] differs"
        for key in STATE_KEYS + ("step",):
            va, vb = opt_a.state[a][key], opt_b.state[b][key]
            if va is None or vb is None:
                assert va is None and vb is None, f"{what}: param[{i}] {key}"
                continue
            assert bits_equal(va, vb), f"{what}: param[{i}] {key} ({va.dtype} vs {vb.dtype})"


@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_bf16_round_trip_resumes_bit_for_bit(backend):
    """bf16 states save as bf16 with the groups' seeds; loaded into a new optimizer (another
    seed, and the other kernel backend: both compute the same bits) the run continues exactly as
    the uninterrupted one."""
    require_backend("cuda")
    require_backend(backend)
    params, opt, grads = _trained(torch.bfloat16)
    sd = _serialize(opt.state_dict())
    seeds = [g["sr_seed"] for g in sd["param_groups"]]
    assert seeds[0] == SEED and seeds[1] != SEED, f"the groups' seeds {seeds}"
    for st in sd["state"].values():
        for key in STATE_KEYS:
            assert st[key] is None or st[key].dtype == torch.bfloat16, f"{key} saved as {st[key].dtype}"
    copies, other = _fresh(params, torch.bfloat16, backend=backend)
    other.load_state_dict(sd)
    assert [g["sr_seed"] for g in other.param_groups] == seeds
    _assert_same(params, opt, copies, other, "after load")
    grads_b = GradSource(SD_SHAPES, seed=12)
    _train(copies, other, grads_b, 0)
    for _ in range(3):  # the same grads on both sides
        g = grads.next()
        for ps in (params, copies):
            for p, x in zip(ps, g):
                p.grad = x.float()
        opt.step()
        other.step()
    _assert_same(params, opt, copies, other, "3 steps after load")


def test_bf16_states_load_into_fp32_states_exactly_and_back():
    require_backend("cuda")
    params, opt, _ = _trained(torch.bfloat16)
    sd = opt.state_dict()
    copies, wide = _fresh(params, torch.float32)
    wide.load_state_dict(sd)
    for i, (p, q) in enumerate(zip(params, copies)):
        for key in STATE_KEYS:
            saved, loaded = opt.state[p][key], wide.state[q][key]
            if saved is None:
                assert loaded is None
                continue
            assert loaded.dtype == torch.float32 and bits_equal(loaded, saved.float()), (i, key)
    back_params, back = _fresh(params, torch.bfloat16, sr_seed=99)
    back.load_state_dict(wide.state_dict())
    _assert_same(params, opt, back_params, back, "bf16 -> fp32 -> bf16")


def test_fp32_states_load_into_bf16_states_by_sr_with_the_saved_seed():
    """fp32 -> bf16 rounds stochastically, keyed by the saved group's seed, the param's index in
    its group and its step: exactly rounding.sr_to_bf16 of the saved values."""
    require_backend("cuda")
    params, opt, _ = _trained(torch.float32, sr_seed=777)
    sd = opt.state_dict()
    copies, narrow = _fresh(params, torch.bfloat16, sr_seed=5)
    narrow.load_state_dict(sd)
    assert [g["sr_seed"] for g in narrow.param_groups] == [g["sr_seed"] for g in sd["param_groups"]]
    groups = [g for g in narrow.param_groups for _ in g["params"]]
    index = [i for g in narrow.param_groups for i in range(len(g["params"]))]
    for n, (p, q) in enumerate(zip(params, copies)):
        step = int(opt.state[p]["step"])
        for key in STATE_KEYS:
            saved, loaded = opt.state[p][key], narrow.state[q][key]
            if saved is None:
                assert loaded is None
                continue
            want = rounding.sr_to_bf16(saved, groups[n]["sr_seed"], index[n], step, key)
            assert bits_equal(loaded, want), f"param[{n}] {key}"
            assert_within_ulp(loaded, saved.double(), torch.bfloat16, 0.0, f"param[{n}] {key}")


def test_authors_state_dict_loads_into_bf16_states():
    """The authors' layout (int steps, fp32 states, no seed): converted with this optimizer's
    seeds, then it steps."""
    require_backend("cuda")
    from reference import ReferenceAdEMAMix

    values = make_param_values(SD_SHAPES, seed=13)
    ref_params = [torch.nn.Parameter(v.float()) for v in values]
    ref = ReferenceAdEMAMix(_two_groups(ref_params), **SD_KWARGS)
    grads = GradSource(SD_SHAPES, seed=14)
    _train(ref_params, ref, grads, 2)
    copies, ours = _fresh(ref_params, torch.bfloat16, sr_seed=SEED)
    seeds = [g["sr_seed"] for g in ours.param_groups]
    ours.load_state_dict(ref.state_dict())
    assert [g["sr_seed"] for g in ours.param_groups] == seeds
    for n, (p, q) in enumerate(zip(ref_params, copies)):
        assert ours.state[q]["exp_avg_slow"].dtype == torch.bfloat16
        assert_within_ulp(ours.state[q]["exp_avg_slow"], ref.state[p]["exp_avg_slow"].double(),
                          torch.bfloat16, 0.0, f"param[{n}]")
    _train(copies, ours, grads, 1)
    assert all(int(ours.state[q]["step"]) == 3 for q in copies)


# ---------------------------------------------------------------------------------------------
# bad input: a clear error, and nothing changed


@pytest.mark.parametrize("kwargs,match", [
    (dict(state_dtype=torch.float16), "state_dtype"),
    (dict(state_dtype="int8"), "state_dtype"),
    (dict(param_rounding="up"), "param_rounding"),
    (dict(param_rounding="stochastic"), "bf16 params"),
    (dict(sr_seed=-1), "sr_seed"),
    (dict(sr_seed=2**63), "sr_seed"),
    (dict(sr_seed=1.5), "sr_seed"),
    (dict(sr_seed=True), "sr_seed"),
])
def test_bad_precision_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ademamix_cuda.AdEMAMix([torch.nn.Parameter(torch.ones(3))], **kwargs)


def test_bf16_states_need_kernel_dtypes():
    with pytest.raises(ValueError, match="bf16 states need"):
        ademamix_cuda.AdEMAMix([torch.nn.Parameter(torch.ones(3, dtype=torch.float64))],
                               state_dtype=torch.bfloat16, backend="foreach")


@pytest.mark.parametrize("backend", ("cuda", "triton", "foreach", "single"))
@pytest.mark.parametrize("case", ("mixed_states", "no_seed", "sr_fp32_params", "fp16_states"))
def test_bad_functional_calls_change_nothing(backend, case):
    require_backend(backend)
    param_dtype = torch.float32
    lists = _lists(SHAPES, param_dtype, torch.bfloat16, seed=15)
    extra = dict(sr_seed=SEED)
    if case == "mixed_states":
        lists["exp_avg_sqs"][4] = lists["exp_avg_sqs"][4].float()
    elif case == "no_seed":
        extra = {}
    elif case == "sr_fp32_params":
        extra["param_rounding"] = "stochastic"
    elif case == "fp16_states":
        lists["exp_avg_slows"] = [t.half() for t in lists["exp_avg_slows"]]
    grads = [g.to(param_dtype) for g in GradSource(SHAPES, seed=16).next()]
    before = _clone(lists)
    with pytest.raises((RuntimeError, ValueError, TypeError)) as info:
        _step(lists, grads, backend, **dict(HYPER, **extra))
    message = str(info.value)
    assert any(word in message for word in ("sr_seed", "bfloat16", "float32", "dtype", "bf16")), message
    for name, tensors in lists.items():
        for i, (a, b) in enumerate(zip(tensors, before[name])):
            assert bits_equal(a, b), f"{case}: {name}[{i}] changed"


def test_op_refuses_bf16_states_without_a_seed():
    require_backend("cuda")
    lists = _lists(((8,),), torch.float32, torch.bfloat16, seed=17)
    g = [torch.ones(8)]
    args = (lists["params"], g, lists["exp_avg_fasts"], lists["exp_avg_slows"],
            lists["exp_avg_sqs"], lists["state_steps"])
    hyper = {k: v for k, v in HYPER.items()}
    with pytest.raises(RuntimeError, match="sr_seed is required"):
        torch.ops.ademamix.step_(*args, **hyper)
    with pytest.raises(RuntimeError, match="param_sr"):
        torch.ops.ademamix.step_(*args, **hyper, sr_seed=1, param_sr=True)
    with pytest.raises(RuntimeError, match="sr_seed must be >= 0"):
        torch.ops.ademamix.step_(*args, **hyper, sr_seed=-3)


@requires_gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
@pytest.mark.parametrize("param_dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_bf16_state_step_allocates_no_param_sized_temporaries(backend, param_dtype):
    """A step with bf16 states (and SR params for bf16 params) reads and writes in place: its
    peak memory above what it starts with is the launch plan, far below one fp32 copy of a
    state (64 MiB here)."""
    require_backend(backend, "cuda")
    n = 1 << 24
    params = [torch.nn.Parameter(torch.randn(n, device="cuda", dtype=param_dtype))]
    params[0].grad = torch.randn_like(params[0])
    opt = ademamix_cuda.AdEMAMix(params, backend=backend, state_dtype=torch.bfloat16,
                                 param_rounding="stochastic" if param_dtype == torch.bfloat16
                                 else "nearest", sr_seed=SEED)
    opt.step()  # creates the states and the plan
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < (1 << 20), f"{backend}: a step allocated {extra / 2**20:.1f} MiB"

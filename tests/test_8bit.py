"""8-bit blockwise states (ademamix_cuda.quant).

- The code maps: float grids (checked against an enumeration written here); stochastic rounding
  to one of a value's two neighbouring codes, unbiased; round-trip error bounds per map.
- The kernel backends on the CPU (the op's CPU kernel in each build, the GPU stand-in, the Triton
  interpreter) write the same bytes: params, codes and absmax, with quantized and unquantized
  tensors in one call; on a GPU the CUDA kernel and compiled Triton write the CPU kernel's.
- The torch paths agree with the kernels within their fp32 arithmetic: the same dequantized
  inputs, codes at most one step apart where their fp32 values straddle a midpoint.
- Every backend against the float64 reference, teacher forced: each written value within one
  code spacing of the exact one, params within fp32 rounding of the step from the dequantized
  state.
- The slow EMA does not stall over 20k steps of beta3 = 0.9999.
- The optimizer: AdEMAMix8bit's arguments, small tensors unquantized in the same launch,
  state_dict conversions both ways and exact resumption, bad input refused with nothing lost.
"""
import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ademamix_cuda
from ademamix_cuda import quant, rounding
from ademamix_cuda.functional import ademamix
from helpers import (FP32_STEP_RTOL, GradSource, assert_rel_close, bits_equal, make_param_values,
                     require_backend, requires_gpu)
from test_low_precision import KERNELS_ON_CPU, KERNELS_ON_GPU, VARIANTS, _as, _require

STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
ABSMAX_KEYS = tuple(f"{k}_absmax" for k in STATE_KEYS)
SIGNED = (True, True, False)
SEED = 0x5DEECE66D
# 8-bit tensors: empty, shorter than a lane, a partial block, several blocks with a partial one,
# two chunks plus a tail; unquantized ones beside them in the same call.
SHAPES = ((0,), (7,), (300,), (33, 65), (16384 + 1000,), (513,), (45,))
QUANTIZED = (True, True, True, True, True, False, False)
HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9,
             alpha_warmup=6, eps=1e-8, weight_decay=0.1, maximize=False)


def _spread(shape, gen, scale):
    """Values over three decades with random signs, a few of them zero: every part of the maps."""
    mag = scale * 10.0 ** (-3.0 * torch.rand(shape, generator=gen, dtype=torch.float64))
    sign = torch.where(torch.rand(shape, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    zero = torch.rand(shape, generator=gen, dtype=torch.float64) < 0.01
    return torch.where(zero, 0.0, sign * mag)


def _lists(param_dtype, small_dtype, seed, beta1_zero=False, shapes=SHAPES, quantized=QUANTIZED):
    """Functional-API lists with 8-bit states (random codes from quantized random values) for the
    `quantized` shapes and `small_dtype` states for the others."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(params=[v.to(param_dtype) for v in make_param_values(shapes, seed)],
               state_steps=[torch.tensor(3.0) for _ in shapes])
    for key, absmax_key, signed, scale in zip(STATE_KEYS, ABSMAX_KEYS, SIGNED, (0.3, 0.05, 1.0)):
        states, absmaxs = [], []
        for shape, q in zip(shapes, quantized):
            v = _spread(shape, gen, scale)
            v = v if signed else v.abs()
            if q:
                codes, absmax = quant.quantize_blockwise(v, signed, _random_bits(v.shape, gen))
                states.append(codes)
                absmaxs.append(absmax)
            else:
                states.append(v.to(small_dtype))
                absmaxs.append(None)
        skip = beta1_zero and key == "exp_avg_fast"
        out[key + "s"] = [] if skip else states
        out[absmax_key + "s"] = None if skip else absmaxs
    return out


def _random_bits(shape, gen):
    return torch.randint(0, 1 << 16, shape, generator=gen, dtype=torch.int64)


def _copy(lists, device="cpu"):
    return {k: (v if v is None else [None if t is None else t.to(device, copy=True) for t in v])
            for k, v in lists.items()}


def _step(lists, grads, backend, **hyper):
    ademamix(lists["params"], grads, lists["exp_avg_fasts"] or None, lists["exp_avg_slows"],
             lists["exp_avg_sqs"], lists["state_steps"], backend=backend,
             exp_avg_fast_absmaxs=lists["exp_avg_fast_absmaxs"],
             exp_avg_slow_absmaxs=lists["exp_avg_slow_absmaxs"],
             exp_avg_sq_absmaxs=lists["exp_avg_sq_absmaxs"], **hyper)


# ---------------------------------------------------------------------------------------------
# the code maps


def _grid(count):
    """`count` magnitudes ascending: 0, then the floats with four mantissa bits from 1.0 down."""
    values = [1.0]
    while len(values) < count - 1:
        v, e = values[-1], 0
        while v <= 2.0 ** -(e + 1):
            e += 1  # v in (2^-(e+1), 2^-e]: the spacing below v is 2^-(e+5)
        values.append(v - 2.0 ** -(e + 5))
    return [0.0] + values[::-1]


def test_code_maps_are_float_grids():
    signed, unsigned = quant.code_map(True), quant.code_map(False)
    assert signed.tolist()[:128] == _grid(128)
    assert signed.tolist()[128:] == [-v for v in _grid(128)]
    assert unsigned.tolist() == _grid(256)
    # the nu map reaches below the square of the m maps' reach
    assert unsigned[1].item() < signed[1].item() ** 2


def _neighbours(x, mags):
    """The codes of the magnitudes just below (or at) and just above |x| (x in [0, 1])."""
    lo = torch.searchsorted(mags, x.abs().contiguous(), right=True) - 1
    hi = torch.where(mags[lo] == x.abs(), lo, (lo + 1).clamp(max=mags.numel() - 1))
    return lo, hi


@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_codes_are_a_neighbour_and_unbiased(signed):
    """Every code is one of the value's two neighbouring magnitudes (the value itself on the
    grid, whatever the random bits; a nonzero nu never 0), and over many random bits the mean of
    the codes' values is the value: stochastic rounding is unbiased."""
    mags = quant.code_map(signed)[:128 if signed else 256]
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.rand(50_000, generator=gen, dtype=torch.float64).pow(8).float(), mags,
                   (mags[:-1] + mags[1:]) / 2, torch.tensor([0.0, 1.0, 1e-30, mags[1].item() / 3])])
    if signed:
        x = torch.cat([x, -x])
    codes = quant.codes_of(x[None], torch.ones(1), signed, _random_bits(x.shape, gen)[None])[0]
    codes = codes.long()
    mag, negative = (codes & 127, codes >= 128) if signed else (codes, torch.zeros_like(codes) > 0)
    lo, hi = _neighbours(x, mags)
    assert ((mag == lo) | (mag == hi)).all()
    assert (negative == ((x < 0) & (mag > 0))).all(), "sign bit"
    on_grid = mags[lo] == x.abs()
    assert (mag[on_grid] == lo[on_grid]).all(), "a grid value must be written exactly"
    if not signed:
        assert ((mag > 0) == (x > 0)).all(), "a nonzero nu rounded to 0"
    # unbiased: 4096 draws of the bits for a few values, a 5-sigma bound on the mean
    probe = torch.tensor([0.3, 0.0137, 0.7071, mags[1].item() * 0.37, 0.999]).float()
    draws = probe.repeat(4096, 1)  # 4096 rows of the probes, each row a block of absmax 1
    ones = torch.ones(4096)
    codes = quant.codes_of(draws, ones, signed, _random_bits(draws.shape, gen))
    got = quant.values_of(codes, ones, signed).double()
    lo, hi = _neighbours(probe, mags)
    spacing = (mags[hi] - mags[lo]).double()
    if not signed:
        spacing = torch.where(probe < mags[1], torch.zeros_like(spacing), spacing)
        probe = torch.where(probe < mags[1], mags[1], probe)  # rounded up, by design
    bias = (got.mean(dim=0) - probe.double()).abs()
    assert (bias <= 5 * spacing / 2 / 4096**0.5 + 1e-12).all(), (bias, spacing)


@pytest.mark.parametrize("signed", (True, False), ids=("signed", "unsigned"))
def test_round_trip_error_bounds(signed):
    """Within a block, a value at or above the map's smallest magnitude (times the block's absmax)
    comes back within 2**-4 of itself (one spacing of four mantissa bits); a smaller one within
    the smallest magnitude, and never as 0 for nu; the block's largest exactly; codes survive a
    second round trip unchanged (values on the grid round to themselves)."""
    gen = torch.Generator().manual_seed(3)
    x = _spread((64, 256), gen, 1.0) * 10.0 ** torch.randint(-6, 3, (64, 1), generator=gen)
    x = (x if signed else x.abs()).float()
    codes, absmax = quant.quantize_blockwise(x, signed, _random_bits(x.shape, gen))
    back = quant.dequantize_blockwise(codes, absmax, signed).double()
    assert torch.equal(absmax.double(), x.double().abs().amax(dim=1))
    err = (back - x.double()).abs()
    a = absmax.double()[:, None]
    smallest = quant.code_map(signed)[1].item() * a
    big = x.double().abs() >= smallest
    assert (err[big] <= 2.0 ** -4 * x.double().abs()[big] * (1 + 1e-6)).all()
    assert (err[~big] <= smallest.expand_as(x)[~big]).all()
    if not signed:
        assert ((back > 0) == (x > 0)).all(), "a nonzero nu read back as 0"
    top = x.double().abs() == x.double().abs().amax(dim=1, keepdim=True)
    assert torch.equal(back[top], x.double()[top])
    again = quant.quantize_blockwise(back.float(), signed, _random_bits(x.shape, gen))
    assert torch.equal(again[1], absmax)
    # value * absmax / absmax can come back one fp32 ulp below the grid value, which then rounds
    # up to it with probability 1 - 2**-16: all but a handful of codes are the same
    assert (again[0] != codes).sum() <= 2, "a second round trip moved codes"


def test_dequantize_refuses_a_mismatched_absmax():
    codes, absmax = quant.quantize_blockwise(torch.randn(1000), True,
                                             torch.zeros(1000, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"need a float32 absmax of shape \[4\]"):
        quant.dequantize_blockwise(codes, absmax[:3], True)
    with pytest.raises(TypeError, match="codes must be uint8"):
        quant.dequantize_blockwise(codes.float(), absmax, True)


# ---------------------------------------------------------------------------------------------
# the kernel backends: the same bytes

# (param dtype, unquantized state dtype, param rounding)
PRECISIONS = {
    "fp32-params": (torch.float32, torch.float32, "nearest"),
    "bf16-params-sr-bf16-small": (torch.bfloat16, torch.bfloat16, "stochastic"),
    "fp16-params": (torch.float16, torch.float32, "nearest"),
}
CPU_PRECISIONS = ("fp32-params", "bf16-params-sr-bf16-small")  # the interpreter truncates fp16


def _same_bytes_across(kernels, precision, variant):
    """Four steps (the scaler variant skips one through found_inf) from the same inputs on every
    (backend, device) of `kernels`: params, codes, absmax, unquantized states and step counts
    bit for bit the first's."""
    param_dtype, small_dtype, param_rounding = PRECISIONS[precision]
    opts = VARIANTS[variant]
    hyper = dict(HYPER, beta1=opts.get("beta1", HYPER["beta1"]),
                 maximize=opts.get("maximize", False), sr_seed=SEED, param_rounding=param_rounding)
    start = _lists(param_dtype, small_dtype, seed=5, beta1_zero=hyper["beta1"] == 0.0)
    grads_src = GradSource(SHAPES, seed=7)
    grads = [[g.to(param_dtype) for g in grads_src.next()] for _ in range(4)]
    results = []
    for backend, device in kernels:
        lists = _copy(start, device)
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
    moved = [not torch.equal(a, b) for a, b in zip(results[0]["exp_avg_slows"], start["exp_avg_slows"])]
    assert any(moved), "the codes never changed: the test would pass a kernel that does nothing"
    for (backend, device), lists in zip(kernels[1:], results[1:]):
        for name, tensors in results[0].items():
            for i, (a, b) in enumerate(zip(tensors or [], lists[name] or [])):
                if a is not None:
                    assert bits_equal(a, b), (f"{backend} on {device} vs {kernels[0]}: {name}[{i}] "
                                              f"differs")


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", CPU_PRECISIONS)
def test_kernel_backends_write_the_same_bytes(precision, variant):
    for backend, _ in KERNELS_ON_CPU:
        _require(backend)
    _same_bytes_across(KERNELS_ON_CPU, precision, variant)


@requires_gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_gpu_kernels_write_the_cpu_kernels_bytes(precision, variant):
    for backend, device in KERNELS_ON_GPU:
        require_backend(backend, device)
    _same_bytes_across(KERNELS_ON_GPU, precision, variant)


# ---------------------------------------------------------------------------------------------
# the torch paths, and every backend against float64


def _magnitude(codes, signed):
    c = codes.long()
    return torch.where(c >= 128, -(c - 128), c) if signed else c


@pytest.mark.parametrize("backend", ("foreach", "single"))
def test_torch_paths_match_the_kernel_within_a_code(backend):
    """One step from the same 8-bit state: params within fp32 rounding of the op's (their fp32
    arithmetic differs in the last bits), absmax too, and a code differs from the op's only by
    one step, where the two fp32 values straddle a midpoint (rare)."""
    require_backend("cuda")
    start = _lists(torch.float32, torch.float32, seed=11)
    grads = [g.float() for g in GradSource(SHAPES, seed=12).next()]
    ref, got = _copy(start), _copy(start)
    _step(ref, grads, "cuda", **HYPER, sr_seed=SEED)
    _step(got, grads, backend, **HYPER, sr_seed=SEED)
    for i in range(len(SHAPES)):
        assert_rel_close(got["params"][i], ref["params"][i].double(), FP32_STEP_RTOL,
                         f"param[{i}]")
    differing, total = 0, 0
    for key, signed in zip(STATE_KEYS, SIGNED):
        for i, q in enumerate(QUANTIZED):
            a, b = got[key + "s"][i], ref[key + "s"][i]
            if not q:
                assert_rel_close(a, b.double(), FP32_STEP_RTOL, f"{key}[{i}]")
                continue
            step = (_magnitude(a, signed) - _magnitude(b, signed)).abs()
            assert (step <= 1).all(), f"{key}[{i}]: codes {step.max().item()} steps apart"
            differing += int((step != 0).sum())
            total += a.numel()
            absmax = got[key + "_absmaxs"][i]
            assert_rel_close(absmax, ref[key + "_absmaxs"][i].double(), FP32_STEP_RTOL,
                             f"{key}_absmax[{i}]")
    assert differing <= 0.01 * total, f"{differing} of {total} codes differ"


@pytest.mark.parametrize("backend", ("cuda", "triton", "foreach", "single"))
def test_matches_reference_within_one_code(backend):
    """Five optimizer steps with weight decay and both warmups, each checked from the state the
    step started from: the params within FP32_STEP_RTOL of the float64 step from the dequantized
    state; every new absmax within fp32 rounding of the block's largest exact magnitude; every
    written value within one code spacing (2**-4 relative, or the smallest magnitude) of the
    exact one."""
    require_backend(backend)
    from reference import reference_step

    shapes = ((5000,), (4096,), (300,))
    values = make_param_values(shapes, seed=8)
    params = [torch.nn.Parameter(v.float()) for v in values]
    opt = ademamix_cuda.AdEMAMix(params, backend=backend, state_dtype="8bit", min_8bit_size=300,
                                 lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=9,
                                 alpha_warmup=6, weight_decay=0.1)
    hyper = dict(HYPER)
    hyper.pop("maximize")
    grads = GradSource(shapes, seed=9)
    for k in range(5):
        for p, g in zip(params, grads.next()):
            p.grad = g.float()
        before = [(p.detach().clone(), {key: (v.clone() if torch.is_tensor(v) else v)
                                        for key, v in opt.state[p].items()}) for p in params]
        opt.step()
        for i, (p, (p_old, st_old)) in enumerate(zip(params, before)):
            tag = f"{backend} step {k + 1} param[{i}]"
            st = opt.state[p]
            if st_old:
                old = [quant.dequantize_blockwise(st_old[key], st_old[a], s)
                       for key, a, s in zip(STATE_KEYS, ABSMAX_KEYS, SIGNED)]
                step = st_old["step"]
            else:
                old, step = [torch.zeros(p.shape) for _ in STATE_KEYS], 0
            ref = reference_step(p_old, p.grad, *old, step, **hyper)
            assert_rel_close(p, ref[0], FP32_STEP_RTOL, f"{tag}: param")
            for key, a, signed, want in zip(STATE_KEYS, ABSMAX_KEYS, SIGNED, ref[1:4]):
                assert st[key].dtype == torch.uint8, f"{tag}: {key} is {st[key].dtype}"
                blocks = torch.nn.functional.pad(want.flatten(), (0, (-want.numel()) % 256))
                exact_max = blocks.view(-1, 256).abs().amax(dim=1)
                assert_rel_close(st[a], exact_max, FP32_STEP_RTOL, f"{tag}: {a}")
                got = quant.dequantize_blockwise(st[key], st[a], signed).double()
                scale = st[a].double().repeat_interleave(256)[:want.numel()].view(want.shape)
                smallest = quant.code_map(signed)[1].item() * scale
                bound = torch.maximum(2.0 ** -4 * want.abs(), smallest) * (1 + 1e-5)
                bad = (got - want).abs() > bound
                assert not bad.any(), f"{tag}: {key}: {int(bad.sum())} values beyond one code"


def test_slow_ema_does_not_stall():
    """20k steps of a constant gradient spread over [0.1, 1] in every block, beta3 = 0.9999,
    through the op's CPU kernel: the mean of every 8-bit state over the elements is within 1 %
    of the fp32 run's, and each element within about one code spacing (2**-4)."""
    require_backend("cuda")
    from bench.state_precision import stall_run

    fp32 = stall_run(torch.float32, steps=20_000, n=4096)
    q8 = stall_run("8bit", steps=20_000, n=4096)
    for key in STATE_KEYS:
        rel = q8[key].double().mean() / fp32[key].double().mean() - 1.0
        assert abs(rel) < 1e-2, f"8-bit {key}: mean {rel:+.2e} off the fp32 run's"
        err = (q8[key].double() / fp32[key].double() - 1.0).abs()
        # SR of m + d, with d far below the spacing u, lands on a neighbour with variance ~u |d|,
        # and |d| = (1 - beta)|g - m| shrinks as m nears the exact value: the error stays within
        # about one spacing, u <= 2**-4 m (measured: 1.5 % mean, 5.9 % max for m2). A stalled m2
        # would sit at the first write's value: ~90 % low.
        assert err.mean() < 0.03 and err.max() < 2.0 ** -4 * 1.3, (key, err.mean().item(),
                                                                    err.max().item())


# ---------------------------------------------------------------------------------------------
# the optimizer


class _CountSteps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.ademamix.step_.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("small", ("float32", "bfloat16"))
def test_small_tensors_keep_unquantized_states_in_the_same_launch(small):
    require_backend("cuda")
    shapes = ((64, 64), (4095,), (10000,), (5,))
    params = [torch.nn.Parameter(v.float()) for v in make_param_values(shapes, seed=2)]
    opt = ademamix_cuda.AdEMAMix8bit(params, backend="cuda", small_state_dtype=small, sr_seed=1)
    for p, g in zip(params, GradSource(shapes, seed=3).next()):
        p.grad = g.float()
    with _CountSteps() as count:
        opt.step()
    assert count.calls == 1, f"{count.calls} launches for one group"
    for p in params:
        st = opt.state[p]
        want = torch.uint8 if p.numel() >= 4096 else getattr(torch, small)
        for key, a in zip(STATE_KEYS, ABSMAX_KEYS):
            assert st[key].dtype == want, (p.shape, key, st[key].dtype)
            assert (a in st) == (want == torch.uint8)
            if want == torch.uint8:
                assert st[a].shape == (quant.n_blocks(p.numel()),)
                assert st[key].any(), "never written"


def test_8bit_class_takes_bitsandbytes_arguments():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = ademamix_cuda.AdEMAMix8bit([p], t_alpha=100, t_beta3=200, min_8bit_size=10)
    group = opt.param_groups[0]
    assert (group["alpha_warmup"], group["beta3_warmup"], group["min_8bit_size"]) == (100, 200, 10)
    assert (group["alpha"], group["weight_decay"], group["state_dtype"]) == (5.0, 1e-2, "8bit")
    with pytest.raises(ValueError, match="paged"):
        ademamix_cuda.AdEMAMix8bit([p], is_paged=True)
    with pytest.raises(TypeError, match="8-bit states"):
        ademamix_cuda.AdEMAMix8bit([p], state_dtype=torch.float32)
    with pytest.raises(ValueError, match="min_8bit_size"):
        ademamix_cuda.AdEMAMix8bit([p], min_8bit_size=-1)
    with pytest.raises(ValueError, match="small_state_dtype"):
        ademamix_cuda.AdEMAMix8bit([p], small_state_dtype=torch.float16)
    with pytest.raises(ValueError, match="8-bit states need"):
        ademamix_cuda.AdEMAMix8bit([torch.nn.Parameter(torch.ones(5000, dtype=torch.float64))])


def test_8bit_states_refuse_a_non_contiguous_param_and_change_nothing():
    require_backend("cuda")
    ok = torch.nn.Parameter(torch.randn(5000))
    bad = torch.nn.Parameter(torch.randn(100, 64).t())  # 6400 elements, transposed
    opt = ademamix_cuda.AdEMAMix8bit([ok, bad], backend="cuda")
    for p in (ok, bad):
        p.grad = torch.randn_like(p)
    before = (ok.detach().clone(), bad.detach().clone())
    with pytest.raises(ValueError, match="contiguous plain tensor param"):
        opt.step()
    assert len(opt.state) == 0, "a refused step created states"
    assert torch.equal(ok, before[0]) and torch.equal(bad, before[1])


SD_SHAPES = ((5000,), (33, 65), (300,))
SD_KWARGS = dict(lr=1e-2, betas=(0.9, 0.999, 0.99), alpha=5.0, beta3_warmup=12, alpha_warmup=8,
                 weight_decay=0.1, min_8bit_size=1000)


def _fresh(state_dtype, backend="cuda"):
    params = [torch.nn.Parameter(v.float()) for v in make_param_values(SD_SHAPES, seed=20)]
    return params, ademamix_cuda.AdEMAMix(params, backend=backend, state_dtype=state_dtype,
                                          sr_seed=3, **SD_KWARGS)


def _train(params, opt, steps, seed=21):
    src = GradSource(SD_SHAPES, seed=seed)
    for _ in range(steps):
        for p, g in zip(params, src.next()):
            p.grad = g.float()
        opt.step()


def _serialize(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("backend", ("cuda", "triton", "foreach"))
def test_8bit_round_trip_resumes_bit_for_bit(backend):
    """The state_dict holds the codes and absmax as they are (copies); a fresh 8-bit optimizer
    that loads it continues exactly as the uninterrupted one."""
    require_backend(backend)
    params, opt = _fresh("8bit", backend)
    _train(params, opt, 3)
    sd = opt.state_dict()
    for i, p in enumerate(params):
        for key in STATE_KEYS + ABSMAX_KEYS:
            live = opt.state[p].get(key)
            if p.numel() >= 1000:
                assert bits_equal(sd["state"][i][key], live), key
            else:
                assert key not in ABSMAX_KEYS or key not in sd["state"][i]
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ademamix_cuda.AdEMAMix(params2, backend=backend, state_dtype="8bit", **SD_KWARGS)
    opt2.load_state_dict(_serialize(sd))
    _train(params, opt, 2, seed=22)
    _train(params2, opt2, 2, seed=22)
    for a, b in zip(params, params2):
        assert bits_equal(a.detach(), b.detach())
        for key in STATE_KEYS + ABSMAX_KEYS + ("step",):
            if key in opt.state[a]:
                assert bits_equal(opt.state[a][key], opt2.state[b][key]), key


def test_8bit_states_convert_to_every_state_dtype_and_back():
    """8-bit -> fp32 is the dequantized values exactly, -> bf16 those rounded by SR, fp32 ->
    8-bit quantizes (and 8-bit -> fp32 -> 8-bit gives the same codes and absmax back)."""
    params, opt = _fresh("8bit")
    _train(params, opt, 3)
    sd = opt.state_dict()
    for target in ("float32", "bfloat16", "8bit"):
        params_t, opt_t = _fresh(target)
        opt_t.load_state_dict(_serialize(sd))
        for i, p in enumerate(params_t):
            saved, st = sd["state"][i], opt_t.state[p]
            for key, a, signed in zip(STATE_KEYS, ABSMAX_KEYS, SIGNED):
                value = (quant.dequantize_blockwise(saved[key], saved[a], signed)
                         if a in saved else saved[key])
                if target == "float32" or (target == "8bit" and p.numel() < 1000):
                    assert torch.equal(st[key], value.float()), (target, i, key)
                elif target == "bfloat16":
                    assert st[key].dtype == torch.bfloat16
                    ulp = torch.finfo(torch.bfloat16).eps * value.abs()
                    assert ((st[key].double() - value.double()).abs() <= ulp).all()
                else:
                    assert bits_equal(st[key], saved[key]) and bits_equal(st[a], saved[a])
    params32, opt32 = _fresh("float32")
    opt32.load_state_dict(_serialize(sd))
    params8, opt8 = _fresh("8bit")
    opt8.load_state_dict(_serialize(opt32.state_dict()))
    for a, b in zip(params, params8):
        for key in STATE_KEYS + ABSMAX_KEYS:
            if key in opt.state[a]:
                assert bits_equal(opt.state[a][key], opt8.state[b][key]), key
    # fp32 states trained as fp32 load into 8-bit by SR keyed by (seed, index, step)
    params_f, opt_f = _fresh("float32")
    _train(params_f, opt_f, 2)
    params8, opt8 = _fresh("8bit")
    opt8.load_state_dict(_serialize(opt_f.state_dict()))
    seed = opt8.param_groups[0]["sr_seed"]
    for index, (a, b) in enumerate(zip(params_f, params8)):
        if a.numel() >= 1000:
            for key, ak, signed in zip(STATE_KEYS, ABSMAX_KEYS, SIGNED):
                value = opt_f.state[a][key]
                words = rounding.random_words(seed, index, 2, value.numel())
                codes, absmax = quant.quantize_blockwise(value, signed,
                                                         rounding.bits_of(words, key, value))
                assert bits_equal(opt8.state[b][key], codes) and bits_equal(opt8.state[b][ak], absmax)


@pytest.mark.parametrize("case", ("short_absmax", "missing_absmax", "float64_absmax"))
def test_a_state_dict_whose_absmax_does_not_fit_is_refused(case):
    params, opt = _fresh("8bit")
    _train(params, opt, 2)
    sd = _serialize(opt.state_dict())
    before = _serialize(opt.state_dict())
    st = sd["state"][0]
    if case == "short_absmax":
        st["exp_avg_slow_absmax"] = st["exp_avg_slow_absmax"][:-1]
    elif case == "missing_absmax":
        del st["exp_avg_sq_absmax"]
    else:
        st["exp_avg_fast_absmax"] = st["exp_avg_fast_absmax"].double()
    with pytest.raises(ValueError, match="absmax"):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    for i in before["state"]:
        for key, value in before["state"][i].items():
            assert bits_equal(value, after["state"][i][key]), "a refused load changed the state"


# ---------------------------------------------------------------------------------------------
# bad functional calls


BAD = ("no_absmax", "short_absmax", "float64_absmax", "absmax_for_fp32_state", "mixed_codes",
       "transposed_param", "no_seed")


@pytest.mark.parametrize("backend", ("cuda", "triton", "foreach", "single"))
@pytest.mark.parametrize("case", BAD)
def test_bad_8bit_calls_change_nothing(backend, case):
    require_backend(backend)
    lists = _lists(torch.float32, torch.float32, seed=30, shapes=((40, 300), (513,)),
                   quantized=(True, False))
    if case == "no_absmax":
        lists["exp_avg_sq_absmaxs"] = None
    elif case == "short_absmax":
        lists["exp_avg_slow_absmaxs"][0] = lists["exp_avg_slow_absmaxs"][0][:-1].clone()
    elif case == "float64_absmax":
        lists["exp_avg_fast_absmaxs"][0] = lists["exp_avg_fast_absmaxs"][0].double()
    elif case == "absmax_for_fp32_state":
        lists["exp_avg_slow_absmaxs"][1] = torch.ones(3)
    elif case == "mixed_codes":
        lists["exp_avg_sqs"][0] = lists["exp_avg_sqs"][0].float()
    elif case == "no_seed":
        hyper = dict(HYPER, sr_seed=None)
    else:
        lists["params"][0] = lists["params"][0].t().contiguous().t()
        for key in STATE_KEYS:
            lists[key + "s"][0] = lists[key + "s"][0].t().contiguous().t()
    snap = _copy(lists)
    grads = [torch.randn_like(p) for p in lists["params"]]
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        _step(lists, grads, backend, **(hyper if case == "no_seed" else dict(HYPER, sr_seed=SEED)))
    for name, tensors in snap.items():
        for a, b in zip(tensors or [], lists[name] or []):
            if a is not None:
                assert bits_equal(a, b), f"{case}: {name} changed"

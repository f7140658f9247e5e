"""A small run of the kernel backends for compute-sanitizer (memcheck, racecheck, synccheck).

Covers the paths a sanitizer should see: several chunks per tensor (the step-count handoff between
blocks), empty and 1-element tensors, a misaligned view (the scalar path), bf16 params, beta1 == 0,
grad_scale with found_inf set and clear, a tensor lr, a CUDA-graph capture and replay, and a plan
built during a capture (grads allocated in the graph's pool) that an eager step uses before the
first replay; bf16 states with stochastic rounding (bf16 params with SR too), eager and built
in a capture; and 8-bit blockwise states (uint8 codes + one fp32 absmax per 256 elements) on every
tensor of at least 256 elements, beside the set's small tensors with unquantized fp32 states (the
mixed launch), eager and built in a capture. Each backend's result is compared to the foreach
backend (which draws the same random bits, and quantizes the same way); exits 1 on a mismatch.

    compute-sanitizer --tool memcheck python bench/sanitize.py
    compute-sanitizer --tool racecheck python bench/sanitize.py --backends cuda
"""
import argparse
import sys

import torch

from ademamix_cuda import backends, quant
from ademamix_cuda.functional import ademamix

SIZES = (0, 1, 3, 4097, 40000)  # 40000 spans three 16K-element chunks
DEVICE = "cuda"
EIGHT_BIT = "8bit"  # the state_dtype of the 8-bit cases
MIN_8BIT_SIZE = 256  # 8-bit cases: tensors below this keep fp32 states (0, 1, 3: the mixed launch)


def make_set(dtype, seed, beta1_zero, state_dtype=torch.float32):
    """params, grads, (m1, m2, nu), steps, absmax: absmax is None, or for 8-bit states three
    lists (m1, m2, nu) of one fp32 absmax tensor per param (an empty one for the params that keep
    fp32 states, which the op then takes as unquantized)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in SIZES]
    params.append(torch.randn(40001, generator=gen).to(DEVICE, dtype)[1:])  # offset 1: misaligned
    grads = [torch.randn(p.shape, generator=gen).to(DEVICE, dtype) for p in params]
    absmax = None
    if state_dtype == EIGHT_BIT:
        states, absmax = [], []
        for signed in (True, True, False):
            codes, scales = [], []
            for p in params:
                value = torch.rand(p.shape, generator=gen)
                value = value * 2.0 - 1.0 if signed else value
                if p.numel() >= MIN_8BIT_SIZE:  # quantized: codes + absmax, contiguous
                    bits = torch.randint(0, 1 << 16, p.shape, generator=gen)
                    c, a = quant.quantize_blockwise(value, signed, bits)
                    codes.append(c.to(DEVICE))
                    scales.append(a.to(DEVICE))
                else:
                    codes.append(value.to(DEVICE))
                    scales.append(torch.empty(0, device=DEVICE))
            states.append(codes)
            absmax.append(scales)
    else:
        states = [[torch.rand(p.shape, generator=gen).to(DEVICE, state_dtype) for p in params]
                  for _ in range(3)]
    if beta1_zero:
        states[0] = None
        if absmax is not None:
            absmax[0] = None
    steps = [torch.full((), float(i), device=DEVICE) for i in range(len(params))]
    return params, grads, states, steps, absmax


def clone(xs):
    return None if xs is None else [x.clone() for x in xs]


def run(backend, dtype, beta1_zero, graph, state_dtype=torch.float32):
    """graph: None (eager), "warm" (plan built eagerly, then captured) or "in_capture". bf16
    states round stochastically, and so do bf16 params with them; 8-bit states (state_dtype
    "8bit") hold codes and absmax, compared dequantized."""
    params, grads, (m1, m2, nu), steps, absmax = make_set(dtype, 0, beta1_zero, state_dtype)
    lr = torch.tensor(1e-2, device=DEVICE)
    grad_scale = torch.tensor(4.0, device=DEVICE)
    found_inf = torch.zeros((), device=DEVICE)
    hyper = dict(beta1=0.0 if beta1_zero else 0.9, beta2=0.999, beta3=0.9999, alpha=5.0,
                 beta3_warmup=6, alpha_warmup=4, eps=1e-8, weight_decay=0.1, maximize=False,
                 grad_scale=grad_scale, found_inf=found_inf, sr_seed=7,
                 param_rounding="stochastic" if state_dtype == dtype == torch.bfloat16
                 else "nearest")
    absmax = absmax or [None] * 3
    ref = [clone(params), clone(m1), clone(m2), clone(nu), clone(steps)]
    ref += [clone(a) for a in absmax]

    def scales(lists):
        return dict(zip(("exp_avg_fast_absmaxs", "exp_avg_slow_absmaxs", "exp_avg_sq_absmaxs"),
                        lists[5:]))

    def step(on, lists):
        ademamix(lists[0], grads, lists[1], lists[2], lists[3], lists[4], lr=lr, backend=on,
                 **hyper, **scales(lists))

    ours = [params, m1, m2, nu, steps] + list(absmax)
    if graph == "in_capture":
        # Kernels loaded on other tensors; the capture allocates its own grads (new addresses),
        # so the plan is built inside it; the first step is eager, before any replay.
        spare = make_set(dtype, 1, beta1_zero, state_dtype)
        ademamix(spare[0], spare[1], *spare[2], spare[3], lr=lr, backend=backend, **hyper,
                 **scales([None] * 5 + list(spare[4] or [None] * 3)))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            inner = [x * 1.0 for x in grads]
            ademamix(ours[0], inner, ours[1], ours[2], ours[3], ours[4], lr=lr, backend=backend,
                     **hyper, **scales(ours))
        for x, y in zip(inner, grads):
            x.copy_(y)
        ademamix(ours[0], inner, ours[1], ours[2], ours[3], ours[4], lr=lr, backend=backend,
                 **hyper, **scales(ours))
        replay = g.replay
    else:
        step(backend, ours)  # eager warm-up (builds the plan)
        if graph == "warm":
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step(backend, ours)
            replay = g.replay
        else:
            replay = lambda: step(backend, ours)  # noqa: E731
    step("foreach", ref)
    for i in range(4):
        found_inf.fill_(1.0 if i == 1 else 0.0)  # the second step is skipped
        lr.fill_(1e-2 * (i + 1))
        replay()
        step("foreach", ref)
    worst = 0.0
    for a, b in zip(read_back(ours), read_back(ref)):
        for x, y in zip(a or [], b or []):
            if x.numel():
                x, y = x.double(), y.double()
                worst = max(worst, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return worst


def read_back(lists):
    """[params, m1, m2, nu, steps] with 8-bit states dequantized (their absmax lists dropped)."""
    out = list(lists[:5])
    for i, signed in zip((1, 2, 3), (True, True, False)):
        scales = lists[4 + i]
        if scales is not None and out[i] is not None:
            out[i] = [quant.dequantize_blockwise(s, a, signed) if a.numel() else s
                      for s, a in zip(out[i], scales)]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="cuda,triton", help="comma-separated (default: cuda,triton)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/sanitize.py needs a CUDA device")
    failed = False
    for backend in args.backends.split(","):
        reason = backends.why_not(backend, DEVICE)
        if reason:
            print(f"{backend}: not available: {reason}")
            failed = True
            continue
        cases = [(dtype, torch.float32, beta1_zero, graph) for dtype in (torch.float32, torch.bfloat16)
                 for beta1_zero in (False, True) for graph in (None, "warm", "in_capture")]
        cases += [(dtype, torch.bfloat16, False, graph) for dtype in (torch.float32, torch.bfloat16)
                  for graph in (None, "in_capture")]
        cases += [(dtype, EIGHT_BIT, beta1_zero, graph) for dtype in (torch.float32, torch.bfloat16)
                  for beta1_zero in (False, True) for graph in (None, "in_capture")]
        for dtype, state_dtype, beta1_zero, graph in cases:
            err = run(backend, dtype, beta1_zero, graph, state_dtype)
            # fp32: rounding over 5 steps (~1e-6); bf16 params or states: the two paths may round
            # a few elements one ulp (2^-8) apart, and the difference compounds; 8-bit states: a
            # value next to a midpoint may take the neighbouring code (1/16 of it) on one path
            exact = dtype == state_dtype == torch.float32
            ok = err < (1e-5 if exact else 1e-2)
            failed |= not ok
            print(f"{backend:6s} {str(dtype):15s} states={str(state_dtype):15s} "
                  f"beta1_zero={beta1_zero!s:5s} graph={graph!s:10s} max rel err vs foreach "
                  f"{err:.2e} {'ok' if ok else 'MISMATCH'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

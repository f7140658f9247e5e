"""Low-precision states against fp32 states: does the slow EMA stall, how far do the params drift?

  python -m bench.state_precision [--stall-steps 20000] [--stall-n 4096] [--drift-steps 5000]
                                  [--no-maps]

stall  a constant gradient whose elements differ (spread over [0.1, 1], in random order), beta3 =
       0.9999: every state after the run against the fp32 run's (the mean over the elements, and
       the per-element error). Rows: bf16 states with stochastic rounding (the op's kernel), a
       plain bf16 state rounded to nearest (torch ops), which stalls, our 8-bit blockwise states
       (the op's kernel) and bitsandbytes' AdEMAMix8bit (on a GPU, where bitsandbytes imports).
drift  a small MLP regression with minibatch noise, the same data and init in every run: the
       params after the run against the fp32-state run's (relative to how far the fp32 run moved
       them), and the final loss of each. Rows: bf16 states (SR), bf16 states rounded to nearest,
       bf16 params with SR, bf16 params rounded to nearest (with fp32 states), 8-bit states with
       min_8bit_size=0 (every tensor of the MLP quantized, its 2048-element matrix and its biases
       too, which the default 4096 would leave in fp32), bitsandbytes' AdEMAMix8bit with
       min_8bit_size=0 (GPU), and as the yardstick the fp32 run on minibatches drawn in another
       order.
maps   (exploratory, skipped with --no-maps) the choice of the 8-bit maps, stall and drift, in
       torch ops (dequantize, update, quantize at every step): (a) the shipped maps, four
       mantissa bits, with stochastic rounding (other random bits than the kernel's); (b) the
       same maps rounded to nearest; (c) maps with three mantissa bits (signed and unsigned: 127 /
       255 magnitudes over twice the octaves), rounded to nearest.

Runs on the CPU (the op's CPU kernel, the "cuda" backend) or on a GPU when there is one.
"""
import argparse
import math
import time

import torch

import ademamix_cuda
from ademamix_cuda import quant
from ademamix_cuda.functional import ademamix
from bench.environment import environment
from bench.report import text_table

STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
BETAS = (0.9, 0.999, 0.9999)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stall_run(state, steps, n, beta3=BETAS[2], seed=0):
    """The states {key: fp32 tensor} after `steps` steps of the constant gradient. `state` is
    torch.float32, torch.bfloat16 (bf16 with SR) or "8bit" (the op's kernel), or "nearest": a
    bf16 state rounded to nearest at every write (torch ops)."""
    device = _device()
    gen = torch.Generator().manual_seed(seed)
    g = torch.linspace(0.1, 1.0, n)[torch.randperm(n, generator=gen)].to(device)
    beta1, beta2 = BETAS[:2]
    if state == "nearest" or state in MAP_VARIANTS:
        if state == "nearest":
            dtype = torch.bfloat16
            write = lambda key, v: v.to(torch.bfloat16)  # noqa: E731
        else:
            dtype, write = torch.float32, _map_writer(state, seed)
        m = {k: torch.zeros(n, dtype=dtype, device=device) for k in STATE_KEYS}
        for _ in range(steps):
            for key, beta, x in zip(STATE_KEYS, (beta1, beta3, beta2), (g, g, g * g)):
                m[key] = write(key, beta * m[key].float() + (1.0 - beta) * x)
        return {k: v.float().cpu() for k, v in m.items()}
    if state == "bnb8":
        return _bnb_stall(g, steps, beta3)
    p = torch.zeros(n, device=device)
    q8 = state == "8bit"
    m1, m2, nu = (torch.zeros(n, dtype=torch.uint8 if q8 else state, device=device)
                  for _ in range(3))
    absmax = [[torch.zeros(quant.n_blocks(n), device=device)] for _ in range(3)] if q8 else [None] * 3
    step = torch.zeros((), device=device)
    for _ in range(steps):
        # lr = 0: the states alone are under test
        ademamix([p], [g], [m1], [m2], [nu], [step], lr=0.0, beta1=beta1, beta2=beta2,
                 beta3=beta3, alpha=2.0, beta3_warmup=None, alpha_warmup=None, eps=1e-8,
                 weight_decay=0.0, sr_seed=seed, backend="cuda", exp_avg_fast_absmaxs=absmax[0],
                 exp_avg_slow_absmaxs=absmax[1], exp_avg_sq_absmaxs=absmax[2])
    if q8:
        return {k: quant.dequantize_blockwise(v, a[0], signed).cpu()
                for k, v, a, signed in zip(STATE_KEYS, (m1, m2, nu), absmax, (True, True, False))}
    return {k: v.float().cpu() for k, v in zip(STATE_KEYS, (m1, m2, nu))}


# ---------------------------------------------------------------------------------------------
# 8-bit map variants in torch ops (the exploratory comparison) and the bitsandbytes peer
# ---------------------------------------------------------------------------------------------

# name -> (mantissa bits, stochastic rounding)
MAP_VARIANTS = {
    "8-bit maps, 4 mantissa bits, stochastic rounding (shipped)": (4, True),
    "8-bit maps, 4 mantissa bits, nearest": (4, False),
    "8-bit maps, 3 mantissa bits, nearest": (3, False),
}


def round_blockwise(x, signed, mantissa_bits=4, stochastic=False, gen=None):
    """x (fp32) written as 8-bit blockwise codes and read back (fp32 of x's shape, row-major
    blocks of quant.BLOCK): the maps of ademamix_cuda/quant.py generalized to `mantissa_bits`
    (127 signed / 255 unsigned magnitudes, consecutive floats with that many mantissa bits, the
    largest 1.0), rounded to nearest (ties to the smaller magnitude, as quant.py) or
    stochastically (unbiased: up with probability the distance from the lower code over the
    spacing; below the smallest magnitude s, a signed value becomes s with probability |x| / s,
    else 0). As quant.py, a nonzero unsigned value (nu) never becomes 0. With mantissa_bits=4 and
    stochastic rounding it is quant.py's rounding, with other random bits."""
    top = 127 if signed else 255
    shift = 23 - mantissa_bits
    one = 127 << mantissa_bits
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % quant.BLOCK
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, quant.BLOCK)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    r = (blocks.abs() / absmax).nan_to_num(0.0)  # all-zero block: 0
    bits = r.view(torch.int32).to(torch.int64)
    if stochastic:
        noise = torch.randint(0, 1 << shift, bits.shape, generator=gen, device="cpu")
        rounded = (bits + noise.to(bits.device)) >> shift
    else:
        rounded = (bits + ((1 << (shift - 1)) - 1)) >> shift
    code = (rounded - (one - top)).clamp(min=0, max=top)
    smallest = torch.tensor((one - top + 1) << shift, dtype=torch.int32).view(torch.float32).item()
    below = r < smallest  # the octave arithmetic does not reach here: 0 or the smallest code
    if not signed:
        low = (r > 0).to(code.dtype)  # nu: never 0
    elif stochastic:
        u = torch.rand(r.shape, generator=gen, device="cpu").to(r.device)
        low = (u * smallest < r).to(code.dtype)
    else:
        low = (r > 0.5 * smallest).to(code.dtype)
    code = torch.where(below, low, code)
    mag = ((code + (one - top)) << shift).to(torch.int32).view(torch.float32)
    mag = torch.where(code == 0, torch.zeros_like(mag), mag)
    out = torch.copysign(mag, blocks) * absmax if signed else mag * absmax
    return out.reshape(-1)[:flat.numel()].view(x.shape)


def _map_writer(variant, seed):
    """(key, new fp32 value) -> the value the 8-bit state of map variant `variant` reads back."""
    bits, stochastic = MAP_VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    return lambda key, v: round_blockwise(v, key != "exp_avg_sq", bits, stochastic, gen)


def bnb_unavailable():
    """None where bitsandbytes' 8-bit AdEMAMix can run here, else why not."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return "bitsandbytes not importable"
    if not torch.cuda.is_available():
        return "needs a GPU"
    return None


def _bnb_ademamix8bit(params, **hyper):
    import bitsandbytes as bnb

    cls = getattr(bnb.optim, "AdEMAMix8bit", None)
    if cls is not None:
        return cls(params, **hyper)
    return bnb.optim.AdEMAMix(params, optim_bits=8, **hyper)


def _bnb_states(opt):
    """bitsandbytes' states as our fp32 layout (ademamix_cuda.bnb_compat), per param index."""
    from ademamix_cuda.bnb_compat import from_bitsandbytes

    return from_bitsandbytes(opt.state_dict())["state"]


def _bnb_stall(g, steps, beta3):
    p = torch.nn.Parameter(torch.zeros_like(g))
    p.grad = g.clone()
    opt = _bnb_ademamix8bit([p], lr=0.0, betas=(BETAS[0], BETAS[1], beta3), alpha=2.0, eps=1e-8,
                            weight_decay=0.0, min_8bit_size=0)
    for _ in range(steps):
        opt.step()
    state = _bnb_states(opt)[0]
    return {k: state[k].float().reshape(-1).cpu() for k in STATE_KEYS}


def _stall_table_rows(variants, fp32, steps, n):
    rows = []
    for name, state in variants:
        why_not = bnb_unavailable() if state == "bnb8" else None
        if why_not:
            rows.append([f"{name}: {why_not}"] + ["-"] * (3 * len(STATE_KEYS)))
            continue
        out = stall_run(state, steps, n)
        row = [name]
        for key in STATE_KEYS:
            mean = out[key].double().mean() / fp32[key].double().mean() - 1.0
            err = (out[key].double() / fp32[key].double() - 1.0).abs()
            row += [f"{mean.item():+.2e}", f"{err.mean().item():.2%}", f"{err.max().item():.2%}"]
        rows.append(row)
    return rows


STALL_VARIANTS = (("bf16 states, SR", torch.bfloat16), ("bf16 states, nearest", "nearest"),
                  ("8-bit states (op kernel)", "8bit"),
                  ("bitsandbytes AdEMAMix8bit", "bnb8"))


def stall_rows(steps, n, variants=STALL_VARIANTS, fp32=None):
    fp32 = stall_run(torch.float32, steps, n) if fp32 is None else fp32
    target = 1.0 - BETAS[2] ** steps
    return _stall_table_rows(variants, fp32, steps, n), target


class _NearestStates(torch.optim.Optimizer):
    """AdEMAMix with bf16 states rounded to nearest at every write (torch ops): the baseline
    stochastic rounding is measured against. `write(key, fp32 value)` -> the stored state: bf16
    rounded to nearest by default, an 8-bit map variant's read-back value (_map_writer) else."""

    def __init__(self, params, lr, betas, alpha, weight_decay, write=None):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, weight_decay=weight_decay))
        self.write = write or (lambda key, v: v.to(torch.bfloat16))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            for p in group["params"]:
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st.update({k: torch.zeros_like(p, dtype=torch.bfloat16) for k in STATE_KEYS})
                st["step"] += 1
                t, g = st["step"], p.grad.float()
                m1 = b1 * st["exp_avg_fast"].float() + (1 - b1) * g
                m2 = b3 * st["exp_avg_slow"].float() + (1 - b3) * g
                nu = b2 * st["exp_avg_sq"].float() + (1 - b2) * g * g
                denom = (nu / (1 - b2**t)).sqrt() + 1e-8
                update = (m1 / (1 - b1**t) + group["alpha"] * m2) / denom
                p.add_(update + group["weight_decay"] * p.float(), alpha=-group["lr"])
                for key, value in zip(STATE_KEYS, (m1, m2, nu)):
                    st[key] = self.write(key, value)


def drift_run(variant, steps, seed=0, batch=32, order_seed=1):
    """(params as one fp32 vector, final full-data loss) of an MLP regression trained `steps`
    steps by AdEMAMix with the state precision of `variant`; `order_seed` draws the minibatches."""
    device = _device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 32, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        y = teacher(x) + 0.1 * torch.randn(4096, 1, generator=gen)
    param_dtype = torch.bfloat16 if variant.startswith("bf16 params") else torch.float32
    model = model.to(device=device, dtype=param_dtype)
    x, y = x.to(device), y.to(device)
    hyper = dict(lr=1e-3, betas=(0.9, 0.999, 0.999), alpha=5.0, weight_decay=0.01)
    if variant == "bf16 states, nearest":
        opt = _NearestStates(model.parameters(), **hyper)
    elif variant in MAP_VARIANTS:
        opt = _NearestStates(model.parameters(), **hyper, write=_map_writer(variant, seed))
    elif variant == EIGHT_BIT_DRIFT:
        opt = ademamix_cuda.AdEMAMix(model.parameters(), backend="cuda", **hyper,
                                     state_dtype="8bit", min_8bit_size=0)
    elif variant == BNB_DRIFT:
        opt = _bnb_ademamix8bit(model.parameters(), **hyper, eps=1e-8, min_8bit_size=0)
    else:
        opt = ademamix_cuda.AdEMAMix(
            model.parameters(), backend="cuda", sr_seed=seed, **hyper,
            state_dtype=torch.bfloat16 if variant == "bf16 states, SR" else torch.float32,
            param_rounding="stochastic" if variant == "bf16 params, SR" else "nearest")
    order = torch.Generator().manual_seed(order_seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=order).to(device)
        loss = torch.nn.functional.mse_loss(model(x[idx].to(param_dtype)).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x.to(param_dtype)).float(), y).item()
    flat = torch.cat([p.detach().float().flatten().cpu() for p in model.parameters()])
    return flat, final


EIGHT_BIT_DRIFT = "8-bit states (op kernel), min_8bit_size=0: every tensor"
BNB_DRIFT = "bitsandbytes AdEMAMix8bit, min_8bit_size=0"
DRIFT_VARIANTS = ("fp32 states", "bf16 states, SR", "bf16 states, nearest", "bf16 params, SR",
                  "bf16 params, nearest", EIGHT_BIT_DRIFT, BNB_DRIFT)


_FP32_RUNS = {}  # (steps, order_seed) -> drift_run("fp32 states", ...): shared by the tables


def _fp32_drift(steps, order_seed=1):
    if (steps, order_seed) not in _FP32_RUNS:
        _FP32_RUNS[steps, order_seed] = drift_run("fp32 states", steps, order_seed=order_seed)
    return _FP32_RUNS[steps, order_seed]


def drift_rows(steps, variants=DRIFT_VARIANTS):
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).parameters()])
    ref, ref_loss = _fp32_drift(steps)
    moved = (ref - init).norm().item()
    # The yardstick: the same fp32 run on minibatches drawn in another order.
    other_order = _fp32_drift(steps, order_seed=2)
    rows = [["fp32 states, other minibatches", f"{(other_order[0] - ref).norm().item() / moved:.2e}",
             f"{other_order[1]:.5f}"]]
    for variant in variants:
        why_not = bnb_unavailable() if variant == BNB_DRIFT else None
        if why_not:
            rows.append([f"{variant}: {why_not}", "-", "-"])
            continue
        flat, loss = (ref, ref_loss) if variant == "fp32 states" else drift_run(variant, steps)
        rows.append([variant, f"{(flat - ref).norm().item() / moved:.2e}", f"{loss:.5f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall-steps", type=int, default=20_000)
    parser.add_argument("--stall-n", type=int, default=4096)
    parser.add_argument("--drift-steps", type=int, default=5000)
    parser.add_argument("--no-maps", action="store_true",
                        help="skip the exploratory comparison of 8-bit maps (torch ops)")
    args = parser.parse_args(argv)
    env = environment(_device())
    print(", ".join(f"{k} {env.get(k)}" for k in ("date", "cpu", "device", "torch", "commit")))
    t0 = time.perf_counter()
    fp32 = stall_run(torch.float32, args.stall_steps, args.stall_n)
    rows, target = stall_rows(args.stall_steps, args.stall_n, fp32=fp32)
    head = ["run"] + [f"{k.replace('exp_avg_', '')} {c}" for k in STATE_KEYS
                      for c in ("mean", "err", "max")]
    stall_title = (f"{args.stall_steps} steps of a constant gradient (elements spread over "
                   f"[0.1, 1], n = {args.stall_n}), beta3 = {BETAS[2]} (m2 reaches {target:.4f} "
                   f"g); each state against the fp32 run: mean over the elements (relative), "
                   f"per-element error (mean, max)")
    print(f"\nStall test: {stall_title}")
    print(text_table(head, [(0, r) for r in rows], right=set(range(1, len(head)))))
    print(f"({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    drift_title = (f"MLP regression, {args.drift_steps} steps, minibatch 32; the params against "
                   f"the fp32-state run's, relative to how far that run moved them; final loss")
    print(f"\nDrift: {drift_title}")
    print(text_table(["run", "drift", "final loss"], [(0, r) for r in drift_rows(args.drift_steps)],
                     right={1, 2}))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if not args.no_maps:
        t0 = time.perf_counter()
        maps = [(name, name) for name in MAP_VARIANTS]
        rows, _ = stall_rows(args.stall_steps, args.stall_n, variants=maps, fp32=fp32)
        print(f"\n8-bit maps (torch ops), stall test: {stall_title}")
        print(text_table(head, [(0, r) for r in rows], right=set(range(1, len(head)))))
        print(f"\n8-bit maps (torch ops), drift: {drift_title}")
        rows = drift_rows(args.drift_steps, variants=tuple(MAP_VARIANTS))
        print(text_table(["run", "drift", "final loss"], [(0, r) for r in rows], right={1, 2}))
        print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Low-precision states against fp32 states: does the slow EMA stall, how far do the params drift?

  python -m bench.state_precision [--stall-steps 20000] [--stall-n 4096] [--drift-steps 5000]

stall  a constant gradient whose elements differ (spread over [0.1, 1], in random order), beta3 =
       0.9999: every state after the run against the fp32 run's (the mean over the elements, and
       the per-element error). Rows: bf16 states with stochastic rounding (the op's kernel), and a
       plain bf16 state rounded to nearest (torch ops), which stalls.
drift  a small MLP regression with minibatch noise, the same data and init in every run: the
       params after the run against the fp32-state run's (relative to how far the fp32 run moved
       them), and the final loss of each. Rows: bf16 states (SR), bf16 states rounded to nearest,
       bf16 params with SR, bf16 params rounded to nearest (with fp32 states), and as the
       yardstick the fp32 run on minibatches drawn in another order.

Runs on the CPU (the op's CPU kernel, the "cuda" backend) or on a GPU when there is one.
"""
import argparse
import math

import torch

import ademamix_cuda
from ademamix_cuda.functional import ademamix
from bench.environment import environment
from bench.report import text_table

STATE_KEYS = ("exp_avg_fast", "exp_avg_slow", "exp_avg_sq")
BETAS = (0.9, 0.999, 0.9999)


def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def stall_run(state, steps, n, beta3=BETAS[2], seed=0):
    """The states {key: fp32 tensor} after `steps` steps of the constant gradient. `state` is
    torch.float32 or torch.bfloat16 (the op's kernel; bf16 with SR), or "nearest": a bf16 state
    rounded to nearest at every write (torch ops)."""
    device = _device()
    gen = torch.Generator().manual_seed(seed)
    g = torch.linspace(0.1, 1.0, n)[torch.randperm(n, generator=gen)].to(device)
    beta1, beta2 = BETAS[:2]
    if state == "nearest":
        m = {k: torch.zeros(n, dtype=torch.bfloat16, device=device) for k in STATE_KEYS}
        for _ in range(steps):
            for key, beta, x in zip(STATE_KEYS, (beta1, beta3, beta2), (g, g, g * g)):
                m[key] = (beta * m[key].float() + (1.0 - beta) * x).to(torch.bfloat16)
        return {k: v.float().cpu() for k, v in m.items()}
    p = torch.zeros(n, device=device)
    m1, m2, nu = (torch.zeros(n, dtype=state, device=device) for _ in range(3))
    step = torch.zeros((), device=device)
    for _ in range(steps):
        # lr = 0: the states alone are under test
        ademamix([p], [g], [m1], [m2], [nu], [step], lr=0.0, beta1=beta1, beta2=beta2,
                 beta3=beta3, alpha=2.0, beta3_warmup=None, alpha_warmup=None, eps=1e-8,
                 weight_decay=0.0, sr_seed=seed, backend="cuda")
    return {k: v.float().cpu() for k, v in zip(STATE_KEYS, (m1, m2, nu))}


def stall_rows(steps, n):
    fp32 = stall_run(torch.float32, steps, n)
    rows = []
    for name, state in (("bf16 states, SR", torch.bfloat16), ("bf16 states, nearest", "nearest")):
        out = stall_run(state, steps, n)
        row = [name]
        for key in STATE_KEYS:
            mean = out[key].double().mean() / fp32[key].double().mean() - 1.0
            err = (out[key].double() / fp32[key].double() - 1.0).abs()
            row += [f"{mean.item():+.2e}", f"{err.mean().item():.2%}", f"{err.max().item():.2%}"]
        rows.append(row)
    target = 1.0 - BETAS[2] ** steps
    return rows, target


class _NearestStates(torch.optim.Optimizer):
    """AdEMAMix with bf16 states rounded to nearest at every write (torch ops): the baseline
    stochastic rounding is measured against."""

    def __init__(self, params, lr, betas, alpha, weight_decay):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, weight_decay=weight_decay))

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
                    st[key] = value.to(torch.bfloat16)


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


DRIFT_VARIANTS = ("fp32 states", "bf16 states, SR", "bf16 states, nearest", "bf16 params, SR",
                  "bf16 params, nearest")


def drift_rows(steps):
    torch.manual_seed(0)
    init = torch.cat([p.detach().flatten() for p in torch.nn.Sequential(
        torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).parameters()])
    ref, ref_loss = drift_run("fp32 states", steps)
    moved = (ref - init).norm().item()
    # The yardstick: the same fp32 run on minibatches drawn in another order.
    other_order = drift_run("fp32 states", steps, order_seed=2)
    rows = [["fp32 states, other minibatches", f"{(other_order[0] - ref).norm().item() / moved:.2e}",
             f"{other_order[1]:.5f}"]]
    for variant in DRIFT_VARIANTS:
        flat, loss = (ref, ref_loss) if variant == "fp32 states" else drift_run(variant, steps)
        rows.append([variant, f"{(flat - ref).norm().item() / moved:.2e}", f"{loss:.5f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stall-steps", type=int, default=20_000)
    parser.add_argument("--stall-n", type=int, default=4096)
    parser.add_argument("--drift-steps", type=int, default=5000)
    args = parser.parse_args(argv)
    env = environment(_device())
    print(", ".join(f"{k} {env.get(k)}" for k in ("date", "cpu", "device", "torch", "commit")))
    rows, target = stall_rows(args.stall_steps, args.stall_n)
    print(f"\nStall test: {args.stall_steps} steps of a constant gradient (elements spread over "
          f"[0.1, 1]), beta3 = {BETAS[2]} (m2 reaches {target:.4f} g); each state against the "
          f"fp32 run: mean over the elements (relative), per-element error (mean, max)")
    head = ["run"] + [f"{k.replace('exp_avg_', '')} {c}" for k in STATE_KEYS
                      for c in ("mean", "err", "max")]
    print(text_table(head, [(0, r) for r in rows], right=set(range(1, len(head)))))
    print(f"\nDrift: MLP regression, {args.drift_steps} steps, minibatch 32; the params against "
          f"the fp32-state run's, relative to how far that run moved them; final loss")
    print(text_table(["run", "drift", "final loss"], [(0, r) for r in drift_rows(args.drift_steps)],
                     right={1, 2}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Does it train? AdEMAMix against Adam(W), and our backends and state precisions side by side.

    python -m bench.convergence                  # the default run: minutes on a 2-core CPU
    python -m bench.convergence --preset large   # a larger LM and a longer run, for a GPU
    python -m bench.convergence --help

Three parts (`--parts`), each a set of independent runs spread over `--workers` processes:

  rosenbrock  the 2-D Rosenbrock function from a hard start, Adam with several beta1 against
              AdEMAMix with its alpha and beta3 warm-ups spanning the run: loss per iteration.
  lm          a tiny byte-level GPT on a corpus that ships with Python (bench/tinylm.py), AdamW
              against AdEMAMix (the paper's alpha and beta3, warm-ups as long as the run, the same
              lr schedule), several seeds: validation loss, mean and std over the seeds.
  backends    the same LM run (seed 0) with every backend of ours and every state precision that
              exists: final validation losses side by side against the reference backend.

Prints a table per part, writes a JSON file (every number, the configuration, the environment)
and a PNG of the curves to --out. Method and measured results: bench/NOTES.md, README.md.
"""
import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import json
import math
import multiprocessing
import os
import queue
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `ademamix_cuda` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import tinylm
from bench.environment import environment, pick_device
from bench.report import Progress, first_line, fmt, pyplot, save_figure, text_table

PARTS = ("rosenbrock", "lm", "backends")

# The AdEMAMix state precisions: name -> the AdEMAMix keyword arguments that select it. Every
# backend runs with every precision; 8-bit states are one entry when they land.
STATE_PRECISIONS = {"fp32": {}, "bf16": {"state_dtype": torch.bfloat16}}

# Rosenbrock: f(x, y) = (1 - x)^2 + 100 (y - x^2)^2, minimum 0 at (1, 1). From (-3, 5) the
# iterate must cross the ridge and then follow the long, curved, nearly flat valley: the case
# where a memory of old gradients pays.
ROSENBROCK_START = (-3.0, 5.0)
ROSENBROCK_BETA2 = 0.999
ROSENBROCK_THRESHOLD = 1e-6  # "converged": the iteration at which the loss first falls below

# The paper's language-model recipe: AdamW betas (0.9, 0.999), AdEMAMix adds beta3 = 0.9999 and
# alpha = 8 with both warm-ups as long as the run; weight decay 0.1 (here on the matrices) for both.
LM_BETAS = (0.9, 0.999)

PRESETS = {
    # ~0.37M params, 2k tokens a step: the default run on a 2-core CPU machine.
    "small": dict(d_model=96, layers=3, heads=4, context=64, batch=32, steps=1000, eval_every=50,
                  val_windows=256, rosenbrock_iters=50_000),
    # ~3.3M params, 8k tokens a step: for a GPU.
    "large": dict(d_model=256, layers=4, heads=8, context=128, batch=64, steps=4000,
                  eval_every=100, val_windows=512, rosenbrock_iters=50_000),
}


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RosenbrockRun:
    optimizer: str          # "adam" | "ademamix"
    beta1: float
    beta3: float | None = None

    @property
    def label(self):
        if self.optimizer == "adam":
            return f"Adam beta1={self.beta1}"
        return f"AdEMAMix beta3={self.beta3}"


@dataclasses.dataclass(frozen=True)
class LMRun:
    optimizer: str          # "adamw" | "ademamix"
    seed: int
    beta3: float | None = None    # AdEMAMix only, like the three below
    backend: str | None = None
    precision: str | None = None
    stop: int | None = None       # stop after this many steps (the schedules keep the full run)

    @property
    def curve(self):
        """The curve of the lm part this run's seed belongs to."""
        return "AdamW" if self.optimizer == "adamw" else f"AdEMAMix beta3={self.beta3}"

    @property
    def label(self):
        if self.optimizer == "adamw":
            return f"{self.curve} seed {self.seed}"
        return f"{self.curve} {self.backend} {self.precision} seed {self.seed}"


def reference_backend(device):
    """The backend of parts rosenbrock and lm, and the one the others are compared with: the
    compiled op where it loads (its CPU kernel on a CPU run), else what "auto" picks. Triton
    on a CPU runs interpreted, far too slowly for a whole run."""
    from ademamix_cuda import backends

    if backends.why_not("cuda", device) is None:
        return "cuda"
    return backends.resolve("auto", device)


def ademamix(params, backend, precision, **hyper):
    import ademamix_cuda

    return ademamix_cuda.AdEMAMix(params, backend=backend, **hyper, **STATE_PRECISIONS[precision])


def run_rosenbrock(cfg, run, report):
    """Loss at every iteration (kept every `stride`), the first iteration below the threshold."""
    # Two numbers: the CPU at any --device (a GPU launch per 2-element step measures nothing).
    p = torch.nn.Parameter(torch.tensor(ROSENBROCK_START))
    p.grad = torch.zeros(2)
    iters = cfg["rosenbrock_iters"]
    if run.optimizer == "adam":
        opt = torch.optim.Adam([p], lr=cfg["rosenbrock_lr"], betas=(run.beta1, ROSENBROCK_BETA2))
    else:
        opt = ademamix([p], reference_backend(torch.device("cpu")), "fp32",
                       lr=cfg["rosenbrock_lr"], betas=(run.beta1, ROSENBROCK_BETA2, run.beta3),
                       alpha=cfg["rosenbrock_alpha"], beta3_warmup=iters, alpha_warmup=iters)
    stride = max(1, iters // 1000)
    losses, first_below, best = [], None, math.inf
    for it in range(iters + 1):
        x, y = p.tolist()
        loss = (1 - x) ** 2 + 100 * (y - x * x) ** 2
        best = min(best, loss)
        if first_below is None and loss < ROSENBROCK_THRESHOLD:
            first_below = it
        if it % stride == 0 or it == iters:
            losses.append((it, loss))
        if it == iters or not math.isfinite(loss):
            break
        p.grad.copy_(torch.tensor([-2 * (1 - x) - 400 * x * (y - x * x), 200 * (y - x * x)]))
        opt.step()
        if (it + 1) % (iters // 10 or 1) == 0:
            report(0.1, f"rosenbrock {run.label}: iteration {it + 1}/{iters}, loss {loss:.2e}")
    return dict(status="ok" if math.isfinite(loss) else "diverged", curve=losses,
                final=loss, best=best, first_below=first_below, final_xy=(x, y))


@functools.lru_cache(maxsize=1)
def _data(context, val_windows):
    corpus, info = tinylm.load_corpus()
    return tinylm.Data(corpus, context, val_windows), info


def run_lm(cfg, run, report):
    """Trains the tiny GPT; validation loss every eval_every steps (and at 0), train loss always."""
    device = torch.device(cfg["device"])
    data, _ = _data(cfg["context"], cfg["val_windows"])
    steps, stop = cfg["steps"], run.stop or cfg["steps"]
    torch.manual_seed(run.seed)  # the model's init: the same for both optimizers of a seed
    model = tinylm.TinyGPT(cfg["d_model"], cfg["layers"], cfg["heads"], cfg["context"]).to(device)
    groups = tinylm.param_groups(model, cfg["weight_decay"])
    if run.optimizer == "adamw":
        opt = torch.optim.AdamW(groups, lr=cfg["lr"], betas=LM_BETAS)
    else:
        opt = ademamix(groups, run.backend, run.precision, lr=cfg["lr"],
                       betas=(*LM_BETAS, run.beta3), alpha=cfg["alpha"],
                       beta3_warmup=steps, alpha_warmup=steps)
    gen = torch.Generator().manual_seed(run.seed)  # the batches: the same for both optimizers
    val = data.val.to(device)

    eval_seconds = 0.0

    @torch.no_grad()
    def evaluate():
        nonlocal eval_seconds
        t = time.perf_counter()
        losses = [model.loss(val[i:i + cfg["batch"]]) * len(val[i:i + cfg["batch"]])
                  for i in range(0, len(val), cfg["batch"])]
        loss = (torch.stack(losses).sum() / len(val)).item()
        eval_seconds += time.perf_counter() - t
        return loss

    t0 = time.perf_counter()
    evals, train, pending = [(0, evaluate())], [], []
    for step in range(stop):
        lr = tinylm.lr_at(step, steps, cfg["lr"], cfg["warmup"], cfg["final_lr_fraction"])
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model.loss(data.train_batch(cfg["batch"], gen).to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(loss.detach())  # read back at the evaluations: no sync every step
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == stop:
            train += torch.stack(pending).tolist()
            pending = []
            evals.append((step + 1, evaluate()))
            report((step + 1 - evals[-2][0]) / stop,
                   f"lm {run.label}: step {step + 1}/{stop}, val loss {evals[-1][1]:.4f}")
            if not math.isfinite(evals[-1][1]):
                break
    train_seconds = time.perf_counter() - t0 - eval_seconds
    final = evals[-1][1]
    return dict(status="ok" if math.isfinite(final) else "diverged", evals=evals, train=train,
                final=final, steps=evals[-1][0], train_seconds=train_seconds,
                eval_seconds=eval_seconds, ms_per_step=1e3 * train_seconds / max(1, len(train)),
                n_params=sum(p.numel() for p in model.parameters()),
                backend_used=getattr(opt, "backend_used", None))


def run_one(cfg, run, report):
    """`report(share of the run done since the last report, text)` tells how far it is."""
    fn = run_rosenbrock if isinstance(run, RosenbrockRun) else run_lm
    report(0, f"{run.label}: starting")
    try:
        return fn(cfg, run, report)
    except Exception as e:
        return dict(status=f"error: {type(e).__name__}: {first_line(e)}")


# Worker processes: one run at a time each, one torch thread, progress through a queue.
_QUEUE = None


def _init_worker(q, threads):
    global _QUEUE
    _QUEUE = q
    torch.set_num_threads(threads)


def _run_in_worker(cfg, run):
    return run_one(cfg, run, lambda share, text: _QUEUE.put((share, text)))


def run_all(cfg, runs, workers, progress):
    """{run: result}. With workers > 1, spawned processes (fork is unsafe once torch's threads
    exist); a run's result does not depend on where it ran."""
    if workers <= 1:
        return {run: run_one(cfg, run, lambda share, text: progress(text, share)) for run in runs}
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                                                initargs=(q, torch.get_num_threads())) as pool:
        futures = {pool.submit(_run_in_worker, cfg, run): run for run in runs}
        pending = set(futures)
        while pending:
            try:
                share, text = q.get(timeout=0.5)
                progress(text, share)
            except queue.Empty:
                pass
            pending = {f for f in pending if not f.done()}
        return {run: f.result() for f, run in futures.items()}


# ---------------------------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------------------------

def mean_std(values):
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def mean_curve(results):
    """Mean and std of the validation loss at each evaluated step, over runs with those steps."""
    steps = [s for s, _ in results[0]["evals"]]
    per_step = list(zip(*[[v for _, v in r["evals"]] for r in results]))
    return steps, [mean_std(vs) for vs in per_step]


def first_step_at_or_below(steps, values, target):
    return next((s for s, v in zip(steps, values) if v <= target), None)


def early_share(beta1, beta3, steps):
    """The share of the slow EMA's weight that the gradients of the first 10 % of the steps hold
    after the last step, with both warm-ups as long as the run: what m2 still remembers of the
    start (from the beta3 schedule alone)."""
    from ademamix_cuda.schedules import beta3_at

    weights, keep = [], 1.0  # from the last step back: weight of g_t = (1 - b_t) * prod_{u>t} b_u
    for t in range(steps, 0, -1):
        b = beta3_at(t, beta1, beta3, steps)
        weights.append((1 - b) * keep)
        keep *= b
    return sum(weights[steps - steps // 10:]) / sum(weights)


def summarize_lm(cfg, results):
    """Per curve (AdamW, AdEMAMix for each beta3): the final validation loss over the seeds (mean,
    std), the mean curve, and for AdEMAMix the first evaluated step at which its mean reaches
    AdamW's final mean."""
    out = {}
    for name in dict.fromkeys(run.curve for run in results):
        ok = [r for run, r in results.items() if run.curve == name and r["status"] == "ok"]
        if not ok:
            continue
        steps, curve = mean_curve(ok)
        finals = [r["final"] for r in ok]
        out[name] = dict(seeds=len(ok), finals=finals, final_mean=mean_std(finals)[0],
                         final_std=mean_std(finals)[1], steps=steps,
                         mean=[m for m, _ in curve], std=[s for _, s in curve],
                         ms_per_step=statistics.median(r["ms_per_step"] for r in ok))
    beta3s = {run.curve: run.beta3 for run in results if run.optimizer == "ademamix"}
    for name, s in out.items():
        if name in beta3s:
            s["m2_early_share"] = early_share(LM_BETAS[0], beta3s[name], cfg["steps"])
    adamw = out.get("AdamW")
    for name, s in out.items():
        if adamw and name != "AdamW":
            step = first_step_at_or_below(s["steps"], s["mean"], adamw["final_mean"])
            s["reaches_adamw_final"] = dict(target=adamw["final_mean"], step=step,
                                            fewer_steps=step and cfg["steps"] / step)
    return out


def summarize_backends(results, reference, lm_summary):
    """Each (backend, precision) run's final validation loss against the reference backend's
    at the same step, and the largest train-loss gap from it over the first steps, which every
    run took (a cut-short run's), and over all the steps both took."""
    ref_run = next((run for run in results if run.backend == reference and run.precision == "fp32"
                    and run.stop is None), None)
    ref = results.get(ref_run)
    ok = [r for r in results.values() if r["status"] == "ok"]
    early = min((len(r["train"]) for r in ok), default=0)

    def train_gap(r, n):
        return max(abs(a - b) for a, b in zip(r["train"][:n], ref["train"][:n]))

    rows = []
    for run, r in results.items():
        row = dict(backend=run.backend, precision=run.precision, status=r["status"],
                   reference=run == ref_run)
        if r["status"] == "ok" and ref and ref["status"] == "ok":
            ref_val = dict(ref["evals"]).get(r["steps"])
            row.update(steps=r["steps"], final=r["final"], ref_final=ref_val,
                       gap=None if ref_val is None else abs(r["final"] - ref_val),
                       early_train_gap=train_gap(r, early),
                       train_gap=train_gap(r, min(len(r["train"]), len(ref["train"]))),
                       ms_per_step=r["ms_per_step"], backend_used=r["backend_used"])
        rows.append(row)
    gaps = [row for row in rows if row.get("gap") is not None and not row["reference"]]
    largest = max(gaps, key=lambda row: row["gap"], default=None)
    seed_std = ref_run and lm_summary.get(ref_run.curve, {}).get("final_std")
    return dict(reference=reference, rows=rows, early_steps=early, largest_gap=largest and dict(
        gap=largest["gap"], backend=largest["backend"], precision=largest["precision"]),
        ademamix_seed_std=seed_std)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

def rosenbrock_table(results, iters):
    cols = ["optimizer", "loss at 10 %", "at 50 %", "final", "best",
            f"first < {ROSENBROCK_THRESHOLD:g}"]
    body = []
    for run, r in results.items():
        if r["status"] != "ok":
            body.append((0, [run.label, "", "", "", "", r["status"]]))
            continue
        curve = dict(r["curve"])
        at = lambda frac: curve.get(min(curve, key=lambda it: abs(it - frac * iters)))
        body.append((0, [run.label, f"{at(0.1):.2e}", f"{at(0.5):.2e}", f"{r['final']:.2e}",
                         f"{r['best']:.2e}", "not reached" if r["first_below"] is None
                         else f"iteration {r['first_below']}"]))
    return text_table(cols, body, right={1, 2, 3, 4})


def lm_table(summary, results, steps):
    cols = ["optimizer", "seeds", "final val loss", "per seed", "reaches AdamW's final",
            f"m2 weight on steps 1-{steps // 10}", "ms/step"]
    body = []
    for name in dict.fromkeys(run.curve for run in results):
        failed = "; ".join(f"seed {run.seed}: {r['status']}" for run, r in results.items()
                           if run.curve == name and r["status"] != "ok")
        s = summary.get(name)
        if s is None:
            body.append((0, [name, "0", "", failed, "", "", ""]))
            continue
        reach = s.get("reaches_adamw_final")
        reach = ("" if reach is None else f"not within {steps} steps" if reach["step"] is None
                 else f"step {reach['step']} ({reach['fewer_steps']:.2f}x fewer)")
        body.append((0, [name, str(s["seeds"]), f"{s['final_mean']:.4f} ± {s['final_std']:.4f}",
                         " ".join(f"{v:.4f}" for v in s["finals"]) + (f"; {failed}" if failed
                                                                       else ""),
                         reach, fmt(s.get("m2_early_share"), ".0%"),
                         f"{s['ms_per_step']:.1f}"]))
    return text_table(cols, body, right={1, 5, 6})


def backends_table(summary, skipped):
    cols = ["backend", "state", "steps", "final val loss", "reference at step", "gap",
            f"train-loss gap, steps 1-{summary['early_steps']}", "all steps", "ms/step"]
    body = []
    for row in summary["rows"]:
        name = row["backend"] + (" (reference)" if row["reference"] else "")
        if row.get("final") is None:
            body.append((0, [name, row["precision"], "", "", "", "", "", "", row["status"]]))
            continue
        body.append((0, [name, row["precision"], str(row["steps"]), f"{row['final']:.5f}",
                         fmt(row["ref_final"], ".5f"), fmt(row["gap"], ".1e"),
                         f"{row['early_train_gap']:.1e}", f"{row['train_gap']:.1e}",
                         f"{row['ms_per_step']:.1f}"]))
    for backend, reason in skipped.items():
        body.append((1, [backend, "all", "", "", "", "", "", "", reason]))
    return text_table(cols, body, right={2, 3, 4, 5, 6, 7, 8})


def rosenbrock_panel(ax, rosen):
    for run, r in rosen.items():
        if r["status"] == "ok":
            its, losses = zip(*r["curve"])
            # fp32 iterates reach exactly 0 loss: drawn at the axis floor of a log scale.
            ax.plot(its, [max(v, 1e-16) for v in losses], label=run.label,
                    ls="-" if run.optimizer == "ademamix" else "--", lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("Rosenbrock loss")
    ax.set_title(f"Rosenbrock from {ROSENBROCK_START}", fontsize=10)


def lm_panel(ax, lm_summary):
    for name, s in lm_summary.items():
        lo = [m - d for m, d in zip(s["mean"], s["std"])]
        hi = [m + d for m, d in zip(s["mean"], s["std"])]
        line, = ax.plot(s["steps"], s["mean"], label=f"{name}: {s['final_mean']:.3f} ± "
                        f"{s['final_std']:.3f} ({s['seeds']} seeds)")
        ax.fill_between(s["steps"], lo, hi, color=line.get_color(), alpha=0.25)
    tails = [v for s in lm_summary.values() for v in s["mean"][len(s["mean"]) // 4:]]
    # Zoom on the part of the curves where the optimizers differ.
    ax.set_ylim(min(tails) - 0.05, max(tails) + 0.05)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats per byte)")
    ax.set_title("tiny GPT, validation loss (mean ± std over seeds)", fontsize=10)


def backends_panel(ax, back, back_results):
    ref = next(r for run, r in back_results.items() if run.backend == back["reference"]
               and run.precision == "fp32" and run.stop is None)
    ref_evals = dict(ref["evals"])
    for run, r in back_results.items():
        if r["status"] == "ok" and r is not ref:
            pts = [(s, v - ref_evals[s]) for s, v in r["evals"] if s in ref_evals]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 5 else None, ms=4,
                    label=f"{run.backend} {run.precision}")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel(f"val loss minus the {back['reference']} fp32 run")
    ax.set_title("AdEMAMix, backends and state precisions (seed 0)", fontsize=10)


def plot(rosen, lm_summary, back, back_results, path, title):
    """A panel per part that has curves: Rosenbrock loss, LM validation loss (mean ± std), the
    backends' validation loss minus the reference's."""
    plt, why_not = pyplot()
    if why_not:
        return why_not
    ref_ok = any(row["reference"] and row["status"] == "ok" for row in back.get("rows", []))
    panels = [(draw, data) for draw, data, ok in (
        (rosenbrock_panel, (rosen,), any(r["status"] == "ok" for r in rosen.values())),
        (lm_panel, (lm_summary,), bool(lm_summary)),
        (backends_panel, (back, back_results), ref_ok)) if ok]
    if not panels:
        return "not written: no run has a curve"
    fig, axes = plt.subplots(1, len(panels), figsize=(5.7 * len(panels), 4.8), squeeze=False)
    for ax, (draw, data) in zip(axes.flat, panels):
        draw(ax, *data)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title, dpi=110)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.convergence", description=__doc__,
        epilog="Defaults come from --preset (small: the CPU default; large: for a GPU); any "
               "flag below overrides its preset value.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where the LM trains; auto = cuda when a GPU is visible (Rosenbrock "
                        "always runs on the CPU)")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated: " + ", ".join(PARTS))
    p.add_argument("--preset", choices=list(PRESETS), default="small",
                   help="small (default): ~0.37M params, 1000 steps, the CPU run; large: ~3.3M "
                        "params, 4000 steps, for a GPU")
    for name, kind, what in (
            ("d-model", int, "LM width"), ("layers", int, "LM transformer blocks"),
            ("heads", int, "attention heads"), ("context", int, "bytes per training sequence"),
            ("batch", int, "sequences per step"), ("steps", int, "LM training steps"),
            ("eval-every", int, "steps between validation evaluations"),
            ("val-windows", int, "validation sequences (evenly spaced over the held-out 10 %%)"),
            ("rosenbrock-iters", int, "Rosenbrock iterations")):
        p.add_argument(f"--{name}", type=kind, default=None, help=f"{what} (preset)")
    p.add_argument("--seeds", type=int, default=3, help="LM seeds per optimizer (default: 3)")
    p.add_argument("--lr", type=float, default=2e-3,
                   help="peak LM learning rate, both optimizers (default: 2e-3)")
    p.add_argument("--warmup-fraction", type=float, default=0.05,
                   help="lr warm-up, as a share of the steps (default: 0.05), then cosine decay")
    p.add_argument("--final-lr-fraction", type=float, default=0.1,
                   help="lr at the last step, as a share of the peak (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="on matrices (default: 0.1)")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (default: 1.0)")
    p.add_argument("--alpha", type=float, default=8.0, help="AdEMAMix alpha (default: 8)")
    p.add_argument("--beta3", default="0.9999",
                   help="AdEMAMix beta3; several, comma-separated, give one curve each (the "
                        "backends part uses the first) (default: 0.9999, the paper's)")
    p.add_argument("--rosenbrock-lr", type=float, default=1e-3, help="(default: 1e-3)")
    p.add_argument("--rosenbrock-alpha", type=float, default=8.0, help="(default: 8)")
    p.add_argument("--rosenbrock-adam-beta1s", default="0.9,0.99,0.999",
                   help="Adam's beta1 values (default: 0.9,0.99,0.999)")
    p.add_argument("--rosenbrock-beta3s", default="0.999,0.9999",
                   help="AdEMAMix's beta3 values, beta1 0.9 (default: 0.999,0.9999)")
    p.add_argument("--backends", default=None,
                   help="backends of the backends part (default: all of cuda, triton, foreach, "
                        "single that can run here)")
    p.add_argument("--triton-steps", type=int, default=None,
                   help="stop the Triton run after this many steps, a multiple of --eval-every "
                        "(default: the whole run on cuda; on a CPU, where Triton runs "
                        "interpreted, --eval-every)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes running runs side by side (default: 1 on cuda; on a CPU the "
                        "cores, at most 2), each with --threads torch threads")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default on a CPU: 1, so that results do not "
                        "depend on the thread count; on cuda: torch's choice)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"),
                   help="directory for the JSON and PNG (default: bench/results/)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)
    args.parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in args.parts if s not in PARTS]
    if bad or not args.parts:
        p.error(f"--parts: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(PARTS)}")
    for name, value in PRESETS[args.preset].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.triton_steps is not None and (args.triton_steps < 1
                                          or args.triton_steps % args.eval_every):
        # Only there does the reference have a validation loss to compare with.
        p.error("--triton-steps must be a positive multiple of --eval-every")
    for name in ("d_model", "layers", "heads", "context", "batch", "steps", "eval_every",
                 "val_windows", "rosenbrock_iters", "seeds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        args.adam_beta1s = [float(v) for v in args.rosenbrock_adam_beta1s.split(",")]
        args.beta3s = [float(v) for v in args.rosenbrock_beta3s.split(",")]
        args.beta3 = [float(v) for v in args.beta3.split(",")]
    except ValueError as e:
        p.error(f"--rosenbrock-adam-beta1s, --rosenbrock-beta3s, --beta3: {e}")
    return args


def config_of(args, device):
    return dict(device=str(device), preset=args.preset, parts=args.parts,
                d_model=args.d_model, layers=args.layers, heads=args.heads, context=args.context,
                batch=args.batch, steps=args.steps, eval_every=args.eval_every,
                val_windows=args.val_windows, seeds=args.seeds, lr=args.lr,
                warmup=max(1, round(args.warmup_fraction * args.steps)),
                final_lr_fraction=args.final_lr_fraction, weight_decay=args.weight_decay,
                clip=args.clip, alpha=args.alpha, beta3=args.beta3, lm_betas=LM_BETAS,
                rosenbrock_iters=args.rosenbrock_iters, rosenbrock_lr=args.rosenbrock_lr,
                rosenbrock_alpha=args.rosenbrock_alpha, rosenbrock_start=ROSENBROCK_START,
                rosenbrock_beta2=ROSENBROCK_BETA2, rosenbrock_threshold=ROSENBROCK_THRESHOLD)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    on_cuda = device.type == "cuda"
    if not on_cuda:
        # Triton takes CPU tensors only interpreted; it reads this when the kernels are defined,
        # i.e. before anything below imports triton (spawned workers inherit it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.threads is None and not on_cuda:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    workers = args.workers or (1 if on_cuda else max(1, min(2, os.cpu_count() or 1)))
    cfg = config_of(args, device)
    from ademamix_cuda import backends

    reference = reference_backend(device)
    wanted = args.backends.split(",") if args.backends else list(backends.BACKENDS)
    unknown = [name for name in wanted if name not in backends.BACKENDS]
    if unknown:
        print(f"error: --backends: unknown {', '.join(unknown)}; choose from "
              f"{', '.join(backends.BACKENDS)}", file=sys.stderr)
        return 2
    skipped, backend_names = {}, [reference]  # the yardstick runs whatever --backends says
    for name in wanted:
        why = backends.why_not(name, device)
        if why:
            skipped[name] = f"not available: {why}"
        elif name not in backend_names:
            backend_names.append(name)
    triton_stop = args.triton_steps or (None if on_cuda else args.eval_every)
    if triton_stop is not None and triton_stop >= args.steps:
        triton_stop = None

    rosen_runs = ([RosenbrockRun("adam", b1) for b1 in args.adam_beta1s]
                  + [RosenbrockRun("ademamix", 0.9, b3) for b3 in args.beta3s]
                  if "rosenbrock" in args.parts else [])
    lm_runs = [run for seed in range(args.seeds) for run in (
        [LMRun("adamw", seed)] + [LMRun("ademamix", seed, b3, reference, "fp32")
                                  for b3 in args.beta3])] if "lm" in args.parts else []
    backend_runs = [LMRun("ademamix", 0, args.beta3[0], b, prec,
                          triton_stop if b == "triton" else None)
                    for b in backend_names for prec in STATE_PRECISIONS
                    ] if "backends" in args.parts else []
    # Heaviest first, so that the short runs fill the gaps at the end; the reference run of the
    # backends part is the lm part's seed 0 when both run.
    runs = list(dict.fromkeys(lm_runs + backend_runs + rosen_runs))

    env = environment(device)
    _, corpus = _data(cfg["context"], cfg["val_windows"])
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stamp}-{device.type}-convergence.json"
    png_path = out_dir / f"{stamp}-{device.type}-convergence.png"
    print(f"ademamix-cuda convergence on {env['device_name']}: torch {env['torch']}, "
          f"triton {env['triton']}, commit {env['commit'] or '?'}, {workers} worker(s) x "
          f"{torch.get_num_threads()} torch thread(s)", flush=True)
    print(f"  parts: {', '.join(args.parts)}; {len(runs)} runs; corpus: {corpus['name']}, "
          f"{corpus['bytes']} bytes (Python {corpus['python']})", flush=True)
    print(f"  state precisions of AdEMAMix: {', '.join(STATE_PRECISIONS)} (8-bit states do not "
          "exist yet)", flush=True)
    if triton_stop is not None and "triton" in backend_names and "backends" in args.parts:
        print(f"  ours triton runs interpreted on a CPU (TRITON_INTERPRET=1, ~10 ms per program "
              f"of 16384 elements): its run stops at step {triton_stop} of {args.steps} and is "
              f"compared with the reference there", flush=True)

    t0 = time.perf_counter()
    progress = Progress(len(runs), bar=True)
    results = run_all(cfg, runs, workers, progress)
    progress.close()
    wall = time.perf_counter() - t0

    rosen = {r: results[r] for r in rosen_runs}
    lm = {r: results[r] for r in lm_runs}
    lm_summary = summarize_lm(cfg, lm) if lm else {}
    back = summarize_backends({r: results[r] for r in backend_runs}, reference,
                              lm_summary) if backend_runs else {}
    n_params = next((r["n_params"] for r in results.values() if "n_params" in r), None)

    if rosen:
        print(f"\nRosenbrock from {ROSENBROCK_START}, {args.rosenbrock_iters} iterations, lr "
              f"{args.rosenbrock_lr}, beta2 {ROSENBROCK_BETA2}; AdEMAMix beta1 0.9, alpha "
              f"{args.rosenbrock_alpha}, alpha and beta3 warm-ups over the whole run "
              f"(backend {reference_backend(torch.device('cpu'))}, fp32):")
        print(rosenbrock_table(rosen, args.rosenbrock_iters))
    if lm:
        print(f"\nTiny GPT ({fmt(n_params, ',')} params: d {args.d_model}, {args.layers} layers, "
              f"{args.heads} heads, context {args.context}), {args.steps} steps of {args.batch} "
              f"sequences, lr {args.lr} (warm-up {cfg['warmup']}, cosine to "
              f"{args.final_lr_fraction:g}x), weight decay {args.weight_decay}, clip {args.clip}; "
              f"AdEMAMix alpha {args.alpha}, beta3 "
              + ", ".join(f"{b3} (half-life {math.log(0.5) / math.log(b3):.0f} steps)"
                          for b3 in args.beta3)
              + f", warm-ups {args.steps}, backend {reference}:")
        print(lm_table(lm_summary, lm, args.steps))
    if back:
        print(f"\nBackends and state precisions, AdEMAMix beta3={args.beta3[0]}, seed 0 "
              f"(reference: {reference} fp32):")
        print(backends_table(back, skipped))
        if back["largest_gap"]:
            g = back["largest_gap"]
            print(f"largest gap of a final validation loss from the reference at the same step: "
                  f"{g['gap']:.1e} ({g['backend']} {g['precision']})"
                  + (f"; the seed-to-seed std of AdEMAMix's final loss is "
                     f"{back['ademamix_seed_std']:.1e}" if back["ademamix_seed_std"] else ""))
    print(f"\nwall time {wall:.0f} s")

    title = f"AdEMAMix convergence, {stamp[:8]}\n{env['device_name']}, torch {env['torch']}"
    png = "not written (--no-plot)" if args.no_plot else plot(
        rosen, lm_summary, back, {r: results[r] for r in backend_runs}, png_path, title)
    result = dict(
        environment=env, config=dict(cfg, argv=sys.argv[1:] if argv is None else argv,
                                     workers=workers, threads=torch.get_num_threads(),
                                     reference_backend=reference, triton_stop=triton_stop,
                                     state_precisions=list(STATE_PRECISIONS)),
        corpus=corpus, wall_seconds=wall, n_params=n_params, skipped_backends=skipped,
        rosenbrock=[dict(label=r.label, **dataclasses.asdict(r), **results[r]) for r in rosen_runs],
        lm=dict(summary=lm_summary, runs=[dict(label=r.label, **dataclasses.asdict(r), **results[r])
                                          for r in lm_runs]),
        backends=dict(back, runs=[dict(label=r.label, **dataclasses.asdict(r), **results[r])
                                  for r in backend_runs]),
        png=png)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {json_path} and {png}")
    return 0 if all(r["status"] == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

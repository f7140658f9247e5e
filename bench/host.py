"""Host cost of one optimizer step(): `python -m bench --host`. See bench/NOTES.md, "Host cost".

Every tensor of a set is shrunk to --host-numel elements (8) while the set keeps its tensor count
(gpt 292, small 4096), so the kernels' own work is negligible and the wall time of step() is what
the host spends on it: argument checks, plan lookups, Python. Two ways the grads arrive:

  kept   the same grad tensors at every step (the best case for any cache keyed on addresses);
  fresh  before every step, opt.zero_grad(set_to_none=True) and new grad tensors allocated in
         reverse param order, as backward allocates them. Whether the allocator hands back the
         previous step's addresses is measured: "same addrs" is the share of timed steps whose
         grads all sit where the step before's did.

Only step() is timed. The implementations of one set take turns, one step() each per round, so
that load from elsewhere on the machine falls on all of them alike. On CUDA the device queue is
drained before each call, so a call never waits on a full queue, and everything runs for real.
Without a GPU the Triton backend runs interpreted (~10 ms per program), so its kernel launches are
replaced by a no-op during its steps: its rows time the host path up to the launch, without
Triton's launch overhead.
"""
import contextlib
import importlib
import json
import statistics
import sys
import time

import torch

from bench import impls, param_sets
from bench.environment import environment
from bench.report import Progress, first_line, text_table
from bench.step import DTYPES, make_params
from bench.timing import free, sync

GRADS = ("kept", "fresh")
# Ours foreach is left out: ~45 us per tensor on the CPU, it would about double the run
# (--impls foreach).
DEFAULT_IMPLS = ("cuda", "triton", "adamw-fused", "adamw-foreach")


@contextlib.contextmanager
def triton_launches_stubbed():
    kernels = importlib.import_module("ademamix_cuda.triton_kernels.ademamix")
    launch = kernels._launch
    kernels._launch = lambda *args, **kwargs: None
    try:
        yield
    finally:
        kernels._launch = launch


def stubbed(impl, device):
    return impl.key == "triton" and device.type != "cuda"


def label_of(impl, device):
    if stubbed(impl, device):
        return "ours triton (launches stubbed)"
    return impls.label_of(impl, device)


def note_of(impl, device):
    if stubbed(impl, device):
        return "host path up to the launch; launch overhead excluded"
    if impl.key == "cuda" and device.type == "cpu":
        return "the op's C++ host path + its CPU kernel on tiny tensors"
    return ""


def why_not_run(impl, device, args):
    if impl.graph:
        return "not measured: a graph replay reads fixed grad addresses (no fresh grads)"
    if stubbed(impl, device):  # runs here with its launches stubbed, if Triton takes CPU tensors
        from ademamix_cuda import backends

        ok, reason = backends.available(device)["triton"]
        return None if ok else f"not available: {reason}"
    return impls.why_not_run(impl, device, args)


class Subject:
    """One implementation's optimizer over its own copy of the set, and its step() times."""

    def __init__(self, impl, n_tensors, dtype, grads, device, args):
        self.impl, self.device = impl, device
        self.stubbed = stubbed(impl, device)
        self.fresh = grads == "fresh"
        self.params = make_params([(args.host_numel,)] * n_tensors, dtype, device, args.seed)
        self.sources = [p.grad for p in self.params]
        self.opt = impl.make(self.params, device)
        self.addrs = self.grad_addrs()
        self.times, self.same_addrs = [], 0

    def grad_addrs(self):
        return [p.grad.data_ptr() for p in self.params]

    def step(self, timed):
        with triton_launches_stubbed() if self.stubbed else contextlib.nullcontext():
            if self.fresh:
                self.opt.zero_grad(set_to_none=True)
                for p, g in zip(reversed(self.params), reversed(self.sources)):  # backward order
                    p.grad = g.clone()
            addrs = self.grad_addrs()
            if timed:
                self.same_addrs += addrs == self.addrs
            self.addrs = addrs
            sync(self.device)
            t0 = time.perf_counter()
            self.opt.step()
            dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)

    def result(self):
        us = statistics.median(self.times) * 1e6
        return dict(status="ok", us=us, us_per_tensor=us / len(self.params),
                    us_min=min(self.times) * 1e6, us_mean=statistics.fmean(self.times) * 1e6,
                    calls=len(self.times), same_addrs=self.same_addrs / len(self.times),
                    backend_used=getattr(self.opt, "backend_used", None))


def measure(impls, n_tensors, dtype, grads, device, args):
    """{impl key: numbers or status} for `impls` on n_tensors tensors, timed in turns."""
    try:
        return _measure(impls, n_tensors, dtype, grads, device, args)
    finally:
        free(device)  # after _measure's frame, and with it every tensor of the run, is gone


def _measure(impls, n_tensors, dtype, grads, device, args):
    out, subjects = {}, []
    for impl in impls:
        try:
            subject = Subject(impl, n_tensors, dtype, grads, device, args)
            for _ in range(args.warmup):
                subject.step(timed=False)
            subjects.append(subject)
        except Exception as e:
            out[impl.key] = dict(status=f"error: {type(e).__name__}: {first_line(e)}")
    start, rounds = time.perf_counter(), 0
    while subjects and rounds < args.max_reps and (
            rounds < args.reps or time.perf_counter() - start < args.min_time):
        for subject in list(subjects):
            try:
                subject.step(timed=True)
            except Exception as e:
                out[subject.impl.key] = dict(
                    status=f"error: {type(e).__name__}: {first_line(e)}")
                subjects.remove(subject)
        rounds += 1
    sync(device)
    for subject in subjects:
        out[subject.impl.key] = subject.result()
    return out


def comparisons(rows):
    """Triton against the CUDA op (the target: triton <= cuda), with AdamW fused beside them."""
    ok = {(r["key"], r["set"], r["dtype"], r["grads"]): r for r in rows if r["status"] == "ok"}
    out = []
    for (key, set_name, dt, grads), cuda in ok.items():
        if key != "cuda":
            continue
        triton = ok.get(("triton", set_name, dt, grads))
        fused = ok.get(("adamw-fused", set_name, dt, grads))
        out.append(dict(set=set_name, dtype=dt, grads=grads, n_tensors=cuda["n_tensors"],
                        cuda_us=cuda["us"], triton_us=triton and triton["us"],
                        adamw_fused_us=fused and fused["us"],
                        triton_over_cuda=triton and triton["us"] / cuda["us"],
                        target_met=triton and triton["us"] <= cuda["us"]))
    return out


def comparison_lines(comps):
    lines = ["triton vs cuda, host time per step() (medians; target: triton <= cuda):"]
    for c in comps:
        head = f"  {c['set']:<6} {c['dtype']:<5} {c['grads']:<6} {c['n_tensors']:>5} tensors: "
        if c["triton_us"] is None:
            lines.append(head + "no triton row")
            continue
        fused = (f"; AdamW fused {c['adamw_fused_us']:.0f} us" if c["adamw_fused_us"] is not None
                 else "")
        lines.append(head + f"triton {c['triton_us']:.0f} us, cuda {c['cuda_us']:.0f} us = "
                     f"{c['triton_over_cuda']:.2f}x  {'met' if c['target_met'] else 'NOT MET'}"
                     + fused)
    return lines


def table(rows):
    cols = ["impl", "set", "tensors", "dtype", "grads", "us/step", "us/tensor", "min us", "calls",
            "same addrs", "note"]
    body = []
    for r in rows:
        group = (r["set"], r["dtype"], r["grads"])
        if r["status"] != "ok":
            body.append((group, [r["label"], r["set"], str(r.get("n_tensors", "")), r["dtype"],
                                 r["grads"], "", "", "", "", "", r["status"]]))
            continue
        body.append((group, [r["label"], r["set"], str(r["n_tensors"]), r["dtype"], r["grads"],
                             f"{r['us']:.0f}", f"{r['us_per_tensor']:.2f}", f"{r['us_min']:.0f}",
                             str(r["calls"]), f"{100 * r['same_addrs']:.0f} %", r["note"]]))
    return text_table(cols, body, right={2, 5, 6, 7, 8, 9})


def main(args, device, json_path):
    keys = args.impl_keys or DEFAULT_IMPLS
    chosen = [i for i in impls.IMPLS if i.key in keys]
    sets = {name: len(param_sets.shapes(name)) for name in args.set_names}
    env = environment(device)
    runnable, skipped = [], []
    for impl in chosen:
        reason = why_not_run(impl, device, args)
        if reason:
            skipped.append(dict(key=impl.key, label=label_of(impl, device), set="all",
                                dtype="all", grads="all", status=reason))
        else:
            runnable.append(impl)

    print(f"ademamix-cuda host cost of step() on {env['device_name']}: torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['torch_cuda']}, commit {env['commit'] or '?'}, "
          f"torch threads: {env['torch_threads']}, load average {env['load_average'][0]:.1f}",
          flush=True)
    print("  sets: " + ", ".join(f"{k} {n} tensors" for k, n in sets.items())
          + f", each tensor {args.host_numel} elements", flush=True)
    progress = Progress(len(sets) * len(args.dtype_names) * len(GRADS))
    rows = []
    for set_name, n_tensors in sets.items():
        for dt_name in args.dtype_names:
            for grads in GRADS:
                what = f"{set_name} {dt_name} grads {grads}: {len(runnable)} implementations"
                progress(what)
                results = measure(runnable, n_tensors, DTYPES[dt_name], grads, device, args)
                for impl in runnable:
                    rows.append(dict(key=impl.key, label=label_of(impl, device), set=set_name,
                                     n_tensors=n_tensors, numel=args.host_numel, dtype=dt_name,
                                     grads=grads, launches_stubbed=stubbed(impl, device),
                                     note=note_of(impl, device), **results[impl.key]))
                progress(what, advance=True)
    progress.close()
    comps = comparisons(rows)
    rows += skipped
    print()
    print(table(rows))
    print()
    print(f"us/step: median wall time of step() over `calls` calls, after {args.warmup} untimed; "
          "the implementations of a set take turns, one step each"
          + ("; the device queue drained before each" if device.type == "cuda" else "")
          + ".\nsame addrs: timed steps whose grads all had the previous step's addresses.")
    print("\n".join(comparison_lines(comps)))
    result = dict(environment=env, config=dict(
        argv=sys.argv[1:], mode="host", device=str(device), sets=sets, numel=args.host_numel,
        dtypes=args.dtype_names, grads=list(GRADS), warmup=args.warmup, reps=args.reps,
        min_time_s=args.min_time, max_reps=args.max_reps, threads=torch.get_num_threads(),
        seed=args.seed, timer="time.perf_counter around each step(), median; implementations "
        "in turns, one step each" + (", torch.cuda.synchronize before each step" if
                                     device.type == "cuda" else ""),
        triton_launches_stubbed=device.type != "cuda"), rows=rows, comparison=comps)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {json_path}")
    ours = {i.key for i in impls.IMPLS if i.ours}
    return 1 if any(r["key"] in ours and r["status"].startswith("error") for r in rows) else 0

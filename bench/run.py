"""Benchmark of one AdEMAMix optimizer step: our backends against the peers, as % of copy bandwidth.

Run from the repository root:  python -m bench   (or: python bench/run.py)
See bench/NOTES.md for the method.
"""
import argparse
import datetime
import json
import math
import os
import sys
import textwrap
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `ademamix_cuda` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import param_sets, peers
from bench.environment import environment, pick_device
from bench.impls import IMPL_KEYS, IMPLS, label_of, why_not_for_dtype, why_not_run
from bench.peers import Unavailable
from bench.report import Progress, first_line, fmt, pyplot, save_figure, text_table
from bench.step import CHECK_SHAPES, CHECK_STEPS, DTYPES, TOLERANCE, check, measure
from bench.sweep import SWEEP_CONFIGS, parse_sweep_configs, sweep_summary, sweep_triton
from bench.timing import copy_bandwidth, free

BENCH_DIR = Path(__file__).resolve().parent
# On a machine without a GPU every set is scaled to this many parameters, so that the default run
# finishes in a couple of minutes on two cores.
CPU_DEFAULT_PARAMS = "2M"


def table(rows, copy_gbps, device):
    """The stdout table: one row per (impl, set, dtype), then the implementations that did not run."""
    cols = ["impl", "set", "dtype", "ms", "GB/s", "% copy bw", "x vs authors", "host us/step",
            "extra MiB", "state MiB", "bytes formula / note"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            note = r["status"]
            body.append(((r["set"], r["dtype"]),
                         [r["label"], r["set"], r["dtype"], "", "", "", "", "", "", "", note]))
            continue
        note = r["formula"]
        if r.get("compile_s") is not None:
            note += f"; compile {r['compile_s']:.1f} s"
        body.append(((r["set"], r["dtype"]), [
            r["label"], r["set"], r["dtype"], fmt(r["ms"], ".3f"),
            fmt(r["GBps"], ".1f" if r["GBps"] < 100 else ".0f"), fmt(r["pct_copy"], ".1f"),
            fmt(r.get("speedup"), ".2f"), fmt(r["host_us"], ".0f"),
            fmt(r["extra_mib"], ".1f") if device.type == "cuda" else "n/a",
            fmt(r["state_mib"], ".1f"), note]))
    return text_table(cols, body, right={3, 4, 5, 6, 7, 8, 9})


def plot(rows, path, title):
    """Bar chart of % of copy bandwidth: one panel per (set, dtype), one bar per implementation."""
    plt, why_not = pyplot()
    if why_not:
        return why_not
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return "not written: no row ran"
    groups = []
    for r in ok:
        if (r["set"], r["dtype"]) not in groups:
            groups.append((r["set"], r["dtype"]))
    labels = []
    for r in ok:
        if r["label"] not in labels:
            labels.append(r["label"])
    cmap = plt.get_cmap("tab20")
    colors = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
    # One x scale for every panel, so bars compare across sets; 100 % is drawn when in range.
    xmax = max(10.0, 1.15 * max(r["pct_copy"] for r in ok))
    ncols = min(2, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(7.5 * ncols, 0.9 + 0.32 * len(labels) * nrows + nrows))
    for ax, (set_name, dt) in zip(axes.flat, groups):
        sub = [r for r in ok if (r["set"], r["dtype"]) == (set_name, dt)]
        names = [r["label"] for r in sub][::-1]
        vals = [r["pct_copy"] for r in sub][::-1]
        bars = ax.barh(names, vals, color=[colors[n] for n in names])
        for b, v in zip(bars, vals):
            ax.text(b.get_width(), b.get_y() + b.get_height() / 2, f" {v:.1f}", va="center",
                    fontsize=8)
        ax.set_title(f"{set_name}, {dt} params", fontsize=10)
        ax.set_xlim(0, xmax)
        if xmax > 100:
            ax.axvline(100, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("% of copy bandwidth (higher is better)")
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    return save_figure(fig, path, title, dpi=120)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    impl_list = "\n".join(f"  {i.key:<18} {i.label}" + _when_run(i) for i in IMPLS)
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=textwrap.fill("Time one AdEMAMix optimizer step of our backends and of the peers: median ms, "
                    "effective GB/s, % of the copy bandwidth measured in the same run, speed-up "
                    "over the authors' style, host CPU time per step() call and peak extra memory. "
                    "Prints a table, writes a JSON file with every number and the environment, "
                    "and a PNG bar chart. Without a GPU it runs the CPU paths on smaller sets.", 78),
        epilog="implementations (--impls):\n" + impl_list + "\n\nRows that cannot run here say "
               "why (not installed / not available: reason).\nMethod and formulas: bench/NOTES.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="where to run; auto = cuda when a GPU is visible, else cpu")
    p.add_argument("--host", action="store_true",
                   help="measure the host cost of step() instead: every tensor of a set shrunk "
                        "to --host-numel elements, the same tensor count, grads kept or fresh at "
                        "every step; median us per step() of ours cuda and triton and torch "
                        "AdamW fused and foreach by default (without a GPU the Triton launches "
                        "are stubbed); see bench/NOTES.md")
    p.add_argument("--host-numel", type=int, default=8,
                   help="with --host: elements per tensor (default: 8)")
    p.add_argument("--sets", default=None,
                   help="comma-separated parameter sets: gpt (292 tensors, 355M params, a "
                        "24-layer d=1024 transformer), small (4096 tensors of 64x256), flat "
                        "(one 2^28-element tensor); default: gpt,small,flat (with --host: "
                        "gpt,small)")
    p.add_argument("--params", default=None,
                   help="scale every set to about this many parameters (e.g. 355M, 4M, 2.5e6); "
                        f"default: full size on cuda, {CPU_DEFAULT_PARAMS} on cpu")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated param/grad dtypes: fp32, bf16 (our states are fp32 "
                        "except in the bf16-states rows; peers keep states in the param dtype, "
                        "as they do); default: fp32,bf16 (with --host: fp32)")
    p.add_argument("--impls", default=None,
                   help="comma-separated implementations to run (default: all that apply to the "
                        "device; adamw-loop is cpu-only by default); see the list below")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the foreach AdEMAMix step; compiling takes "
                        "minutes per set and dtype on the GPU (the compile time is reported)")
    p.add_argument("--no-graph", action="store_true",
                   help="skip the CUDA-graph replay rows (ours cuda/triton, AdamW fused capturable)")
    p.add_argument("--sweep-triton", action="store_true",
                   help="on cuda, also time our Triton backend over (chunk, block, num_warps) "
                        "configs (see --sweep-configs) on the chosen sets and dtypes")
    p.add_argument("--sweep-configs", default=",".join(":".join(map(str, c))
                                                      for c in SWEEP_CONFIGS),
                   help="the configs --sweep-triton times, as CHUNK:BLOCK:WARPS,... (default: "
                        + ",".join(":".join(map(str, c)) for c in SWEEP_CONFIGS) + ")")
    p.add_argument("--no-check", action="store_true",
                   help="skip the correctness guard (each AdEMAMix implementation against the "
                        "authors' style over 3 steps of a tiny fp32 set)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps before timing (default: 5 on cuda, 1 on cpu; 3 with "
                        "--host)")
    p.add_argument("--reps", type=int, default=None,
                   help="at least this many timed steps (default: 20 on cuda, 3 on cpu; 30 "
                        "with --host)")
    p.add_argument("--min-time", type=float, default=None,
                   help="time steps for at least this many seconds (default: 0.5 on cuda, "
                        "0.1 on cpu; 0.5 with --host)")
    p.add_argument("--max-reps", type=int, default=1000, help="at most this many timed steps (default: 1000)")
    p.add_argument("--host-steps", type=int, default=None,
                   help="on cuda, step() calls averaged for the host CPU time per call, each "
                        "after the device queue is drained (default: 10); on cpu a step() is "
                        "synchronous and the host time is the mean of the timed steps")
    p.add_argument("--copy-mib", type=int, default=None,
                   help="MiB of each fp32 array of the bandwidth yardstick: a copy_ on cuda, "
                        "the best of copy_ and in-place mul_/add_/addcmul_ on cpu (default: 2048 "
                        "on cuda, 256 on cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (torch.set_num_threads). Default on a cpu run: 1, "
                        "because on a busy machine threads that wait for each other at every op "
                        "make timings erratic (100x measured on 2 shared cores); on a cuda run: "
                        "torch's choice")
    p.add_argument("--seed", type=int, default=0, help="seed of the random params and grads (default: 0)")
    p.add_argument("--out", default=str(BENCH_DIR / "results"),
                   help="directory for the JSON and PNG, named by the start time and device "
                        "(default: bench/results/)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    args = p.parse_args(argv)

    if args.host:
        for flag, given in (("--params", args.params is not None),
                            ("--sweep-triton", args.sweep_triton)):
            if given:
                p.error(f"{flag} does not apply to --host")
        if args.host_numel < 1:
            p.error("--host-numel must be positive")
    default_sets, default_dtypes = ("gpt,small", "fp32") if args.host else ("gpt,small,flat",
                                                                            "fp32,bf16")
    args.set_names = _csv(args.sets or default_sets, param_sets.NAMES, "--sets", p)
    args.dtype_names = _csv(args.dtypes or default_dtypes, DTYPES, "--dtypes", p)
    args.impl_keys = _csv(args.impls, IMPL_KEYS, "--impls", p) if args.impls else None
    try:
        args.sweep_configs = parse_sweep_configs(args.sweep_configs)
    except ValueError as e:
        p.error(str(e))
    if args.params is not None:
        try:
            args.params = param_sets.parse_count(args.params)
        except ValueError as e:
            p.error(str(e))
    for name in ("warmup", "reps", "host_steps", "copy_mib", "max_reps", "threads"):
        v = getattr(args, name)
        if v is not None and v < (0 if name in ("warmup", "host_steps") else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def _when_run(impl):
    """The --help note on when `impl` runs without being named."""
    if impl.needs_flag:
        return f" (needs --{impl.needs_flag})"
    if not impl.default_on_cpu and not impl.default_on_cuda:
        return " (only when named)"
    if not impl.default_on_cuda:
        return " (cpu only unless named)"
    return ""


def _csv(text, allowed, flag, parser):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        parser.error(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from "
                     f"{', '.join(allowed)}")
    return list(dict.fromkeys(items))


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    if device is None:
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    on_cuda = device.type == "cuda"
    if args.threads is None and not on_cuda:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if on_cuda:
        device = torch.device("cuda", torch.cuda.current_device())
    elif args.host:
        # Triton takes CPU tensors only interpreted; it reads this when the kernels are defined,
        # i.e. before anything below imports triton. (The host rows stub its launches.)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.host:
        defaults = dict(warmup=(3, 3), reps=(30, 30), min_time=(0.5, 0.5))
    else:
        defaults = dict(warmup=(5, 1), reps=(20, 3), min_time=(0.5, 0.1), host_steps=(10, 0),
                        copy_mib=(2048, 256))
    for name, (gpu, cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_cuda else cpu)
    if args.params is None and not on_cuda:
        args.params = param_sets.parse_count(CPU_DEFAULT_PARAMS)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.host:
        from bench import host

        return host.main(args, device, out_dir / f"{stamp}-{device.type}-host.json")
    json_path = out_dir / f"{stamp}-{device.type}.json"
    png_path = out_dir / f"{stamp}-{device.type}.png"

    if args.impl_keys is None:
        impls = [i for i in IMPLS if (i.default_on_cuda if on_cuda else i.default_on_cpu)]
    else:
        impls = [i for i in IMPLS if i.key in args.impl_keys]
    if args.no_graph:
        impls = [i for i in impls if not i.graph]

    env = environment(device)
    shape_sets = {n: param_sets.shapes(n, args.params) for n in args.set_names}
    skipped = {}
    runnable = []
    for impl in impls:
        reason = why_not_run(impl, device, args)
        if reason:
            skipped[impl.key] = reason
        else:
            runnable.append(impl)

    total = len(runnable) * len(shape_sets) * len(args.dtype_names) + 1 + (not args.no_check)
    if args.sweep_triton and on_cuda:
        total += len(args.sweep_configs) * len(shape_sets) * len(args.dtype_names)
    progress = Progress(total)
    print(f"ademamix-cuda benchmark on {env['device_name']}: torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['torch_cuda']}, commit {env['commit'] or '?'}"
          + ("" if on_cuda else f", torch threads: {env['torch_threads']}"), flush=True)
    for name, shapes in shape_sets.items():
        print(f"  set {name}: {param_sets.describe(shapes)}", flush=True)

    progress("copy bandwidth")
    copy = copy_bandwidth(device, args.copy_mib, args.reps, args.min_time)
    progress("copy bandwidth", advance=True)
    copy_gbps = copy["GBps"]

    checks = {}
    if not args.no_check:
        progress("correctness guard")
        checks = check(runnable, device, args.seed)
        progress("correctness guard", advance=True)

    rows = []
    for set_name, shapes in shape_sets.items():
        n_params = sum(param_sets.numel(s) for s in shapes)
        for dt_name in args.dtype_names:
            for impl in runnable:
                label = label_of(impl, device)
                progress(f"{set_name} {dt_name} {label}")
                row = dict(key=impl.key, label=label, algo=impl.algo, set=set_name,
                           dtype=dt_name, n_params=n_params, n_tensors=len(shapes),
                           graph=impl.graph)
                not_for_dtype = why_not_for_dtype(impl, dt_name)
                if not_for_dtype:
                    row["status"] = not_for_dtype
                    rows.append(row)
                    progress(f"{set_name} {dt_name} {label}", advance=True)
                    continue
                try:
                    row.update(measure(impl, shapes, DTYPES[dt_name], device, args))
                    row["pct_copy"] = 100 * row["GBps"] / copy_gbps
                    row["floor_ms"] = row["bytes"] / copy_gbps / 1e6
                except Unavailable as e:
                    row["status"] = str(e)
                except torch.cuda.OutOfMemoryError as e:
                    row["status"] = f"error: out of memory ({first_line(e, 80)})"
                except Exception as e:
                    row["status"] = f"error: {type(e).__name__}: {first_line(e)}"
                free(device)
                rows.append(row)
                progress(f"{set_name} {dt_name} {label}", advance=True)

    authors = {(r["set"], r["dtype"]): r["ms"] for r in rows
               if r["key"] == "authors" and r["status"] == "ok"}
    for r in rows:
        base = authors.get((r["set"], r["dtype"]))
        r["speedup"] = base / r["ms"] if r["status"] == "ok" and base else None

    sweep = None
    if args.sweep_triton:
        if on_cuda:
            sweep = sweep_triton(shape_sets, args.dtype_names, device, args, copy_gbps, progress)
        else:
            sweep = dict(status="not available: CUDA only")
    progress.close()

    all_rows = rows + [dict(key=i.key, label=label_of(i, device), algo=i.algo, set="all",
                            dtype="all", status=skipped[i.key]) for i in impls
                       if i.key in skipped]
    print()
    print(table(all_rows, copy_gbps, device))
    print()
    print(f"copy bandwidth (read+write, {copy['what']}): {copy_gbps:.1f} GB/s; "
          f"% copy bw = GB/s of the row / this. GB/s = bytes formula x elements / median ms.")
    not_checked = {k: v["status"] for k, v in checks.items() if v["status"].startswith("skipped")}
    bad = [k for k, v in checks.items() if v["status"] != "ok" and k not in not_checked]
    if checks:
        errs = ", ".join(f"{k} {v['rel_err']:.1e}" + (f" (tol {v['tol']:.1e})"
                                                     if v["tol"] != TOLERANCE else "")
                         + (f" [8-bit states on {v['quantized_tensors']}/{len(CHECK_SHAPES)} "
                            f"tensors; {v['left_out']} elements of tiny grads left out]"
                            if "left_out" in v else "")
                         if "rel_err" in v else f"{k} {v['status']}"
                         for k, v in checks.items() if k not in not_checked)
        print(f"correctness guard, max |dp - dp_authors| / max |dp_authors| over {CHECK_STEPS} "
              f"fp32 steps (tolerance {TOLERANCE:.0e} unless given): {errs}"
              + (f"  OUTSIDE TOLERANCE: {', '.join(bad)}" if bad else "  (all within tolerance)"))
        for reason in dict.fromkeys(not_checked.values()):
            keys = ", ".join(k for k, r in not_checked.items() if r == reason)
            print(f"  not checked: {keys}: {reason.removeprefix('skipped: ')}")
    if sweep is not None:
        print(sweep_summary(sweep))

    title = (f"AdEMAMix step, {env['device_name']}, copy bw {copy_gbps:.0f} GB/s, "
             f"torch {env['torch']}")
    png = "not written (--no-plot)" if args.no_plot else plot(rows, png_path, title)
    result = dict(environment=env, config=config_of(args, device, shape_sets),
                  hyperparameters=dict(peers.HYPERPARAMETERS, adam_betas=peers.BETAS3[:2]),
                  copy_bandwidth=copy, rows=all_rows, correctness_guard=checks,
                  sweep_triton=sweep, png=png)
    json_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {json_path} and {png}")
    ours = {i.key for i in IMPLS if i.ours}
    return 1 if any(k in ours for k in bad) else 0  # a peer's deviation is reported, not fatal


def config_of(args, device, shape_sets):
    return dict(
        argv=sys.argv[1:], device=str(device), sets={k: dict(n_tensors=len(v), n_params=sum(
            param_sets.numel(s) for s in v)) for k, v in shape_sets.items()},
        params_scale=args.params, dtypes=args.dtype_names, warmup=args.warmup, reps=args.reps,
        min_time_s=args.min_time, max_reps=args.max_reps, host_steps=args.host_steps,
        threads=torch.get_num_threads(),
        seed=args.seed, timer="CUDA events per step, median" if device.type == "cuda"
        else "time.perf_counter per step, median")


if __name__ == "__main__":
    sys.exit(main())

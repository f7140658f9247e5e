"""Benchmark of one AdEMAMix optimizer step: our backends against the peers, as % of copy bandwidth.

Run from the repository root:  python -m bench   (or: python bench/run.py)
See bench/NOTES.md for the method.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` and `ademamix_cuda` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import param_sets, peers
from bench.peers import Unavailable

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# On a machine without a GPU every set is scaled to this many parameters, so that the default run
# finishes in a couple of minutes on two cores.
CPU_DEFAULT_PARAMS = "2M"
MIB = 2**20


# ---------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Impl:
    key: str           # what --impls takes
    label: str         # what the table shows
    make: object       # (params, device) -> Optimizer; raises Unavailable
    algo: str = "AdEMAMix"
    graph: bool = False       # time the replay of a CUDA graph of step() instead of step()
    cuda_only: bool = False
    needs_flag: str | None = None   # run only when this command-line flag is given
    default_on_cpu: bool = True
    default_on_cuda: bool = True
    ours: bool = False


def _ours(backend):
    def make(params, device):
        import ademamix_cuda

        return ademamix_cuda.AdEMAMix(params, backend=backend, **peers.HYPERPARAMETERS)

    return make


IMPLS = [
    Impl("cuda", "ours cuda", _ours("cuda"), ours=True),
    Impl("triton", "ours triton", _ours("triton"), ours=True, cuda_only=True),
    Impl("foreach", "ours foreach", _ours("foreach"), ours=True),
    Impl("single", "ours single", _ours("single"), ours=True),
    Impl("cuda-graph", "ours cuda, CUDA graph", _ours("cuda"), ours=True, graph=True,
         cuda_only=True),
    Impl("triton-graph", "ours triton, CUDA graph", _ours("triton"), ours=True, graph=True,
         cuda_only=True),
    Impl("authors", "authors' style (for-loop)", peers.authors_style),
    Impl("foreach-peer", "torch._foreach AdEMAMix", peers.foreach_ademamix),
    Impl("compile", "torch.compile(foreach AdEMAMix)", peers.compiled_foreach_ademamix,
         needs_flag="compile"),
    Impl("bnb32", "bitsandbytes AdEMAMix 32-bit", peers.bnb_ademamix_32bit),
    Impl("bnb8", "bitsandbytes AdEMAMix 8-bit", peers.bnb_ademamix_8bit),
    Impl("apex", "apex FusedAdam", peers.apex_fused_adam, algo="Adam", cuda_only=True),
    Impl("adamw-fused", "torch AdamW fused", peers.adamw_fused, algo="Adam"),
    Impl("adamw-fused-graph", "torch AdamW fused, CUDA graph",
         peers.adamw_fused_capturable, algo="Adam", graph=True, cuda_only=True),
    Impl("adamw-foreach", "torch AdamW foreach", peers.adamw_foreach, algo="Adam"),
    Impl("adamw-loop", "torch AdamW for-loop", peers.adamw_for_loop, algo="Adam",
         default_on_cuda=False),
]
IMPL_KEYS = [i.key for i in IMPLS]
# Peers from other packages: their rows say "not installed" when the import fails.
_PEER_MODULES = {"bnb32": "bitsandbytes", "bnb8": "bitsandbytes", "apex": "apex.optimizers"}


def label_of(impl, device):
    if impl.key == "cuda" and device.type == "cpu":
        return "ours cuda ext (CPU kernel)"
    return impl.label


def why_not_run(impl, device, args):
    """None if `impl` should run in this session, else the reason shown in its row."""
    if impl.needs_flag and not getattr(args, impl.needs_flag):
        return f"skipped: pass --{impl.needs_flag}"
    module = _PEER_MODULES.get(impl.key)
    if module:
        reason = peers.importable(module)
        if reason:
            return reason
    if impl.key == "triton" and device.type != "cuda":
        return "not available: CUDA only (the Triton interpreter is not a benchmark)"
    if impl.cuda_only and device.type != "cuda":
        return "not available: CUDA only"
    if impl.ours:
        try:
            from ademamix_cuda import backends
        except Exception as e:  # the package itself does not import: every row says so
            return f"not available: ademamix_cuda does not import ({type(e).__name__}: {e})"
        ok, reason = backends.available(device)[impl.key.removesuffix("-graph")]
        if not ok:
            return f"not available: {reason}"
    return None


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(fn, device, min_reps, min_time, max_reps):
    """Per-call times (ms) of `fn`, at least min_reps calls and min_time seconds (max_reps at most).

    CUDA: an event pair around every call, no synchronization between calls, so a step that is
    bound by the host is timed with the gaps the GPU spends waiting. CPU: perf_counter per call.
    """
    times = []
    start_wall = time.perf_counter()
    batch = min_reps
    while True:
        if device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(batch)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize(device)
            times += [s.elapsed_time(e) for s, e in events]
        else:
            for _ in range(batch):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        elapsed = time.perf_counter() - start_wall
        if len(times) >= max_reps or elapsed >= min_time:
            return times
        per_call = elapsed / len(times)
        batch = max(1, min(max_reps - len(times), math.ceil((min_time - elapsed) / per_call)))


def host_us_per_call(fn, device, calls):
    """Mean wall time of the call itself, with the device queue drained before each call."""
    total = 0.0
    for _ in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    sync(device)
    return total / calls * 1e6


def copy_bandwidth(device, mib, min_reps, min_time):
    """Read+write bandwidth of an fp32 copy_ of `mib` MiB, in GB/s (the yardstick of every row)."""
    n = mib * MIB // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = time_steps(lambda: dst.copy_(src), device, min_reps, min_time, max_reps=200)
    ms = statistics.median(times)
    nbytes = 2 * n * 4
    del src, dst
    free(device)
    return dict(bytes=nbytes, ms=ms, GBps=nbytes / ms / 1e6, reps=len(times),
                what=f"fp32 copy_ of {mib} MiB, bytes = read + write = {nbytes}")


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# One measurement
# ---------------------------------------------------------------------------------------------

def make_params(shapes, dtype, device, seed):
    """Fresh random params (N(0, 0.02)) and grads (N(0, 1e-2)): non-zero, like a real step's."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=device, dtype=dtype)
                               .mul_(0.02))
        p.grad = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(1e-2)
        params.append(p)
    return params


def step_bytes(opt, params):
    """Bytes one step must move, from the storage the implementation actually keeps.

    Per element: p read + written, g read, every state buffer read + written. Buffers smaller than
    p (step counters, quantization scales) are left out. Returns (bytes, formula).
    """
    total = 0
    per_elem = set()
    for p in params:
        state_bytes = [v.element_size() * v.numel() // p.numel()
                       for v in opt.state[p].values()
                       if torch.is_tensor(v) and v.dim() > 0 and v.numel() >= p.numel()]
        pb, gb = p.element_size(), p.grad.element_size()
        total += p.numel() * (2 * pb + gb + 2 * sum(state_bytes))
        per_elem.add((pb, gb, tuple(sorted(state_bytes, reverse=True))))
    n = sum(p.numel() for p in params)
    if len(per_elem) == 1:
        pb, gb, states = per_elem.pop()
        if len(set(states)) <= 1:
            st = f"{len(states)}x2x{states[0]} states" if states else "no states"
        else:
            st = "2x(" + "+".join(map(str, states)) + ") states"
        formula = f"2x{pb} p + {gb} g + {st} = {total // n} B/el"
    else:
        formula = f"mixed state storage: avg {total / n:.2f} B/el"
    return total, formula


def capture_graph(opt, device, warmup):
    """Warm up on a side stream (building the state), then capture one step() into a CUDA graph."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            opt.step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph


def measure(impl, shapes, dtype, device, args):
    """Times one implementation on one parameter set; returns the numbers of its row."""
    try:
        return _measure(impl, shapes, dtype, device, args)
    finally:
        free(device)  # after _measure's frame, and with it every tensor of the run, is gone


def _measure(impl, shapes, dtype, device, args):
    params = make_params(shapes, dtype, device, args.seed)
    opt = impl.make(params, device)
    graph = None
    if impl.graph:
        graph = capture_graph(opt, device, max(1, args.warmup))  # eager steps build the state
        fn = graph.replay
    else:
        fn = opt.step
    compile_s = None
    for i in range(args.warmup):
        fn()
        if i == 0:
            compile_s = getattr(opt, "compile_seconds", None)
    sync(device)
    nbytes, formula = step_bytes(opt, params)

    extra_mib = None
    if device.type == "cuda":
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        extra_mib = (torch.cuda.max_memory_allocated(device) - base) / MIB

    if device.type == "cuda":
        host_us = host_us_per_call(fn, device, args.host_steps)
    times = time_steps(fn, device, args.reps, args.min_time, args.max_reps)
    ms = statistics.median(times)
    if device.type != "cuda":
        host_us = statistics.fmean(times) * 1e3  # a CPU step() returns when its work is done
    backend_used = getattr(opt, "backend_used", None)
    return dict(status="ok", ms=ms, ms_min=min(times), reps=len(times), host_us=host_us,
                extra_mib=extra_mib, bytes=nbytes, formula=formula, GBps=nbytes / ms / 1e6,
                compile_s=compile_s, backend_used=backend_used)


# ---------------------------------------------------------------------------------------------
# A quick correctness guard: a benchmark of a wrong step is worthless
# ---------------------------------------------------------------------------------------------

CHECK_SHAPES = [(257,), (64, 33), (1000,), (3, 5, 7)]
CHECK_STEPS = 3


def check(impls, device, seed):
    """Max |delta p - delta p_ref| / max |delta p_ref| over CHECK_STEPS fp32 steps, against the
    authors' style. Adam rows are not AdEMAMix and are not checked."""
    def run(make):
        params = make_params(CHECK_SHAPES, torch.float32, device, seed)
        before = [p.detach().clone() for p in params]
        opt = make(params, device)
        for _ in range(CHECK_STEPS):
            opt.step()
        sync(device)
        return [p.detach().double() - b.double() for p, b in zip(params, before)]

    ref = run(peers.authors_style)
    scale = max(d.abs().max().item() for d in ref)
    results = {}
    for impl in impls:
        if impl.algo != "AdEMAMix" or impl.graph or impl.key == "authors":
            continue
        try:
            delta = run(impl.make)
        except Exception as e:
            results[impl.key] = dict(status=f"error: {type(e).__name__}: {first_line(e)}")
            continue
        err = max((d - r).abs().max().item() for d, r in zip(delta, ref)) / scale
        # 8-bit states are quantized: only a gross error is an error there.
        tol = 0.2 if impl.key == "bnb8" else 1e-3
        results[impl.key] = dict(rel_err=err, tol=tol, status="ok" if err <= tol else "MISMATCH")
    return results


# ---------------------------------------------------------------------------------------------
# Triton sweep
# ---------------------------------------------------------------------------------------------

# Configs the sweep times by default: (chunk elements per program, block elements per loop
# iteration, warps). SPEC.md's probe found 8192/1024/4 -> 91.1 % and 16384/2048/8 -> 93.5 % on gpt.
SWEEP_CONFIGS = [(4096, 1024, 4), (8192, 1024, 4), (8192, 2048, 8), (16384, 1024, 4),
                 (16384, 2048, 8), (16384, 4096, 8), (32768, 2048, 8), (32768, 4096, 16)]
_SWEEP_ATTRS = ("CHUNK_SIZE", "BLOCK_SIZE", "NUM_WARPS")


def parse_sweep_configs(text):
    configs = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 3 or not all(x.isdigit() and int(x) > 0 for x in parts):
            raise ValueError(f"--sweep-configs: {item!r} is not CHUNK:BLOCK:WARPS (e.g. 16384:2048:8)")
        configs.append(tuple(int(x) for x in parts))
    return configs


def sweep_triton(shape_sets, dtypes, device, args, copy_gbps, progress):
    """Times our Triton backend with each (chunk, block, num_warps) config, set through the
    module attributes ademamix_cuda.triton_kernels.ademamix reads at every launch."""
    try:
        import importlib

        kernels = importlib.import_module("ademamix_cuda.triton_kernels.ademamix")
    except Exception as e:
        return dict(status=f"not available: {type(e).__name__}: {first_line(e)}")
    missing = [a for a in _SWEEP_ATTRS if not hasattr(kernels, a)]
    if missing:
        return dict(status=f"not available: the Triton module has no {', '.join(missing)}")
    default = tuple(getattr(kernels, a) for a in _SWEEP_ATTRS)
    impl = next(i for i in IMPLS if i.key == "triton")
    rows = []
    try:
        for set_name, shapes in shape_sets.items():
            for dt_name in dtypes:
                for cfg in args.sweep_configs:
                    progress(f"sweep {set_name} {dt_name} chunk/block/warps {cfg}")
                    row = dict(set=set_name, dtype=dt_name, chunk=cfg[0], block=cfg[1],
                               num_warps=cfg[2], default=cfg == default)
                    for attr, value in zip(_SWEEP_ATTRS, cfg):
                        setattr(kernels, attr, value)
                    try:
                        row.update(measure(impl, shapes, DTYPES[dt_name], device, args))
                        row["pct_copy"] = 100 * row["GBps"] / copy_gbps
                    except Exception as e:
                        row["status"] = f"error: {type(e).__name__}: {first_line(e)}"
                    free(device)
                    rows.append(row)
                    progress(f"sweep {set_name} {dt_name} chunk/block/warps {cfg}", advance=True)
    finally:
        for attr, value in zip(_SWEEP_ATTRS, default):
            setattr(kernels, attr, value)
    return dict(status="ok", default=dict(zip(("chunk", "block", "num_warps"), default)),
                rows=rows)


# ---------------------------------------------------------------------------------------------
# Environment, output
# ---------------------------------------------------------------------------------------------

def first_line(e, limit=160):
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _git(*cmd):
    try:
        out = subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device):
    env = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        host=platform.node(), platform=platform.platform(), python=platform.python_version(),
        cpu=_cpu_model(), cpu_count=os.cpu_count(),
        torch=torch.__version__, torch_cuda=torch.version.cuda, device=str(device),
        torch_threads=torch.get_num_threads(),
        load_average=os.getloadavg(),  # other work on the machine: the timings' noise
        commit=_git("rev-parse", "HEAD"),
    )
    status = _git("status", "--porcelain")
    env["dirty"] = None if status is None else bool(status)
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as e:
        env["triton"] = f"not importable: {first_line(e)}"
    try:
        import ademamix_cuda

        env["ademamix_cuda"] = getattr(ademamix_cuda, "__version__", "?")
        from ademamix_cuda import backends

        env["backends"] = {k: dict(ok=ok, reason=r) for k, (ok, r) in
                           backends.available(device).items()}
    except Exception as e:
        env["ademamix_cuda"] = f"not importable: {type(e).__name__}: {first_line(e)}"
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        env.update(device_name=prop.name, device_memory_gib=round(prop.total_memory / 2**30, 1),
                   sm_count=prop.multi_processor_count,
                   capability=f"{prop.major}.{prop.minor}",
                   cuda_driver=_cuda_driver_version())
    else:
        env["device_name"] = f"CPU: {_cpu_model()} ({os.cpu_count()} cores)"
    return env


def _cuda_driver_version():
    try:
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    except Exception:
        v = None
    if v is None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=10)
            v = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            v = None
    return v


def _cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def text_table(cols, body, right):
    """Aligned text columns: `body` holds (group, cells) rows, a blank line between groups;
    the columns numbered in `right` are right-aligned."""
    widths = [max(len(c), *(len(cells[i]) for _, cells in body)) if body else len(c)
              for i, c in enumerate(cols)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    lines = [line(cols), "  ".join("-" * w for w in widths)]
    prev = None
    for group, cells in body:
        if prev is not None and group != prev:
            lines.append("")
        prev = group
        lines.append(line(cells))
    return "\n".join(lines)


def table(rows, copy_gbps, device):
    """The stdout table: one row per (impl, set, dtype), then the implementations that did not run."""
    cols = ["impl", "set", "dtype", "ms", "GB/s", "% copy bw", "x vs authors", "host us/step",
            "extra MiB", "bytes formula / note"]
    body = []
    for r in rows:
        if r["status"] != "ok":
            note = r["status"]
            body.append(((r["set"], r["dtype"]),
                         [r["label"], r["set"], r["dtype"], "", "", "", "", "", "", note]))
            continue
        note = r["formula"]
        if r.get("compile_s") is not None:
            note += f"; compile {r['compile_s']:.1f} s"
        body.append(((r["set"], r["dtype"]), [
            r["label"], r["set"], r["dtype"], fmt(r["ms"], ".3f"),
            fmt(r["GBps"], ".1f" if r["GBps"] < 100 else ".0f"), fmt(r["pct_copy"], ".1f"),
            fmt(r.get("speedup"), ".2f"), fmt(r["host_us"], ".0f"),
            fmt(r["extra_mib"], ".1f") if device.type == "cuda" else "n/a", note]))
    return text_table(cols, body, right={3, 4, 5, 6, 7, 8})


def plot(rows, path, title):
    """Bar chart of % of copy bandwidth: one panel per (set, dtype), one bar per implementation."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"not written: matplotlib does not import ({first_line(e)})"
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    impl_list = "\n".join(f"  {i.key:<18} {i.label}" + (" (cpu only unless named)"
                                                          if not i.default_on_cuda else "")
                          + (f" (needs --{i.needs_flag})" if i.needs_flag else "")
                          for i in IMPLS)
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
                   help="comma-separated param/grad dtypes: fp32, bf16 (our states stay fp32; "
                        "peers keep states in the param dtype, as they do); default: fp32,bf16 "
                        "(with --host: fp32)")
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
                   help="size of the fp32 tensor whose copy_ measures the bandwidth (default: "
                        "2048 on cuda, 256 on cpu)")
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


def _csv(text, allowed, flag, parser):
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad or not items:
        parser.error(f"{flag}: unknown {', '.join(bad) or '(empty)'}; choose from "
                     f"{', '.join(allowed)}")
    return list(dict.fromkeys(items))


class Progress:
    """One line on stderr, rewritten in place on a terminal, one line per update otherwise."""

    def __init__(self, total):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.width = 0

    def __call__(self, text, advance=False):
        if advance:
            self.done += 1
        msg = f"[{self.done}/{self.total} {time.perf_counter() - self.t0:5.0f}s] {text}"
        if self.tty:
            pad = max(0, self.width - len(msg))
            sys.stderr.write("\r" + msg + " " * pad)
            self.width = len(msg)
        elif not advance:  # a log, not a terminal: one line per item started
            sys.stderr.write(msg + "\n")
        sys.stderr.flush()

    def close(self):
        if self.tty and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()


def main(argv=None):
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
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
    bad = [k for k, v in checks.items() if v["status"] != "ok"]
    if checks:
        errs = ", ".join(f"{k} {v['rel_err']:.1e}" if "rel_err" in v else f"{k} {v['status']}"
                         for k, v in checks.items())
        print(f"correctness guard, max |dp - dp_authors| / max |dp_authors| over {CHECK_STEPS} "
              f"fp32 steps: {errs}"
              + (f"  OUTSIDE TOLERANCE: {', '.join(bad)}" if bad else "  (all within tolerance)"))
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


def sweep_summary(sweep):
    if sweep.get("status") != "ok":
        return f"triton sweep: {sweep['status']}"
    lines = ["triton sweep, % of copy bandwidth (chunk / block / warps; * = the module's default):"]
    for r in sweep["rows"]:
        value = (f"{r['pct_copy']:5.1f} %  {r['ms']:.3f} ms" if r.get("status") == "ok"
                 else r["status"])
        cfg = f"{r['chunk']:>6} / {r['block']:>5} / {r['num_warps']:>2}{'*' if r['default'] else ' '}"
        lines.append(f"  {r['set']:<6} {r['dtype']:<5} {cfg}  {value}")
    return "\n".join(lines)


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

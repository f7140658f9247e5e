"""The Triton launch-config sweep: `python -m bench --sweep-triton` (CUDA only)."""
import importlib

from bench.impls import IMPLS
from bench.report import first_line
from bench.step import DTYPES, measure
from bench.timing import free


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

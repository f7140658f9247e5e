"""Timing helpers of the benchmarks, and the copy bandwidth every step is measured against."""
import gc
import math
import statistics
import time

import torch

MIB = 2**20


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

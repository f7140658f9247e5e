"""Timing helpers of the benchmarks, and the copy bandwidth every step is measured against."""
import gc
import math
import os
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
    """The yardstick of every row, in GB/s of bytes read + written.

    CUDA: an fp32 copy_ of `mib` MiB. CPU: the best of an fp32 copy_ and the in-place mul_, add_
    and addcmul_ over `mib` MiB arrays, on one thread per core the process may use,
    whatever the run's thread count: the machine's roof. A copy's writes go to memory it did not
    read, which costs a CPU an extra read per line (write-allocate), so a step that updates its
    arrays in place outruns it; in-place streams like mul_ and add_ are the fairer roof.
    """
    if device.type == "cpu":
        threads = torch.get_num_threads()
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        try:
            return _stream_bandwidth(device, mib, min_reps, min_time)
        finally:
            torch.set_num_threads(threads)
    return _stream_bandwidth(device, mib, min_reps, min_time)


def _stream_bandwidth(device, mib, min_reps, min_time):
    n = mib * MIB // 4
    a, b, c = (torch.randn(n, device=device) for _ in range(3))
    # (what, the op, bytes read + written per element)
    ops = [("copy_", lambda: a.copy_(b), 8)]
    if device.type == "cpu":
        ops += [("mul_ in place", lambda: a.mul_(1.0), 8),
                ("add_ in place", lambda: a.add_(b, alpha=1e-9), 12),
                ("addcmul_ in place", lambda: a.addcmul_(b, c, value=1e-9), 16)]
    best = None
    for what, op, per_element in ops:
        for _ in range(3):
            op()
        sync(device)
        times = time_steps(op, device, min_reps, min_time, max_reps=200)
        ms = statistics.median(times)
        nbytes = per_element * n
        if best is None or nbytes / ms > best["bytes"] / best["ms"]:
            best = dict(bytes=nbytes, ms=ms, GBps=nbytes / ms / 1e6, reps=len(times), op=what)
    del a, b, c
    free(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    best["what"] = (f"fp32 {best['op']} of {mib} MiB arrays{threads} (the best of "
                    f"{', '.join(w for w, _, _ in ops)}), bytes = read + write = {best['bytes']}")
    return best


def free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

"""One measured optimizer step, and the correctness guard run before any timing."""
import statistics

import torch

from bench import peers
from bench.report import first_line
from bench.timing import MIB, free, host_us_per_call, sync, time_steps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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


def step_bytes(opt, params, grad_passes=0):
    """Bytes one step must move, from the storage the implementation actually keeps.

    Per element: p read + written, g read, every state buffer read + written, and `grad_passes`
    more passes over the grads (gradient clipping: 1 for the fused norm, 3 for torch's
    clip_grad_norm_, which reads them for the norm, then reads and writes them to scale). Our
    8-bit states' absmax ("<state>_absmax", one fp32 per 256 elements) are read and written too:
    counted at their actual size. Other buffers smaller than p (step counters, peers' scales and
    maps) are left out. Returns (bytes, formula).

    The formula of 8-bit states: `2x4 p + 4 g + 3x2x1 codes + 3x2x4/256 absmax = 18.09 B/el`
    (fp32 params). Where small tensors keep unquantized states (min_8bit_size), the 8-bit formula
    is followed by the measured average of the whole set.
    """
    total = 0
    kinds = {}  # (pb, gb, state bytes per element, 8-bit) -> elements
    for p in params:
        state = opt.state[p]
        absmax = [v for k, v in state.items() if torch.is_tensor(v) and k.endswith("_absmax")]
        state_bytes = [v.element_size() * v.numel() // p.numel()
                       for k, v in state.items()
                       if torch.is_tensor(v) and v.dim() > 0 and v.numel() >= p.numel()
                       and not k.endswith("_absmax")]
        pb, gb = p.element_size(), p.grad.element_size()
        total += p.numel() * (2 * pb + gb + 2 * sum(state_bytes) + grad_passes * gb)
        total += 2 * sum(v.element_size() * v.numel() for v in absmax)
        kind = (pb, gb, tuple(sorted(state_bytes, reverse=True)), bool(absmax))
        kinds[kind] = kinds.get(kind, 0) + p.numel()
    n = sum(p.numel() for p in params)
    clip = lambda gb: f" + clip {grad_passes}x{gb} g" if grad_passes else ""  # noqa: E731
    quantized = [k for k in kinds if k[3]]
    if len(quantized) == 1:
        pb, gb, states, _ = quantized[0]
        ns = len(states)
        # nominal: one absmax per 256 elements exactly (a tensor's last block may be shorter)
        nominal = 2 * pb + gb + 2 * sum(states) + ns * 2 * 4 / 256 + grad_passes * gb
        formula = (f"2x{pb} p + {gb} g + {ns}x2x1 codes + {ns}x2x4/256 absmax{clip(gb)} = "
                   f"{nominal:.2f} B/el")
        others = [k for k in kinds if not k[3]]
        if others:
            names = {4: "fp32", 2: "bf16"}
            small = sorted({names.get(s, f"{s}-byte") for k in others for s in set(k[2])})
            formula += (f" (small tensors {'/'.join(small) or 'no'} states: avg "
                        f"{total / n:.2f} B/el)")
        elif abs(total / n - nominal) >= 0.005:
            formula += f" (measured avg {total / n:.2f} B/el)"
    elif len(kinds) == 1:
        pb, gb, states, _ = next(iter(kinds))
        if len(set(states)) <= 1:
            st = f"{len(states)}x2x{states[0]} states" if states else "no states"
        else:
            st = "2x(" + "+".join(map(str, states)) + ") states"
        formula = f"2x{pb} p + {gb} g + {st}{clip(gb)} = {total // n} B/el"
    else:
        formula = f"mixed state storage: avg {total / n:.2f} B/el"
    return total, formula


def state_mib(opt):
    """MiB of every tensor the optimizer keeps in its state (step counters and scales too), each
    storage counted once: the states' memory as allocated, beside the bytes formula."""
    storages = {}
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                storage = v.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / MIB


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
    nbytes, formula = step_bytes(opt, params, impl.grad_passes)
    states_mib = state_mib(opt)

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
                extra_mib=extra_mib, state_mib=states_mib, bytes=nbytes, formula=formula,
                GBps=nbytes / ms / 1e6, compile_s=compile_s, backend_used=backend_used)


# ---------------------------------------------------------------------------------------------
# A quick correctness guard: a benchmark of a wrong step is worthless
# ---------------------------------------------------------------------------------------------

CHECK_SHAPES = [(257,), (64, 33), (1000,), (3, 5, 7)]
CHECK_STEPS = 3
TOLERANCE = 1e-3
# bf16 states: an SR write errs by less than one bf16 ulp, at most 2^-7 of the value written (8
# significant bits). The guard's grads stay fixed, so every state grows in one direction and the
# errors of k - 1 writes add up to at most (k - 1) 2^-7 of the state loaded at step k (step 1
# starts from exact zeros). The update (m1 / bc1 + alpha m2) / sqrt(nu / bc2) is about 1 for
# every element (fixed grads: m1 / bc1 = g, nu / bc2 = g^2) and errs by at most
# (k - 1)(2^-7 + 2^-8) at step k. Summed over the steps, relative to max |dp_authors| (CHECK_STEPS
# updates): (CHECK_STEPS - 1) / 2 (2^-7 + 2^-8) = 1.2e-2 for 3 steps, plus the fp32 tolerance.
BF16_STATES_TOLERANCE = (CHECK_STEPS - 1) / 2 * (2**-7 + 2**-8) + TOLERANCE
# 8-bit states are quantized: only a gross error is an error there (bitsandbytes' 8-bit row).
TOLERANCE_8BIT = 0.2
# Our 8-bit states (ademamix_cuda/quant.py): a write of a value of at least the map's smallest
# magnitude times its block's absmax errs by less than 2^-4 of it (four mantissa bits, rounded
# stochastically: one spacing), and the step's update uses the new values before they are
# rounded. The same count as for bf16 states with 2^-4 for 2^-7: the loaded states err by at most
# (k - 1) 2^-4 at step k, the update by (k - 1)(2^-4 + 2^-5), summed over the steps
# (CHECK_STEPS - 1) / 2 (2^-4 + 2^-5) = 9.4e-2 for 3 steps, plus the fp32 tolerance. It holds only
# for elements whose grad is not tiny beside its block's largest (the guard's grads are fixed, so
# every state is a multiple of g): the 8-bit rows are checked on the elements of quantized tensors
# with |g| >= 2 x the signed map's smallest magnitude (2^-7.8) x the block's max |g| (the factor
# 2: margin for the absmax of m1, m2 against g's), and every element of unquantized (small)
# tensors; the count of the elements left out is reported beside the error (below the map's
# reach an m is written as 0 or the smallest magnitude and a nu rounded up, and such an element's
# step may be off by up to its own size).
EIGHT_BIT_STATES_TOLERANCE = (CHECK_STEPS - 1) / 2 * (2**-4 + 2**-5) + TOLERANCE
# The guard's largest |p| is ~0.08, whose bf16 ulp (2^-11) is half of a step's dp (lr = 1e-3).
NOT_CHECKED_SR_PARAMS = ("skipped: SR params need bf16 params, whose rounding errs by up to half "
                         "a step's dp here; the same backend's bf16-states row checks the step")


def in_8bit_range(p, state):
    """For a param with our 8-bit states: a bool mask of p's shape, True where |g| >= 2 x the
    signed map's smallest magnitude x the max |g| of its 256-element block (the elements the 8-bit
    tolerance holds for, see EIGHT_BIT_STATES_TOLERANCE); None for any other param."""
    if not torch.is_tensor(state.get("exp_avg_slow_absmax")):
        return None
    from ademamix_cuda import quant

    smallest = quant.code_map(True)[1].item()
    g = p.grad.detach().float().reshape(-1).abs()
    pad = (-g.numel()) % quant.BLOCK
    blocks = torch.cat([g, g.new_zeros(pad)]).view(-1, quant.BLOCK)
    keep = blocks >= 2 * smallest * blocks.amax(dim=1, keepdim=True)
    return keep.reshape(-1)[:g.numel()].view(p.shape)


def check(impls, device, seed):
    """Max |delta p - delta p_ref| / max |delta p_ref| over CHECK_STEPS fp32 steps, against the
    authors' style. Adam rows are not AdEMAMix and are not checked; rows that need bf16 params
    are reported as skipped, with the reason. Rows with our 8-bit states are checked on the
    elements in the maps' reach (in_8bit_range) and report how many were left out; a "-8bit" row
    none of whose tensors got 8-bit states is a mismatch (the guard would prove nothing)."""
    def run(make):
        params = make_params(CHECK_SHAPES, torch.float32, device, seed)
        before = [p.detach().clone() for p in params]
        opt = make(params, device)
        for _ in range(CHECK_STEPS):
            opt.step()
        sync(device)
        delta = [p.detach().double() - b.double() for p, b in zip(params, before)]
        state = getattr(opt, "state", {})
        return delta, [in_8bit_range(p, state.get(p, {})) for p in params]

    ref, _ = run(peers.authors_style)
    scale = max(d.abs().max().item() for d in ref)
    results = {}
    for impl in impls:
        if impl.algo != "AdEMAMix" or impl.graph or impl.key == "authors":
            continue
        if impl.bf16_params_only:
            results[impl.key] = dict(status=NOT_CHECKED_SR_PARAMS)
            continue
        try:
            delta, masks = run(impl.make)
        except Exception as e:
            results[impl.key] = dict(status=f"error: {type(e).__name__}: {first_line(e)}")
            continue
        ours_8bit = impl.ours and any(m is not None for m in masks)
        if not ours_8bit:
            masks = [None] * len(delta)
        err = max(((d - r) if m is None else (d - r)[m]).abs().max().item()
                  for d, r, m in zip(delta, ref, masks)) / scale
        tol = (EIGHT_BIT_STATES_TOLERANCE if ours_8bit
               else TOLERANCE_8BIT if impl.key == "bnb8"
               else BF16_STATES_TOLERANCE if "-bf16s" in impl.key else TOLERANCE)
        results[impl.key] = dict(rel_err=err, tol=tol, status="ok" if err <= tol else "MISMATCH")
        if impl.key.endswith("-8bit") and not ours_8bit:
            results[impl.key].update(status="MISMATCH: no tensor got 8-bit states")
        if ours_8bit:
            checked = sum(int(m.sum()) if m is not None else d.numel()
                          for d, m in zip(delta, masks))
            results[impl.key].update(
                quantized_tensors=sum(m is not None for m in masks),
                left_out=sum(d.numel() for d in delta) - checked)
    return results

"""The op's CPU kernels against the float64 reference: the fast kernel in each instruction-set
build (the baseline one in _C, the AVX2 one in _cpu_avx2), and the GPU stand-in (the CUDA
kernel's block function, blocks shuffled); and the fast kernel's independence of the thread
count."""
import contextlib

import pytest
import torch

import ademamix_cuda
from helpers import (FP32_RTOL, FP32_STEP_RTOL, LOW_PRECISION, GradSource, Lists,
                     assert_rel_close, assert_within_ulp, bits_equal, cpu_gpu_blocks, dtype_name,
                     fp32_slack, require_backend)

CHUNK = 16384
# Tails shorter than every vector width, several chunks, an empty tensor and a 0-d one.
SHAPES = ((), (0,), (1,), (7,), (33,), (3, 65), (2 * CHUNK + 5,))
VARIANTS = {
    "default": dict(beta1=0.9),
    "beta1_zero": dict(beta1=0.0),
    "grad_scale_found_inf": dict(beta1=0.9, scaler=True),
    "tensor_lr_maximize": dict(beta1=0.9, tensor_lr=True, maximize=True),
}
HYPER = dict(lr=1e-2, beta2=0.999, beta3=0.99, alpha=5.0, beta3_warmup=9, alpha_warmup=6,
             eps=1e-8, weight_decay=0.1)


def _cpu_capability_has_avx2():
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@contextlib.contextmanager
def _build(name):
    """Runs the op's CPU calls on one build of the CPU kernel (or the GPU stand-in)."""
    if name == "gpu_blocks":
        with cpu_gpu_blocks():
            yield
        return
    if name == "avx2":
        if not _cpu_capability_has_avx2():
            pytest.skip(f"this CPU has no AVX2 (capability "
                        f"{torch.backends.cpu.get_cpu_capability()})")
        assert ademamix_cuda.backends.CPU_KERNEL == "avx2", (
            "the CPU runs AVX2 but the AVX2 build of the CPU kernel was not loaded")
        yield
        return
    torch.ops.ademamix._set_cpu_kernel(0, 0)  # the baseline builds in _C
    try:
        yield
    finally:
        ademamix_cuda.backends.CPU_KERNEL = ademamix_cuda.backends._load_cpu_kernel()


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_name)
@pytest.mark.parametrize("build", ["baseline", "avx2", "gpu_blocks"])
def test_cpu_kernel_matches_reference(build, dtype, variant):
    """21 steps (found_inf skipping two of them in the scaler variant); fp32 params run free,
    2-byte params are teacher forced (one step from our own state, 1 ulp)."""
    require_backend("cuda")
    opts = VARIANTS[variant]
    hyper = dict(HYPER, beta1=opts["beta1"], maximize=opts.get("maximize", False))
    lists = Lists(SHAPES, dtype, "cpu", seed=301, beta1_zero=hyper["beta1"] == 0.0,
                  start_step=2)
    grads = GradSource(SHAPES, seed=302)
    low = dtype in LOW_PRECISION
    with _build(build):
        for k in range(1, 22):
            g = [x.to(dtype) for x in grads.next()]
            scale = 2.0 ** (k % 4) if opts.get("scaler") else None
            skip = opts.get("scaler", False) and k in (5, 6)
            extra = {}
            if scale is not None:
                extra = dict(grad_scale=torch.tensor(scale), found_inf=torch.tensor(float(skip)))
                g = [x * scale for x in g]
            lr = torch.tensor(hyper["lr"]) if opts.get("tensor_lr") else hyper["lr"]
            if low:
                lists.ref = [[t.double() for t in lst]
                             for lst in (lists.params, lists.m1, lists.m2, lists.nu)]
            old = [t.clone() for t in lists.ref[0]]
            before = [t.clone() for t in lists.tensors()]
            ademamix_cuda.functional.ademamix(*lists.args(g), backend="cuda",
                                              **dict(hyper, lr=lr), **extra)
            if skip:
                for a, b in zip(lists.tensors(), before):
                    assert bits_equal(a, b), f"step {k}: found_inf must change nothing"
                continue
            lists.reference_step([x.double() for x in g], grad_scale=scale, **hyper)
            if not low:
                lists.check(FP32_RTOL, f"{build} step {k}")
                continue
            for i in range(len(SHAPES)):
                tag = f"{build} step {k} tensor[{i}]"
                assert_within_ulp(lists.params[i], lists.ref[0][i], dtype,
                                  fp32_slack(old[i], lists.ref[0][i]), f"{tag} param")
                for j, name in ((1, "exp_avg_fast"), (2, "exp_avg_slow"), (3, "exp_avg_sq")):
                    if lists.ref[j]:
                        assert_rel_close([lists.m1, lists.m2, lists.nu][j - 1][i],
                                         lists.ref[j][i], FP32_STEP_RTOL, f"{tag} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_name)
def test_cpu_kernel_result_does_not_depend_on_thread_count(dtype):
    """Chunks are independent: 1, 2 and 3 threads give the same bits."""
    require_backend("cuda")
    shapes = ((5 * CHUNK + 11,), (CHUNK,), (3, 1000), (1,))
    grads = [[x.to(dtype) for x in GradSource(shapes, seed=312).next()] for _ in range(3)]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            lists = Lists(shapes, dtype, "cpu", seed=311)
            for g in grads:
                ademamix_cuda.functional.ademamix(*lists.args(g), backend="cuda",
                                                  **dict(HYPER, beta1=0.9, maximize=False))
            results.append(lists.tensors())
    finally:
        torch.set_num_threads(threads)
    for n, other in zip((2, 3), results[1:]):
        for i, (a, b) in enumerate(zip(results[0], other)):
            assert bits_equal(a, b), f"{n} threads: tensor {i} differs from 1 thread"

"""Builds the ademamix_cuda package and its CUDA extension ademamix_cuda._C.

Environment:
  ADEMAMIX_SKIP_CUDA_BUILD=1   build the pure-Python package only.
  ADEMAMIX_CUDA_ARCHS          arch list, e.g. "9.0" or "8.0;9.0+PTX" (else TORCH_CUDA_ARCH_LIST,
                               else the visible GPU, else a default list with PTX for the newest).
  MAX_JOBS                     parallel compile jobs (default: from cores and memory).
  ADEMAMIX_PTXAS_VERBOSE=1     print ptxas' register and spill report for every kernel.
"""
import os
import platform
import re
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0+PTX"


def read_version():
    text = (ROOT / "ademamix_cuda" / "version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def cuda_arch_list():
    archs = os.environ.get("ADEMAMIX_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        return archs
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return DEFAULT_ARCHS


def default_max_jobs():
    cores = os.cpu_count() or 1
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    # nvcc with torch headers peaks around 3 GiB per job.
    return max(1, min(cores, int(mem_gib // 3)))


def extensions():
    if os.environ.get("ADEMAMIX_SKIP_CUDA_BUILD", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    if torch.version.cuda is None or CUDA_HOME is None:
        print("ademamix_cuda: no CUDA build of torch or no nvcc; building without the extension "
              "(set ADEMAMIX_SKIP_CUDA_BUILD=1 to silence this)")
        return [], {}
    os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_arch_list()
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.c[pu]*"))
    # No -std flag: torch's build adds the C++ standard its headers need (C++20 from torch 2.14).
    # No contracted multiply-adds (-fmad=false, -ffp-contract=off): every backend rounds the same
    # fp32 operations in the same order, so the CUDA kernel, the CPU kernels and Triton compute
    # the same bits (and stochastic rounding draws on the same values).
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-fmad=false"]
    if os.environ.get("ADEMAMIX_PTXAS_VERBOSE") == "1":
        nvcc_flags.append("-Xptxas=-v")  # the register/spill report
    # at::parallel_for is an inline template that runs its threads through OpenMP pragmas: the
    # CPU kernels need -fopenmp, or they run on one thread (libgomp is the one torch loaded).
    openmp = ["-fopenmp"]
    ext = CUDAExtension(
        name="ademamix_cuda._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-ffp-contract=off"] + openmp,
            "nvcc": nvcc_flags,
        },
        extra_link_args=openmp,
        py_limited_api=False,
    )
    exts = [ext]
    if platform.machine() in ("x86_64", "AMD64"):
        # The CPU kernel again, for AVX2 + FMA, in a module of its own: flags per file do not
        # exist here, and code built for AVX2 must not be linked where the baseline build runs.
        exts.append(CppExtension(
            name="ademamix_cuda._cpu_avx2",
            sources=["csrc/avx2/ademamix_cpu_avx2.cpp"],
            extra_compile_args=["-O3", "-ffp-contract=off", "-mavx2", "-mfma", "-mf16c",
                                "-DCPU_CAPABILITY=AVX2",
                                "-DCPU_CAPABILITY_AVX2"] + openmp,
            extra_link_args=openmp,
            py_limited_api=False,
        ))
    return exts, {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="ademamix-cuda",
    version=read_version(),
    description="The AdEMAMix optimizer in one memory pass: CUDA and Triton kernels for PyTorch",
    packages=["ademamix_cuda", "ademamix_cuda.triton_kernels"],
    package_dir={"ademamix_cuda": "ademamix_cuda", "ademamix_cuda.triton_kernels": "triton_kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.11"],
    extras_require={"triton": ["triton>=3.6"], "test": ["pytest", "numpy"], "bench": ["matplotlib"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

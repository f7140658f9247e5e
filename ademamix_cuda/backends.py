"""Which backends can run, and why not.

The package imports with no GPU, no compiler and no built extension: each backend reports
whether it is usable for a given device and, if not, what is missing.
"""
import importlib.util
import os

import torch

BACKENDS = ("cuda", "triton", "foreach", "single")
_AUTO_ORDER_CUDA = ("cuda", "triton", "foreach")


def _load_extension():
    if importlib.util.find_spec(f"{__package__}._C") is None:
        return False, ("the CUDA extension ademamix_cuda._C is not built (build it with nvcc and a "
                       "CUDA build of torch: pip install --no-build-isolation -e .)")
    try:
        from . import _C  # noqa: F401  (registers torch.ops.ademamix.*)
    except ImportError as e:
        return False, f"the CUDA extension ademamix_cuda._C does not load: {e}"
    # The op mutates its inputs and returns nothing: under FakeTensor/torch.compile it is a no-op.
    for name in ("ademamix::step_", "ademamix::step_.tensor_lr"):
        torch.library.register_fake(name)(lambda *args, **kwargs: None)
    torch.library.register_fake("ademamix::grad_norm_partials")(_norm_partials_fake)
    return True, "ademamix_cuda._C loaded"


CHUNK_SIZE = 16384  # elements per block of the op's kernels (csrc/ademamix.h kChunkSize)


def _norm_partials_fake(grads, inf_norm):
    # one partial per chunk; an empty tensor has one (empty) chunk
    n = sum(max(1, -(-g.numel() // CHUNK_SIZE)) for g in grads)
    return grads[0].new_empty((n,), dtype=torch.float32) if grads else torch.empty(0)


def _load_cpu_kernel():
    """Hands the op the AVX2 build of its CPU kernel when this CPU runs AVX2; returns the name of
    the build in use."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "baseline"
    try:
        from . import _cpu_avx2
    except ImportError:  # not built (another architecture, or an older build)
        return "baseline"
    torch.ops.ademamix._set_cpu_kernel(*_cpu_avx2.kernel_addresses())
    return "avx2"


_EXTENSION_OK, _EXTENSION_WHY = _load_extension()
CPU_KERNEL = _load_cpu_kernel() if _EXTENSION_OK else None
_triton_status = None


def _triton():
    """Imports the Triton kernels on first use (importing triton costs about a second)."""
    global _triton_status
    if _triton_status is None:
        try:
            from . import triton_kernels  # noqa: F401
        except ImportError as e:
            _triton_status = (False, f"triton is not importable ({e})")
        else:
            _triton_status = (True, "triton kernels loaded")
    return _triton_status


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(name: str, device: torch.device) -> str | None:
    """None if backend `name` can run on tensors of `device`, else the reason it cannot."""
    device = torch.device(device)
    if name in ("foreach", "single"):
        return None
    if name == "cuda":
        if not _EXTENSION_OK:
            return _EXTENSION_WHY
        if device.type not in ("cuda", "cpu"):
            return f"the CUDA extension has kernels for cuda and cpu tensors, not {device.type}"
        return None
    if name == "triton":
        ok, why = _triton()
        if not ok:
            return why
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        return (f"Triton kernels need cuda tensors (cpu tensors only under TRITON_INTERPRET=1), "
                f"got {device.type}")
    raise ValueError(f"unknown backend {name!r}: choose one of 'auto', {', '.join(map(repr, BACKENDS))}")


def resolve(name: str, device: torch.device) -> str:
    """The backend that runs for `name` ("auto" or a backend) on `device`; raises if it cannot."""
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda":
            return next(b for b in _AUTO_ORDER_CUDA if why_not(b, device) is None)
        if device.type == "cpu" and _EXTENSION_OK:
            return "cuda"  # the op's CPU kernel
        return "foreach"
    reason = why_not(name, device)
    if reason is not None:
        raise RuntimeError(f"AdEMAMix backend {name!r} cannot run on {device.type} tensors: {reason}")
    return name


def available(device: str | torch.device | None = None) -> dict[str, tuple[bool, str]]:
    """name -> (usable, reason) for every backend, for `device` (default: cuda if present, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {}
    for name in BACKENDS:
        reason = why_not(name, device)
        result[name] = (reason is None, reason or "available")
    return result

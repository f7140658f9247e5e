"""`python -m ademamix_cuda.info`: versions, the GPU, and which backends load here (and why not)."""
import platform

import torch

from . import __version__, backends


def report() -> str:
    lines = [f"ademamix_cuda {__version__}", f"python {platform.python_version()}",
             f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})"]
    try:
        import triton
        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton not installed")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {props.name}, compute capability {props.major}.{props.minor}, "
                         f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("GPU: none visible to torch")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        lines.append(f"backends for {device} tensors (auto picks {backends.resolve('auto', device)}):")
        for name, (ok, reason) in backends.available(device).items():
            lines.append(f"  {name:8s} {'yes' if ok else 'no '}  {reason}")
    if backends.CPU_KERNEL is not None:
        lines.append(f"the op's CPU kernel: {backends.CPU_KERNEL} build (CPU capability "
                     f"{torch.backends.cpu.get_cpu_capability()})")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())

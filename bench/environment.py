"""The environment a result was measured in: machine, versions, commit, backends."""
import datetime
import os
import platform
import subprocess
from pathlib import Path

import torch

from bench.report import first_line

REPO_DIR = Path(__file__).resolve().parent.parent


def _git(*cmd):
    try:
        out = subprocess.run(["git", *cmd], cwd=REPO_DIR, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def pick_device(choice):
    """The device for --device auto|cuda|cpu (auto: cuda when visible); None: cuda, but none."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        return None
    return torch.device(choice)


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

"""Test setup. The first lines must run before anything imports triton.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it has to be in the environment before
ademamix_cuda.triton_kernels is imported. Without a GPU, the interpreter runs the Triton kernels on
CPU tensors; with a GPU the tests use compiled Triton on CUDA tensors (an explicit TRITON_INTERPRET
in the environment always wins).
"""
import os
import sys

# libgomp spin-waits by default: on a busy 2-core machine that makes small torch CPU ops 10-100x
# slower. Must be set before torch (and its OpenMP runtime) loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if "TRITON_INTERPRET" not in os.environ:
    import torch  # importing torch does not import triton

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET was decided"

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    # every test starts from the same global RNG state; data comes from explicit generators anyway
    torch.manual_seed(1234)
    yield


def pytest_report_header(config):
    from helpers import TRITON_INTERPRETED, extension_built, triton_installed

    return (f"ademamix tests: TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r} "
            f"(interpreted={TRITON_INTERPRETED}), extension built={extension_built()}, "
            f"triton installed={triton_installed()}, cuda available={torch.cuda.is_available()}")

"""Triton backend of ademamix_cuda: one multi-tensor launch per step (see ademamix.py)."""
from .ademamix import ademamix_step_

__all__ = ["ademamix_step_"]

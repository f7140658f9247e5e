"""Triton backend of ademamix_cuda: one multi-tensor launch per step (see ademamix.py)."""
from .ademamix import Stepper, ademamix_step_, grad_norm_partials

__all__ = ["Stepper", "ademamix_step_", "grad_norm_partials"]

"""ademamix_cuda: the AdEMAMix optimizer in one memory pass, with CUDA and Triton kernels.

`AdEMAMix` is a drop-in replacement for the authors' optimizer class; `functional.ademamix` is the
in-place step over tensor lists for custom trainers; `backends.available()` says which kernels load
here and why not.
"""
from . import backends, functional, schedules
from .optimizer import AdEMAMix, AdEMAMix8bit
from .version import __version__

__all__ = ["AdEMAMix", "AdEMAMix8bit", "backends", "functional", "schedules", "__version__"]

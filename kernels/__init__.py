"""Triton kernels of vflow (the GPU path), imported as ``vflow.kernels``."""

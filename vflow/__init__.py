"""vflow: fast VFlow (Chen et al., ICML 2020) in PyTorch.

Fused mixture-of-logistics coupling kernels (C++ on CPU, Triton on GPU) in ``vflow.ops``,
their eager oracle in ``vflow.reference``, and a complete VFlow model built on them.
"""

__version__ = "0.1.0"

from vflow import transforms  # noqa: E402  (the fused coupling as torch Transforms)
from vflow.models import build  # noqa: E402

__all__ = ["build", "transforms", "__version__"]

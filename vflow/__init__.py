"""vflow: fast VFlow (Chen et al., ICML 2020) in PyTorch.

Fused mixture-of-logistics coupling kernels (C++ on CPU, Triton on GPU) in ``vflow.ops``,
their eager oracle in ``vflow.reference``, and a complete VFlow model built on them.
"""

__version__ = "0.1.0"

from vflow import transforms  # noqa: E402  (the fused coupling as torch Transforms)
from vflow.compile import compile_regions  # noqa: E402  (regional torch.compile)
from vflow.models import build  # noqa: E402


def load(path: str, *, ema: bool = True, device: str = "cpu", backend: str | None = None):
    """A trained model from ``path``, a run directory of ``vflow train`` (its newest readable
    checkpoint) or one of its ``ckpt-*.pt`` files: the EMA weights unless ``ema=False``,
    on ``device`` ("cpu", "cuda", "cuda:N" or "auto"), in eval mode, ready for
    ``model.bpd(x)``, ``model.log_prob(x)`` and ``model.sample(n)``. ``backend`` overrides
    the run's coupling backend. FileNotFoundError for a path that is neither;
    :class:`vflow.checkpoints.CheckpointError` for a file that is not a readable
    checkpoint. ``vflow.train.load_run_model`` also returns the checkpoint."""
    from vflow.train import load_run_model

    return load_run_model(path, device=device, use_ema=ema, backend=backend)[0]


__all__ = ["build", "compile_regions", "load", "transforms", "__version__"]

"""vflow: fast VFlow (Chen et al., ICML 2020) in PyTorch.

Fused mixture-of-logistics coupling kernels (C++ on CPU, Triton on GPU) in ``vflow.ops``,
their eager oracle in ``vflow.reference``, and a complete VFlow model built on them.
"""

__version__ = "0.1.0"

import os  # noqa: E402

import torch  # noqa: E402

from vflow import transforms  # noqa: E402  (the fused coupling as torch Transforms)
from vflow.compile import compile_regions  # noqa: E402  (regional torch.compile)
from vflow.models import FlowPlusPlus, build  # noqa: E402


def load(
    path: str | os.PathLike[str],
    *,
    ema: bool = True,
    device: str | torch.device | None = None,
    map_location: str | torch.device | None = None,
    backend: str | None = None,
) -> FlowPlusPlus:
    """Load a trained model in one line, ready for ``model.bpd(x)``, ``model.log_prob(x)``
    and ``model.sample(n)`` (in eval mode).

    Args:
        path: a run directory written by ``vflow train`` (its newest readable checkpoint;
            a newer unreadable one is passed over with a warning) or one of its
            ``ckpt-*.pt`` files.
        ema: the EMA weights (what ``vflow eval`` and ``vflow sample`` use) if True, else
            the raw training weights.
        device: where the model goes: "cpu" (the default), "cuda", "cuda:N", "auto"
            (CUDA when available) or a ``torch.device``. The checkpoint is always read onto
            the CPU first, so a run trained on a GPU loads on a machine without one.
        map_location: ``torch.load``'s name for ``device``; give one or the other.
        backend: the coupling / attention backend of ``vflow.ops`` ("auto", "cpp",
            "triton", "reference"); default: the run's.

    Returns:
        The model (a ``FlowPlusPlus`` or ``VFlow``).

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a folder without checkpoints.
        vflow.checkpoints.CheckpointError: ``path`` is a file that is not a readable vflow
            checkpoint, or no checkpoint of the run directory can be read.
        ValueError: an unknown or unavailable device, or ``device`` and ``map_location``
            both given and different.

    ``vflow.train.load_run_model`` does the same and also returns the checkpoint.
    """
    from vflow.train import load_run_model

    if map_location is not None and device is not None and str(map_location) != str(device):
        raise ValueError(
            f"vflow.load: device={device!r} and map_location={map_location!r} disagree; "
            "give one of them"
        )
    where = device if device is not None else map_location if map_location is not None else "cpu"
    if not isinstance(where, (str, torch.device)):
        raise TypeError(
            "vflow.load: device / map_location must be a str or torch.device, got "
            f"{type(where).__name__}"
        )
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no run directory or checkpoint file at {path}: vflow.load takes a run directory "
            "written by 'vflow train' or one of its ckpt-*.pt files"
        )
    return load_run_model(path, device=str(where), use_ema=ema, backend=backend)[0]


__all__ = ["build", "compile_regions", "load", "transforms", "__version__"]

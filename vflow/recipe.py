"""Training recipes: the official Flow++ / VFlow hyperparameters per config, and the
learning-rate schedule, both as a Python float (:func:`learning_rate`) and as a device tensor
computed from a device step counter (:func:`learning_rate_tensor`, what a captured CUDA graph
reads).

Schedule (official code): Adam; the learning rate warms up linearly from 0 over ``warmup``
steps, holds, and from ``decay_start`` decays by ``decay_rate`` per step down to ``lr_min``
(VFlow CIFAR-10: 1.2e-3, warmup 2,000, x0.99999 from step 50,000 to 3e-4).
"""

from __future__ import annotations

import torch
from torch import Tensor

DEFAULT_RECIPE = {
    "lr": 1e-3,  # peak learning rate
    "warmup": 200,  # linear warm-up steps (0 = none)
    "decay_start": None,  # step from which the lr decays exponentially (None = never)
    "decay_rate": 1.0,  # per-step decay factor
    "lr_min": 0.0,  # floor of the decay
    "batch_size": 64,  # global batch
    "betas": (0.9, 0.999),
    "grad_clip": 1.0,  # global grad-norm clip (None or 0 = off)
    "ema_decay": 0.999,
    "steps": 10_000,  # default length when neither --steps nor --epochs is given
    "flip": False,  # random horizontal flips of the training images
}

#: Per-config training recipes (merged over DEFAULT_RECIPE; unknown configs get the default).
RECIPES: dict[str, dict] = {
    # The small default: ~3-4 minutes on 2 CPU cores (see vflow.cli).
    "vflow-digits": {"lr": 2e-3, "warmup": 100, "batch_size": 64, "ema_decay": 0.99, "steps": 1000},
    "flowpp-digits": {
        "lr": 2e-3,
        "warmup": 100,
        "batch_size": 64,
        "ema_decay": 0.99,
        "steps": 1000,
    },
    # Official VFlow CIFAR-10 (paper section 6): 1.2e-3, warmup 2k, x0.99999 from 50k to 3e-4.
    "vflow-cifar10": {
        "lr": 1.2e-3,
        "warmup": 2000,
        "decay_start": 50_000,
        "decay_rate": 0.99999,
        "lr_min": 3e-4,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 1_500_000,
        "flip": True,
    },
    # Flow++ used 3e-4 without decay.
    "flowpp-cifar10": {
        "lr": 3e-4,
        "warmup": 2000,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 1_500_000,
        "flip": True,
    },
    # ImageNet 32x32: lr 1e-3, warmup 5,000, batch 32.
    "vflow-imagenet32": {
        "lr": 1e-3,
        "warmup": 5000,
        "batch_size": 32,
        "ema_decay": 0.999,
        "steps": 1_500_000,
    },
    "vflow-imagenet64": {
        "lr": 1e-3,
        "warmup": 5000,
        "batch_size": 32,
        "ema_decay": 0.999,
        "steps": 1_500_000,
    },
    # Fashion-MNIST 28x28 (this package's scaled-down Table 5 structure): 3 epochs of the
    # 50,000 training images at batch 64 (ceil(150,000 / 64) = 2,344 steps).
    "vflow-fashion": {
        "lr": 1e-3,
        "warmup": 200,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 2344,
    },
    "flowpp-fashion": {
        "lr": 1e-3,
        "warmup": 200,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 2344,
    },
}


def get_recipe(config: str, **overrides) -> dict:
    """The recipe of ``config`` (its own entry, else that of its family, e.g. a
    "vflow-cifar10-4m" gets "vflow-cifar10"'s, else the default), with ``overrides``
    (``None`` values ignored) applied on top."""
    base = dict(DEFAULT_RECIPE)
    if config in RECIPES:
        base.update(RECIPES[config])
    else:
        for data in ("cifar10", "imagenet32", "imagenet64", "digits", "fashion"):
            if data in config:
                kind = "flowpp" if config.startswith("flowpp") else "vflow"
                base.update(RECIPES.get(f"{kind}-{data}", RECIPES.get(f"vflow-{data}", {})))
                break
    for k, v in overrides.items():
        if v is not None:
            if k not in DEFAULT_RECIPE:
                raise KeyError(f"unknown recipe key {k!r}; known: {', '.join(DEFAULT_RECIPE)}")
            base[k] = v
    return base


def learning_rate(step: int, recipe: dict) -> float:
    """The learning rate of update number ``step`` (1-based; ``step = 0`` gives 0 under warmup).

    ``lr * min(1, step / warmup)`` while warming up; from ``decay_start`` on,
    ``max(lr_min, lr * decay_rate ** (step - decay_start))``.
    """
    lr = float(recipe["lr"])
    warmup = int(recipe.get("warmup") or 0)
    if warmup > 0 and step < warmup:
        return lr * max(step, 0) / warmup
    start = recipe.get("decay_start")
    if start is not None and step > start:
        rate = float(recipe.get("decay_rate", 1.0))
        return max(float(recipe.get("lr_min") or 0.0), lr * rate ** (step - start))
    return lr


def learning_rate_tensor(step: Tensor, recipe: dict) -> Tensor:
    """:func:`learning_rate` of the update numbers in the integer tensor ``step``, as a
    float64 tensor on its device, computed without reading ``step`` on the host.

    The same float64 operations in the same order as :func:`learning_rate` (products and
    quotients are correctly rounded, so they agree bitwise; ``rate ** n`` may differ from
    Python's ``pow`` in the last bit on some devices).
    """
    lr = float(recipe["lr"])
    s = step.double()
    out = torch.full_like(s, lr)
    warmup = int(recipe.get("warmup") or 0)
    start = recipe.get("decay_start")
    if start is not None:
        rate = float(recipe.get("decay_rate", 1.0))
        decayed = torch.clamp(
            lr * torch.pow(rate, s - start), min=float(recipe.get("lr_min") or 0.0)
        )
        out = torch.where(s > start, decayed, out)
    if warmup > 0:
        out = torch.where(s < warmup, lr * torch.clamp(s, min=0) / warmup, out)
    return out

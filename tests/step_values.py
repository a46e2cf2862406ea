"""Fingerprints of one float64 training step, recorded from a fixed revision of the models.

``step_values(name)`` builds config ``name`` on the reference backend in float64 (seed 0),
initialises it on 2 images and runs one training step (``-mean ELBO / (D ln 2)``, forward and
backward, train mode, dropout on, seed 1): it returns the per-image ELBO and, per parameter,
the gradient's norm and its dot product with a fixed random direction (N(0, 1) entries drawn
in parameter order from seed 2). It uses only vflow's public API, so the same file records
the values of any revision of the package:

    PYTHONPATH=<checkout of the revision> python tests/step_values.py > tests/data/step_values.json

``tests/data/step_values.json`` holds the values of f0cb221 (the models before issue 27's
op reduction); ``tests/test_step_equivalence.py`` compares the current code with them.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import torch

CONFIGS = ("vflow-digits", "flowpp-cifar10", "vflow-cifar10")


def step_values(name: str) -> dict:
    """ELBO (B,) and per-parameter [gradient norm, gradient . direction] of one step."""
    import vflow

    torch.manual_seed(0)
    model = vflow.build(name, backend="reference").double()
    c, h, w = model.config.data_shape
    x = torch.randint(0, model.config.n_bins, (2, c, h, w))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the small init batch
        model.initialize(x)
    model.train()
    torch.manual_seed(1)
    elbo = model.elbo(x)
    (-elbo.mean() / (c * h * w * math.log(2))).backward()
    gen = torch.Generator().manual_seed(2)
    grads = {}
    for key, p in model.named_parameters():
        direction = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        g = torch.zeros_like(p) if p.grad is None else p.grad
        grads[key] = [g.norm().item(), (g * direction).sum().item()]
    return {"elbo": elbo.tolist(), "grads": grads}


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1:] or CONFIGS
    json.dump({name: step_values(name) for name in names}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()

"""One float64 training step equals, to 1e-10 relative, the step of the models as they were
before issue 27 reduced the ops they dispatch (f0cb221): the per-image ELBO and, for every
parameter, the norm of its gradient and the gradient's dot product with a fixed random
direction (``step_values.py``, which recorded ``data/step_values.json`` from f0cb221).
Dropout is on (p = 0.2 in the CIFAR configs), so the random draws must match too."""

import json
from pathlib import Path

import pytest
from step_values import step_values

RECORDED = json.loads((Path(__file__).parent / "data" / "step_values.json").read_text())
TOL = 1e-10


def relative_errors(new: dict, old: dict) -> dict[str, float]:
    """Largest relative differences of the ELBO, the gradient norms and the projections (the
    projection's difference relative to the gradient norm of its parameter)."""
    assert list(new["grads"]) == list(old["grads"])  # the same parameters, in order
    elbo = max(abs(a - b) / abs(b) for a, b in zip(new["elbo"], old["elbo"], strict=True))
    norm = proj = 0.0
    for key, (n_old, d_old) in old["grads"].items():
        n_new, d_new = new["grads"][key]
        scale = max(n_old, 1e-300)
        norm = max(norm, abs(n_new - n_old) / scale)
        proj = max(proj, abs(d_new - d_old) / scale)
    return {"elbo": elbo, "grad_norm": norm, "grad_projection": proj}


@pytest.mark.parametrize(
    "name",
    [
        "vflow-digits",
        pytest.param("flowpp-cifar10", marks=pytest.mark.slow),
        pytest.param("vflow-cifar10", marks=pytest.mark.slow),
    ],
)
def test_float64_step_equals_the_recorded_one(name, one_thread):
    errors = relative_errors(step_values(name), RECORDED[name])
    print(name, errors)
    assert max(errors.values()) <= TOL, errors

"""model_step.py's training step (bits/dim forward + backward) as a pytest-benchmark suite.

    pytest benchmarks/ --benchmark-only [--bench-size tiny|quick|full] [--device cuda]

One group per (config, batch) of model_step.BENCH_SIZES, the couplings' backend as the
parameter (``reference``, and the fused backend of the device: ``cpp`` on the CPU, ``triton``
on CUDA), on the same weights and images. ``extra_info``: the loss (bits/dim) and the max
difference of every parameter's gradient from the reference backend's, relative to the
largest reference gradient (same dequantization noise); it must stay below GRAD_LIMIT.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import coupling as C
import model_step as M
import torch

GRAD_LIMIT = 1e-3


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    device = metafunc.config.getoption("--device")
    fused = M._fused_backend(device) if device == "cpu" or torch.cuda.is_available() else None
    backends = ["reference"] + ([fused] if fused else [])
    cases = [(c, b, k) for c, b in M.BENCH_SIZES[size] for k in backends]
    metafunc.parametrize("config,batch,backend", cases, ids=[f"{c}-b{b}-{k}" for c, b, k in cases])


@functools.lru_cache(maxsize=1)  # the backends of one group share the model
def _model(config: str, batch: int, device: str):
    model, x = M._build(SimpleNamespace(config=config, device=device, batch=batch), "reference")
    model.train()
    return model, x


def _loss_and_grads(step):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # the same dequantization noise for every backend
        loss = step()
    return loss.item(), [p.grad.clone() for p in step.model.parameters() if p.grad is not None]


def test_model_step(benchmark, device, config, batch, backend):
    model, x = _model(config, batch, str(device))
    step = M._step_fn(model, model.bpd, x)
    _, ref = _loss_and_grads(step)
    model.set_backend(backend)
    try:
        loss, grads = _loss_and_grads(step)
        scale = max(r.abs().max().item() for r in ref)
        diff = max((g - r).abs().max().item() for g, r in zip(grads, ref, strict=True)) / scale
        benchmark.group = f"model_step-{config}-b{batch}"
        benchmark.extra_info.update(loss_bpd=loss, max_grad_diff_vs_reference=diff)
        benchmark(C.synced(step, device))
    finally:
        model.set_backend("reference")
    assert diff <= GRAD_LIMIT, diff

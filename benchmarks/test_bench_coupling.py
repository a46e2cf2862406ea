"""The coupling benchmark (benchmarks/coupling.py) as a pytest-benchmark suite.

    pytest benchmarks/ --benchmark-only [--bench-size tiny|quick|full] [--device cuda]

One group per shape and mode (``tiny-forward``, ...), the providers of coupling.py as
parameters: ``eager``, ``compile`` (not at ``tiny``), the public fused ops (``cpp``,
``triton``, inverse also ``*-bisect``) and the bare kernel calls under them (``*-kernel``).
``extra_info`` records the max error against float64 (``max_err``; inverse also ``y_err``),
the bytes the call must move at least and, when timed, the median's GB/s. Each provider's
error must stay below ERR_LIMIT (a wrong result fails; times are never asserted).
"""

from __future__ import annotations

import functools

import coupling as C
import torch
from _bandwidth import gbps

ERR_LIMIT = 1e-3  # float32, every mode (the providers reach 1e-7 - 1e-4)


def _use_compile(size: str) -> bool:
    return size != "tiny"  # torch.compile takes minutes on the CPU: not in CI's tiny run


def _providers(mode, device, size) -> dict:
    """name -> provider of ``mode``: coupling.py's, and ``<name>-kernel`` for the bare kernels."""
    prov = C.providers_for(mode, device, _use_compile(size))
    prov.update({f"{n}-kernel": fn for n, fn in C.kernel_providers_for(mode, device).items()})
    return prov


def pytest_generate_tests(metafunc):
    if "provider" not in metafunc.fixturenames:
        return
    size = metafunc.config.getoption("--bench-size")
    device = torch.device(metafunc.config.getoption("--device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        metafunc.parametrize("shape,mode,provider", [])  # the device fixture skips
        return
    cases = [
        (shape, mode, name)
        for shape in C.shapes_for(size, device)
        for mode in C.MODES
        for name in _providers(mode, device, size)
    ]
    metafunc.parametrize("shape,mode,provider", cases, ids=[f"{s}-{m}-{p}" for s, m, p in cases])


@functools.lru_cache(maxsize=1)  # consecutive tests share (shape, mode)
def _case(shape: str, mode: str, device: str) -> C.Case:
    return C.Case(mode, C.ALL_SHAPES[shape], torch.device(device), torch.float32)


def test_coupling(benchmark, request, device, shape, mode, provider):
    case = _case(shape, mode, str(device))
    fn = _providers(mode, device, request.config.getoption("--bench-size"))[provider]
    call = C.synced(case.call(fn), device)
    # a warm-up call outside the timing: torch.compile's compilation, the first call of a
    # custom op (seconds) or a Triton compilation would otherwise be timed as a round
    errors = case.errors(call())
    benchmark.group = f"{shape}-{mode}"
    benchmark(call)
    benchmark.extra_info.update(
        max_err=errors["err"], bytes_moved=case.bytes_moved, dims=list(case.dims)
    )
    if "y_err" in errors:
        benchmark.extra_info["y_err"] = errors["y_err"]
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps"] = gbps(case.bytes_moved, benchmark.stats.stats.median * 1e3)
    assert errors["err"] <= ERR_LIMIT, errors

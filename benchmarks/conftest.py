"""pytest-benchmark suite (``pytest benchmarks/ --benchmark-only``): options and fixtures.

``--device`` and its fixture, and TRITON_INTERPRET=1 unless ``--device cuda``, come from
tests/conftest.py (executed here, so that both folders share one definition); this file adds
``--bench-size`` (default: the environment variable VFLOW_BENCH_SIZE, else ``quick``).
"""

import importlib.util
import os
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "_vflow_tests_conftest", Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
)
_tests_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tests_conftest)  # sets TRITON_INTERPRET before triton is imported

import coupling  # noqa: E402  (after TRITON_INTERPRET is set)

device = _tests_conftest.device


def pytest_addoption(parser):
    try:
        _tests_conftest.pytest_addoption(parser)
    except ValueError:  # `pytest tests benchmarks`: tests/conftest.py registered --device
        pass
    parser.addoption(
        "--bench-size",
        default=os.environ.get("VFLOW_BENCH_SIZE", "quick"),
        choices=list(coupling.SIZES),
        help="shapes of the benchmark suite: tiny (CI), quick, full (default: "
        "$VFLOW_BENCH_SIZE, else quick)",
    )

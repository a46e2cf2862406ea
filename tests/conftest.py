"""Test configuration: CPU by default, ``--device cuda`` to run the same tests on a GPU.

Triton kernels run under Triton's interpreter on CPU; TRITON_INTERPRET must be set before
triton is first imported, so it is set here, at collection time, unless --device cuda.
"""

import os
import sys
import zlib


def _wants_cuda(argv) -> bool:
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv) and argv[i + 1].startswith("cuda"):
            return True
        if arg.startswith("--device=cuda"):
            return True
    return False


if not _wants_cuda(sys.argv):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the tests: cpu (default) or cuda")
    parser.addoption(
        "--fast-math",
        action="store_true",
        help="run every test with the GPU's fast-math errors emulated in Triton's interpreter "
        "(kernels/_emulation.py), e.g. pytest --fast-math tests/test_triton_kernels.py",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--device")
    if name.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("--device cuda given but no CUDA device is available")
    return torch.device(name)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state and leaves the global one untouched."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


@pytest.fixture(autouse=True)
def _fast_math_mode(request):
    """With ``--fast-math``, interpreted float32 exp / log / exp2 / log2 / sqrt carry the
    errors of the GPU's approximate instructions for the whole test (seeded per test)."""
    if not request.config.getoption("--fast-math"):
        yield
        return
    from vflow.kernels._emulation import fast_math

    seed = zlib.crc32(request.node.nodeid.encode())
    with fast_math(seed=seed):
        yield


@pytest.fixture
def one_thread():
    """Run a test on one torch thread: tiny models and matrices run faster that way, and a
    busy machine does not stall them at OpenMP barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

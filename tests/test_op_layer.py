"""The eager op layer of vflow.ops: calls the fused kernels directly (``_FusedCoupling``) and
keeps the registered custom ops for torch.compile, dispatch modes and double backward.

The direct path exists for speed (``benchmarks/op_overhead.py``); these tests pin down that
it is taken in eager mode, that it is not taken where the custom ops must be seen, and that
both give the same numbers, gradients and errors.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vflow import ops

FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
pytestmark = pytest.mark.skipif(not FUSED, reason="no fused backend (vflow._C / triton)")


def _problem(k=3, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 6, generator=gen, dtype=dtype)
    params = torch.randn(2, 2 + 3 * k, 3, 4, 3, generator=gen, dtype=dtype)
    params[:, 2 + 2 * k :] = params[:, 2 + 2 * k :].clamp(-3, 2)
    grads = (torch.randn_like(x), torch.randn(2, generator=gen, dtype=dtype))
    return x, params, grads


def _value_and_grads(op, x, params, grads, **kw):
    x = x.clone().requires_grad_()
    params = params.clone().requires_grad_()
    out, logdet = op(x, params, parity=1, **kw)
    grad_x, grad_p = torch.autograd.grad((out, logdet), (x, params), grads)
    return out.detach(), logdet.detach(), grad_x, grad_p


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _fail(*args, **kwargs):
    raise AssertionError("the registered custom op was called in eager mode")


@pytest.mark.parametrize("backend", FUSED)
def test_eager_calls_bypass_the_registered_custom_ops(backend, monkeypatch):
    for name in ("_coupling_fwd", "_coupling_bwd", "_coupling_inv"):
        monkeypatch.setattr(ops, name, _fail)
    x, params, grads = _problem()
    _value_and_grads(ops.checkerboard_coupling, x, params, grads, backend=backend)
    _value_and_grads(ops.checkerboard_coupling_inverse, x, params, grads, backend=backend)
    with torch.no_grad():
        ops.checkerboard_coupling(x, params, parity=0, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_dispatch_modes_see_the_custom_ops(backend):
    """Under a TorchDispatchMode (fake tensors, selective checkpointing, op counters) the
    coupling goes through vflow::coupling_fwd / coupling_bwd / coupling_inv."""
    x, params, grads = _problem()
    with _OpNames() as mode:
        _value_and_grads(ops.checkerboard_coupling, x, params, grads, backend=backend)
        _value_and_grads(ops.checkerboard_coupling_inverse, x, params, grads, backend=backend)
    assert {"vflow.coupling_fwd", "vflow.coupling_bwd", "vflow.coupling_inv"} <= mode.names


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_path_equals_the_custom_op_path_bitwise(backend, inverse, dtype):
    """Values and both gradients of the eager op equal those of the same call through the
    registered custom ops (taken under a dispatch mode), bit for bit."""
    op = ops.checkerboard_coupling_inverse if inverse else ops.checkerboard_coupling
    x, params, grads = _problem(dtype=dtype, seed=4)
    direct = _value_and_grads(op, x, params, grads, backend=backend)
    with _OpNames() as mode:
        registered = _value_and_grads(op, x, params, grads, backend=backend)
    assert "vflow.coupling_bwd" in mode.names
    for a, b in zip(direct, registered, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_gradient_of_params_alone_and_no_graph_without_grad(backend):
    x, params, grads = _problem()
    params = params.clone().requires_grad_()
    out, logdet = ops.checkerboard_coupling(x, params, parity=0, backend=backend)
    (grad_p,) = torch.autograd.grad((out, logdet), params, grads)
    assert grad_p.shape == params.shape and grad_p.abs().sum() > 0
    with torch.no_grad():
        out, logdet = ops.checkerboard_coupling(x, params, parity=0, backend=backend)
    assert not out.requires_grad and not logdet.requires_grad
    out, _ = ops.checkerboard_coupling(x, params.detach(), parity=0, backend=backend)
    assert out.grad_fn is None


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("inverse", [False, True], ids=["forward", "inverse"])
def test_double_backward_fails_with_a_clear_error(backend, inverse):
    """A gradient taken with create_graph=True must not be silently constant: differentiating
    it again raises, naming the op (double backward is not supported)."""
    op = ops.checkerboard_coupling_inverse if inverse else ops.checkerboard_coupling
    x, params, grads = _problem()
    x = x.clone().requires_grad_()
    out, logdet = op(x, params, parity=0, backend=backend)
    (grad_x,) = torch.autograd.grad((out, logdet), x, grads, create_graph=True)
    assert grad_x.requires_grad
    with pytest.raises(RuntimeError, match="vflow.coupling_bwd"):
        grad_x.sum().backward()


def test_op_overhead_benchmark_quick():
    """benchmarks/op_overhead.py runs and reports every row for each fused CPU backend."""
    from benchmarks import op_overhead

    rows = op_overhead.main(["--number", "2", "--repeats", "1"])
    names = {(r["backend"], r["row"]) for r in rows}
    for backend in FUSED:
        for row in ("bare", "custom-op", "public", "autograd-floor"):
            assert (backend, row) in names
    for r in rows:
        assert r["forward_us"] > 0 and r["fwdbwd_us"] > 0
        assert r["row"] != "bare" or r["forward_overhead_us"] == 0

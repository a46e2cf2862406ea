"""The public API of vflow.ops: every backend against the float64 reference, gradients,
torch.library registration, torch.compile, determinism and bad input."""

import math

import pytest
import torch

from vflow import ops

FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
BACKENDS = ["reference", *FUSED]
needs_fused = pytest.mark.skipif(not FUSED, reason="no fused backend built (vflow._C / triton)")


def make_params(batch, k, *shape, dtype=torch.float64, scale=1.0):
    """Random MoL parameters (B, 2+3K, *S) with moderate log-scales."""
    p = torch.randn(batch, 2 + 3 * k, *shape, dtype=dtype) * scale
    p[:, 2 + 2 * k :] = p[:, 2 + 2 * k :].clamp(-3, 2)
    return p


def supports_float64(backend):
    x, p = torch.randn(1, 2, dtype=torch.float64), make_params(1, 1, 2)
    try:
        ops.mixlogistic_coupling(x, p, backend=backend)
    except TypeError:
        return False
    return True


# --- split / merge ----------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["checkerboard", "stripe"])
@pytest.mark.parametrize("parity", [0, 1])
def test_split_merge_round_trip_and_mask(pattern, parity):
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).reshape(2, 3, 5, 6)
    active, passive = ops.checkerboard_split(x, parity=parity, pattern=pattern)
    assert active.shape == passive.shape == (2, 3, 5, 3)
    assert torch.equal(ops.checkerboard_merge(active, passive, parity=parity, pattern=pattern), x)
    h, w = torch.meshgrid(torch.arange(5), torch.arange(6), indexing="ij")
    mask = ((h + w) % 2 if pattern == "checkerboard" else w % 2) == parity
    expected = x[:, :, mask].reshape(2, 3, 5, 3)  # row-major order of the active positions
    assert torch.equal(active, expected)
    assert torch.equal(passive, x[:, :, ~mask].reshape(2, 3, 5, 3))


# --- forward and backward against the float64 reference ---------------------------------


def check_close(fused, ref64, eager32, atol):
    """|fused - ref64| <= 2 |eager32 - ref64| + atol, elementwise."""
    fused, ref64, eager32 = (t.double() for t in (fused, ref64, eager32))
    bound = 2 * (eager32 - ref64).abs() + atol
    excess = ((fused - ref64).abs() - bound).max().item()
    assert excess <= 0, f"exceeds the 2x-eager bound by {excess:.3g}"


def coupling_outputs(fn, x, p, **kw):
    x = x.detach().requires_grad_(True)
    p = p.detach().requires_grad_(True)
    y, logdet = fn(x, p, **kw)
    gy = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    gl = torch.linspace(0.5, 1.5, logdet.numel(), dtype=logdet.dtype)
    gx, gp = torch.autograd.grad((y * gy).sum() + (logdet * gl).sum(), (x, p))
    return y, logdet, gx, gp


CASES = [  # (batch, spatial shape of x, K)
    (3, (5, 7), 1),
    (2, (3, 4, 6), 3),
    (1, (13,), 32),
]


@pytest.mark.parametrize("backend", FUSED or [pytest.param("cpp", marks=needs_fused)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("case", CASES)
def test_mixlogistic_coupling_matches_reference(backend, smooth, case):
    batch, shape, k = case
    x = torch.randn(batch, *shape, dtype=torch.float64) * 2
    p = make_params(batch, k, *shape)
    ref = coupling_outputs(ops.mixlogistic_coupling, x, p, smooth=smooth, backend="reference")
    eager = coupling_outputs(
        ops.mixlogistic_coupling, x.float(), p.float(), smooth=smooth, backend="reference"
    )
    fused = coupling_outputs(
        ops.mixlogistic_coupling, x.float(), p.float(), smooth=smooth, backend=backend
    )
    for f, r, e in zip(fused, ref, eager, strict=True):
        assert f.shape == r.shape
        check_close(f, r, e, atol=1e-4 * max(1.0, r.abs().max().item()))


@pytest.mark.parametrize("backend", FUSED or [pytest.param("cpp", marks=needs_fused)])
@pytest.mark.parametrize("pattern", ["checkerboard", "stripe"])
@pytest.mark.parametrize("parity", [0, 1])
def test_checkerboard_coupling_equals_split_transform_merge(backend, pattern, parity):
    x = torch.randn(2, 3, 5, 6)
    p = make_params(2, 3, 3, 5, 3, dtype=torch.float32)
    y, logdet = ops.checkerboard_coupling(x, p, parity=parity, pattern=pattern, backend=backend)
    active, passive = ops.checkerboard_split(x, parity=parity, pattern=pattern)
    y_active, logdet_ref = ops.mixlogistic_coupling(active, p, backend="reference")
    y_ref = ops.checkerboard_merge(y_active, passive, parity=parity, pattern=pattern)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-5, atol=1e-4)
    assert torch.equal(ops.checkerboard_split(y, parity=parity, pattern=pattern)[1], passive)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_x = torch.randn(4, 6, 9, dtype=torch.float32)
    base_p = make_params(4, 2, 6, 9, dtype=torch.float32)
    x = base_x.transpose(1, 2)[::2]  # (2, 9, 6), strided
    p = base_p.transpose(2, 3)[::2]
    y, logdet = ops.mixlogistic_coupling(x, p, backend=backend)
    y_ref, logdet_ref = ops.mixlogistic_coupling(
        x.contiguous(), p.contiguous(), backend="reference"
    )
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logdet, logdet_ref, rtol=1e-5, atol=1e-4)
    expanded = make_params(1, 2, 9, 6, dtype=torch.float32).expand(2, -1, -1, -1)
    y, _ = ops.mixlogistic_coupling(x, expanded, backend=backend)
    torch.testing.assert_close(y, ops.mixlogistic_coupling(x, expanded.contiguous())[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smooth", [True, False])
def test_extreme_values_stay_finite(backend, smooth):
    k = 4
    x = torch.tensor([[-1e4, -50.0, -0.5, 0.0, 3.0, 1e4]])
    p = torch.zeros(1, 2 + 3 * k, 6)
    p[:, 0] = torch.tensor([-30.0, 30.0, 0.0, 5.0, -5.0, 1.0])
    p[:, 2:6] = torch.tensor([50.0, -50.0, 0.0, 1.0])[:, None]
    p[:, 6:10] = torch.tensor([1e3, -1e3, 0.0, 5.0])[:, None]
    p[:, 10:14] = torch.tensor([-20.0, 10.0, -7.0, 0.0])[:, None]
    x.requires_grad_(True)
    p.requires_grad_(True)
    y, logdet = ops.mixlogistic_coupling(x, p, smooth=smooth, backend=backend)
    gx, gp = torch.autograd.grad(y.sum() + logdet.sum(), (x, p))
    for name, t in [("y", y), ("logdet", logdet), ("grad x", gx), ("grad params", gp)]:
        assert torch.isfinite(t).all(), f"{name} is not finite: {t}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_element_and_sample(backend):
    x = torch.randn(2, 5)
    x[0, 2] = float("nan")
    p = make_params(2, 3, 5, dtype=torch.float32)
    y, logdet = ops.mixlogistic_coupling(x, p, backend=backend)
    assert torch.isnan(y[0, 2]) and torch.isnan(logdet[0])
    assert torch.isfinite(y[0, [0, 1, 3, 4]]).all() and torch.isfinite(y[1]).all()
    assert torch.isfinite(logdet[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 3, 4)
    p = make_params(0, 2, 3, 4, dtype=torch.float32).requires_grad_(True)
    y, logdet = ops.mixlogistic_coupling(x, p, backend=backend)
    assert y.shape == (0, 3, 4) and logdet.shape == (0,)
    x_back, logdet_inv = ops.mixlogistic_coupling_inverse(y, p, backend=backend)
    assert x_back.shape == (0, 3, 4) and logdet_inv.shape == (0,)
    (grad,) = torch.autograd.grad(y.sum() + logdet.sum(), p)
    assert grad.shape == p.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_computes_in_float32(backend):
    x = torch.randn(2, 7)
    p = make_params(2, 3, 7, dtype=torch.float32)
    y32, logdet32 = ops.mixlogistic_coupling(x, p, backend=backend)
    for dtype in (torch.float16, torch.bfloat16):
        y, logdet = ops.mixlogistic_coupling(x.to(dtype), p.to(dtype), backend=backend)
        assert y.dtype == dtype and logdet.dtype == torch.float32
        y_up, _ = ops.mixlogistic_coupling(
            x.to(dtype).float(), p.to(dtype).float(), backend=backend
        )
        torch.testing.assert_close(y, y_up.to(dtype))
        assert (logdet - logdet32).abs().max() < 0.5  # only input rounding differs


# --- inverse ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("method", ["newton", "bisection"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_round_trip(backend, smooth, method, dtype):
    if dtype == torch.float64 and not supports_float64(backend):
        pytest.skip(f"{backend} refuses float64")
    x = torch.randn(3, 4, 11, dtype=dtype) * 2
    p = make_params(3, 5, 4, 11, dtype=dtype)
    y, logdet = ops.mixlogistic_coupling(x, p, smooth=smooth, backend=backend)
    x_back, logdet_inv = ops.mixlogistic_coupling_inverse(
        y, p, smooth=smooth, method=method, backend=backend
    )
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert ((x_back - x).abs() <= tol * x.abs().clamp(min=1)).all()
    torch.testing.assert_close(
        logdet + logdet_inv, torch.zeros_like(logdet), atol=tol * 100, rtol=0
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pattern", ["checkerboard", "stripe"])
def test_checkerboard_inverse_round_trip(backend, pattern):
    x = torch.randn(2, 3, 4, 6)
    p = make_params(2, 4, 3, 4, 3, dtype=torch.float32)
    y, logdet = ops.checkerboard_coupling(x, p, parity=1, pattern=pattern, backend=backend)
    x_back, logdet_inv = ops.checkerboard_coupling_inverse(
        y, p, parity=1, pattern=pattern, backend=backend
    )
    assert ((x_back - x).abs() <= 1e-4 * x.abs().clamp(min=1)).all()
    torch.testing.assert_close(logdet + logdet_inv, torch.zeros_like(logdet), atol=1e-3, rtol=0)


def test_smooth_inverse_clamps_unreachable_targets():
    p = make_params(1, 2, 4)
    y = torch.tensor([[-1e3, -2.0, 2.0, 1e3]], dtype=torch.float64)
    x, _ = ops.mixlogistic_coupling_inverse(y, p, backend="reference")
    assert torch.isfinite(x).all()
    y_back, _ = ops.mixlogistic_coupling(x, p, backend="reference")
    a = torch.tanh(p[:, 0])
    low = torch.exp(a) * math.log(0.05 / 0.95) + p[:, 1]
    assert (y_back[:, 0] - low[:, 0]).abs() < 1e-6  # clamped onto the edge of the range
    assert (y_back[:, -1] - (-low[:, -1] + 2 * p[:, 1, -1])).abs() < 1e-6


# --- gradcheck (float64) -----------------------------------------------------------------


# Triton runs interpreted on CPU, where the thousands of calls of a gradcheck are too slow for
# the inverse: its gradients are checked against the reference in tests/test_triton_kernels.py.
GRADCHECK_BACKENDS = [b for b in BACKENDS if supports_float64(b)]
GRADCHECK_INVERSE_BACKENDS = [b for b in GRADCHECK_BACKENDS if b != "triton"]


@pytest.mark.parametrize("backend", GRADCHECK_BACKENDS)
@pytest.mark.parametrize("smooth", [True, False])
def test_gradcheck_forward(backend, smooth):
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    p = make_params(2, 2, 3).requires_grad_(True)
    fn = lambda x, p: ops.mixlogistic_coupling(x, p, smooth=smooth, backend=backend)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, p))


@pytest.mark.parametrize("backend", GRADCHECK_INVERSE_BACKENDS)
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("method", ["newton", "bisection"])
def test_gradcheck_inverse(backend, smooth, method):
    x = torch.randn(2, 2, dtype=torch.float64)
    p = make_params(2, 2, 2).requires_grad_(True)
    y = ops.mixlogistic_coupling(x, p, smooth=smooth, backend="reference")[0].detach()

    def fn(y, p):
        return ops.mixlogistic_coupling_inverse(y, p, smooth=smooth, method=method, backend=backend)

    assert torch.autograd.gradcheck(fn, (y.requires_grad_(True), p))


@pytest.mark.parametrize("backend", GRADCHECK_INVERSE_BACKENDS)
@pytest.mark.parametrize("pattern", ["checkerboard", "stripe"])
def test_gradcheck_checkerboard(backend, pattern):
    x = torch.randn(1, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    p = make_params(1, 2, 1, 2, 2).requires_grad_(True)

    def forward(x, p):
        return ops.checkerboard_coupling(x, p, parity=0, pattern=pattern, backend=backend)

    def inverse(y, p):
        return ops.checkerboard_coupling_inverse(y, p, parity=0, pattern=pattern, backend=backend)

    assert torch.autograd.gradcheck(forward, (x, p))
    y = forward(x, p)[0].detach().requires_grad_(True)
    assert torch.autograd.gradcheck(inverse, (y, p))


# --- registration, compile, determinism ---------------------------------------------------


@needs_fused
@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    x = torch.randn(2, 3, 4)
    p = make_params(2, 2, 3, 4, dtype=torch.float32)
    y = ops.mixlogistic_coupling(x, p, backend=backend)[0]
    torch.library.opcheck(
        torch.ops.vflow.coupling_fwd.default, (x, p.requires_grad_(True), True, 0, 0, backend)
    )
    torch.library.opcheck(
        torch.ops.vflow.coupling_inv.default, (y, p, True, 0, 0, 30, True, backend)
    )
    ones = torch.ones(2)
    torch.library.opcheck(
        torch.ops.vflow.coupling_bwd.default, (x, p.detach(), y, ones, True, 0, 0, False, backend)
    )


@pytest.mark.skipif("cpp" not in FUSED, reason="vflow._C not built")
def test_torch_compile_fullgraph_matches_eager():
    x = torch.randn(2, 3, 4, 6, requires_grad=True)
    p = make_params(2, 3, 3, 4, 3, dtype=torch.float32).requires_grad_(True)

    def step(x, p):
        y, logdet = ops.checkerboard_coupling(x, p, parity=1, backend="cpp")
        x_back, _ = ops.checkerboard_coupling_inverse(y, p, parity=1, backend="cpp")
        return y.square().sum() + logdet.sum() + x_back.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_loss = step(x, p)
    compiled_loss = compiled(x, p)
    torch.testing.assert_close(compiled_loss, eager_loss)
    g_eager = torch.autograd.grad(eager_loss, (x, p))
    g_compiled = torch.autograd.grad(compiled_loss, (x, p))
    for a, b in zip(g_eager, g_compiled, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    x = torch.randn(5, 3, 8, 8)
    p = make_params(5, 4, 3, 8, 4, dtype=torch.float32)
    first = ops.checkerboard_coupling(x, p, parity=0, backend=backend)
    second = ops.checkerboard_coupling(x, p, parity=0, backend=backend)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


# --- backend selection and bad input ------------------------------------------------------


def test_auto_backend_and_env_override(monkeypatch):
    monkeypatch.delenv("VFLOW_BACKEND", raising=False)
    expected = "cpp" if "cpp" in FUSED else "reference"
    assert ops.resolve_backend("auto", "cpu") == expected
    monkeypatch.setenv("VFLOW_BACKEND", "reference")
    assert ops.resolve_backend("auto", "cpu") == "reference"
    monkeypatch.setenv("VFLOW_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VFLOW_BACKEND"):
        ops.resolve_backend("auto", "cpu")
    assert ops.available_backends("cpu")[-1] == "reference"


def test_missing_backend_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(ops, "_CPP", ImportError("No module named 'vflow._C'"))
    with pytest.raises(RuntimeError, match="pip install -e . --no-build-isolation"):
        ops.mixlogistic_coupling(torch.randn(1, 2), make_params(1, 1, 2), backend="cpp")


def test_triton_refuses_plain_cpu_tensors(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA"):
        ops.mixlogistic_coupling(torch.randn(1, 2), make_params(1, 1, 2), backend="triton")


BAD_CALLS = [
    (lambda: ops.mixlogistic_coupling([1.0], make_params(1, 1, 1)), TypeError, "x must be"),
    (
        lambda: ops.mixlogistic_coupling(torch.ones(2, 3, dtype=torch.long), make_params(2, 1, 3)),
        TypeError,
        "x must be a floating-point",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 3).long()),
        TypeError,
        "params must be a floating-point",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), torch.randn(2, 6, 3)),
        ValueError,
        "2\\+3K",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(3, 1, 3)),
        ValueError,
        "params must have shape",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 4)),
        ValueError,
        "params must have shape",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 3, 1)),
        ValueError,
        "params must have shape",
    ),
    (lambda: ops.mixlogistic_coupling(torch.tensor(1.0), make_params(1, 1)), ValueError, "batch"),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 3), backend="gpu"),
        ValueError,
        "backend must be one of",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 3), smooth=1),
        TypeError,
        "smooth must be a bool",
    ),
    (
        lambda: ops.mixlogistic_coupling(torch.randn(2, 3), make_params(2, 1, 3).to("meta")),
        ValueError,
        "params is on meta",
    ),
    (
        lambda: ops.checkerboard_coupling(
            torch.randn(1, 2, 3, 5), make_params(1, 1, 2, 3, 2), parity=0
        ),
        ValueError,
        "even width",
    ),
    (
        lambda: ops.checkerboard_coupling(torch.randn(1, 2, 3), make_params(1, 1, 2, 3), parity=0),
        ValueError,
        "x must have shape \\(B, C, H, W\\)",
    ),
    (
        lambda: ops.checkerboard_coupling(
            torch.randn(1, 2, 3, 4), make_params(1, 1, 2, 3, 2), parity=2
        ),
        ValueError,
        "parity must be 0 or 1",
    ),
    (
        lambda: ops.checkerboard_coupling(
            torch.randn(1, 2, 3, 4), make_params(1, 1, 2, 3, 2), parity=0, pattern="diagonal"
        ),
        ValueError,
        "pattern must be one of",
    ),
    (
        lambda: ops.checkerboard_coupling(
            torch.randn(1, 2, 3, 4), make_params(1, 1, 2, 3, 4), parity=0
        ),
        ValueError,
        "params must have shape",
    ),
    (
        lambda: ops.mixlogistic_coupling_inverse(
            torch.randn(1, 2), make_params(1, 1, 2), method="secant"
        ),
        ValueError,
        "method must be one of",
    ),
    (
        lambda: ops.mixlogistic_coupling_inverse(
            torch.randn(1, 2), make_params(1, 1, 2), max_iters=0
        ),
        ValueError,
        "max_iters must be a positive int",
    ),
    (
        lambda: ops.checkerboard_merge(torch.randn(1, 2, 3, 2), torch.randn(1, 2, 3, 3), parity=0),
        ValueError,
        "passive must have the shape",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()

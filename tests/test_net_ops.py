"""The networks' fused ops (vflow.net_ops: concat-ELU, gated residual, channel layer norm) on
the cpp and triton backends, against float64 evaluations of their definitions by plain torch
ops: values and gradients over > 10^6 random elements per backend and op from several regimes
(tiny arguments where exp(x) - 1 cancels, arguments past exp's range, offsets that cancel in
the variance, constant channels, ragged position counts), asserting the maximum error over
the whole tensor against eager float32 torch's; then the op-layer contract (fallbacks, errors,
determinism, compile) and a whole model step."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import vflow
from vflow import net_ops, ops
from vflow.profiling import training_loss

BACKENDS = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
SHAPE = (4, 64, 1027)  # 263k elements; 1027 positions: a ragged last chunk and vector
REGIMES = ("normal", "tiny", "wide", "offset")


def _draw(regime: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if regime == "tiny":  # expm1 near 0: exp(x) - 1 would lose every digit
        return x * 1e-5
    if regime == "wide":  # exp(-|x|) underflows in float32 past 87
        return x * 40
    if regime == "offset":  # the mean dwarfs the spread: a one-pass variance cancels
        return 300 + x
    return x


@pytest.fixture(params=["cpp", "triton"])
def backend(request, device):
    if request.param not in ops.available_backends(device):
        pytest.skip(f"backend {request.param} cannot run on {device}")
    return request.param


def _worst(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> float:
    """max |got - exact| / scale over the tensor (scale: the size of the terms summed; below
    float32's smallest normal number a difference is underflow, not error)."""
    err = (got.double() - exact).abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    return err.max().item()


def _errors(fused, eager, exact, scale) -> tuple[float, float]:
    return _worst(fused, exact, scale), _worst(eager, exact, scale)


def _assert_as_accurate(fused_err: float, eager_err: float, what: str) -> None:
    """The fused op is at most 2x eager float32 torch's error (or within 8 float32 ulps)."""
    eps = torch.finfo(torch.float32).eps
    assert fused_err <= max(2 * eager_err, 8 * eps), (what, fused_err, eager_err)


def _concat_elu_exact(x: torch.Tensor) -> torch.Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


@pytest.mark.parametrize("regime", REGIMES)
def test_concat_elu_values_and_gradient_against_float64(backend, device, regime):
    x64 = _draw(regime, SHAPE, 1)
    g64 = _draw("normal", (SHAPE[0], 2 * SHAPE[1], SHAPE[2]), 2)
    x, g = x64.float().to(device), g64.float().to(device)
    exact = _concat_elu_exact(x64.float().double())
    fused = net_ops.concat_elu(x, backend=backend).cpu()
    eager = net_ops.concat_elu(x, backend="reference").cpu()
    _assert_as_accurate(*_errors(fused, eager, exact, exact.abs()), f"{regime} forward")
    # dL/dx = g1 elu'(x) - g2 elu'(-x); scale: the two terms' sizes
    xs = x64.float().double().requires_grad_()
    _concat_elu_exact(xs).backward(g.double().cpu())
    x_f, x_r = (x.clone().requires_grad_() for _ in range(2))
    net_ops.concat_elu(x_f, backend=backend).backward(g)
    net_ops.concat_elu(x_r, backend="reference").backward(g)
    slope = (
        torch.where(xs > 0, 1.0, xs.detach().exp()),
        torch.where(xs < 0, 1.0, (-xs).detach().exp()),
    )
    g1, g2 = g.double().cpu().chunk(2, dim=1)
    scale = g1.abs() * slope[0] + g2.abs() * slope[1]
    errs = _errors(x_f.grad.cpu(), x_r.grad.cpu(), xs.grad, scale)
    _assert_as_accurate(*errs, f"{regime} gradient")


@pytest.mark.parametrize("regime", REGIMES)
def test_gated_residual_values_and_gradient_against_float64(backend, device, regime):
    x64 = _draw("normal", SHAPE, 3)
    h64 = _draw(regime, (SHAPE[0], 2 * SHAPE[1], SHAPE[2]), 4)
    gy64 = _draw("normal", SHAPE, 5)
    x, h, gy = (t.float().to(device) for t in (x64, h64, gy64))
    xs, hs = (t.float().double().requires_grad_() for t in (x64, h64))
    exact = xs + F.glu(hs, dim=1)
    exact.backward(gy.double().cpu())
    a, gate = hs.detach().chunk(2, dim=1)
    s = torch.sigmoid(gate)
    fused_in = [t.clone().requires_grad_() for t in (x, h)]
    eager_in = [t.clone().requires_grad_() for t in (x, h)]
    fused = net_ops.gated_residual(*fused_in, backend=backend)
    eager = net_ops.gated_residual(*eager_in, backend="reference")
    scale = xs.detach().abs() + (a * s).abs()
    _assert_as_accurate(*_errors(fused.cpu(), eager.cpu(), exact.detach(), scale), "forward")
    fused.backward(gy)
    eager.backward(gy)
    # each component of dL/dh is one product: relative error against the products in float64
    # (autograd's float64 glu backward computes s (1 - s), which cancels to 0 for s ~ 1)
    gy_, a_, g_ = gy.double().cpu(), a, gate
    exact_h = torch.cat([gy_ * s, gy_ * a_ * torch.sigmoid(g_) * torch.sigmoid(-g_)], dim=1)
    # (exp(-|g|) flushes to 0 past float32's normal range, |g| > 87.3: errors below 1e-30 of
    # the inputs' size count as underflow, the floor of the scale)
    flush = 1e-30 * (1 + gy_.abs()) * (1 + a_.abs())
    scale_h = torch.maximum(exact_h.abs(), torch.cat([flush, flush], dim=1))
    errs = _errors(fused_in[1].grad.cpu(), eager_in[1].grad.cpu(), exact_h, scale_h)
    _assert_as_accurate(*errs, f"{regime} gradient of h")
    # stricter than eager: s (1 - s) cancels for saturated gates (eager's relative error is 1
    # there in the wide regime); the kernels take sigmoid(g) sigmoid(-g) from exp(-|g|)
    assert errs[0] <= 16 * torch.finfo(torch.float32).eps, errs
    assert torch.equal(fused_in[0].grad, gy)  # dL/dx = dL/dy


def _layer_norm_exact(x, w, b, eps=1e-5):
    mean = x.mean(1, keepdim=True)
    var = (x - mean).square().mean(1, keepdim=True)
    per_channel = (-1,) + (1,) * (x.dim() - 2)
    return (x - mean) / torch.sqrt(var + eps) * w.view(per_channel) + b.view(per_channel)


@pytest.mark.parametrize("regime", REGIMES + ("constant",))
def test_channel_layer_norm_values_and_gradients_against_float64(backend, device, regime):
    shape = (SHAPE[0], SHAPE[1], 31, 33)  # 1023 positions
    x64 = _draw("normal" if regime == "constant" else regime, shape, 6)
    if regime == "constant":  # some pixels with equal channels: var = 0, rstd = 1/sqrt(eps)
        x64[:, :, :5] = 0.25
    w64, b64 = 1 + 0.3 * _draw("normal", shape[1], 7), 0.3 * _draw("normal", shape[1], 8)
    gy64 = _draw("normal", shape, 9)
    x, w, b, gy = (t.float().to(device) for t in (x64, w64, b64, gy64))
    xs, ws, bs = (t.float().double().requires_grad_() for t in (x64, w64, b64))
    exact = _layer_norm_exact(xs, ws, bs)
    exact.backward(gy.double().cpu())
    runs = {}
    for name in (backend, "reference"):
        inputs = [t.clone().requires_grad_() for t in (x, w, b)]
        y = net_ops.channel_layer_norm(*inputs, backend=name)
        y.backward(gy)
        runs[name] = [y.detach().cpu()] + [t.grad.cpu() for t in inputs]
    with torch.no_grad():
        mean = xs.mean(1, keepdim=True)
        rstd = 1 / torch.sqrt((xs - mean).square().mean(1, keepdim=True) + 1e-5)
        xhat = (xs - mean) * rstd
        gh = gy.double().cpu() * ws[:, None, None]
        s2 = (gh * xhat).mean(1, keepdim=True)
        # y: the terms of (x - mean) rstd w + b, the mean a sum of C values of |x|
        magnitude = xs.abs() + xs.abs().mean(1, keepdim=True)
        scales = [
            magnitude * rstd * ws.abs()[:, None, None] + bs.abs()[:, None, None],
            rstd * (gh.abs() + gh.abs().mean(1, keepdim=True) + xhat.abs() * s2.abs()),
            (gy.double().cpu() * xhat).abs().sum((0, 2, 3)),
            gy.double().cpu().abs().sum((0, 2, 3)),
        ]
    for i, what in enumerate(("y", "dx", "dweight", "dbias")):
        exact_i = (exact.detach(), xs.grad, ws.grad, bs.grad)[i]
        errs = _errors(runs[backend][i], runs["reference"][i], exact_i, scales[i])
        _assert_as_accurate(*errs, f"{regime} {what}")


def test_regression_concat_elu_of_tiny_arguments_keeps_its_digits(backend, device):
    """elu(x) = expm1(x) for x < 0: at x = -1e-7, exp(x) - 1 in float32 is -1.19e-7 (19%
    off); the fused kernels use a Taylor polynomial there."""
    x = torch.tensor([[-1e-7, -3e-5, 1e-7, -0.3, -0.35, -0.4]], device=device).view(1, 1, 6)
    y = net_ops.concat_elu(x, backend=backend).cpu().double()
    exact = _concat_elu_exact(x.cpu().double())
    rel = ((y - exact).abs() / exact.abs()).max().item()
    assert rel < 4 * torch.finfo(torch.float32).eps, rel


def test_special_values_propagate(backend, device):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0], device=device).view(1, 1, 4)
    y = net_ops.concat_elu(x, backend=backend).cpu()
    ref = _concat_elu_exact(x.cpu())
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(y[~y.isnan()], ref[~ref.isnan()])
    h = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan"), 100.0, -100.0, 0.0], device=device)
    y = net_ops.gated_residual(
        torch.zeros(1, 1, 4, device=device), h.view(1, 2, 4), backend=backend
    )
    assert y.isnan().tolist() == [[[True, False, False, False]]]
    # 3 sigmoid(-100) = 1.1e-43 is subnormal in float32: 0 or that value, either is right
    torch.testing.assert_close(y.cpu()[0, 0, 1:], torch.tensor([2.0, 0.0, 2.0]), atol=1e-40, rtol=0)


def test_float64_matches_torch_to_rounding(backend, device):
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64, device=device)
    w, b = torch.randn(5, dtype=torch.float64, device=device), torch.randn(5, dtype=torch.float64)
    b = b.to(device)
    y = net_ops.channel_layer_norm(x, w, b, backend=backend)
    assert (y - _layer_norm_exact(x, w, b)).abs().max().item() < 1e-13
    y = net_ops.concat_elu(x, backend=backend)
    assert (y - _concat_elu_exact(x)).abs().max().item() < 1e-15


def test_layer_norm_gradients_do_not_depend_on_the_thread_count():
    if "cpp" not in BACKENDS:
        pytest.skip("needs vflow._C")
    x = torch.randn(8, 48, 40, 40)
    w, b = torch.randn(48, requires_grad=True), torch.randn(48, requires_grad=True)
    grads = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            w.grad = b.grad = None
            xr = x.clone().requires_grad_()
            net_ops.channel_layer_norm(xr, w, b, backend="cpp").sum().backward()
            grads.append((xr.grad, w.grad.clone(), b.grad.clone()))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, c) for a, c in zip(*grads, strict=True))


def test_other_layouts_and_dtypes_run_the_reference_ops():
    x = torch.randn(2, 6, 5, 4).to(memory_format=torch.channels_last)
    w, b = torch.randn(6), torch.randn(6)
    for backend in BACKENDS:
        y = net_ops.channel_layer_norm(x, w, b, backend=backend)
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, _layer_norm_exact(x, w, b))
        xb = x.contiguous().bfloat16()
        assert net_ops.concat_elu(xb, backend=backend).dtype == torch.bfloat16
        h = torch.randn(2, 12, 5, 4, dtype=torch.bfloat16)
        torch.testing.assert_close(
            net_ops.gated_residual(x.contiguous(), h, backend=backend),
            x.contiguous() + F.glu(h, 1),
        )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: net_ops.concat_elu(torch.randn(3)), r"x must have shape \(B, C, ...\)"),
        (lambda: net_ops.concat_elu(torch.ones(2, 2, dtype=torch.long)), "floating-point"),
        (
            lambda: net_ops.gated_residual(torch.randn(2, 3, 4), torch.randn(2, 5, 4)),
            "h must have twice the channels",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 3, 4, 4), torch.ones(4), torch.ones(3)
            ),
            r"weight must have shape \(3,\)",
        ),
        (
            lambda: net_ops.channel_layer_norm(torch.randn(2, 3, 4), torch.ones(3), torch.ones(3)),
            r"x must have shape \(B, C, H, W\)",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 3, 4, 4), torch.ones(3), torch.ones(3), eps=0.0
            ),
            "eps must be a positive number",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 3, 4, 4), torch.ones(3), torch.ones(3), eps="1e-5"
            ),
            "eps must be a positive number, got '1e-5'",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 3, 4, 4), torch.ones(3, dtype=torch.float64), torch.ones(3)
            ),
            "weight and bias must have x's dtype torch.float32 .outside autocast.",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 3, 4, 4), torch.ones(3, device="meta"), torch.ones(3)
            ),
            "weight is on meta but x is on cpu",
        ),
        (
            lambda: net_ops.channel_layer_norm(
                torch.randn(2, 0, 4, 4), torch.ones(0), torch.ones(0)
            ),
            "with C >= 1",
        ),
        (
            lambda: net_ops.gated_residual(
                torch.randn(2, 3, 4), torch.randn(2, 6, 4, device="meta")
            ),
            "h is on meta but x is on cpu",
        ),
        (lambda: net_ops.concat_elu(torch.randn(2, 3), backend="gpu"), "backend must be one of"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


# --- derivatives beyond the first: double backward and torch.func ---------------------------

OPS = ("concat_elu", "gated_residual", "channel_layer_norm")


def _op_inputs(op: str, device, seed: int = 0) -> list[torch.Tensor]:
    """float64 inputs of ``op`` (x and its other tensors), from a seed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    others = {
        "concat_elu": [],
        "gated_residual": [torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)],
        "channel_layer_norm": [torch.randn(3, generator=g, dtype=torch.float64) for _ in "wb"],
    }[op]
    return [t.to(device) for t in (x, *others)]


def _apply(op: str, backend: str, *inputs):
    return getattr(net_ops, op)(*inputs, backend=backend)


def _plain(op: str, *inputs):
    """The op's definition in plain torch ops (the independent value)."""
    if op == "concat_elu":
        return _concat_elu_exact(*inputs)
    if op == "gated_residual":
        return inputs[0] + F.glu(inputs[1], dim=1)
    return _layer_norm_exact(*inputs)


def _hessian_vector_products(fn, inputs, seed=1):
    """d/d(inputs) of <d sum(fn * u) / d(inputs), v>: a double backward through fn."""
    g = torch.Generator().manual_seed(seed)
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    u = torch.randn(out.shape, generator=g, dtype=out.dtype).to(out.device)
    grads = torch.autograd.grad((out * u).sum(), inputs, create_graph=True)
    vs = [torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device) for t in grads]
    inner = sum((gr * v).sum() for gr, v in zip(grads, vs, strict=True))
    return torch.autograd.grad(inner, inputs, allow_unused=True, materialize_grads=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_double_backward_equals_the_plain_ops(op, backend, device):
    """Differentiating a gradient of a fused op (create_graph=True) gives the plain torch
    ops' second derivatives, on every backend; it was a silent first-order-only result (the
    second-order terms dropped) before."""
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    inputs = _op_inputs(op, device)
    got = _hessian_vector_products(lambda *t: _apply(op, backend, *t), inputs)
    exact = _hessian_vector_products(lambda *t: _plain(op, *t), inputs)
    assert any(e.abs().max() > 0.1 for e in exact)  # the second-order terms are not all 0
    for a, e in zip(got, exact, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_torch_func_transforms_equal_the_plain_ops(op, backend, device):
    """torch.func.grad, jvp and a Hessian of a fused op equal the plain ops'. torch's custom
    ops support no transform (grad raised a setup_context error, jvp gave a zero tangent), so
    under a transform the ops run their plain torch ops."""
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    inputs = tuple(_op_inputs(op, device))
    tangents = tuple(_op_inputs(op, device, seed=2))

    def loss(fn):
        return lambda *t: fn(*t).sin().sum()

    fused = loss(lambda *t: _apply(op, backend, *t))
    plain = loss(lambda *t: _plain(op, *t))
    argnums = tuple(range(len(inputs)))
    for a, e in zip(
        torch.func.grad(fused, argnums)(*inputs),
        torch.func.grad(plain, argnums)(*inputs),
        strict=True,
    ):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    _, jvp = torch.func.jvp(lambda *t: _apply(op, backend, *t), inputs, tangents)
    _, jvp_exact = torch.func.jvp(lambda *t: _plain(op, *t), inputs, tangents)
    assert jvp_exact.abs().max() > 0.1
    torch.testing.assert_close(jvp, jvp_exact, rtol=1e-12, atol=1e-12)
    x, *rest = inputs
    hessian = torch.func.hessian(lambda x: fused(x, *rest))(x)
    torch.testing.assert_close(hessian, torch.func.hessian(lambda x: plain(x, *rest))(x))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_torch_func_grad_of_the_coupling_ops_equals_the_reference(backend, device):
    """The same for vflow.ops' fused couplings (forward and inverse): under torch.func.grad
    they run the reference backend instead of raising torch's setup_context error."""
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64).to(device)
    params = torch.randn(2, 14, 3, 4, 4, generator=g, dtype=torch.float64).to(device)
    for fn in (ops.mixlogistic_coupling, ops.mixlogistic_coupling_inverse):

        def loss(x, params, backend, fn=fn):
            out, logdet = fn(x, params, backend=backend)
            return out.sin().sum() + logdet.sum()

        got = torch.func.grad(loss, (0, 1))(x, params, backend)
        x_ = x.clone().requires_grad_()
        p_ = params.clone().requires_grad_()
        exact = torch.autograd.grad(loss(x_, p_, "reference"), (x_, p_))
        for a, e in zip(got, exact, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)


def test_layer_norm_fake_kernel_handles_an_empty_batch():
    """The fake kernel's stats shape came from x[0, 0]: a batch of 0 crashed under
    FakeTensorMode (torch.compile, opcheck) with an IndexError."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, w = torch.empty(0, 3, 4, 5), torch.empty(3)
        y, mean, rstd = net_ops._layer_norm_fwd(x, w, w, 1e-5, "cpp")
    assert y.shape == (0, 3, 4, 5) and mean.shape == rstd.shape == (0, 20)


def test_triton_layer_norm_of_more_channels_than_a_tile_runs_the_reference(device):
    """C > LAYER_NORM_MAX_CHANNELS (1024) raised the kernel's ValueError; now the reference."""
    if "triton" not in ops.available_backends(device):
        pytest.skip(f"triton cannot run on {device}")
    from vflow.kernels import LAYER_NORM_MAX_CHANNELS

    g = torch.Generator().manual_seed(0)
    c = LAYER_NORM_MAX_CHANNELS + 1
    x = torch.randn(1, c, 1, 3, generator=g, dtype=torch.float64).to(device)
    w = torch.randn(c, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(c, generator=g, dtype=torch.float64).to(device)
    y = net_ops.channel_layer_norm(x, w, b, backend="triton")
    assert (y - _layer_norm_exact(x, w, b)).abs().max().item() < 1e-13


def test_regression_float64_layer_norm_keeps_eps_in_float64(backend, device):
    """With var below eps, rstd = 1 / sqrt(var + eps) carries eps's rounding: the Triton
    kernel got eps as an fp32 scalar (1e-5 off by 2.5e-9 relative) and missed float64 by
    ~1e-9; the result must match float64 torch to rounding."""
    g = torch.Generator().manual_seed(0)
    x = (1e-4 * torch.randn(2, 5, 7, 9, generator=g, dtype=torch.float64)).to(device)
    w = torch.ones(5, dtype=torch.float64, device=device)
    b = torch.zeros(5, dtype=torch.float64, device=device)
    y = net_ops.channel_layer_norm(x, w, b, backend=backend)
    exact = _layer_norm_exact(x, w, b)
    assert ((y - exact).abs() / exact.abs().max()).max().item() < 1e-14


class _LaunchRecorder:
    """A Triton kernel stand-in that records the arguments of each launch and runs it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append(args)
            return self.kernel[grid](*args, **kwargs)

        return launch


def test_no_python_float_reaches_a_network_kernel(monkeypatch):
    """On the GPU Triton types a Python float argument as an fp32 scalar, whatever the
    kernel's dtype: the float64 layer norm got eps rounded to fp32 (1e-5 off by 2.5e-9
    relative). The interpreter keeps Python floats in double, so the regression test above
    passes here either way; this checks the cause: every network kernel launch (float64)
    passes floats as tensors of the data's dtype."""
    if "triton" not in BACKENDS:
        pytest.skip("needs triton")
    from vflow.kernels import _net

    launches: list = []
    for name in dir(_net):
        if name.endswith("_kernel"):
            monkeypatch.setattr(_net, name, _LaunchRecorder(getattr(_net, name), launches))
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 6, 4, 5, dtype=torch.float64, requires_grad=True)
    y = net_ops.channel_layer_norm(x, w, w, backend="triton")
    y = net_ops.gated_residual(y, h, backend="triton")
    net_ops.concat_elu(y, backend="triton").sum().backward()
    assert len(launches) == 6
    for args in launches:
        assert not any(isinstance(a, float) for a in args), args


def test_mixed_dtypes_under_autocast_run_the_reference(backend):
    """bf16 networks (``--precision bf16-nets``): x bfloat16 from an autocast conv, the
    parameters float32; F.layer_norm's autocast rule computes in float32."""
    x = torch.randn(2, 6, 5, 4).bfloat16()
    w, b = torch.randn(6), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net_ops.channel_layer_norm(x, w, b, backend=backend)
    torch.testing.assert_close(y.float(), _layer_norm_exact(x.float(), w, b), atol=2e-2, rtol=0)


def test_compiled_block_traces_plain_ops_and_equals_eager():
    """Under torch.compile the ops trace as their plain torch definitions, which inductor
    fuses with the code around them (opaque custom ops made the compiled regional step
    slower and its compile longer: docs/training.md); loss gradients equal the eager fused
    ops' in float64, and the graph holds no vflow op."""
    if "cpp" not in BACKENDS:
        pytest.skip("needs vflow._C")

    def block(x, w, b, h):
        y = net_ops.concat_elu(x, backend="cpp")
        y = net_ops.gated_residual(x, y * h, backend="cpp")
        return net_ops.channel_layer_norm(y, w, b, backend="cpp")

    traced = []

    def backend(gm, example_inputs):
        traced.extend(str(node.target) for node in gm.graph.nodes)
        return gm

    g = torch.Generator().manual_seed(0)
    shapes = [(2, 3, 4, 5), (3,), (3,), (2, 6, 4, 5)]
    inputs = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    compiled_in = [t.clone().requires_grad_() for t in inputs]
    block(*eager_in).square().sum().backward()
    torch.compile(block, backend=backend, fullgraph=True)(*compiled_in).square().sum().backward()
    assert traced and not any("vflow" in t for t in traced), traced
    for a, c in zip(eager_in, compiled_in, strict=True):
        torch.testing.assert_close(a.grad, c.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs vflow._C")
@pytest.mark.parametrize("name", ["vflow-digits", "flowpp-digits"])
def test_float64_model_step_on_the_fused_ops_equals_the_reference_step(name, one_thread):
    """The loss and every gradient of one float64 training step (dropout drawn the same way)
    agree between the cpp backend (fused network ops) and the reference backend."""
    results = []
    for backend in ("reference", "cpp"):
        torch.manual_seed(0)
        model = vflow.build(name, backend=backend).double()
        x = torch.randint(0, model.config.n_bins, (4, *model.config.data_shape))
        model.initialize(x)
        torch.manual_seed(1)
        loss = training_loss(model.train(), x)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    (loss_r, grads_r), (loss_c, grads_c) = results
    assert abs(loss_c - loss_r) <= 1e-12 * abs(loss_r)
    for gr, gc in zip(grads_r, grads_c, strict=True):
        assert (gc - gr).norm() <= 1e-11 * gr.norm() + 1e-300


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs vflow._C")
def test_paired_step_benchmark_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "net_ops_step.py"
    cmd = [sys.executable, str(script), "--batch", "2", "--rounds", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "reference / fused CPU time per step" in proc.stdout


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_regression_double_backward_of_gated_residual_when_only_x_needs_grad(backend, device):
    """Found by review: with h not requiring grad, the create_graph backward asked autograd
    for the gradient of no inputs and raised. d2/dx2 of sum(y^2) is 2 everywhere."""
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, device=device, requires_grad=True)
    h = torch.randn(2, 6, 4, 5, dtype=torch.float64, device=device)
    y = net_ops.gated_residual(x, h, backend=backend)
    (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.sum(), x)
    torch.testing.assert_close(gg, torch.full_like(x, 2.0))


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_regression_second_derivatives_of_the_inverse_raise_not_mislead(backend, device):
    """Found by review: the inverse's implicit-function gradient is built from detached
    tensors, so its derivative was silently wrong (reference, eager) or zero (jacrev of
    jacrev). Now both raise, and one torch.func.grad still equals the eager gradient."""
    if backend not in ops.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device}")
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 3, generator=g, dtype=torch.float64).to(device)
    params = (0.5 * torch.randn(1, 8, 3, generator=g, dtype=torch.float64)).to(device)
    y = ops.mixlogistic_coupling(x0, params, backend="reference")[0]

    def f(y):
        return ops.mixlogistic_coupling_inverse(y, params, backend=backend)[0].pow(3).sum()

    y_ = y.clone().requires_grad_()
    with pytest.raises(RuntimeError):
        (grad,) = torch.autograd.grad(f(y_), y_, create_graph=True)
        torch.autograd.grad(grad.sum(), y_)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.func.jacrev(torch.func.jacrev(f))(y)
    (eager,) = torch.autograd.grad(f(y_), y_)
    torch.testing.assert_close(torch.func.grad(f)(y), eager, rtol=1e-12, atol=1e-12)

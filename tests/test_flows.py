"""Invertibility and exact log-determinants of every layer of vflow.flows (float64, CPU)."""

import pytest
import torch

from vflow import flows, nets

B, C, H, W = 2, 2, 4, 4


def _perturb(module: torch.nn.Module, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter away from its (near-identity) initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def _jacobian_logdet(fn, x: torch.Tensor) -> torch.Tensor:
    """log|det d fn(x)_b / d x_b| per sample b from the full autograd Jacobian; also checks
    that samples do not interact."""
    jac = torch.autograd.functional.jacobian(lambda t: fn(t).reshape(x.shape[0], -1), x)
    jac = jac.reshape(x.shape[0], -1, x.shape[0], x[0].numel())
    out = []
    for b in range(x.shape[0]):
        for other in range(x.shape[0]):
            if other != b:
                assert torch.count_nonzero(jac[b, :, other]) == 0, "samples interact"
        out.append(torch.linalg.slogdet(jac[b, :, b])[1])
    return torch.stack(out)


def _check_layer(layer, x, context=None, atol=1e-8, inverse_atol=1e-8):
    layer = layer.double()
    y, logdet = layer(x, context)
    assert logdet.shape == (x.shape[0],) and logdet.dtype == x.dtype
    x_back, logdet_inv = layer.inverse(y, context)
    torch.testing.assert_close(x_back, x, atol=inverse_atol, rtol=0)
    torch.testing.assert_close(logdet + logdet_inv, torch.zeros_like(logdet), atol=atol, rtol=0)
    expected = _jacobian_logdet(lambda t: layer(t, context)[0], x)
    torch.testing.assert_close(logdet, expected, atol=1e-7, rtol=1e-7)
    expected_inv = _jacobian_logdet(lambda t: layer.inverse(t, context)[0], y)
    torch.testing.assert_close(logdet_inv, expected_inv, atol=1e-6, rtol=1e-6)
    return y


def _x(c=C, h=H, w=W):
    return torch.randn(B, c, h, w, dtype=torch.float64)


def test_sigmoid():
    _check_layer(flows.Sigmoid(), _x())


def test_image_to_logit():
    v = torch.rand(B, C, H, W, dtype=torch.float64) * 17
    y = _check_layer(flows.ImageToLogit(17), v)
    assert y.abs().max() <= torch.logit(torch.tensor(0.95, dtype=torch.float64)) + 1e-12


def test_space_to_depth_tf_order():
    x = _x()
    y = _check_layer(flows.SpaceToDepth(), x)
    assert y.shape == (B, 4 * C, H // 2, W // 2)
    # out[:, (2 dy + dx) C + c, i, j] = x[:, c, 2i + dy, 2j + dx]
    assert torch.equal(y[:, (2 * 1 + 0) * C + 1, 1, 0], x[:, 1, 3, 0])
    assert torch.equal(y[:, (2 * 0 + 1) * C + 0, 0, 1], x[:, 0, 0, 3])


def test_actnorm_roundtrip_and_data_dependent_init():
    # a full batch (>= SMALL_INIT_BATCH samples): exact per-element statistics
    x = torch.randn(flows.SMALL_INIT_BATCH, C, H, W, dtype=torch.float64) * 3 + 1
    layer = flows.ActNorm((C, H, W)).double()
    y, _ = layer(x)
    assert bool(layer.initialized)
    torch.testing.assert_close(y.mean(0), torch.zeros_like(y[0]), atol=1e-10, rtol=0)
    torch.testing.assert_close(y.var(0, unbiased=False), torch.ones_like(y[0]), atol=1e-6, rtol=0)
    _check_layer(layer, x[:2])


def test_actnorm_initialized_survives_state_dict():
    layer = flows.ActNorm((C, H, W)).double()
    x = _x() * 5
    layer(x)
    clone = flows.ActNorm((C, H, W)).double()
    clone.load_state_dict(layer.state_dict())
    other = _x()
    torch.testing.assert_close(clone(other)[0], layer(other)[0])  # no re-init on new data
    fresh = flows.ActNorm((C, H, W)).double()
    assert not torch.allclose(fresh(other)[0], layer(other)[0])


@pytest.mark.parametrize("split", [None, "checker", "channel"])
@pytest.mark.parametrize("pattern", ["stripe", "checkerboard"])
def test_pointwise(split, pattern):
    layer = _perturb(flows.Pointwise(4, split=split, pattern=pattern))
    _check_layer(layer, _x(c=4))


def test_pointwise_checker_uses_one_matrix_per_half():
    layer = flows.Pointwise(2, split="checker", pattern="stripe").double()
    with torch.no_grad():
        layer.weight.copy_(torch.stack([torch.eye(2), 2 * torch.eye(2)]))
    y, logdet = layer(_x(c=2).abs() + 1)
    x = layer.inverse(y)[0]
    torch.testing.assert_close(y[..., 0::2], x[..., 0::2])  # mask 0: W0 = I
    torch.testing.assert_close(y[..., 1::2], 2 * x[..., 1::2])  # mask 1: W1 = 2 I
    torch.testing.assert_close(
        logdet,
        torch.full((B,), H * W / 2 * 2 * torch.log(torch.tensor(2.0)).item(), dtype=torch.float64),
    )


COUPLINGS = [
    dict(split="checker", parity=0, pattern="stripe"),
    dict(split="checker", parity=1, pattern="stripe"),
    dict(split="checker", parity=0, pattern="checkerboard"),
    dict(split="checker", parity=1, pattern="checkerboard"),
    dict(split="channel", parity=0),
    dict(split="channel", parity=1),
]


@pytest.mark.parametrize("kw", COUPLINGS, ids=lambda kw: "-".join(map(str, kw.values())))
@pytest.mark.parametrize("attention, smooth", [(True, True), (False, False)])
def test_mixlogistic_coupling(kw, attention, smooth):
    layer = flows.MixLogisticCoupling(
        (C, H, W),
        filters=8,
        blocks=1,
        components=3,
        attention=attention,
        smooth=smooth,
        backend="reference",
        **kw,
    )
    _perturb(layer, 0.2)
    x = _x()
    y = _check_layer(layer, x, inverse_atol=1e-7)
    # the passive half passes through unchanged, the active one does not
    if kw["split"] == "channel":
        passive = slice(0, 1) if kw["parity"] else slice(1, 2)
        torch.testing.assert_close(y[:, passive], x[:, passive], atol=0, rtol=0)
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("split", ["checker", "channel"])
def test_mixlogistic_coupling_with_context(split):
    layer = flows.MixLogisticCoupling(
        (C, H, W),
        split=split,
        parity=1,
        filters=8,
        blocks=2,
        components=2,
        attention=True,
        context_channels=3,
        backend="reference",
    )
    _perturb(layer, 0.2)
    context = torch.randn(B, 3, H, W // 2, dtype=torch.float64)
    x = _x()
    _check_layer(layer, x, context=context, inverse_atol=1e-7)
    y1 = layer.double()(x, context)[0]
    y2 = layer(x, context + 1)[0]
    assert not torch.allclose(y1, y2), "context is ignored"


def test_augmented_affine_coupling():
    layer = _perturb(flows.AugmentedAffineCoupling(2, 1, (H, W), filters=8, blocks=1))
    x = _x(c=3)
    y = _check_layer(layer, x)
    torch.testing.assert_close(y[:, 2:], x[:, 2:], atol=0, rtol=0)  # y1 = z


@pytest.mark.parametrize("split", ["checker", "channel"])
@pytest.mark.parametrize("attention", [True, False])
def test_coupling_blocks(split, attention):
    builder = {
        ("checker", True): flows.f_checker,
        ("checker", False): flows.g_checker,
        ("channel", True): flows.f_channel,
        ("channel", False): flows.g_channel,
    }
    block = builder[split, attention]((C, H, W), 1, 1, 8, 2, backend="reference")
    x = _x()
    block.double()(x)  # data-dependent init
    _perturb(block, 0.1)
    _check_layer(block, x, inverse_atol=1e-7)


@pytest.mark.parametrize("pattern", ["stripe", "checkerboard"])
def test_checkerboard_split_layout(pattern):
    x = _x()
    (a, b), logdet = flows.CheckerboardSplit(pattern)(x)
    assert a.shape == b.shape == (B, C, H, W // 2) and torch.equal(
        logdet, torch.zeros(B, dtype=x.dtype)
    )
    if pattern == "stripe":  # official CheckerboardSplit: even columns, then odd columns
        assert torch.equal(a, x[..., 0::2]) and torch.equal(b, x[..., 1::2])
    else:
        assert torch.equal(a[:, :, 0], x[:, :, 0, 0::2]) and torch.equal(
            a[:, :, 1], x[:, :, 1, 1::2]
        )
    back, _ = flows.Inverse(flows.CheckerboardSplit(pattern))((a, b))
    assert torch.equal(back, x)


def test_literal_appendix_b_composition():
    """Split -> Parallel(ActNorm) -> Parallel(Pointwise) -> TupleFlip -> Inverse(Split)."""
    half = (C, H, W // 2)
    layer = flows.Compose(
        [
            flows.CheckerboardSplit("stripe"),
            flows.Parallel(flows.ActNorm(half), flows.ActNorm(half)),
            flows.Parallel(flows.Pointwise(C), flows.Pointwise(C)),
            flows.TupleFlip(),
            flows.Inverse(flows.CheckerboardSplit("stripe")),
        ]
    )
    x = _x()
    layer.double()(x)
    _perturb(layer, 0.2)
    y = _check_layer(layer, x)
    # TupleFlip moved the transformed even columns to the odd ones
    even_only = flows.Compose(list(layer.layers)[:3])
    (a, _), _ = even_only(x)
    torch.testing.assert_close(y[..., 1::2], a)


def test_channel_split_and_parallel():
    layer = flows.Compose(
        [
            flows.ChannelSplit(1),
            flows.Parallel(flows.Sigmoid(), flows.Inverse(flows.Sigmoid())),
            flows.Inverse(flows.ChannelSplit(1)),
        ]
    )
    x = torch.rand(B, 3, H, W, dtype=torch.float64) * 0.8 + 0.1
    y = _check_layer(layer, x)
    torch.testing.assert_close(y[:, :1], torch.sigmoid(x[:, :1]))


def test_logdet_follows_input_dtype():
    layer = flows.Compose([flows.ActNorm((C, H, W)), flows.Pointwise(C, split="checker")])
    for dtype in (torch.float32, torch.float64):
        layer = layer.to(dtype)
        assert layer(_x().to(dtype))[1].dtype == dtype


def test_context_net_shapes():
    net = nets.ContextNet(3, filters=8, blocks=2)
    out = net(torch.randn(2, 3, 4, 6))
    assert out.shape == (2, 8, 4, 3)
    assert net.full_resolution(out).shape == (2, 8, 4, 6)


def test_coupling_net_starts_small():
    net = nets.CouplingNet(2, 2 * 8, filters=8, blocks=2, spatial=(4, 2), attention=True)
    out = net(torch.randn(3, 2, 4, 2))
    assert out.abs().mean() < 0.5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gated_attention_matches_its_formula(memory_format):
    """out = x + a * sigmoid(g), (a, g) = proj2(concat_heads(softmax(q k^T / sqrt(d)) v)),
    (q, k, v) = heads of proj1(x + pos_emb): written out with einsum in float64."""
    b, f, h, w, heads = 3, 8, 3, 5, 4
    att = _perturb(nets.GatedAttention(f, heads)).double()
    x = torch.randn(b, f, h, w, dtype=torch.float64).to(memory_format=memory_format)
    pos = torch.randn(f, h, w, dtype=torch.float64)
    qkv = att.proj1(x + pos).reshape(b, 3, heads, f // heads, h * w)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (B, heads, d, T)
    weights = torch.softmax(torch.einsum("bndt,bnds->bnts", q, k) / (f // heads) ** 0.5, -1)
    heads_out = torch.einsum("bnts,bnds->bndt", weights, v).reshape(b, f, h, w)
    a, g = att.proj2(heads_out).chunk(2, dim=1)
    torch.testing.assert_close(att(x, pos), x + a * torch.sigmoid(g), atol=1e-12, rtol=1e-12)

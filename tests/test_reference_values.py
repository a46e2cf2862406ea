"""Direct value tests of the eager reference (issue 17): the coupling written out by hand in
float64, in probability space (no logsumexp), on inputs chosen so that the log-scale clamp
at -7 and the 0.05 smoothing constant of VFlow's bounded coupling both change the result.

Before these tests a wrong clamp or smoothing constant in ``vflow.reference`` was caught only
because the C++ kernel then disagreed with the reference, not by a check of the value."""

import math

import pytest
import torch

from vflow import ops, reference

HAS_CPP = "cpp" in ops.available_backends("cpu")


def _hand_coupling(x, params, eps, log_scale_min=-7.0):
    """y and log|dy/dx| per element, straight from the formula of the README, float64:
    s = max(log_scale, -7), t = (x - mean) e^-s, F = sum_k w_k sigmoid(t_k),
    f = sum_k w_k sigmoid(t_k) sigmoid(-t_k) e^-s_k, G = eps + (1 - 2 eps) F,
    y = e^tanh(a) logit(G) + b, log|dy/dx| = tanh a + log(1 - 2 eps) + log f - log G(1 - G)."""
    k = (params.shape[1] - 2) // 3
    a_raw, b = params[:, 0], params[:, 1]
    logits, means, log_scales = (
        params[:, 2 : 2 + k],
        params[:, 2 + k : 2 + 2 * k],
        params[:, 2 + 2 * k :],
    )
    s = torch.maximum(log_scales, torch.full_like(log_scales, log_scale_min))
    t = (x[:, None] - means) * torch.exp(-s)
    w = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    sig = 1 / (1 + torch.exp(-t))
    F = (w * sig).sum(1)
    f = (w * sig * (1 - sig) * torch.exp(-s)).sum(1)
    G = eps + (1 - 2 * eps) * F
    y = torch.exp(torch.tanh(a_raw)) * torch.log(G / (1 - G)) + b
    logdet = torch.tanh(a_raw) + math.log(1 - 2 * eps) + torch.log(f) - torch.log(G * (1 - G))
    return y, logdet


def _max_diff(a, b):
    """Largest |a - b|; a NaN (a saturated alternative formula) counts as infinitely far."""
    return (a - b).abs().nan_to_num(nan=math.inf).max().item()


def _inputs(n=400, k=3, seed=0, batch=1):
    """x near the components, many log-scales below -7 (so the clamp binds) and some above."""
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    B = batch
    a_raw = torch.randn(B, n, generator=g, dtype=d)
    b = torch.randn(B, n, generator=g, dtype=d)
    logits = torch.randn(B, k, n, generator=g, dtype=d)
    means = 0.01 * torch.randn(B, k, n, generator=g, dtype=d)
    # half the log-scales in [-11, -7.5] (clamped), half in [-6, -4]
    low = -11 + 3.5 * torch.rand(B, k, n // 2, generator=g, dtype=d)
    high = -6 + 2 * torch.rand(B, k, n - n // 2, generator=g, dtype=d)
    log_scales = torch.cat([low, high], 2)
    params = torch.cat([a_raw[:, None], b[:, None], logits, means, log_scales], 1)
    # x within a few clamped scales of component 0, so sigmoid(t) is not saturated
    x = means[:, 0] + math.exp(-7) * 4 * (2 * torch.rand(B, n, generator=g, dtype=d) - 1)
    return x, params


@pytest.mark.parametrize("smooth", [True, False])
def test_reference_elementwise_matches_hand_formula(smooth):
    x, params = _inputs()
    eps = 0.05 if smooth else 0.0
    y, logdet = reference.mixlogistic_elementwise(x, params, smooth)
    y_hand, ld_hand = _hand_coupling(x, params, eps)
    torch.testing.assert_close(y, y_hand, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(logdet, ld_hand, atol=1e-10, rtol=1e-10)
    # the inputs exercise both constants: another clamp or smoothing gives other values
    for other in (
        _hand_coupling(x, params, eps, log_scale_min=-7.5),
        _hand_coupling(x, params, eps, log_scale_min=-6.5),
        _hand_coupling(x, params, eps, log_scale_min=-100.0),
    ):
        assert _max_diff(other[0], y_hand) > 1e-2 and _max_diff(other[1], ld_hand) > 1e-2
    if smooth:
        for other_eps in (0.04, 0.06, 0.0):
            y_o, ld_o = _hand_coupling(x, params, other_eps)
            assert _max_diff(y_o, y_hand) > 1e-2 and _max_diff(ld_o, ld_hand) > 1e-2


@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("smooth", [True, False])
def test_coupling_op_matches_hand_formula(backend, smooth):
    """The public op (per-sample logdet = sum of the per-element terms) on a (B, C, H, W)
    layout, against the same hand formula."""
    if backend == "cpp" and not HAS_CPP:
        pytest.skip("C++ extension not built")
    x, params = _inputs(n=3 * 4 * 4, batch=2)
    xb, pb = x.view(2, 3, 4, 4), params.view(2, -1, 3, 4, 4)
    y, logdet = ops.mixlogistic_coupling(xb, pb, smooth=smooth, backend=backend)
    y_hand, ld_hand = _hand_coupling(x, params, 0.05 if smooth else 0.0)
    torch.testing.assert_close(y.flatten(1), y_hand, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logdet, ld_hand.sum(1), atol=1e-8, rtol=1e-10)


def test_inverse_reference_undoes_the_hand_formula_with_clamped_scales():
    """The inverse of the reference recovers x from the hand-computed y, clamped scales
    included, with logdet = -(hand forward logdet)."""
    x, params = _inputs(n=64, batch=2)
    for smooth in (True, False):
        y_hand, ld_hand = _hand_coupling(x, params, 0.05 if smooth else 0.0)
        back, ld_inv = ops.mixlogistic_coupling_inverse(
            y_hand, params, smooth=smooth, backend="reference"
        )
        torch.testing.assert_close(back, x, atol=1e-9, rtol=0)
        torch.testing.assert_close(ld_inv, -ld_hand.sum(1), atol=1e-6, rtol=1e-8)

"""vflow.transforms: the fused MoL coupling as torch.distributions Transforms, a vector-data
coupling layer, and its use from zuko and pyro.

Oracles: the float64 eager formula (``vflow.reference.mixlogistic_elementwise``), the
change-of-variables formula on ``vflow.ops`` outputs in their own (B, 2+3K, S) layout,
autograd Jacobians in float64, and finite differences (gradcheck).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, TransformedDistribution

from vflow import ops, reference
from vflow.transforms import (
    MixLogisticCDFTransform,
    MixLogisticCoupling1d,
    MixLogisticCouplingTransform,
    zuko_flow,
)

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = [b for b in ("cpp", "reference") if b in ops.available_backends("cpu")]


def random_params(*batch, k=4, event=(), dtype=torch.float64, log_scale_std=0.5):
    """(*batch, 2+3K, *event) standard normal parameters (a_raw, b, logits, means), the
    log-scales with standard deviation ``log_scale_std``."""
    p = torch.randn(*batch, 2 + 3 * k, *event, dtype=dtype)
    p.narrow(len(batch), 2 + 2 * k, k).mul_(log_scale_std)
    return p


def elementwise_oracle(x, params_last, smooth):
    """y and log|dy/dx| per element by the eager float64 formula, params (..., 2+3K)."""
    p = params_last.reshape(-1, params_last.shape[-1]).to(torch.float64).T.unsqueeze(0)
    y, ladj = reference.mixlogistic_elementwise(x.reshape(1, -1).to(torch.float64), p, smooth)
    return y.reshape(x.shape), ladj.reshape(x.shape)


# --- the elementwise Transform -------------------------------------------------------------


@pytest.mark.parametrize("smooth", [False, True])
def test_transformed_distribution_log_prob_is_change_of_variables(smooth):
    """log_prob of TransformedDistribution(Normal, [t]) == log N(x) - log|dy/dx| with x and
    the log-determinant from vflow.ops called in its own (B, 2+3K, D) layout, and per element
    from the float64 eager formula."""
    b, d, k = 6, 5, 3
    params_ops = random_params(b, k=k, event=(d,))  # (B, 2+3K, D), the ops layout
    x = torch.randn(b, d, dtype=torch.float64) * 1.5
    y, _ = ops.mixlogistic_coupling(x, params_ops, smooth=smooth)
    t = MixLogisticCDFTransform(params_ops.movedim(1, -1), smooth)  # elementwise, (B, D, 2+3K)
    base = Normal(torch.zeros(b, d, dtype=torch.float64), 1.0)
    log_prob = TransformedDistribution(base, [t]).log_prob(y)
    assert log_prob.shape == (b, d)

    x_ops, logdet_inv = ops.mixlogistic_coupling_inverse(y, params_ops, smooth=smooth)
    expected_rows = base.log_prob(x_ops).sum(-1) + logdet_inv
    torch.testing.assert_close(log_prob.sum(-1), expected_rows, rtol=1e-9, atol=1e-9)

    _, ladj = elementwise_oracle(x, params_ops.movedim(1, -1), smooth)
    torch.testing.assert_close(log_prob, base.log_prob(x) - ladj, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("smooth", [False, True])
def test_call_and_ladj_matches_float64_formula(smooth):
    p = random_params(4, 7, k=5)
    x = torch.randn(4, 7, dtype=torch.float64) * 2
    t = MixLogisticCDFTransform(p, smooth)
    y, ladj = t.call_and_ladj(x)
    y_ref, ladj_ref = elementwise_oracle(x, p, smooth)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ladj, ladj_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(t(x), y_ref, rtol=1e-10, atol=1e-10)  # the full-width path
    torch.testing.assert_close(t.log_abs_det_jacobian(x, y), ladj_ref, rtol=1e-10, atol=1e-10)
    assert t.sign == 1 and t.bijective


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_agree_on_per_element_layout(backend):
    """x of shape (N,) with params (N, 2+3K): the per-element ladj on each backend."""
    p = random_params(50, k=3, dtype=torch.float32)
    x = torch.randn(50)
    y, ladj = MixLogisticCDFTransform(p, backend=backend).call_and_ladj(x)
    y_ref, ladj_ref = elementwise_oracle(x, p, False)
    torch.testing.assert_close(y, y_ref.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ladj, ladj_ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_round_trip_on_1e5_elements(smooth, dtype):
    """t.inv(t(x)) == x to rounding on 10^5 random elements (the fused Newton inverse), and
    t(t.inv(y)) == y; tolerances scale with the dtype's epsilon and the local slope."""
    n = 100_000
    p = random_params(n, k=4, dtype=dtype, log_scale_std=1.0)  # scales e^-3 .. e^3
    x = torch.randn(n, dtype=dtype) * 2
    t = MixLogisticCDFTransform(p, smooth)
    y, ladj = t.call_and_ladj(x)
    x_hat = t.inv(y)
    eps = torch.finfo(dtype).eps
    # |dx| <= (rounding of y) / (dy/dx) + rounding of x
    slope = torch.exp(ladj)
    bound = 64 * eps * ((1 + y.abs()) / slope + 1 + x.abs())
    bad = (x_hat - x).abs() > bound
    assert not bad.any(), (
        f"{int(bad.sum())} of {n} elements miss the root; worst |x_hat - x| = "
        f"{(x_hat - x).abs().max().item():.3g}"
    )


def test_inverse_gradients_and_ladj_against_autograd_jacobian_float64():
    """d y/d x from autograd through the fused op is diagonal and its log equals the ladj;
    the inverse's Jacobian is its reciprocal; gradcheck of call_and_ladj and the inverse."""
    p = random_params(2, 3, k=3)
    x = torch.randn(2, 3, dtype=torch.float64)
    t = MixLogisticCDFTransform(p)
    jac = torch.autograd.functional.jacobian(t, x).reshape(6, 6)
    assert torch.count_nonzero(jac - torch.diag(torch.diagonal(jac))) == 0
    _, ladj = t.call_and_ladj(x)
    torch.testing.assert_close(torch.diagonal(jac).log(), ladj.reshape(-1), rtol=1e-9, atol=1e-9)
    y = t(x)
    jac_inv = torch.autograd.functional.jacobian(t.inv, y).reshape(6, 6)
    torch.testing.assert_close(
        torch.diagonal(jac_inv).log(), -ladj.reshape(-1), rtol=1e-7, atol=1e-7
    )
    assert torch.autograd.gradcheck(
        lambda x, p: MixLogisticCDFTransform(p).call_and_ladj(x),
        (x.requires_grad_(), p.clone().requires_grad_()),
    )
    assert torch.autograd.gradcheck(
        lambda y, p: MixLogisticCDFTransform(p).inv(y),
        (y.detach().requires_grad_(), p.clone().requires_grad_()),
        atol=1e-6,
    )


def test_event_dim_1_sums_the_ladj_and_matches_slogdet():
    p = random_params(3, k=2, event=(4,))  # (B, 2+3K, D)
    x = torch.randn(3, 4, dtype=torch.float64)
    t = MixLogisticCDFTransform(p, event_dim=1)
    y, ladj = t.call_and_ladj(x)
    assert ladj.shape == (3,)
    for i in range(3):
        ti = MixLogisticCDFTransform(p[i], event_dim=1)
        jac = torch.autograd.functional.jacobian(ti, x[i])
        torch.testing.assert_close(torch.linalg.slogdet(jac)[1], ladj[i], rtol=1e-9, atol=1e-9)
    _, ladj_ops = ops.mixlogistic_coupling(x, p, smooth=False)
    torch.testing.assert_close(ladj, ladj_ops, rtol=0, atol=0)
    torch.testing.assert_close(t.inv(y), x, rtol=1e-9, atol=1e-9)
    assert t.domain.event_dim == 1 and t.codomain.event_dim == 1


def test_broadcasting_sample_dims_and_shapes():
    """x with extra leading sample dims broadcasts against params' batch shape, as in
    TransformedDistribution(...).sample((n,)) with a batched base."""
    p = random_params(5, k=2)
    t = MixLogisticCDFTransform(p)
    x = torch.randn(7, 5, dtype=torch.float64)
    y, ladj = t.call_and_ladj(x)
    assert y.shape == ladj.shape == (7, 5)
    y_ref, ladj_ref = elementwise_oracle(x, p.expand(7, 5, -1), False)
    torch.testing.assert_close(ladj, ladj_ref)
    torch.testing.assert_close(t(x), y_ref)
    assert t.forward_shape((7, 5)) == (7, 5) and t.inverse_shape((5,)) == (5,)
    d = TransformedDistribution(Normal(torch.zeros(5, dtype=torch.float64), 1.0), [t])
    s = d.sample((11,))
    assert s.shape == (11, 5) and torch.isfinite(d.log_prob(s)).all()


def test_smooth_codomain_is_the_bounded_interval():
    p = random_params(200, k=3)
    t = MixLogisticCDFTransform(p, smooth=True)
    y = t(torch.randn(200, dtype=torch.float64) * 3)
    scale, shift = torch.exp(torch.tanh(p[:, 0])), p[:, 1]
    logit_hi = math.log(0.95 / 0.05)
    assert t.codomain.check(y).all()
    assert not t.codomain.check(scale * (logit_hi + 0.01) + shift).any()
    assert not t.codomain.check(scale * -(logit_hi + 0.01) + shift).any()
    assert MixLogisticCDFTransform(p).codomain.check(torch.full((200,), 1e6)).all()


def test_compiled_function_using_the_transform():
    """torch.compile(fullgraph=True) of a function that builds the transform, runs
    call_and_ladj and the inverse: same values and gradients as eager."""
    p = random_params(64, k=3, dtype=torch.float32)
    x = torch.randn(64)

    def f(x, p):
        t = MixLogisticCDFTransform(p)
        y, ladj = t.call_and_ladj(x)
        return t.inv(y), (Normal(0.0, 1.0).log_prob(y) + ladj).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    pe, pc = p.clone().requires_grad_(), p.clone().requires_grad_()
    x_eager, lp_eager = f(x, pe)
    x_comp, lp_comp = compiled(x, pc)
    torch.testing.assert_close(x_comp, x_eager)
    torch.testing.assert_close(lp_comp, lp_eager)
    lp_eager.backward()
    lp_comp.backward()
    torch.testing.assert_close(pc.grad, pe.grad)


@pytest.mark.parametrize(
    "params, kwargs, match",
    [
        (torch.randn(3, 6), {}, r"params must have 2\+3K entries .* got 6"),
        (torch.randn(3, 4), {}, r"params must have 2\+3K entries .* got 4"),
        (torch.randn(3, 2, 5), {"event_dim": 1}, r"params must have 2\+3K entries .*dim 1.* 2"),
        (torch.randn(5), {"event_dim": 1}, r"params must have shape \(\*batch, 2\+3K, "),
        (torch.tensor(1.0), {}, r"params must have shape \(\*batch, 2\+3K\)"),
        (torch.randint(0, 3, (3, 5)), {}, r"params must be a floating-point tensor"),
        ([[0.0] * 5], {}, r"params must be a torch.Tensor"),
        (torch.randn(3, 5), {"event_dim": -1}, r"event_dim must be a non-negative int"),
    ],
)
def test_bad_params_raise_clear_errors(params, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        MixLogisticCDFTransform(params, **kwargs)


def test_bad_inputs_raise_clear_errors():
    t = MixLogisticCDFTransform(torch.randn(3, 5, 4), event_dim=1)  # (B=3, 2+3K=5, D=4)
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4\).*got \(3, 5\)"):
        t.call_and_ladj(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"y batch shape \(2,\) does not broadcast .* \(3,\)"):
        t.inv(torch.randn(2, 4))
    t0 = MixLogisticCDFTransform(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"x batch shape \(4,\) does not broadcast"):
        t0(torch.randn(4))


# --- the vector-data coupling -------------------------------------------------------------


def test_coupling_matches_float64_formula_and_keeps_the_conditioning_half():
    torch.manual_seed(1)
    c = MixLogisticCoupling1d(5, context=2, components=3, hidden=(16,)).double()
    with torch.no_grad():
        for m in c.net:
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0, 0.5)
                m.bias.normal_(0, 0.5)
    x = torch.randn(8, 5, dtype=torch.float64)
    ctx = torch.randn(8, 2, dtype=torch.float64)
    y, logdet = c(x, ctx)
    a, b = c.mask, ~c.mask
    assert torch.equal(y[:, a], x[:, a])
    params = c.params(x[:, a], ctx)  # (B, 2+3K, features_b)
    assert params.shape == (8, 11, 3)
    y_ref, ladj_ref = reference.mixlogistic_elementwise(x[:, b], params, False)
    torch.testing.assert_close(y[:, b], y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logdet, ladj_ref.sum(-1), rtol=1e-10, atol=1e-10)
    jac = torch.autograd.functional.jacobian(lambda v: c(v, ctx[:1])[0], x[:1]).reshape(5, 5)
    torch.testing.assert_close(torch.linalg.slogdet(jac)[1], logdet[0], rtol=1e-9, atol=1e-9)
    x_back, logdet_inv = c.inverse(y, ctx)
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, rtol=1e-9, atol=1e-9)
    t = c.transform(ctx)
    assert isinstance(t, MixLogisticCouplingTransform) and t.domain.event_dim == 1
    torch.testing.assert_close(t.inv(t(x)), x, rtol=1e-9, atol=1e-9)


def test_coupling_is_near_identity_at_initialisation():
    c = MixLogisticCoupling1d(6, components=4)
    x = torch.randn(256, 6) * 2
    y, logdet = c(x)
    assert (y - x).abs().max() < math.log(math.cosh(0.5)) + 1e-4
    assert logdet.abs().max() < 0.3
    assert not torch.equal(y, x)  # the components start apart (means over [-0.5, 0.5])


def test_coupling_rejects_bad_configuration():
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(4,\)"):
        MixLogisticCoupling1d(4, mask=[True, False, True])
    with pytest.raises(ValueError, match="both True"):
        MixLogisticCoupling1d(3, mask=[True, True, True])
    with pytest.raises(ValueError, match="features must be an int >= 2"):
        MixLogisticCoupling1d(1)
    c = MixLogisticCoupling1d(4, context=3)
    with pytest.raises(ValueError, match=r"context of shape \(\*batch, 3\) is required"):
        c(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4\), got \(2, 5\)"):
        c(torch.randn(2, 5), torch.randn(2, 3))


# --- zuko and pyro -------------------------------------------------------------------------


def test_zuko_flow_trains_and_sampling_agrees_with_log_prob(one_thread):
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    data = torch.randn(512, 3) @ torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.3], [0, 0, 0.5]])
    data = data + 0.3 * torch.sin(3 * data)
    flow = zuko_flow(3, transforms=3, components=4, hidden=(32, 32))
    assert isinstance(flow, zuko.flows.Flow)
    opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = -flow().log_prob(data).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses

    dist = flow()
    torch.manual_seed(3)
    x, log_prob = dist.rsample_and_log_prob((200,))
    torch.manual_seed(3)
    x_sep = dist.sample((200,))
    torch.testing.assert_close(x, x_sep)
    torch.testing.assert_close(dist.log_prob(x), log_prob, rtol=1e-4, atol=1e-4)
    z = dist.transform(x)
    torch.testing.assert_close(dist.transform.inv(z), x, rtol=1e-4, atol=1e-4)


def test_zuko_conditional_flow_mixed_with_zuko_transforms():
    pytest.importorskip("zuko")
    from zuko.distributions import DiagNormal
    from zuko.flows import Flow, MaskedAutoregressiveTransform
    from zuko.lazy import UnconditionalDistribution

    flow = Flow(
        [
            MixLogisticCoupling1d(4, context=2, components=3, hidden=(16,)).lazy(),
            MaskedAutoregressiveTransform(4, 2, hidden_features=(16,)),
            MixLogisticCoupling1d(4, context=2, mask=[True, True, False, False]).lazy(),
        ],
        UnconditionalDistribution(DiagNormal, torch.zeros(4), torch.ones(4), buffer=True),
    )
    c = torch.randn(5, 2)
    x = torch.randn(5, 4)
    log_prob = flow(c).log_prob(x)
    loss = -log_prob.mean()
    loss.backward()
    assert log_prob.shape == (5,) and all(p.grad is not None for p in flow.parameters())
    s, lp = flow(c).rsample_and_log_prob()
    torch.testing.assert_close(flow(c).log_prob(s), lp, rtol=1e-4, atol=1e-4)


def test_pyro_transformed_distributions():
    pyro = pytest.importorskip("pyro")
    import pyro.distributions as pd

    torch.manual_seed(0)
    c = MixLogisticCoupling1d(3, components=3, hidden=(8,))
    base = pd.Normal(torch.zeros(3), torch.ones(3)).to_event(1)
    d = pd.TransformedDistribution(base, [c.transform()])
    x = d.sample((10,))
    z, logdet_inv = c.inverse(x)
    torch.testing.assert_close(d.log_prob(x), base.log_prob(z) + logdet_inv, rtol=1e-5, atol=1e-5)

    cc = MixLogisticCoupling1d(3, context=2, components=3, hidden=(8,))
    module = cc.pyro()
    assert isinstance(module, pyro.distributions.conditional.ConditionalTransformModule)
    assert set(module.parameters()) == set(cc.parameters())
    cd = pd.ConditionalTransformedDistribution(base, [module])
    ctx = torch.randn(10, 2)
    y = torch.randn(10, 3)
    z, logdet_inv = cc.inverse(y, ctx)
    torch.testing.assert_close(
        cd.condition(ctx).log_prob(y), base.log_prob(z) + logdet_inv, rtol=1e-5, atol=1e-5
    )


# --- the example ---------------------------------------------------------------------------


def test_tabular_example_quick_mode_runs_and_writes_results(tmp_path):
    pytest.importorskip("zuko")
    pytest.importorskip("sklearn")
    out = tmp_path / "tabular.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "tabular_flow.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]
    assert {r["dataset"] for r in rows} >= {"moons", "wine"}
    assert {r["model"] for r in rows} == {"vflow-mol", "zuko-nsf"}
    for r in rows:
        assert math.isfinite(r["test_log_likelihood"]) and r["params"] > 0
        assert r["sample_ms"] > 0
    assert "sampling speed" in proc.stdout


def test_empty_and_zero_dim_inputs():
    """Found by a new-user pass: empty batches and 0-d input crashed inside the layout."""
    t = MixLogisticCDFTransform(torch.randn(0, 5))
    assert t(torch.randn(0)).shape == (0,) and t.inv(torch.randn(0)).shape == (0,)
    params = torch.randn(5, dtype=torch.float64)
    t1 = MixLogisticCDFTransform(params)
    x = torch.tensor(0.3, dtype=torch.float64)
    y = t1(x)
    assert y.shape == () and torch.allclose(t1.inv(y), x, atol=1e-9)
    coupling = MixLogisticCoupling1d(4)
    y, logdet = coupling.inverse(torch.randn(0, 4))
    assert y.shape == (0, 4) and logdet.shape == (0,)

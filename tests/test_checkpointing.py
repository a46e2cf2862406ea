"""Activation checkpointing (``model.set_activation_checkpointing``): the same loss and
gradients as the plain model (dropout included), with channels_last, bf16 autocast and
torch.compile; no effect in evaluation; and a smaller autograd graph.

Memory is measured deterministically, independent of the allocator: the bytes the autograd
graph of one training forward keeps for the backward (every tensor saved for backward, plus
the inputs of the checkpointed regions, which non-reentrant checkpointing holds instead of
the regions' saved tensors; each storage counted once).
"""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

import vflow
from vflow import flows
from vflow.models import CONFIGS, f_affine, f_checker, g_checker
from vflow.testing import graph_kept_bytes

GRANULARITIES = ("net", "step")


def _tiny(name: str = "vflow-digits", dtype=torch.float64, dropout: float = 0.2, **overrides):
    """A digits model with dropout (the digits configs have none), data-initialised."""
    torch.manual_seed(0)
    model = vflow.build(name, backend="reference", dropout=dropout, **overrides).to(dtype)
    c, h, w = model.config.data_shape
    x = torch.randint(0, model.config.n_bins, (4, c, h, w))
    model.initialize(x)
    return model.train(), x


def _with_affine():
    """vflow-digits with an f_affine block first in p (covers AugmentedAffineCoupling)."""
    base = CONFIGS["vflow-digits"]
    return _tiny(p=(f_affine(1, 8),) + base.p)


def _step(model, x, seed: int = 1, autocast: bool = False):
    """Loss and every parameter's gradient of one training step under a fixed RNG seed."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model.bpd(x).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture
def calls(monkeypatch):
    """Counts the regions run under torch.utils.checkpoint (by the vflow layers)."""
    counter = {"n": 0}
    plain = flows.checkpoint

    def counting(fn, *args, **kwargs):
        counter["n"] += 1
        return plain(fn, *args, **kwargs)

    monkeypatch.setattr(flows, "checkpoint", counting)
    return counter


def _assert_same(a, b, **tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name, **tol)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("which", ["vflow+affine", "flowpp"])
def test_same_loss_and_gradients_float64_with_dropout(which, granularity, calls, one_thread):
    model, x = _with_affine() if which == "vflow+affine" else _tiny("flowpp-digits")
    plain = _step(model, x)
    assert calls["n"] == 0
    other_seed = _step(model, x, seed=2)  # dropout is active: another seed, another loss
    assert not torch.allclose(plain[0], other_seed[0], rtol=1e-9, atol=0)
    assert model.set_activation_checkpointing(True, granularity) is model
    ckpt = _step(model, x)
    assert calls["n"] > 0
    _assert_same(ckpt, plain, rtol=1e-12, atol=1e-12)


def test_regions_are_the_networks_or_the_steps(calls, one_thread):
    """net: every coupling's CouplingNet plus the r and q context nets; step: every flow
    step with parameters (the Sigmoids and squeezes are not checkpointed) plus those."""
    model, x = _with_affine()
    couplings = sum(
        isinstance(m, (flows.MixLogisticCoupling, flows.AugmentedAffineCoupling))
        for m in model.modules()
    )
    steps = sum(
        any(True for _ in layer.parameters())
        for f in (model.r_flow, model.q_flow, model.p_flow)
        for layer in f.layers
    )
    assert steps == couplings  # one coupling per step in these models
    for granularity, regions in (("net", couplings + 2), ("step", steps + 2)):
        calls["n"] = 0
        model.set_activation_checkpointing(True, granularity)
        _step(model, x)
        assert calls["n"] == regions, granularity


def test_inactive_in_eval_and_no_grad(calls, one_thread):
    model, x = _tiny()
    noise = dict(eps_r=torch.randn(4, 1, 8, 8, dtype=torch.float64))
    noise["eps_q"] = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    model.eval()
    plain_eval = model.elbo(x, **noise)
    model.set_activation_checkpointing(True)
    ckpt_eval = model.elbo(x, **noise)  # grad mode on, eval mode
    model.sample(2)
    model.log_prob(x, num_samples=2)
    model.train()
    with torch.no_grad():
        model.elbo(x, **noise)
    assert calls["n"] == 0
    torch.testing.assert_close(ckpt_eval, plain_eval, rtol=0, atol=0)


def test_toggling_off_restores_the_plain_model(calls, one_thread):
    model, x = _tiny()
    plain_kept = kept_bytes(model, x)
    plain = _step(model, x)
    model.set_activation_checkpointing(True, "step")
    model.set_activation_checkpointing(True, "net")
    assert model.activation_checkpointing == "net"
    assert kept_bytes(model, x) < plain_kept
    assert model.set_activation_checkpointing(False) is model
    assert model.activation_checkpointing is None
    assert not any(getattr(m, "checkpoint_net", False) for m in model.modules())
    assert not any(getattr(m, "checkpoint_step", False) for m in model.modules())
    calls["n"] = 0
    _assert_same(_step(model, x), plain, rtol=0, atol=0)
    assert kept_bytes(model, x) == plain_kept
    assert calls["n"] == 0


def test_bad_granularity():
    model, _ = _tiny()
    with pytest.raises(ValueError, match="granularity"):
        model.set_activation_checkpointing(True, "layer")
    assert model.activation_checkpointing is None


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_channels_last(granularity, calls, one_thread):
    model, x = _tiny(dtype=torch.float32)
    model.to(memory_format=torch.channels_last)
    plain = _step(model, x)
    model.set_activation_checkpointing(True, granularity)
    ckpt = _step(model, x)
    assert calls["n"] > 0
    _assert_same(ckpt, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_bf16_autocast(granularity, calls, one_thread):
    """The recomputation runs under the forward's autocast state: the checkpointed bf16 step
    equals the plain bf16 step (to bf16 rounding of reordered reductions)."""
    model, x = _tiny(dtype=torch.float32)
    plain = _step(model, x, autocast=True)
    model.set_activation_checkpointing(True, granularity)
    ckpt = _step(model, x, autocast=True)
    assert calls["n"] > 0
    _assert_same(ckpt, plain, rtol=1e-2, atol=1e-3)


def test_torch_compile(calls, one_thread):
    """torch.compile of the checkpointed ELBO (inductor, what ``vflow train --compile``
    uses) gives the plain eager loss and gradients. A one-coupling-per-flow model keeps the
    compilation short. The ELBO draws its dequantisation and z noise inside the graph, so
    inductor is told to fall back to eager's random ops (``fallback_random``): the same
    draws as the eager step from the same seed."""
    model, x = _tiny(
        dtype=torch.float32,
        dropout=0.0,
        p=(f_checker(1, 8, 2, 1),),
        q=(g_checker(1, 8, 2, 1),),
        r=(g_checker(1, 8, 2, 1),),
    )
    plain = _step(model, x)
    model.set_activation_checkpointing(True)
    compiled = torch.compile(model.bpd, fullgraph=True)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # _step's seed
    with torch._inductor.config.patch(fallback_random=True):
        loss = compiled(x).mean()
    loss.backward()
    assert calls["n"] > 0  # traced through the checkpoint
    ckpt = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    _assert_same(ckpt, plain, rtol=1e-4, atol=1e-5)


def kept_bytes(model, x) -> int:
    """Bytes the graph of one training forward of ``model`` on x keeps for the backward."""
    return graph_kept_bytes(lambda: model.bpd(x).mean())


@pytest.mark.parametrize("granularity,fraction", [("net", 0.25), ("step", 0.15)])
def test_checkpointed_graph_keeps_far_less(granularity, fraction, one_thread):
    """The networks' activations dominate the plain graph: checkpointed, the graph keeps at
    most ``fraction`` of the plain graph's bytes. (vflow-digits, batch 4, float32: 19% for
    "net"; its networks are tiny, 16 filters and one block, so the flow's own states weigh
    more than in the CIFAR-10 / ImageNet models.)"""
    model, x = _tiny(dtype=torch.float32)
    plain = kept_bytes(model, x)
    model.set_activation_checkpointing(True, granularity)
    ckpt = kept_bytes(model, x)
    print(f"{granularity}: graph keeps {ckpt} of {plain} bytes ({ckpt / plain:.1%})")
    assert 0 < ckpt <= fraction * plain, (ckpt, plain)

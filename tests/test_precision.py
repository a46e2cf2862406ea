"""``--precision bf16-nets`` (``vflow.precision``): the conditioning and context networks of
a training step run in bf16, everything the likelihood adds up (couplings, logdets, ActNorm,
the invertible 1x1 convs) in float32; evaluation stays float32; a resumed run keeps it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vflow
from vflow import train as T
from vflow.flows import FlowLayer
from vflow.precision import NETWORK_CLASSES, autocast_networks


def _digits():
    torch.manual_seed(0)
    model = vflow.build("vflow-digits", backend="reference", context_filters=4)
    x = torch.randint(0, model.config.n_bins, (4, *model.config.data_shape))
    model.initialize(x)
    return model.train(), x


def _dtypes(model, x, train: bool) -> dict[str, set]:
    """The dtypes of the network convs' outputs, of the networks' outputs and of every flow
    layer's output tensors in one ``bpd`` pass (with grad in training mode if ``train``)."""
    seen = {"net convs": set(), "nets": set(), "flow layers": set()}
    nets = [m for m in model.modules() if type(m) in NETWORK_CLASSES]
    convs = {id(c) for n in nets for c in n.modules() if isinstance(c, nn.Conv2d)}

    def hook(module, args, out):
        if id(module) in convs:
            key = "net convs"
        else:
            key = "nets" if type(module) in NETWORK_CLASSES else "flow layers"
        outs = out if isinstance(out, tuple) else (out,)
        seen[key] |= {
            t.dtype for t in outs if isinstance(t, torch.Tensor) and t.is_floating_point()
        }

    watched = [
        m for m in model.modules() if isinstance(m, (nn.Conv2d, FlowLayer, *NETWORK_CLASSES))
    ]
    handles = [m.register_forward_hook(hook) for m in watched]
    model.train(train)
    with torch.set_grad_enabled(train):
        model.bpd(x)
    for h in handles:
        h.remove()
    return seen


def test_networks_run_in_bf16_and_the_couplings_see_float32():
    model, x = _digits()
    assert autocast_networks(model) == sum(type(m) in NETWORK_CLASSES for m in model.modules())
    seen = _dtypes(model, x, train=True)
    assert seen["net convs"] == {torch.bfloat16}
    assert seen["nets"] == {torch.float32}  # what the couplings read
    assert seen["flow layers"] == {torch.float32}  # couplings, ActNorm, 1x1 convs, logdets
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_evaluation_and_sampling_stay_float32():
    model, x = _digits()
    autocast_networks(model)
    assert _dtypes(model, x, train=False)["net convs"] == {torch.float32}
    model.train()
    with torch.no_grad():
        model.bpd(x)
        assert _dtypes(model, x, train=False)["net convs"] == {torch.float32}


def _args(tmp_path, **kw):
    base = dict(
        config="vflow-digits",
        out=str(tmp_path / "run"),
        batch_size=8,
        eval_every=0,
        ckpt_every=0,
        final_eval=False,
        n_samples=0,
        progress=False,
        overrides={"context_filters": 4},
    )
    return T.TrainArgs(**{**base, **kw})


def test_bf16_nets_trains_and_is_kept_on_resume(tmp_path):
    res = T.train(_args(tmp_path, steps=1, precision="bf16-nets"))
    assert (
        torch.load(T.latest_checkpoint(res.run_dir), weights_only=True)["args"]["precision"]
        == "bf16-nets"
    )
    res = T.train(_args(tmp_path, steps=2, resume=True, overrides={}))
    assert _dtypes(res.model, torch.zeros(2, 1, 8, 8, dtype=torch.long), True)["net convs"] == {
        torch.bfloat16
    }
    ck = torch.load(T.latest_checkpoint(res.run_dir), weights_only=True)
    assert ck["step"] == 2 and ck["args"]["precision"] == "bf16-nets"


def test_precision_is_checked(tmp_path):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16-nets"):
        T.train(_args(tmp_path, steps=1, precision="bf16"))

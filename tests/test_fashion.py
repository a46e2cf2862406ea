"""The Fashion-MNIST configs (flowpp-fashion, vflow-fashion): they build, are listed by
``vflow info``, invert exactly with exact logdets on a tiny size, and train from the CLI on the
real Debian files when those are installed."""

import os

import pytest
import test_models
import torch
from test_models import _images, _jacobian_logdet, _model, _noise

import vflow
from vflow import data as D
from vflow.cli import main
from vflow.models import CONFIGS, FlowPlusPlus, VFlow, _meta_counts, describe

NAMES = ["flowpp-fashion", "vflow-fashion"]
TINY = dict(data_shape=(1, 4, 4))  # same blocks on 4x4 images for the Jacobian checks
HAVE_FASHION = os.path.isfile(os.path.join(D.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz"))
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_config_shape_levels_kind_and_dataset(name):
    cfg = CONFIGS[name]
    assert cfg.data_shape == (1, 28, 28) and cfg.n_bins == 256
    assert D.default_dataset_for(name) == "fashion-mnist"
    with torch.device("meta"):
        model = vflow.build(name, backend="reference")
    if name.startswith("vflow"):
        assert isinstance(model, VFlow) and cfg.extra_channels == 1
        assert cfg.p[0].kind == "affine"  # Table 5's f_affine mixes z into x first
        assert model.latent_shape == (8, 14, 14)
    else:
        assert type(model) is FlowPlusPlus and cfg.extra_channels == 0
        assert model.latent_shape == (4, 14, 14)
    counts = _meta_counts(name)
    assert counts["total"] == counts["p"] + counts["q"] + counts["r"]
    assert 20_000 < counts["total"] < 2_000_000
    assert "1x28x28, n_bins=256" in describe(name)


def test_info_lists_the_fashion_configs(capsys):
    assert main(["info"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in NAMES)
    assert main(["info", "vflow-fashion"]) == 0
    assert "f_affine(1, 16)" in capsys.readouterr().out


@pytest.mark.parametrize("name", NAMES)
def test_main_flow_roundtrip_and_logdet_on_a_tiny_size(name):
    # test_models' check (inverse(forward(xz)) == xz, logdet == autograd slogdet) on 4x4
    test_models.test_main_flow_roundtrip_and_logdet(name)


@pytest.mark.parametrize("name", NAMES)
def test_conditional_flows_roundtrip_and_logdet_on_a_tiny_size(name):
    model = _model(name, **TINY)
    x = _images(model, 2).double()
    parts = [("r", model.r_flow, model.r_context(x), 1)]
    if model.config.extra_channels:
        parts.append(("q", model.q_flow, model.q_context(x), model.config.extra_channels))
    for _, flow, context, c in parts:
        eps = torch.randn(2, c, 4, 4, dtype=torch.float64)
        out, logdet = flow(eps, context)
        back, logdet_inv = flow.inverse(out, context)
        torch.testing.assert_close(back, eps, atol=1e-6, rtol=0)
        torch.testing.assert_close(logdet + logdet_inv, torch.zeros_like(logdet), atol=1e-7, rtol=0)
        one = _jacobian_logdet(lambda t, f=flow, ctx=context: f(t, ctx[:1])[0], eps[:1])
        torch.testing.assert_close(logdet[:1], one, atol=1e-6, rtol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_full_size_elbo_is_finite_and_sample_roundtrips_the_shape(name):
    model = vflow.build(name, backend="reference")
    x = torch.randint(0, 256, (3, 1, 28, 28))
    model.initialize(x)
    model.eval()
    noise = _noise(model, 3, dtype=torch.float32)
    bpd = -model.elbo(x, **noise) / (784 * 0.6931471805599453)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all() and (bpd > 0).all()
    s = model.sample(2)
    assert s.shape == (2, 1, 28, 28) and s.min() >= 0 and s.max() < 256


@pytest.mark.skipif(
    not HAVE_FASHION,
    reason=f"Fashion-MNIST not installed in {D.FASHION_MNIST_DIR} "
    "(apt-get install dataset-fashion-mnist)",
)
def test_cli_trains_vflow_fashion_two_steps_on_the_real_files(tmp_path, capsys):
    run = str(tmp_path / "run")
    argv = ["train", "--config", "vflow-fashion", "--data", "fashion-mnist", "--steps", "2"]
    argv += ["--batch-size", "4", "--init-batch-size", "8", "--out", run, "--no-progress"]
    argv += ["--eval-every", "0", "--no-final-eval", "--n-samples", "0", "--threads", "1"]
    assert main(argv) == 0, capsys.readouterr().err
    import json

    with open(os.path.join(run, "run.json")) as f:
        info = json.load(f)
    assert info["data"] == "fashion-mnist" and info["total_steps"] == 2
    rows = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
    train = [r for r in rows if r["kind"] == "train"]
    assert train[-1]["step"] == 2 and 0 < train[-1]["train_bpd"] < 16


def test_fashion_recipes_train_three_epochs_of_the_training_split():
    """Issue 14's sizing: the default run of either config covers >= 3 epochs of the 50,000
    training images (steps x batch), and a derived name gets its family's recipe."""
    from vflow.train import get_recipe

    for name in ("vflow-fashion", "flowpp-fashion", "vflow-fashion-small"):
        r = get_recipe(name)
        assert r["steps"] * r["batch_size"] >= 3 * 50_000, name

"""Properties of the models that users rely on, each checked against an independent
recomputation (issue 17): Eq. 5, bits/dim of 3-channel models, sampling (inverse chain,
temperature), alternation of the coupling halves, and evaluation in eval mode.

Every test uses tiny float64 models on the reference backend and goes through the public
API (``elbo``, ``bpd``, ``log_prob``, ``sample``, ``vflow.evaluate.evaluate``); noise that a
method draws internally is observed with forward hooks on the flows it enters, never by
calling private helpers.
"""

import math

import pytest
import torch

import vflow
from vflow import flows
from vflow.data import ImageData
from vflow.evaluate import evaluate

LN2 = math.log(2.0)

# tiny models: one torch thread is faster and does not stall on a busy machine
pytestmark = pytest.mark.usefixtures("one_thread")

# 3-channel stand-ins for the CIFAR-10 configs: 256 levels, dropout as in CIFAR (0.2), 4x4.
RGB = dict(data_shape=(3, 4, 4), n_bins=256, dropout=0.2)
# (name, overrides) of the tiny models the tests run on: 1-channel digits and 3-channel RGB
TINY_MODELS = [
    ("vflow-digits", dict(data_shape=(1, 4, 4))),
    ("vflow-digits", RGB),
    ("flowpp-digits", RGB),
]
IDS = ["vflow-1ch", "vflow-3ch", "flowpp-3ch"]


def _model(name, perturb=0.05, seed=0, **overrides):
    """A float64 reference model, ActNorm-initialised, weights perturbed (so no coupling is
    near the identity), in eval mode."""
    torch.manual_seed(seed)
    model = vflow.build(name, backend="reference", **overrides).double()
    c, h, w = model.config.data_shape
    model.initialize(torch.randint(0, model.config.n_bins, (8, c, h, w)))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(perturb * torch.randn_like(p))
    return model.eval()


def _distinct_images(model, n):
    """n images that differ pairwise (first pixel = image index)."""
    c, h, w = model.config.data_shape
    x = torch.randint(0, model.config.n_bins, (n, c, h, w))
    x[:, 0, 0, 0] = torch.arange(n)
    return x


def _std_normal_logp(eps):
    return -0.5 * (eps.square() + math.log(2 * math.pi)).flatten(1).sum(1)


# --- Eq. 5: importance-weighted log-likelihood ---------------------------------------------


@pytest.mark.parametrize("name,overrides", TINY_MODELS, ids=IDS)
def test_log_prob_is_eq5_of_hand_computed_elbos_on_the_same_noise(name, overrides):
    """log_prob(x, S) == logsumexp_s(elbo_s) - log S, where elbo_s is recomputed with the
    public ``elbo`` on exactly the noise that log_prob drew (seen by hooks on r and q)."""
    model = _model(name, **overrides)
    n_bins = model.config.n_bins
    x = _distinct_images(model, 3)
    S = 5
    seen = {"x": [], "eps_r": [], "eps_q": []}
    hooks = [
        model.r_context.register_forward_hook(
            lambda m, args, out: seen["x"].append(args[0].detach().clone())
        ),
        model.r_flow.register_forward_hook(
            lambda m, args, out: seen["eps_r"].append(args[0].detach().clone())
        ),
    ]
    if hasattr(model, "q_flow"):
        hooks.append(
            model.q_flow.register_forward_hook(
                lambda m, args, out: seen["eps_q"].append(args[0].detach().clone())
            )
        )
    try:
        est = model.log_prob(x, num_samples=S, chunk_size=2, seed=11)
    finally:
        for h in hooks:
            h.remove()
    assert est.dtype == torch.float64 and est.shape == (3,)
    # the images each noise row belonged to (r's context net sees x / n_bins - 0.5)
    xs = torch.round((torch.cat(seen["x"]) + 0.5) * n_bins).long()
    eps_r = torch.cat(seen["eps_r"])
    eps_q = torch.cat(seen["eps_q"]) if seen["eps_q"] else None
    assert xs.shape[0] == eps_r.shape[0] == 3 * S
    with torch.no_grad():
        w = model.elbo(xs, eps_r=eps_r, eps_q=eps_q).double()
    for b in range(3):
        rows = (xs == x[b]).flatten(1).all(1)
        assert int(rows.sum()) == S  # S fresh draws per image
        expected = torch.logsumexp(w[rows], 0) - math.log(S)
        torch.testing.assert_close(est[b], expected, atol=1e-9, rtol=0)
    # the draws are distinct (fresh noise per importance sample)
    assert len({round(v, 9) for v in w.tolist()}) == 3 * S


def test_log_prob_with_one_sample_is_the_elbo_of_its_draw():
    """S = 1: Eq. 5 reduces to the ELBO of the one draw (log 1 = 0)."""
    model = _model("vflow-digits", **RGB)
    x = _distinct_images(model, 2)
    eps_r, eps_q = [], []
    hooks = [
        model.r_flow.register_forward_hook(lambda m, a, o: eps_r.append(a[0].detach().clone())),
        model.q_flow.register_forward_hook(lambda m, a, o: eps_q.append(a[0].detach().clone())),
    ]
    try:
        one = model.log_prob(x, num_samples=1, seed=3)
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        elbo = model.elbo(x, eps_r=torch.cat(eps_r), eps_q=torch.cat(eps_q)).double()
    torch.testing.assert_close(one, elbo, atol=1e-9, rtol=0)


def test_chunked_log_prob_equals_unchunked_in_float64():
    """Chunking only changes how many samples go through one forward pass: the estimate is
    the same to 1e-12 for any chunk size, dividing S or not."""
    model = _model("vflow-digits", **RGB)
    x = _distinct_images(model, 3)
    S = 7
    full = model.log_prob(x, num_samples=S, chunk_size=S, seed=21)
    assert full.dtype == torch.float64
    for chunk in (1, 2, 3, 6, 100):
        chunked = model.log_prob(x, num_samples=S, chunk_size=chunk, seed=21)
        torch.testing.assert_close(chunked, full, atol=1e-12, rtol=0)
    default = model.log_prob(x, num_samples=S, seed=21)
    torch.testing.assert_close(default, full, atol=1e-12, rtol=0)
    # and the seed matters, so the equality above is not vacuous
    assert (model.log_prob(x, num_samples=S, chunk_size=S, seed=22) - full).abs().min() > 1e-6


# --- bits per dimension ------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides", TINY_MODELS, ids=IDS)
def test_bpd_is_nats_over_all_dimensions(name, overrides):
    """bpd = -elbo / (C H W ln 2) with the same noise; for 3 channels, dividing by H W only
    would be 3x off."""
    model = _model(name, **overrides)
    c, h, w = model.config.data_shape
    x = _distinct_images(model, 4)
    with torch.no_grad():
        torch.manual_seed(5)
        bpd = model.bpd(x)
        torch.manual_seed(5)
        elbo = model.elbo(x)
    assert bpd.shape == (4,)
    torch.testing.assert_close(bpd, -elbo / (c * h * w * LN2), atol=1e-12, rtol=1e-12)
    # a bound on -log2 P(x) of discrete images: finite and positive
    assert bpd.isfinite().all() and (bpd > 0).all()


# --- sampling --------------------------------------------------------------------------------


def _hand_inverse_chain(model, eps, temperature):
    """The sampling chain written out: x-part of p^-1(T eps), undo y = logit(0.05 + 0.9 v /
    n_bins), floor, clamp to [0, n_bins)."""
    n_bins = model.config.n_bins
    c = model.config.data_shape[0]
    with torch.no_grad():
        xz, _ = model.p_flow.inverse(temperature * eps)
    v = (torch.sigmoid(xz[:, :c]) - 0.05) / 0.9 * n_bins
    return v.floor().clamp(0, n_bins - 1).long()


@pytest.mark.parametrize("name,overrides", TINY_MODELS, ids=IDS)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sample_equals_explicit_inverse_chain_on_fixed_eps(name, overrides, temperature):
    """sample(n, T) draws eps ~ N(0, I) of the latent shape (the first normal draw after
    seeding) and returns the hand-written inverse chain of T * eps."""
    model = _model(name, **overrides)
    n = 16
    torch.manual_seed(9)
    eps = torch.randn(n, *model.latent_shape, dtype=torch.float64)
    expected = _hand_inverse_chain(model, eps, temperature)
    torch.manual_seed(9)
    got = model.sample(n, temperature=temperature)
    c, h, w = model.config.data_shape
    assert got.shape == (n, c, h, w) and got.dtype == torch.long
    assert torch.equal(got, expected)
    # not degenerate: the samples use many grey levels, not just the two clamp edges
    assert got.unique().numel() > 8
    assert model.elbo(got).isfinite().all()  # samples are valid model inputs


@pytest.mark.parametrize("name,overrides", TINY_MODELS, ids=IDS)
def test_temperature_zero_collapses_and_lower_temperature_shrinks_the_spread(name, overrides):
    """T = 0 maps every eps to the same latent 0: all samples equal (the mode of the chain);
    T = 1 samples differ; with the same eps the spread across samples grows with T."""
    model = _model(name, **overrides)
    n = 32
    torch.manual_seed(4)
    cold = model.sample(n, temperature=0.0)
    assert (cold == cold[:1]).all()
    # T = 0 is the chain at eps = 0 (no hidden noise)
    zero = torch.zeros(1, *model.latent_shape, dtype=torch.float64)
    assert torch.equal(cold[:1], _hand_inverse_chain(model, zero, 1.0))
    spread = {}
    for t in (0.0, 0.3, 1.0):
        torch.manual_seed(4)
        s = model.sample(n, temperature=t).double()
        spread[t] = s.std(0).mean().item()
    assert spread[0.0] == 0.0 < spread[0.3] < spread[1.0]
    torch.manual_seed(4)
    warm = model.sample(n, temperature=1.0)
    assert not torch.equal(warm, cold)
    assert torch.unique(warm.flatten(1), dim=0).shape[0] == n


# --- architecture: alternation of the transformed half ---------------------------------------


def _coupling_active_masks(model, flow_name, x):
    """Run the model and, for every MoL coupling of ``flow_name`` in call order, the mask of
    the elements it changed (the active half)."""
    flow = getattr(model, flow_name)
    masks = []

    def hook(module, args, out):
        masks.append((out[0] != args[0]).any(0))  # (C, H, W): changed for some image

    couplings = [m for m in flow.modules() if isinstance(m, flows.MixLogisticCoupling)]
    hooks = [m.register_forward_hook(hook) for m in couplings]
    try:
        with torch.no_grad():
            model.elbo(x)
    finally:
        for h in hooks:
            h.remove()
    assert len(masks) == len(couplings)
    return masks


@pytest.mark.parametrize("name,overrides", TINY_MODELS + [("vflow-digits", {})], ids=IDS + ["8x8"])
def test_consecutive_coupling_blocks_transform_complementary_halves(name, overrides):
    """Within a run of blocks of one kind, block i + 1 transforms exactly the half that block
    i left unchanged (and vice versa): every element is transformed every other block."""
    model = _model(name, perturb=0.2, **overrides)
    x = _distinct_images(model, 4)
    cfg = model.config
    parts = [("p_flow", cfg.p), ("r_flow", cfg.r)] + ([("q_flow", cfg.q)] if cfg.q else [])
    pairs = 0
    for flow_name, steps in parts:
        masks = _coupling_active_masks(model, flow_name, x)
        runs = [s.count for s in steps if s.kind in ("checker", "channel")]
        assert sum(runs) == len(masks), flow_name
        i = 0
        for count in runs:
            run = masks[i : i + count]
            i += count
            for a, b in zip(run, run[1:], strict=False):
                assert a.float().mean() == 0.5 and b.float().mean() == 0.5  # a half each
                assert not (a & b).any(), f"{flow_name}: consecutive blocks share active elements"
                assert (a | b).all(), f"{flow_name}: an element is never transformed"
                pairs += 1
    assert pairs >= 3


# --- evaluation --------------------------------------------------------------------------------


def _data(model, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    c, h, w = model.config.data_shape
    images = torch.randint(0, model.config.n_bins, (n, c, h, w), generator=g, dtype=torch.uint8)
    return ImageData("rgb" if c == 3 else "grey", "test", images, model.config.n_bins)


@pytest.mark.parametrize("name", ["vflow-digits", "flowpp-digits"])
def test_evaluation_is_independent_of_dropout_and_of_the_train_flag(name):
    """evaluate() runs the model in eval mode: with dropout 0.5 configured, a model in train
    mode evaluates exactly like the same weights built without dropout, and is left in
    train mode afterwards."""
    drop = _model(name, **{**RGB, "dropout": 0.5})
    plain = vflow.build(name, backend="reference", **{**RGB, "dropout": 0.0}).double()
    plain.load_state_dict(drop.state_dict())
    data = _data(drop, 10)
    drop.train()
    plain.eval()
    a = evaluate(drop, data, batch_size=4, samples=3, seed=2)
    assert drop.training  # restored
    b = evaluate(plain, data, batch_size=4, samples=3, seed=2)
    assert not plain.training
    assert a["n"] == b["n"] == 10
    assert a["elbo_bpd"] == pytest.approx(b["elbo_bpd"], abs=1e-12, rel=0)
    assert a["iw_bpd"] == pytest.approx(b["iw_bpd"], abs=1e-12, rel=0)
    # and the dropout really is active in train mode (so the test above can fail)
    x = data.images[:4].long()
    with torch.no_grad():
        torch.manual_seed(0)
        t1 = drop.elbo(x)
        torch.manual_seed(0)
        t2 = plain.elbo(x)
    assert (t1 - t2).abs().max() > 1e-6


@pytest.mark.parametrize("name,overrides", TINY_MODELS, ids=IDS)
def test_evaluate_bpd_is_mean_nats_over_all_dimensions(name, overrides):
    """evaluate's numbers from the ELBOs and IW estimates it computed (recorded by wrapping
    the public methods): -sum / (N C H W ln 2), over every image once."""
    model = _model(name, **overrides)
    c, h, w = model.config.data_shape
    data = _data(model, 11)
    rec = {"elbo": [], "iw": [], "x": []}
    elbo, log_prob = model.elbo, model.log_prob

    def elbo_spy(x, **kw):
        out = elbo(x, **kw)
        rec["elbo"].append(out.detach().double())
        rec["x"].append(x.detach().cpu())
        return out

    def log_prob_spy(x, *a, **kw):
        out = log_prob(x, *a, **kw)
        rec["iw"].append(out.detach().double())
        return out

    model.elbo, model.log_prob = elbo_spy, log_prob_spy
    res = evaluate(model, data, batch_size=4, samples=2, seed=0)
    assert torch.equal(torch.cat(rec["x"]), data.images.long())  # every image once
    denom = 11 * c * h * w * LN2
    assert res["n"] == 11
    assert res["elbo_bpd"] == pytest.approx(-torch.cat(rec["elbo"]).sum().item() / denom, 1e-12)
    assert res["iw_bpd"] == pytest.approx(-torch.cat(rec["iw"]).sum().item() / denom, 1e-12)


# --- `vflow info` ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,total,paper",
    [
        ("flowpp-cifar10", "31,443,440", "31.40M (+0.1%)"),
        ("vflow-cifar10", "38,371,840", "37.80M (+1.5%)"),
        ("vflow-cifar10-16m", "16,384,256", "16.50M (-0.7%)"),
    ],
)
def test_describe_reports_total_and_difference_to_the_paper(name, total, paper):
    """The counts and the differences of the README's table (measured independently)."""
    text = vflow.models.describe(name)
    assert f"total={total}" in text
    assert f"paper: {paper}" in text
    assert "3x32x32, n_bins=256" in text

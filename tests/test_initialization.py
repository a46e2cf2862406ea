"""Data-dependent initialisation (issue 12) and degenerate batches.

* ``model.initialize(x, scheme=...)``: the official Flow++ scheme (every conv / dense layer of
  the conditioning and context networks plus ActNorm, from the data) and the ActNorm-only
  scheme; statistics of every initialised layer on the init batch; degenerate variances;
  atomicity (a failed call changes nothing).
* Empty batches, one image, constant images and identical images through every public model
  and layer method.
* The trainer's separate init batch (``init_batch_size``), resume without re-initialisation,
  batch-size-1 training and DDP initialisation equal to single-process initialisation.
"""

import json
import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import vflow
from vflow import flows, nets
from vflow import train as T

CONFIGS = ["flowpp-digits", "vflow-digits"]


def _images(model, n, seed=0):
    c, h, w = model.config.data_shape
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.n_bins, (n, c, h, w), generator=g)


def _noise(model, n, seed=1, dtype=torch.float64):
    c, h, w = model.config.data_shape
    g = torch.Generator().manual_seed(seed)
    eps_r = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    cz = model.config.extra_channels
    eps_q = torch.randn(n, cz, h, w, generator=g, dtype=dtype) if cz else None
    return dict(eps_r=eps_r, eps_q=eps_q)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, state):
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), f"{k} changed"


def _build(name, dtype=torch.float64):
    return vflow.build(name, backend="reference").to(dtype)


# --- init-batch size and atomicity -----------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("n", [0, 1])
def test_initialize_needs_two_images_and_changes_nothing(name, n):
    model = _build(name)
    before = _state(model)
    with pytest.raises(ValueError, match=r"x.*at least 2 images"):
        model.initialize(_images(model, 4)[:n])
    _assert_state_equal(model, before)
    assert not any(bool(m.initialized) for m in model.modules() if isinstance(m, flows.ActNorm))


@pytest.mark.parametrize("scheme", ["official", "actnorm"])
def test_initialize_is_atomic_when_a_layer_fails(scheme, monkeypatch):
    model = _build("vflow-digits")
    model.initialize(_images(model, 8, seed=3))  # an initialised model
    before = _state(model)
    last = model.p_flow.layers[-1]  # runs after r, q and most of p were initialised

    def boom(*args, **kwargs):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(last, "forward", boom)
    with pytest.raises(RuntimeError, match="planted failure"):
        model.initialize(_images(model, 8, seed=4), scheme=scheme)
    monkeypatch.undo()
    _assert_state_equal(model, before)


def test_initialize_rejects_unknown_scheme_and_bad_images():
    model = _build("flowpp-digits")
    before = _state(model)
    with pytest.raises(ValueError, match=r"scheme.*'official'.*'actnorm'"):
        model.initialize(_images(model, 4), scheme="kaiming")
    with pytest.raises(ValueError, match=r"image values"):
        model.initialize(_images(model, 4) + 17)
    _assert_state_equal(model, before)


# --- degenerate statistics -------------------------------------------------------------------


def test_actnorm_zero_variance_elements_get_unit_scale():
    n = flows.SMALL_INIT_BATCH  # a full batch: per-element statistics, no pooling
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64)
    x[:, 0, 1, 2] = 3.0  # the same value in every image: zero batch variance
    x[:, 1, 0, 0] = -2.0 + 1e-10 * torch.arange(n)  # variance 8e-18: (near) zero
    layer = flows.ActNorm((2, 4, 4)).double()
    layer.initialize(x)
    scale = torch.exp(layer.log_scale)
    assert scale[0, 1, 2] == 1.0 and scale[1, 0, 0] == 1.0
    assert layer.bias[0, 1, 2] == -3.0
    torch.testing.assert_close(layer.bias[1, 0, 0], torch.tensor(2.0, dtype=torch.float64))
    # the other elements: zero mean, unit variance as before
    y, _ = layer(x)
    keep = torch.ones(2, 4, 4, dtype=torch.bool)
    keep[0, 1, 2] = keep[1, 0, 0] = False
    torch.testing.assert_close(y.mean(0)[keep], torch.zeros(30, dtype=torch.float64))
    torch.testing.assert_close(y.var(0, unbiased=False)[keep], torch.ones(30, dtype=torch.float64))


def test_actnorm_initialize_needs_two_samples_and_lazy_init_waits():
    layer = flows.ActNorm((2, 4, 4)).double()
    with pytest.raises(ValueError, match=r"x.*at least 2"):
        layer.initialize(torch.randn(1, 2, 4, 4, dtype=torch.float64))
    one = torch.randn(1, 2, 4, 4, dtype=torch.float64)
    y, logdet = layer(one)  # too small to initialise from: the identity, still uninitialised
    assert torch.equal(y, one) and torch.equal(logdet, torch.zeros(1, dtype=torch.float64))
    assert not bool(layer.initialized)
    y, logdet = layer(one[:0])
    assert y.shape == (0, 2, 4, 4) and logdet.shape == (0,) and not bool(layer.initialized)
    layer(torch.randn(5, 2, 4, 4, dtype=torch.float64))
    assert bool(layer.initialized) and torch.isfinite(layer.log_scale).all()


def test_conv_zero_variance_channel_gets_unit_scale():
    conv = nets._conv(2, 3, 1)
    x = torch.randn(4, 2, 3, 3)
    with torch.no_grad():
        conv.weight[1] *= 1e-6  # output channel 1: variance ~1e-13, (near) zero
        w1 = conv.weight[1].clone()
        out = conv(x)
        y = nets.data_init_conv(conv, out, init_scale=0.1)
    assert float(out[:, 1].var()) < nets.MIN_INIT_VAR
    # unit variance assumed: scale = init_scale (official 0.1 / sqrt(var + 1e-8) ~ 1e3 here)
    torch.testing.assert_close(conv.weight[1], 0.1 * w1, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, conv(x))
    torch.testing.assert_close(y[:, 1].mean(), torch.tensor(0.0), atol=1e-9, rtol=0)
    for c in (0, 2):
        mean, var = y[:, c].mean(), y[:, c].var(unbiased=False)
        torch.testing.assert_close(mean, torch.tensor(0.0), atol=1e-6, rtol=0)
        torch.testing.assert_close(var, torch.tensor(0.01), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("scheme", ["official", "actnorm"])
@pytest.mark.parametrize("kind", ["identical", "zeros", "max"])
def test_degenerate_init_batches_give_a_finite_model(name, scheme, kind):
    model = _build(name, torch.float32)
    n_bins = model.config.n_bins
    x = _images(model, 1).repeat(8, 1, 1, 1)
    if kind == "zeros":
        x = torch.zeros_like(x)
    elif kind == "max":
        x = torch.full_like(x, n_bins - 1)
    model.initialize(x, scheme=scheme)
    for k, v in model.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
    for m in model.modules():
        if isinstance(m, flows.ActNorm):
            assert bool(m.initialized) and float(m.log_scale.max()) < math.log(1e3)
    test = _images(model, 16, seed=9)
    bpd = model.eval().bpd(test)
    assert torch.isfinite(bpd).all()
    assert model.sample(4).shape == (4, 1, 8, 8)


# --- initialisation statistics ----------------------------------------------------------------


class _FirstOutput:
    """Forward hook that keeps the first output of each module (returns None: no change)."""

    def __init__(self):
        self.seen = {}

    def __call__(self, module, inputs, out):
        self.seen.setdefault(id(module), (module, out))


def _record_outputs(model, kinds):
    rec = _FirstOutput()
    handles = [m.register_forward_hook(rec) for m in model.modules() if isinstance(m, kinds)]
    return rec.seen, handles


@pytest.mark.parametrize("name", CONFIGS)
def test_official_init_statistics_of_every_layer(name):
    model = _build(name)
    n = flows.SMALL_INIT_BATCH  # a full batch: exact per-element ActNorm statistics
    x = _images(model, n)
    noise = _noise(model, n)
    model.initialize(x, scheme="official", **noise)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(hasattr(m, "init_scale") for m in convs)
    scales = sorted({m.init_scale for m in convs})
    assert scales == [0.1, 1.0]
    seen, handles = _record_outputs(model, (torch.nn.Conv2d, flows.ActNorm))
    model.elbo(x, **noise)  # the same batch and noise as the initialisation
    for h in handles:
        h.remove()
    assert len([n for n, (m, _) in seen.items() if isinstance(m, torch.nn.Conv2d)]) == len(convs)
    for m, out in seen.values():
        if isinstance(m, flows.ActNorm):
            y, target, dims = out[0], 1.0, (0,)
        else:
            y, target, dims = out, m.init_scale**2, (0, 2, 3)
        mean, var = y.mean(dims), y.var(dims, unbiased=False)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-7 * (1 + target), rtol=0)
        # variance init_scale^2 v / (v + 1e-8) (the official epsilon), v >= MIN_INIT_VAR
        rtol = 1e-8 / nets.MIN_INIT_VAR
        torch.testing.assert_close(var, torch.full_like(var, target), rtol=rtol, atol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_actnorm_scheme_statistics_and_convs_untouched(name):
    model = _build(name)
    convs = {k: v.clone() for k, v in model.state_dict().items() if "net" in k or "context" in k}
    n = flows.SMALL_INIT_BATCH  # a full batch: exact per-element ActNorm statistics
    x = _images(model, n)
    noise = _noise(model, n)
    model.initialize(x, scheme="actnorm", **noise)
    for k, v in convs.items():
        assert torch.equal(model.state_dict()[k], v), k
    seen, handles = _record_outputs(model, (flows.ActNorm,))
    model.elbo(x, **noise)
    for h in handles:
        h.remove()
    assert len(seen) == sum(isinstance(m, flows.ActNorm) for m in model.modules())
    for _, out in seen.values():
        y = out[0]
        torch.testing.assert_close(y.mean(0), torch.zeros_like(y[0]), atol=1e-7, rtol=0)
        torch.testing.assert_close(
            y.var(0, unbiased=False), torch.ones_like(y[0]), rtol=1e-5, atol=0
        )


def test_official_init_draws_weights_from_n_0_005():
    model = _build("vflow-digits")
    drawn = nets.redraw_conv_weights(model)
    assert len(drawn) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    w = torch.cat([m.weight.flatten() for m in drawn])
    assert abs(float(w.std()) - 0.05) < 0.001 and abs(float(w.mean())) < 0.001
    assert all(torch.count_nonzero(m.bias) == 0 for m in drawn)


def test_official_scheme_is_the_default():
    # chosen from the paired digits comparison (README, "Initialisation"): not worse
    assert vflow.models.DEFAULT_INIT_SCHEME == "official"
    model = _build("flowpp-digits")
    x = _images(model, 8)
    torch.manual_seed(0)
    a = _build("flowpp-digits").initialize(x)
    torch.manual_seed(0)
    b = _build("flowpp-digits").initialize(x, scheme="official")
    torch.manual_seed(0)
    c = _build("flowpp-digits").initialize(x, scheme="actnorm")
    _assert_state_equal(a, _state(b))
    assert not torch.equal(a.r_context.proj.weight, c.r_context.proj.weight)


# --- empty batches and degenerate images through the public API ------------------------------


@pytest.fixture(scope="module")
def ready():
    """Both digits models, initialised on 16 random images (float64, eval)."""
    out = {}
    with torch.random.fork_rng():
        torch.manual_seed(0)
        for name in CONFIGS:
            model = _build(name)
            model.initialize(_images(model, 16))
            out[name] = model.eval()
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_empty_batches_give_empty_results(ready, name):
    model = ready[name]
    before = _state(model)
    x = torch.zeros(0, 1, 8, 8, dtype=torch.long)
    for out in (model.elbo(x), model.bpd(x), model.log_prob(x, num_samples=3)):
        assert out.shape == (0,)
    assert model.log_prob(x, num_samples=3).dtype == torch.float64
    s = model.sample(0)
    assert s.shape == (0, 1, 8, 8) and s.dtype == torch.long
    _assert_state_equal(model, before)
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match=r"n must be an integer >= 0"):
            model.sample(bad)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind", ["one", "zeros", "max", "identical"])
def test_degenerate_images_give_finite_results(ready, name, kind):
    model = ready[name]
    before = _state(model)
    x = _images(model, 1, seed=5)
    if kind == "zeros":
        x = torch.zeros(3, 1, 8, 8, dtype=torch.long)
    elif kind == "max":
        x = torch.full((3, 1, 8, 8), model.config.n_bins - 1)
    elif kind == "identical":
        x = x.repeat(3, 1, 1, 1)
    b = x.shape[0]
    for out in (model.elbo(x), model.bpd(x), model.log_prob(x, num_samples=4, seed=0)):
        assert out.shape == (b,) and torch.isfinite(out).all()
    assert (model.bpd(x) > 0).all()
    if kind == "identical":  # one image repeated with the same noise: the same bound
        noise = {
            k: v[:1].expand_as(v) if v is not None else None for k, v in _noise(model, b).items()
        }
        elbo = model.elbo(x, **noise)
        one = model.elbo(x[:1], **{k: v[:1] if v is not None else None for k, v in noise.items()})
        torch.testing.assert_close(elbo, one.expand(b), rtol=1e-12, atol=1e-12)
    s = model.sample(1)
    assert s.shape == (1, 1, 8, 8) and 0 <= int(s.min()) and int(s.max()) < model.config.n_bins
    _assert_state_equal(model, before)


def _layer_cases():
    shape = (2, 4, 4)
    ctx = 3
    cases = {
        "actnorm": (lambda: flows.ActNorm(shape), None),
        "pointwise": (lambda: flows.Pointwise(2), None),
        "pointwise-checker": (lambda: flows.Pointwise(2, split="checker"), None),
        "pointwise-channel": (lambda: flows.Pointwise(2, split="channel"), None),
        "sigmoid": (flows.Sigmoid, None),
        "space-to-depth": (flows.SpaceToDepth, None),
        "coupling-checker": (
            lambda: flows.MixLogisticCoupling(
                shape, split="checker", parity=0, filters=8, blocks=1, components=2
            ),
            None,
        ),
        "coupling-channel-context": (
            lambda: flows.MixLogisticCoupling(
                shape,
                split="channel",
                parity=1,
                filters=8,
                blocks=1,
                components=2,
                attention=False,
                context_channels=ctx,
            ),
            (ctx, 4, 2),
        ),
        "affine": (lambda: flows.AugmentedAffineCoupling(1, 1, (4, 4), filters=8, blocks=1), None),
        "literal-checker-split": (
            lambda: flows.Compose(
                [
                    flows.CheckerboardSplit(),
                    flows.Parallel(flows.ActNorm((2, 4, 2)), flows.Pointwise(2)),
                    flows.TupleFlip(),
                    flows.Inverse(flows.CheckerboardSplit()),
                ]
            ),
            None,
        ),
        "literal-channel-split": (
            lambda: flows.Compose(
                [
                    flows.ChannelSplit(),
                    flows.Parallel(flows.Sigmoid(), flows.ActNorm((1, 4, 4))),
                    flows.Inverse(flows.ChannelSplit()),
                ]
            ),
            None,
        ),
        "block": (
            lambda: flows.f_checker(shape, parity=1, blocks=1, filters=8, components=2),
            None,
        ),
    }
    return cases


@pytest.mark.parametrize("case", list(_layer_cases()))
@pytest.mark.parametrize("batch", [0, 1, 3])
@pytest.mark.parametrize("kind", ["random", "constant", "identical"])
def test_every_layer_on_degenerate_batches(case, batch, kind):
    make, ctx_shape = _layer_cases()[case]
    layer = make().double()
    # initialise (where there is anything to initialise) on a healthy batch first
    layer(torch.rand(4, 2, 4, 4, dtype=torch.float64) * 0.8 + 0.1, _ctx(ctx_shape, 4))
    x = torch.rand(batch, 2, 4, 4, dtype=torch.float64) * 0.8 + 0.1
    if kind == "constant":
        x = torch.full_like(x, 0.5)
    elif kind == "identical" and batch:
        x = x[:1].expand_as(x).contiguous()
    ctx = _ctx(ctx_shape, batch)
    if kind == "identical" and ctx is not None and batch:
        ctx = ctx[:1].expand_as(ctx).contiguous()
    before = _state(layer)
    y, logdet = layer(x, ctx)
    assert y.shape == (batch, *y.shape[1:]) and logdet.shape == (batch,)
    assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
    back, logdet_inv = layer.inverse(y, ctx)
    assert back.shape == x.shape and logdet_inv.shape == (batch,)
    torch.testing.assert_close(back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(logdet + logdet_inv, torch.zeros_like(logdet), atol=1e-8, rtol=0)
    if kind == "identical" and batch > 1:
        torch.testing.assert_close(y, y[:1].expand_as(y))
        torch.testing.assert_close(logdet, logdet[:1].expand_as(logdet))
    _assert_state_equal(layer, before)


def _ctx(shape, batch):
    if shape is None:
        return None
    return torch.randn(batch, *shape, dtype=torch.float64)


@pytest.mark.parametrize("batch", [0, 1])
def test_image_to_logit_on_tiny_batches(batch):
    layer = flows.ImageToLogit(17).double()
    v = torch.rand(batch, 1, 8, 8, dtype=torch.float64) * 17
    y, logdet = layer(v)
    assert y.shape == v.shape and logdet.shape == (batch,)
    back, logdet_inv = layer.inverse(y)
    torch.testing.assert_close(back, v)
    torch.testing.assert_close(logdet + logdet_inv, torch.zeros_like(logdet))
    if batch:  # D log(0.9 / n_bins) - sum log(s (1 - s)), s = 0.05 + 0.9 v / n_bins
        s = 0.05 + 0.9 * v / 17
        expected = 64 * math.log(0.9 / 17) - (torch.log(s) + torch.log1p(-s)).sum()
        torch.testing.assert_close(logdet, expected.reshape(1))


# --- trainer --------------------------------------------------------------------------------


class _Recorder:
    """A build function that records what ``initialize`` received."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec):
        model = T.default_build(spec)
        original = model.initialize

        def initialize(x, **kwargs):
            self.calls.append((x.clone(), kwargs))
            return original(x, **kwargs)

        model.initialize = initialize
        return model


def _args(tmp_path, name="run", **kw):
    base = dict(
        config="flowpp-digits",
        out=str(tmp_path / name),
        steps=2,
        batch_size=4,
        lr=2e-3,
        warmup=2,
        log_every=1,
        eval_every=0,
        ckpt_every=0,
        final_eval=False,
        n_samples=0,
        progress=False,
        seed=3,
        num_threads=1,
    )
    base.update(kw)
    return T.TrainArgs(**base)


def test_trainer_init_batch_is_separate_from_the_training_batch(tmp_path):
    a, b = _Recorder(), _Recorder()
    T.train(_args(tmp_path, "a", batch_size=1), build_fn=a)
    T.train(_args(tmp_path, "b", batch_size=8), build_fn=b)
    assert len(a.calls) == len(b.calls) == 1
    xa, xb = a.calls[0][0], b.calls[0][0]
    assert xa.shape == (128, 1, 8, 8) and torch.equal(xa, xb)  # default 128, not the batch
    assert len({tuple(r.flatten().tolist()) for r in xa}) > 100  # distinct training images
    c = _Recorder()
    T.train(_args(tmp_path, "c", init_batch_size=32, init_scheme="actnorm"), build_fn=c)
    assert c.calls[0][0].shape == (32, 1, 8, 8) and c.calls[0][1] == {"scheme": "actnorm"}
    with open(os.path.join(tmp_path, "c", "run.json")) as f:
        assert json.load(f)["args"]["init_batch_size"] == 32


def test_trainer_init_batch_is_capped_by_the_dataset_and_needs_two(tmp_path):
    rec = _Recorder()
    T.train(_args(tmp_path, "big", init_batch_size=10**6), build_fn=rec)
    n_train = len(T.load_dataset("digits", "train"))
    assert rec.calls[0][0].shape[0] == n_train
    with pytest.raises(ValueError, match=r"init_batch_size.*at least 2"):
        T.train(_args(tmp_path, "one", init_batch_size=1), build_fn=rec)


def test_resume_does_not_reinitialise(tmp_path):
    rec = _Recorder()
    T.train(_args(tmp_path, steps=2, ckpt_every=1), build_fn=rec)
    assert len(rec.calls) == 1
    T.train(_args(tmp_path, steps=4, resume=True), build_fn=rec)
    assert len(rec.calls) == 1


class _BeforeAfter:
    """Build function that measures test bits/dim (fixed noise) right after initialisation."""

    def __init__(self, x):
        self.x, self.before, self.model = x, None, None

    def __call__(self, spec):
        model = T.default_build(spec)
        original = model.initialize

        def initialize(x, **kwargs):
            out = original(x, **kwargs)
            self.before = self.measure(model)
            return out

        model.initialize = initialize
        self.model = model
        return model

    def measure(self, model):
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(123)
            return float(model.bpd(self.x).mean())


@pytest.mark.parametrize("name", CONFIGS)
def test_batch_size_one_training_is_finite_and_improves(tmp_path, name, one_thread):
    test = T.load_dataset("digits", "test").images[:256].long()
    probe = _BeforeAfter(test)
    # the config's own recipe (lr 2e-3, warm-up 100), as `vflow train --batch-size 1 --steps 30`
    args = _args(tmp_path, config=name, steps=30, batch_size=1, lr=None, warmup=None)
    res = T.train(args, build_fn=probe)
    assert res.skipped == 0
    after = probe.measure(res.model)
    assert math.isfinite(probe.before) and math.isfinite(after)
    assert probe.before < math.log2(17) + 1  # near the uniform 4.09 bits/dim, not ~1e11
    assert after < probe.before - 0.1, (probe.before, after)
    rows = [json.loads(line) for line in open(os.path.join(res.run_dir, "metrics.jsonl"))]
    losses = [r["train_bpd"] for r in rows if r["kind"] == "train"]
    assert len(losses) == 30 and all(math.isfinite(v) for v in losses)


# --- DDP (the spawn pattern of tests/test_train.py) ------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_init_worker(rank, world, port, out, kw):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    res = T.train(T.TrainArgs(**kw))
    torch.save(res.model.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_train.py::_ddp_worker


def test_ddp_initialisation_equals_single_process(tmp_path):
    kw = dict(_args(tmp_path, steps=0, batch_size=8, init_batch_size=32).__dict__)
    kw.pop("out")
    single = T.train(T.TrainArgs(out=str(tmp_path / "single"), **kw))
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(
        _ddp_init_worker,
        args=(2, _free_port(), str(out), dict(out=str(out / "run"), **kw)),
        nprocs=2,
        join=True,
    )
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    expected = single.model.state_dict()
    fresh = T.default_build({"name": "flowpp-digits", "overrides": {}, "backend": "auto"})
    changed = 0
    for k, v in expected.items():
        assert torch.equal(r0[k], v) and torch.equal(r1[k], v), k
        changed += not torch.equal(fresh.state_dict()[k], v)
    assert changed > 0.5 * len(expected)  # the initialisation really changed the model


def test_lazy_actnorm_init_refuses_non_finite_batches_and_changes_nothing():
    """An uninitialised model whose first ELBO sees a NaN must not store NaN statistics
    (found by a new-user pass: every later ELBO was NaN, also on clean data)."""
    from vflow.data import load_digits

    images = load_digits("train").images.long()[:4]
    model = vflow.build("vflow-digits")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eps_r = torch.randn(4, 1, 8, 8)
    eps_r[1] = float("nan")
    lazy = pytest.warns(UserWarning, match="not initialised")  # a lazy init warns (issue 29)
    with pytest.raises(ValueError, match="non-finite"), lazy:
        model.elbo(images, eps_r=eps_r)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    with lazy:
        assert torch.isfinite(model.elbo(images)).all()


@pytest.mark.parametrize("temperature", [float("inf"), float("nan"), -0.5, "hot"])
def test_sample_rejects_bad_temperatures(temperature):
    model = vflow.build("vflow-digits")
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, temperature=temperature)


# --- issue 29: an uninitialised model refuses to evaluate; small init batches ----------------

NOT_INITIALISED = r"not initialised.*model\.initialize\(x\).*vflow\.load\(run_dir\)"


def _actnorms_initialised(model):
    return [bool(m.initialized) for m in model.modules() if isinstance(m, flows.ActNorm)]


@pytest.mark.parametrize("name", CONFIGS)
def test_uninitialised_model_refuses_evaluation_and_sampling(name):
    """Before: eval-mode bpd of 4 images fitted the ActNorms to them (2.11 bits/dim, then 4.76
    on the next 64) and sample() ran silently; now each call raises and changes nothing."""
    model = _build(name).eval()
    x = _images(model, 4)
    before = _state(model)
    calls = {
        "elbo": lambda: model.elbo(x),
        "bpd": lambda: model.bpd(x),
        "log_prob": lambda: model.log_prob(x, num_samples=2),
        "sample": lambda: model.sample(2),
    }
    for method, call in calls.items():
        with pytest.raises(RuntimeError, match=rf"{name}\.{method if method != 'bpd' else 'elbo'}"):
            call()
        with pytest.raises(RuntimeError, match=NOT_INITIALISED):
            call()
    model.train()  # train mode but no grad (an evaluation loop that forgot eval()): refused too
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"under torch\.no_grad"):
        model.elbo(x)
    _assert_state_equal(model, before)
    assert not any(_actnorms_initialised(model))


@pytest.mark.parametrize("name", CONFIGS)
def test_training_forward_initialises_lazily_with_a_warning(name):
    model = _build(name).train()
    x = _images(model, 4)
    with pytest.warns(UserWarning, match=r"not initialised.*first training batch \(4 images\)"):
        model.elbo(x).mean().backward()
    assert all(_actnorms_initialised(model))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # initialised now: no second warning
        model.elbo(x)
    assert torch.isfinite(model.eval().bpd(x)).all()


@pytest.mark.parametrize("name", CONFIGS)
def test_a_loaded_initialised_state_counts_as_initialised(name):
    source = _build(name)
    x = _images(model=source, n=32)
    source.initialize(x)
    noise = _noise(source, 4)
    loaded = _build(name)
    loaded.load_state_dict(source.state_dict())
    loaded.eval()
    torch.testing.assert_close(loaded.elbo(x[:4], **noise), source.eval().elbo(x[:4], **noise))
    assert loaded.sample(2).shape == (2, 1, 8, 8)
    # the buffers copied in place, as DDP's broadcast does: read from the flags themselves
    copied = _build(name).eval()
    with torch.no_grad():
        for dst, src in zip(
            copied.state_dict().values(), source.state_dict().values(), strict=True
        ):
            dst.copy_(src)
    torch.testing.assert_close(copied.elbo(x[:4], **noise), source.elbo(x[:4], **noise))
    # the state of an uninitialised model does not count
    blank = _build(name)
    blank.load_state_dict(_build(name).state_dict())
    with pytest.raises(RuntimeError, match=NOT_INITIALISED):
        blank.eval().bpd(x[:4])


def _digits_split(split):
    from vflow.data import load_digits

    return load_digits(split).images.long()


@pytest.mark.parametrize("name", CONFIGS)
def test_small_init_batches_warn_and_start_within_two_bits_of_a_full_batch(name, one_thread):
    """Before: 2 init images gave 35 (flowpp-digits) / 14 (vflow-digits) test bits/dim
    against 3.2 / 3.7 from 128, with no warning."""
    train, test = _digits_split("train"), _digits_split("test")[:256]

    def start_bpd(n, seed):
        torch.manual_seed(seed)
        model = vflow.build(name).double()
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
        model.initialize(train[idx])
        torch.manual_seed(100)
        with torch.no_grad():
            return float(model.eval().bpd(test).mean())

    full = start_bpd(128, 0)
    assert full < 4.0
    for n in (2, 4, 8, 16):
        # image pair 9 (a 0 and a 9) is the worst of 10 pairs at n = 2 (gap 1.85 / 1.78)
        for seed in (0, 1, 9) if n == 2 else (0, 1):
            with pytest.warns(UserWarning, match=rf"{n} images is a small init batch.*128"):
                bpd = start_bpd(n, seed)
            print(f"{name}: {n} init images (seed {seed}) {bpd:.3f} bits/dim, 128: {full:.3f}")
            assert bpd < full + 2.0, (n, seed, bpd, full)


@pytest.mark.parametrize("n", [flows.SMALL_INIT_BATCH, 128])
def test_full_init_batches_initialise_bit_for_bit_as_before(n, monkeypatch):
    """From SMALL_INIT_BATCH images on, the ActNorm statistics are the plain per-element ones
    of the official rule (the pooling is off), so a 128-image init is unchanged."""
    x = torch.randn(n, 2, 4, 4, dtype=torch.float64) * 2 + 1
    layer = flows.ActNorm((2, 4, 4)).double()
    layer.initialize(x)
    mean = x.mean(0)
    scale = nets.data_init_scale((x - mean).square().mean(0))
    assert torch.equal(layer.log_scale, torch.log(scale))
    assert torch.equal(layer.bias, -mean * scale)
    # the whole model: equal to an init with the pooling switched off
    images = _images(_build("vflow-digits"), n, seed=4)
    states = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(flows, "small_batch_variance", lambda var, batch: var)
        torch.manual_seed(0)
        states.append(_state(_build("vflow-digits").initialize(images)))
    for k, v in states[0].items():
        assert torch.equal(v, states[1][k]), k


def test_small_batch_variance_pools_toward_the_channel():
    """var' = w var + (1 - w) pooled_c, w = (B - 2) / (SMALL_INIT_BATCH - 2), pooled_c the
    channel's mean per-element variance times B / (B - 1); computed here by hand."""
    x = torch.tensor(
        [[[[0.0, 1.0], [5.0, 5.0]]], [[[2.0, 1.0], [1.0, 5.0]]]], dtype=torch.float64
    )  # (2, 1, 2, 2): per-element variances 1, 0, 4, 0
    layer = flows.ActNorm((1, 2, 2)).double()
    layer.initialize(x)  # 2 samples: w = 0, every element gets the pooled variance
    pooled = (1 + 0 + 4 + 0) / 4 * 2
    torch.testing.assert_close(
        layer.log_scale, torch.full((1, 2, 2), -0.5 * math.log(pooled + 1e-8), dtype=torch.float64)
    )
    torch.testing.assert_close(layer.bias, -x.mean(0) / math.sqrt(pooled + 1e-8))
    # 5 samples, two channels pooled separately
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    var = x.var(0, unbiased=False)
    w = (5 - 2) / (flows.SMALL_INIT_BATCH - 2)
    pooled = var.flatten(1).mean(1).view(2, 1, 1) * 5 / 4
    expected = w * var + (1 - w) * pooled
    torch.testing.assert_close(flows.small_batch_variance(var, 5), expected, rtol=1e-14, atol=0)
    big = torch.rand(3, 4, 4)
    assert flows.small_batch_variance(big, flows.SMALL_INIT_BATCH) is big

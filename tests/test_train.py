"""Trainer tests on a tiny stand-in model (fast) with dropout and sampling noise, so that
exact resume really depends on restoring the data position and every RNG state."""

import math
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from vflow import train as T
from vflow.evaluate import read_metrics


class TinyModel(nn.Module):
    """A small latent-variable model of 8x8 digits with VFlow's interface.

    p(x + u | z) is a factorised logistic over [0, n_bins) whose location comes from a
    network of z (with dropout); z ~ N(0, I) = q(z), u ~ U(0, 1) = r(u|x). So
    ``elbo = log p(x + u | z)`` is a lower bound of log P(x); ``noise=False`` fixes u = 1/2,
    z = 0 (a deterministic objective, for comparing distributed and single-process runs).
    """

    def __init__(self, data_shape=(1, 8, 8), n_bins=17, hidden=16, dropout=0.2, noise=True, zdim=4):
        super().__init__()
        self.config = {"name": "tiny", "data_shape": tuple(data_shape), "n_bins": n_bins}
        d = math.prod(data_shape)
        self.noise, self.zdim = noise, zdim
        self.net = nn.Sequential(
            nn.Linear(zdim, hidden), nn.Tanh(), nn.Dropout(dropout), nn.Linear(hidden, 2 * d)
        )
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("initialized", torch.tensor(0))

    @torch.no_grad()
    def initialize(self, x):
        self.bias.copy_(x.flatten(1).float().mean(0) + 0.5)
        self.initialized.fill_(1)

    def _params(self, z):
        out = self.net(z)
        loc, log_s = out.chunk(2, dim=1)
        return loc + self.bias, log_s.clamp(-3, 3)

    def _objective(self, x, z, u):
        loc, log_s = self._params(z)
        y = x.flatten(1).float() + u
        t = (y - loc) * torch.exp(-log_s)
        return (-t - log_s - 2 * nn.functional.softplus(-t)).sum(1)

    def elbo(self, x):
        b = x.shape[0]
        if self.noise:
            z = torch.randn(b, self.zdim)
            u = torch.rand(b, x[0].numel())
        else:
            z, u = torch.zeros(b, self.zdim), torch.full((b, x[0].numel()), 0.5)
        return self._objective(x, z, u)

    def bpd(self, x):
        return -self.elbo(x) / (x[0].numel() * math.log(2))

    def log_prob(self, x, num_samples=16, chunk_size=None):
        r = torch.stack([self.elbo(x).double() for _ in range(num_samples)])
        return torch.logsumexp(r, 0) - math.log(num_samples)

    def sample(self, n, temperature=1.0):
        loc, log_s = self._params(torch.randn(n, self.zdim) * temperature)
        u = torch.rand_like(loc).clamp(1e-6, 1 - 1e-6)
        y = loc + torch.exp(log_s) * temperature * (torch.log(u) - torch.log1p(-u))
        n_bins = self.config["n_bins"]
        return y.floor().clamp(0, n_bins - 1).long().view(n, *self.config["data_shape"])

    def set_backend(self, name):
        pass


def tiny_build(spec):
    return TinyModel(**spec.get("overrides", {}))


def _args(tmp_path, name="run", **kw):
    base = dict(
        config="vflow-digits",
        out=str(tmp_path / name),
        steps=12,
        batch_size=16,
        lr=1e-2,
        warmup=3,
        log_every=2,
        eval_every=0,
        ckpt_every=0,
        final_eval=False,
        n_samples=0,
        progress=False,
        seed=3,
        ema_decay=0.9,
    )
    base.update(kw)
    return T.TrainArgs(**base)


def _flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------- schedule


def test_learning_rate_official_vflow_cifar_schedule():
    r = T.get_recipe("vflow-cifar10")
    assert r["lr"] == 1.2e-3 and r["warmup"] == 2000 and r["batch_size"] == 64
    lr = T.learning_rate
    assert lr(0, r) == 0.0
    assert lr(1, r) == pytest.approx(1.2e-3 / 2000)
    assert lr(1000, r) == pytest.approx(0.6e-3)
    assert lr(2000, r) == pytest.approx(1.2e-3)
    assert lr(50_000, r) == pytest.approx(1.2e-3)
    assert lr(50_001, r) == pytest.approx(1.2e-3 * 0.99999)
    assert lr(60_000, r) == pytest.approx(1.2e-3 * 0.99999**10_000)
    # the floor: 1.2e-3 * 0.99999^k = 3e-4 at k = ln 4 / -ln 0.99999 ~ 138,629
    k = math.log(4) / -math.log(0.99999)
    assert lr(50_000 + int(k) - 100, r) > 3e-4
    assert lr(50_000 + int(k) + 100, r) == pytest.approx(3e-4)
    assert lr(2_000_000, r) == pytest.approx(3e-4)
    # monotone warm-up, hold, monotone decay
    steps = [0, 10, 1999, 2000, 30_000, 50_000, 80_000, 200_000]
    vals = [lr(s, r) for s in steps]
    assert vals[:4] == sorted(vals[:4]) and vals[5:] == sorted(vals[5:], reverse=True)


def test_recipes_flowpp_imagenet_digits_and_overrides():
    f = T.get_recipe("flowpp-cifar10")
    assert f["lr"] == 3e-4 and T.learning_rate(10**6, f) == pytest.approx(3e-4)
    i = T.get_recipe("vflow-imagenet32")
    assert (i["lr"], i["warmup"], i["batch_size"]) == (1e-3, 5000, 32)
    assert T.get_recipe("vflow-cifar10-4m")["lr"] == 1.2e-3  # family fallback
    d = T.get_recipe("vflow-digits", lr=5e-3, warmup=None)
    assert d["lr"] == 5e-3 and d["warmup"] == T.RECIPES["vflow-digits"]["warmup"]
    assert T.learning_rate(0, {"lr": 1e-3, "warmup": 0}) == 1e-3
    with pytest.raises(KeyError, match="unknown recipe key"):
        T.get_recipe("vflow-digits", lr_typo=1)


def test_ema_follows_parameters():
    m = nn.Linear(2, 2)
    ema = T.EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    w_init = ema.params["weight"].clone()
    ema.update(m)  # decay_0 = min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.params["weight"], 0.1 * w_init + 0.9)
    for _ in range(50):
        ema.update(m)
    assert torch.allclose(ema.params["weight"], torch.ones(2, 2), atol=1e-6)
    m2 = ema.copy_to(nn.Linear(2, 2))
    assert torch.allclose(m2.weight, torch.ones(2, 2), atol=1e-6)


# ----------------------------------------------------------------------------- training


def test_training_reduces_bpd_and_writes_artifacts(tmp_path):
    args = _args(
        tmp_path,
        steps=40,
        final_eval=True,
        iw_samples=4,
        n_samples=16,
        eval_every=20,
        ckpt_every=20,
    )
    res = T.train(args, build_fn=tiny_build)
    rows = read_metrics(os.path.join(args.out, "metrics.jsonl"))
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows[-1]["train_bpd"] < train_rows[0]["train_bpd"]
    assert res.final["iw_bpd"] <= res.final["elbo_bpd"] + 1e-6
    for f in ("loss.png", "samples.png", "samples-00000020.png", "run.json"):
        assert os.path.isfile(os.path.join(args.out, f)), f
    assert [os.path.basename(p) for p in T.list_checkpoints(args.out)] == [
        "ckpt-00000020.pt",
        "ckpt-00000040.pt",
    ]
    assert bool(res.model.initialized)  # data-dependent init ran
    recipe = T.get_recipe("vflow-digits", lr=1e-2, warmup=3, batch_size=16, ema_decay=0.9)
    for r in train_rows:  # the optimiser ran on the schedule
        assert r["lr"] == pytest.approx(T.learning_rate(r["step"], recipe))
    assert train_rows[0]["lr"] < train_rows[-1]["lr"] == 1e-2


def test_epochs_set_the_number_of_steps(tmp_path):
    # 1,438 training digits, global batch 700 -> 2 batches per epoch
    res = T.train(_args(tmp_path, steps=None, epochs=3, batch_size=700), build_fn=tiny_build)
    assert res.step == 6
    ck = torch.load(res.checkpoint, weights_only=True)
    assert ck["data_position"] == {"epoch": 2, "index": 2, "seed": 3, "batch_size": 700}


def test_model_and_data_shapes_must_agree(tmp_path):
    with pytest.raises(ValueError, match="n_bins=256"):
        T.train(_args(tmp_path), build_fn=lambda spec: TinyModel(n_bins=256))
    with pytest.raises(ValueError, match="shape"):
        T.train(_args(tmp_path), build_fn=lambda spec: TinyModel(data_shape=(3, 8, 8)))


def test_checkpoint_round_trip_is_data_only(tmp_path):
    args = _args(tmp_path, steps=4, keep=2)
    res = T.train(args, build_fn=tiny_build)
    ck = torch.load(res.checkpoint, weights_only=True)  # no code in a checkpoint
    assert ck["step"] == 4 and ck["data_position"]["index"] == 4
    assert ck["model_spec"]["name"] == "vflow-digits"
    for k, v in res.model.state_dict().items():
        assert torch.equal(ck["model"][k], v)
    model, _ = T.load_run_model(args.out, build_fn=tiny_build)
    for k, v in res.ema.params.items():
        assert torch.equal(dict(model.named_parameters())[k], v)
    assert not [f for f in os.listdir(args.out) if ".tmp" in f]  # atomic write left no temp


def test_resume_matches_uninterrupted_run_exactly(tmp_path):
    full = T.train(_args(tmp_path, "full", steps=14, ckpt_every=5), build_fn=tiny_build)
    half = T.train(_args(tmp_path, "split", steps=7), build_fn=tiny_build)
    assert not torch.equal(_flat(half.model), _flat(full.model))
    # the resumed process starts from a scrambled global RNG: the checkpoint must restore it
    torch.manual_seed(12345)
    resumed = T.train(_args(tmp_path, "split", steps=14, resume=True), build_fn=tiny_build)
    assert resumed.step == 14
    assert torch.equal(_flat(resumed.model), _flat(full.model))
    for k in full.ema.params:
        assert torch.equal(resumed.ema.params[k], full.ema.params[k])


def test_resume_without_restoring_rng_would_differ(tmp_path, monkeypatch):
    """The exact-resume test can fail: skip restoring the RNG and the runs diverge."""
    full = T.train(_args(tmp_path, "full", steps=10), build_fn=tiny_build)
    T.train(_args(tmp_path, "split", steps=5), build_fn=tiny_build)
    monkeypatch.setattr(T, "set_rng_state", lambda state, device: None)
    torch.manual_seed(12345)
    resumed = T.train(_args(tmp_path, "split", steps=10, resume=True), build_fn=tiny_build)
    assert not torch.equal(_flat(resumed.model), _flat(full.model))


def test_resume_requires_checkpoint_and_refuses_overwrite(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        T.train(_args(tmp_path, resume=True), build_fn=tiny_build)
    T.train(_args(tmp_path, steps=2), build_fn=tiny_build)
    with pytest.raises(FileExistsError, match="--resume"):
        T.train(_args(tmp_path, steps=2), build_fn=tiny_build)


class NaNModel(TinyModel):
    """Returns a NaN objective on the steps listed in ``bad`` (counted per elbo call)."""

    def __init__(self, bad=(), **kw):
        super().__init__(**kw)
        self.bad, self.calls = set(bad), 0

    def elbo(self, x):
        out = super().elbo(x)
        self.calls += 1
        if self.calls in self.bad:
            out = out * torch.tensor(float("nan"))
        return out


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
    args = _args(tmp_path, steps=10)
    res = T.train(args, build_fn=lambda spec: NaNModel(bad={3, 4, 8}))
    assert res.skipped == 3 and res.step == 10
    assert torch.isfinite(_flat(res.model)).all()
    assert res.ema.updates == 7
    rows = read_metrics(os.path.join(args.out, "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "skip"] == [3, 4, 8]
    assert rows[-1]["skipped"] == 3


def test_too_many_nonfinite_steps_stop_with_last_good_checkpoint(tmp_path):
    args = _args(tmp_path, steps=30, ckpt_every=4, max_bad_steps=5)
    with pytest.raises(T.NonFiniteError, match="5 consecutive"):
        T.train(args, build_fn=lambda spec: NaNModel(bad=set(range(7, 100))))
    ck = torch.load(T.latest_checkpoint(args.out), weights_only=True)
    assert ck["step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# ----------------------------------------------------------------------------- distributed


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out, kw):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    args = T.TrainArgs(**kw)
    res = T.train(args, build_fn=tiny_build)
    torch.save(
        {
            "params": _flat(res.model),
            "ema": torch.cat([v.flatten() for v in res.ema.params.values()]),
            "final": res.final,
        },
        os.path.join(out, f"rank{rank}.pt"),
    )
    # All work is done and saved. About one spawned rank in ten aborted here, in interpreter
    # teardown after destroy_process_group ("terminate called without an active exception",
    # SIGABRT), which mp.spawn reports as a failure: leave without the C++ static destructors.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_process_ddp_matches_single_process(tmp_path):
    kw = dict(
        config="vflow-digits",
        steps=6,
        batch_size=16,
        lr=1e-2,
        warmup=2,
        log_every=2,
        eval_every=0,
        ckpt_every=3,
        final_eval=True,
        iw_samples=2,
        n_samples=4,
        progress=False,
        seed=5,
        ema_decay=0.9,
        eval_images=None,
        overrides={"noise": False, "dropout": 0.0},
    )
    single = T.train(T.TrainArgs(out=str(tmp_path / "single"), **kw), build_fn=tiny_build)
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), str(out), dict(out=str(out / "run"), **kw)),
        nprocs=2,
        join=True,
    )
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert torch.equal(r0["params"], r1["params"])  # ranks in sync
    assert torch.equal(r0["ema"], r1["ema"])
    torch.testing.assert_close(r0["params"], _flat(single.model), rtol=1e-5, atol=1e-5)
    # the ranks saw different images: had init not been broadcast, they would differ
    assert r0["final"]["n"] == r1["final"]["n"] == single.final["n"]
    assert r0["final"]["elbo_bpd"] == pytest.approx(single.final["elbo_bpd"], rel=1e-5)
    # only rank 0 wrote: one set of checkpoints, written once, with both ranks' RNG states
    ck = torch.load(T.latest_checkpoint(str(out / "run")), weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["rng"][1] is not None
    assert os.path.isfile(out / "run" / "samples.png")


def test_channels_last_training_matches_contiguous(tmp_path):
    """--channels-last changes the memory layout only: same weights after a few steps."""
    kw = dict(steps=3, batch_size=8, n_samples=0)
    plain = T.train(_args(tmp_path, "plain", **kw))
    chlast = T.train(_args(tmp_path, "chlast", channels_last=True, **kw))
    conv = next(m for m in chlast.model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    # Adam normalises the gradients, so float32 noise in small ones reaches ~lr * 1e-2
    torch.testing.assert_close(_flat(chlast.model), _flat(plain.model), atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize(
    "compile_value,expected",
    [
        ("elbo", [("_ElboObjective", {"cpp_wrapper": True})]),
        ("regional", []),  # the tiny model has no network blocks to compile
        (True, []),  # older runs' saved compile: true and compile=True mean regional
        ("off", []),
        (False, []),
    ],
)
def test_compile_modes(tmp_path, monkeypatch, compile_value, expected):
    compiled, regional = [], []

    def fake_compile(module, options=None):
        compiled.append((type(module).__name__, options))
        return module

    monkeypatch.setattr(T.torch, "compile", fake_compile)
    monkeypatch.setattr(T, "compile_regions", lambda model, device: regional.append(model))
    T.train(_args(tmp_path, steps=2, compile=compile_value), build_fn=tiny_build)
    assert compiled == expected
    assert len(regional) == (compile_value in ("regional", True))


def test_an_old_run_saved_with_compile_true_resumes_regionally(tmp_path, monkeypatch):
    """Checkpoints of older versions hold ``compile: true``; a bare --resume keeps compiling,
    now regionally."""
    regional = []
    monkeypatch.setattr(T, "compile_regions", lambda model, device: regional.append(model))
    T.train(_args(tmp_path, steps=1), build_fn=tiny_build)
    path = T.latest_checkpoint(str(tmp_path / "run"))
    ck = torch.load(path, weights_only=True)
    ck["args"]["compile"] = True
    torch.save(ck, path)
    T.train(_args(tmp_path, steps=2, resume=True), build_fn=tiny_build)
    assert len(regional) == 1


def test_unknown_compile_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="compile must be one of regional, elbo, off"):
        T.train(_args(tmp_path, steps=1, compile="whole"), build_fn=tiny_build)


# ----------------------------------------------------------------------------- activation ckpt


def _needs_activation_checkpointing():
    from vflow.models import VFlow

    if not hasattr(VFlow, "set_activation_checkpointing"):
        pytest.skip("VFlow.set_activation_checkpointing is not implemented yet")


def test_activation_checkpointing_flag_keeps_the_losses(tmp_path):
    """--activation-checkpointing only trades memory for compute: the real digits model
    trains to the same losses (the first step's bit for bit) and weights."""
    _needs_activation_checkpointing()
    kw = dict(steps=3, batch_size=8, log_every=1, overrides={"context_filters": 4})
    plain = T.train(_args(tmp_path, "plain", **kw))
    ckpt = T.train(_args(tmp_path, "ckpt", activation_checkpointing=True, **kw))
    assert ckpt.model.activation_checkpointing is not None
    assert plain.model.activation_checkpointing is None
    rows = [
        [r["train_bpd"] for r in read_metrics(os.path.join(res.run_dir, "metrics.jsonl"))]
        for res in (plain, ckpt)
    ]
    assert rows[0][0] == rows[1][0]
    assert rows[1] == pytest.approx(rows[0], rel=1e-5)
    torch.testing.assert_close(_flat(ckpt.model), _flat(plain.model), atol=2e-4, rtol=1e-3)


def test_activation_checkpointing_is_kept_on_resume(tmp_path):
    _needs_activation_checkpointing()
    kw = dict(batch_size=8, overrides={"context_filters": 4})
    T.train(_args(tmp_path, steps=1, activation_checkpointing=True, **kw))
    assert torch.load(T.latest_checkpoint(str(tmp_path / "run")), weights_only=True)["args"][
        "activation_checkpointing"
    ]
    res = T.train(_args(tmp_path, steps=2, resume=True, batch_size=8))
    assert res.model.activation_checkpointing is not None
    ck = torch.load(T.latest_checkpoint(res.run_dir), weights_only=True)
    assert ck["step"] == 2 and ck["args"]["activation_checkpointing"] is True


def test_activation_checkpointing_needs_a_model_that_supports_it(tmp_path):
    with pytest.raises(ValueError, match="model TinyModel has no set_activation_checkpointing"):
        T.train(_args(tmp_path, activation_checkpointing=True), build_fn=tiny_build)

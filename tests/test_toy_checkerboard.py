"""Tests of the section-5 toy models (vflow.toy) and benchmarks/toy_checkerboard.py."""

import csv
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.autograd.functional import jacobian

from vflow import toy

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "toy_checkerboard.py"


pytestmark = pytest.mark.usefixtures("one_thread")


def load_script():
    spec = importlib.util.spec_from_file_location("toy_checkerboard", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def perturbed(model, scale=0.3):
    """Cast to float64, in place, with every parameter moved off its (identity) initialisation."""
    model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def test_sampler_is_uniform_on_the_black_cells():
    n = 80_000
    x = toy.sample_checkerboard(n, torch.Generator().manual_seed(0))
    assert x.shape == (n, 2)
    assert (x.abs() <= 4).all()
    cell = torch.floor(x / 2).long() + 2  # 0..3 per axis
    counts = torch.zeros(4, 4)
    counts.index_put_((cell[:, 0], cell[:, 1]), torch.ones(n), accumulate=True)
    black = (torch.arange(4)[:, None] + torch.arange(4)[None, :]) % 2 == 0
    assert counts[~black].sum() == 0, "points on the wrong colour"
    expected, sd = n / 8, math.sqrt(n / 8 * (1 - 1 / 8))
    assert (counts[black] - expected).abs().max() < 5 * sd, counts
    # uniform within a cell: the offset inside the cell is U(0, 2): mean 1, variance 4/12
    frac = x - 2 * torch.floor(x / 2)
    assert torch.allclose(frac.mean(0), torch.ones(2), atol=0.02)
    assert torch.allclose(frac.var(0), torch.full((2,), 4 / 12), atol=0.02)
    # the density function agrees with the sampler and integrates to 1
    assert (toy.checkerboard_density(x) == 1 / 32).all()
    g = (torch.arange(200) + 0.5) / 200 * 8 - 4
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).view(-1, 2)
    assert toy.checkerboard_density(grid).sum() * (8 / 200) ** 2 == pytest.approx(1.0)


FLOWS = {
    "glow D=2 L=3": (lambda: toy.Glow(2, 3).flow, 2, 0),
    "glow D=10 L=2": (lambda: toy.Glow(10, 2).flow, 10, 0),
    "q D_Z=8": (lambda: toy.CondFlow(8, 2).flow, 8, 2),
    "q D_Z=2": (lambda: toy.CondFlow(2, 2).flow, 2, 2),
    "q D_Z=1 (Gaussian)": (lambda: toy.CondFlow(1, 2).flow, 1, 2),
    # issue 30's factors
    "glow D=4 L=2 scale sigmoid": (lambda: toy.Glow(4, 2, scale="sigmoid").flow, 4, 0),
    # unbounded log-scales of a 0.3-perturbed net overflow exp(): a smaller perturbation
    "glow D=4 L=2 scale none": (lambda: toy.Glow(4, 2, scale="none").flow, 4, 0, 0.05),
    "glow D=4 L=2 tanh": (lambda: toy.Glow(4, 2, activation="tanh").flow, 4, 0),
    "glow D=4 L=2 elu": (lambda: toy.Glow(4, 2, activation="elu").flow, 4, 0),
    "glow D=4 L=2 reverse": (lambda: toy.Glow(4, 2, mixing="reverse").flow, 4, 0),
    "glow D=4 L=2 identity": (lambda: toy.Glow(4, 2, mixing="identity").flow, 4, 0),
    "glow D=4 L=2 actnorm": (lambda: toy.Glow(4, 2, mixing="actnorm").flow, 4, 0),
    "q D_Z=4 actnorm two steps": (lambda: toy.CondFlow(4, 2, 2, mixing="actnorm").flow, 4, 2),
    "q D_Z=4 two steps + base": (lambda: toy.CondFlow(4, 2, 2, True).flow, 4, 2),
    "q D_Z=4 reverse sigmoid": (
        lambda: toy.CondFlow(4, 2, gaussian_base=True, mixing="reverse", scale="sigmoid").flow,
        4,
        2,
    ),
}


@pytest.mark.parametrize("name", list(FLOWS))
def test_inverse_and_logdet(name):
    make, dim, cdim, *scale = FLOWS[name]
    flow = perturbed(make(), *scale)
    x = 2 * torch.randn(5, dim, dtype=torch.float64)
    c = torch.randn(5, cdim, dtype=torch.float64) if cdim else None
    y, logdet = flow(x, c)
    assert not torch.allclose(y, x, atol=1e-2), "the flow should not be the identity"
    x_back, logdet_inv = flow.inverse(y, c)
    torch.testing.assert_close(x_back, x, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(logdet_inv, -logdet, atol=1e-9, rtol=1e-9)
    for i in range(x.shape[0]):
        ci = None if c is None else c[i : i + 1]
        jac = jacobian(lambda v, ci=ci: flow(v[None], ci)[0][0], x[i])
        assert logdet[i].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-9)


def test_conditional_flow_depends_on_context():
    flow = perturbed(toy.CondFlow(4, 2).flow)
    z = torch.randn(3, 4, dtype=torch.float64)
    c = torch.randn(3, 2, dtype=torch.float64)
    assert not torch.allclose(flow(z, c)[0], flow(z, c + 1)[0])


def test_importance_sampling_bounds_and_converges():
    """ELBO <= E[S-sample IS estimate] ~= log p(x); log p(x) = log int p(x, z) dz by quadrature
    for a 3-dim VFlow (D_Z = 1)."""
    model = toy.VFlow(3, 3).double()
    perturbed(model.p, scale=0.2)  # q stays at its initialisation N(0, 1): wide enough for
    x = toy.sample_checkerboard(4, torch.Generator().manual_seed(1)).double()  # 1e5 samples
    zs = torch.linspace(-40, 40, 40_001, dtype=torch.float64)
    exact = []
    with torch.no_grad():
        for xi in x:
            lp = model.p.log_prob(torch.cat([xi.expand(len(zs), 2), zs[:, None]], 1))
            exact.append(torch.logsumexp(lp, 0) + math.log(zs[1] - zs[0]))
        exact = torch.stack(exact)
        reps = 400
        xr = x.repeat(reps, 1)
        elbo = model.elbo(xr).view(reps, -1).mean(0)
        is8 = model.log_likelihood(xr, samples=8).view(reps, -1).mean(0)
        is_big = model.log_likelihood(x, samples=100_000)
    assert (exact - elbo).mean() > 0.05, "the model should leave a gap between ELBO and log p"
    assert (is8 - elbo).mean() > 0.02 and (is8 >= elbo - 0.01).all()
    assert (is8 < exact + 0.02).all()
    torch.testing.assert_close(is_big, exact, atol=0.03, rtol=0)


def test_glow_density_grid_is_normalised():
    model = perturbed(toy.Glow(2, 2), scale=0.1).float()
    dens = toy.density_grid(model, n=100, lim=12.0)
    assert dens.shape == (100, 100)
    assert dens.sum().item() * (24 / 100) ** 2 == pytest.approx(1.0, abs=0.02)


def test_short_training_improves_the_likelihood():
    before = toy.train_and_evaluate(2, 2, seed=0, iters=0, threads=None)["test_ll"]
    after = toy.train_and_evaluate(2, 2, seed=0, iters=300, threads=None)["test_ll"]
    x = toy.fixed_test_set()  # an untrained model is N(0, I) exactly
    assert before == pytest.approx((-math.log(2 * math.pi) - x.pow(2).sum(1) / 2).mean().item())
    assert after > before + 0.3


@pytest.mark.parametrize("workers,trainer", [(1, "single"), (2, "ensemble"), (1, "ensemble")])
def test_quick_run_writes_outputs(tmp_path, workers, trainer, capsys):
    script = load_script()
    args = ["--dims", "2,10", "--steps", "3", "--iters", "40", "--seeds", "2"]
    args += ["--samples", "8", "--density-px", "24", "--workers", str(workers)]
    args += ["--trainer", trainer, "--speed-iters", "3", "--speed-rounds", "1"]
    rows = script.main(args + ["--out", str(tmp_path)])
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["dims"]), int(r["steps"])) for r in table] == [(2, 3), (10, 3)]
    for r, row in zip(table, rows, strict=True):
        assert int(r["seeds"]) == 2 and int(r["iters"]) == 40
        assert int(r["params"]) == toy.n_params(toy.make_model(int(r["dims"]), 3))
        assert -12 < float(r["ll_mean"]) < -math.log(32) + 0.1
        assert 0 < float(r["ll_std"]) < 2
        assert float(r["ll_mean"]) == pytest.approx(row["ll_mean"])
    with open(tmp_path / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    import matplotlib.image as mpimg

    for name in ["ll_vs_params", "density", "density_data", "density_D2_L3", "density_D10_L3"]:
        img = mpimg.imread(tmp_path / f"{name}.png")
        assert img.ndim == 3 and img.shape[0] >= 24 and img.std() > 0, name
    assert not (tmp_path / "density_D2_L20.png").exists()  # not in this grid
    if trainer == "ensemble":  # learning curves: 10 windows of 4 iterations per run
        with open(tmp_path / "curves.csv") as f:
            curve = list(csv.DictReader(f))
        assert len(curve) == 4 * 10 and {int(r["iter"]) for r in curve} == set(range(4, 41, 4))
        assert all(math.isfinite(float(r["train_elbo"])) for r in curve)
        assert mpimg.imread(tmp_path / "curves.png").std() > 0
        for r in table:  # the ELBO from the IW draws is below the IW estimate; equal for Glow
            gap = float(r["ll_mean"]) - float(r["elbo_mean"])
            assert gap == 0 if r["dims"] == "2" else gap > 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "predicted training time of the grid at 100000" in printed
    assert f"runs ({trainer} trainer)" in printed


def test_previous_runs_are_reused_not_retrained(tmp_path, capsys):
    """``--previous-runs``: the runs of the file that belong to the grid are read back, not
    trained again (a planted test_ll shows up in the table), and only the rest is trained;
    runs at other iteration counts or outside the grid are ignored."""
    script = load_script()
    common = ["--steps", "3", "--iters", "40", "--seeds", "2", "--samples", "8"]
    common += ["--density-px", "24", "--workers", "1", "--speed-iters", "0"]
    script.main(["--dims", "2", *common, "--out", str(tmp_path / "a")])
    with open(tmp_path / "a" / "runs.csv") as f:
        previous = list(csv.DictReader(f))
    for r in previous:
        r["test_ll"] = "-7.25"  # planted: a retrained run would not have it
    other = dict(previous[0], iters="80", test_ll="-9.0")  # another budget: ignored
    outside = dict(previous[0], steps="5", test_ll="-9.0")  # not in the grid: ignored
    with open(tmp_path / "previous.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(previous[0]))
        writer.writeheader()
        writer.writerows(previous + [other, outside])
    capsys.readouterr()
    rows = script.main(
        ["--dims", "2,10", *common, "--previous-runs", str(tmp_path / "previous.csv"),
         "--out", str(tmp_path / "b")]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "reused 2 runs" in printed and "trained 2" in printed
    assert [(r["dims"], r["ll_mean"], r["seeds"]) for r in rows][0] == (2, -7.25, 2)
    assert rows[1]["dims"] == 10 and rows[1]["ll_mean"] > -7 and rows[1]["seeds"] == 2
    with open(tmp_path / "b" / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["dims"], r["seed"]) for r in runs) == [("10", "0"), ("10", "1"),
                                                           ("2", "0"), ("2", "1")]  # fmt: skip
    (tmp_path / "bad.csv").write_text("dims,steps\n2,3\n")
    with pytest.raises(ValueError, match="--previous-runs: .* lacks the columns"):
        script.main(["--dims", "2", *common, "--previous-runs", str(tmp_path / "bad.csv"),
                     "--out", str(tmp_path / "c")])  # fmt: skip


def test_job_plan_covers_the_grid_once_and_balances_the_workers():
    script = load_script()
    dims, steps = [2, 4, 6, 8, 10], [2, 3, 4, 5, 10, 15, 20]
    for workers in (1, 2, 3):
        plan = script.plan_jobs(dims, steps, 5, workers)
        got = sorted((d, l, s) for d, members in plan for l, s in members)
        assert got == sorted((d, l, s) for d in dims for l in steps for s in range(5))
        one_per_dim = [script.job_cost(d, [(l, s) for l in steps for s in range(5)]) for d in dims]
        costs = [script.job_cost(*j) for j in plan]
        assert script.lpt_makespan(costs, workers) <= script.lpt_makespan(one_per_dim, workers)
    assert len(script.plan_jobs(dims, steps, 5, 1)) == 5  # one process: no split pays
    done = {(2, l, s) for l in steps for s in range(5)} | {(4, 3, 0)}  # all of D=2, one more
    plan = script.plan_jobs(dims, steps, 5, 2, frozenset(done))
    got = sorted((d, l, s) for d, members in plan for l, s in members)
    assert got == sorted((d, l, s) for d in dims for l in steps for s in range(5)
                         if (d, l, s) not in done)  # fmt: skip
    assert all(d != 2 for d, _ in plan)
    assert script.lpt_makespan([4, 3, 3], 2) == 6 and script.lpt_makespan([1, 1, 1, 1], 3) == 2


def test_summary_uses_the_sample_std_over_seeds():
    script = load_script()
    runs = [
        {"dims": 2, "steps": 3, "params": 10, "iters": 5, "test_ll": v} for v in (-3.0, -4.0)
    ] + [{"dims": 4, "steps": 3, "params": 20, "iters": 5, "test_ll": -3.5}]
    rows = script.summarise(runs)
    assert [(r["dims"], r["ll_mean"], r["seeds"]) for r in rows] == [(2, -3.5, 2), (4, -3.5, 1)]
    assert rows[0]["ll_std"] == pytest.approx(math.sqrt(0.5))  # ddof=1, not 0.5
    assert rows[1]["ll_std"] == 0.0


def test_run_parallel_runs_every_job_in_worker_processes():
    load_script()  # puts benchmarks/ on sys.path
    from _common import run_parallel

    jobs = [{"x": 4.0}, {"x": 9.0}, {"x": 16.0}]
    for workers in (1, 2):
        seen = []
        results = run_parallel(dict, jobs, workers, on_result=seen.append)  # dict(**job): copies
        assert sorted(r["x"] for r in results) == [4.0, 9.0, 16.0]
        assert seen == results  # each result handed over as it arrived, in completion order


# ---- the batched ensemble trainer (toy.ToyEnsemble) against the one-model loop ----


def test_batched_samplers_draw_the_single_model_streams():
    """checkerboard_batches / normal_batches give, bit for bit, the batches the one-model loop
    draws one call at a time, and leave the generator in the same state."""
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    loop = torch.stack([toy.sample_checkerboard(64, g1) for _ in range(37)])
    assert torch.equal(toy.checkerboard_batches(g2, 37, 64), loop)
    assert torch.equal(g1.get_state(), g2.get_state())
    for dz, dtype in [(8, torch.float32), (2, torch.float64), (3, torch.float32)]:
        g1, g2 = torch.Generator().manual_seed(dz), torch.Generator().manual_seed(dz)
        loop = torch.stack([torch.randn(64, dz, generator=g1, dtype=dtype) for _ in range(9)])
        assert torch.equal(toy.normal_batches(g2, 9, 64, dz, dtype), loop)
        assert torch.equal(g1.get_state(), g2.get_state())


MEMBERS = [(2, 0), (3, 1), (3, 0), (4, 2)]  # (steps, seed): mixed depths and seeds


def assert_members_follow_the_single_loop(
    dim, members, iters, dtype, atol, q_base=False, lr=1e-3, schedule="constant", grad_clip=100.0
):
    """Train an ensemble and each member alone; compare losses and final weights."""
    ens = toy.ToyEnsemble(dim, members, q_base=q_base, dtype=dtype)
    for e, (steps, seed) in enumerate(ens.members):  # same initialisation, exactly
        torch.manual_seed(seed)
        ref = toy.make_model(dim, steps, q_base).to(dtype)
        for a, b in zip(ref.parameters(), ens.member_model(e).parameters(), strict=True):
            assert torch.equal(a, b)
    lrs = toy.lr_values(lr, schedule, iters)
    losses = ens.train(iters, chunk=64, lrs=lrs, grad_clip=grad_clip)  # chunks: not dividing
    worst = 0.0
    for e, (steps, seed) in enumerate(ens.members):
        model, ref_losses, skipped = toy.train_single(
            dim, steps, seed, iters, lr, q_base=q_base, dtype=dtype, schedule=schedule,
            grad_clip=grad_clip,
        )  # fmt: skip
        assert skipped == 0
        torch.testing.assert_close(losses[:, e], ref_losses, atol=atol, rtol=0)
        got = dict(ens.member_model(e).named_parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name], p, atol=atol, rtol=0, msg=name)
            worst = max(worst, (got[name] - p).abs().max().item())
    return ens, worst


@pytest.mark.parametrize("dim", [2, 6])
def test_ensemble_members_follow_the_single_model_loop_float64(dim):
    """300 steps in float64: every member (mixed depths and seeds) matches train_single to
    1e-10 (seen: ~1e-15), losses and weights; any shared or misrouted stream, weight or
    optimiser state would show as differences of order 1e-3 or more."""
    assert_members_follow_the_single_loop(dim, MEMBERS, 300, torch.float64, atol=1e-10)


def test_ensemble_members_follow_the_single_model_loop_float32():
    """The production dtype, 50 steps, to float32 rounding (bmm vs mm sums). Longer runs drift
    apart chaotically (Adam normalises near-zero gradients, so rounding noise becomes steps of
    size lr): seen up to 1e-4 in the losses of some members by step 100 and 5e-3 by step 300,
    while others stay within 2e-6 for 300 steps; float64 above shows that no bug hides there."""
    assert_members_follow_the_single_loop(10, MEMBERS, 50, torch.float32, atol=1e-4)


def test_ensemble_with_q_base_follows_the_single_model_loop():
    assert_members_follow_the_single_loop(
        5, [(2, 3), (3, 4)], 100, torch.float64, atol=1e-10, q_base=True
    )


def test_ensemble_evaluation_matches_the_single_model():
    """Eq. 5 on the test points, batched, continues each member's stream as the single model
    continues the global one: the same estimates (to rounding) for every member."""
    dim, iters, samples = 4, 30, 8
    ens = toy.ToyEnsemble(dim, MEMBERS, dtype=torch.float64)
    ens.train(iters)
    x = toy.fixed_test_set(300).double()
    got = ens.log_likelihood(x, samples=samples, chunk=200, rows=700)
    assert got.shape == (len(MEMBERS), 300)
    for e, (steps, seed) in enumerate(ens.members):
        model, _, _ = toy.train_single(dim, steps, seed, iters, dtype=torch.float64)
        want = toy.log_likelihood(model.eval(), x, samples=samples, chunk=200)
        torch.testing.assert_close(got[e], want, atol=1e-10, rtol=0)


def test_a_member_with_a_nonfinite_loss_skips_its_step_alone():
    ens = toy.ToyEnsemble(4, MEMBERS)
    twin = toy.ToyEnsemble(4, MEMBERS)
    x, noise = ens.draw(1, 64)
    bad_x = x[0].clone()
    bad_x[1, 0, 0] = float("nan")
    before = ens.member_model(1).state_dict()
    losses = ens.train_step(bad_x, noise[0], 1e-3)
    twin.train_step(x[0], noise[0], 1e-3)
    assert not torch.isfinite(losses[1]) and torch.isfinite(losses[[0, 2, 3]]).all()
    assert ens.adam_steps.tolist() == [1, 0, 1, 1]
    for name, p in ens.member_model(1).state_dict().items():
        assert torch.equal(p, before[name]), name
    for e in (0, 2, 3):
        a, b = ens.member_model(e).state_dict(), twin.member_model(e).state_dict()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    ens.train_step(x[0], noise[0], 1e-3)  # step counts now differ: the per-row Adam path
    assert ens.adam_steps.tolist() == [2, 1, 2, 2]


def test_gradient_clipping_is_per_member():
    ens = toy.ToyEnsemble(6, MEMBERS)
    scale = torch.tensor([1e-3, 1.0, 1e3, 1e5])  # one scale per member
    for blk in ens.blocks:
        blk.grad.copy_(torch.randn_like(blk.grad) * scale[blk.row_member, None])
    norms = ens.clip_grad_norm_(100.0)
    after = torch.zeros(4)
    for blk in ens.blocks:
        after.index_add_(0, blk.row_member, blk.grad.pow(2).sum(1))
    want = torch.minimum(norms, torch.tensor(100.0))
    torch.testing.assert_close(after.sqrt(), want, rtol=1e-4, atol=0)
    assert norms[0] < 100 < norms[2]


def test_parameter_counts_of_the_quoted_cells():
    """The three models the paper quotes, with and without q's conditional Gaussian base."""
    counts = {
        (d, l, qb): toy.n_params(toy.make_model(d, l, qb))
        for d, l in [(2, 3), (10, 3), (2, 20)]
        for qb in (False, True)
    }
    assert counts[(2, 3, False)] == counts[(2, 3, True)] == 8274
    assert counts[(2, 20, False)] == counts[(2, 20, True)] == 55160
    assert (
        counts[(10, 3, True)] - counts[(10, 3, False)] == 2 * 50 + 50 + 50 * 50 + 50 + 50 * 16 + 16
    )


def test_window_means_average_finite_values_per_window():
    """Independent value: numpy's nanmean over each window (the last one shorter)."""
    vals = torch.randn(23, 3, dtype=torch.float64)
    vals[4, 1] = float("nan")
    vals[20, 2] = float("inf")
    got = toy.window_means(vals, 5)
    arr = vals.numpy().copy()
    arr[~np.isfinite(arr)] = np.nan
    want = np.stack([np.nanmean(arr[i : i + 5], axis=0) for i in range(0, 23, 5)])
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_ensemble_elbo_is_the_mean_log_weight_and_below_the_iw_bound():
    """``return_elbo``: a Glow's ELBO is its log-likelihood; a VFlow's ELBO, from the same
    draws, is at most the IW estimate per point (Jensen), equal to it with one sample, and an
    unbiased estimate of the single model's ELBO (within 5 standard errors)."""
    x = toy.fixed_test_set(300).double()
    glow = toy.ToyEnsemble(2, MEMBERS, dtype=torch.float64)
    glow.train(20)
    ll, elbo = glow.log_likelihood(x, samples=4, return_elbo=True)
    torch.testing.assert_close(ll, elbo, rtol=0, atol=0)

    ens = toy.ToyEnsemble(4, MEMBERS, dtype=torch.float64)
    ens.train(30)
    ll, elbo = ens.log_likelihood(x, samples=16, return_elbo=True)
    assert elbo.shape == ll.shape == (len(MEMBERS), 300)
    assert (ll - elbo).min() >= 0 and (ll - elbo).max() > 0
    ll1, elbo1 = ens.log_likelihood(x, samples=1, return_elbo=True)
    torch.testing.assert_close(ll1, elbo1, rtol=0, atol=1e-12)

    for e in range(len(MEMBERS)):
        model = ens.member_model(e).eval()
        with torch.no_grad():
            w = model.elbo(x.repeat(64, 1))
        stderr = (w.var() / w.numel() + elbo[e].var() / elbo.shape[1]) ** 0.5
        assert abs(float(elbo[e].mean() - w.mean())) < 5 * float(stderr)


def test_resumed_training_follows_the_uninterrupted_trajectory(tmp_path):
    """An ensemble saved after 20 iterations and continued in a new object reaches the same
    weights and losses, bit for bit, as 40 iterations in one call; a checkpoint saved for
    another budget is refused with a named error."""
    straight = toy.ToyEnsemble(4, MEMBERS)
    want = straight.train(40, chunk=10)
    ckpt = tmp_path / "job.pt"
    first = toy.ToyEnsemble(4, MEMBERS)
    toy.train_resumable(first, 20, 1e-3, 64, ckpt, every=20, chunk=10)
    saved = torch.load(ckpt, weights_only=False)
    saved["iters"] = 40  # as if the 40-iteration run had stopped after its first save
    torch.save(saved, ckpt)
    second = toy.ToyEnsemble(4, MEMBERS)
    got, _ = toy.train_resumable(second, 40, 1e-3, 64, ckpt, every=20, chunk=10)
    assert torch.equal(got, want)
    for a, b in zip(second.blocks, straight.blocks, strict=True):
        assert torch.equal(a.data, b.data) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
    assert torch.load(ckpt, weights_only=False)["done"] == 40
    with pytest.raises(ValueError, match="checkpoint: .* iters/lr/batch 40/0.001/64"):
        toy.train_resumable(toy.ToyEnsemble(4, MEMBERS), 60, 1e-3, 64, ckpt, every=20, chunk=10)
    with pytest.raises(ValueError, match="state: saved for"):
        toy.ToyEnsemble(6, MEMBERS).load_state_dict(saved["ensemble"])
    with pytest.raises(ValueError, match="checkpoint_every"):
        toy.train_resumable(first, 40, 1e-3, 64, tmp_path / "x.pt", every=15, chunk=10)


# ------------------------------------------------------------------ training recipe (issue 30)


def test_the_default_recipe_is_todays():
    """Defaults everywhere are the recipe of the 100k grid: Adam 1e-3, constant, clipping at
    100. The one-model loop with its defaults takes exactly the steps of a plain Adam loop
    with those settings (float64, 40 steps of a 10-D VFlow, bit for bit), and the script's
    defaults record that recipe."""
    want = {"lr": 1e-3, "schedule": "constant", "final_lr_frac": 0.01, "grad_clip": 100.0}
    assert toy.DEFAULT_RECIPE == want
    assert load_script().parse_args([]).recipe == want
    assert toy.lr_values(1e-3, "constant", 50) == [1e-3] * 50
    _, got, _ = toy.train_single(10, 3, seed=3, iters=40, dtype=torch.float64)
    torch.manual_seed(3)  # the loop of train_single before the recipe options
    gen = torch.Generator().manual_seed(10_003)
    model = toy.make_model(10, 3).double()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    want_losses = []
    for _ in range(40):
        loss = -model.elbo(toy.sample_checkerboard(64, gen).double()).mean()
        want_losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
    assert got.tolist() == want_losses


@pytest.mark.parametrize("schedule", ["cosine", "exp"])
def test_decaying_schedules_end_at_the_final_fraction(schedule):
    """From the base lr at the first iteration to 1% of it at the last, never rising;
    cosine is at the arithmetic mean of the two half-way, exp at the geometric mean."""
    iters, lr = 2001, 3e-3
    lrs = toy.lr_values(lr, schedule, iters)
    assert len(lrs) == iters and lrs[0] == lr
    assert lrs[-1] == pytest.approx(0.01 * lr, rel=1e-6)
    assert all(b <= a * (1 + 1e-12) for a, b in zip(lrs[:-1], lrs[1:], strict=True))
    mid = (1 + 0.01) / 2 if schedule == "cosine" else 0.1
    assert lrs[1000] == pytest.approx(mid * lr, rel=1e-6)
    assert toy.lr_values(lr, schedule, 11, final_frac=0.5)[-1] == pytest.approx(0.5 * lr)
    with pytest.raises(ValueError, match="schedule"):
        toy.lr_values(lr, "linear", 5)


def test_ensemble_follows_the_single_loop_under_a_schedule_and_clipping():
    """A cosine schedule at 3e-3 and clipping at 0.5 (active: the norms start above 1) reach
    both trainers the same way (float64, 1e-10; 150 iterations: three chunks of batches),
    and change the trajectory."""
    ens, _ = assert_members_follow_the_single_loop(
        4, MEMBERS, 150, torch.float64, atol=1e-10, lr=3e-3, schedule="cosine", grad_clip=0.5
    )
    plain, _ = assert_members_follow_the_single_loop(4, MEMBERS, 150, torch.float64, atol=1e-10)
    assert not torch.allclose(ens.blocks[0].data, plain.blocks[0].data, atol=1e-4)


def test_resumed_training_continues_the_schedule(tmp_path):
    """A cosine run saved half-way and resumed takes the second half of the schedule (the
    same weights as one uninterrupted run, bit for bit); a checkpoint saved for another
    recipe is refused."""
    lrs = toy.lr_values(3e-3, "cosine", 40)
    straight = toy.ToyEnsemble(4, MEMBERS)
    want = straight.train(40, chunk=10, lrs=lrs)
    ckpt = tmp_path / "job.pt"
    first = toy.ToyEnsemble(4, MEMBERS)
    toy.train_resumable(first, 40, 3e-3, 64, ckpt, every=20, chunk=10, schedule="cosine")
    saved = torch.load(ckpt, weights_only=False)
    assert saved["schedule"] == "cosine" and saved["done"] == 40
    saved.update(done=20, losses=saved["losses"][:20])  # as if stopped after the first save
    first_half = toy.ToyEnsemble(4, MEMBERS)
    first_half.train(20, chunk=10, lrs=lrs[:20])
    saved["ensemble"] = first_half.state_dict()
    torch.save(saved, ckpt)
    second = toy.ToyEnsemble(4, MEMBERS)
    got, _ = toy.train_resumable(second, 40, 3e-3, 64, ckpt, every=20, chunk=10,
                                 schedule="cosine")  # fmt: skip
    assert torch.equal(got, want)
    for a, b in zip(second.blocks, straight.blocks, strict=True):
        assert torch.equal(a.data, b.data)
    plain, _ = toy.train_resumable(toy.ToyEnsemble(4, MEMBERS), 40, 3e-3, 64, None, chunk=10,
                                   schedule="cosine")  # fmt: skip
    assert torch.equal(plain, want)  # without a checkpoint too
    with pytest.raises(ValueError, match="checkpoint: .* recipe"):
        toy.train_resumable(toy.ToyEnsemble(4, MEMBERS), 40, 3e-3, 64, ckpt, every=20,
                            chunk=10, schedule="exp")  # fmt: skip


def test_recipe_options_cells_and_runs_written_as_jobs_finish(tmp_path):
    """``--cells`` trains only the listed cells; every row of runs.csv carries the recipe;
    runs.csv is rewritten as each job finishes; ``--previous-runs`` reuses only runs of the
    same recipe, and a file without the recipe columns (docs/toy_runs_100k.csv) holds
    today's recipe."""
    script = load_script()
    common = ["--iters", "30", "--seeds", "2", "--samples", "4", "--density-px", "8"]
    common += ["--workers", "1", "--speed-iters", "0", "--cells", "2x3,10x2"]
    args = script.parse_args(common + ["--schedule", "cosine", "--lr", "3e-3", "--out",
                                       str(tmp_path / "a")])  # fmt: skip
    assert args.cells == [(2, 3), (10, 2)] and args.dims == [2, 10] and args.steps == [2, 3]
    seen = []
    runs = script.run_all(args, on_runs=lambda r: seen.append(len(r)))
    assert seen == [2, 4]  # one call per job (one job per D), with the runs so far
    assert sorted((r["dims"], r["steps"]) for r in runs) == [(2, 3), (2, 3), (10, 2), (10, 2)]
    assert all((r["lr"], r["schedule"], r["grad_clip"]) == (3e-3, "cosine", 100.0) for r in runs)
    script.write_runs(tmp_path, runs)
    for schedule, reused in [("cosine", 4), ("constant", 0)]:
        a = script.parse_args(common + ["--schedule", schedule, "--lr", "3e-3"])
        assert len(script.load_previous_runs(tmp_path / "runs.csv", a)) == reused
    old = Path(__file__).resolve().parents[1] / "docs" / "toy_runs_100k.csv"
    with open(old) as f:
        assert "schedule" not in f.readline()  # written before the recipe columns
    grid = ["--iters", "100000", "--seeds", "5"]
    assert len(script.load_previous_runs(old, script.parse_args(grid))) == 175
    assert script.load_previous_runs(old, script.parse_args(grid + ["--lr", "3e-3"])) == []
    cut = script.parse_args(grid + ["--cells", "2x3,10x3"])
    assert len(script.load_previous_runs(old, cut)) == 10


def test_ablation_driver_tiny(tmp_path, capsys):
    """benchmarks/toy_ablation.py on a tiny budget: every recipe's runs land in the CSV with
    their recipe; the table compares each recipe with today's (delta of the means, Welch p);
    running it again trains nothing."""
    load_script()  # puts benchmarks/ on sys.path
    import toy_ablation

    argv = ["--iters", "20", "--seeds", "2", "--samples", "4", "--jobs", "2x3", "--recipes",
            "1e-3:constant,3e-3:cosine", "--csv", str(tmp_path / "runs.csv"),
            "--out", str(tmp_path / "out")]  # fmt: skip
    rows = toy_ablation.main(argv)
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert (
        sorted((r["lr"], r["schedule"]) for r in runs)
        == [("0.001", "constant")] * 2 + [("0.003", "cosine")] * 2
    )
    assert [(r["cell"], r["recipe"], r["seeds"]) for r in rows] == [
        ("3-step Glow", "1e-3:constant", 2), ("3-step Glow", "3e-3:cosine", 2)]  # fmt: skip
    ll = {key: [float(r["test_ll"]) for r in runs if r["schedule"] == key] for key in
          ("constant", "cosine")}  # fmt: skip
    assert rows[1]["delta"] == pytest.approx(np.mean(ll["cosine"]) - np.mean(ll["constant"]))
    assert 0 < rows[1]["welch_p"] <= 1 and math.isnan(rows[0]["welch_p"])
    capsys.readouterr()
    toy_ablation.main(argv + ["--curves-csv", str(tmp_path / "curves.csv")])
    assert "===" not in capsys.readouterr().out  # nothing left to train
    with open(tmp_path / "curves.csv") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == 2 * 2 * 10  # recipes x seeds x windows of 2 iterations
    assert {r["recipe"] for r in curves} == {"1e-3:constant", "3e-3:cosine"}
    assert (tmp_path / "curves.png").stat().st_size > 0


# ------------------------------------------------------ model and data factors (issue 30)

FACTOR_LEVELS = [
    {"scale": "sigmoid"},
    {"scale": "none"},
    {"activation": "tanh"},
    {"activation": "elu"},
    {"mixing": "reverse"},
    {"mixing": "identity"},
    {"mixing": "actnorm"},
    {"mixing": "actnorm", "q_steps": 2, "q_base": True},
    {"q_steps": 2},
    {"q_steps": 2, "q_base": True, "mixing": "reverse", "scale": "sigmoid"},
    {"train_set": 300},
]


def test_the_default_factors_are_todays():
    """Every factor's default is today's model and data: the script records them, and a
    model built with them spelled out is today's model, bit for bit, in the same RNG state."""
    want = {"scale": "tanh3", "activation": "relu", "mixing": "linear", "q_base": False,
            "q_steps": 1, "train_set": 0}  # fmt: skip
    assert toy.DEFAULT_FACTORS == want == toy.factor_dict()
    assert load_script().parse_args([]).factors == want
    for dim in (2, 10):
        torch.manual_seed(5)
        today = toy.make_model(dim, 3)
        state = torch.get_rng_state()
        torch.manual_seed(5)
        spelled = toy.make_model(dim, 3, False, "tanh3", "relu", "linear", 1)
        assert torch.equal(state, torch.get_rng_state())
        assert str(today) == str(spelled)
        for a, b in zip(today.parameters(), spelled.parameters(), strict=True):
            assert torch.equal(a, b)
    _, got, _ = toy.train_single(10, 3, 1, 20, dtype=torch.float64)
    _, spelled, _ = toy.train_single(10, 3, 1, 20, dtype=torch.float64, **{
        k: v for k, v in want.items() if k != "q_base"})  # fmt: skip
    assert torch.equal(got, spelled)
    assert isinstance(today.p.flow.layers[1].net[1], torch.nn.ReLU)


def test_each_factor_changes_the_model_as_claimed():
    """scale: the coupling's log-scale is 3 tanh(s/3), log sigmoid(s + 2) or s itself;
    activation: the MLP's hidden modules; mixing reverse: no InvLinear (L (D^2 + D) fewer
    parameters), [Coupling, Reverse] per step; q_steps 2: two conditional couplings in q;
    bad names are refused."""
    raw = torch.linspace(-8, 8, 9)[:, None].repeat(1, 2)
    torch.testing.assert_close(toy.log_scale(raw, "tanh3"), 3 * torch.tanh(raw / 3))
    torch.testing.assert_close(toy.log_scale(raw, "sigmoid"), torch.sigmoid(raw + 2).log())
    assert torch.equal(toy.log_scale(raw, "none"), raw)
    c = toy.Coupling(4, scale="sigmoid")  # zero last layer: scale sigmoid(2) at init
    y, ld = c(torch.ones(3, 4))
    torch.testing.assert_close(y[:, 2:], torch.full((3, 2), torch.sigmoid(torch.tensor(2.0))))
    torch.testing.assert_close(ld, torch.full((3,), 2 * math.log(torch.sigmoid(torch.tensor(2.0)))))
    big = toy.Coupling(2, scale="none")
    with torch.no_grad():
        big.net[-1].bias.fill_(10.0)
    assert big(torch.ones(1, 2))[1].item() == pytest.approx(10.0)  # beyond tanh3's bound
    for name, cls in [("tanh", torch.nn.Tanh), ("elu", torch.nn.ELU), ("relu", torch.nn.ReLU)]:
        acts = [m for m in toy.make_model(10, 3, activation=name).modules()
                if isinstance(m, (torch.nn.ReLU, torch.nn.Tanh, torch.nn.ELU))]  # fmt: skip
        assert acts and all(type(m) is cls for m in acts)
    for d, l in [(2, 20), (10, 3)]:
        lin, rev = toy.make_model(d, l), toy.make_model(d, l, mixing="reverse")
        n_inv = (l if d == 2 else (l - 1)) * (d * d + d) + (0 if d == 2 else (d - 2) ** 2 + d - 2)
        assert toy.n_params(lin) - toy.n_params(rev) == n_inv
        assert not any(isinstance(m, toy.InvLinear) for m in rev.modules())
    glow = toy.make_model(2, 3, mixing="reverse").flow.layers
    assert [type(m).__name__ for m in glow] == ["Coupling", "Reverse"] * 3
    q2 = toy.make_model(10, 3, q_steps=2).q.flow.layers
    assert [type(m).__name__ for m in q2] == ["InvLinear", "Coupling", "Reverse"] * 2
    for bad in [dict(scale="exp"), dict(activation="gelu"), dict(mixing="shuffle"),
                dict(q_steps=0), dict(train_set=-1)]:  # fmt: skip
        with pytest.raises(ValueError):
            toy.factor_dict(**bad)


def test_identity_and_actnorm_mixings_start_as_claimed():
    """identity: every W starts at I; actnorm: Glow's step [ActNorm, InvLinear, Coupling,
    Reverse], and data_init makes every ActNorm of p standardise what reaches it on the init
    batch (the seed's 512 points, z from the initial q), leaving q's at the identity and the
    global random stream where it was."""
    for layer in toy.make_model(10, 3, mixing="identity").modules():
        if isinstance(layer, toy.InvLinear):
            assert torch.equal(layer.weight, torch.eye(layer.weight.shape[0]))
    assert [type(m).__name__ for m in toy.make_model(2, 2, mixing="actnorm").flow.layers] == [
        "ActNorm", "InvLinear", "Coupling", "Reverse"] * 2  # fmt: skip
    for dim in (2, 10):
        torch.manual_seed(7)
        model = toy.make_model(dim, 4, mixing="actnorm").double()
        state = torch.get_rng_state()
        toy.data_init(model, seed=7)
        assert torch.equal(state, torch.get_rng_state())
        glow = model if dim == 2 else model.p
        gen = torch.Generator().manual_seed(20_007)
        h = toy.sample_checkerboard(toy.DATA_INIT_POINTS, gen).double()
        if dim == 10:
            noise = torch.randn(toy.DATA_INIT_POINTS, 8, generator=gen).double()
            h = torch.cat([h, model.q.flow.inverse(noise, h)[0]], dim=1)
        norms = [m for m in glow.flow.layers if isinstance(m, toy.ActNorm)]
        assert len(norms) == (4 if dim == 2 else 3)
        with torch.no_grad():
            for layer in glow.flow.layers:
                h = layer(h)[0]
                if isinstance(layer, toy.ActNorm):
                    torch.testing.assert_close(h.mean(0), torch.zeros(dim, dtype=h.dtype),
                                               atol=1e-12, rtol=0)  # fmt: skip
                    torch.testing.assert_close(h.std(0), torch.ones(dim, dtype=h.dtype),
                                               atol=1e-5, rtol=0)  # fmt: skip
                    assert not torch.equal(layer.log_scale, torch.zeros_like(layer.log_scale))
        if dim == 10:
            for m in model.q.modules():
                if isinstance(m, toy.ActNorm):
                    assert not m.bias.any() and not m.log_scale.any()
        # both trainers start from the data-initialised model
        want = [(m.bias, m.log_scale) for m in norms]
        single, _, _ = toy.train_single(dim, 4, 7, 0, mixing="actnorm", dtype=torch.float64)
        member = toy.ToyEnsemble(dim, [(4, 7)], mixing="actnorm", dtype=torch.float64)
        for got in (single, member.member_model(0)):
            glow_got = got if dim == 2 else got.p
            pairs = [
                (m.bias, m.log_scale) for m in glow_got.modules() if isinstance(m, toy.ActNorm)
            ]
            for (b, s), (bw, sw) in zip(pairs, want, strict=True):
                torch.testing.assert_close(b, bw, atol=1e-12, rtol=0)
                torch.testing.assert_close(s, sw, atol=1e-12, rtol=0)


def test_a_fixed_training_set_is_drawn_once_and_batches_come_from_it():
    """train_set N: the N points are sample_checkerboard(N) from the run's data generator;
    every training batch (both trainers) holds only those points; more iterations than
    N / batch reuse points; fresh sampling never repeats one."""
    n, seed = 200, 3
    want = toy.sample_checkerboard(n, torch.Generator().manual_seed(10_000 + seed))
    ens = toy.ToyEnsemble(2, [(2, seed)], train_set=n)
    assert torch.equal(ens.train_sets[0], want)
    x, _ = ens.draw(40, 64)
    pts = x.reshape(-1, 2)
    member = (pts[:, None, :] == want[None]).all(-1).any(-1)
    assert member.all() and len(torch.unique(pts, dim=0)) <= n
    fresh, _ = toy.ToyEnsemble(2, [(2, seed)]).draw(40, 64)
    assert len(torch.unique(fresh.reshape(-1, 2), dim=0)) == 40 * 64
    a, la, _ = toy.train_single(2, 2, seed, 30, train_set=n, dtype=torch.float64)
    b, lb, _ = toy.train_single(2, 2, seed, 30, dtype=torch.float64)
    assert not torch.equal(la, lb)


@pytest.mark.parametrize("factors", FACTOR_LEVELS, ids=lambda f: ",".join(f"{k}={v}" for k, v in
                                                                         f.items()))  # fmt: skip
def test_ensemble_follows_the_single_loop_under_each_factor(factors):
    """Each factor level reaches both trainers the same way (float64, 1e-10; a Glow and a
    6-D VFlow, mixed depths, 70 iterations: several chunks of batches), and moves the
    trajectory away from today's."""
    factors = dict(factors)
    q_base = factors.pop("q_base", False)
    members = [(2, 0), (3, 1)]
    for dim in (2, 6):
        ens = toy.ToyEnsemble(dim, members, q_base=q_base, dtype=torch.float64, **factors)
        losses = ens.train(70, lr=3e-3, chunk=32)
        plain = toy.ToyEnsemble(dim, members, dtype=torch.float64).train(70, lr=3e-3, chunk=32)
        if dim > 2 or not (set(factors) <= {"q_steps"}):
            assert not torch.allclose(losses, plain, atol=1e-6)
        for e, (steps, seed) in enumerate(ens.members):
            model, ref, _ = toy.train_single(dim, steps, seed, 70, 3e-3, q_base=q_base,
                                             dtype=torch.float64, **factors)  # fmt: skip
            torch.testing.assert_close(losses[:, e], ref, atol=1e-10, rtol=0)
            got = dict(ens.member_model(e).named_parameters())
            for name, p in model.named_parameters():
                torch.testing.assert_close(got[name], p, atol=1e-10, rtol=0, msg=name)
        x = toy.fixed_test_set(50).double()
        ll = ens.log_likelihood(x, samples=4)
        for e, (steps, seed) in enumerate(ens.members):
            model, _, _ = toy.train_single(dim, steps, seed, 70, 3e-3, q_base=q_base,
                                           dtype=torch.float64, **factors)  # fmt: skip
            want = toy.log_likelihood(model.eval(), x, samples=4)
            torch.testing.assert_close(ll[e], want, atol=1e-10, rtol=0)


def test_a_checkpoint_of_other_factors_is_refused(tmp_path):
    ens = toy.ToyEnsemble(6, MEMBERS, activation="tanh", q_steps=2)
    state = ens.state_dict()
    toy.ToyEnsemble(6, MEMBERS, activation="tanh", q_steps=2).load_state_dict(state)
    with pytest.raises(ValueError, match="state: saved for"):
        toy.ToyEnsemble(6, MEMBERS, q_steps=2).load_state_dict(state)
    old = toy.ToyEnsemble(6, MEMBERS).state_dict()
    del old["factors"]  # saved before the factors existed: today's
    toy.ToyEnsemble(6, MEMBERS).load_state_dict(old)


def test_factor_columns_roundtrip_and_previous_runs_match_them(tmp_path):
    """Both trainers record the factors in every row; runs.csv and results.csv carry them;
    --previous-runs reuses only runs of the same factors, and an old file (no factor
    columns) holds today's."""
    script = load_script()
    common = ["--iters", "20", "--seeds", "2", "--samples", "4", "--density-px", "8",
              "--workers", "1", "--speed-iters", "0", "--cells", "10x2"]  # fmt: skip
    opts = ["--activation", "elu", "--q-steps", "2", "--train-set", "500", "--q-base"]
    for trainer in ("ensemble", "single"):
        out = tmp_path / trainer
        script.main(common + opts + ["--trainer", trainer, "--out", str(out)])
        with open(out / "runs.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 2
        for r in rows:
            assert (r["activation"], r["q_steps"], r["train_set"], r["q_base"], r["scale"],
                    r["mixing"]) == ("elu", "2", "500", "True", "tanh3", "linear")  # fmt: skip
        with open(out / "results.csv") as f:
            assert list(csv.DictReader(f))[0]["activation"] == "elu"
        for extra, reused in [(opts, 2), (opts[:-1], 0), (opts[2:], 0), ([], 0),
                              (opts[:2] + opts[4:], 0)]:  # fmt: skip
            args = script.parse_args(common + extra)
            assert len(script.load_previous_runs(out / "runs.csv", args)) == reused, extra
    old = Path(__file__).resolve().parents[1] / "docs" / "toy_runs_100k.csv"
    grid = ["--iters", "100000", "--seeds", "5", "--cells", "2x3"]
    assert len(script.load_previous_runs(old, script.parse_args(grid))) == 5
    for extra in (["--scale", "none"], ["--mixing", "reverse"], ["--train-set", "10"]):
        assert script.load_previous_runs(old, script.parse_args(grid + extra)) == []


def test_ablation_recipes_carry_factors(tmp_path):
    """A recipe string names its factors; recipe_of(run) gives it back canonically; the
    table compares a factor recipe with its own lr:schedule (delta of the means, Welch p),
    a plain lr:schedule with today's."""
    load_script()
    import toy_ablation as ta

    got = ta.parse_recipe("3e-3:cosine:0.1:clipinf:activation=tanh:q_base=true:train_set=10")
    assert got == {"lr": 3e-3, "schedule": "cosine", "final_lr_frac": 0.1,
                   "grad_clip": math.inf, "activation": "tanh", "q_base": True,
                   "train_set": 10}  # fmt: skip
    run = {**toy.DEFAULT_RECIPE, **toy.DEFAULT_FACTORS, **got}
    assert ta.recipe_of(run) == "3e-3:cosine:0.1:clipinf:activation=tanh:q_base=True:train_set=10"
    assert ta.parse_recipe(ta.recipe_of(run)) == got
    assert ta.base_of("3e-3:cosine:scale=none") == "3e-3:cosine"
    assert ta.base_of("3e-3:cosine") == "1e-3:constant"
    with pytest.raises(ValueError, match="unknown factor"):
        ta.parse_recipe("1e-3:constant:colour=red")
    argv = ["--iters", "20", "--seeds", "2", "--samples", "4", "--jobs", "10x2", "--recipes",
            "3e-3:cosine,3e-3:cosine:scale=none,3e-3:cosine:mixing=reverse",
            "--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "out")]  # fmt: skip
    ta.CELLS.append((10, 2))
    ta.CELL_NAMES[(10, 2)] = "2-step 10-D VFlow"
    try:
        rows = ta.main(argv)
    finally:
        ta.CELLS.remove((10, 2))
        del ta.CELL_NAMES[(10, 2)]
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted({(r["scale"], r["mixing"]) for r in runs}) == [
        ("none", "linear"), ("tanh3", "linear"), ("tanh3", "reverse")]  # fmt: skip
    by = {r["recipe"]: r for r in rows}
    assert list(by) == ["3e-3:cosine", "3e-3:cosine:mixing=reverse", "3e-3:cosine:scale=none"]
    ll = lambda sc, mx: [float(r["test_ll"]) for r in runs  # noqa: E731
                         if (r["scale"], r["mixing"]) == (sc, mx)]  # fmt: skip
    row = by["3e-3:cosine:scale=none"]
    assert row["base"] == "3e-3:cosine"
    assert row["delta"] == pytest.approx(
        np.mean(ll("none", "linear")) - np.mean(ll("tanh3", "linear"))
    )
    assert 0 < row["welch_p"] <= 1
    assert math.isnan(by["3e-3:cosine"]["delta"])  # today's recipe is not in the file

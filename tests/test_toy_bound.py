"""benchmarks/toy_bound.py: the IW-by-S estimates and the q-only refit (issue 30)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import toy_bound  # noqa: E402

from vflow import toy  # noqa: E402


def _trained(iters=200):
    ens = toy.ToyEnsemble(4, [(2, 0), (2, 1)], dtype=torch.float64)
    ens.train(iters, lr=3e-3)
    return ens


def test_iw_estimates_agree_with_the_ensembles_own_evaluation():
    """IW_100 and the ELBO from one nested draw agree with ToyEnsemble.log_likelihood (other
    noise: Monte Carlo error only, ~2e-3 on 300 points), and IW_S rises from the ELBO."""
    ens = _trained()
    x = toy.fixed_test_set()[:300].double()
    got = toy_bound.iw_by_samples(ens, x, [10, 100])
    ll, elbo = ens.log_likelihood(x, 100, return_elbo=True)
    torch.testing.assert_close(got[100], ll.mean(dim=1), atol=1e-2, rtol=0)
    torch.testing.assert_close(got[0], elbo.mean(dim=1), atol=1e-2, rtol=0)
    assert (got[100] > got[0] + 1e-3).all() and (got[10] > got[0]).all()


def test_refit_moves_q_alone(tmp_path):
    """The refit steps q's weights and leaves p's weights and Adam state bit for bit, and a
    saved ensemble loads back to the same estimates."""
    ens = _trained(60)
    p_before = [t.clone() for t in (ens.p.data, ens.p.exp_avg, ens.p.exp_avg_sq)]
    q_before = ens.q.data.clone()
    toy_bound.refit_q(ens, 30, 1e-3)
    for a, b in zip(p_before, (ens.p.data, ens.p.exp_avg, ens.p.exp_avg_sq), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(q_before, ens.q.data)
    assert ens.blocks == [ens.p, ens.q]
    path = tmp_path / "state.pt"
    torch.save({"ensemble": ens.state_dict()}, path)
    back = toy_bound.load_ensemble(path)
    assert back.dtype == torch.float64 and back.members == ens.members
    x = toy.fixed_test_set()[:20].double()
    want = toy_bound.iw_by_samples(ens, x, [4])
    got = toy_bound.iw_by_samples(back, x, [4])
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_quick_mode_runs(capsys):
    rows = toy_bound.main(["--quick"])
    assert {r["S"] for r in rows} == {0, 1, 4, 16}
    assert "+q20" in capsys.readouterr().out


def test_curves_plot_and_its_errors(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    rows = ["dims,steps,seed,iter,train_elbo"] + [
        f"10,3,{s},{i * 1000},{-4 + 0.01 * i + 0.001 * s}" for s in range(2) for i in range(1, 6)
    ]
    (folder / "curves.csv").write_text("\n".join(rows) + "\n")
    png = tmp_path / "c.png"
    assert toy_bound.main(["--curves", f"short={folder}", "--plot", str(png), "--paper",
                           "-3.51"]) == []  # fmt: skip
    assert png.stat().st_size > 0
    for bad in (["--curves", f"short={folder}"], ["--curves", str(folder), "--plot", str(png)],
                ["--curves", f"x={tmp_path}", "--plot", str(png)], ["--quick", "--samples", "0"],
                ["--quick", "--samples", "a,b"], ["--quick", "--points", "5000"],
                ["--quick", "--refit-q", "-3"], ["--quick", str(png)]):  # fmt: skip
        with pytest.raises(SystemExit):
            toy_bound.main(bad)

"""Tests of benchmarks/digits_ablation.py (Table 5's fixed-budget ablation on 8x8 digits)."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "digits_ablation.py"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("digits_ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_models_share_one_parameter_budget(script):
    counts = script.param_counts()
    assert list(counts) == ["flowpp-1ch", "vflow-2ch", "vflow-3ch", "vflow-4ch"]
    totals = {name: c["total"] for name, c in counts.items()}
    lo, hi = min(totals.values()), max(totals.values())
    assert hi / lo - 1 < 0.02, totals  # all within 2% of each other
    assert 150_000 < lo and hi < 400_000, totals  # the documented ~260k budget
    for c in counts.values():
        assert c["total"] == c["p"] + c["q"] + c["r"]


def test_models_are_a_flowpp_and_vflows_with_1_2_3_extra_channels(script):
    from vflow.models import FlowPlusPlus, VFlow

    expected = {"flowpp-1ch": 0, "vflow-2ch": 1, "vflow-3ch": 2, "vflow-4ch": 3}
    for name, cz in expected.items():
        with torch.device("meta"):
            model = script.build_model(name, backend="reference")
        assert script.extra_channels(name) == cz
        assert model.config.extra_channels == cz
        assert model.config.data_shape == (1, 8, 8) and model.config.n_bins == 17
        if cz:
            assert isinstance(model, VFlow)
            # q(z|x) gets the same architecture in every VFlow; r(u|x) in every model
            assert model.config.q == script.MODELS["vflow-2ch"][1]["q"]
        else:
            assert type(model) is FlowPlusPlus and not isinstance(model, VFlow)
        assert model.config.r == script.MODELS["flowpp-1ch"][1]["r"]
        assert model.latent_shape == (4 * (1 + cz), 4, 4)


def test_tiny_run_writes_csv_and_plot(script, tmp_path):
    rows = script.main(
        ["--steps", "3", "--seeds", "1", "--samples", "2", "--workers", "1", "--out", str(tmp_path)]
    )
    counts = script.param_counts()
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == list(script.MODELS)
    assert list(table[0]) == [
        "name",
        "extra_channels",
        "blocks",
        "params",
        "bpd_iw_mean",
        "bpd_iw_std",
        "bpd_elbo_mean",
        "bpd_elbo_std",
        "seeds",
        "steps",
        "samples",
        "test_images",
    ]
    for r in table:
        assert int(r["extra_channels"]) == script.extra_channels(r["name"])
        assert int(r["params"]) == counts[r["name"]]["total"]
        assert int(r["seeds"]) == 1 and int(r["steps"]) == 3
        assert int(r["test_images"]) == 359 and int(r["samples"]) == 2
        iw, elbo = float(r["bpd_iw_mean"]), float(r["bpd_elbo_mean"])
        assert math.isfinite(iw) and math.isfinite(elbo)
        # 17 levels: a model at (or not far from) initialisation is in 1..10 bits/dim,
        # and the importance-weighted estimate is tighter than the bound up to noise
        assert 1.0 < iw < 10.0 and 1.0 < elbo < 10.0
        assert iw < elbo + 0.05
        assert float(r["bpd_iw_std"]) == 0.0
    assert len(rows) == len(table)
    with open(tmp_path / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["name"], r["seed"]) for r in runs) == sorted((m, "0") for m in script.MODELS)
    png = tmp_path / "bpd_bar.png"
    assert png.stat().st_size > 5_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "curves.csv").exists()  # --eval-every defaults to 0 for digits


TINY = ["--steps", "3", "--seeds", "1", "--samples", "2", "--eval-every", "3",
        "--curve-images", "8", "--test-images", "8", "--workers", "1"]  # fmt: skip


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _plant(path: Path, column: str, value) -> None:
    """Set ``column`` of every row of the CSV ``path`` to ``value``."""
    rows = _rows(path)
    for r in rows:
        r[column] = value
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_previous_runs_are_reused_not_retrained(script, tmp_path, capsys):
    first = tmp_path / "first"
    script.main(TINY + ["--models", "flowpp-1ch", "--out", str(first)])
    _plant(first / "runs.csv", "bpd_iw", "0.125")  # values no training would give
    _plant(first / "curves.csv", "test_elbo", "0.25")
    capsys.readouterr()

    both = tmp_path / "both"
    rows = script.main(TINY + ["--models", "flowpp-1ch,vflow-2ch", "--previous", str(first),
                               "--out", str(both)])  # fmt: skip
    assert f"reused 1 runs of {first}; trained 1" in capsys.readouterr().out
    iw = {r["name"]: r["bpd_iw_mean"] for r in rows}
    assert iw["flowpp-1ch"] == 0.125  # read back, not trained again
    assert 1.0 < iw["vflow-2ch"] < 10.0  # trained
    assert len(_rows(both / "runs.csv")) == 2
    curves = {(c["name"], c["step"]): float(c["test_elbo"]) for c in _rows(both / "curves.csv")}
    assert curves[("flowpp-1ch", "3")] == 0.25 and curves[("vflow-2ch", "3")] != 0.25

    for broken in ("missing", "twice"):
        bad = tmp_path / broken
        bad.mkdir()
        lines = (first / "runs.csv").read_text().splitlines()
        if broken == "missing":
            header = lines[0].split(",")
            lines = [",".join(v for k, v in zip(header, ln.split(","), strict=True)
                              if k != "bpd_elbo") for ln in lines]  # fmt: skip
        else:
            lines.append(lines[1])
        (bad / "runs.csv").write_text("\n".join(lines) + "\n")
        expected = "bpd_elbo" if broken == "missing" else "more than once"
        with pytest.raises(ValueError, match=expected):
            script.main(TINY + ["--models", "flowpp-1ch", "--previous", str(bad),
                                "--out", str(tmp_path / "out")])  # fmt: skip

    # other settings, or a model whose definition changed (another parameter count): trained
    for changed, extra in (("steps", ["--steps", "4"]), ("params", [])):
        if changed == "params":
            _plant(first / "runs.csv", "params", "12345")
        rows = script.main(TINY + extra + ["--models", "flowpp-1ch", "--previous", str(first),
                                           "--out", str(tmp_path / changed)])  # fmt: skip
        assert rows[0]["bpd_iw_mean"] != 0.125, changed


def test_a_study_stopped_half_way_keeps_its_finished_runs(script, tmp_path, monkeypatch, capsys):
    """runs.csv and curves.csv are written as each run finishes: a study interrupted after
    its first run leaves that run on disk, and --previous resumes from it."""
    import _ablation

    train_one = _ablation.run_one
    calls = []

    def stop_at_second_run(**job):
        calls.append((job["name"], job["seed"]))
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C during the second run
        return train_one(**job)

    out = tmp_path / "stopped"
    monkeypatch.setattr(_ablation, "run_one", stop_at_second_run)
    with pytest.raises(KeyboardInterrupt):
        script.main(TINY + ["--models", "flowpp-1ch,vflow-2ch", "--out", str(out)])
    monkeypatch.setattr(_ablation, "run_one", train_one)
    assert calls == [("flowpp-1ch", 0), ("vflow-2ch", 0)]
    assert [(r["name"], r["seed"]) for r in _rows(out / "runs.csv")] == [("flowpp-1ch", "0")]
    assert {c["name"] for c in _rows(out / "curves.csv")} == {"flowpp-1ch"}
    assert not (out / "results.csv").exists()  # the summary waits for the end
    capsys.readouterr()

    rows = script.main(TINY + ["--models", "flowpp-1ch,vflow-2ch", "--previous", str(out),
                               "--out", str(tmp_path / "resumed")])  # fmt: skip
    assert f"reused 1 runs of {out}; trained 1" in capsys.readouterr().out
    assert [r["name"] for r in rows] == ["flowpp-1ch", "vflow-2ch"]


def test_shared_loop_gives_the_package_trainers_weights(script, tmp_path):
    """_ablation.train_run is vflow.train.train's loop: same init, batches, noise, updates.
    (The digits numbers in digits_ablation.py were measured with the trainer.)"""
    import _ablation

    import vflow
    from vflow.data import load_dataset
    from vflow.train import TrainArgs, get_recipe, train

    res = train(
        TrainArgs(
            config="flowpp-digits",
            data="digits",
            out=str(tmp_path / "run"),
            steps=3,
            seed=2,
            eval_every=0,
            ckpt_every=0,
            final_eval=False,
            n_samples=0,
            progress=False,
            num_threads=1,
        )
    )
    model, ema, curves, skipped = _ablation.train_run(
        lambda: vflow.build("flowpp-digits"),
        load_dataset("digits", "train"),
        get_recipe("flowpp-digits"),
        3,
        2,
    )
    assert skipped == 0 and curves == []
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    for k, v in res.ema.params.items():
        assert torch.equal(v, ema.params[k]), k


def test_quick_preset_and_bad_arguments(script):
    a = script.parse_args(["--quick"])
    assert (a.steps, a.seeds) == (script.QUICK["steps"], 1)
    a = script.parse_args([])
    assert (a.steps, a.seeds, a.samples) == (
        script.FULL["steps"],
        script.FULL["seeds"],
        script.FULL["samples"],
    )
    with pytest.raises(SystemExit):
        script.parse_args(["--models", "flowpp-1ch,nope"])
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "0"])

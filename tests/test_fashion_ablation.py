"""Tests of benchmarks/fashion_ablation.py (Table 5 / Fig. 6 on Fashion-MNIST, 14x14)."""

import csv
import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fashion_ablation.py"
FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("fashion_ablation", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_parameter_budget_within_1_percent_and_b_cut_at_most_30_percent(script):
    import _ablation

    b = _ablation.budget(script.STUDY)
    assert list(b["totals"]) == ["flowpp-1ch", "vflow-2ch", "vflow-3ch", "vflow-4ch"]
    assert b["spread"] <= 0.01, b["totals"]
    assert b["blocks"]["flowpp-1ch"] == max(b["blocks"].values())
    assert all(0 <= cut <= 0.30 for cut in b["cuts"].values()), b["cuts"]
    assert b["blocks"]["vflow-4ch"] < b["blocks"]["flowpp-1ch"]  # the extra channels are paid for
    for c in script.param_counts().values():
        assert c["total"] == c["p"] + c["q"] + c["r"]


def test_models_are_a_flowpp_and_vflows_with_1_2_3_extra_channels(script):
    import _ablation

    from vflow.models import FlowPlusPlus, VFlow

    for name, cz in {"flowpp-1ch": 0, "vflow-2ch": 1, "vflow-3ch": 2, "vflow-4ch": 3}.items():
        with torch.device("meta"):
            model = script.build_model(name, backend="reference")
        assert _ablation.extra_channels(script.STUDY, name) == cz == model.config.extra_channels
        assert model.config.data_shape == (1, 14, 14) and model.config.n_bins == 256
        assert model.latent_shape == (4 * (1 + cz), 7, 7)
        assert isinstance(model, VFlow) == bool(cz)
        if not cz:
            assert type(model) is FlowPlusPlus
        else:  # same q in every VFlow, same r everywhere (Table 5)
            assert model.config.q == script.MODELS["vflow-2ch"][1]["q"]
        assert model.config.r == script.MODELS["flowpp-1ch"][1]["r"]
        assert model.config.dropout == 0.0
    full = script.FULL
    assert full["seeds"] >= 2 and full["samples"] >= 64


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST not installed in {FASHION} (apt-get install dataset-fashion-mnist)",
)
def test_quick_run_writes_results_runs_curves_and_plots(script, tmp_path):
    rows = script.main(["--quick", "--workers", "1", "--out", str(tmp_path)])
    counts = script.param_counts()
    with open(tmp_path / "results.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["name"] for r in table] == list(script.MODELS) and len(rows) == len(table)
    for r in table:
        assert int(r["params"]) == counts[r["name"]]["total"]
        assert int(r["steps"]) == script.QUICK["steps"] and int(r["seeds"]) == 1
        assert int(r["test_images"]) == script.QUICK["test_images"]
        iw, elbo = float(r["bpd_iw_mean"]), float(r["bpd_elbo_mean"])
        assert math.isfinite(iw) and math.isfinite(elbo)
        assert 1.0 < iw < 12.0 and 1.0 < elbo < 12.0  # 256 levels, near initialisation
    with open(tmp_path / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    steps = script.QUICK["steps"]
    expected_steps = list(range(script.QUICK["eval_every"], steps + 1, script.QUICK["eval_every"]))
    for name in script.MODELS:
        sel = [c for c in curves if c["name"] == name]
        assert [int(c["step"]) for c in sel] == expected_steps
        for c in sel:
            assert math.isfinite(float(c["train_elbo"])) and math.isfinite(float(c["valid_elbo"]))
    with open(tmp_path / "runs.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(script.MODELS)
    for png in ("curves.png", "bpd_bar.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000


def test_presets_and_bad_arguments(script):
    a = script.parse_args(["--quick"])
    assert (a.steps, a.seeds, a.eval_every) == (2, 1, 1)
    a = script.parse_args(["--test-images", "0"])
    assert a.test_images is None and a.steps == script.FULL["steps"]
    for bad in (["--models", "flowpp-1ch,nope"], ["--steps", "0"], ["--eval-every", "-1"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)

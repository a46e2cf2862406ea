"""Tests of benchmarks/precision_study.py (paired fp32 / bf16-nets trainings, issue 27):
its paired statistics against scipy, and the quick mode end to end (rows, resume)."""

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from vflow import ops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "precision_study.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("precision_study", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30])
@pytest.mark.parametrize("t", [0.0, 0.1, 0.74, 1.5, 2.78, 6.0, 40.0])
def test_own_t_tail_equals_scipy(script, t, df):
    stats = pytest.importorskip("scipy.stats")
    expected = 2 * stats.t.sf(t, df)
    assert script.t_two_sided_p(t, df) == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert script.t_two_sided_p(-t, df) == pytest.approx(expected, rel=1e-10, abs=1e-300)


def test_paired_stats_equal_scipy_ttest_rel_and_numpy(script):
    stats = pytest.importorskip("scipy.stats")
    np = pytest.importorskip("numpy")
    a = [1.9404, 1.9512, 1.9333, 1.9621, 1.9478]
    b = [1.9431, 1.9502, 1.9391, 1.9650, 1.9470]
    got = script.paired_stats(a, b)
    ref = stats.ttest_rel(b, a)
    d = np.subtract(b, a)
    assert got["n"] == 5
    assert got["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(d.std(ddof=1), rel=1e-12)
    assert got["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert got["p"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert script.p_value(a, b) == (pytest.approx(ref.pvalue, rel=1e-12), "scipy")
    lo, hi = ref.confidence_interval(0.95)
    assert script.ci95_halfwidth(got["std"], 5) == pytest.approx((hi - lo) / 2, rel=1e-10)


def test_paired_stats_degenerate_cases(script):
    one = script.paired_stats([1.0], [2.0])
    assert one["mean"] == 1.0 and math.isnan(one["std"]) and math.isnan(one["p"])
    same = script.paired_stats([1.0, 2.0, 3.0], [1.5, 2.5, 3.5])
    assert same["mean"] == pytest.approx(0.5) and same["std"] == 0.0 and math.isnan(same["p"])


def test_training_log_spike_and_nonfinite(script, tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [
        {"kind": "train", "step": 100, "train_bpd": 3.0},
        {"kind": "train", "step": 200, "train_bpd": 4.0},  # before SPIKE_FROM_STEP: ignored
        {"kind": "eval", "step": 200, "elbo_bpd": 9.0},
        {"kind": "train", "step": 300, "train_bpd": 2.5},
        {"kind": "train", "step": 400, "train_bpd": 2.8},
        {"kind": "train", "step": 500, "train_bpd": 2.6},
    ]
    path.write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    log = script.training_log(path)
    assert log == {
        "final_train_bpd": 2.6,
        "nonfinite_window": 0,
        "max_bpd_rise": pytest.approx(0.3),
    }
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 600, "train_bpd": null}\n')
    log = script.training_log(path)
    assert log["nonfinite_window"] == 1 and math.isnan(log["final_train_bpd"])


def test_presets_and_bad_arguments(script):
    a = script.parse_args(["--quick"])
    assert (a.seeds, a.steps, a.samples, a.test_images) == (2, 4, 2, 32)
    assert a.csv.name == "precision_study_quick.csv"
    a = script.parse_args([])
    assert (a.seeds, a.steps, a.samples, a.test_images) == (5, None, 16, None)
    assert a.csv.name == "precision_study.csv" and a.csv.parent.name == "docs"
    orders = [j["precision"] for j in script.jobs(script.parse_args(["--seeds", "2"]))]
    assert orders == ["fp32", "bf16-nets", "bf16-nets", "fp32"]
    for bad in (["--seeds", "0"], ["--steps", "0"], ["--samples", "0"]):
        with pytest.raises(SystemExit):
            script.parse_args(bad)


@pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="needs vflow._C")
def test_quick_run_writes_paired_rows_and_resumes(script, tmp_path):
    out_csv = tmp_path / "study.csv"
    argv = ["--quick", "--csv", str(out_csv), "--out", str(tmp_path / "runs")]
    table = script.main(argv)
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((int(r["seed"]), r["precision"]) for r in rows) == [
        (0, "bf16-nets"),
        (0, "fp32"),
        (1, "bf16-nets"),
        (1, "fp32"),
    ]
    for r in rows:
        assert int(r["trained_steps"]) == 4 and int(r["n_test"]) == 32
        assert math.isfinite(float(r["elbo_bpd"])) and math.isfinite(float(r["iw_bpd"]))
        assert 1.0 < float(r["iw_bpd"]) < 6.0  # 17 levels: log2(17) = 4.09 is uniform
        assert int(r["nonfinite"]) == 0 and float(r["train_cpu_s"]) > 0
    assert table["seeds"] == [0, 1]
    for m in ("elbo_bpd", "iw_bpd"):
        d = [r[f"{m}_bf16"] - r[f"{m}_fp32"] for r in table["per_seed"]]
        assert table["stats"][m]["mean"] == pytest.approx(sum(d) / 2)
    again = script.main(argv)  # every run is in the CSV: nothing is trained again
    with open(out_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    keys = ("seed", "elbo_bpd_fp32", "elbo_bpd_bf16", "iw_bpd_fp32", "iw_bpd_bf16")
    assert [[r[k] for k in keys] for r in again["per_seed"]] == [
        [r[k] for k in keys] for r in table["per_seed"]
    ]

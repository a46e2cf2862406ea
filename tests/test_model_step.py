"""Smoke test of benchmarks/model_step.py: a tiny run writes a complete JSON table.

(Speed is measured by the benchmark itself, never asserted here.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vflow import ops

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "model_step.py"


@pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="needs vflow._C")
def test_model_step_quick_run_writes_rows_with_breakdown(tmp_path):
    out = tmp_path / "model_step.json"
    cmd = [sys.executable, str(SCRIPT), "--configs", "vflow-digits", "--batch", "8"]
    cmd += ["--variants", "reference", "fused", "--repeats", "1", "--sample-repeats", "1"]
    cmd += ["--sample-n", "2", "--profile", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["backend"]) for r in rows] == [
        ("reference", "reference"),
        ("fused", "cpp"),
    ]
    for r in rows:
        assert r["step_ms"] > 0 and r["sample_ms"] > 0 and r["batch"] == 8
        assert sum(r["breakdown"].values()) == pytest.approx(1.0)
        assert r["breakdown"]["convolutions"] > 0
        assert 0 < r["view_ops_per_step"] < r["ops_per_step"]  # ops one step dispatches
    # the fused couplings dispatch fewer ops than the reference's eager formulas
    assert rows[1]["ops_per_step"] < rows[0]["ops_per_step"]
    assert "coupling ops" in rows[1]["breakdown"] and "coupling ops" not in rows[0]["breakdown"]
    assert all(r["breakdown"]["attention"] > 0 for r in rows)  # SDPA / the fused kernel
    for r in rows:  # each variant timed alternately with the reference model in its process
        paired = r["paired"]
        assert paired["reference_ms"] > 0 and paired["step_ms"] > 0
        ratio = paired["reference_ms"] / paired["step_ms"]
        assert r["speedup_vs_reference"] == pytest.approx(ratio)
    assert "vflow-digits" in proc.stdout and "fused" in proc.stdout and "ops/step" in proc.stdout


@pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="needs vflow._C")
def test_model_step_checkpointing_row_pairs_plain_and_checkpointed(tmp_path):
    """The fused+ckpt row: plain and checkpointed steps of one model, timed alternately, with
    the graph's kept bytes, the step's peak of live tensors and its peak memory growth for
    each; ``--threads 1 --cpu-time`` times by CPU time on one thread."""
    out = tmp_path / "model_step.json"
    cmd = [sys.executable, str(SCRIPT), "--configs", "vflow-digits", "--batch", "4"]
    cmd += ["--variants", "fused+ckpt", "--granularities", "block", "net", "step"]
    cmd += ["--repeats", "1", "--threads", "1", "--cpu-time"]
    cmd += ["--skip-sample", "--unpaired", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["variant"] == "fused+ckpt" and row["backend"] == "cpp"
    ckpt = row["checkpointing"]
    assert row["threads"] == 1
    assert list(ckpt) == ["plain", "block", "net", "step"]
    for mode in ("block", "net", "step"):
        r = ckpt[mode]
        assert r["kept_ratio"] == pytest.approx(r["kept_mb"] / ckpt["plain"]["kept_mb"])
        assert 0 < r["kept_ratio"] < 0.5
        assert r["peak_live_ratio"] == pytest.approx(
            r["peak_live_mb"] / ckpt["plain"]["peak_live_mb"]
        )
        assert 0 < r["peak_live_ratio"] < 0.8
        assert r["time_ratio"] == pytest.approx(r["step_ms"] / ckpt["plain"]["step_ms"])
    if sys.platform.startswith("linux"):  # peak RSS via /proc
        assert ckpt["plain"]["growth_mb"] > 0
        assert row["step_growth_mb"] == ckpt["block"]["growth_mb"]
        assert ckpt["block"]["memory_ratio"] == pytest.approx(
            ckpt["block"]["growth_mb"] / ckpt["plain"]["growth_mb"]
        )
    assert row["step_ms"] == pytest.approx(ckpt["block"]["step_ms"])
    assert "process CPU times" in proc.stdout
    assert all(f"ckpt {m}" in proc.stdout for m in ("block", "net", "step"))

"""benchmarks/gpu_report.py: the dry run (CPU, tiny sizes) executes every section and writes
both reports with sane values; a failing, crashing or hanging section is recorded, not fatal."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_report.py"
SECTIONS = [
    "environment",
    "tests",
    "train_step",
    "profile",
    "coupling",
    "train_plain",
    "train_checkpointing",
    "sample",
]


def _run(out, *extra, timeout=900):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _finite_positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_dry_run_writes_every_section(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    md = (tmp_path / "report.md").read_text()
    secs = report["sections"]
    assert list(secs) == SECTIONS
    for name, sec in secs.items():
        ok = ("ok", "not available") if name == "train_checkpointing" else ("ok",)
        assert sec["status"] in ok, (name, sec)
        assert sec["seconds"] < sec["time_limit_s"]
    assert report["meta"]["dry_run"] and report["meta"]["device"] == "cpu"

    env = secs["environment"]["result"]
    assert env["torch"] and env["vflow_backends"]
    assert _finite_positive(env["copy_gbps"])

    tests = secs["tests"]["result"]
    assert tests["passed"] >= 2 and tests["failed"] == 0 and tests["errors"] == 0
    assert "--device cpu" in tests["command"]

    rows = {r["variant"]: r for r in secs["train_step"]["result"]["rows"]}
    assert list(rows) == ["eager fp32", "graphed fp32", "eager bf16 nets", "graphed bf16 nets"]
    for name in ("eager fp32", "eager bf16 nets"):
        r = rows[name]
        assert r["status"] == "ok" and _finite_positive(r["step_ms"]), r
        assert 0 < r["loss_bpd"] < 20 and r["skipped"] == 0
    assert rows["graphed fp32"]["status"] == "not available"  # CUDA graphs need CUDA
    (it,) = secs["profile"]["result"]["iterations"]
    assert not it["graphed"] and it["aten_ops"] > 100 and len(it["top"]) == 10
    assert "## The trainer's iteration" in md and "## Profile of one iteration" in md
    for name in ("train_plain", "train_checkpointing"):
        r = secs[name]["result"]
        if secs[name]["status"] == "not available":
            continue
        assert r["config"] == "vflow-digits" and r["batch"] == 4
        assert _finite_positive(r["step_ms"]) and _finite_positive(r["first_step_s"])
        assert r["loss_finite"] and 0 < r["loss_bpd"] < 20
        assert _finite_positive(r["peak_rss_mb"])
    sample = secs["sample"]["result"]
    assert _finite_positive(sample["sample_ms"]) and sample["pixels_in_range"]
    assert sample["shape"] == [4, 1, 8, 8]

    cases = secs["coupling"]["result"]["cases"]
    assert {c["mode"] for c in cases} == {"forward", "fwdbwd", "inverse", "checkerboard"}
    for case in cases:
        providers = {r["provider"] for r in case["rows"]}
        assert "eager" in providers and "cpp" in providers
        for row in case["rows"]:
            assert _finite_positive(row["ms"]) and _finite_positive(row["gbps"])
            assert row["err"] < 1e-2, (case["mode"], row)
            if row["provider"].startswith("cpp"):  # the bare kernel timed beside the op
                assert _finite_positive(row["kernel_ms"]) and _finite_positive(row["kernel_gbps"])
    assert "| kernel ms |" in md

    for heading in ("## Sections", "## Tests", "## Training step", "## Sampling", "## Coupling"):
        assert heading in md
    assert "## Errors" not in md


def test_failing_sections_are_recorded(tmp_path):
    """An exception, a crash (abort) and a hang each end up in the report; the other sections
    still run and the command exits 1 after writing both files."""
    proc = _run(
        tmp_path,
        "--sections",
        "environment,coupling,sample,train_plain",
        "--inject-failure",
        "coupling",
        "--inject-failure",
        "sample:crash",
        "--inject-failure",
        "train_plain:hang",
        "--section-timeout",
        "train_plain=3",
    )
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    secs = report["sections"]
    assert secs["environment"]["status"] == "ok"
    assert secs["coupling"]["status"] == "error"
    assert "injected failure" in secs["coupling"]["error"]
    assert "RuntimeError" in secs["coupling"]["traceback"]
    assert secs["sample"]["status"] == "error"
    assert "signal 6" in secs["sample"]["error"]
    assert secs["train_plain"]["status"] == "timeout"
    md = (tmp_path / "report.md").read_text()
    assert "## Errors" in md and "injected failure" in md and "timeout" in md


def test_coupling_bytes_model():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import _bandwidth

    dims = (2, 3, 4, 2, 5)  # B, C, H, W (half), K
    half, params = 2 * 3 * 4 * 2, 2 * 3 * 4 * 2 * 17
    assert _bandwidth.coupling_bytes("forward", dims) == 4 * (2 * half + params)
    assert _bandwidth.coupling_bytes("checkerboard", dims) == 4 * (4 * half + params)
    assert _bandwidth.coupling_bytes("fwdbwd", dims) == 4 * (5 * half + 3 * params)
    with pytest.raises(ValueError):
        _bandwidth.coupling_bytes("sideways", dims)


def test_progress_counts_of_an_unfinished_run():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_report

    text = "tests/test_x.py ..F.s   [ 40%]\n..E.\nsome other line ...\n"
    # pytest -q progress lines carry no file name; the first line here is not one
    assert gpu_report._progress_counts(text)["passed"] == 3
    text = "..F.s                    [ 40%]\n..E.\n"
    c = gpu_report._progress_counts(text)
    assert (c["passed"], c["failed"], c["errors"], c["skipped"]) == (6, 1, 1, 1)

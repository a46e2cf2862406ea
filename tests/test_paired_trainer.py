"""Smoke test of benchmarks/paired_trainer.py: the quick mode builds a checkout of the base
revision, times both trainers in turn and prints one ratio per round and their median.

(Speed is measured by the benchmark itself, never asserted here.)"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from vflow import ops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "paired_trainer.py"
BASE = "e040baa"  # the trainer before the device-resident step


def _has_revision(rev: str) -> bool:
    probe = ["git", "-C", str(ROOT), "cat-file", "-e", f"{rev}^{{commit}}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.skipif("cpp" not in ops.available_backends("cpu"), reason="needs vflow._C")
@pytest.mark.skipif(not _has_revision(BASE), reason=f"the clone lacks {BASE} (shallow?)")
def test_quick_run_times_base_and_head_in_turn():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--base", BASE],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rounds = re.findall(r"^\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", proc.stdout, re.M)
    assert len(rounds) == 2, proc.stdout
    for base_s, head_s, ratio in rounds:
        assert float(base_s) > 0 and float(head_s) > 0
        assert float(ratio) == pytest.approx(float(base_s) / float(head_s), rel=2e-3)
    assert re.search(r"median base/head = [\d.]+", proc.stdout)
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "list"], capture_output=True, text=True
    ).stdout
    assert "paired-trainer-" not in listed  # the temporary checkout is removed

"""The trainer's iteration, one git revision against another, timed side by side.

Each revision runs in its own worker process (its own checkout, made with
``git worktree add --detach`` under a temporary folder, with this checkout's C++ extension
and the ``vflow/kernels`` link), builds a ``Trainer`` for the same config, seed and thread
count, and waits. The parent then asks the workers in turn, ABAB..., to run a block of
``--steps`` calls of ``Trainer.train_step`` and report its wall time, so that load on the
machine falls on both alike; the answer is the median over rounds of the per-round ratio
``time(base) / time(head)`` (> 1: the head is faster) with its spread.

Only the iteration is timed: the same batches, the same forward, backward, optimizer and
EMA on both sides, plus whatever each trainer does per step (the old one reads the loss
and the gradient norm on the host every step; the new one once per logging window).

    python benchmarks/paired_trainer.py --base e040baa --config vflow-digits --threads 1
    python benchmarks/paired_trainer.py --quick          # CI: a few steps, prints the table

The base must be a revision whose ``Trainer`` has ``train_step`` (every revision since the
trainer existed). Machine, revisions and thread count are printed with the result.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: The worker: build a trainer (its run directory in the parent's temporary folder), say
#: "@ready", then answer each "N" with "@ <seconds N iterations took>", until "q" (its
#: other output is the trainer's).
_WORKER = r"""
import sys, time
import torch
from vflow.train import Trainer, TrainArgs, TrainWindow
config, seed, threads, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
args = TrainArgs(config=config, out=out, steps=10**6, seed=seed,
                 device="cpu", num_threads=threads, progress=False, eval_every=0,
                 final_eval=False, ckpt_every=10**6)
trainer = Trainer(args)
if trainer.window is None:  # revisions before the device-resident step set it in run()
    trainer.window = TrainWindow()
print("@ready", flush=True)
for line in sys.stdin:
    if line.strip() == "q":
        break
    t0 = time.perf_counter()
    for _ in range(int(line)):
        trainer.train_step()
    print("@", time.perf_counter() - t0, flush=True)
"""


def checkout(rev: str, where: Path) -> Path:
    """A detached worktree of ``rev`` under ``where`` with this checkout's built extension
    and the ``vflow/kernels`` link (the layout an editable install gives)."""
    path = where / rev.replace("/", "_")
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(path), rev],
        check=True,
        capture_output=True,
    )
    for so in (ROOT / "vflow").glob("_C*.so"):
        shutil.copy2(so, path / "vflow" / so.name)
    kernels = path / "vflow" / "kernels"
    if not kernels.exists():
        kernels.symlink_to("../kernels")
    return path


class Worker:
    """A trainer of one checkout in its own process, driven through stdin/stdout."""

    def __init__(self, root: Path, config: str, seed: int, threads: int, run_dir: Path):
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER, config, str(seed), str(threads), str(run_dir)],
            cwd=root,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._answer()

    def _answer(self) -> str:
        """The worker's next answer (a line starting with "@"), passing its other output on."""
        for line in self.proc.stdout:
            if line.startswith("@"):
                return line[1:].strip()
            print(f"  [{self.proc.args[-4]} worker] {line.rstrip()}")
        raise RuntimeError("the worker stopped; see its stderr above")

    def time(self, steps: int) -> float:
        """Seconds taken by ``steps`` iterations."""
        self.proc.stdin.write(f"{steps}\n")
        self.proc.stdin.flush()
        return float(self._answer())

    def close(self) -> None:
        self.proc.stdin.write("q\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)


def paired_ratios(base: Worker, head: Worker, steps: int, rounds: int, warmup: int) -> list:
    """Per-round ``time(base) / time(head)`` over ``rounds`` ABAB rounds (the order flips
    every round), after ``warmup`` untimed iterations on each side."""
    base.time(warmup)
    head.time(warmup)
    ratios = []
    for r in range(rounds):
        if r % 2 == 0:
            tb, th = base.time(steps), head.time(steps)
        else:
            th, tb = head.time(steps), base.time(steps)
        ratios.append((tb, th))
    return ratios


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default="e040baa", help="git revision to compare against")
    p.add_argument("--config", default="vflow-digits", help="model config of both runs")
    p.add_argument("--steps", type=int, default=10, help="iterations per timed block")
    p.add_argument("--rounds", type=int, default=8, help="ABAB rounds")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="2 rounds of 2 steps (CI)")
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.rounds, a.warmup = 2, 2, 1
    with tempfile.TemporaryDirectory(prefix="paired-trainer-") as tmp:
        base_root = checkout(a.base, Path(tmp))
        try:
            base = Worker(base_root, a.config, a.seed, a.threads, Path(tmp) / "base-run")
            head = Worker(ROOT, a.config, a.seed, a.threads, Path(tmp) / "head-run")
            pairs = paired_ratios(base, head, a.steps, a.rounds, a.warmup)
            base.close()
            head.close()
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_root)],
                capture_output=True,
            )
    ratios = [tb / th for tb, th in pairs]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus; "
        f"{a.threads} thread(s) per worker; config {a.config}; base {a.base} vs head "
        f"(working tree of {ROOT})"
    )
    print("round  base s/it  head s/it  base/head")
    for r, ((tb, th), q) in enumerate(zip(pairs, ratios, strict=True)):
        print(f"{r:5d}  {tb / a.steps:9.4f}  {th / a.steps:9.4f}  {q:9.3f}")
    print(
        f"median base/head = {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f}; > 1: head faster)"
    )


if __name__ == "__main__":
    main()

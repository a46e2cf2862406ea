"""Compile time and compiled-step speed of ``vflow train --compile`` (issue 27).

For one config and each compile mode (``regional``: :func:`vflow.compile_regions`, each kind
of network block compiled once and shared by its instances; ``elbo``: ``torch.compile`` of
the whole training objective), one subprocess with an empty inductor cache (a fresh
``TORCHINDUCTOR_CACHE_DIR``: a cold compile, as on a user's first run):

1. builds the fused model (``cpp`` on CPU, ``triton`` on CUDA), data-initialised, and an
   eager twin with the same weights;
2. times the first compiled training step (ELBO forward + backward): the compile time, wall
   clock and the process's CPU time (inductor's compile workers are other processes, so the
   wall clock is the number a user waits);
3. times compiled and eager steps alternately (``--pairs`` pairs on ``--threads`` torch
   threads, so other load on a shared machine hits both sides): the ratio eager / compiled
   is the compiled step's speed-up over the eager step that ``vflow train`` runs without
   ``--compile``, by wall clock (what a user waits) and by process CPU time (which also
   counts the CPU that idle-spinning OpenMP threads of compiled kernels burn).

A mode that has not compiled after ``--timeout`` seconds is reported as "> timeout" (a lower
bound on its compile time). Prints a table and writes JSON (``--out``).

    python benchmarks/compile_time.py --config vflow-cifar10 --batch 8 --timeout 3600
    python benchmarks/compile_time.py --quick     # tiny model, regional only (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("regional", "elbo")


def _build(config: str, batch: int, quick: bool, backend: str):
    """(model, x): ``config`` (or, with ``quick``, a two-block 8-filter vflow-digits) on
    ``backend``, initialised from one batch of random images, in training mode."""
    import torch

    import vflow
    from vflow.models import f_checker, g_checker

    torch.manual_seed(0)
    tiny = dict(p=(f_checker(2, 8, 2, 2),), q=(g_checker(2, 8, 2, 1),), context_blocks=1)
    model = vflow.build(config, backend=backend, **(tiny if quick else {}))
    c, h, w = model.config.data_shape
    x = torch.randint(0, model.config.n_bins, (batch, c, h, w))
    model.initialize(x)
    return model.train(), x


def _step(model, objective, x):
    """One training step: the mean bits/dim of ``x`` and its backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    loss = objective(x).mean()
    loss.backward()
    return float(loss)


def _seconds(fn) -> tuple[float, float]:
    """(wall clock, process CPU time) of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def worker(args) -> dict:
    """Compile ``args.mode`` for ``args.config`` and time it against eager (module doc)."""
    import copy

    import torch
    from torch._dynamo.utils import counters

    from vflow import ops
    from vflow.compile import compile_regions
    from vflow.train import compile_objective

    torch.set_num_threads(args.threads)
    backend = next(b for b in ("cpp", "triton", "reference") if b in ops.available_backends("cpu"))
    model, x = _build(args.config, args.batch, args.quick, backend)
    eager = copy.deepcopy(model)
    if args.mode == "regional":
        regions = compile_regions(model)
        objective = model.bpd
    else:
        regions = 0
        objective = compile_objective(model.bpd, "cpu")
    wall0, cpu0 = time.perf_counter(), time.process_time()
    loss = _step(model, objective, x)
    compile_wall, compile_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    graphs = counters["stats"]["unique_graphs"]
    eager_loss = _step(eager, eager.bpd, x)
    compiled_s, eager_s = [], []
    for _ in range(args.pairs):
        compiled_s.append(_seconds(lambda: _step(model, objective, x)))
        eager_s.append(_seconds(lambda: _step(eager, eager.bpd, x)))
    wall = [e[0] / c[0] for e, c in zip(eager_s, compiled_s, strict=True)]
    cpu = [e[1] / c[1] for e, c in zip(eager_s, compiled_s, strict=True)]
    return dict(
        config=args.config + (" (tiny)" if args.quick else ""),
        mode=args.mode,
        backend=backend,
        batch=args.batch,
        threads=args.threads,
        regions=regions,
        graphs=graphs,
        compile_wall_s=compile_wall,
        compile_cpu_s=compile_cpu,
        loss=loss,
        eager_loss=eager_loss,
        compiled_step_s=statistics.median(c[0] for c in compiled_s),
        eager_step_s=statistics.median(e[0] for e in eager_s),
        speedup=statistics.median(wall),
        speedup_range=[min(wall), max(wall)],
        cpu_speedup=statistics.median(cpu),
        cpu_speedup_range=[min(cpu), max(cpu)],
    )


def _run_mode(args, mode: str) -> dict:
    """``worker`` for ``mode`` in a subprocess with an empty inductor cache."""
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--config", args.config]
    cmd += ["--batch", str(args.batch), "--pairs", str(args.pairs), "--threads", str(args.threads)]
    if args.quick:
        cmd.append("--quick")
    with tempfile.TemporaryDirectory(prefix="vflow-inductor-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, PYTHONWARNINGS="ignore")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=env, timeout=args.timeout
            )
        except subprocess.TimeoutExpired:
            return dict(mode=mode, timed_out_after_s=args.timeout)
    if proc.returncode:
        return dict(mode=mode, error=proc.stderr.strip().splitlines()[-3:])
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_wall_s"] = time.perf_counter() - t0
    return row


def _print(rows: list[dict]) -> None:
    print(
        f"{'mode':<9} {'graphs':>6} {'compile s (wall)':>17} {'cpu s':>8} "
        f"{'eager/compiled wall':>22} {'(process CPU)':>22}"
    )
    for row in rows:
        if "timed_out_after_s" in row:
            print(f"{row['mode']:<9} {'-':>6} {'> ' + str(int(row['timed_out_after_s'])):>17}")
        elif "error" in row:
            print(f"{row['mode']:<9} error: {row['error']}")
        else:
            lo, hi = row["speedup_range"]
            clo, chi = row["cpu_speedup_range"]
            print(
                f"{row['mode']:<9} {row['graphs']:>6} {row['compile_wall_s']:>17.1f} "
                f"{row['compile_cpu_s']:>8.1f} {row['speedup']:>9.2f}x ({lo:.2f}-{hi:.2f}) "
                f"{row['cpu_speedup']:>9.2f}x ({clo:.2f}-{chi:.2f})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="vflow-cifar10")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pairs", type=int, default=6, help="alternating timed step pairs")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the steps")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per mode")
    parser.add_argument("--quick", action="store_true", help="tiny vflow-digits, regional only")
    parser.add_argument("--out", default="results/compile_time.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.config, args.modes, args.batch, args.pairs = "vflow-digits", ["regional"], 4, 2
    rows = []
    for mode in args.modes:
        print(f"... {args.config} / {mode} (cold inductor cache)", file=sys.stderr, flush=True)
        rows.append(_run_mode(args, mode))
        _print(rows[-1:])
    print(f"\n{args.config}, batch {args.batch}, {args.threads} torch thread(s)")
    _print(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(config=args.config, batch=args.batch, rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

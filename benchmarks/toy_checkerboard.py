"""Section 5 of the VFlow paper (Figures 2 and 3): Glow vs VFlow on the 2-D checkerboard.

Data: ``x`` in ``R^2`` uniform on 8 of the 16 cells of side 2 of ``[-4, 4]^2``; the best
average log-likelihood is ``-log 32 = -3.466`` nats. Training batches are fresh samples;
the test set is a fixed 1,000-point sample.

Models (``vflow.toy``), for flow dimensionality ``D`` and ``L`` transformation steps:
  * ``D = 2``: Glow, ``L`` steps of [D x D invertible linear map + bias, affine coupling with
    one MLP (2 hidden layers of 50 units) giving the shift and bounded log-scale, reversal],
    standard normal base; trained and evaluated by the exact log-likelihood.
  * ``D > 2``: VFlow, ``x`` augmented with ``z`` in ``R^(D-2)``; ``p(x, z)`` a D-dim Glow
    with ``L - 1`` steps; ``q(z|x)`` a conditional Glow with one step (coupling nets see
    ``x``) on top of a conditional Gaussian base with ``mu(x)``, ``log sigma(x)``. Trained
    by the reparameterised ELBO ``E_q[log p(x, z) - log q(z|x)]``; evaluated with 100-sample
    importance sampling ``logsumexp_s(log p(x, z_s) - log q(z_s|x)) - log 100`` (Eq. 5).
Adam with batch 64 for every run.

Grid: D in {2, 4, 6, 8, 10} x L in {2, 3, 4, 5, 10, 15, 20}, over ``--seeds`` seeds.
Outputs in ``--out``: ``results.csv`` (one row per (D, L): dims, steps, params, ll_mean,
ll_std, iters, seeds), ``runs.csv`` (one row per run), ``ll_vs_params.png`` (Fig. 3),
``density.png`` (Fig. 2: data, 3-step Glow, 3-step 10-dim VFlow, 20-step Glow, the seed-0
models titled with their test log-likelihood; the VFlow density importance-sampled), the
same panels one per file (``density_data.png``, ``density_D{D}_L{L}.png``).

Timing (CPU seconds of one process with 1 torch thread, measured on a busy 2-core machine):
training costs about 0.84 L + 0.7 s per 1,000 iterations for Glow and 0.84 L + 1.9 s for
VFlow; one (D=10, L=20) run takes 18.7 s per 1,000 iterations plus 2.3 s of evaluation,
a (D=10, L=3) run 3.3 s, a (D=2, L=3) run 2.9 s. One seed of the whole 35-point grid costs
about 306 core-seconds per 1,000 iterations. The paper's budget (100,000 iterations x 5
seeds) would take about 21 hours on 2 cores, so the default full mode is
``--iters 15000 --seeds 2``: estimated at 9,300 core-seconds; the measured full run took
6,858 CPU-seconds of training and 68 minutes of wall time with ``--workers 2`` on the
development machine's 2 cores (longer when they are shared). Iterations are
favoured over seeds because VFlow overtakes Glow only after ~10,000 iterations: one seed of
the 3-step models gave Glow / 10-dim VFlow -3.96 / -4.03 at 4,000 iterations, -3.96 / -3.91
at 8,000, -3.94 / -3.83 at 12,000 and -3.91 / -3.75 at 20,000 (Glow plateaus, VFlow keeps
improving); ``--iters 10000 --seeds 3`` costs the same. ``--quick`` trains D in {2, 10} x
L in {3, 20} for 400 iterations with 1 seed (about 30 CPU-seconds: well under a minute on
idle cores, a few minutes on a busy machine). The default learning rate 1e-3 is the one
that trains the 20-step models best in short runs (3e-3 helps the 3-step VFlow but hurts
the 20-step Glow).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mean_std, run_parallel, write_csv  # noqa: E402

from vflow.toy import checkerboard_density, train_and_evaluate  # noqa: E402

OPTIMUM = -math.log(32)
# Paper section 5 (nats, mean +- std over 5 seeds, 100,000 iterations).
PAPER = {(10, 3): (-3.51, 0.01), (2, 3): (-3.67, 0.03), (2, 20): (-3.54, 0.05)}
# Fig. 2 panels: (D, L, title).
DENSITY_MODELS = [(2, 3, "3-step Glow"), (10, 3, "3-step 10-dim VFlow"), (2, 20, "20-step Glow")]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    ap.add_argument("--dims", type=ints, default=[2, 4, 6, 8, 10], help="flow dims D, e.g. 2,10")
    ap.add_argument("--steps", type=ints, default=[2, 3, 4, 5, 10, 15, 20], help="steps L")
    ap.add_argument("--iters", type=int, default=15_000, help="Adam steps (paper: 100000)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per (D, L) (paper: 5)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=100, help="importance samples (Eq. 5)")
    ap.add_argument("--density-px", type=int, default=128, help="density image resolution")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("results/toy_checkerboard"))
    ap.add_argument("--quick", action="store_true", help="D 2,10 x L 3,20, 400 iters, 1 seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.steps, args.iters, args.seeds = [2, 10], [3, 20], 400, 1
    bad = [(d, l) for d in args.dims for l in args.steps if d < 2 or (d > 2 and l < 2) or l < 1]
    if bad:
        ap.error(f"invalid (D, L) pairs: {bad} (need D >= 2, L >= 1, and L >= 2 for VFlow)")
    return args


def run_all(jobs: list[dict], workers: int) -> list[dict]:
    """Run ``train_and_evaluate(**job)`` for every job, longest first, in ``workers``
    processes (each with one torch thread); in this process when ``workers == 1``."""
    jobs = sorted(jobs, key=lambda j: -(j["steps"] + (j["dim"] > 2)))
    return run_parallel(train_and_evaluate, jobs, workers)


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (D, L): params, mean and sample std over seeds of the test log-likelihood."""
    rows = []
    for key in sorted({(r["dims"], r["steps"]) for r in runs}):
        sel = [r for r in runs if (r["dims"], r["steps"]) == key]
        ll_mean, ll_std = mean_std(r["test_ll"] for r in sel)
        rows.append(
            {
                "dims": key[0],
                "steps": key[1],
                "params": sel[0]["params"],
                "ll_mean": ll_mean,
                "ll_std": ll_std,
                "iters": sel[0]["iters"],
                "seeds": len(sel),
            }
        )
    return rows


def plot_ll_vs_params(rows: list[dict], path: Path) -> None:
    """Fig. 3: test log-likelihood vs parameter count, one line per dimensionality."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for d in sorted({r["dims"] for r in rows}):
        sel = sorted((r for r in rows if r["dims"] == d), key=lambda r: r["params"])
        ax.errorbar(
            [r["params"] for r in sel],
            [r["ll_mean"] for r in sel],
            yerr=[r["ll_std"] for r in sel],
            marker="o",
            capsize=2,
            label=f"D={d}" + (" (Glow)" if d == 2 else " (VFlow)"),
        )
    ax.axhline(OPTIMUM, color="k", ls="--", lw=1, label="-log 32 (optimum)")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test log-likelihood (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_densities(panels: list[tuple[str, np.ndarray, str]], out: Path) -> None:
    """Fig. 2: (title, density image on [-4, 4]^2, file name) panels side by side in
    ``density.png``, and each panel alone in its own file."""
    import matplotlib.pyplot as plt

    ext = (-4, 4, -4, 4)
    fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.4), layout="constrained")
    for ax, (title, img, _) in zip(np.atleast_1d(axes), panels, strict=True):
        ax.imshow(img, origin="lower", extent=ext, cmap="viridis")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(out / "density.png", dpi=120)
    plt.close(fig)
    for _, img, fname in panels:
        plt.imsave(out / fname, img, origin="lower", cmap="viridis")


def true_density(n: int) -> np.ndarray:
    import torch

    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 8 - 4
    x2, x1 = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1)
    return checkerboard_density(pts).view(n, n).numpy()


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [
        dict(
            dim=d,
            steps=l,
            seed=s,
            iters=args.iters,
            lr=args.lr,
            batch=args.batch,
            samples=args.samples,
            density=(s == 0 and any((d, l) == m[:2] for m in DENSITY_MODELS)),
            density_px=args.density_px,
        )
        for d in args.dims
        for l in args.steps
        for s in range(args.seeds)
    ]
    t0 = time.perf_counter()
    runs = run_all(jobs, args.workers)
    wall = time.perf_counter() - t0
    rows = summarise(runs)
    write_csv(args.out / "results.csv", rows)
    write_csv(args.out / "runs.csv", [{k: v for k, v in r.items() if k != "density"} for r in runs])
    plot_ll_vs_params(rows, args.out / "ll_vs_params.png")

    panels = [(f"data ({OPTIMUM:.3f})", true_density(args.density_px), "density_data.png")]
    seed0 = {(r["dims"], r["steps"]): r for r in runs if "density" in r}
    for d, l, name in DENSITY_MODELS:  # the seed-0 models, titled with their test ll
        if (d, l) in seed0:
            r = seed0[(d, l)]
            panels.append((f"{name} ({r['test_ll']:.3f})", r["density"], f"density_D{d}_L{l}.png"))
    plot_densities(panels, args.out)

    cpu = sum(r["train_cpu_s"] for r in runs)
    print(
        f"\n{len(runs)} runs, {args.iters} iterations each, wall {wall:.0f} s, "
        f"training CPU {cpu:.0f} s; out: {args.out}"
    )
    print(f"{'D':>3} {'L':>3} {'params':>7} {'test ll (nats)':>17} {'paper':>14}")
    for r in rows:
        p = PAPER.get((r["dims"], r["steps"]))
        ps = f"{p[0]:.2f} +- {p[1]:.2f}" if p else ""
        print(
            f"{r['dims']:>3} {r['steps']:>3} {r['params']:>7} "
            f"{r['ll_mean']:>8.3f} +- {r['ll_std']:.3f} {ps:>14}"
        )
    print(f"optimum -log 32 = {OPTIMUM:.3f}")
    return rows


if __name__ == "__main__":
    main()

"""Section 6.2 / Table 5 of the VFlow paper on 8x8 digits: more channels under a FIXED
parameter budget.

The paper trains a 3-channel Flow++ and 4- and 6-channel VFlows with ~4.0M parameters on
CIFAR-10 (D_H = 32, K = 4; the number of hidden layers B shrinks as channels are added) and
finds that dimensionality helps: 3.21-3.23 / 3.15-3.16 / 3.12-3.13 bpd (Tables 2 and 5).
Here the same idea runs on scikit-learn's 8x8 digits (17 grey levels, the package's fixed
20% test split) with a ~260k-parameter budget:

  name          channels  p (8x8 scale, then SpaceToDepth, 4x4 scale)           params
  flowpp-1ch    1         f_checker(3,16,4)x4 | f_channel(3,16,4)x2 f_checker x3  259,888
  vflow-2ch     1 + 1     f_affine(1,22); f_checker(2,16,4)x2 f_channel x2 |
                          f_checker(2,16,4)x2 f_channel x3                       260,560
  vflow-3ch     1 + 2     f_affine(1,34); f_checker(1,16,4)x4 |
                          f_checker(1,16,4)x2 f_channel x3 (3 channels: no
                          channel split at 8x8, as Flow++ on RGB)               260,826
  vflow-4ch     1 + 3     f_affine(1,48); f_checker(1,12,4)x2 f_channel x2 |
                          f_checker(1,12,4)x2 f_channel x3                       259,534

All four are within 0.5% of each other. As in Table 5, the dequantiser r (g_checker(1,16,4)
x2, Sigmoid) is the same in every model, and so is q(z|x) (g_checker(1,16,4) x2, Sigmoid) in
the VFlows; the context nets are those of the package's "flowpp-digits"/"vflow-digits"
configs (8 filters, 1 gated conv). The extra channels are paid for by fewer hidden layers B
(3 -> 2 -> 1) and, for the 4-channel model, narrower nets (D_H 16 -> 12); the f_affine
filters take up the remainder. (On 8x8 images most of a coupling's parameters sit in its
output convolution, which grows with the number of channels, so the extra channels are
relatively more expensive than on CIFAR-10.)

Training uses the package's trainer (``vflow.train.train``) and digits loader with the
"flowpp-digits" / "vflow-digits" recipe (Adam, lr 2e-3 with a 100-step warm-up, batch 64,
grad-norm clip 1, EMA 0.99, data-dependent ActNorm init), the same steps and schedule for
every model. Each run is evaluated with the EMA weights on the whole test split (359
images): the ELBO (Eq. 7) and the importance-weighted estimate (Eq. 5, ``model.log_prob``
with ``--samples`` samples), both in bits/dim.

Outputs in ``--out`` (default results/digits_ablation): ``results.csv`` (one row per model:
name, extra_channels, params, bpd_iw_mean, bpd_iw_std, bpd_elbo_mean, seeds, steps; the std
is the sample std over seeds, 0 for one seed), ``runs.csv`` (one row per run),
``bpd_bar.png`` (mean IW bpd per model with std error bars) and ``runs/<model>-s<seed>/``
(the trainer's run directories: metrics.jsonl, loss.png, final checkpoint).

Workaround: the trainer serialises ``TrainArgs.overrides`` into the checkpoint spec as plain
data, and tuples of ``Step`` objects do not survive that (``vflow.train.default_build``
would receive strings), so this script passes ``{"ablation": <model name>}`` as the
override and its own ``build_fn`` to ``vflow.train.train``, which builds the model from
:data:`MODELS`.

Timing (measured with ``--steps 1000 --seeds 1 --samples 128 --workers 2`` on the busy,
shared 2-core machine this was written on): a training step costs ~0.3-0.45 s wall per
process (1 torch thread, batch 64; ~0.15 s of CPU time on an idle core) and the final
evaluation with 128 samples ~1-1.5 minutes, so one run of the default 1,000 steps took
6-10 minutes (training alone ~2.5-3 minutes on an idle core); the 4 runs took 947 s wall.
The budget cannot shrink much further: at ~200k parameters the 4-channel model would be
left with D_H = 8. Full-mode defaults: ``--steps 1000 --seeds 3 --samples 128 --workers
2``: 12 runs, an estimated ~45-50 minutes on the shared 2-core machine (3 x 947 s; about
half that on two idle cores). ``--quick``: 40 steps, 1 seed, 8 samples (45-50 s with
``--workers 1`` on the busy machine; the numbers are meaningless).

Measured (1,000 steps, seed 0, S = 128, test IW / ELBO bpd): flowpp-1ch 1.785 / 1.864,
vflow-2ch 1.873 / 1.950, vflow-3ch 1.904 / 1.991, vflow-4ch 1.910 / 1.988. In runs this
short the extra channels do NOT help on digits (unlike the paper's converged CIFAR-10 runs);
whether that changes with longer training is open.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import mean_std, run_parallel, write_csv  # noqa: E402

from vflow.models import (  # noqa: E402
    SQUEEZE,
    build,
    f_affine,
    f_channel,
    f_checker,
    g_checker,
    parameter_counts,
)

K = 4  # mixture components (the paper's Table 5 uses K = 4)
QR = g_checker(1, 16, K, 2)  # q(z|x) and r(u|x): identical in every model


def _p_flowpp(blocks: int, filters: int) -> tuple:
    """Table 5's Flow++ p: checkerboard only at full scale (odd channel count)."""
    return (
        f_checker(blocks, filters, K, 4),
        SQUEEZE,
        f_channel(blocks, filters, K, 2),
        f_checker(blocks, filters, K, 3),
    )


def _p_vflow(channels: int, blocks: int, filters: int, affine: tuple[int, int]) -> tuple:
    """Table 5's VFlow p: f_affine, then checker + channel couplings at both scales (only
    checker couplings at 8x8 when the channel count is odd, as Flow++ on RGB images)."""
    if channels % 2 == 0:
        top = (f_checker(blocks, filters, K, 2), f_channel(blocks, filters, K, 2))
    else:
        top = (f_checker(blocks, filters, K, 4),)
    return (
        (f_affine(*affine),)
        + top
        + (SQUEEZE, f_checker(blocks, filters, K, 2), f_channel(blocks, filters, K, 3))
    )


#: name -> (base config, overrides of vflow.build). Same budget (~260k parameters).
MODELS: dict[str, tuple[str, dict]] = {
    "flowpp-1ch": ("flowpp-digits", dict(p=_p_flowpp(3, 16), r=(QR,))),
    "vflow-2ch": (
        "vflow-digits",
        dict(p=_p_vflow(2, 2, 16, (1, 22)), q=(QR,), r=(QR,), extra_channels=1),
    ),
    "vflow-3ch": (
        "vflow-digits",
        dict(p=_p_vflow(3, 1, 16, (1, 34)), q=(QR,), r=(QR,), extra_channels=2),
    ),
    "vflow-4ch": (
        "vflow-digits",
        dict(p=_p_vflow(4, 1, 12, (1, 48)), q=(QR,), r=(QR,), extra_channels=3),
    ),
}

#: Paper, CIFAR-10 under a 4M budget: (model, channels, params, bpd Table 2, bpd Table 5).
PAPER = [
    ("3-channel Flow++", 3, "4.02M", 3.23, 3.21),
    ("4-channel VFlow", 4, "4.03M", 3.16, 3.15),
    ("6-channel VFlow", 6, "4.01M", 3.13, 3.12),
]

FULL = dict(steps=1000, seeds=3, samples=128)
QUICK = dict(steps=40, seeds=1, samples=8)


def build_model(name: str, backend: str = "auto"):
    """The ablation model ``name`` (a key of :data:`MODELS`)."""
    base, overrides = MODELS[name]
    return build(base, backend=backend, **overrides)


def extra_channels(name: str) -> int:
    return int(MODELS[name][1].get("extra_channels", 0))


def param_counts(names=None) -> dict[str, dict[str, int]]:
    """{name: parameter_counts(model)} for the ablation models (built on the meta device)."""
    out = {}
    for name in names or MODELS:
        with torch.device("meta"):
            out[name] = parameter_counts(build_model(name, backend="reference"))
    return out


def _build_fn(spec: dict):
    """``build_fn`` for ``vflow.train.train``: the spec's overrides name the ablation model."""
    return build_model(spec["overrides"]["ablation"], backend=spec.get("backend", "auto"))


def run_one(name: str, seed: int, steps: int, samples: int, out: str) -> dict:
    """Train ``name`` with the package's trainer; evaluate ELBO and IW bpd on the test split."""
    torch.set_num_threads(1)
    from vflow.train import TrainArgs, train

    base = MODELS[name][0]
    run_dir = os.path.join(out, "runs", f"{name}-s{seed}")
    if os.path.isdir(run_dir):
        shutil.rmtree(run_dir)  # a fresh run (the trainer refuses to overwrite checkpoints)
    args = TrainArgs(
        config=base,  # the recipe ("flowpp-digits" / "vflow-digits") and the dataset
        data="digits",
        out=run_dir,
        steps=steps,
        seed=seed,
        overrides={"ablation": name},
        eval_every=0,
        ckpt_every=0,
        keep=1,
        final_eval=True,
        iw_samples=samples,
        n_samples=0,
        progress=False,
        num_threads=1,
    )
    t0 = time.perf_counter()
    res = train(args, build_fn=_build_fn)
    wall = time.perf_counter() - t0
    return {
        "name": name,
        "extra_channels": extra_channels(name),
        "params": sum(p.numel() for p in res.model.parameters()),
        "seed": seed,
        "steps": res.step,
        "samples": samples,
        "bpd_iw": res.final["iw_bpd"],
        "bpd_elbo": res.final["elbo_bpd"],
        "skipped": res.skipped,
        "seconds": round(wall, 1),
    }


def summarise(runs: list[dict]) -> list[dict]:
    """One row per model (in :data:`MODELS` order)."""
    rows = []
    for name in MODELS:
        sel = [r for r in runs if r["name"] == name]
        if not sel:
            continue
        iw_mean, iw_std = mean_std(r["bpd_iw"] for r in sel)
        elbo_mean, _ = mean_std(r["bpd_elbo"] for r in sel)
        rows.append(
            {
                "name": name,
                "extra_channels": sel[0]["extra_channels"],
                "params": sel[0]["params"],
                "bpd_iw_mean": iw_mean,
                "bpd_iw_std": iw_std,
                "bpd_elbo_mean": elbo_mean,
                "seeds": len(sel),
                "steps": sel[0]["steps"],
            }
        )
    return rows


def plot_bars(rows: list[dict], path: Path, samples: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rows))
    means = [r["bpd_iw_mean"] for r in rows]
    ax.bar(
        x,
        means,
        yerr=[r["bpd_iw_std"] for r in rows],
        capsize=4,
        color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1),
    )
    ax.scatter(x, [r["bpd_elbo_mean"] for r in rows], marker="_", s=300, c="k", label="ELBO")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['name']}\n{r['params'] / 1e3:.1f}k" for r in rows], fontsize=8)
    lo = min(means + [r["bpd_elbo_mean"] for r in rows])
    hi = max(m + r["bpd_iw_std"] for m, r in zip(means, rows, strict=True))
    hi = max(hi, max(r["bpd_elbo_mean"] for r in rows))
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(lo - 3 * pad, hi + pad)
    ax.set_ylabel(f"test bits/dim (IW, S={samples})")
    ax.set_title(
        f"8x8 digits, fixed budget; {rows[0]['steps']} steps, {rows[0]['seeds']} seed(s)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def budget_table(counts: dict[str, dict[str, int]]) -> str:
    ref = counts["flowpp-1ch"]["total"]
    lines = [f"{'model':<12} {'Cz':>3} {'p':>9} {'q':>8} {'r':>8} {'total':>9} {'vs Flow++':>9}"]
    for name, c in counts.items():
        lines.append(
            f"{name:<12} {extra_channels(name):>3} {c['p']:>9,} {c['q']:>8,} {c['r']:>8,} "
            f"{c['total']:>9,} {c['total'] / ref - 1:>+9.2%}"
        )
    return "\n".join(lines)


def results_table(rows: list[dict]) -> str:
    lines = [
        "This run (8x8 digits, 17 levels, test split, EMA weights):",
        f"{'model':<12} {'channels':>8} {'params':>9} {'IW bpd':>16} {'ELBO bpd':>9} {'seeds':>5}",
    ]
    for r in rows:
        iw = f"{r['bpd_iw_mean']:.4f} +- {r['bpd_iw_std']:.4f}"
        lines.append(
            f"{r['name']:<12} {1 + r['extra_channels']:>8} {r['params']:>9,} {iw:>16} "
            f"{r['bpd_elbo_mean']:>9.4f} {r['seeds']:>5}"
        )
    lines.append("Paper (CIFAR-10, 4M budget, Tables 2 and 5; reference only):")
    lines.append(f"{'model':<18} {'channels':>8} {'params':>7} {'Table 2':>8} {'Table 5':>8}")
    for model, ch, params, t2, t5 in PAPER:
        lines.append(f"{model:<18} {ch:>8} {params:>7} {t2:>8.2f} {t5:>8.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, help=f"training steps (default {FULL['steps']})")
    ap.add_argument("--seeds", type=int, help=f"seeds per model (default {FULL['seeds']})")
    ap.add_argument(
        "--samples", type=int, help=f"importance samples S per image (default {FULL['samples']})"
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    ap.add_argument("--out", type=Path, default=Path("results/digits_ablation"))
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of the models"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help=(
            f"smoke run: {QUICK['steps']} steps, {QUICK['seeds']} seed, {QUICK['samples']} samples"
        ),
    )
    args = ap.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}")
    if min(args.steps, args.seeds, args.samples, args.workers) < 1:
        ap.error("--steps, --seeds, --samples and --workers must be >= 1")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = param_counts(args.models)
    print("Parameter budget:\n" + budget_table(counts), flush=True)
    jobs = [
        dict(name=m, seed=s, steps=args.steps, samples=args.samples, out=str(args.out))
        for s in range(args.seeds)
        for m in args.models
    ]
    t0 = time.perf_counter()
    runs = run_parallel(run_one, jobs, args.workers)
    runs.sort(key=lambda r: (list(MODELS).index(r["name"]), r["seed"]))
    for r in runs:
        if not (math.isfinite(r["bpd_iw"]) and math.isfinite(r["bpd_elbo"])):
            print(f"warning: non-finite bpd in {r}", file=sys.stderr)
    rows = summarise(runs)
    write_csv(args.out / "runs.csv", runs)
    write_csv(args.out / "results.csv", rows)
    plot_bars(rows, args.out / "bpd_bar.png", args.samples)
    print(results_table(rows))
    per_run = np.mean([r["seconds"] for r in runs])
    print(
        f"{len(runs)} runs in {time.perf_counter() - t0:.0f} s wall "
        f"({per_run:.0f} s per run, {args.workers} worker(s)); outputs in {args.out}"
    )
    return rows


if __name__ == "__main__":
    main()

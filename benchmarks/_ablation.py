"""The fixed-parameter-budget ablation of the VFlow paper (section 6.2, Table 2 / Table 5,
Fig. 6), shared by ``digits_ablation.py`` (8x8 digits) and ``fashion_ablation.py``
(Fashion-MNIST): each script is a :class:`Study` (dataset, models, recipe, presets) handed to
:func:`main`.

A study trains a Flow++ and VFlows with more channels at ONE parameter budget, with the same
recipe, steps, seeds and data-dependent initialisation for all, and reports:

* ``curves.csv`` / ``curves.png`` (the paper's Fig. 6): every ``eval_every`` steps the ELBO
  in bits/dim of the EMA weights on a fixed subset of ``curve_images`` training images
  (light) and of the held-out curve split (dark; "valid" where the dataset has one, else
  "test"), plus the running mean of the training minibatch loss; averaged over seeds in
  the plot;
* ``runs.csv`` (one row per run) and ``results.csv`` (one row per model, mean and sample
  std over seeds) with the final test bits/dim of the EMA weights: the ELBO (Eq. 7) and the
  importance-weighted estimate (Eq. 5, ``model.log_prob`` with S = ``samples``) on the first
  ``test_images`` test images (all when None);
* ``bpd_bar.png``: the final test IW bits/dim per model with std error bars.

Training (:func:`train_run`) is the package trainer's loop (``vflow.train.train`` for a
fresh single-process run) with evaluation hooks, built from ``vflow.train``'s own pieces:
``torch.manual_seed(seed)`` before the model is built; ``model.initialize`` on
``init_batch(train, None, seed)`` (128 training images, the default "official" scheme);
``seed_everything(seed * 7919 + 1)`` for the training noise; ``BatchStream(train,
batch_size, seed)``; each iteration the trainer's own :class:`vflow.step.TrainStep` (loss
``-elbo.mean() / (D ln 2)``, global grad-norm clip, fused Adam at ``learning_rate(step + 1)``,
a non-finite iteration skipped, the EMA update). For the same model, seed and recipe its
weights after N steps equal those of ``vflow.train.train``
(``tests/test_digits_ablation.py`` checks this). Every evaluation runs under a forked RNG
(``vflow.evaluate.evaluate``), so the curves do not change the training trajectory.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import mean_std, read_typed_csv, run_parallel, write_csv  # noqa: E402

from vflow.models import build, parameter_counts  # noqa: E402

LN2 = math.log(2.0)


@dataclass(frozen=True)
class Study:
    """One fixed-budget ablation.

    ``models``: name -> (base config of ``vflow.build``, overrides), the first one the
    Flow++ baseline. ``data`` / ``pool``: the dataset of ``vflow.data.load_dataset`` and an
    optional ``pool x pool`` average pooling (``vflow.data.avg_pool``). ``curve_split``:
    the held-out split of the curves. ``recipe``: the ``vflow.train`` recipe (same for all
    models; merged over ``vflow.train.DEFAULT_RECIPE``). ``full`` / ``quick``: presets of
    ``steps, seeds, samples, eval_every, curve_images, test_images``. ``paper``: (model,
    channels, params, B, Table 2 bpd, Table 5 bpd) rows printed for reference.
    ``max_spread`` / ``max_cut``: the budget tolerances the study promises (largest total /
    smallest total - 1; largest relative cut of B; None = no promise).
    """

    key: str
    title: str
    data: str
    models: dict
    recipe: dict
    full: dict
    quick: dict
    pool: int = 1
    curve_split: str = "valid"
    paper: tuple = ()
    max_spread: float = 0.01
    max_cut: float | None = 0.30
    data_dir: str | None = None
    notes: dict = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return next(iter(self.models))


# ----------------------------------------------------------------------------- models


def build_model(study: Study, name: str, backend: str = "auto"):
    """The ablation model ``name`` of ``study`` (a key of ``study.models``)."""
    base, overrides = study.models[name]
    return build(base, backend=backend, **overrides)


def extra_channels(study: Study, name: str) -> int:
    return int(study.models[name][1].get("extra_channels", 0))


def hidden_blocks(study: Study, name: str) -> int:
    """B of the main flow p: the hidden blocks of its MoL couplings (all equal here)."""
    p = study.models[name][1]["p"]
    blocks = {s.blocks for s in p if s.kind in ("checker", "channel")}
    if len(blocks) != 1:
        raise ValueError(f"{name}: the couplings of p have different B {sorted(blocks)}")
    return blocks.pop()


def param_counts(study: Study, names=None) -> dict[str, dict[str, int]]:
    """{name: parameter_counts(model)} (p, q, r, total), built on the meta device."""
    out = {}
    for name in names or study.models:
        with torch.device("meta"):
            out[name] = parameter_counts(build_model(study, name, backend="reference"))
    return out


def budget(study: Study) -> dict:
    """The budget promises: ``spread`` = largest / smallest total - 1 (<= ``max_spread``)
    and ``cuts`` = {name: (B_baseline - B) / B_baseline} (each <= ``max_cut`` when that is set)."""
    totals = {n: c["total"] for n, c in param_counts(study).items()}
    b0 = hidden_blocks(study, study.baseline)
    return {
        "totals": totals,
        "spread": max(totals.values()) / min(totals.values()) - 1,
        "blocks": {n: hidden_blocks(study, n) for n in study.models},
        "cuts": {n: (b0 - hidden_blocks(study, n)) / b0 for n in study.models},  # 3/10 == 0.3
    }


def budget_table(study: Study, counts: dict[str, dict[str, int]]) -> str:
    ref = counts[next(iter(counts))]["total"]
    lines = [
        f"{'model':<12} {'Cz':>3} {'B':>3} {'p':>9} {'q':>8} {'r':>8} {'total':>9} {'vs first':>9}"
    ]
    for name, c in counts.items():
        lines.append(
            f"{name:<12} {extra_channels(study, name):>3} {hidden_blocks(study, name):>3} "
            f"{c['p']:>9,} {c['q']:>8,} {c['r']:>8,} {c['total']:>9,} "
            f"{c['total'] / ref - 1:>+9.2%}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- data


def load_split(study: Study, split: str):
    """``split`` of the study's dataset, average-pooled by ``study.pool``."""
    from vflow.data import avg_pool, load_dataset

    data = load_dataset(study.data, split, study.data_dir)
    return avg_pool(data, study.pool) if study.pool > 1 else data


# ----------------------------------------------------------------------------- training


def _subset(data, n: int | None):
    """The first ``n`` images of ``data`` (all when None)."""
    if n is None or n >= len(data):
        return data
    import dataclasses

    return dataclasses.replace(data, images=data.images[:n])


def train_run(
    make_model,
    train_data,
    recipe: dict,
    steps: int,
    seed: int,
    *,
    eval_every: int = 0,
    curve_sets: dict | None = None,
    device: str = "cpu",
):
    """Train ``make_model()`` on ``train_data`` for ``steps`` steps (see the module
    docstring for the exact loop). Every ``eval_every`` steps (and at the end) the EMA
    weights' ELBO bits/dim on each ``curve_sets[label]`` (an ImageData) is recorded.
    Returns (model, ema, curve rows, skipped steps)."""
    from vflow.data import BatchStream
    from vflow.step import EMA, StepHistory, TrainStep
    from vflow.train import _ElboObjective, init_batch, seed_everything

    stream = BatchStream(train_data, int(recipe["batch_size"]), seed=seed)
    torch.manual_seed(seed)
    model = make_model().to(device)
    model.train()
    with torch.no_grad():
        model.initialize(init_batch(train_data, None, seed).to(device))
    ema = EMA(model, recipe["ema_decay"])
    seed_everything(seed * 7919 + 1)
    history = StepHistory(max(steps, 1), torch.device(device))
    step = TrainStep(
        _ElboObjective(model), model, ema, recipe, math.prod(train_data.shape), history
    )
    curves, skipped = [], 0
    for done in range(1, steps + 1):
        step(stream.next().to(device))
        if eval_every and (done % eval_every == 0 or done == steps):
            rows = history.read()
            skipped += sum(not ok for _, _, ok in rows)
            losses = [loss for loss, _, ok in rows if ok]
            train_loss = sum(losses) / len(losses) if losses else float("nan")
            curves.append(_curve_row(model, ema, done, train_loss, curve_sets, seed, device))
    if not eval_every:
        skipped = sum(not ok for _, _, ok in history.read())
    return model, ema, curves, skipped


def _curve_row(model, ema, step, train_loss, curve_sets, seed, device) -> dict:
    """A curves.csv row: the running training loss and the EMA weights' ELBO bits/dim on
    each curve set (under a forked RNG, so the training trajectory does not change)."""
    from vflow.evaluate import evaluate

    averaged = ema.copy_to(copy.deepcopy(model))
    row = {"step": step, "train_loss": train_loss}
    for label, data in (curve_sets or {}).items():
        row[f"{label}_elbo"] = evaluate(averaged, data, seed=seed, device=device)["elbo_bpd"]
    return row


def run_one(
    study: Study,
    name: str,
    seed: int,
    steps: int,
    samples: int,
    eval_every: int,
    curve_images: int | None,
    test_images: int | None,
) -> dict:
    """Train model ``name`` of ``study`` with ``seed`` (one torch thread) and evaluate its
    EMA weights on the test images: ELBO and IW (S = ``samples``) bits/dim. Returns the
    runs.csv row, with the curve rows under ``"curves"``."""
    from vflow.evaluate import evaluate
    from vflow.train import DEFAULT_RECIPE

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    train_data = load_split(study, "train")
    curve_sets = {}
    if eval_every:
        curve_sets = {
            "train": _subset(train_data, curve_images),
            study.curve_split: _subset(load_split(study, study.curve_split), curve_images),
        }
    recipe = {**DEFAULT_RECIPE, **study.recipe}
    model, ema, curves, skipped = train_run(
        lambda: build_model(study, name),
        train_data,
        recipe,
        steps,
        seed,
        eval_every=eval_every,
        curve_sets=curve_sets,
    )
    train_seconds = time.perf_counter() - t0
    ema.copy_to(model)
    test = _subset(load_split(study, "test"), test_images)
    final = evaluate(model, test, batch_size=256, samples=samples, seed=seed)
    return {
        "name": name,
        "extra_channels": extra_channels(study, name),
        "blocks": hidden_blocks(study, name),
        "params": sum(p.numel() for p in model.parameters()),
        "seed": seed,
        "steps": steps,
        "samples": samples,
        "eval_every": eval_every,
        "curve_images": curve_images or 0,
        "test_images": final["n"],
        "bpd_iw": final["iw_bpd"],
        "bpd_elbo": final["elbo_bpd"],
        "curve_final": curves[-1].get(f"{study.curve_split}_elbo") if curves else None,
        "skipped": skipped,
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - t0, 1),
        "curves": [{"name": name, "seed": seed, **c} for c in curves],
    }


#: The runs.csv columns of a run, as :func:`run_one` writes them and ``--previous`` reads them.
RUN_COLUMNS = {"name": str, "extra_channels": int, "blocks": int, "params": int, "seed": int,
               "steps": int, "samples": int, "eval_every": int, "curve_images": int,
               "test_images": int, "bpd_iw": float, "bpd_elbo": float, "curve_final": float,
               "skipped": int, "train_seconds": float, "seconds": float}  # fmt: skip


def load_previous(study: Study, args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """The runs of ``args.previous`` (an earlier ``--out`` directory: its ``runs.csv`` and,
    when ``args.eval_every``, its ``curves.csv``) that this invocation would train again, and
    their curve rows. A run is reused when its model is one of ``args.models`` with the
    same parameter count as today's (the definition has not changed), its seed is below
    ``args.seeds`` and it had the same steps, importance samples S, curve interval, curve
    images and number of test images. Raises ``FileNotFoundError`` for a missing file and
    ``ValueError`` for a missing column or a (model, seed) that appears twice."""
    what = "--previous"
    rows = read_typed_csv(args.previous / "runs.csv", RUN_COLUMNS, ("curve_final",), what)
    n_test = len(load_split(study, "test"))
    settings = dict(steps=args.steps, samples=args.samples, eval_every=args.eval_every,
                    curve_images=args.curve_images or 0,
                    test_images=min(args.test_images or n_test, n_test))  # fmt: skip
    params = {name: c["total"] for name, c in param_counts(study, args.models).items()}
    keep = [
        r for r in rows
        if r["name"] in params and r["params"] == params[r["name"]] and r["seed"] < args.seeds
        and all(r[k] == v for k, v in settings.items())
    ]  # fmt: skip
    kept = {(r["name"], r["seed"]) for r in keep}
    if len(kept) != len(keep):
        raise ValueError(f"{what}: {args.previous / 'runs.csv'} has a (name, seed) more than once")
    if not (keep and args.eval_every):
        return keep, []
    columns = {"name": str, "seed": int, "step": int, "train_loss": float,
               "train_elbo": float, f"{study.curve_split}_elbo": float}  # fmt: skip
    curves = read_typed_csv(args.previous / "curves.csv", columns, what=what)
    return keep, [c for c in curves if (c["name"], c["seed"]) in kept]


def write_runs(study: Study, out: Path, runs: list[dict], curves: list[dict]) -> list[dict]:
    """Write ``out/runs.csv`` (and ``out/curves.csv`` when there are curves) from the runs
    finished so far; returns the runs sorted by model (``study.models`` order), then seed."""
    order = list(study.models)
    runs = sorted(runs, key=lambda r: (order.index(r["name"]), r["seed"]))
    write_csv(out / "runs.csv", runs)
    if curves:
        write_csv(out / "curves.csv", curves)
    return runs


def record_run(study: Study, out: Path, runs: list[dict], curves: list[dict], run: dict) -> None:
    """Add a finished ``run`` (a :func:`run_one` result; its ``"curves"`` move to ``curves``)
    to ``runs`` and rewrite the CSVs, so that a study stopped half-way leaves a directory
    that ``--previous`` can resume from."""
    curves.extend(run.pop("curves"))
    runs.append(run)
    write_runs(study, out, runs, curves)


# ----------------------------------------------------------------------------- reporting


def summarise(study: Study, runs: list[dict]) -> list[dict]:
    """One row per model (in ``study.models`` order): means and sample stds over seeds."""
    rows = []
    for name in study.models:
        sel = [r for r in runs if r["name"] == name]
        if not sel:
            continue
        iw_mean, iw_std = mean_std(r["bpd_iw"] for r in sel)
        elbo_mean, elbo_std = mean_std(r["bpd_elbo"] for r in sel)
        rows.append(
            {
                "name": name,
                "extra_channels": sel[0]["extra_channels"],
                "blocks": sel[0]["blocks"],
                "params": sel[0]["params"],
                "bpd_iw_mean": iw_mean,
                "bpd_iw_std": iw_std,
                "bpd_elbo_mean": elbo_mean,
                "bpd_elbo_std": elbo_std,
                "seeds": len(sel),
                "steps": sel[0]["steps"],
                "samples": sel[0]["samples"],
                "test_images": sel[0]["test_images"],
            }
        )
    return rows


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bars(study: Study, rows: list[dict], path: Path) -> None:
    """Final test IW bits/dim per model (std error bars), the ELBO as a black tick."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(rows))
    means = [r["bpd_iw_mean"] for r in rows]
    elbos = [r["bpd_elbo_mean"] for r in rows]
    ax.bar(
        x,
        means,
        yerr=[r["bpd_iw_std"] for r in rows],
        capsize=4,
        color=["tab:gray"] + ["tab:blue"] * (len(rows) - 1),
    )
    ax.scatter(x, elbos, marker="_", s=300, c="k", label="ELBO")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['name']}\n{r['params'] / 1e3:.1f}k" for r in rows], fontsize=8)
    lo = min(means + elbos)
    hi = max(max(m + r["bpd_iw_std"] for m, r in zip(means, rows, strict=True)), max(elbos))
    pad = 0.15 * (hi - lo) + 1e-3
    ax.set_ylim(lo - 3 * pad, hi + pad)
    ax.set_ylabel(f"test bits/dim (IW, S={rows[0]['samples']})")
    ax.set_title(f"{study.title}; {rows[0]['steps']} steps, {rows[0]['seeds']} seed(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(study: Study, curves: list[dict], path: Path) -> None:
    """Fig. 6: ELBO bits/dim (EMA weights) against steps, training subset light, held-out
    split dark, one colour per model, mean over seeds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    held = f"{study.curve_split}_elbo"
    ys = []
    for i, name in enumerate(study.models):
        sel = [c for c in curves if c["name"] == name]
        if not sel:
            continue
        steps = sorted({c["step"] for c in sel})
        colour = f"C{i}"
        for key, alpha, style in (("train_elbo", 0.4, "--"), (held, 1.0, "-")):
            mean = [np.mean([c[key] for c in sel if c["step"] == s]) for s in steps]
            ys += mean
            label = f"{name} ({'train' if key == 'train_elbo' else study.curve_split})"
            ax.plot(steps, mean, style, color=colour, alpha=alpha, label=label, marker=".")
    finite = [y for y in ys if math.isfinite(y)]
    if finite:  # the first points are far above the rest: zoom on the lower 80%
        lo, hi = min(finite), float(np.quantile(finite, 0.8))
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.05 * (hi - lo + 1e-3))
    ax.set_xlabel("training step")
    ax.set_ylabel("ELBO bits/dim (EMA weights)")
    ax.set_title(f"{study.title}: train (light) and {study.curve_split} (dark)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_table(study: Study, rows: list[dict]) -> str:
    lines = [
        f"This run ({study.title}, EMA weights, {rows[0]['test_images']} test images):",
        f"{'model':<12} {'channels':>8} {'B':>3} {'params':>9} {'IW bpd':>16} "
        f"{'ELBO bpd':>16} {'seeds':>5}",
    ]
    for r in rows:
        iw = f"{r['bpd_iw_mean']:.4f} +- {r['bpd_iw_std']:.4f}"
        elbo = f"{r['bpd_elbo_mean']:.4f} +- {r['bpd_elbo_std']:.4f}"
        lines.append(
            f"{r['name']:<12} {1 + r['extra_channels']:>8} {r['blocks']:>3} "
            f"{r['params']:>9,} {iw:>16} {elbo:>16} {r['seeds']:>5}"
        )
    if study.paper:
        lines.append("Paper (CIFAR-10, 4M budget, Tables 2 and 5; reference only):")
        lines.append(
            f"{'model':<18} {'channels':>8} {'params':>7} {'B':>3} {'Table 2':>8} {'Table 5':>8}"
        )
        for model, ch, params, b, t2, t5 in study.paper:
            lines.append(f"{model:<18} {ch:>8} {params:>7} {b:>3} {t2:>8.2f} {t5:>8.2f}")
    return "\n".join(lines)


#: Paper, CIFAR-10 under a 4M budget: (model, channels, params, B, Table 2, Table 5 bpd).
PAPER_CIFAR = (
    ("3-channel Flow++", 3, "4.02M", 13, 3.23, 3.21),
    ("4-channel VFlow", 4, "4.03M", 11, 3.16, 3.15),
    ("6-channel VFlow", 6, "4.01M", 10, 3.13, 3.12),
)


# ----------------------------------------------------------------------------- command line

PRESET_KEYS = ("steps", "seeds", "samples", "eval_every", "curve_images", "test_images")


def parse_args(study: Study, argv=None, doc: str | None = None) -> argparse.Namespace:
    """Options of a study script; unset ones come from ``study.full`` (``study.quick``
    with ``--quick``). ``--curve-images`` / ``--test-images`` 0 mean all images."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    full, quick = study.full, study.quick
    ap.add_argument("--steps", type=int, help=f"training steps (default {full['steps']})")
    ap.add_argument("--seeds", type=int, help=f"seeds per model (default {full['seeds']})")
    ap.add_argument(
        "--samples", type=int, help=f"importance samples S per image (default {full['samples']})"
    )
    ap.add_argument(
        "--eval-every",
        type=int,
        help=f"steps between curve points (default {full['eval_every']}; 0 = no curves)",
    )
    ap.add_argument(
        "--curve-images",
        type=int,
        help=f"images of each curve subset (default {full['curve_images']}; 0 = all)",
    )
    ap.add_argument(
        "--test-images",
        type=int,
        help=f"test images of the final evaluation (default {full['test_images']}; 0 = all)",
    )
    ap.add_argument("--workers", type=int, default=2, help="worker processes (1 thread each)")
    ap.add_argument("--out", type=Path, default=Path(f"results/{study.key}_ablation"))
    ap.add_argument(
        "--models", default=",".join(study.models), help="comma-separated subset of the models"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: " + ", ".join(f"{k}={v}" for k, v in quick.items()),
    )
    ap.add_argument(
        "--previous",
        type=Path,
        help="an earlier --out directory: its runs with the same settings are read back "
        "(runs.csv, curves.csv) instead of trained again, so a study can be run in parts",
    )
    args = ap.parse_args(argv)
    preset = quick if args.quick else full
    for k in PRESET_KEYS:
        if getattr(args, k) is None:
            setattr(args, k, preset.get(k))
    for k in ("curve_images", "test_images"):
        if getattr(args, k) == 0:
            setattr(args, k, None)
    args.models = [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in study.models]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {', '.join(study.models)}")
    if min(args.steps, args.seeds, args.samples, args.workers) < 1:
        ap.error("--steps, --seeds, --samples and --workers must be >= 1")
    if args.eval_every < 0:
        ap.error(f"--eval-every must be >= 0, got {args.eval_every}")
    for k in ("curve_images", "test_images"):
        v = getattr(args, k)
        if v is not None and v < 0:
            ap.error(f"--{k.replace('_', '-')} must be >= 0, got {v}")
    return args


def main(study: Study, argv=None, doc: str | None = None) -> list[dict]:
    """Run the study: print the budget, train every (model, seed) in ``--workers``
    processes, write the CSVs and plots to ``--out``; returns the results.csv rows."""
    args = parse_args(study, argv, doc)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = param_counts(study, args.models)
    print("Parameter budget:\n" + budget_table(study, counts), flush=True)
    if list(counts) == list(study.models):
        b = budget(study)
        cut = max(b["cuts"].values())
        if b["spread"] > study.max_spread or (study.max_cut is not None and cut > study.max_cut):
            print(
                f"warning: budget spread {b['spread']:.2%} (promised <= {study.max_spread:.0%}),"
                f" largest B cut {cut:.0%} (promised <= {study.max_cut})",
                file=sys.stderr,
            )
    previous, previous_curves = load_previous(study, args) if args.previous else ([], [])
    done = {(r["name"], r["seed"]) for r in previous}
    jobs = [
        dict(
            study=study,
            name=m,
            seed=s,
            steps=args.steps,
            samples=args.samples,
            eval_every=args.eval_every,
            curve_images=args.curve_images,
            test_images=args.test_images,
        )
        for m in args.models  # a model's seeds side by side: equal runs keep the workers even
        for s in range(args.seeds)
        if (m, s) not in done
    ]
    t0 = time.perf_counter()
    runs, curves = list(previous), list(previous_curves)
    record = functools.partial(record_run, study, args.out, runs, curves)
    new_runs = run_parallel(run_one, jobs, args.workers, on_result=record) if jobs else []
    if args.previous:
        print(f"reused {len(previous)} runs of {args.previous}; trained {len(new_runs)}")
    runs = write_runs(study, args.out, runs, curves)
    for r in runs:
        if not (math.isfinite(r["bpd_iw"]) and math.isfinite(r["bpd_elbo"])):
            print(f"warning: non-finite bpd in {r}", file=sys.stderr)
    rows = summarise(study, runs)
    write_csv(args.out / "results.csv", rows)
    plot_bars(study, rows, args.out / "bpd_bar.png")
    if curves:
        plot_curves(study, curves, args.out / "curves.png")
    print(results_table(study, rows))
    per_run = np.mean([r["seconds"] for r in new_runs]) if new_runs else float("nan")
    print(
        f"{len(new_runs)} runs trained in {time.perf_counter() - t0:.0f} s wall "
        f"({per_run:.0f} s per run, {args.workers} worker(s)); outputs in {args.out}"
    )
    return rows

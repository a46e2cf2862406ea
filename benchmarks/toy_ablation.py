"""Issue 30's screening ablation: which training-recipe choice moves the toy study.

Trains the four screening cells (3-step Glow D 2 L 3, 3-step 10-D VFlow D 10 L 3, 20-step Glow
D 2 L 20, the best VFlow cell D 6 L 10) under each recipe of ``--recipes`` (learning rate x
schedule; ``1e-3:constant`` is today's recipe), ``--seeds`` seeds at ``--iters`` iterations,
with ``toy_checkerboard.py`` (ensemble trainer, one worker, one thread), in the order given:
recipe by recipe, and within a recipe the cheap D = 10 job first. Each finished job's runs
are merged into ``--csv`` (one row per run, the recipe in each row) at once, so a study
stopped at any point keeps everything finished; running the same command again skips the
runs already in ``--csv`` and resumes an interrupted job from its checkpoint under
``--out``. ``--deadline HH:MM`` (UTC) starts no job after that time.

A recipe is ``lr:schedule`` plus optional parts: a bare number (``--final-lr-frac``),
``clipX`` (``--grad-clip X``) and ``factor=value`` for the model and data factors of
``toy_checkerboard.py`` (``scale``, ``activation``, ``mixing``, ``q_base``, ``q_steps``,
``train_set``), e.g. ``3e-3:cosine:activation=tanh`` or ``3e-3:cosine:clip10``: issue 30's
one-factor-at-a-time screen. Run names are canonical (:func:`recipe_of`: default parts
left out, the parts in a fixed order).

The table (``--table-only`` rebuilds it from ``--csv`` without training): per cell and
recipe the mean and sample std of the test log-likelihood over seeds, the difference from
a base recipe at the same iterations and Welch's t-test p-value against it: for a plain
``lr:schedule`` recipe the base is today's (``1e-3:constant``), for a recipe with further
parts it is its own ``lr:schedule`` without them (the factor's effect alone).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import toy_checkerboard as tc  # noqa: E402
from _common import mean_std, read_typed_csv, write_csv  # noqa: E402

from vflow.toy import DEFAULT_FACTORS, DEFAULT_RECIPE  # noqa: E402

CELLS = [(2, 3), (10, 3), (2, 20), (6, 10)]
CELL_NAMES = {(2, 3): "3-step Glow", (10, 3): "3-step 10-D VFlow", (2, 20): "20-step Glow",
              (6, 10): "10-step 6-D VFlow"}  # fmt: skip
JOBS = ["10x3", "2x3,2x20", "6x10"]  # one ensemble job each, cheapest first
BASELINE = "1e-3:constant"
RECIPES = [BASELINE, "1e-3:cosine", "3e-3:constant", "3e-3:cosine", "3e-4:constant",
           "3e-4:cosine"]  # fmt: skip


FACTOR_TYPES = {"scale": str, "activation": str, "mixing": str,
                "q_base": lambda s: s.lower() in ("true", "1"), "q_steps": int,
                "train_set": int}  # fmt: skip


def parse_recipe(text: str) -> dict:
    """``lr:schedule[:part...]`` -> the recipe and factor values it sets (the rest default):
    ``{"lr", "schedule", ...}``; parts: a number (``final_lr_frac``), ``clipX``
    (``grad_clip``), ``factor=value``."""
    lr, schedule, *parts = text.split(":")
    out = {"lr": float(lr), "schedule": schedule}
    for part in parts:
        if "=" in part:
            key, value = part.split("=", 1)
            if key not in FACTOR_TYPES:
                raise ValueError(f"recipe {text!r}: unknown factor {key!r}")
            out[key] = FACTOR_TYPES[key](value)
        elif part.startswith("clip"):
            out["grad_clip"] = float(part[4:])
        else:
            out["final_lr_frac"] = float(part)
    return out


def recipe_cli(recipe: dict) -> list[str]:
    """The ``toy_checkerboard.py`` options of a :func:`parse_recipe` dict."""
    cli = ["--lr", str(recipe["lr"]), "--schedule", recipe["schedule"]]
    for key, value in recipe.items():
        if key in ("lr", "schedule"):
            continue
        flag = "--" + key.replace("_", "-")
        if key == "q_base":
            cli += [flag] if value else []
        else:
            cli += [flag, str(value)]
    return cli


def base_of(name: str) -> str:
    """The base recipe a recipe is compared with: ``lr:schedule`` without its other parts;
    today's recipe for a plain ``lr:schedule``."""
    plain = ":".join(name.split(":")[:2])
    return BASELINE if plain == name else plain


def recipe_of(run: dict) -> str:
    """``lr:schedule`` of a run (``final_lr_frac`` appended when not the default, then
    ``clipX`` and ``factor=value`` for every non-default clipping and factor)."""
    mantissa, exponent = f"{run['lr']:e}".split("e")
    name = f"{float(mantissa):g}e{int(exponent)}:{run['schedule']}"
    if run["schedule"] != "constant" and run["final_lr_frac"] != DEFAULT_RECIPE["final_lr_frac"]:
        name += f":{run['final_lr_frac']:g}"
    if run["grad_clip"] != DEFAULT_RECIPE["grad_clip"]:
        name += f":clip{run['grad_clip']:g}"
    for key, default in DEFAULT_FACTORS.items():
        value = run.get(key, default)
        if value != default:
            name += f":{key}={value}"
    return name


def read_runs(path: Path) -> list[dict]:
    """The runs of a ``runs.csv`` as written by ``toy_checkerboard.py`` (every column kept;
    the recipe and factor columns typed, today's recipe where the file has none)."""
    if not path.exists():
        return []
    typed = read_typed_csv(path, tc.RUN_COLUMNS, optional=("test_elbo",),
                           defaults=tc.RECIPE_DEFAULTS)  # fmt: skip
    with open(path, newline="") as f:
        raw = list(csv.DictReader(f))
    return [{**r, **t} for r, t in zip(raw, typed, strict=True)]


def run_key(r: dict) -> tuple:
    return (r["dims"], r["steps"], r["seed"], r["iters"], tc.recipe_key(r))


COLUMNS = list(tc.RUN_COLUMNS)


def merge(csv_path: Path, new: list[dict]) -> list[dict]:
    """Add ``new`` runs to ``csv_path`` (a run already there is kept, not duplicated)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    runs = read_runs(csv_path)
    have = {run_key(r) for r in runs}
    runs += [r for r in new if run_key(r) not in have]
    runs.sort(key=lambda r: (r["iters"], recipe_order(recipe_of(r)), r["dims"], r["steps"],
                             r["seed"]))  # fmt: skip
    write_csv(csv_path, [{k: r[k] for k in COLUMNS} for r in runs])
    return runs


def recipe_order(name: str) -> tuple:
    """Sort key of a recipe name: the lr:schedule recipes in ``RECIPES`` order, each followed
    by its factor variants (alphabetically), then the rest."""
    plain = ":".join(name.split(":")[:2])
    return (RECIPES.index(plain) if plain in RECIPES else 99, plain, name != plain, name)


def table(runs: list[dict], iters: int) -> list[dict]:
    """One row per (cell, recipe) at ``iters``: n, mean, std, delta and Welch p vs the
    recipe's base (:func:`base_of`; column ``base``)."""
    from scipy.stats import ttest_ind

    runs = [r for r in runs if r["iters"] == iters]
    rows = []
    recipes = sorted({recipe_of(r) for r in runs}, key=recipe_order)
    for cell in CELLS:
        for name in recipes:
            base = [r["test_ll"] for r in runs if (r["dims"], r["steps"]) == cell
                    and recipe_of(r) == base_of(name)]  # fmt: skip
            ll = [r["test_ll"] for r in runs if (r["dims"], r["steps"]) == cell
                  and recipe_of(r) == name]  # fmt: skip
            if not ll:
                continue
            mean, std = mean_std(ll)
            row = {"dims": cell[0], "steps": cell[1], "cell": CELL_NAMES[cell], "recipe": name,
                   "iters": iters, "seeds": len(ll), "ll_mean": mean, "ll_std": std,
                   "base": base_of(name) if name != BASELINE else "",
                   "delta": math.nan, "welch_p": math.nan}  # fmt: skip
            if name != BASELINE and len(base) >= 2 and len(ll) >= 2:
                row["delta"] = mean - sum(base) / len(base)
                row["welch_p"] = float(ttest_ind(ll, base, equal_var=False).pvalue)
            rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    w = max([14] + [len(r["recipe"]) for r in rows])
    print(f"{'cell':>20} {'recipe':>{w}} {'n':>2} {'test ll':>17} {'delta':>7} {'Welch p':>8}")
    for r in rows:
        d = "" if math.isnan(r["delta"]) else f"{r['delta']:+.3f}"
        p = "" if math.isnan(r["welch_p"]) else f"{r['welch_p']:.3g}"
        print(f"{r['cell']:>20} {r['recipe']:>{w}} {r['seeds']:>2} "
              f"{r['ll_mean']:>8.3f} +- {r['ll_std']:.3f} {d:>7} {p:>8}")  # fmt: skip


def collect_curves(dirs: list[Path], iters: int) -> list[dict]:
    """The learning curves (``curves.csv``: training ELBO per window) of the output folders
    ``dirs`` of ``toy_checkerboard.py`` runs at ``iters`` iterations, each row with its
    run's recipe (from the folder's ``runs.csv``)."""
    rows = []
    for d in dirs:
        if not (d / "curves.csv").exists():
            continue
        recipes = {(r["dims"], r["steps"], r["seed"]): r for r in read_runs(d / "runs.csv")}
        for c in read_typed_csv(d / "curves.csv", {"dims": int, "steps": int, "seed": int,
                                                   "iter": int, "train_elbo": float}):  # fmt: skip
            run = recipes.get((c["dims"], c["steps"], c["seed"]))
            if run is not None and run["iters"] == iters:
                rows.append({**c, "recipe": recipe_of(run)})
    return rows


def plot_curves(curves: list[dict], path: Path) -> None:
    """One panel per cell: the median over seeds of the training ELBO of each recipe."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(CELLS), figsize=(4 * len(CELLS), 3.4))
    for ax, cell in zip(axes, CELLS, strict=True):
        sel = [c for c in curves if (c["dims"], c["steps"]) == cell]
        for name in sorted({c["recipe"] for c in sel}, key=recipe_order):
            pts = sorted({c["iter"] for c in sel if c["recipe"] == name})
            med = [np.median([c["train_elbo"] for c in sel if c["recipe"] == name
                              and c["iter"] == i]) for i in pts]  # fmt: skip
            ax.plot(pts, med, lw=1, label=name, ls="-" if "constant" in name else "--")
        ax.axhline(tc.OPTIMUM, color="k", ls=":", lw=1)
        ax.set_title(f"{CELL_NAMES[cell]} (D {cell[0]}, L {cell[1]})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylim(tc.OPTIMUM - 0.7, tc.OPTIMUM + 0.05)
    axes[0].set_ylabel("training ELBO, median over seeds (nats)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--recipes", default=",".join(RECIPES),
                    help="lr:schedule[:factor=value...],... in run order")  # fmt: skip
    ap.add_argument("--jobs", default=";".join(JOBS), help="cells of each job, ';'-separated")
    ap.add_argument("--iters", type=int, default=20_000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--csv", type=Path, default=Path("docs/toy_ablation_20k.csv"))
    ap.add_argument("--out", type=Path, default=Path("results/toy_ablation"))
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: start no job after it")
    ap.add_argument("--add-runs", type=Path, nargs="*", default=[],
                    help="runs.csv files to merge into --csv first")  # fmt: skip
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--table-csv", type=Path, default=None, help="write the table here too")
    ap.add_argument("--curve-dirs", type=Path, nargs="*", default=None,
                    help="toy_checkerboard output folders whose learning curves to collect "
                    "(default: every job folder under --out)")  # fmt: skip
    ap.add_argument("--curves-csv", type=Path, default=None,
                    help="write the collected learning curves (with the recipe) here, and a "
                    "plot beside it (.png)")  # fmt: skip
    args = ap.parse_args(argv)
    for path in args.add_runs:
        merge(args.csv, read_runs(path))
    deadline = None
    if args.deadline:
        hh, mm = map(int, args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
    t0, c0 = time.perf_counter(), time.process_time()
    for recipe in [] if args.table_only else args.recipes.split(","):
        opts = recipe_cli(parse_recipe(recipe))
        for cells in args.jobs.split(";"):
            cli = ["--cells", cells, "--iters", str(args.iters), "--seeds", str(args.seeds),
                   *opts, "--samples", str(args.samples),
                   "--workers", "1", "--speed-iters", "0", "--density-px", "32"]  # fmt: skip
            targs = tc.parse_args(cli)
            have = tc.load_previous_runs(args.csv, targs) if args.csv.exists() else []
            if len(have) == len(targs.cells) * args.seeds:
                continue
            if deadline is not None and dt.datetime.now(dt.timezone.utc) >= deadline:
                print(f"deadline {args.deadline} UTC reached: not starting {recipe} {cells}")
                break
            name = recipe.replace(":", "_").replace("=", "-")
            out = args.out / name / cells.replace(",", "_")
            print(f"\n=== {recipe} cells {cells}: {args.seeds} seeds x {args.iters} iterations")
            tc.main(cli + ["--out", str(out)] +
                    (["--previous-runs", str(args.csv)] if args.csv.exists() else []))  # fmt: skip
            merge(args.csv, read_runs(out / "runs.csv"))
    runs = read_runs(args.csv)
    rows = table(runs, args.iters)
    print(f"\nscreening table, {args.iters} iterations (runs: {args.csv}); this call: wall "
          f"{time.perf_counter() - t0:.0f} s, CPU {time.process_time() - c0:.0f} s")  # fmt: skip
    print_table(rows)
    at = [r for r in runs if r["iters"] == args.iters]
    cpu = sum(r["train_cpu_s"] for r in at)
    print(f"training CPU of the {len(at)} runs at {args.iters} iterations in the file: {cpu:.0f} s")
    if args.table_csv:
        write_csv(args.table_csv, rows)
    if args.curves_csv:
        dirs = args.curve_dirs if args.curve_dirs is not None else sorted(args.out.glob("*/*"))
        curves = collect_curves(dirs, args.iters)
        write_csv(args.curves_csv, curves)
        plot_curves(curves, args.curves_csv.with_suffix(".png"))
    return rows


if __name__ == "__main__":
    main()

"""Section 5 of the VFlow paper (Figures 2 and 3): Glow vs VFlow on the 2-D checkerboard.

Data: ``x`` in ``R^2`` uniform on 8 of the 16 cells of side 2 of ``[-4, 4]^2``; the best
average log-likelihood is ``-log 32 = -3.466`` nats. Training batches are fresh samples;
the test set is a fixed 1,000-point sample.

Models (``vflow.toy``), for flow dimensionality ``D`` and ``L`` transformation steps:
  * ``D = 2``: Glow, ``L`` steps of [D x D invertible linear map + bias, affine coupling with
    one MLP (2 hidden layers of 50 units) giving the shift and bounded log-scale, reversal],
    standard normal base; trained and evaluated by the exact log-likelihood.
  * ``D > 2``: VFlow, ``x`` augmented with ``z`` in ``R^(D-2)``; ``p(x, z)`` a D-dim Glow
    with ``L - 1`` steps; ``q(z|x)`` a conditional Glow with exactly one step (coupling nets
    see ``x``) and a standard normal base, as in the paper; ``--q-base`` adds a conditional
    Gaussian base ``N(mu(x), sigma(x))`` after it (one more MLP, +3,516 parameters at
    D = 10). Trained by the reparameterised ELBO ``E_q[log p(x, z) - log q(z|x)]``;
    evaluated with 100-sample importance sampling ``logsumexp_s(log p(x, z_s) - log q(z_s|x))
    - log 100`` (Eq. 5).
Adam with batch 64 for every run.

Grid: D in {2, 4, 6, 8, 10} x L in {2, 3, 4, 5, 10, 15, 20}, over ``--seeds`` seeds.
Outputs in ``--out``: ``results.csv`` (one row per (D, L): dims, steps, params, ll_mean,
ll_std, iters, seeds), ``runs.csv`` (one row per run), ``ll_vs_params.png`` (Fig. 3),
``density.png`` (Fig. 2: data, 3-step Glow, 3-step 10-dim VFlow, 20-step Glow, the seed-0
models titled with their test log-likelihood; the VFlow density importance-sampled), the
same panels one per file (``density_data.png``, ``density_D{D}_L{L}.png``), and, from the
ensemble trainer, ``curves.csv`` / ``curves.png`` (training ELBO per 1,000 iterations) and
an ``elbo_mean`` column (the test ELBO from the same draws as the IW estimate).

Resuming. The ensemble trainer saves every job's state (weights, Adam moments, generator
states, losses) every ``--checkpoint-every`` iterations under ``--out``/state/; running the
same command again continues each job where it stopped, on the same trajectory bit for bit
(``vflow.toy.train_resumable``), so the paper's budget can be spread over several sessions.
``--previous-runs FILE`` goes further, across machines: ``FILE`` is the ``runs.csv`` of earlier
runs (the repository keeps the paper-budget runs in ``docs/toy_runs_100k.csv``); its runs of
this grid at the same ``--iters`` are not trained again but read back, and the tables and the
Fig. 3 plot cover them together with the new runs (densities and learning curves only the new
runs).

Trainers. ``--trainer ensemble`` (the default) trains every (L, seed) of one D at once with
``vflow.toy.ToyEnsemble``: weights stacked along a leading ensemble dimension, batched matrix
products, each member with its own data and noise streams, so that each member follows the
one-model loop (``--trainer single``, ``vflow.toy.train_single``) up to float32 rounding
(tested). A D's members form one job, or two halves by seed when that shortens the
schedule on ``--workers`` processes (``plan_jobs``); each job runs on one torch thread.

Speed. Unless ``--speed-iters 0``, the run first times, in this process and alternating
over ``--speed-rounds`` rounds, ``--speed-iters`` iterations of each job's ensemble and of
the one-model loop on one seed of every cell (the cost of a model-iteration does not depend
on the seed), with ``time.process_time``; it prints the CPU-seconds per model-iteration of
both trainers, their ratio, and the wall time the grid would take at ``--iters`` and at the
paper's 100,000 iterations on ``--workers`` processes (the measured cost per iteration of
each job, scheduled longest first). ``--speed-only`` stops there. Measured with
``--speed-only --speed-iters 60 --speed-rounds 2`` (full grid, 5 seeds, jobs (D, E) = (2, 21),
(2, 14), (4, 35), (6, 35), (8, 35), (10, 35)) on the development machine's 2 cores while other
jobs kept its load at 8-11: 2.06 ms of CPU per model-iteration for the ensembles against
24.1 ms for the one-model loop, 11.7x (10.3x-12.6x per D). The one-model loop took 6.5 ms per
model-iteration when that machine was idle (the 15,000-iteration grid), 3.7x less than in
this measurement; scaled by the same factor the ensembles need about 0.56 ms, so the paper's
budget (17.5M model-iterations) about 9,700 CPU-seconds, some 80 minutes of wall time on 2
workers (300 minutes at the load of the measurement). Compiling the training step with
``torch.compile`` did not pay: 9 minutes to compile one D's step for a 15% faster step.

The learning rate is Adam's 1e-3 for every model (the paper gives none; 1e-3 trained the
20-step models best in short runs, 3e-3 helped the 3-step VFlow but hurt the 20-step Glow).
Recipe options (issue 30; the defaults are that recipe, which the 100k grid used): ``--lr``,
``--schedule`` constant / cosine / exp (``vflow.toy.make_lr_scheduler``: from ``--lr`` down to
``--final-lr-frac`` of it, 1%, at the last iteration), ``--grad-clip`` (100). Every row of
runs.csv and results.csv records them (columns lr, schedule, final_lr_frac, grad_clip); a
``--previous-runs`` file without those columns holds the default recipe, and only its runs of
the requested recipe are reused. ``--cells 2x3,10x3`` trains only the listed (D, L) cells.
runs.csv is rewritten as each job finishes, so a stopped study keeps its finished runs.
Model and data factors (issue 30's one-factor-at-a-time screen; the defaults are today's
models and data, bit for bit): ``--scale`` the couplings' log-scale, ``tanh3`` (``3
tanh(s/3)``, today's), ``sigmoid`` (Glow's code: scale ``sigmoid(s + 2)``, in (0, 1), 0.88 at
initialisation) or ``none`` (unbounded ``s``); ``--activation`` of the coupling MLPs' hidden
layers, relu (today's), tanh or elu; ``--mixing`` ``linear`` (today's learned invertible
linear map + bias before each coupling, a random rotation at the start; the step has no
ActNorm), ``identity`` (the same, from the identity), ``actnorm`` (Glow's whole step:
ActNorm, data-initialised on 512 points, before the linear map) or ``reverse`` (the fixed
reversal only, RealNVP-style); ``--q-steps`` conditional Glow steps of q (1, the paper);
``--train-set N`` a fixed training set of N points per seed, drawn once from the seed's data
generator, batches drawn from it uniformly with replacement (0, today's: fresh samples every
batch). Every option applies to every coupling and step, p's and q's (q's Gaussian base
too), and works with both trainers (the ensemble follows the one-model loop under each,
tested). Every row of runs.csv and results.csv records them (columns scale, activation,
mixing, q_base, q_steps, train_set; absent columns read as today's) and ``--previous-runs``
reuses only runs with the same values.
``benchmarks/toy_ablation.py`` runs issue 30's screening ablation with these options.
``--quick`` trains D in {2, 10} x L in {3, 20} for 400 iterations with 1 seed (about a
minute with the speed measurement).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import mean_std, read_typed_csv, run_parallel, write_csv  # noqa: E402

from vflow.toy import (  # noqa: E402
    ACTIVATIONS,
    DEFAULT_FACTORS,
    DEFAULT_RECIPE,
    MIXINGS,
    SCALES,
    SCHEDULES,
    ToyEnsemble,
    checkerboard_density,
    factor_dict,
    recipe_dict,
    train_and_evaluate,
    train_ensemble,
    train_single,
)

OPTIMUM = -math.log(32)
PAPER_ITERS = 100_000
# Paper section 5 (nats, mean +- std over 5 seeds, 100,000 iterations).
PAPER = {(10, 3): (-3.51, 0.01), (2, 3): (-3.67, 0.03), (2, 20): (-3.54, 0.05)}
# Fig. 2 panels: (D, L, title).
DENSITY_MODELS = [(2, 3, "3-step Glow"), (10, 3, "3-step 10-dim VFlow"), (2, 20, "20-step Glow")]
DENSITY_CELLS = {(d, l) for d, l, _ in DENSITY_MODELS}
# Learning curves: the Fig. 2 models and the deepest VFlow.
CURVE_MODELS = DENSITY_MODELS + [(10, 20, "20-step 10-dim VFlow")]
CURVE_EVERY = 1000  # iterations per point of a learning curve (vflow.toy.train_ensemble)


def curve_window(iters: int) -> int:
    """Iterations per learning-curve point: ``CURVE_EVERY``, or ``iters / 10`` for short runs."""
    return max(1, min(CURVE_EVERY, iters // 10))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    cells = lambda s: [tuple(int(v) for v in c.split("x")) for c in s.split(",")]  # noqa: E731
    ap.add_argument("--dims", type=ints, default=[2, 4, 6, 8, 10], help="flow dims D, e.g. 2,10")
    ap.add_argument("--steps", type=ints, default=[2, 3, 4, 5, 10, 15, 20], help="steps L")
    ap.add_argument("--iters", type=int, default=PAPER_ITERS, help="Adam steps (paper: 100000)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per (D, L) (paper: 5)")
    ap.add_argument("--cells", type=cells, default=None,
                    help="train only these (D, L) cells, e.g. 2x3,10x3,2x20,6x10 "
                    "(instead of the grid --dims x --steps)")  # fmt: skip
    ap.add_argument("--lr", type=float, default=DEFAULT_RECIPE["lr"], help="Adam's (peak) lr")
    ap.add_argument("--schedule", choices=SCHEDULES, default=DEFAULT_RECIPE["schedule"],
                    help="learning-rate schedule: constant (today's recipe), cosine or exp "
                    "decay from --lr to --final-lr-frac of it at the last iteration "
                    "(vflow.toy.make_lr_scheduler)")  # fmt: skip
    ap.add_argument("--final-lr-frac", type=float, default=DEFAULT_RECIPE["final_lr_frac"],
                    help="the decaying schedules' last lr as a fraction of --lr")  # fmt: skip
    ap.add_argument("--grad-clip", type=float, default=DEFAULT_RECIPE["grad_clip"],
                    help="gradient-norm clipping threshold per model (inf: none)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=100, help="importance samples (Eq. 5)")
    ap.add_argument("--density-px", type=int, default=128, help="density image resolution")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=Path("results/toy_checkerboard"))
    ap.add_argument("--trainer", choices=["ensemble", "single"], default="ensemble")
    ap.add_argument(
        "--previous-runs",
        type=Path,
        default=None,
        help="runs.csv of earlier runs to reuse instead of training them again "
        "(e.g. docs/toy_runs_100k.csv)",
    )
    ap.add_argument("--checkpoint-every", type=int, default=5000,
                    help="ensemble trainer: save each job's state every N iterations "
                    "(a multiple of 250) under OUT/state/; rerunning resumes")  # fmt: skip
    ap.add_argument("--q-base", action="store_true", help="q(z|x) with a conditional Gaussian base")
    ap.add_argument("--q-steps", type=int, default=DEFAULT_FACTORS["q_steps"],
                    help="conditional Glow steps of q(z|x) (the paper: 1)")  # fmt: skip
    ap.add_argument("--scale", choices=SCALES, default=DEFAULT_FACTORS["scale"],
                    help="the couplings' log-scale: tanh3 = 3 tanh(s/3) (today's), sigmoid = "
                    "log sigmoid(s + 2) (Glow's code), none = unbounded")  # fmt: skip
    ap.add_argument("--activation", choices=list(ACTIVATIONS),
                    default=DEFAULT_FACTORS["activation"],
                    help="hidden activation of the coupling MLPs (today's: relu)")  # fmt: skip
    ap.add_argument("--mixing", choices=MIXINGS, default=DEFAULT_FACTORS["mixing"],
                    help="linear: a learned invertible linear map + bias before each coupling, "
                    "a random rotation at the start (today's); identity: the same from W = I; "
                    "actnorm: a data-initialised ActNorm before it (Glow's step); reverse: "
                    "the fixed reversal only")  # fmt: skip
    ap.add_argument("--train-set", type=int, default=DEFAULT_FACTORS["train_set"],
                    help="0: fresh samples every batch (today's); N: a fixed training set of "
                    "N points drawn once per seed, batches drawn with replacement")  # fmt: skip
    ap.add_argument("--speed-iters", type=int, default=100, help="iterations timed per trainer")
    ap.add_argument("--speed-rounds", type=int, default=2, help="alternating timing rounds")
    ap.add_argument("--speed-only", action="store_true", help="time the trainers, then stop")
    ap.add_argument("--quick", action="store_true", help="D 2,10 x L 3,20, 400 iters, 1 seed")
    args = ap.parse_args(argv)
    if args.quick:
        args.dims, args.steps, args.iters, args.seeds = [2, 10], [3, 20], 400, 1
        args.speed_iters, args.speed_rounds = 20, 1
    if args.cells is not None:
        if any(len(c) != 2 for c in args.cells):
            ap.error(f"--cells: expected DxL pairs such as 2x3,10x3, got {args.cells}")
        args.dims = sorted({d for d, _ in args.cells})
        args.steps = sorted({l for _, l in args.cells})
    else:
        args.cells = [(d, l) for d in args.dims for l in args.steps]
    args.cells = sorted(set(args.cells))
    if not (args.lr > 0 and 0 < args.final_lr_frac <= 1 and args.grad_clip > 0):
        ap.error("--lr and --grad-clip must be positive and --final-lr-frac in (0, 1]")
    args.recipe = recipe_dict(args.lr, args.schedule, args.final_lr_frac, args.grad_clip)
    if args.q_steps < 1 or args.train_set < 0:
        ap.error("--q-steps must be at least 1 and --train-set at least 0")
    args.factors = factor_dict(args.scale, args.activation, args.mixing, args.q_base,
                               args.q_steps, args.train_set)  # fmt: skip
    bad = [(d, l) for d, l in args.cells if d < 2 or (d > 2 and l < 2) or l < 1]
    if bad:
        ap.error(f"invalid (D, L) pairs: {bad} (need D >= 2, L >= 1, and L >= 2 for VFlow)")
    return args


def lpt_makespan(costs: list[float], workers: int) -> float:
    """Wall time of ``costs`` run longest first on ``workers`` processes, each job going to the
    first free one (what ``run_parallel`` does with jobs submitted longest first)."""
    loads = [0.0] * max(workers, 1)
    for c in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += c
    return max(loads)


def job_cost(dim: int, members: list[tuple[int, int]]) -> float:
    """Relative cost of one ensemble iteration: a share per member-step (the batched products)
    plus a fixed share for the per-op overhead of the deepest member, which sets the number of
    ops (measured on the development machine: an iteration of 7 members costs as much as ~16
    members' compute)."""
    return sum(steps for steps, _ in members) + 4 * max(steps for steps, _ in members)


def plan_jobs(dims, steps, seeds: int, workers: int, done=frozenset()) -> list[tuple[int, list]]:
    """One ensemble job per D, ``[(dim, [(steps, seed), ...])]``, without the ``(dim, steps,
    seed)`` runs in ``done`` (a D with nothing left has no job); then, while it shortens the
    schedule on ``workers`` processes (:func:`lpt_makespan` of :func:`job_cost`), the largest
    job that has more than one seed is split into two by seed."""
    jobs = [
        (d, [(l, s) for l in steps for s in range(seeds) if (d, l, s) not in done]) for d in dims
    ]
    jobs = [j for j in jobs if j[1]]
    if not jobs:
        return jobs
    while True:
        costs = [job_cost(*j) for j in jobs]
        order = sorted(range(len(jobs)), key=lambda i: -costs[i])
        i = next((i for i in order if len({s for _, s in jobs[i][1]}) > 1), None)
        if i is None:
            return jobs
        d, members = jobs[i]
        ids = sorted({s for _, s in members})
        low = set(ids[: (len(ids) + 1) // 2])
        halves = [
            (d, [m for m in members if m[1] in low]),
            (d, [m for m in members if m[1] not in low]),
        ]
        trial = jobs[:i] + halves + jobs[i + 1 :]
        if lpt_makespan([job_cost(*j) for j in trial], workers) >= lpt_makespan(costs, workers):
            return jobs
        jobs = trial


def job_name(dim: int, members: list[tuple[int, int]]) -> str:
    """File name of an ensemble job's saved state: its D, depths and seeds."""
    steps = "-".join(str(l) for l in sorted({l for l, _ in members}))
    seeds = "-".join(str(s) for s in sorted({s for _, s in members}))
    return f"D{dim}_L{steps}_s{seeds}.pt"


RUN_COLUMNS = {"dims": int, "steps": int, "seed": int, "iters": int, "params": int,
               "test_ll": float, "test_elbo": float, "train_s": float, "train_cpu_s": float,
               "skipped": int, "lr": float, "schedule": str, "final_lr_frac": float,
               "grad_clip": float, "scale": str, "activation": str, "mixing": str,
               "q_base": lambda s: s.strip().lower() in ("true", "1"), "q_steps": int,
               "train_set": int}  # fmt: skip
# absent from files written before them: today's recipe and models
RECIPE_DEFAULTS = {**DEFAULT_RECIPE, **DEFAULT_FACTORS}
RECIPE_COLUMNS = tuple(RECIPE_DEFAULTS)


def recipe_key(run: dict) -> tuple:
    """What identifies a run's training recipe (``final_lr_frac`` only with a decay) and
    its model and data factors (today's where the run has none)."""
    frac = run["final_lr_frac"] if run["schedule"] != "constant" else None
    factors = tuple(run.get(k, v) for k, v in DEFAULT_FACTORS.items())
    return (run["lr"], run["schedule"], frac, run["grad_clip"]) + factors


def excluded_runs(args: argparse.Namespace) -> frozenset:
    """The (D, L, seed) of the grid ``--dims x --steps`` that are not in ``args.cells``."""
    cells = set(args.cells)
    return frozenset(
        (d, l, s)
        for d in args.dims
        for l in args.steps
        for s in range(args.seeds)
        if (d, l) not in cells
    )


def load_previous_runs(path: Path, args: argparse.Namespace) -> list[dict]:
    """The runs of ``path`` (a ``runs.csv``) that belong to this grid: (D, L) in
    ``args.cells``, seed below ``args.seeds``, ``args.iters`` iterations and the recipe
    ``args.recipe`` (a file without the recipe columns holds today's recipe), typed as
    :func:`run_all` returns them (``test_elbo`` NaN where the file has none). Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` when a needed column is
    missing or a run appears twice."""
    rows = read_typed_csv(path, RUN_COLUMNS, optional=("test_elbo",), what="--previous-runs",
                          defaults=RECIPE_DEFAULTS)  # fmt: skip
    cells, recipe = set(args.cells), recipe_key({**args.recipe, **args.factors})
    keep = [
        r
        for r in rows
        if (r["dims"], r["steps"]) in cells and r["seed"] < args.seeds
        and r["iters"] == args.iters and recipe_key(r) == recipe
    ]  # fmt: skip
    keys = [(r["dims"], r["steps"], r["seed"]) for r in keep]
    if len(set(keys)) != len(keys):
        raise ValueError(f"--previous-runs: {path} has a (dims, steps, seed) more than once")
    return keep


def run_all(args: argparse.Namespace, done=frozenset(), on_runs=None) -> list[dict]:
    """Train and evaluate every (D, L, seed) of ``args.cells`` but those in ``done`` with
    ``args.trainer`` and ``args.recipe``, jobs longest first in ``args.workers`` processes
    (each with one torch thread); in this process when ``args.workers == 1``. Returns one dict
    per run (``train_and_evaluate``'s keys); ``on_runs`` is called with the list of the runs
    finished so far each time a job finishes (to write them to disk as they come)."""
    done = frozenset(done) | excluded_runs(args)
    common = dict(iters=args.iters, batch=args.batch, samples=args.samples, **args.recipe)
    common.update(density_px=args.density_px, **args.factors)
    finished: list[dict] = []

    def collect(out: dict) -> None:
        finished.extend(out["runs"] if "runs" in out else [out])
        if on_runs is not None:
            on_runs(list(finished))

    if args.trainer == "single":
        jobs = [
            dict(dim=d, steps=l, seed=s, density=(s == 0 and (d, l) in DENSITY_CELLS), **common)
            for d in args.dims
            for l in args.steps
            for s in range(args.seeds)
            if (d, l, s) not in done
        ]
        jobs.sort(key=lambda j: -(j["steps"] + (j["dim"] > 2)))
        run_parallel(train_and_evaluate, jobs, args.workers, on_result=collect)
        return finished
    plan = plan_jobs(args.dims, args.steps, args.seeds, args.workers, done)
    plan.sort(key=lambda j: -job_cost(*j))
    jobs = [
        dict(
            dim=d,
            members=m,
            density=[(l, 0) for l in args.steps if (d, l) in DENSITY_CELLS],
            curve_every=curve_window(args.iters),
            checkpoint=args.out / "state" / job_name(d, m),
            checkpoint_every=args.checkpoint_every,
            **common,
        )
        for d, m in plan
    ]
    (args.out / "state").mkdir(parents=True, exist_ok=True)
    run_parallel(train_ensemble, jobs, args.workers, on_result=collect)
    return finished


def _cpu(fn, *a, **kw) -> float:
    """CPU seconds (this process) of ``fn(*a, **kw)``."""
    c0 = time.process_time()
    fn(*a, **kw)
    return time.process_time() - c0


def measure_speed(args: argparse.Namespace) -> dict:
    """CPU-seconds per model-iteration of the ensemble trainer (every job of the plan, all its
    members) and of the one-model loop (one seed per cell), ``args.speed_iters`` iterations
    each, alternating over ``args.speed_rounds`` rounds in this process on one thread; and the
    grid's wall time on ``args.workers`` processes predicted from the jobs' measured costs."""
    torch.set_num_threads(1)
    plan = plan_jobs(args.dims, args.steps, args.seeds, args.workers, excluded_runs(args))
    arch = dict(args.factors)
    ensembles = [ToyEnsemble(d, m, **arch) for d, m in plan]
    cells = args.cells
    n = args.speed_iters
    ens_cpu, single_cpu = [0.0] * len(plan), {c: 0.0 for c in cells}
    for _ in range(args.speed_rounds):
        for j, ens in enumerate(ensembles):
            ens_cpu[j] += _cpu(ens.train, n, args.lr, args.batch)
        for d, l in cells:
            single_cpu[(d, l)] += _cpu(train_single, d, l, 0, n, args.lr, args.batch, **arch)
    rounds_iters = n * args.speed_rounds
    per_iter = [c / rounds_iters for c in ens_cpu]  # CPU-s per ensemble iteration, per job
    ens_mi = sum(ens_cpu) / (rounds_iters * sum(len(e) for e in ensembles))
    single_mi = sum(single_cpu.values()) / (rounds_iters * len(cells))
    out = {"jobs": [(d, len(m)) for d, m in plan], "ensemble": ens_mi, "single": single_mi}
    out["per_dim"] = {
        d: (
            sum(c for (dd, _), c in zip(plan, ens_cpu, strict=True) if dd == d)
            / (rounds_iters * sum(len(m) for dd, m in plan if dd == d)),
            sum(single_cpu[(d, l)] for dd, l in cells if dd == d)
            / (rounds_iters * sum(dd == d for dd, _ in cells)),
        )
        for d in args.dims
    }
    for iters in sorted({args.iters, PAPER_ITERS}):
        out[f"wall_{iters}"] = lpt_makespan([t * iters for t in per_iter], args.workers)
        out[f"cpu_{iters}"] = sum(per_iter) * iters
    return out


def print_speed(sp: dict, args: argparse.Namespace) -> None:
    print(
        f"\nspeed ({args.speed_rounds} x {args.speed_iters} iterations per trainer, CPU-seconds "
        f"per model-iteration, 1 thread); ensemble jobs (D, E): {sp['jobs']}"
    )
    print(f"{'D':>3} {'ensemble':>10} {'one-model':>10} {'ratio':>7}")
    for d, (e, s1) in sp["per_dim"].items():
        print(f"{d:>3} {e * 1e3:>8.3f}ms {s1 * 1e3:>8.3f}ms {s1 / e:>6.1f}x")
    e, s1 = sp["ensemble"], sp["single"]
    print(f"all {e * 1e3:>8.3f}ms {s1 * 1e3:>8.3f}ms {s1 / e:>6.1f}x")
    for iters in sorted({args.iters, PAPER_ITERS}):
        print(
            f"predicted training time of the grid at {iters} iterations x {args.seeds} seeds: "
            f"{sp[f'cpu_{iters}']:.0f} CPU-s, wall {sp[f'wall_{iters}'] / 60:.1f} min on "
            f"{args.workers} workers (measured costs on this machine now)"
        )


def summarise(runs: list[dict]) -> list[dict]:
    """One row per (D, L): params, mean and sample std over seeds of the test log-likelihood."""
    rows = []
    for key in sorted({(r["dims"], r["steps"]) for r in runs}):
        sel = [r for r in runs if (r["dims"], r["steps"]) == key]
        ll_mean, ll_std = mean_std(r["test_ll"] for r in sel)
        elbo_mean = sum(r.get("test_elbo", math.nan) for r in sel) / len(sel)
        rows.append(
            {
                "dims": key[0],
                "steps": key[1],
                "params": sel[0]["params"],
                "ll_mean": ll_mean,
                "ll_std": ll_std,
                "elbo_mean": elbo_mean,
                "iters": sel[0]["iters"],
                "seeds": len(sel),
                **{k: sel[0][k] for k in RECIPE_COLUMNS if k in sel[0]},
            }
        )
    return rows


def curve_rows(runs: list[dict], every: int) -> list[dict]:
    """Long-format learning curves: one row per (D, L, seed, window end) with the window's
    mean training ELBO (nats); runs without a ``curve`` are left out."""
    return [
        {
            "dims": r["dims"],
            "steps": r["steps"],
            "seed": r["seed"],
            "iter": min((i + 1) * every, r["iters"]),
            "train_elbo": v,
        }
        for r in runs
        if "curve" in r
        for i, v in enumerate(r["curve"])
    ]


def plot_curves(runs: list[dict], cells, every: int, path: Path) -> None:
    """Training ELBO against iterations (median over seeds of the means over windows of
    ``every`` iterations; deep Glows have rare loss spikes that swamp a mean) for
    ``cells`` ``[(D, L, name)]``, with each cell's final test IW log-likelihood (mean over
    seeds) as a dashed line of the same colour."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for d, l, name in cells:
        sel = [r for r in runs if (r["dims"], r["steps"]) == (d, l) and "curve" in r]
        if not sel:
            continue
        curve = np.median([r["curve"] for r in sel], axis=0)  # robust to one seed's spikes
        its = np.minimum((np.arange(len(curve)) + 1) * every, sel[0]["iters"])
        (line,) = ax.plot(its, curve, lw=1, label=f"{name}: train ELBO")
        ll = np.mean([r["test_ll"] for r in sel])
        ax.axhline(ll, color=line.get_color(), ls="--", lw=1, label=f"{name}: test IW ll {ll:.3f}")
    ax.axhline(OPTIMUM, color="k", ls=":", lw=1, label="-log 32 (optimum)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("nats")
    ax.set_ylim(OPTIMUM - 0.8, OPTIMUM + 0.1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 8 - 4
    x2, x1 = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1)
    return checkerboard_density(pts).view(n, n).numpy()


def write_runs(out: Path, runs: list[dict]) -> None:
    """``out/runs.csv``: one row per run (with its recipe), without densities and curves."""
    write_csv(out / "runs.csv", [{k: v for k, v in r.items() if k not in ("density", "curve")}
                                 for r in runs])  # fmt: skip


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed_iters > 0:
        print_speed(measure_speed(args), args)
        if args.speed_only:
            return []
    previous = load_previous_runs(args.previous_runs, args) if args.previous_runs else []
    done = frozenset((r["dims"], r["steps"], r["seed"]) for r in previous)
    t0 = time.perf_counter()
    # runs.csv is rewritten as each job finishes: a study stopped half-way keeps its finished
    # runs, and --previous-runs OUT/runs.csv then resumes it
    new_runs = run_all(args, done, on_runs=lambda new: write_runs(args.out, previous + new))
    wall = time.perf_counter() - t0
    runs = previous + new_runs
    if previous:
        print(f"reused {len(previous)} runs of {args.previous_runs}; trained {len(new_runs)}")
    rows = summarise(runs)
    write_csv(args.out / "results.csv", rows)
    write_runs(args.out, runs)
    plot_ll_vs_params(rows, args.out / "ll_vs_params.png")
    curves = curve_rows(runs, curve_window(args.iters))
    if curves:  # the ensemble trainer records learning curves, the one-model loop does not
        write_csv(args.out / "curves.csv", curves)
        plot_curves(runs, CURVE_MODELS, curve_window(args.iters), args.out / "curves.png")

    panels = [(f"data ({OPTIMUM:.3f})", true_density(args.density_px), "density_data.png")]
    seed0 = {(r["dims"], r["steps"]): r for r in runs if "density" in r}
    for d, l, name in DENSITY_MODELS:  # the seed-0 models, titled with their test ll
        if (d, l) in seed0:
            r = seed0[(d, l)]
            panels.append((f"{name} ({r['test_ll']:.3f})", r["density"], f"density_D{d}_L{l}.png"))
    plot_densities(panels, args.out)

    cpu = sum(r["train_cpu_s"] for r in new_runs)
    print(
        f"\n{len(new_runs)} runs ({args.trainer} trainer), {args.iters} iterations each: grid wall "
        f"time {wall:.0f} s on {args.workers} workers, training CPU {cpu:.0f} s; out: {args.out}"
    )
    print("recipe: " + ", ".join(f"{k} {v}" for k, v in {**args.recipe, **args.factors}.items()))
    print(f"{'D':>3} {'L':>3} {'params':>7} {'test ll (nats)':>17} {'ELBO':>7} {'paper':>14}")
    for r in rows:
        p = PAPER.get((r["dims"], r["steps"]))
        ps = f"{p[0]:.2f} +- {p[1]:.2f}" if p else ""
        print(
            f"{r['dims']:>3} {r['steps']:>3} {r['params']:>7} "
            f"{r['ll_mean']:>8.3f} +- {r['ll_std']:.3f} {r['elbo_mean']:>7.3f} {ps:>14}"
        )
    print(f"optimum -log 32 = {OPTIMUM:.3f}")
    return rows


if __name__ == "__main__":
    main()

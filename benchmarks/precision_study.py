"""Does ``--precision bf16-nets`` change the trained model? Paired fp32 / bf16-nets trainings.

Issue 27, item 3. ``vflow train --precision bf16-nets`` runs the conditioning and context
networks of training steps under ``torch.autocast(bfloat16)`` while the couplings, logdets,
ActNorm and the invertible 1x1 convolutions stay float32 (:mod:`vflow.precision`);
evaluation runs the networks in float32. TarFlow's authors found float32 necessary for
their likelihood models, so this measures instead of assuming.

How. For each seed s in 0..``--seeds``-1 and each precision in {fp32, bf16-nets}, the
package trainer (:class:`vflow.train.Trainer`, what ``vflow train`` runs) trains
``--config`` (default ``vflow-digits``) with ``--seed s``: the same initialisation, batch
order and training noise for both precisions, the config's own recipe and schedule
(``vflow-digits``: 1,000 steps, batch 64, lr 2e-3 after 100 warm-up steps, EMA 0.99,
grad clip 1), one torch thread. The two runs of a seed alternate in order from seed to
seed (fp32 first for even seeds), so that load on a shared machine falls on both alike.
The EMA weights are then evaluated in float32 on the whole test split (359 digits) with
the trainer's own evaluation (:func:`vflow.evaluate.evaluate`, seeded with the run's seed,
so both precisions of a seed see the same evaluation noise): the ELBO and the
importance-weighted bits/dim with ``--samples`` samples (default 16, the trainer's).
Recorded per run: both bpd, the last logged training bpd, the number of skipped
(non-finite) iterations, the largest rise of the logged training bpd from one logging
window to the next after warm-up (a spike detector), and the CPU seconds of the training
(``time.process_time``; construction + initialisation, then the loop with its final
checkpoint and sample grid) and of the evaluation.

Output: one row per run in ``--csv`` (default ``docs/precision_study.csv``; ``--quick``
writes ``results/precision_study_quick.csv``); runs already in the CSV (same config, seed,
precision, steps, samples and test images) are skipped, so a stopped study resumes. Then a
paired table over every seed of this setting in the CSV: per seed fp32 and bf16-nets bpd
and their difference (bf16 - fp32), the mean difference +- its sample std over seeds with
its 95% confidence interval, a paired t-test p-value (scipy's ``ttest_rel`` when
installed, else :func:`paired_stats`' own Student-t tail) and the CPU step-time ratio
bf16/fp32. The step time on this CPU says nothing about a GPU, where bf16 autocast is the
point.

    python benchmarks/precision_study.py                  # 5 seeds x 2 precisions, 1,000 steps
    python benchmarks/precision_study.py --seeds 8        # adds seeds 5-7 to the same CSV
    python benchmarks/precision_study.py --quick          # CI: 2 seeds x 4 steps, < 1 minute

Measured (2026-12-05, 10 seeds, the default recipe, S = 16, all 359 test digits; on this
project's 2-core development machine shared with four other training jobs, 2,038 CPU-s):
bf16-nets - fp32 = +0.0010 +- 0.0013 bits/dim (ELBO; mean +- std over seeds, 95% CI
+-0.0009, paired t-test p = 0.040) and +0.0010 +- 0.0012 (IW; p = 0.032), worse on 8 of
10 seeds, against a seed-to-seed std of 0.008: a small, barely significant cost. No
non-finite step or loss spike in either precision. CPU step-time ratio bf16/fp32: median
0.973. Table and reading: docs/training.md ("bf16 networks: paired trainings").
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRECISIONS = ("fp32", "bf16-nets")
#: Full study: the config's own schedule (steps None), the trainer's 16 IW samples, the
#: whole test split (test_images None).
FULL = {"seeds": 5, "steps": None, "samples": 16, "test_images": None}
#: CI smoke run: numbers meaningless.
QUICK = {"seeds": 2, "steps": 4, "samples": 2, "test_images": 32}
#: The columns that identify a run (a row with the same values is not run again).
KEY = ("config", "seed", "precision", "steps", "samples", "test_images")
#: Logged training windows before this step are ignored by the spike detector (warm-up).
SPIKE_FROM_STEP = 200


def paired_stats(a, b) -> dict:
    """Paired comparison of ``b`` against ``a`` (one value per seed each): n, the mean and
    sample std (ddof=1) of the differences ``b - a``, Student's t = mean / (std / sqrt(n))
    and its two-sided p-value with n - 1 degrees of freedom (nan for n < 2 or identical
    differences)."""
    d = [float(y) - float(x) for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = statistics.fmean(d) if d else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "t": math.nan, "p": math.nan}
    std = statistics.stdev(d)
    if std == 0:
        return {"n": n, "mean": mean, "std": 0.0, "t": math.nan, "p": math.nan}
    t = mean / (std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "t": t, "p": t_two_sided_p(t, n - 1)}


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t with ``df`` degrees of freedom:
    I_{df / (df + t^2)}(df / 2, 1 / 2), the regularised incomplete beta function."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) (Lentz's continued fraction, as in
    Numerical Recipes' ``betai``; relative accuracy ~1e-14)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on the other side
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return math.exp(ln_front) * h / a


def p_value(a, b) -> tuple[float, str]:
    """Two-sided paired t-test p-value of ``b`` against ``a`` and where it came from."""
    try:
        from scipy.stats import ttest_rel
    except ImportError:
        return paired_stats(a, b)["p"], "own Student-t"
    if len(a) < 2:
        return math.nan, "scipy"
    return float(ttest_rel(b, a).pvalue), "scipy"


def ci95_halfwidth(std: float, n: int) -> float:
    """Half-width of the 95% confidence interval of a mean of ``n`` paired differences with
    sample std ``std``: t_{0.975, n-1} std / sqrt(n) (nan without scipy or for n < 2)."""
    try:
        from scipy.stats import t
    except ImportError:
        return math.nan
    return float(t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n >= 2 else math.nan


def training_log(metrics_path: Path) -> dict:
    """From a run's metrics.jsonl: the last logged training bpd, whether any logged window
    was non-finite, and the largest rise of the training bpd between consecutive windows
    from step ``SPIKE_FROM_STEP`` on."""
    rows = []
    with open(metrics_path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "train":
                rows.append(r)
    bpd = [(r["step"], r["train_bpd"]) for r in rows]
    finite = [v is not None and math.isfinite(v) for _, v in bpd]
    rises = [
        v1 - v0
        for (_, v0), (s1, v1), ok0, ok1 in zip(bpd, bpd[1:], finite, finite[1:], strict=False)
        if s1 > SPIKE_FROM_STEP and ok0 and ok1
    ]
    return {
        "final_train_bpd": bpd[-1][1] if bpd and finite[-1] else math.nan,
        "nonfinite_window": int(not all(finite)),
        "max_bpd_rise": max(rises) if rises else math.nan,
    }


def run_one(config: str, seed: int, precision: str, steps, samples: int, test_images, threads, out):
    """Train one run with the package trainer and evaluate its EMA weights; one CSV row."""
    import torch

    from vflow.evaluate import evaluate
    from vflow.train import TrainArgs, Trainer

    torch.set_num_threads(threads)
    run_dir = Path(out) / f"{config}-s{seed}-{precision}-{steps or 'recipe'}"
    if run_dir.exists():  # a run stopped half-way: start it again
        shutil.rmtree(run_dir)
    args = TrainArgs(
        config=config,
        out=str(run_dir),
        steps=steps,
        seed=seed,
        device="cpu",
        num_threads=threads,
        progress=False,
        eval_every=0,
        ckpt_every=0,
        keep=1,
        final_eval=False,
        precision=precision,
    )
    c0, w0 = time.process_time(), time.perf_counter()
    trainer = Trainer(args)
    c1 = time.process_time()
    result = trainer.run()
    c2, w2 = time.process_time(), time.perf_counter()
    res = evaluate(
        trainer.ema_model(),
        trainer.test_data,
        batch_size=args.eval_batch_size,
        samples=samples,
        device=trainer.device,
        seed=seed,
        max_images=test_images,
    )
    c3 = time.process_time()
    log = training_log(run_dir / "metrics.jsonl")
    return {
        "config": config,
        "seed": seed,
        "precision": precision,
        "steps": steps or "",
        "samples": samples,
        "test_images": test_images or "",
        "trained_steps": result.step,
        "n_test": res["n"],
        "elbo_bpd": res["elbo_bpd"],
        "iw_bpd": res["iw_bpd"],
        "final_train_bpd": log["final_train_bpd"],
        "skipped": result.skipped,
        "nonfinite": int(bool(result.skipped) or bool(log["nonfinite_window"])),
        "max_bpd_rise": log["max_bpd_rise"],
        "setup_cpu_s": round(c1 - c0, 2),
        "train_cpu_s": round(c2 - c1, 2),
        "cpu_s_per_step": (c2 - c1) / max(result.step, 1),
        "eval_cpu_s": round(c3 - c2, 2),
        "train_wall_s": round(w2 - w0, 2),
        "threads": threads,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }


def _key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the CSV ``path`` (with a header if the file is new)."""
    new = not path.is_file() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def jobs(a) -> list[dict]:
    """The runs of the study, in order: per seed both precisions, the order alternating."""
    out = []
    for seed in range(a.seeds):
        order = PRECISIONS if seed % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            out.append(
                {
                    "config": a.config,
                    "seed": seed,
                    "precision": precision,
                    "steps": a.steps,
                    "samples": a.samples,
                    "test_images": a.test_images,
                    "threads": a.threads,
                    "out": a.out,
                }
            )
    return out


def paired_table(rows: list[dict], config: str, steps, samples: int, test_images) -> dict:
    """The paired comparison of the CSV rows of one study setting: per seed both precisions'
    bpd and their differences, and the statistics. Seeds with only one precision are left
    out."""
    want = {"config": config, "steps": steps or "", "samples": samples, "test_images": test_images}
    want = {k: str(v or "") if k in ("steps", "test_images") else str(v) for k, v in want.items()}
    by = {}
    for r in rows:
        if all(str(r[k]) == v for k, v in want.items()):
            by[(int(r["seed"]), r["precision"])] = r
    seeds = sorted(s for s, p in by if p == "fp32" and (s, "bf16-nets") in by)
    table = {"seeds": seeds, "per_seed": [], "stats": {}}
    for s in seeds:
        f, b = by[(s, "fp32")], by[(s, "bf16-nets")]
        table["per_seed"].append(
            {
                "seed": s,
                **{
                    f"{m}_{tag}": float(r[m])
                    for m in ("elbo_bpd", "iw_bpd", "cpu_s_per_step")
                    for tag, r in (("fp32", f), ("bf16", b))
                },
                "nonfinite_fp32": int(f["nonfinite"]),
                "nonfinite_bf16": int(b["nonfinite"]),
                "rise_fp32": float(f["max_bpd_rise"]),
                "rise_bf16": float(b["max_bpd_rise"]),
            }
        )
    ps = table["per_seed"]
    for m in ("elbo_bpd", "iw_bpd"):
        a, b = [r[f"{m}_fp32"] for r in ps], [r[f"{m}_bf16"] for r in ps]
        st = paired_stats(a, b)
        st["p"], st["p_from"] = p_value(a, b) if len(a) >= 2 else (math.nan, "-")
        st["ci95"] = ci95_halfwidth(st["std"], st["n"])
        st["fp32_mean"], st["bf16_mean"] = (
            (statistics.fmean(a), statistics.fmean(b)) if a else (math.nan, math.nan)
        )
        st["fp32_std"] = statistics.stdev(a) if len(a) > 1 else math.nan
        table["stats"][m] = st
    ratios = [r["cpu_s_per_step_bf16"] / r["cpu_s_per_step_fp32"] for r in ps]
    table["stats"]["step_ratio"] = {
        "median": statistics.median(ratios) if ratios else math.nan,
        "min": min(ratios, default=math.nan),
        "max": max(ratios, default=math.nan),
    }
    return table


def print_table(table: dict, a) -> None:
    print(
        f"\n{a.config}, {a.steps or 'recipe'} steps, IW samples {a.samples}, test images "
        f"{a.test_images or 'all'}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cpus, {a.threads} torch thread(s)"
    )
    print(
        "seed  ELBO fp32  ELBO bf16   diff      IW fp32    IW bf16    diff     "
        "CPU s/step fp32 bf16  nonfinite  max rise fp32 bf16"
    )
    for r in table["per_seed"]:
        print(
            f"{r['seed']:4d}  {r['elbo_bpd_fp32']:9.4f}  {r['elbo_bpd_bf16']:9.4f}  "
            f"{r['elbo_bpd_bf16'] - r['elbo_bpd_fp32']:+8.4f}  {r['iw_bpd_fp32']:9.4f}  "
            f"{r['iw_bpd_bf16']:9.4f}  {r['iw_bpd_bf16'] - r['iw_bpd_fp32']:+8.4f}  "
            f"{r['cpu_s_per_step_fp32']:15.4f} {r['cpu_s_per_step_bf16']:6.4f}  "
            f"{r['nonfinite_fp32']:4d} {r['nonfinite_bf16']:4d}  "
            f"{r['rise_fp32']:8.4f} {r['rise_bf16']:8.4f}"
        )
    for m, name in (("elbo_bpd", "ELBO"), ("iw_bpd", "IW")):
        st = table["stats"][m]
        print(
            f"{name:4s} bpd: fp32 {st['fp32_mean']:.4f} (seed std {st['fp32_std']:.4f}), "
            f"bf16-nets {st['bf16_mean']:.4f}; bf16 - fp32 = {st['mean']:+.4f} +- "
            f"{st['std']:.4f} (n = {st['n']}; 95% CI +-{st['ci95']:.4f}), paired t-test "
            f"p = {st['p']:.3g} ({st['p_from']})"
        )
    q = table["stats"]["step_ratio"]
    print(
        f"CPU step-time ratio bf16/fp32: median {q['median']:.3f} (range {q['min']:.3f}-"
        f"{q['max']:.3f}). This is CPU autocast on a shared machine; it says nothing about a "
        f"GPU, where bf16 nets are meant to pay."
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="vflow-digits", help="model config (default: %(default)s)")
    p.add_argument("--seeds", type=int, help=f"seeds 0..N-1 (default {FULL['seeds']})")
    p.add_argument("--steps", type=int, help="training steps (default: the config's recipe)")
    p.add_argument("--samples", type=int, help=f"IW samples (default {FULL['samples']})")
    p.add_argument("--test-images", type=int, help="test images (default / 0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.add_argument("--csv", type=Path, help="results CSV (default docs/precision_study.csv)")
    p.add_argument(
        "--out", help="run directories (default results/precision_study[_quick])", default=None
    )
    p.add_argument("--quick", action="store_true", help="2 seeds x 4 steps, 2 samples (CI)")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    for k, v in preset.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.test_images = a.test_images or None
    tag = "_quick" if a.quick else ""
    a.csv = a.csv or (
        ROOT / ("results/precision_study_quick.csv" if a.quick else "docs/precision_study.csv")
    )
    a.out = a.out or str(ROOT / f"results/precision_study{tag}")
    if a.seeds < 1 or (a.steps is not None and a.steps < 1) or a.samples < 1:
        p.error("--seeds, --steps and --samples must be >= 1")
    return a


def main(argv=None) -> dict:
    from tqdm import tqdm

    a = parse_args(argv)
    done = {_key(r) for r in read_rows(a.csv)}
    todo = [
        j
        for j in jobs(a)
        if _key({**j, "steps": j["steps"] or "", "test_images": j["test_images"] or ""}) not in done
    ]
    print(f"{len(jobs(a)) - len(todo)} runs already in {a.csv}, {len(todo)} to run")
    for job in tqdm(todo, desc="runs", dynamic_ncols=True):
        row = run_one(**job)
        append_row(a.csv, row)
        tqdm.write(
            f"seed {row['seed']} {row['precision']}: ELBO {row['elbo_bpd']:.4f}, IW "
            f"{row['iw_bpd']:.4f} bpd, {row['train_cpu_s']} CPU-s training, "
            f"skipped {row['skipped']}"
        )
    table = paired_table(read_rows(a.csv), a.config, a.steps, a.samples, a.test_images)
    print_table(table, a)
    return table


if __name__ == "__main__":
    main()

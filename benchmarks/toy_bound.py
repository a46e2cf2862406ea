"""What limits a trained toy VFlow (issue 30): q's bound, or p's density itself?

The toy study scores a VFlow by the 100-sample importance-sampled log-likelihood (Eq. 5 of the
paper),

    IW_S(x) = log (1/S) sum_s exp(w_s),   w_s = log p(x, z_s) - log q(z_s|x),   z_s ~ q(z|x),

whose expectation rises with ``S`` from the ELBO (``S = 1``) to ``log p(x)``, the marginal
of the trained p (Burda et al. 2016). So the test IW_100 falls short of the paper's -3.51
either because q is loose (IW_100 well below IW_S for large S) or because p's marginal
itself is lower (IW_S flat in S). This script loads the saved ensembles of
``toy_checkerboard.py`` (``--out``/state/*.pt, written by every ensemble job) and prints,
per member and as mean +- std over the members, the test-set mean of IW_S for each
``--samples`` (nested: the first S of the largest draw, so the columns are comparable)
and of the ELBO, on the study's fixed 1,000-point test set.

``--refit-q N`` then trains q alone for ``N`` more iterations (Adam at ``--refit-lr``,
fresh batches; p frozen: its weights and Adam state are not stepped) and measures again: if
a better q raises IW_100 towards the large-S value, q's fit was the limit.

    python benchmarks/toy_bound.py results/toy30/long/1e-3_cosine/10x3/state/*.pt
    python benchmarks/toy_bound.py STATE.pt --samples 1,100,10000 --refit-q 20000
    python benchmarks/toy_bound.py --quick       # a tiny trained ensemble (CI)

``--curves LABEL=FOLDER ... --plot PNG`` draws the training ELBO (median over seeds, per
1,000 iterations) of toy_checkerboard output folders side by side, e.g. one cell trained
for 100k and for 300k iterations, against the paper's value (``--paper``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_checkerboard import OPTIMUM  # noqa: E402

from vflow import toy  # noqa: E402


def load_ensemble(path: Path) -> toy.ToyEnsemble:
    """The :class:`vflow.toy.ToyEnsemble` saved at ``path`` by ``train_resumable`` (its
    members, factors and dtype from the file)."""
    saved = torch.load(path, weights_only=False)["ensemble"]
    factors = dict(saved.get("factors", {}))
    dtype = getattr(torch, saved["dtype"].removeprefix("torch."))
    ens = toy.ToyEnsemble(saved["dim"], [tuple(m) for m in saved["members"]],
                          q_base=saved["q_base"], dtype=dtype, **factors)  # fmt: skip
    ens.load_state_dict(saved)
    return ens


@torch.no_grad()
def iw_by_samples(
    ens: toy.ToyEnsemble, x: torch.Tensor, samples: list[int], seed: int = 0, chunk: int = 10
) -> dict[int, torch.Tensor]:
    """Per member, the mean over ``x`` of IW_S for each ``S`` in ``samples`` (and of the
    ELBO under the key 0), from one draw of ``max(samples)`` weights per point (IW_S uses the
    first ``S``): ``{S: (E,) float64}``. ``z``'s noise comes from a generator seeded
    ``seed``; ``chunk`` points at a time."""
    s_max, gen = max(samples), torch.Generator().manual_seed(seed)
    sums = {s: torch.zeros(len(ens), dtype=torch.float64) for s in [0, *samples]}
    for xc in x.split(chunk):
        n = xc.shape[0]
        noise = torch.randn(len(ens), s_max * n, ens.dz, generator=gen, dtype=ens.dtype)
        xr = xc.repeat(s_max, 1).expand(len(ens), s_max * n, 2)
        w = torch.cat([ens.log_weight(xr[:, r : r + 5000], noise[:, r : r + 5000])
                       for r in range(0, s_max * n, 5000)], dim=1)  # fmt: skip
        w = w.view(len(ens), s_max, n).double()
        sums[0] += w.mean(dim=1).sum(dim=1)
        for s in samples:
            sums[s] += (torch.logsumexp(w[:, :s], dim=1) - math.log(s)).sum(dim=1)
    return {s: v / x.shape[0] for s, v in sums.items()}


def refit_q(ens: toy.ToyEnsemble, iters: int, lr: float, batch: int = 64) -> None:
    """``iters`` more ELBO steps of every member's q with p frozen: the training loop of
    :meth:`ToyEnsemble.train` with the optimiser (clipping and Adam) restricted to q's block.
    p's weights and Adam moments are not stepped; the members' shared Adam step count does
    advance and p's gradient buffer is left filled, so the ensemble is for measuring only
    (do not train it further)."""
    blocks = ens.blocks
    ens.blocks = [ens.q]
    try:
        ens.train(iters, lr, batch)
    finally:
        ens.blocks = blocks


def table(results: dict[int, torch.Tensor], label: str) -> list[dict]:
    """Rows ``{label, S, mean, std, members}`` (S = 0 is the ELBO), printed as a table."""
    rows = []
    for s, v in results.items():
        std = float(v.std()) if len(v) > 1 else 0.0
        rows.append({"label": label, "S": s, "mean": float(v.mean()), "std": std,
                     "members": [round(float(t), 4) for t in v]})  # fmt: skip
        name = "ELBO" if s == 0 else f"IW_{s}"
        print(f"{label:<28} {name:>9} {float(v.mean()):>9.4f} +- {std:.4f}   "
              + " ".join(f"{float(t):.4f}" for t in v))  # fmt: skip
    return rows


def plot_curves(curves: list[tuple[str, Path]], path: Path, paper: float | None) -> None:
    """The median over seeds of the training ELBO in each folder's ``curves.csv``, one line
    per ``(label, folder)``, with the optimum ``-log 32`` and ``paper`` as dotted lines."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, folder in curves:
        with open(folder / "curves.csv") as f:
            rows = [(int(r["iter"]), float(r["train_elbo"])) for r in csv.DictReader(f)]
        its = sorted({i for i, _ in rows})
        med = [np.median([v for i, v in rows if i == it]) for it in its]
        ax.plot(its, med, lw=1, label=label)
    ax.axhline(OPTIMUM, color="k", ls=":", lw=1, label="optimum -log 32")
    if paper is not None:
        ax.axhline(paper, color="r", ls=":", lw=1, label=f"paper's test ll {paper}")
    ax.set_ylim(OPTIMUM - 0.4, OPTIMUM + 0.02)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training ELBO, median over seeds (nats)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("states", nargs="*", type=Path, help="ensemble state files (*.pt)")
    ap.add_argument("--samples", default="10,100,1000,10000",
                    help="comma-separated S values (default: 10,100,1000,10000; the ELBO is "
                    "S = 1)")  # fmt: skip
    ap.add_argument("--points", type=int, default=1000, help="test points (the fixed test set)")
    ap.add_argument("--refit-q", type=int, default=None, help="then train q alone N iterations")
    ap.add_argument("--refit-lr", type=float, default=1e-4)
    ap.add_argument("--json", type=Path, default=None, help="write the rows here")
    ap.add_argument("--quick", action="store_true", help="train a tiny ensemble and use it")
    ap.add_argument("--curves", nargs="*", default=[],
                    help="LABEL=FOLDER: toy_checkerboard output folders to plot")  # fmt: skip
    ap.add_argument("--plot", type=Path, default=None, help="the learning-curve plot (PNG)")
    ap.add_argument("--paper", type=float, default=None, help="the paper's value, drawn")
    args = ap.parse_args(argv)
    if args.curves:
        if args.plot is None:
            ap.error("--curves needs --plot")
        pairs = [c.split("=", 1) for c in args.curves]
        if any(len(p) != 2 or not (Path(p[1]) / "curves.csv").exists() for p in pairs):
            ap.error(f"--curves: expected LABEL=FOLDER with a curves.csv, got {args.curves}")
        plot_curves([(label, Path(d)) for label, d in pairs], args.plot, args.paper)
        if not (args.states or args.quick):
            return []
    torch.set_num_threads(1)
    try:
        samples = sorted({int(s) for s in args.samples.split(",")})
    except ValueError:
        ap.error(f"--samples: expected comma-separated positive integers, got {args.samples!r}")
    if samples[0] < 1:
        ap.error(f"--samples: every S must be >= 1, got {args.samples!r}")
    n_test = len(toy.fixed_test_set())
    if not 1 <= args.points <= n_test:
        ap.error(f"--points: expected 1 to {n_test} (the fixed test set), got {args.points}")
    if args.refit_q is not None and args.refit_q < 0:
        ap.error(f"--refit-q: expected >= 0 iterations, got {args.refit_q}")
    if args.quick and args.states:
        ap.error("--quick trains its own tiny ensemble: give state files or --quick, not both")
    if args.quick:
        ens = toy.ToyEnsemble(4, [(2, 0), (2, 1)])
        ens.train(50, lr=3e-3)
        ensembles = [("quick D4 L2", ens)]
        samples, args.points = [1, 4, 16], 40
        args.refit_q = 20 if args.refit_q is None else args.refit_q
    else:
        ensembles = [(str(p), load_ensemble(p)) for p in args.states]
    if not ensembles:
        ap.error("give state files or --quick")
    x = toy.fixed_test_set()[: args.points]
    rows = []
    for label, ens in ensembles:
        if not ens.dz:
            raise SystemExit(f"{label}: a Glow (D = 2) has no bound to study")
        print(f"# {label}: D {ens.dim}, members {ens.members}")
        rows += table(iw_by_samples(ens, x, samples), Path(label).stem)
        if args.refit_q:
            refit_q(ens, args.refit_q, args.refit_lr)
            rows += table(iw_by_samples(ens, x, samples),
                          f"{Path(label).stem} +q{args.refit_q}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()

"""Section 6.2 / Table 5 / Fig. 6 of the VFlow paper on Fashion-MNIST: more channels under a
FIXED parameter budget, the extra channels paid for by fewer hidden blocks B.

The paper trains a 3-channel Flow++ and 4- and 6-channel VFlows with ~4.0M parameters on
CIFAR-10 (D_H = 32, K = 4; B = 13 -> 11 -> 10, a cut of at most 23%) and finds that
dimensionality helps at every stage of training: 3.23 / 3.16 / 3.13 bpd (Table 2; 3.21 /
3.15 / 3.12 in Table 5). Grey-level images have ONE channel, where the bottleneck the paper
describes is tightest. Here: a 1-channel Flow++ and VFlows with 1, 2 and 3 extra channels.

Data: Fashion-MNIST (``vflow.data``, Debian's /usr/share/datasets/fashion-mnist or
``VFLOW_FASHION_DIR``), 2x2 AVERAGE-POOLED TO 14x14 (``vflow.data.avg_pool``: block means
rounded half up, still 256 levels, 196 dimensions), because 28x28 models of this depth
cannot train long enough for a comparison within the 2-hour budget on the 2-core machine
(a step at 28x28 costs about 4x one at 14x14). Training split: the 50,000 training images
left after the fixed-seed 10,000-image validation split; curves on fixed subsets of the
training and validation images; final numbers on the official test images.

Models (D_H = 16, K = 4; table from ``python benchmarks/fashion_ablation.py --budget``):

  name        ch  p (14x14 scale | SpaceToDepth | 7x7 scale)                          B
  flowpp-1ch  1   f_checker(10,16,4)x4 | f_channel(10,16,4)x5                        10
  vflow-2ch   2   f_affine(1,2); f_checker(9,16,4)x2, f_channel x2 | f_channel x5      9
  vflow-3ch   3   f_affine(2,22); f_checker(8,16,4)x4 (odd: no channel split at 14x14,
                  as Flow++ on RGB) | f_channel x5                                      8
  vflow-4ch   4   f_affine(2,34); f_checker(7,16,4)x2, f_channel x2 | f_channel x5      7

Deviation from Table 5 forced by the size: the 7x7 scale has an odd width, which the
checkerboard (even/odd column) split cannot halve, so its five couplings are all channel
couplings (Table 5: f_checker x2 + f_channel x3 at 16x16); every model has the same 9
MoL couplings in p.

B: 10 -> 9 -> 8 -> 7 (cuts 10%, 20%, 30%; the paper's 13 -> 11 -> 10 is 15% and 23%).
Why so deep: at D_H = 16 one hidden block of the 9 couplings of p is ~65k parameters, while
each extra channel costs ~35-65k (the couplings' input and output convolutions, 3K + 2 = 14
outputs per transformed channel, grow with the channel count; q(z|x) is added), so the
4-channel VFlow needs ~140k, i.e. 3 blocks, which is <= 30% only from B = 10. (Measured
totals at B = 4 -> 3 -> 3 -> 3 with a minimal f_affine: 331,916 / 333,174 / 373,782 /
407,662: a 50% cut would be needed.) The f_affine(blocks, filters) (the paper's special
affine coupling, Table 5) takes up the remainder: (1, 2), (2, 22), (2, 34) for the 2-, 3-
and 4-channel VFlow, giving totals of 715,532 (Flow++) and +0.13%, -0.04%, +0.01% (all four
within 1%; see :data:`AFFINE`; ``tests/test_fashion_ablation.py`` checks the spread and the
cuts). r(u|x) (g_checker(1,16,4) x2, Sigmoid) is the same in every
model, q(z|x) (g_checker(1,16,4) x2, Sigmoid) the same in every VFlow; context nets 16
filters, 1 gated conv; no dropout.

Recipe (:data:`RECIPE`, the same for all): Adam, lr 1e-3 with a 200-step linear warm-up, no
decay, batch 64, grad-norm clip 1, EMA 0.998; data-dependent initialisation ("official"
scheme) on 128 training images; the shared loop of ``_ablation.py`` (the package trainer's).

Outputs in ``--out`` (default results/fashion_ablation): ``curves.csv`` / ``curves.png``
(Fig. 6: ELBO bits/dim of the EMA weights on ``--curve-images`` fixed training (light) and
validation (dark) images every ``--eval-every`` steps, mean over seeds), ``runs.csv``,
``results.csv`` (test ELBO and IW bits/dim, mean and std over seeds) and ``bpd_bar.png``.
``runs.csv`` and ``curves.csv`` are rewritten as each run finishes, so a study stopped
half-way keeps its finished runs for ``--previous``.

Full mode (defaults): 4 models x 2 seeds x 400 steps (batch 64: 25,600 images, half an
epoch of the 50,000 training images), curves every 50 steps on 300 + 300 images, final test
on the first 300 test images with S = 64 (IW), in 2 worker processes with one torch thread
each. ``--quick``: 2 steps, 1 seed, S = 2, 8 curve and 8 test images (CI smoke test).
``--previous DIR`` reads back the runs of an earlier ``--out`` with the same settings instead
of training them again, so the study can also be run a few models at a time
(``--models``) and put together at the end.

Wall time of the full mode, measured (2026-11-30, 2 workers, otherwise idle machine, jobs
model by model): 1 h 53 min 4 s, 13,377 CPU-s, within the 2-hour target by 7 min; a run took
1,388-1,979 s. A first run with the jobs seed by seed took 2 h 8 min 57 s, because its
last run ran alone for 27 min; both runs gave the same bits/dim to the last digit. The
budget is what sets the length: a 1% budget with a B cut <= 30% needs B >= 10 at D_H = 16
(above), and half an epoch is what 2 hours buy at that depth, so the study compares the
models EARLY in training; the paper reports the VFlows ahead "at all stages of training"
(Fig. 6, Remark 1). Results: README, "A fixed parameter budget on Fashion-MNIST";
docs/fashion_ablation_runs.csv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ablation  # noqa: E402
from _ablation import PAPER_CIFAR, Study  # noqa: E402

from vflow.models import SQUEEZE, f_affine, f_channel, f_checker, g_checker  # noqa: E402

K = 4  # mixture components (Table 5)
D_H = 16  # hidden filters of every coupling network (the paper's D_H = 32 at 4M)
SHAPE = (1, 14, 14)  # 28x28 Fashion-MNIST, 2x2 average-pooled
QR = g_checker(1, D_H, K, 2)  # q(z|x) and r(u|x): identical in every model
COMMON = dict(data_shape=SHAPE, n_bins=256, context_filters=16, context_blocks=1, dropout=0.0)

#: Hidden blocks B of the main flow p per model (Flow++ baseline first).
BLOCKS = {"flowpp-1ch": 10, "vflow-2ch": 9, "vflow-3ch": 8, "vflow-4ch": 7}
#: f_affine(blocks, filters) of each VFlow, chosen so that the totals match the baseline's.
AFFINE = {"vflow-2ch": (1, 2), "vflow-3ch": (2, 22), "vflow-4ch": (2, 34)}


def _p_flowpp(blocks: int) -> tuple:
    """Table 5's Flow++ p: checkerboard couplings only at full scale (one channel); at 7x7
    channel couplings only (the checkerboard split needs an even width)."""
    return (f_checker(blocks, D_H, K, 4), SQUEEZE, f_channel(blocks, D_H, K, 5))


def _p_vflow(channels: int, blocks: int, affine: tuple[int, int]) -> tuple:
    """Table 5's VFlow p: f_affine, checker + channel couplings at full scale (checker only
    when the channel count is odd), channel couplings only at 7x7 (odd width)."""
    if channels % 2 == 0:
        top = (f_checker(blocks, D_H, K, 2), f_channel(blocks, D_H, K, 2))
    else:
        top = (f_checker(blocks, D_H, K, 4),)
    return (f_affine(*affine),) + top + (SQUEEZE, f_channel(blocks, D_H, K, 5))


def make_models(blocks: dict = BLOCKS, affine: dict = AFFINE) -> dict[str, tuple[str, dict]]:
    """name -> (base config, overrides of vflow.build) for the given B and f_affine sizes."""
    models = {"flowpp-1ch": ("flowpp-fashion", dict(p=_p_flowpp(blocks["flowpp-1ch"]), r=(QR,)))}
    for cz in (1, 2, 3):
        name = f"vflow-{1 + cz}ch"
        p = _p_vflow(1 + cz, blocks[name], affine[name])
        models[name] = ("vflow-fashion", dict(p=p, q=(QR,), r=(QR,), extra_channels=cz))
    for _, overrides in models.values():
        overrides.update(COMMON)
    return models


MODELS = make_models()

#: The same for every model; merged over vflow.train.DEFAULT_RECIPE.
RECIPE = dict(lr=1e-3, warmup=200, batch_size=64, ema_decay=0.998, grad_clip=1.0)

FULL = dict(steps=400, seeds=2, samples=64, eval_every=50, curve_images=300, test_images=300)
QUICK = dict(steps=2, seeds=1, samples=2, eval_every=1, curve_images=8, test_images=8)

STUDY = Study(
    key="fashion",
    title="Fashion-MNIST 14x14 (2x2 avg-pooled), fixed budget",
    data="fashion-mnist",
    pool=2,
    models=MODELS,
    recipe=RECIPE,
    full=FULL,
    quick=QUICK,
    curve_split="valid",
    paper=PAPER_CIFAR,
    max_spread=0.01,
    max_cut=0.30,
    data_dir=os.environ.get("VFLOW_FASHION_DIR"),
)


def build_model(name: str, backend: str = "auto"):
    """The ablation model ``name`` (a key of :data:`MODELS`)."""
    return _ablation.build_model(STUDY, name, backend)


def param_counts(names=None) -> dict[str, dict[str, int]]:
    return _ablation.param_counts(STUDY, names)


def parse_args(argv=None):
    return _ablation.parse_args(STUDY, argv, __doc__)


def main(argv=None) -> list[dict]:
    if argv is None:
        argv = sys.argv[1:]
    if "--budget" in argv:  # print the parameter table only
        print(_ablation.budget_table(STUDY, param_counts()))
        b = _ablation.budget(STUDY)
        print(
            f"spread {b['spread']:.3%}; B cuts "
            + ", ".join(f"{k} {v:.0%}" for k, v in b["cuts"].items())
        )
        return []
    return _ablation.main(STUDY, argv, __doc__)


if __name__ == "__main__":
    main()

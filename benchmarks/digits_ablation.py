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

Training and evaluation are the shared study code of ``_ablation.py`` (this script is a
:class:`_ablation.Study`): the package trainer's loop with the "flowpp-digits" /
"vflow-digits" recipe (Adam, lr 2e-3 with a 100-step warm-up, batch 64, grad-norm clip 1,
EMA 0.99, data-dependent initialisation), the same steps and schedule for every model. Each
run is evaluated with the EMA weights on the whole test split (359 images): the ELBO (Eq. 7)
and the importance-weighted estimate (Eq. 5, ``model.log_prob`` with ``--samples``
samples), both in bits/dim. Digits have no validation split, so the learning curves
(``--eval-every``, default 0 = off) are on the training and test images.

Outputs in ``--out`` (default results/digits_ablation): ``results.csv`` (one row per model:
name, extra_channels, blocks, params, bpd_iw_mean/std, bpd_elbo_mean/std, seeds, steps,
samples, test_images; the std is the sample std over seeds, 0 for one seed), ``runs.csv``
(one row per run), ``bpd_bar.png`` (mean IW bpd per model with std error bars) and, with
``--eval-every``, ``curves.csv`` / ``curves.png``. The training loop gives the same weights
as ``vflow.train.train`` for the same model and seed (tested), so the numbers below, measured
with the trainer, still hold.

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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _ablation  # noqa: E402
from _ablation import PAPER_CIFAR, Study  # noqa: E402

from vflow.models import SQUEEZE, f_affine, f_channel, f_checker, g_checker  # noqa: E402
from vflow.train import get_recipe  # noqa: E402

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
    checker couplings at full scale when the channel count is odd, as Flow++ on RGB)."""
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

PAPER = PAPER_CIFAR
FULL = dict(steps=1000, seeds=3, samples=128, eval_every=0, curve_images=None, test_images=None)
QUICK = dict(steps=40, seeds=1, samples=8, eval_every=0, curve_images=None, test_images=None)

STUDY = Study(
    key="digits",
    title="8x8 digits, fixed budget",
    data="digits",
    models=MODELS,
    recipe={k: v for k, v in get_recipe("flowpp-digits").items() if k != "steps"},
    full=FULL,
    quick=QUICK,
    curve_split="test",
    paper=PAPER,
    max_spread=0.01,
    max_cut=None,  # B 3 -> 1 (-67%): the older, starving design; see fashion_ablation.py
)


def build_model(name: str, backend: str = "auto"):
    """The ablation model ``name`` (a key of :data:`MODELS`)."""
    return _ablation.build_model(STUDY, name, backend)


def extra_channels(name: str) -> int:
    return _ablation.extra_channels(STUDY, name)


def param_counts(names=None) -> dict[str, dict[str, int]]:
    """{name: parameter_counts(model)} for the ablation models (built on the meta device)."""
    return _ablation.param_counts(STUDY, names)


def parse_args(argv=None):
    return _ablation.parse_args(STUDY, argv, __doc__)


def main(argv=None) -> list[dict]:
    return _ablation.main(STUDY, argv, __doc__)


if __name__ == "__main__":
    main()

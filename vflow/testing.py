"""Random MoL coupling problems for tests and benchmarks: well-conditioned and nasty ones.

``random_problem(regime, n, k, ...)`` draws ``n`` independent elements, each with its own K
components, as the plain layout of ``vflow.ops``: ``x`` (n,) and ``params`` (n, 2+3K), in
float64. The regimes cover what a trained network can emit and what breaks root finders:

* ``"well"``: moderate logits, means and log-scales: the common case.
* ``"narrow"``: log-scales near and below the -7 clamp (component scale ~1e-3), means a few
  units apart: a CDF of near-steps with flat stretches in between, where the pdf of the
  mixture underflows to 0 in float64 between components.
* ``"flat"``: means far apart (tens of units) with narrow to moderate scales: long flat
  stretches of F between steep ones; Newton from a flat point jumps across the bracket.
* ``"steep"``: large |a_raw| (tanh saturated, e^{+-1}), peaked logits (one weight near 1,
  others near 0) and wide scales: steep and shallow pieces of very different weight.
* ``"tails"``: x far outside the components (up to ~40 scales), where F or 1 - F is tiny
  and only the log-space formulas keep logit(F) finite.

The point x is drawn near the components (a random component's mean plus a logistic draw of
its scale) except in ``"tails"``, so that every part of the CDF is visited.
"""

from __future__ import annotations

import gc
import weakref

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["REGIMES", "random_problem", "graph_kept_bytes", "peak_live_bytes"]

REGIMES = ("well", "narrow", "flat", "steep", "tails")


def _uniform(gen: torch.Generator, shape, low: float, high: float) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=gen, dtype=torch.float64)


def _normal(gen: torch.Generator, shape, std: float) -> Tensor:
    return std * torch.randn(shape, generator=gen, dtype=torch.float64)


def _components(regime: str, gen: torch.Generator, n: int, k: int):
    """a_raw, b (n,) and logits, means, log_scales (n, K) of one regime."""
    a_raw, b = _normal(gen, n, 1.0), _normal(gen, n, 1.0)
    logits = _normal(gen, (n, k), 1.0)
    if regime == "well" or regime == "tails":
        means, log_scales = _normal(gen, (n, k), 2.0), _uniform(gen, (n, k), -3.0, 1.0)
    elif regime == "narrow":
        means, log_scales = _normal(gen, (n, k), 3.0), _uniform(gen, (n, k), -9.0, -5.0)
    elif regime == "flat":
        means, log_scales = _uniform(gen, (n, k), -40.0, 40.0), _uniform(gen, (n, k), -7.5, 0.0)
    elif regime == "steep":
        a_raw, b = _normal(gen, n, 6.0), _normal(gen, n, 3.0)
        logits = _normal(gen, (n, k), 6.0)
        means, log_scales = _normal(gen, (n, k), 3.0), _uniform(gen, (n, k), -7.0, 3.0)
    else:
        raise ValueError(f"regime must be one of {REGIMES}, got {regime!r}")
    return a_raw, b, logits, means, log_scales


def random_problem(
    regime: str, n: int, k: int, *, seed: int = 0, dtype: torch.dtype = torch.float64
) -> tuple[Tensor, Tensor]:
    """x (n,) and params (n, 2+3K) of ``n`` random elements of one regime, in ``dtype``.

    Drawn in float64 from ``seed`` and then rounded to ``dtype``, so the same seed gives the
    same problem in every dtype (up to that rounding).
    """
    gen = torch.Generator().manual_seed(seed)
    a_raw, b, logits, means, log_scales = _components(regime, gen, n, k)
    pick = torch.randint(0, k, (n, 1), generator=gen)
    mean = means.gather(1, pick)[:, 0]
    scale = log_scales.clamp(min=-7.0).gather(1, pick)[:, 0].exp()
    if regime == "tails":
        # far out on either side: 10 to 40 scales of the widest component past the extremes
        widest = log_scales.clamp(min=-7.0).exp().amax(1)
        side = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
        edge = torch.where(side > 0, means.amax(1), means.amin(1))
        x = edge + side * widest * _uniform(gen, n, 10.0, 40.0)
    else:
        u = _uniform(gen, n, 1e-6, 1 - 1e-6)
        x = mean + 2.0 * scale * torch.logit(u)
    params = torch.cat([a_raw[:, None], b[:, None], logits, means, log_scales], dim=1)
    return x.to(dtype), params.to(dtype)


def graph_kept_bytes(loss_fn) -> int:
    """Bytes the autograd graph of ``loss_fn()`` (a training forward returning a tensor)
    keeps for the backward: the tensors saved for backward plus the inputs of regions run
    under ``vflow.checkpointing.checkpoint`` (which non-reentrant checkpointing holds instead of
    the region's saved tensors), each storage counted once. Deterministic and independent
    of the allocator. Runs one forward and frees its graph (no backward)."""
    from vflow import checkpointing

    storages: dict = {}
    alive: list = []  # held until the end, so no noted storage's address can be reused

    def note(t) -> None:
        if isinstance(t, torch.Tensor):
            st = t.untyped_storage()
            storages[(t.device, st.data_ptr())] = st.nbytes()
            alive.append(t)

    def pack(t):
        note(t)
        return t

    plain_checkpoint = checkpointing.checkpoint

    def noting_checkpoint(fn, *args, **kwargs):
        for a in args:
            note(a)
        return plain_checkpoint(fn, *args, **kwargs)

    checkpointing.checkpoint = noting_checkpoint
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = loss_fn()
    finally:
        checkpointing.checkpoint = plain_checkpoint
    del loss
    alive.clear()
    return sum(storages.values())


class _LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages the dispatched ops create while they are alive."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {t.untyped_storage().data_ptr() for t in existing}
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _release(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if not st.nbytes() or key in self.live or key in self.existing:
                continue  # empty, a view of a counted storage, or a pre-existing tensor's
            self.live[key] = st.nbytes()
            self.now += st.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(st, self._release, key)
        return out


def peak_live_bytes(step_fn, existing=()) -> int:
    """Peak bytes of live tensors while ``step_fn()`` runs (e.g. a training forward and
    backward): every storage an op creates counts from its creation until its release (a
    weakref finalizer), each storage once; the storages of ``existing`` (parameters, buffers,
    inputs) do not count. Seen through a ``TorchDispatchMode``, so it covers the forward, the
    backward and the recomputations of checkpointed regions; deterministic and independent of
    the allocator (scratch memory inside a kernel is not seen)."""
    gc.collect()
    with _LiveBytes(existing) as live:
        step_fn()
    return live.peak

"""Toy 2-D models of section 5 of the VFlow paper: the checkerboard data, Glow and VFlow.

Conventions. Every layer maps a batch ``x`` of shape ``(N, D)`` (plus an optional context
``c`` of shape ``(N, C)``) in the *density direction*, towards the Gaussian:
``forward(x, c) -> (y, logdet)`` with ``logdet = log|det dy/dx|`` of shape ``(N,)``, and
``inverse(y, c) -> (x, logdet)`` with ``logdet = log|det dx/dy|``.

* ``Glow(D, L)``: ``L`` steps of [affine invertible linear map, affine coupling, reversal]
  on ``R^D`` with a standard normal base; ``log p(x) = log N(f(x); 0, I) + log|det df/dx|``.
* ``VFlow(D, L)``: data ``x`` in ``R^2`` augmented with ``z`` in ``R^(D-2)``.
  ``p(x, z)`` is a ``Glow(D, L-1)`` on the concatenation ``[x, z]``; ``q(z|x)`` is a
  conditional Glow with one step, ``CondFlow(D-2, cond_dim=2)``. Training maximises the
  ELBO ``E_q[log p(x, z) - log q(z|x)]`` (Eq. 4), with ``z`` reparameterised; evaluation
  uses importance sampling with ``S`` samples (Eq. 5):
  ``log p(x) ~= logsumexp_s(log p(x, z_s) - log q(z_s|x)) - log S``, ``z_s ~ q(z|x)``.
"""

from __future__ import annotations

import math
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

LOG_2PI = math.log(2 * math.pi)


def sample_checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points, shape ``(n, 2)``, uniform on the 8 "black" cells of a 4x4 board.

    ``x1 ~ U(-2, 2)``, ``x2 ~ U(0, 1) - 2 Bernoulli(1/2) + (floor(x1) mod 2)``, point
    ``2 (x1, x2)``: the density is ``1/32`` on the cells of side 2 of ``[-4, 4]^2`` whose
    indices ``floor(X1 / 2) + floor(X2 / 2)`` are even, and 0 elsewhere, so the best
    attainable average log-likelihood is ``-log 32 = -3.466`` nats.
    """
    x1 = torch.rand(n, generator=generator) * 4 - 2
    b = torch.randint(0, 2, (n,), generator=generator).to(x1.dtype)
    x2 = torch.rand(n, generator=generator) - 2 * b + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=1)


def checkerboard_density(x: Tensor) -> Tensor:
    """The true density of :func:`sample_checkerboard` at ``x`` of shape ``(N, 2)``."""
    cell = torch.floor(x / 2)
    inside = (x.abs() <= 4).all(dim=1)
    black = (cell.sum(dim=1) % 2) == 0
    return (inside & black).to(x.dtype) / 32


def std_normal_logpdf(e: Tensor) -> Tensor:
    """``log N(e; 0, I)`` summed over the last dimension: shape ``(N, D) -> (N,)``."""
    return -0.5 * (e.pow(2) + LOG_2PI).sum(dim=-1)


SCALES = ("tanh3", "sigmoid", "none")
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU}
# How a Glow step mixes its dimensions before the coupling (see :func:`glow_steps`).
MIXINGS = ("linear", "reverse", "identity", "actnorm")
# The model and data factors of issue 30's one-factor-at-a-time screen; the defaults are
# today's models and data (every run before these options): see :func:`factor_dict`.
DEFAULT_FACTORS = {"scale": "tanh3", "activation": "relu", "mixing": "linear", "q_base": False,
                   "q_steps": 1, "train_set": 0}  # fmt: skip
ARCH_KEYS = ("scale", "activation", "mixing", "q_steps")  # what make_model takes besides q_base


def log_scale(s_raw: Tensor, scale: str = "tanh3") -> Tensor:
    """A coupling's log-scale from its network's raw output: ``"tanh3"`` (today's)
    ``3 tanh(s_raw / 3)``, in ``(-3, 3)``; ``"sigmoid"`` (Glow's official code)
    ``log sigmoid(s_raw + 2)``, a scale in ``(0, 1)``, 0.88 at initialisation; ``"none"``
    ``s_raw`` unbounded."""
    if scale == "tanh3":
        return 3.0 * torch.tanh(s_raw / 3.0)
    if scale == "sigmoid":
        return nn.functional.logsigmoid(s_raw + 2.0)
    if scale == "none":
        return s_raw
    raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")


def mlp(
    n_in: int, n_out: int, hidden: int = 50, layers: int = 2, activation: str = "relu"
) -> nn.Sequential:
    """``layers`` hidden layers of ``hidden`` units with ``activation`` (ReLU today);
    last layer zero (identity flow for the ``tanh3`` and ``none`` scales)."""
    mods, width = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), ACTIVATIONS[activation]()]
        width = hidden
    last = nn.Linear(width, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


class InvLinear(nn.Module):
    """``y = x W^T + b`` with a learned ``D x D`` matrix ``W`` (Glow's 1x1 convolution of a
    vector, plus the bias that plays ActNorm's shift); ``logdet = log|det W|`` via slogdet.
    ``W`` starts as a random orthogonal matrix (Glow's code), or as ``I`` with ``identity``
    (no random draw then), ``b`` at 0."""

    def __init__(self, dim: int, identity: bool = False):
        super().__init__()
        w = torch.eye(dim) if identity else torch.linalg.qr(torch.randn(dim, dim))[0]
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, c: Tensor | None = None):
        logdet = torch.linalg.slogdet(self.weight)[1]
        return x @ self.weight.T + self.bias, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor, c: Tensor | None = None):
        logdet = torch.linalg.slogdet(self.weight)[1]
        x = torch.linalg.solve(self.weight, (y - self.bias).T).T
        return x, -logdet.expand(y.shape[0])


class ActNorm(nn.Module):
    """Glow's activation normalisation: ``y = (x + b) exp(log_s)`` per dimension,
    ``logdet = sum(log_s)``. Starts as the identity; :func:`data_init` sets ``b`` and
    ``log_s`` so that ``y`` has zero mean and unit variance per dimension on an init batch
    (Kingma & Dhariwal 2018, section 3.1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """``b = -mean(x)``, ``log_s = -log(std(x) + 1e-6)`` over the batch ``x`` ``(N, D)``."""
        self.bias.copy_(-x.mean(dim=0))
        self.log_scale.copy_(-torch.log(x.std(dim=0) + 1e-6))

    def forward(self, x: Tensor, c: Tensor | None = None):
        return (x + self.bias) * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: Tensor, c: Tensor | None = None):
        x = y * (-self.log_scale).exp() - self.bias
        return x, -self.log_scale.sum().expand(y.shape[0])


class Reverse(nn.Module):
    """The permutation ``x[:, ::-1]``; ``logdet = 0``."""

    def forward(self, x: Tensor, c: Tensor | None = None):
        return x.flip(1), x.new_zeros(x.shape[0])

    inverse = forward


class Coupling(nn.Module):
    """Affine coupling on ``x = [x_a, x_b]``, ``x_a = x[:, :split]`` (default ``D // 2``):
    ``y_a = x_a``, ``y_b = x_b * exp(s) + t`` with ``(s, t) = NN([x_a, c])`` one MLP of 2
    hidden layers of 50 units (``activation``, ReLU today); the log-scale is bounded,
    ``s = 3 tanh(s_raw / 3)`` (``scale``: see :func:`log_scale`).
    ``logdet = sum(s)``. With ``split = 0`` and a context this is an elementwise affine map
    whose shift and log-scale depend on ``c`` only: a conditional Gaussian layer."""

    def __init__(
        self,
        dim: int,
        cond_dim: int = 0,
        split: int | None = None,
        bound: float = 3.0,
        scale: str = "tanh3",
        activation: str = "relu",
    ):
        super().__init__()
        self.split = dim // 2 if split is None else split
        self.bound = bound
        log_scale(torch.zeros(1), scale)  # validates the name
        self.scale = scale
        n_in = self.split + cond_dim
        assert n_in > 0, "the coupling needs inputs: a split > 0 or a context"
        self.net = mlp(n_in, 2 * (dim - self.split), activation=activation)

    def _scale_shift(self, xa: Tensor, c: Tensor | None):
        h = self.net(xa if c is None else torch.cat([xa, c], dim=1))
        s, t = h.chunk(2, dim=1)
        if self.scale != "tanh3":
            return log_scale(s, self.scale), t
        return self.bound * torch.tanh(s / self.bound), t

    def forward(self, x: Tensor, c: Tensor | None = None):
        xa, xb = x[:, : self.split], x[:, self.split :]
        s, t = self._scale_shift(xa, c)
        return torch.cat([xa, xb * s.exp() + t], dim=1), s.sum(dim=1)

    def inverse(self, y: Tensor, c: Tensor | None = None):
        ya, yb = y[:, : self.split], y[:, self.split :]
        s, t = self._scale_shift(ya, c)
        return torch.cat([ya, (yb - t) * (-s).exp()], dim=1), -s.sum(dim=1)


class Flow(nn.Module):
    """A composition of layers, applied in order towards the Gaussian."""

    def __init__(self, layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor, c: Tensor | None = None):
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, c)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor, c: Tensor | None = None):
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y, c)
            logdet = logdet + ld
        return y, logdet


def glow_steps(
    dim: int,
    steps: int,
    cond_dim: int = 0,
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
) -> list[nn.Module]:
    """``steps`` Glow steps on ``R^dim``: [InvLinear, Coupling, Reverse] each (today's,
    ``mixing="linear"``, ``W`` a random rotation at the start); ``"identity"``: the same
    with ``W = I`` at the start; ``"actnorm"``: [ActNorm, InvLinear, Coupling, Reverse],
    Glow's whole step (ActNorm data-initialised by :func:`data_init`); ``"reverse"``:
    [Coupling, Reverse] (a fixed permutation only, RealNVP-style: no learned linear map and
    no bias)."""
    if mixing not in MIXINGS:
        raise ValueError(f"mixing: expected one of {MIXINGS}, got {mixing!r}")
    out = []
    for _ in range(steps):
        if mixing == "actnorm":
            out.append(ActNorm(dim))
        if mixing != "reverse":
            out.append(InvLinear(dim, identity=mixing == "identity"))
        out += [Coupling(dim, cond_dim, scale=scale, activation=activation), Reverse()]
    return out


class Glow(nn.Module):
    """``log p(x) = log N(f(x); 0, I) + log|det df/dx|``, ``f`` = ``steps`` Glow steps on
    ``R^dim``; ``x`` has shape ``(N, dim)``. Used alone for ``D = 2`` and as VFlow's p(x, z)."""

    def __init__(self, dim: int, steps: int, **arch):
        super().__init__()
        self.dim = dim
        self.flow = Flow(glow_steps(dim, steps, **arch))

    def log_prob(self, x: Tensor) -> Tensor:
        e, logdet = self.flow(x)
        return std_normal_logpdf(e) + logdet

    def elbo(self, x: Tensor) -> Tensor:
        """The exact log-likelihood (a Glow has nothing to bound); shape ``(N,)``."""
        return self.log_prob(x)

    def log_likelihood(self, x: Tensor, samples: int = 1) -> Tensor:
        return self.log_prob(x).double()


class CondFlow(nn.Module):
    """``q(z|x)`` on ``z`` in ``R^dim`` given a context ``x`` in ``R^cond_dim``.

    Towards the Gaussian: ``steps`` conditional Glow steps (the coupling nets see ``x``;
    none when ``dim == 1``, where a coupling cannot split) ``u = g(z; x)``, then a standard
    normal base, ``log q(z|x) = log N(u; 0, I) + log|det du/dz|``. That is the paper's
    section 5 literally (one transformation step). With ``gaussian_base`` (always when
    ``dim == 1``: the paper's Gaussian layer ``N(z; mu(x), sigma(x))``) a conditional
    Gaussian base follows the steps, ``eps = (u - mu(x)) exp(-log_sigma(x))``: a
    ``Coupling`` with ``split = 0``, ``mu`` and ``log_sigma`` from one MLP of ``x``.
    """

    def __init__(
        self,
        dim: int,
        cond_dim: int,
        steps: int = 1,
        gaussian_base: bool = False,
        scale: str = "tanh3",
        activation: str = "relu",
        mixing: str = "linear",
    ):
        super().__init__()
        arch = dict(scale=scale, activation=activation)
        layers = glow_steps(dim, steps, cond_dim, mixing=mixing, **arch) if dim >= 2 else []
        if dim == 1 or gaussian_base:
            layers.append(Coupling(dim, cond_dim, split=0, **arch))
        self.flow = Flow(layers)
        self.dim = dim

    def log_prob(self, z: Tensor, x: Tensor) -> Tensor:
        e, logdet = self.flow(z, x)
        return std_normal_logpdf(e) + logdet

    def sample(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised ``z ~ q(z|x)``, shape ``(N, dim)``, and ``log q(z|x)``, ``(N,)``."""
        e = torch.randn(x.shape[0], self.dim, dtype=x.dtype, device=x.device)
        z, logdet_inv = self.flow.inverse(e, x)
        return z, std_normal_logpdf(e) - logdet_inv


class VFlow(nn.Module):
    """VFlow with flow dimensionality ``dim = 2 + D_Z`` and ``steps`` = L total steps:
    ``p(x, z)`` = ``Glow(dim, steps - 1)`` on ``[x, z]``; ``q(z|x)`` =
    ``CondFlow(D_Z, 2, q_steps, q_base)``: one conditional Glow step (the paper;
    ``q_steps`` of them), plus a conditional Gaussian base network if ``q_base``. ``scale``,
    ``activation``, ``mixing``: every coupling's and step's (see :func:`glow_steps`)."""

    def __init__(
        self,
        dim: int,
        steps: int,
        data_dim: int = 2,
        q_base: bool = False,
        scale: str = "tanh3",
        activation: str = "relu",
        mixing: str = "linear",
        q_steps: int = 1,
    ):
        super().__init__()
        assert dim > data_dim and steps >= 2 and q_steps >= 1
        self.dim, self.data_dim = dim, data_dim
        arch = dict(scale=scale, activation=activation, mixing=mixing)
        self.p = Glow(dim, steps - 1, **arch)
        self.q = CondFlow(dim - data_dim, data_dim, steps=q_steps, gaussian_base=q_base, **arch)

    def log_weight(self, x: Tensor) -> Tensor:
        """One-sample ``log p(x, z) - log q(z|x)`` with ``z ~ q(z|x)``: shape ``(N,)``."""
        z, log_q = self.q.sample(x)
        return self.p.log_prob(torch.cat([x, z], dim=1)) - log_q

    def elbo(self, x: Tensor) -> Tensor:
        return self.log_weight(x)

    def log_likelihood(self, x: Tensor, samples: int = 100) -> Tensor:
        """Eq. 5: ``logsumexp_s(w_s) - log S`` over ``S = samples`` draws, in float64; (N,)."""
        n = x.shape[0]
        w = self.log_weight(x.repeat(samples, 1)).view(samples, n).double()
        return torch.logsumexp(w, dim=0) - math.log(samples)


def make_model(
    dim: int,
    steps: int,
    q_base: bool = False,
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
    q_steps: int = 1,
) -> nn.Module:
    """``Glow(2, steps)`` for ``dim == 2``, else ``VFlow(dim, steps, q_base=q_base)``; the
    other arguments are the architecture factors (defaults: today's models), see
    :class:`VFlow` (a Glow ignores ``q_base`` and ``q_steps``)."""
    arch = dict(scale=scale, activation=activation, mixing=mixing)
    if dim == 2:
        return Glow(2, steps, **arch)
    return VFlow(dim, steps, q_base=q_base, q_steps=q_steps, **arch)


DATA_INIT_POINTS = 512  # the init batch of :func:`data_init`


@torch.no_grad()
def data_init(model: nn.Module, seed: int) -> None:
    """Glow's data-dependent initialisation of the ActNorms of ``model``'s p flow (only
    ``mixing="actnorm"`` has them; a no-op otherwise): an init batch of
    :data:`DATA_INIT_POINTS` checkerboard points (for a VFlow with ``z ~ q(z|x)`` of the
    initial q appended) goes through p's layers in order, and each ActNorm is set to
    standardise what reaches it. The batch and ``z``'s noise come from their own generator
    seeded ``20_000 + seed``, so the training streams are untouched. q's ActNorms stay the
    identity: at the start q's output ``z`` is already a standard normal (its couplings
    start as the identity and its linear maps are rotations)."""
    glow = model if isinstance(model, Glow) else model.p
    if not any(isinstance(m, ActNorm) for m in glow.modules()):
        return
    gen = torch.Generator().manual_seed(20_000 + seed)
    dtype = next(model.parameters()).dtype
    h = sample_checkerboard(DATA_INIT_POINTS, gen).to(dtype)
    if isinstance(model, VFlow):
        noise = torch.randn(DATA_INIT_POINTS, model.q.dim, generator=gen).to(dtype)
        h = torch.cat([h, model.q.flow.inverse(noise, h)[0]], dim=1)
    for layer in glow.flow.layers:
        if isinstance(layer, ActNorm):
            layer.initialize(h)
        h = layer(h)[0]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def log_likelihood(model: nn.Module, x: Tensor, samples: int = 100, chunk: int = 500) -> Tensor:
    """Per-point (importance-sampled for VFlow) log-likelihood, float64, shape ``(N,)``."""
    return torch.cat([model.log_likelihood(xc, samples) for xc in x.split(chunk)])


def fixed_test_set(n: int = 1000, seed: int = 1234) -> Tensor:
    """The fixed test set: ``n`` checkerboard points from a generator seeded ``seed``."""
    return sample_checkerboard(n, torch.Generator().manual_seed(seed))


def density_grid(model: nn.Module, n: int = 128, samples: int = 100, lim: float = 4.0):
    """``exp(log p)`` at the ``n x n`` pixel centres of ``[-lim, lim]^2``, shape ``(n, n)``,
    rows indexed by ``x2`` (bottom to top when drawn with ``origin='lower'``)."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2 * lim - lim
    x2, x1 = torch.meshgrid(c, c, indexing="ij")
    pts = torch.stack([x1.reshape(-1), x2.reshape(-1)], dim=1)
    return log_likelihood(model, pts, samples, chunk=256).exp().view(n, n)


SCHEDULES = ("constant", "cosine", "exp")
# Today's (and the 100k grid's) recipe: Adam 1e-3, constant, gradient norm clipped at 100.
DEFAULT_RECIPE = {"lr": 1e-3, "schedule": "constant", "final_lr_frac": 0.01, "grad_clip": 100.0}


def make_lr_scheduler(
    opt: torch.optim.Optimizer, schedule: str, iters: int, final_frac: float = 0.01
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule of a toy run, as a ``torch.optim.lr_scheduler`` on ``opt``,
    stepped once per iteration: ``"constant"`` (the base lr throughout: today's recipe),
    ``"cosine"`` (``CosineAnnealingLR`` from the base lr at iteration 0 to ``final_frac`` of it
    at the last iteration, ``iters - 1``) or ``"exp"`` (``ExponentialLR``, the same end
    points, a constant factor per iteration)."""
    sched = torch.optim.lr_scheduler
    last = max(iters - 1, 1)
    if schedule == "constant":
        return sched.LambdaLR(opt, lambda _: 1.0)
    if schedule == "cosine":
        base = opt.param_groups[0]["lr"]
        return sched.CosineAnnealingLR(opt, T_max=last, eta_min=final_frac * base)
    if schedule == "exp":
        return sched.ExponentialLR(opt, gamma=final_frac ** (1 / last))
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


def lr_values(lr: float, schedule: str, iters: int, final_frac: float = 0.01) -> list[float]:
    """The learning rate of each of ``iters`` iterations under :func:`make_lr_scheduler`
    (tabulated on a throw-away optimiser): the one place both trainers take it from."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = make_lr_scheduler(opt, schedule, iters, final_frac)
    out = []
    for _ in range(iters):
        out.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradient: a no-op, keeps the scheduler's call-order check quiet
        scheduler.step()
    return out


def recipe_dict(lr: float, schedule: str, final_lr_frac: float, grad_clip: float) -> dict:
    """The training-recipe columns of a run's row (``final_lr_frac`` only matters, and is
    recorded as given, for a decaying schedule)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    return {"lr": lr, "schedule": schedule, "final_lr_frac": final_lr_frac,
            "grad_clip": grad_clip}  # fmt: skip


def factor_dict(
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
    q_base: bool = False,
    q_steps: int = 1,
    train_set: int = 0,
) -> dict:
    """The model and data factor columns of a run's row (issue 30's one-factor screen),
    validated; the defaults (:data:`DEFAULT_FACTORS`) are today's models and data.

    ``scale``: the couplings' log-scale (:func:`log_scale`); ``activation``: their MLPs'
    hidden activation (relu, tanh, elu); ``mixing``: ``"linear"`` (a learned invertible
    linear map + bias before each coupling, a random rotation at the start), ``"identity"``
    (the same from ``W = I``), ``"actnorm"`` (Glow's data-initialised ActNorm before it) or
    ``"reverse"`` (the fixed reversal only);
    ``q_base``, ``q_steps``: q's conditional Gaussian base and number of conditional steps;
    ``train_set``: 0 for fresh samples every batch, else a fixed training set of that many
    points drawn once (see :func:`train_single`)."""
    log_scale(torch.zeros(1), scale)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if mixing not in MIXINGS:
        raise ValueError(f"mixing: expected one of {MIXINGS}, got {mixing!r}")
    if q_steps < 1 or train_set < 0:
        raise ValueError(f"q_steps >= 1 and train_set >= 0 expected, got {q_steps}, {train_set}")
    return {"scale": scale, "activation": activation, "mixing": mixing, "q_base": bool(q_base),
            "q_steps": int(q_steps), "train_set": int(train_set)}  # fmt: skip


def draw_train_set(gen: torch.Generator, train_set: int) -> Tensor | None:
    """The fixed training set of a run, ``sample_checkerboard(train_set, gen)`` drawn from
    its data generator before any batch (None for ``train_set == 0``: fresh samples)."""
    return sample_checkerboard(train_set, gen) if train_set else None


def train_single(
    dim: int,
    steps: int,
    seed: int,
    iters: int,
    lr: float = 1e-3,
    batch: int = 64,
    q_base: bool = False,
    dtype: torch.dtype = torch.float32,
    schedule: str = "constant",
    final_lr_frac: float = 0.01,
    grad_clip: float = 100.0,
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
    q_steps: int = 1,
    train_set: int = 0,
) -> tuple[nn.Module, Tensor, int]:
    """The one-model loop (the reference for :func:`train_ensemble`).

    Seeds the global RNG with ``seed`` and builds ``make_model(dim, steps, q_base)`` (so the
    initialisation and VFlow's ``z`` draws come from the global stream), draws batch ``t``
    with ``sample_checkerboard(batch, gen)`` from ``gen`` seeded ``10_000 + seed``, and takes
    ``iters`` Adam steps (``lr``, default betas) on ``-mean(ELBO)`` (the exact negative
    log-likelihood for a Glow) with the gradient norm clipped at ``grad_clip`` (100; ``inf``:
    no clipping); a step whose loss is not finite is skipped. The learning rate of iteration
    ``t`` is ``lr_values(lr, schedule, iters, final_lr_frac)[t]`` (default: constant).
    ``dtype`` (float64 for tests) casts the model after its initialisation and each batch
    after it is drawn. ``scale``, ``activation``, ``mixing``, ``q_steps``: the model
    (:func:`make_model`; then :func:`data_init`, after the cast). ``train_set`` > 0: a
    fixed training set of that many points is drawn first from ``gen``
    (:func:`draw_train_set`), and batch ``t`` is its points at
    ``randint(0, train_set, (batch,), generator=gen)`` (uniform, with replacement) instead
    of fresh samples. Returns the trained model (in train
    mode), the per-iteration losses, shape ``(iters,)``, and the number of skipped steps.
    """
    factor_dict(scale, activation, mixing, q_base, q_steps, train_set)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = make_model(dim, steps, q_base, scale, activation, mixing, q_steps).to(dtype)
    data_init(model, seed)
    data = draw_train_set(gen, train_set)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    lrs = lr_values(lr, schedule, iters, final_lr_frac)
    losses = torch.empty(iters, dtype=dtype)
    skipped = 0
    for it in range(iters):
        opt.param_groups[0]["lr"] = lrs[it]
        if data is None:
            x = sample_checkerboard(batch, gen)
        else:
            x = data[torch.randint(0, train_set, (batch,), generator=gen)]
        loss = -model.elbo(x.to(dtype)).mean()
        losses[it] = loss.detach()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
    return model, losses, skipped


def train_and_evaluate(
    dim: int,
    steps: int,
    seed: int,
    iters: int,
    lr: float = 1e-3,
    batch: int = 64,
    samples: int = 100,
    density: bool = False,
    density_px: int = 128,
    threads: int | None = 1,
    q_base: bool = False,
    schedule: str = "constant",
    final_lr_frac: float = 0.01,
    grad_clip: float = 100.0,
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
    q_steps: int = 1,
    train_set: int = 0,
) -> dict:
    """One run with the one-model loop: :func:`train_single`, then the ``samples``-sample
    log-likelihood on :func:`fixed_test_set` (continuing the global random stream). Returns
    a dict of plain values (and a ``density`` grid if asked), with the recipe and the
    factors (:func:`factor_dict`)."""
    if threads is not None:
        torch.set_num_threads(threads)
    t0, c0 = time.perf_counter(), time.process_time()
    recipe = recipe_dict(lr, schedule, final_lr_frac, grad_clip)
    factors = factor_dict(scale, activation, mixing, q_base, q_steps, train_set)
    model, _, skipped = train_single(
        dim, steps, seed, iters, lr, batch, q_base,
        schedule=schedule, final_lr_frac=final_lr_frac, grad_clip=grad_clip,
        scale=scale, activation=activation, mixing=mixing, q_steps=q_steps, train_set=train_set,
    )  # fmt: skip
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    ll = log_likelihood(model, fixed_test_set(), samples)
    out = {
        "dims": dim,
        "steps": steps,
        "seed": seed,
        "iters": iters,
        "params": n_params(model),
        "test_ll": float(ll.mean()),
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "skipped": skipped,
        **recipe,
        **factors,
    }
    if density:
        out["density"] = density_grid(model, density_px, samples).numpy()
    return out


# --------------------------------------------------------------------------------------------
# Ensembles: many toy models trained in one set of tensor ops.
#
# A member is a (steps, seed) pair of one flow dimensionality ``dim``: the model
# ``make_model(dim, steps, q_base)`` that ``train_single(dim, steps, seed, ...)`` would train.
# Every weight carries a leading ensemble dimension and every matrix product is a batched one
# (``bmm``/``baddbmm``), so one iteration costs one set of ops for the whole ensemble. Members of
# different depths share the ops step by step: members are sorted by depth (descending), step
# ``k`` of p runs on the first ``n_k`` members only (those with more than ``k`` steps), and a
# member leaves the batch when its steps are done.

HIDDEN = 50


def checkerboard_batches(gen: torch.Generator, iters: int, batch: int) -> Tensor:
    """``iters`` batches at once, shape ``(iters, batch, 2)``, bit-identical to
    ``torch.stack([sample_checkerboard(batch, gen) for _ in range(iters)])``, and leaving
    ``gen`` in the same state.

    ``sample_checkerboard`` draws ``rand(batch)``, ``randint(0, 2, (batch,))``, ``rand(batch)``;
    on the CPU each value takes one 32-bit word ``r`` of the generator, in order (``rand``
    keeps ``(r mod 2^24) / 2^24``, ``randint(0, 2)`` keeps ``r mod 2``), so a single
    ``randint(0, 2^24, (iters, 3, batch))`` holds every word the loop would use. The test
    suite checks the identity (it rests on how ATen's CPU sampler consumes its generator).
    """
    r = torch.randint(0, 2**24, (iters, 3, batch), generator=gen)
    u1 = r[:, 0].float() * 2.0**-24
    b = (r[:, 1] & 1).float()
    u2 = r[:, 2].float() * 2.0**-24
    x1 = u1 * 4 - 2
    x2 = u2 - 2 * b + torch.floor(x1) % 2
    return 2 * torch.stack([x1, x2], dim=-1)


def normal_batches(
    gen: torch.Generator, iters: int, batch: int, dim: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``iters`` draws of ``randn(batch, dim)`` from ``gen``, shape ``(iters, batch, dim)``.

    One ``randn`` call when ``batch * dim`` is a multiple of 16: ATen's CPU normal sampler
    fills 16 values at a time from consecutive uniforms, so the draws then equal ``iters``
    separate calls bit for bit (checked by the tests); separate calls otherwise."""
    if (batch * dim) % 16 == 0:
        return torch.randn(iters, batch, dim, generator=gen, dtype=dtype)
    return torch.stack([torch.randn(batch, dim, generator=gen, dtype=dtype) for _ in range(iters)])


def step_fields(
    dim: int, cond: int, split: int, inv: bool, actnorm: bool = False
) -> list[tuple[str, tuple]]:
    """Stacked fields of one layer on ``R^dim`` with a context of ``cond`` dims: if
    ``actnorm``, the ``ActNorm`` (``an_b``, ``an_logs``); if ``inv``, the
    ``InvLinear`` (``inv_w`` as ``W``, ``inv_b``); then the coupling MLP of
    :class:`Coupling` with ``split`` (0: a conditional Gaussian layer), weights stored
    transposed, ``(in, out)``, biases ``(1, out)``, so that a layer is ``baddbmm(b, h, w)``."""
    out = 2 * (dim - split)
    fields = [("an_b", (1, dim)), ("an_logs", (1, dim))] if actnorm else []
    fields += [("inv_w", (dim, dim)), ("inv_b", (1, dim))] if inv else []
    return fields + [
        ("w1", (split + cond, HIDDEN)),
        ("b1", (1, HIDDEN)),
        ("w2", (HIDDEN, HIDDEN)),
        ("b2", (1, HIDDEN)),
        ("w3", (HIDDEN, out)),
        ("b3", (1, out)),
    ]


def single_fields(
    inv: InvLinear | None, coupling: Coupling, actnorm: ActNorm | None = None
) -> dict[str, Tensor]:
    """The parameters of one single-model layer as views in the stacked layout of
    :func:`step_fields` (``w = weight.T``, ``b = bias[None]``): copying into or out of these
    views moves weights between a single model and an ensemble member."""
    lin = [m for m in coupling.net if isinstance(m, nn.Linear)]
    out = {"inv_w": inv.weight, "inv_b": inv.bias.view(1, -1)} if inv is not None else {}
    if actnorm is not None:
        out["an_b"], out["an_logs"] = actnorm.bias.view(1, -1), actnorm.log_scale.view(1, -1)
    for i, m in enumerate(lin, start=1):
        out[f"w{i}"], out[f"b{i}"] = m.weight.T, m.bias.view(1, -1)
    return out


class ParamBlock:
    """The stacked parameters of many members in one flat buffer, with their Adam state.

    ``data`` (shape ``(R, P)``) has one row per (slot, member): slot ``k`` owns rows
    ``start_k .. start_k + n_k - 1`` for members ``0 .. n_k - 1``, and a row holds every
    field of that slot's layers (``layers``: ``[(layer name, step_fields(...))]``), end to end.
    ``slots[k][layer][field]`` is a leaf tensor of shape ``(n_k, *shape)``, a view of ``data``,
    whose ``.grad`` is the same view of ``grad``: backward accumulates straight into the flat
    gradient, and clipping and Adam are a few whole-buffer ops. ``whole[layer][field]``, for
    the fields named in ``whole``, is one more such leaf over all ``R`` rows (aliasing the
    slots' leaves, so both paths accumulate into the same gradient): the ``log|det W|`` of
    every slot's ``InvLinear`` is then one batched ``slogdet``. ``row_member`` (``(R,)``)
    names the member of each row.
    """

    def __init__(
        self,
        layers: list[tuple[str, list]],
        slot_sizes: list[int],
        dtype=torch.float32,
        whole: tuple[str, ...] = (),
    ):
        self.offsets, width = {}, 0
        for layer, fields in layers:
            for name, shape in fields:
                self.offsets[(layer, name)] = (width, shape)
                width += math.prod(shape)
        rows = sum(slot_sizes)
        self.data = torch.zeros(rows, width, dtype=dtype)
        self.grad = torch.zeros_like(self.data)
        self.exp_avg = torch.zeros_like(self.data)
        self.exp_avg_sq = torch.zeros_like(self.data)
        self.row_member = torch.cat([torch.arange(n) for n in slot_sizes])
        self.starts = [sum(slot_sizes[:k]) for k in range(len(slot_sizes))]
        self.slots = [self._views(s, n) for s, n in zip(self.starts, slot_sizes, strict=True)]
        self.whole = self._views(0, rows, whole)

    def _views(self, start: int, n: int, only=None) -> dict[str, dict[str, Tensor]]:
        views: dict[str, dict[str, Tensor]] = {}
        for (layer, name), (col, shape) in self.offsets.items():
            if only is not None and name not in only:
                continue
            cols = slice(col, col + math.prod(shape))
            leaf = self.data[start : start + n, cols].view(n, *shape).detach().requires_grad_()
            leaf.grad = self.grad[start : start + n, cols].view(n, *shape)
            views.setdefault(layer, {})[name] = leaf
        return views


STACKED_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "elu": nn.functional.elu}


def stacked_mlp(w: dict[str, Tensor], h: Tensor, activation: str = "relu") -> Tensor:
    """The coupling MLP for ``n`` members at once: ``h`` ``(n, B, in)`` -> ``(n, B, out)``,
    ``relu(h W1 + b1)``, ``relu(. W2 + b2)``, ``. W3 + b3`` with ``W_i`` of shape
    ``(n, in_i, out_i)`` (``activation`` in place of relu if given)."""
    act = STACKED_ACTIVATIONS[activation]
    h = act(torch.baddbmm(w["b1"], h, w["w1"]))
    h = act(torch.baddbmm(w["b2"], h, w["w2"]))
    return torch.baddbmm(w["b3"], h, w["w3"])


def stacked_coupling(
    w: dict[str, Tensor],
    x: Tensor,
    c: Tensor | None,
    split: int,
    inverse: bool = False,
    scale: str = "tanh3",
    activation: str = "relu",
) -> tuple[Tensor, Tensor]:
    """:class:`Coupling` for ``n`` members: ``x`` ``(n, B, D)``, context ``c`` ``(n, B, C)``.
    Forward ``y_b = x_b exp(s) + t``, logdet ``sum(s)``; inverse ``(y_b - t) exp(-s)``,
    ``-sum(s)``; ``s = 3 tanh(s_raw / 3)`` (``scale``: :func:`log_scale`). Returns
    ``(y, logdet)``, ``(n, B, D)``, ``(n, B)``."""
    xa, xb = x[..., :split], x[..., split:]
    h = xa if c is None else torch.cat([xa, c], dim=-1)
    s, t = stacked_mlp(w, h, activation).chunk(2, dim=-1)
    s = log_scale(s, scale)
    if inverse:
        return torch.cat([xa, (xb - t) * (-s).exp()], dim=-1), -s.sum(dim=-1)
    return torch.cat([xa, xb * s.exp() + t], dim=-1), s.sum(dim=-1)


def stacked_glow_step(
    w: dict[str, Tensor],
    x: Tensor,
    logdet: Tensor,
    c: Tensor | None = None,
    ld: Tensor | None = None,
    scale: str = "tanh3",
    activation: str = "relu",
) -> tuple[Tensor, Tensor]:
    """One Glow step [InvLinear, Coupling, Reverse] for ``n`` members towards the Gaussian:
    ``x`` ``(n, B, D)`` -> ``x W^T + b`` (logdet ``log|det W|``, ``(n,)``, from ``ld`` if
    given), the coupling, ``flip``; returns the new ``x`` and ``logdet`` ``(n, B)`` plus this
    step's log-determinant. Without an ``inv_w`` field in ``w`` (``mixing="reverse"``) the
    step is [Coupling, Reverse]; with ``an_logs`` (``mixing="actnorm"``) it starts with the
    ActNorm ``(x + b) exp(log_s)`` (logdet ``sum(log_s)``)."""
    if "an_logs" in w:
        x = (x + w["an_b"]) * w["an_logs"].exp()
        logdet = logdet + w["an_logs"].sum(dim=-1)
    if "inv_w" in w:
        if ld is None:
            ld = torch.linalg.slogdet(w["inv_w"])[1]
        x = torch.baddbmm(w["inv_b"], x, w["inv_w"].transpose(1, 2))
        logdet = logdet + ld[:, None]
    x, ld = stacked_coupling(w, x, c, x.shape[-1] // 2, scale=scale, activation=activation)
    return x.flip(-1), logdet + ld


def stacked_glow_step_inverse(
    w: dict[str, Tensor],
    y: Tensor,
    logdet: Tensor,
    c: Tensor | None = None,
    scale: str = "tanh3",
    activation: str = "relu",
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`stacked_glow_step` (towards the data); adds
    ``log|det dx/dy|`` to ``logdet`` ``(n, B)``."""
    y, ld = stacked_coupling(w, y.flip(-1), c, y.shape[-1] // 2, True, scale, activation)
    logdet = logdet + ld
    if "inv_w" in w:
        ld = torch.linalg.slogdet(w["inv_w"])[1]
        y = torch.linalg.solve(w["inv_w"], (y - w["inv_b"]).transpose(1, 2)).transpose(1, 2)
        logdet = logdet - ld[:, None]
    if "an_logs" in w:
        y = y * (-w["an_logs"]).exp() - w["an_b"]
        logdet = logdet - w["an_logs"].sum(dim=-1)
    return y, logdet


def p_depth(dim: int, steps: int) -> int:
    """Steps of the p flow: ``L`` for a Glow (``dim == 2``), ``L - 1`` for a VFlow."""
    return steps if dim == 2 else steps - 1


class ToyEnsemble:
    """``E`` toy models of one flow dimensionality ``dim``, trained as one.

    ``members``: ``(steps, seed)`` pairs, stored sorted by p's depth, deepest first
    (``self.members``; all per-member tensors follow this order). Member ``e`` starts from the
    weights ``make_model(dim, steps, q_base)`` gets after ``torch.manual_seed(seed)``, draws
    its data from its own generator seeded ``10_000 + seed`` and VFlow's ``z`` noise from its
    own copy of the global stream after that initialisation: the draws of
    :func:`train_single`, so member ``e`` follows the single-model trajectory up to float32
    rounding. Parameters live in :class:`ParamBlock`\\ s: ``p`` (one slot per p step, with
    ``n_k`` members in slot ``k``) and, for a VFlow, ``q`` (one slot, all members: q's step,
    and its Gaussian base with ``q_base`` or ``D_Z = 1``; with ``q_steps`` > 1 the steps
    ``step``, ``step1``, ...). ``dtype``: as in :func:`train_single`. ``scale``,
    ``activation``, ``mixing``, ``q_steps``, ``train_set``: the factors of
    :func:`factor_dict`, as in :func:`train_single` (with ``train_set`` each member draws
    its fixed training set from its data generator here, before any batch).
    """

    def __init__(
        self,
        dim: int,
        members: list[tuple[int, int]],
        q_base: bool = False,
        dtype: torch.dtype = torch.float32,
        scale: str = "tanh3",
        activation: str = "relu",
        mixing: str = "linear",
        q_steps: int = 1,
        train_set: int = 0,
    ):
        self.dim, self.q_base, self.dtype = dim, q_base, dtype
        factor_dict(scale, activation, mixing, q_base, q_steps, train_set)
        self.arch = {"scale": scale, "activation": activation, "mixing": mixing,
                     "q_steps": q_steps}  # fmt: skip
        self.train_set = train_set
        self._act = {"scale": scale, "activation": activation}  # for the stacked layers
        inv, actnorm = mixing != "reverse", mixing == "actnorm"
        self.members = sorted(members, key=lambda m: -p_depth(dim, m[0]))
        depths = [p_depth(dim, steps) for steps, _ in self.members]
        assert min(depths) >= 1, "every member needs at least one p step"
        self.slot_sizes = [sum(d > k for d in depths) for k in range(max(depths))]
        self.p = ParamBlock(
            [("step", step_fields(dim, 0, dim // 2, inv, actnorm))],
            self.slot_sizes,
            dtype,
            ("inv_w",),
        )
        self.dz = dim - 2
        self.q_layers = []
        if self.dz >= 1:
            if self.dz >= 2:
                for k in range(q_steps):
                    name = "step" if k == 0 else f"step{k}"
                    fields = step_fields(self.dz, 2, self.dz // 2, inv, actnorm)
                    self.q_layers.append((name, fields))
            if self.dz == 1 or q_base:
                self.q_layers.append(("base", step_fields(self.dz, 2, 0, False)))
            self.q = ParamBlock(self.q_layers, [len(self.members)], dtype)
        self.blocks = [self.p] + ([self.q] if self.dz else [])
        self.adam_steps = torch.zeros(len(self.members), dtype=torch.float64)
        self.data_gens, self.noise_gens, self.train_sets = [], [], []
        for e, (steps, seed) in enumerate(self.members):
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                model = make_model(dim, steps, q_base, **self.arch).to(dtype)
                data_init(model, seed)
                self.noise_gens.append(torch.Generator())
                self.noise_gens[-1].set_state(torch.get_rng_state())
            self.data_gens.append(torch.Generator().manual_seed(10_000 + seed))
            self.train_sets.append(draw_train_set(self.data_gens[-1], train_set))
            self._copy(model, e, into_ensemble=True)

    def __len__(self) -> int:
        return len(self.members)

    def _layer_pairs(self, model: nn.Module, e: int):
        """(ensemble views, single-model views) of member ``e``'s layers, one pair per layer."""
        glow = model if self.dim == 2 else model.p
        per = {"reverse": 2, "actnorm": 4}.get(self.arch["mixing"], 3)  # layers per step

        def step_pair(layers, k):
            step = {type(m): m for m in layers[per * k : per * (k + 1)]}
            return single_fields(step.get(InvLinear), step[Coupling], step.get(ActNorm))

        steps = glow.flow.layers
        for k in range(len(steps) // per):
            yield self.p.slots[k]["step"], step_pair(steps, k)
        if self.dz:
            qs = list(model.q.flow.layers)
            names = [name for name, _ in self.q_layers]
            for k, name in enumerate(n for n in names if n.startswith("step")):
                yield self.q.slots[0][name], step_pair(qs, k)
            if "base" in names:
                yield self.q.slots[0]["base"], single_fields(None, qs[-1])

    @torch.no_grad()
    def _copy(self, model: nn.Module, e: int, into_ensemble: bool) -> None:
        for stacked, single in self._layer_pairs(model, e):
            for name, t in single.items():
                if into_ensemble:
                    stacked[name][e].copy_(t)
                else:
                    t.copy_(stacked[name][e])

    def member_model(self, e: int) -> nn.Module:
        """Member ``e`` as a single model (a copy of its current weights), in eval mode."""
        steps, _ = self.members[e]
        with torch.random.fork_rng():
            model = make_model(self.dim, steps, self.q_base, **self.arch).to(self.dtype)
        self._copy(model, e, into_ensemble=False)
        return model.eval()

    def log_prob_p(self, x: Tensor) -> Tensor:
        """``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` of every member's p flow:
        ``x`` ``(E, B, dim)`` -> ``(E, B)``. Step ``k`` runs on the first ``n_k`` members; the
        others have finished (sorted by depth) and are set aside."""
        done = []
        logdet = x.new_zeros(x.shape[:2])
        inv = "step" in self.p.whole  # an InvLinear in each step (every mixing but "reverse")
        if inv:
            ld_w = torch.linalg.slogdet(self.p.whole["step"]["inv_w"])[1]  # every slot at once
        for k, n in enumerate(self.slot_sizes):
            if n < x.shape[0]:
                done.append(std_normal_logpdf(x[n:]) + logdet[n:])
                x, logdet = x[:n], logdet[:n]
            ld = ld_w[self.p.starts[k] : self.p.starts[k] + n] if inv else None
            x, logdet = stacked_glow_step(self.p.slots[k]["step"], x, logdet, ld=ld, **self._act)
        done.append(std_normal_logpdf(x) + logdet)
        return torch.cat(done[::-1], dim=0)

    def sample_q(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor]:
        """Reparameterised ``z = g^{-1}(eps; x)`` with ``eps = noise`` ``(E, B, D_Z)``, given
        ``x`` ``(E, B, 2)``; returns ``z`` and ``log q(z|x) = log N(eps) - log|det dz/deps|``."""
        w = self.q.slots[0]
        z, logdet = noise, noise.new_zeros(noise.shape[:2])
        if "base" in w:
            z, ld = stacked_coupling(w["base"], z, x, 0, inverse=True, **self._act)
            logdet = logdet + ld
        for name, _ in reversed(self.q_layers):  # q's steps, last first
            if name.startswith("step"):
                z, logdet = stacked_glow_step_inverse(w[name], z, logdet, x, **self._act)
        return z, std_normal_logpdf(noise) - logdet

    def log_weight(self, x: Tensor, noise: Tensor | None) -> Tensor:
        """``log p(x, z) - log q(z|x)`` with ``z`` from ``noise`` (VFlow; Eq. 4's integrand) or
        ``log p(x)`` (Glow, ``noise`` unused): ``x`` ``(E, B, 2)`` -> ``(E, B)``."""
        if not self.dz:
            return self.log_prob_p(x)
        z, log_q = self.sample_q(x, noise)
        return self.log_prob_p(torch.cat([x, z], dim=-1)) - log_q

    def draw(self, iters: int, batch: int) -> tuple[Tensor, Tensor | None]:
        """The next ``iters`` training batches of every member, ``(iters, E, batch, 2)``, and
        their ``z`` noise, ``(iters, E, batch, D_Z)`` (None for a Glow), from the members'
        own generators (with ``train_set``: points of each member's fixed training set at
        ``randint(0, train_set, (iters, batch))``, the draws of :func:`train_single`)."""
        if self.train_set:
            n = self.train_set
            xs = [data[torch.randint(0, n, (iters, batch), generator=g)]
                  for g, data in zip(self.data_gens, self.train_sets, strict=True)]  # fmt: skip
        else:
            xs = [checkerboard_batches(g, iters, batch) for g in self.data_gens]
        x = torch.stack(xs, dim=1).to(self.dtype)
        if not self.dz:
            return x, None
        noise = [normal_batches(g, iters, batch, self.dz, self.dtype) for g in self.noise_gens]
        return x, torch.stack(noise, dim=1)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float = 100.0) -> Tensor:
        """Per member, ``torch.nn.utils.clip_grad_norm_``: scale member ``e``'s gradient by
        ``min(1, max_norm / (||g_e|| + 1e-6))``, ``||g_e||`` the 2-norm over all its
        parameters (from per-row norms). Returns the norms, ``(E,)``."""
        sq = torch.zeros(len(self), dtype=self.dtype)
        for blk in self.blocks:
            sq.index_add_(0, blk.row_member, torch.linalg.vector_norm(blk.grad, dim=1).square())
        norm = sq.sqrt()
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for blk in self.blocks:
            blk.grad.mul_(coef[blk.row_member, None])
        return norm

    @torch.no_grad()
    def adam_step_(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        """``torch.optim.Adam`` (defaults, no weight decay) on every member at once, each
        with its own step count ``t_e``: ``m <- b1 m + (1 - b1) g``,
        ``v <- b2 v + (1 - b2) g^2``, ``theta <- theta - lr / (1 - b1^t) m /
        (sqrt(v / (1 - b2^t)) + eps)``.

        While every ``t_e`` is the same (no member has skipped a step) this is ATen's fused
        CPU Adam kernel, one pass over each flat buffer; otherwise the same update with the
        bias corrections gathered per row, in plain tensor ops."""
        b1, b2 = betas
        self.adam_steps += 1
        if bool((self.adam_steps == self.adam_steps[0]).all()):
            step = self.adam_steps[0].float()  # the kernel reads t, it does not count
            for blk in self.blocks:
                torch._fused_adam_(
                    [blk.data], [blk.grad], [blk.exp_avg], [blk.exp_avg_sq], [], [step],
                    lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=eps,
                    amsgrad=False, maximize=False,
                )  # fmt: skip
            return
        step_size = (lr / (1 - b1**self.adam_steps)).to(self.dtype)
        bc2_sqrt = (1 - b2**self.adam_steps).sqrt().to(self.dtype)
        for blk in self.blocks:
            rows = blk.row_member
            blk.exp_avg.lerp_(blk.grad, 1 - b1)
            blk.exp_avg_sq.mul_(b2).addcmul_(blk.grad, blk.grad, value=1 - b2)
            denom = (blk.exp_avg_sq.sqrt() / bc2_sqrt[rows, None]).add_(eps)
            blk.data.addcdiv_(blk.exp_avg * step_size[rows, None], denom, value=-1.0)

    def _snapshot(self, members: Tensor) -> list:
        """Copies of the rows (weights and Adam state) of ``members`` (a bool mask ``(E,)``)."""
        out = []
        for blk in self.blocks:
            rows = members[blk.row_member]
            out.append((rows, [t[rows].clone() for t in (blk.data, blk.exp_avg, blk.exp_avg_sq)]))
        return out

    @torch.no_grad()
    def _restore(self, snapshot: list, members: Tensor) -> None:
        for blk, (rows, saved) in zip(self.blocks, snapshot, strict=True):
            for t, s in zip((blk.data, blk.exp_avg, blk.exp_avg_sq), saved, strict=True):
                t[rows] = s
        self.adam_steps[members] -= 1

    def train_step(
        self, x: Tensor, noise: Tensor | None, lr: float, grad_clip: float = 100.0
    ) -> Tensor:
        """One Adam step of every member on its batch ``x[e]`` (``(E, B, 2)``): loss
        ``-mean_b ELBO``, backward, per-member clipping at ``grad_clip`` and Adam; a member
        whose loss is not finite keeps its weights and Adam state (``train_single`` skips the
        step).
        Returns the losses, ``(E,)``."""
        losses = -self.log_weight(x, noise).mean(dim=1)
        for blk in self.blocks:
            blk.grad.zero_()
        with warnings.catch_warnings():  # our grads are strided views of the flat buffer, so
            warnings.filterwarnings("ignore", "grad and param do not obey")  # by design
            losses.sum().backward()
        self.clip_grad_norm_(grad_clip)
        bad = ~torch.isfinite(losses)
        if bad.any():
            saved = self._snapshot(bad)
            self.adam_step_(lr)
            self._restore(saved, bad)
        else:
            self.adam_step_(lr)
        return losses.detach()

    def state_dict(self) -> dict:
        """Everything a later :meth:`load_state_dict` needs to continue training bit for bit:
        the members, the flat weights and Adam moments of every block, the Adam step counts
        and the states of every member's data and noise generators."""
        return {
            "dim": self.dim,
            "members": list(self.members),
            "q_base": self.q_base,
            "dtype": str(self.dtype),
            "factors": {**self.arch, "train_set": self.train_set},
            "blocks": [
                {k: getattr(b, k).clone() for k in ("data", "exp_avg", "exp_avg_sq")}
                for b in self.blocks
            ],
            "adam_steps": self.adam_steps.clone(),
            "data_gens": [g.get_state() for g in self.data_gens],
            "noise_gens": [g.get_state() for g in self.noise_gens],
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; raises ``ValueError`` when ``state`` belongs to an
        ensemble of another dimensionality, member list, q base or dtype."""
        factors = {**self.arch, "train_set": self.train_set}
        saved_factors = {k: state.get("factors", {}).get(k, DEFAULT_FACTORS[k]) for k in factors}
        mine = (self.dim, list(self.members), self.q_base, str(self.dtype), factors)
        theirs = (state["dim"], [tuple(m) for m in state["members"]], state["q_base"],
                  state["dtype"], saved_factors)  # fmt: skip
        if mine != theirs:
            raise ValueError(f"state: saved for (dim, members, q_base, dtype, factors) "
                             f"{theirs}, this ensemble is {mine}")  # fmt: skip
        for blk, saved in zip(self.blocks, state["blocks"], strict=True):
            for k, t in saved.items():
                getattr(blk, k).copy_(t)
        self.adam_steps.copy_(state["adam_steps"])
        for g, st in zip(self.data_gens + self.noise_gens,
                         state["data_gens"] + state["noise_gens"], strict=True):  # fmt: skip
            g.set_state(st)

    def train(
        self,
        iters: int,
        lr: float = 1e-3,
        batch: int = 64,
        chunk: int = 250,
        lrs=None,
        grad_clip: float = 100.0,
    ) -> Tensor:
        """``iters`` steps of :meth:`train_step`, drawing the batches ``chunk`` iterations at a
        time; iteration ``t`` uses ``lrs[t]`` if given (a schedule from :func:`lr_values`),
        else ``lr``. Returns the losses, ``(iters, E)``."""
        if lrs is None:
            lrs = [lr] * iters
        if len(lrs) != iters:
            raise ValueError(f"lrs: expected {iters} learning rates, got {len(lrs)}")
        losses = torch.empty(iters, len(self), dtype=self.dtype)
        for start in range(0, iters, chunk):
            n = min(chunk, iters - start)
            xs, noises = self.draw(n, batch)
            for i in range(n):
                losses[start + i] = self.train_step(
                    xs[i], None if noises is None else noises[i], lrs[start + i], grad_clip
                )
        return losses

    @torch.no_grad()
    def log_likelihood(
        self,
        x: Tensor,
        samples: int = 100,
        chunk: int = 500,
        rows: int = 5000,
        return_elbo: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Every member's per-point test log-likelihood, ``x`` ``(N, 2)`` -> ``(E, N)`` float64:
        exact for a Glow, Eq. 5 for a VFlow, ``logsumexp_s(w_s) - log S`` over ``S = samples``
        draws of ``z ~ q(z|x)``, ``w_s = log p(x, z_s) - log q(z_s|x)``. Points go ``chunk`` at a
        time and the noise is drawn like :func:`log_likelihood` on a single model (continuing
        each member's stream); the ``S * chunk`` weights are computed ``rows`` at a time.

        With ``return_elbo`` also the per-point ELBO estimated from the same draws,
        ``mean_s w_s`` (equal to the log-likelihood for a Glow); the ELBO-to-IW gap
        ``ll - elbo`` bounds how far q(z|x) is from the posterior p(z|x) in KL."""
        E, out, elbo = len(self), [], []
        for xc in x.split(chunk):
            n = xc.shape[0]
            if not self.dz:
                out.append(self.log_prob_p(xc.expand(E, n, 2)).double())
                elbo.append(out[-1])
                continue
            noise = torch.stack(
                [
                    torch.randn(samples * n, self.dz, generator=g, dtype=x.dtype)
                    for g in self.noise_gens
                ]
            )
            xr = xc.repeat(samples, 1).expand(E, samples * n, 2)
            w = torch.cat(
                [
                    self.log_weight(xr[:, r : r + rows], noise[:, r : r + rows])
                    for r in range(0, samples * n, rows)
                ],
                dim=1,
            )
            w = w.view(E, samples, n).double()
            out.append(torch.logsumexp(w, dim=1) - math.log(samples))
            elbo.append(w.mean(dim=1))
        if return_elbo:
            return torch.cat(out, dim=1), torch.cat(elbo, dim=1)
        return torch.cat(out, dim=1)

    def density_grid(self, e: int, n: int = 128, samples: int = 100) -> Tensor:
        """:func:`density_grid` of member ``e``, drawing from its noise stream (as
        :func:`train_and_evaluate` draws from the global one)."""
        model = self.member_model(e)
        with torch.random.fork_rng():
            torch.set_rng_state(self.noise_gens[e].get_state())
            grid = density_grid(model, n, samples)
            self.noise_gens[e].set_state(torch.get_rng_state())
        return grid


def window_means(values: Tensor, window: int) -> Tensor:
    """Means of ``values`` ``(T, ...)`` over consecutive windows of ``window`` rows along dim 0,
    ignoring non-finite entries (skipped steps); the last window may be shorter.
    Returns ``(ceil(T / window), ...)``."""
    finite = torch.isfinite(values)
    vals = torch.where(finite, values, torch.zeros_like(values))
    sums = torch.stack([c.sum(dim=0) for c in vals.split(window)])
    counts = torch.stack([c.sum(dim=0) for c in finite.split(window)])
    return sums / counts.clamp(min=1)


def train_resumable(
    ens: ToyEnsemble,
    iters: int,
    lr: float,
    batch: int,
    checkpoint: str | Path | None = None,
    every: int = 5000,
    chunk: int = 250,
    schedule: str = "constant",
    final_lr_frac: float = 0.01,
    grad_clip: float = 100.0,
) -> tuple[Tensor, float]:
    """``ens.train(iters, lr, batch)`` with the learning rates ``lr_values(lr, schedule,
    iters, final_lr_frac)`` (indexed by the absolute iteration, so a resumed run continues
    the schedule) and clipping at ``grad_clip``, saving the ensemble every ``every`` iterations to
    ``checkpoint`` (atomically: written to a temporary file, then renamed) and, if that file
    exists, continuing from it. ``every`` must be a multiple of ``chunk``, so the batches are
    drawn in the same chunks as in one uninterrupted call and the trajectory is the same bit
    for bit. Returns the losses of all ``iters`` iterations, ``(iters, E)``, and the training
    CPU-seconds recorded by earlier sessions. Without ``checkpoint``: one call of ``train``.
    A checkpoint saved for another budget or recipe is refused (``ValueError``); one saved
    before the recipe was recorded counts as the default recipe."""
    lrs = lr_values(lr, schedule, iters, final_lr_frac)
    recipe = {"schedule": schedule, "final_lr_frac": final_lr_frac, "grad_clip": grad_clip}
    if checkpoint is None:
        return ens.train(iters, lr, batch, chunk, lrs, grad_clip), 0.0
    if every <= 0 or every % chunk:
        raise ValueError(f"checkpoint_every: expected a positive multiple of {chunk}, got {every}")
    path = Path(checkpoint)
    losses, done, cpu_before = torch.empty(0, len(ens), dtype=ens.dtype), 0, 0.0
    if path.exists():
        saved = torch.load(path, weights_only=False)
        if saved["iters"] != iters or saved["lr"] != lr or saved["batch"] != batch:
            raise ValueError(f"checkpoint: {path} was saved for iters/lr/batch "
                             f"{saved['iters']}/{saved['lr']}/{saved['batch']}, not "
                             f"{iters}/{lr}/{batch}")  # fmt: skip
        theirs = {k: saved.get(k, DEFAULT_RECIPE[k]) for k in recipe}
        if theirs != recipe:
            raise ValueError(f"checkpoint: {path} was saved for the recipe {theirs}, not {recipe}")
        ens.load_state_dict(saved["ensemble"])
        losses, done, cpu_before = saved["losses"], saved["done"], saved["cpu_s"]
    c0 = time.process_time()
    while done < iters:
        n = min(every, iters - done)
        losses = torch.cat(
            [losses, ens.train(n, lr, batch, chunk, lrs[done : done + n], grad_clip)]
        )
        done += n
        state = {"iters": iters, "lr": lr, "batch": batch, "done": done, "losses": losses,
                 **recipe,
                 "cpu_s": cpu_before + time.process_time() - c0,
                 "ensemble": ens.state_dict()}  # fmt: skip
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return losses, cpu_before


def train_ensemble(
    dim: int,
    members: list[tuple[int, int]],
    iters: int,
    lr: float = 1e-3,
    batch: int = 64,
    samples: int = 100,
    density: tuple = (),
    density_px: int = 128,
    threads: int | None = 1,
    q_base: bool = False,
    curve_every: int = 1000,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 5000,
    schedule: str = "constant",
    final_lr_frac: float = 0.01,
    grad_clip: float = 100.0,
    scale: str = "tanh3",
    activation: str = "relu",
    mixing: str = "linear",
    q_steps: int = 1,
    train_set: int = 0,
) -> dict:
    """:func:`train_and_evaluate` for every ``(steps, seed)`` of ``members`` (one ``dim``) at
    once with a :class:`ToyEnsemble`; ``density`` lists the ``(steps, seed)`` members whose
    density grid to compute. Returns ``{"runs": [one dict per member, the keys of
    train_and_evaluate; train_s / train_cpu_s are the ensemble's times divided by E],
    "dims", "members", "train_s", "train_cpu_s", "eval_cpu_s"}``.

    Each run also has ``test_elbo`` (the ELBO on the test set from the same ``samples`` draws
    as ``test_ll``) and ``curve``: the training ELBO averaged over consecutive windows of
    ``curve_every`` iterations (fresh data every batch, so an unbiased estimate of the
    population ELBO at that point of training; with ``train_set`` the ELBO on the fixed
    training set), nats.

    With ``checkpoint`` (a file path) training is resumable: see :func:`train_resumable`.
    ``schedule``, ``final_lr_frac``, ``grad_clip``: the recipe (see :func:`train_single`),
    recorded in every run's dict with ``lr``; ``scale``, ``activation``, ``mixing``,
    ``q_base``, ``q_steps``, ``train_set``: the factors (:func:`factor_dict`), recorded too."""
    recipe = recipe_dict(lr, schedule, final_lr_frac, grad_clip)
    factors = factor_dict(scale, activation, mixing, q_base, q_steps, train_set)
    if threads is not None:
        torch.set_num_threads(threads)
    ens = ToyEnsemble(dim, list(members), q_base=q_base, scale=scale, activation=activation,
                      mixing=mixing, q_steps=q_steps, train_set=train_set)  # fmt: skip
    t0, c0 = time.perf_counter(), time.process_time()
    losses, resumed_cpu_s = train_resumable(
        ens, iters, lr, batch, checkpoint, checkpoint_every,
        schedule=schedule, final_lr_frac=final_lr_frac, grad_clip=grad_clip,
    )  # fmt: skip
    train_s = time.perf_counter() - t0 + resumed_cpu_s  # wall of earlier sessions ~ their CPU
    train_cpu_s = time.process_time() - c0 + resumed_cpu_s
    ll, elbo = ens.log_likelihood(fixed_test_set(), samples, return_elbo=True)
    ll, elbo = ll.mean(dim=1), elbo.mean(dim=1)
    curves = window_means(-losses.double(), curve_every)
    eval_cpu_s = time.process_time() - c0 - train_cpu_s
    runs = []
    for e, (steps, seed) in enumerate(ens.members):
        run = {
            "dims": dim,
            "steps": steps,
            "seed": seed,
            "iters": iters,
            "params": n_params(ens.member_model(e)),
            "test_ll": float(ll[e]),
            "test_elbo": float(elbo[e]),
            "curve": curves[:, e].tolist(),
            "train_s": train_s / len(ens),
            "train_cpu_s": train_cpu_s / len(ens),
            "skipped": int((~torch.isfinite(losses[:, e])).sum()),
            **recipe,
            **factors,
        }
        if (steps, seed) in set(map(tuple, density)):
            run["density"] = ens.density_grid(e, density_px, samples).numpy()
        runs.append(run)
    return {
        "runs": runs,
        "dims": dim,
        "members": len(ens),
        "train_s": train_s,
        "train_cpu_s": train_cpu_s,
        "eval_cpu_s": eval_cpu_s,
    }

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


def mlp(n_in: int, n_out: int, hidden: int = 50, layers: int = 2) -> nn.Sequential:
    """``layers`` hidden ReLU layers of ``hidden`` units; last layer zero (identity flow)."""
    mods, width = [], n_in
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, n_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods, last)


class InvLinear(nn.Module):
    """``y = x W^T + b`` with a learned ``D x D`` matrix ``W`` (Glow's 1x1 convolution of a
    vector, plus the bias that plays ActNorm's shift); ``logdet = log|det W|`` via slogdet.
    ``W`` starts as a random orthogonal matrix, ``b`` at 0."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(dim, dim))[0])
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor, c: Tensor | None = None):
        logdet = torch.linalg.slogdet(self.weight)[1]
        return x @ self.weight.T + self.bias, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor, c: Tensor | None = None):
        logdet = torch.linalg.slogdet(self.weight)[1]
        x = torch.linalg.solve(self.weight, (y - self.bias).T).T
        return x, -logdet.expand(y.shape[0])


class Reverse(nn.Module):
    """The permutation ``x[:, ::-1]``; ``logdet = 0``."""

    def forward(self, x: Tensor, c: Tensor | None = None):
        return x.flip(1), x.new_zeros(x.shape[0])

    inverse = forward


class Coupling(nn.Module):
    """Affine coupling on ``x = [x_a, x_b]``, ``x_a = x[:, :split]`` (default ``D // 2``):
    ``y_a = x_a``, ``y_b = x_b * exp(s) + t`` with ``(s, t) = NN([x_a, c])`` one MLP of 2
    hidden layers of 50 units; the log-scale is bounded, ``s = 3 tanh(s_raw / 3)``.
    ``logdet = sum(s)``. With ``split = 0`` and a context this is an elementwise affine map
    whose shift and log-scale depend on ``c`` only: a conditional Gaussian layer."""

    def __init__(self, dim: int, cond_dim: int = 0, split: int | None = None, bound: float = 3.0):
        super().__init__()
        self.split = dim // 2 if split is None else split
        self.bound = bound
        n_in = self.split + cond_dim
        assert n_in > 0, "the coupling needs inputs: a split > 0 or a context"
        self.net = mlp(n_in, 2 * (dim - self.split))

    def _scale_shift(self, xa: Tensor, c: Tensor | None):
        h = self.net(xa if c is None else torch.cat([xa, c], dim=1))
        s, t = h.chunk(2, dim=1)
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


def glow_steps(dim: int, steps: int, cond_dim: int = 0) -> list[nn.Module]:
    """``steps`` Glow steps on ``R^dim``: [InvLinear, Coupling, Reverse] each."""
    out = []
    for _ in range(steps):
        out += [InvLinear(dim), Coupling(dim, cond_dim), Reverse()]
    return out


class Glow(nn.Module):
    """``log p(x) = log N(f(x); 0, I) + log|det df/dx|``, ``f`` = ``steps`` Glow steps on
    ``R^dim``; ``x`` has shape ``(N, dim)``. Used alone for ``D = 2`` and as VFlow's p(x, z)."""

    def __init__(self, dim: int, steps: int):
        super().__init__()
        self.dim = dim
        self.flow = Flow(glow_steps(dim, steps))

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
    none when ``dim == 1``, where a coupling cannot split) ``u = g(z; x)``, then the
    conditional Gaussian base ``eps = (u - mu(x)) exp(-log_sigma(x))`` (a ``Coupling``
    with ``split = 0``, i.e. ``mu`` and ``log_sigma`` from one MLP of ``x``).
    ``log q(z|x) = log N(eps; 0, I) + log|det d eps/dz|``.
    """

    def __init__(self, dim: int, cond_dim: int, steps: int = 1):
        super().__init__()
        layers = glow_steps(dim, steps, cond_dim) if dim >= 2 else []
        self.flow = Flow(layers + [Coupling(dim, cond_dim, split=0)])
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
    ``p(x, z)`` = ``Glow(dim, steps - 1)`` on ``[x, z]``; ``q(z|x)`` = ``CondFlow(D_Z, 2, 1)``."""

    def __init__(self, dim: int, steps: int, data_dim: int = 2):
        super().__init__()
        assert dim > data_dim and steps >= 2
        self.dim, self.data_dim = dim, data_dim
        self.p = Glow(dim, steps - 1)
        self.q = CondFlow(dim - data_dim, data_dim, steps=1)

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


def make_model(dim: int, steps: int) -> nn.Module:
    """``Glow(2, steps)`` for ``dim == 2``, else ``VFlow(dim, steps)``."""
    return Glow(2, steps) if dim == 2 else VFlow(dim, steps)


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
) -> dict:
    """One run: seed everything with ``seed``, train ``make_model(dim, steps)`` for ``iters``
    Adam steps on fresh batches of ``batch`` points (maximising the ELBO, the exact
    log-likelihood for a Glow), then evaluate the ``samples``-sample log-likelihood on
    :func:`fixed_test_set`. Returns a dict of plain values (and a ``density`` grid if asked)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(10_000 + seed)
    model = make_model(dim, steps)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0, c0 = time.perf_counter(), time.process_time()
    skipped = 0
    for _ in range(iters):
        loss = -model.elbo(sample_checkerboard(batch, gen)).mean()
        opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            skipped += 1
            continue
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 100.0)
        opt.step()
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
    }
    if density:
        out["density"] = density_grid(model, density_px, samples).numpy()
    return out

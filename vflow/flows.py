"""Invertible layers of Flow++ / VFlow (paper appendix B).

Every layer maps ``forward(x, context=None) -> (y, logdet)`` and
``inverse(y, context=None) -> (x, logdet)``, where ``logdet`` has shape (B,), lives on the
input's device and dtype, and is log|det dy/dx| (forward) or log|det dx/dy| (inverse), so
``forward`` then ``inverse`` gives back x with logdets summing to 0. ``x`` is a tensor
(B, C, H, W) or, between a split and its inverse, a pair (tuple) of tensors.

Splits. ``CheckerboardSplit`` and ``ChannelSplit`` produce pairs; ``TupleFlip``,
``Parallel`` and ``Inverse(split)`` work on them, so the appendix-B blocks can be written
literally, e.g. f_checker = Compose([CheckerboardSplit(), Parallel(ActNorm, ActNorm), ...,
TupleFlip(), Inverse(CheckerboardSplit())]). The model uses the equivalent, copy-free
``coupling_block`` instead: it keeps the full image, holds per-element ActNorm parameters
(= one set per half), one 1x1-conv matrix per half (``Pointwise(split=...)``), and runs the
coupling with ``vflow.ops.checkerboard_coupling`` on the full image. TupleFlip is realised by
alternating the active half (``parity``) from one block to the next instead of moving
pixels: that differs from the literal composition only by a fixed permutation of the
output, which has unit Jacobian.

Patterns. ``pattern="stripe"`` is the official code's CheckerboardSplit (even / odd
columns, mask = w % 2); ``pattern="checkerboard"`` is the true (h + w) % 2 checkerboard.
The half with mask == parity is the *active* one (transformed), the other the *passive*
one (input of the conditioning network); halves are (B, C, H, W/2) in row-major order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vflow import ops
from vflow.checkpointing import maybe_checkpoint
from vflow.nets import CouplingNet, data_init_scale, image_half, pixelwise_linear

__all__ = [
    "FlowLayer",
    "Compose",
    "Inverse",
    "Parallel",
    "CheckerboardSplit",
    "ChannelSplit",
    "TupleFlip",
    "SpaceToDepth",
    "Sigmoid",
    "ImageToLogit",
    "ActNorm",
    "SMALL_INIT_BATCH",
    "small_batch_variance",
    "Pointwise",
    "MixLogisticCoupling",
    "AugmentedAffineCoupling",
    "coupling_block",
    "f_checker",
    "f_channel",
    "g_checker",
    "g_channel",
    "zero_logdet",
    "maybe_checkpoint",
]

Pair = tuple[Tensor, Tensor]


def _first(x) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


def zero_logdet(x) -> Tensor:
    """A (B,) zero logdet on the device and dtype of x (a tensor or a pair)."""
    t = _first(x)
    return t.new_zeros(t.shape[0])


def _sum_per_sample(t: Tensor) -> Tensor:
    return t.flatten(1).sum(1)


class FlowLayer(nn.Module):
    """Base class: ``forward(x, context)`` and ``inverse(y, context)`` -> (out, logdet (B,))."""

    def forward(self, x, context=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y, context=None):  # pragma: no cover - abstract
        raise NotImplementedError


class Compose(FlowLayer):
    """Sequential composition; ``inverse`` runs the layers in reverse order.

    A layer with a true ``checkpoint_step`` attribute runs under ``maybe_checkpoint`` in
    ``forward`` (set by ``FlowPlusPlus.set_activation_checkpointing(True, "step")``)."""

    def __init__(self, layers=()):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x, context=None):
        logdet = None  # the sum of the layers' logdets, zero_logdet(x) for no layers
        for layer in self.layers:
            step = getattr(layer, "checkpoint_step", False)
            x, ld = maybe_checkpoint(step, layer, layer, x, context)
            logdet = ld if logdet is None else logdet + ld
        return x, zero_logdet(x) if logdet is None else logdet

    def inverse(self, y, context=None):
        logdet = zero_logdet(y)
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y, context)
            logdet = logdet + ld
        return y, logdet


class Inverse(FlowLayer):
    """Inverse(layer): forward is ``layer.inverse`` and inverse is ``layer.forward``."""

    def __init__(self, layer: FlowLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x, context=None):
        return self.layer.inverse(x, context)

    def inverse(self, y, context=None):
        return self.layer(y, context)


class Parallel(FlowLayer):
    """Apply ``first`` to element 0 and ``second`` to element 1 of a pair."""

    def __init__(self, first: FlowLayer, second: FlowLayer):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: Pair, context=None):
        a, la = self.first(x[0], context)
        b, lb = self.second(x[1], context)
        return (a, b), la + lb

    def inverse(self, y: Pair, context=None):
        a, la = self.first.inverse(y[0], context)
        b, lb = self.second.inverse(y[1], context)
        return (a, b), la + lb


class CheckerboardSplit(FlowLayer):
    """(B, C, H, W) -> (half with mask 0, half with mask 1), each (B, C, H, W/2). logdet 0.

    ``pattern="stripe"`` (official Flow++: even / odd columns) or ``"checkerboard"``.
    """

    def __init__(self, pattern: str = "stripe"):
        super().__init__()
        self.pattern = pattern

    def forward(self, x: Tensor, context=None):
        a1, a0 = ops.checkerboard_split(x, parity=1, pattern=self.pattern)
        return (a0, a1), zero_logdet(x)

    def inverse(self, y: Pair, context=None):
        return ops.checkerboard_merge(y[1], y[0], parity=1, pattern=self.pattern), zero_logdet(y)


class ChannelSplit(FlowLayer):
    """(B, C, H, W) -> (first ``split`` channels, the rest); ``split`` defaults to C/2."""

    def __init__(self, split: int | None = None):
        super().__init__()
        self.split = split

    def forward(self, x: Tensor, context=None):
        k = x.shape[1] // 2 if self.split is None else self.split
        if not 0 < k < x.shape[1]:
            raise ValueError(f"cannot split {x.shape[1]} channels at {k}")
        return (x[:, :k], x[:, k:]), zero_logdet(x)

    def inverse(self, y: Pair, context=None):
        return torch.cat(y, dim=1), zero_logdet(y)


class TupleFlip(FlowLayer):
    """(a, b) -> (b, a)."""

    def forward(self, x: Pair, context=None):
        return (x[1], x[0]), zero_logdet(x)

    def inverse(self, y: Pair, context=None):
        return (y[1], y[0]), zero_logdet(y)


class SpaceToDepth(FlowLayer):
    """2x2 squeeze (B, C, H, W) -> (B, 4C, H/2, W/2), TensorFlow's channel order:
    out[:, (2 dy + dx) C + c, i, j] = x[:, c, 2i + dy, 2j + dx]. logdet 0."""

    def forward(self, x: Tensor, context=None):
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"SpaceToDepth needs even H and W, got {h}x{w}")
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4)
        return y.reshape(b, 4 * c, h // 2, w // 2), zero_logdet(x)

    def inverse(self, y: Tensor, context=None):
        b, c4, h, w = y.shape
        c = c4 // 4
        x = y.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)
        return x.reshape(b, c, 2 * h, 2 * w), zero_logdet(y)


class Sigmoid(FlowLayer):
    """y = sigmoid(x); log|dy/dx| = -softplus(x) - softplus(-x) summed per sample."""

    def forward(self, x: Tensor, context=None):
        return torch.sigmoid(x), _sum_per_sample(-F.softplus(x) - F.softplus(-x))

    def inverse(self, y: Tensor, context=None):
        x = torch.logit(y)
        return x, _sum_per_sample(-torch.log(y) - torch.log1p(-y))


class ImageToLogit(FlowLayer):
    """Image preprocessing of Flow++: dequantised v = x + u in [0, n_bins) ->
    y = logit(0.05 + 0.9 v / n_bins), with log|dy/dv| = D log(0.9 / n_bins) - sum log(s (1-s)),
    s = 0.05 + 0.9 v / n_bins. Including it in the likelihood makes bpd need no extra term."""

    def __init__(self, n_bins: int):
        super().__init__()
        self.n_bins = n_bins

    def forward(self, v: Tensor, context=None):
        s = 0.05 + 0.9 * v / self.n_bins
        y = torch.logit(s)
        logdet = _sum_per_sample(-torch.log(s) - torch.log1p(-s))
        return y, logdet + math.prod(v.shape[1:]) * math.log(0.9 / self.n_bins)

    def inverse(self, y: Tensor, context=None):
        s = torch.sigmoid(y)
        v = (s - 0.05) * (self.n_bins / 0.9)
        logdet = _sum_per_sample(F.logsigmoid(y) + F.logsigmoid(-y))
        return v, logdet - math.prod(y.shape[1:]) * math.log(0.9 / self.n_bins)


#: Below this many samples an ActNorm init pools per-element variances toward per-channel ones.
SMALL_INIT_BATCH = 32


def small_batch_variance(var: Tensor, batch: int) -> Tensor:
    """Per-element variances ``var`` (C, *S) of a batch of ``batch`` samples, shrunk toward
    their channel's pooled variance when the batch is small (``batch < SMALL_INIT_BATCH``):

        w = (batch - 2) / (SMALL_INIT_BATCH - 2),
        pooled_c = mean over S of var_c * batch / (batch - 1),
        var' = w var + (1 - w) pooled_c.

    Why: from a handful of images the per-element variance is near zero wherever those
    images happen to agree (a pixel that is dark in both), so a plain init gives such an
    element a huge scale, and any later image that differs there lands far out in the tails
    (flowpp-digits from 2 images: 35 test bits/dim against 3.2 from 128). The pooled
    estimate (Bessel-corrected, as it averages many elements) bounds that scale. A 2-sample
    variance (one degree of freedom) is not kept at all: on the digits configs even w = 1/16
    of it left 1 image pair in 10 over 3 bits/dim behind a 128-image init, none pooled fully
    (README, "Initialisation"). ``var`` is returned unchanged (the same tensor) for
    ``batch >= SMALL_INIT_BATCH`` or a 1-d shape.
    """
    if batch >= SMALL_INIT_BATCH or var.dim() < 2:
        return var
    pooled = var.mean(tuple(range(1, var.dim())), keepdim=True) * (batch / (batch - 1))
    weight = (batch - 2) / (SMALL_INIT_BATCH - 2)
    return weight * var + (1 - weight) * pooled


class ActNorm(FlowLayer):
    """y = x * exp(log_scale) + bias with one scale and bias per element of ``shape`` (C, H, W).

    On a full image this equals Flow++'s per-half "Norm" (one parameter set per element of
    each half). Data-dependent initialisation (official Flow++ ``init_normalization``,
    flows/flows.py) on the first batch of at least 2 samples it sees (or after
    ``reset_initialization``): scale = 1 / sqrt(var + 1e-8), bias = -mean * scale over the
    batch, so that batch comes out with zero mean and unit variance per element. An element
    whose batch variance is below ``nets.MIN_INIT_VAR`` (constant over the batch) gets scale 1
    (``nets.data_init_scale``) instead of the official 1e4. A batch of fewer than
    ``SMALL_INIT_BATCH`` samples has its per-element variances pooled toward per-channel ones
    (``small_batch_variance``). Smaller batches (0 or 1 samples, which have no variance) pass
    through the identity without initialising it. The ``initialized`` buffer is part of the
    state_dict (``is_initialized``). logdet = sum log_scale.
    """

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self._known_initialized = False  # python mirror of the buffer (avoids a sync per call)

    def reset_initialization(self) -> None:
        self.initialized.fill_(False)
        self._known_initialized = False

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # mirror the loaded flag now (one sync per load), so that a compiled forward needs none
        meta = self.initialized.device.type == "meta"
        self._known_initialized = False if meta else bool(self.initialized)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Data-dependent init from the batch x (B, *shape), B >= 2; statistics in float64.

        scale = ``data_init_scale(small_batch_variance(var, B))``, log_scale = log scale,
        bias = -mean * scale (var and mean per element, over the batch)."""
        if x.shape[0] < 2:
            raise ValueError(
                f"ActNorm.initialize: the batch x must hold at least 2 samples to estimate "
                f"per-element variances, got shape {tuple(x.shape)}"
            )
        xd = x.double()
        mean = xd.mean(0)
        var = (xd - mean).square().mean(0)
        if not bool(torch.isfinite(var).all()):
            raise ValueError(
                "ActNorm.initialize: the batch x has non-finite values; initialise the model "
                "with model.initialize(x) on finite data (nothing was changed)"
            )
        scale = data_init_scale(small_batch_variance(var, x.shape[0]))
        self.log_scale.copy_(torch.log(scale))
        self.bias.copy_(-mean * scale)
        self.initialized.fill_(True)
        self._known_initialized = True

    def is_initialized(self) -> bool:
        """Whether the data-dependent init has run here or came with a loaded state_dict
        (reads the ``initialized`` buffer once, then its Python mirror: no sync per call)."""
        if not self._known_initialized and self.initialized.device.type != "meta":
            self._known_initialized = bool(self.initialized)
        return self._known_initialized

    def _maybe_initialize(self, x: Tensor) -> None:
        if self._known_initialized or x.device.type == "meta" or x.shape[0] < 2:
            return
        if not self.is_initialized():
            self.initialize(x)

    def _logdet(self, x: Tensor) -> Tensor:
        return self.log_scale.sum().to(x.dtype).expand(x.shape[0])

    def forward(self, x: Tensor, context=None):
        self._maybe_initialize(x)
        return x * torch.exp(self.log_scale) + self.bias, self._logdet(x)

    def inverse(self, y: Tensor, context=None):
        return (y - self.bias) * torch.exp(-self.log_scale), -self._logdet(y)


def _mask(height: int, width: int, pattern: str, device) -> Tensor:
    """Bool mask of the positions with mask value 1: (h + w) % 2, shape (H, W), or w % 2,
    shape (W,) (it broadcasts over the rows)."""
    w = torch.arange(width, device=device)
    if pattern == "checkerboard":
        w = torch.arange(height, device=device)[:, None] + w
    return w % 2 == 1


class Pointwise(FlowLayer):
    """Invertible 1x1 convolution with one matrix per half, initialised to I + 1e-3 N(0, 1).

    * ``split=None``: one C x C matrix for the whole image.
    * ``split="checker"``: two C x C matrices, W0 on the positions with mask 0 and W1 on
      those with mask 1 (``pattern``); logdet = (H W / 2)(log|det W0| + log|det W1|).
    * ``split="channel"``: two (C/2) x (C/2) matrices on the channel halves (a block-diagonal
      C x C matrix); logdet = H W (log|det W0| + log|det W1|).

    Determinants and inverses are computed in float64, so the inverse is exact to rounding.
    """

    def __init__(
        self, channels: int, split: str | None = None, pattern: str = "stripe", noise: float = 1e-3
    ):
        super().__init__()
        if split not in (None, "checker", "channel"):
            raise ValueError(f"split must be None, 'checker' or 'channel', got {split!r}")
        if split == "channel" and channels % 2:
            raise ValueError(f"channel split needs an even channel count, got {channels}")
        self.split, self.pattern = split, pattern
        n = channels // 2 if split == "channel" else channels
        count = 1 if split is None else 2
        self.weight = nn.Parameter(
            torch.eye(n).repeat(count, 1, 1) + noise * torch.randn(count, n, n)
        )

    def _matrices(self, inverse: bool) -> Tensor:
        w = self.weight.double()
        return torch.linalg.inv(w) if inverse else w

    def _transform(self, x: Tensor, inverse: bool):
        # the forward matrices need no float64 round trip: weight.double().to(x.dtype) is
        # weight.to(x.dtype) exactly (and no op at all when the dtypes agree)
        w = self._matrices(True).to(x.dtype) if inverse else self.weight.to(x.dtype)
        b, c, h, wd = x.shape
        logabsdet = torch.linalg.slogdet(self.weight.double())[1].sum()
        if self.split == "channel":
            y = pixelwise_linear(x, torch.block_diag(w[0], w[1]))
            positions = h * wd
        elif self.split == "checker":
            mask = _mask(h, wd, self.pattern, x.device)
            y = torch.where(mask, pixelwise_linear(x, w[1]), pixelwise_linear(x, w[0]))
            positions = h * wd // 2
        else:
            y = pixelwise_linear(x, w[0])
            positions = h * wd
        logdet = (positions * logabsdet).to(x.dtype).expand(b)
        return y, -logdet if inverse else logdet

    def forward(self, x: Tensor, context=None):
        return self._transform(x, inverse=False)

    def inverse(self, y: Tensor, context=None):
        return self._transform(y, inverse=True)


class MixLogisticCoupling(FlowLayer):
    """Flow++'s mixture-of-logistics coupling on a full image (B, C, H, W).

    The passive half h_p conditions the transform of the active half h_a:
    params = net(h_p [, context]) with C_a (2+3K) channels, viewed as (B, 2+3K, C_a, *S_a);
    y_a = exp(tanh a) logit(eps + (1-2eps) MixLogCDF(h_a; pi, mu, s)) + b, eps = 0.05 if
    ``smooth`` (VFlow) else 0 (Flow++); y_p = h_p. Computed by ``vflow.ops`` (``backend``, also
    the backend of the net's attention layers).

    * ``split="checker"``: active = positions with mask == ``parity`` (``pattern``), each
      half (B, C, H, W/2); uses ``ops.checkerboard_coupling`` on the full image.
    * ``split="channel"``: active = channel half ``parity`` (0 first, 1 second), each
      (B, C/2, H, W); uses ``ops.mixlogistic_coupling``.

    ``attention=True`` is MixLogisticAttnCoupling (the f_* blocks), False the g_* blocks.
    ``context`` (conditional flows): (B, context_channels, H, W/2) from ``nets.ContextNet``;
    channel couplings use it at full resolution (each half-pixel feature duplicated).
    ``checkpoint_net``: run ``net`` under activation checkpointing (``maybe_checkpoint``).
    """

    def __init__(
        self,
        shape: tuple[int, int, int],
        *,
        split: str,
        parity: int,
        filters: int,
        blocks: int,
        components: int,
        attention: bool = True,
        pattern: str = "stripe",
        heads: int = 4,
        context_channels: int = 0,
        dropout: float = 0.0,
        smooth: bool = True,
        backend: str = "auto",
    ):
        super().__init__()
        c, h, w = shape
        if split == "checker":
            if w % 2:
                raise ValueError(f"checkerboard split needs an even width, got {w}")
            active_c, spatial, passive_c = c, (h, w // 2), c
        elif split == "channel":
            if c % 2:
                raise ValueError(f"channel split needs an even channel count, got {c}")
            active_c, spatial, passive_c = c // 2, (h, w), c // 2
        else:
            raise ValueError(f"split must be 'checker' or 'channel', got {split!r}")
        self.split, self.parity, self.pattern = split, parity, pattern
        self.components, self.active_channels, self.spatial = components, active_c, spatial
        self.smooth, self.backend = smooth, backend
        self.checkpoint_net = False  # see FlowPlusPlus.set_activation_checkpointing
        self.net = CouplingNet(
            passive_c,
            active_c * (2 + 3 * components),
            filters=filters,
            blocks=blocks,
            spatial=spatial,
            attention=attention,
            heads=heads,
            context_channels=context_channels,
            dropout=dropout,
            backend=backend,
        )

    def _params(self, passive: Tensor, context: Tensor | None) -> Tensor:
        if context is not None and self.split == "channel":
            context = ops.checkerboard_merge(context, context, parity=0, pattern=self.pattern)
        out = maybe_checkpoint(self.checkpoint_net, self, self.net, passive, context)
        return out.view(out.shape[0], 2 + 3 * self.components, self.active_channels, *self.spatial)

    def _channel_halves(self, x: Tensor) -> Pair:
        first, second = x.chunk(2, dim=1)
        return (second, first) if self.parity else (first, second)  # (active, passive)

    def _channel_merge(self, active: Tensor, passive: Tensor) -> Tensor:
        return torch.cat([passive, active] if self.parity else [active, passive], dim=1)

    def _run(self, x: Tensor, context, inverse: bool):
        if self.split == "checker":
            passive = image_half(x, 1 - self.parity, self.pattern)
            params = self._params(passive, context)
            op = ops.checkerboard_coupling_inverse if inverse else ops.checkerboard_coupling
            return op(
                x,
                params,
                parity=self.parity,
                pattern=self.pattern,
                smooth=self.smooth,
                backend=self.backend,
            )
        active, passive = self._channel_halves(x)
        params = self._params(passive, context)
        op = ops.mixlogistic_coupling_inverse if inverse else ops.mixlogistic_coupling
        y_active, logdet = op(active, params, smooth=self.smooth, backend=self.backend)
        return self._channel_merge(y_active, passive), logdet

    def forward(self, x: Tensor, context=None):
        return self._run(x, context, inverse=False)

    def inverse(self, y: Tensor, context=None):
        return self._run(y, context, inverse=True)


class AugmentedAffineCoupling(FlowLayer):
    """f_affine of Table 5, on (B, Cx + Cz, H, W) = (x, z):

        y_x = mu(z) + exp(s(z)) * x,   y_z = z,   s = tanh(raw s) (bounded),
        logdet = sum s.

    mu and s come from one ``CouplingNet`` without attention (``blocks`` gated convs of
    ``filters`` channels) with 2 Cx output channels, initialised near the identity.
    """

    def __init__(
        self,
        x_channels: int,
        z_channels: int,
        spatial: tuple[int, int],
        *,
        filters: int,
        blocks: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.x_channels = x_channels
        self.checkpoint_net = False  # see FlowPlusPlus.set_activation_checkpointing
        self.net = CouplingNet(
            z_channels,
            2 * x_channels,
            filters=filters,
            blocks=blocks,
            spatial=spatial,
            attention=False,
            dropout=dropout,
        )

    def _mu_s(self, z: Tensor) -> Pair:
        raw_s, mu = maybe_checkpoint(self.checkpoint_net, self, self.net, z).chunk(2, dim=1)
        return mu, torch.tanh(raw_s)

    def forward(self, x: Tensor, context=None):
        xs, z = x[:, : self.x_channels], x[:, self.x_channels :]
        mu, s = self._mu_s(z)
        return torch.cat([mu + torch.exp(s) * xs, z], dim=1), _sum_per_sample(s)

    def inverse(self, y: Tensor, context=None):
        ys, z = y[:, : self.x_channels], y[:, self.x_channels :]
        mu, s = self._mu_s(z)
        return torch.cat([(ys - mu) * torch.exp(-s), z], dim=1), -_sum_per_sample(s)


def coupling_block(
    shape: tuple[int, int, int],
    *,
    split: str,
    parity: int,
    blocks: int,
    filters: int,
    components: int,
    attention: bool,
    pattern: str = "stripe",
    **coupling_kwargs,
) -> Compose:
    """One appendix-B block on a full image: Split -> ActNorm -> Pointwise -> MoL coupling
    -> TupleFlip -> Inverse(Split), copy-free (see the module docstring): ActNorm per element,
    Pointwise with one matrix per half, coupling of the half selected by ``parity``.
    Consecutive blocks alternate ``parity`` (that is the TupleFlip)."""
    return Compose(
        [
            ActNorm(shape),
            Pointwise(shape[0], split=split, pattern=pattern),
            MixLogisticCoupling(
                shape,
                split=split,
                parity=parity,
                blocks=blocks,
                filters=filters,
                components=components,
                attention=attention,
                pattern=pattern,
                **coupling_kwargs,
            ),
        ]
    )


def f_checker(shape, parity, blocks, filters, components, **kw) -> Compose:
    """f_checker(B, D_H, K): checkerboard/stripe split, MixLogisticAttnCoupling."""
    return coupling_block(
        shape,
        split="checker",
        parity=parity,
        blocks=blocks,
        filters=filters,
        components=components,
        attention=True,
        **kw,
    )


def f_channel(shape, parity, blocks, filters, components, **kw) -> Compose:
    """f_channel(B, D_H, K): channel split, MixLogisticAttnCoupling."""
    return coupling_block(
        shape,
        split="channel",
        parity=parity,
        blocks=blocks,
        filters=filters,
        components=components,
        attention=True,
        **kw,
    )


def g_checker(shape, parity, blocks, filters, components, **kw) -> Compose:
    """g_checker(B, D_H, K): checkerboard/stripe split, MixLogisticCoupling (no attention)."""
    return coupling_block(
        shape,
        split="checker",
        parity=parity,
        blocks=blocks,
        filters=filters,
        components=components,
        attention=False,
        **kw,
    )


def g_channel(shape, parity, blocks, filters, components, **kw) -> Compose:
    """g_channel(B, D_H, K): channel split, MixLogisticCoupling (no attention)."""
    return coupling_block(
        shape,
        split="channel",
        parity=parity,
        blocks=blocks,
        filters=filters,
        components=components,
        attention=False,
        **kw,
    )

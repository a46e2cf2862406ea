"""Conditioning networks of the Flow++ / VFlow couplings (appendix B of the paper).

All tensors are NCHW. The building blocks follow the official Flow++ code:

* ``concat_elu(x) = elu(cat([x, -x], channels))`` (doubles the channels).
* ``GatedConv``: ``x + a * sigmoid(b)`` with
  ``(a, b) = c2(concat_elu(c1(concat_elu(x)) + a_proj(concat_elu(ctx))))``; c1 is a 3x3
  conv, a_proj a 1x1 conv of the optional context, c2 a 1x1 ("nin") or 3x3 conv to
  2*filters initialised at scale 0.1.
* ``ChannelLayerNorm``: layer norm over the channel axis of every pixel.
* ``GatedAttention``: multi-head self-attention over the H*W positions of ``x + pos_emb``
  (1x1 conv to q, k, v; ``vflow.ops.self_attention``; 1x1 conv to 2*filters at scale 0.1;
  gate; residual).
* ``CouplingNet``: 3x3 conv in, ``blocks`` x [GatedConv -> LN -> (GatedAttention -> LN)],
  3x3 conv out (scale 0.1). With ``attention=False`` a block is GatedConv -> LN only (the
  paper's MixLogisticCoupling); the learned position embedding (F, H, W) is shared by all
  blocks of one net and exists only with attention.
* ``ContextNet``: the shallow image processor of the conditional flows r(u|x), q(z|x):
  split the image into its two halves, concatenate them along channels, 3x3 conv, then
  ``blocks`` GatedConvs with 3x3 c2. Output (B, filters, H, W/2).

Activation checkpointing by block (``FlowPlusPlus.set_activation_checkpointing(True,
"block")``): a network whose ``checkpoint_blocks`` is true runs each residual block (a
CouplingNet's GatedConv -> LN [-> GatedAttention -> LN], a ContextNet's GatedConv) under
``vflow.checkpointing.maybe_checkpoint(..., selective=True)``: a training forward keeps the blocks'
inputs and the outputs of their attention and 3x3 convolutions, and the backward recomputes
the rest one block at a time.

Data-dependent initialisation (official Flow++ code, flows/nn.py ``conv2d`` / ``dense``):
every conv built by these networks carries an ``init_scale`` attribute (0.1 for the c2 of a
gated conv, the output projection of the attention block and the coupling's output conv, 1
elsewhere). ``redraw_conv_weights`` draws their weights from N(0, 0.05) with zero biases and
``data_init_conv`` rescales one conv from its output on the init batch, per output channel:
scale = init_scale / sqrt(var + 1e-8), bias = -mean * scale, so that the batch comes out with
zero mean and variance init_scale^2. ``data_init_scale`` holds that rule and its one
deviation from the official code: a channel (or element) whose batch variance is below
``MIN_INIT_VAR`` gets scale = init_scale (as if its variance were 1) instead of
init_scale / sqrt(1e-8) = 1e4 init_scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vflow import net_ops, ops
from vflow.checkpointing import maybe_checkpoint
from vflow.net_ops import _memory_format, concat_elu

__all__ = [
    "INIT_WEIGHT_STD",
    "MIN_INIT_VAR",
    "data_init_scale",
    "data_init_conv",
    "redraw_conv_weights",
    "ConvDataInit",
    "Dropout",
    "concat_elu",
    "pixelwise_linear",
    "image_half",
    "Conv1x1",
    "GatedConv",
    "ChannelLayerNorm",
    "GatedAttention",
    "CouplingNet",
    "ContextNet",
]


INIT_WEIGHT_STD = 0.05  # official: tf.random_normal_initializer(0, 0.05)
MIN_INIT_VAR = 1e-4  # batch variances below this count as zero (degenerate)


def data_init_scale(var: Tensor, init_scale: float = 1.0) -> Tensor:
    """Scale that maps a batch statistic of variance ``var`` to variance init_scale^2.

    Official Flow++ (``init_normalization`` / ``conv2d`` / ``dense``):
    scale = init_scale / sqrt(var + 1e-8). Where var < ``MIN_INIT_VAR`` (a constant element or
    channel, e.g. one repeated image) the batch says nothing about the spread, and the
    official rule would give init_scale * 1e4; there scale = init_scale (unit variance
    assumed), which only centres the statistic.
    """
    scale = init_scale * torch.rsqrt(var + 1e-8)
    return torch.where(var < MIN_INIT_VAR, torch.full_like(scale, init_scale), scale)


@torch.no_grad()
def data_init_conv(conv: nn.Conv2d, out: Tensor, init_scale: float | None = None) -> Tensor:
    """Data-dependent init of ``conv`` from its output ``out`` = conv(x) on the init batch.

    Per output channel o, with m_o and v_o the mean and (biased) variance of out[:, o] over
    (B, H, W) and s_o = ``data_init_scale(v_o, init_scale)``: weight[o] *= s_o and
    bias[o] = (bias[o] - m_o) s_o, so conv(x) becomes (out - m) s: zero mean and variance
    init_scale^2 per channel (official Flow++ ``conv2d(..., init=True)``, which starts from
    zero bias). ``init_scale`` defaults to ``conv.init_scale``. Returns the new output.
    Statistics are taken in float64.
    """
    if init_scale is None:
        init_scale = conv.init_scale
    o = out.double()
    mean = o.mean((0, 2, 3))
    var = (o - mean[:, None, None]).square().mean((0, 2, 3))
    scale = data_init_scale(var, init_scale)
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, *[1] * (conv.weight.dim() - 1)))
    conv.bias.copy_((conv.bias.double() - mean) * scale)
    return ((o - mean[:, None, None]) * scale[:, None, None]).to(out.dtype)


def _init_convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d) and hasattr(m, "init_scale")]


@torch.no_grad()
def redraw_conv_weights(module: nn.Module) -> list[nn.Conv2d]:
    """Weights N(0, ``INIT_WEIGHT_STD``^2) and zero biases for every conv of ``module`` that
    has an ``init_scale`` (the official code's initial values before the data-dependent
    rescaling). Draws from the global RNG of the weights' device, in logical (contiguous)
    order, so channels_last weights get the same values; returns the convs."""
    convs = _init_convs(module)
    for conv in convs:
        w = conv.weight
        w.copy_(torch.empty(w.shape, dtype=w.dtype, device=w.device).normal_(0.0, INIT_WEIGHT_STD))
        conv.bias.zero_()
    return convs


class ConvDataInit:
    """``with ConvDataInit(module):`` the official data-dependent init of its convs.

    On entry the weights are redrawn (``redraw_conv_weights``) and a forward hook is put on
    each conv; the first time a conv runs, the hook rescales it from its output
    (``data_init_conv``) and passes the rescaled output on, so later layers see the
    initialised earlier ones (one forward pass initialises the network in data-flow order, as
    the official code's ``init=True`` graph does). On exit the hooks are removed;
    ``pending`` lists the convs that never ran.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.convs: list[nn.Conv2d] = []
        self.done: set[int] = set()
        self.handles = []

    def __enter__(self) -> ConvDataInit:
        self.convs = redraw_conv_weights(self.module)
        self.handles = [c.register_forward_hook(self._hook) for c in self.convs]
        return self

    def _hook(self, conv: nn.Module, inputs, out: Tensor) -> Tensor:
        if id(conv) in self.done:
            return out
        self.done.add(id(conv))
        return data_init_conv(conv, out)

    @property
    def pending(self) -> list[nn.Conv2d]:
        return [c for c in self.convs if id(c) not in self.done]

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class Dropout(nn.Dropout):
    """``nn.Dropout`` as one op: ``torch.native_dropout`` (mask ~ Bernoulli(1 - p), x mask /
    (1 - p)), which CUDA's ``F.dropout`` runs too; on the CPU ``F.dropout`` dispatches four
    ops (empty_like, bernoulli_, div_, mul) for the same mask and values."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        return torch.native_dropout(x, self.p, True)[0]


def _dropout(p: float) -> nn.Module:
    return Dropout(p) if p > 0 else nn.Identity()


def pixelwise_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """A 1x1 convolution: y[:, o] = sum_i weight[o, i] x[:, i] (+ bias[o]) at every pixel.

    (B, Cin, H, W), weight (Cout, Cin), bias (Cout,) -> (B, Cout, H, W). Input that is
    channels_last-contiguous is multiplied as the (B*H*W, Cin) matrix of its (B, H, W, Cin)
    view: a GEMM with no copies, whose output is channels_last again, and for the channel
    counts of these networks 1.2-3x faster, forward + backward, than the convolution
    kernels on the same layout. Other input goes through ``F.conv2d`` (for NCHW input a
    batched GEMM is no faster).
    """
    if x.is_contiguous(memory_format=torch.channels_last):
        return F.linear(x.permute(0, 2, 3, 1), weight, bias).permute(0, 3, 1, 2)
    return F.conv2d(x, weight.view(*weight.shape, 1, 1), bias)


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (same parameters and state dict) computed
    by ``pixelwise_linear``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            return pixelwise_linear(x, self.weight.flatten(1), self.bias)
        return F.conv2d(x, self.weight, self.bias)  # pixelwise_linear's other branch, no views


def image_half(x: Tensor, parity: int, pattern: str) -> Tensor:
    """The half of x (B, C, H, W) with mask == ``parity``, (B, C, H, W/2) in row-major order:
    ``ops.checkerboard_split(x, parity=parity, pattern=pattern)[0]``; for the stripe pattern
    (mask = w % 2) a copy of the strided view x[..., parity::2] in x's memory layout (two ops
    instead of eleven; the copy keeps the layout the convolutions see)."""
    if pattern == "stripe":
        return x[..., parity::2].contiguous(memory_format=_memory_format(x))
    return ops.checkerboard_split(x, parity=parity, pattern=pattern)[0]


def _run_block(net: nn.Module, block, *args) -> Tensor:
    """``block(*args)``, under selective activation checkpointing when
    ``net.checkpoint_blocks`` is on (``vflow.checkpointing.maybe_checkpoint``)."""
    return maybe_checkpoint(net.checkpoint_blocks, net, block, *args, selective=True)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded conv with a square odd kernel (``Conv1x1`` for kernel 1), with
    ``init_scale`` 1 for the data-dependent initialisation."""
    if kernel == 1:
        conv = Conv1x1(in_channels, out_channels)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)
    conv.init_scale = 1.0
    return conv


def _scaled_conv(conv: nn.Conv2d, scale: float) -> nn.Conv2d:
    """Shrink the initial weights of ``conv`` by ``scale`` and zero its bias; ``scale`` is also
    the conv's ``init_scale`` for the data-dependent initialisation."""
    conv.init_scale = scale
    with torch.no_grad():
        if conv.weight.device.type != "meta":
            conv.weight.mul_(scale)
            conv.bias.zero_()
    return conv


class GatedConv(nn.Module):
    """Gated residual conv block: (B, F, H, W) [+ context (B, Cc, H, W)] -> (B, F, H, W)."""

    def __init__(
        self,
        filters: int,
        context_channels: int = 0,
        dropout: float = 0.0,
        nin: bool = True,
        init_scale: float = 0.1,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = backend  # of its concat-ELUs and gated residual (vflow.net_ops)
        self.c1 = _conv(2 * filters, filters, 3)
        self.a_proj = _conv(2 * context_channels, filters, 1) if context_channels else None
        self.dropout = _dropout(dropout)
        self.c2 = _scaled_conv(_conv(2 * filters, 2 * filters, 1 if nin else 3), init_scale)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.c1(concat_elu(x, backend=self.backend))
        if self.a_proj is not None:
            if context is None:
                raise ValueError("this GatedConv was built with a context input; pass context")
            h = h + self.a_proj(concat_elu(context, backend=self.backend))
        h = self.c2(self.dropout(concat_elu(h, backend=self.backend)))
        return net_ops.gated_residual(x, h, backend=self.backend)  # x + a sigmoid(b), (a, b) = h


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, H, W), eps 1e-5, learned gain and bias:
    y = (x - mean_c x) / sqrt(var_c x + eps) * weight + bias, per pixel, var biased
    (``vflow.net_ops.channel_layer_norm``: one fused op each way on the cpp / triton backends
    for NCHW input, else one ``F.layer_norm`` over the (B, H, W, C) view). The result has x's
    memory layout.
    """

    def __init__(self, channels: int, eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps, self.backend = eps, backend

    def forward(self, x: Tensor) -> Tensor:
        return net_ops.channel_layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class GatedAttention(nn.Module):
    """Gated multi-head self-attention over positions: (B, F, H, W) -> (B, F, H, W).

    q, k, v = split(1x1 conv(x + pos_emb)) into ``heads`` heads of F/heads channels;
    out = x + gate(1x1 conv(softmax(q k^T / sqrt(d)) v)).
    """

    def __init__(self, filters: int, heads: int = 4, dropout: float = 0.0, backend: str = "auto"):
        super().__init__()
        if filters % heads:
            raise ValueError(f"filters ({filters}) must be divisible by heads ({heads})")
        self.heads, self.backend = heads, backend
        self.proj1 = _conv(filters, 3 * filters, 1)
        self.dropout = _dropout(dropout)
        self.proj2 = _scaled_conv(_conv(filters, 2 * filters, 1), 0.1)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.proj1(x + pos_emb).reshape(b, 3, self.heads, c // self.heads, h * w)
        att = ops.self_attention(qkv, backend=self.backend).reshape(b, c, h, w)
        h = self.proj2(self.dropout(att))
        return net_ops.gated_residual(x, h, backend=self.backend)  # x + a sigmoid(g), (a, g) = h


class CouplingNet(nn.Module):
    """The conditioning network of a MoL coupling.

    (B, in_channels, H, W) [+ context (B, context_channels, H, W)] -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        filters: int,
        blocks: int,
        spatial: tuple[int, int],
        attention: bool = True,
        heads: int = 4,
        context_channels: int = 0,
        dropout: float = 0.0,
        init_scale: float = 0.1,
        backend: str = "auto",
    ):
        super().__init__()
        self.attention = attention
        self.proj_in = _conv(in_channels, filters, 3)
        self.pos_emb = nn.Parameter(torch.randn(filters, *spatial) * 0.01) if attention else None
        self.convs = nn.ModuleList(
            GatedConv(filters, context_channels, dropout, backend=backend) for _ in range(blocks)
        )
        self.norms1 = nn.ModuleList(
            ChannelLayerNorm(filters, backend=backend) for _ in range(blocks)
        )
        if attention:
            self.attns = nn.ModuleList(
                GatedAttention(filters, heads, dropout, backend) for _ in range(blocks)
            )
            self.norms2 = nn.ModuleList(
                ChannelLayerNorm(filters, backend=backend) for _ in range(blocks)
            )
        self.proj_out = _scaled_conv(_conv(filters, out_channels, 3), init_scale)
        self.checkpoint_blocks = False  # see the module docstring

    def block(self, i: int, h: Tensor, context: Tensor | None = None) -> Tensor:
        """Residual block i: GatedConv -> LN [-> GatedAttention -> LN]."""
        h = self.norms1[i](self.convs[i](h, context))
        if self.attention:
            h = self.norms2[i](self.attns[i](h, self.pos_emb))
        return h

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.proj_in(x)
        for i in range(len(self.convs)):
            h = _run_block(self, self.block, i, h, context)
        return self.proj_out(h)


class ContextNet(nn.Module):
    """Shallow image processor of r(u|x) and q(z|x): (B, C, H, W) -> (B, filters, H, W/2).

    The image is split into its two halves (``pattern``, parity 0 first), concatenated along
    channels (2C channels at H x W/2), then a 3x3 conv and ``blocks`` gated convs with
    3x3 c2, as in the official code. The output is aligned with the halves of the
    checkerboard couplings; ``full_resolution`` merges it back to (B, filters, H, W) for
    channel-split couplings.
    """

    def __init__(
        self,
        in_channels: int,
        filters: int = 32,
        blocks: int = 3,
        pattern: str = "stripe",
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.pattern = pattern
        self.out_channels = filters
        self.proj = _conv(2 * in_channels, filters, 3)
        self.blocks = nn.ModuleList(
            GatedConv(filters, 0, dropout, nin=False, backend=backend) for _ in range(blocks)
        )
        self.checkpoint_blocks = False  # see the module docstring

    def forward(self, x: Tensor) -> Tensor:
        halves = [image_half(x, parity, self.pattern) for parity in (0, 1)]
        h = self.proj(torch.cat(halves, dim=1))
        for block in self.blocks:
            h = _run_block(self, block, h)
        return h

    def full_resolution(self, context: Tensor) -> Tensor:
        """(B, F, H, W/2) -> (B, F, H, W): each position gets the features of its half-pixel."""
        return ops.checkerboard_merge(context, context, parity=0, pattern=self.pattern)

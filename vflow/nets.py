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
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vflow import ops

__all__ = [
    "concat_elu",
    "pixelwise_linear",
    "Conv1x1",
    "GatedConv",
    "ChannelLayerNorm",
    "GatedAttention",
    "CouplingNet",
    "ContextNet",
]


def concat_elu(x: Tensor) -> Tensor:
    """elu(cat([x, -x])) along channels: (B, C, ...) -> (B, 2C, ...)."""
    return F.elu(torch.cat([x, -x], dim=1))


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
    return F.conv2d(x, weight[:, :, None, None], bias)


class Conv1x1(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, 1)`` (same parameters and state dict) computed
    by ``pixelwise_linear``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return pixelwise_linear(x, self.weight.flatten(1), self.bias)


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    """A 'same'-padded conv with a square odd kernel (``Conv1x1`` for kernel 1)."""
    if kernel == 1:
        return Conv1x1(in_channels, out_channels)
    return nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2)


def _scaled_conv(conv: nn.Conv2d, scale: float) -> nn.Conv2d:
    """Shrink the initial weights of ``conv`` by ``scale`` and zero its bias."""
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
    ):
        super().__init__()
        self.c1 = _conv(2 * filters, filters, 3)
        self.a_proj = _conv(2 * context_channels, filters, 1) if context_channels else None
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.c2 = _scaled_conv(_conv(2 * filters, 2 * filters, 1 if nin else 3), init_scale)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.c1(concat_elu(x))
        if self.a_proj is not None:
            if context is None:
                raise ValueError("this GatedConv was built with a context input; pass context")
            h = h + self.a_proj(concat_elu(context))
        h = self.c2(self.dropout(concat_elu(h)))
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class ChannelLayerNorm(nn.Module):
    """Layer norm over the channel axis of (B, C, H, W), eps 1e-5, learned gain and bias."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).square().mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        return x * self.weight[:, None, None] + self.bias[:, None, None]


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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj2 = _scaled_conv(_conv(filters, 2 * filters, 1), 0.1)

    def forward(self, x: Tensor, pos_emb: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.proj1(x + pos_emb).reshape(b, 3, self.heads, c // self.heads, h * w)
        att = ops.self_attention(qkv, backend=self.backend).reshape(b, c, h, w)
        a, g = self.proj2(self.dropout(att)).chunk(2, dim=1)
        return x + a * torch.sigmoid(g)


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
            GatedConv(filters, context_channels, dropout) for _ in range(blocks)
        )
        self.norms1 = nn.ModuleList(ChannelLayerNorm(filters) for _ in range(blocks))
        if attention:
            self.attns = nn.ModuleList(
                GatedAttention(filters, heads, dropout, backend) for _ in range(blocks)
            )
            self.norms2 = nn.ModuleList(ChannelLayerNorm(filters) for _ in range(blocks))
        self.proj_out = _scaled_conv(_conv(filters, out_channels, 3), init_scale)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        h = self.proj_in(x)
        for i, conv in enumerate(self.convs):
            h = self.norms1[i](conv(h, context))
            if self.attention:
                h = self.norms2[i](self.attns[i](h, self.pos_emb))
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
    ):
        super().__init__()
        self.pattern = pattern
        self.out_channels = filters
        self.proj = _conv(2 * in_channels, filters, 3)
        self.blocks = nn.ModuleList(
            GatedConv(filters, 0, dropout, nin=False) for _ in range(blocks)
        )

    def forward(self, x: Tensor) -> Tensor:
        first, second = ops.checkerboard_split(x, parity=0, pattern=self.pattern)
        h = self.proj(torch.cat([first, second], dim=1))
        for block in self.blocks:
            h = block(h)
        return h

    def full_resolution(self, context: Tensor) -> Tensor:
        """(B, F, H, W/2) -> (B, F, H, W): each position gets the features of its half-pixel."""
        return ops.checkerboard_merge(context, context, parity=0, pattern=self.pattern)

"""Triton kernels of the conditioning networks' fused ops (``vflow.net_ops``): concat-ELU,
the gated residual and the channel layer norm, on contiguous (B, C, N) maps (N = H * W).

The math is that of ``csrc/net_kernels.h`` (which states it with the gradients):

* concat-ELU: one program per BLOCK elements of x; writes y[:, c] = elu(x) and
  y[:, C + c] = elu(-x) with one expm1(-|x|); the backward reads both gradient halves.
* gated residual: y = x + a sigmoid(g) per element of x, (a, g) the channel halves of h.
* layer norm: one program per (sample, BLOCK_N positions) holds the whole (C, BLOCK_N) tile
  (C <= MAX_CHANNELS), so mean, variance and the backward's two channel sums are ``tl.sum``
  over axis 0, in float64 (C adds per position: cheap next to the memory traffic on the
  data-centre GPUs vflow targets, whose float64 rate is half or a quarter of float32's).
  The backward writes each program's per-channel sums of gy xhat and gy to its own row of
  a buffer in x's dtype, which torch ``sum``s over rows (fixed order, no atomics).

Accuracy under the GPU's fast math: every exp that multiplies into a result is libdevice's
(``_precise.exp``), and expm1 near 0 is a Taylor polynomial, not exp(x) - 1.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _precise as precise
from ._coupling import _device_guard, _interpreted

BLOCK = 1024  # elements per program of the elementwise kernels
MAX_CHANNELS = 1024  # layer norm: channels a program holds at once
LN_BLOCK = 4096  # layer norm: elements of a program's (C, BLOCK_N) tile
# layer norm: tile elements per warp. 8 per thread: ptxas -v for sm_90 (``python -m
# vflow.kernels._aot``) gives the 4096-element tiles' backward 84-102 registers in float32
# and 121-126 in float64 without spills; on the launchers' default 4 warps (32 per thread)
# it took all 255 registers and spilled 48-52 bytes (float32) and 392-440 bytes (float64).
LN_ELEMENTS_PER_WARP = 256


@triton.jit
def _expm1_nonpos(x):
    """exp(x) - 1 for x <= 0: x (1 + x/2! + ... + x^13/14!) on [-ln2/2, 0], exp(x) - 1 below."""
    p = x * 0 + 1.0 / 87178291200.0  # 1 / 14!
    p = p * x + 1.0 / 6227020800.0
    p = p * x + 1.0 / 479001600.0
    p = p * x + 1.0 / 39916800.0
    p = p * x + 1.0 / 3628800.0
    p = p * x + 1.0 / 362880.0
    p = p * x + 1.0 / 40320.0
    p = p * x + 1.0 / 5040.0
    p = p * x + 1.0 / 720.0
    p = p * x + 1.0 / 120.0
    p = p * x + 1.0 / 24.0
    p = p * x + 1.0 / 6.0
    p = p * x + 0.5
    p = p * x + 1.0
    return tl.where(x > -0.34657359027997264, p * x, precise.exp(x) - 1.0)


@triton.jit
def _concat_elu_fwd_kernel(x_ptr, y_ptr, total, CN, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < total
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    e = _expm1_nonpos(-tl.abs(x))
    pos = (offs // CN) * 2 * CN + offs % CN  # y[b, c, n]; y[b, C + c, n] is CN further
    tl.store(y_ptr + pos, tl.where(x > 0, x, e), mask=mask)
    tl.store(y_ptr + pos + CN, tl.where(x > 0, e, -x), mask=mask)


@triton.jit
def _concat_elu_bwd_kernel(x_ptr, gy_ptr, gx_ptr, total, CN, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < total
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    pos = (offs // CN) * 2 * CN + offs % CN
    g1 = tl.load(gy_ptr + pos, mask=mask, other=0.0)
    g2 = tl.load(gy_ptr + pos + CN, mask=mask, other=0.0)
    p = precise.exp(-tl.abs(x))
    tl.store(gx_ptr + offs, tl.where(x > 0, g1 - g2 * p, g1 * p - g2), mask=mask)


@triton.jit
def _sigmoid_and_slope(g):
    """sigmoid(g) and sigmoid(g) sigmoid(-g), from e = exp(-|g|) (no cancellation)."""
    e = precise.exp(-tl.abs(g))
    big = 1.0 / (1.0 + e)
    small = e * big
    s = tl.where(g >= 0, big, small)
    s = tl.where(g != g, g, s)
    return s, big * small


@triton.jit
def _gated_residual_fwd_kernel(x_ptr, h_ptr, y_ptr, total, CN, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < total
    pos = (offs // CN) * 2 * CN + offs % CN  # a[b, c, n]; g[b, c, n] is CN further
    a = tl.load(h_ptr + pos, mask=mask, other=0.0)
    s, _ = _sigmoid_and_slope(tl.load(h_ptr + pos + CN, mask=mask, other=0.0))
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, x + a * s, mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(h_ptr, gy_ptr, gh_ptr, total, CN, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < total
    pos = (offs // CN) * 2 * CN + offs % CN
    a = tl.load(h_ptr + pos, mask=mask, other=0.0)
    s, slope = _sigmoid_and_slope(tl.load(h_ptr + pos + CN, mask=mask, other=0.0))
    g = tl.load(gy_ptr + offs, mask=mask, other=0.0)
    tl.store(gh_ptr + pos, g * s, mask=mask)
    tl.store(gh_ptr + pos + CN, g * a * slope, mask=mask)


@triton.jit
def _sqrt(v):
    """Correctly rounded sqrt (float32 ``tl.sqrt`` may be the approximate instruction)."""
    if v.dtype == tl.float64:
        return tl.sqrt(v)
    else:
        return tl.sqrt_rn(v)


@triton.jit
def _sum64(v):
    """The sum over channels (axis 0) in float64: a few ulps whatever the channel count and
    the order of the reduction (the interpreter adds along axis 0 one row after another)."""
    return tl.sum(v.to(tl.float64), axis=0)


@triton.jit
def _ln_tile(pid_b, pid_n, C, N, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets (into a (B, C, N) map) and mask of the (C, BLOCK_N) tile, and its positions."""
    cs = tl.arange(0, BLOCK_C)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs = pid_b.to(tl.int64) * C * N + cs[:, None] * N + ns[None, :]
    mask = (cs[:, None] < C) & (ns[None, :] < N)
    return offs, mask, cs, ns


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    y_ptr,
    mean_ptr,
    rstd_ptr,
    C,
    N,
    eps_ptr,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    eps = tl.load(eps_ptr)  # in x's dtype: a float scalar argument would be rounded to fp32
    offs, mask, cs, ns = _ln_tile(pid_b, pid_n, C, N, BLOCK_C, BLOCK_N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # mean = x0 + sum_c (x - x0) / C, x0 the first channel: exact differences of nearby values
    x0 = tl.load(x_ptr + pid_b.to(tl.int64) * C * N + ns, mask=ns < N, other=0.0)
    mean = x0 + (_sum64(tl.where(mask, x - x0[None, :], 0.0)) / C).to(x.dtype)
    d = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / _sqrt((_sum64(d * d) / C).to(x.dtype) + eps)
    w = tl.load(w_ptr + cs, mask=cs < C, other=0.0)
    b = tl.load(b_ptr + cs, mask=cs < C, other=0.0)
    tl.store(y_ptr + offs, d * rstd[None, :] * w[:, None] + b[:, None], mask=mask)
    stat = pid_b.to(tl.int64) * N + ns
    tl.store(mean_ptr + stat, mean, mask=ns < N)
    tl.store(rstd_ptr + stat, rstd, mask=ns < N)


@triton.jit
def _layer_norm_bwd_kernel(
    x_ptr,
    w_ptr,
    mean_ptr,
    rstd_ptr,
    gy_ptr,
    gx_ptr,
    part_ptr,
    C,
    N,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_b, pid_n = tl.program_id(0), tl.program_id(1)
    offs, mask, cs, ns = _ln_tile(pid_b, pid_n, C, N, BLOCK_C, BLOCK_N)
    stat = pid_b.to(tl.int64) * N + ns
    mean = tl.load(mean_ptr + stat, mask=ns < N, other=0.0)
    rstd = tl.load(rstd_ptr + stat, mask=ns < N, other=0.0)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    gy = tl.load(gy_ptr + offs, mask=mask, other=0.0)
    w = tl.load(w_ptr + cs, mask=cs < C, other=0.0)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    gh = gy * w[:, None]
    s1 = (_sum64(gh) / C).to(x.dtype)
    s2 = (_sum64(gh * xhat) / C).to(x.dtype)
    gx = rstd[None, :] * (gh - s1[None, :] - xhat * s2[None, :])
    tl.store(gx_ptr + offs, gx, mask=mask)
    row = (pid_b.to(tl.int64) * tl.num_programs(1) + pid_n) * 2 * C
    tl.store(part_ptr + row + cs, tl.sum(gy * xhat, axis=1), mask=cs < C)
    tl.store(part_ptr + row + C + cs, tl.sum(gy, axis=1), mask=cs < C)


# --- launchers ---------------------------------------------------------------------------


def _check(x: Tensor, *others: Tensor) -> tuple[int, int, int]:
    """(B, C, N) of the map x; every tensor on x's device and dtype, contiguous."""
    if x.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"vflow.kernels runs on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on CPU under the interpreter"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"vflow.kernels takes float32 or float64 tensors, got {x.dtype}")
    for t in (x, *others):
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(
                f"all tensors must share x's dtype and device, got {t.dtype} on "
                f"{t.device} and {x.dtype} on {x.device}"
            )
        if not t.is_contiguous():
            raise ValueError("the network kernels take contiguous tensors")
    if x.dim() < 2:
        raise ValueError(f"x must be (B, C, ...), got shape {tuple(x.shape)}")
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


def _doubled(x: Tensor) -> tuple[int, ...]:
    return (x.shape[0], 2 * x.shape[1], *x.shape[2:])


def _elementwise(kernel, total: int, *args) -> None:
    if total:
        kernel[(triton.cdiv(total, BLOCK),)](*args, BLOCK_SIZE=BLOCK)


def concat_elu_fwd(x: Tensor) -> Tensor:
    """elu(cat([x, -x], 1)): (B, C, ...) -> (B, 2C, ...)."""
    bsz, c, n = _check(x)
    y = x.new_empty(_doubled(x))
    with _device_guard(x):
        _elementwise(_concat_elu_fwd_kernel, x.numel(), x, y, x.numel(), c * n)
    return y


def concat_elu_bwd(x: Tensor, grad_y: Tensor) -> Tensor:
    """dL/dx of concat_elu_fwd from dL/dy (B, 2C, ...)."""
    bsz, c, n = _check(x, grad_y)
    if tuple(grad_y.shape) != _doubled(x):
        raise ValueError(f"grad_y must have shape {_doubled(x)}, got {tuple(grad_y.shape)}")
    gx = torch.empty_like(x)
    with _device_guard(x):
        _elementwise(_concat_elu_bwd_kernel, x.numel(), x, grad_y, gx, x.numel(), c * n)
    return gx


def gated_residual_fwd(x: Tensor, h: Tensor) -> Tensor:
    """x + a sigmoid(g), (a, g) the channel halves of h (B, 2C, ...)."""
    bsz, c, n = _check(x, h)
    if tuple(h.shape) != _doubled(x):
        raise ValueError(f"h must have shape {_doubled(x)}, got {tuple(h.shape)}")
    y = torch.empty_like(x)
    with _device_guard(x):
        _elementwise(_gated_residual_fwd_kernel, x.numel(), x, h, y, x.numel(), c * n)
    return y


def gated_residual_bwd(h: Tensor, grad_y: Tensor) -> Tensor:
    """dL/dh of gated_residual_fwd from dL/dy (B, C, ...) (dL/dx is dL/dy itself)."""
    bsz, c, n = _check(grad_y, h)
    if tuple(h.shape) != _doubled(grad_y):
        raise ValueError(f"h must have shape {_doubled(grad_y)}, got {tuple(h.shape)}")
    gh = torch.empty_like(h)
    with _device_guard(h):
        _elementwise(
            _gated_residual_bwd_kernel, grad_y.numel(), h, grad_y, gh, grad_y.numel(), c * n
        )
    return gh


# (eps, dtype, device) -> eps as a one-element tensor of that dtype on that device. Triton
# passes a Python float as an fp32 scalar, which would round eps (1e-5 -> 1e-5 (1 - 2.5e-9))
# in the float64 kernel; the tensor is made once per value, so no call adds a fill kernel
# (nor a host-to-device copy inside a CUDA graph capture after the first, eager, step).
_EPS: dict = {}


def _eps_tensor(eps: float, like: Tensor) -> Tensor:
    key = (float(eps), like.dtype, like.device)
    if key not in _EPS:
        _EPS[key] = torch.full((1,), float(eps), dtype=like.dtype, device=like.device)
    return _EPS[key]


def _ln_grid(bsz: int, c: int, n: int, block: int | None):
    """(BLOCK_C, BLOCK_N, grid) of the layer norm kernels: the whole channel axis times as many
    positions as fit in ``block`` elements (LN_BLOCK by default)."""
    if c > MAX_CHANNELS:
        raise ValueError(f"the layer norm kernel holds at most {MAX_CHANNELS} channels, got {c}")
    block_c = triton.next_power_of_2(max(c, 1))
    block = LN_BLOCK if block is None else int(block)
    block_n = max(1, min(block // block_c, triton.next_power_of_2(max(n, 1))))
    return block_c, block_n, (bsz, triton.cdiv(n, block_n))


def ln_warps(block_c: int, block_n: int) -> int:
    """Warps of a layer norm program with a (block_c, block_n) tile: LN_ELEMENTS_PER_WARP
    elements per warp, from 4 to 16 warps."""
    return max(4, min(16, block_c * block_n // LN_ELEMENTS_PER_WARP))


def layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, *, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Layer norm over dim 1 of (B, C, ...): (y, mean (B, N), rstd (B, N))."""
    bsz, c, n = _check(x, weight, bias)
    y = torch.empty_like(x)
    mean, rstd = x.new_empty(bsz, n), x.new_empty(bsz, n)
    block_c, block_n, grid = _ln_grid(bsz, c, n, block)
    if x.numel():
        with _device_guard(x):
            _layer_norm_fwd_kernel[grid](
                x,
                weight,
                bias,
                y,
                mean,
                rstd,
                c,
                n,
                _eps_tensor(eps, x),
                BLOCK_C=block_c,
                BLOCK_N=block_n,
                num_warps=ln_warps(block_c, block_n),
            )
    return y, mean, rstd


def layer_norm_bwd(
    x: Tensor,
    weight: Tensor,
    mean: Tensor,
    rstd: Tensor,
    grad_y: Tensor,
    *,
    block: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dL/dx, dL/dweight, dL/dbias) of layer_norm_fwd from dL/dy."""
    bsz, c, n = _check(x, weight, mean, rstd, grad_y)
    gx = torch.empty_like(x)
    block_c, block_n, grid = _ln_grid(bsz, c, n, block)
    partial = x.new_zeros(grid[0] * grid[1], 2, c)
    if x.numel():
        with _device_guard(x):
            _layer_norm_bwd_kernel[grid](
                x,
                weight,
                mean,
                rstd,
                grad_y,
                gx,
                partial,
                c,
                n,
                BLOCK_C=block_c,
                BLOCK_N=block_n,
                num_warps=ln_warps(block_c, block_n),
            )
    return gx, partial[:, 0].sum(0), partial[:, 1].sum(0)

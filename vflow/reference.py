"""Eager PyTorch reference of the mixture-of-logistics (MoL) coupling.

This module is the oracle of the test suite, the CPU/GPU fallback of every op and the
baseline of the benchmarks. It is written for clarity, not speed: it materialises the
(B, K, *S) intermediates that the fused kernels avoid.

Math (one element x with K components; parameters per element, see ``unpack_params``)::

    s_k   = max(log_scale_k, -7)                  # LOG_SCALE_MIN, as every official variant
    t_k   = (x - mean_k) * exp(-s_k)
    w     = softmax(logits)
    F(x)  = sum_k w_k sigmoid(t_k)                # mixture CDF, computed as log F, log(1-F)
    f(x)  = sum_k w_k sigmoid(t_k) sigmoid(-t_k) exp(-s_k)   # mixture pdf, as log f
    G     = eps + (1 - 2 eps) F                   # eps = 0.05 if smooth (VFlow) else 0 (Flow++)
    y     = exp(tanh(a_raw)) * logit(G) + b
    log|dy/dx| = tanh(a_raw) + log(1 - 2 eps) + log f - log G - log(1 - G)

Everything is computed in log space (logsumexp), so y and the log-determinant stay finite
where exp(log F) would round to 1 in float32.

Layouts ("pattern" codes shared with the C++ and Triton kernels):

* ``PLAIN`` (0): x has shape (B, *S), params (B, 2+3K, *S); every element is transformed.
* ``CHECKERBOARD`` (1) and ``STRIPE`` (2): x is a full image (B, C, H, W) with W even;
  mask[h, w] = (h + w) % 2 (checkerboard) or w % 2 (stripe); the active positions are those
  with mask == parity, in row-major order, so the active half is (B, C, H, W/2) and params is
  (B, 2+3K, C, H, W/2). Active column j of row h is image column
  ``2 j + (h + parity) % 2`` (checkerboard) or ``2 j + parity`` (stripe).

The low-level contract implemented by every backend (this module, ``vflow._C`` and
``vflow.kernels``), on validated contiguous float32/float64 tensors:

* ``coupling_fwd(x, params, smooth, pattern, parity) -> (y, logdet)``
* ``coupling_bwd(x, params, grad_out, grad_logdet, smooth, pattern, parity, inverse)
  -> (grad_in, grad_params)``: the vector-Jacobian product of the forward (``inverse=False``:
  grad_out = dL/dy, grad_in = dL/dx) or of the inverse evaluated at its output x
  (``inverse=True``: grad_out = dL/dx, grad_logdet = dL/d(inverse logdet), grad_in = dL/dy),
  by the implicit-function theorem: with phi the forward map and l = log phi_x,
  v = (g_x - g_L l_x) / phi_x, grad_y = v, grad_theta = -v phi_theta - g_L l_theta.
* ``coupling_inv(y, params, smooth, pattern, parity, max_iters, newton) -> (x, logdet)``:
  logdet = -(forward logdet at x).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.nn import functional as tF

LOG_SCALE_MIN = -7.0
SMOOTH_EPS = 0.05

PLAIN, CHECKERBOARD, STRIPE = 0, 1, 2
PATTERNS = {"checkerboard": CHECKERBOARD, "stripe": STRIPE}


def num_components(num_params: int) -> int:
    """K from the size 2+3K of the parameter dimension (no validation)."""
    return (num_params - 2) // 3


def unpack_params(params: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Split params (B, 2+3K, *S) into a_raw, b (B, *S) and logits, means, log_scales (B, K, *S)."""
    k = num_components(params.shape[1])
    a_raw, b = params[:, 0], params[:, 1]
    return a_raw, b, params[:, 2 : 2 + k], params[:, 2 + k : 2 + 2 * k], params[:, 2 + 2 * k :]


def mixture_log_terms(
    x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """log F(x), log(1 - F(x)) and log f(x) of the logistic mixture, each (B, *S).

    x: (B, *S); logits, means, log_scales: (B, K, *S).
    """
    s = log_scales.clamp(min=LOG_SCALE_MIN)
    t = (x.unsqueeze(1) - means) * torch.exp(-s)
    log_w = torch.log_softmax(logits, dim=1)
    log_sig = tF.logsigmoid(t)
    log_sig_neg = tF.logsigmoid(-t)
    log_cdf = torch.logsumexp(log_w + log_sig, dim=1)
    log_sf = torch.logsumexp(log_w + log_sig_neg, dim=1)
    log_pdf = torch.logsumexp(log_w + log_sig + log_sig_neg - s, dim=1)
    return log_cdf, log_sf, log_pdf


def squash_logs(log_cdf: Tensor, log_sf: Tensor, smooth: bool) -> tuple[Tensor, Tensor]:
    """log G and log(1 - G) for G = eps + (1 - 2 eps) F, in log space."""
    if not smooth:
        return log_cdf, log_sf
    log_eps = log_cdf.new_tensor(math.log(SMOOTH_EPS))
    log_span = math.log1p(-2 * SMOOTH_EPS)
    return torch.logaddexp(log_cdf + log_span, log_eps), torch.logaddexp(log_sf + log_span, log_eps)


def mixlogistic_elementwise(x: Tensor, params: Tensor, smooth: bool) -> tuple[Tensor, Tensor]:
    """y and log|dy/dx| per element, both shaped like x (B, *S); differentiable by autograd."""
    a_raw, b, logits, means, log_scales = unpack_params(params)
    log_cdf, log_sf, log_pdf = mixture_log_terms(x, logits, means, log_scales)
    log_g, log_1mg = squash_logs(log_cdf, log_sf, smooth)
    alpha = torch.tanh(a_raw)
    y = torch.exp(alpha) * (log_g - log_1mg) + b
    log_span = math.log1p(-2 * SMOOTH_EPS) if smooth else 0.0
    logabsdet = alpha + log_span + log_pdf - log_g - log_1mg
    return y, logabsdet


# --- checkerboard / stripe layouts -------------------------------------------------------


def active_columns(height: int, width: int, pattern: int, parity: int, device=None) -> Tensor:
    """Image column of every active position, shape (H, W/2), int64."""
    j = torch.arange(width // 2, device=device)
    h = torch.arange(height, device=device)
    if pattern == CHECKERBOARD:
        return 2 * j[None, :] + ((h[:, None] + parity) % 2)
    return (2 * j + parity)[None, :].expand(height, -1)


def split(x: Tensor, pattern: int, parity: int) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> active and passive halves, each (B, C, H, W/2)."""
    cols = active_columns(x.shape[2], x.shape[3], pattern, parity, x.device)
    index = cols.expand(*x.shape[:2], *cols.shape)
    return torch.gather(x, 3, index), torch.gather(x, 3, 1 - index % 2 + index // 2 * 2)


def merge(active: Tensor, passive: Tensor, pattern: int, parity: int) -> Tensor:
    """Inverse of ``split``: two (B, C, H, W/2) halves -> (B, C, H, W)."""
    b, c, h, half = active.shape
    cols = active_columns(h, 2 * half, pattern, parity, active.device)
    index = cols.expand(b, c, h, half)
    out = active.new_empty(b, c, h, 2 * half)
    out = out.scatter(3, index, active)
    return out.scatter(3, 1 - index % 2 + index // 2 * 2, passive)


# --- the low-level backend contract ------------------------------------------------------


def per_sample_sum(t: Tensor) -> Tensor:
    """(B, *S) -> (B,): the sum over everything but the batch dimension (S may be empty)."""
    return t.reshape(t.shape[0], math.prod(t.shape[1:])).sum(1)


def coupling_fwd(
    x: Tensor, params: Tensor, smooth: bool, pattern: int, parity: int
) -> tuple[Tensor, Tensor]:
    """Forward coupling: y (like x) and logdet (B,), differentiable by autograd."""
    if pattern == PLAIN:
        y, logabsdet = mixlogistic_elementwise(x, params, smooth)
        return y, per_sample_sum(logabsdet)
    active, passive = split(x, pattern, parity)
    y_active, logabsdet = mixlogistic_elementwise(active, params, smooth)
    return merge(y_active, passive, pattern, parity), per_sample_sum(logabsdet)


def _active(t: Tensor, pattern: int, parity: int) -> Tensor:
    return t if pattern == PLAIN else split(t, pattern, parity)[0]


def coupling_bwd(
    x: Tensor,
    params: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    smooth: bool,
    pattern: int,
    parity: int,
    inverse: bool,
) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of the forward or (``inverse=True``) of the inverse at x
    (``torch.func.vjp``, so that it also runs inside torch.func transforms)."""
    x, params = x.detach(), params.detach()
    if not inverse:
        _, vjp = torch.func.vjp(lambda x, p: coupling_fwd(x, p, smooth, pattern, parity), x, params)
        return vjp((grad_out, grad_logdet))
    # Implicit-function gradient of the inverse x(y, theta) at its output x: with
    # y = f(x, theta) elementwise and l = log|df/dx|, dL/dy = (g_x - g_l dl/dx) / f'(x) and
    # dL/dtheta = -(dL/dy) df/dtheta - g_l dl/dtheta.
    xa = _active(x, pattern, parity)
    (y_el, logabsdet), vjp = torch.func.vjp(
        lambda xa, p: mixlogistic_elementwise(xa, p, smooth), xa, params
    )
    dlog_dx = vjp((torch.zeros_like(y_el), torch.ones_like(logabsdet)))[0]
    g_l = grad_logdet.reshape(-1, *([1] * (xa.dim() - 1))).expand_as(logabsdet)
    v = (_active(grad_out, pattern, parity) - g_l * dlog_dx) * torch.exp(-logabsdet)
    grad_p = vjp((-v, -g_l))[1]
    if pattern == PLAIN:
        return v, grad_p
    passive_grad = split(grad_out, pattern, parity)[1]
    return merge(v, passive_grad, pattern, parity), grad_p


def inverse_bracket(y: Tensor, params: Tensor, smooth: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Target logit(F*) and an exact bracket [lo, hi] of the preimage of y, each like y.

    The target is L = logit(F*) with F* the mixture CDF value that maps to y. Because every
    component CDF sigmoid((x - mean_k) / scale_k) reaches F* at x_k = mean_k + scale_k L, the
    mixture reaches it between min_k x_k and max_k x_k. For the smooth variant the attainable
    range of y is exp(tanh a)(logit(eps), logit(1-eps)) + b; F* is clamped to
    [tiny, 1 - tiny] with tiny the dtype's machine epsilon, which clamps y into that range.
    """
    a_raw, b, _, means, log_scales = unpack_params(params)
    z = (y - b) * torch.exp(-torch.tanh(a_raw))  # logit(G)
    if smooth:
        tiny = torch.finfo(y.dtype).eps
        f_star = ((torch.sigmoid(z) - SMOOTH_EPS) / (1 - 2 * SMOOTH_EPS)).clamp(tiny, 1 - tiny)
        target = torch.logit(f_star)
    else:
        target = z
    candidates = means + torch.exp(log_scales.clamp(min=LOG_SCALE_MIN)) * target.unsqueeze(1)
    return target, candidates.amin(1), candidates.amax(1)


def newton_allowed(width: Tensor, lo: Tensor, hi: Tensor, iters_left: int) -> Tensor:
    """True where a Newton step may be taken with ``iters_left`` iterations left (this one
    included): where bisection alone, from the current bracket, would still reach the
    tolerance within the remaining ``iters_left - 1`` iterations (width / 2^(left - 1) <=
    2 eps max(1, min |x| over the bracket)). This is what bounds the safeguarded Newton
    solver by the budget of plain bisection; ``iters_left`` is the same for every element."""
    eps = torch.finfo(width.dtype).eps
    floor = torch.where(lo > 0, lo, torch.where(hi < 0, -hi, torch.zeros_like(lo))).clamp(min=1)
    return width * math.ldexp(1.0, -(iters_left - 1)) <= 2 * eps * floor


def solve_inverse(
    y: Tensor, params: Tensor, smooth: bool, max_iters: int, newton: bool
) -> tuple[Tensor, Tensor]:
    """x with y = forward(x), and the iterations each element used (int32, like y).

    Solves g(x) = logit(F(x)) - L = 0 (strictly increasing in x) inside the exact bracket
    [lo, hi] of ``inverse_bracket``, starting at its midpoint. Every iteration evaluates g at
    the iterate x and shrinks the bracket with its sign (g > 0: hi = x, else lo = x). Then:

    * the iterate is a root, and is kept, once |g| is at the noise floor of its evaluation,
      8 eps (|log F| + |log(1 - F)| + |L| + 1);
    * ``newton=True`` (safeguarded Newton, the "rtsafe" rule of Numerical Recipes 9.4): the
      Newton point x - g / g', g' = f / (F (1 - F)), is taken only if it lies strictly inside
      the bracket, the step is at most half the step before the previous one (so iterates
      cannot cycle or crawl), and bisection from the current bracket could still finish in
      the iterations left (``newton_allowed``); otherwise the next iterate is the bracket's
      midpoint;
    * ``newton=False``: always the midpoint (bisection).

    An element has converged when it is at a root, or when its step is at most
    2 eps max(|x|, 1). Hence the guarantee: whenever Newton is refused for lack of budget,
    bisection from the current bracket still converges in the iterations left, so both
    methods converge for every initial bracket of width up to
    2^(max_iters + 1) eps max(1, min |x| over the bracket); with the default 100 iterations
    that is 2^49 ~ 5.6e14 in float64 and 2^78 in float32. Typical elements need 5-10 Newton
    iterations (bisection 35-55).

    No host synchronisation on accelerators: a fixed number of masked iterations (on CPU the
    loop stops once every element has converged, with the same result).
    """
    _, _, logits, means, log_scales = unpack_params(params)
    target, lo, hi = inverse_bracket(y, params, smooth)
    eps = torch.finfo(y.dtype).eps
    x = 0.5 * (lo + hi)
    step_prev = step_prev2 = hi - lo
    done = torch.zeros_like(x, dtype=torch.bool)
    iterations = torch.zeros_like(x, dtype=torch.int32)
    for it in range(max_iters):
        log_cdf, log_sf, log_pdf = mixture_log_terms(x, logits, means, log_scales)
        g = log_cdf - log_sf - target
        at_root = g.abs() <= 8 * eps * (log_cdf.abs() + log_sf.abs() + target.abs() + 1)
        above = g > 0
        new_hi = torch.where(above, x, hi)
        new_lo = torch.where(above, lo, x)
        x_new = 0.5 * (new_lo + new_hi)
        if newton:
            x_newton = x - g * torch.exp(log_cdf + log_sf - log_pdf)  # g / g'
            take = (
                (x_newton > new_lo)
                & (x_newton < new_hi)
                & ((x_newton - x).abs() <= 0.5 * step_prev2)
                & newton_allowed(new_hi - new_lo, new_lo, new_hi, max_iters - it)
            )
            x_new = torch.where(take, x_newton, x_new)
        x_new = torch.where(at_root, x, x_new)
        step = (x_new - x).abs()
        converged = at_root | (step <= 2 * eps * x.abs().clamp(min=1)) | x.isnan()
        active = ~done
        iterations += active.int()
        step_prev2 = torch.where(active, step_prev, step_prev2)
        step_prev = torch.where(active, step, step_prev)
        x = torch.where(active, x_new, x)
        lo = torch.where(active, new_lo, lo)
        hi = torch.where(active, new_hi, hi)
        done = done | converged
        if not x.is_cuda and bool(done.all()):
            break
    return x, iterations


def coupling_inv(
    y: Tensor, params: Tensor, smooth: bool, pattern: int, parity: int, max_iters: int, newton: bool
) -> tuple[Tensor, Tensor]:
    """Inverse coupling: x (like y) and logdet = -(forward logdet at x), shape (B,). No grad."""
    with torch.no_grad():
        if pattern == PLAIN:
            x = solve_inverse(y, params, smooth, max_iters, newton)[0]
        else:
            active, passive = split(y, pattern, parity)
            x_active = solve_inverse(active, params, smooth, max_iters, newton)[0]
            x = merge(x_active, passive, pattern, parity)
        return x, -coupling_fwd(x, params, smooth, pattern, parity)[1]


def self_attention(qkv: Tensor) -> Tensor:
    """Softmax self-attention of channel-major heads, by torch's scaled_dot_product_attention.

    qkv (B, 3, heads, d, T) -> out (B, heads, d, T) (a non-contiguous view), with
    out[b, n, c, i] = sum_j softmax_j(q[:, i] . k[:, j] / sqrt(d)) v[c, j]. q, k and v are
    copied once to (B, heads, T, d): on CPU, SDPA takes its fused (flash) kernel only when
    the head dimension is innermost; otherwise it falls back to the unfused math path.
    """
    q, k, v = qkv.permute(1, 0, 2, 4, 3).contiguous().unbind(0)
    return tF.scaled_dot_product_attention(q, k, v).transpose(-1, -2)

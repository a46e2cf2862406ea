"""Triton kernels and launchers of the MoL coupling (see the package docstring for the design)."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _precise as precise
from . import _tuning as tuning

# Fast or precise exp / log, chosen per term (issue 28). On NVIDIA GPUs float32 ``tl.exp`` /
# ``tl.log`` are approximate instructions (``kernels/_precise.py`` gives their error). Under
# the emulation of ``kernels/_emulation.py`` each group of terms was switched to the fast form
# alone and kept fast only where the float32 results over 5 regimes x K in {1, 4} x smooth /
# plain (forward, both backwards, inverse) stayed within 2x the all-precise kernels' max
# error + 1e-5; a scan over emulation seeds then moved the shared helpers (tanh, softplus,
# the online log-sum-exp) and the backward's remaining exps to precise as well. So: the
# backward kernel and everything it shares are precise; fast are only the forward's final
# log-sum-exps and output, and the inverse's iterations and its logdet.


PLAIN, CHECKERBOARD, STRIPE = 0, 1, 2

# Elements per program: a 2-D tile BLOCK_B x BLOCK_N with BLOCK_B * BLOCK_N == block when the
# per-sample size N is smaller than the block; DEFAULT_BLOCK and NUM_WARPS (_tuning.py) unless
# the caller or the tile tuning (_tuning.tile_for) picks another.
MAX_GRID_Y = 65535

LOG_SCALE_MIN = tl.constexpr(-7.0)
EPS = tl.constexpr(0.05)
LOG_EPS = tl.constexpr(math.log(0.05))
LOG_SPAN = tl.constexpr(math.log1p(-2 * 0.05))  # log(1 - 2 eps)
SPAN = tl.constexpr(1 - 2 * 0.05)  # 1 - 2 eps


# --- elementwise helpers -----------------------------------------------------------------


@triton.jit
def _c(value: tl.constexpr, like):
    """A constant in the dtype (and shape) of ``like``, rounded once from the Python double:
    a bare literal would be rounded to float32 first, even in a float64 kernel."""
    return tl.full(like.shape, value, like.dtype)


@triton.jit
def _log1p_unit(e):
    """log(1 + e) for e in [0, 1], accurate when e is tiny (no libdevice log1p needed)."""
    u = 1.0 + e
    exact = u == 1.0
    return tl.where(exact, e, precise.log(u) * (e / tl.where(exact, 1.0, u - 1.0)))


@triton.jit
def _tanh(a):
    e = precise.exp(-2.0 * tl.abs(a))
    r = (1.0 - e) / (1.0 + e)
    return tl.where(a < 0.0, -r, r)


@triton.jit
def _logaddexp(a, c):
    m = tl.maximum(a, c)
    return m + _log1p_unit(precise.exp(-tl.abs(a - c)))


@triton.jit
def _lse_push(m, s, v):
    """Online log-sum-exp: (running max m, sum s of exp(. - m)) <- v, one exp per update."""
    diff = v - m
    d = precise.exp(-tl.abs(diff))
    d = tl.where(v == float("-inf"), 0.0, d)  # exp(-inf) adds nothing; a NaN v propagates
    up = v > m
    s = tl.where(up, s * d + 1.0, s + d)
    return tl.maximum(m, v), s


@triton.jit
def _component(x, pi_ptr, mu_ptr, ls_ptr, mask):
    """Per-component terms: pi, mu, ls, s = max(ls, -7), exp(-s), t, e = exp(-|t|),
    log sigmoid(t), log sigmoid(-t)."""
    pi = tl.load(pi_ptr, mask=mask, other=0.0)
    mu = tl.load(mu_ptr, mask=mask, other=0.0)
    ls = tl.load(ls_ptr, mask=mask, other=0.0)
    s = tl.maximum(ls, LOG_SCALE_MIN)
    inv_s = precise.exp(-s)
    t = (x - mu) * inv_s
    e = precise.exp(-tl.abs(t))
    l1 = _log1p_unit(e)
    lsp = tl.minimum(t, 0.0) - l1
    lsn = tl.minimum(-t, 0.0) - l1
    return pi, mu, ls, s, inv_s, t, e, lsp, lsn


@triton.jit
def _squash(log_cdf, log_sf, SMOOTH: tl.constexpr):
    if SMOOTH:
        log_g = _logaddexp(log_cdf + _c(LOG_SPAN, log_cdf), _c(LOG_EPS, log_cdf))
        log_1mg = _logaddexp(log_sf + _c(LOG_SPAN, log_sf), _c(LOG_EPS, log_sf))
    else:
        log_g = log_cdf
        log_1mg = log_sf
    return log_g, log_1mg


@triton.jit
def _offsets(pid_b, pid_n, B, N, H, W, parity, stride_xb, stride_pb,
             PATTERN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile indices: mask, offsets of the active element in x, of its passive partner
    (patterns 1/2), of the element in the params plane, and the batch index."""
    b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (b < B)[:, None] & (n < N)[None, :]
    b64 = b.to(tl.int64)[:, None]
    n2 = n[None, :]
    p_off = b64 * stride_pb + n2
    if PATTERN == 0:
        x_off = b64 * stride_xb + n2
        pas_off = x_off
    else:
        half = W // 2
        row = n2 // half  # c * H + h
        j = n2 - row * half
        if PATTERN == 1:
            shift = (row % H + parity) % 2
        else:
            shift = parity + 0 * n2
        col = 2 * j + shift
        x_off = b64 * stride_xb + row * W + col
        pas_off = x_off + 1 - 2 * shift
    return b, mask, x_off, pas_off, p_off


# --- forward -----------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(x_ptr, p_ptr, y_ptr, part_ptr, B, N, K, H, W, parity, stride_xb, stride_pb,
                NUM_NB, SMOOTH: tl.constexpr, PATTERN: tl.constexpr,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    b, mask, x_off, pas_off, p_off = _offsets(pid_b, pid_n, B, N, H, W, parity, stride_xb,
                                              stride_pb, PATTERN, BLOCK_B, BLOCK_N)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    pbase = p_ptr + p_off
    a_raw = tl.load(pbase, mask=mask, other=0.0)
    shift_b = tl.load(pbase + N, mask=mask, other=0.0)

    ninf = tl.full(x.shape, float("-inf"), x.dtype)
    zero = tl.zeros(x.shape, x.dtype)
    m_z, s_z = ninf, zero
    m_c, s_c = ninf, zero
    m_s, s_s = ninf, zero
    m_f, s_f = ninf, zero
    for k in range(K):
        pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
            x, pbase + (2 + k) * N, pbase + (2 + K + k) * N, pbase + (2 + 2 * K + k) * N, mask)
        m_z, s_z = _lse_push(m_z, s_z, pi)
        m_c, s_c = _lse_push(m_c, s_c, pi + lsp)
        m_s, s_s = _lse_push(m_s, s_s, pi + lsn)
        m_f, s_f = _lse_push(m_f, s_f, pi + lsp + lsn - s)
    log_z = m_z + tl.log(s_z)
    log_cdf = m_c + tl.log(s_c) - log_z
    log_sf = m_s + tl.log(s_s) - log_z
    log_pdf = m_f + tl.log(s_f) - log_z
    log_g, log_1mg = _squash(log_cdf, log_sf, SMOOTH)
    alpha = _tanh(a_raw)
    y = tl.exp(alpha) * (log_g - log_1mg) + shift_b
    ld = alpha + log_pdf - log_g - log_1mg
    if SMOOTH:
        ld += _c(LOG_SPAN, ld)
    tl.store(y_ptr + x_off, y, mask=mask)
    if PATTERN != 0:
        xp = tl.load(x_ptr + pas_off, mask=mask, other=0.0)
        tl.store(y_ptr + pas_off, xp, mask=mask)
    part = tl.sum(tl.where(mask, ld, 0.0), axis=1)
    tl.store(part_ptr + b.to(tl.int64) * NUM_NB + pid_n, part, mask=b < B)


@triton.jit
def _weights(pi, s, lsp, lsn, lse_c, lse_s, lse_f):
    """Component k's weights in f, F and 1 - F: r_k = pi_k f_k / f, rF_k = pi_k F_k / F,
    rS_k = pi_k (1 - F_k) / (1 - F) (normalised by the log-sum-exps of pass 1)."""
    r = precise.exp(pi + lsp + lsn - s - lse_f)
    r_c = precise.exp(pi + lsp - lse_c)
    r_s = precise.exp(pi + lsn - lse_s)
    return r, r_c, r_s


@triton.jit
def _dl_dt(r, r_c, r_s, t, e, rho_f, rho_s):
    """dl/dt_k of l = log f - log G - log(1 - G), grouped so that nothing cancels:
    (r_k - rho_F rF_k) sigmoid(-t_k) - (r_k - rho_S rS_k) sigmoid(t_k) (csrc/coupling_kernels.h
    dl_dt has the derivation: the ungrouped r_k q_k - rho_F rF_k sigmoid(-t_k) + rho_S rS_k
    sigmoid(t_k) has terms e^7 times its value where one narrow component dominates)."""
    rcp = 1.0 / (1.0 + e)
    sig_p = tl.where(t >= 0.0, rcp, e * rcp)  # sigmoid(t)
    sig_n = tl.where(t >= 0.0, e * rcp, rcp)  # sigmoid(-t)
    return (r - rho_f * r_c) * sig_n - (r - rho_s * r_s) * sig_p


# --- backward (vector-Jacobian product of the forward or of the inverse) -----------------


@triton.jit
def _bwd_kernel(x_ptr, p_ptr, go_ptr, gl_ptr, gi_ptr, gp_ptr, B, N, K, H, W, parity,
                stride_xb, stride_pb, SMOOTH: tl.constexpr, PATTERN: tl.constexpr,
                INVERSE: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    b, mask, x_off, pas_off, p_off = _offsets(pid_b, pid_n, B, N, H, W, parity, stride_xb,
                                              stride_pb, PATTERN, BLOCK_B, BLOCK_N)
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0)
    g_out = tl.load(go_ptr + x_off, mask=mask, other=0.0)
    g_l = tl.load(gl_ptr + b, mask=b < B, other=0.0)[:, None]
    pbase = p_ptr + p_off
    gbase = gp_ptr + p_off
    a_raw = tl.load(pbase, mask=mask, other=0.0)

    # Pass 1: the four log-sum-exps.
    ninf = tl.full(x.shape, float("-inf"), x.dtype)
    zero = tl.zeros(x.shape, x.dtype)
    m_z, s_z = ninf, zero
    m_c, s_c = ninf, zero
    m_s, s_s = ninf, zero
    m_f, s_f = ninf, zero
    for k in range(K):
        pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
            x, pbase + (2 + k) * N, pbase + (2 + K + k) * N, pbase + (2 + 2 * K + k) * N, mask)
        m_z, s_z = _lse_push(m_z, s_z, pi)
        m_c, s_c = _lse_push(m_c, s_c, pi + lsp)
        m_s, s_s = _lse_push(m_s, s_s, pi + lsn)
        m_f, s_f = _lse_push(m_f, s_f, pi + lsp + lsn - s)
    log_z = m_z + precise.log(s_z)
    lse_c = m_c + precise.log(s_c)  # unnormalised (log F + log Z)
    lse_s = m_s + precise.log(s_s)
    lse_f = m_f + precise.log(s_f)
    log_cdf = lse_c - log_z
    log_sf = lse_s - log_z
    log_pdf = lse_f - log_z
    log_g, log_1mg = _squash(log_cdf, log_sf, SMOOTH)
    alpha = _tanh(a_raw)
    e_alpha = precise.exp(alpha)
    z = log_g - log_1mg
    log_j = log_pdf - log_g - log_1mg  # log dz/dx
    log_rho_f = log_cdf - log_g  # rho_F = (1 - 2 eps) F / G, 1 without smoothing
    log_rho_s = log_sf - log_1mg
    if SMOOTH:
        log_j += _c(LOG_SPAN, log_j)
        log_rho_f += _c(LOG_SPAN, log_rho_f)
        log_rho_s += _c(LOG_SPAN, log_rho_s)
    rho_f = precise.exp(log_rho_f)
    rho_s = precise.exp(log_rho_s)
    jac = precise.exp(log_j)
    om2g = precise.exp(log_1mg) - precise.exp(log_g)  # 1 - 2 G
    da = 1.0 - alpha * alpha
    # grad_theta = c_zj dz/dtheta / J + c_f dl/dtheta; mu_k and s_k act through t_k, pi_k
    # through dz/dpi = kappa (rF - rS) and dl/dpi = (r - w) - om2G kappa (rF - rS)
    if INVERSE:
        # the inverse's VJP needs d logdet / dx before the per-component pass
        l_x = zero
        for k in range(K):
            pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
                x, pbase + (2 + k) * N, pbase + (2 + K + k) * N, pbase + (2 + 2 * K + k) * N,
                mask)
            r, r_c, r_s = _weights(pi, s, lsp, lsn, lse_c, lse_s, lse_f)
            l_x += inv_s * _dl_dt(r, r_c, r_s, t, e, rho_f, rho_s)
        u = g_out - g_l * l_x
        v = u * precise.exp(-(alpha + log_j))  # dL/dy
        g_in = v
        c_zj = -u  # coefficient of dz/dtheta, times J
        c_pi = (g_l * om2g * jac - u) * precise.exp(log_cdf + log_sf - log_pdf)
        c_f = -g_l  # coefficient of dl/dtheta
        g_a = -(u * precise.exp(-log_j) * z + g_l) * da
        g_b = -v
    else:
        c_zj = g_out * e_alpha * jac
        log_kappa = log_cdf + log_sf - log_g - log_1mg
        if SMOOTH:
            log_kappa += _c(LOG_SPAN, log_kappa)
        c_pi = (g_out * e_alpha - g_l * om2g) * precise.exp(log_kappa)
        c_f = g_l + zero
        g_a = (g_out * e_alpha * z + g_l) * da
        g_b = g_out
    tl.store(gbase, g_a, mask=mask)
    tl.store(gbase + N, g_b, mask=mask)

    # Pass 2: per-component gradients, recomputed (nothing of size N x K is stored), and
    # d logdet / dx = sum_k e^{-s_k} dl/dt_k for the forward's VJP.
    l_x = zero
    for k in range(K):
        pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
            x, pbase + (2 + k) * N, pbase + (2 + K + k) * N, pbase + (2 + 2 * K + k) * N, mask)
        r, r_c, r_s = _weights(pi, s, lsp, lsn, lse_c, lse_s, lse_f)
        dl_dt = _dl_dt(r, r_c, r_s, t, e, rho_f, rho_s)
        l_x += inv_s * dl_dt
        w = precise.exp(pi - log_z)
        # dt/dmu = -e^{-s}, dt/ds = -t; log f_k also has -s_k: dl/ds_k = -t_k dl/dt_k - r_k
        g_mu = -r * c_zj - c_f * inv_s * dl_dt
        g_ls = -r * c_zj * (x - mu) - c_f * (t * dl_dt + r)
        g_ls = tl.where(ls >= LOG_SCALE_MIN, g_ls, 0.0)
        g_pi = c_pi * (r_c - r_s) + c_f * (r - w)
        tl.store(gbase + (2 + k) * N, g_pi, mask=mask)
        tl.store(gbase + (2 + K + k) * N, g_mu, mask=mask)
        tl.store(gbase + (2 + 2 * K + k) * N, g_ls, mask=mask)
    if not INVERSE:
        g_in = g_out * e_alpha * jac + g_l * l_x
    tl.store(gi_ptr + x_off, g_in, mask=mask)
    if PATTERN != 0:
        gp = tl.load(go_ptr + pas_off, mask=mask, other=0.0)
        tl.store(gi_ptr + pas_off, gp, mask=mask)


# --- inverse -----------------------------------------------------------------------------


@triton.jit
def _inv_kernel(y_ptr, p_ptr, x_ptr, part_ptr, B, N, K, H, W, parity, stride_xb, stride_pb,
                NUM_NB, max_iters, SMOOTH: tl.constexpr, PATTERN: tl.constexpr,
                NEWTON: tl.constexpr, TINY: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_N: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    b, mask, x_off, pas_off, p_off = _offsets(pid_b, pid_n, B, N, H, W, parity, stride_xb,
                                              stride_pb, PATTERN, BLOCK_B, BLOCK_N)
    y = tl.load(y_ptr + x_off, mask=mask, other=0.0)
    pbase = p_ptr + p_off
    a_raw = tl.load(pbase, mask=mask, other=0.0)
    shift_b = tl.load(pbase + N, mask=mask, other=0.0)
    alpha = _tanh(a_raw)
    z = (y - shift_b) * tl.exp(-alpha)  # logit(G)
    if SMOOTH:
        ez = tl.exp(-tl.abs(z))
        sig = tl.where(z >= 0.0, 1.0 / (1.0 + ez), ez / (1.0 + ez))
        f_star = (sig - _c(EPS, sig)) / _c(SPAN, sig)
        f_star = tl.minimum(tl.maximum(f_star, _c(TINY, sig)), _c(1.0 - TINY, sig))
        target = tl.log(f_star) - tl.log(1.0 - f_star)
    else:
        target = z

    # Bracket [min_k, max_k] of mean_k + scale_k * target, and log Z of the logits.
    ninf = tl.full(y.shape, float("-inf"), y.dtype)
    pinf = tl.full(y.shape, float("inf"), y.dtype)
    zero = tl.zeros(y.shape, y.dtype)
    m_z, s_z = ninf, zero
    lo, hi = pinf, ninf
    for k in range(K):
        pi = tl.load(pbase + (2 + k) * N, mask=mask, other=0.0)
        mu = tl.load(pbase + (2 + K + k) * N, mask=mask, other=0.0)
        ls = tl.load(pbase + (2 + 2 * K + k) * N, mask=mask, other=0.0)
        cand = mu + tl.exp(tl.maximum(ls, LOG_SCALE_MIN)) * target
        lo = tl.minimum(lo, cand)
        hi = tl.maximum(hi, cand)
        m_z, s_z = _lse_push(m_z, s_z, pi)
    log_z = m_z + tl.log(s_z)
    # Safeguarded Newton ("rtsafe") or bisection, the same algorithm as vflow/reference.py
    # solve_inverse (see there for the rules and the bound); per-element masks, no host sync.
    # The loop body is skipped once every element of the tile has converged.
    x = 0.5 * (lo + hi)
    step_prev = hi - lo
    step_prev2 = hi - lo
    done = mask == 0  # padding lanes start done
    active = tl.sum(tl.where(done, 0, 1))
    for it in range(max_iters):
        if active > 0:
            m_c, s_c = ninf, zero
            m_s, s_s = ninf, zero
            m_f, s_f = ninf, zero
            for k in range(K):
                pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
                    x, pbase + (2 + k) * N, pbase + (2 + K + k) * N,
                    pbase + (2 + 2 * K + k) * N, mask)
                m_c, s_c = _lse_push(m_c, s_c, pi + lsp)
                m_s, s_s = _lse_push(m_s, s_s, pi + lsn)
                if NEWTON:
                    m_f, s_f = _lse_push(m_f, s_f, pi + lsp + lsn - s)
            lse_c = m_c + tl.log(s_c) - log_z  # log F
            lse_s = m_s + tl.log(s_s) - log_z  # log(1 - F)
            g = lse_c - lse_s - target
            noise = _c(8.0 * TINY, g) * (tl.abs(lse_c) + tl.abs(lse_s) + tl.abs(target) + 1.0)
            at_root = tl.abs(g) <= noise
            above = g > 0.0
            new_hi = tl.where(above, x, hi)
            new_lo = tl.where(above, lo, x)
            x_new = 0.5 * (new_lo + new_hi)
            if NEWTON:
                lse_f = m_f + tl.log(s_f) - log_z  # log f
                x_newton = x - g * tl.exp(lse_c + lse_s - lse_f)  # g / g'
                # Newton only while bisection could still finish in the iterations left
                mag = tl.where(new_lo > 0.0, new_lo, tl.where(new_hi < 0.0, -new_hi, 0.0))
                mag = tl.maximum(mag, 1.0)
                left = (max_iters - it - 1).to(x.dtype)
                in_budget = (new_hi - new_lo) * tl.exp2(-left) <= _c(2.0 * TINY, x) * mag
                take = ((x_newton > new_lo) & (x_newton < new_hi)
                        & (tl.abs(x_newton - x) <= 0.5 * step_prev2) & in_budget)
                x_new = tl.where(take, x_newton, x_new)
            x_new = tl.where(at_root, x, x_new)
            step = tl.abs(x_new - x)
            converged = at_root | (step <= _c(2.0 * TINY, x) * tl.maximum(tl.abs(x), 1.0))
            converged = converged | (x != x)
            step_prev2 = tl.where(done, step_prev2, step_prev)
            step_prev = tl.where(done, step_prev, step)
            x = tl.where(done, x, x_new)
            lo = tl.where(done, lo, new_lo)
            hi = tl.where(done, hi, new_hi)
            done = done | converged
            active = tl.sum(tl.where(done, 0, 1))

    # Fused forward log-determinant at the solution.
    m_c, s_c = ninf, zero
    m_s, s_s = ninf, zero
    m_f, s_f = ninf, zero
    for k in range(K):
        pi, mu, ls, s, inv_s, t, e, lsp, lsn = _component(
            x, pbase + (2 + k) * N, pbase + (2 + K + k) * N, pbase + (2 + 2 * K + k) * N, mask)
        m_c, s_c = _lse_push(m_c, s_c, pi + lsp)
        m_s, s_s = _lse_push(m_s, s_s, pi + lsn)
        m_f, s_f = _lse_push(m_f, s_f, pi + lsp + lsn - s)
    log_cdf = m_c + tl.log(s_c) - log_z
    log_sf = m_s + tl.log(s_s) - log_z
    log_pdf = m_f + tl.log(s_f) - log_z
    log_g, log_1mg = _squash(log_cdf, log_sf, SMOOTH)
    ld = alpha + log_pdf - log_g - log_1mg
    if SMOOTH:
        ld += _c(LOG_SPAN, ld)
    tl.store(x_ptr + x_off, x, mask=mask)
    if PATTERN != 0:
        yp = tl.load(y_ptr + pas_off, mask=mask, other=0.0)
        tl.store(x_ptr + pas_off, yp, mask=mask)
    part = -tl.sum(tl.where(mask, ld, 0.0), axis=1)
    tl.store(part_ptr + b.to(tl.int64) * NUM_NB + pid_n, part, mask=b < B)


# --- launchers ---------------------------------------------------------------------------


def _interpreted() -> bool:
    """True when the kernels were built by Triton's interpreter (TRITON_INTERPRET=1 set before
    triton was imported): they then run on CPU tensors."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - other triton layouts
        return False
    return isinstance(_fwd_kernel, InterpretedFunction)


def _check(x: Tensor, params: Tensor, pattern: int, parity: int, *others: Tensor):
    """Light validation; returns (B, N, K, H, W, stride_xb, stride_pb)."""
    if x.device.type != "cuda" and not _interpreted():
        raise RuntimeError(
            f"vflow.kernels runs on CUDA tensors (got {x.device}); set TRITON_INTERPRET=1 "
            "before triton is first imported to run the kernels on CPU under the interpreter"
        )
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"vflow.kernels takes float32 or float64 tensors, got {x.dtype}; cast float16 / "
            "bfloat16 to float32 first (the kernels compute in float32 anyway)"
        )
    for t in (x, params, *others):
        if t.dtype != x.dtype:
            raise TypeError(f"all tensors must share one dtype, got {t.dtype} and {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"tensors on different devices: {t.device} and {x.device}")
    if params.dim() < 2:
        raise ValueError(f"params must be (B, 2+3K, ...), got shape {tuple(params.shape)}")
    num_p = params.shape[1]
    k = (num_p - 2) // 3
    if k < 1 or num_p != 2 + 3 * k:
        raise ValueError(f"params has {num_p} channels, expected 2 + 3K with K >= 1")
    bsz = x.shape[0]
    if pattern == PLAIN:
        h = w = 1
        expected = (bsz, num_p, *x.shape[1:])
        n = math.prod(x.shape[1:])
        stride_xb = n
    elif pattern in (CHECKERBOARD, STRIPE):
        if x.dim() != 4 or x.shape[3] % 2 != 0:
            raise ValueError(f"pattern {pattern} needs x of shape (B, C, H, W), W even; got "
                             f"{tuple(x.shape)}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        _, c, h, w = x.shape
        expected = (bsz, num_p, c, h, w // 2)
        n = c * h * (w // 2)
        stride_xb = 2 * n
    else:
        raise ValueError(f"unknown pattern code {pattern}")
    if tuple(params.shape) != expected:
        raise ValueError(f"params shape {tuple(params.shape)} does not match x: expected "
                         f"{expected}")
    return bsz, n, k, h, w, stride_xb, num_p * n


def _tiles(bsz: int, n: int, block: int):
    """(BLOCK_B, BLOCK_N, grid) of a launch with ``block`` active elements per program."""
    if block < 1 or block & (block - 1):
        raise ValueError(f"block must be a power of two, got {block}")
    block_n = min(block, triton.next_power_of_2(n))
    block_b = max(1, min(block // block_n, triton.next_power_of_2(bsz)))
    num_nb = triton.cdiv(n, block_n)
    if num_nb > MAX_GRID_Y:
        raise ValueError(f"{n} elements per sample exceed the launch grid (block {block})")
    return block_b, block_n, (triton.cdiv(bsz, block_b), num_nb)


def _device_guard(t: Tensor):
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _reduce(partials: Tensor, bsz: int) -> Tensor:
    """logdet from the (B, programs along N) partial sums: a fixed-order reduction along a
    fixed axis (no atomics), or the buffer itself when one program covers a sample."""
    if partials.numel() == bsz:
        return partials
    return partials.view(bsz, -1).sum(dim=1)


def _launch_fwd(x, params, y, geom, smooth, pattern, block, num_warps) -> Tensor:
    """One launch of the forward kernel with a (block, num_warps) tile; returns the logdet
    partial sums (B x programs along N)."""
    bsz, n, k, h, w, parity, sxb, spb = geom
    block_b, block_n, grid = _tiles(bsz, n, block)
    partials = x.new_empty(bsz * grid[1])
    _fwd_kernel[grid](x, params, y, partials, bsz, n, k, h, w, parity, sxb, spb, grid[1],
                      SMOOTH=smooth, PATTERN=pattern, BLOCK_B=block_b, BLOCK_N=block_n,
                      num_warps=num_warps)
    return partials


def _launch_bwd(x, params, grad_out, grad_logdet, grad_in, grad_params, geom, smooth, pattern,
                inverse, block, num_warps) -> None:
    """One launch of the backward kernel with a (block, num_warps) tile."""
    bsz, n, k, h, w, parity, sxb, spb = geom
    block_b, block_n, grid = _tiles(bsz, n, block)
    _bwd_kernel[grid](x, params, grad_out, grad_logdet, grad_in, grad_params, bsz, n, k, h, w,
                      parity, sxb, spb, SMOOTH=smooth, PATTERN=pattern, INVERSE=inverse,
                      BLOCK_B=block_b, BLOCK_N=block_n, num_warps=num_warps)


def _launch_inv(y, params, x, geom, smooth, pattern, max_iters, newton, block,
                num_warps) -> Tensor:
    """One launch of the inverse kernel with a (block, num_warps) tile; returns the logdet
    partial sums."""
    bsz, n, k, h, w, parity, sxb, spb = geom
    block_b, block_n, grid = _tiles(bsz, n, block)
    partials = y.new_empty(bsz * grid[1])
    _inv_kernel[grid](y, params, x, partials, bsz, n, k, h, w, parity, sxb, spb, grid[1],
                      max_iters, SMOOTH=smooth, PATTERN=pattern, NEWTON=newton,
                      TINY=torch.finfo(y.dtype).eps, BLOCK_B=block_b, BLOCK_N=block_n,
                      num_warps=num_warps)
    return partials


def coupling_fwd(x: Tensor, params: Tensor, smooth: bool, pattern: int, parity: int, *,
                 block: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Forward coupling: y (like x) and logdet (B,) in x's dtype (float32 or float64)."""
    x, params = x.contiguous(), params.contiguous()
    bsz, n, k, h, w, sxb, spb = _check(x, params, pattern, parity)
    y = torch.empty_like(x)
    if bsz == 0 or n == 0:
        y.copy_(x)
        return y, x.new_zeros(bsz)
    geom = (bsz, n, k, h, w, int(parity), sxb, spb)
    launch = functools.partial(_launch_fwd, x, params, y, geom, bool(smooth), int(pattern))
    key_args = ("fwd", x, k, n, smooth, pattern)
    with _device_guard(x):
        partials = launch(*tuning.tile_for(key_args, launch, x.device, block, num_warps))
    return y, _reduce(partials, bsz)


def coupling_bwd(x: Tensor, params: Tensor, grad_out: Tensor, grad_logdet: Tensor, smooth: bool,
                 pattern: int, parity: int, inverse: bool, *, block: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """VJP of the forward (inverse=False) or of the inverse at its output x (inverse=True)."""
    x, params = x.contiguous(), params.contiguous()
    # Incoming gradients are cast to the compute dtype (autograd may hand a float32 logdet
    # gradient to a float64 op); the saved x and params must already share one dtype.
    grad_out = grad_out.to(x.dtype).contiguous()
    grad_logdet = grad_logdet.to(x.dtype).contiguous()
    bsz, n, k, h, w, sxb, spb = _check(x, params, pattern, parity, grad_out, grad_logdet)
    if grad_out.shape != x.shape or grad_logdet.shape != (bsz,):
        raise ValueError("grad_out must be shaped like x and grad_logdet like (B,)")
    grad_in = torch.empty_like(x)
    grad_params = torch.empty_like(params)
    if bsz == 0 or n == 0:
        grad_in.copy_(grad_out)
        return grad_in, grad_params
    geom = (bsz, n, k, h, w, int(parity), sxb, spb)
    launch = functools.partial(_launch_bwd, x, params, grad_out, grad_logdet, grad_in,
                               grad_params, geom, bool(smooth), int(pattern), bool(inverse))
    key_args = ("bwd-inverse" if inverse else "bwd", x, k, n, smooth, pattern)
    with _device_guard(x):
        launch(*tuning.tile_for(key_args, launch, x.device, block, num_warps))
    return grad_in, grad_params


def coupling_inv(y: Tensor, params: Tensor, smooth: bool, pattern: int, parity: int,
                 max_iters: int, newton: bool, *, block: int | None = None,
                 num_warps: int | None = None) -> tuple[Tensor, Tensor]:
    """Inverse coupling: x (like y) and logdet = -(forward logdet at x), (B,) in y's dtype."""
    y, params = y.contiguous(), params.contiguous()
    bsz, n, k, h, w, sxb, spb = _check(y, params, pattern, parity)
    if int(max_iters) < 0:
        raise ValueError(f"max_iters must be >= 0, got {max_iters}")
    x = torch.empty_like(y)
    if bsz == 0 or n == 0:
        x.copy_(y)
        return x, y.new_zeros(bsz)
    geom = (bsz, n, k, h, w, int(parity), sxb, spb)
    launch = functools.partial(_launch_inv, y, params, x, geom, bool(smooth), int(pattern),
                               int(max_iters), bool(newton))
    key_args = ("inv-newton" if newton else "inv-bisect", y, k, n, smooth, pattern)
    with _device_guard(y):
        partials = launch(*tuning.tile_for(key_args, launch, y.device, block, num_warps))
    return x, _reduce(partials, bsz)

"""The fused C++ CPU kernels (vflow._C) against the eager oracle vflow.reference.

float64: agreement to ~1e-10. float32: the fused kernel must be no worse than eager float32,
|fused32 - ref64| <= 2 |eager32 - ref64| + atol, elementwise, for y, logdet and gradients.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vflow import reference as R
from vflow.testing import random_problem

C = pytest.importorskip(
    "vflow._C",
    reason="vflow._C is not built (pip install -e . --no-build-isolation builds it)",
)

PATTERNS = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]


def make_inputs(pattern, K, dtype, B=3, shape=(5, 7, 10), scale=1.0, xscale=2.0, gen=None):
    c, h, w = shape
    x = torch.randn(B, c, h, w, dtype=torch.float64, generator=gen) * xscale
    pshape = (B, 2 + 3 * K, c, h, w if pattern == R.PLAIN else w // 2)
    p = torch.randn(*pshape, dtype=torch.float64, generator=gen) * scale
    return x.to(dtype), p.to(dtype)


def make_invertible(pattern, K, dtype, B=3, shape=(5, 7, 10)):
    """Inputs whose CDF values stay well inside (0, 1), so that y determines x to the
    precision of the dtype even through the smooth squash (no saturated tails)."""
    x, p = make_inputs(pattern, K, torch.float64, B=B, shape=shape, xscale=1.0)
    p[:, 2 + 2 * K :].uniform_(-0.5, 1.0)
    return x.to(dtype), p.to(dtype)


def all_outputs(x, p, go, gl, smooth, pattern, parity, impl):
    y, ld = impl.coupling_fwd(x, p, smooth, pattern, parity)
    out = {"y": y, "logdet": ld}
    for inverse in (False, True):
        gi, gp = impl.coupling_bwd(x, p, go, gl, smooth, pattern, parity, inverse)
        out[f"grad_in{int(inverse)}"] = gi
        out[f"grad_params{int(inverse)}"] = gp
    return out


def assert_close64(got, ref, rtol=1e-10, atol=1e-10):
    for name in ref:
        torch.testing.assert_close(
            got[name], ref[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


def assert_no_worse_than_eager(fused, eager, ref, rel_atol=1e-5):
    for name in ref:
        r = ref[name]
        atol = rel_atol * max(1.0, r.abs().max().item())
        err_f = (fused[name].double() - r).abs()
        err_e = (eager[name].double() - r).abs()
        bad = err_f > 2 * err_e + atol
        assert not bad.any(), (
            f"{name}: fused float32 error {err_f[bad].max().item():.3e} exceeds 2x eager "
            f"({err_e[bad].max().item():.3e}) + atol {atol:.1e} at {bad.sum().item()} elements"
        )


@pytest.mark.parametrize("pattern,parity", PATTERNS)
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("K", [1, 3, 32])
def test_forward_backward_float64(pattern, parity, smooth, K):
    x, p = make_inputs(pattern, K, torch.float64)
    go = torch.randn_like(x)
    gl = torch.randn(x.shape[0], dtype=x.dtype)
    got = all_outputs(x, p, go, gl, smooth, pattern, parity, C)
    ref = all_outputs(x, p, go, gl, smooth, pattern, parity, R)
    forward_keys = ("y", "logdet", "grad_in0", "grad_params0")
    assert_close64({k: got[k] for k in forward_keys}, {k: ref[k] for k in forward_keys})
    # the inverse-mode VJP divides by dy/dx, tiny in the saturated tails these random inputs
    # reach: round-off of both implementations is amplified there (see the tight check on
    # non-saturated inputs in test_inverse_gradient_matches_reference)
    inverse_keys = ("grad_in1", "grad_params1")
    assert_close64(
        {k: got[k] for k in inverse_keys}, {k: ref[k] for k in inverse_keys}, rtol=1e-6, atol=1e-8
    )


@pytest.mark.parametrize("pattern,parity", [(0, 0), (1, 1), (2, 0)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("K", [1, 32])
def test_forward_backward_float32_vs_eager(pattern, parity, smooth, K):
    x, p = make_inputs(pattern, K, torch.float64, shape=(3, 6, 10))
    go = torch.randn_like(x)
    gl = torch.randn(x.shape[0], dtype=x.dtype)
    ref = all_outputs(x, p, go, gl, smooth, pattern, parity, R)
    f32 = [t.float() for t in (x, p, go, gl)]
    fused = all_outputs(*f32, smooth, pattern, parity, C)
    eager = all_outputs(*f32, smooth, pattern, parity, R)
    for v in fused.values():
        assert v.dtype == torch.float32
    assert_no_worse_than_eager(fused, eager, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("pattern,parity", [(0, 0), (1, 0), (2, 1)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("newton", [True, False])
@pytest.mark.parametrize("K", [1, 3, 32])
def test_inverse_reconstructs(dtype, tol, pattern, parity, smooth, newton, K):
    x, p = make_invertible(pattern, K, dtype)
    y, ld = C.coupling_fwd(x, p, smooth, pattern, parity)
    x_hat, ld_inv = C.coupling_inv(y, p, smooth, pattern, parity, 100, newton)
    err = (x_hat - x).abs() / x.abs().clamp(min=1.0)
    assert err.max().item() <= tol
    # logdet of the inverse = -(forward logdet at the returned x)
    _, ld_at = C.coupling_fwd(x_hat, p, smooth, pattern, parity)
    torch.testing.assert_close(ld_inv, -ld_at, rtol=0, atol=0)
    torch.testing.assert_close(
        ld_inv, -ld, rtol=1e-4 if dtype == torch.float32 else 1e-9, atol=1e-3
    )
    if pattern != R.PLAIN:  # passive positions pass through
        _, passive_y = R.split(y, pattern, parity)
        _, passive_x = R.split(x_hat, pattern, parity)
        assert torch.equal(passive_x, passive_y)


@pytest.mark.parametrize("smooth", [True, False])
def test_inverse_matches_reference_solver_float64(smooth):
    x, p = make_invertible(R.PLAIN, 4, torch.float64)
    y, _ = R.coupling_fwd(x, p, smooth, 0, 0)
    x_ref, ld_ref = R.coupling_inv(y, p, smooth, 0, 0, 60, False)
    x_c, ld_c = C.coupling_inv(y, p, smooth, 0, 0, 60, True)
    torch.testing.assert_close(x_c, x_ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_c, ld_ref, rtol=1e-9, atol=1e-9)


def test_inverse_float32_accuracy_vs_eager_bisection():
    x, p = make_invertible(R.PLAIN, 32, torch.float32, B=4)
    y, _ = C.coupling_fwd(x, p, True, 0, 0)
    x_eager, _ = R.coupling_inv(y, p, True, 0, 0, 60, False)
    x_c, _ = C.coupling_inv(y, p, True, 0, 0, 60, True)
    # the fused Newton solve is at least as accurate as the eager 60-step bisection
    assert (x_c - x).abs().max() <= max((x_eager - x).abs().max().item(), 1e-6)


@pytest.mark.parametrize("pattern,parity", [(0, 0), (1, 1), (2, 0)])
@pytest.mark.parametrize("smooth", [True, False])
@pytest.mark.parametrize("K", [1, 32])
def test_inverse_gradient_matches_reference(pattern, parity, smooth, K):
    x, p = make_invertible(pattern, K, torch.float64)
    y, _ = C.coupling_fwd(x, p, smooth, pattern, parity)
    x_hat, _ = C.coupling_inv(y, p, smooth, pattern, parity, 100, True)
    go = torch.randn_like(x)
    gl = torch.randn(x.shape[0], dtype=x.dtype)
    got = C.coupling_bwd(x_hat, p, go, gl, smooth, pattern, parity, True)
    ref = R.coupling_bwd(x_hat, p, go, gl, smooth, pattern, parity, True)
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pattern", [0, 1, 2])
def test_empty_batch(dtype, pattern):
    x, p = make_inputs(pattern, 3, dtype, B=0)
    y, ld = C.coupling_fwd(x, p, True, pattern, 0)
    assert y.shape == x.shape and ld.shape == (0,) and ld.dtype == dtype
    gi, gp = C.coupling_bwd(x, p, x, ld, True, pattern, 0, False)
    assert gi.shape == x.shape and gp.shape == p.shape
    xi, ldi = C.coupling_inv(y, p, True, pattern, 0, 10, True)
    assert xi.shape == x.shape and ldi.shape == (0,)


def test_odd_shapes_and_tails():
    # N not a multiple of the vector width or the chunk; checkerboard with odd H
    for shape in [(1, 1, 2), (3, 7, 6), (5, 7, 10), (2, 19, 34)]:
        for pattern in (0, 1, 2):
            x, p = make_inputs(pattern, 3, torch.float64, B=3, shape=shape)
            y, ld = C.coupling_fwd(x, p, True, pattern, 1)
            yr, ldr = R.coupling_fwd(x, p, True, pattern, 1)
            torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(ld, ldr, rtol=1e-10, atol=1e-10)


def test_plain_other_ranks():
    for shape in [(7,), (3, 5), (2, 3, 4, 5)]:
        x = torch.randn(3, *shape, dtype=torch.float64)
        p = torch.randn(3, 2 + 3 * 4, *shape, dtype=torch.float64)
        y, ld = C.coupling_fwd(x, p, False, 0, 0)
        yr, ldr = R.coupling_fwd(x, p, False, 0, 0)
        torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ld, ldr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("smooth", [True, False])
def test_extreme_parameters_finite(dtype, smooth):
    B, K, S = 4, 5, (3, 8, 8)
    x = (torch.rand(B, *S, dtype=torch.float64) * 2 - 1) * 1e4
    p = torch.empty(B, 2 + 3 * K, *S, dtype=torch.float64)
    p[:, 0].uniform_(-50, 50)
    p[:, 1].uniform_(-1e3, 1e3)
    p[:, 2 : 2 + K].uniform_(-30, 30)
    p[:, 2 + K : 2 + 2 * K].uniform_(-1e3, 1e3)
    p[:, 2 + 2 * K :].uniform_(-20, 10)
    x, p = x.to(dtype), p.to(dtype)
    y, ld = C.coupling_fwd(x, p, smooth, 0, 0)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    go = torch.randn_like(x)
    gl = torch.randn(B, dtype=dtype)
    gi, gp = C.coupling_bwd(x, p, go, gl, smooth, 0, 0, False)
    assert torch.isfinite(gi).all() and torch.isfinite(gp).all()
    if dtype == torch.float64:
        yr, ldr = R.coupling_fwd(x, p, smooth, 0, 0)
        torch.testing.assert_close(y, yr, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(ld, ldr, rtol=1e-9, atol=1e-6)
        gir, gpr = R.coupling_bwd(x, p, go, gl, smooth, 0, 0, False)
        torch.testing.assert_close(gi, gir, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(gp, gpr, rtol=1e-8, atol=1e-8)
    x_hat, ldi = C.coupling_inv(y, p, smooth, 0, 0, 200, True)
    assert torch.isfinite(x_hat).all() and torch.isfinite(ldi).all()


def test_deterministic():
    x, p = make_inputs(R.PLAIN, 32, torch.float32, B=8, shape=(3, 16, 16))
    go = torch.randn_like(x)
    gl = torch.randn(8)
    a = all_outputs(x, p, go, gl, True, 0, 0, C)
    b = all_outputs(x, p, go, gl, True, 0, 0, C)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    xa = C.coupling_inv(a["y"], p, True, 0, 0, 50, True)
    xb = C.coupling_inv(a["y"], p, True, 0, 0, 50, True)
    assert torch.equal(xa[0], xb[0]) and torch.equal(xa[1], xb[1])


def test_deterministic_across_thread_counts():
    x, p = make_inputs(R.PLAIN, 8, torch.float32, B=4, shape=(3, 16, 16))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = C.coupling_fwd(x, p, True, 0, 0)
        torch.set_num_threads(max(2, old))
        many = C.coupling_fwd(x, p, True, 0, 0)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nan_propagates(dtype):
    x, p = make_inputs(R.PLAIN, 4, dtype, B=2)
    x[0, 0, 0, 0] = float("nan")
    p[1, 5, 1, 2, 3] = float("nan")  # a mean of sample 1
    y, ld = C.coupling_fwd(x, p, True, 0, 0)
    assert torch.isnan(y[0, 0, 0, 0]) and torch.isnan(y[1, 1, 2, 3])
    assert torch.isnan(ld).all()
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0, 0, 0, 0] = False
    mask[1, 1, 2, 3] = False
    assert torch.isfinite(y[mask]).all()
    gi, gp = C.coupling_bwd(x, p, torch.ones_like(x), torch.ones(2, dtype=dtype), True, 0, 0, False)
    assert torch.isnan(gi[0, 0, 0, 0])
    xi, _ = C.coupling_inv(y, p, True, 0, 0, 30, True)
    assert torch.isnan(xi[0, 0, 0, 0])


def test_rejects_bad_inputs():
    x, p = make_inputs(R.PLAIN, 3, torch.float32, B=2)
    with pytest.raises(RuntimeError):
        C.coupling_fwd(x, p.double(), True, 0, 0)
    with pytest.raises(RuntimeError):
        C.coupling_fwd(x, p[:, :-1].contiguous(), True, 0, 0)
    with pytest.raises(RuntimeError):
        C.coupling_fwd(x, p, True, 3, 0)
    go, gl = torch.ones_like(x), torch.ones(2)
    with pytest.raises(RuntimeError, match="grad_out must be a contiguous CPU tensor of shape"):
        C.coupling_bwd(x, p, go.double(), gl, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="grad_out must be a contiguous CPU tensor of shape"):
        C.coupling_bwd(x, p, torch.ones(2, 5, 10, 7).transpose(2, 3), gl, True, 0, 0, False)
    with pytest.raises(RuntimeError, match="grad_logdet must be a contiguous CPU tensor of shape"):
        C.coupling_bwd(x, p, go, torch.ones(3), True, 0, 0, False)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_isa_fallbacks_agree(isa):
    """The baseline and AVX2 builds of the kernels (chosen with VFLOW_CPU_ISA) run and agree:
    coupling forward, backward and inverse, attention forward and backward."""
    code = (
        "import torch, vflow._C as C\n"
        "from vflow import reference as R\n"
        "torch.manual_seed(0)\n"
        "x = torch.randn(2, 3, 6, 10, dtype=torch.float64)\n"
        "p = torch.randn(2, 11, 3, 6, 5, dtype=torch.float64)\n"
        "y, ld = C.coupling_fwd(x, p, True, 1, 0)\n"
        "yr, ldr = R.coupling_fwd(x, p, True, 1, 0)\n"
        "torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)\n"
        "go = torch.randn_like(x); gl = torch.randn(2, dtype=x.dtype)\n"
        "g = C.coupling_bwd(x, p, go, gl, True, 1, 0, False)\n"
        "gr = R.coupling_bwd(x, p, go, gl, True, 1, 0, False)\n"
        "torch.testing.assert_close(g[1], gr[1], rtol=1e-10, atol=1e-10)\n"
        "xi, _ = C.coupling_inv(y.float(), p.float(), True, 1, 0, 60, True)\n"
        "assert (xi.double() - x).abs().max() < 1e-4 * max(1, x.abs().max())\n"
        "for dt in (torch.float64, torch.float32):\n"
        "    qkv = torch.randn(2, 3, 2, 4, 19, dtype=dt)\n"
        "    out, lse = C.attention_fwd(qkv)\n"
        "    q = qkv.double().requires_grad_()\n"
        "    ref = R.self_attention(q)\n"
        "    go = torch.randn_like(ref)\n"
        "    (gref,) = torch.autograd.grad(ref, q, go)\n"
        "    g = C.attention_bwd(qkv, out, lse, go.to(dt).contiguous())\n"
        "    tol = 1e-10 if dt == torch.float64 else 1e-5\n"
        "    torch.testing.assert_close(out.double(), ref.detach(), rtol=tol, atol=tol)\n"
        "    torch.testing.assert_close(g.double(), gref, rtol=tol, atol=tol)\n"
        "print(C._isa(), C._vector_bytes())\n"
    )
    env = dict(os.environ, VFLOW_CPU_ISA=isa)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    chosen, vector_bytes = out.stdout.split()
    assert chosen in (isa, "generic")
    # each build runs at its registers' native width (64-byte vectors on AVX2 ran 5x slower)
    assert int(vector_bytes) == {"avx512": 64, "avx2": 32, "generic": 16}[chosen]


def test_generic_build_passes_the_inverse_sweep():
    """The baseline build (16-byte vectors: 4 floats / 2 doubles per lane block, where AVX2
    uses 8 / 4) passes the whole cpp inverse sweep of tests/test_inverse.py: 2M elements, five
    parameter regimes, K in {1, 2, 4, 8, 32}, both variants and dtypes, max-error bounds. The
    lane-block logic (padding, per-block early exit, fast/robust path per block) differs with
    the width, so every build is checked at scale, not only the one this CPU selects."""
    env = dict(os.environ, VFLOW_CPU_ISA="generic")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            os.path.join(here, "test_inverse.py"),
            "-k",
            "test_inverse_sweep and cpp",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=os.path.dirname(here),
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "20 passed" in out.stdout, out.stdout[-1000:]
    isa = subprocess.run(
        [sys.executable, "-c", "import vflow._C as C; print(C._isa())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert isa.stdout.strip() == "generic", isa.stdout + isa.stderr


@pytest.mark.parametrize("smooth", [False, True], ids=["flowpp", "smooth"])
@pytest.mark.parametrize("regime", ["narrow", "flat", "steep", "tails"])
def test_float32_gradients_where_one_component_dominates(regime, smooth):
    """float32 gradients of the logdet (and y) against float64 at the SAME float32-rounded
    inputs, 3 x 20,000 elements per case, random output and logdet cotangents: the max error
    (relative to max(1, |g|)) is at most 6e-4. Measured: 8e-6 to 4.7e-4 (narrow, Flow++), where
    the eager reference's float32 backward has 1.1e-5 to 2.8e-4 on the same cases.

    Regression: d logdet / dx summed f'/f - 0.9 f/G + 0.9 f/(1-G), three terms each up to
    e^{-s_k} ~ e^7 that cancel to O(1) where one narrow component dominates; in float32 that
    left 1.6e-3 relative error in d logdet / dx and in the mean and log-scale gradients (found
    by a reviewer at x = 1.724..., K = 4, narrow: 0.40142 for 0.39986). The kernel now
    groups the terms by weight differences (see dl_dt in csrc/coupling_kernels.h)."""
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for k in (1, 4, 32):
        x, p = random_problem(regime, 20_000, k, seed=100 + k)
        x = x.float().double().view(200, 100)
        p = p.float().double().view(200, 100, -1).permute(0, 2, 1).contiguous()
        gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        gl = torch.randn(200, generator=gen, dtype=torch.float64)
        ref = R.coupling_bwd(x, p, gy, gl, smooth, 0, 0, False)
        got = C.coupling_bwd(x.float(), p.float(), gy.float(), gl.float(), smooth, 0, 0, False)
        for g, r in zip(got, ref, strict=True):
            err = (g.double() - r).abs() / r.abs().clamp(min=1)
            worst = max(worst, err.max().item())
    assert worst <= 6e-4, f"max float32 gradient error {worst:.2e} ({regime})"

"""The Triton kernels stay accurate under the GPU's fast math, checked on the CPU.

``kernels/_emulation.fast_math`` gives the interpreter's float32 exp / exp2 / log / log2 /
sqrt the errors of the GPU's approximate instructions (up to 2 + floor(1.173 |x|) ulp for
exp). The H200 failed ``test_float32_gradients_where_one_component_dominates[smooth-fwd-vjp]``
(3.7e-4 against 3.4e-5 for eager float32) where the interpreter passed; under the emulation
the kernels of that day fail it too (6.9e-4), and pass after the precise (libdevice) terms
of ``kernels/_precise.py``. The sweep runs > 10^6 elements of every regime under it against
float64. Interpreter only: with ``--device cuda`` the errors are real and these tests skip.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from vflow import reference as R
from vflow.testing import REGIMES, random_problem

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="emulates the GPU in Triton's interpreter"
)

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from vflow import kernels as vk  # noqa: E402
from vflow.kernels import _precise as precise  # noqa: E402
from vflow.kernels._emulation import fast_math  # noqa: E402

PLAIN = 0
BIG = 1 << 16  # tile of the sweep: the interpreter's cost is per program, numpy's per element


@pytest.fixture
def device(device):
    if device.type != "cpu":
        pytest.skip("fast-math emulation runs in the interpreter (on a GPU the errors are real)")
    return device


def f32(*ts):
    return tuple(t.float() for t in ts)


def max_relative_error(got, refs) -> float:
    """max over the tensors of max |g - ref| / max(1, |ref|)."""
    return max(
        ((g.double() - r).abs() / r.abs().clamp(min=1)).max().item()
        for g, r in zip(got, refs, strict=True)
    )


# --- the emulation itself ----------------------------------------------------------------


@triton.jit
def _unary_kernel(x_ptr, out_ptr, n, OP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=1.0)
    if OP == 0:
        y = tl.exp(x)
    elif OP == 1:
        y = tl.log(x)
    elif OP == 2:
        y = precise.exp(x)
    else:
        y = precise.log(x)
    tl.store(out_ptr + offs, y, mask=mask)


def _run(x: torch.Tensor, op: int) -> torch.Tensor:
    out = torch.empty_like(x)
    _unary_kernel[(1,)](x, out, x.numel(), OP=op, BLOCK=triton.next_power_of_2(x.numel()))
    return out


def _ulps(got: torch.Tensor, exact64: torch.Tensor) -> torch.Tensor:
    """|got - exact| in float32 ulps of the exact value."""
    spacing = torch.from_numpy(np.spacing(np.abs(exact64.float().numpy())))
    return (got.double() - exact64).abs() / spacing.double()


def test_emulation_gives_exp_its_gpu_error_and_nothing_more(device):
    x = torch.linspace(-60, 60, 4096)
    plain, plain64 = _run(x, 0), _run(x.double(), 0)  # numpy's exp, within ~2 ulp
    with fast_math(seed=3) as counts:
        fast = _run(x, 0)
        fast64 = _run(x.double(), 0)
        precise32 = _run(x, 2)
    ulps = _ulps(fast, plain.double())
    assert (ulps <= 2 + torch.floor(1.173 * x.abs()).double() + 0.5).all()  # + rounding
    assert ulps.max() > 10  # large arguments really get large errors
    assert counts["create_exp"] == x.numel()
    assert torch.equal(fast64, plain64)  # float64 is left alone
    assert _ulps(precise32, x.double().exp()).max() <= 0.5  # precise: float64, rounded once
    assert torch.equal(_run(x, 0), plain)  # restored


def test_emulation_gives_log_its_absolute_error_near_one(device):
    x = torch.cat([torch.linspace(0.5, 2.0, 2048), torch.logspace(-30, 30, 2048)])
    plain = _run(x, 1)
    with fast_math(seed=4):
        fast = _run(x, 1)
        precise32 = _run(x, 3)
    near_one = (x >= 0.5) & (x <= 2.0)
    err = (fast.double() - plain.double()).abs()
    assert err[near_one].max() <= 2.0**-21.41 + 2.0**-25  # + rounding of values below 0.7
    assert err[near_one].max() > 2.0**-22  # near log 1 = 0 that is many ulps
    assert (_ulps(fast, plain.double())[~near_one] <= 3.5).all()
    assert _ulps(precise32, x.double().log()).max() <= 0.5


def test_emulation_is_seeded_and_restored_after_an_error(device):
    x = torch.linspace(-30, 30, 512)
    plain = _run(x, 0)
    with fast_math(seed=5):
        first = _run(x, 0)
    with fast_math(seed=5):
        again = _run(x, 0)
    assert torch.equal(first, again) and not torch.equal(first, plain)
    with pytest.raises(ZeroDivisionError), fast_math(seed=6):
        _ = 1 / 0
    assert torch.equal(_run(x, 0), plain)


def test_emulation_refuses_to_run_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"), fast_math():
        pass


# --- the kernels under it ----------------------------------------------------------------


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd-vjp", "inv-vjp"])
@pytest.mark.parametrize("smooth", [False, True], ids=["flowpp", "smooth"])
def test_regression_h200_float32_gradients_where_one_component_dominates(smooth, inverse, device):
    """The test the H200 failed ([smooth-fwd-vjp], K = 1: 3.7e-4 against eager 3.4e-5), here
    under the emulated fast math: the same 3,000 narrow elements per K, the max error
    relative to max(1, |ref64|) within 3x eager float32's + 2e-5 for 4 emulation seeds.
    Before the precise terms (seed 1):
    smooth-fwd-vjp K = 1 6.9e-4, flowpp-fwd-vjp 4.3e-4, inv-vjp up to 0.13 (all failing)."""
    gen = torch.Generator().manual_seed(3)
    for k in (1, 4):
        x, p = random_problem("narrow", 3_000, k, seed=200 + k)
        x = x.float().double().view(30, 100)
        p = p.float().double().view(30, 100, -1).permute(0, 2, 1).contiguous()
        gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        gl = torch.randn(30, generator=gen, dtype=torch.float64)
        args = (smooth, PLAIN, 0, inverse)
        ref = R.coupling_bwd(x, p, gy, gl, *args)
        eager = R.coupling_bwd(*f32(x, p, gy, gl), *args)
        err_eager = max_relative_error(eager, ref)
        for seed in range(4):  # four plausible instructions: one seed passed a partial fix
            with fast_math(seed=seed):
                got = vk.coupling_bwd(*f32(x, p, gy, gl), *args)
            err = max_relative_error(got, ref)
            assert err <= 3 * err_eager + 2e-5, (k, seed, err, err_eager)


def _problem(regime: str, n: int, k: int, seed: int):
    """(B = 4, N = n / 4) float32-representable x and params (B, 2+3K, N) in float64."""
    x, p = random_problem(regime, n, k, seed=seed)
    x = x.float().double().view(4, n // 4)
    p = p.float().double().view(4, n // 4, -1).permute(0, 2, 1).contiguous()
    return x, p


# 5 regimes x K in (1, 4) x smooth in (False, True) x 2^16 = 1.31M elements through the
# forward and the backward; the inverse 5 x 2 x 2 x 2^13 = 164k (it iterates).
@pytest.mark.parametrize("regime", REGIMES)
def test_sweep_under_fast_math_against_float64(regime, device):
    """Forward (y, logdet), backward and inverse of float32 kernels under the emulated fast
    math against float64 at the same rounded inputs: the MAX error over every element within
    3x eager float32's (+ 2e-5; logdet + 1e-4), and the inverse's MAX backward error
    |forward64(x_hat) - y| within 64 eps32 (1 + |y| + |x| dy/dx + |b|), the bound of
    tests/test_inverse.py."""
    eps32 = torch.finfo(torch.float32).eps
    for k in (1, 4):
        for smooth in (False, True):
            x, p = _problem(regime, BIG, k, seed=17 + k)
            gen = torch.Generator().manual_seed(k)
            gy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            gl = torch.randn(4, generator=gen, dtype=torch.float64)
            y64, ld64 = R.coupling_fwd(x, p, smooth, PLAIN, 0)
            y32, ld32 = R.coupling_fwd(*f32(x, p), smooth, PLAIN, 0)
            g64 = R.coupling_bwd(x, p, gy, gl, smooth, PLAIN, 0, False)
            g32 = R.coupling_bwd(*f32(x, p, gy, gl), smooth, PLAIN, 0, False)
            with fast_math(seed=k + 2 * smooth):
                y, ld = vk.coupling_fwd(*f32(x, p), smooth, PLAIN, 0, block=BIG)
                g = vk.coupling_bwd(*f32(x, p, gy, gl), smooth, PLAIN, 0, False, block=BIG)
            label = f"{regime} K={k} smooth={smooth}"
            y64, ld64, y32, ld32 = (t.detach() for t in (y64, ld64, y32, ld32))
            e_y, e_y32 = max_relative_error([y], [y64]), max_relative_error([y32], [y64])
            assert e_y <= 3 * e_y32 + 2e-5, (label, "y", e_y, e_y32)
            e_ld = max_relative_error([ld], [ld64]) / (BIG // 4)  # per element of the sum
            e_ld32 = max_relative_error([ld32], [ld64]) / (BIG // 4)
            assert e_ld <= 3 * e_ld32 + 1e-4, (label, "logdet", e_ld, e_ld32)
            e_g, e_g32 = max_relative_error(g, g64), max_relative_error(g32, g64)
            assert e_g <= 3 * e_g32 + 2e-5, (label, "grad", e_g, e_g32)

            xs, ps = x[:, : BIG // 32], p[:, :, : BIG // 32].contiguous()
            ys = R.coupling_fwd(xs, ps, smooth, PLAIN, 0)[0].detach().float()
            with fast_math(seed=k + 7):
                x_hat, _ = vk.coupling_inv(ys, ps.float(), smooth, PLAIN, 0, 60, True, block=BIG)
            assert torch.isfinite(x_hat).all(), label
            y_back, ld_back = R.coupling_fwd(x_hat.double(), ps.float().double(), smooth, PLAIN, 0)
            slope = _slope(x_hat.double(), ps.float().double(), smooth)
            bound = 64 * eps32 * (1 + ys.double().abs() + x_hat.double().abs() * slope)
            bound = bound + 64 * eps32 * ps[:, 1].float().double().abs()
            ratio = ((y_back.detach() - ys.double()).abs() / bound).max().item()
            assert ratio <= 1, (label, "inverse backward error / bound", ratio)


def _slope(x: torch.Tensor, p: torch.Tensor, smooth: bool) -> torch.Tensor:
    """dy/dx per element in float64 (B, N) for params (B, 2+3K, N)."""
    flat = p.permute(0, 2, 1).reshape(-1, p.shape[1])
    _, logabsdet = R.mixlogistic_elementwise(x.reshape(-1), flat, smooth)
    return logabsdet.exp().view_as(x)

"""vflow.ops.self_attention on every backend against its formula written out in float64:
odd shapes, non-contiguous inputs, extreme scores, NaN, empty batches, half precision,
gradients, torch.library registration, torch.compile and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vflow import ops

FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
BACKENDS = ["reference", *FUSED]
needs_cpp = pytest.mark.skipif("cpp" not in FUSED, reason="vflow._C not built")

# (B, heads, d, T): single position, tails of the 16- and 8-lane vectors, every fused head
# size 1..8, and heads of 12 channels (above MAX_FUSED_HEAD_DIM: torch's SDPA on every backend)
SHAPES = [
    (1, 1, 1, 1),
    (3, 2, 4, 17),
    (2, 3, 3, 33),
    (2, 1, 2, 8),
    (1, 2, 5, 40),
    (2, 2, 6, 7),
    (1, 1, 7, 24),
    (2, 4, 8, 50),
    (2, 1, 12, 9),
]


def formula(qkv):
    """out[b, n, c, i] = sum_j softmax_j(q[:, i] . k[:, j] / sqrt(d)) v[c, j]."""
    q, k, v = qkv.unbind(1)
    scores = torch.einsum("bnci,bncj->bnij", q, k) / q.shape[2] ** 0.5
    return torch.einsum("bnij,bncj->bnci", scores.softmax(-1), v)


def value_and_grad(fn, qkv, grad_out):
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (grad,) = torch.autograd.grad(out, qkv, grad_out.to(out.dtype))
    return out.detach(), grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_formula_float64(backend, shape):
    b, heads, d, t = shape
    qkv = torch.randn(b, 3, heads, d, t, dtype=torch.float64) * 2
    grad_out = torch.randn(b, heads, d, t, dtype=torch.float64)
    out, grad = value_and_grad(lambda a: ops.self_attention(a, backend=backend), qkv, grad_out)
    ref_out, ref_grad = value_and_grad(formula, qkv, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 2, 4, 17), (2, 4, 8, 64), (2, 4, 4, 256)])
def test_float32_no_worse_than_eager(backend, shape):
    """|fused32 - ref64| <= 2 |eager32 - ref64| + 1e-5 max|ref64|, elementwise."""
    b, heads, d, t = shape
    qkv = torch.randn(b, 3, heads, d, t, dtype=torch.float64) * 2
    grad_out = torch.randn(b, heads, d, t, dtype=torch.float64)
    ref = value_and_grad(formula, qkv, grad_out)
    eager = value_and_grad(formula, qkv.float(), grad_out)
    got = value_and_grad(lambda a: ops.self_attention(a, backend=backend), qkv.float(), grad_out)
    for name, r, e, g in zip(("out", "grad"), ref, eager, got, strict=True):
        assert g.dtype == torch.float32
        err_got, err_eager = (g.double() - r).abs(), (e.double() - r).abs()
        bad = err_got > 2 * err_eager + 1e-5 * r.abs().max()
        assert not bad.any(), f"{name}: error {err_got[bad].max():.3e} at {bad.sum()} elements"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_input(backend):
    """A channels_last 1x1 conv output viewed as (B, 3, heads, d, H*W), and a strided slice."""
    b, heads, d, h, w = 2, 2, 4, 3, 5
    conv_out = torch.randn(b, 3 * heads * d, h, w, dtype=torch.float64)
    views = [
        conv_out.to(memory_format=torch.channels_last).view(b, 3, heads, d, h * w),
        torch.randn(b, 3, heads, d, 2 * h * w, dtype=torch.float64)[..., ::2],
    ]
    for qkv in views:
        assert not qkv.is_contiguous()
        grad_out = torch.randn(b, heads, d, qkv.shape[-1], dtype=torch.float64)
        got = value_and_grad(lambda a: ops.self_attention(a, backend=backend), qkv, grad_out)
        ref = value_and_grad(formula, qkv.contiguous(), grad_out)
        for a, r in zip(got, ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [30.0, 1e3])
def test_extreme_scores(backend, scale):
    """Saturated softmax (scores up to ~1e6 apart) and a large common offset of the scores:
    finite, and equal to the formula in float64."""
    qkv = torch.randn(2, 3, 2, 4, 19, dtype=torch.float64)
    qkv[:, :2] *= scale
    qkv[:, 1] += 5.0  # k + 5: shifts every score of a query by 5 sum_c q_c
    grad_out = torch.randn(2, 2, 4, 19, dtype=torch.float64)
    got = value_and_grad(lambda a: ops.self_attention(a, backend=backend), qkv, grad_out)
    ref = value_and_grad(formula, qkv, grad_out)
    for a, r in zip(got, ref, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-8, atol=1e-8 * r.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_stays_in_its_sample_and_head(backend):
    qkv = torch.randn(3, 3, 2, 4, 10)
    qkv[1, 1, 0, 2, 7] = float("nan")  # one key channel of sample 1, head 0
    out = ops.self_attention(qkv, backend=backend)
    assert out[1, 0].isnan().all()
    clean = torch.ones_like(out, dtype=torch.bool)
    clean[1, 0] = False
    assert torch.isfinite(out[clean]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    qkv = torch.randn(0, 3, 2, 4, 10, requires_grad=True)
    out = ops.self_attention(qkv, backend=backend)
    assert out.shape == (0, 2, 4, 10)
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape


@needs_cpp
def test_cpp_backend_runs_the_kernel_up_to_its_head_size(monkeypatch):
    """d <= MAX_FUSED_HEAD_DIM on the cpp backend runs vflow::attention_fwd; larger heads and
    the reference backend run SDPA (reference.self_attention)."""
    assert ops.MAX_FUSED_HEAD_DIM == 8
    sdpa_calls = []
    sdpa = ops.reference.self_attention
    monkeypatch.setattr(
        ops.reference, "self_attention", lambda qkv: sdpa_calls.append(qkv.shape[3]) or sdpa(qkv)
    )
    for d, backend in [(8, "cpp"), (9, "cpp"), (4, "reference")]:
        qkv = torch.randn(2, 3, 2, d, 5)
        with torch.profiler.profile() as prof:
            ops.self_attention(qkv, backend=backend)
        fused = any(e.key == "vflow::attention_fwd" for e in prof.key_averages())
        assert fused == (backend == "cpp" and d <= 8), (d, backend)
    assert sdpa_calls == [9, 4]


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    qkv = torch.randn(2, 3, 2, 4, 12).to(dtype)
    out = ops.self_attention(qkv, backend="cpp")
    assert out.dtype == dtype
    torch.testing.assert_close(out, formula(qkv.float()).to(dtype))


@needs_cpp
def test_gradcheck():
    qkv = torch.randn(2, 3, 2, 3, 11, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: ops.self_attention(a, backend="cpp"), (qkv,))


@needs_cpp
def test_opcheck():
    qkv = torch.randn(2, 3, 2, 4, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.vflow.attention_fwd.default, (qkv,))
    out, lse = torch.ops.vflow.attention_fwd(qkv.detach())
    torch.library.opcheck(
        torch.ops.vflow.attention_bwd.default, (qkv.detach(), out, lse, torch.randn_like(out))
    )


@needs_cpp
def test_torch_compile_fullgraph_matches_eager():
    qkv = torch.randn(2, 3, 2, 4, 12, requires_grad=True)

    def loss(a):
        return ops.self_attention(a, backend="cpp").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager_loss, compiled_loss = loss(qkv), compiled(qkv)
    torch.testing.assert_close(compiled_loss, eager_loss)
    (g_eager,) = torch.autograd.grad(eager_loss, qkv)
    (g_compiled,) = torch.autograd.grad(compiled_loss, qkv)
    torch.testing.assert_close(g_compiled, g_eager)


@needs_cpp
def test_deterministic():
    qkv = torch.randn(8, 3, 4, 4, 64)
    assert torch.equal(
        ops.self_attention(qkv, backend="cpp"), ops.self_attention(qkv, backend="cpp")
    )


BAD_CALLS = [
    (lambda: ops.self_attention([1.0]), TypeError, "qkv must be a torch.Tensor"),
    (
        lambda: ops.self_attention(torch.ones(1, 3, 1, 4, 5, dtype=torch.long)),
        TypeError,
        "qkv must be a floating-point",
    ),
    (lambda: ops.self_attention(torch.randn(1, 3, 4, 5)), ValueError, "qkv must have shape"),
    (lambda: ops.self_attention(torch.randn(1, 2, 1, 4, 5)), ValueError, "qkv must have shape"),
    (lambda: ops.self_attention(torch.randn(1, 3, 1, 4, 0)), ValueError, "one position"),
    (lambda: ops.self_attention(torch.randn(1, 3, 1, 0, 5)), ValueError, "one channel per head"),
    (
        lambda: ops.self_attention(torch.randn(1, 3, 1, 4, 5), backend="gpu"),
        ValueError,
        "backend must be one of",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_CALLS)
def test_bad_input_is_named(call, error, message):
    with pytest.raises(error, match=message):
        call()


@needs_cpp
def test_kernel_checks_its_arguments():
    import vflow._C as C

    with pytest.raises(RuntimeError, match="head size d must be in \\[1, 8\\]"):
        C.attention_fwd(torch.randn(1, 3, 1, 9, 4))
    qkv = torch.randn(1, 3, 2, 4, 6)
    out, lse = C.attention_fwd(qkv)
    with pytest.raises(RuntimeError, match="lse must be a contiguous CPU tensor of shape"):
        C.attention_bwd(qkv, out, lse[:, :, :5].contiguous(), out)
    with pytest.raises(RuntimeError, match="grad_out must be"):
        C.attention_bwd(qkv, out, lse, out.double())


@needs_cpp
def test_benchmark_script_quick_run(tmp_path):
    """benchmarks/attention.py --quick writes a row per shape with every provider's time and
    an error against float64 at float32 level (speed is measured there, not asserted here)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "attention.py"
    out = tmp_path / "attention.json"
    cmd = [sys.executable, str(script), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["B"], r["heads"], r["d"], r["T"]) for r in rows] == [(8, 4, 4, 16), (8, 4, 8, 64)]
    for r in rows:
        for provider in ("fused", "sdpa", "eager"):
            assert r[f"{provider}_us"] > 0
            assert r[f"{provider}_err"] < 1e-4
        assert r["fused_vs_sdpa"] == pytest.approx(r["sdpa_us"] / r["fused_us"])

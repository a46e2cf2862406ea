"""The inverse of the MoL coupling is exact everywhere: regression inputs and a sweep of
millions of random elements from nasty parameter regimes, on every backend, checked against
the float64 forward (backward error, MAX over all elements), not against a solver."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vflow import ops, reference
from vflow.testing import REGIMES, random_problem

FUSED = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
BACKENDS = ["reference", *FUSED]
DTYPES = [torch.float32, torch.float64]
EPS32 = torch.finfo(torch.float32).eps


def forward64(x, params, smooth):
    """y = forward(x) and dy/dx per element, in float64 (the oracle)."""
    y, logabsdet = reference.mixlogistic_elementwise(x.double(), params.double(), smooth)
    return y, logabsdet.exp()


def backward_error_bound(y, x_hat, slope, dtype):
    """The largest |forward64(x_hat) - y| a correct inverse may leave, per element.

    float64: 1e-9 relative to max(1, |y|).
    float32: the solver sees y, b and the mixture only to float32 rounding and evaluates
    logit F with absolute noise ~ eps32 (|log F| + |log(1 - F)| + |logit F*| + 1), i.e.
    ~ eps32 (1 + |y| + |b|) in y; x itself is rounded to float32, which moves y by
    eps32 |x| dy/dx. The bound is 64 eps32 (1 + |y| + |x| dy/dx) plus 64 eps32 |b| (b enters
    y additively).
    """
    if dtype == torch.float64:
        return 1e-9 * y.abs().clamp(min=1)
    return 64 * EPS32 * (1 + y.abs() + x_hat.abs() * slope)


def check_inverse(x, params, smooth, backend, dtype, method="newton", label=""):
    """Invert y = forward64(x) in ``dtype`` on ``backend``; assert the MAX backward error
    (and, in float64 where dy/dx >= 1e-3, the x error) is within bounds. Returns the worst
    ratio error / bound, for the caller's report."""
    y64, slope_true = forward64(x, params, smooth)
    y, p = y64.to(dtype), params.to(dtype)
    x_hat, logdet = ops.mixlogistic_coupling_inverse(
        y, p, smooth=smooth, method=method, backend=backend
    )
    y_back, slope = forward64(x_hat, p, smooth)
    bound = backward_error_bound(y.double(), x_hat.double(), slope, dtype)
    bound = bound + (64 * EPS32 * p[:, 1].double().abs() if dtype == torch.float32 else 0)
    err = (y_back - y.double()).abs()
    ratio = err / bound
    worst = int(torch.nan_to_num(ratio, nan=math.inf).argmax())
    assert torch.isfinite(x_hat).all(), f"{label}: non-finite x"
    assert float(ratio[worst]) <= 1, (
        f"{label}: |forward(x_hat) - y| = {float(err[worst]):.3g} > bound "
        f"{float(bound[worst]):.3g} at element {worst} (x = {float(x[worst])!r}, "
        f"x_hat = {float(x_hat[worst])!r}); {int((ratio > 1).sum())} of {len(x)} elements fail"
    )
    if dtype == torch.float64:
        well = slope_true >= 1e-3
        x_err = ((x_hat - x).abs() / x.abs().clamp(min=1))[well]
        assert x_err.numel() == 0 or float(x_err.max()) <= 1e-9, f"{label}: x error"
    assert torch.isfinite(logdet).all()
    return float(ratio.max())


# --- named regression inputs (each was found failing once) ---------------------------------


def params_of(a_raw, b, logits, means, log_scales):
    """One element's params (1, 2+3K) in float64."""
    return torch.tensor([[a_raw, b, *logits, *means, *log_scales]], dtype=torch.float64)


TWO_CYCLE = params_of(
    0.331,
    0.677,
    (-0.125, -0.187, -0.328, -0.04, 1.0, -0.071, -0.876, -0.362),
    (-0.157, 2.957, -0.542, -2.08, -0.248, 2.31, 0.726, 0.951),
    (-2.83, 0.945, 0.789, 0.69, 0.051, 0.831, -2.432, -2.722),
)
FLAT_MIDPOINT = params_of(0.0, 0.0, (0.0,) * 4, (-3.0, -1.0, 1.0, 3.0), (-7.0,) * 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_regression_newton_two_cycle(backend, dtype):
    """K = 8, Flow++: the old Newton 2-cycled between ~0.50 and ~1.47 (every Newton point
    inside the bracket was accepted, the bracket shrank ~1% per iteration) and returned
    1.46335 instead of 0.963 on reference and cpp."""
    x = torch.tensor([0.963], dtype=torch.float64)
    check_inverse(x, TWO_CYCLE, False, backend, dtype, label="two-cycle")
    y, _ = forward64(x, TWO_CYCLE, False)
    x_hat, _ = ops.mixlogistic_coupling_inverse(
        y.to(dtype), TWO_CYCLE.to(dtype), smooth=False, backend=backend
    )
    assert abs(float(x_hat[0]) - 0.963) <= (1e-9 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True])
def test_regression_root_at_flat_midpoint(backend, dtype, smooth):
    """Four steps at -3, -1, 1, 3 (log-scales at the -7 clamp): y = forward(0) = 0 sits on a
    flat stretch where the pdf underflows. The old cpp solver found the root at the bracket
    midpoint and then replaced it by the midpoint of a bracket side: x = 1.5, off by
    forward(x) - y = 1.10 (Flow++) / 0.97 (smooth)."""
    x = torch.tensor([0.0], dtype=torch.float64)
    check_inverse(x, FLAT_MIDPOINT, smooth, backend, dtype, label="flat midpoint")
    for method in ("newton", "bisection"):
        x_hat, _ = ops.mixlogistic_coupling_inverse(
            torch.zeros(1, dtype=dtype),
            FLAT_MIDPOINT.to(dtype),
            smooth=smooth,
            method=method,
            backend=backend,
        )
        assert -0.9 < float(x_hat[0]) < 0.9, method  # inside the flat stretch around 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_regression_vector_input(backend, dtype):
    """y of shape (B,) with params (B, 2+3K) (S empty) is valid input; the reference backend
    raised IndexError summing the logdet over S."""
    x, params = random_problem("well", 7, 3, seed=1, dtype=dtype)
    y, logdet = ops.mixlogistic_coupling(x, params, backend=backend)
    x_hat, logdet_inv = ops.mixlogistic_coupling_inverse(y, params, backend=backend)
    assert x_hat.shape == (7,) and logdet.shape == (7,) and logdet_inv.shape == (7,)
    _, per_element = reference.mixlogistic_elementwise(x.double(), params.double(), True)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(logdet.double(), per_element, atol=tol, rtol=tol)
    torch.testing.assert_close(logdet_inv.double(), -per_element, atol=tol * 10, rtol=tol * 10)


# --- property-based: any single element ---------------------------------------------------


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def single_elements(draw):
    """One element: K in 1..6, parameters from wide ranges (log-scales down to -12, below the
    clamp), x near a component or far out in its tails."""
    k = draw(st.integers(1, 6))
    logits = [draw(finite.filter(lambda v: abs(v) <= 20)) for _ in range(k)]
    means = [draw(finite.filter(lambda v: abs(v) <= 50)) for _ in range(k)]
    log_scales = [draw(st.floats(-12.0, 4.0)) for _ in range(k)]
    a_raw, b = draw(st.floats(-8.0, 8.0)), draw(st.floats(-10.0, 10.0))
    anchor = means[draw(st.integers(0, k - 1))]
    x = anchor + draw(st.floats(-60.0, 60.0)) * math.exp(draw(st.floats(-7.0, 2.0)))
    return torch.tensor([x], dtype=torch.float64), params_of(a_raw, b, logits, means, log_scales)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("smooth", [False, True], ids=["flowpp", "smooth"])
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(element=single_elements())
def test_inverse_property(backend, smooth, element):
    """forward(inverse(y)) == y to float64 rounding for any single element."""
    x, params = element
    for method in ("newton", "bisection"):
        check_inverse(x, params, smooth, backend, torch.float64, method=method, label=method)


# --- the sweep --------------------------------------------------------------------------------

# Elements per (regime, K, smooth) cell and dtype: 5 regimes x 2 variants x the K below.
# cpp: 5 x 2 x (20k x 5 K) x 2 dtypes = 2.0M elements; reference: 1.0M; triton: 10k.
SWEEP = {
    "cpp": {1: 20_000, 2: 20_000, 4: 20_000, 8: 20_000, 32: 20_000},
    "reference": {1: 16_000, 2: 14_000, 4: 10_000, 8: 6_000, 32: 4_000},
    "triton": {1: 200, 2: 200, 4: 200, 8: 200, 32: 200},
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("smooth", [False, True], ids=["flowpp", "smooth"])
@pytest.mark.parametrize("regime", REGIMES)
def test_inverse_sweep(backend, dtype, smooth, regime):
    """Every element of every K: |forward(x_hat) - y| within the backward-error bound."""
    for k, n in SWEEP[backend].items():
        seed = 1000 * k + REGIMES.index(regime) * 10 + int(smooth)
        x, params = random_problem(regime, n, k, seed=seed)
        check_inverse(x, params, smooth, backend, dtype, label=f"{regime} K={k} {dtype}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regime", ["well", "flat"])
def test_bisection_sweep(backend, regime):
    """method="bisection" meets the same bounds (it is the slow, always-safe fallback)."""
    for k in (1, 4, 32):
        x, params = random_problem(regime, 2_000 if backend != "triton" else 100, k, seed=k)
        for dtype in DTYPES:
            check_inverse(x, params, True, backend, dtype, method="bisection", label=regime)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("newton", [True, False])
def test_fused_solver_follows_the_reference_algorithm(backend, newton):
    """The fused kernels run the reference's algorithm: in float64, on nasty elements, the
    same x to rounding for every iteration budget (including budgets too small to converge,
    where the iterates are compared mid-flight)."""
    x, params = random_problem("flat", 300, 8, seed=5)
    y, _ = forward64(x, params, False)
    for iters in (1, 2, 5, 100):
        x_ref, _ = reference.coupling_inv(y, params, False, reference.PLAIN, 0, iters, newton)
        x_fused, _ = ops._kernels(backend).coupling_inv(
            y, params, False, reference.PLAIN, 0, iters, newton
        )
        agree = (x_fused - x_ref).abs() <= 1e-9 * x_ref.abs().clamp(min=1)
        # an element may take another branch where a comparison is decided by rounding
        assert agree.float().mean() >= 0.99, (iters, int((~agree).sum()))


def test_newton_budget_falls_back_to_bisection():
    """With a budget too small for Newton to be safe, the solver bisects: with max_iters
    equal to the halvings needed, Newton still reaches the tolerance on the two-cycle input
    and on a bracket that needs every halving."""
    y, _ = forward64(torch.tensor([0.963], dtype=torch.float64), TWO_CYCLE, False)
    _, lo, hi = reference.inverse_bracket(y, TWO_CYCLE, False)
    halvings = math.ceil(math.log2(float(hi - lo) / (2 * torch.finfo(torch.float64).eps))) + 2
    for backend in BACKENDS:
        x_hat, _ = ops.mixlogistic_coupling_inverse(
            y, TWO_CYCLE, smooth=False, max_iters=halvings, backend=backend
        )
        assert abs(float(x_hat[0]) - 0.963) <= 1e-12, backend


def test_iterations_are_few():
    """The safeguards do not cost Newton its speed: mean iterations on the well-conditioned
    regime stay below 10 (bisection needs ~50 in float64)."""
    x, params = random_problem("well", 4_000, 8, seed=3)
    y, _ = forward64(x, params, True)
    _, iterations = reference.solve_inverse(y, params, True, 100, True)
    assert float(iterations.double().mean()) < 10
    _, iterations = reference.solve_inverse(y, params, True, 100, False)
    assert float(iterations.double().mean()) > 30


# --- whole-model sampling ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_digits_model():
    """vflow-digits after 30 Adam steps on the digits (enough to move every coupling away
    from its near-identity initialisation), on one thread (tiny convolutions)."""
    import vflow
    from vflow.data import load_digits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        images = load_digits("train").images.long()
        model = vflow.build("vflow-digits")
        model.initialize(images[:128])
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(30):
            batch = images[torch.randint(0, len(images), (64,))]
            loss = -model.elbo(batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    yield model.eval()
    torch.set_num_threads(threads)


def sample_values(model, n, chunk, seed):
    """The continuous images v (before floor) that sample() would produce for ``n`` draws:
    the same noise for every call (drawn in float64, cast to the model's dtype)."""
    out = []
    dtype = next(model.parameters()).dtype
    for i in range(n // chunk):
        gen = torch.Generator().manual_seed(seed + i)
        eps = torch.randn(chunk, *model.latent_shape, generator=gen, dtype=torch.float64)
        with torch.no_grad():
            xz, _ = model.p_flow.inverse(eps.to(dtype))
            v, _ = model.preprocess.inverse(xz[:, : model.config.data_shape[0]])
        out.append(v)
    return torch.cat(out)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_equals_a_200_step_bisection_inverse(trained_digits_model, monkeypatch, dtype):
    """10^4 images from a trained model, every coupling inverted by the default Newton and by
    a 200-step bisection, on the same noise. float64: the same integer images. float32: an
    image may differ only where a pixel lies within float32 noise of a bin edge (both solvers
    are at float32 precision; 30 layers of inverses amplify it to ~1e-4 in pixel units)."""
    import copy
    import functools

    model = copy.deepcopy(trained_digits_model).to(dtype)
    n, chunk, n_bins = 10_000, 2_500, model.config.n_bins
    fast = sample_values(model, n, chunk, seed=1234)
    for name in ("mixlogistic_coupling_inverse", "checkerboard_coupling_inverse"):
        slow_op = functools.partial(getattr(ops, name), method="bisection", max_iters=200)
        monkeypatch.setattr(ops, name, slow_op)
    slow = sample_values(model, n, chunk, seed=1234)
    fast_img, slow_img = (v.floor().clamp(0, n_bins - 1).long() for v in (fast, slow))
    differ = fast_img != slow_img
    if dtype == torch.float64:
        assert int(differ.flatten(1).any(1).sum()) == 0, "float64 images differ"
        assert float((fast - slow).abs().max()) < 1e-8
    else:
        near_edge = (fast - fast.round()).abs() < 1e-3
        assert bool(near_edge[differ].all()), "a float32 pixel differs away from a bin edge"
        assert int(differ.flatten(1).any(1).sum()) <= n // 1000


# --- found by a new-user pass: bad arguments -------------------------------------------------


def test_parity_and_budget_arguments_are_checked():
    y = torch.randn(1, 1, 2, 4)
    params = torch.randn(1, 5, 1, 2, 2)
    with pytest.raises(ValueError, match="parity must be 0 or 1 \\(an int\\)"):
        ops.checkerboard_coupling_inverse(y, params, parity=1.0)
    with pytest.raises(ValueError, match="max_iters must be at most"):
        ops.mixlogistic_coupling_inverse(torch.randn(1, 3), torch.randn(1, 5, 3), max_iters=2**31)

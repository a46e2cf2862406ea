"""Tile tuning of the Triton coupling kernels (kernels/_tuning.py, issue 28).

On CPU the kernels run under Triton's interpreter, which ignores ``num_warps`` and where
times mean nothing: these tests check that every candidate tile computes the same results as
the default tile (against float64 too), and the tuning logic (fastest candidate, one tuning
per key, never while a graph is captured, on the CPU, or for an explicit tile) with a fake
timer. ``pytest --device cuda`` runs the equivalence with real warps and a real tuning run.
"""

from __future__ import annotations

import functools

import pytest
import torch

from vflow import reference as R

pytest.importorskip("triton")
vk = pytest.importorskip("vflow.kernels")
tuning = pytest.importorskip("vflow.kernels._tuning")

CHECKERBOARD = R.CHECKERBOARD
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _fresh_tuning():
    """Every test starts with tuning off and no tile chosen, and leaves it so."""
    was = tuning.autotune_enabled()
    tuning.set_autotune(False)
    tuning.clear_tuned_tiles()
    yield
    tuning.set_autotune(was)
    tuning.clear_tuned_tiles()


def _inputs(device, batch=3, shape=(2, 12, 24), k=3, seed=0):
    """float32 x (B, C, H, W) and checkerboard params (B, 2+3K, C, H, W/2): N = 288 active
    elements per sample, so blocks of 128 and 256 leave masked tails; float64 copies."""
    gen = torch.Generator().manual_seed(seed)
    c, h, w = shape
    x = torch.randn(batch, c, h, w, generator=gen, dtype=torch.float64)
    params = torch.randn(batch, 2 + 3 * k, c, h, w // 2, generator=gen, dtype=torch.float64)
    params[:, 2 + 2 * k :] = 0.5 * params[:, 2 + 2 * k :] - 0.5  # log-scales near -0.5
    return x.float().to(device), params.float().to(device), x, params


def _all_outputs(x, params, go, gl, block=None, num_warps=None):
    """(y, logdet, grads of the forward, grads of the inverse, x_hat, inverse logdet) of the
    checkerboard coupling with one tile."""
    tile = dict(block=block, num_warps=num_warps)
    y, ld = vk.coupling_fwd(x, params, True, CHECKERBOARD, 1, **tile)
    gi, gp = vk.coupling_bwd(x, params, go, gl, True, CHECKERBOARD, 1, False, **tile)
    gi_inv, gp_inv = vk.coupling_bwd(x, params, go, gl, True, CHECKERBOARD, 1, True, **tile)
    xi, li = vk.coupling_inv(y, params, True, CHECKERBOARD, 1, 30, True, **tile)
    return dict(y=y, ld=ld, gi=gi, gp=gp, gi_inv=gi_inv, gp_inv=gp_inv, xi=xi, li=li)


@pytest.mark.parametrize("block, num_warps", tuning.CANDIDATES)
def test_every_candidate_tile_gives_the_default_tiles_results(block, num_warps, device):
    """A tile only decides which program computes an element: every per-element output equals
    the default tile's (bitwise under the interpreter), the logdets (per-tile partial sums)
    agree to float32 rounding, and the forward matches float64."""
    x, params, x64, p64 = _inputs(device)
    go = torch.randn_like(x)
    gl = torch.randn(x.shape[0], device=device)
    want = _all_outputs(x, params, go, gl)
    got = _all_outputs(x, params, go, gl, block, num_warps)
    for name in ("y", "gi", "gp", "gi_inv", "gp_inv", "xi"):
        if device.type == "cpu":
            assert torch.equal(got[name], want[name]), name
        else:  # compiled per num_warps: allow the last bit
            torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)
    for name in ("ld", "li"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-4)
    y64, ld64 = R.coupling_fwd(x64, p64, True, CHECKERBOARD, 1)
    assert (got["y"].double().cpu() - y64).abs().max() < 1e-4
    assert (got["ld"].double().cpu() - ld64).abs().max() < 1e-3


# --- the tuning logic, with a fake timer ---------------------------------------------------


class FakeTimer:
    """Stands in for ``_tuning._bench_ms``: the time of a tile from ``times`` (default 1 ms),
    after running the launch once, as do_bench would."""

    def __init__(self, times=None):
        self.times = times or {}
        self.timed: list[tuple[int, int]] = []

    def __call__(self, launch: functools.partial) -> float:
        launch()
        tile = tuple(launch.args[-2:])
        self.timed.append(tile)
        return self.times.get(tile, 1.0)


def _fake_launch(calls, block, num_warps):
    calls.append((block, num_warps))


def _key_args(batch=64, n=512, kernel="fwd"):
    """tile_for's key arguments of a float32 launch (tuning_key's x: dtype, device, batch)."""
    return (kernel, torch.empty(batch, 1), 4, n, True, CHECKERBOARD)


@pytest.fixture
def fake_gpu(monkeypatch):
    """Tuning on, no graph being captured, and a fake timer: the CUDA branch without a GPU."""
    timer = FakeTimer()
    monkeypatch.setattr(tuning, "_bench_ms", timer)
    monkeypatch.setattr(tuning, "_capturing", lambda: False)
    tuning.set_autotune(True)
    return timer


def test_tuning_picks_the_fastest_candidate_once_per_key(fake_gpu):
    fastest = tuning.CANDIDATES[-2]
    fake_gpu.times = {tile: 2.0 for tile in tuning.CANDIDATES} | {fastest: 0.5}
    calls = []
    launch = functools.partial(_fake_launch, calls)
    key = tuning.tuning_key(*_key_args())
    assert key == ("fwd", "torch.float32", "cpu", 4, CHECKERBOARD, True, 512, 64)
    assert tuning.tile_for(_key_args(), launch, CUDA) == fastest
    assert fake_gpu.timed == list(tuning.CANDIDATES)  # each candidate timed once
    assert calls == list(tuning.CANDIDATES)  # ... by running it
    assert tuning.tile_for(_key_args(batch=40, n=300), launch, CUDA) == fastest  # same bucket
    assert len(fake_gpu.timed) == len(tuning.CANDIDATES)
    assert tuning.tuned_tiles() == {key: fastest}
    assert tuning.tile_for(_key_args(batch=65), launch, CUDA) == fastest  # next bucket
    assert len(fake_gpu.timed) == 2 * len(tuning.CANDIDATES)


def test_ties_go_to_the_first_candidate(fake_gpu):
    assert (
        tuning.tile_for(_key_args(), functools.partial(_fake_launch, []), CUDA)
        == (tuning.CANDIDATES[0])
    )


def test_no_tuning_while_a_graph_is_captured(fake_gpu, monkeypatch):
    monkeypatch.setattr(tuning, "_capturing", lambda: True)
    launch = functools.partial(_fake_launch, [])
    assert tuning.tile_for(_key_args(), launch, CUDA) == (tuning.DEFAULT_BLOCK, tuning.NUM_WARPS)
    assert fake_gpu.timed == [] and tuning.tuned_tiles() == {}


def test_no_tuning_on_cpu_when_off_or_for_an_explicit_tile(fake_gpu):
    launch = functools.partial(_fake_launch, [])
    default = (tuning.DEFAULT_BLOCK, tuning.NUM_WARPS)
    assert tuning.tile_for(_key_args(), launch, torch.device("cpu")) == default
    assert tuning.tile_for(_key_args(), launch, CUDA, block=64) == (64, tuning.NUM_WARPS)
    assert tuning.tile_for(_key_args(), launch, CUDA, num_warps=8) == (tuning.DEFAULT_BLOCK, 8)
    tuning.set_autotune(False)
    assert tuning.tile_for(_key_args(), launch, CUDA) == default
    assert fake_gpu.timed == []


@pytest.mark.parametrize("num_warps", [0, 3, 64])
def test_bad_num_warps_is_named(num_warps):
    with pytest.raises(ValueError, match="num_warps must be a power of two"):
        tuning.tile_for(_key_args(), functools.partial(_fake_launch, []), CUDA, num_warps=num_warps)


class RecordingKernel:
    """Stands in for a Triton kernel object: records the (BLOCK_B * BLOCK_N, num_warps) of each
    launch, then launches the real kernel."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        return functools.partial(self._launch, grid)

    def _launch(self, grid, *args, **kwargs):
        self.log.append((kwargs["BLOCK_B"] * kwargs["BLOCK_N"], kwargs["num_warps"]))
        return self.kernel[grid](*args, **kwargs)


@pytest.fixture
def launched(monkeypatch):
    """The tiles the coupling launchers launch with, in order."""
    from vflow.kernels import _coupling

    log = []
    interpreted = _coupling._interpreted()  # it looks at the kernel objects replaced below
    monkeypatch.setattr(_coupling, "_interpreted", lambda: interpreted)
    for name in ("_fwd_kernel", "_bwd_kernel", "_inv_kernel"):
        monkeypatch.setattr(_coupling, name, RecordingKernel(getattr(_coupling, name), log))
    return log


@pytest.mark.parametrize("newton", [True, False])
def test_launchers_launch_with_the_tuned_tile(fake_gpu, monkeypatch, launched, newton):
    """The launchers hand tile_for one key per kernel and mode, time the candidates by
    launching them, and then launch with the tile it returns (the interpreter runs on CPU
    tensors, so the device test is faked)."""
    monkeypatch.setattr(tuning, "_may_tune", lambda device: True)
    fake_gpu.times = {(512, 8): 0.1}
    x, params, _, _ = _inputs(torch.device("cpu"))
    go, gl = torch.randn_like(x), torch.randn(x.shape[0])
    y, ld = vk.coupling_fwd(x, params, True, CHECKERBOARD, 1)
    gi, gp = vk.coupling_bwd(x, params, go, gl, True, CHECKERBOARD, 1, False)
    gi_inv, gp_inv = vk.coupling_bwd(x, params, go, gl, True, CHECKERBOARD, 1, True)
    xi, li = vk.coupling_inv(y, params, True, CHECKERBOARD, 1, 30, newton)
    n = len(tuning.CANDIDATES)
    per_kernel = list(tuning.CANDIDATES) + [(512, 8)]  # the timed candidates, then the launch
    assert launched == 4 * per_kernel and len(launched) == 4 * (n + 1)
    inverse = "inv-newton" if newton else "inv-bisect"
    assert sorted(key[0] for key in tuning.tuned_tiles()) == sorted(
        ["fwd", "bwd", "bwd-inverse", inverse]
    )
    key = next(k for k in tuning.tuned_tiles() if k[0] == "fwd")
    assert key == ("fwd", "torch.float32", "cpu", 3, CHECKERBOARD, True, 512, 4)
    fixed = _all_outputs(x, params, go, gl, block=512, num_warps=8)
    for name, got in dict(y=y, ld=ld, gi=gi, gp=gp, gi_inv=gi_inv, gp_inv=gp_inv).items():
        assert torch.equal(got, fixed[name]), name


def test_explicit_tile_is_launched(launched):
    x, params, _, _ = _inputs(torch.device("cpu"))
    vk.coupling_fwd(x, params, True, CHECKERBOARD, 1, block=128, num_warps=32)
    vk.coupling_inv(x, params, True, CHECKERBOARD, 1, 5, False, num_warps=2)
    assert launched == [(128, 32), (tuning.DEFAULT_BLOCK, 2)]


def test_a_failing_candidate_is_passed_over(fake_gpu, monkeypatch):
    """A candidate that cannot compile or launch is skipped; if none runs, the default tile
    is kept for the key, and the key is not tuned again."""
    broken = tuning.CANDIDATES[0]

    def launch(block, num_warps):
        if (block, num_warps) == broken or fail_all:
            raise RuntimeError("out of resources (simulated)")

    fail_all = False
    fake_gpu.times = {broken: 0.01}  # would win if it ran
    assert tuning.tile_for(_key_args(), launch, CUDA) == tuning.CANDIDATES[1]
    fail_all = True
    key_args = _key_args(batch=1000)
    assert tuning.tile_for(key_args, launch, CUDA) == (tuning.DEFAULT_BLOCK, tuning.NUM_WARPS)
    timed = len(fake_gpu.timed)
    assert tuning.tile_for(key_args, launch, CUDA) == (tuning.DEFAULT_BLOCK, tuning.NUM_WARPS)
    assert len(fake_gpu.timed) == timed  # cached, not tuned again


def test_float64_candidates_hold_at_most_two_elements_per_thread():
    assert tuning.candidates(torch.float32) == tuning.CANDIDATES
    f64 = tuning.candidates(torch.float64)
    assert f64 and set(f64) < set(tuning.CANDIDATES)
    assert all(block <= 64 * warps for block, warps in f64)
    assert (tuning.DEFAULT_BLOCK, tuning.NUM_WARPS) in f64


@pytest.mark.parametrize("capturing", [True, False])
def test_capture_check_asks_torch(monkeypatch, capturing):
    """_capturing is torch.cuda.is_current_stream_capturing() where CUDA is available."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing)
    assert tuning._capturing() is capturing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert tuning._capturing() is False


@pytest.mark.parametrize(
    "value, on",
    [
        ("1", True),
        (" TRUE ", True),
        ("yes", True),
        ("on", True),
        ("0", False),
        ("", False),
        ("false", False),
        ("2", False),
    ],
)
def test_environment_variable_turns_tuning_on(monkeypatch, value, on):
    """VFLOW_TRITON_AUTOTUNE at import: 1 / true / yes / on (any case, blanks ignored) turn
    tuning on, anything else leaves it off."""
    import importlib

    monkeypatch.setenv("VFLOW_TRITON_AUTOTUNE", value)
    assert importlib.reload(tuning).autotune_enabled() is on
    monkeypatch.delenv("VFLOW_TRITON_AUTOTUNE")
    assert importlib.reload(tuning).autotune_enabled() is False


def test_real_tuning_on_gpu(device):
    """On a GPU: tuning times the candidates for real, keeps one, and the tuned launch gives
    the default tile's per-element results."""
    if device.type != "cuda":
        pytest.skip("real tuning needs a GPU (--device cuda)")
    x, params, _, _ = _inputs(device, batch=16, shape=(3, 32, 32), k=8)
    go, gl = torch.randn_like(x), torch.randn(x.shape[0], device=device)
    want = _all_outputs(x, params, go, gl)
    tuning.set_autotune(True)
    got = _all_outputs(x, params, go, gl)
    assert len(tuning.tuned_tiles()) == 4
    assert set(tuning.tuned_tiles().values()) <= set(tuning.CANDIDATES)
    for name in ("y", "gi", "gp", "xi"):
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6)

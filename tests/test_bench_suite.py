"""benchmarks/: the bandwidth model (_bandwidth.py), coupling.py's kernel-only providers and
table, and the pytest-benchmark suite, run at tiny sizes in a subprocess as CI's check that
`pytest benchmarks/ --benchmark-only` works and records what it should."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _bandwidth as BW  # noqa: E402
import coupling as C  # noqa: E402

CPU = torch.device("cpu")


def test_coupling_bytes_by_hand_at_the_cifar_shape():
    # x half (64, 3, 32, 16): 98,304 floats; params (64, 98, 3, 32, 16): 9,633,792 floats
    dims = C.ALL_SHAPES["cifar"][:5]
    assert BW.coupling_bytes("forward", dims) == 4 * (98_304 + 9_633_792 + 98_304)
    assert BW.coupling_bytes("inverse", dims) == 39_321_600
    assert BW.coupling_bytes("checkerboard", dims) == 4 * (2 * 196_608 + 9_633_792)
    # forward (x, params, y) + backward (x, params, dy, dx, dparams)
    assert BW.coupling_bytes("fwdbwd", dims) == 39_321_600 + 4 * (3 * 98_304 + 2 * 9_633_792)
    with pytest.raises(ValueError):
        BW.coupling_bytes("sideways", dims)


@pytest.mark.parametrize("mode", C.MODES)
def test_coupling_bytes_are_the_tensors_of_the_call(mode):
    """Each tensor the call reads or writes, counted once from the case's real tensors."""
    case = C.Case(mode, C.ALL_SHAPES["tiny"], CPU, torch.float32)
    out = case.call(C.providers_for(mode, CPU, False)["eager"])()
    if mode == "fwdbwd":
        x, p, gy, _ = case.inputs
        tensors = [x, p, x, x, p, gy, *out]  # forward x, params, y; backward x, params, dy, dx, dp
    else:
        tensors = [*case.inputs, out[0]]
    assert case.bytes_moved == sum(t.numel() * t.element_size() for t in tensors)


def test_bandwidth_arithmetic_and_table_row():
    assert BW.gbps(2_000_000_000, 1000.0) == pytest.approx(2.0)
    assert BW.gbps(39_321_600, 0.02) == pytest.approx(1966.08)
    row = dict(provider="cpp", ms=2.0, kernel_ms=0.5, gbps=10.0, kernel_gbps=40.0, err=1e-6)
    line = C.format_row("tiny", "forward", row, 0.1, peak_gbps=200.0).split()
    # ms, kernel ms, op/kern, x eager, x compile, max err, % peak, kern %pk, extra/in, floor
    want = ["2.000", "0.500", "4.00", "-", "-", "1.0e-06", "5.00", "20.00", "-", "0.100"]
    assert line[3:] == want
    eager = C.format_row("tiny", "forward", dict(provider="eager", ms=1.0, gbps=1.0, err=0), 1, 1)
    assert eager.split()[4:6] == ["-", "-"]  # no kernel columns for the eager provider


@pytest.mark.parametrize(
    "name, gbps, key",
    [
        ("NVIDIA H200", 4800, "H200"),
        ("NVIDIA H100 80GB HBM3", 3350, "H100"),
        ("NVIDIA H100 PCIe", 2000, "H100 PCIe"),
        ("NVIDIA GH200 480GB", 4000, "GH200"),
        ("NVIDIA A100-SXM4-80GB", 2039, "A100-SXM4-80GB"),
        ("NVIDIA A100-SXM4-40GB", 1555, "A100"),
        ("NVIDIA L40S", 864, "L40S"),
    ],
)
def test_spec_table_picks_the_longest_matching_name(name, gbps, key):
    assert BW.spec_gbps(name) == (gbps, key)


def test_device_peak_spec_or_measured_copy(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    assert BW.device_peak(cuda) == (4800.0, "spec of NVIDIA H200, table entry 'H200'")
    # unknown name, no clock / bus width: the measured copy, and the output says so
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU 9000")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d=None: SimpleNamespace())
    monkeypatch.setattr(BW, "copy_gbps", lambda device, mb: 123.0)
    assert BW.spec_gbps("Fake GPU 9000") is None
    gbps, source = BW.device_peak(cuda, 64)
    assert gbps == 123.0 and source.startswith("measured 64 MiB copy")
    monkeypatch.undo()
    gbps, source = BW.device_peak(CPU, 8)  # the CPU: always measured
    assert math.isfinite(gbps) and gbps > 0 and "measured" in source


def test_timed_calls_sync_on_cuda_only(monkeypatch):
    """pytest-benchmark's timer does not sync: the suites time C.synced(call, device)."""
    log = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append(("sync", device)))

    def call():
        log.append("call")
        return 7

    assert C.synced(call, CPU) is call
    assert C.synced(call, torch.device("cuda"))() == 7
    assert log == ["call", ("sync", torch.device("cuda"))]


@pytest.mark.parametrize("mode", C.MODES)
def test_kernel_providers_are_the_ops_without_the_op_layer(mode):
    """The bare cpp kernel call gives the public op's results (inverse: also bisection)."""
    case = C.Case(mode, C.ALL_SHAPES["tiny"], CPU, torch.float32)
    ops = C.providers_for(mode, CPU, False)
    kernels = C.kernel_providers_for(mode, CPU)
    names = [n for n in kernels if n.startswith("cpp")]
    assert names == (["cpp", "cpp-bisect"] if mode == "inverse" else ["cpp"])
    for name in names:
        got, want = case.call(kernels[name])(), case.call(ops[name])()
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_benchmark_suite_at_tiny_sizes(tmp_path):
    """`pytest benchmarks/ --benchmark-only` at --bench-size tiny, one round each: every
    group and provider is there, with its error and byte count in extra_info."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "benchmarks/", "-q", "-p", "no:cacheprovider"]
    cmd += ["--bench-size", "tiny", "--benchmark-only", f"--benchmark-json={out}"]
    cmd += ["--benchmark-max-time=0", "--benchmark-min-rounds=1", "--benchmark-warmup=off"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["commit_info"]["id"] and data["machine_info"]["machine"]
    got = {}
    for b in data["benchmarks"]:
        got.setdefault(b["group"], {})[b["params"].get("provider") or b["params"]["backend"]] = b
        assert b["stats"]["rounds"] >= 1 and b["stats"]["median"] > 0
    expected = {f"tiny-{m}" for m in C.MODES} | {"model_step-vflow-digits-b4"}
    assert set(got) == expected
    for mode in C.MODES:
        names = set(C.providers_for(mode, CPU, False))
        names |= {f"{n}-kernel" for n in C.kernel_providers_for(mode, CPU)}
        assert {"eager", "cpp", "cpp-kernel"} <= names
        rows = got[f"tiny-{mode}"]
        assert set(rows) == names
        for row in rows.values():
            info = row["extra_info"]
            assert 0 <= info["max_err"] <= 1e-3
            assert info["bytes_moved"] == BW.coupling_bytes(mode, C.ALL_SHAPES["tiny"][:5])
            assert info["gbps"] > 0
    steps = got["model_step-vflow-digits-b4"]
    assert set(steps) == {"reference", "cpp"}
    assert steps["cpp"]["extra_info"]["max_grad_diff_vs_reference"] <= 1e-3


def test_tuned_provider_turns_tuning_on_for_its_call_only():
    """coupling.py's ``triton-tuned`` rows: the provider runs with the tile tuning on (forward
    and backward inside the call) and leaves it as it found it, also when the call raises."""
    kernels = pytest.importorskip("vflow.kernels")
    seen = []

    def provider(x):
        seen.append(kernels.autotune_enabled())
        if x is None:
            raise RuntimeError("boom")
        return x

    was = kernels.autotune_enabled()
    kernels.set_autotune(False)
    try:
        assert C.tuned(provider)(3) == 3
        with pytest.raises(RuntimeError, match="boom"):
            C.tuned(provider)(None)
        assert seen == [True, True] and not kernels.autotune_enabled()
    finally:
        kernels.set_autotune(was)

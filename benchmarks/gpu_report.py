"""One command for a GPU machine: tests, kernel benchmark, training step and sampling.

    python benchmarks/gpu_report.py --out results/gpu_report            # CUDA, at most 8 minutes
    python benchmarks/gpu_report.py --dry-run --out /tmp/gpu_report     # CPU, tiny sizes

writes ``report.md`` and ``report.json`` into ``--out``. Sections, in this order, each in its own
subprocess with its own time limit (a crash, a hang, an out-of-memory error or an exception in
one is recorded in the report, with the partial results it had, and the next section runs):

* ``environment``  torch / Triton / device, the backends vflow finds, the device's memory
  bandwidth: its spec (memory clock x bus width, or a table of known devices) and a measured
  device-to-device copy;
* ``tests``        ``pytest --device cuda`` on the tests that run on the device
  (``tests/test_triton_kernels.py`` and ``tests/test_tile_tuning.py``, without the sm_90
  ahead-of-time compile tests, which need no GPU, and the CUDA tests of
  ``tests/test_step.py``): pass / fail / skip counts and the failures' summary lines;
* ``train_step``   the trainer's whole iteration (``vflow.step.TrainStep``: forward, backward,
  clipping, fused Adam, EMA; no host reads) of ``vflow-cifar10`` at batch 64 on the fused
  (Triton) backend: eager and replayed as a CUDA graph (``GraphedStep``), with float32 and
  with bf16 networks; ms per iteration over back-to-back iterations, images/s, peak memory,
  the graph's speed-up over eager;
* ``profile``      torch.profiler of one eager and one graphed iteration: wall time, kernel
  launches, the GPU's busy fraction (kernel time over wall time) and the top kernels;
* ``train_plain``, ``train_checkpointing``  the bare loss + backward step of
  ``benchmarks/model_step.py`` (the numbers of ``../shared/notes/gpu-h200.md``), plain and
  with ``model.set_activation_checkpointing(True)`` ("not available" where the model has no
  such method): the first step's time (Triton compilation included), the median step time and
  peak memory (``torch.cuda.max_memory_allocated``, and its growth over what the process held
  before the step);
* ``sample``       ``model.sample(64)`` of ``vflow-cifar10`` (the fused Newton inverse): time and
  peak memory;
* ``coupling``     ``benchmarks/coupling.py``'s cases on the device (eager reference,
  ``torch.compile`` of it, the Triton kernels): time, speed-ups, max error, and the effective
  bandwidth of each call (the bytes it must move at least, below) against the device's peak.

``--dry-run`` runs the same code on the CPU at tiny sizes (``vflow-digits`` at batch 4, the
coupling's ``tiny`` shape, a two-test selection of the test file run under Triton's
interpreter, no torch.compile unless ``--compile``) in well under a minute of compute; CI runs
it (tests/test_gpu_report.py).

Bandwidth model of the coupling rows: ``_bandwidth.coupling_bytes`` (each tensor the call
must read or write counted once). ``% peak`` is GB/s over the spec bandwidth (``_bandwidth``'s
table by device name, else memory clock x bus width), over the measured copy where no spec is
known. ``kernel ms`` is the bare kernel call under the op (``coupling.kernel_providers_for``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # vflow from this checkout, also when it is not pip-installed
    sys.path.insert(0, str(ROOT))
if str(HERE) not in sys.path:  # coupling.py, _bandwidth.py, model_step.py
    sys.path.insert(0, str(HERE))

from _bandwidth import copy_gbps, spec_peak  # noqa: E402


def _child_env(device: str) -> dict:
    """The environment of the section processes: this checkout first on the path, and no
    Triton interpreter on a GPU."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if device.startswith("cuda"):
        env.pop("TRITON_INTERPRET", None)
    return env


SECTIONS = [
    "environment",
    "tests",
    "train_step",
    "profile",
    "coupling",
    "train_plain",
    "train_checkpointing",
    "sample",
]
TRAIN_VARIANTS = {
    "train_plain": "plain",
    "train_checkpointing": "checkpointing",
}

# The full run on a GPU: section time limits (seconds) within a total of TOTAL_BUDGET; a
# section never takes the time the sections after it are guaranteed (RESERVE each).
GPU = dict(
    device="cuda",
    config="vflow-cifar10",
    batch=64,
    repeats=5,
    sample_n=64,
    sample_repeats=2,
    coupling_shapes=["cifar", "vflow16", "k4", "cifar_b256"],
    coupling_modes=["forward", "fwdbwd", "inverse", "checkerboard"],
    coupling_min_run_time=0.2,
    compile=True,
    copy_mb=1024,
    pytest_args=[
        "tests/test_triton_kernels.py",
        "tests/test_tile_tuning.py",
        "tests/test_step.py",
        "-k",
        "not compile_for_sm90_without_gpu and (triton or cuda or tile_tuning)",
    ],
    budgets=dict(
        environment=30,
        tests=180,
        train_step=100,
        profile=45,
        coupling=150,
        train_plain=35,
        train_checkpointing=35,
        sample=25,
    ),
    total_budget=470,
    reserve=15,
)
DRY = dict(
    GPU,
    device="cpu",
    config="vflow-digits",
    batch=4,
    repeats=1,
    sample_n=4,
    sample_repeats=1,
    coupling_shapes=["tiny"],
    coupling_min_run_time=0.01,
    compile=False,
    copy_mb=16,
    pytest_args=[
        "tests/test_triton_kernels.py",
        "-k",
        "test_empty_batch or test_rejects_other_dtypes",
    ],
    budgets=dict(
        environment=120,
        tests=240,
        train_step=180,
        profile=120,
        coupling=240,
        train_plain=180,
        train_checkpointing=180,
        sample=180,
    ),
    total_budget=1500,
    reserve=20,
)

# ============================================================================ sections (child)


class Partial:
    """The section's result so far, rewritten to the result file after every update, so that
    a section that times out or crashes still leaves what it had measured."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict = {}

    def update(self, **kw) -> None:
        self.data.update(kw)
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=_json_default))
        os.replace(tmp, self.path)


def _json_default(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return str(obj)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _memory(device) -> dict:
    """Allocated / peak-allocated / peak-reserved MiB on CUDA; the process's peak RSS on CPU."""
    import resource

    import torch

    if torch.device(device).type == "cuda":
        return dict(
            allocated_mb=torch.cuda.memory_allocated() / 2**20,
            peak_mb=torch.cuda.max_memory_allocated() / 2**20,
            peak_reserved_mb=torch.cuda.max_memory_reserved() / 2**20,
        )
    return dict(peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def section_environment(s: dict, out: Partial) -> None:
    import platform

    import torch

    info = dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        device=s["device"],
        cpu_threads=torch.get_num_threads(),
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as e:  # noqa: BLE001 - recorded
        info["triton"] = f"not importable: {e}"
    from vflow import ops

    info["vflow_backends"] = list(ops.available_backends(s["device"]))
    device = torch.device(s["device"])
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            name=p.name,
            capability=f"{p.major}.{p.minor}",
            total_memory_gb=p.total_memory / 1e9,
            multiprocessors=p.multi_processor_count,
        )
        spec = spec_peak(device)
        if spec:
            info["peak_gbps_spec"], info["peak_source"] = spec
    else:
        info["name"] = platform.processor() or platform.machine()
    out.update(**info)
    out.update(copy_gbps=copy_gbps(device, s["copy_mb"]))


def section_tests(s: dict, out: Partial) -> None:
    """pytest --device DEVICE on the selection, in a subprocess that stops before the section's
    time limit; counts from the JUnit XML, or from the progress line after a timeout."""
    xml = out.path.with_name("tests_junit.xml")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "--device",
        s["device"],
        f"--junitxml={xml}",
        *s["pytest_args"],
    ]
    out.update(command=" ".join(cmd[1:]))
    env = _child_env(s["device"])
    timeout = max(5.0, s["time_limit"] - 10)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
        )
        text, rc, timed_out = proc.stdout + proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as e:
        text = _text(e.stdout) + _text(e.stderr)
        rc, timed_out = None, True
    counts = _junit_counts(xml) if not timed_out and xml.exists() else _progress_counts(text)
    failures = [ln for ln in text.splitlines() if ln.startswith(("FAILED", "ERROR"))]
    out.update(
        returncode=rc,
        timed_out=timed_out,
        seconds=time.perf_counter() - t0,
        failures=failures[:30],
        tail=text[-1500:] if (rc not in (0, None) or timed_out) else "",
        **counts,
    )
    if timed_out:
        raise TimeoutError(f"pytest stopped after {timeout:.0f}s; counts are those before it")
    if not counts.get("passed"):
        raise RuntimeError(f"pytest exit code {rc}: no test passed (all skipped or none collected)")
    if rc != 0 or counts.get("failed", 0) or counts.get("errors", 0):
        raise RuntimeError(
            f"pytest exit code {rc}: {counts.get('failed', 0)} failed, "
            f"{counts.get('errors', 0)} errors"
        )


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def _junit_counts(xml: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(xml).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = dict(tests=0, failures=0, errors=0, skipped=0)
    for suite in suites:
        for key in tot:
            tot[key] += int(suite.get(key, 0))
    failed, errors, skipped = tot["failures"], tot["errors"], tot["skipped"]
    return dict(
        collected=tot["tests"],
        passed=tot["tests"] - failed - errors - skipped,
        failed=failed,
        errors=errors,
        skipped=skipped,
    )


def _progress_counts(text: str) -> dict:
    """Counts from pytest -q progress lines ("..F.s  [ 40%]") of a run that did not finish."""
    marks = "".join(
        m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?\s*$", text, re.M)
    )
    return dict(
        collected=None,
        passed=marks.count(".") + marks.count("X"),
        failed=marks.count("F"),
        errors=marks.count("E"),
        skipped=marks.count("s") + marks.count("x"),
    )


def _model_step():
    sys.path.insert(0, str(HERE))
    import model_step

    return model_step


def _build(s: dict, backend: str | None = None):
    """vflow.build(config) on the device, seeded and initialised on a random batch (model_step's
    builder), with the fused backend of the device (reference where there is none)."""
    from types import SimpleNamespace

    ms = _model_step()
    backend = backend or ms._fused_backend(s["device"]) or "reference"
    args = SimpleNamespace(config=s["config"], device=s["device"], batch=s["batch"])
    model, x = ms._build(args, backend)
    return model, x, backend


def section_train(s: dict, out: Partial, variant: str) -> None:
    import torch

    ms = _model_step()
    device = s["device"]
    out.update(config=s["config"], batch=s["batch"], variant=variant)
    model, x, backend = _build(s)
    out.update(backend=backend)
    if variant == "checkpointing":
        if not callable(getattr(model, "set_activation_checkpointing", None)):
            out.update(not_available="model has no set_activation_checkpointing")
            return
        model.set_activation_checkpointing(True)
    model.train()
    step = ms._step_fn(model, model.bpd, x)
    _reset_peak(device)
    before = _memory(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    out.update(first_step_s=time.perf_counter() - t0, loss_bpd=float(loss))
    _reset_peak(device)
    times = ms._time(step, s["repeats"], device)
    mem = _memory(device)
    res = dict(
        step_ms=1e3 * sorted(times)[len(times) // 2],
        step_ms_all=[1e3 * t for t in times],
        images_per_s=x.shape[0] / sorted(times)[len(times) // 2],
        **mem,
    )
    if "peak_mb" in mem:
        res["step_growth_mb"] = mem["peak_mb"] - before["allocated_mb"]
    elif callable(getattr(ms, "_step_growth", None)):
        try:  # CPU: model_step's RSS-based growth of a step
            res["step_growth_mb"] = ms._step_growth(step, device)
        except Exception as e:  # noqa: BLE001 - recorded
            res["step_growth_mb_error"] = repr(e)
    res["loss_finite"] = bool(torch.isfinite(loss).item())
    out.update(**res)


# ---------------------------------------------------------------- the trainer's iteration

TRAIN_STEP_VARIANTS = [  # (row name, bf16 nets, CUDA graph)
    ("eager fp32", False, False),
    ("graphed fp32", False, True),
    ("eager bf16 nets", True, False),
    ("graphed bf16 nets", True, True),
]


def _bf16_nets(model) -> None:
    """bf16 autocast of the conditioning and context networks (the model's own option
    where it has one, else model_step.py's wrapper)."""
    if callable(getattr(model, "set_precision", None)):
        model.set_precision("bf16-nets")
    else:
        _model_step()._wrap_nets(model, "fused+bf16")


def _trainer_iteration(s: dict, model, x, graphed: bool):
    """The trainer's whole iteration (vflow.step.TrainStep: forward, backward, clipping,
    fused Adam, EMA, metrics) on ``model``, replayed as a CUDA graph if ``graphed``; returns
    ``(call, history)``."""
    import torch

    from vflow.recipe import get_recipe
    from vflow.step import EMA, GraphedStep, StepHistory, TrainStep
    from vflow.train import _ElboObjective

    recipe = get_recipe(s["config"])
    history = StepHistory(1024, torch.device(s["device"]))
    dims = math.prod(x.shape[1:])
    ema = EMA(model, recipe["ema_decay"])
    step = TrainStep(_ElboObjective(model), model, ema, recipe, dims, history, capturable=graphed)
    return (GraphedStep(step) if graphed else step), history


def _time_iterations(call, history, x, n: int, device) -> tuple[float, list]:
    """Seconds per iteration over ``n`` back-to-back iterations (one sync at the end: the
    host runs ahead, as in training), and the ``(loss, grad_norm, ok)`` rows of all the
    iterations since the history was last read."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        call(x)
    _sync(device)
    return (time.perf_counter() - t0) / n, history.read()


def section_train_step(s: dict, out: Partial) -> None:
    """The trainer's iteration of ``config`` at ``batch``: eager and CUDA-graphed, float32
    and bf16 nets. The first four calls are the graph's three eager warm-ups and its
    capture; a graph row's ms is then one replay."""
    import torch

    device = torch.device(s["device"])
    rows = []
    out.update(config=s["config"], batch=s["batch"], rows=rows)
    for name, bf16, graphed in TRAIN_STEP_VARIANTS:
        if graphed and device.type != "cuda":
            rows.append(dict(variant=name, status="not available", reason="needs CUDA"))
            out.flush()
            continue
        model, x, backend = _build(s)
        if bf16:
            _bf16_nets(model)
        call, history = _trainer_iteration(s, model, x, graphed)
        _reset_peak(device)
        t0 = time.perf_counter()
        for _ in range(4):
            call(x)
        _sync(device)
        first = time.perf_counter() - t0
        seconds, metrics = _time_iterations(call, history, x, 2 * s["repeats"], device)
        rows.append(
            dict(
                variant=name,
                status="ok",
                backend=backend,
                first_four_s=first,
                step_ms=1e3 * seconds,
                images_per_s=x.shape[0] / seconds,
                loss_bpd=metrics[-1][0],
                skipped=sum(not ok for _, _, ok in metrics),
                **_memory(device),
            )
        )
        out.flush()
        del model, call, history
        _reset_peak(device)
    eager = {r["variant"]: r.get("step_ms") for r in rows}
    for r in rows:
        base = eager.get(r["variant"].replace("graphed", "eager"))
        if r["variant"].startswith("graphed") and r.get("step_ms") and base:
            r["speedup_vs_eager"] = base / r["step_ms"]
    out.flush()


def section_profile(s: dict, out: Partial) -> None:
    """torch.profiler of one eager and (on CUDA) one graphed iteration: wall time, the
    device's busy fraction (kernel time / wall time), kernel launches and the top kernels
    (on the CPU: the top ops by self CPU time)."""
    import torch

    device = torch.device(s["device"])
    results = []
    out.update(config=s["config"], batch=s["batch"], iterations=results)
    for graphed in (False, True) if device.type == "cuda" else (False,):
        model, x, _ = _build(s)
        call, history = _trainer_iteration(s, model, x, graphed)
        for _ in range(4):
            call(x)
        _sync(device)
        results.append(dict(graphed=graphed, **_profile_one(call, x, device)))
        history.read()
        out.flush()
        del model, call, history
        _reset_peak(device)


def _profile_one(call, x, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        call(x)
        _sync(device)
        wall = time.perf_counter() - t0
    return dict(wall_ms=1e3 * wall, **_profile_summary(prof, wall, device))


def _profile_summary(prof, wall: float, device) -> dict:
    """Kernel count, busy fraction and top-10 of a profile (CPU: ops and self CPU time)."""
    events = prof.events()
    if device.type == "cuda":
        kernels = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
        busy = sum(e.time_range.elapsed_us() for e in kernels) * 1e-6
        launches = sum(
            1
            for e in events
            if e.name in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx")
        )
        graph_launches = sum(1 for e in events if e.name == "cudaGraphLaunch")
        top = sorted(
            prof.key_averages(),
            key=lambda a: getattr(a, "self_device_time_total", 0),
            reverse=True,
        )[:10]
        return dict(
            kernels=len(kernels),
            kernel_launch_calls=launches,
            graph_launch_calls=graph_launches,
            device_busy_fraction=busy / wall if wall > 0 else None,
            top=[
                dict(
                    name=a.key[:80], ms=getattr(a, "self_device_time_total", 0) / 1e3, calls=a.count
                )
                for a in top
            ],
        )
    ops = [e for e in events if e.name.startswith("aten::")]
    top = sorted(prof.key_averages(), key=lambda a: a.self_cpu_time_total, reverse=True)[:10]
    return dict(
        aten_ops=len(ops),
        top=[dict(name=a.key[:80], ms=a.self_cpu_time_total / 1e3, calls=a.count) for a in top],
    )


def section_sample(s: dict, out: Partial) -> None:
    import torch

    device = s["device"]
    model, _, backend = _build(s)
    model.eval()
    n = s["sample_n"]
    out.update(config=s["config"], n=n, backend=backend)
    with torch.no_grad():
        _reset_peak(device)
        t0 = time.perf_counter()
        img = model.sample(n)
        _sync(device)
        out.update(first_call_s=time.perf_counter() - t0)
        _reset_peak(device)
        times = []
        for _ in range(s["sample_repeats"]):
            _sync(device)
            t0 = time.perf_counter()
            img = model.sample(n)
            _sync(device)
            times.append(time.perf_counter() - t0)
    lo, hi = int(img.min()), int(img.max())
    out.update(
        sample_ms=1e3 * sorted(times)[len(times) // 2],
        images_per_s=n / sorted(times)[len(times) // 2],
        shape=list(img.shape),
        pixel_range=[lo, hi],
        pixels_in_range=bool(0 <= lo and hi < model.config.n_bins),
        **_memory(device),
    )


def section_coupling(s: dict, out: Partial) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    import coupling as C

    device = torch.device(s["device"])
    dtype = torch.float32
    torch.manual_seed(0)
    shapes = C.ALL_SHAPES
    cases, skipped = [], []
    t_start = time.perf_counter()
    out.update(compile=s["compile"], cases=cases, skipped=skipped)
    for sname in s["coupling_shapes"]:
        for mode in s["coupling_modes"]:
            if time.perf_counter() - t_start > 0.8 * s["time_limit"]:
                skipped.append(f"{sname}/{mode}")
                out.flush()
                continue
            t0 = time.perf_counter()
            shape = shapes[sname]
            case = C.bench_mode(
                mode,
                shape,
                C.providers_for(mode, device, s["compile"]),
                device,
                dtype,
                s["coupling_min_run_time"],
                kernels=C.kernel_providers_for(mode, device),
            )
            case.update(
                shape=sname,
                dims=list(shape[:5]),
                floor_gbps=case["input_bytes"] / (case["floor_ms"] * 1e-3) / 1e9,
                seconds=time.perf_counter() - t0,
            )
            cases.append(case)
            out.flush()
    if skipped:
        out.update(note=f"time limit: {len(skipped)} cases skipped")


def run_child(args) -> int:
    """``--section NAME``: run one section, write its result file, exit 0 / 1."""
    s = json.loads(Path(args.settings).read_text())
    out = Partial(Path(args.result))
    name = args.section
    inject = s.get("inject", {}).get(name)
    try:
        if inject == "crash":
            os.abort()
        if inject == "hang":
            time.sleep(1e6)
        if inject == "raise":
            raise RuntimeError(f"injected failure in section {name!r}")
        if name == "environment":
            section_environment(s, out)
        elif name == "tests":
            section_tests(s, out)
        elif name == "train_step":
            section_train_step(s, out)
        elif name == "profile":
            section_profile(s, out)
        elif name in TRAIN_VARIANTS:
            section_train(s, out, TRAIN_VARIANTS[name])
        elif name == "sample":
            section_sample(s, out)
        elif name == "coupling":
            section_coupling(s, out)
        else:
            raise ValueError(f"unknown section {name!r}")
    except BaseException as e:  # noqa: BLE001 - every failure goes into the report
        out.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        return 1
    return 0


# ============================================================================ driver (parent)


def run_sections(settings: dict, out_dir: Path, sections: list[str]) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / "sections"
    work.mkdir(exist_ok=True)
    t_start = time.perf_counter()
    report = dict(
        meta=dict(
            started=time.strftime("%Y-%m-%d %H:%M:%S"),
            dry_run=settings["dry_run"],
            device=settings["device"],
            config=settings["config"],
            batch=settings["batch"],
            total_budget_s=settings["total_budget"],
            command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        ),
        sections={},
    )
    for i, name in enumerate(sections):
        elapsed = time.perf_counter() - t_start
        left = settings["total_budget"] - elapsed - settings["reserve"] * (len(sections) - i - 1)
        if left < 5:
            report["sections"][name] = dict(status="skipped", reason="total time budget spent")
            continue
        limit = settings["section_timeouts"].get(name, min(settings["budgets"][name], left))
        print(f"... {name} (limit {limit:.0f}s)", file=sys.stderr, flush=True)
        report["sections"][name] = _run_one(name, dict(settings, time_limit=limit), work)
        _write(report, out_dir)
    report["meta"]["seconds"] = time.perf_counter() - t_start
    _write(report, out_dir)
    return report


def _run_one(name: str, settings: dict, work: Path) -> dict:
    settings_path = work / f"{name}.settings.json"
    result_path = work / f"{name}.json"
    settings_path.write_text(json.dumps(settings))
    result_path.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--section",
        name,
        "--settings",
        str(settings_path),
        "--result",
        str(result_path),
    ]
    env = _child_env(settings["device"])
    t0 = time.perf_counter()
    stderr = ""
    try:
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=settings["time_limit"],
        )
        rc, timed_out, stderr = proc.returncode, False, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, timed_out, stderr = None, True, _text(e.stderr)
    seconds = time.perf_counter() - t0
    try:
        result = json.loads(result_path.read_text())
    except (OSError, ValueError):
        result = {}
    entry = dict(seconds=seconds, time_limit_s=settings["time_limit"], result=result)
    if timed_out:
        entry.update(status="timeout", error=f"killed after {settings['time_limit']:.0f}s")
    elif rc != 0:
        err = result.pop("error", None)
        entry["traceback"] = result.pop("traceback", None)
        if err is None:  # died without writing its error: a crash (signal) or interpreter abort
            sig = f" (signal {-rc})" if rc < 0 else ""
            err = f"process exited with code {rc}{sig}"
        entry.update(status="error", error=err, stderr_tail=stderr[-2000:])
    elif result.get("not_available"):
        entry.update(status="not available", error=result["not_available"])
    else:
        entry["status"] = "ok"
    return entry


def _write(report: dict, out_dir: Path) -> None:
    (out_dir / "report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    (out_dir / "report.md").write_text(markdown(report))


# ============================================================================ markdown


def _f(v, fmt: str = ".1f", none: str = "-") -> str:
    if v is None:
        return none
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def _g(v) -> str:
    """Whole numbers from 100 up, three significant digits below (tiny dry-run shapes)."""
    if v is None:
        return "-"
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.3g}"


def _train_step_markdown(secs: dict, m: dict) -> list[str]:
    rows = secs.get("train_step", {}).get("result", {}).get("rows")
    if not rows:
        return []
    lines = [
        f"## The trainer's iteration ({m['config']}, batch {m['batch']}: forward, backward, "
        "fused Adam, EMA)",
        "",
        "| variant | status | ms / iteration | images/s | x eager | first 4 calls s | peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['status']} | {_f(r.get('step_ms'))} | "
            f"{_f(r.get('images_per_s'))} | {_f(r.get('speedup_vs_eager'), '.2f')} | "
            f"{_f(r.get('first_four_s'), '.2f')} | "
            f"{_f(r.get('peak_mb', r.get('peak_rss_mb')), '.0f')} |"
        )
    return lines + [""]


def _profile_markdown(secs: dict) -> list[str]:
    iterations = secs.get("profile", {}).get("result", {}).get("iterations")
    if not iterations:
        return []
    lines = ["## Profile of one iteration", ""]
    for it in iterations:
        what = "graphed" if it["graphed"] else "eager"
        counts = (
            f"{it.get('kernels')} kernels, {it.get('kernel_launch_calls')} kernel launch calls, "
            f"{it.get('graph_launch_calls')} graph launches, GPU busy "
            f"{_f(100 * (it.get('device_busy_fraction') or 0), '.0f')}% of the wall time"
            if "kernels" in it
            else f"{it.get('aten_ops')} aten ops"
        )
        lines += [f"**{what}**: {_f(it.get('wall_ms'))} ms wall; {counts}. Top:", ""]
        lines += [
            f"- {t['name']}: {_f(t['ms'], '.2f')} ms in {t['calls']} calls" for t in it["top"]
        ]
        lines.append("")
    return lines


def markdown(report: dict) -> str:
    m, secs = report["meta"], report["sections"]
    env = secs.get("environment", {}).get("result", {})
    lines = [
        "# vflow GPU report" + (" (dry run on CPU, tiny sizes)" if m["dry_run"] else ""),
        "",
        f"`{m['command']}` started {m['started']}, {_f(m.get('seconds'), '.0f')} s in all "
        f"(budget {m['total_budget_s']} s).",
        "",
    ]
    if env:
        peak = env.get("peak_gbps_spec")
        lines += [
            f"Device: **{env.get('name', m['device'])}** ({m['device']}"
            + (f", compute capability {env['capability']}" if env.get("capability") else "")
            + (f", {env['total_memory_gb']:.0f} GB" if env.get("total_memory_gb") else "")
            + f"); torch {env.get('torch')}, CUDA {env.get('cuda')}, Triton {env.get('triton')}; "
            f"vflow backends: {', '.join(env.get('vflow_backends', []))}. Memory bandwidth: "
            + (f"spec {peak:.0f} GB/s ({env.get('peak_source')}), " if peak else "no spec, ")
            + f"measured copy {_f(env.get('copy_gbps'), '.0f')} GB/s.",
            "",
        ]
    lines += [
        "## Sections",
        "",
        "| section | status | seconds | limit | note |",
        "|---|---|---|---|---|",
    ]
    for name, sec in secs.items():
        note = (sec.get("error") or sec.get("reason") or "").replace("|", "/").splitlines()
        lines.append(
            f"| {name} | {sec['status']} | {_f(sec.get('seconds'), '.1f')} | "
            f"{_f(sec.get('time_limit_s'), '.0f')} | {note[0][:160] if note else ''} |"
        )
    lines.append("")
    t = secs.get("tests", {}).get("result")
    if t:
        lines += [
            "## Tests",
            "",
            f"`{t.get('command', '')}`",
            "",
            f"passed {t.get('passed')}, failed {t.get('failed')}, errors {t.get('errors')}, "
            f"skipped {t.get('skipped')} (collected {t.get('collected')}), "
            f"{_f(t.get('seconds'), '.0f')} s" + (", TIMED OUT" if t.get("timed_out") else ""),
            "",
        ]
        if t.get("failures"):
            lines += ["```", *t["failures"], "```", ""]
    lines += _train_step_markdown(secs, m) + _profile_markdown(secs)
    rows = [(n, secs[n]) for n in TRAIN_VARIANTS if n in secs]
    if rows:
        mem_col = "peak MiB" if m["device"].startswith("cuda") else "peak RSS MiB"
        lines += [
            f"## Training step ({m['config']}, batch {m['batch']})",
            "",
            f"| variant | status | step ms | images/s | first step s | {mem_col} | "
            "step growth MiB | loss bpd |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, sec in rows:
            r = sec.get("result", {})
            lines.append(
                f"| {TRAIN_VARIANTS[name]} | {sec['status']} | {_f(r.get('step_ms'))} | "
                f"{_f(r.get('images_per_s'))} | {_f(r.get('first_step_s'), '.2f')} | "
                f"{_f(r.get('peak_mb', r.get('peak_rss_mb')), '.0f')} | "
                f"{_f(r.get('step_growth_mb'), '.0f')} | {_f(r.get('loss_bpd'), '.3f')} |"
            )
        lines.append("")
    sm = secs.get("sample")
    if sm:
        r = sm.get("result", {})
        lines += [
            "## Sampling",
            "",
            f"{sm['status']}: {r.get('n')} images of {r.get('config')} in "
            f"{_f(r.get('sample_ms'))} ms ({_f(r.get('images_per_s'))} images/s; first call, "
            f"with compilation, {_f(r.get('first_call_s'), '.2f')} s); peak "
            f"{_f(r.get('peak_mb', r.get('peak_rss_mb')), '.0f')} MiB; pixel range "
            f"{r.get('pixel_range')}.",
            "",
        ]
    cp = secs.get("coupling")
    if cp and cp.get("result", {}).get("cases"):
        peak = env.get("peak_gbps_spec") or env.get("copy_gbps")
        r = cp["result"]
        lines += [
            "## Coupling kernels",
            "",
            f"torch.compile: {'on' if r.get('compile') else 'off'}. ms: the public op (with "
            "autograd in fwdbwd); kernel ms: the bare kernel call under it (no op layer). GB/s: "
            "the bytes a call must move at least over its time; % peak against "
            + ("the spec bandwidth." if env.get("peak_gbps_spec") else "the measured copy."),
            "",
            "| shape | mode | provider | ms | kernel ms | x eager | x compile | max err | GB/s "
            "| % peak | kernel % peak |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in r["cases"]:
            for row in case["rows"]:
                pct = 100 * row["gbps"] / peak if peak else None
                kpct = 100 * row["kernel_gbps"] / peak if peak and "kernel_gbps" in row else None
                lines.append(
                    f"| {case['shape']} | {case['mode']} | {row['provider']} | "
                    f"{_f(row['ms'], '.3f')} | {_f(row.get('kernel_ms'), '.3f')} | "
                    f"{_f(row.get('speedup_vs_eager'), '.2f')} | "
                    f"{_f(row.get('speedup_vs_compile'), '.2f')} | {_f(row['err'], '.1e')} | "
                    f"{_g(row['gbps'])} | {_g(pct)} | {_g(kpct)} |"
                )
        if r.get("skipped"):
            lines += ["", f"Skipped (time limit): {', '.join(r['skipped'])}."]
        lines.append("")
    errors = [(n, s) for n, s in secs.items() if s["status"] in ("error", "timeout")]
    if errors:
        lines += ["## Errors", ""]
        for name, sec in errors:
            lines += [f"### {name}: {sec['status']}", "", "```", sec.get("error", "")]
            tb = sec.get("traceback") or sec.get("stderr_tail")
            if tb:
                lines += tb.rstrip().splitlines()[-15:]
            lines += ["```", ""]
    return "\n".join(lines)


# ============================================================================ main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", default="results/gpu_report", help="folder for report.md / .json")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    ap.add_argument("--device", default=None, help="default: cuda (cpu for --dry-run)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--budget", type=float, default=None, help="total seconds (GPU: 465)")
    ap.add_argument(
        "--compile",
        dest="compile",
        action="store_true",
        default=None,
        help="torch.compile provider in the coupling section (default: on, off for --dry-run)",
    )
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument(
        "--section-timeout",
        action="append",
        default=[],
        metavar="NAME=SECONDS",
        help="override one section's time limit",
    )
    ap.add_argument(
        "--inject-failure",
        action="append",
        default=[],
        metavar="NAME[:raise|crash|hang]",
        help="make a section fail (testing the report's error handling)",
    )
    ap.add_argument("--section", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.section:
        return run_child(args)

    settings = dict(DRY if args.dry_run else GPU, dry_run=args.dry_run)
    if args.device:
        settings["device"] = args.device
    if args.compile is not None:
        settings["compile"] = args.compile
    if args.budget:
        settings["total_budget"] = args.budget
    settings["section_timeouts"] = {
        k: float(v) for k, v in (item.split("=", 1) for item in args.section_timeout)
    }
    settings["inject"] = dict((item.split(":", 1) + ["raise"])[:2] for item in args.inject_failure)
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if settings["device"].startswith("cuda") and not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            ap.error("no CUDA device: use --dry-run (CPU, tiny sizes) or --device cpu")
    out = Path(args.out)
    report = run_sections(settings, out, sections)
    bad = [n for n, s in report["sections"].items() if s["status"] not in ("ok", "not available")]
    print(f"wrote {out / 'report.md'} and {out / 'report.json'}")
    print("sections: " + ", ".join(f"{n} {s['status']}" for n, s in report["sections"].items()))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

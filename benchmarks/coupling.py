"""Benchmark of the MoL coupling: eager reference vs torch.compile(reference) vs fused kernels.

    python benchmarks/coupling.py [--quick] [--json PATH] [--no-compile] [--shapes cifar_b256]

All providers run side by side in ONE process on the same inputs (timings on shared
machines drift by 2x between runs: compare ratios within a run). Modes:

* forward: y, logdet = coupling(x, params)
* fwdbwd: forward + backward of loss = <y, gy> + <logdet, gl> w.r.t. x and params
* inverse: the fused safeguarded Newton inverse (``method="newton"``, default budget) and the
  fused bisection (``-bisect`` rows) against the eager 60-step bisection (the reference
  solver with newton=False, max_iters=60). The error column is the MAX reconstruction error
  |x_hat - x| over the whole tensor against the x that produced y; ``y err`` is the MAX
  backward error |forward64(x_hat) - y| / max(1, |y|) (what a correct inverse can always
  reach, also where dy/dx is tiny and x itself is ill-determined). The iteration statistics
  of the Newton solver (mean, max, and the mean over blocks of W lanes of the block's max,
  which is what the CPU kernel pays; W = 16 float32 on AVX-512, 8 on AVX2) come from the
  reference run of the same algorithm.
* checkerboard: full-image checkerboard coupling; eager = split -> transform -> merge

Times are medians of torch.utils.benchmark.Timer.blocked_autorange on CPU and of
triton.testing.do_bench on CUDA. Errors are max abs errors against the float64 reference
(for fwdbwd: over grad_x and grad_params). Peak extra memory is the peak of the bytes
allocated inside the timed call (torch.profiler memory events on CPU, max_memory_allocated on
CUDA), inputs excluded, outputs and autograd-saved tensors included. ``floor_ms`` is the
time to stream-read the inputs once (x.sum() + params.sum()), the practical lower bound.

Kernel-only vs whole op: for each fused provider, ``ms`` is the public op (``vflow.ops``,
validation, dispatch, custom op, autograd in fwdbwd) and ``kernel ms`` the bare kernel call
under it (``vflow._C`` / ``vflow.kernels`` functions, timed the same way, alternately with
the op, median of PAIRED_ROUNDS each); ``op/kern`` is their ratio, the op layer's cost.
``% peak`` / ``kern %pk``: the bytes the call must move at least
(``_bandwidth.coupling_bytes``) per second, over the device's peak bandwidth: its spec
(table by ``torch.cuda.get_device_name()``), or on the CPU and unknown devices the measured
bandwidth of a large copy; the header line says which. On CUDA the default shapes add
``cifar_b256``, where launch overhead is small next to the kernels, and the forward and
fwdbwd modes add ``triton-tuned``: the Triton op with the tile tuning of
``kernels/_tuning.py`` on (its first call, untimed, tunes).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import platform
import statistics
import sys
import time

import torch
from _bandwidth import coupling_bytes, device_peak, gbps

from vflow import reference as R

try:  # the public API (vflow.ops); the benchmark falls back to the raw backends without it
    from vflow import ops as OPS
except Exception:  # pragma: no cover - only while vflow/ops.py is missing
    OPS = None

SHAPES = {
    # name: (B, C, H, W of the transformed half, K, description)
    "cifar": (64, 3, 32, 16, 32, "Flow++ CIFAR-10: 3x32x32 image, checkerboard half, K=32"),
    "vflow16": (64, 12, 16, 8, 32, "VFlow CIFAR 16x16 scale: 24x16x16 after squeeze, half, K=32"),
    "k4": (32, 6, 32, 32, 4, "Flow++ ImageNet64 style: 12x32x32 after squeeze, channel half, K=4"),
    "tiny": (1, 3, 4, 4, 4, "tiny B=1 3x4x4, K=4 (launch/dispatch overhead)"),
}
LARGE_SHAPES = {  # launch overhead is small next to the kernel: the bandwidth rows
    "cifar_b256": (256, 3, 32, 16, 32, "Flow++ CIFAR-10 shape at batch 256 (150 MB params)"),
}
QUICK_SHAPES = {
    "vflow16_b8": (8, 12, 16, 8, 32, "VFlow 16x16 scale at batch 8, K=32"),
    "tiny": SHAPES["tiny"],
}
ALL_SHAPES = {**SHAPES, **LARGE_SHAPES, **QUICK_SHAPES}
# The shape sets of --size (and of the pytest-benchmark suite's --bench-size)
SIZES = {
    "tiny": ["tiny"],
    "quick": list(QUICK_SHAPES),
    "full": list(SHAPES) + list(LARGE_SHAPES),
}
MODES = ("forward", "fwdbwd", "inverse", "checkerboard")
TUNED_MODES = ("forward", "fwdbwd")  # modes with a triton-tuned row on CUDA


def shapes_for(size, device) -> list[str]:
    """The shape names of ``size`` (SIZES) on ``device``: the large shapes only on CUDA (on the
    CPU their eager rows take minutes; name them with --shapes to run them anyway)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    on_cuda = torch.device(device).type == "cuda"
    return [s for s in SIZES[size] if on_cuda or s not in LARGE_SHAPES]


SMOOTH = True
PAIRED_ROUNDS = 3  # op and bare-kernel timings, alternated
INV_EAGER_ITERS = 60


# --- providers -----------------------------------------------------------------------------


def _cpp_available(device) -> bool:
    if OPS is not None:
        return "cpp" in OPS.available_backends(device)
    try:
        import vflow._C  # noqa: F401
    except ImportError:
        return False
    return device.type == "cpu"


def _triton_available(device) -> bool:
    """CUDA, or the CPU under TRITON_INTERPRET=1 (set before triton is imported)."""
    return OPS is not None and "triton" in OPS.available_backends(device)


class _RawFused(torch.autograd.Function):
    """Autograd wrapper over vflow._C, used only when vflow.ops is not importable."""

    @staticmethod
    def forward(ctx, x, params, pattern, parity):
        import vflow._C as C

        ctx.save_for_backward(x, params)
        ctx.cfg = (pattern, parity)
        return C.coupling_fwd(x, params, SMOOTH, pattern, parity)

    @staticmethod
    def backward(ctx, gy, gl):
        import vflow._C as C

        x, params = ctx.saved_tensors
        gx, gp = C.coupling_bwd(
            x, params, gy.contiguous(), gl.contiguous(), SMOOTH, *ctx.cfg, False
        )
        return gx, gp, None, None


def fused_forward(backend):
    if OPS is not None:
        return lambda x, p: OPS.mixlogistic_coupling(x, p, smooth=SMOOTH, backend=backend)
    return lambda x, p: _RawFused.apply(x, p, 0, 0)


def fused_checker(backend):
    if OPS is not None:
        return lambda x, p: OPS.checkerboard_coupling(
            x, p, parity=0, pattern="checkerboard", smooth=SMOOTH, backend=backend
        )
    return lambda x, p: _RawFused.apply(x, p, 1, 0)


def fused_inverse(backend, method="newton"):
    if OPS is not None:
        return lambda y, p: OPS.mixlogistic_coupling_inverse(
            y, p, smooth=SMOOTH, method=method, backend=backend
        )
    import vflow._C as C

    return lambda y, p: C.coupling_inv(y, p, SMOOTH, 0, 0, 100, method == "newton")


def _call_tuned(fn, *args):
    """``fn(*args)`` with the Triton tile tuning on (``vflow.kernels.set_autotune``): the first
    call per shape tunes (kernels/_tuning.py), later calls reuse the tile it chose."""
    kernels = importlib.import_module("vflow.kernels")
    was = kernels.autotune_enabled()
    kernels.set_autotune(True)
    try:
        return fn(*args)
    finally:
        kernels.set_autotune(was)


def tuned(fn):
    """The provider ``fn`` run with tile tuning on (``triton-tuned`` rows)."""
    return functools.partial(_call_tuned, fn)


def eager_forward(x, p):
    return R.coupling_fwd(x, p, SMOOTH, R.PLAIN, 0)


def eager_checker(x, p):
    active, passive = R.split(x, R.CHECKERBOARD, 0)
    y, lad = R.mixlogistic_elementwise(active, p, SMOOTH)
    return R.merge(y, passive, R.CHECKERBOARD, 0), lad.flatten(1).sum(1)


def eager_inverse(y, p):
    return R.coupling_inv(y, p, SMOOTH, R.PLAIN, 0, INV_EAGER_ITERS, False)


# --- measurement ----------------------------------------------------------------------------


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def synced(fn, device):
    """``fn`` followed by a device synchronisation on CUDA (for timers that do not sync
    themselves, e.g. pytest-benchmark's); ``fn`` itself elsewhere."""
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def time_ms(fn, device, min_run_time):
    """Median milliseconds per call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, return_mode="median"))
    from torch.utils.benchmark import Timer

    # a slow call (the eager 60-step inverse) gets a few plain repetitions instead
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first > min_run_time / 2:
        runs = []
        for _ in range(2 if first < 2 * min_run_time else 1):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        return min(runs) * 1e3
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return m.median * 1e3


def peak_extra_bytes(fn, device):
    """Peak of the bytes allocated while fn runs (inputs excluded), or None."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    # allocations are attributed to the op that made them (self memory, at the op's start),
    # frees that happen outside any op appear as "[memory]" events
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    deltas.sort(key=lambda td: td[0])
    cur = peak = 0
    for _, d in deltas:
        cur += d
        peak = max(peak, cur)
    return int(peak)


def max_err(got, ref):
    return max((g.detach().double() - r).abs().max().item() for g, r in zip(got, ref, strict=True))


# --- one case -------------------------------------------------------------------------------


def make_case(shape, device, dtype, full_image=False, seed=0):
    b, c, h, w, k, _ = shape
    g = torch.Generator().manual_seed(seed)
    width = 2 * w if full_image else w
    x = torch.randn(b, c, h, width, generator=g, dtype=torch.float64)
    p = torch.randn(b, 2 + 3 * k, c, h, w, generator=g, dtype=torch.float64)
    p[:, 0].mul_(0.3)
    p[:, 2 + 2 * k :].uniform_(-1.0, 1.0)  # trained-flow-like scales, invertible in float32
    gy = torch.randn(b, c, h, width, generator=g, dtype=torch.float64)
    gl = torch.randn(b, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (x, p, gy, gl)], [
        t.to(device=device, dtype=dtype) for t in (x, p, gy, gl)
    ]


def loss_grads(fn, x, p, gy, gl):
    x = x.detach().requires_grad_(True)
    p = p.detach().requires_grad_(True)
    y, ld = fn(x, p)
    ((y * gy).sum() + (ld * gl).sum()).backward()
    return x.grad, p.grad


class Case:
    """The inputs and float64 reference of one (mode, shape). Every provider of ``mode``
    (``providers_for``, ``kernel_providers_for``) is called as ``fn(*case.inputs)``:
    forward / checkerboard ``fn(x, params) -> (y, logdet)``, inverse ``fn(y, params) -> (x,
    logdet)``, fwdbwd ``fn(x, params, dy, dlogdet) -> (dx, dparams)``."""

    def __init__(self, mode, shape, device, dtype, seed=0):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.dims = mode, tuple(shape[:5])
        (x64, p64, gy64, gl64), (x, p, gy, gl) = make_case(
            shape, device, dtype, full_image=mode == "checkerboard", seed=seed
        )
        self.x64, self.params = x64, p
        self.input_bytes = x.numel() * x.element_size() + p.numel() * p.element_size()
        self.bytes_moved = coupling_bytes(mode, self.dims, x.element_size())
        with torch.no_grad():
            if mode == "forward":
                self.inputs, self.ref = (x, p), eager_forward(x64, p64)
            elif mode == "checkerboard":
                self.inputs, self.ref = (x, p), eager_checker(x64, p64)
            elif mode == "inverse":
                self.inputs, self.ref = (eager_forward(x64, p64)[0].to(dtype), p), None
        if mode == "fwdbwd":
            self.inputs = (x, p, gy, gl)
            self.ref = loss_grads(eager_forward, x64, p64, gy64, gl64)

    def call(self, fn):
        """``fn`` on this case's inputs as a zero-argument callable (autograd off except in
        fwdbwd, so that forward-only calls save nothing for backward)."""
        grad = self.mode == "fwdbwd"

        def run():
            with torch.set_grad_enabled(grad):
                return fn(*self.inputs)

        return run

    def errors(self, out) -> dict:
        """``err``: max abs error against float64 (fwdbwd: over dx and dparams; inverse: the
        reconstruction |x_hat - x|); inverse also ``y_err`` (inverse_backward_error)."""
        if self.mode != "inverse":
            return dict(err=max_err(out, self.ref))
        x_hat = out[0].detach()
        y = self.inputs[0]
        return dict(
            err=(x_hat.double() - self.x64).abs().max().item(),
            y_err=inverse_backward_error(x_hat, y, self.params),
        )


def bench_mode(mode, shape, providers, device, dtype, min_run_time, kernels=None):
    """Time every provider on one case. ``kernels``: name -> the bare kernel call of the
    provider of that name (kernel_providers_for), timed beside it (``kernel_ms``)."""
    case = Case(mode, shape, device, dtype)
    x, p = case.inputs[0], case.params
    floor = time_ms(lambda: (x.sum(), p.sum()), device, min_run_time)
    rows = []
    for name, fn in providers.items():
        call = case.call(fn)
        row = dict(provider=name, **case.errors(call()))
        if kernels and name in kernels:  # alternately, so that a slow period hits both
            kcall = case.call(kernels[name])
            pairs = [
                (time_ms(call, device, min_run_time), time_ms(kcall, device, min_run_time))
                for _ in range(PAIRED_ROUNDS)
            ]
            row["ms"], row["kernel_ms"] = (statistics.median(t) for t in zip(*pairs, strict=True))
            row["kernel_gbps"] = gbps(case.bytes_moved, row["kernel_ms"])
        else:
            row["ms"] = time_ms(call, device, min_run_time)
        row["gbps"] = gbps(case.bytes_moved, row["ms"])
        row["peak_extra_bytes"] = peak_extra_bytes(call, device)
        rows.append(row)
    base = {r["provider"]: r["ms"] for r in rows}
    for r in rows:
        r["speedup_vs_eager"] = base["eager"] / r["ms"] if "eager" in base else None
        r["speedup_vs_compile"] = base["compile"] / r["ms"] if "compile" in base else None
        r["extra_over_input"] = (
            r["peak_extra_bytes"] / case.input_bytes if r["peak_extra_bytes"] is not None else None
        )
    out = dict(
        mode=mode,
        floor_ms=floor,
        input_bytes=case.input_bytes,
        bytes_moved=case.bytes_moved,
        rows=rows,
    )
    if mode == "inverse":
        out["newton_iterations"] = newton_iteration_stats(case.inputs[0], p, kernel_lanes(x.dtype))
    return out


def inverse_backward_error(x_hat, y, p):
    """max |forward64(x_hat) - y| / max(1, |y|) over the tensor."""
    y_back = R.mixlogistic_elementwise(x_hat.double(), p.double(), SMOOTH)[0]
    return ((y_back - y.double()).abs() / y.double().abs().clamp(min=1)).max().item()


def kernel_lanes(dtype) -> int:
    """Lanes per block of the CPU kernels in use (16 float32 on AVX-512, 8 on AVX2, 4 on the
    baseline build); 16 when the extension is not built."""
    try:
        from vflow import _C
    except ImportError:
        return 16
    return _C._vector_bytes() // torch.empty((), dtype=dtype).element_size()


def newton_iteration_stats(y, p, lanes):
    """Iterations of the safeguarded Newton solver per element (reference run, same
    algorithm and dtype as the fused kernels): mean, max, and the mean of the max over
    consecutive blocks of ``lanes`` elements (the CPU kernel's per-block early exit)."""
    with torch.no_grad():
        _, iters = R.solve_inverse(y.cpu(), p.cpu(), SMOOTH, OPS.DEFAULT_MAX_ITERS["newton"], True)
    flat = iters.movedim(0, -1).reshape(-1).double()  # positions of one sample are contiguous
    blocks = flat[: flat.numel() // lanes * lanes].view(-1, lanes).amax(1)
    return dict(
        mean=flat.mean().item(),
        max=flat.max().item(),
        lanes=lanes,
        block_max_mean=blocks.mean().item(),
    )


def _grads_of(forward):
    """The fwdbwd provider of a forward provider: (x, params, dy, dlogdet) -> (dx, dparams)."""
    return lambda x, p, gy, gl: loss_grads(forward, x, p, gy, gl)


def providers_for(mode, device, use_compile):
    """name -> the provider of ``mode`` (the Case signature): ``eager`` (vflow.reference),
    ``compile`` (torch.compile of it) and, where they run, the public fused ops (``cpp``,
    ``triton``; for inverse also the bisection ``-bisect``), with autograd in fwdbwd."""
    eager = {
        "forward": eager_forward,
        "fwdbwd": eager_forward,
        "checkerboard": eager_checker,
        "inverse": eager_inverse,  # 60-step bisection; compiling 60 unrolled steps is impractical
    }[mode]
    prov = {"eager": eager}
    if use_compile and mode != "inverse":
        prov["compile"] = torch.compile(eager, dynamic=False)
    fused = {
        "forward": fused_forward,
        "fwdbwd": fused_forward,
        "checkerboard": fused_checker,
        "inverse": fused_inverse,
    }[mode]
    for backend, usable in (("cpp", _cpp_available), ("triton", _triton_available)):
        if usable(device):
            prov[backend] = fused(backend)
            if mode == "inverse":
                prov[f"{backend}-bisect"] = fused(backend, method="bisection")
    if mode == "fwdbwd":
        prov = {name: _grads_of(fn) for name, fn in prov.items()}
    if "triton" in prov and device.type == "cuda" and mode in TUNED_MODES:
        prov["triton-tuned"] = tuned(prov["triton"])  # fwdbwd: the backward tunes too
    return prov


def _bare_module(backend):
    """The kernels under the op layer: vflow._C (cpp) or vflow.kernels (triton)."""
    return importlib.import_module("vflow._C" if backend == "cpp" else "vflow.kernels")


def kernel_providers_for(mode, device):
    """name -> the bare kernel call under the fused provider of that name (the Case
    signature): the C++ function of vflow._C or the Triton launcher of vflow.kernels, with no
    op layer (validation, dispatch, custom-op, autograd) around it. fwdbwd is the forward
    kernel then the backward kernel."""
    pattern = R.CHECKERBOARD if mode == "checkerboard" else R.PLAIN
    out = {}
    for backend, usable in (("cpp", _cpp_available), ("triton", _triton_available)):
        if not usable(device):
            continue
        K = _bare_module(backend)
        if mode in ("forward", "checkerboard"):
            out[backend] = lambda x, p, K=K: K.coupling_fwd(x, p, SMOOTH, pattern, 0)
        elif mode == "fwdbwd":

            def fwdbwd(x, p, gy, gl, K=K):
                K.coupling_fwd(x, p, SMOOTH, pattern, 0)
                return K.coupling_bwd(x, p, gy, gl, SMOOTH, pattern, 0, False)

            out[backend] = fwdbwd
        else:
            for suffix, newton in (("", True), ("-bisect", False)):
                iters = OPS.DEFAULT_MAX_ITERS["newton" if newton else "bisection"]
                out[backend + suffix] = lambda y, p, K=K, i=iters, n=newton: K.coupling_inv(
                    y, p, SMOOTH, pattern, 0, i, n
                )
    if "triton" in out and device.type == "cuda" and mode in TUNED_MODES:
        out["triton-tuned"] = tuned(out["triton"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small shapes, short timing (< 1 minute)")
    ap.add_argument("--json", default="results/coupling.json", help="where to write the results")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument(
        "--shapes",
        default=None,
        help="comma-separated subset of "
        + ",".join(ALL_SHAPES)
        + " (default: "
        + ",".join(SHAPES)
        + ", and on CUDA also "
        + ",".join(LARGE_SHAPES)
        + ")",
    )
    ap.add_argument("--modes", default="forward,fwdbwd,inverse,checkerboard")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads for all providers (on a loaded machine, 1 avoids the OpenMP "
        "barrier stalls that slow the many small eager ops far more than one fused call)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    size = "quick" if args.quick else "full"
    names = args.shapes.split(",") if args.shapes else shapes_for(size, device)
    shapes = {k: ALL_SHAPES[k] for k in names}
    modes = args.modes.split(",")
    min_run_time = 0.1 if args.quick else 1.0
    use_compile = not args.no_compile
    torch.manual_seed(0)
    peak, peak_source = device_peak(device, 64 if args.quick else 512)

    results = dict(
        meta=dict(
            device=str(device),
            device_name=_device_name(device),
            dtype=args.dtype,
            torch=torch.__version__,
            threads=torch.get_num_threads(),
            machine=platform.processor() or platform.machine(),
            ops_api=OPS is not None,
            quick=args.quick,
            isa=_isa(),
            peak_gbps=peak,
            peak_source=peak_source,
        ),
        cases=[],
    )
    print(
        f"# device={device} ({results['meta']['device_name']}) dtype={args.dtype}"
        f" threads={torch.get_num_threads()} torch={torch.__version__}"
        f" kernels={results['meta']['isa']}"
    )
    print(
        f"# % peak: GB/s of the bytes the call must move at least, over {peak:.1f} GB/s "
        f"({peak_source}); ms = the public op (with autograd in fwdbwd), kernel ms = the bare "
        "kernel call under it"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for sname, shape in shapes.items():
        for mode in modes:
            t0 = time.perf_counter()
            case = bench_mode(
                mode,
                shape,
                providers_for(mode, device, use_compile),
                device,
                dtype,
                min_run_time,
                kernels=kernel_providers_for(mode, device),
            )
            case.update(
                shape=sname,
                dims=list(shape[:5]),
                description=shape[5],
                seconds=time.perf_counter() - t0,
            )
            results["cases"].append(case)
            for r in case["rows"]:
                print(format_row(sname, mode, r, case["floor_ms"], peak))
            if "newton_iterations" in case:
                it = case["newton_iterations"]
                print(
                    f"{sname:<11}{mode:<13}Newton iterations: mean {it['mean']:.2f}, "
                    f"max {it['max']:.0f}, mean of {it['lanes']}-lane block max "
                    f"{it['block_max_mean']:.2f}"
                )
            sys.stdout.flush()
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


HEADER = (
    f"{'shape':<11}{'mode':<13}{'provider':<13}{'ms':>10}{'kernel ms':>10}{'op/kern':>8}"
    f"{'x eager':>9}{'x compile':>10}{'max err':>10}{'% peak':>8}{'kern %pk':>9}"
    f"{'extra/in':>9}{'floor ms':>9}"
)


def format_row(sname, mode, r, floor_ms, peak_gbps) -> str:
    """One line of the table under HEADER ("-" where a column does not apply)."""

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    kms = r.get("kernel_ms")
    kgbps = r.get("kernel_gbps")
    ye = f"  y err {r['y_err']:.1e}" if "y_err" in r else ""
    return (
        f"{sname:<11}{mode:<13}{r['provider']:<13}{r['ms']:>10.3f}{f(kms, '.3f'):>10}"
        f"{f(r['ms'] / kms if kms else None, '.2f'):>8}"
        f"{f(r.get('speedup_vs_eager'), '.2f'):>9}{f(r.get('speedup_vs_compile'), '.2f'):>10}"
        f"{r['err']:>10.1e}{f(100 * r['gbps'] / peak_gbps, '.2f'):>8}"
        f"{f(100 * kgbps / peak_gbps if kgbps else None, '.2f'):>9}"
        f"{f(r.get('extra_over_input'), '.2f'):>9}{floor_ms:>9.3f}{ye}"
    )


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def _isa():
    try:
        import vflow._C as C

        return C._isa()
    except Exception:
        return None


if __name__ == "__main__":
    main()

"""Whole-model benchmark: one training step (elbo forward + backward) and sample().

For each config (default: vflow-digits and vflow-cifar10) and each variant, in one run:

* ``reference``        all couplings on the eager reference backend, float32, eager nets
* ``fused``            couplings on the fused backend ("cpp" on CPU, "triton" on CUDA)
* ``fused+compile``    ... and torch.compile of every conditioning / context network
* ``fused+regional-compile``  ... and regional compilation (``vflow.compile_regions``: each
                       kind of residual block compiled once and shared by its instances;
                       what ``vflow train --compile`` does)
* ``fused+chlast``     ... and channels_last weights / activations
* ``fused+bf16``       ... and bf16 autocast of the networks (couplings and logdets stay fp32)
* ``fused+chlast+compile-elbo``  channels_last and torch.compile of the whole ELBO (networks,
                       couplings and logdets in one graph, inductor's C++ wrapper; what
                       ``vflow train --compile --channels-last`` does)
* ``fused+ckpt``       fused, with activation checkpointing
                       (``model.set_activation_checkpointing(True, granularity)``) for each of
                       ``--granularities`` ("block": every residual block of the networks,
                       selectively, the default; "net": every conditioning / context network;
                       "step": every whole flow step), compared with the plain fused model in
                       the same process (below)

Ops. Every eager row has ``ops_per_step``: the aten ops one training step (forward and
backward) dispatches after autograd, counted by ``vflow.profiling.OpCounter`` (on a GPU each
one that is not a view is a kernel launch; ``view_ops_per_step`` of them are views and
detaches); compiled variants have none (the count would recompile them).

Memory. Every row has ``step_growth_mb``: how much a training step grows the process at its
peak over what it held before the step (CUDA: max_memory_allocated over memory_allocated;
CPU: peak RSS, VmHWM after resetting it through /proc/self/clear_refs, over RSS, measured
after the timings with glibc's mmap threshold fixed at 128 KiB and free memory trimmed, so
that tensors come from and go back to the kernel and RSS follows the tensors). The
``fused+ckpt`` row times, in one process and on the same weights, the plain step
(checkpointing toggled off) alternately with the checkpointed step of each granularity; its
``checkpointing`` entry holds, for "plain" and each granularity, the median step time, the
step-growth, the bytes the autograd graph keeps after the forward (saved tensors plus
checkpointed regions' inputs, counted once per storage; not the outputs that "block"
checkpointing keeps beside the graph) and the step's peak of live tensor bytes (every storage
an op creates in the step, counted from its creation to its release, excluding the model's
parameters and inputs: the allocator-independent twin of the step growth), and each
granularity's ratios to plain. The row's own step time and growth are those of the first
granularity. On a shared machine ``--threads 1 --cpu-time`` times steps by the process's CPU
time on one thread, which the other processes' load disturbs far less than wall time.

Every (config, variant) runs in its own subprocess so that peak memory (max RSS on CPU,
max allocated on CUDA) is per variant and compile caches do not leak between variants.
Speed-ups are paired: after its own measurements (peak memory included), each subprocess
builds the all-reference eager model with the same weights and times the two models'
steps alternately, so a slow period of a shared machine hits both sides of the ratio (the
``reference`` row pairs the model with an identical twin: its ratio shows the noise).
``--unpaired`` compares the separate processes' times instead. Prints a table and writes
JSON to results/model_step.json. ``--profile`` adds, per variant, where the step's CPU
time goes (convolutions, attention, coupling ops, the rest).

    python benchmarks/model_step.py            # full
    python benchmarks/model_step.py --quick    # fewer repeats, smaller sample batch
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = [
    "reference",
    "fused",
    "fused+compile",
    "fused+regional-compile",
    "fused+chlast",
    "fused+bf16",
    "fused+chlast+compile-elbo",
    "fused+ckpt",
]
COMPILED = ("fused+compile", "fused+regional-compile", "fused+chlast+compile-elbo")
# Lower-case profiler event-name fragments -> category of the step's time (first match wins).
CATEGORIES = (
    ("convolution", "convolutions"),
    ("scaled_dot_product", "attention"),
    ("vflow::attention", "attention"),
    ("softmax", "attention"),
    ("bmm", "attention"),
    ("vflow", "coupling ops"),
    ("compiledfxgraph", "compiled elementwise"),
)
BATCH = {"vflow-digits": 64, "flowpp-digits": 64}
DEFAULT_BATCH = 8
# (config, batch) of each size of the pytest-benchmark suite (test_bench_model_step.py)
BENCH_SIZES = {
    "tiny": [("vflow-digits", 4)],
    "quick": [("vflow-digits", 64)],
    "full": [("vflow-digits", 64), ("vflow-cifar10", DEFAULT_BATCH)],
}


def _fused_backend(device: str) -> str | None:
    from vflow import ops

    name = "triton" if device.startswith("cuda") else "cpp"
    return name if name in ops.available_backends(device) else None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _wrap_nets(model, variant: str) -> None:
    """Apply torch.compile / bf16 autocast to every conditioning and context network, or
    regional compilation to the model's residual blocks."""

    from vflow.nets import ContextNet, CouplingNet

    if variant == "fused+regional-compile":
        from vflow.compile import compile_regions

        compile_regions(model)
        return
    if variant == "fused+bf16":
        from vflow.precision import autocast_networks

        autocast_networks(model, training_only=False)  # sampling is timed in bf16 too
        return
    for net in model.modules():
        if variant == "fused+compile" and isinstance(net, (CouplingNet, ContextNet)):
            net.compile(dynamic=False)


CLOCK = time.perf_counter  # time.process_time with --cpu-time


def _time(fn, repeats: int, device: str) -> list[float]:
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = CLOCK()
        fn()
        _sync(device)
        out.append(CLOCK() - t0)
    return out


def worker(args) -> dict:
    import torch

    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    device = args.device
    fused = _fused_backend(device)
    variant = args.variant
    if variant != "reference" and fused is None:
        return dict(skipped=f"no fused backend on {device} (vflow._C / triton not available)")
    backend = "reference" if variant == "reference" else fused
    model, x = _build(args, backend)
    batch = x.shape[0]
    if "chlast" in variant:
        model = model.to(memory_format=torch.channels_last)
    _wrap_nets(model, variant)
    granularities = args.granularities if variant == "fused+ckpt" else None
    if granularities:
        model.set_activation_checkpointing(True, granularities[0])
    model.train()
    bpd = model.bpd
    if variant.endswith("compile-elbo"):
        import torch._inductor.config

        from vflow.train import compile_objective

        # eager's random streams inside the graph, so the loss column stays comparable
        torch._inductor.config.fallback_random = True
        bpd = compile_objective(model.bpd, device)

    step = _step_fn(model, bpd, x)
    t0 = time.perf_counter()
    loss = step()  # warm-up (includes compilation)
    warmup_s = time.perf_counter() - t0
    ops = None if variant in COMPILED else _count_ops(step)
    if granularities:  # paired with the plain model (its own times are its first column)
        checkpointing = _checkpointing_times(model, step, granularities, args.repeats, device)
        step_times = checkpointing[granularities[0]].pop("times")
    else:
        step()
        step_times = _time(step, args.repeats, device)
    breakdown = _breakdown(step) if args.profile else None

    model.eval()
    n_sample = args.sample_n or (batch if args.config.endswith("digits") else 2)
    sample_times = [float("nan")]
    if not args.skip_sample:
        with torch.no_grad():
            model.sample(n_sample)  # warm-up
            sample_times = _time(lambda: model.sample(n_sample), args.sample_repeats, device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    paired = None
    if args.paired:
        model.train()
        reference, _ = _build(args, "reference")
        reference.train()
        ref_step = _step_fn(reference, reference.bpd, x)
        ref_step()
        ref_times, var_times = [], []
        for _ in range(args.repeats):
            ref_times += _time(ref_step, 1, device)
            var_times += _time(step, 1, device)
        paired = dict(
            reference_ms=1e3 * statistics.median(ref_times),
            step_ms=1e3 * statistics.median(var_times),
        )
        paired["speedup"] = paired["reference_ms"] / paired["step_ms"]
    model.train()
    if granularities:
        _checkpointing_memory(model, step, checkpointing, device)
        growth = checkpointing[granularities[0]]["growth_mb"]
    else:
        checkpointing = None
        growth = _step_growth(step, device)
    return dict(
        config=args.config,
        variant=variant,
        backend=backend,
        batch=batch,
        device=device,
        threads=torch.get_num_threads(),
        loss_bpd=float(loss),
        ops_per_step=None if ops is None else ops.total,
        view_ops_per_step=None if ops is None else ops.views,
        step_ms=1e3 * statistics.median(step_times),
        step_ms_all=[1e3 * t for t in step_times],
        warmup_s=warmup_s,
        sample_n=n_sample,
        sample_ms=1e3 * statistics.median(sample_times),
        peak_mb=peak,
        step_growth_mb=growth,
        breakdown=breakdown,
        paired=paired,
        checkpointing=checkpointing,
    )


def _checkpointing_times(model, step, granularities, repeats: int, device: str) -> dict:
    """Median step times of the plain model (checkpointing toggled off) and of each
    checkpointing granularity, timed alternately (paired) in this process. Leaves the model
    checkpointed with ``granularities[0]``."""
    modes = ["plain", *granularities]

    def use(mode: str) -> None:
        if mode == "plain":
            model.set_activation_checkpointing(False)
        else:
            model.set_activation_checkpointing(True, mode)

    for mode in modes:  # warm-up (the first granularity's step ran already)
        if mode != granularities[0]:
            use(mode)
            step()
    times: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(repeats):
        for mode in modes:
            use(mode)
            times[mode] += _time(step, 1, device)
    use(modes[1])
    out = {m: dict(step_ms=1e3 * statistics.median(t), times=t) for m, t in times.items()}
    for g in granularities:
        out[g]["time_ratio"] = out[g]["step_ms"] / out["plain"]["step_ms"]
    out["plain"].pop("times")
    for g in granularities[1:]:
        out[g].pop("times")
    return out


def _checkpointing_memory(model, step, out: dict, device: str) -> None:
    """Add graph-kept bytes and step-growth of every mode of ``out`` (see
    ``_checkpointing_times``) and their ratios to plain. Leaves the first granularity on."""
    modes = list(out)
    for mode in modes:
        if mode == "plain":
            model.set_activation_checkpointing(False)
        else:
            model.set_activation_checkpointing(True, mode)
        out[mode]["kept_mb"] = graph_kept_bytes(model, step) / 2**20
        out[mode]["peak_live_mb"] = peak_live_bytes(step) / 2**20
        out[mode]["growth_mb"] = _step_growth(step, device)
    model.set_activation_checkpointing(True, modes[1])
    plain = out["plain"]
    for mode in modes[1:]:
        row = out[mode]
        row["kept_ratio"] = row["kept_mb"] / plain["kept_mb"]
        row["peak_live_ratio"] = row["peak_live_mb"] / plain["peak_live_mb"]
        if plain["growth_mb"] and row["growth_mb"] is not None:
            row["memory_ratio"] = row["growth_mb"] / plain["growth_mb"]


def graph_kept_bytes(model, step) -> int:
    """Bytes the autograd graph of one training forward keeps for the backward
    (:func:`vflow.testing.graph_kept_bytes`); runs and discards one forward."""
    from vflow.testing import graph_kept_bytes as kept

    n = kept(lambda: step.objective(step.images).mean())
    model.zero_grad(set_to_none=True)
    return n


def peak_live_bytes(step) -> int:
    """Peak bytes of live tensors during one training step (:func:`vflow.testing.
    peak_live_bytes`: forward, backward and the recomputations of checkpointed regions,
    allocator-independent); the model's parameters and buffers and the step's images do not
    count. Runs one step (slower than a plain one)."""
    from vflow.testing import peak_live_bytes as peak

    model = step.model
    model.zero_grad(set_to_none=True)
    n = peak(step, [*model.parameters(), *model.buffers(), step.images])
    model.zero_grad(set_to_none=True)
    return n


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _fix_malloc() -> bool:
    """glibc: fixed 128 KiB mmap threshold (tensors are mmapped and unmapped on free, so RSS
    follows them) and free heap memory returned to the kernel. False if not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (also disables its dynamic growth)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def _step_growth(step, device: str) -> float | None:
    """MB by which one training step grows memory at its peak over what was held before it
    (see the module docstring); None where it cannot be measured."""
    import gc

    import torch

    step.model.zero_grad(set_to_none=True)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if not _fix_malloc():
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    base = _rss_kib("VmRSS")
    step()
    peak = _rss_kib("VmHWM")
    if base is None or peak is None:
        return None
    return (peak - base) / 1024


def _build(args, backend: str):
    """The model of args.config on ``backend``, seeded, initialised on its benchmark batch."""
    import torch

    import vflow

    torch.manual_seed(0)
    model = vflow.build(args.config, backend=backend).to(args.device)
    c, h, w = model.config.data_shape
    batch = args.batch or BATCH.get(args.config, DEFAULT_BATCH)
    x = torch.randint(0, model.config.n_bins, (batch, c, h, w), device=args.device)
    model.initialize(x)
    return model, x


def _step_fn(model, bpd, x):
    """One training step: zero the gradients, bits/dim forward, backward."""

    def step():
        model.zero_grad(set_to_none=True)
        loss = bpd(x).mean()
        loss.backward()
        return loss

    step.model, step.objective, step.images = model, bpd, x
    return step


def _count_ops(step):
    """The ops one eager ``step()`` dispatches (``vflow.profiling.OpCounts``). Not for the
    compiled variants: a dispatch mode around a compiled function would recompile it."""
    from vflow.profiling import OpCounter

    with OpCounter() as counter:
        step()
    return counter.counts


def _breakdown(step, repeats: int = 3) -> dict:
    """Share of the step's self CPU time per category of ``CATEGORIES`` (rest: "other")."""
    from torch.profiler import profile

    with profile() as prof:
        for _ in range(repeats):
            step()
    shares: dict[str, float] = {}
    for event in prof.key_averages():
        name = next((cat for frag, cat in CATEGORIES if frag in event.key.lower()), "other")
        shares[name] = shares.get(name, 0.0) + event.self_cpu_time_total
    total = sum(shares.values()) or 1.0
    return {k: v / total for k, v in sorted(shares.items(), key=lambda kv: -kv[1])}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["vflow-digits", "vflow-cifar10"])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 digits, 8 CIFAR")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sample-repeats", type=int, default=None)
    parser.add_argument("--sample-n", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-sample", action="store_true", help="do not time sample()")
    parser.add_argument(
        "--granularities",
        nargs="+",
        default=["block"],
        choices=["block", "net", "step"],
        help="activation checkpointing granularities of the fused+ckpt variant",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time steps by the process's CPU time (with --threads 1: robust to other load)",
    )
    parser.add_argument(
        "--compile-all",
        action="store_true",
        help="also torch.compile the large configs (minutes of compilation each)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also report where each step's time goes"
    )
    parser.add_argument(
        "--unpaired",
        dest="paired",
        action="store_false",
        help="speed-ups from the separate processes' step times (no alternating reference)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    parser.add_argument("--out", default="results/model_step.json")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.sample_repeats = args.sample_repeats or (1 if args.quick else 3)

    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for config in args.configs:
        for variant in args.variants:
            if variant in COMPILED and not config.endswith("digits") and not args.compile_all:
                rows.append(
                    dict(
                        config=config,
                        variant=variant,
                        skipped="compile of large configs skipped (use --compile-all)",
                    )
                )
                continue
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                "--config",
                config,
                "--variant",
                variant,
                "--device",
                args.device,
                "--repeats",
                str(args.repeats),
                "--sample-repeats",
                str(args.sample_repeats),
            ]
            if args.batch:
                cmd += ["--batch", str(args.batch)]
            if args.sample_n:
                cmd += ["--sample-n", str(args.sample_n)]
            if args.profile:
                cmd.append("--profile")
            if args.skip_sample:
                cmd.append("--skip-sample")
            cmd += ["--granularities", *args.granularities]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if args.cpu_time:
                cmd.append("--cpu-time")
            if not args.paired:
                cmd.append("--unpaired")
            print(f"... {config} / {variant}", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    timeout=args.timeout,
                    env=dict(os.environ, PYTHONWARNINGS="ignore"),
                )
                if proc.returncode:
                    row = dict(error=proc.stderr.strip().splitlines()[-1:])
                else:
                    row = json.loads(proc.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                row = dict(error=f"timed out after {args.timeout}s")
            rows.append({"config": config, "variant": variant, **row})

    ratio_note = "alternating with the reference in one process" if args.paired else "unpaired"
    if args.cpu_time:
        ratio_note += "; times are process CPU times"
    header = (
        f"{'config':<16} {'variant':<26} {'step ms':>10} {'vs ref':>7} {'ops/step':>9} "
        f"{'sample ms':>11} {'peak MB':>9} {'step MB':>9}  note"
    )
    print(f"vs ref: step-time ratio, {ratio_note}")
    print(header)
    print("-" * len(header))
    for row in rows:
        if "step_ms" not in row:
            print(
                f"{row['config']:<16} {row['variant']:<26} {'-':>10} {'-':>7} {'-':>9} {'-':>11} "
                f"{'-':>9} {'-':>9}  "
                f"{row.get('skipped') or row.get('error')}"
            )
            continue
        row["speedup_vs_reference"] = ratio = _speedup(row, rows)
        speed = "-" if ratio is None else f"{ratio:.2f}x"
        note = (
            f"batch {row['batch']}, sample n={row['sample_n']}, warm-up (compilation) "
            f"{row['warmup_s']:.1f}s"
        )
        if row.get("paired"):
            p = row["paired"]
            note += f"; paired {p['step_ms']:.1f} vs reference {p['reference_ms']:.1f} ms"
        if row.get("checkpointing"):
            note += "; " + _checkpointing_note(row["checkpointing"])
        if row.get("breakdown"):
            note += "; " + ", ".join(f"{k} {v:.0%}" for k, v in row["breakdown"].items())
        growth = row.get("step_growth_mb")
        growth = "-" if growth is None else f"{growth:.0f}"
        n_ops = "-" if row.get("ops_per_step") is None else f"{row['ops_per_step']:,}"
        print(
            f"{row['config']:<16} {row['variant']:<26} {row['step_ms']:>10.1f} {speed:>7} "
            f"{n_ops:>9} {row['sample_ms']:>11.1f} {row['peak_mb']:>9.0f} {growth:>9}  {note}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(quick=args.quick, device=args.device, rows=rows), indent=2))
    print(f"wrote {out}")


def _checkpointing_note(c: dict) -> str:
    """The paired checkpointed-vs-plain comparison of one row, in words."""
    plain = c["plain"]
    parts = [
        f"plain: step growth {_mb(plain['growth_mb'])}, peak live {plain['peak_live_mb']:.0f} MB, "
        f"graph keeps {plain['kept_mb']:.0f} MB, {plain['step_ms']:.0f} ms"
    ]
    for mode, r in c.items():
        if mode == "plain":
            continue
        mem = _mb(r["growth_mb"])
        if r.get("memory_ratio") is not None:
            mem += f" ({r['memory_ratio']:.0%})"
        parts.append(
            f"ckpt {mode}: step growth {mem}, peak live {r['peak_live_mb']:.0f} MB "
            f"({r['peak_live_ratio']:.0%}), graph keeps {r['kept_mb']:.0f} MB "
            f"({r['kept_ratio']:.0%}), {r['step_ms']:.0f} ms ({r['time_ratio']:.2f}x)"
        )
    return "; ".join(parts)


def _mb(value) -> str:
    return "-" if value is None else f"{value:.0f} MB"


def _speedup(row: dict, rows: list[dict]) -> float | None:
    """Paired ratio if measured, else the reference row's step time over this row's."""
    if row.get("paired"):
        return row["paired"]["speedup"]
    ref = next(
        (
            r
            for r in rows
            if r["config"] == row["config"] and r["variant"] == "reference" and "step_ms" in r
        ),
        None,
    )
    return ref["step_ms"] / row["step_ms"] if ref else None


if __name__ == "__main__":
    main()

"""Host-side cost of the op layer: the public coupling op against the bare kernel call.

At the tiny shape (B = 1, 3x4x4, K = 4) the kernels' arithmetic is negligible, so what a
call costs beyond the bare kernel is the op layer's own host work: argument checks, backend
resolution, dtype handling, the autograd node and, for the registered ``torch.library``
custom ops, their Python autograd wrapper and dispatcher round trips. Rows, per backend
(``cpp``; ``triton`` only when it can run: CUDA, or ``TRITON_INTERPRET=1`` on the CPU):

* ``bare``: the backend's kernel functions called directly (forward; forward + backward).
* ``custom-op``: ``torch.ops.vflow.coupling_fwd`` with its registered autograd formula (the
  path torch.compile traces; what the public op called in eager mode before the direct path).
* ``public``: ``vflow.ops.mixlogistic_coupling`` (the direct autograd.Function path in eager).
* ``autograd-floor``: ``x * 1`` forward and backward with the same ``autograd.backward`` call:
  what any differentiable op pays the autograd engine, not the op layer's doing.

``overhead`` = row - bare. Times are the minimum over ``--repeats`` blocks of the thread's CPU
time per call (``time.thread_time``), which other processes on a shared machine disturb far
less than wall time; all rows run interleaved in one process.

    python benchmarks/op_overhead.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from vflow import ops

SHAPE = (1, 3, 4, 4)  # B, C, H, W
K = 4


def _inputs(requires_grad: bool):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(*SHAPE, generator=gen)
    params = 0.5 * torch.randn(SHAPE[0], 2 + 3 * K, *SHAPE[1:], generator=gen)
    return x.requires_grad_(requires_grad), params.requires_grad_(requires_grad)


def _backward(y, logdet):
    torch.autograd.backward((y, logdet), (torch.ones_like(y), torch.ones_like(logdet)))


def cases(backend: str) -> dict:
    """name -> (forward-only call, forward + backward call) for ``backend``."""
    kernels = ops._kernels(backend)
    x, p = _inputs(False)
    xg, pg = _inputs(True)
    flags = (True, 0, 0)  # smooth, plain pattern, parity

    def bare_fwd():
        kernels.coupling_fwd(x, p, *flags)

    def bare_fwdbwd():
        y, logdet = kernels.coupling_fwd(x, p, *flags)
        kernels.coupling_bwd(x, p, torch.ones_like(y), torch.ones_like(logdet), *flags, False)

    def custom_fwd():
        torch.ops.vflow.coupling_fwd(x, p, *flags, backend)

    def custom_fwdbwd():
        _backward(*torch.ops.vflow.coupling_fwd(xg, pg, *flags, backend))

    def public_fwd():
        ops.mixlogistic_coupling(x, p, backend=backend)

    def public_fwdbwd():
        _backward(*ops.mixlogistic_coupling(xg, pg, backend=backend))

    def floor_fwd():
        x * 1

    def floor_fwdbwd():
        y = xg * 1
        _backward(y, y.sum((1, 2, 3)))

    return {
        "bare": (bare_fwd, bare_fwdbwd),
        "custom-op": (custom_fwd, custom_fwdbwd),
        "public": (public_fwd, public_fwdbwd),
        "autograd-floor": (floor_fwd, floor_fwdbwd),
    }


def time_per_call(fn, number: int) -> float:
    """Thread CPU seconds per call of one block of ``number`` calls."""
    start = time.thread_time()
    for _ in range(number):
        fn()
    return (time.thread_time() - start) / number


def measure(backend: str, number: int, repeats: int) -> dict:
    """Per row and mode, the min over ``repeats`` interleaved blocks, in microseconds."""
    table = cases(backend)
    best: dict = {}
    for fns in table.values():  # warm-up
        for fn in fns:
            for _ in range(min(number, 20)):
                fn()
    for _ in range(repeats):
        for name, fns in table.items():
            for mode, fn in zip(("forward", "fwdbwd"), fns, strict=True):
                t = time_per_call(fn, number) * 1e6
                best[(name, mode)] = min(best.get((name, mode), float("inf")), t)
    rows = []
    for name in table:
        row = {"backend": backend, "row": name}
        for mode in ("forward", "fwdbwd"):
            row[f"{mode}_us"] = best[(name, mode)]
            row[f"{mode}_overhead_us"] = best[(name, mode)] - best[("bare", mode)]
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few calls (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved blocks per row")
    parser.add_argument("--number", type=int, default=None, help="calls per block")
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    number = args.number or (20 if args.quick else 300)
    repeats = args.repeats or (2 if args.quick else 7)
    backends = [b for b in ("cpp", "triton") if b in ops.available_backends("cpu")]
    rows = [row for backend in backends for row in measure(backend, number, repeats)]
    interpret = os.environ.get("TRITON_INTERPRET", "0")
    print(
        f"# op-layer overhead, shape {SHAPE} K={K}, {platform.machine()}, torch "
        f"{torch.__version__}, 1 thread, TRITON_INTERPRET={interpret}"
    )
    header = ("backend", "row", "fwd us", "fwd ovh", "f+b us", "f+b ovh")
    print("{:8s} {:15s} {:>9s} {:>9s} {:>9s} {:>9s}".format(*header))
    for r in rows:
        times = [r[k] for k in ("forward_us", "forward_overhead_us", "fwdbwd_us")]
        times.append(r["fwdbwd_overhead_us"])
        print("{:8s} {:15s} {:9.1f} {:9.1f} {:9.1f} {:9.1f}".format(r["backend"], r["row"], *times))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()

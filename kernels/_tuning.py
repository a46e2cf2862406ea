"""Tile tuning of the coupling kernels on a GPU: the (block, num_warps) of each launch.

The launchers' default tile, :data:`DEFAULT_BLOCK` active elements per program on
:data:`NUM_WARPS` warps, was chosen without a GPU. With tuning on (:func:`set_autotune`, or
``VFLOW_TRITON_AUTOTUNE=1`` (or true, yes, on) in the environment when vflow is imported),
the first launch of a coupling kernel for a tuning key on a CUDA device times every tile of
:func:`candidates` with ``triton.testing.do_bench`` and keeps the fastest for every later
launch with that key (:func:`tuned_tiles` lists them). The key (:func:`tuning_key`) is the
kernel and its mode, dtype, K, pattern, smoothing, the device, and the per-sample size N and
batch B rounded up to powers of two. The candidates are :data:`CANDIDATES`, in float64 only
those of at most :data:`FLOAT64_MAX_PER_THREAD` elements per thread. A candidate that fails
to compile or launch (out of registers or shared memory) is passed over; if all fail, the key
keeps the default tile.

Cost, estimated, not yet measured on a GPU: a few seconds per key, once per process (Triton
compiles each candidate, then each is timed for ~25 ms). While it times, do_bench holds
Triton's 256 MB cache-flush buffer on the device: a run at the edge of the GPU's memory
should tune in a first, smaller step or leave tuning off.

It never tunes, and uses the default tile, when:

* the tensors are on the CPU (Triton's interpreter, where times mean nothing);
* a CUDA graph is being captured (timing synchronises the device, which capture forbids;
  ``vflow.step.GraphedStep`` runs its warm-up iterations uncaptured, so they tune first);
* the caller passes ``block`` or ``num_warps`` (the tests force tiles this way).

Why it is off by default: it has not yet been measured on a GPU (``benchmarks/coupling.py``
times the ``triton-tuned`` provider beside the default tile, and ``benchmarks/gpu_report.py``
reports it), and the logdet is a sum of per-program partial sums, so two processes that tune
to different tiles can differ in its last float32 bits. The per-element outputs (y, x,
gradients) do not depend on the tile, which only decides which program computes an element:
bitwise under the interpreter (``tests/test_tile_tuning.py``); on a GPU each (block, warps)
variant is compiled separately, and the same test under ``--device cuda`` allows 1e-6.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable

import torch
import triton

#: The launchers' tile without tuning: active elements per program and warps per program.
DEFAULT_BLOCK = 256
NUM_WARPS = 4

#: The tiles tuning chooses from, as (block, num_warps): 2 or 4 elements per thread (32
#: threads a warp), from many small programs (latency hiding on small N) to few large ones.
CANDIDATES = ((128, 1), (128, 2), (256, 2), (256, 4), (512, 4), (512, 8), (1024, 8))
#: Elements per thread above which a float64 tile spills: ptxas -v for sm_90 gives the float64
#: backward of the inverse 255 registers and 60-76 spilled bytes at 4 per thread.
FLOAT64_MAX_PER_THREAD = 2
#: Values of VFLOW_TRITON_AUTOTUNE (case and surrounding blanks ignored) that turn tuning on.
TRUE_VALUES = ("1", "true", "yes", "on")

_enabled = os.environ.get("VFLOW_TRITON_AUTOTUNE", "").strip().lower() in TRUE_VALUES
_best: dict[tuple, tuple[int, int]] = {}
_lock = threading.Lock()  # one tuning at a time: concurrent timings would disturb each other


def candidates(dtype: torch.dtype) -> tuple[tuple[int, int], ...]:
    """The candidate tiles for ``dtype``: :data:`CANDIDATES`, without float64 tiles of more
    than :data:`FLOAT64_MAX_PER_THREAD` elements per thread."""
    if dtype != torch.float64:
        return CANDIDATES
    return tuple(
        (block, warps)
        for block, warps in CANDIDATES
        if block <= 32 * warps * FLOAT64_MAX_PER_THREAD
    )


def set_autotune(enabled: bool) -> None:
    """Turn tile tuning on or off for this process (the module docstring says what it does).
    Turning it off keeps the tiles already chosen for a later ``set_autotune(True)``."""
    global _enabled
    _enabled = bool(enabled)


def autotune_enabled() -> bool:
    """Whether tile tuning is on."""
    return _enabled


def tuned_tiles() -> dict[tuple, tuple[int, int]]:
    """The tiles chosen so far: tuning key -> (block, num_warps) (a copy)."""
    return dict(_best)


def clear_tuned_tiles() -> None:
    """Forget every chosen tile (the next launch of each key tunes again)."""
    _best.clear()


def tuning_key(kernel: str, x: torch.Tensor, k: int, n: int, smooth: bool, pattern: int) -> tuple:
    """The launches that share one tuned tile: ``kernel`` (with its mode, e.g. "bwd-inverse"),
    x's dtype and device, the K mixture components, the pattern and smoothing, and N (active
    elements per sample) and B rounded up to powers of two."""
    return (
        kernel,
        str(x.dtype),
        str(x.device),
        int(k),
        int(pattern),
        bool(smooth),
        triton.next_power_of_2(int(n)),
        triton.next_power_of_2(x.shape[0]),
    )


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _may_tune(device: torch.device) -> bool:
    return _enabled and device.type == "cuda" and not _capturing()


def _bench_ms(launch: Callable[[], object]) -> float:
    """Median milliseconds of ``launch()`` on the GPU (``triton.testing.do_bench``)."""
    import triton.testing

    return float(triton.testing.do_bench(launch, warmup=5, rep=20, return_mode="median"))


def _time_or_inf(launch: Callable[[int, int], object], tile: tuple[int, int]) -> float:
    """Milliseconds of ``launch(*tile)``, or infinity if it fails to compile or launch (out
    of registers or shared memory, a ptxas error): a candidate that cannot run is passed over
    (Triton's own autotuner does the same)."""
    try:
        return _bench_ms(functools.partial(launch, *tile))
    except Exception:  # any failure of one candidate only disqualifies it
        return float("inf")


def _fastest(launch: Callable[[int, int], object], dtype: torch.dtype) -> tuple[int, int]:
    """The candidate (block, num_warps) with the smallest time of ``launch(block, warps)``;
    the first candidate wins ties; the default tile when no candidate runs."""
    tiles = candidates(dtype)
    times = {tile: _time_or_inf(launch, tile) for tile in tiles}
    best = min(tiles, key=times.__getitem__)
    return best if times[best] < float("inf") else (DEFAULT_BLOCK, NUM_WARPS)


def tile_for(
    key_args: tuple,
    launch: Callable[[int, int], object],
    device: torch.device,
    block: int | None = None,
    num_warps: int | None = None,
) -> tuple[int, int]:
    """The (block, num_warps) of one launch: the caller's ``block`` / ``num_warps`` where
    given (defaults for the other), else the tuned tile of the launch's tuning key (built
    from ``key_args``, the arguments of :func:`tuning_key`, only when tuning may run) if
    tuning may run (it times ``launch(block, num_warps)`` for every candidate on the key's
    first launch), else the default. ``launch`` must be safe to repeat (it only writes its
    outputs)."""
    if num_warps is not None and (num_warps < 1 or num_warps > 32 or num_warps & (num_warps - 1)):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    if block is not None or num_warps is not None or not _may_tune(device):
        return (
            DEFAULT_BLOCK if block is None else int(block),
            NUM_WARPS if num_warps is None else int(num_warps),
        )
    key = tuning_key(*key_args)
    with _lock:
        if key not in _best:
            _best[key] = _fastest(launch, key_args[1].dtype)
        return _best[key]

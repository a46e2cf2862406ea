"""Memory-bandwidth model of the coupling benchmarks (``coupling.py``, ``gpu_report.py``).

* ``coupling_bytes``: the bytes a coupling call must move at least, each tensor it reads or
  writes counted once (B x C x H x W the transformed half, P = half x (2 + 3K) parameters):
  forward reads x, params and writes y (2 half + P); checkerboard the same on the full image
  (4 half + P); inverse reads y, params and writes x (2 half + P); fwd+bwd is the forward plus
  a backward that reads x, params, dy and writes dx, dparams (3 half + 2P). The (B,) logdet
  and its gradient are left out.
* ``device_peak``: the device's peak bandwidth and where it comes from: the spec table below
  (by ``torch.cuda.get_device_name()``), else the memory clock x bus width the device reports,
  else (and always on the CPU) the measured bandwidth of a large ``copy_``.

No torch import at module level: ``gpu_report.py``'s parent process imports this.
"""

from __future__ import annotations

import time

# Spec memory bandwidth (GB/s) by a fragment of the device name; the longest matching
# fragment wins ("NVIDIA GH200" is a GH200, not an H200; "A100-SXM4-80GB" not "A100").
KNOWN_PEAK_GBPS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
    "H100": 3350,  # "NVIDIA H100 80GB HBM3" is the SXM card
    "GH200": 4000,
    "B200": 8000,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100": 1555,
    "L40S": 864,
    "L40": 864,
    "L4": 300,
    "A10G": 600,
    "A10": 600,
    "RTX 4090": 1008,
    "RTX 3090": 936,
    "V100": 900,
    "T4": 320,
}
MODES = ("forward", "fwdbwd", "inverse", "checkerboard")


def coupling_bytes(mode: str, dims, itemsize: int = 4) -> int:
    """The bytes a coupling call of ``mode`` must move at least (module docstring);
    ``dims`` = (B, C, H, W of the transformed half, K)."""
    b, c, h, w, k = dims
    half = b * c * h * w
    params = half * (2 + 3 * k)
    counts = {
        "forward": 2 * half + params,
        "checkerboard": 4 * half + params,
        "inverse": 2 * half + params,
        "fwdbwd": (2 * half + params) + (3 * half + 2 * params),
    }
    if mode not in counts:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return counts[mode] * itemsize


def gbps(nbytes: int, ms: float) -> float:
    """Effective bandwidth in GB/s (1e9 bytes per second) of moving ``nbytes`` in ``ms``."""
    return nbytes / (ms * 1e-3) / 1e9


def spec_gbps(name: str) -> tuple[float, str] | None:
    """(GB/s, table key) of the device called ``name``, or None when the table lacks it."""
    hits = [key for key in KNOWN_PEAK_GBPS if key.lower() in name.lower()]
    if not hits:
        return None
    key = max(hits, key=len)
    return float(KNOWN_PEAK_GBPS[key]), key


def copy_gbps(device, mb: int = 256, repeats: int = 5) -> float:
    """Measured bandwidth (GB/s, bytes read + written) of a ``copy_`` of ``mb`` MiB."""
    import torch

    device = torch.device(device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a = torch.ones(mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        b.copy_(a)
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * a.numel() * 4 / min(times) / 1e9


def spec_peak(device) -> tuple[float, str] | None:
    """(GB/s, source) of a CUDA device's spec bandwidth: the table, else memory clock x bus
    width from its properties; None on other devices or when neither is known."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    spec = spec_gbps(name)
    if spec:
        return spec[0], f"spec of {name}, table entry {spec[1]!r}"
    p = torch.cuda.get_device_properties(device)
    clock_khz = getattr(p, "memory_clock_rate", None)
    bus_bits = getattr(p, "memory_bus_width", None)
    if clock_khz and bus_bits:  # double data rate
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, f"spec of {name}, memory clock x bus"
    return None


def device_peak(device, copy_mb: int = 256) -> tuple[float, str]:
    """(GB/s, source) of ``device``'s peak memory bandwidth: its spec, else (and always on
    the CPU) the measured bandwidth of a ``copy_`` of ``copy_mb`` MiB."""
    spec = spec_peak(device)
    if spec:
        return spec
    return copy_gbps(device, copy_mb), f"measured {copy_mb} MiB copy, no spec known"

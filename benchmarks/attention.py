"""Small-head self-attention: the fused kernel against torch's SDPA and the eager formula.

For each (B, heads, d, T), in one run and side by side, the forward + backward time of

* ``fused``   ``vflow.ops.self_attention(backend="cpp")`` (the vflow._C kernel, d <= 8)
* ``sdpa``    ``vflow.reference.self_attention``: torch's scaled_dot_product_attention with
              the head dimension innermost (its CPU flash kernel)
* ``eager``   softmax(q^T k / sqrt(d)) v written out with einsum

in float32, with each provider's largest error (output and gradient) against the formula in
float64. The default shapes are the digits model's heads (d = 4, T = 8 ... 64 positions,
batch 64) and two larger ones. Prints a table and writes results/attention.json.

    python benchmarks/attention.py            # full
    python benchmarks/attention.py --quick    # shorter timing, fewer shapes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

from vflow import ops, reference

SHAPES = [(64, 4, 4, 8), (64, 4, 4, 16), (64, 4, 4, 32), (64, 4, 4, 64), (16, 4, 8, 256)]
QUICK_SHAPES = [(8, 4, 4, 16), (8, 4, 8, 64)]


def eager(qkv):
    """out[b, n, c, i] = sum_j softmax_j(q[:, i] . k[:, j] / sqrt(d)) v[c, j]."""
    q, k, v = qkv.unbind(1)
    scores = torch.einsum("bnci,bncj->bnij", q, k) / q.shape[2] ** 0.5
    return torch.einsum("bnij,bncj->bnci", scores.softmax(-1), v)


PROVIDERS = {
    "fused": lambda qkv: ops.self_attention(qkv, backend="cpp"),
    "sdpa": reference.self_attention,
    "eager": eager,
}


def forward_backward(fn, qkv, grad_out):
    qkv = qkv.detach().requires_grad_(True)
    out = fn(qkv)
    (grad,) = torch.autograd.grad(out, qkv, grad_out)
    return out.detach(), grad


def bench_shape(shape, providers, min_run_time) -> dict:
    b, heads, d, t = shape
    gen = torch.Generator().manual_seed(0)
    qkv64 = torch.randn(b, 3, heads, d, t, dtype=torch.float64, generator=gen) * 2
    grad64 = torch.randn(b, heads, d, t, dtype=torch.float64, generator=gen)
    ref_out, ref_grad = forward_backward(eager, qkv64, grad64)
    qkv, grad_out = qkv64.float(), grad64.float()
    row = dict(B=b, heads=heads, d=d, T=t)
    for name in providers:
        fn = PROVIDERS[name]
        out, grad = forward_backward(fn, qkv, grad_out)
        step = lambda fn=fn: forward_backward(fn, qkv, grad_out)  # noqa: E731
        timer = Timer("step()", globals=dict(step=step))
        row[f"{name}_us"] = timer.blocked_autorange(min_run_time=min_run_time).median * 1e6
        row[f"{name}_err"] = max(
            (out.double() - ref_out).abs().max().item(),
            (grad.double() - ref_grad).abs().max().item(),
        )
    for name in providers:
        if name != "fused" and "fused_us" in row:
            row[f"fused_vs_{name}"] = row[f"{name}_us"] / row["fused_us"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--out", default="results/attention.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    providers = [p for p in PROVIDERS if p != "fused" or "cpp" in ops.available_backends("cpu")]
    shapes, min_run_time = (QUICK_SHAPES, 0.05) if args.quick else (SHAPES, 0.5)
    rows = [bench_shape(shape, providers, min_run_time) for shape in shapes]

    print(f"forward + backward, float32, {torch.get_num_threads()} threads, median us")
    print(
        "(B, heads, d, T)    " + "".join(f"{p:>10}" for p in providers) + "   fused vs sdpa, eager"
    )
    for r in rows:
        times = "".join(f"{r[p + '_us']:>10.0f}" for p in providers)
        ratios = ", ".join(f"{r[k]:.2f}x" for k in ("fused_vs_sdpa", "fused_vs_eager") if k in r)
        print(f"{str((r['B'], r['heads'], r['d'], r['T'])):<20}{times}   {ratios}")
    worst = {p: max(r[p + "_err"] for r in rows) for p in providers}
    print("max abs error vs float64: " + ", ".join(f"{p} {e:.1e}" for p, e in worst.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(threads=torch.get_num_threads(), rows=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Paired CPU time of a training step with and without the fused network ops (issue 27).

One model of ``--config`` on the cpp backend, initialised on a batch of ``--batch`` random
images; each round times one training step (``vflow.profiling.training_loss``, forward and
backward) with the gated convs and channel layer norms on the fused ``vflow.net_ops`` kernels
and one with them on the reference torch ops (the code before the fused ops; couplings and
attention stay on the cpp backend in both), in alternating order, by process CPU time on
one thread. Prints the median, min and max of reference / fused (> 1: the fused step is
faster).

Measured 2026-12-05 on the 2-core development machine, other jobs running: vflow-digits
batch 64, 12 rounds: 1.062 (1.000-1.096); vflow-fashion batch 16, 6 rounds: 1.039
(0.912-1.057); vflow-cifar10 batch 4, 4 rounds: 1.085 (1.007-1.112).

    python benchmarks/net_ops_step.py --config vflow-digits --batch 64 --rounds 12
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import vflow
from vflow.nets import ChannelLayerNorm, GatedConv
from vflow.profiling import training_loss


def set_network_backend(model: torch.nn.Module, backend: str) -> None:
    """The backend of the modules that call vflow.net_ops (gated convs, layer norms)."""
    for module in model.modules():
        if isinstance(module, (GatedConv, ChannelLayerNorm)):
            module.backend = backend


def step_cpu_seconds(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.process_time()
    model.zero_grad(set_to_none=True)
    training_loss(model, x).backward()
    return time.process_time() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="vflow-digits")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = vflow.build(args.config, backend="cpp")
    x = torch.randint(0, model.config.n_bins, (args.batch, *model.config.data_shape))
    model.initialize(x)
    model.train()
    for backend in ("cpp", "reference"):  # warm-up
        set_network_backend(model, backend)
        step_cpu_seconds(model, x)
    ratios = []
    for r in range(args.rounds):
        seconds = {}
        for backend in ("cpp", "reference") if r % 2 else ("reference", "cpp"):
            set_network_backend(model, backend)
            seconds[backend] = step_cpu_seconds(model, x)
        ratios.append(seconds["reference"] / seconds["cpp"])
    print(
        f"{args.config} batch {args.batch}: reference / fused CPU time per step, "
        f"{args.rounds} rounds: median {statistics.median(ratios):.3f} "
        f"(min {min(ratios):.3f}, max {max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()

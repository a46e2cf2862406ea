"""bf16 networks: autocast(bfloat16) of the conditioning and context networks only.

The networks (``CouplingNet``, ``ContextNet``: convolutions, attention, layer norms, gates)
hold almost all of a step's FLOPs and tolerate bf16; the couplings, their logdets, ActNorm
and the invertible 1x1 convolutions, whose errors add up over the whole flow into the
likelihood, stay float32. :func:`autocast_networks` wraps each network's ``forward`` in
``torch.autocast(dtype=torch.bfloat16)`` and casts its output back to float32, so the
coupling that reads it computes in float32 (``vflow train --precision bf16-nets``, the
``fused+bf16`` variant of ``benchmarks/model_step.py``).

By default only training steps are autocast (module in training mode, grad mode on):
evaluation and sampling of a model trained so run its networks in float32, the likelihood
the model defines. The weights stay float32 throughout (autocast casts per op).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vflow.nets import ContextNet, CouplingNet

__all__ = ["NETWORK_CLASSES", "PRECISIONS", "autocast_networks", "check_precision"]

#: ``vflow train --precision`` values.
PRECISIONS = ("fp32", "bf16-nets")
#: The networks that :func:`autocast_networks` runs in bf16.
NETWORK_CLASSES = (CouplingNet, ContextNet)


def check_precision(value: str | None) -> str:
    """``value`` (None: "fp32") if it is one of :data:`PRECISIONS`, else ValueError."""
    value = value or "fp32"
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return value


def _autocast_forward(net: nn.Module, training_only: bool, *args, **kwargs):
    """``net``'s class forward under bf16 autocast, output cast to float32 (eager float32
    outside a training step when ``training_only``)."""
    if training_only and not (net.training and torch.is_grad_enabled()):
        return type(net).forward(net, *args, **kwargs)
    device_type = next(net.parameters()).device.type
    with torch.autocast(device_type, dtype=torch.bfloat16):
        out = type(net).forward(net, *args, **kwargs)
    return out.float()


def autocast_networks(model: nn.Module, training_only: bool = True) -> int:
    """bf16 autocast of every conditioning / context network of ``model`` (in place; see
    the module docstring). Returns the number of networks wrapped."""
    n = 0
    for module in model.modules():
        if type(module) in NETWORK_CLASSES:
            module.forward = functools.partial(_autocast_forward, module, training_only)
            n += 1
    return n

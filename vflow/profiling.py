"""Counting the ops a training step dispatches (tests, ``benchmarks/model_step.py``).

``count_step_ops(model, x)`` runs one training step of ``model`` on the integer images ``x``
(the trainer's loss, ``-mean_b elbo(x_b) / (D ln 2)`` with ``validate=False``, forward and
backward) under an :class:`OpCounter`, a ``TorchDispatchMode`` that sees every aten op
after autograd, i.e. what the backend runs: on a GPU each op that is not a view or a
detach is (at least) one kernel launch. The count does not depend on the batch size.

Attribution: a forward op is charged to the innermost module running it (its class name,
through global module forward pre / post hooks keeping a stack); an op of the backward is
charged to ``"backward:" + name`` of the autograd node running it (``MulBackward0``, ...).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounts", "OpCounter", "count_step_ops", "training_loss"]


@dataclass
class OpCounts:
    """Ops per aten op kind (``"mul"``, ...) and per owner (module class or backward node)."""

    kinds: Counter = field(default_factory=Counter)
    owners: Counter = field(default_factory=Counter)
    views: int = 0  # ops returning a view of an input (detach, view, permute, ...): no kernel

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def table(self, top: int = 10) -> str:
        """The ``top`` op kinds and owners, largest first."""
        others = self.total - self.views
        lines = [f"total ops {self.total:,} ({self.views:,} views, {others:,} others)"]
        for title, counter in (("op kinds", self.kinds), ("owners", self.owners)):
            top_ones = ", ".join(f"{k} {n:,}" for k, n in counter.most_common(top))
            lines.append(f"  {title}: {top_ones}")
        return "\n".join(lines)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, by kind and by owner (module docstring).

    Use as ``with OpCounter() as counter: ...``; the counts are in ``counter.counts``."""

    def __init__(self):
        super().__init__()
        self.counts = OpCounts()
        self.stack: list[str] = []
        self._hooks = []

    def __enter__(self):
        self._hooks = [
            nn.modules.module.register_module_forward_pre_hook(self._push),
            nn.modules.module.register_module_forward_hook(self._pop),
        ]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        return super().__exit__(*exc)

    def _push(self, module, args):
        self.stack.append(type(module).__name__)

    def _pop(self, module, args, out):
        self.stack.pop()

    def _owner(self) -> str:
        node = torch._C._current_autograd_node()
        if node is not None:
            return "backward:" + node.name()
        return self.stack[-1] if self.stack else "<top>"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts.kinds[func.overloadpacket.__name__] += 1
        self.counts.views += func.is_view
        self.counts.owners[self._owner()] += 1
        return func(*args, **(kwargs or {}))


def training_loss(model: nn.Module, x: Tensor) -> Tensor:
    """The trainer's loss (``vflow.step.TrainStep``): -mean ELBO in bits/dim."""
    dims = math.prod(model.config.data_shape)
    return -model.elbo(x, validate=False).mean() / (dims * math.log(2))


def count_step_ops(model: nn.Module, x: Tensor) -> OpCounts:
    """The ops of one training step (forward of ``training_loss`` and its backward) of an
    initialised ``model`` on images ``x``, in train mode; gradients are left in ``.grad``."""
    model.train()
    model.zero_grad(set_to_none=True)
    with OpCounter() as counter:
        training_loss(model, x).backward()
    return counter.counts

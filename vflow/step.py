"""The training iteration, kept on the device: no tensor value is read on the host.

One iteration (:meth:`TrainStep.run`) on a batch ``x`` of ``B`` images with ``D`` dimensions:

1. ``lr = learning_rate(t + 1)`` from the device step counter ``t`` (:mod:`vflow.recipe`);
2. ``loss = -mean_b ELBO(x_b) / (D ln 2)`` (bits/dim), backpropagated;
3. ``g = ||grad||_2`` over all parameters, and the gradient clipped to ``grad_clip``
   (``torch.nn.utils.clip_grad_norm_``, which does not read the norm on the host);
4. ``ok = isfinite(loss) & isfinite(g)`` (under DDP: the loss averaged and the flag AND-ed
   over ranks with one ``all_reduce``);
5. fused Adam (``torch.optim.Adam(fused=True)``, learning rate a device tensor) with
   ``found_inf = !ok``: a non-finite iteration changes neither the weights nor Adam's moments
   or step count;
6. the EMA of the weights, ``e += w (p - e)`` with ``w = ok (1 - min(decay, (1+n)/(10+n)))``
   after ``n`` good updates (:class:`EMA`), so a skipped iteration leaves it unchanged;
7. ``(loss, g, ok)`` written into a device ring of the iterations since the last read
   (:class:`StepHistory`), which the trainer reads once per logging window.

Since nothing in it depends on a host value, the host runs ahead of the device (the next
batch is drawn and copied while the device works), and the whole iteration can be captured
once and replayed as a CUDA graph (:class:`GraphedStep`). The same code runs on the CPU.

Equivalence with the plain loop (Python-float learning rate, Adam's per-tensor path, a
Python decision to skip, ``e = d e + (1 - d) p``): the same mathematics in a different
floating-point order, so equal to rounding; ``tests/test_step.py`` checks 50 steps of
vflow-digits with dropout in float64 (to 1e-10) and float32, a planted non-finite step
included.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .recipe import learning_rate_tensor

LN2 = math.log(2.0)


class EMA:
    """Exponential moving average of the parameters (buffers are copied as they are).

    ``decay_n = min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so that the average
    is not dominated by the initial weights in short runs. :meth:`update` runs on the
    device; with ``ok`` (a bool tensor) it is masked: ``ok = False`` changes nothing.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.params = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
        device = next(iter(self.params.values())).device if self.params else None
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # updates made

    @property
    def updates(self) -> int:
        """The number of updates made (reads the device counter)."""
        return int(self.count)

    @torch.no_grad()
    def update(self, model: nn.Module, ok: Tensor | None = None) -> None:
        n = self.count.double()
        weight = 1 - torch.clamp((1 + n) / (10 + n), max=self.decay)
        if ok is not None:
            weight = weight * ok
            self.count.add_(ok.long())
        else:
            self.count.add_(1)
        self._lerp_params(model, weight)
        for k, b in model.named_buffers():
            target = self.buffers[k]
            target.copy_(b if ok is None else torch.where(ok, b, target))

    def _lerp_params(self, model: nn.Module, weight: Tensor) -> None:
        """``e += weight * (p - e)`` for every parameter, one foreach call per dtype."""
        groups: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
        for k, p in model.named_parameters():
            avg, live = groups.setdefault(p.dtype, ([], []))
            avg.append(self.params[k])
            live.append(p.detach())
        for dtype, (avg, live) in groups.items():
            delta = torch._foreach_sub(live, avg)
            torch._foreach_mul_(delta, weight.to(dtype))
            torch._foreach_add_(avg, delta)

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "params": self.params,
            "buffers": self.buffers,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.count.fill_(int(state["updates"]))
        for k, v in state["params"].items():
            self.params[k].copy_(v)
        for k, v in state["buffers"].items():
            if k in self.buffers and self.buffers[k].shape == v.shape:
                self.buffers[k].copy_(v)
            else:
                self.buffers[k] = v.clone()

    def model_state(self) -> dict:
        """A state dict for ``load_state_dict`` of the model: EMA params + current buffers."""
        return {**self.buffers, **self.params}

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.model_state(), strict=False)
        return model


class StepHistory:
    """``(loss, grad_norm, ok)`` of each iteration since the last :meth:`read`, kept in a
    device tensor ``(capacity, 3)`` (float64) written at a device position, so that a CUDA
    graph can record into it; :meth:`read` copies the rows to the host (one read)."""

    def __init__(self, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"StepHistory: capacity must be >= 1, got {capacity}")
        self.rows = torch.zeros(capacity, 3, dtype=torch.float64, device=device)
        self.position = torch.zeros(1, dtype=torch.int64, device=device)
        self.pending = 0  # rows written since the last read (host count of record calls)

    @property
    def capacity(self) -> int:
        return self.rows.shape[0]

    def record(self, loss: Tensor, grad_norm: Tensor, ok: Tensor) -> None:
        row = torch.stack([loss.double(), grad_norm.double(), ok.double()])
        self.rows.index_copy_(0, self.position, row.unsqueeze(0))
        self.position.add_(1)

    def read(self) -> list[tuple[float, float, bool]]:
        """The pending rows, oldest first, as ``(loss, grad_norm, ok)``; empties the ring."""
        rows = self.rows[: self.pending].tolist()
        self.position.zero_()
        self.pending = 0
        return [(loss, gnorm, ok != 0) for loss, gnorm, ok in rows]


def fused_adam(params: list[Tensor], lr: Tensor, betas, capturable: bool) -> torch.optim.Adam:
    """Adam on the fused path (one kernel for all parameters, on CPU and CUDA), reading its
    learning rate from the device tensor ``lr`` (float32 on CUDA, whose fused kernel reads
    it as float; float64 on the CPU, whose kernel reads it as a double)."""
    return torch.optim.Adam(params, lr=lr, betas=tuple(betas), fused=True, capturable=capturable)


def reset_optimizer_options(opt: torch.optim.Adam, lr: Tensor, capturable: bool) -> None:
    """Point the param groups back at the device learning rate and the fused path after
    ``opt.load_state_dict``, which copies a checkpoint's group options (a float lr, or
    ``fused=None`` from a checkpoint of the plain loop) over them."""
    for group in opt.param_groups:
        group.update(lr=lr, fused=True, foreach=None, capturable=capturable)


def match_parameter_layouts(opt: torch.optim.Optimizer) -> None:
    """Give every per-parameter state tensor (Adam's moments) its parameter's memory layout.

    ``load_state_dict`` keeps a checkpoint's layout, and the fused kernel pairs the moments
    with the parameters element by element in memory: moments saved from a channels_last run
    and loaded for contiguous parameters (or the other way round) would be applied to the
    wrong weights (an error of 0.15 after one step in a measured case)."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, Tensor) and v.shape == p.shape and v.stride() != p.stride():
                state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


class TrainStep:
    """One device-resident training iteration (see the module docstring).

    ``objective(x)`` returns the per-image ELBO ``(B,)`` in nats; ``dims`` is D, the
    dimensions of an image. ``count`` is the device step counter (iterations made).
    """

    def __init__(
        self,
        objective: Callable[[Tensor], Tensor],
        model: nn.Module,
        ema: EMA,
        recipe: dict,
        dims: int,
        history: StepHistory,
        world_size: int = 1,
        capturable: bool = False,
    ):
        self.objective, self.model, self.ema, self.recipe = objective, model, ema, recipe
        self.dims, self.history, self.world_size = dims, history, world_size
        self.params = [p for p in model.parameters() if p.requires_grad]
        device = self.params[0].device
        self.count = torch.zeros((), dtype=torch.int64, device=device)
        lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lr = torch.zeros((), dtype=lr_dtype, device=device)
        self.capturable = capturable
        self.opt = fused_adam(self.params, self.lr, recipe["betas"], capturable)
        self.grad_clip = float(recipe.get("grad_clip") or 0.0)

    def load_optimizer_state(self, state: dict) -> None:
        self.opt.load_state_dict(state)
        reset_optimizer_options(self.opt, self.lr, self.capturable)
        match_parameter_layouts(self.opt)

    def run(self, x: Tensor) -> None:
        """Steps 1-7 of the module docstring on batch ``x`` (on the device). Leaves the
        gradients in ``.grad`` (the caller clears them, or a graph overwrites them)."""
        self.model.train()
        self.lr.copy_(learning_rate_tensor(self.count + 1, self.recipe))
        loss = -self.objective(x).mean() / (self.dims * LN2)
        loss.backward()
        grad_norm = self._clip_gradients()
        loss, ok = self._agree(loss.detach(), grad_norm)
        self.opt.found_inf = (~ok).float()  # fused Adam skips the update where it is 1
        self.opt.step()
        self.ema.update(self.model, ok)
        self.history.record(loss, grad_norm, ok)
        self.count.add_(1)

    def __call__(self, x: Tensor) -> None:
        """One iteration, gradients cleared afterwards."""
        self.run(x)
        self.history.pending += 1
        self.opt.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> Tensor:
        """The global gradient norm before clipping (clipping when the recipe says so)."""
        if self.grad_clip:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        grads = [p.grad for p in self.params if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads, foreach=True)

    def _agree(self, loss: Tensor, grad_norm: Tensor) -> tuple[Tensor, Tensor]:
        """The loss (mean over ranks) and whether loss and gradient are finite on every rank
        (the gradient is already the same on every rank under DDP)."""
        bad_loss = (~torch.isfinite(loss)).double()
        if self.world_size > 1:
            stats = torch.stack([loss.double(), bad_loss])
            dist.all_reduce(stats)  # sums over ranks (nccl needs device tensors)
            loss, bad_loss = stats[0] / self.world_size, stats[1]
        return loss, (bad_loss == 0) & torch.isfinite(grad_norm)


class GraphedStep:
    """:class:`TrainStep` replayed as one CUDA graph (forward, backward, clipping, Adam,
    EMA and the metrics ring), following PyTorch's whole-network capture recipe.

    The first ``warmup`` calls run the step eagerly on a side stream (they are real
    iterations: lazy optimiser state, Triton and cuDNN autotuning and compilation happen
    there); the next call captures the step into a graph (capture executes nothing) and
    every call from then on copies its batch into the static input and replays the graph.
    Batches must keep one shape. The default CUDA generator (dropout, dequantisation
    noise) is graph-safe: a replay draws what the eager step would have drawn.
    """

    def __init__(self, step: TrainStep, warmup: int = 3):
        if not step.capturable:
            raise ValueError("GraphedStep needs a TrainStep built with capturable=True")
        if step.params[0].device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.step, self.warmup = step, warmup
        self.calls, self.graph, self.static_x = 0, None, None

    def __call__(self, x: Tensor) -> None:
        if self.static_x is None:
            self.static_x = torch.empty_like(x)
        elif x.shape != self.static_x.shape:
            raise ValueError(
                f"GraphedStep: batch shape {tuple(x.shape)} differs from the captured "
                f"{tuple(self.static_x.shape)}; CUDA graphs replay one shape"
            )
        self.static_x.copy_(x, non_blocking=True)
        if self.calls < self.warmup:
            self._eager_on_side_stream()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.step.history.pending += 1
        self.calls += 1

    def _eager_on_side_stream(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            # capturable Adam warns when it steps outside a capture: intended here
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            self.step.run(self.static_x)
            self.step.opt.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self) -> None:
        self.step.opt.zero_grad(set_to_none=True)  # backward allocates .grad in the graph
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step.run(self.static_x)

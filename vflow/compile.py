"""Regional compilation: ``torch.compile`` of the networks' repeated units, not the whole ELBO.

A ``vflow-cifar10`` training step calls 406 small network modules of a dozen distinct (class,
input shape) kinds (``GatedConv``, ``ChannelLayerNorm`` and ``GatedAttention`` at four
resolutions). Tracing the whole ELBO into one graph compiles every one of them again (it did
not finish in 200 s on a 16-core machine); PyTorch's regional compilation recipe compiles a
repeated unit once and reuses the code for every instance.

:func:`compile_regions` does that with one ``torch.compile`` of each unit class's
``forward`` (:data:`REGION_CLASSES`), shared by all its instances: each instance's
``forward`` becomes :func:`_region_forward`, which passes the instance as an argument to the
class's compiled function. Dynamo treats the instance's parameters as graph inputs (inlined
``nn`` modules, the default since torch 2.5), so two instances of the same shape hit the same
compiled graph. Shapes are dynamic (``dynamic=True``): one graph serves every batch size and
the spatial sizes that no parameter fixes, so a class has one graph per kind of instance
(parameter shapes, context given or not; the attention's position embedding fixes its H and
W): ``vflow-cifar10`` compiles 12 graphs, ``vflow-digits`` 11. The
coupling ops, ActNorm, the 1x1 convolutions of the flow and the logdet bookkeeping stay
eager; the attention's ``vflow::attention`` custom op (heads of at most
``vflow.ops.MAX_FUSED_HEAD_DIM`` channels) is called from the compiled attention region as
an opaque op, and larger heads (``vflow-cifar10``'s 24) run ATen's
``scaled_dot_product_attention`` kernels there as in eager mode.

Only training steps are compiled: a region runs its compiled code when its module is in
training mode and grad mode is on, and the eager ``forward`` otherwise, so evaluation and
sampling (other batch sizes, no dropout, no autograd) neither compile nor recompile.
``uncompile_regions`` restores the eager ``forward``. On CPU the regions are compiled with
inductor's ``fallback_random`` (:func:`region_options`): dropout inside a compiled region
draws its masks with eager's kernel, the same masks as the eager step for the same seed
(which ``tests/test_compile.py`` relies on).

Why the regions are single blocks and not whole networks: a ``CouplingNet`` of 10 blocks
compiled as one region took 224 s to compile (one graph; ``vflow-cifar10`` would need about
eight such) and its forward + backward was 1.03x (1.02-1.09) the eager one, no better
than the per-block regions; on the CPU ~85% of an eager ``vflow-cifar10`` step is in
convolution, GEMM, attention and dropout-mask kernels that compiled code calls unchanged,
which caps any compiled speed-up near 1.17x (docs/training.md).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx.experimental import _config as fx_config

from vflow.nets import ChannelLayerNorm, GatedAttention, GatedConv

__all__ = [
    "COMPILE_MODES",
    "REGION_CLASSES",
    "compile_mode",
    "compile_options",
    "compile_regions",
    "region_options",
    "uncompile_regions",
]

#: ``vflow train --compile`` modes: "regional" (the default of a bare ``--compile``), "elbo"
#: (``torch.compile`` of the whole training objective, one graph) and "off".
COMPILE_MODES = ("regional", "elbo", "off")

#: The repeated units compiled by :func:`compile_regions`.
REGION_CLASSES = (GatedConv, ChannelLayerNorm, GatedAttention)

# (class, options) -> the class's compiled forward, shared by every model compiled with them
_COMPILED: dict = {}


def compile_mode(value: bool | str | None) -> str:
    """The compile mode of a ``TrainArgs.compile`` value: one of :data:`COMPILE_MODES`, with
    True (a bare ``--compile``, the saved options of older runs) "regional" and False / None
    "off"; ValueError for anything else."""
    if value is True:
        return "regional"
    if value is False or value is None:
        return "off"
    if value not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


def compile_options(device: torch.device | str) -> dict | None:
    """Inductor options of vflow's compiled code (both modes): on CPU the C++ wrapper (the
    generated code calls its kernels, GEMMs, convolutions and custom ops from C++ instead of
    Python, which saved about a tenth of a digits training step)."""
    return {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None


def region_options(device: torch.device | str) -> dict | None:
    """Inductor options of the compiled regions: :func:`compile_options` and, on CPU
    (measured on ``vflow-cifar10``'s blocks, one thread; docs/training.md):

    * ``fallback_random``: dropout draws its mask with eager's ``bernoulli_`` (the same
      masks as the eager step for the same seed) instead of inductor's own random numbers,
      whose generated C++ took 2-3x as long as ATen's kernel;
    * no ``layout_optimization``: inductor would run a region's convolutions channels_last
      and transpose its activations into and out of that layout (the eager code between
      the regions is NCHW), which cost more than it saved.

    Together they took the regional ``vflow-cifar10`` step from 0.93x to 1.03x the speed of
    the eager step."""
    options = compile_options(device)
    if torch.device(device).type == "cpu":
        options = {**(options or {}), "fallback_random": True, "layout_optimization": False}
    return options


def _compiled_forward(cls: type, options: dict | None, backend: str):
    """``torch.compile(cls.forward)``, made once per class, options and backend. Dynamic
    shapes: one graph serves every batch size and every spatial size that no parameter
    fixes (the attention's position embedding fixes its H and W)."""
    key = (cls, tuple(sorted((options or {}).items())), backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(cls.forward, dynamic=True, options=options, backend=backend)
    return _COMPILED[key]


def _region_forward(module: nn.Module, compiled, *args, **kwargs):
    """The forward of a compiled region: the class's compiled code in a training step, the
    eager ``forward`` otherwise (evaluation, ``no_grad``, sampling). Traced without "duck
    sizing" (which would specialise a graph on a batch size that equals a spatial size)."""
    if module.training and torch.is_grad_enabled():
        with fx_config.patch(use_duck_shape=False):
            return compiled(module, *args, **kwargs)
    return type(module).forward(module, *args, **kwargs)


def compile_regions(
    model: nn.Module, device: torch.device | str | None = None, backend: str = "inductor"
) -> int:
    """Regional compilation of ``model`` in place (see the module docstring): every submodule
    of a :data:`REGION_CLASSES` class runs its class's shared compiled ``forward`` in training
    steps. Compilation happens on the first training step, once per unit class and input
    shape. ``device`` picks the inductor options (:func:`region_options`; default: the
    parameters' device); ``backend`` is ``torch.compile``'s. Returns the number of modules
    made regions."""
    if device is None:
        device = next(model.parameters()).device
    options = region_options(device) if backend == "inductor" else None
    n = 0
    for module in model.modules():
        if type(module) in REGION_CLASSES:
            compiled = _compiled_forward(type(module), options, backend)
            module.forward = functools.partial(_region_forward, module, compiled)
            n += 1
    return n


def uncompile_regions(model: nn.Module) -> int:
    """Undo :func:`compile_regions`: every region gets its class's eager ``forward`` back.
    Returns the number of modules restored."""
    n = 0
    for module in model.modules():
        if type(module) in REGION_CLASSES and "forward" in module.__dict__:
            del module.forward
            n += 1
    return n

"""Activation checkpointing of the model's networks (``FlowPlusPlus.set_activation_checkpointing``).

``maybe_checkpoint`` wraps ``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state
preserved) for the "net" and "step" granularities, whose regions keep only their inputs; with
``selective=True`` (the "block" granularity, PyTorch's selective activation checkpointing) a
region also keeps the outputs of the ops of ``keeps_output`` (attention and 3x3 convolutions),
so the backward recomputes only the cheap ops. Under ``torch.compile`` every region also
keeps its random ops' outputs (dropout masks), see :func:`maybe_checkpoint`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from vflow import ops  # noqa: F401  (registers torch.ops.vflow.attention_fwd)

__all__ = ["ATTENTION_OPS", "keeps_output", "maybe_checkpoint"]

aten = torch.ops.aten
# The attention kernels whose outputs "block" checkpointing keeps (see ``keeps_output``).
ATTENTION_OPS = tuple(
    getattr(namespace, name).default
    for namespace, name in (
        (aten, "_scaled_dot_product_flash_attention_for_cpu"),
        (aten, "_scaled_dot_product_flash_attention"),
        (aten, "_scaled_dot_product_efficient_attention"),
        (aten, "_scaled_dot_product_cudnn_attention"),
        (torch.ops.vflow, "attention_fwd"),
    )
    if hasattr(namespace, name)
)


def keeps_output(func, args) -> bool:
    """Whether a selectively checkpointed region keeps the output of the aten op ``func``
    (called with ``args``) instead of recomputing it in the backward: yes for attention and
    for convolutions with a spatial kernel (3x3), the ops that cost the most time per byte of
    output; no for everything else (pointwise ops, layer norms, dropout, 1x1 convolutions,
    whose outputs are wide and cheap to recompute). Random ops: see :func:`maybe_checkpoint`."""
    if func in ATTENTION_OPS:
        return True
    return func is aten.convolution.default and args[1].shape[-1] > 1


def _is_random(func) -> bool:
    """An op that draws from the random generator (dropout's bernoulli, rand, ...)."""
    return torch.Tag.nondeterministic_seeded in func.tags


def _policy(save: bool) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE


def _block_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return _policy(keeps_output(func, args))


def _compiled_block_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return _policy(keeps_output(func, args) or _is_random(func))


def _compiled_whole_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    return _policy(_is_random(func))


# Module-level context functions: torch.compile traces checkpoint only with plain functions.
def _block_contexts():
    return create_selective_checkpoint_contexts(_block_policy)


def _compiled_block_contexts():
    return create_selective_checkpoint_contexts(_compiled_block_policy)


def _compiled_whole_contexts():
    return create_selective_checkpoint_contexts(_compiled_whole_policy)


def _contexts(selective: bool, compiling: bool):
    """The ``context_fn`` of a region, None for plain non-selective checkpointing (see
    :func:`maybe_checkpoint`)."""
    if compiling:
        return _compiled_block_contexts if selective else _compiled_whole_contexts
    return _block_contexts if selective else None


def maybe_checkpoint(enabled: bool, module: nn.Module, fn, *args, selective: bool = False):
    """``fn(*args)``, run under activation checkpointing when ``enabled``, ``module`` is in
    training mode and grad mode is on (otherwise a plain call: no overhead in evaluation,
    ``torch.no_grad`` passes and sampling).

    ``torch.utils.checkpoint.checkpoint`` non-reentrant (what DDP and torch.compile need), with
    ``preserve_rng_state=True``: the forward keeps only ``fn``'s inputs and outputs, and the
    backward reruns ``fn`` under the same CPU / CUDA RNG state and autocast state, so dropout
    draws the same masks and the gradients equal those of the plain call. ``selective``: the
    forward also keeps the outputs of the ops of ``keeps_output`` (attention, 3x3
    convolutions), which the backward then reuses instead of recomputing them (PyTorch's
    selective activation checkpointing).

    Under ``torch.compile`` the outputs of random ops (dropout's masks) are kept too, for
    every granularity (a selective policy that saves them): otherwise AOTAutograd's
    partitioner recomputes them in the backward through its RNG functionalisation, which on
    the CPU drew different masks than the forward (measured: gradients 4% off a central
    difference of the compiled loss, float64, dropout 0.2). In eager mode the restored RNG
    state gives the forward's masks exactly, and keeping nn.Dropout's in-place
    ``bernoulli_`` output is not possible (it is mutated afterwards)."""
    if not (enabled and module.training and torch.is_grad_enabled()):
        return fn(*args)
    context_fn = _contexts(selective, torch.compiler.is_compiling())
    if context_fn is None:
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return checkpoint(
        fn, *args, use_reentrant=False, preserve_rng_state=True, context_fn=context_fn
    )

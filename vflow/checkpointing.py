"""Activation checkpointing of the model's networks (``FlowPlusPlus.set_activation_checkpointing``).

``maybe_checkpoint`` wraps ``torch.utils.checkpoint.checkpoint`` (non-reentrant, RNG state
preserved) for the "net" and "step" granularities, whose regions keep only their inputs; with
``selective=True`` (the "block" granularity, PyTorch's selective activation checkpointing) a
region also keeps the outputs of the ops of ``keeps_output`` (attention and 3x3 convolutions),
so the backward recomputes only the cheap ops.
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
    whose outputs are wide and cheap to recompute). Dropout's random draws are always
    recomputed, from the restored RNG state."""
    if func in ATTENTION_OPS:
        return True
    return func is aten.convolution.default and args[1].shape[-1] > 1


def _selective_policy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if keeps_output(func, args):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


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
    selective activation checkpointing)."""
    if enabled and module.training and torch.is_grad_enabled():
        if selective:
            return checkpoint(
                fn,
                *args,
                use_reentrant=False,
                preserve_rng_state=True,
                context_fn=_selective_contexts,
            )
        return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=True)
    return fn(*args)

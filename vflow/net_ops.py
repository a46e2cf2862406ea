"""Fused ops of the conditioning networks: concat-ELU, the gated residual and the channel
layer norm.

Flow++'s gated residual blocks (``vflow.nets``) call these three ~450 times per
``vflow-cifar10`` training step. In eager PyTorch each costs several dispatched ops (issue 27:
concat-ELU = neg, cat, elu forward and elu_backward, split, sub backward; the gated residual
x + a sigmoid(g) = glu and add; the layer norm over the channels of an NCHW map = a permute,
``layer_norm``, a permute back and a layout copy, each way); fused, each is one op forward
and one backward: one kernel launch on a GPU.

For x of shape (B, C, *S) (an NCHW map: S = (H, W)):

    concat_elu(x) = elu(cat([x, -x], dim=1))                       # (B, 2C, *S)
    elu(v) = v if v > 0 else exp(v) - 1
    d/dx: g[:, :C] elu'(x) - g[:, C:] elu'(-x),  elu'(v) = 1 if v > 0 else exp(v)

    gated_residual(x, h) = x + a sigmoid(g),  (a, g) = h[:, :C], h[:, C:]   # (B, C, *S)

    channel_layer_norm(x, w, b, eps)[:, c] = (x[:, c] - mean) / sqrt(var + eps) * w[c] + b[c]
    mean = mean_c x[:, c],  var = mean_c (x[:, c] - mean)^2        # per (b, position), biased

(Flow++, Ho et al. 2019, and its official code: ``concat_elu`` and ``norm`` over the channel
axis of the gated-conv stack; the math and gradients in ``csrc/net_kernels.h``.)

Backends as in :mod:`vflow.ops`: ``"cpp"`` (``vflow._C``, vectorised, float32 / float64 CPU
tensors), ``"triton"`` (``vflow.kernels``, CUDA), ``"reference"`` (eager PyTorch, any device
and dtype). The fused kernels take contiguous float32 / float64 maps; other input (a
channels_last map, bfloat16 under autocast, ...) runs the reference ops, which give the same
values (the Triton layer norm holds at most ``LAYER_NORM_MAX_CHANNELS`` = 1024 channels;
more run the reference ops too). The fused ops are ``torch.library`` custom ops
(``vflow::concat_elu_fwd`` / ``_bwd``, ``vflow::gated_residual_fwd`` / ``_bwd``,
``vflow::layer_norm_fwd`` / ``_bwd``) with fake kernels, which TorchDispatchModes (fake
tensors, op counters, selective checkpointing) see as one op each; eager calls outside any
dispatch mode skip the custom-op layer (``vflow.ops._direct_call_allowed``).

Under ``torch.compile`` the ops trace as their plain torch definitions, which inductor fuses
with the code around them into its own kernels: as opaque custom ops inside the compiled
regions (``vflow.compile``) they made a ``vflow-cifar10`` regional compile 1.35x longer and
its step 4% slower (``benchmarks/compile_time.py``, docs/training.md).

Derivatives. In eager mode all three are differentiable twice: a backward with
``create_graph=True`` (the only kind a double backward starts from) computes the gradient
with the plain torch ops of the definitions above, recorded by autograd, instead of the
kernels, whose results cannot be differentiated. Under ``torch.func`` transforms (grad, jvp,
vmap, hessian, ...), which torch's custom ops do not support, the ops run the plain torch
ops too (``vflow.ops._under_func_transform``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from vflow.ops import (
    _check_tensor,
    _direct_call_allowed,
    _kernels,
    _under_func_transform,
    resolve_backend,
)

__all__ = ["concat_elu", "gated_residual", "channel_layer_norm", "FUSED_DTYPES"]

#: dtypes the fused kernels compute in; others run the reference ops.
FUSED_DTYPES = (torch.float32, torch.float64)
_PARAM = nn.Parameter  # a plain tensor for _call (weights are parameters)


def _fused_backend(x: Tensor, backend: str) -> str | None:
    """The fused backend that runs ``x``, or None for the reference ops (always under a
    ``torch.func`` transform and in torch.compile's tracing: module docstring)."""
    backend = resolve_backend(backend, x.device)
    fusable = x.dtype in FUSED_DTYPES and x.dim() >= 2 and x.is_contiguous()
    if backend == "reference" or not fusable or _under_func_transform():
        return None
    if torch.compiler.is_compiling():  # plain ops: inductor fuses them with their neighbours
        return None
    return backend


# --- the definitions as plain torch ops -----------------------------------------------------


def _plain_concat_elu(x: Tensor) -> Tensor:
    return F.elu(torch.cat([x, -x], dim=1))


def _plain_glu(h: Tensor) -> Tensor:
    """a sigmoid(g), (a, g) = h.chunk(2, dim=1): the gated residual less its x."""
    return F.glu(h, dim=1)


def _plain_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), weight, bias, eps)
    return y.permute(0, 3, 1, 2)


def _differentiable_vjp(
    plain_fn: Callable[..., Tensor],
    inputs: Sequence[Tensor],
    needs_grad: Sequence[bool],
    grad_output: Tensor,
    *constants,
) -> tuple[Tensor | None, ...]:
    """The VJP of ``plain_fn(*inputs, *constants)`` for a backward run with
    ``create_graph=True``: computed by autograd through the plain torch ops and recorded, so
    that it can be differentiated again (a fused kernel's gradient cannot). ``inputs`` are
    an autograd.Function's saved inputs, still attached to their graph; None for those whose
    ``needs_grad`` is False."""
    wanted = [t for t, need in zip(inputs, needs_grad, strict=True) if need]
    if not wanted:
        return tuple(None for _ in needs_grad)
    with torch.enable_grad():
        out = plain_fn(*inputs, *constants)
    grads = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=True))
    return tuple(next(grads) if need else None for need in needs_grad)


# --- reference ops ------------------------------------------------------------------------


class _ConcatElu(torch.autograd.Function):
    """y = elu(h), h = cat([x, -x], channels); dL/dx = g[:C] - g[C:] with g = dL/dh =
    dL/dy elu'(h) (one elu_backward, one split, one subtraction: autograd's own backward of
    the three forward ops adds a neg, two slices and an add)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        h = torch.cat([x, -x], dim=1)
        ctx.save_for_backward(x, h)
        return F.elu(h)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        x, h = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_vjp(_plain_concat_elu, (x,), (True,), grad)[0]
        g = torch.ops.aten.elu_backward(grad, 1.0, 1, 1, False, h)  # elu's own derivative
        positive, negative = g.chunk(2, dim=1)
        return positive - negative


def _reference_concat_elu(x: Tensor) -> Tensor:
    # torch.func transforms reject an autograd.Function with forward(ctx, ...)
    plain = _under_func_transform() or torch.compiler.is_compiling()
    return _plain_concat_elu(x) if plain else _ConcatElu.apply(x)


def _memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a tensor laid out that way only, else contiguous."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


class _GradInLayout(torch.autograd.Function):
    """The identity, whose backward gives the gradient the layout of the input
    (channels_last or contiguous): the gradient a (B, H, W, C) layer norm hands back through
    a permute is channels_last, which would slow every op of the backward before it."""

    @staticmethod
    def forward(ctx, x: Tensor, channels_last: bool) -> Tensor:
        ctx.channels_last = channels_last
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # a copy: differentiable as it is (create_graph=True records it)
        layout = torch.channels_last if ctx.channels_last else torch.contiguous_format
        return grad.contiguous(memory_format=layout), None


def _reference_layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """One ``F.layer_norm`` over the last axis of the (B, H, W, C) view; the result and the
    gradient of x have x's memory layout (a copy each for NCHW input)."""
    layout = _memory_format(x)
    if not (_under_func_transform() or torch.compiler.is_compiling()):  # plain ops there
        x = _GradInLayout.apply(x, layout == torch.channels_last)
    return _plain_layer_norm(x, weight, bias, eps).contiguous(memory_format=layout)


# --- fused ops: custom ops (compile, dispatch modes) ----------------------------------------


@torch.library.custom_op("vflow::concat_elu_fwd", mutates_args=())
def _concat_elu_fwd(x: Tensor, backend: str) -> Tensor:
    return _kernels(backend).concat_elu_fwd(x)


@_concat_elu_fwd.register_fake
def _(x, backend):
    return x.new_empty(x.shape[0], 2 * x.shape[1], *x.shape[2:])


@torch.library.custom_op("vflow::concat_elu_bwd", mutates_args=())
def _concat_elu_bwd(x: Tensor, grad_y: Tensor, backend: str) -> Tensor:
    return _kernels(backend).concat_elu_bwd(x, grad_y)


@_concat_elu_bwd.register_fake
def _(x, grad_y, backend):
    return torch.empty_like(x)


def _concat_elu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.backend = inputs[1]


def _concat_elu_backward(ctx, grad_y):
    (x,) = ctx.saved_tensors
    return _concat_elu_bwd(x, grad_y.contiguous(), ctx.backend), None


torch.library.register_autograd(
    "vflow::concat_elu_fwd", _concat_elu_backward, setup_context=_concat_elu_setup
)


@torch.library.custom_op("vflow::gated_residual_fwd", mutates_args=())
def _gated_residual_fwd(x: Tensor, h: Tensor, backend: str) -> Tensor:
    return _kernels(backend).gated_residual_fwd(x, h)


@_gated_residual_fwd.register_fake
def _(x, h, backend):
    return torch.empty_like(x)


@torch.library.custom_op("vflow::gated_residual_bwd", mutates_args=())
def _gated_residual_bwd(h: Tensor, grad_y: Tensor, backend: str) -> Tensor:
    return _kernels(backend).gated_residual_bwd(h, grad_y)


@_gated_residual_bwd.register_fake
def _(h, grad_y, backend):
    return torch.empty_like(h)


def _gated_residual_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])
    ctx.backend = inputs[2]


def _gated_residual_backward(ctx, grad_y):
    (h,) = ctx.saved_tensors
    grad_y = grad_y.contiguous()
    return grad_y, _gated_residual_bwd(h, grad_y, ctx.backend), None


torch.library.register_autograd(
    "vflow::gated_residual_fwd", _gated_residual_backward, setup_context=_gated_residual_setup
)


@torch.library.custom_op("vflow::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).layer_norm_fwd(x, weight, bias, eps)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    stats = x.new_empty(x.shape[0], math.prod(x.shape[2:]))
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.custom_op("vflow::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(
    x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor, grad_y: Tensor, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    return _kernels(backend).layer_norm_bwd(x, weight, mean, rstd, grad_y)


@_layer_norm_bwd.register_fake
def _(x, weight, mean, rstd, grad_y, backend):
    return torch.empty_like(x), torch.empty_like(weight), torch.empty_like(weight)


def _layer_norm_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # mean and rstd get no gradient: no zeros for them
    x, weight, _, _, backend = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.backend = backend


def _layer_norm_backward(ctx, grad_y, grad_mean, grad_rstd):
    # mean and rstd never leave channel_layer_norm: their gradients are None
    x, weight, mean, rstd = ctx.saved_tensors
    grads = _layer_norm_bwd(x, weight, mean, rstd, grad_y.contiguous(), ctx.backend)
    return (*grads, None, None)


torch.library.register_autograd(
    "vflow::layer_norm_fwd", _layer_norm_backward, setup_context=_layer_norm_setup
)


# --- fused ops: the eager path ----------------------------------------------------------------


def _eager_allowed(x: Tensor) -> bool:
    """Whether the eager autograd.Functions below may run ``x``: outside torch.compile's
    tracing, which gets the registered custom ops (only when called directly: ``vflow``'s
    public ops trace as plain torch ops there, and torch.func transforms never reach the
    fused ops: ``_fused_backend``)."""
    return not torch.compiler.is_compiling()


def _call(name: str, op, backend: str, *args):
    """The kernel ``name`` of ``backend`` on ``args``: the bare kernel when no dispatch mode is
    active and the tensors are plain (``vflow.ops._direct_call_allowed``), else the custom op
    ``op``, which fake tensors, op counters and selective checkpointing see as one op. Called
    inside an autograd.Function, so the custom op adds no autograd layer of its own."""
    if _direct_call_allowed(*(a for a in args if isinstance(a, Tensor) and type(a) is not _PARAM)):
        return getattr(_kernels(backend), name)(*args)
    return op(*args, backend)


class _FusedConcatElu(torch.autograd.Function):
    """The fused concat-ELU in eager mode (``_call``); its gradient under create_graph=True
    is the plain ops' (``_differentiable_vjp``)."""

    @staticmethod
    def forward(ctx, x: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(x)
        ctx.backend = backend
        return _call("concat_elu_fwd", _concat_elu_fwd, backend, x)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_vjp(_plain_concat_elu, (x,), (True,), grad_y)[0], None
        return _call("concat_elu_bwd", _concat_elu_bwd, ctx.backend, x, grad_y.contiguous()), None


class _FusedGatedResidual(torch.autograd.Function):
    """The fused gated residual in eager mode (``_call``); dL/dx = dL/dy, and dL/dh under
    create_graph=True is the plain glu's (``_differentiable_vjp``)."""

    @staticmethod
    def forward(ctx, x: Tensor, h: Tensor, backend: str) -> Tensor:
        ctx.save_for_backward(h)
        ctx.backend = backend
        return _call("gated_residual_fwd", _gated_residual_fwd, backend, x, h)

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        (h,) = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            (grad_h,) = _differentiable_vjp(_plain_glu, (h,), ctx.needs_input_grad[1:2], grad_y)
            return grad_y, grad_h, None
        grad_y = grad_y.contiguous()
        grad_h = _call("gated_residual_bwd", _gated_residual_bwd, ctx.backend, h, grad_y)
        return grad_y, grad_h, None


class _FusedLayerNorm(torch.autograd.Function):
    """The fused channel layer norm in eager mode (``_call``); its gradients under
    create_graph=True are the plain ops' (``_differentiable_vjp``)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float, backend: str):
        y, mean, rstd = _call("layer_norm_fwd", _layer_norm_fwd, backend, x, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.backend, ctx.eps = backend, eps
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            inputs, needs = (x, weight, bias), ctx.needs_input_grad[:3]
            grads = _differentiable_vjp(_plain_layer_norm, inputs, needs, grad_y, ctx.eps)
            return (*grads, None, None)
        args = (x, weight, mean, rstd, grad_y.contiguous())
        return (*_call("layer_norm_bwd", _layer_norm_bwd, ctx.backend, *args), None, None)


# --- public ops ---------------------------------------------------------------------------


def _check_like_x(x: Tensor, **others: Tensor) -> None:
    """Every tensor of ``others`` a floating tensor on x's device."""
    for name, t in others.items():
        _check_tensor(name, t)
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def concat_elu(x: Tensor, *, backend: str = "auto") -> Tensor:
    """elu(cat([x, -x], dim=1)): (B, C, ...) -> (B, 2C, ...) (module docstring: the math and
    its derivatives).

    Fused (one op each way) for contiguous float32 / float64 input on the ``cpp`` and
    ``triton`` backends; otherwise the reference ops.
    """
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, ...), got {tuple(x.shape)}")
    backend = _fused_backend(x, backend)
    if backend is None:
        return _reference_concat_elu(x)
    if _eager_allowed(x):
        return _FusedConcatElu.apply(x, backend)
    return _concat_elu_fwd(x, backend)


def gated_residual(x: Tensor, h: Tensor, *, backend: str = "auto") -> Tensor:
    """x + a * sigmoid(g) with (a, g) = h.chunk(2, dim=1): x (B, C, ...), h (B, 2C, ...) ->
    (B, C, ...); ``x + F.glu(h, dim=1)``, the output of Flow++'s gated blocks.

    Fused (one op each way) for contiguous x and h of one float32 / float64 dtype on the
    ``cpp`` and ``triton`` backends; otherwise ``x + F.glu(h, dim=1)`` (torch's type
    promotion for mixed dtypes).
    """
    _check_tensor("x", x)
    _check_like_x(x, h=h)
    if x.dim() < 2 or h.shape != (x.shape[0], 2 * x.shape[1], *x.shape[2:]):
        raise ValueError(
            f"h must have twice the channels of x, shape (B, 2C, ...); got x {tuple(x.shape)} "
            f"and h {tuple(h.shape)}"
        )
    backend = _fused_backend(x, backend)
    if backend is None or h.dtype != x.dtype or not h.is_contiguous():
        return x + _plain_glu(h)
    if _eager_allowed(x):
        return _FusedGatedResidual.apply(x, h, backend)
    return _gated_residual_fwd(x, h, backend)


def _layer_norm_backend(x: Tensor, backend: str) -> str | None:
    """``_fused_backend``, and None for more channels than the backend's kernel holds."""
    backend = _fused_backend(x, backend)
    limit = getattr(_kernels(backend), "LAYER_NORM_MAX_CHANNELS", None) if backend else None
    return None if limit is not None and x.shape[1] > limit else backend


def channel_layer_norm(
    x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5, *, backend: str = "auto"
) -> Tensor:
    """Layer norm over the channels of every pixel of x (B, C, H, W), C >= 1, gain ``weight``
    (C,), bias ``bias`` (C,), biased variance, ``eps`` > 0: the module docstring's formula.
    The result has x's memory layout.

    weight and bias must have x's dtype, except under autocast (bf16 networks: x bfloat16,
    the parameters float32), where the reference's ``F.layer_norm`` computes in float32.
    Fused (one op each way) for contiguous float32 / float64 input on the ``cpp`` and
    ``triton`` (C <= 1024) backends; otherwise one ``F.layer_norm`` over the channels-last
    view (the reference).
    """
    _check_tensor("x", x)
    _check_like_x(x, weight=weight, bias=bias)
    if x.dim() != 4 or x.shape[1] == 0:
        raise ValueError(f"x must have shape (B, C, H, W) with C >= 1, got {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{name} must have shape ({x.shape[1]},), got {tuple(t.shape)}")
    mixed = weight.dtype != x.dtype or bias.dtype != x.dtype
    if mixed and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"weight and bias must have x's dtype {x.dtype} (outside autocast), got weight "
            f"{weight.dtype} and bias {bias.dtype}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")
    backend = _layer_norm_backend(x, backend)
    if backend is None or mixed:
        return _reference_layer_norm(x, weight, bias, eps)
    weight, bias = weight.contiguous(), bias.contiguous()
    if _eager_allowed(x):
        return _FusedLayerNorm.apply(x, weight, bias, float(eps), backend)
    return _layer_norm_fwd(x, weight, bias, float(eps), backend)[0]

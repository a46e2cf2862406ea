"""Fused mixture-of-logistics (MoL) coupling ops: the public, autograd-aware API.

For an input ``x`` of shape (B, *S) the parameters are ONE tensor ``params`` of shape
(B, 2+3K, *S): index 0 is the raw log-scale ``a_raw``, 1 the shift ``b``, then K mixture
logits, K means and K log-scales. A conv output of C*(2+3K) channels viewed as
(B, 2+3K, C, H, W) is this layout without a copy. With s_k = max(log_scale_k, -7),
F(x) = sum_k softmax(logits)_k sigmoid((x - mean_k) exp(-s_k)) and eps = 0.05 if ``smooth``
(VFlow, paper appendix B) else 0 (Flow++):

    G      = eps + (1 - 2 eps) F(x)
    y      = exp(tanh(a_raw)) * logit(G) + b
    logdet = sum over S of log|dy/dx|          # shape (B,)

Backends (``backend=``):

* ``"reference"``: eager PyTorch (``vflow.reference``), any device and dtype.
* ``"cpp"``: the fused C++ CPU kernels of the ``vflow._C`` extension (float32, float64).
* ``"triton"``: the fused Triton kernels of ``vflow.kernels`` (CUDA tensors; CPU tensors only
  under ``TRITON_INTERPRET=1``, which is how the tests run them).
* ``"auto"`` (default): ``triton`` for CUDA tensors, ``cpp`` for CPU tensors, falling back to
  ``reference`` when the fast backend is unavailable. The environment variable
  ``VFLOW_BACKEND`` overrides ``"auto"``.

float16 and bfloat16 inputs are computed in float32; the outputs come back in the input
dtype, the logdet in float32. Inputs of mixed dtypes are promoted to a common one.

Non-finite values are not checked (that would need a host sync): a NaN or inf in an element
of ``x`` or of its parameters gives NaN or inf in that element of the output and in its
sample's logdet; the other elements and samples are unaffected and nothing crashes.

The fused backends are registered as ``torch.library`` custom ops (``vflow::coupling_fwd``,
``vflow::coupling_bwd``, ``vflow::coupling_inv``) with fake kernels and autograd formulas,
so they work under ``torch.compile(fullgraph=True)``. The backward recomputes from the
inputs and stores no N x K intermediates. Double backward is not supported by the fused ops.
Under ``torch.func`` transforms, which torch's custom ops do not support, every op runs the
``reference`` backend whatever ``backend`` says: the forward coupling then supports every
transform (grad, vjp, jvp, jacrev, hessian, vmap); the inverse supports grad, vjp and jacrev
only, and is differentiable once (a double backward or hessian raises).

``self_attention`` is the multi-head softmax attention of the conditioning networks, on the
channel-major layout a 1x1 conv gives. With ``backend="cpp"`` and heads of at most
``MAX_FUSED_HEAD_DIM`` channels it runs the fused small-head kernel of ``vflow._C``
(``vflow::attention_fwd`` / ``vflow::attention_bwd``); otherwise torch's
``scaled_dot_product_attention`` (``reference.self_attention``), whose GEMM-based kernels
suit large heads and GPUs.
"""

from __future__ import annotations

import importlib
import os

import torch
from torch import Tensor

from vflow import reference
from vflow.reference import PATTERNS, PLAIN

__all__ = [
    "available_backends",
    "resolve_backend",
    "mixlogistic_coupling",
    "mixlogistic_coupling_inverse",
    "checkerboard_coupling",
    "checkerboard_coupling_inverse",
    "checkerboard_split",
    "checkerboard_merge",
    "self_attention",
]

BACKENDS = ("auto", "reference", "cpp", "triton")
METHODS = ("newton", "bisection")
# The iteration budget of the inverse. Safeguarded Newton bisects whenever bisection would
# otherwise not finish within the budget, so both reach the solver's tolerance (2 eps
# max(1, |x|)) for every initial bracket up to 2^(max_iters + 1) eps max(1, |x|) wide (float64
# and 100 iterations: 5.6e14 max(1, |x|)), see reference.solve_inverse; Newton typically
# stops after 5-10 iterations.
DEFAULT_MAX_ITERS = {"newton": 100, "bisection": 100}
MAX_ITERS_LIMIT = 1 << 20  # the C++ kernel's bound (csrc/coupling.cpp)
BUILD_HINT = "build it with `pip install -e . --no-build-isolation` in the vflow source tree"


# --- backends -----------------------------------------------------------------------------


def _import_cpp():
    """The compiled extension, or the ImportError that explains why it is missing."""
    try:
        return importlib.import_module("vflow._C")
    except ImportError as err:
        return err


def _import_triton():
    try:
        module = importlib.import_module("vflow.kernels")
    except ImportError as err:
        return err
    if not hasattr(module, "coupling_fwd"):
        return ImportError("vflow.kernels does not provide the Triton coupling kernels")
    return module


# Imported once, here, so that torch.compile traces no import machinery. Triton reads
# TRITON_INTERPRET when it is imported: set it before importing vflow.ops.
_CPP = _import_cpp()
_TRITON = _import_triton()
# The largest head size of the fused attention kernel (it keeps d vectors per operand in
# registers); larger heads run on torch's SDPA. 0 without the extension, or with one built
# before the kernel existed (rebuild it to get the kernel).
MAX_FUSED_HEAD_DIM = getattr(_CPP, "ATTENTION_MAX_HEAD_DIM", 0)


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_usable(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpp":
        return device.type == "cpu" and not isinstance(_CPP, ImportError)
    if name == "triton":
        on_device = device.type == "cuda" or (device.type == "cpu" and _triton_interpreted())
        return on_device and not isinstance(_TRITON, ImportError)
    return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run on ``device``, fastest first (``reference`` always last)."""
    device = torch.device(device)
    return [b for b in ("triton", "cpp", "reference") if _backend_usable(b, device)]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` (or VFLOW_BACKEND) into a concrete backend and check it can run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        override = os.environ.get("VFLOW_BACKEND", "").strip()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"VFLOW_BACKEND must be one of {BACKENDS}, got {override!r}")
            backend = override
        else:
            preferred = "triton" if device.type == "cuda" else "cpp"
            return preferred if _backend_usable(preferred, device) else "reference"
    if not _backend_usable(backend, device):
        raise RuntimeError(_unusable_reason(backend, device))
    return backend


def _unusable_reason(backend: str, device: torch.device) -> str:
    if backend == "cpp":
        if device.type != "cpu":
            return f"backend 'cpp' runs on CPU tensors only, got tensors on {device}"
        return f"backend 'cpp' needs the compiled extension vflow._C ({_CPP}); {BUILD_HINT}"
    if device.type == "cpu" and not _triton_interpreted():
        return (
            "backend 'triton' needs CUDA tensors "
            "(or TRITON_INTERPRET=1 set before triton is imported)"
        )
    if device.type not in ("cpu", "cuda"):
        return f"backend 'triton' runs on CUDA tensors, got tensors on {device}"
    return f"backend 'triton' needs the package triton ({_TRITON})"


def _kernels(backend: str):
    if backend == "cpp":
        return _CPP
    if backend == "triton":
        return _TRITON
    return reference


# --- validation ---------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_params(params, x: Tensor, active_shape: tuple[int, ...], x_name: str) -> None:
    _check_tensor("params", params)
    if params.device != x.device:
        raise ValueError(f"params is on {params.device} but {x_name} is on {x.device}")
    shape = params.shape
    if len(shape) != len(active_shape) + 2:
        raise ValueError(_params_shape_error(shape, x, active_shape))
    p = shape[1]
    if p < 5 or (p - 2) % 3:
        raise ValueError(
            f"params dim 1 must be 2+3K for K >= 1 components (5, 8, 11, ...), got {p}"
        )
    if shape[0] != x.shape[0] or tuple(shape[2:]) != tuple(active_shape):
        raise ValueError(_params_shape_error(shape, x, active_shape))


def _params_shape_error(shape, x: Tensor, active_shape: tuple[int, ...]) -> str:
    expected = f"(B, 2+3K, {', '.join(map(str, active_shape))}) with B = {x.shape[0]}"
    return f"params must have shape {expected}, got {tuple(shape)}"


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _check_image(name: str, x) -> None:
    _check_tensor(name, x)
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if x.shape[3] % 2:
        raise ValueError(
            f"{name} must have an even width W for the checkerboard ops, got W={x.shape[3]}"
        )


def _pattern_code(pattern) -> int:
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {tuple(PATTERNS)}, got {pattern!r}")
    return PATTERNS[pattern]


def _check_parity(parity) -> None:
    if isinstance(parity, bool) or not isinstance(parity, int) or parity not in (0, 1):
        raise ValueError(f"parity must be 0 or 1 (an int), got {parity!r}")


def _check_method(method: str, max_iters) -> int:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if max_iters is None:
        return DEFAULT_MAX_ITERS[method]
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1:
        raise ValueError(f"max_iters must be a positive int, got {max_iters!r}")
    if max_iters > MAX_ITERS_LIMIT:
        raise ValueError(f"max_iters must be at most {MAX_ITERS_LIMIT}, got {max_iters}")
    return max_iters


# --- registered custom ops ----------------------------------------------------------------


@torch.library.custom_op("vflow::coupling_fwd", mutates_args=())
def _coupling_fwd(
    x: Tensor, params: Tensor, smooth: bool, pattern: int, parity: int, backend: str
) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        return _kernels(backend).coupling_fwd(x, params, smooth, pattern, parity)


@_coupling_fwd.register_fake
def _(x, params, smooth, pattern, parity, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0])


@torch.library.custom_op("vflow::coupling_bwd", mutates_args=())
def _coupling_bwd(
    x: Tensor,
    params: Tensor,
    grad_out: Tensor,
    grad_logdet: Tensor,
    smooth: bool,
    pattern: int,
    parity: int,
    inverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _kernels(backend).coupling_bwd(
        x, params, grad_out, grad_logdet, smooth, pattern, parity, inverse
    )


@_coupling_bwd.register_fake
def _(x, params, grad_out, grad_logdet, smooth, pattern, parity, inverse, backend):
    return torch.empty_like(x), torch.empty_like(params)


@torch.library.custom_op("vflow::coupling_inv", mutates_args=())
def _coupling_inv(
    y: Tensor,
    params: Tensor,
    smooth: bool,
    pattern: int,
    parity: int,
    max_iters: int,
    newton: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _kernels(backend).coupling_inv(y, params, smooth, pattern, parity, max_iters, newton)


@_coupling_inv.register_fake
def _(y, params, smooth, pattern, parity, max_iters, newton, backend):
    return torch.empty_like(y), y.new_empty(y.shape[0])


def _fwd_setup(ctx, inputs, output):
    x, params, smooth, pattern, parity, backend = inputs
    ctx.save_for_backward(x, params)
    ctx.config = (smooth, pattern, parity, False, backend)


def _inv_setup(ctx, inputs, output):
    _, params, smooth, pattern, parity, _, _, backend = inputs
    ctx.save_for_backward(output[0], params)
    ctx.config = (smooth, pattern, parity, True, backend)


def _coupling_backward(ctx, grad_out, grad_logdet):
    """VJP of the forward (at x) or of the inverse (at its output x, implicit function)."""
    x, params = ctx.saved_tensors
    grad_in, grad_params = _coupling_bwd(
        x, params, grad_out.contiguous(), grad_logdet.contiguous(), *ctx.config
    )
    return (grad_in, grad_params) + (None,) * (6 if ctx.config[3] else 4)


torch.library.register_autograd("vflow::coupling_fwd", _coupling_backward, setup_context=_fwd_setup)
torch.library.register_autograd("vflow::coupling_inv", _coupling_backward, setup_context=_inv_setup)


# --- the eager path -----------------------------------------------------------------------


def _under_func_transform() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, jacrev, hessian, vmap, ...) is
    running. torch's custom ops with a registered autograd formula do not support them (torch
    raises "must override the setup_context staticmethod" under grad / vjp, and forward-mode
    jvp sees no derivative and returns a zero tangent), so under a transform every vflow op
    runs its reference backend: plain torch ops, which support every transform."""
    return torch._C._functorch.maybe_current_level() is not None


def _direct_call_allowed(*tensors: Tensor) -> bool:
    """Whether a fused kernel may be called directly (``_FusedCoupling``) rather than through
    its registered custom op: plain tensors, outside torch.compile's tracing, no
    TorchDispatchMode active (fake tensors, selective checkpointing, op counters see the
    custom op) and no torch.func transform. The custom op's Python autograd layer costs
    about 10x the bare kernel per call at small shapes (``benchmarks/op_overhead.py``)."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and torch._C._functorch.maybe_current_level() is None
        and all(type(t) is Tensor for t in tensors)
    )


class _FusedCoupling(torch.autograd.Function):
    """The fused forward (``inverse=False``) or inverse of the coupling with the same VJP as
    the registered ops (``_coupling_backward``), calling the backend's kernels directly."""

    @staticmethod
    def run(inp, params, config, max_iters=0, newton=False):
        """The op: through autograd when a gradient is wanted, else the bare kernel."""
        if torch.is_grad_enabled() and (inp.requires_grad or params.requires_grad):
            return _FusedCoupling.apply(inp, params, config, max_iters, newton)
        return _FusedCoupling.kernel(inp, params, config, max_iters, newton)

    @staticmethod
    def kernel(inp, params, config, max_iters, newton):
        smooth, pattern, parity, inverse, backend = config
        kernels = _kernels(backend)
        if inverse:
            return kernels.coupling_inv(inp, params, smooth, pattern, parity, max_iters, newton)
        return kernels.coupling_fwd(inp, params, smooth, pattern, parity)

    # forward(ctx, ...) rather than setup_context: Function.apply binds the signature of a
    # setup_context-style forward with inspect on every call (~100 us)
    @staticmethod
    def forward(ctx, inp, params, config, max_iters, newton):
        out = _FusedCoupling.kernel(inp, params, config, max_iters, newton)
        # the VJP is evaluated at x: the input of the forward, the output of the inverse
        ctx.save_for_backward(out[0] if config[3] else inp, params)
        ctx.config = config
        return out

    @staticmethod
    def backward(ctx, grad_out, grad_logdet):
        x, params = ctx.saved_tensors
        args = (x, params, grad_out.contiguous(), grad_logdet.contiguous(), *ctx.config)
        if torch.is_grad_enabled():
            # create_graph=True: the custom op, whose result fails with a clear error if it
            # is differentiated (double backward is not supported), never a silent zero
            grad_in, grad_params = _coupling_bwd(*args)
        else:
            grad_in, grad_params = _kernels(ctx.config[-1]).coupling_bwd(*args[:-1])
        return grad_in, grad_params, None, None, None


# --- dispatch -----------------------------------------------------------------------------


def _run(x: Tensor, params: Tensor, backend: str, call):
    """Resolve the backend, cast to the compute dtype, run ``call`` and cast back."""
    backend = "reference" if _under_func_transform() else resolve_backend(backend, x.device)
    out_dtype = torch.promote_types(x.dtype, params.dtype)
    dtype = torch.float32 if out_dtype in (torch.float16, torch.bfloat16) else out_dtype
    out, logdet = call(x.to(dtype).contiguous(), params.to(dtype).contiguous(), backend)
    return out.to(out_dtype), logdet


def _forward(x, params, smooth, pattern, parity, backend):
    def call(x, params, backend):
        if backend == "reference":
            return reference.coupling_fwd(x, params, smooth, pattern, parity)
        if _direct_call_allowed(x, params):
            return _FusedCoupling.run(x, params, (smooth, pattern, parity, False, backend))
        return _coupling_fwd(x, params, smooth, pattern, parity, backend)

    return _run(x, params, backend, call)


class _ReferenceInverse(torch.autograd.Function):
    """The eager inverse with its implicit-function gradient (autograd cannot run inside a
    custom op, so the reference backend uses an autograd.Function instead)."""

    # forward + setup_context (not forward(ctx, ...)): torch.func transforms need that form
    @staticmethod
    def forward(y, params, smooth, pattern, parity, max_iters, newton):
        return reference.coupling_inv(y, params, smooth, pattern, parity, max_iters, newton)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, params, smooth, pattern, parity, _, _ = inputs
        ctx.save_for_backward(output[0], params)
        ctx.config = (smooth, pattern, parity)

    @staticmethod
    def backward(ctx, grad_x, grad_logdet):
        level = torch._C._functorch.maybe_current_level()  # None outside torch.func
        if (level is None and torch.is_grad_enabled()) or (level is not None and level > 1):
            # create_graph=True, or a transform over torch.func.grad / jacrev (a hessian):
            # the implicit-function gradient is computed from detached x and params: its own
            # derivative would be wrong, so a double backward is refused, never silent
            raise RuntimeError(
                "mixlogistic_coupling_inverse is differentiable once: a double backward "
                "(create_graph=True, torch.func.hessian / jacrev of jacrev) is not supported"
            )
        x, params = ctx.saved_tensors
        grad_y, grad_params = reference.coupling_bwd(
            x, params, grad_x, grad_logdet, *ctx.config, inverse=True
        )
        return grad_y, grad_params, None, None, None, None, None


def _inverse(y, params, smooth, pattern, parity, method, max_iters, backend):
    iters = _check_method(method, max_iters)
    newton = method == "newton"

    def call(y, params, backend):
        if backend == "reference":
            return _ReferenceInverse.apply(y, params, smooth, pattern, parity, iters, newton)
        if _direct_call_allowed(y, params):
            config = (smooth, pattern, parity, True, backend)
            return _FusedCoupling.run(y, params, config, iters, newton)
        return _coupling_inv(y, params, smooth, pattern, parity, iters, newton, backend)

    return _run(y, params, backend, call)


# --- public API ---------------------------------------------------------------------------


def mixlogistic_coupling(
    x: Tensor, params: Tensor, *, smooth: bool = True, backend: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Elementwise MoL coupling transform of every element of ``x``.

    Args:
        x: (B, *S) floating tensor, any strides.
        params: (B, 2+3K, *S): a_raw, b, K logits, K means, K log-scales per element.
        smooth: VFlow's bounded variant (logit(0.05 + 0.9 F)) if True, Flow++'s logit(F) if False.
        backend: "auto", "reference", "cpp" or "triton" (see the module docstring).

    Returns:
        y shaped like x, and logdet (B,) = sum over S of log|dy/dx|.
    """
    _check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have a batch dimension, shape (B, *S); got a 0-d tensor")
    _check_params(params, x, tuple(x.shape[1:]), "x")
    _check_flag("smooth", smooth)
    return _forward(x, params, smooth, PLAIN, 0, backend)


def mixlogistic_coupling_inverse(
    y: Tensor,
    params: Tensor,
    *,
    smooth: bool = True,
    method: str = "newton",
    max_iters: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Inverse of ``mixlogistic_coupling``: x with mixlogistic_coupling(x, params)[0] == y.

    Solved per element on g(x) = logit(F(x)) - logit(F*) inside the exact bracket
    [min_k, max_k] of mean_k + exp(s_k) logit(F*), by safeguarded Newton (``method="newton"``,
    the rtsafe rule: a Newton point is taken only strictly inside the bracket, when the step
    at most halves the step before the previous one, and while bisection could still finish
    within the budget) or plain bisection (``"bisection"``), both with a budget of
    ``max_iters`` iterations (default 100) and no host synchronisation. Either reaches
    |step| <= 2 eps max(1, |x|) for brackets up to 2^(max_iters + 1) eps max(1, |x|) wide; a
    point where |logit F(x) - logit F*| is at the noise floor of its evaluation is kept as
    the root (see ``vflow.reference.solve_inverse``). For ``smooth=True`` the
    attainable range of y is exp(tanh a_raw) (logit(0.05), logit(0.95)) + b; an input
    outside it is clamped into it (F* to [eps, 1 - eps], eps the dtype's machine epsilon).
    Gradients come from the implicit-function theorem, not from the iterations.

    Returns:
        x shaped like y, and logdet (B,) = sum log|dx/dy| = -(forward logdet at x).
    """
    _check_tensor("y", y)
    if y.dim() < 1:
        raise ValueError("y must have a batch dimension, shape (B, *S); got a 0-d tensor")
    _check_params(params, y, tuple(y.shape[1:]), "y")
    _check_flag("smooth", smooth)
    return _inverse(y, params, smooth, PLAIN, 0, method, max_iters, backend)


def _half_shape(x: Tensor) -> tuple[int, int, int]:
    return (x.shape[1], x.shape[2], x.shape[3] // 2)


def checkerboard_coupling(
    x: Tensor,
    params: Tensor,
    *,
    parity: int,
    pattern: str = "checkerboard",
    smooth: bool = True,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """MoL coupling of the active half of a (B, C, H, W) image; the other half passes through.

    mask[h, w] = (h + w) % 2 for ``pattern="checkerboard"``, w % 2 for ``"stripe"``; the
    active positions are those with mask == parity, in row-major order, so params has shape
    (B, 2+3K, C, H, W/2). Equals split -> mixlogistic_coupling -> merge, without the copies.

    Returns:
        y (B, C, H, W) and logdet (B,).
    """
    _check_image("x", x)
    code = _pattern_code(pattern)
    _check_parity(parity)
    _check_params(params, x, _half_shape(x), "x")
    _check_flag("smooth", smooth)
    return _forward(x, params, smooth, code, parity, backend)


def checkerboard_coupling_inverse(
    y: Tensor,
    params: Tensor,
    *,
    parity: int,
    pattern: str = "checkerboard",
    smooth: bool = True,
    method: str = "newton",
    max_iters: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Inverse of ``checkerboard_coupling`` (see ``mixlogistic_coupling_inverse``)."""
    _check_image("y", y)
    code = _pattern_code(pattern)
    _check_parity(parity)
    _check_params(params, y, _half_shape(y), "y")
    _check_flag("smooth", smooth)
    return _inverse(y, params, smooth, code, parity, method, max_iters, backend)


def checkerboard_split(
    x: Tensor, *, parity: int, pattern: str = "checkerboard"
) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) -> (active, passive), each (B, C, H, W/2); differentiable."""
    _check_image("x", x)
    code = _pattern_code(pattern)
    _check_parity(parity)
    return reference.split(x, code, parity)


def checkerboard_merge(
    active: Tensor, passive: Tensor, *, parity: int, pattern: str = "checkerboard"
) -> Tensor:
    """Inverse of ``checkerboard_split``: two (B, C, H, W/2) halves -> (B, C, H, W)."""
    _check_tensor("active", active)
    _check_tensor("passive", passive)
    if active.dim() != 4:
        raise ValueError(f"active must have shape (B, C, H, W/2), got {tuple(active.shape)}")
    if passive.shape != active.shape:
        raise ValueError(
            f"passive must have the shape of active {tuple(active.shape)}, "
            f"got {tuple(passive.shape)}"
        )
    if passive.device != active.device:
        raise ValueError(f"passive is on {passive.device} but active is on {active.device}")
    code = _pattern_code(pattern)
    _check_parity(parity)
    dtype = torch.promote_types(active.dtype, passive.dtype)
    return reference.merge(active.to(dtype), passive.to(dtype), code, parity)


# --- small-head attention -----------------------------------------------------------------


@torch.library.custom_op("vflow::attention_fwd", mutates_args=())
def _attention_fwd(qkv: Tensor) -> tuple[Tensor, Tensor]:
    return _CPP.attention_fwd(qkv)


@_attention_fwd.register_fake
def _(qkv):
    b, _, heads, d, t = qkv.shape
    return qkv.new_empty(b, heads, d, t), qkv.new_empty(b, heads, t)


@torch.library.custom_op("vflow::attention_bwd", mutates_args=())
def _attention_bwd(qkv: Tensor, out: Tensor, lse: Tensor, grad_out: Tensor) -> Tensor:
    return _CPP.attention_bwd(qkv, out, lse, grad_out)


@_attention_bwd.register_fake
def _(qkv, out, lse, grad_out):
    return torch.empty_like(qkv)


def _attention_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)


def _attention_backward(ctx, grad_out, grad_lse):
    # lse (the row log-sum-exps kept for the backward) never leaves self_attention
    qkv, out, lse = ctx.saved_tensors
    return _attention_bwd(qkv, out, lse, grad_out.contiguous())


torch.library.register_autograd(
    "vflow::attention_fwd", _attention_backward, setup_context=_attention_setup
)


def self_attention(qkv: Tensor, *, backend: str = "auto") -> Tensor:
    """Multi-head softmax self-attention over positions, heads channel-major.

    Args:
        qkv: (B, 3, heads, d, T): queries, keys and values of every head, positions
            innermost: a 1x1 conv output (B, 3 * heads * d, H, W) viewed as
            (B, 3, heads, d, H * W). Any strides.
        backend: "auto", "reference", "cpp" or "triton" (see the module docstring). "cpp"
            with d <= MAX_FUSED_HEAD_DIM runs the fused kernel of ``vflow._C``; every other
            case runs torch's ``scaled_dot_product_attention``.

    Returns:
        out (B, heads, d, T) with, per sample and head, scale = 1/sqrt(d)::

            out[c, i] = sum_j softmax_j(scale * sum_c' q[c', i] k[c', j]) v[c, j]

        in qkv's dtype (float16 / bfloat16 are computed in float32 by the fused kernel).
    """
    _check_tensor("qkv", qkv)
    if qkv.dim() != 5 or qkv.shape[1] != 3:
        raise ValueError(f"qkv must have shape (B, 3, heads, d, T), got {tuple(qkv.shape)}")
    if qkv.shape[2] == 0 or qkv.shape[3] == 0 or qkv.shape[4] == 0:
        raise ValueError(
            f"qkv needs at least one head, one channel per head and one position, "
            f"got shape {tuple(qkv.shape)}"
        )
    backend = resolve_backend(backend, qkv.device)
    if backend != "cpp" or qkv.shape[3] > MAX_FUSED_HEAD_DIM or _under_func_transform():
        return reference.self_attention(qkv)
    dtype = torch.float32 if qkv.dtype in (torch.float16, torch.bfloat16) else qkv.dtype
    out, _ = _attention_fwd(qkv.to(dtype).contiguous())
    return out.to(qkv.dtype)

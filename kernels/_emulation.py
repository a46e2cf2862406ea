"""The GPU's fast math, emulated in Triton's interpreter, so CPU tests see its errors.

Under ``TRITON_INTERPRET=1`` Triton runs ``tl.exp`` / ``tl.log`` / ... with numpy, which is
correctly rounded (<= 0.5 ulp). On an NVIDIA GPU the same float32 calls lower to approximate
PTX instructions whose errors grow with the argument; a kernel that is accurate in the
interpreter can then be 10x worse on the card (the H200 failed a float32 gradient test,
``test_float32_gradients_where_one_component_dominates[smooth-fwd-vjp]``, that passed on
the CPU: shared/notes/gpu-h200.md). :func:`fast_math` replaces the interpreter's float32
implementations by numpy's result plus a pseudo-random error as large as the GPU's, a fixed
function of the argument (and of the seed) as the instruction's error is:

==========  =========================  ==============================================
tl op       GPU instruction            error added here (u in [-1, 1], see unit_noise)
==========  =========================  ==============================================
exp         ex2.approx(x * log2 e)     u * (2 + floor(1.173 |x|)) ulp   (``__expf``)
exp2        ex2.approx.ftz             u * 2 ulp
log         lg2.approx * ln 2          u * 2^-21.41 absolute for x in [0.5, 2], else
                                       u * 3 ulp                        (``__logf``)
log2        lg2.approx.ftz             u * 2^-22 absolute for x in [0.5, 2], else
                                       u * 2 ulp
sqrt        sqrt.approx.ftz            u * 1 ulp
==========  =========================  ==============================================

Sources: CUDA C++ Programming Guide, "Mathematical Functions", table "Functions affected by
-use_fast_math" / "Intrinsic Functions" (``__expf``, ``__logf``, ``__fsqrt_rn`` vs approx);
PTX ISA, ``ex2`` / ``lg2`` / ``sqrt`` ``.approx.f32``. The exp bound includes the rounding of
``x * log2 e`` to float32, which is why it grows with |x|.

Not perturbed: float64 (the GPU computes it precisely), and the precise helpers of
:mod:`._precise`, which the interpreter evaluates in float64 and rounds once (libdevice's
own 1-2 ulp are not emulated: an order of magnitude below ex2.approx's error at the
arguments that matter). Multiply-add contraction into FMA (which rounds once where the
interpreter rounds twice) and ``div.full.f32`` are not emulated either.

Use (tests: the ``fast_math`` fixture of tests/test_fast_math.py)::

    with fast_math(seed=0):
        y = vflow.kernels.coupling_fwd(...)   # interpreted, with GPU-sized errors
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import numpy as np

#: error model: (x, exact float32 result, u uniform in [-1, 1] per element) -> error
ErrorModel = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _ulps(y: np.ndarray, count, u: np.ndarray) -> np.ndarray:
    """u * count ulp of float32 ``y`` (an ulp: the spacing at |y|)."""
    return u * np.float32(count) * np.spacing(np.abs(y)).astype(np.float32)


def _exp_error(x, y, u):
    return _ulps(y, 2.0 + np.floor(1.173 * np.abs(x)), u)


def _exp2_error(x, y, u):
    return _ulps(y, 2.0, u)


def _log_like_error(absolute: float, ulps: float) -> ErrorModel:
    """Absolute error ``absolute`` on [0.5, 2] (where the result is near 0), ``ulps`` else."""

    def error(x, y, u):
        near_one = (x >= 0.5) & (x <= 2.0)
        return np.where(near_one, u * np.float32(absolute), _ulps(y, ulps, u))

    return error


def _sqrt_error(x, y, u):
    return _ulps(y, 1.0, u)


ERROR_MODELS: dict[str, ErrorModel] = {
    "create_exp": _exp_error,
    "create_exp2": _exp2_error,
    "create_log": _log_like_error(2.0**-21.41, 3.0),
    "create_log2": _log_like_error(2.0**-22, 2.0),
    "create_sqrt": _sqrt_error,
}

_GOLDEN_INT = 0x9E3779B97F4A7C15


def unit_noise(x: np.ndarray, salt: int) -> np.ndarray:
    """u in [-1, 1), a fixed pseudo-random function of the float32 bits of ``x`` and ``salt``
    (splitmix64's finaliser). Like the hardware instruction, whose error is a function of its
    argument, the same argument always gets the same error: two calls, or two tilings of one
    tensor, agree bit for bit, as they do on the GPU."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    z = bits + np.uint64(((salt + 1) * _GOLDEN_INT) % 2**64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(11)).astype(np.float64) * 2.0**-52 - 1.0).astype(np.float32)


def _perturbed(original, model: ErrorModel, salt: int, counts: dict, name: str):
    """The builder method ``original`` with ``model``'s error added to float32 results."""

    def method(self, arg):
        out = original(self, arg)
        x, y = arg.data, out.data
        if y.dtype != np.float32:
            return out
        with np.errstate(all="ignore"):
            err = model(x, y, unit_noise(x, salt))
            exact = ~(np.isfinite(x) & np.isfinite(y))  # exp(-inf) = 0, log(0) = -inf, NaN
            out.data = np.where(exact, y, y + err).astype(np.float32)
        counts[name] = counts.get(name, 0) + y.size
        return out

    return method


@contextlib.contextmanager
def fast_math(seed: int = 0) -> Iterator[dict]:
    """Within the block, interpreted float32 exp / exp2 / log / log2 / sqrt carry GPU-sized
    errors (module docstring), each a fixed function of its argument and ``seed``: a failure
    reproduces, repeated calls agree, and another seed is another plausible instruction.
    Yields a dict counting the perturbed elements per op (a test can check it was used).
    The interpreter is restored on exit, also after an exception.

    Raises RuntimeError when Triton's interpreter is not in use (TRITON_INTERPRET=1 must be
    set before triton is imported): on a GPU the errors are real and need no emulation.
    """
    builder_class = _interpreter_builder_class()
    counts: dict[str, int] = {}
    originals = {name: getattr(builder_class, name) for name in ERROR_MODELS}
    try:
        for index, (name, model) in enumerate(ERROR_MODELS.items()):
            salt = seed * len(ERROR_MODELS) + index  # each op its own error function
            setattr(builder_class, name, _perturbed(originals[name], model, salt, counts, name))
        yield counts
    finally:
        for name, original in originals.items():
            setattr(builder_class, name, original)


def _interpreter_builder_class():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
        raise RuntimeError(
            "fast_math() emulates the GPU in Triton's interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    from triton.runtime.interpreter import InterpreterBuilder

    return InterpreterBuilder


__all__ = ["ERROR_MODELS", "fast_math"]

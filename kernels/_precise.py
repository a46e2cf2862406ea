"""Correctly rounded (libdevice) exp and log for the terms of the kernels that need them.

Triton lowers float32 ``tl.exp`` / ``tl.log`` to the GPU's approximate instructions
(``ex2.approx`` of ``x * log2 e``: up to 2 + floor(1.173 |x|) ulp; ``lg2.approx``: 2^-21.41
absolute near 1). That is harmless where a result is added to a larger sum, and not where a
large-argument exp is multiplied into a result or a log is differenced against another
(``kernels/_emulation.py`` reproduces those errors on the CPU, ``tests/test_fast_math.py``
finds them). ``exp`` / ``log`` here are libdevice's ``__nv_expf`` / ``__nv_logf`` on the GPU
(<= 2 / 1 ulp at any argument; torch's inductor made the same choice, pytorch PR 161829);
under Triton's interpreter, where libdevice does not exist, they are evaluated in float64
and rounded once, and the fast-math emulation leaves them alone. float64 kernels get
``__nv_exp`` / ``__nv_log``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")

if INTERPRETED:

    @triton.jit
    def exp(x):
        return tl.exp(x.to(tl.float64)).to(x.dtype)

    @triton.jit
    def log(x):
        return tl.log(x.to(tl.float64)).to(x.dtype)

else:  # pragma: no cover - compiled for the GPU
    from triton.language.extra import libdevice

    @triton.jit
    def exp(x):
        return libdevice.exp(x)

    @triton.jit
    def log(x):
        return libdevice.log(x)

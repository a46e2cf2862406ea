"""Triton kernels of vflow (the GPU path), imported as ``vflow.kernels``.

Implements the low-level contract of ``vflow.reference`` (``coupling_fwd``, ``coupling_bwd``,
``coupling_inv``) with one fused Triton kernel per op, and the networks' fused concat-ELU,
gated residual and channel layer norm of ``vflow.net_ops`` (``_net.py``). On CPU the same
kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is
imported), which is how the tests check them without a GPU.

Design
------
* Blocking: a program owns a 2-D tile of ``BLOCK_B x BLOCK_N`` active elements
  (``BLOCK_B * BLOCK_N = 256`` by default, ``BLOCK_N = min(256, next_pow2(N))`` with N the
  active elements per sample), so a tiny per-sample size (e.g. 2-D toy data, N = 1) still fills
  the tile with several samples. Grid = (cdiv(B, BLOCK_B), cdiv(N, BLOCK_N)); all tails are
  masked; batch offsets are int64. The K mixture components are a runtime loop (any K, no
  power-of-two padding), reading the parameter planes (B, 2+3K, N), which are contiguous
  along N, so every load is coalesced.
* Numerics: everything in log space. The four log-sum-exps over k
  (log Z of the logits, log F, log(1-F), log f) are online (running max + rescaled sum, one
  exp per update); log(1+e) is computed accurately without libdevice.
* Fused: checkerboard / stripe addressing (the active element and its passive partner are
  addressed in-kernel from the active index, so no split/merge copies; passive positions are
  copied through), the forward's logdet partial sums, the backward's two passes over k
  (pass 1 re-computes the forward sums and sum_k r_k dlogf_k/dx, pass 2 writes the
  per-component gradients, nothing of size N x K is stored), and the inverse's bracket,
  fixed-count safeguarded Newton / bisection iterations (per-element masks, no host sync) and
  the forward logdet at the solution.
* Determinism: no atomics. Each program writes the sum of its tile row (a fixed ``tl.sum``
  tree) to a (B, num_programs_along_N) buffer, then a torch sum along that fixed axis gives
  logdet; repeated runs are bitwise identical.
* dtypes: float32 tensors are computed in float32 (logdet float32). float64 tensors are
  computed in float64 by the same kernels (every constant is materialised in the tensor's
  dtype; the smooth inverse clamps F* to the dtype's machine epsilon, like the reference),
  logdet float64; this matches the reference to ~1e-15. float16/bfloat16 (which the ops layer
  casts to float32 before calling) and x / params of different dtypes raise ``TypeError``;
  incoming gradients are cast to the compute dtype.
* Devices: CUDA tensors (launched under the tensor's device guard on torch's current stream);
  CPU tensors only under the interpreter, otherwise ``RuntimeError``.

Without a GPU, ``python -m vflow.kernels._aot [arch]`` (TRITON_INTERPRET unset) compiles every
kernel variant to a cubin for sm_<arch> with Triton's bundled ptxas, which catches compile
errors the interpreter cannot, and prints each kernel's registers and spilled bytes from
``ptxas -v`` (sm_90, float32: the coupling kernels 48-72 registers; the layer norm, on
``_net.ln_warps`` warps, 62-102; at most 16 bytes spilled, in a few inverse and backward
variants).

Every launcher also takes keyword-only ``block`` (a power of two, default 256) and
``num_warps`` (default 4) to change the tile, used by the tests to force several programs and
masked tails on small shapes. Tile tuning (``_tuning.py``, off by default):
``set_autotune(True)`` or ``VFLOW_TRITON_AUTOTUNE=1`` makes the first launch of each coupling
kernel per shape bucket on a GPU time the candidate tiles and keep the fastest.
"""

from ._coupling import coupling_bwd, coupling_fwd, coupling_inv
from ._net import (
    MAX_CHANNELS as LAYER_NORM_MAX_CHANNELS,
)
from ._net import (
    concat_elu_bwd,
    concat_elu_fwd,
    gated_residual_bwd,
    gated_residual_fwd,
    layer_norm_bwd,
    layer_norm_fwd,
)
from ._tuning import autotune_enabled, clear_tuned_tiles, set_autotune, tuned_tiles

__all__ = [
    "LAYER_NORM_MAX_CHANNELS",
    "autotune_enabled",
    "clear_tuned_tiles",
    "set_autotune",
    "tuned_tiles",
    "coupling_fwd",
    "coupling_bwd",
    "coupling_inv",
    "concat_elu_fwd",
    "concat_elu_bwd",
    "gated_residual_fwd",
    "gated_residual_bwd",
    "layer_norm_fwd",
    "layer_norm_bwd",
]

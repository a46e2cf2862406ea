"""The fused mixture-of-logistics (MoL) coupling for any flow: ``torch.distributions`` Transforms.

Two building blocks on top of ``vflow.ops`` (torch only; zuko and pyro are optional and
imported only by the adapters that need them):

* ``MixLogisticCDFTransform(params, smooth=False)``: the elementwise Flow++ / VFlow map

  ::

      s_k  = max(log_scale_k, -7)
      F(x) = sum_k softmax(logits)_k sigmoid((x - mean_k) exp(-s_k))   # logistic-mixture CDF
      G    = eps + (1 - 2 eps) F(x)           # eps = 0.05 if smooth (VFlow) else 0 (Flow++)
      y    = exp(tanh(a_raw)) logit(G) + b
      log|dy/dx| = tanh(a_raw) + log(1 - 2 eps) + log f(x) - log G - log(1 - G)

  as a bijective ``Transform`` (sign +1) for a given ``params`` tensor, with the parameter
  axis just before the event dimensions: ``(*batch, 2+3K)`` for the elementwise transform
  (``event_dim=0``), ``(*batch, 2+3K, D)`` for vectors whose log-determinant is summed over
  the last dimension (``event_dim=1``; that is exactly ``vflow.ops``' (B, 2+3K, *S) layout).
  Along the parameter axis: index 0 ``a_raw``, 1 the shift ``b``, then K logits, K means and
  K log-scales. ``call_and_ladj`` is one fused ``vflow.ops.mixlogistic_coupling`` call, the
  inverse one fused ``vflow.ops.mixlogistic_coupling_inverse`` call (safeguarded Newton,
  implicit-function gradients).
* ``MixLogisticCoupling1d(features, context=0, components=8, hidden=(64, 64), mask=None)``:
  a coupling layer for vector data (an ``nn.Module``, ``forward(x, context) -> (y, logdet)``,
  ``inverse``), whose MLP conditioner maps the unchanged features (and the context) to the
  parameters of the transformed ones. ``transform(context)`` returns it as a ``Transform``;
  ``lazy()`` as a zuko ``LazyTransform`` (for ``zuko.flows.Flow``), ``pyro()`` as a pyro
  ``ConditionalTransformModule``. ``zuko_flow(...)`` stacks such couplings into a zuko Flow.

Sources: Flow++ (Ho et al., ICML 2019, https://arxiv.org/abs/1902.00275, section 3.2 and the
official code's ``mixlogistic_logcdf`` and bisection ``mixlogistic_invcdf``), VFlow
(Chen et al., ICML 2020, https://arxiv.org/abs/2002.09741, appendix B: the smoothed
``logit(0.05 + 0.9 F)``).

Choosing ``smooth``: ``smooth=False`` (Flow++, the default here) is a bijection of the whole
real line, which is what a flow onto an unbounded base distribution (a Normal) needs.
``smooth=True`` (VFlow) maps onto the bounded interval
``exp(tanh a_raw) (logit 0.05, logit 0.95) + b`` per element, stated by the transform's
``codomain`` (a ``constraints.interval``): a point outside it has no preimage (the fused
inverse clamps it onto the edge), so with a Normal base the density does not integrate to 1.

Layout and speed. The fused CPU kernel vectorises over the positions of one sample (16 float32
lanes on AVX-512, 8 on AVX2), and its log-determinant is summed per sample. A per-element
log-determinant (``event_dim=0``) therefore runs with one position per sample, one lane; the
value-only calls (``t(x)``, ``t.inv(y)``, which need no log-determinant) instead lay all
elements out as the positions of a single sample and run at full width. Prefer
``event_dim=1`` (as ``MixLogisticCoupling1d`` does) when the log-determinant is summed anyway.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.distributions import Transform, constraints

from vflow import ops
from vflow.reference import SMOOTH_EPS

if TYPE_CHECKING:  # optional integrations, imported only by the adapters that use them
    from pyro.distributions.conditional import ConditionalTransformModule
    from zuko.flows import Flow
    from zuko.lazy import LazyTransform

__all__ = [
    "MixLogisticCDFTransform",
    "MixLogisticCouplingTransform",
    "MixLogisticCoupling1d",
    "zuko_flow",
]

_LOGIT_LO = math.log(SMOOTH_EPS / (1 - SMOOTH_EPS))  # logit(0.05) = -2.944
_LOGIT_HI = -_LOGIT_LO


def _check_num_params(name: str, p: int, where: str) -> int:
    if p < 5 or (p - 2) % 3:
        raise ValueError(
            f"{name} must have 2+3K entries (5, 8, 11, ...) along {where}, for K >= 1 "
            f"mixture components; got {p}"
        )
    return (p - 2) // 3


class MixLogisticCDFTransform(Transform):
    r"""The MoL coupling map ``y = exp(tanh a) logit(G(x)) + b`` as a ``Transform``.

    With ``s_k = max(log_scale_k, -7)``, ``F(x) = sum_k softmax(logits)_k
    sigmoid((x - mean_k) exp(-s_k))`` and ``G = eps + (1 - 2 eps) F`` (``eps = 0.05`` if
    ``smooth`` else 0)::

        y           = exp(tanh(a_raw)) * logit(G(x)) + b
        log|dy/dx|  = tanh(a_raw) + log(1 - 2 eps) + log f(x) - log G - log(1 - G)

    (Flow++, Ho et al. 2019, section 3.2; ``smooth=True`` is VFlow's bounded variant, Chen et al.
    2020, appendix B.) The map is strictly increasing (``sign = +1``) and bijective from the
    real line onto ``codomain``.

    Args:
        params: ``(*batch, 2+3K)`` for ``event_dim=0`` or ``(*batch, 2+3K, *event)`` with
            ``event_dim`` trailing event dimensions: along the parameter axis index 0 is
            ``a_raw``, 1 the shift ``b``, then K mixture logits, K means and K log-scales.
            ``vflow.ops`` layout ``(B, 2+3K, *S)`` is ``event_dim=len(S)``; a parameter
            tensor in the ops layout for an elementwise transform is
            ``params.movedim(1, -1)``.
        smooth: VFlow's ``logit(0.05 + 0.9 F)`` (bounded codomain) if True, Flow++'s
            ``logit(F)`` (all of R) if False (default).
        event_dim: how many trailing dimensions of ``x`` form one event; the log-determinant
            is summed over them (0: elementwise, as torch's univariate transforms).
        backend: the ``vflow.ops`` backend ("auto", "cpp", "triton", "reference").
        method: the inverse solver of ``vflow.ops.mixlogistic_coupling_inverse``
            ("newton" or "bisection").
        max_iters: that solver's iteration budget (None: its default, 100).
        cache_size: torch's transform cache (0 or 1).

    ``x`` has shape ``(*xbatch, *event)``; its batch dimensions broadcast against ``params``'
    (e.g. extra leading sample dimensions). ``log_abs_det_jacobian`` has the broadcast batch
    shape (elementwise for ``event_dim=0``).

    Cost: ``call_and_ladj(x)`` and ``log_abs_det_jacobian`` are one fused forward call,
    ``t(x)`` one fused forward call on a full-width layout (no log-determinant),
    ``t.inv(y)`` one fused inverse call (full width). ``TransformedDistribution.log_prob``
    runs the inverse and then the forward at its result for the log-determinant.
    """

    bijective = True
    sign = +1

    def __init__(
        self,
        params: Tensor,
        smooth: bool = False,
        *,
        event_dim: int = 0,
        backend: str = "auto",
        method: str = "newton",
        max_iters: int | None = None,
        cache_size: int = 0,
    ) -> None:
        super().__init__(cache_size=cache_size)
        if isinstance(event_dim, bool) or not isinstance(event_dim, int) or event_dim < 0:
            raise ValueError(f"event_dim must be a non-negative int, got {event_dim!r}")
        if not isinstance(smooth, bool):
            raise TypeError(f"smooth must be a bool, got {type(smooth).__name__}")
        if not isinstance(params, Tensor):
            raise TypeError(f"params must be a torch.Tensor, got {type(params).__name__}")
        if not params.is_floating_point():
            raise TypeError(f"params must be a floating-point tensor, got dtype {params.dtype}")
        layout = "(*batch, 2+3K)" if event_dim == 0 else f"(*batch, 2+3K, <{event_dim} event dims>)"
        if params.dim() < event_dim + 1:
            raise ValueError(
                f"params must have shape {layout} for event_dim={event_dim}, "
                f"got {tuple(params.shape)}"
            )
        axis = params.dim() - event_dim - 1
        self.components = _check_num_params(
            "params", params.shape[axis], f"dim {axis} (the parameter axis of {layout})"
        )
        self.params = params
        self.smooth = smooth
        self.event_ndims = event_dim
        self.backend, self.method, self.max_iters = backend, method, max_iters
        self.param_batch_shape = params.shape[:axis]
        self.event_shape = params.shape[axis + 1 :]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(K={self.components}, smooth={self.smooth}, "
            f"event_dim={self.event_ndims}, batch_shape={tuple(self.param_batch_shape)})"
        )

    def with_cache(self, cache_size: int = 1) -> MixLogisticCDFTransform:
        if self._cache_size == cache_size:
            return self
        return MixLogisticCDFTransform(
            self.params,
            self.smooth,
            event_dim=self.event_ndims,
            backend=self.backend,
            method=self.method,
            max_iters=self.max_iters,
            cache_size=cache_size,
        )

    # --- constraints and shapes ------------------------------------------------------------

    @property
    def domain(self) -> constraints.Constraint:
        return constraints.independent(constraints.real, self.event_ndims)

    @property
    def codomain(self) -> constraints.Constraint:
        """All of R for ``smooth=False``; for ``smooth=True`` the open interval
        ``exp(tanh a_raw) (logit 0.05, logit 0.95) + b`` per element (about +-2.94 scaled)."""
        if not self.smooth:
            return constraints.independent(constraints.real, self.event_ndims)
        axis = self.params.dim() - self.event_ndims - 1
        scale = torch.exp(torch.tanh(self.params.select(axis, 0)))
        shift = self.params.select(axis, 1)
        interval = constraints.interval(scale * _LOGIT_LO + shift, scale * _LOGIT_HI + shift)
        return constraints.independent(interval, self.event_ndims)

    def forward_shape(self, shape: Sequence[int]) -> torch.Size:
        return torch.broadcast_shapes(torch.Size(shape), self.param_batch_shape + self.event_shape)

    inverse_shape = forward_shape

    # --- layouts ---------------------------------------------------------------------------

    def _layout(self, x: Tensor, name: str) -> tuple[Tensor, Tensor, torch.Size]:
        """x as (B, *event) and params as (B, 2+3K, *event) (the ops layout), broadcast."""
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        ev = self.event_ndims
        if x.dim() < ev or x.shape[x.dim() - ev :] != self.event_shape:
            raise ValueError(
                f"{name} must have shape (*batch, {', '.join(map(str, self.event_shape))}) "
                f"(its last {ev} dims matching params' event shape), got {tuple(x.shape)}"
            )
        try:
            batch = torch.broadcast_shapes(x.shape[: x.dim() - ev], self.param_batch_shape)
        except RuntimeError:
            raise ValueError(
                f"{name} batch shape {tuple(x.shape[: x.dim() - ev])} does not broadcast with "
                f"params batch shape {tuple(self.param_batch_shape)}"
            ) from None
        n = math.prod(batch)
        x_ = x.expand(torch.Size([*batch, *self.event_shape])).reshape(n, *self.event_shape)
        p = self.params.expand(*batch, *self.params.shape[len(self.param_batch_shape) :])
        return x_, p.reshape(n, self.params.shape[-ev - 1], *self.event_shape), batch

    def _flat_layout(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        """x as (1, N) and params as (1, 2+3K, N): every element a position of one sample,
        so the kernel runs on full vectors (for the calls that need no log-determinant)."""
        x_, p, _ = self._layout(x, name)
        n, num, size = p.shape[0], p.shape[1], math.prod(self.event_shape)
        p = p.reshape(n, num, size).transpose(0, 1).reshape(1, num, n * size)
        return x_.reshape(1, n * size), p

    # --- the maps --------------------------------------------------------------------------

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(y, log|det dy/dx|) from one fused forward call; ladj has the batch shape."""
        x_, p, batch = self._layout(x, "x")
        y, ladj = ops.mixlogistic_coupling(x_, p, smooth=self.smooth, backend=self.backend)
        return y.reshape(*batch, *self.event_shape), ladj.reshape(batch)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    def _call(self, x: Tensor) -> Tensor:
        x_, p = self._flat_layout(x, "x")
        y, _ = ops.mixlogistic_coupling(x_, p, smooth=self.smooth, backend=self.backend)
        return y.reshape(self.forward_shape(x.shape))

    def _inverse(self, y: Tensor) -> Tensor:
        y_, p = self._flat_layout(y, "y")
        x, _ = ops.mixlogistic_coupling_inverse(
            y_,
            p,
            smooth=self.smooth,
            method=self.method,
            max_iters=self.max_iters,
            backend=self.backend,
        )
        return x.reshape(self.forward_shape(y.shape))

    def inverse_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """(x, log|det dx/dy|): the fused inverse, then the forward log-determinant at x."""
        x = self._inverse(y)
        return x, -self.call_and_ladj(x)[1]


class MixLogisticCouplingTransform(Transform):
    r"""Coupling ``y_a = x_a``, ``y_b = MoL(x_b; params = meta(x_a))`` on vectors (event_dim 1).

    ``idx_a`` are the indices of the unchanged (conditioning) features, ``idx_b`` those of
    the transformed ones; ``meta(x_a)`` returns a ``MixLogisticCDFTransform`` with
    ``event_dim=1`` over ``x_b``. ``log_abs_det_jacobian`` is the sum over the transformed
    features (shape ``x.shape[:-1]``). Built by ``MixLogisticCoupling1d.transform``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector  # for smooth=True the b features are bounded, see above
    bijective = True

    def __init__(
        self,
        meta: Callable[[Tensor], MixLogisticCDFTransform],
        idx_a: Tensor,
        idx_b: Tensor,
        cache_size: int = 0,
    ) -> None:
        super().__init__(cache_size=cache_size)
        self.meta, self.idx_a, self.idx_b = meta, idx_a, idx_b
        self._perm = torch.argsort(torch.cat([idx_a, idx_b]))  # (x_a, x_b) -> x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(a={self.idx_a.tolist()}, b={self.idx_b.tolist()})"

    def with_cache(self, cache_size: int = 1) -> MixLogisticCouplingTransform:
        if self._cache_size == cache_size:
            return self
        return MixLogisticCouplingTransform(self.meta, self.idx_a, self.idx_b, cache_size)

    def _split(self, x: Tensor, name: str) -> tuple[Tensor, Tensor]:
        features = len(self.idx_a) + len(self.idx_b)
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != features:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must have shape (*batch, {features}), got {shape}")
        return x[..., self.idx_a], x[..., self.idx_b]

    def _merge(self, a: Tensor, b: Tensor) -> Tensor:
        batch = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])  # context may add dims
        a, b = a.expand(*batch, a.shape[-1]), b.expand(*batch, b.shape[-1])
        return torch.cat([a, b], dim=-1)[..., self._perm]

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_a, x_b = self._split(x, "x")
        y_b, ladj = self.meta(x_a).call_and_ladj(x_b)
        return self._merge(x_a, y_b), ladj

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]

    def _call(self, x: Tensor) -> Tensor:
        x_a, x_b = self._split(x, "x")
        return self._merge(x_a, self.meta(x_a)(x_b))

    def _inverse(self, y: Tensor) -> Tensor:
        y_a, y_b = self._split(y, "y")
        return self._merge(y_a, self.meta(y_a).inv(y_b))


class MixLogisticCoupling1d(nn.Module):
    r"""MoL coupling layer for vector data: ``y_a = x_a``, ``y_b = MoL(x_b; MLP(x_a, c))``.

    The MLP (``hidden`` layers of ``activation``) maps the unchanged features ``x_a`` (and
    the context ``c``, if ``context > 0``) to the ``2+3K`` parameters of each transformed
    feature, in the ``vflow.ops`` layout ``(*batch, 2+3K, features_b)``, so one fused call
    transforms all of ``x_b`` and returns the per-sample log-determinant.

    Initialisation (near identity): the output layer has zero weights, and biases
    ``a_raw = b = 0``, equal logits, log-scales 0 and means spread over ``[-0.5, 0.5]``, so
    the map is ``logit(mean_k sigmoid(x - m_k))``, within log cosh(0.5) = 0.12 of ``x``.

    Args:
        features: size of the vectors (>= 2).
        context: size of the context vector (0: unconditional).
        components: K, the number of logistic components.
        hidden: widths of the MLP's hidden layers.
        mask: bool ``(features,)``, True for the features passed through unchanged (and
            conditioned on), False for those transformed (zuko's convention); default
            ``arange(features) % 2 == 1``.
        smooth: VFlow's bounded variant (see ``MixLogisticCDFTransform``); default False.
        activation: the MLP's activation, a module class or factory (default ``nn.ReLU``).
        backend: the ``vflow.ops`` backend ("auto", "cpp", "triton", "reference").
        method: the inverse solver ("newton" or "bisection"), passed to ``vflow.ops``.
        max_iters: that solver's iteration budget (None: its default, 100).

    ``forward(x, context=None) -> (y, logdet)`` and ``inverse(y, context=None) -> (x,
    logdet)`` on ``x`` of shape ``(*batch, features)``, ``logdet`` of shape ``batch``.
    ``transform(context)`` is the layer as a ``torch.distributions.Transform``; ``lazy()`` a
    zuko ``LazyTransform``; ``pyro()`` a pyro ``ConditionalTransformModule``.
    """

    def __init__(
        self,
        features: int,
        context: int = 0,
        components: int = 8,
        hidden: Sequence[int] = (64, 64),
        mask: Tensor | Sequence[bool] | None = None,
        *,
        smooth: bool = False,
        activation: Callable[[], nn.Module] = nn.ReLU,
        backend: str = "auto",
        method: str = "newton",
        max_iters: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(features, bool) or not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        if isinstance(context, bool) or not isinstance(context, int) or context < 0:
            raise ValueError(f"context must be a non-negative int, got {context!r}")
        if isinstance(components, bool) or not isinstance(components, int) or components < 1:
            raise ValueError(f"components must be a positive int, got {components!r}")
        if mask is None:
            mask = torch.arange(features) % 2 == 1
        mask = torch.as_tensor(mask)
        if mask.shape != (features,) or mask.dtype != torch.bool:
            raise ValueError(
                f"mask must be a bool tensor of shape ({features},), got dtype {mask.dtype} "
                f"and shape {tuple(mask.shape)}"
            )
        if mask.all() or not mask.any():
            raise ValueError("mask must have both True (kept) and False (transformed) entries")
        self.features, self.context, self.components = features, context, components
        self.smooth, self.backend, self.method, self.max_iters = smooth, backend, method, max_iters
        self.register_buffer("mask", mask)
        self.register_buffer("idx_a", mask.nonzero().squeeze(-1))
        self.register_buffer("idx_b", (~mask).nonzero().squeeze(-1))
        n_a, n_b = len(self.idx_a), len(self.idx_b)
        self.num_params = 2 + 3 * components
        widths = [n_a + context, *hidden]
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(w_in, w_out), activation()]
        last = nn.Linear(widths[-1], self.num_params * n_b)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        with torch.no_grad():  # near-identity initialisation
            last.weight.zero_()
            bias = torch.zeros(self.num_params, n_b)
            k = components
            bias[2 + k : 2 + 2 * k] = torch.linspace(-0.5, 0.5, k).unsqueeze(1) if k > 1 else 0
            last.bias.copy_(bias.flatten())

    def extra_repr(self) -> str:
        return (
            f"features={self.features}, context={self.context}, K={self.components}, "
            f"smooth={self.smooth}, mask={self.mask.int().tolist()}"
        )

    def params(self, x_a: Tensor, context: Tensor | None = None) -> Tensor:
        """The MoL parameters ``(*batch, 2+3K, features_b)`` of the transformed features."""
        if self.context:
            if context is None:
                raise ValueError(f"context of shape (*batch, {self.context}) is required")
            if context.shape[-1] != self.context:
                raise ValueError(
                    f"context must have shape (*batch, {self.context}), got {tuple(context.shape)}"
                )
            batch = torch.broadcast_shapes(x_a.shape[:-1], context.shape[:-1])
            h = torch.cat(
                [x_a.expand(*batch, x_a.shape[-1]), context.expand(*batch, self.context)], -1
            )
        elif context is not None:
            raise ValueError("context given to a coupling built with context=0")
        else:
            h = x_a
        return self.net(h).unflatten(-1, (self.num_params, len(self.idx_b)))

    def transform(self, context: Tensor | None = None) -> MixLogisticCouplingTransform:
        """This layer (given ``context``) as a ``torch.distributions.Transform``."""

        def meta(x_a: Tensor) -> MixLogisticCDFTransform:
            return MixLogisticCDFTransform(
                self.params(x_a, context),
                self.smooth,
                event_dim=1,
                backend=self.backend,
                method=self.method,
                max_iters=self.max_iters,
            )

        return MixLogisticCouplingTransform(meta, self.idx_a, self.idx_b)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(y, logdet)``: ``x`` ``(*batch, features)`` through the layer (one fused call),
        ``logdet`` of shape ``batch``; ``context`` ``(*batch, context)`` if conditional."""
        return self.transform(context).call_and_ladj(x)

    def inverse(self, y: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(x, logdet)`` with ``forward(x) == y``: one fused Newton inverse; ``logdet`` is
        the inverse's, minus the forward log-determinant at ``x``."""
        t = self.transform(context)
        y_a, y_b = t._split(y, "y")
        x_b, ladj = t.meta(y_a).inverse_and_ladj(y_b)
        return t._merge(y_a, x_b), ladj

    def lazy(self) -> LazyTransform:
        """This layer as a zuko ``LazyTransform`` (sharing its parameters), for
        ``zuko.flows.Flow``. Needs zuko (``pip install vflow[zuko]``)."""
        return _zuko_lazy_class()(self)

    def pyro(self) -> ConditionalTransformModule:
        """This layer as a pyro ``ConditionalTransformModule`` (``.condition(context)`` gives
        the Transform), for ``pyro.distributions.ConditionalTransformedDistribution``. Needs
        pyro (``pip install vflow[pyro]``)."""
        return _pyro_conditional_class()(self)


@functools.cache
def _zuko_lazy_class():
    try:
        from zuko.lazy import LazyTransform
    except ImportError as err:
        msg = "MixLogisticCoupling1d.lazy() needs zuko: pip install vflow[zuko]"
        raise ImportError(msg) from err

    class LazyMixLogisticCoupling(LazyTransform):
        """zuko adapter: ``forward(c) -> coupling.transform(c)``."""

        def __init__(self, coupling: MixLogisticCoupling1d) -> None:
            super().__init__()
            self.coupling = coupling

        def forward(self, c: Tensor | None = None) -> Transform:
            return self.coupling.transform(c)

    return LazyMixLogisticCoupling


@functools.cache
def _pyro_conditional_class():
    try:
        from pyro.distributions.conditional import ConditionalTransformModule
    except ImportError as err:
        msg = "MixLogisticCoupling1d.pyro() needs pyro: pip install vflow[pyro]"
        raise ImportError(msg) from err

    class PyroMixLogisticCoupling(ConditionalTransformModule):
        """pyro adapter: ``condition(context) -> coupling.transform(context)``."""

        bijective = True
        domain = constraints.real_vector
        codomain = constraints.real_vector

        def __init__(self, coupling: MixLogisticCoupling1d) -> None:
            super().__init__()
            self.coupling = coupling

        def condition(self, context: Tensor | None = None) -> Transform:
            return self.coupling.transform(context)

    return PyroMixLogisticCoupling


def zuko_flow(
    features: int,
    context: int = 0,
    transforms: int = 4,
    components: int = 8,
    hidden: Sequence[int] = (64, 64),
    **kwargs: Any,
) -> Flow:
    """A ``zuko.flows.Flow`` of ``transforms`` MoL couplings with alternating checkered masks
    (as zuko's NICE/RealNVP) onto a standard normal ``DiagNormal`` base. ``kwargs`` go to
    ``MixLogisticCoupling1d``. Needs zuko (``pip install vflow[zuko]``)."""
    try:
        from zuko.distributions import DiagNormal
        from zuko.lazy import Flow, UnconditionalDistribution
    except ImportError as err:
        raise ImportError("zuko_flow needs zuko: pip install vflow[zuko]") from err
    layers = [
        MixLogisticCoupling1d(
            features,
            context,
            components,
            hidden,
            mask=torch.arange(features) % 2 == (i + 1) % 2,
            **kwargs,
        ).lazy()
        for i in range(transforms)
    ]
    base = UnconditionalDistribution(
        DiagNormal, torch.zeros(features), torch.ones(features), buffer=True
    )
    return Flow(layers, base)

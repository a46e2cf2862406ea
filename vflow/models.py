"""Flow++ and VFlow image models (paper sections 3 and 6, appendix B), and named configs.

Both models take integer images x (B, C, H, W) in [0, n_bins) and share:

* r(u | x), the variational dequantiser: eps_r ~ N(0, I) (B, C, H, W) -> conditional flow
  (couplings conditioned on ``ContextNet(x / n_bins - 0.5)``) -> Sigmoid -> u in (0, 1);
  log r(u|x) = log N(eps_r) - logdet.
* the preprocessing ``ImageToLogit``: v = x + u -> y = logit(0.05 + 0.9 v / n_bins), with its
  logdet, so that bits per dimension need no separate quantisation term.
* p, the main flow with a standard normal prior.

``FlowPlusPlus``: log P(x) >= E_r[log p(y) + logdet_pre - log r(u|x)].

``VFlow`` adds q(z | x + u): eps_q ~ N(0, I) (B, Cz, H, W) -> conditional flow (couplings
conditioned on ``ContextNet(y)``, y the dequantised logit-space image) -> Sigmoid -> z in
(0, 1)^Cz, and p is a flow over the Cx + Cz channels of cat(y, z). Eq. 7 of the paper:

    log P(x) >= E_{r, q}[ log p(y, z) + logdet_pre - log q(z | y) - log r(u | x) ].

Methods: ``elbo``, ``bpd``, ``log_prob`` (importance-weighted, Eq. 5), ``sample``,
``initialize`` (data-dependent initialisation, see ``FlowPlusPlus.initialize``),
``set_backend``; attribute ``config``. Use ``vflow.build(name, backend=..., **overrides)`` for
the named configurations.

Initialisation: a freshly built model must be initialised (``initialize(x)`` on training
images, or ``load_state_dict`` of an initialised model) before ``elbo`` / ``bpd`` in eval mode
or under ``torch.no_grad``, ``log_prob`` and ``sample``: those raise a RuntimeError on an
uninitialised model. A training forward (train mode, grad on) may still initialise the
ActNorms lazily from its batch, with a warning.

Empty batches: ``elbo``, ``bpd`` and ``log_prob`` of a (0, C, H, W) batch return empty (0,)
tensors and ``sample(0)`` an empty (0, C, H, W) long tensor; ``initialize`` needs at least 2
images (ValueError otherwise).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import operator
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vflow import ops
from vflow.flows import (
    SMALL_INIT_BATCH,
    ActNorm,
    AugmentedAffineCoupling,
    Compose,
    ImageToLogit,
    MixLogisticCoupling,
    Sigmoid,
    SpaceToDepth,
    coupling_block,
    maybe_checkpoint,
)
from vflow.nets import (
    ChannelLayerNorm,
    ContextNet,
    ConvDataInit,
    CouplingNet,
    GatedAttention,
    GatedConv,
)

__all__ = [
    "Step",
    "ModelConfig",
    "CONFIG_FIELD_RULES",
    "FlowPlusPlus",
    "VFlow",
    "CONFIGS",
    "build",
    "INIT_SCHEMES",
    "DEFAULT_INIT_SCHEME",
    "RECOMMENDED_INIT_BATCH",
    "parameter_counts",
    "describe",
]

LOG_2PI = math.log(2 * math.pi)

INIT_SCHEMES = ("official", "actnorm")
CHECKPOINT_GRANULARITIES = ("block", "net", "step")
DEFAULT_INIT_SCHEME = "official"


def _has_params(module: nn.Module) -> bool:
    """Whether ``module`` has parameters (flow steps do; squeezes and sigmoids do not)."""
    return any(True for _ in module.parameters())


# --- architecture description -------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """``count`` consecutive blocks of one kind (the paper's ``kind(B, D_H, K) x count``).

    kind: "checker" or "channel" (MoL coupling blocks; ``attention`` True = f_*, False = g_*),
    "affine" (f_affine(B, D_H) of Table 5) or "squeeze" (SpaceToDepth).
    """

    kind: str
    count: int = 1
    blocks: int = 0
    filters: int = 0
    components: int = 0
    attention: bool = True

    def __str__(self) -> str:
        if self.kind == "squeeze":
            return "SpaceToDepth"
        if self.kind == "affine":
            return f"f_affine({self.blocks}, {self.filters}) x {self.count}"
        prefix = "f" if self.attention else "g"
        return (
            f"{prefix}_{self.kind}({self.blocks}, {self.filters}, {self.components}) x {self.count}"
        )


def f_checker(blocks, filters, components, count=1):
    return Step("checker", count, blocks, filters, components, True)


def f_channel(blocks, filters, components, count=1):
    return Step("channel", count, blocks, filters, components, True)


def g_checker(blocks, filters, components, count=1):
    return Step("checker", count, blocks, filters, components, False)


def f_affine(blocks, filters):
    return Step("affine", 1, blocks, filters, 0, False)


SQUEEZE = Step("squeeze")


def _is_int(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_steps(value) -> bool:
    return isinstance(value, (tuple, list)) and all(isinstance(s, Step) for s in value)


#: What each ModelConfig field must be: (description for the error, check).
CONFIG_FIELD_RULES = {
    "name": ("a non-empty string", lambda v: isinstance(v, str) and bool(v)),
    "kind": ("'flowpp' or 'vflow'", lambda v: isinstance(v, str) and v in ("flowpp", "vflow")),
    "data_shape": (
        "a (C, H, W) tuple of 3 positive ints",
        lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(_is_int(d, 1) for d in v),
    ),
    "n_bins": ("an int >= 2", lambda v: _is_int(v, 2)),
    "p": ("a tuple of Step", _is_steps),
    "r": ("a tuple of Step", _is_steps),
    "q": ("a tuple of Step", _is_steps),
    "extra_channels": ("an int >= 0", lambda v: _is_int(v, 0)),
    "smooth": ("True or False", lambda v: isinstance(v, bool)),
    "pattern": (
        "'stripe' or 'checkerboard'",
        lambda v: isinstance(v, str) and v in ("stripe", "checkerboard"),
    ),
    "heads": ("an int >= 1", lambda v: _is_int(v, 1)),
    "context_filters": ("an int >= 1", lambda v: _is_int(v, 1)),
    "context_blocks": ("an int >= 0", lambda v: _is_int(v, 0)),
    "dropout": (
        "a float in [0, 1)",
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1,
    ),
    "paper_params": ("an int >= 1 or None", lambda v: v is None or _is_int(v, 1)),
    "notes": ("a string", lambda v: isinstance(v, str)),
}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a model. ``kind`` is "flowpp" or "vflow".

    Every field is checked on construction (``CONFIG_FIELD_RULES``): a bad value raises a
    ValueError naming the field, what it must be and the value given (e.g. "dropout must be
    a float in [0, 1), got 'abc'"). ``with_overrides`` is the one way to change fields, used
    by ``build`` and ``vflow train --set``.
    """

    name: str
    kind: str
    data_shape: tuple[int, int, int]
    n_bins: int
    p: tuple[Step, ...]
    r: tuple[Step, ...]
    q: tuple[Step, ...] = ()
    extra_channels: int = 0
    smooth: bool = True  # VFlow's logit(0.05 + 0.9 F) coupling (False: Flow++'s logit(F))
    pattern: str = "stripe"  # official CheckerboardSplit = even / odd columns
    heads: int = 4
    context_filters: int = 32
    context_blocks: int = 3
    dropout: float = 0.0
    paper_params: int | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected, check = CONFIG_FIELD_RULES[f.name]
            if not check(value):
                raise ValueError(f"{f.name} must be {expected}, got {value!r}")
        # canonical types (a JSON round trip or --set may give lists and ints)
        for key in ("data_shape", "p", "r", "q"):
            object.__setattr__(self, key, tuple(getattr(self, key)))
        object.__setattr__(self, "dropout", float(self.dropout))

    def with_overrides(self, **overrides) -> ModelConfig:
        """A copy with ``overrides`` replacing fields, validated. An unknown field raises a
        ValueError listing the valid ones (with the closest match first, if any)."""
        names = [f.name for f in dataclasses.fields(self)]
        step_fields = [f.name for f in dataclasses.fields(Step)]
        for key in overrides:
            if key == "name":
                raise ValueError(
                    "the config field 'name' cannot be overridden: it names the config "
                    "(choose another config instead)"
                )
            if key in names:
                continue
            close = difflib.get_close_matches(key, names + step_fields, n=1)
            if close and close[0] in step_fields:
                hint = (
                    f" ({close[0]!r} is set per flow step, in the fields p, q and r; "
                    "'vflow info CONFIG' lists the steps)"
                )
            else:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown config field {key!r}{hint}; valid fields: {', '.join(names)}"
            )
        return dataclasses.replace(self, **overrides)

    @property
    def dims(self) -> int:
        """D = C * H * W of the data: bits/dim = -log p(x) / (D log 2) for log p in nats."""
        c, h, w = self.data_shape
        return c * h * w

    def to_dict(self) -> dict:
        """The config as JSON-ready values (its step specs as strings), as run.json keeps it."""
        d = dataclasses.asdict(self)
        for key in ("p", "q", "r"):
            d[key] = [str(s) for s in getattr(self, key)]
        return d


def _build_flow(
    steps,
    shape,
    cfg: ModelConfig,
    *,
    backend: str,
    context_channels: int = 0,
    x_channels: int | None = None,
):
    """Compose the blocks of ``steps`` on input ``shape``; returns (flow, output shape)."""
    c, h, w = shape
    layers = []
    for step in steps:
        if step.kind == "squeeze":
            layers.append(SpaceToDepth())
            c, h, w = 4 * c, h // 2, w // 2
        elif step.kind == "affine":
            if x_channels is None or x_channels >= c:
                raise ValueError("f_affine needs extra (augmented) channels")
            layers.append(
                AugmentedAffineCoupling(
                    x_channels,
                    c - x_channels,
                    (h, w),
                    filters=step.filters,
                    blocks=step.blocks,
                    dropout=cfg.dropout,
                )
            )
        elif step.kind in ("checker", "channel"):
            for i in range(step.count):
                layers.append(
                    coupling_block(
                        (c, h, w),
                        split=step.kind,
                        parity=1 - i % 2,
                        blocks=step.blocks,
                        filters=step.filters,
                        components=step.components,
                        attention=step.attention,
                        pattern=cfg.pattern,
                        heads=cfg.heads,
                        context_channels=context_channels,
                        dropout=cfg.dropout,
                        smooth=cfg.smooth,
                        backend=backend,
                    )
                )
        else:
            raise ValueError(f"unknown step kind {step.kind!r}")
    return Compose(layers), (c, h, w)


def _std_normal_logp(eps) -> Tensor:
    """sum log N(eps; 0, I) per sample; eps a tensor or a tuple of tensors."""
    parts = eps if isinstance(eps, tuple) else (eps,)
    return sum(
        -0.5 * (p.flatten(1).square().sum(1) + math.prod(p.shape[1:]) * LOG_2PI) for p in parts
    )


def _check_initialized(model: nn.Module) -> None:
    """Raise unless every ActNorm of ``model`` is initialised and its state is finite."""
    missing = [n for n, m in model.named_modules() if isinstance(m, ActNorm) and not m.initialized]
    if missing:
        raise RuntimeError(f"initialize: ActNorm(s) {missing} did not run")
    bad = [
        k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()
    ]
    if bad:
        raise ValueError(f"initialize: the init batch gave non-finite values for {bad}")


#: Init batch size ``initialize`` recommends (the trainer's default, ``--init-batch-size``).
RECOMMENDED_INIT_BATCH = 128

_LOAD_HINT = (
    f"call model.initialize(x) with a batch of training images ({RECOMMENDED_INIT_BATCH} "
    "recommended) or load trained weights (model.load_state_dict(...), or "
    "vflow.load(run_dir) for a whole trained model)"
)


def _require_initialized(model: nn.Module, method: str, batch: int | None = None) -> None:
    """Refuse ``method`` on a model whose ActNorms have not been initialised, unless it is a
    training forward (``model.training`` and grad mode on): that one lets the ActNorms fit
    themselves lazily to its batch, with a warning.

    Otherwise an uninitialised ActNorm would fit itself to whatever batch an evaluation
    happened to pass first, even in eval mode, and every later number would silently depend
    on it; ``sample`` would invert identity ActNorms. A model that ran ``initialize`` or
    loaded the state_dict of an initialised model (the ``initialized`` buffers travel in it)
    counts as initialised.
    """
    if all(m.is_initialized() for m in model.modules() if isinstance(m, ActNorm)):
        return  # the walk: ~1 ms on vflow-cifar10's 1,249 modules; 0.2% of a digits CPU step
    name = model.config.name
    if model.training and torch.is_grad_enabled():
        warnings.warn(
            f"{name}.{method}: the model is not initialised, so its ActNorm layers initialise "
            f"themselves from this first training batch ({batch} images); for a better start "
            f"{_LOAD_HINT}",
            stacklevel=3,
        )
        return
    if method == "sample":
        harm = "samples would come from ActNorm layers never fitted to data"
    else:
        mode = "in eval mode" if not model.training else "under torch.no_grad"
        harm = f"{mode} they would fit themselves to this batch and give wrong numbers"
    raise RuntimeError(
        f"{name}.{method}: the model is not initialised (its ActNorm layers have no data "
        f"statistics yet), and {harm}; {_LOAD_HINT}"
    )


# --- models ----------------------------------------------------------------------------------


class FlowPlusPlus(nn.Module):
    """Flow++: variational dequantiser r(u|x) + main flow p over the logit-space image."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        super().__init__()
        self.config = config
        c, h, w = config.data_shape
        self.preprocess = ImageToLogit(config.n_bins)
        self.r_context = ContextNet(
            c,
            config.context_filters,
            config.context_blocks,
            config.pattern,
            config.dropout,
            backend=backend,
        )
        r_flow, _ = _build_flow(
            config.r, (c, h, w), config, backend=backend, context_channels=config.context_filters
        )
        self.r_flow = Compose([*r_flow.layers, Sigmoid()])
        self.p_flow, self.latent_shape = _build_flow(
            config.p, (c + config.extra_channels, h, w), config, backend=backend, x_channels=c
        )
        self.activation_checkpointing: str | None = None  # None or a granularity
        self.set_backend(backend)

    # -- helpers --

    @property
    def _dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_images(self, x, check_range: bool = True) -> Tensor:
        """Validate integer images (B, C, H, W) in [0, n_bins); return them as floats.
        ``check_range=False`` skips the range check, which reads the batch on the host."""
        cfg = self.config
        if not isinstance(x, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise TypeError(
                f"images must be an integer tensor with values in [0, {cfg.n_bins}), got dtype "
                f"{x.dtype}; quantise float images first (e.g. x.round().long())"
            )
        if x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
        c, h, w = cfg.data_shape
        if x.shape[1] != c:
            raise ValueError(
                f"{cfg.name} expects {c} channels, got {x.shape[1]} (shape {tuple(x.shape)})"
            )
        if tuple(x.shape[2:]) != (h, w):
            raise ValueError(f"{cfg.name} expects {h}x{w} images, got {x.shape[2]}x{x.shape[3]}")
        if check_range and x.numel():
            self._check_value_range(x)
        return x.to(device=self._device, dtype=self._dtype)

    def _check_value_range(self, x: Tensor) -> None:
        """ValueError unless every value of ``x`` lies in [0, n_bins) (a host read); traced
        by torch.compile as an assertion that fails when the compiled graph runs."""
        n_bins = self.config.n_bins
        if torch.compiler.is_compiling():  # traced (no graph break)
            in_range = (x.min() >= 0) & (x.max() < n_bins)
            torch._assert_async(in_range, f"image values must lie in [0, {n_bins})")
        elif int(x.min()) < 0 or int(x.max()) >= n_bins:
            raise ValueError(
                f"image values must lie in [0, {n_bins}), got range "
                f"[{int(x.min())}, {int(x.max())}]"
            )

    def _dequantise(self, x: Tensor, eps_r: Tensor | None):
        """u ~ r(u|x) and log r(u|x); x float (B, C, H, W)."""
        if eps_r is None:
            eps_r = torch.randn_like(x)
        context = self._context(self.r_context, x / self.config.n_bins - 0.5)
        u, logdet = self.r_flow(eps_r, context)
        return u, _std_normal_logp(eps_r) - logdet

    def _context(self, net: nn.Module, image: Tensor) -> Tensor:
        """``net(image)`` for a context net, checkpointed whole for the "net" and "step"
        granularities (by block for "block", inside the net)."""
        whole = self.activation_checkpointing in ("net", "step")
        return maybe_checkpoint(whole, self, net, image)

    def _augment(self, y: Tensor, eps_q: Tensor | None):
        """Flow++ has no augmentation: (y, log q = 0)."""
        if eps_q is not None:
            raise ValueError("FlowPlusPlus has no augmentation noise eps_q")
        return y, y.new_zeros(y.shape[0])

    def _objective(self, x: Tensor, eps_r=None, eps_q=None) -> Tensor:
        """Eq. 7 per image (B,) for float-valued integer images x."""
        u, log_r = self._dequantise(x, eps_r)
        y, logdet_pre = self.preprocess(x + u)
        xz, log_q = self._augment(y, eps_q)
        eps, logdet_p = self.p_flow(xz)
        return _std_normal_logp(eps) + logdet_p + logdet_pre - log_r - log_q

    # -- public API --

    def elbo(
        self,
        x: Tensor,
        *,
        eps_r: Tensor | None = None,
        eps_q: Tensor | None = None,
        validate: bool = True,
    ) -> Tensor:
        """Lower bound (B,) in nats on log P(x) of the discrete images x (one (u, z) draw).
        ``eps_r`` (B, C, H, W) / ``eps_q`` (B, Cz, H, W) fix the standard normal noise.
        ``validate=False`` skips the check that the values lie in [0, n_bins) (it reads the
        batch on the host): for batches checked already, as the trainer's are at loading.

        Needs an initialised model (``initialize`` or a loaded state_dict; RuntimeError
        otherwise), except in a training forward (train mode, grad on), where the first
        batch initialises the ActNorms lazily, with a warning."""
        images = self._check_images(x, check_range=validate)
        _require_initialized(self, "elbo", images.shape[0])
        return self._objective(images, eps_r, eps_q)

    def forward(self, x: Tensor) -> Tensor:
        return self.elbo(x)

    def bpd(self, x: Tensor) -> Tensor:
        """-elbo / (D ln 2), shape (B,)."""
        return -self.elbo(x) / (self.config.dims * math.log(2))

    def _noise(self, indices, batch: int, seed: int):
        """Sample-major standard normal noise for the importance samples ``indices``: sample s
        has its own generator, seeded from (seed, s), so chunking does not change the draws."""
        c, h, w = self.config.data_shape
        cz = self.config.extra_channels
        eps_r, eps_q = [], []
        for s in indices:
            g = torch.Generator().manual_seed((seed * 0x9E3779B1 + s * 0x85EBCA77 + 1) % 2**63)
            eps_r.append(torch.randn(batch, c, h, w, generator=g, dtype=torch.float64))
            if cz:
                eps_q.append(torch.randn(batch, cz, h, w, generator=g, dtype=torch.float64))
        move = dict(device=self._device, dtype=self._dtype)
        return torch.cat(eps_r).to(**move), (torch.cat(eps_q).to(**move) if cz else None)

    @torch.no_grad()
    def log_prob(
        self,
        x: Tensor,
        num_samples: int = 64,
        chunk_size: int | None = None,
        seed: int | None = None,
    ) -> Tensor:
        """Importance-weighted estimate (Eq. 5) of log P(x), (B,) float64:
        logsumexp_s(objective_s) - log S with S fresh (u, z) draws per image, evaluated
        ``chunk_size`` samples at a time (default: about 256 images per forward pass)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        x = self._check_images(x)
        _require_initialized(self, "log_prob")
        batch = x.shape[0]
        chunk = chunk_size or max(1, 256 // max(batch, 1))
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        weights = []
        for start in range(0, num_samples, chunk):
            idx = range(start, min(start + chunk, num_samples))
            eps_r, eps_q = self._noise(idx, batch, seed)
            xs = x.repeat(len(idx), 1, 1, 1)
            weights.append(self._objective(xs, eps_r, eps_q).double().view(len(idx), batch))
        return torch.logsumexp(torch.cat(weights), dim=0) - math.log(num_samples)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0) -> Tensor:
        """n images (n, C, H, W), long, in [0, n_bins): invert p from N(0, T^2 I).
        ``n = 0`` gives an empty (0, C, H, W) tensor."""
        try:
            n = operator.index(n)
        except TypeError:
            raise ValueError(f"sample: n must be an integer >= 0, got {n!r}") from None
        if n < 0:
            raise ValueError(f"sample: n must be an integer >= 0, got {n}")
        if not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
            raise ValueError(
                f"sample: temperature must be a finite number >= 0, got {temperature!r}"
            )
        _require_initialized(self, "sample")
        eps = torch.randn(n, *self.latent_shape, device=self._device, dtype=self._dtype)
        xz, _ = self.p_flow.inverse(eps * temperature)
        v, _ = self.preprocess.inverse(xz[:, : self.config.data_shape[0]])
        return v.floor().clamp(0, self.config.n_bins - 1).long()

    @torch.no_grad()
    def initialize(
        self,
        x: Tensor,
        scheme: str = DEFAULT_INIT_SCHEME,
        *,
        eps_r: Tensor | None = None,
        eps_q: Tensor | None = None,
    ) -> FlowPlusPlus:
        """Data-dependent initialisation from the init batch x (B >= 2 images); returns self.

        One pass of the ELBO over x (noise ``eps_r`` / ``eps_q`` as in ``elbo``, else drawn)
        initialises the layers in data-flow order (r, then q, then p), each from its own
        output on x given the already initialised layers before it:

        * ``scheme="official"`` (official Flow++ code, flows/flows.py and flows/nn.py,
          ``init=True``): every conv / dense layer of the conditioning and context networks
          gets weights N(0, 0.05) and zero bias, then per output channel
          scale = init_scale / sqrt(var + 1e-8), weight *= scale, bias = -mean * scale, so
          its output on x has zero mean and variance init_scale^2 (init_scale 0.1 for the c2
          of a gated conv, the attention output projection and the coupling's output conv,
          1 elsewhere); and every ActNorm is set per element to zero mean, unit variance.
        * ``scheme="actnorm"``: only the ActNorms; the convs keep their construction-time
          weights (PyTorch's default init, output convs shrunk by 0.1).

        Degenerate statistics: a channel or element with batch variance below
        ``nets.MIN_INIT_VAR`` (e.g. constant over identical images) gets scale init_scale
        (unit variance assumed), never the official 1e4 (``nets.data_init_scale``).
        Position embeddings, LayerNorms and the invertible 1x1 convs are not data-dependent.

        Init batch size: ``RECOMMENDED_INIT_BATCH`` (128) images give the start the recipes
        were tuned on. Fewer than ``flows.SMALL_INIT_BATCH`` (32) warn, and their per-element
        ActNorm variances are pooled toward per-channel ones (``flows.small_batch_variance``):
        on the digits configs 2 images then start within 1.85 test bits/dim of 128 (worst of
        10 image pairs; 35 bits/dim without the pooling); 32 or more images initialise
        exactly as before.

        Until it is initialised (here or by loading an initialised state_dict), the model
        refuses ``elbo`` / ``bpd`` outside a training forward, ``log_prob`` and ``sample``.

        Atomic: x is validated first (ValueError for fewer than 2 images, as a per-element
        variance needs two), the initialisation runs on a copy of the model, and only a
        complete, finite result is copied into this model; on any exception its parameters
        and ``initialized`` flags are unchanged.
        """
        if scheme not in INIT_SCHEMES:
            raise ValueError(
                f"initialize: scheme must be one of {', '.join(map(repr, INIT_SCHEMES))}, "
                f"got {scheme!r}"
            )
        images = self._check_images(x)
        if images.shape[0] < 2:
            raise ValueError(
                "initialize: the init batch x must hold at least 2 images (a per-element "
                f"variance needs two), got shape {tuple(x.shape)}"
            )
        if images.shape[0] < SMALL_INIT_BATCH:
            warnings.warn(
                f"initialize: {images.shape[0]} images is a small init batch; the ActNorm "
                "statistics are pooled toward per-channel ones to stay usable, but "
                f"{RECOMMENDED_INIT_BATCH} images give a better start",
                stacklevel=3,  # the caller (one frame for the no_grad decorator)
            )
        work = copy.deepcopy(self)
        for m in work.modules():
            if isinstance(m, ActNorm):
                m.reset_initialization()
        if scheme == "official":
            with ConvDataInit(work) as convs:
                work._objective(images, eps_r, eps_q)
            if convs.pending:
                raise RuntimeError(f"initialize: {len(convs.pending)} conv(s) never ran")
        else:
            work._objective(images, eps_r, eps_q)
        _check_initialized(work)
        self.load_state_dict(work.state_dict())
        return self

    def _flows(self) -> list[Compose]:
        return [getattr(self, n) for n in ("r_flow", "q_flow", "p_flow") if hasattr(self, n)]

    def set_activation_checkpointing(
        self, enabled: bool = True, granularity: str = "block"
    ) -> FlowPlusPlus:
        """Trade compute for memory in training steps; returns self.

        With it on, a training forward (``self.training`` and grad mode on) keeps, of each
        checkpointed region, only its inputs and outputs, and the backward pass recomputes the
        region's forward once (``torch.utils.checkpoint``, non-reentrant, RNG state
        preserved, so dropout draws the same masks: the loss and gradients are those of the
        plain model, to rounding). Regions:

        * ``granularity="block"`` (default): every residual block of every network (a
          ``CouplingNet``'s GatedConv -> LN [-> GatedAttention -> LN], a ``ContextNet``'s
          GatedConv), selectively: the forward also keeps the outputs of the block's
          attention and 3x3 convolutions (``vflow.checkpointing.keeps_output``), which the backward
          reuses, so it recomputes only the cheap ops (pointwise, layer norms, dropout, 1x1
          convolutions). Kept per network: its blocks' inputs and those outputs; the
          backward holds one block's activations at a time.
        * ``granularity="net"``: the conditioning network of every coupling (``CouplingNet``
          of the MoL and f_affine couplings) and the context nets of r and q, whole. Kept per
          coupling: the flow's own intermediate states (ActNorm / 1x1-conv / coupling inputs)
          and the coupling's parameters tensor, (2 + 3K) C_a values per active position; the
          backward holds one whole network's activations at a time.
        * ``granularity="step"``: every whole flow step (ActNorm -> invertible 1x1 conv ->
          coupling, or f_affine) and the context nets; kept per step: its input only. The
          backward also recomputes the ActNorm, the 1x1 conv and the fused coupling forward.

        For every granularity the last flow step of p runs plain: its regions would be the
        backward's first recomputation, before any gradient exists, so recomputing them
        costs time and saves almost nothing ("net", "step": the peak is the same; "block":
        one network's activations at the start of the backward).

        Cost: a recomputation of the networks' forward (less the kept ops for "block") in the
        backward. ``benchmarks/model_step.py --variants fused+ckpt --granularities block net
        step`` measures them against the plain step, paired (README, "Memory").
        Evaluation, ``torch.no_grad`` passes (``initialize``, ``log_prob``) and ``sample``
        run exactly as without it. Works with torch.compile, channels_last, autocast and DDP
        (non-reentrant checkpointing). ``enabled=False`` restores the plain model.

        Limits: "block" (PyTorch's selective checkpointing) allows ONE backward pass through a
        graph: a second one (``backward(retain_graph=True)`` then ``backward()``, or a double
        backward through ``torch.autograd.grad(..., create_graph=True)``) raises
        ``RuntimeError: Trying to backward an extra time``; "net" and "step" allow a second
        backward pass. A double backward is not supported by a model on a fused backend in any
        mode: the fused couplings are differentiable once, and differentiating their
        gradients raises an error (the networks' fused ops are differentiable twice in eager
        mode, ``vflow.net_ops``).
        Changing the granularity or the train / eval mode between a forward and its backward
        raises ``torch.utils.checkpoint.CheckpointError``; ``torch.func`` transforms do not
        support checkpointing (saved tensor hooks).

        Raises ``TypeError`` unless ``enabled`` is a bool and ``ValueError`` for an unknown
        ``granularity``, in both cases leaving the model unchanged.
        """
        if not isinstance(enabled, bool):  # e.g. a granularity passed first: "net"
            raise TypeError(f"enabled must be True or False, got {enabled!r}")
        if granularity not in CHECKPOINT_GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {CHECKPOINT_GRANULARITIES}, got {granularity!r}"
            )
        last = self._last_step()
        for flow in self._flows():
            for layer in flow.layers:  # the steps with parameters (not squeezes, sigmoids)
                layer.checkpoint_step = enabled and granularity == "step" and _has_params(layer)
        for m in self.modules():
            if isinstance(m, (MixLogisticCoupling, AugmentedAffineCoupling)):
                m.checkpoint_net = enabled and granularity == "net"
            if isinstance(m, (CouplingNet, ContextNet)):
                m.checkpoint_blocks = enabled and granularity == "block"
        if last is not None:  # runs plain (see above)
            last.checkpoint_step = False
            for m in last.modules():
                if isinstance(m, (MixLogisticCoupling, AugmentedAffineCoupling)):
                    m.checkpoint_net = False
                if isinstance(m, CouplingNet):
                    m.checkpoint_blocks = False
        self.activation_checkpointing = granularity if enabled else None
        return self

    def _last_step(self) -> nn.Module | None:
        """The last step of p with parameters (a coupling block or f_affine)."""
        steps = [layer for layer in self.p_flow.layers if _has_params(layer)]
        return steps[-1] if steps else None

    def set_backend(self, name: str) -> FlowPlusPlus:
        """Select the ops backend ("auto", "reference", "cpp", "triton") of every coupling,
        attention, gated conv (its concat-ELUs) and channel layer norm."""
        if name not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {name!r}")
        for m in self.modules():
            if isinstance(m, (MixLogisticCoupling, GatedAttention, GatedConv, ChannelLayerNorm)):
                m.backend = name
        self.backend = name
        return self


class VFlow(FlowPlusPlus):
    """VFlow: r(u|x), q(z|x+u) and the joint flow p(x, z) over C + Cz channels."""

    def __init__(self, config: ModelConfig, backend: str = "auto"):
        if config.extra_channels < 1:
            raise ValueError("VFlow needs extra_channels >= 1 (use FlowPlusPlus otherwise)")
        super().__init__(config, backend)
        c, h, w = config.data_shape
        self.q_context = ContextNet(
            c,
            config.context_filters,
            config.context_blocks,
            config.pattern,
            config.dropout,
            backend=backend,
        )
        q_flow, _ = _build_flow(
            config.q,
            (config.extra_channels, h, w),
            config,
            backend=backend,
            context_channels=config.context_filters,
        )
        self.q_flow = Compose([*q_flow.layers, Sigmoid()])
        self.set_backend(backend)

    def _augment(self, y: Tensor, eps_q: Tensor | None):
        """z ~ q(z|y), log q(z|y), and the joint input cat(y, z)."""
        if eps_q is None:
            eps_q = y.new_empty(y.shape[0], self.config.extra_channels, *y.shape[2:]).normal_()
        z, logdet = self.q_flow(eps_q, self._context(self.q_context, y))
        return torch.cat([y, z], dim=1), _std_normal_logp(eps_q) - logdet


# --- named configurations ----------------------------------------------------------------------


def _vflow_p(blocks, filters, k, affine=None):
    head = (f_affine(*affine),) if affine else ()
    return head + (
        f_checker(blocks, filters, k, 2),
        f_channel(blocks, filters, k, 2),
        SQUEEZE,
        f_checker(blocks, filters, k, 2),
        f_channel(blocks, filters, k, 3),
    )


def _flowpp_p(blocks, filters, k):
    return (
        f_checker(blocks, filters, k, 4),
        SQUEEZE,
        f_channel(blocks, filters, k, 2),
        f_checker(blocks, filters, k, 3),
    )


CIFAR = dict(data_shape=(3, 32, 32), n_bins=256, dropout=0.2)

CONFIGS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in [
        # Table 4 / Table 1 (CIFAR-10). The Flow++ dequantiser uses attention as in the
        # official code (31,443,440 parameters); VFlow's q and r follow the paper (g_checker).
        ModelConfig(
            "flowpp-cifar10",
            "flowpp",
            p=_flowpp_p(10, 96, 32),
            r=(f_checker(2, 96, 32, 4),),
            smooth=False,
            paper_params=31_400_000,
            notes="official Flow++ CIFAR-10 code: 31,443,440 parameters",
            **CIFAR,
        ),
        ModelConfig(
            "vflow-cifar10",
            "vflow",
            p=_vflow_p(10, 96, 32),
            q=(g_checker(3, 96, 32, 4),),
            r=(g_checker(2, 96, 32, 4),),
            extra_channels=3,
            paper_params=37_800_000,
            **CIFAR,
        ),
        ModelConfig(
            "vflow-cifar10-16m",
            "vflow",
            p=_vflow_p(10, 64, 16),
            q=(g_checker(3, 64, 16, 4),),
            r=(g_checker(2, 64, 16, 4),),
            extra_channels=3,
            paper_params=16_500_000,
            **CIFAR,
        ),
        ModelConfig(
            "vflow-cifar10-12m",
            "vflow",
            p=_vflow_p(10, 56, 10),
            q=(g_checker(3, 56, 10, 4),),
            r=(f_checker(2, 56, 10, 4),),
            extra_channels=3,
            paper_params=11_900_000,
            **CIFAR,
        ),
        # Table 5: 4M-parameter budget.
        ModelConfig(
            "flowpp-4m",
            "flowpp",
            p=_flowpp_p(13, 32, 4),
            r=(f_checker(2, 32, 4, 4),),
            smooth=False,
            paper_params=4_020_000,
            **CIFAR,
        ),
        ModelConfig(
            "vflow4-4m",
            "vflow",
            p=_vflow_p(11, 32, 4, affine=(3, 32)),
            q=(g_checker(3, 32, 4, 4),),
            r=(f_checker(2, 32, 4, 4),),
            extra_channels=1,
            paper_params=4_030_000,
            **CIFAR,
        ),
        ModelConfig(
            "vflow6-4m",
            "vflow",
            p=_vflow_p(10, 32, 4, affine=(3, 32)),
            q=(g_checker(3, 32, 4, 4),),
            r=(f_checker(2, 32, 4, 4),),
            extra_channels=3,
            paper_params=4_010_000,
            **CIFAR,
        ),
        # ImageNet (official recipe; the paper lists no parameter counts).
        ModelConfig(
            "vflow-imagenet32",
            "vflow",
            data_shape=(3, 32, 32),
            n_bins=256,
            p=_vflow_p(20, 128, 32),
            q=(g_checker(3, 128, 32, 4),),
            r=(g_checker(2, 128, 32, 4),),
            extra_channels=3,
            notes="128 filters, 20 blocks, K=32 (official ImageNet 32x32 recipe)",
        ),
        ModelConfig(
            "vflow-imagenet64",
            "vflow",
            data_shape=(3, 64, 64),
            n_bins=256,
            p=(SQUEEZE,) + _vflow_p(10, 96, 4),
            q=(g_checker(3, 96, 4, 4),),
            r=(g_checker(2, 96, 4, 4),),
            extra_channels=3,
            notes="K=4; a first SpaceToDepth to 32x32 keeps attention affordable",
        ),
        # Tiny configs for 8x8 digits with 17 levels (train in minutes on a CPU).
        ModelConfig(
            "flowpp-digits",
            "flowpp",
            data_shape=(1, 8, 8),
            n_bins=17,
            p=(f_checker(1, 16, 4, 2), SQUEEZE, f_channel(1, 16, 4, 2), f_checker(1, 16, 4, 2)),
            r=(g_checker(1, 16, 4, 2),),
            smooth=False,
            context_filters=8,
            context_blocks=1,
        ),
        ModelConfig(
            "vflow-digits",
            "vflow",
            data_shape=(1, 8, 8),
            n_bins=17,
            p=(
                f_checker(1, 16, 4, 2),
                f_channel(1, 16, 4, 2),
                SQUEEZE,
                f_checker(1, 16, 4, 2),
                f_channel(1, 16, 4, 2),
            ),
            q=(g_checker(1, 16, 4, 2),),
            r=(g_checker(1, 16, 4, 2),),
            extra_channels=1,
            context_filters=8,
            context_blocks=1,
        ),
        # Fashion-MNIST (1x28x28, 256 levels): Table 5's Flow++ / VFlow structure at D_H = 16,
        # B = 1, K = 4, sized for >= 3 epochs an hour on 2 CPU cores (vflow train --compile
        # --channels-last: vflow-fashion's 3 epochs measured at 41 min, README; a batch-64
        # step measured at 8.3x vflow-digits' CPU time, B = 2 at 13.4x). The 28x28 couplings
        # have no attention (g_*: 392 positions per half made a step ~3x dearer); the 14x14
        # ones do (f_*).
        ModelConfig(
            "flowpp-fashion",
            "flowpp",
            data_shape=(1, 28, 28),
            n_bins=256,
            p=(g_checker(1, 16, 4, 4), SQUEEZE, f_channel(1, 16, 4, 2), f_checker(1, 16, 4, 3)),
            r=(g_checker(1, 16, 4, 2),),
            smooth=False,
            context_filters=16,
            context_blocks=1,
            notes="Table 5 Flow++ structure scaled down; no attention at 28x28",
        ),
        ModelConfig(
            "vflow-fashion",
            "vflow",
            data_shape=(1, 28, 28),
            n_bins=256,
            p=(
                f_affine(1, 16),
                g_checker(1, 16, 4, 2),
                Step("channel", 2, 1, 16, 4, attention=False),
                SQUEEZE,
                f_checker(1, 16, 4, 2),
                f_channel(1, 16, 4, 3),
            ),
            q=(g_checker(1, 16, 4, 2),),
            r=(g_checker(1, 16, 4, 2),),
            extra_channels=1,
            context_filters=16,
            context_blocks=1,
            notes="Table 5 VFlow structure (1 extra channel) scaled down; no attention at 28x28",
        ),
    ]
}


def build(name: str, backend: str = "auto", **overrides: object) -> FlowPlusPlus:
    """Build the named configuration (see ``CONFIGS``); ``overrides`` replace config fields
    (``ModelConfig.with_overrides``: ValueError for an unknown field or a bad value)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown config {name!r}; available: {', '.join(CONFIGS)}")
    cfg = CONFIGS[name].with_overrides(**overrides)
    cls = VFlow if cfg.kind == "vflow" else FlowPlusPlus
    return cls(cfg, backend=backend)


def _count(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def parameter_counts(model: FlowPlusPlus) -> dict[str, int]:
    """Parameters of p, q (flow + context net), r (flow + context net) and the total."""
    counts = dict(
        p=_count(model.p_flow),
        q=_count(getattr(model, "q_flow", None)) + _count(getattr(model, "q_context", None)),
        r=_count(model.r_flow) + _count(model.r_context),
    )
    counts["total"] = _count(model)
    return counts


def _meta_counts(name: str) -> dict[str, int]:
    with torch.device("meta"):
        return parameter_counts(build(name, backend="reference"))


def describe(name: str) -> str:
    """Architecture and parameter counts of a named config (built on the meta device)."""
    cfg = CONFIGS[name] if name in CONFIGS else None
    if cfg is None:
        raise KeyError(f"unknown config {name!r}; available: {', '.join(CONFIGS)}")
    counts = _meta_counts(name)
    c, h, w = cfg.data_shape
    lines = [
        f"{cfg.name}: {'VFlow' if cfg.kind == 'vflow' else 'Flow++'}",
        f"  data: {c}x{h}x{w}, n_bins={cfg.n_bins}, extra channels Cz={cfg.extra_channels}, "
        f"split pattern={cfg.pattern}, coupling={'smooth (VFlow)' if cfg.smooth else 'Flow++'}, "
        f"dropout={cfg.dropout}",
        "  p(x, z), (x, z) -> eps: " + "; ".join(str(s) for s in cfg.p),
    ]
    if cfg.q:
        lines.append("  q(z|x), eps_q -> z: " + "; ".join(str(s) for s in cfg.q) + "; Sigmoid")
    lines.append("  r(u|x), eps_r -> u: " + "; ".join(str(s) for s in cfg.r) + "; Sigmoid")
    lines.append(f"  context nets: {cfg.context_filters} filters, {cfg.context_blocks} gated convs")
    lines.append("  parameters: " + ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    if cfg.paper_params:
        rel = counts["total"] / cfg.paper_params - 1
        lines.append(f"  paper: {cfg.paper_params / 1e6:.2f}M ({rel:+.1%})")
    if cfg.notes:
        lines.append(f"  notes: {cfg.notes}")
    return "\n".join(lines)

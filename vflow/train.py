"""Training: the official Flow++/VFlow recipe, EMA, checkpoints, exact resume and DDP.

Recipe (per config, :data:`RECIPES`): Adam; the learning rate warms up linearly from 0 over
``warmup`` steps, holds, and from ``decay_start`` decays by ``decay_rate`` per step down to
``lr_min`` (VFlow CIFAR-10: 1.2e-3, warmup 2,000, x0.99999 from step 50,000 to 3e-4); global
gradient-norm clipping at ``grad_clip`` (1.0); an EMA of the weights (``ema_decay``, 0.999)
used for evaluation and sampling; data-dependent initialisation (``model.initialize``) before
the optimiser starts, from its own init batch (:func:`init_batch`): ``init_batch_size``
(default 128, capped at the training-set size) distinct training images drawn with the run's
seed, independently of ``batch_size``, as the official code does (CIFAR-10: 128 init images,
batch 64), since per-element statistics of a small training batch are degenerate (one image
has zero variance). ``init_scheme`` selects the model's scheme ("official" or "actnorm"; None
= the model's default). Resume does not re-initialise. The loss is the mean negative ELBO in
bits per dimension.

Steps. ``step`` counts training iterations (batches consumed); :func:`learning_rate` is
evaluated at ``step + 1`` for the iteration that makes update ``step + 1``. An iteration whose
loss or gradient is not finite is skipped (no update, no EMA update; the batch is consumed)
and counted; ``max_bad_steps`` consecutive skips stop training with
:class:`NonFiniteError` and leave the last checkpoint untouched.

Checkpoints (``ckpt-<step>.pt`` in the run directory, written to a temporary file and moved
into place with ``os.replace``, the last ``keep`` kept) hold only tensors and plain
containers: model and EMA weights, the optimiser state, the step, the data position
``(epoch, index)``, the torch / numpy / python (and CUDA) RNG states of every rank, the model
spec ``{name, overrides, backend}``, the recipe and the arguments. They load with
``torch.load(weights_only=True)``. ``resume=True`` continues from the newest one so that
the following steps are bit-identical to an uninterrupted run. Ctrl-C writes a checkpoint.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1`` in the environment) the process group is
initialised from the environment (gloo on CPU, nccl on CUDA), the model is wrapped in
``DistributedDataParallel``, and ``batch_size`` is the GLOBAL batch: each of the N ranks
takes ``batch_size / N`` images of every global batch (same images, same hyperparameters as a
single-process run). Rank 0 alone initialises the model from the init batch and broadcasts
the weights and buffers, so a DDP run starts from exactly the single-process initialisation;
rank 0 alone writes logs, checkpoints and images.

Memory. ``activation_checkpointing`` (``vflow train --activation-checkpointing``) calls
``model.set_activation_checkpointing(True)`` on the built model, before DDP and compilation:
the residual blocks of the couplings' conditioning networks and of the context networks are
recomputed in the backward pass, except their attention and 3x3 convolutions, whose outputs
are kept (the "block" granularity; same losses, less memory, more time). It is stored with
the arguments, and a resumed run keeps it on.

Structure. :func:`train` runs a :class:`Trainer`: its constructor is the setup (settings
from the arguments or the checkpoint, data, model, initialisation or resume, optimiser, EMA),
:meth:`Trainer.train_step` one iteration, :meth:`Trainer.evaluate_ema` the evaluation,
:meth:`Trainer.write_checkpoint` a checkpoint and :meth:`Trainer.run` the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import json
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .data import BatchStream, _gen, default_dataset_for, load_dataset
from .evaluate import draw_samples, evaluate, model_cfg, plot_loss_curve, save_grid

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------- recipe

DEFAULT_RECIPE = {
    "lr": 1e-3,  # peak learning rate
    "warmup": 200,  # linear warm-up steps (0 = none)
    "decay_start": None,  # step from which the lr decays exponentially (None = never)
    "decay_rate": 1.0,  # per-step decay factor
    "lr_min": 0.0,  # floor of the decay
    "batch_size": 64,  # global batch
    "betas": (0.9, 0.999),
    "grad_clip": 1.0,  # global grad-norm clip (None or 0 = off)
    "ema_decay": 0.999,
    "steps": 10_000,  # default length when neither --steps nor --epochs is given
    "flip": False,  # random horizontal flips of the training images
}

#: Per-config training recipes (merged over DEFAULT_RECIPE; unknown configs get the default).
RECIPES: dict[str, dict] = {
    # The small default: ~3-4 minutes on 2 CPU cores (see vflow.cli).
    "vflow-digits": {"lr": 2e-3, "warmup": 100, "batch_size": 64, "ema_decay": 0.99, "steps": 1000},
    "flowpp-digits": {
        "lr": 2e-3,
        "warmup": 100,
        "batch_size": 64,
        "ema_decay": 0.99,
        "steps": 1000,
    },
    # Official VFlow CIFAR-10 (paper section 6): 1.2e-3, warmup 2k, x0.99999 from 50k to 3e-4.
    "vflow-cifar10": {
        "lr": 1.2e-3,
        "warmup": 2000,
        "decay_start": 50_000,
        "decay_rate": 0.99999,
        "lr_min": 3e-4,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 1_500_000,
        "flip": True,
    },
    # Flow++ used 3e-4 without decay.
    "flowpp-cifar10": {
        "lr": 3e-4,
        "warmup": 2000,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 1_500_000,
        "flip": True,
    },
    # ImageNet 32x32: lr 1e-3, warmup 5,000, batch 32.
    "vflow-imagenet32": {
        "lr": 1e-3,
        "warmup": 5000,
        "batch_size": 32,
        "ema_decay": 0.999,
        "steps": 1_500_000,
    },
    "vflow-imagenet64": {
        "lr": 1e-3,
        "warmup": 5000,
        "batch_size": 32,
        "ema_decay": 0.999,
        "steps": 1_500_000,
    },
    # Fashion-MNIST 28x28 (this package's scaled-down Table 5 structure): 3 epochs of the
    # 50,000 training images at batch 64 (ceil(150,000 / 64) = 2,344 steps).
    "vflow-fashion": {
        "lr": 1e-3,
        "warmup": 200,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 2344,
    },
    "flowpp-fashion": {
        "lr": 1e-3,
        "warmup": 200,
        "batch_size": 64,
        "ema_decay": 0.999,
        "steps": 2344,
    },
}


def get_recipe(config: str, **overrides) -> dict:
    """The recipe of ``config`` (its own entry, else that of its family, e.g. a
    "vflow-cifar10-4m" gets "vflow-cifar10"'s, else the default), with ``overrides``
    (``None`` values ignored) applied on top."""
    base = dict(DEFAULT_RECIPE)
    if config in RECIPES:
        base.update(RECIPES[config])
    else:
        for data in ("cifar10", "imagenet32", "imagenet64", "digits", "fashion"):
            if data in config:
                kind = "flowpp" if config.startswith("flowpp") else "vflow"
                base.update(RECIPES.get(f"{kind}-{data}", RECIPES.get(f"vflow-{data}", {})))
                break
    for k, v in overrides.items():
        if v is not None:
            if k not in DEFAULT_RECIPE:
                raise KeyError(f"unknown recipe key {k!r}; known: {', '.join(DEFAULT_RECIPE)}")
            base[k] = v
    return base


def learning_rate(step: int, recipe: dict) -> float:
    """The learning rate of update number ``step`` (1-based; ``step = 0`` gives 0 under warmup).

    ``lr * min(1, step / warmup)`` while warming up; from ``decay_start`` on,
    ``max(lr_min, lr * decay_rate ** (step - decay_start))``.
    """
    lr = float(recipe["lr"])
    warmup = int(recipe.get("warmup") or 0)
    if warmup > 0 and step < warmup:
        return lr * max(step, 0) / warmup
    start = recipe.get("decay_start")
    if start is not None and step > start:
        rate = float(recipe.get("decay_rate", 1.0))
        return max(float(recipe.get("lr_min") or 0.0), lr * rate ** (step - start))
    return lr


# ----------------------------------------------------------------------------- EMA


class EMA:
    """Exponential moving average of the parameters (buffers are copied as they are).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` after ``t`` updates, so that the average
    is not dominated by the initial weights in short runs.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = float(decay)
        self.updates = 0
        self.params = {k: p.detach().clone() for k, p in model.named_parameters()}
        self.buffers = {k: b.detach().clone() for k, b in model.named_buffers()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, p in model.named_parameters():
            self.params[k].mul_(d).add_(p.detach(), alpha=1 - d)
        for k, b in model.named_buffers():
            self.buffers[k].copy_(b)
        self.updates += 1

    def state_dict(self) -> dict:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "params": self.params,
            "buffers": self.buffers,
        }

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        for k, v in state["params"].items():
            self.params[k].copy_(v)
        for k, v in state["buffers"].items():
            if k in self.buffers and self.buffers[k].shape == v.shape:
                self.buffers[k].copy_(v)
            else:
                self.buffers[k] = v.clone()

    def model_state(self) -> dict:
        """A state dict for ``load_state_dict`` of the model: EMA params + current buffers."""
        return {**self.buffers, **self.params}

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict(self.model_state(), strict=False)
        return model


# ----------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str) -> DistInfo:
    """Initialise the process group from the environment when ``WORLD_SIZE > 1``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    backend = "nccl" if device.startswith("cuda") else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    # Import torch.distributed.nn before the group exists. Ten of its functions declare
    # ``group=group.WORLD`` as a default argument, evaluated at import: imported later (a DDP
    # run imports it lazily), their __defaults__ hold the live default ProcessGroup for good,
    # so destroy_process_group cannot free it and gloo's worker and TCP-loop threads and the
    # TCPStore thread run on into interpreter teardown, where a rank aborted with
    # std::terminate ("terminate called without an active exception"). Imported now, they
    # hold None.
    from torch.distributed import nn as _dist_nn  # noqa: F401

    dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, initialized_here=True)


def shutdown_distributed(info: DistInfo, finished: bool) -> None:
    """Destroy the process group that ``init_distributed`` created. After a normal finish
    the ranks first meet at a barrier: a gloo rank whose peer tears down while it is still
    working (rank 0 writing the last files, say) can abort with std::terminate."""
    if not (info.initialized_here and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def _broadcast_module(model: nn.Module, src: int = 0) -> None:
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(t.data, src)


class _ElboObjective(nn.Module):
    """``forward(x) = model.elbo(x)``, so that DistributedDataParallel sees a forward call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.elbo(x)


# ----------------------------------------------------------------------------- RNG state


def get_rng_state(device: torch.device) -> dict:
    npst = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(npst[0]),
            "key": torch.from_numpy(npst[1].astype(np.int64)),
            "pos": int(npst[2]),
            "has_gauss": int(npst[3]),
            "cached_gaussian": float(npst[4]),
        },
        "python": random.getstate(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            n["key"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def set_threads(num_threads: int | None, data_name: str, device: str) -> None:
    """``torch.set_num_threads``: as given, else 1 for the tiny digits models on CPU (their
    ops are too small to split; measured ~10x less CPU time per step than with 2 threads on
    a busy 2-core machine), else torch's default."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif data_name == "digits" and not str(device).startswith("cuda"):
        torch.set_num_threads(1)


# ----------------------------------------------------------------------------- checkpoints

CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint files of a run, oldest first."""
    files = [f for f in glob.glob(os.path.join(run_dir, "ckpt-*.pt")) if CKPT_RE.search(f)]
    return sorted(files, key=lambda f: int(CKPT_RE.search(f).group(1)))


def latest_checkpoint(run_dir: str) -> str | None:
    files = list_checkpoints(run_dir)
    return files[-1] if files else None


def save_checkpoint(state: dict, run_dir: str, step: int, keep: int = 3) -> str:
    """Write ``ckpt-<step>.pt`` atomically (temp file + ``os.replace``), keep the last ``keep``."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if keep and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            try:
                os.remove(old)
            except OSError:
                pass
    return path


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint as data only (``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ----------------------------------------------------------------------------- model building


def default_build(spec: dict) -> nn.Module:
    """Build a model from a spec ``{"name", "overrides", "backend"}`` with ``vflow.build``."""
    import vflow

    build = getattr(vflow, "build", None)
    if build is None:
        from vflow.models import build
    return build(
        spec["name"], backend=spec.get("backend", "auto"), **dict(spec.get("overrides") or {})
    )


def load_run_model(
    run_dir: str,
    device="cpu",
    use_ema: bool = True,
    backend: str | None = None,
    build_fn: Callable[[dict], nn.Module] = default_build,
):
    """The model of a run's newest checkpoint (EMA weights by default) and the checkpoint."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    path = latest_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in run directory {run_dir}")
    ck = load_checkpoint(path)
    spec = dict(ck["model_spec"])
    if backend is not None:
        spec["backend"] = backend
    model = build_fn(spec)
    model.load_state_dict(ck["model"])
    if use_ema and ck.get("ema") is not None:
        ema_state = {**ck["ema"]["buffers"], **ck["ema"]["params"]}
        model.load_state_dict(ema_state, strict=False)
    model.to(device).eval()
    return model, ck


# ----------------------------------------------------------------------------- trainer


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainArgs:
    """Everything a training run needs (the CLI fills it from its options)."""

    config: str = "vflow-digits"
    data: str | None = None  # default: from the config name
    data_dir: str | None = None
    out: str | None = None  # run directory; default runs/<config>-<timestamp>
    steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    warmup: int | None = None
    ema_decay: float | None = None
    grad_clip: float | None = None
    flip: bool | None = None
    backend: str = "auto"
    device: str = "cpu"
    seed: int = 0
    resume: bool = False
    overrides: dict = field(default_factory=dict)  # model overrides for vflow.build
    log_every: int = 10
    eval_every: int = 500  # periodic test ELBO + sample grid (0 = only at the end)
    eval_images: int | None = 512  # images used by the periodic evaluation (None = all)
    eval_batch_size: int = 256
    ckpt_every: int = 500
    keep: int = 3
    final_eval: bool = True  # ELBO and IW bpd on the whole test split at the end
    iw_samples: int = 16
    n_samples: int = 64  # images in a sample grid
    max_bad_steps: int = 20
    progress: bool = True
    num_threads: int | None = None
    init_batch_size: int | None = None  # images for model.initialize (None: 128 or fewer)
    init_scheme: str | None = None  # model.initialize scheme (None: the model's default)
    channels_last: bool = False  # channels_last weights and activations (faster CPU convs)
    compile: bool = False  # torch.compile the training objective (networks + couplings)
    activation_checkpointing: bool = False  # recompute the coupling networks in backward

    def recipe(self) -> dict:
        return get_recipe(
            self.config,
            lr=self.lr,
            warmup=self.warmup,
            batch_size=self.batch_size,
            ema_decay=self.ema_decay,
            grad_clip=self.grad_clip,
            flip=self.flip,
        )


DEFAULT_INIT_BATCH_SIZE = 128  # official Flow++ CIFAR-10: init_bs = 128 at batch 64
_INIT_STREAM = 0x1417  # key of the init-batch generator (distinct from the batch stream's)


def check_init_batch_size(init_batch_size: int | None) -> None:
    """ValueError unless ``init_batch_size`` is None or an int >= 2."""
    if init_batch_size is None:
        return
    if isinstance(init_batch_size, bool) or not isinstance(init_batch_size, int):
        raise ValueError(f"init_batch_size must be an int >= 2, got {init_batch_size!r}")
    if init_batch_size < 2:
        raise ValueError(
            f"init_batch_size (--init-batch-size) must be at least 2: data-dependent "
            f"initialisation estimates per-element variances, got {init_batch_size}"
        )


def init_batch(data, size: int | None, seed: int) -> torch.Tensor:
    """The init batch: ``min(size or 128, len(data))`` distinct images of ``data`` (long
    (N, C, H, W)), chosen by a generator keyed on ``seed`` alone, so the batch does not
    depend on the training batch size or the world size (no flips)."""
    check_init_batch_size(size)
    n = min(DEFAULT_INIT_BATCH_SIZE if size is None else size, len(data))
    if n < 2:
        raise ValueError(f"the training split has {len(data)} image(s); initialisation needs 2")
    idx = torch.randperm(len(data), generator=_gen(seed, _INIT_STREAM))[:n]
    return data.images[idx].long()


def default_run_dir(config: str) -> str:
    return os.path.join("runs", f"{config}-{time.strftime('%Y%m%d-%H%M%S')}")


def _log(msg: str, info: DistInfo) -> None:
    if info.main:
        print(msg, flush=True)


def _plain(obj):
    """JSON/weights_only-safe copy of plain data (tuples -> lists, paths -> str)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


@dataclass
class TrainResult:
    run_dir: str
    step: int
    model: nn.Module
    ema: EMA
    final: dict | None
    skipped: int
    checkpoint: str | None


def compile_objective(fn, device: torch.device | str):
    """``torch.compile`` a training objective the way ``vflow train --compile`` does.

    On CPU with inductor's C++ wrapper: the generated code then calls its kernels, GEMMs,
    convolutions and the vflow custom ops from C++ instead of from a Python function, which
    saves about a tenth of a digits training step. Compilation happens on the first call.
    """
    options = {"cpp_wrapper": True} if torch.device(device).type == "cpu" else None
    return torch.compile(fn, options=options)


def train(args: TrainArgs, build_fn: Callable[[dict], nn.Module] = default_build) -> TrainResult:
    """Train (or resume) a run; see the module docstring. Returns the final state."""
    info = init_distributed(args.device)
    finished = False
    try:
        result = _train(args, build_fn, info)
        finished = True
        return result
    finally:
        shutdown_distributed(info, finished)


def _train(args: TrainArgs, build_fn, info: DistInfo) -> TrainResult:
    return Trainer(args, build_fn, info).run()


# ----------------------------------------------------------------------------- trainer: setup


@dataclass
class RunSettings:
    """What a run keeps from start to end: the model spec, the recipe, the seed and the data.
    A new run takes them from its arguments, a resumed one from its checkpoint."""

    spec: dict
    recipe: dict
    seed: int
    data_name: str
    data_dir: str | None


#: TrainArgs fields that are part of the recipe (a resumed run keeps its checkpoint's).
RECIPE_ARGS = ("lr", "warmup", "batch_size", "ema_decay", "grad_clip", "flip")


def training_device(name: str, info: DistInfo) -> torch.device:
    """The device of this rank: ``name``, on the local rank's GPU when DDP runs on CUDA."""
    device = torch.device(name)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device


def checkpoint_to_resume(run_dir: str, resume: bool) -> str | None:
    """The newest checkpoint of ``run_dir`` when resuming (else None). Refuses to resume a
    run without checkpoints (FileNotFoundError) and to start over one (FileExistsError)."""
    path = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if resume and path is None:
        raise FileNotFoundError(f"--resume: no checkpoint (ckpt-*.pt) in {run_dir}")
    if not resume and path is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue "
            f"it or choose another --out"
        )
    return path


def settings_from_args(args: TrainArgs) -> RunSettings:
    """The settings of a new run."""
    spec = {"name": args.config, "overrides": _plain(dict(args.overrides)), "backend": args.backend}
    data_name = args.data or default_dataset_for(args.config)
    return RunSettings(spec, args.recipe(), args.seed, data_name, args.data_dir)


def settings_from_checkpoint(ck: dict, args: TrainArgs, info: DistInfo) -> RunSettings:
    """The settings of a resumed run: the checkpoint's, except ``args.backend`` (unless
    "auto") and ``args.data_dir`` (if given). Recipe arguments are ignored, with a note."""
    spec = dict(ck["model_spec"])
    if args.backend != "auto":
        spec["backend"] = args.backend
    recipe = dict(ck["recipe"])
    recipe["betas"] = tuple(recipe["betas"])
    given = [k for k in RECIPE_ARGS if getattr(args, k) is not None]
    if given:
        _log(f"note: resuming with the checkpoint's recipe; ignoring {', '.join(given)}", info)
    data_dir = args.data_dir or ck.get("data_dir")
    return RunSettings(spec, recipe, int(ck["seed"]), ck["data"], data_dir)


def args_for_resume(args: TrainArgs, ck: dict) -> TrainArgs:
    """``args``, with activation checkpointing on if the checkpointed run had it on (a run
    that needed it to fit in memory still needs it)."""
    if args.activation_checkpointing or not ck.get("args", {}).get("activation_checkpointing"):
        return args
    return dataclasses.replace(args, activation_checkpointing=True)


def total_steps_of(args: TrainArgs, stream: BatchStream, ck: dict | None, recipe: dict) -> int:
    """The run's length: ``--steps``, else ``--epochs`` worth of batches, else the
    checkpoint's, else the recipe's."""
    if args.steps is not None:
        return int(args.steps)
    if args.epochs is not None:
        return int(args.epochs) * stream.batches_per_epoch
    if ck is not None:
        return int(ck["total_steps"])
    return int(recipe["steps"])


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``model.set_activation_checkpointing(True)``; ValueError for a model without it."""
    if not callable(getattr(model, "set_activation_checkpointing", None)):
        raise ValueError(
            f"activation_checkpointing: model {type(model).__name__} has no "
            f"set_activation_checkpointing"
        )
    model.set_activation_checkpointing(True)


def check_model_fits_data(model: nn.Module, settings: RunSettings, data) -> None:
    """ValueError unless the model's image shape and number of levels are the data's."""
    name, data_name = settings.spec["name"], settings.data_name
    shape, n_bins = model_cfg(model, "data_shape"), model_cfg(model, "n_bins")
    if shape is not None and tuple(shape) != tuple(data.shape):
        raise ValueError(
            f"config {name} models images of shape {tuple(shape)} but "
            f"dataset {data_name} has {tuple(data.shape)}"
        )
    if n_bins is not None and int(n_bins) != data.n_bins:
        raise ValueError(
            f"config {name} has n_bins={n_bins} but dataset {data_name} has {data.n_bins} levels"
        )


def training_objective(model: nn.Module, args: TrainArgs, info: DistInfo, device) -> nn.Module:
    """``x -> model.elbo(x)`` as a module, wrapped in DistributedDataParallel under DDP and
    compiled with ``--compile`` (which compiles on the first step)."""
    objective = _ElboObjective(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        objective = compile_objective(objective, device)
    return objective


class TrainWindow:
    """Running sums of the training metrics since the last "train" row of metrics.jsonl."""

    def __init__(self):
        self.bpd, self.gnorm, self.n, self.imgs = 0.0, 0.0, 0, 0
        self.t0 = time.perf_counter()

    def add(self, bpd: float, gnorm: float, ok: bool, images: int) -> None:
        """Count one iteration of ``images`` images; its loss and gradient norm if ``ok``."""
        if ok:
            self.bpd += bpd
            self.gnorm += gnorm
            self.n += 1
        self.imgs += images

    def row(self, step: int, epoch: int, lr: float, skipped: int) -> dict:
        """The "train" row: mean bits/dim and gradient norm of the good iterations."""
        dt = time.perf_counter() - self.t0
        return {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "train_bpd": self.bpd / self.n if self.n else None,
            "grad_norm": self.gnorm / self.n if self.n else None,
            "img_per_s": self.imgs / dt if dt > 0 else None,
            "skipped": skipped,
            "time": time.time(),
        }


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One training run (new or resumed) of this rank: ``Trainer(args, build_fn, info).run()``.

    The constructor sets everything up (settings, data, model, initialisation or resume,
    optimiser, EMA, run.json); :meth:`train_step` is one iteration, :meth:`evaluate_ema` the
    test evaluation, :meth:`write_checkpoint` a checkpoint and :meth:`run` the loop.
    """

    def __init__(self, args: TrainArgs, build_fn=default_build, info: DistInfo | None = None):
        check_init_batch_size(args.init_batch_size)
        self.info = info = info or DistInfo()
        self.device = training_device(args.device, info)
        self.run_dir = args.out or default_run_dir(args.config)
        self.resumed_from = checkpoint_to_resume(self.run_dir, args.resume)
        ck = load_checkpoint(self.resumed_from) if args.resume else None
        self.args = args if ck is None else args_for_resume(args, ck)
        self.settings = (
            settings_from_args(args) if ck is None else settings_from_checkpoint(ck, args, info)
        )
        self._load_data(ck)
        self._build_model(build_fn)
        if ck is None:
            self._initialize()
        else:
            self._restore(ck)
        self._write_run_description()
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        self.objective = training_objective(self.model, self.args, info, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grad_clip = self.settings.recipe.get("grad_clip") or 0.0
        self.bad_streak, self.last_ckpt, self.bar, self.window = 0, self.resumed_from, None, None

    # --------------------------------------------------------------------- setup

    def _load_data(self, ck: dict | None) -> None:
        """Training and test splits, this rank's batch stream and the run's length."""
        s = self.settings
        set_threads(self.args.num_threads, s.data_name, self.args.device)
        self.train_data = load_dataset(
            s.data_name, "train", s.data_dir, flip=bool(s.recipe["flip"])
        )
        self.test_data = load_dataset(s.data_name, "test", s.data_dir)
        self.stream = BatchStream(
            self.train_data,
            int(s.recipe["batch_size"]),
            seed=s.seed,
            rank=self.info.rank,
            world_size=self.info.world_size,
        )
        self.total_steps = total_steps_of(self.args, self.stream, ck, s.recipe)

    def _build_model(self, build_fn) -> None:
        """The model (built identically on every rank, from the seed) and its optimiser."""
        recipe = self.settings.recipe
        torch.manual_seed(self.settings.seed)
        self.model = model = build_fn(self.settings.spec).to(self.device)
        if self.args.channels_last:  # before the optimizer and EMA see the parameters
            model.to(memory_format=torch.channels_last)
        if self.args.activation_checkpointing:
            enable_activation_checkpointing(model)
        check_model_fits_data(model, self.settings, self.train_data)
        self.dims = math.prod(self.train_data.shape)
        self.opt = torch.optim.Adam(
            model.parameters(), lr=learning_rate(1, recipe), betas=tuple(recipe["betas"])
        )

    def _initialize(self) -> None:
        """A new run: data-dependent initialisation on rank 0 (broadcast to the others),
        a fresh EMA, step 0, and the training noise seeded per rank."""
        args, info, seed = self.args, self.info, self.settings.seed
        self.model.train()
        if info.main:
            x0 = init_batch(self.train_data, args.init_batch_size, seed).to(self.device)
            scheme = {} if args.init_scheme is None else {"scheme": args.init_scheme}
            with torch.no_grad():
                self.model.initialize(x0, **scheme)
        if info.enabled:
            _broadcast_module(self.model)
        self.ema = EMA(self.model, self.settings.recipe["ema_decay"])
        self.step, self.skipped = 0, 0
        seed_everything(seed * 7919 + 1 + info.rank)  # training noise, distinct per rank

    def _restore(self, ck: dict) -> None:
        """A resumed run: weights, EMA, optimiser, data position, counters and RNG states."""
        self.model.load_state_dict(ck["model"])
        self.ema = EMA(self.model, self.settings.recipe["ema_decay"])
        self.ema.load_state_dict(ck["ema"])
        self.opt.load_state_dict(ck["optimizer"])
        self.stream.load_state_dict(ck["data_position"])
        self.step, self.skipped = int(ck["step"]), int(ck.get("skipped", 0))
        self._restore_rng_states(ck["rng"])
        _log(f"resumed {self.run_dir} from {self.resumed_from} at step {self.step}", self.info)

    def _restore_rng_states(self, rngs: list) -> None:
        """This rank's RNG states from the checkpoint; reseeded (with a warning) if the
        checkpoint was written by a different number of ranks."""
        info = self.info
        if len(rngs) == info.world_size and rngs[info.rank] is not None:
            set_rng_state(rngs[info.rank], self.device)
            return
        _log(
            f"warning: checkpoint holds RNG states for {len(rngs)} rank(s), running on "
            f"{info.world_size}; reseeding",
            info,
        )
        seed_everything(self.settings.seed * 7919 + self.step * 31 + info.rank)

    def _write_run_description(self) -> None:
        """run.json: spec, recipe, data, seed, length, world size and arguments (rank 0)."""
        if not self.info.main:
            return
        s = self.settings
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "run.json"), "w") as f:
            json.dump(
                {
                    "model_spec": s.spec,
                    "recipe": _plain(s.recipe),
                    "data": s.data_name,
                    "data_dir": s.data_dir,
                    "seed": s.seed,
                    "total_steps": self.total_steps,
                    "world_size": self.info.world_size,
                    "args": _plain(dataclasses.asdict(self.args)),
                },
                f,
                indent=2,
            )

    # --------------------------------------------------------------------- one step

    def train_step(self) -> float:
        """One iteration: set the learning rate, take the next batch, backpropagate the loss,
        clip the gradient and update (or skip a non-finite iteration). Returns the lr."""
        lr = learning_rate(self.step + 1, self.settings.recipe)
        for g in self.opt.param_groups:
            g["lr"] = lr
        bpd, finite = self._backward(self.stream.next().to(self.device))
        gnorm = self._gradient_norm()
        ok = finite and math.isfinite(gnorm)
        self._update_or_skip(ok)
        self.step += 1
        self.window.add(bpd, gnorm, ok, self.stream.batch_size)
        if not ok:
            self._record_skip(bpd, gnorm)
        return lr

    def _backward(self, x: torch.Tensor) -> tuple[float, bool]:
        """Backpropagate the loss (bits/dim) of batch ``x``; returns the loss (the mean over
        ranks) and whether it was finite on every rank."""
        self.model.train()
        elbo = self.objective(x)
        loss = -elbo.mean() / (self.dims * LN2)  # bits/dim
        loss.backward()
        lval = loss.detach().double()
        stats = torch.stack([lval, (~torch.isfinite(lval)).double()])  # on the device
        if self.info.enabled:
            dist.all_reduce(stats)  # (nccl needs device tensors) sum over ranks
            stats[0] /= self.info.world_size  # mean bpd; stats[1] > 0: any rank non-finite
        stats = stats.cpu()
        return stats[0].item(), stats[1].item() == 0

    def _gradient_norm(self) -> float:
        """The global gradient norm, before clipping (clips it when the recipe says so)."""
        if self.grad_clip:
            return torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip).item()
        return torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.params if p.grad is not None])
        ).item()

    def _update_or_skip(self, ok: bool) -> None:
        """Apply the optimiser and EMA updates if ``ok``, else count a skipped iteration."""
        if ok:
            self.opt.step()
            self.ema.update(self.model)
            self.bad_streak = 0
        else:
            self.bad_streak += 1
            self.skipped += 1
        self.opt.zero_grad(set_to_none=True)

    def _record_skip(self, bpd: float, gnorm: float) -> None:
        """A "skip" row; NonFiniteError after ``max_bad_steps`` skips in a row."""
        self._write_metrics(
            {
                "kind": "skip",
                "step": self.step,
                "loss": bpd,
                "grad_norm": gnorm,
                "streak": self.bad_streak,
                "skipped": self.skipped,
            }
        )
        if self.bad_streak >= self.args.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_streak} consecutive steps with a non-finite loss or gradient "
                f"(last at step {self.step}); stopping. The last good checkpoint is "
                f"{self.last_ckpt or '(none written yet)'}"
            )

    # --------------------------------------------------------------------- metrics

    def _write_metrics(self, row: dict) -> None:
        """Append a row to metrics.jsonl (rank 0)."""
        if self.info.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _log_training(self, lr: float) -> None:
        """Write the "train" row of the iterations since the last one and start a new window."""
        row = self.window.row(self.step, self.stream.epoch, lr, self.skipped)
        self._write_metrics(row)
        if self.bar is not None:
            self.bar.set_postfix(
                bpd=f"{row['train_bpd']:.3f}" if self.window.n else "nan",
                lr=f"{lr:.2e}",
                img_s=f"{row['img_per_s']:.0f}",
                skip=self.skipped,
            )
        self.window = TrainWindow()

    # --------------------------------------------------------------------- evaluation

    def ema_model(self) -> nn.Module:
        """A copy of the model holding the EMA weights."""
        return self.ema.copy_to(copy.deepcopy(self.model))

    def evaluate_ema(self, final: bool = False) -> dict:
        """Test ELBO of the EMA weights (periodic: on ``eval_images`` images; final: on the
        whole split, with the importance-weighted bound), an "eval" row and a sample grid."""
        args, model = self.args, self.ema_model()
        res = evaluate(
            model,
            self.test_data,
            batch_size=args.eval_batch_size,
            samples=args.iw_samples if final else 0,
            device=self.device,
            seed=self.settings.seed,
            max_images=None if final else args.eval_images,
            progress=final and args.progress,
            desc="test (IW)",
        )
        self._write_metrics({"kind": "eval", "step": self.step, "final": final, **res})
        if self.info.main and args.n_samples:
            self._save_samples(model, final)
        return res

    def _save_samples(self, model: nn.Module, final: bool) -> None:
        """A grid of ``n_samples`` samples: samples.png at the end, else samples-<step>.png."""
        x = draw_samples(model, self.args.n_samples, seed=self.settings.seed, device=self.device)
        name = "samples.png" if final else f"samples-{self.step:08d}.png"
        save_grid(
            x,
            self.train_data.n_bins,
            os.path.join(self.run_dir, name),
            title=f"{self.settings.spec['name']} step {self.step} (EMA)",
        )

    def _periodic_eval(self) -> None:
        res = self.evaluate_ema()
        if self.bar is not None:
            self.bar.write(
                f"step {self.step}: test ELBO {res['elbo_bpd']:.4f} bits/dim (EMA, "
                f"{res['n']} images)"
            )

    # --------------------------------------------------------------------- checkpoints

    def write_checkpoint(self, reason: str, collective: bool = True) -> str | None:
        """Write ``ckpt-<step>.pt`` (rank 0; returns its path, None on other ranks). With
        ``collective``, every rank must call it: rank 0 gathers all the RNG states."""
        rngs = self._rng_states(collective)
        if not self.info.main:
            return None
        state = self._checkpoint_state(reason, rngs)
        return save_checkpoint(state, self.run_dir, self.step, keep=self.args.keep)

    def _rng_states(self, collective: bool) -> list:
        """The RNG states of every rank (gathered), or rank 0's alone (``collective=False``)."""
        rng = get_rng_state(self.device)
        if self.info.enabled and collective:
            rngs = [None] * self.info.world_size
            dist.all_gather_object(rngs, rng)
            return rngs
        return [rng] + [None] * (self.info.world_size - 1)

    def _checkpoint_state(self, reason: str, rngs: list) -> dict:
        s = self.settings
        return {
            "format": 1,
            "reason": reason,
            "step": self.step,
            "total_steps": self.total_steps,
            "skipped": self.skipped,
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.opt.state_dict(),
            "data_position": self.stream.state_dict(),
            "rng": rngs,
            "model_spec": s.spec,
            "recipe": _plain(s.recipe),
            "seed": s.seed,
            "data": s.data_name,
            "data_dir": s.data_dir,
            "world_size": self.info.world_size,
            "args": _plain(dataclasses.asdict(self.args)),
        }

    # --------------------------------------------------------------------- the loop

    def run(self) -> TrainResult:
        """Train to ``total_steps`` with the periodic logs, evaluations and checkpoints,
        then write the final checkpoint and evaluation. Ctrl-C writes a checkpoint."""
        self._open_progress_bar()
        self.window = TrainWindow()
        try:
            while self.step < self.total_steps:
                lr = self.train_step()
                self._after_step(lr)
        except KeyboardInterrupt:
            self._checkpoint_on_interrupt()
            raise
        finally:
            self._close_progress_bar()
        return self._finish()

    def _due(self, every: int) -> bool:
        """Whether a periodic action every ``every`` steps (0 = never) is due before the end."""
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _after_step(self, lr: float) -> None:
        """Logs, progress, periodic evaluation and checkpoint after an iteration."""
        if self.step % self.args.log_every == 0 or self.step == self.total_steps:
            self._log_training(lr)
        if self.bar is not None:
            self.bar.update(1)
        if self._due(self.args.eval_every):
            self._periodic_eval()
        if self._due(self.args.ckpt_every) and self.bad_streak == 0:
            self.last_ckpt = self.write_checkpoint("periodic") or self.last_ckpt

    def _checkpoint_on_interrupt(self) -> None:
        self._close_progress_bar()
        path = self.write_checkpoint("interrupt", collective=False)
        _log(
            f"\ninterrupted at step {self.step}; checkpoint written to {path}; continue with "
            f"--resume --out {self.run_dir}",
            self.info,
        )

    def _finish(self) -> TrainResult:
        """The final checkpoint, the final evaluation and loss curve (if asked for)."""
        self.last_ckpt = self.write_checkpoint("final") or self.last_ckpt
        final = None
        if self.args.final_eval:
            final = self.evaluate_ema(final=True)
            if self.info.main:
                plot_loss_curve(
                    self.metrics_path,
                    os.path.join(self.run_dir, "loss.png"),
                    title=f"{self.settings.spec['name']} on {self.settings.data_name}",
                )
        return TrainResult(
            self.run_dir, self.step, self.model, self.ema, final, self.skipped, self.last_ckpt
        )

    def _open_progress_bar(self) -> None:
        if self.info.main and self.args.progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    def _close_progress_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

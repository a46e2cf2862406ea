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
}


def get_recipe(config: str, **overrides) -> dict:
    """The recipe of ``config`` (its own entry, else that of its family, e.g. a
    "vflow-cifar10-4m" gets "vflow-cifar10"'s, else the default), with ``overrides``
    (``None`` values ignored) applied on top."""
    base = dict(DEFAULT_RECIPE)
    if config in RECIPES:
        base.update(RECIPES[config])
    else:
        for data in ("cifar10", "imagenet32", "imagenet64", "digits"):
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
    check_init_batch_size(args.init_batch_size)
    device = torch.device(args.device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    run_dir = args.out or default_run_dir(args.config)
    ckpt_path = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if args.resume and ckpt_path is None:
        raise FileNotFoundError(f"--resume: no checkpoint (ckpt-*.pt) in {run_dir}")
    if not args.resume and ckpt_path is not None:
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; pass --resume to continue "
            f"it or choose another --out"
        )
    ck = load_checkpoint(ckpt_path) if args.resume else None

    if ck is not None:
        spec = dict(ck["model_spec"])
        if args.backend != "auto":
            spec["backend"] = args.backend
        recipe = dict(ck["recipe"])
        recipe["betas"] = tuple(recipe["betas"])
        given = [
            k
            for k in ("lr", "warmup", "batch_size", "ema_decay", "grad_clip", "flip")
            if getattr(args, k) is not None
        ]
        if given:
            _log(f"note: resuming with the checkpoint's recipe; ignoring {', '.join(given)}", info)
        seed, data_name = int(ck["seed"]), ck["data"]
        data_dir = args.data_dir or ck.get("data_dir")
    else:
        spec = {
            "name": args.config,
            "overrides": _plain(dict(args.overrides)),
            "backend": args.backend,
        }
        recipe = args.recipe()
        seed = args.seed
        data_name = args.data or default_dataset_for(args.config)
        data_dir = args.data_dir

    set_threads(args.num_threads, data_name, args.device)
    train_data = load_dataset(data_name, "train", data_dir, flip=bool(recipe["flip"]))
    test_data = load_dataset(data_name, "test", data_dir)
    stream = BatchStream(
        train_data, int(recipe["batch_size"]), seed=seed, rank=info.rank, world_size=info.world_size
    )
    if args.steps is not None:
        total_steps = int(args.steps)
    elif args.epochs is not None:
        total_steps = int(args.epochs) * stream.batches_per_epoch
    elif ck is not None:
        total_steps = int(ck["total_steps"])
    else:
        total_steps = int(recipe["steps"])

    torch.manual_seed(seed)  # identical construction on every rank
    model = build_fn(spec).to(device)
    if args.channels_last:  # before the optimizer and EMA see the parameters
        model.to(memory_format=torch.channels_last)
    shape, n_bins = model_cfg(model, "data_shape"), model_cfg(model, "n_bins")
    if shape is not None and tuple(shape) != tuple(train_data.shape):
        raise ValueError(
            f"config {spec['name']} models images of shape {tuple(shape)} but "
            f"dataset {data_name} has {tuple(train_data.shape)}"
        )
    if n_bins is not None and int(n_bins) != train_data.n_bins:
        raise ValueError(
            f"config {spec['name']} has n_bins={n_bins} but dataset {data_name} "
            f"has {train_data.n_bins} levels"
        )
    dims = math.prod(train_data.shape)

    opt = torch.optim.Adam(
        model.parameters(), lr=learning_rate(1, recipe), betas=tuple(recipe["betas"])
    )
    if ck is not None:
        model.load_state_dict(ck["model"])
        ema = EMA(model, recipe["ema_decay"])
        ema.load_state_dict(ck["ema"])
        opt.load_state_dict(ck["optimizer"])
        stream.load_state_dict(ck["data_position"])
        step, skipped = int(ck["step"]), int(ck.get("skipped", 0))
        rngs = ck["rng"]
        if len(rngs) == info.world_size and rngs[info.rank] is not None:
            set_rng_state(rngs[info.rank], device)
        else:
            _log(
                f"warning: checkpoint holds RNG states for {len(rngs)} rank(s), running on "
                f"{info.world_size}; reseeding",
                info,
            )
            seed_everything(seed * 7919 + step * 31 + info.rank)
        _log(f"resumed {run_dir} from {ckpt_path} at step {step}", info)
    else:
        model.train()
        if info.main:
            x0 = init_batch(train_data, args.init_batch_size, seed).to(device)
            scheme = {} if args.init_scheme is None else {"scheme": args.init_scheme}
            with torch.no_grad():
                model.initialize(x0, **scheme)
        if info.enabled:
            _broadcast_module(model)
        ema = EMA(model, recipe["ema_decay"])
        step, skipped = 0, 0
        seed_everything(seed * 7919 + 1 + info.rank)  # training noise, distinct per rank

    if info.main:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "run.json"), "w") as f:
            json.dump(
                {
                    "model_spec": spec,
                    "recipe": _plain(recipe),
                    "data": data_name,
                    "data_dir": data_dir,
                    "seed": seed,
                    "total_steps": total_steps,
                    "world_size": info.world_size,
                    "args": _plain(dataclasses.asdict(args)),
                },
                f,
                indent=2,
            )
    metrics_path = os.path.join(run_dir, "metrics.jsonl")

    objective = _ElboObjective(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        objective = compile_objective(objective, device)  # compiles on the first step
    params = [p for p in model.parameters() if p.requires_grad]
    grad_clip = recipe.get("grad_clip") or 0.0

    def write_metrics(row: dict) -> None:
        if info.main:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint(reason: str, collective: bool = True) -> str | None:
        rng = get_rng_state(device)
        if info.enabled and collective:
            rngs = [None] * info.world_size
            dist.all_gather_object(rngs, rng)
        else:
            rngs = [rng] + [None] * (info.world_size - 1)
        if not info.main:
            return None
        state = {
            "format": 1,
            "reason": reason,
            "step": step,
            "total_steps": total_steps,
            "skipped": skipped,
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "data_position": stream.state_dict(),
            "rng": rngs,
            "model_spec": spec,
            "recipe": _plain(recipe),
            "seed": seed,
            "data": data_name,
            "data_dir": data_dir,
            "world_size": info.world_size,
            "args": _plain(dataclasses.asdict(args)),
        }
        return save_checkpoint(state, run_dir, step, keep=args.keep)

    def ema_model() -> nn.Module:
        m = copy.deepcopy(model)
        ema.copy_to(m)
        return m

    def periodic_eval(final: bool = False) -> dict:
        m = ema_model()
        res = evaluate(
            m,
            test_data,
            batch_size=args.eval_batch_size,
            samples=args.iw_samples if final else 0,
            device=device,
            seed=seed,
            max_images=None if final else args.eval_images,
            progress=final and args.progress,
            desc="test (IW)",
        )
        write_metrics({"kind": "eval", "step": step, "final": final, **res})
        if info.main and args.n_samples:
            x = draw_samples(m, args.n_samples, seed=seed, device=device)
            name = "samples.png" if final else f"samples-{step:08d}.png"
            save_grid(
                x,
                train_data.n_bins,
                os.path.join(run_dir, name),
                title=f"{spec['name']} step {step} (EMA)",
            )
        return res

    bar = None
    if info.main and args.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", dynamic_ncols=True)
    bad_streak = 0
    acc = {"bpd": 0.0, "n": 0, "gnorm": 0.0, "t0": time.perf_counter(), "imgs": 0}
    last_ckpt = ckpt_path
    final = None
    try:
        while step < total_steps:
            lr = learning_rate(step + 1, recipe)
            for g in opt.param_groups:
                g["lr"] = lr
            x = stream.next().to(device)
            model.train()
            elbo = objective(x)
            loss = -elbo.mean() / (dims * LN2)  # bits/dim
            loss.backward()
            lval = loss.detach().double()
            stats = torch.stack([lval, (~torch.isfinite(lval)).double()])  # on the device
            if info.enabled:
                dist.all_reduce(stats)  # (nccl needs device tensors) sum over ranks
                stats[0] /= info.world_size  # mean bpd; stats[1] > 0: any rank non-finite
            stats = stats.cpu()
            if grad_clip:
                gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
            else:
                gnorm = torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params if p.grad is not None])
                ).item()
            ok = stats[1].item() == 0 and math.isfinite(gnorm)
            if ok:
                opt.step()
                ema.update(model)
                bad_streak = 0
            else:
                bad_streak += 1
                skipped += 1
            opt.zero_grad(set_to_none=True)
            step += 1
            if ok:
                acc["bpd"] += stats[0].item()
                acc["gnorm"] += gnorm
                acc["n"] += 1
            acc["imgs"] += stream.batch_size
            if not ok:
                write_metrics(
                    {
                        "kind": "skip",
                        "step": step,
                        "loss": stats[0].item(),
                        "grad_norm": gnorm,
                        "streak": bad_streak,
                        "skipped": skipped,
                    }
                )
                if bad_streak >= args.max_bad_steps:
                    raise NonFiniteError(
                        f"{bad_streak} consecutive steps with a non-finite loss or gradient "
                        f"(last at step {step}); stopping. The last good checkpoint is "
                        f"{last_ckpt or '(none written yet)'}"
                    )
            if step % args.log_every == 0 or step == total_steps:
                dt = time.perf_counter() - acc["t0"]
                row = {
                    "kind": "train",
                    "step": step,
                    "epoch": stream.epoch,
                    "lr": lr,
                    "train_bpd": acc["bpd"] / acc["n"] if acc["n"] else None,
                    "grad_norm": acc["gnorm"] / acc["n"] if acc["n"] else None,
                    "img_per_s": acc["imgs"] / dt if dt > 0 else None,
                    "skipped": skipped,
                    "time": time.time(),
                }
                write_metrics(row)
                if bar is not None:
                    bar.set_postfix(
                        bpd=f"{row['train_bpd']:.3f}" if acc["n"] else "nan",
                        lr=f"{lr:.2e}",
                        img_s=f"{row['img_per_s']:.0f}",
                        skip=skipped,
                    )
                acc = {"bpd": 0.0, "n": 0, "gnorm": 0.0, "t0": time.perf_counter(), "imgs": 0}
            if bar is not None:
                bar.update(1)
            if args.eval_every and step % args.eval_every == 0 and step < total_steps:
                res = periodic_eval()
                if bar is not None:
                    bar.write(
                        f"step {step}: test ELBO {res['elbo_bpd']:.4f} bits/dim (EMA, "
                        f"{res['n']} images)"
                    )
            if (
                args.ckpt_every
                and step % args.ckpt_every == 0
                and bad_streak == 0
                and step < total_steps
            ):
                last_ckpt = checkpoint("periodic") or last_ckpt
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        path = checkpoint("interrupt", collective=False)
        _log(
            f"\ninterrupted at step {step}; checkpoint written to {path}; continue with "
            f"--resume --out {run_dir}",
            info,
        )
        raise
    finally:
        if bar is not None:
            bar.close()
    last_ckpt = checkpoint("final") or last_ckpt
    if args.final_eval:
        final = periodic_eval(final=True)
        if info.main:
            plot_loss_curve(
                metrics_path,
                os.path.join(run_dir, "loss.png"),
                title=f"{spec['name']} on {data_name}",
            )
    return TrainResult(run_dir, step, model, ema, final, skipped, last_ckpt)

"""Training: the official Flow++/VFlow recipe, EMA, checkpoints, exact resume and DDP.

Recipe (per config, :mod:`vflow.recipe`): Adam with linear warm-up and exponential decay,
global gradient-norm clipping at ``grad_clip`` (1.0), an EMA of the weights (``ema_decay``)
used for evaluation and sampling, and data-dependent initialisation (``model.initialize``)
before the optimiser starts, from its own init batch (:func:`init_batch`):
``init_batch_size`` (default 128, capped at the training-set size) distinct training images
drawn with the run's seed, independently of ``batch_size``, as the official code does
(CIFAR-10: 128 init images, batch 64). ``init_scheme`` selects the model's scheme
("official" or "actnorm"; None = the model's default). Resume does not re-initialise. The
loss is the mean negative ELBO in bits per dimension.

Steps. ``step`` counts training iterations (batches consumed); the iteration that makes
update ``step + 1`` uses ``learning_rate(step + 1)``. One iteration (:mod:`vflow.step`) reads
no tensor value on the host: its loss, gradient norm and finite flag stay on the device, an
iteration whose loss or gradient is not finite is skipped there (no update, no EMA update;
the batch is consumed), and the trainer reads the iterations' metrics once per logging
window (``log_every``), where it writes the "train" row and a "skip" row per skipped
iteration of metrics.jsonl; ``max_bad_steps`` consecutive skips stop training with
:class:`NonFiniteError` at that read and leave the last checkpoint untouched. On a GPU the
batch is copied from pinned memory without blocking, so the host prepares the next batch
while the device computes; ``cuda_graphs`` (``vflow train --cuda-graphs``) captures the
whole iteration once and replays it as a CUDA graph (:class:`vflow.step.GraphedStep`).

Checkpoints (:mod:`vflow.checkpoints`; ``ckpt-<step>.pt`` in the run directory, atomic, the
last ``keep`` kept) hold the model and EMA weights, the optimiser state, the step, the data
position ``(epoch, index)``, the RNG states of every rank, the model spec, the recipe and the
arguments. ``resume=True`` continues from the newest checkpoint that loads (an unreadable
newer one is renamed ``*.unreadable`` and reported) so that the following steps are
bit-identical to an uninterrupted run; options that contradict the checkpoint's settings
(config, data, seed, model overrides, recipe values such as the batch size) are refused.
SIGINT and SIGTERM are deferred to the end of the iteration (:mod:`vflow.interrupts`),
which writes a consistent checkpoint there and stops with exit code 130 / 143; SIGUSR1
writes a checkpoint and goes on.

Distributed. Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised from
the environment (gloo on CPU, nccl on CUDA), the model is wrapped in
``DistributedDataParallel``, and ``batch_size`` is the GLOBAL batch: each of the N ranks
takes ``batch_size / N`` images of every global batch. Rank 0 alone initialises the model
and broadcasts the weights and buffers; rank 0 alone writes logs, checkpoints and images.
The ranks agree on stop requests once per logging window.

Memory. ``activation_checkpointing`` calls ``model.set_activation_checkpointing(True)``
(same losses, less memory, more time); a resumed run keeps it on.

Structure. :func:`train` runs a :class:`Trainer`: its constructor is the setup (settings
from the arguments or the checkpoint, data, model, initialisation or resume, EMA, the step),
:meth:`Trainer.train_step` one iteration, :meth:`Trainer.evaluate_ema` the evaluation,
:meth:`Trainer.write_checkpoint` a checkpoint and :meth:`Trainer.run` the loop.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .checkpoints import (  # noqa: F401  (re-exported: the trainer's public names)
    CheckpointError,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_loadable_checkpoint,
    save_checkpoint,
    seed_everything,
    set_rng_state,
)
from .compile import compile_mode, compile_options, compile_regions
from .data import BatchStream, _gen, default_dataset_for, load_dataset
from .distributed import (
    DistInfo,
    broadcast_module,
    init_distributed,
    shutdown_distributed,
)
from .evaluate import draw_samples, evaluate, model_cfg, plot_loss_curve, save_grid
from .interrupts import StopRequests, TrainingInterrupted
from .models import RECOMMENDED_INIT_BATCH
from .precision import autocast_networks, check_precision
from .recipe import DEFAULT_RECIPE, RECIPES, get_recipe, learning_rate  # noqa: F401
from .step import EMA, LN2, GraphedStep, StepHistory, TrainStep  # noqa: F401

DEFAULT_CONFIG = "vflow-digits"


# ----------------------------------------------------------------------------- arguments


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainArgs:
    """Everything a training run needs (the CLI fills it from its options). ``None`` means
    "not given": a new run takes the default, a resumed run its checkpoint's value."""

    config: str | None = None  # default: vflow-digits (a resumed run: the checkpoint's)
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
    device: str = "auto"  # "auto": cuda if a GPU is available, else cpu
    seed: int | None = None  # default 0
    resume: bool = False
    overrides: dict = field(default_factory=dict)  # model overrides for vflow.build
    # Run options: None = not given (a new run: RUN_OPTION_DEFAULTS; a resumed run: its own)
    log_every: int | None = None
    eval_every: int | None = None  # periodic test ELBO + sample grid (0 = only at the end)
    eval_images: int | None = 512  # images used by the periodic evaluation (None = all)
    eval_batch_size: int = 256
    ckpt_every: int | None = None
    keep: int | None = None  # checkpoints kept
    final_eval: bool | None = None  # test ELBO and IW bpd at the end
    iw_samples: int | None = None
    n_samples: int | None = None  # images in a sample grid
    max_bad_steps: int | None = None
    progress: bool = True
    num_threads: int | None = None
    init_batch_size: int | None = None  # images for model.initialize (None: 128 or fewer)
    init_scheme: str | None = None  # model.initialize scheme (None: the model's default)
    channels_last: bool | None = None  # channels_last weights and activations (CPU convs)
    compile: bool | str | None = None  # "regional" (True), "elbo" or "off" (False)
    activation_checkpointing: bool | None = None  # recompute the networks in backward
    precision: str | None = None  # "fp32" or "bf16-nets" (vflow.precision)
    cuda_graphs: bool = False  # capture the whole iteration as a CUDA graph (CUDA only)

    def recipe(self) -> dict:
        return get_recipe(
            self.config or DEFAULT_CONFIG,
            lr=self.lr,
            warmup=self.warmup,
            batch_size=self.batch_size,
            ema_decay=self.ema_decay,
            grad_clip=self.grad_clip,
            flip=self.flip,
        )


#: TrainArgs fields that are part of the recipe (a resumed run keeps its checkpoint's).
RECIPE_ARGS = ("lr", "warmup", "batch_size", "ema_decay", "grad_clip", "flip")

#: Run options and their defaults: a resumed run takes its checkpoint's values of those not
#: given again (so a preempted job that resumes keeps its checkpoint interval, logging,
#: evaluation, memory layout and compilation).
RUN_OPTION_DEFAULTS = {
    "log_every": 10,
    "eval_every": 500,
    "ckpt_every": 500,
    "keep": 3,
    "final_eval": True,
    "iw_samples": 16,
    "n_samples": 64,
    "max_bad_steps": 20,
    "channels_last": False,
    "compile": False,
    "activation_checkpointing": False,
    "precision": "fp32",
}

DEFAULT_INIT_BATCH_SIZE = RECOMMENDED_INIT_BATCH  # official Flow++ CIFAR-10: 128 at batch 64
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


def default_run_dir(config: str | None) -> str:
    return os.path.join("runs", f"{config or DEFAULT_CONFIG}-{time.strftime('%Y%m%d-%H%M%S')}")


def resolve_device(name: str) -> str:
    """``name``, with "auto" resolved to "cuda" when a GPU is available, else "cpu";
    ValueError for a name torch does not know or a CUDA device without CUDA."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return name


def set_threads(num_threads: int | None, data_name: str, device: str) -> None:
    """``torch.set_num_threads``: as given, else 1 for the tiny digits models on CPU (their
    ops are too small to split; measured ~10x less CPU time per step than with 2 threads on
    a busy 2-core machine), else torch's default."""
    if num_threads:
        torch.set_num_threads(num_threads)
    elif data_name == "digits" and not str(device).startswith("cuda"):
        torch.set_num_threads(1)


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


# ----------------------------------------------------------------------------- models


def default_build(spec: dict) -> nn.Module:
    """Build a model from a spec ``{"name", "overrides", "backend"}`` with ``vflow.build``."""
    from vflow.models import build

    return build(
        spec["name"], backend=spec.get("backend", "auto"), **dict(spec.get("overrides") or {})
    )


def model_from_checkpoint(
    path: str, ck: dict, use_ema: bool, backend: str | None, build_fn
) -> tuple[nn.Module, dict]:
    """``(model, ck)``: the model of checkpoint ``ck`` (read from ``path``) with its raw or
    EMA weights, built on ``backend`` (None: the checkpoint's); CheckpointError naming
    ``path`` for weights that do not fit the model."""
    spec = dict(ck["model_spec"])
    if backend is not None:
        spec["backend"] = backend
    model = build_fn(spec)
    load_model_state(model, ck["model"], path)
    if use_ema and ck.get("ema") is not None:
        model.load_state_dict({**ck["ema"]["buffers"], **ck["ema"]["params"]}, strict=False)
    return model, ck


def load_run_model(
    path: str,
    device: str | torch.device = "cpu",
    use_ema: bool = True,
    backend: str | None = None,
    build_fn: Callable[[dict], nn.Module] = default_build,
) -> tuple[nn.Module, dict]:
    """The model of a run and its checkpoint: ``path`` is a run directory (its newest
    readable checkpoint; a newer one that cannot be read is passed over with a warning on
    stderr) or a checkpoint file. EMA weights unless ``use_ema=False``; built with the
    checkpoint's backend unless ``backend`` is given; on ``device`` ("auto": CUDA when
    available), in eval mode. FileNotFoundError for a path that is neither."""

    model_of = functools.partial(
        model_from_checkpoint, use_ema=use_ema, backend=backend, build_fn=build_fn
    )
    if os.path.isdir(path):
        found, (model, ck), passed_over = newest_loadable_checkpoint(path, use=model_of)
        for _bad, reason in passed_over:
            print(f"warning: {reason}; using {found}", file=sys.stderr, flush=True)
    elif os.path.isfile(path):
        model, ck = model_of(path, load_checkpoint(path))
    else:
        raise FileNotFoundError(f"no run directory or checkpoint file at {path}")
    model.to(resolve_device(str(device))).eval()
    return model, ck


class _ElboObjective(nn.Module):
    """``forward(x) = model.elbo(x)``, so that DistributedDataParallel sees a forward call.
    Passes ``validate=False`` to models whose ``elbo`` takes it: the training batches were
    checked when the dataset was loaded, and the model's range check reads the batch on
    the host."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        takes = "validate" in inspect.signature(model.elbo).parameters
        self.elbo_options = {"validate": False} if takes else {}

    def forward(self, x):
        return self.model.elbo(x, **self.elbo_options)


def compile_objective(fn, device: torch.device | str):
    """``torch.compile`` of a whole training objective, what ``vflow train --compile elbo``
    does (on CPU with inductor's C++ wrapper, :func:`vflow.compile.compile_options`).
    Compilation happens on the first call."""
    return torch.compile(fn, options=compile_options(device))


def training_objective(model: nn.Module, args: TrainArgs, info: DistInfo, device) -> nn.Module:
    """``x -> model.elbo(x)`` as a module, wrapped in DistributedDataParallel under DDP and
    compiled with ``--compile`` (on the first step): "regional" compiles the model's
    repeated network blocks in place (:func:`vflow.compile.compile_regions`), "elbo" the
    whole objective."""
    mode = compile_mode(args.compile)
    if mode == "regional":
        compile_regions(model, device)
    objective = _ElboObjective(model)
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        objective = DDP(objective, device_ids=[device.index] if device.type == "cuda" else None)
    if mode == "elbo":
        objective = compile_objective(objective, device)
    return objective


def enable_activation_checkpointing(model: nn.Module) -> None:
    """``model.set_activation_checkpointing(True)``; ValueError for a model without it."""
    if not callable(getattr(model, "set_activation_checkpointing", None)):
        raise ValueError(
            f"activation_checkpointing: model {type(model).__name__} has no "
            f"set_activation_checkpointing"
        )
    model.set_activation_checkpointing(True)


def enable_bf16_networks(model: nn.Module) -> None:
    """bf16 autocast of the model's networks in training steps
    (:func:`vflow.precision.autocast_networks`); ValueError for a model without any."""
    if not autocast_networks(model):
        raise ValueError(
            f"precision bf16-nets: model {type(model).__name__} has no conditioning or "
            f"context networks to run in bf16"
        )


# ----------------------------------------------------------------------------- run settings


@dataclass
class RunSettings:
    """What a run keeps from start to end: the model spec, the recipe, the seed and the data.
    A new run takes them from its arguments, a resumed one from its checkpoint."""

    spec: dict
    recipe: dict
    seed: int
    data_name: str
    data_dir: str | None


def training_device(name: str, info: DistInfo) -> torch.device:
    """The device of this rank: ``name``, on the local rank's GPU when DDP runs on CUDA."""
    device = torch.device(name)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
    return device


def checkpoint_to_resume(run_dir: str, resume: bool, info: DistInfo) -> tuple[str, dict] | None:
    """``(path, checkpoint)`` of the newest readable checkpoint of ``run_dir`` when resuming
    (else None). Newer checkpoints that cannot be read are renamed ``<name>.unreadable``
    (rank 0) so that they neither shadow the one resumed from nor get pruned in its place,
    and reported. Refuses to resume a run without checkpoints (FileNotFoundError) and to
    start over one (FileExistsError)."""
    path = latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    if not resume:
        if path is not None:
            raise FileExistsError(
                f"{run_dir} already holds checkpoints; pass --resume to continue "
                f"it or choose another --out"
            )
        return None
    if path is None:
        raise FileNotFoundError(f"--resume: no checkpoint (ckpt-*.pt) in {run_dir}")
    path, ck, passed_over = newest_loadable_checkpoint(run_dir)
    for bad, reason in passed_over:
        _log(f"warning: {reason}; resuming from {path} instead", info)
        if info.main:
            os.replace(bad, bad + ".unreadable")
    return path, ck


def check_resume_options(args: TrainArgs, ck: dict, info: DistInfo) -> None:
    """ValueError listing every given option that contradicts the checkpoint's settings
    (config, data, seed, model overrides, recipe values); equal values are accepted, and
    so are overrides that give a config field the value it has. The initialisation
    options do not apply to a resumed run (a note says so)."""
    spec, recipe = ck["model_spec"], ck["recipe"]
    saved_overrides = _plain(spec.get("overrides") or {})
    given = {
        "--config": (args.config, spec["name"]),
        "--data": (args.data, ck["data"]),
        "--seed": (args.seed, ck["seed"]),
    }
    if args.overrides and not _same_model(spec["name"], args.overrides, saved_overrides):
        given["--set"] = (_plain(args.overrides), saved_overrides)
    for key in RECIPE_ARGS:
        given["--" + key.replace("_", "-")] = (getattr(args, key), recipe.get(key))
    conflicts = [
        f"{option} {new!r} (the run has {old!r})"
        for option, (new, old) in given.items()
        if new is not None and not _same_setting(new, old)
    ]
    if conflicts:
        raise ValueError(
            f"--resume: the options contradict the settings of the run in its checkpoint: "
            f"{'; '.join(conflicts)}. Omit them to continue the run, or start a new run "
            f"with another --out"
        )
    ignored = [
        o
        for o, v in (
            ("--init-batch-size", args.init_batch_size),
            ("--init-scheme", args.init_scheme),
        )
        if v is not None
    ]
    if ignored:
        _log(f"note: {', '.join(ignored)} ignored: a resumed run is initialised already", info)


def _same_model(name: str, overrides: dict, saved: dict) -> bool:
    """Whether config ``name`` with ``overrides`` is the model of ``saved`` overrides."""
    from .models import CONFIGS

    if name not in CONFIGS:
        return _plain(overrides) == saved
    try:
        return CONFIGS[name].with_overrides(**overrides) == CONFIGS[name].with_overrides(**saved)
    except (ValueError, TypeError):
        return False


def _same_setting(new, old) -> bool:
    if isinstance(new, (int, float)) and not isinstance(new, bool) and old is None:
        return new == 0  # grad_clip 0 and None both mean "off"
    return _plain(new) == _plain(old)


def args_for_resume(args: TrainArgs, ck: dict) -> TrainArgs:
    """``args`` with the checkpoint's values of the run options that were not given again
    (:data:`RUN_OPTION_DEFAULTS`; its defaults where an older checkpoint lacks one)."""
    saved = ck.get("args", {})
    changes = {
        k: saved[k] if saved.get(k) is not None else default
        for k, default in RUN_OPTION_DEFAULTS.items()
        if getattr(args, k) is None
    }
    return dataclasses.replace(args, **changes)


def args_for_new_run(args: TrainArgs) -> TrainArgs:
    """``args`` with the defaults of the options that were not given."""
    changes = {k: v for k, v in RUN_OPTION_DEFAULTS.items() if getattr(args, k) is None}
    changes.update(config=args.config or DEFAULT_CONFIG, seed=args.seed or 0)
    return dataclasses.replace(args, **changes)


def settings_from_args(args: TrainArgs) -> RunSettings:
    """The settings of a new run."""
    spec = {"name": args.config, "overrides": _plain(dict(args.overrides)), "backend": args.backend}
    data_name = args.data or default_dataset_for(args.config)
    return RunSettings(spec, args.recipe(), args.seed, data_name, args.data_dir)


def settings_from_checkpoint(ck: dict, args: TrainArgs) -> RunSettings:
    """The settings of a resumed run: the checkpoint's, except ``args.backend`` (unless
    "auto") and ``args.data_dir`` (if given)."""
    spec = dict(ck["model_spec"])
    if args.backend != "auto":
        spec["backend"] = args.backend
    recipe = dict(ck["recipe"])
    recipe["betas"] = tuple(recipe["betas"])
    data_dir = args.data_dir or ck.get("data_dir")
    return RunSettings(spec, recipe, int(ck["seed"]), ck["data"], data_dir)


def load_model_state(model: nn.Module, state: dict, path: str | None) -> None:
    """``model.load_state_dict(state)``; a checkpoint whose weights do not fit the model
    (missing or unexpected keys, other shapes) is a CheckpointError naming ``path``."""
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise CheckpointError(
            f"checkpoint {path}: its weights do not fit the model it describes ({detail[:300]})"
        ) from None


def keep_metrics_up_to(path: str, step: int | None) -> None:
    """Prepare metrics.jsonl for a run: a new run (``step`` None) starts an empty file; a
    resumed run keeps the rows up to its checkpoint's ``step`` (not a final evaluation),
    dropping those of iterations that the resume will run again."""
    if step is None or not os.path.isfile(path):
        open(path, "w").close()
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if _row_before(line, step)]
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _row_before(line: str, step: int) -> bool:
    try:
        row = json.loads(line)
    except ValueError:
        return False  # a line cut short by a crash
    return row.get("step", 0) <= step and not row.get("final")


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


def check_cuda_graphs(args: TrainArgs, device: torch.device, info: DistInfo) -> None:
    """ValueError unless CUDA graphs can run: a CUDA device, a single process."""
    if not args.cuda_graphs:
        return
    if device.type != "cuda":
        raise ValueError(
            f"--cuda-graphs needs a CUDA device; this run is on {device} (CUDA graphs "
            f"replay GPU work only)"
        )
    if info.enabled:
        raise ValueError("--cuda-graphs is not supported under torchrun (DDP) yet")
    if args.activation_checkpointing:
        raise ValueError(
            "--cuda-graphs cannot be combined with --activation-checkpointing: checkpointing "
            "saves and restores the CUDA RNG state in every step, which a graph capture "
            "cannot do"
        )


# ----------------------------------------------------------------------------- metrics


class TrainWindow:
    """Running sums of the training metrics since the last "train" row of metrics.jsonl
    (checkpointed, so that a run stopped inside a window logs the same rows on resume)."""

    def __init__(self):
        self.bpd, self.gnorm, self.n, self.imgs = 0.0, 0.0, 0, 0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.t0 = time.perf_counter()

    def state_dict(self) -> dict:
        return {"bpd": self.bpd, "gnorm": self.gnorm, "n": self.n, "imgs": self.imgs}

    def load_state_dict(self, state: dict | None) -> None:
        if state:  # checkpoints from before the window was saved start an empty one
            self.bpd, self.gnorm = float(state["bpd"]), float(state["gnorm"])
            self.n, self.imgs = int(state["n"]), int(state["imgs"])

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


@dataclass
class TrainResult:
    run_dir: str
    step: int
    model: nn.Module
    ema: EMA
    final: dict | None
    skipped: int
    checkpoint: str | None


def train(args: TrainArgs, build_fn: Callable[[dict], nn.Module] = default_build) -> TrainResult:
    """Train (or resume) a run; see the module docstring. Returns the final state."""
    args = dataclasses.replace(args, device=resolve_device(args.device))
    info = init_distributed(args.device)
    finished = False
    try:
        with StopRequests() as stops:  # SIGUSR1 is no longer fatal from here on
            result = Trainer(args, build_fn, info).run(stops)
        finished = True
        return result
    finally:
        shutdown_distributed(info, finished)


# ----------------------------------------------------------------------------- trainer


class Trainer:
    """One training run (new or resumed) of this rank: ``Trainer(args, build_fn, info).run()``.

    The constructor sets everything up (settings, data, model, initialisation or resume,
    EMA, the device-resident step, run.json); :meth:`train_step` is one iteration,
    :meth:`evaluate_ema` the test evaluation, :meth:`write_checkpoint` a checkpoint and
    :meth:`run` the loop.
    """

    def __init__(self, args: TrainArgs, build_fn=default_build, info: DistInfo | None = None):
        check_init_batch_size(args.init_batch_size)
        compile_mode(args.compile)  # ValueError for an unknown mode, before any work
        check_precision(args.precision)
        self.info = info = info or DistInfo()
        self.device = training_device(resolve_device(args.device), info)
        self.run_dir = args.out or default_run_dir(args.config)
        resumed = checkpoint_to_resume(self.run_dir, args.resume, info)
        self.resumed_from, ck = resumed if resumed else (None, None)
        if ck is None:
            self.args = args_for_new_run(args)
            self.settings = settings_from_args(self.args)
        else:
            check_resume_options(args, ck, info)
            self.args = args_for_resume(args, ck)
            self.settings = settings_from_checkpoint(ck, self.args)
        check_cuda_graphs(self.args, self.device, info)
        self.bad_streak, self.last_ckpt, self.bar = 0, self.resumed_from, None
        self.window = TrainWindow()
        self._load_data(ck)
        self._build_model(build_fn)
        if ck is None:
            self._initialize()
        else:
            load_model_state(self.model, ck["model"], self.resumed_from)
        self._build_step(ck)
        if ck is not None:
            self._restore(ck)
        self.metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if info.main:
            os.makedirs(self.run_dir, exist_ok=True)
            keep_metrics_up_to(self.metrics_path, None if ck is None else self.step)
        self._write_run_description()
        _log(
            f"training on {self.device} ({_device_name(self.device)}), backend "
            f"{_backend_of(self.model, self.device)}"
            + (", CUDA graphs" if self.args.cuda_graphs else ""),
            info,
        )

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
        if ck is not None and int(ck["step"]) >= self.total_steps:
            raise ValueError(
                f"--resume: {self.run_dir} is at step {ck['step']} already, and the run is "
                f"{self.total_steps} steps long; pass a larger --steps (or --epochs) to "
                f"train on, or use 'vflow eval' for its test numbers"
            )

    def _build_model(self, build_fn) -> None:
        """The model, built identically on every rank from the seed."""
        torch.manual_seed(self.settings.seed)
        self.model = model = build_fn(self.settings.spec).to(self.device)
        if self.args.channels_last:  # before the optimizer and EMA see the parameters
            model.to(memory_format=torch.channels_last)
        if self.args.activation_checkpointing:
            enable_activation_checkpointing(model)
        if self.args.precision == "bf16-nets":
            enable_bf16_networks(model)
        check_model_fits_data(model, self.settings, self.train_data)
        self.dims = math.prod(self.train_data.shape)

    def _initialize(self) -> None:
        """A new run: data-dependent initialisation on rank 0 (broadcast to the others),
        step 0, and the training noise seeded per rank."""
        args, info, seed = self.args, self.info, self.settings.seed
        self.model.train()
        if info.main:
            x0 = init_batch(self.train_data, args.init_batch_size, seed).to(self.device)
            scheme = {} if args.init_scheme is None else {"scheme": args.init_scheme}
            with torch.no_grad():
                self.model.initialize(x0, **scheme)
        if info.enabled:
            broadcast_module(self.model)
        self.step, self.skipped = 0, 0
        seed_everything(seed * 7919 + 1 + info.rank)  # training noise, distinct per rank

    def _build_step(self, ck: dict | None) -> None:
        """The EMA (from the checkpoint when resuming), the objective and the step."""
        self.ema = EMA(self.model, self.settings.recipe["ema_decay"])
        if ck is not None:
            self.ema.load_state_dict(ck["ema"])
        self.objective = training_objective(self.model, self.args, self.info, self.device)
        self.history = StepHistory(self.args.log_every, self.device)
        self.step_fn = TrainStep(
            self.objective,
            self.model,
            self.ema,
            self.settings.recipe,
            self.dims,
            self.history,
            world_size=self.info.world_size,
            capturable=self.args.cuda_graphs,
        )
        self.opt = self.step_fn.opt
        self.run_step = GraphedStep(self.step_fn) if self.args.cuda_graphs else self.step_fn

    def _restore(self, ck: dict) -> None:
        """A resumed run: optimiser, data position, counters and RNG states."""
        self.step_fn.load_optimizer_state(ck["optimizer"])
        self.stream.load_state_dict(ck["data_position"])
        self.step, self.skipped = int(ck["step"]), int(ck.get("skipped", 0))
        self.bad_streak = int(ck.get("bad_streak", 0))
        self.window.load_state_dict(ck.get("window"))
        self.step_fn.count.fill_(self.step)
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

    def train_step(self) -> None:
        """One iteration on the next batch (no host read of a tensor value)."""
        if self.history.pending == self.history.capacity:
            self._read_history()
        self.run_step(self._next_batch())
        self.step += 1

    def _next_batch(self) -> torch.Tensor:
        """This rank's next batch on the device; on CUDA copied from pinned memory without
        blocking the host."""
        x = self.stream.next()
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device)

    def _read_history(self) -> None:
        """Read the metrics of the iterations since the last read (one host read): add them
        to the window, write a "skip" row per skipped iteration, and raise NonFiniteError
        after ``max_bad_steps`` skips in a row."""
        rows = self.history.read()
        first = self.step - len(rows) + 1
        for i, (bpd, gnorm, ok) in enumerate(rows):
            self.window.add(bpd, gnorm, ok, self.stream.batch_size)
            if ok:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            self.skipped += 1
            self._record_skip(first + i, bpd, gnorm)

    def _record_skip(self, step: int, bpd: float, gnorm: float) -> None:
        """A "skip" row; NonFiniteError after ``max_bad_steps`` skips in a row."""
        self._write_metrics(
            {
                "kind": "skip",
                "step": step,
                "loss": bpd,
                "grad_norm": gnorm,
                "streak": self.bad_streak,
                "skipped": self.skipped,
            }
        )
        if self.bad_streak >= self.args.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_streak} consecutive steps with a non-finite loss or gradient "
                f"(last at step {step}); stopping. The last good checkpoint is "
                f"{self.last_ckpt or '(none written yet)'}"
            )

    # --------------------------------------------------------------------- metrics

    def _write_metrics(self, row: dict) -> None:
        """Append a row to metrics.jsonl (rank 0)."""
        if self.info.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def _log_training(self) -> None:
        """Write the "train" row of the iterations since the last one and start a new window."""
        self._read_history()
        lr = learning_rate(self.step, self.settings.recipe)
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
        whole split, with the importance-weighted bound) and an "eval" row."""
        args = self.args
        res = evaluate(
            self.ema_model(),
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
        return res

    def save_samples(self, final: bool) -> None:
        """A grid of ``n_samples`` samples of the EMA weights (rank 0): samples.png at the
        end, else samples-<step>.png."""
        if not (self.info.main and self.args.n_samples):
            return
        model = self.ema_model()
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
        self.save_samples(final=False)
        if self.bar is not None:
            self.bar.write(
                f"step {self.step}: test ELBO {res['elbo_bpd']:.4f} bits/dim (EMA, "
                f"{res['n']} images)"
            )

    # --------------------------------------------------------------------- checkpoints

    def write_checkpoint(self, reason: str, collective: bool = True) -> str | None:
        """Write ``ckpt-<step>.pt`` (rank 0; returns its path, None on other ranks) after
        reading the pending metrics. With ``collective``, every rank must call it: rank 0
        gathers all the RNG states."""
        self._read_history()
        rngs = self._rng_states(collective)
        if not self.info.main:
            return None
        state = self._checkpoint_state(reason, rngs)
        return save_checkpoint(state, self.run_dir, self.step, keep=self.args.keep)

    def _rng_states(self, collective: bool) -> list:
        """The RNG states of every rank (gathered), or rank 0's alone (``collective=False``)."""
        import torch.distributed as dist

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
            "bad_streak": self.bad_streak,
            "window": self.window.state_dict(),
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

    def run(self, stops: StopRequests | None = None) -> TrainResult:
        """Train to ``total_steps`` with the periodic logs, evaluations and checkpoints,
        then write the final checkpoint and evaluation. SIGINT / SIGTERM stop the loop at
        the end of an iteration with a checkpoint (:class:`TrainingInterrupted`);
        ``stops`` are the signal handlers in place (installed here if None)."""
        if stops is None:
            with StopRequests() as own:
                return self.run(own)
        self._open_progress_bar()
        self.window.restart_clock()
        try:
            stops.deferring = True
            while self.step < self.total_steps:
                self.train_step()
                self._after_step()
                self._handle_requests(stops)
        finally:
            stops.deferring = False
            self._close_progress_bar()
        return self._finish()

    def _due(self, every: int) -> bool:
        """Whether a periodic action every ``every`` steps (0 = never) is due before the end."""
        return bool(every) and self.step % every == 0 and self.step < self.total_steps

    def _after_step(self) -> None:
        """Logs, progress, periodic evaluation and checkpoint after an iteration."""
        if self.step % self.args.log_every == 0 or self.step == self.total_steps:
            self._log_training()
        if self.bar is not None:
            self.bar.update(1)
        if self._due(self.args.eval_every):
            self._periodic_eval()
        if self._due(self.args.ckpt_every):
            self._read_history()
            if self.bad_streak == 0:
                self.last_ckpt = self.write_checkpoint("periodic") or self.last_ckpt

    def _handle_requests(self, stops: StopRequests) -> None:
        """Act on SIGINT / SIGTERM / SIGUSR1 received during the iteration: every iteration
        in a single process, once per logging window under DDP (where the ranks agree)."""
        if self.info.enabled and self.step % self.args.log_every:
            return
        stop, checkpoint = stops.agree(self.info.world_size, self.device)
        if stop is not None:
            self._close_progress_bar()
            path = self.write_checkpoint("interrupt")
            err = TrainingInterrupted(stop, self.step, path)
            _log(f"{err}; continue with --resume --out {self.run_dir}", self.info)
            raise err
        if checkpoint:
            stops.checkpoint = False
            self.last_ckpt = self.write_checkpoint("requested") or self.last_ckpt
            _log(f"step {self.step}: checkpoint {self.last_ckpt} written on request", self.info)

    def _finish(self) -> TrainResult:
        """The final checkpoint, the sample grid and the loss curve (rank 0), then the final
        evaluation if asked for (and the loss curve again, with its point). An interrupted
        final evaluation loses only itself."""
        self.last_ckpt = self.write_checkpoint("final") or self.last_ckpt
        self.save_samples(final=True)
        self._plot_loss_curve()
        final = None
        if self.args.final_eval:
            try:
                final = self.evaluate_ema(final=True)
            except KeyboardInterrupt:
                _log(
                    f"\nthe final evaluation was interrupted; the final checkpoint "
                    f"{self.last_ckpt} is complete: 'vflow eval --run {self.run_dir}' gives "
                    f"the test bits/dim",
                    self.info,
                )
                raise
            self._plot_loss_curve()
        return TrainResult(
            self.run_dir, self.step, self.model, self.ema, final, self.skipped, self.last_ckpt
        )

    def _plot_loss_curve(self) -> None:
        if self.info.main:
            plot_loss_curve(
                self.metrics_path,
                os.path.join(self.run_dir, "loss.png"),
                title=f"{self.settings.spec['name']} on {self.settings.data_name}",
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


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{n} CPU thread{'s' if n > 1 else ''}"


def _backend_of(model: nn.Module, device: torch.device) -> str:
    """The coupling backend the model runs on ``device`` ("auto" resolved), for the
    start-up line."""
    from . import ops

    backend = getattr(model, "backend", None)
    if backend is None:
        return "n/a"
    try:
        return ops.resolve_backend(backend, device)
    except ValueError as err:
        return f"{backend} ({err})"

"""Checkpoint files and random-number states.

A run directory holds ``ckpt-<step>.pt`` files, written atomically (temporary file, fsync,
``os.replace``) and holding only tensors and plain containers, so they load with
``torch.load(weights_only=True)``. Reading one that is missing, truncated or not a vflow
checkpoint raises :class:`CheckpointError` naming the file; :func:`newest_loadable_checkpoint`
falls back to the newest file that loads and reports the ones it passed over.

The RNG state of a process is torch's CPU generator, numpy's and Python's global generators
and, on CUDA, the device's default generator (:func:`get_rng_state`).
"""

from __future__ import annotations

import glob
import os
import random
import re

import numpy as np
import torch

CKPT_RE = re.compile(r"ckpt-(\d+)\.pt$")

#: Keys every checkpoint that ``vflow train`` writes has (format 1).
CHECKPOINT_KEYS = frozenset(
    {"format", "step", "model", "ema", "optimizer", "data_position", "rng", "model_spec"}
    | {"recipe", "seed", "data", "total_steps", "args"}
)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or is not a vflow training checkpoint."""


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
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a second Ctrl-C: leave no partial file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if keep and keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            try:
                os.remove(old)
            except OSError:
                pass
    return path


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint as data only (``weights_only=True``, onto the CPU).

    FileNotFoundError if ``path`` is not a file; :class:`CheckpointError` (naming the file
    and the cause) if it does not load (truncated, corrupt, not a torch file, or holding
    objects other than tensors and plain containers) or lacks a key of
    :data:`CHECKPOINT_KEYS`.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ...
        reason = _load_failure(path, err)
        raise CheckpointError(f"checkpoint {path} cannot be read: {reason}") from None
    missing = CHECKPOINT_KEYS - set(ck) if isinstance(ck, dict) else CHECKPOINT_KEYS
    if missing:
        raise CheckpointError(
            f"{path} is not a vflow training checkpoint (missing {', '.join(sorted(missing))})"
        )
    return ck


def _load_failure(path: str, err: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed on ``path``, in one clause."""
    text = str(err)
    refused = re.search(r"(?i)unsupported GLOBAL:? (?:GLOBAL )?([\w.]+)", text)
    if refused:
        return (
            f"it holds the Python object {refused.group(1)}, which a checkpoint never "
            f"does (refused, nothing was run)"
        )
    if os.path.getsize(path) == 0:
        return "the file is empty"
    if "central directory" in text or "zip archive" in text:
        return "not a complete torch file (truncated or corrupt)"
    return "not a torch checkpoint file"


def newest_loadable_checkpoint(run_dir: str, use=None) -> tuple[str, object, list[tuple[str, str]]]:
    """The newest checkpoint of ``run_dir`` that loads: ``(path, result, passed_over)``,
    ``result`` the checkpoint, or ``use(path, checkpoint)`` when given (which may raise
    CheckpointError to pass over a checkpoint it cannot use too), and ``passed_over`` the
    ``(path, reason)`` of the newer files that did not load.

    FileNotFoundError if the run has no checkpoint; :class:`CheckpointError` (listing every
    file and why) if none loads.
    """
    files = list_checkpoints(run_dir)
    if not files:
        raise FileNotFoundError(f"no checkpoint (ckpt-*.pt) in run directory {run_dir}")
    passed_over = []
    for path in reversed(files):
        try:
            ck = load_checkpoint(path)
            return path, (ck if use is None else use(path, ck)), passed_over
        except CheckpointError as err:
            passed_over.append((path, str(err)))
    reasons = "; ".join(reason for _, reason in passed_over)
    raise CheckpointError(f"no checkpoint of {run_dir} can be read: {reasons}")


# ----------------------------------------------------------------------------- RNG states


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

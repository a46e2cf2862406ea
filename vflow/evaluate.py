"""Evaluation (bits/dim of the bound and of the importance-weighted estimate), sample grids
and loss curves.

Bits per dimension: ``bpd = -log P(x) / (D ln 2)`` with ``D = C*H*W``; the model's
likelihood already includes the discretisation (variational dequantisation), so no separate
8-bit term is added. The ELBO (Eq. 7) gives an upper bound on bpd; the importance-weighted
estimate (Eq. 5, ``log P(x) ~= logsumexp_s r_s - log S``) with ``S`` samples is tighter and
is what the paper reports (S = 4096 on CIFAR-10, 1024 on ImageNet).

Under ``torch.distributed`` each rank evaluates a contiguous shard of the images and the
sums are all-reduced, so every rank returns the same numbers.
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.distributed as dist
from torch import Tensor

from .data import ImageData, shard_indices

LN2 = math.log(2.0)


def model_cfg(model, key: str, default=None):
    """``model.config[key]`` or ``model.config.key`` (the config may be a dict or an object)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


@torch.no_grad()
def evaluate(
    model,
    data: ImageData,
    batch_size: int = 256,
    samples: int = 0,
    chunk_size: int | None = None,
    device="cpu",
    seed: int = 0,
    max_images: int | None = None,
    progress: bool = False,
    desc: str = "eval",
) -> dict:
    """Test bits/dim of ``model`` on ``data``: always the ELBO; with ``samples > 0`` also the
    importance-weighted estimate with that many samples per image.

    Runs in eval mode (no dropout) under a forked, seeded RNG, so it never disturbs the
    training random stream. Returns ``{"elbo_bpd", "iw_bpd" (if samples), "n"}``.
    """
    rank = dist.get_rank() if _dist_on() else 0
    world = dist.get_world_size() if _dist_on() else 1
    n = len(data) if max_images is None else min(len(data), max_images)
    idx = shard_indices(n, rank, world)
    dims = math.prod(data.shape)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # elbo, iw, count
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=len(idx), desc=desc, unit="img", dynamic_ncols=True)
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed * 1000 + rank)
            for lo in range(idx.start, idx.stop, batch_size):
                hi = min(lo + batch_size, idx.stop)
                x = data.images[lo:hi].long().to(device)
                sums[0] += model.elbo(x).double().sum().cpu()
                if samples > 0:
                    kw = {} if chunk_size is None else {"chunk_size": chunk_size}
                    sums[1] += model.log_prob(x, num_samples=samples, **kw).double().sum().cpu()
                sums[2] += hi - lo
                if bar is not None:
                    bar.update(hi - lo)
                    running = -sums[0].item() / (sums[2].item() * dims * LN2)
                    bar.set_postfix(elbo_bpd=f"{running:.4f}")
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    if _dist_on():
        s = sums.to(device) if torch.device(device).type == "cuda" else sums
        dist.all_reduce(s)
        sums = s.cpu()
    count = sums[2].item()
    out = {"elbo_bpd": -sums[0].item() / (count * dims * LN2), "n": int(count)}
    if samples > 0:
        out["iw_bpd"] = -sums[1].item() / (count * dims * LN2)
        out["samples"] = samples
    return out


@torch.no_grad()
def draw_samples(model, n: int, temperature: float = 1.0, seed: int = 0, device="cpu") -> Tensor:
    """``n`` samples (long, (n, C, H, W)) in eval mode under a forked, seeded RNG."""
    was_training = model.training
    model.eval()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            x = model.sample(n, temperature=temperature)
    finally:
        model.train(was_training)
    return x.cpu()


def save_grid(images: Tensor, n_bins: int, path: str, title: str | None = None) -> str:
    """Write ``images`` (long (N, C, H, W) in ``[0, n_bins)``, C = 1 or 3) as a PNG grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = images.detach().cpu().float().clamp(0, n_bins - 1) / (n_bins - 1)
    n, c, h, w = x.shape
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / cols)
    pad = 1
    grid = torch.ones(c, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[
            :,
            pad + r * (h + pad) : pad + r * (h + pad) + h,
            pad + q * (w + pad) : pad + q * (w + pad) + w,
        ] = x[i]
    img = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    width = 6.0
    fig = plt.figure(figsize=(width, width * img.shape[0] / img.shape[1] / (0.93 if title else 1)))
    ax = fig.add_axes([0, 0, 1, 0.93 if title else 1])
    ax.imshow(img, cmap="gray" if c == 1 else None, vmin=0, vmax=1, interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """The JSON lines of a run's metrics file (unreadable trailing lines are ignored)."""
    out = []
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def _finite_points(rows: list[dict], kind: str, key: str) -> list[tuple[int, float]]:
    """``(step, row[key])`` of the rows of ``kind`` where the value is a finite number."""
    return [
        (r["step"], r[key])
        for r in rows
        if r.get("kind") == kind and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
    ]


def plot_loss_curve(metrics_path: str, path: str, title: str | None = None) -> str:
    """Training bpd (per log interval) and test bpd (periodic evaluations) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    tr = _finite_points(rows, "train", "train_bpd")
    te = _finite_points(rows, "eval", "elbo_bpd")
    iw = _finite_points(rows, "eval", "iw_bpd")
    fig, ax = plt.subplots(figsize=(6, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), lw=1, label="train (ELBO)")
    if te:
        ax.plot(*zip(*te, strict=True), "o-", ms=3, label="test (ELBO, EMA)")
    if iw:
        ax.plot(*zip(*iw, strict=True), "s", ms=4, label="test (importance-weighted, EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits/dim")
    if tr or te:
        vals = [v for _, v in tr + te + iw]
        lo, hi = min(vals), sorted(vals)[int(0.95 * (len(vals) - 1))]
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-3), hi + 0.1 * (hi - lo + 1e-3))
    ax.grid(alpha=0.3)
    if tr or te or iw:
        ax.legend()
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

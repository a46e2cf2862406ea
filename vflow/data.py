"""Datasets and a deterministic, resumable, shardable batch order.

Every dataset is held in memory as a ``uint8`` tensor of shape ``(N, C, H, W)`` and handed to
the model as ``long`` values in ``[0, n_bins)``.

* ``digits``: scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, 1,797
  images, values 0..16, so ``n_bins = 17``), shape ``(N, 1, 8, 8)``. Nothing is downloaded.
  A fixed-seed random 20% of the images is held out as the test split.
* ``cifar10``: the "CIFAR-10 python version" batches in ``--data-dir`` (``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch``; pickled dicts with ``b"data"``: uint8 ``(10000, 3072)``
  in channel-major order and ``b"labels"``). ``n_bins = 256``; optional random horizontal flips.
* ``imagenet32`` / ``imagenet64``: the downsampled-ImageNet ``.npz`` release in ``--data-dir``
  (``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz``, key
  ``"data"``: uint8 ``(N, 3*H*W)`` channel-major). The "test" split is ``val_data.npz``.

Batch order (:class:`BatchStream`): epoch ``e`` visits the training set in the permutation
drawn from ``torch.Generator().manual_seed(seed * 1_000_003 + e)``; global batch ``i`` is
``perm[i*B:(i+1)*B]`` (the last incomplete batch is dropped), its flips drawn from a generator
seeded by ``(seed, e, i)``. With ``world_size`` ranks, rank ``r`` takes the ``r``-th contiguous
slice of ``B / world_size`` images of every global batch. The order is a pure function of
``(seed, epoch, batch index)``, so a checkpoint only needs those two integers to resume it,
and a run on ``n`` ranks sees exactly the images a single-process run with the same global
batch sees.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "cifar10", "imagenet32", "imagenet64")

CIFAR_LAYOUT = (
    "expected the CIFAR-10 python batches: data_batch_1 .. data_batch_5 and test_batch, "
    "each a pickled dict with b'data' (uint8, shape (10000, 3072), channel-major) and "
    "b'labels' (as in cifar-10-python.tar.gz, extracted)"
)
IMAGENET_LAYOUT = (
    "expected the downsampled ImageNet .npz batches: train_data_batch_1.npz .. "
    "train_data_batch_10.npz and val_data.npz, each with key 'data' (uint8, shape "
    "(N, 3*{r}*{r}), channel-major) (as in Imagenet{r}_train_npz / Imagenet{r}_val_npz)"
)


class DataError(RuntimeError):
    """A dataset file is missing or malformed; the message names the file and the layout."""


@dataclass
class ImageData:
    """An in-memory image set: ``images`` uint8 ``(N, C, H, W)``, values in ``[0, n_bins)``."""

    name: str
    split: str
    images: Tensor
    n_bins: int
    flip: bool = False

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])


# ----------------------------------------------------------------------------- digits


def load_digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits, values 0..16, a fixed random ``test_fraction`` held out."""
    from sklearn.datasets import load_digits as _sk_load_digits

    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (use 'train' or 'test')")
    x = _sk_load_digits().images.astype(np.uint8)  # (1797, 8, 8), 0..16
    perm = np.random.RandomState(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    images = torch.from_numpy(np.ascontiguousarray(x[np.sort(idx)]))[:, None]
    return ImageData("digits", split, images, n_bins=17)


# ----------------------------------------------------------------------------- cifar10


def _read_cifar_batch(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file not found: {path}; {CIFAR_LAYOUT}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise DataError(f"cannot read CIFAR-10 file {path}: {e}; {CIFAR_LAYOUT}") from e
    if not isinstance(d, dict):
        raise DataError(
            f"CIFAR-10 file {path} holds a {type(d).__name__}, not a dict; {CIFAR_LAYOUT}"
        )
    data = d.get(b"data", d.get("data"))
    if data is None:
        raise DataError(f"CIFAR-10 file {path} has no b'data' entry; {CIFAR_LAYOUT}")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(
            f"CIFAR-10 file {path}: b'data' is {data.dtype} {data.shape}, "
            f"not uint8 (N, 3072); {CIFAR_LAYOUT}"
        )
    return data.reshape(-1, 3, 32, 32)


def load_cifar10(data_dir: str, split: str = "train", flip: bool = False) -> ImageData:
    """CIFAR-10 from the python-pickle batches in ``data_dir`` (never downloaded)."""
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 directory not found: {data_dir!r}; {CIFAR_LAYOUT}")
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (use 'train' or 'test')")
    arrays = [_read_cifar_batch(os.path.join(data_dir, n)) for n in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays)))
    return ImageData("cifar10", split, images, n_bins=256, flip=flip and split == "train")


# ----------------------------------------------------------------------------- imagenet


def _read_imagenet_npz(path: str, res: int) -> np.ndarray:
    layout = IMAGENET_LAYOUT.format(r=res)
    if not os.path.isfile(path):
        raise DataError(f"ImageNet{res} file not found: {path}; {layout}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "data" not in f.files:
                raise DataError(
                    f"ImageNet{res} file {path} has no 'data' array (has {f.files}); {layout}"
                )
            data = f["data"]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot read ImageNet{res} file {path}: {e}; {layout}") from e
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * res * res:
        raise DataError(
            f"ImageNet{res} file {path}: 'data' is {data.dtype} {data.shape}, "
            f"not uint8 (N, {3 * res * res}); {layout}"
        )
    return data.reshape(-1, 3, res, res)


def load_imagenet(data_dir: str, res: int, split: str = "train", flip: bool = False) -> ImageData:
    """Downsampled ImageNet (32 or 64) from the ``.npz`` batches in ``data_dir``."""
    layout = IMAGENET_LAYOUT.format(r=res)
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError(f"ImageNet{res} directory not found: {data_dir!r}; {layout}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (use 'train' or 'test')")
    if split == "train":
        names = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
    else:
        names = ["val_data.npz"]
    arrays = [_read_imagenet_npz(os.path.join(data_dir, n), res) for n in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays)))
    return ImageData(f"imagenet{res}", split, images, n_bins=256, flip=flip and split == "train")


def load_dataset(
    name: str, split: str = "train", data_dir: str | None = None, flip: bool = False
) -> ImageData:
    """Dispatch on the dataset name (one of :data:`DATASETS`)."""
    if name == "digits":
        return load_digits(split)
    if name == "cifar10":
        return load_cifar10(data_dir, split, flip=flip)
    if name in ("imagenet32", "imagenet64"):
        return load_imagenet(data_dir, int(name[-2:]), split, flip=flip)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def default_dataset_for(config_name: str) -> str:
    """The dataset a model config is meant for, from its name (``...-cifar10`` -> cifar10)."""
    for name in DATASETS:
        if config_name.endswith(name):
            return name
    return "digits"


# ----------------------------------------------------------------------------- batch order


def _gen(*keys: int) -> torch.Generator:
    s = 0
    for k in keys:
        s = (s * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


class BatchStream:
    """Deterministic, resumable, sharded stream of training batches.

    ``batch_size`` is the GLOBAL batch; each of ``world_size`` ranks gets
    ``batch_size // world_size`` images of it. State: ``(epoch, index)`` of the next batch.
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        epoch: int = 0,
        index: int = 0,
    ):
        if batch_size % world_size:
            raise ValueError(
                f"the global batch size {batch_size} is not divisible by the "
                f"world size {world_size}"
            )
        if batch_size > len(data):
            raise ValueError(f"batch size {batch_size} exceeds the {len(data)} training images")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = batch_size // world_size
        self.epoch, self.index = epoch, index
        self._perm_epoch, self._perm = None, None

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def _permutation(self, epoch: int) -> Tensor:
        if self._perm_epoch != epoch:
            self._perm = torch.randperm(len(self.data), generator=_gen(self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, epoch: int, index: int) -> Tensor:
        """The whole global batch ``index`` of ``epoch`` (all ranks), long ``(B, C, H, W)``."""
        idx = self._permutation(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        x = self.data.images[idx].long()
        if self.data.flip:
            flips = torch.rand(len(idx), generator=_gen(self.seed, epoch, index, 1)) < 0.5
            x[flips] = x[flips].flip(-1)
        return x

    def next(self) -> Tensor:
        """This rank's slice of the next global batch; advances the position."""
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        x = self.global_batch(self.epoch, self.index)
        self.index += 1
        lo = self.rank * self.local_batch
        return x[lo : lo + self.local_batch]

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """Contiguous shard of ``range(n)`` for ``rank`` (sizes differ by at most one)."""
    per, extra = divmod(n, world_size)
    lo = rank * per + min(rank, extra)
    return range(lo, lo + per + (1 if rank < extra else 0))

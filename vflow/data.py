"""Datasets and a deterministic, resumable, shardable batch order.

Every dataset is held in memory as a ``uint8`` tensor of shape ``(N, C, H, W)`` and handed to
the model as ``long`` values in ``[0, n_bins)``.

* ``digits``: scikit-learn's bundled 8x8 digits (``sklearn.datasets.load_digits``, 1,797
  images, values 0..16, so ``n_bins = 17``), shape ``(N, 1, 8, 8)``. Nothing is downloaded.
  A fixed-seed random 20% of the images is held out as the test split.
* ``cifar10``: the "CIFAR-10 python version" batches in ``--data-dir`` (``data_batch_1`` ..
  ``data_batch_5`` and ``test_batch``; pickled dicts with ``b"data"``: uint8 ``(10000, 3072)``
  in channel-major order and ``b"labels"``). ``n_bins = 256``; optional random horizontal flips.
  The pickles are read by :class:`CifarUnpickler`, which admits only what such a batch holds
  (dicts, lists, bytes, str, ints and numpy arrays), so a crafted file cannot run code.
* ``imagenet32`` / ``imagenet64``: the downsampled-ImageNet ``.npz`` release in ``--data-dir``
  (``train_data_batch_1.npz`` .. ``train_data_batch_10.npz`` and ``val_data.npz``, key
  ``"data"``: uint8 ``(N, 3*H*W)`` channel-major). The "test" split is ``val_data.npz``.
* ``fashion-mnist`` / ``mnist``: the IDX files ``train-images-idx3-ubyte`` (60,000 images)
  and ``t10k-images-idx3-ubyte`` (10,000), gzipped (``.gz``) or raw, in ``--data-dir``
  (Fashion-MNIST default: :data:`FASHION_MNIST_DIR`, where Debian's ``dataset-fashion-mnist``
  installs them; MNIST has no default). 28x28, 256 grey levels, shape ``(N, 1, 28, 28)``.
  Splits: "valid" is a fixed-seed random 10,000 of the 60,000 training images (as the
  paper's section 6.2 holds out 10,000 CIFAR-10 training images), "train" the other 50,000,
  "test" the official 10,000 (t10k). Labels are not read.

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

import dataclasses
import gzip
import os
import pickle
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("digits", "cifar10", "imagenet32", "imagenet64", "fashion-mnist", "mnist")

#: Where Debian's ``dataset-fashion-mnist`` package puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
#: Images held out of the 60,000 IDX training images as the "valid" split.
IDX_VALID_SIZE = 10_000

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
IDX_LAYOUT = (
    "expected the IDX files train-images-idx3-ubyte and t10k-images-idx3-ubyte, gzipped "
    "(.gz) or raw: a big-endian header (magic 0x00000803 = unsigned bytes, 3 dimensions; "
    "then N, 28, 28 as int32) followed by N*28*28 pixel bytes (as on "
    "yann.lecun.com/exdb/mnist or github.com/zalandoresearch/fashion-mnist)"
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


def _latin1_encode(text: str, encoding: str) -> bytes:
    """``_codecs.encode`` as Python 3 pickles bytes in protocols 0-2, latin-1 only."""
    if encoding != "latin1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r} is not a bytes literal")
    return text.encode("latin1")


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle referenced a global that :class:`CifarUnpickler` does not admit."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.module, self.name = module, name


class CifarUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR-10 python batches: dicts, lists, bytes, str and ints need no
    globals; numpy arrays need exactly the ones in ``ADMITTED``. Every other global (a
    function like ``os.system``, any class) raises :class:`RefusedGlobal` before it is
    imported or called, so nothing in the file can run.

    ``ADMITTED``: ``numpy.ndarray`` and ``numpy.dtype``; the array constructor
    ``_reconstruct`` under numpy 1's module name (the original files, pickled by Python 2)
    and numpy 2's; numpy 2's ``_frombuffer`` (protocol 5); and ``_codecs.encode`` restricted
    to latin-1 (how Python 3 writes bytes in protocols 0-2).
    """

    ADMITTED = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("numpy.core.multiarray", "_reconstruct"): "multiarray._reconstruct",
        ("numpy._core.multiarray", "_reconstruct"): "multiarray._reconstruct",
        ("numpy.core.numeric", "_frombuffer"): "numeric._frombuffer",
        ("numpy._core.numeric", "_frombuffer"): "numeric._frombuffer",
        ("_codecs", "encode"): _latin1_encode,
    }

    def find_class(self, module: str, name: str):
        target = self.ADMITTED.get((module, name))
        if target is None:
            raise RefusedGlobal(module, name)
        if isinstance(target, str):  # numpy's private helpers, from whichever numpy is here
            submodule, attr = target.split(".")
            core = getattr(np, "_core", None) or np.core
            return getattr(getattr(core, submodule), attr)
        return target


def _read_cifar_batch(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise DataError(f"CIFAR-10 file not found: {path}; {CIFAR_LAYOUT}")
    try:
        with open(path, "rb") as f:
            d = CifarUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise DataError(
            f"CIFAR-10 file {path} is not a plain CIFAR-10 batch: it references the global "
            f"{e.module}.{e.name}, which is refused (only dicts, lists, bytes, str, ints and "
            f"numpy arrays are read, so nothing in the file was run); {CIFAR_LAYOUT}"
        ) from None
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


def _missing_dir(data_dir: str | None) -> str:
    """The clause of a DataError for a data folder that is not there or not given."""
    if data_dir is None:
        return "needs its folder: pass --data-dir (data_dir=...)"
    return f"directory not found: {data_dir!r}"


def load_cifar10(data_dir: str, split: str = "train", flip: bool = False) -> ImageData:
    """CIFAR-10 from the python-pickle batches in ``data_dir`` (never downloaded)."""
    if data_dir is None or not os.path.isdir(data_dir):
        raise DataError(f"CIFAR-10 {_missing_dir(data_dir)}; {CIFAR_LAYOUT}")
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
        raise DataError(f"ImageNet{res} {_missing_dir(data_dir)}; {layout}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r} (use 'train' or 'test')")
    if split == "train":
        names = [f"train_data_batch_{i}.npz" for i in range(1, 11)]
    else:
        names = ["val_data.npz"]
    arrays = [_read_imagenet_npz(os.path.join(data_dir, n), res) for n in names]
    images = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays)))
    return ImageData(f"imagenet{res}", split, images, n_bins=256, flip=flip and split == "train")


# ----------------------------------------------------------------------------- IDX (MNIST)

IDX_UBYTE = 0x08  # IDX type code of unsigned bytes (MNIST images and labels)


def read_idx(path: str, ndim: int | None = None) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip-compressed or raw, told apart by the
    gzip magic bytes 1f 8b, not by the file name).

    Layout (LeCun et al., the MNIST page): bytes 0-1 zero, byte 2 the type code (0x08 =
    unsigned byte, the only one read here), byte 3 the number of dimensions d; then d
    big-endian int32 sizes; then prod(sizes) values in C order. Images are magic
    0x00000803 (d = 3: N, rows, cols), labels 0x00000801 (d = 1). ``ndim`` (if given) is
    the required d. Returns a uint8 array of those sizes. DataError, naming the file, when
    it is missing, not gzip-decodable, has a wrong magic / type / ``ndim``, or is shorter or
    longer than its header says.
    """
    if not os.path.isfile(path):
        raise DataError(f"IDX file not found: {path}; {IDX_LAYOUT}")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"cannot read IDX file {path}: {e}; {IDX_LAYOUT}") from e
    if len(raw) < 4:
        raise DataError(f"IDX file {path} is truncated: {len(raw)} bytes, no header; {IDX_LAYOUT}")
    magic = int.from_bytes(raw[:4], "big")
    d = raw[3]
    if raw[:2] != b"\0\0" or raw[2] != IDX_UBYTE or (ndim is not None and d != ndim):
        want = f"0x{0x800 + (ndim or 3):08x}"
        raise DataError(
            f"IDX file {path} has magic 0x{magic:08x}, expected {want} "
            f"(unsigned bytes, {ndim or 3} dimensions); {IDX_LAYOUT}"
        )
    header = 4 + 4 * d
    if len(raw) < header:
        raise DataError(f"IDX file {path} is truncated inside its header; {IDX_LAYOUT}")
    sizes = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(d))
    expected = header + int(np.prod(sizes, dtype=np.int64))
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "longer than its header says"
        raise DataError(
            f"IDX file {path} is {what}: {len(raw)} bytes, header {sizes} needs {expected}; "
            f"{IDX_LAYOUT}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(sizes)


def _idx_path(data_dir: str, stem: str) -> str:
    """``stem.gz`` if present, else ``stem`` (raw), else the ``.gz`` name (for the error)."""
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise DataError(f"IDX file not found: neither {stem}.gz nor {stem} in {data_dir}; {IDX_LAYOUT}")


def idx_split_indices(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) indices of ``n`` IDX training images, each sorted: ``valid`` is the first
    ``min(IDX_VALID_SIZE, n // 6)`` entries (10,000 of 60,000) of
    ``np.random.RandomState(seed).permutation(n)``, ``train`` the rest. Disjoint, covering,
    and a pure function of ``(n, seed)``."""
    perm = np.random.RandomState(seed).permutation(n)
    n_valid = min(IDX_VALID_SIZE, n // 6)
    return np.sort(perm[n_valid:]), np.sort(perm[:n_valid])


def load_mnist(
    data_dir: str | None, split: str = "train", name: str = "mnist", seed: int = 0
) -> ImageData:
    """MNIST-format grey-level images (MNIST, Fashion-MNIST) from the IDX files in
    ``data_dir``: uint8 ``(N, 1, 28, 28)`` (any rows x cols the files hold), ``n_bins = 256``.

    ``split``: "train" (the 60,000 training images minus the held-out ones: 50,000),
    "valid" (the fixed-seed 10,000 of :func:`idx_split_indices`) or "test" (t10k). ``name``
    is the dataset name used in messages and in ``ImageData.name``.
    """
    label = "Fashion-MNIST" if name == "fashion-mnist" else "MNIST"
    if split not in ("train", "valid", "test"):
        raise ValueError(f"unknown split {split!r} (use 'train', 'valid' or 'test')")
    if data_dir is None:
        raise DataError(
            f"{label}: no data directory; pass --data-dir (data_dir) with the IDX files; "
            f"{IDX_LAYOUT}"
        )
    if not os.path.isdir(data_dir):
        raise DataError(f"{label} {_missing_dir(data_dir)}; {IDX_LAYOUT}")
    stem = "t10k-images-idx3-ubyte" if split == "test" else "train-images-idx3-ubyte"
    x = read_idx(_idx_path(data_dir, stem), ndim=3)
    if split != "test":
        train_idx, valid_idx = idx_split_indices(len(x), seed)
        x = x[train_idx if split == "train" else valid_idx]
    x = x if x.flags.writeable else x.copy()  # frombuffer views are read-only
    images = torch.from_numpy(np.ascontiguousarray(x))[:, None]
    return ImageData(name, split, images, n_bins=256)


def avg_pool(data: ImageData, factor: int = 2) -> ImageData:
    """``data`` downsampled by averaging ``factor x factor`` pixel blocks, rounded half up to
    an integer so the levels stay in ``[0, n_bins)``: ``(sum + factor^2 // 2) // factor^2``.
    (28x28 Fashion-MNIST -> 14x14 with ``factor=2``.) H and W must be divisible by it."""
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"avg_pool: factor must be a positive int, got {factor!r}")
    n, c, h, w = data.images.shape
    if h % factor or w % factor:
        raise ValueError(f"avg_pool: factor {factor} does not divide the {h}x{w} images")
    blocks = data.images.view(n, c, h // factor, factor, w // factor, factor).int()
    area = factor * factor
    pooled = (blocks.sum((3, 5)) + area // 2) // area
    return dataclasses.replace(data, images=pooled.to(torch.uint8))


def load_dataset(
    name: str, split: str = "train", data_dir: str | None = None, flip: bool = False
) -> ImageData:
    """Dispatch on the dataset name (one of ``DATASETS``). ``split`` is "train" or "test"
    for every dataset; the IDX datasets also have "valid". ``data_dir`` defaults to
    ``FASHION_MNIST_DIR`` for fashion-mnist (required for cifar10, imagenet*, mnist)."""
    if name in ("fashion-mnist", "mnist"):
        if data_dir is None and name == "fashion-mnist":
            data_dir = FASHION_MNIST_DIR
        return load_mnist(data_dir, split, name=name)
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
    if config_name.endswith("-fashion"):  # flowpp-fashion, vflow-fashion
        return "fashion-mnist"
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

"""Dataset loaders on generated files in the real formats, bad files, and the batch order."""

import os
import pickle

import numpy as np
import pytest
import torch

from vflow import data as D


def _write_cifar(root, n=6, seed=0):
    rng = np.random.RandomState(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = rng.randint(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(os.path.join(root, name), "wb") as f:
            pickle.dump({b"data": arr, b"labels": list(range(n)), b"batch_label": b"x"}, f)
        batches[name] = arr
    return batches


def _write_imagenet(root, res=8, n=5, seed=0):
    rng = np.random.RandomState(seed)
    out = {}
    for name in [f"train_data_batch_{i}.npz" for i in range(1, 11)] + ["val_data.npz"]:
        arr = rng.randint(0, 256, size=(n, 3 * res * res), dtype=np.uint8)
        np.savez(os.path.join(root, name), data=arr, labels=np.arange(n) + 1)
        out[name] = arr
    return out


def test_digits_split_shapes_values_and_fixed_holdout():
    tr, te = D.load_digits("train"), D.load_digits("test")
    assert tr.images.dtype == torch.uint8 and tr.images.shape[1:] == (1, 8, 8)
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert tr.n_bins == 17 and int(tr.images.max()) == 16 and int(tr.images.min()) == 0
    # disjoint and deterministic
    a = {bytes(x.numpy()) for x in tr.images}
    b = {bytes(x.numpy()) for x in te.images}
    assert len(a & b) < 10  # (a few digits are pixel-identical duplicates)
    assert torch.equal(D.load_digits("test").images, te.images)
    with pytest.raises(ValueError, match="unknown split"):
        D.load_digits("valid")


def test_cifar10_loader_reads_pickle_batches(tmp_path):
    b = _write_cifar(tmp_path)
    tr = D.load_dataset("cifar10", "train", str(tmp_path))
    te = D.load_dataset("cifar10", "test", str(tmp_path))
    assert tr.images.shape == (30, 3, 32, 32) and te.images.shape == (6, 3, 32, 32)
    assert tr.n_bins == 256
    # channel-major: the first 1024 bytes are the red plane, row-major
    assert torch.equal(tr.images[0, 0].flatten(), torch.from_numpy(b["data_batch_1"][0, :1024]))
    assert torch.equal(tr.images[6, 2, 31], torch.from_numpy(b["data_batch_2"][0, -32:]))
    assert torch.equal(te.images.flatten(1), torch.from_numpy(b["test_batch"]))


@pytest.mark.parametrize("problem", ["missing", "garbage", "wrong_shape", "no_data"])
def test_cifar10_bad_files_name_the_file(tmp_path, problem):
    _write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_bytes(b"this is not a pickle")
    elif problem == "wrong_shape":
        with open(path, "wb") as f:
            pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": []}, f)
    else:
        with open(path, "wb") as f:
            pickle.dump({b"labels": []}, f)
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", "train", str(tmp_path))
    msg = str(err.value)
    assert "data_batch_3" in msg and "data_batch_1 .. data_batch_5" in msg and "test_batch" in msg


class _RunsOnLoad:
    """Unpickling this calls ``func(*args)``: the classic malicious pickle."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    "payload,refused",
    [
        ("os.system", "posix.system"),
        ("builtins.exec", "builtins.exec"),
        ("in_a_list", "posix.system"),
        ("in_an_object_array", "posix.system"),
    ],
)
def test_cifar10_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, refused):
    """Before (pickle.load): the file's code ran (here: it created a file) when the data set
    was loaded."""
    _write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    touch = _RunsOnLoad(os.system, f"touch {marker}")
    if payload == "builtins.exec":
        touch = _RunsOnLoad(exec, f"open({str(marker)!r}, 'w').close()")
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    if payload == "in_a_list":
        batch[b"labels"] = [0, touch]
    elif payload == "in_an_object_array":
        batch[b"data"] = np.array([touch, None], dtype=object)
    else:
        batch[b"batch_label"] = touch
    with open(tmp_path / "data_batch_2", "wb") as f:
        pickle.dump(batch, f)
    with pytest.raises(D.DataError) as err:
        D.load_dataset("cifar10", "train", str(tmp_path))
    msg = str(err.value)
    assert "data_batch_2" in msg and refused in msg and "refused" in msg
    assert not marker.exists()


def _python2_style(data: bytes) -> bytes:
    """A protocol-2 pickle as the original CIFAR-10 files have it: numpy 1's module name."""
    new = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert new != data
    return new


@pytest.mark.parametrize("protocol", [0, 2, "python2", 4, 5])
def test_cifar10_genuine_batches_load_with_every_pickle_protocol(tmp_path, protocol):
    rng = np.random.RandomState(1)
    arrays = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arrays[name] = rng.randint(0, 256, size=(3, 3072), dtype=np.uint8)
        batch = {
            b"batch_label": b"training batch 1 of 5",
            b"labels": [6, 9, 9],
            b"data": arrays[name],
            b"filenames": [b"a.png", b"b.png", b"c.png"],
        }
        data = pickle.dumps(batch, protocol=2 if protocol == "python2" else protocol)
        (tmp_path / name).write_bytes(_python2_style(data) if protocol == "python2" else data)
    train = D.load_dataset("cifar10", "train", str(tmp_path))
    expected = np.concatenate([arrays[f"data_batch_{i}"] for i in range(1, 6)])
    assert torch.equal(train.images.flatten(1), torch.from_numpy(expected))
    test = D.load_dataset("cifar10", "test", str(tmp_path))
    assert torch.equal(test.images.flatten(1), torch.from_numpy(arrays["test_batch"]))


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(D.DataError, match="directory not found"):
        D.load_dataset("cifar10", "train", str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="CIFAR-10 needs its folder: pass --data-dir"):
        D.load_dataset("cifar10", "train", None)


def test_imagenet_loader_reads_npz_batches(tmp_path, monkeypatch):
    # a 32x32 release in miniature: write real 32x32 files
    b = _write_imagenet(tmp_path, res=32, n=3)
    tr = D.load_dataset("imagenet32", "train", str(tmp_path))
    te = D.load_dataset("imagenet32", "test", str(tmp_path))
    assert tr.images.shape == (30, 3, 32, 32) and te.images.shape == (3, 3, 32, 32)
    assert torch.equal(tr.images[3].flatten(), torch.from_numpy(b["train_data_batch_2.npz"][0]))
    assert torch.equal(te.images.flatten(1), torch.from_numpy(b["val_data.npz"]))
    with pytest.raises(D.DataError, match=r"val_data.npz.*not uint8 \(N, 12288\)"):
        D.load_dataset("imagenet64", "test", str(tmp_path))  # 32x32 files read as 64x64


@pytest.mark.parametrize("problem", ["missing", "garbage", "no_key", "dtype"])
def test_imagenet_bad_files(tmp_path, problem):
    _write_imagenet(tmp_path, res=32, n=2)
    path = tmp_path / "val_data.npz"
    if problem == "missing":
        path.unlink()
    elif problem == "garbage":
        path.write_bytes(b"PK not really a zip")
    elif problem == "no_key":
        np.savez(path, images=np.zeros((2, 3072), np.uint8))
    else:
        np.savez(path, data=np.zeros((2, 3072), np.float32))
    with pytest.raises(D.DataError) as err:
        D.load_dataset("imagenet32", "test", str(tmp_path))
    assert "val_data.npz" in str(err.value) and "train_data_batch_1.npz" in str(err.value)


def test_unknown_dataset():
    with pytest.raises(ValueError, match="digits, cifar10, .*fashion-mnist, mnist"):
        D.load_dataset("svhn")


def _toy(n=20, flip=False):
    imgs = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).repeat(1, 1, 2, 3)
    imgs[:, :, :, 0] = 200  # left column marks flips
    return D.ImageData("toy", "train", imgs, n_bins=256, flip=flip)


def test_batch_stream_epochs_are_permutations_and_deterministic():
    data = _toy(20)
    s = D.BatchStream(data, batch_size=6, seed=1)
    assert s.batches_per_epoch == 3
    epoch0 = torch.cat([s.next()[:, 0, 0, 1] for _ in range(3)])
    assert len(set(epoch0.tolist())) == 18  # 3 full batches, last 2 images dropped
    epoch1 = torch.cat([s.next()[:, 0, 0, 1] for _ in range(3)])
    assert s.epoch == 1 and not torch.equal(epoch0, epoch1)
    s2 = D.BatchStream(data, batch_size=6, seed=1)
    assert torch.equal(torch.cat([s2.next()[:, 0, 0, 1] for _ in range(3)]), epoch0)
    s3 = D.BatchStream(data, batch_size=6, seed=2)
    assert not torch.equal(torch.cat([s3.next()[:, 0, 0, 1] for _ in range(3)]), epoch0)


def test_batch_stream_resume_and_shards_cover_the_global_batch():
    data = _toy(40, flip=True)
    ref = D.BatchStream(data, batch_size=8, seed=3)
    seq = [ref.next() for _ in range(9)]  # crosses epoch boundaries (5 batches / epoch)
    resumed = D.BatchStream(data, batch_size=8, seed=3)
    resumed.load_state_dict(D.BatchStream(data, 8, seed=3, epoch=0, index=0).state_dict())
    for _ in range(4):
        resumed.next()
    state = resumed.state_dict()
    again = D.BatchStream(data, batch_size=8, seed=3)
    again.load_state_dict(state)
    for i in range(4, 9):
        assert torch.equal(again.next(), seq[i])
    shards = [D.BatchStream(data, 8, seed=3, rank=r, world_size=2) for r in range(2)]
    for i in range(9):
        assert torch.equal(torch.cat([sh.next() for sh in shards]), seq[i])
    # flips: some images flipped (marker column moved right), deterministically
    flipped = torch.cat(seq)[:, 0, 0, 2] == 200
    assert 0 < flipped.sum() < len(flipped)
    with pytest.raises(ValueError, match="not divisible"):
        D.BatchStream(data, batch_size=7, world_size=2)


def test_shard_indices_partition():
    parts = [D.shard_indices(10, r, 3) for r in range(3)]
    assert [list(p) for p in parts] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


# ----------------------------------------------------------------------------- IDX (MNIST)


def _idx_bytes(arr, magic=0x00000803):
    """An IDX file's bytes: big-endian magic, big-endian int32 sizes, then the uint8 values."""
    arr = np.asarray(arr, dtype=np.uint8)
    head = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.tobytes()


def _write_idx(root, n_train=24, n_test=7, gz=True, seed=0, size=28):
    """Train and t10k image files (gzipped or raw) in ``root``; returns the two arrays."""
    import gzip

    rng = np.random.RandomState(seed)
    out = {}
    for stem, n in (("train-images-idx3-ubyte", n_train), ("t10k-images-idx3-ubyte", n_test)):
        arr = rng.randint(0, 256, size=(n, size, size), dtype=np.uint8)
        raw = _idx_bytes(arr)
        if gz:
            (root / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / stem).write_bytes(raw)
        out[stem] = arr
    return out


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_loader_reads_generated_files_and_holds_out_a_fixed_validation_split(
    tmp_path, gz, name
):
    arrs = _write_idx(tmp_path, n_train=24, n_test=7, gz=gz)
    tr, va, te = (D.load_dataset(name, s, str(tmp_path)) for s in ("train", "valid", "test"))
    assert (tr.name, tr.split, va.split, te.split) == (name, "train", "valid", "test")
    assert tr.images.dtype == torch.uint8 and tr.images.shape == (20, 1, 28, 28)
    assert va.images.shape == (4, 1, 28, 28)  # a sixth of 24 (10,000 of 60,000)
    assert tr.n_bins == va.n_bins == te.n_bins == 256 and tr.shape == (1, 28, 28)
    assert torch.equal(te.images[:, 0], torch.from_numpy(arrs["t10k-images-idx3-ubyte"]))
    # train + valid is a partition of the file's images, in file order within each split
    train_idx, valid_idx = D.idx_split_indices(24)
    full = torch.from_numpy(arrs["train-images-idx3-ubyte"])
    assert torch.equal(tr.images[:, 0], full[train_idx]) and torch.equal(
        va.images[:, 0], full[valid_idx]
    )
    assert sorted(train_idx.tolist() + valid_idx.tolist()) == list(range(24))


def test_idx_split_is_deterministic_disjoint_and_sized_like_the_paper():
    tr, va = D.idx_split_indices(60_000)
    assert len(va) == 10_000 and len(tr) == 50_000
    assert not set(tr.tolist()) & set(va.tolist())
    tr2, va2 = D.idx_split_indices(60_000)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    assert not np.array_equal(va, D.idx_split_indices(60_000, seed=1)[1])


@pytest.mark.parametrize(
    "problem", ["missing", "truncated", "too_long", "wrong_magic", "labels_file", "bad_gzip"]
)
@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
def test_idx_bad_files_name_the_file(tmp_path, problem, gz):
    import gzip

    _write_idx(tmp_path, gz=gz)
    stem = "t10k-images-idx3-ubyte"
    path = tmp_path / (stem + (".gz" if gz else ""))
    good = _idx_bytes(np.zeros((7, 28, 28), np.uint8))
    bad = {
        "truncated": good[:-100],
        "too_long": good + b"\0",
        "wrong_magic": b"\0\0\x0d\x03" + good[4:],  # type 0x0d (float) instead of 0x08
        "labels_file": _idx_bytes(np.zeros(7, np.uint8), magic=0x00000801),
    }
    if problem == "missing":
        path.unlink()
        match = r"IDX file not found: neither t10k-images-idx3-ubyte.gz nor t10k-images-idx3-ubyte"
    elif problem == "bad_gzip":
        if not gz:
            pytest.skip("a gzip problem needs a .gz file")
        path.write_bytes(gzip.compress(good)[:-20])  # cut inside the compressed stream
        match = "cannot read IDX file"
    else:
        path.write_bytes(gzip.compress(bad[problem]) if gz else bad[problem])
        match = {
            "truncated": "is truncated",
            "too_long": "longer than its header says",
            "wrong_magic": "magic 0x00000d03, expected 0x00000803",
            "labels_file": "magic 0x00000801, expected 0x00000803",
        }[problem]
    with pytest.raises(D.DataError, match=match) as err:
        D.load_dataset("mnist", "test", str(tmp_path))
    assert str(path.name) in str(err.value) or stem in str(err.value)
    assert "train-images-idx3-ubyte" in str(err.value)  # the layout is spelled out
    D.load_dataset("mnist", "train", str(tmp_path))  # the other file still loads


def test_idx_header_only_and_empty_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\0\0")
    with pytest.raises(D.DataError, match=r"x is truncated: 2 bytes, no header"):
        D.read_idx(str(tmp_path / "x"))
    (tmp_path / "y").write_bytes(b"\0\0\x08\x03\0\0")
    with pytest.raises(D.DataError, match="truncated inside its header"):
        D.read_idx(str(tmp_path / "y"))


def test_mnist_needs_a_directory_and_fashion_defaults_to_debian(tmp_path):
    with pytest.raises(D.DataError, match="MNIST: no data directory; pass --data-dir"):
        D.load_dataset("mnist", "train")
    with pytest.raises(D.DataError, match="directory not found"):
        D.load_dataset("mnist", "train", str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        D.load_dataset("mnist", "validation", str(tmp_path))
    assert D.FASHION_MNIST_DIR == "/usr/share/datasets/fashion-mnist"
    assert D.default_dataset_for("vflow-fashion") == "fashion-mnist"
    assert D.default_dataset_for("flowpp-fashion") == "fashion-mnist"
    assert D.default_dataset_for("vflow-digits") == "digits"


def test_avg_pool_rounds_block_means_and_checks_the_factor():
    imgs = torch.tensor([[0, 1, 255, 255], [1, 1, 254, 255], [3, 3, 7, 8], [3, 4, 9, 9]])
    data = D.ImageData("t", "train", imgs.to(torch.uint8).view(1, 1, 4, 4), n_bins=256)
    pooled = D.avg_pool(data, 2)
    # block sums 3, 1019, 13, 33 -> (s + 2) // 4
    assert pooled.images.view(-1).tolist() == [1, 255, 3, 8]
    assert pooled.images.dtype == torch.uint8 and pooled.n_bins == 256 and pooled.name == "t"
    assert torch.equal(D.avg_pool(data, 1).images, data.images)
    with pytest.raises(ValueError, match="factor 3 does not divide"):
        D.avg_pool(data, 3)
    with pytest.raises(ValueError, match="factor must be a positive int"):
        D.avg_pool(data, 0)


FASHION = D.FASHION_MNIST_DIR


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST not installed in {FASHION} (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_counts_and_checksum_against_an_independent_reading():
    import gzip
    import hashlib

    def independent(stem):  # gunzip, skip the 16-byte header, nothing else shared
        with open(os.path.join(FASHION, stem + ".gz"), "rb") as f:
            raw = gzip.decompress(f.read())
        return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(-1, 28, 28)

    tr, va, te = (D.load_dataset("fashion-mnist", s) for s in ("train", "valid", "test"))
    assert (len(tr), len(va), len(te)) == (50_000, 10_000, 10_000)
    assert tr.shape == (1, 28, 28) and tr.images.dtype == torch.uint8
    full = independent("train-images-idx3-ubyte")
    test = independent("t10k-images-idx3-ubyte")
    assert full.shape == (60_000, 28, 28) and test.shape == (10_000, 28, 28)
    sha = lambda a: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()  # noqa: E731
    assert sha(te.images[:, 0].numpy()) == sha(test)
    train_idx, valid_idx = D.idx_split_indices(60_000)
    assert sha(tr.images[:, 0].numpy()) == sha(full[train_idx])
    assert sha(va.images[:, 0].numpy()) == sha(full[valid_idx])
    # the pixel sums of train + valid add up to the whole file's
    total = int(tr.images.sum(dtype=torch.int64)) + int(va.images.sum(dtype=torch.int64))
    assert total == int(full.sum(dtype=np.int64))

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


def test_cifar10_missing_directory(tmp_path):
    with pytest.raises(D.DataError, match="directory not found"):
        D.load_dataset("cifar10", "train", str(tmp_path / "nope"))
    with pytest.raises(D.DataError, match="directory not found"):
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
    with pytest.raises(ValueError, match="digits, cifar10"):
        D.load_dataset("mnist")


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

"""vflow.load: the documented one-line way to a trained model (issue 31): a run directory or
a checkpoint file, device / map_location handling, and clear errors for any other path."""

import os

import pytest
import torch
from test_train import _args

import vflow
from vflow import train as T
from vflow.checkpoints import CheckpointError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("load")
    args = _args(tmp, steps=2, batch_size=8, ckpt_every=1, keep=5, config="flowpp-digits")
    T.train(args)
    return str(tmp / "run")


def test_map_location_is_the_device(run_dir):
    for model in (
        vflow.load(run_dir, map_location="cpu"),
        vflow.load(run_dir, map_location=torch.device("cpu")),
        vflow.load(run_dir, device=torch.device("cpu")),
        vflow.load(run_dir, device="cpu", map_location="cpu"),
    ):
        assert next(model.parameters()).device.type == "cpu" and not model.training
    ckpt = os.path.join(run_dir, "ckpt-00000002.pt")
    a, b = vflow.load(run_dir), vflow.load(ckpt, map_location="cpu")
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_device_and_map_location_must_agree(run_dir):
    with pytest.raises(ValueError, match="disagree"):
        vflow.load(run_dir, device="cpu", map_location="cuda")
    with pytest.raises(TypeError, match="str or torch.device"):
        vflow.load(run_dir, map_location={"cuda:0": "cpu"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_without_cuda_is_a_clear_error(run_dir):
    with pytest.raises(ValueError, match="CUDA is not available"):
        vflow.load(run_dir, map_location="cuda")


def test_a_path_that_is_neither_run_nor_checkpoint(tmp_path):
    with pytest.raises(
        FileNotFoundError, match="no run directory or checkpoint file at .*vflow train"
    ):
        vflow.load(tmp_path / "nope")  # a PathLike is accepted
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint \(ckpt-\*\.pt\) in run directory"):
        vflow.load(tmp_path / "empty")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG not a checkpoint")
    with pytest.raises(CheckpointError, match="picture.png"):
        vflow.load(tmp_path / "picture.png")

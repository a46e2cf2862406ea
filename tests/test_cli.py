"""The ``vflow`` command line end to end on the real digits model, kept tiny."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from vflow import train as T
from vflow.cli import main

TINY = [
    "--config",
    "vflow-digits",
    "--batch-size",
    "16",
    "--set",
    "context_filters=4",
    "--log-every",
    "1",
    "--no-progress",
    "--n-samples",
    "4",
    "--eval-images",
    "16",
]


def _ckpt(run, step=None):
    path = T.latest_checkpoint(run) if step is None else os.path.join(run, f"ckpt-{step:08d}.pt")
    return torch.load(path, weights_only=True)


def test_train_eval_sample_resume_end_to_end(tmp_path, capsys):
    run = str(tmp_path / "run")
    rc = main(
        [
            "train",
            *TINY,
            "--out",
            run,
            "--steps",
            "4",
            "--eval-every",
            "2",
            "--ckpt-every",
            "2",
            "--iw-samples",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert f"run directory: {run}" in out
    line = next(x for x in out.splitlines() if x.startswith("test bits/dim"))
    assert "ELBO" in line and "importance-weighted (S=2)" in line
    elbo = float(line.split("ELBO ")[1].split(",")[0])
    iw = float(line.split("(S=2) ")[1])
    assert 0.5 < iw < 6 and 0.5 < elbo < 6
    for f in ("samples.png", "samples-00000002.png", "loss.png", "metrics.jsonl", "run.json"):
        assert os.path.isfile(os.path.join(run, f)), f
    ck = _ckpt(run)
    assert ck["step"] == 4 and ck["model_spec"] == {
        "name": "vflow-digits",
        "overrides": {"context_filters": 4},
        "backend": "auto",
    }

    rc = main(["eval", "--run", run, "--samples", "3", "--max-images", "12", "--batch-size", "5"])
    out = capsys.readouterr().out
    assert rc == 0 and "test bits/dim (12 images)" in out and "(S=3)" in out
    with open(os.path.join(run, "eval-test-S3.json")) as f:
        res = json.load(f)
    assert res["n"] == 12 and res["step"] == 4 and res["ema"] is True
    assert res["iw_bpd"] < res["elbo_bpd"] + 0.05  # IW tightens the bound (up to noise)

    png = str(tmp_path / "grid.png")
    assert main(["sample", "--run", run, "--n", "6", "--temperature", "0.7", "--out", png]) == 0
    assert os.path.getsize(png) > 1000 and "wrote" in capsys.readouterr().out

    assert main(["train", *TINY, "--out", run, "--resume", "--steps", "6", "--no-final-eval"]) == 0
    assert _ckpt(run)["step"] == 6
    # starting a new run over an existing one is refused
    assert main(["train", *TINY, "--out", run, "--steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_cli_resume_is_exact_with_dropout(tmp_path):
    common = [
        *TINY,
        "--set",
        "dropout=0.2",
        "--no-final-eval",
        "--n-samples",
        "0",
        "--eval-every",
        "0",
        "--ckpt-every",
        "0",
        "--seed",
        "7",
    ]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["train", *common, "--out", a, "--steps", "6"]) == 0
    assert main(["train", *common, "--out", b, "--steps", "3"]) == 0
    torch.manual_seed(99)  # the resumed run must not depend on the caller's RNG
    assert main(["train", *common, "--out", b, "--steps", "6", "--resume"]) == 0
    ka, kb = _ckpt(a), _ckpt(b)
    assert ka["step"] == kb["step"] == 6
    for k, v in ka["model"].items():
        assert torch.equal(v, kb["model"][k]), k
    for k, v in ka["ema"]["params"].items():
        assert torch.equal(v, kb["ema"]["params"][k]), k


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "nope"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "unknown config 'nope'" in err and "vflow-digits" in err and "vflow-cifar10" in err
    with pytest.raises(SystemExit):
        main(["train", "--steps", "3", "--epochs", "1"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--resume"])
    assert "--resume needs --out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--steps", "0"])
    assert "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--run", str(tmp_path / "missing")])
    assert "no run directory or checkpoint file there" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["sample", "--run", str(tmp_path / "empty")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    rc = main(
        [
            "train",
            "--config",
            "flowpp-cifar10",
            "--data-dir",
            str(tmp_path),
            "--out",
            str(tmp_path / "c"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "data_batch_1" in err and "not found" in err
    with pytest.raises(SystemExit):
        main(["frobnicate"])
    with pytest.raises(SystemExit):
        main([])


def test_info(capsys):
    assert main(["info", "vflow-digits"]) == 0
    out = capsys.readouterr().out
    assert "vflow-digits" in out and "parameters" in out
    assert main(["info"]) == 0
    assert "flowpp-cifar10" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "vflow-cifar100"])


def test_python_dash_m_entry_point():
    r = subprocess.run(
        [sys.executable, "-m", "vflow", "info", "bogus"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "valid configs" in r.stderr and "flowpp-digits" in r.stderr


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """`vflow train` and `vflow eval` unchanged under torchrun (2 CPU processes, gloo)."""
    run = str(tmp_path / "run")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    base = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        "-m",
        "vflow",
    ]
    r = subprocess.run(
        [
            *base,
            "train",
            *TINY,
            "--out",
            run,
            "--steps",
            "3",
            "--no-final-eval",
            "--eval-every",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("run directory:") == 1  # only rank 0 prints
    ck = _ckpt(run)
    assert ck["step"] == 3 and ck["world_size"] == 2 and len(ck["rng"]) == 2
    base[base.index("--master_port") + 1] = str(_free_port())
    r = subprocess.run(
        [*base, "eval", "--run-dir", run, "--samples", "2", "--max-images", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "test bits/dim (10 images)" in r.stdout


def test_train_activation_checkpointing_flag(tmp_path):
    from vflow.models import VFlow

    if not hasattr(VFlow, "set_activation_checkpointing"):
        pytest.skip("VFlow.set_activation_checkpointing is not implemented yet")
    run = str(tmp_path / "run")
    argv = ["train", *TINY, "--out", run, "--steps", "1", "--eval-every", "0", "--no-final-eval"]
    assert main([*argv, "--activation-checkpointing"]) == 0
    assert _ckpt(run)["args"]["activation_checkpointing"] is True


@pytest.mark.parametrize(
    "argv,mode",
    [
        ([], None),
        (["--compile"], "regional"),
        (["--compile", "--channels-last"], "regional"),
        (["--compile", "elbo"], "elbo"),
        (["--compile", "regional"], "regional"),
        (["--no-compile"], "off"),
    ],
)
def test_compile_spellings(argv, mode):
    """A bare --compile (the old spelling) is regional compilation; 'elbo' the whole-ELBO
    compile of earlier versions; --no-compile off; not given: the run's own (None)."""
    from vflow.cli import build_parser

    a = build_parser().parse_args(["train", *argv])
    assert a.compile == mode


# --- issue 29: help, version, --set mistakes, eval --out, sample --run-dir -------------------


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise AssertionError("no subcommands")


def test_every_option_of_every_command_has_help():
    import argparse

    from vflow.cli import build_parser

    parser = build_parser()
    commands = _subparsers(parser).choices
    assert set(commands) == {"train", "eval", "sample", "info"}
    missing = []
    for name, sub in [("vflow", parser), *commands.items()]:
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not missing, f"options without help: {missing}"


def test_help_lists_every_command_with_one_line_and_version(capsys):
    from vflow import __version__

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "sample", "info"):
        line = next(x for x in out.splitlines() if x.strip().startswith(command + " "))
        assert len(line.split()) > 2, line  # the command and its help text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"vflow {__version__}"


def test_no_final_eval_help_says_what_it_skips():
    from vflow.cli import build_parser

    train = _subparsers(build_parser()).choices["train"]
    (action,) = [a for a in train._actions if "--no-final-eval" in a.option_strings]
    assert "only the final test evaluation" in action.help
    assert "samples.png" in action.help and "loss.png" in action.help


@pytest.mark.parametrize(
    "setting,message",
    [
        ("filtrs=8", "unknown config field 'filtrs'"),
        ("dropot=0.1", "unknown config field 'dropot' (did you mean 'dropout'?)"),
        ("dropout=abc", "dropout must be a float in [0, 1), got 'abc'"),
        ("n_bins=2.5", "n_bins must be an int >= 2, got 2.5"),
        ("smooth=yes", "smooth must be True or False, got 'yes'"),
    ],
)
def test_set_mistakes_are_one_line_errors(tmp_path, capsys, setting, message):
    """Before: TypeError / "'>' not supported between 'str' and 'int'" tracebacks."""
    out = tmp_path / "run"
    rc = main(["train", *TINY, "--out", str(out), "--steps", "1", "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("vflow train: error: ") and err.count("\n") == 1
    assert message in err
    if "unknown" in message:
        assert "valid fields: name, kind, data_shape, n_bins" in err
    assert not out.exists()  # refused before anything was written


def test_build_overrides_are_checked_in_the_same_place():
    import vflow

    with pytest.raises(ValueError, match=r"unknown config field 'filters'.*p, q and r"):
        vflow.build("vflow-digits", filters=3)
    with pytest.raises(ValueError, match=r"dropout must be a float in \[0, 1\), got 'abc'"):
        vflow.build("vflow-digits", dropout="abc")
    with pytest.raises(ValueError, match=r"data_shape must be a \(C, H, W\) tuple"):
        vflow.build("vflow-digits", data_shape=(8, 8))
    model = vflow.build("vflow-digits", dropout=0, data_shape=[1, 4, 4])  # JSON-style values
    assert model.config.dropout == 0.0 and model.config.data_shape == (1, 4, 4)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("cli") / "run")
    argv = ["train", *TINY, "--out", run, "--steps", "2", "--eval-every", "0"]
    assert main([*argv, "--no-final-eval", "--n-samples", "0"]) == 0
    return run


def _refuse_writes_under(monkeypatch, folder):
    """Make ``folder`` behave as read-only for writes through open() (the tests run as root,
    for whom chmod does not stop writes)."""
    import builtins

    real_open = builtins.open

    def guarded_open(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fspath(file)) if isinstance(file, (str, os.PathLike)) else ""
        if path.startswith(os.path.abspath(folder) + os.sep) and any(c in mode for c in "wax+"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)


def test_eval_on_a_read_only_run_keeps_the_result(small_run, tmp_path, capsys, monkeypatch):
    """Before: the result was printed, then a PermissionError traceback, and no --out."""
    _refuse_writes_under(monkeypatch, small_run)
    argv = ["eval", "--run", small_run, "--samples", "2", "--max-images", "4"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "test bits/dim (4 images)" in captured.out
    (note,) = [x for x in captured.err.splitlines() if x.startswith("vflow eval")]  # one line
    assert "could not write" in note and "eval-test-S2.json" in note
    assert "Permission denied" in note and "--out FILE.json" in note
    target = tmp_path / "result.json"
    assert main([*argv, "--out", str(target)]) == 0
    assert json.loads(target.read_text())["n"] == 4
    assert f"wrote {target}" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # a missing folder fails before the evaluation
        main([*argv, "--out", str(tmp_path / "nowhere" / "r.json")])
    assert "does not exist" in capsys.readouterr().err


def test_sample_takes_run_dir_like_eval_and_reports_unwritable_output(
    small_run, tmp_path, capsys, monkeypatch
):
    png = tmp_path / "grid.png"
    assert main(["sample", "--run-dir", small_run, "--n", "4", "--out", str(png)]) == 0
    assert png.stat().st_size > 500
    _refuse_writes_under(monkeypatch, small_run)
    assert main(["sample", "--run-dir", small_run, "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vflow sample: error: could not write") and err.count("\n") == 1
    assert "--out FILE.png" in err


# ----------------------------------------------------------------------------- found by review


@pytest.mark.parametrize(
    "option,value,message",
    [
        ("--lr", "-1", "expected a number > 0, got '-1'"),
        ("--lr", "nan", "expected a finite number, got 'nan'"),
        ("--lr", "inf", "expected a finite number, got 'inf'"),
        ("--ema-decay", "1.5", "expected a number in [0, 1), got '1.5'"),
        ("--ema-decay", "nan", "expected a finite number, got 'nan'"),
        ("--grad-clip", "-1", "expected a number >= 0, got '-1'"),
    ],
)
def test_recipe_values_are_checked(tmp_path, capsys, option, value, message):
    """Before: accepted; --lr nan trained to NaN and ended in a matplotlib error."""
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "r"), option, value])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_more_one_line_errors(small_run, tmp_path, capsys, monkeypatch):
    """--set name=..., an --out that is a file or under one, sample --out a folder, and
    Ctrl-C in eval: one line each, no traceback (before: tracebacks)."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *TINY, "--out", str(tmp_path / "n"), "--set", "name=foo"]) == 2
    assert "'name' cannot be overridden" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", str(afile)])
    assert "is a file, not a run directory" in capsys.readouterr().err
    assert main(["train", *TINY, "--steps", "1", "--out", str(afile / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vflow train: error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):
        main(["sample", "--run", small_run, "--out", str(tmp_path)])
    assert "is a folder; give a file name" in capsys.readouterr().err
    assert main(["sample", "--run", small_run, "--n", "4", "--out", str(tmp_path / "g")]) == 0
    assert (tmp_path / "g.png").is_file()
    assert f"wrote {tmp_path / 'g.png'}" in capsys.readouterr().out

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("vflow.evaluate.evaluate", interrupted)
    assert main(["eval", "--run", small_run, "--samples", "2"]) == 130
    assert capsys.readouterr().err.strip() == "vflow eval: interrupted"

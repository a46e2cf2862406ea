"""Stops lose nothing (issue 29, trainer parts): SIGINT / SIGTERM at any moment of an
iteration stop the run at the end of that iteration with a consistent checkpoint, and the
resumed run equals an uninterrupted one bit for bit (weights, Adam, EMA, data position, RNG
states, logged metrics); SIGUSR1 checkpoints and goes on; under DDP the ranks stop after the
same iteration; unreadable checkpoints are named and passed over; a resume that contradicts
the run's settings is refused; ``--no-final-eval`` skips only the final evaluation.

On the code before issue 29 a KeyboardInterrupt inside an iteration left a checkpoint one
batch ahead of its step (the resumed weights differed by up to 0.0175), SIGTERM wrote
nothing, and a truncated checkpoint gave a 23-line traceback.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from test_train import TinyModel, _free_port, tiny_build
from test_train import _args as train_args

import vflow.step
from vflow import train as T
from vflow.checkpoints import CheckpointError, load_checkpoint
from vflow.cli import main
from vflow.data import BatchStream, load_dataset
from vflow.evaluate import read_metrics
from vflow.interrupts import StopRequests, TrainingInterrupted

STEPS = 12


def _args(tmp_path, name="run", **kw):
    """tests/test_train.py's arguments (12 steps of the tiny model) with a logging window of
    4 steps, so that stops fall inside and at the end of windows."""
    return train_args(tmp_path, name, **{"log_every": 4, **kw})


def _signal_self(signum):
    os.kill(os.getpid(), signum)


def _assert_same_state(a: dict, b: dict):
    """Two checkpoints hold the same training state, bit for bit."""
    for key in ("model", "optimizer", "ema", "data_position", "rng", "window"):
        _assert_equal(a[key], b[key], key)
    assert (a["step"], a["skipped"], a["bad_streak"]) == (b["step"], b["skipped"], b["bad_streak"])


def _assert_equal(x, y, where):
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y), where
    elif isinstance(x, dict):
        assert x.keys() == y.keys(), where
        for k in x:
            _assert_equal(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            _assert_equal(u, v, f"{where}[{i}]")
    else:
        assert x == y, where


def _train_rows(run_dir):
    return [
        (r["step"], r["train_bpd"], r["grad_norm"], r["skipped"])
        for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
        if r["kind"] == "train"
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the whole run without a stop."""
    tmp = tmp_path_factory.mktemp("full")
    T.train(_args(tmp), build_fn=tiny_build)
    run = str(tmp / "run")
    return load_checkpoint(T.latest_checkpoint(run)), _train_rows(run)


class SignalInForward(TinyModel):
    """Sends ``signum`` to its own process inside the ``at``-th ELBO call."""

    def __init__(self, signum, at):
        super().__init__()
        self.signum, self.at, self.calls = signum, at, 0

    def elbo(self, x):
        self.calls += 1
        if self.calls == self.at:
            _signal_self(self.signum)
        return super().elbo(x)


def _signal_at_call(monkeypatch, owner, name, signum, at):
    """Make the ``at``-th call of ``owner.name`` send ``signum`` (mid-call)."""
    original, calls = getattr(owner, name), [0]

    def patched(*args, **kwargs):
        calls[0] += 1
        if calls[0] == at:
            _signal_self(signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


POINTS = ["forward", "optimizer", "ema", "metrics read", "checkpoint write"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("point", POINTS)
def test_stop_anywhere_resumes_bit_for_bit(tmp_path, monkeypatch, uninterrupted, point, signum):
    build = tiny_build
    kw = {}
    if point == "forward":
        build = lambda spec: SignalInForward(signum, at=6)  # noqa: E731
    elif point == "optimizer":
        _signal_at_call(monkeypatch, torch.optim.Adam, "step", signum, at=6)
    elif point == "ema":
        _signal_at_call(monkeypatch, vflow.step.EMA, "update", signum, at=6)
    elif point == "metrics read":
        _signal_at_call(monkeypatch, vflow.step.StepHistory, "read", signum, at=1)
    else:  # during the periodic checkpoint at step 5
        kw = dict(ckpt_every=5)
        _signal_at_call(monkeypatch, T, "save_checkpoint", signum, at=1)
    with pytest.raises(TrainingInterrupted) as stop:
        T.train(_args(tmp_path, **kw), build_fn=build)
    assert stop.value.exit_code == 128 + signum
    ck = load_checkpoint(stop.value.checkpoint)
    expected_step = {"metrics read": 4, "checkpoint write": 5}.get(point, 6)
    assert ck["reason"] == "interrupt" and ck["step"] == stop.value.step == expected_step
    stream = BatchStream(load_dataset("digits", "train"), 16, seed=3)
    for _ in range(expected_step):
        stream.next()
    assert ck["data_position"] == stream.state_dict()  # no batch skipped or repeated
    monkeypatch.undo()
    T.train(_args(tmp_path, resume=True), build_fn=tiny_build)
    full, full_rows = uninterrupted
    _assert_same_state(load_checkpoint(T.latest_checkpoint(str(tmp_path / "run"))), full)
    assert _train_rows(str(tmp_path / "run")) == full_rows


def test_sigusr1_writes_a_checkpoint_and_goes_on(tmp_path, uninterrupted):
    res = T.train(_args(tmp_path), build_fn=lambda spec: SignalInForward(signal.SIGUSR1, 3))
    assert res.step == STEPS
    ck = load_checkpoint(os.path.join(res.run_dir, "ckpt-00000003.pt"))
    assert ck["reason"] == "requested" and ck["step"] == 3
    _assert_same_state(load_checkpoint(res.checkpoint), uninterrupted[0])


def test_second_ctrl_c_stops_at_once():
    # the handler found on entry: Python's default, or SIG_IGN when the test process was
    # started in the background by a non-interactive shell (which ignores SIGINT there)
    before = signal.getsignal(signal.SIGINT)
    with StopRequests() as stops:
        stops.deferring = True  # as in the training loop
        _signal_self(signal.SIGINT)
        assert stops.stop == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            _signal_self(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_cli_sigterm_exits_143_and_resumes_exactly(tmp_path):
    """A real ``vflow train`` process stopped by SIGTERM (what schedulers send) while it
    trains: exit status 143, a checkpoint at the step reached, and the resumed run equals
    an uninterrupted one."""
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "vflow", "train", "--out", str(out), "--batch-size", "8"]
    cmd += ["--steps", "100000", "--log-every", "1", "--eval-every", "0", "--no-progress"]
    cmd += ["--ckpt-every", "0", "--no-final-eval", "--n-samples", "0", "--seed", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    for line in proc.stdout:  # the start-up line, then wait for two logged steps
        if "training on" in line:
            break
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, proc.stdout.read()
    stopped = load_checkpoint(T.latest_checkpoint(str(out)))
    assert stopped["reason"] == "interrupt" and stopped["step"] >= 2
    total = stopped["step"] + 3
    common = dict(steps=total, log_every=1, eval_every=0, ckpt_every=0, progress=False)
    common.update(final_eval=False, n_samples=0)
    T.train(T.TrainArgs(out=str(out), resume=True, **common))
    full = str(tmp_path / "full")
    T.train(T.TrainArgs(out=full, batch_size=8, seed=4, **common))
    _assert_same_state(
        load_checkpoint(T.latest_checkpoint(str(out))), load_checkpoint(T.latest_checkpoint(full))
    )
    assert _train_rows(str(out)) == _train_rows(full)


# ----------------------------------------------------------------------------- DDP


def _ddp_worker(rank, world, port, out, kw, signal_at):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    at = signal_at.get(rank)
    build = (lambda spec: SignalInForward(signal.SIGTERM, at)) if at else tiny_build
    result = {}
    try:
        res = T.train(T.TrainArgs(**kw), build_fn=build)
        result = {"step": res.step}
    except TrainingInterrupted as stop:
        result = {"step": stop.step, "exit_code": stop.exit_code}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/test_train.py's _ddp_worker


def _ddp(tmp_path, name, kw, signal_at=None):
    out = tmp_path / name
    out.mkdir(exist_ok=True)
    args = (2, _free_port(), str(out), kw, signal_at or {})
    mp.spawn(_ddp_worker, args=args, nprocs=2, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_ranks_stop_after_the_same_iteration_and_resume_exactly(tmp_path):
    """Rank 1 alone receives SIGTERM, inside its 3rd iteration: both ranks stop at the
    logging boundary after iteration 4 (where they agree), write one consistent checkpoint
    and the resumed two-rank run equals an uninterrupted one."""
    kw = dict(
        config="vflow-digits",
        steps=8,
        batch_size=16,
        lr=1e-2,
        warmup=2,
        log_every=2,
        eval_every=0,
        ckpt_every=0,
        final_eval=False,
        n_samples=0,
        progress=False,
        seed=5,
        ema_decay=0.9,
    )
    run = str(tmp_path / "run")
    stopped = _ddp(tmp_path, "a", dict(out=run, **kw), signal_at={1: 3})
    assert stopped == [{"step": 4, "exit_code": 143}] * 2
    ck = load_checkpoint(T.latest_checkpoint(run))
    assert ck["step"] == 4 and len(ck["rng"]) == 2 and ck["rng"][1] is not None
    assert _ddp(tmp_path, "b", dict(out=run, resume=True, **kw)) == [{"step": 8}] * 2
    full = str(tmp_path / "full")
    assert _ddp(tmp_path, "c", dict(out=full, **kw)) == [{"step": 8}] * 2
    _assert_same_state(
        load_checkpoint(T.latest_checkpoint(run)), load_checkpoint(T.latest_checkpoint(full))
    )


# ----------------------------------------------------------------------------- bad files


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_resume_passes_over_a_truncated_checkpoint(tmp_path, capsys, uninterrupted):
    T.train(_args(tmp_path, steps=10, ckpt_every=5), build_fn=tiny_build)
    newest = os.path.join(str(tmp_path / "run"), "ckpt-00000010.pt")
    _truncate(newest)
    with pytest.raises(CheckpointError, match="ckpt-00000010.pt cannot be read"):
        load_checkpoint(newest)
    T.train(_args(tmp_path, resume=True), build_fn=tiny_build)
    out = capsys.readouterr().out
    assert "ckpt-00000010.pt cannot be read" in out and "resuming from" in out
    assert "ckpt-00000005.pt" in out
    assert os.path.isfile(newest + ".unreadable")  # moved aside, not deleted
    _assert_same_state(
        load_checkpoint(T.latest_checkpoint(str(tmp_path / "run"))), uninterrupted[0]
    )


def test_unreadable_checkpoints_give_one_line_naming_the_file(tmp_path, capsys):
    T.train(_args(tmp_path, steps=2), build_fn=tiny_build)
    run = str(tmp_path / "run")
    (ckpt,) = T.list_checkpoints(run)
    _truncate(ckpt)
    for argv in (
        ["eval", "--run", run],
        ["sample", "--run", run, "--out", str(tmp_path / "s.png")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and os.path.basename(ckpt) in err[0] and "cannot be read" in err[0]
    assert main(["train", "--resume", "--out", run]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint of" in err[0] and os.path.basename(ckpt) in err[0]
    torch.save({"weights": torch.zeros(2)}, ckpt)
    with pytest.raises(CheckpointError, match="not a vflow training checkpoint .missing"):
        load_checkpoint(ckpt)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(str(tmp_path / "nope.pt"))


def test_load_run_model_falls_back_with_a_warning(tmp_path, capsys):
    T.train(_args(tmp_path, steps=4, ckpt_every=2), build_fn=tiny_build)
    run = str(tmp_path / "run")
    _truncate(os.path.join(run, "ckpt-00000004.pt"))
    model, ck = T.load_run_model(run, build_fn=tiny_build)
    assert ck["step"] == 2
    assert "ckpt-00000004.pt cannot be read" in capsys.readouterr().err


# ----------------------------------------------------------------------------- resume options


def test_resume_refuses_options_that_contradict_the_run(tmp_path):
    T.train(_args(tmp_path, steps=2), build_fn=tiny_build)
    for option, value, message in [
        ("config", "flowpp-digits", "--config 'flowpp-digits' (the run has 'vflow-digits')"),
        ("batch_size", 32, "--batch-size 32 (the run has 16)"),
        ("data", "cifar10", "--data 'cifar10' (the run has 'digits')"),
        ("seed", 4, "--seed 4 (the run has 3)"),
        ("overrides", {"hidden": 8}, "--set {'hidden': 8} (the run has {})"),
        ("lr", 0.5, "--lr 0.5 (the run has 0.01)"),
    ]:
        with pytest.raises(ValueError, match="contradict") as err:
            T.train(_args(tmp_path, steps=4, resume=True, **{option: value}), build_fn=tiny_build)
        assert message in str(err.value)
    assert T.latest_checkpoint(str(tmp_path / "run")).endswith("ckpt-00000002.pt")  # unchanged
    # the same values again, or none, are fine; --backend and --steps may change
    res = T.train(_args(tmp_path, steps=3, resume=True, backend="reference"), build_fn=tiny_build)
    bare = T.TrainArgs(out=str(tmp_path / "run"), resume=True, steps=4, progress=False)
    assert res.step == 3 and T.train(bare, build_fn=tiny_build).step == 4


def test_no_final_eval_is_kept_on_resume_and_still_writes_the_images(tmp_path):
    run = tmp_path / "run"
    T.train(_args(tmp_path, steps=2, final_eval=False, n_samples=4), build_fn=tiny_build)
    assert (run / "samples.png").is_file() and (run / "loss.png").is_file()
    assert not any(r["kind"] == "eval" for r in read_metrics(str(run / "metrics.jsonl")))
    res = T.train(
        T.TrainArgs(out=str(run), resume=True, steps=3, progress=False, n_samples=0),
        build_fn=tiny_build,
    )
    assert res.final is None  # not given again: the run's --no-final-eval holds
    res = T.train(
        T.TrainArgs(out=str(run), resume=True, steps=4, progress=False, final_eval=True),
        build_fn=tiny_build,
    )
    assert res.final is not None


def test_vflow_load_reads_a_run_or_a_checkpoint(tmp_path):
    import vflow

    args = _args(tmp_path, steps=2, batch_size=8, ckpt_every=1, keep=5, config="flowpp-digits")
    T.train(args)
    run = str(tmp_path / "run")
    model = vflow.load(run)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    same = vflow.load(os.path.join(run, "ckpt-00000002.pt"), device="auto")
    older = vflow.load(os.path.join(run, "ckpt-00000001.pt"))
    raw = vflow.load(run, ema=False)
    x = load_dataset("digits", "test").images[:4].long()
    with torch.no_grad():
        for m in (model, same, older, raw):
            m.to("cpu")
        torch.manual_seed(0)
        bpd = model.bpd(x)
        torch.manual_seed(0)
        assert torch.equal(same.bpd(x), bpd)
        torch.manual_seed(0)
        assert not torch.equal(older.bpd(x), bpd)
        torch.manual_seed(0)
        assert not torch.equal(raw.bpd(x), bpd)  # EMA weights are not the raw weights
    with pytest.raises(FileNotFoundError, match="no run directory or checkpoint file at"):
        vflow.load(str(tmp_path / "nope"))


# ----------------------------------------------------------------------------- found by review


def test_adam_moments_take_their_parameters_layout_on_load():
    """Moments saved from a channels_last run and loaded for contiguous parameters (or the
    other way round) must update the same weights as plain Adam: fused Adam pairs them
    element by element in memory (0.15 off after one step before the fix)."""
    from vflow.step import match_parameter_layouts

    torch.manual_seed(0)
    w0, g1, g2 = (torch.randn(8, 2, 3, 3, dtype=torch.float64) for _ in range(3))

    def adam(param):
        return torch.optim.Adam([param], lr=0.1, fused=True)

    for saved_layout, load_layout in [
        (torch.channels_last, torch.contiguous_format),
        (torch.contiguous_format, torch.channels_last),
    ]:
        ref = torch.nn.Parameter(w0.clone())
        opt = adam(ref)
        for g in (g1, g2):
            ref.grad = g.clone()
            opt.step()
        saved = torch.nn.Parameter(w0.clone().to(memory_format=saved_layout))
        first = adam(saved)
        saved.grad = g1.clone().to(memory_format=saved_layout)
        first.step()
        loaded = torch.nn.Parameter(saved.detach().clone().to(memory_format=load_layout))
        second = adam(loaded)
        second.load_state_dict(first.state_dict())
        match_parameter_layouts(second)
        loaded.grad = g2.clone().to(memory_format=load_layout)
        second.step()
        torch.testing.assert_close(loaded.detach(), ref.detach(), rtol=1e-12, atol=1e-12)


def test_resume_keeps_the_run_options(tmp_path):
    """A bare --resume keeps the run's logging, evaluation and checkpoint intervals, kept
    checkpoints, sample grid and memory layout (they used to fall back to the defaults)."""
    kw = dict(log_every=3, eval_every=3, ckpt_every=2, keep=10, n_samples=2, eval_images=8)
    T.train(_args(tmp_path, steps=4, **kw), build_fn=tiny_build)
    bare = T.TrainArgs(out=str(tmp_path / "run"), resume=True, steps=8, progress=False)
    T.train(bare, build_fn=tiny_build)
    run = tmp_path / "run"
    steps = [int(p.name[5:13]) for p in sorted(run.glob("ckpt-*.pt"))]
    assert steps == [2, 4, 6, 8]
    assert (run / "samples-00000006.png").is_file()  # the resumed part's evaluation
    saved = json.loads((run / "run.json").read_text())["args"]
    assert {k: saved[k] for k in ("log_every", "eval_every", "ckpt_every", "keep")} == {
        "log_every": 3,
        "eval_every": 3,
        "ckpt_every": 2,
        "keep": 10,
    }
    rows = read_metrics(str(run / "metrics.jsonl"))
    assert [r["step"] for r in rows if r["kind"] == "train"] == [3, 4, 6, 8]  # 4: end of part 1


def test_resume_from_an_older_checkpoint_keeps_one_row_per_step(tmp_path, uninterrupted):
    """A run killed after its last checkpoint (rows of steps 9-12 written, no checkpoint
    after 8) resumes from step 8 and logs steps 9-12 once, as the uninterrupted run."""
    T.train(_args(tmp_path, ckpt_every=8), build_fn=tiny_build)
    run = tmp_path / "run"
    os.remove(run / "ckpt-00000012.pt")  # as if killed before the final checkpoint
    T.train(_args(tmp_path, resume=True), build_fn=tiny_build)
    assert _train_rows(str(run)) == uninterrupted[1]
    # a new run into a folder with old metrics and no checkpoint starts a new file
    for p in run.glob("ckpt-*.pt"):
        os.remove(p)
    T.train(_args(tmp_path, steps=4), build_fn=tiny_build)
    assert [r[0] for r in _train_rows(str(run))] == [4]


class SignalDuringFinalEval(TinyModel):
    """Sends ``signum`` from the final evaluation (its importance-weighted bound)."""

    def __init__(self, signum):
        super().__init__()
        self.signum = signum

    def log_prob(self, x, num_samples=16, chunk_size=None):
        _signal_self(self.signum)
        return super().log_prob(x, num_samples, chunk_size)


def test_signals_outside_the_loop(tmp_path, capsys):
    """SIGUSR1 while setting up or evaluating is ignored (it used to kill the process);
    SIGTERM during the final evaluation stops it, after samples.png, loss.png and the final
    checkpoint were written, and says how to get the numbers."""

    def build_and_signal(spec):
        _signal_self(signal.SIGUSR1)  # during set-up
        return SignalDuringFinalEval(signal.SIGUSR1)

    res = T.train(_args(tmp_path, "a", final_eval=True), build_fn=build_and_signal)
    assert res.final is not None and "SIGUSR1 ignored" in capsys.readouterr().err
    args = _args(tmp_path, "b", final_eval=True, n_samples=4)
    with pytest.raises(TrainingInterrupted) as stop:
        T.train(args, build_fn=lambda spec: SignalDuringFinalEval(signal.SIGTERM))
    assert stop.value.exit_code == 143 and stop.value.checkpoint is None
    run = tmp_path / "b"
    assert (run / "samples.png").is_file() and (run / "loss.png").is_file()
    assert load_checkpoint(T.latest_checkpoint(str(run)))["step"] == STEPS
    assert "the final evaluation was interrupted" in capsys.readouterr().out


def test_a_failed_checkpoint_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def interrupted_save(state, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a second Ctrl-C in the middle of the write

    monkeypatch.setattr(torch, "save", interrupted_save)
    with pytest.raises(KeyboardInterrupt):
        T.save_checkpoint({"step": 1}, str(tmp_path), 1)
    assert os.listdir(tmp_path) == []


def test_weights_that_do_not_fit_the_model_name_the_checkpoint(tmp_path, capsys):
    T.train(_args(tmp_path, steps=4, ckpt_every=2), build_fn=tiny_build)
    run = str(tmp_path / "run")
    newest = os.path.join(run, "ckpt-00000004.pt")
    ck = load_checkpoint(newest)
    del ck["model"]["bias"]
    torch.save(ck, newest)
    model, used = T.load_run_model(run, build_fn=tiny_build)  # falls back to step 2
    assert used["step"] == 2 and "do not fit the model" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="ckpt-00000004.pt: its weights do not fit"):
        T.load_run_model(newest, build_fn=tiny_build)


def test_resume_refuses_a_length_it_has_passed(tmp_path):
    T.train(_args(tmp_path, steps=4), build_fn=tiny_build)
    for steps in (3, 4):
        with pytest.raises(ValueError, match="at step 4 already, and the run is"):
            T.train(_args(tmp_path, steps=steps, resume=True), build_fn=tiny_build)


def test_resume_accepts_overrides_equal_to_the_config(tmp_path):
    """--set dropout=0.0 on a vflow-digits run (whose dropout is 0.0) is no change."""
    T.train(_args(tmp_path, steps=1, batch_size=8, n_samples=0))
    res = T.train(_args(tmp_path, steps=2, batch_size=8, resume=True, overrides={"dropout": 0.0}))
    assert res.step == 2
    with pytest.raises(ValueError, match="--set"):
        T.train(_args(tmp_path, steps=3, batch_size=8, resume=True, overrides={"dropout": 0.1}))

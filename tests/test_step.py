"""The device-resident training iteration (vflow.step, issue 26).

* Equivalence: 50 iterations of vflow-digits with dropout, a planted non-finite iteration
  included, against the plain loop the trainer ran before (Python-float learning rate,
  Adam's per-tensor path, a Python decision to skip, ``e = d e + (1 - d) p``), written out
  here independently: equal to 1e-10 in float64, and to float32 rounding in float32.
* No host reads: the trainer's iteration calls none of ``.item()``, ``.cpu()``,
  ``.tolist()``, ``.numpy()``, ``bool`` / ``float`` / ``int`` of a tensor, and dispatches no
  ``aten::_local_scalar_dense``, between two logging windows; the window is read once.
* The non-finite iteration is skipped on the device: weights, Adam's moments and step
  count, and the EMA unchanged.
* CUDA graphs: graphed iterations equal eager ones bit for bit (CUDA only), and the CPU
  refuses ``--cuda-graphs`` with one clear sentence.
"""

import copy
import math
import shutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vflow
from vflow import train as T
from vflow.checkpoints import load_checkpoint
from vflow.data import BatchStream, load_dataset
from vflow.recipe import get_recipe, learning_rate
from vflow.step import EMA, LN2, GraphedStep, StepHistory, TrainStep

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 50
NAN_AT = {7}  # 1-based iteration whose ELBO is made NaN


class PlantedNaN(torch.nn.Module):
    """``x -> model.elbo(x)``, NaN at the iterations in ``bad`` (counting calls from 1)."""

    def __init__(self, model, bad):
        super().__init__()
        self.model, self.bad, self.calls = model, set(bad), 0

    def forward(self, x):
        self.calls += 1
        elbo = self.model.elbo(x)
        return elbo * float("nan") if self.calls in self.bad else elbo


def _problem(dtype, batch=16):
    """An initialised vflow-digits model with dropout, its batches and recipe."""
    torch.manual_seed(0)
    model = vflow.build("vflow-digits", dropout=0.2).to(dtype)
    data = load_dataset("digits", "train")
    stream = BatchStream(data, batch, seed=1)
    batches = [stream.next() for _ in range(STEPS)]
    with torch.no_grad():
        model.initialize(T.init_batch(data, 64, 0))
    recipe = get_recipe("vflow-digits", warmup=10)
    return model, batches, recipe, math.prod(data.shape)


def plain_loop(model, batches, recipe, dims):
    """The trainer's iteration before issue 26, as it was written: returns the losses, the
    model and the EMA parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=learning_rate(1, recipe), betas=recipe["betas"])
    objective = PlantedNaN(model, NAN_AT)
    ema = {k: p.detach().clone() for k, p in model.named_parameters()}
    updates, losses = 0, []
    for i, x in enumerate(batches, start=1):
        for g in opt.param_groups:
            g["lr"] = learning_rate(i, recipe)
        model.train()
        loss = -objective(x).mean() / (dims * LN2)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, recipe["grad_clip"]).item()
        if math.isfinite(loss.item()) and math.isfinite(gnorm):
            opt.step()
            d = min(recipe["ema_decay"], (1 + updates) / (10 + updates))
            with torch.no_grad():
                for k, p in model.named_parameters():
                    ema[k].mul_(d).add_(p.detach(), alpha=1 - d)
            updates += 1
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, model, ema


def device_loop(model, batches, recipe, dims):
    """The same iterations with vflow.step.TrainStep."""
    ema = EMA(model, recipe["ema_decay"])
    history = StepHistory(len(batches), torch.device("cpu"))
    step = TrainStep(PlantedNaN(model, NAN_AT), model, ema, recipe, dims, history)
    for x in batches:
        step(x)
    rows = history.read()
    assert [i + 1 for i, (_, _, ok) in enumerate(rows) if not ok] == sorted(NAN_AT)
    return [loss for loss, _, _ in rows], model, ema.params


@pytest.mark.parametrize(
    "dtype, rtol", [(torch.float64, 1e-10), (torch.float32, None)], ids=["float64", "float32"]
)
def test_device_step_equals_the_plain_loop(dtype, rtol):
    model, batches, recipe, dims = _problem(dtype)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        old_losses, old_model, old_ema = plain_loop(copy.deepcopy(model), batches, recipe, dims)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        new_losses, new_model, new_ema = device_loop(copy.deepcopy(model), batches, recipe, dims)
    assert math.isnan(old_losses[6]) and math.isnan(new_losses[6])
    old_w = torch.cat([p.detach().flatten() for p in old_model.parameters()])
    new_w = torch.cat([p.detach().flatten() for p in new_model.parameters()])
    moved = (old_w - torch.cat([p.flatten() for p in model.parameters()])).abs().max()
    assert moved > 1e-3  # the iterations did train
    if rtol is None:  # float32: rounding differences, amplified by 50 Adam steps
        # measured: max |dw| 3.4e-5 (weights moved by up to 0.085), losses 2.5e-7 relative;
        # float64: 5.7e-14 and 4.3e-16
        rtol, atol = 1e-4, 1e-4
    else:
        atol = 1e-12
    torch.testing.assert_close(new_w, old_w, rtol=rtol, atol=atol)
    torch.testing.assert_close(
        torch.tensor(new_losses, dtype=torch.float64),
        torch.tensor(old_losses, dtype=torch.float64),
        rtol=rtol,
        atol=atol,
        equal_nan=True,
    )
    for k, v in old_ema.items():
        torch.testing.assert_close(new_ema[k], v, rtol=rtol, atol=atol, msg=k)


def test_nonfinite_iteration_changes_nothing_on_the_device():
    model, batches, recipe, dims = _problem(torch.float32, batch=8)
    ema = EMA(model, 0.9)
    history = StepHistory(4, torch.device("cpu"))
    step = TrainStep(PlantedNaN(model, {3}), model, ema, recipe, dims, history)
    step(batches[0])
    step(batches[1])
    before = copy.deepcopy(
        (model.state_dict(), step.opt.state_dict()["state"], ema.state_dict(), step.count)
    )
    step(batches[2])  # NaN: skipped
    after = (model.state_dict(), step.opt.state_dict()["state"], ema.state_dict(), step.count)
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k
    for i, state in before[1].items():
        for k, v in state.items():
            assert torch.equal(after[1][i][k], v), (i, k)
    assert after[2]["updates"] == before[2]["updates"] == 2
    for k, v in before[2]["params"].items():
        assert torch.equal(after[2]["params"][k], v), k
    assert int(after[3]) == 3  # the iteration still counts (its batch was consumed)
    step(batches[3])
    assert [ok for _, _, ok in history.read()] == [True, True, False, True]
    assert step.opt.state_dict()["state"][0]["step"].item() == 3


# ----------------------------------------------------------------------------- no host reads

_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReads:
    """Counts calls of the Tensor methods that read values on the host (by name)."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in _READS:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def method(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return method


class NoLocalScalarDense(TorchDispatchMode):
    """Fails on ``aten::_local_scalar_dense``: every host read of a value dispatches it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("a host read (aten::_local_scalar_dense) inside the step")
        return func(*args, **(kwargs or {}))


def _trainer(tmp_path, **kw):
    args = T.TrainArgs(
        out=str(tmp_path / "run"),
        batch_size=8,
        log_every=100,
        eval_every=0,
        ckpt_every=0,
        final_eval=False,
        n_samples=0,
        progress=False,
        **{"overrides": {"dropout": 0.2}, **kw},
    )
    trainer = T.Trainer(args)
    trainer.train_step()  # Adam's state exists from here on
    return trainer


def test_training_step_reads_nothing_on_the_host(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    reads = HostReads(monkeypatch)
    for _ in range(3):
        trainer.train_step()
    assert reads.calls == []
    trainer._log_training()  # the window: read once
    assert reads.calls == ["tolist"]


def test_training_step_dispatches_no_local_scalar_dense(tmp_path):
    trainer = _trainer(tmp_path, grad_clip=0.0)  # the unclipped norm too
    with NoLocalScalarDense():
        for _ in range(3):
            trainer.train_step()
    assert trainer.step == 4
    with pytest.raises(AssertionError, match="host read"), NoLocalScalarDense():
        bool(trainer.step_fn.count > 0)  # the mode does see a read


# ----------------------------------------------------------------------------- devices


def test_cuda_graphs_flag_is_refused_on_the_cpu(tmp_path, capsys):
    from vflow.cli import main

    with pytest.raises(ValueError, match="--cuda-graphs needs a CUDA device"):
        T.train(T.TrainArgs(out=str(tmp_path / "a"), device="cpu", cuda_graphs=True))
    assert main(["train", "--out", str(tmp_path / "b"), "--device", "cpu", "--cuda-graphs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--cuda-graphs needs a CUDA device" in err[0]


def test_device_auto_and_bad_devices(monkeypatch):
    assert T.resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert T.resolve_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert T.resolve_device("auto") == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        T.resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be auto, cpu, cuda or cuda:N"):
        T.resolve_device("gpu")


def test_graphed_step_needs_cuda_and_a_capturable_step():
    model, batches, recipe, dims = _problem(torch.float32, batch=8)
    history = StepHistory(2, torch.device("cpu"))
    plain = TrainStep(model.elbo, model, EMA(model, 0.9), recipe, dims, history)
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(plain)
    capturable = TrainStep(
        model.elbo, model, EMA(model, 0.9), recipe, dims, history, capturable=True
    )
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(capturable)


class DeviceNaN(torch.nn.Module):
    """``x -> model.elbo(x) * factors[counter]`` with the counter read on the device, so that
    a planted NaN reaches a replayed CUDA graph too (``counter`` is set after the step is
    built: the step's own iteration counter)."""

    def __init__(self, model, factors):
        super().__init__()
        self.model, self.factors, self.counter = model, factors, None

    def forward(self, x):
        return self.model.elbo(x) * self.factors.index_select(0, self.counter.view(1))


@pytest.mark.gpu
def test_graphed_steps_equal_eager_steps_on_cuda(device):
    """20 iterations of vflow-digits with dropout and a NaN planted at iteration 7:
    replayed as a CUDA graph (after 3 eager warm-up iterations) they give the eager
    iterations' losses, skips and weights bit for bit."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    results = []
    for graphed in (False, True):
        model, batches, recipe, dims = _problem(torch.float32)
        model = model.to(device)
        ema = EMA(model, 0.9)
        history = StepHistory(STEPS, device)
        factors = torch.ones(STEPS, device=device)
        factors[6] = float("nan")
        objective = DeviceNaN(model, factors)
        with torch.random.fork_rng(devices=[device]):
            torch.manual_seed(3)
            step = TrainStep(objective, model, ema, recipe, dims, history, capturable=graphed)
            objective.counter = step.count
            run = GraphedStep(step) if graphed else step
            for x in batches[:20]:
                run(x.to(device))
            rows = history.read()
        results.append((rows, torch.cat([p.detach().flatten() for p in model.parameters()])))
    (eager_rows, eager_w), (graph_rows, graph_w) = results
    assert [ok for _, _, ok in eager_rows].count(False) == 1
    assert [r[2] for r in graph_rows] == [r[2] for r in eager_rows]
    assert torch.equal(graph_w, eager_w)
    torch.testing.assert_close(
        torch.tensor(graph_rows), torch.tensor(eager_rows), rtol=0, atol=0, equal_nan=True
    )


@pytest.mark.gpu
def test_graphed_run_resumes_bit_for_bit_graphed_or_not_on_cuda(device, tmp_path):
    """``vflow train --cuda-graphs`` stopped at step 5 and resumed, with and without CUDA
    graphs, ends where the uninterrupted graphed run ends, bit for bit."""
    if device.type != "cuda":
        pytest.skip("CUDA graphs need --device cuda")
    kw = dict(batch_size=16, log_every=2, eval_every=0, ckpt_every=0, final_eval=False)
    kw.update(n_samples=0, progress=False, device=str(device), overrides={"dropout": 0.2})
    T.train(T.TrainArgs(out=str(tmp_path / "full"), steps=10, cuda_graphs=True, **kw))
    T.train(T.TrainArgs(out=str(tmp_path / "a"), steps=5, cuda_graphs=True, **kw))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    kw.pop("overrides")
    T.train(T.TrainArgs(out=str(tmp_path / "a"), steps=10, resume=True, cuda_graphs=True, **kw))
    T.train(T.TrainArgs(out=str(tmp_path / "b"), steps=10, resume=True, **kw))
    full = load_checkpoint(T.latest_checkpoint(str(tmp_path / "full")))
    for name in ("a", "b"):
        ck = load_checkpoint(T.latest_checkpoint(str(tmp_path / name)))
        assert ck["step"] == 10
        for part in ("model", "ema"):
            flat_full = torch.cat([v.flatten().float() for v in _tensors(full[part])])
            flat = torch.cat([v.flatten().float() for v in _tensors(ck[part])])
            assert torch.equal(flat, flat_full), (name, part)


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    return []

"""Regional compilation (``vflow.compile``): the compiled training step equals the eager one,
and every kind of network block is compiled once, whatever its number of instances.

One tiny float64 model with dropout, on the reference backend, is stepped once eagerly and
once regionally compiled (inductor, as ``vflow train --compile`` runs it) from the same seed;
the two tests read that one compilation (a module-scoped fixture), to keep CI time small."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch._inductor.config
from torch._dynamo.utils import counters

import vflow
from vflow import compile as C
from vflow.models import f_checker, g_checker

SEED = 1


def _tiny():
    """vflow-digits with 8-filter networks of two blocks (p: four attention blocks of one
    shape; q, r: conditional blocks without attention; a one-block context network) and
    dropout 0.2, float64, data-initialised, in training mode."""
    torch.manual_seed(0)
    model = vflow.build(
        "vflow-digits",
        backend="reference",
        dropout=0.2,
        p=(f_checker(2, 8, 2, 2),),
        q=(g_checker(2, 8, 2, 1),),
        r=(g_checker(2, 8, 2, 1),),
        context_blocks=1,
    ).double()
    c, h, w = model.config.data_shape
    x = torch.randint(0, model.config.n_bins, (4, c, h, w))
    model.initialize(x)
    return model.train(), x


def _step(model, x):
    """Loss and every parameter's gradient of one training step from seed ``SEED``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(SEED)
    loss = model.bpd(x).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _block_kinds(model, x) -> tuple[set, int]:
    """The distinct kinds of region calls in one training step (class, parameter shapes,
    context given or not, position-embedding shape: what a compiled graph is specialised
    on) and the number of region calls."""
    kinds, calls = set(), [0]

    def hook(module, args):
        calls[0] += 1
        tensors = tuple(tuple(a.shape) for a in args[1:] if isinstance(a, torch.Tensor))
        shapes = tuple(tuple(p.shape) for p in module.parameters())
        kinds.add((type(module).__name__, shapes, len(args), tensors))

    regions = [m for m in model.modules() if type(m) in C.REGION_CLASSES]
    handles = [m.register_forward_pre_hook(hook) for m in regions]
    _step(model, x)
    for h in handles:
        h.remove()
    return kinds, calls[0]


@pytest.fixture(scope="module")
def compiled_run():
    """The eager step, then the regionally compiled step (and a second one) of one model.
    The regions' CPU inductor options (``vflow.compile.region_options``: ``fallback_random``,
    eager's dropout masks; no layout optimisation) less the C++ wrapper, which generates the
    same kernels and would double the compilation time of this test."""
    patch = pytest.MonkeyPatch()
    patch.setattr(C, "compile_options", lambda device: None)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    counters.clear()
    try:
        model, x = _tiny()
        eager = _step(model, x)
        kinds, calls = _block_kinds(model, x)
        n_regions = C.compile_regions(model)
        compiled = _step(model, x)
        graphs = counters["stats"]["unique_graphs"]
        again = _step(model, x)
        yield dict(
            eager=eager,
            compiled=compiled,
            again=again,
            graphs=graphs,
            graphs_after_second_step=counters["stats"]["unique_graphs"],
            kinds=kinds,
            calls=calls,
            n_regions=n_regions,
        )
    finally:
        patch.undo()
        torch.set_num_threads(n_threads)
        torch._dynamo.reset()


def _assert_same(a, b, **tol):
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    torch.testing.assert_close(loss_a, loss_b, **tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name, **tol)


def test_regional_step_equals_eager_step(compiled_run):
    """Loss and every gradient, with dropout 0.2 (the same masks from the same seed: the
    regions are compiled with ``fallback_random``), equal the eager step's to 1e-10 relative
    in float64 (not bit for bit: inductor fuses and reorders the elementwise math)."""
    r = compiled_run
    assert r["graphs"] > 0  # the regions did run compiled code
    _assert_same(r["compiled"], r["eager"], rtol=1e-10, atol=1e-12)
    _assert_same(r["again"], r["eager"], rtol=1e-10, atol=1e-12)


def test_one_graph_per_kind_of_block_not_per_instance(compiled_run):
    """Every region instance of one kind (class, parameter shapes, arguments) reuses one
    compiled graph: the graphs are as many as the kinds, far fewer than the instances, and
    a second step compiles nothing."""
    r = compiled_run
    assert r["calls"] >= 3 * len(r["kinds"])  # the test model repeats its blocks
    assert r["n_regions"] == r["calls"]  # every region runs once per step
    assert r["graphs"] == len(r["kinds"])
    assert r["graphs_after_second_step"] == r["graphs"]


def test_only_training_steps_run_compiled_code(monkeypatch):
    """A region runs its compiled code in a training step only: evaluation (eval mode) and
    ``no_grad`` passes (sampling, the test ELBO) call the eager forward and never compile;
    ``uncompile_regions`` restores the eager forward."""
    calls = []

    def fake_compiled(cls, options, backend):
        def run(module, *args, **kwargs):
            calls.append(cls)
            return cls.forward(module, *args, **kwargs)

        return run

    monkeypatch.setattr(C, "_compiled_forward", fake_compiled)
    model, x = _tiny()
    n = C.compile_regions(model)
    with torch.no_grad():
        model.bpd(x)
    model.eval()
    model.bpd(x).mean().backward()
    assert calls == []
    model.train()
    model.bpd(x)
    assert len(calls) == n
    assert C.uncompile_regions(model) == n
    model.bpd(x)
    assert len(calls) == n


def test_compile_time_benchmark_quick_runs(tmp_path):
    """``benchmarks/compile_time.py --quick`` (a tiny model, regional, cold cache) runs and
    writes its row: graphs, compile seconds and the paired eager / compiled ratio."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "compile_time.py"
    out = tmp_path / "compile_time.json"
    cmd = [sys.executable, str(script), "--quick", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["mode"] == "regional" and row["graphs"] > 0, row
    assert row["compile_wall_s"] > 0 and row["speedup"] > 0
    assert abs(row["loss"] - row["eager_loss"]) < 0.05 * abs(row["eager_loss"])  # dropout differs

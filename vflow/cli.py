"""The ``vflow`` command line (also ``python -m vflow``).

    vflow train [--config NAME] [--data ...] [--out RUNDIR] [--steps N | --epochs N] ...
    vflow eval --run RUNDIR [--samples S] [--split test] [--batch-size B] [--out FILE.json]
    vflow sample --run RUNDIR [--n 64] [--temperature T] [--out FILE.png]
    vflow info [CONFIG]
    vflow --version

``vflow train`` with no options trains the small "vflow-digits" model on scikit-learn's
bundled 8x8 digits (17 grey levels, 20% held out with a fixed seed) for a few minutes on a
CPU, prints the test bits/dim of the ELBO and of the importance-weighted estimate, and writes
metrics.jsonl, loss.png, samples.png and checkpoints into runs/vflow-digits-<timestamp>.

All commands run unchanged under ``torchrun --nproc_per_node N``: ``--batch-size`` is the
GLOBAL batch (each rank takes batch/N images), and eval splits the images across ranks
(spell ``--run`` as ``--run-dir`` there: torchrun's parser claims ``--run`` as an
abbreviation of its own ``--run-path``; both spellings work for eval and sample).

Every option has a help text (tested). Mistakes get one line on stderr and exit status 2,
no traceback (``VFLOW_DEBUG=1`` shows it): an unknown ``--set`` field lists the valid ones,
a bad value names the field and the expected type (``vflow.models.CONFIG_FIELD_RULES``, the
same checks as ``vflow.build``). ``vflow eval`` prints its result before writing the JSON
file; a run directory it cannot write to costs the file, not the result.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import sys

from vflow import __version__
from vflow.compile import COMPILE_MODES
from vflow.precision import PRECISIONS

EVAL_SAMPLES = {"digits": 64, "cifar10": 4096, "imagenet32": 1024, "imagenet64": 1024}


def _configs() -> list[str]:
    from vflow.models import CONFIGS

    return list(CONFIGS)


def _check_config(parser: argparse.ArgumentParser, name: str) -> None:
    names = _configs()
    if name not in names:
        parser.error(f"unknown config {name!r}; valid configs: {', '.join(names)}")


def _parse_override(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass  # a plain string
    return key.strip(), value


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    v = _finite_float(text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return v


def _nonneg_float(text: str) -> float:
    v = _finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return v


def _unit_interval(text: str) -> float:
    v = _finite_float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return v


def _nonneg_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _run_dir_option(parser: argparse.ArgumentParser) -> None:
    """``--run`` / ``--run-dir`` (the same option), required."""
    parser.add_argument(
        "--run",
        "--run-dir",
        dest="run",
        required=True,
        metavar="RUNDIR",
        help="run directory (its newest readable ckpt-*.pt) or one checkpoint file; under "
        "torchrun spell it --run-dir (torchrun's own parser takes --run for its --run-path)",
    )


def _init_batch_size(text: str) -> int:
    v = int(text)
    if v < 2:
        raise argparse.ArgumentTypeError(
            f"expected an integer >= 2 (initialisation estimates per-element variances), got {v}"
        )
    return v


KEEP = " (default: {d}; a resumed run keeps its own)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vflow",
        description="Train, evaluate and sample VFlow / Flow++ models.",
        epilog="Run 'vflow train' with no options for the small digits demo (a few minutes "
        "on a CPU).",
    )
    p.add_argument(
        "--version", action="version", version=f"vflow {__version__}", help="print the version"
    )
    sub = p.add_subparsers(dest="command", metavar="{train,eval,sample,info}", title="commands")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train a model (default: vflow-digits on 8x8 digits)",
        description="Train a model. --batch-size is the global batch (split "
        "across torchrun ranks).",
    )
    t.add_argument(
        "--config",
        help="model config (default: vflow-digits; a resumed run keeps its own, and a "
        "different one is an error)",
    )
    t.add_argument(
        "--data",
        choices=["digits", "cifar10", "imagenet32", "imagenet64", "fashion-mnist", "mnist"],
        help="dataset (default: the config's, e.g. digits for *-digits, fashion-mnist for "
        "*-fashion)",
    )
    t.add_argument(
        "--data-dir",
        help="folder with the CIFAR-10 / ImageNet / MNIST IDX files (no download; "
        "fashion-mnist defaults to /usr/share/datasets/fashion-mnist, from Debian's "
        "dataset-fashion-mnist package)",
    )
    t.add_argument("--out", help="run directory (default: runs/<config>-<timestamp>)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--steps", type=_positive_int, help="training steps (default: the recipe's)")
    g.add_argument("--epochs", type=_positive_int, help="training epochs")
    t.add_argument("--batch-size", type=_positive_int, help="global batch size")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default: the recipe's)")
    t.add_argument("--warmup", type=_nonneg_int, help="linear warm-up steps")
    t.add_argument("--ema-decay", type=_unit_interval, help="EMA decay of the weights, in [0, 1)")
    t.add_argument("--grad-clip", type=_nonneg_float, help="global gradient-norm clip (0 = off)")
    t.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random horizontal flips (default: the recipe's)",
    )
    t.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "reference", "cpp", "triton"],
        help="ops backend of the couplings and attention: auto = triton on CUDA, cpp on CPU "
        "(default: %(default)s)",
    )
    t.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto = cuda when a GPU is available)",
    )
    t.add_argument(
        "--seed",
        type=int,
        help="seed of the initialisation, the batch order and the training noise (default: "
        "0; a resumed run keeps its own)",
    )
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument(
        "--set",
        dest="overrides",
        action="append",
        type=_parse_override,
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the model config (vflow.models.ModelConfig: dropout, "
        "context_filters, heads, ...; a wrong name lists them), e.g. --set dropout=0.2; "
        "repeatable; VALUE is a Python literal, else a string",
    )
    t.add_argument(
        "--log-every",
        type=_positive_int,
        help="steps between metrics.jsonl records" + KEEP.format(d=10),
    )
    t.add_argument(
        "--eval-every",
        type=_nonneg_int,
        help="steps between test ELBO + sample grids (0 = only at the end)" + KEEP.format(d=500),
    )
    t.add_argument(
        "--eval-images",
        type=_positive_int,
        default=512,
        help="test images of the periodic evaluation",
    )
    t.add_argument(
        "--ckpt-every",
        type=_nonneg_int,
        help="steps between checkpoints (0 = only at the end)" + KEEP.format(d=500),
    )
    t.add_argument("--keep", type=_positive_int, help="checkpoints kept" + KEEP.format(d=3))
    t.add_argument(
        "--iw-samples",
        type=_positive_int,
        help="importance samples of the final test evaluation (use 'vflow eval' for the "
        "paper's numbers)" + KEEP.format(d=16),
    )
    t.add_argument(
        "--final-eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="evaluate the test ELBO and importance-weighted bits/dim at the end (default: "
        "on). --no-final-eval skips only the final test evaluation: the final checkpoint, "
        "samples.png and loss.png are still written; a resumed run keeps the setting unless "
        "given",
    )
    t.add_argument(
        "--n-samples", type=_nonneg_int, help="images per sample grid" + KEEP.format(d=64)
    )
    t.add_argument(
        "--max-bad-steps",
        type=_positive_int,
        help="consecutive non-finite steps before stopping" + KEEP.format(d=20),
    )
    t.add_argument(
        "--init-batch-size",
        type=_init_batch_size,
        help="training images for the data-dependent initialisation, drawn independently of "
        "--batch-size (default: 128, or the training-set size if smaller)",
    )
    t.add_argument(
        "--init-scheme",
        choices=["official", "actnorm"],
        help="data-dependent initialisation: 'official' (every conv and ActNorm, as the "
        "official Flow++ code) or 'actnorm' (ActNorm only) (default: the model's, official)",
    )
    t.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: 1 for digits, else torch's default)",
    )
    t.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="channels_last memory format (faster convolutions on CPU; same likelihood)"
        + KEEP.format(d="off"),
    )
    t.add_argument(
        "--compile",
        nargs="?",
        const="regional",
        choices=COMPILE_MODES,
        help="torch.compile the training step on its first step: 'regional' (a bare "
        "--compile) compiles each repeated network block once per shape and reuses it "
        "across the model's instances; 'elbo' compiles the whole objective as one graph "
        "(faster steps on small models, far longer compilation on large ones)"
        + KEEP.format(d="off"),
    )
    t.add_argument(
        "--no-compile",
        dest="compile",
        action="store_const",
        const="off",
        help="same as --compile off (a resumed compiled run then trains eagerly)",
    )
    t.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="bf16-nets: the conditioning and context networks of training steps run under "
        "bf16 autocast; couplings, logdets, ActNorm, the 1x1 convs, evaluation and sampling "
        "stay float32 (paired vflow-digits trainings: test bpd 0.001 worse, docs/training.md)"
        + KEEP.format(d="fp32"),
    )
    t.add_argument(
        "--activation-checkpointing",
        action=argparse.BooleanOptionalAction,
        help="recompute the networks' residual blocks in the backward pass (selective "
        "torch.utils.checkpoint, keeping attention and 3x3 conv outputs): ~27%% of the "
        "step's memory growth at ~1.2x step time on vflow-cifar10" + KEEP.format(d="off"),
    )
    t.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="capture the whole training iteration (forward, backward, Adam, EMA) once and "
        "replay it as a CUDA graph (CUDA only; one batch shape)",
    )
    t.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no tqdm progress bar (log lines only)",
    )

    e = sub.add_parser(
        "eval",
        help="importance-weighted test bits/dim (Eq. 5) of a run, EMA weights",
        description="Evaluate a run's newest checkpoint: the ELBO and the importance-weighted "
        "bits/dim (Eq. 5). Prints the result, then writes it as JSON.",
    )
    _run_dir_option(e)
    e.add_argument(
        "--samples",
        type=_positive_int,
        help="importance samples S per image (default: 64 digits, 4096 CIFAR-10, "
        "1024 ImageNet, as in the paper)",
    )
    e.add_argument(
        "--split",
        default="test",
        choices=["test", "train", "valid"],
        help="data split to evaluate; valid: the held-out 10,000 training images of the "
        "MNIST-format sets (default: %(default)s)",
    )
    e.add_argument("--batch-size", type=_positive_int, default=16, help="images per pass")
    e.add_argument(
        "--chunk-size",
        type=_positive_int,
        help="importance samples per forward pass (default: the model's)",
    )
    e.add_argument("--max-images", type=_positive_int, help="evaluate only the first N images")
    e.add_argument("--data-dir", help="override the run's data directory")
    e.add_argument(
        "--backend",
        choices=["auto", "reference", "cpp", "triton"],
        help="ops backend (default: the run's)",
    )
    e.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto = cuda when a GPU is available)",
    )
    e.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the importance samples (default: %(default)s)",
    )
    e.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")
    e.add_argument(
        "--threads",
        type=_positive_int,
        help="torch CPU threads (default: 1 for digits, else torch's default)",
    )
    e.add_argument(
        "--out",
        metavar="FILE.json",
        help="where to write the result (default: RUNDIR/eval-<split>-S<samples>.json; "
        "if RUNDIR is not writable the result is only printed)",
    )

    s = sub.add_parser(
        "sample",
        help="a grid of samples from a run's EMA weights",
        description="Draw samples from a run's newest checkpoint and write them as a PNG grid.",
    )
    _run_dir_option(s)
    s.add_argument(
        "--n", type=_positive_int, default=64, help="number of samples (default: %(default)s)"
    )
    s.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="prior temperature T: samples invert N(0, T^2 I) (default: %(default)s)",
    )
    s.add_argument(
        "--out", metavar="FILE.png", help="PNG file (default: RUNDIR/samples-T<temperature>.png)"
    )
    s.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    s.add_argument(
        "--backend",
        choices=["auto", "reference", "cpp", "triton"],
        help="ops backend (default: the run's)",
    )
    s.add_argument(
        "--device",
        default="auto",
        help="auto, cpu, cuda or cuda:N (default: auto = cuda when a GPU is available)",
    )
    s.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")

    i = sub.add_parser(
        "info",
        help="architecture and parameter counts of a config",
        description="Print a config's architecture and parameter counts, or list the configs.",
    )
    i.add_argument("config", nargs="?", help="config name (omit to list them)")
    return p


def _run_directory(parser: argparse.ArgumentParser, path: str) -> str:
    """The run directory of ``--run``: the path itself, or the folder of a checkpoint file."""
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        return os.path.dirname(os.path.abspath(path))
    parser.error(f"--run {path}: no run directory or checkpoint file there")


def _check_output_dir(parser: argparse.ArgumentParser, path: str | None, option: str) -> None:
    """Fail before the work, not after it, when ``path`` is a folder or its folder does not
    exist."""
    if path and os.path.isdir(path):
        parser.error(f"{option} {path} is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path)) if path else None
    if folder and not os.path.isdir(folder):
        parser.error(f"{option} {path}: folder {folder} does not exist")


def _train(a, parser) -> int:
    from vflow import train as T
    from vflow.models import CONFIGS

    if a.config is not None:
        _check_config(parser, a.config)
    if a.resume and not a.out:
        parser.error("--resume needs --out RUNDIR (the run to continue)")
    if a.out and os.path.exists(a.out) and not os.path.isdir(a.out):
        parser.error(f"--out {a.out} is a file, not a run directory")
    if a.config or not a.resume:  # --set mistakes: one line, now (a resume checks its own)
        CONFIGS[a.config or T.DEFAULT_CONFIG].with_overrides(**dict(a.overrides))
    out = a.out or T.default_run_dir(a.config)
    args = T.TrainArgs(
        config=a.config,
        data=a.data,
        data_dir=a.data_dir,
        out=out,
        steps=a.steps,
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup=a.warmup,
        ema_decay=a.ema_decay,
        grad_clip=a.grad_clip,
        flip=a.flip,
        backend=a.backend,
        device=a.device,
        seed=a.seed,
        resume=a.resume,
        overrides=dict(a.overrides),
        log_every=a.log_every,
        eval_every=a.eval_every,
        eval_images=a.eval_images,
        ckpt_every=a.ckpt_every,
        keep=a.keep,
        final_eval=a.final_eval,
        iw_samples=a.iw_samples,
        n_samples=a.n_samples,
        max_bad_steps=a.max_bad_steps,
        progress=a.progress,
        num_threads=a.threads,
        init_batch_size=a.init_batch_size,
        init_scheme=a.init_scheme,
        channels_last=a.channels_last,
        compile=a.compile,
        activation_checkpointing=a.activation_checkpointing,
        precision=a.precision,
        cuda_graphs=a.cuda_graphs,
    )
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(f"run directory: {out}", flush=True)
    try:
        res = T.train(args)
    except T.TrainingInterrupted as stop:
        if stop.checkpoint is None:  # outside the loop: nothing was saved, say why it ended
            print(f"vflow train: {stop}", file=sys.stderr)
        return stop.exit_code
    except KeyboardInterrupt:
        return 130
    except T.NonFiniteError as err:
        print(f"vflow train: error: {err}", file=sys.stderr)
        return 1
    if main_rank:
        if res.final is not None:
            f = res.final
            print(
                f"test bits/dim ({f['n']} images, EMA weights): ELBO {f['elbo_bpd']:.4f}, "
                f"importance-weighted (S={f['samples']}) {f['iw_bpd']:.4f}"
            )
        print(f"steps {res.step} (skipped {res.skipped}); checkpoint {res.checkpoint}")
        for name in ("samples.png", "loss.png", "metrics.jsonl"):
            path = os.path.join(out, name)
            if os.path.isfile(path):
                print(f"wrote {path}")
    return 0


def _eval(a, parser) -> int:
    from vflow import train as T
    from vflow.data import load_dataset
    from vflow.evaluate import evaluate

    run_dir = _run_directory(parser, a.run)
    _check_output_dir(parser, a.out, "--out")
    device = T.resolve_device(a.device)
    info = T.init_distributed(device)
    finished, rc = False, 0
    try:
        if device.startswith("cuda") and info.enabled:
            device = f"cuda:{info.local_rank}"
        model, ck = T.load_run_model(a.run, device=device, use_ema=a.ema, backend=a.backend)
        data_name = ck["data"]
        T.set_threads(a.threads, data_name, device)
        data = load_dataset(data_name, a.split, a.data_dir or ck.get("data_dir"))
        samples = a.samples or EVAL_SAMPLES.get(data_name, 64)
        if info.main:
            print(
                f"{a.run}: {ck['model_spec']['name']} step {ck['step']}, "
                f"{'EMA' if a.ema else 'raw'} weights; {data_name} {a.split}, "
                f"S={samples} importance samples, {info.world_size} process(es)",
                flush=True,
            )
        res = evaluate(
            model,
            data,
            batch_size=a.batch_size,
            samples=samples,
            chunk_size=a.chunk_size,
            device=device,
            seed=a.seed,
            max_images=a.max_images,
            progress=True,
            desc=f"eval {a.split}",
        )
        if info.main:
            print(
                f"{a.split} bits/dim ({res['n']} images): ELBO {res['elbo_bpd']:.4f}, "
                f"importance-weighted (S={samples}) {res['iw_bpd']:.4f}"
            )
            res.update(step=int(ck["step"]), split=a.split, ema=a.ema)
            default = os.path.join(run_dir, f"eval-{a.split}-S{samples}.json")
            rc = _write_eval_result(res, a.out or default, explicit=a.out is not None)
        finished = True
    finally:
        T.shutdown_distributed(info, finished)
    return rc


def _write_eval_result(res: dict, path: str, explicit: bool) -> int:
    """Write the (already printed) eval result as JSON; if that fails, say so in one line:
    exit status 0 when it was the default path in the run directory (the result is on
    stdout), 1 when the user asked for this file with --out."""
    try:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
    except OSError as err:
        reason = err.strerror or str(err)
        hint = "" if explicit else "; pass --out FILE.json to save it elsewhere"
        print(
            f"vflow eval: could not write {path} ({reason}); the result above was not saved{hint}",
            file=sys.stderr,
        )
        return 1 if explicit else 0
    print(f"wrote {path}")
    return 0


def _sample(a, parser) -> int:
    from vflow import train as T
    from vflow.evaluate import draw_samples, model_cfg, save_grid

    run_dir = _run_directory(parser, a.run)
    _check_output_dir(parser, a.out, "--out")
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    device = T.resolve_device(a.device)
    model, ck = T.load_run_model(a.run, device=device, use_ema=a.ema, backend=a.backend)
    T.set_threads(None, ck["data"], device)
    x = draw_samples(model, a.n, temperature=a.temperature, seed=a.seed, device=device)
    out = a.out or os.path.join(run_dir, f"samples-T{a.temperature:g}.png")
    if not os.path.splitext(out)[1]:
        out += ".png"  # what matplotlib writes for a name without an extension
    title = f"{ck['model_spec']['name']} step {ck['step']}, T={a.temperature:g}"
    try:
        save_grid(x, int(model_cfg(model, "n_bins")), out, title=title)
    except OSError as err:
        hint = "" if a.out else "; pass --out FILE.png to write it elsewhere"
        print(
            f"vflow sample: error: could not write {out} ({err.strerror or err}){hint}",
            file=sys.stderr,
        )
        return 2
    print(f"wrote {out}")
    return 0


def _info(a, parser) -> int:
    from vflow.models import describe

    if not a.config:
        print("configs: " + ", ".join(_configs()))
        return 0
    _check_config(parser, a.config)
    print(describe(a.config))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices[a.command]
    from vflow.data import DataError

    handlers = {"train": _train, "eval": _eval, "sample": _sample, "info": _info}
    try:
        return handlers[a.command](a, sub)
    except KeyboardInterrupt:
        print(f"vflow {a.command}: interrupted", file=sys.stderr)
        return 130
    except (OSError, DataError, ValueError, KeyError) as err:
        # user errors (missing or unwritable files, bad options or shapes): one line, no
        # traceback;
        # VFLOW_DEBUG=1 shows the traceback
        if os.environ.get("VFLOW_DEBUG"):
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"vflow {a.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the paper-study scripts (``toy_checkerboard.py``, ``_ablation.py``)."""

from __future__ import annotations

import csv
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np


def run_parallel(
    fn: Callable[..., dict],
    jobs: list[dict],
    workers: int,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """``[fn(**job) for job in jobs]`` with a progress bar, in ``workers`` spawned processes
    (results in completion order), or in this process when ``workers <= 1``. ``fn`` must be
    importable by name from the worker processes (a module-level function). ``on_result``
    is called with each result as soon as it arrives (e.g. to write it to disk, so that a
    study stopped half-way keeps its finished runs)."""
    from tqdm import tqdm

    results = []
    if workers <= 1:
        for job in tqdm(jobs, desc="runs", dynamic_ncols=True):
            results.append(fn(**job))
            if on_result is not None:
                on_result(results[-1])
        return results
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(fn, **job) for job in jobs]
        for f in tqdm(as_completed(futures), total=len(futures), desc="runs", dynamic_ncols=True):
            results.append(f.result())
            if on_result is not None:
                on_result(results[-1])
    return results


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    v = np.asarray(list(values), dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def write_csv(path: Path, rows: list[dict]) -> None:
    """One CSV row per dict; the columns are the keys of all rows, in order of first
    appearance (a row without a column leaves it empty)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)


def read_typed_csv(
    path: Path,
    columns: dict[str, Callable],
    optional: tuple[str, ...] = (),
    what: str = "csv",
    defaults: dict | None = None,
) -> list[dict]:
    """The rows of the CSV file ``path`` as dicts of ``columns`` (name -> type, e.g. ``int``),
    each value converted by its type; a column of ``optional`` may be absent or empty and
    then reads as ``type("nan")`` (so only float columns should be optional); a column of
    ``defaults`` (name -> value) may be absent or empty and then reads as its default (e.g.
    a column added after the file was written). Raises ``FileNotFoundError`` for a missing
    file and ``ValueError`` (prefixed with ``what``, e.g. the command-line flag that named
    the file) when a needed column is missing."""
    defaults = defaults or {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(columns) - set(optional) - set(defaults) - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{what}: {path} lacks the columns {sorted(missing)}")
        return [
            {
                k: defaults[k] if k in defaults and not r.get(k) else columns[k](r.get(k) or "nan")
                for k in columns
            }
            for r in reader
        ]

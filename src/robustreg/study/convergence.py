"""Has training converged? Validation accuracy against the training budget.

A run trained for ``E`` epochs under a one-cycle schedule is not the first ``E`` epochs of a longer
run: its learning rate anneals to zero at ``E``. Convergence is therefore judged across runs
trained with budgets ``E₁ < E₂ < …`` (same configuration otherwise): with ``a(E)`` the final
validation accuracy of the budget-``E`` run (mean over the seeds trained at every budget, so
that budgets are compared on the same seeds), the ``plateau`` is ``max_E a(E)`` and
``gap(E) = plateau − a(E)``; a method counts as converged at the budget ``E`` it is trained with
when ``gap(E) ≤ tol`` and the stop was observed, not assumed: a longer budget was trained, or the
budget ``E/2`` is already within ``tol`` of the plateau (the last doubling gained at most
``tol``). The runs are the files ``tools/converged_pilot.py`` writes (``{"config", "history",
"cpu_seconds"}``, the history of :func:`robustreg.training.train`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from robustreg import files
from robustreg.study import cache, store
from robustreg.study.grid import label

__all__ = ["TOLERANCE", "budget_table", "read_runs", "train_run"]

#: Points of validation accuracy: the budget used must lie within this of the plateau (the
#: book's "within 0.3 points"; 15 of 5,000 validation images on one seed).
TOLERANCE = 0.3


def train_run(
    config: Mapping[str, Any], path: str | Path, *, cache_dir=None, progress: bool = False
) -> dict:
    """Train one configuration through the cache (:func:`robustreg.study.cache.train_cached`:
    an interrupted run resumes, a finished one loads) and write its run file ``path``
    atomically: ``{"name", "key", "config", "history", "cpu_seconds"}``, or ``{"name",
    "config", "diverged"}`` for a training that diverged. An existing file is read back, not
    retrained. ``cache_dir``: the training cache (None: the default); the per-epoch state of a
    run still training is kept beside the run file (``.checkpoints/``), so that a run cut off
    resumes wherever the folder goes. Returns the file's content."""
    path = Path(path)
    if path.is_file():
        return json.loads(path.read_text())
    try:
        _, record = cache.train_cached(
            dict(config),
            cache_dir=cache_dir,
            checkpoint_dir=store.ResultStore(path.parent).checkpoint_dir,
            device="cpu",
            progress=progress,
        )
    except FloatingPointError as err:
        out = {"name": path.stem, "config": dict(config), "diverged": str(err)}
    else:
        hist = record["history"]
        out = {
            "name": path.stem,
            "key": record["key"],
            "config": record["config"],
            "history": hist,
            "cpu_seconds": sum(hist["cpu_time"]),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, out)
    return out


def _run_row(path: Path, record: Mapping[str, Any]) -> dict[str, Any]:
    config = record["config"]
    hist = record["history"]
    val = [100 * v for v in hist["val_accuracy"]]
    return {
        "file": path.name,
        "key": record.get("key"),
        "model": config["model"]["name"],
        "method": label(config),
        "lam": float(config.get("lam", 0.0)) if config.get("regularizer") else 0.0,
        "seed": int(config.get("seed", 0)),
        "epochs": int(config["epochs"]),
        "val_accuracy": val[-1],
        "train_accuracy": 100 * hist["accuracy"][-1],
        "cpu_seconds": float(record.get("cpu_seconds", sum(hist["cpu_time"]))),
        "curve": val,
    }


def read_runs(paths: Iterable[str | Path]) -> pd.DataFrame:
    """One row per run file (a directory: its ``*.json``, recursively): ``file``, ``key`` (the
    training's cache key, :func:`robustreg.study.cache.cache_key`: two files of one training share
    it), ``model``, ``method`` (:func:`robustreg.study.grid.label`), ``lam``, ``seed``,
    ``epochs``, the final ``val_accuracy`` and ``train_accuracy`` (%), ``cpu_seconds`` and the
    validation ``curve`` (%, one value per epoch). Files of diverged runs (no history) are left
    out."""
    rows = []
    for p in paths:
        p = Path(p)
        files = sorted(p.rglob("*.json")) if p.is_dir() else [p]
        for f in files:
            record = json.loads(f.read_text())
            if "history" in record and "config" in record:
                rows.append(_run_row(f, record))
    if not rows:
        raise ValueError(f"no run files with a training history in {[str(p) for p in paths]}")
    return pd.DataFrame(rows)


def budget_table(
    runs: pd.DataFrame,
    used: int | Mapping[str, int],
    tol: float = TOLERANCE,
    *,
    paired: bool = True,
) -> pd.DataFrame:
    """Per ``(model, method, lam)``: the mean final validation accuracy at each budget (one
    column per number of epochs), the ``plateau`` (their maximum), the budget ``used`` (one for
    all methods, or per method name), ``gap`` = plateau − a(used) (points), ``longer`` (whether a
    budget above ``used`` was trained), ``half_gap`` = plateau − a(used/2) (NaN if not trained),
    ``seeds`` (the seeds each mean is over, a tuple) and ``converged`` (``gap ≤ tol`` and either
    ``longer`` or ``half_gap ≤ tol``). ``paired``: average only the seeds trained at every budget
    of the configuration (False: every seed of each budget). Gaps are rounded to 10⁻⁹ points, so
    that a gap equal to ``tol`` in validation images is not decided by floating-point rounding.
    Rows whose ``used`` budget was not trained are left out."""
    keys = ["model", "method", "lam"]
    if paired:
        budgets = runs.groupby(keys)["epochs"].transform("nunique")
        per_seed = runs.groupby([*keys, "seed"])["epochs"].transform("nunique")
        runs = runs[per_seed == budgets]
    mean = runs.groupby([*keys, "epochs"])["val_accuracy"].mean().unstack("epochs")
    seeds = runs.groupby(keys)["seed"].unique()
    rows = {}
    for key, a in mean.iterrows():
        u = used.get(key[1]) if isinstance(used, Mapping) else used
        if u not in mean.columns or pd.isna(a[u]):
            continue  # the budget used was not trained
        plateau = a.max()
        half = a[u // 2] if u % 2 == 0 and u // 2 in mean.columns else float("nan")
        rows[key] = {
            **a,
            "plateau": plateau,
            "used": u,
            "gap": round(plateau - a[u], 9),
            "longer": bool(a[[c for c in mean.columns if c > u]].notna().any()),
            "half_gap": round(plateau - half, 9),
            "seeds": tuple(sorted(int(s) for s in seeds[key])),
        }
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index = pd.MultiIndex.from_tuples(out.index, names=mean.index.names)
    out.columns.name = "epochs"
    out["converged"] = (out["gap"] <= tol) & (out["longer"] | (out["half_gap"] <= tol))
    return out

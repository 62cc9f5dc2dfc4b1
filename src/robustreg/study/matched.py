"""The matched-strength study: each regularizer at the λ that costs a target of clean accuracy.

For a target t (points), the wanted clean validation accuracy is plain training's minus t points;
:func:`select_lambdas` finds each regularizer's λ there along its sweep, and :func:`run_study` runs
the three resumable stages: train and evaluate the sweep, select, train and evaluate the
selected λ (PGD with restarts on every run, AutoAttack on plain training, the baselines and every
selected λ).
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from robustreg import data as data_module
from robustreg import evaluation, files
from robustreg.study import cache
from robustreg.study.config import PROFILES, Profile, profile
from robustreg.study.execute import run_grid, select_shard
from robustreg.study.grid import grid, label, result_name, stale_baselines
from robustreg.study.store import ResultStore, results_root

__all__ = [
    "SELECTION_FILE",
    "StaleSelectionError",
    "lowered",
    "open_study",
    "progress",
    "run_study",
    "select_lambdas",
    "validation_rows",
]

#: The file of a study's results directory that keeps its selection.
SELECTION_FILE = "selection.json"


class StaleSelectionError(RuntimeError):
    """A selection that chose a baseline under training settings its profile no longer uses
    (:func:`~robustreg.study.grid.stale_baselines`), asked to train that baseline."""


def _round_significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


def select_lambdas(
    name: str | Profile, rows: Sequence[Mapping[str, Any]], **overrides
) -> dict[str, Any]:
    """λ at matched clean validation accuracy, per regularizer and target of the study.

    For a target t (points), the wanted validation accuracy is a₀ − t/100, a₀ plain training's
    mean over the seeds that select (``selection_seeds``, rows with ``seed``; every seed when
    None). Along the sweep (λ increasing, mean validation accuracy over seeds a(λ)),
    the first λ_i with a(λ_i) ≤ a₀ − t/100 and its predecessor λ_{i−1} bracket the target; λ*
    interpolates log λ linearly in a and is rounded to 3 significant digits. ``lam`` is None
    (with ``reason``) when the sweep never loses t points, its smallest λ already does, or its
    training diverges (accuracy NaN, :func:`validation_rows`) before it loses them. A study that
    selects baselines (``Study.select_baselines``) also gets ``baselines``: per norm and target,
    ``eps`` chosen the same way along the norm's PGD radii, and the ``adversarial`` entry to
    train at it.
    ``rows``: ``val_accuracy`` rows (``method``, ``lam``, ``value``) of every seed's sweep;
    ``overrides`` replace profile fields (``lambdas``, ``study``).
    """
    p = profile(name, **overrides)
    if p.study is None:
        raise ValueError(f"profile {p.name!r} is not a study (it has no targets)")
    chosen = p.study.selection_seeds
    val = {}
    for r in rows:
        if chosen is not None and r.get("seed") not in chosen:
            continue  # a seed that does not select
        if r["metric"] == "val_accuracy":
            val.setdefault((r["method"], float(r["lam"])), []).append(r["value"])
    if ("plain", 0.0) not in val:
        raise ValueError("select_lambdas needs plain training's val_accuracy rows")
    mean = {k: statistics.fmean(v) for k, v in val.items()}
    plain = mean["plain", 0.0]
    out: dict[str, Any] = {
        "plain_val_accuracy": plain,
        "targets": list(p.study.targets),
        "lambdas": {},
    }
    for reg, lams in p.lambdas.items():
        curve = [(float(lam), mean[reg, float(lam)]) for lam in sorted(lams)]
        out["lambdas"][reg] = {
            str(t): _crossing(curve, plain - t / 100, t, "λ", "lam") for t in p.study.targets
        }
    if p.study.select_baselines:  # each norm's PGD training along its radii, the same way
        out["baselines"] = {}
        for norm in dict.fromkeys(a.get("norm", "linf") for a in p.adversarial):
            entries = sorted(
                (a for a in p.adversarial if a.get("norm", "linf") == norm), key=lambda a: a["eps"]
            )
            methods = [label({"adversarial": a}) for a in entries]
            curve = [(float(a["eps"]), mean[m, 0.0]) for a, m in zip(entries, methods, strict=True)]
            out["baselines"][norm] = {}
            for t in p.study.targets:
                entry = _crossing(curve, plain - t / 100, t, "ε", "eps")
                adv = {**entries[0], "eps": entry["eps"]} if entry["eps"] is not None else None
                out["baselines"][norm][str(t)] = {**entry, "adversarial": adv}
    return out


def _crossing(curve, wanted: float, t: int, symbol: str, key: str) -> dict[str, Any]:
    """Where a curve ``[(x, a(x))]`` (x increasing) first falls to ``wanted``: x interpolated
    log-linearly between the two points around the crossing and rounded to 3 significant digits,
    or None with the reason (the curve stays above, starts below, or diverges first)."""
    entry: dict[str, Any] = {"wanted_val_accuracy": wanted, "curve": curve}
    hit = next((i for i, (_, a) in enumerate(curve) if math.isnan(a) or a <= wanted), None)
    if hit is None:
        entry.update({key: None, "reason": f"the largest {symbol} loses less than {t} points"})
    elif math.isnan(curve[hit][1]):
        reason = (
            f"training diverges at {symbol} = {curve[hit][0]:g} before losing {t} points: "
            "refine the sweep below it"
        )
        entry.update({key: None, "reason": reason})
    elif hit == 0:
        reason = f"the smallest {symbol} already loses {t} points: extend the sweep"
        entry.update({key: None, "reason": reason})
    else:
        (x0, a0), (x1, a1) = curve[hit - 1], curve[hit]
        w = (a0 - wanted) / (a0 - a1) if a0 != a1 else 1.0
        x = math.exp(math.log(x0) + w * (math.log(x1) - math.log(x0)))
        entry.update({key: _round_significant(x), "reason": None})
    return entry


def lowered(rows: Sequence[Mapping[str, Any]], selection: Mapping[str, Any]) -> dict[int, Any]:
    """How much training with each regularizer at its selected λ lowers every regularizer.

    For target t, regularizer r trained and regularizer q measured: the test mean of q for the
    network of seed s trained with r, divided by plain training's of seed s,
    ρ_s(r, q) = R̄_q(f_{r,s}) / R̄_q(f_{plain,s}). Returns ``{t: {"per_seed": {r: DataFrame[seed ×
    q]}, "geometric_mean": DataFrame[r × q]}}``, the geometric mean exp(mean_s log ρ_s) over the
    seeds present in ``rows`` (evaluation rows of the study, :func:`run_study`'s first result).
    A regularizer whose sweep did not reach a target is left out at that target. Measured: the
    regularizers the evaluation records (``R <name>`` rows: the paper's five, not the later
    regularizers, which are trained and compared but not measured).
    """
    import pandas as pd

    runs = evaluation.wide(rows)
    regs = list(selection["lambdas"])
    columns = [f"R {q}" for q in regs if f"R {q}" in runs.columns]
    plain = runs.xs("plain", level="method")[columns].droplevel("lam")
    out = {}
    for t in selection["targets"]:
        per_seed, means = {}, {}
        for r in regs:
            lam = selection["lambdas"][r][str(t)]["lam"]
            if lam is None:
                continue
            trained = runs.xs((r, float(lam)), level=("method", "lam"))[columns]
            ratio = (trained / plain.loc[trained.index]).rename(columns=lambda c: c[2:])
            per_seed[r] = ratio
            means[r] = ratio.apply(lambda v: math.exp(statistics.fmean(map(math.log, v))))
        out[t] = {"per_seed": per_seed, "geometric_mean": pd.DataFrame(means).T}
    return out


def validation_rows(
    name: str, *, cache_dir=None, results_dir=None, **overrides
) -> list[dict[str, Any]]:
    """Clean validation accuracy of every trained run of the sweep: from the run's result file in
    ``results_dir`` when it has one of this training (same cache key), else from the run cache
    (a run in neither raises FileNotFoundError). The result file is read first so that a study
    resumed on another machine, whose cache is empty, selects from its committed files."""
    root = Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    store = ResultStore(results_dir) if results_dir is not None else None
    rows = []
    for config in grid(name, **overrides):
        key = cache.cache_key(config)
        stored = store.read(config) if store is not None else None
        if stored is not None and stored.get("key") == key:
            if stored.get("diverged"):
                acc = math.nan
            else:
                acc = next(r["value"] for r in stored["rows"] if r["metric"] == "val_accuracy")
            rows.append(_val_row(config, acc))
            continue
        if not any((root / f"{key}{end}").is_file() for end in (".json", ".diverged.json")):
            raise FileNotFoundError(f"{result_name(config)} is not trained yet")
        try:
            model, _ = cache.train_cached(config, cache_dir=cache_dir, progress=False)
        except cache.DivergedError:
            acc = math.nan  # a diverged training: no network, and no accuracy to select by
        else:
            dtype = cache.torch_dtype(cache.normalize_config(config)["dtype"])
            x_val, y_val = data_module.load(config["data"], "val", dtype=dtype)
            acc = evaluation.accuracy(model, x_val, y_val)
        rows.append(_val_row(config, acc))
    return rows


def _val_row(config: Mapping[str, Any], acc: float) -> dict[str, Any]:
    return {
        "metric": "val_accuracy",
        "method": label(config),
        "lam": float(config.get("lam", 0.0)),
        "seed": config["seed"],
        "value": acc,
    }


def study_profile(name: str) -> Profile:
    """The profile called ``name`` if it is a matched-strength study (has a
    :class:`~robustreg.study.config.Study`); otherwise a ``ValueError`` that names the valid ones."""
    settings = PROFILES.get(name) if isinstance(name, str) else None
    if settings is None or settings.study is None:
        raise ValueError(
            f"profile {name!r} is not a matched-strength study; valid: "
            + ", ".join(k for k, v in PROFILES.items() if v.study is not None)
        )
    return settings


def run_study(
    name: str = "sweep",
    *,
    results_dir: str | os.PathLike,
    read_only: bool = False,
    with_records: bool = False,
    **kwargs,
):
    """The matched-strength study of a profile with a :class:`~robustreg.study.config.Study`, in
    three resumable stages.

    1. train and evaluate plain training, the λ sweep and the adversarial baselines
       (:func:`~robustreg.study.execute.run_grid`: a result file per run as it finishes, so that
       a long study's results are kept, and can be committed, as they come) and measure their
       clean accuracy on the validation split;
    2. :func:`select_lambdas` from those accuracies, kept in ``selection.json`` (read, never
       recomputed, once it exists: delete it to select again);
    3. :func:`~robustreg.study.execute.run_grid` with the selection: the selected λ trained
       and every run evaluated on the test set (PGD with restarts at every radius, per image)
       — the files of stage 1 read back — and plain training, the baselines and each
       regularizer at its selected λ also under AutoAttack; one result file per run.

    Returns ``(rows, selection)`` (``(rows, records, selection)`` with ``with_records``).
    ``kwargs`` go to :func:`~robustreg.study.execute.run_grid` (``jobs``, ``executor``,
    ``shard``, ``refresh``, ``progress``, profile overrides ...). With ``shard`` the selection
    waits until every shard has finished stage 1: rerun then.
    """
    study_profile(name)
    results = Path(results_dir)
    path = results / SELECTION_FILE
    overrides = {k: v for k, v in kwargs.items() if k in _PROFILE_FIELDS}
    if path.is_file():
        selection = files.read_json(path, "selection file", "delete it to select again")
        if not read_only:
            _refuse_stale_baselines(name, selection, path, kwargs.get("shard"), overrides)
    elif read_only:
        raise FileNotFoundError(
            f"{path}: no selection; compute it with "
            f"`python -m robustreg run-grid --profile {name} --results-dir {results}`"
        )
    else:
        # stage 1: train and evaluate the sweep, plain training and the baselines, a result file
        # each as it finishes (jobs, shards); AutoAttack on those of them that are attacked
        # whatever is selected (plain training, the baselines)
        run_grid(name, results_dir=results, **kwargs)
        try:
            val_rows = validation_rows(
                name, cache_dir=kwargs.get("cache_dir"), results_dir=results, **overrides
            )
        except FileNotFoundError as err:
            raise RuntimeError(
                f"stage 1 of the study is incomplete ({err}); when every shard has finished, "
                "rerun to select λ and evaluate the models"
            ) from None
        selection = select_lambdas(name, val_rows, **overrides)
        files.write_json(path, selection)
        kwargs = {**kwargs, "refresh": False}  # stage 1 has refreshed its runs already
    out = run_grid(
        name,
        results_dir=results,
        read_only=read_only,
        selection=selection,
        with_records=with_records,
        **kwargs,
    )
    return (*out, selection) if with_records else (out, selection)


def _refuse_stale_baselines(name, selection, path, shard, overrides) -> None:
    """Stop before training a baseline whose radius the selection chose under a budget the
    profile no longer uses (:func:`~robustreg.study.grid.stale_baselines`); the other runs of
    a shard go on (a regularizer's λ does not depend on the baselines' runs)."""
    stale = stale_baselines(name, selection, **overrides)
    picked = {(s["norm"], s["eps"]) for s in stale}
    todo = select_shard(grid(name, selection=selection, **overrides), shard)
    hit = [
        c
        for c in todo
        if c.get("adversarial")
        and (c["adversarial"].get("norm", "linf"), c["adversarial"]["eps"]) in picked
        and c["epochs"] in {s["epochs"] for s in stale}
    ]
    if hit:
        which = "; ".join(
            f"{s['norm']} ε = {s['eps']:g}, chosen from first-stage runs at {s['epochs']} "
            f"epochs, but the profile now trains {s['norm']} baselines for "
            f"{s['profile_epochs']} epochs"
            for s in stale
        )
        raise StaleSelectionError(
            f"{path}: the selection is stale for its baselines ({which}). Delete the file "
            "and rerun: the command trains what the first stage lacks at the new budget "
            "(reading back the runs it has), selects again and goes on. Runs refused: "
            f"{', '.join(result_name(c) for c in hit)}"
        )


_PROFILE_FIELDS = set(Profile.__dataclass_fields__)


def progress(name: str, results_dir: str | os.PathLike, **overrides) -> dict[str, Any]:
    """How far a matched-strength study's result files have got; nothing is computed.

    Returns ``{"stage", "done", "planned", "selection", "records"}``. Before ``selection.json`` exists the
    study is in stage 1 and ``planned`` counts :func:`~robustreg.study.grid.grid` (plain
    training, the sweeps, the baselines); once it exists, stage 3, whose grid holds stage 1's
    runs and the selected ones on every seed. ``done`` counts the planned runs whose result file
    is complete (:func:`~robustreg.study.execute.run_grid` with ``partial``: a diverged run's
    file counts, a selected run whose AutoAttack is still to come does not; any other stale file
    is an error); ``records`` are those runs' result records. A directory that
    does not exist is a study not started. ``overrides``: as for :func:`run_study`."""
    study_profile(name)
    results = Path(results_dir)
    path = results / SELECTION_FILE
    selection = files.read_json(path, "selection file") if path.is_file() else None
    planned = len(grid(name, selection=selection, **overrides))
    records: list[dict[str, Any]] = []
    if results.is_dir():
        _, records = run_grid(
            name,
            results_dir=results,
            read_only=True,
            partial=True,
            selection=selection,
            with_records=True,
            progress=False,
            **overrides,
        )
    return {
        "stage": 1 if selection is None else 3,
        "done": len(records),
        "planned": planned,
        "selection": selection,
        "records": records,
    }


def open_study(
    name: str,
    *,
    compute: bool = False,
    seeds: Sequence[int] | None = None,
    partial: bool = False,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any], Path]:
    """A study as the chapters read it: ``(rows, records, selection, results_dir)`` of
    :func:`run_study`. By default from the committed files (``results_root()/name``, read-only:
    a missing or stale file is an error that names it and the command that computes it); with
    ``compute``, computed for real in a new temporary directory (the seconds-long smoke
    studies; trained in a new cache, so that nothing comes from runs of earlier code), the
    committed files untouched. ``seeds``: the study's first seeds only. ``partial``: a committed
    study in progress, whose runs without a file yet are left out of the rows and records (the
    selection must exist; a stale file is still an error)."""
    overrides = {} if seeds is None else {"seeds": list(seeds)}
    if partial and not compute:
        overrides["partial"] = True
    if compute:  # trained here, not loaded from the user's cache of earlier code
        scratch = Path(tempfile.mkdtemp(prefix="robustreg-study-"))
        results, overrides["cache_dir"] = scratch / name, scratch / "cache"
    else:
        results = results_root() / name
    rows, records, selection = run_study(
        name,
        results_dir=results,
        read_only=not compute,
        with_records=True,
        progress=False,
        **overrides,
    )
    return rows, records, selection, results

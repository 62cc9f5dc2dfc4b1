"""Evaluating a trained run: its effective evaluation settings and the metrics they produce.

The settings are the keyword arguments of :func:`robustreg.evaluation.evaluate` (plus ``n_test``,
the first n test images, and ``full_test_accuracy``, the clean accuracy on the whole test set); :func:`effective_settings` fills every default, so a result file records
exactly what was computed and a changed default makes the file stale instead of silently reused.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from robustreg import evaluation

__all__ = ["LATER_SETTINGS", "add_autoattack", "effective_settings", "evaluate_model"]

#: Evaluation settings added after results were published, left out at their defaults so that the
#: settings recorded in earlier result files stay what they were.
LATER_SETTINGS = {
    "full_test_accuracy": False,
    "per_image": False,
    "autoattack_steps": 100,
    "autoattack_queries": 5000,
    "pgd_losses": ["ce"],
}


#: The settings of this module rather than of :func:`robustreg.evaluation.evaluate` (besides
#: ``n_test``), with their defaults.
_OWN = {"full_test_accuracy": False}
#: Keyword arguments of :func:`robustreg.evaluation.evaluate` that measure rather than set.
_MEASURES = {"timings"}


def effective_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`robustreg.evaluation.evaluate`'s keyword defaults updated by ``settings`` (plus
    ``n_test``), less the :data:`LATER_SETTINGS` at their defaults, as canonical JSON."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(evaluation.evaluate).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and k not in _MEASURES
    }
    unknown = sorted(set(settings) - set(defaults) - set(_OWN) - {"n_test"})
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}; valid: {sorted(defaults)}")
    full = json.loads(json.dumps({**defaults, **_OWN, **settings}, sort_keys=True))
    for k, default in LATER_SETTINGS.items():
        if full[k] == default:  # compared as JSON: a tuple default is a list
            del full[k]
    return full


def evaluate_model(
    model: nn.Module, test: tuple[Tensor, Tensor], settings: Mapping[str, Any]
) -> dict[str, Any]:
    """Evaluate ``model`` on the first ``n_test`` images of ``test`` with ``settings`` (and, with
    ``full_test_accuracy``, add a ``test_accuracy`` row: the clean accuracy on all of ``test``); return
    ``{"rows", "seconds", "cpu_seconds", "autoattack_cpu_seconds"}`` (wall and process CPU time of
    the evaluation, and the CPU time of its AutoAttack)."""
    s = dict(settings)
    n = s.pop("n_test", None)
    full = s.pop("full_test_accuracy", False)
    x, y = test
    if n is not None:
        x, y = x[:n], y[:n]
    t0, c0 = time.perf_counter(), time.process_time()
    timings = {}
    rows = evaluation.evaluate(model, x, y, **s, timings=timings)
    if full:  # the clean accuracy on every test image (the attacks run on the first n_test)
        row = {"metric": "test_accuracy", "attack": None, "norm": None, "eps": None}
        rows.insert(1, {**row, "regularizer": None, "value": evaluation.accuracy(model, *test)})
    return {
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "autoattack_cpu_seconds": timings["autoattack"],
    }


#: The rows of one radius's AutoAttack (:func:`robustreg.evaluation.standard_autoattack_rows`).
_AUTOATTACK_ROWS = {"autoattack", "worst-case"}
#: The clean accuracies, which come first (with PGD's rows) in a result's rows.
_ACCURACY_ROWS = {"val_accuracy", "clean_accuracy", "test_accuracy"}


def _autoattack_radius(row: Mapping[str, Any]) -> tuple[str, float] | None:
    """(norm, ε) of an AutoAttack row, None for any other row."""
    if row["metric"] == "autoattack_broken_by" or (
        row["metric"] == "robust_accuracy" and row["attack"] in _AUTOATTACK_ROWS
    ):
        return row["norm"], float(row["eps"])
    return None


def add_autoattack(
    model: nn.Module,
    test: tuple[Tensor, Tensor],
    settings: Mapping[str, Any],
    rows: list[Mapping[str, Any]],
) -> dict[str, Any]:
    """Complete ``rows``, a per-image evaluation of ``model`` (:func:`evaluate_model`) with
    ``settings`` less some radii of ``settings["autoattack_eps"]``, with standard AutoAttack at
    the missing radii, each paired with the stored PGD flags at its radius: the rows that
    :func:`evaluate_model` with ``settings`` computes, in its order (AutoAttack's radii in the
    order of ``autoattack_eps``, after PGD's rows and before the radii and regularizer rows),
    without computing the others again. Returns ``{"rows", "seconds", "cpu_seconds",
    "autoattack_cpu_seconds"}`` (the time of the added attacks)."""
    s = dict(settings)
    if not s.get("per_image") or s.get("autoattack_version") != "standard":
        raise ValueError("add_autoattack completes a per-image evaluation with standard AutoAttack")
    x, y = test
    if s.get("n_test") is not None:
        x, y = x[: s["n_test"]], y[: s["n_test"]]
    blocks: dict[tuple[str, float], list] = {}
    head, tail = [], []
    for row in rows:
        radius = _autoattack_radius(row)
        if radius is not None:
            blocks.setdefault(radius, []).append(row)
        elif row["metric"] in _ACCURACY_ROWS or row.get("attack") == "pgd":
            head.append(row)
        else:  # certified radii and regularizer values
            tail.append(row)
    t0, c0 = time.perf_counter(), time.process_time()
    timings: dict[str, float] = {}
    out = list(head)
    for norm, e in s["autoattack_eps"].items():
        radius = (norm, float(e))
        if radius not in blocks:
            pgd = evaluation.find_row(rows, attack="pgd", norm=norm, eps=e)
            blocks[radius] = evaluation.standard_autoattack_rows(
                model,
                x,
                y,
                e,
                norm,
                evaluation.parse_flags(pgd["flags"]),
                n=s.get("autoattack_n"),
                seed=s.get("seed", 0),
                steps=s.get("autoattack_steps", LATER_SETTINGS["autoattack_steps"]),
                n_queries=s.get("autoattack_queries", LATER_SETTINGS["autoattack_queries"]),
                timings=timings,
            )
        out += blocks.pop(radius)
    if blocks:
        raise ValueError(f"rows hold AutoAttack at {sorted(blocks)}, which settings do not name")
    return {
        "rows": out + tail,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "autoattack_cpu_seconds": timings.get("autoattack", 0.0),
    }

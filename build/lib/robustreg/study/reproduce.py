"""Reproduction from scratch: retrain committed runs and compare their metrics with the files.

Trained weights differ in their last bits from one CPU (instruction set, thread count) to another,
and training amplifies that difference the way a change of seed does. So a metric reproduces when
it lands within its seed-to-seed spread (``python -m robustreg reproduce-results``).
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
from robustreg.study import cache
from robustreg.study.evaluate import evaluate_model
from robustreg.study.store import StaleResultError, load_results, read_result

__all__ = ["REPRODUCED_METRICS", "check_reproduction"]

#: Metrics that :func:`check_reproduction` compares: the accuracies and the regularizers' means.
#: The medians of the radii (distances to the nearest activation boundary of 100 points) and the
#: region-cap fraction are left out: a last-bit change of the weights moves them by more than a
#: change of seed does (measured across instruction sets: up to 4 seed standard deviations).
REPRODUCED_METRICS = ("clean_accuracy", "robust_accuracy", "regularizer_mean")


def _metric_name(row: Mapping[str, Any]) -> str:
    parts = [
        row["metric"],
        row.get("attack"),
        row.get("norm"),
        row.get("eps"),
        row.get("regularizer"),
    ]
    return " ".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts if p is not None)


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    return {_metric_name(r): float(r["value"]) for r in record["rows"]}


def check_reproduction(
    results_dir: str | os.PathLike,
    names: Sequence[str],
    *,
    fraction: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Retrain and re-evaluate committed runs; compare their metrics with the result files.

    The tolerance of a metric is a ``fraction`` (default 1) of its seed-to-seed spread: the
    sample standard deviation of that metric over the seeds of the same method and λ in
    ``results_dir`` — a retraining elsewhere must land within the spread of a change of seed —
    and, for an accuracy, at least one test image (the metric's resolution). Only the
    :data:`REPRODUCED_METRICS` are compared. Returns one row per metric (``run``, ``metric``,
    ``stored``, ``recomputed``, ``tolerance``, ``ok``); the caller decides what a failure means.
    """
    results = Path(results_dir)
    everything = load_results(results)
    rows = []
    for name in names:
        path = results / (name if name.endswith(".json") else f"{name}.json")
        stored = read_result(path)
        config = stored["config"]
        if cache.cache_key(config) != stored["key"]:
            raise StaleResultError(
                f"{path}: its key does not match its configuration under today's code (a default "
                "or CACHE_VERSION changed); recompute it with --refresh"
            )
        siblings = [
            _metrics(r)
            for r in everything
            if r["method"] == stored["method"]
            and r["lam"] == stored["lam"]
            and r["eval"] == stored["eval"]
        ]
        if len(siblings) < 2:
            raise ValueError(
                f"{path}: the tolerance needs at least two seeds of this run in {results}"
            )
        dtype = cache.torch_dtype(config["dtype"])
        test = data_module.load(config["data"], "test", dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="robustreg-reproduce-") as tmp:
            model, _ = cache.train_cached(
                config, cache_dir=cache_dir or tmp, device="cpu", progress=progress
            )
            fresh = _metrics(evaluate_model(model, test, stored["eval"]))
        n_test = stored["eval"].get("n_test") or len(test[1])
        for metric, value in _metrics(stored).items():
            if not metric.startswith(REPRODUCED_METRICS):
                continue
            spread = statistics.stdev([s[metric] for s in siblings if metric in s])
            resolution = 1.0 / n_test if "accuracy" in metric else 0.0
            if "autoattack" in metric or "pgd-subset" in metric or "worst-case" in metric:
                resolution = 1.0 / stored["eval"]["autoattack_n"]
            tolerance = max(fraction * spread, resolution)
            got = fresh.get(metric, math.nan)
            rows.append(
                {
                    "run": path.stem,
                    "metric": metric,
                    "stored": value,
                    "recomputed": got,
                    "tolerance": tolerance,
                    "ok": abs(got - value) <= tolerance,
                }
            )
    return rows

"""Paired comparisons of two training methods, with bootstrap confidence intervals.

Two methods A and B trained with the same seeds s = 1..S (same initial weights and batch order)
and evaluated on the same test images i = 1..n give per-image outcomes a_si, b_si ∈ {0, 1}
(robust or not). Their difference in accuracy is

    Δ = (1/(S n)) Σ_s Σ_i (a_si − b_si).

Its uncertainty has two sources: which seeds were drawn and which test images. The two-way
(seed × image) bootstrap resamples both: S seeds with replacement and, independently, n images
with replacement (the same images for every seed, which keeps the pairing of a test image across
seeds), and recomputes Δ; the percentile interval of those replicates is the confidence
interval. An interval that contains 0 means the comparison is not resolved by these runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["outcomes", "paired_difference", "resolved"]


def outcomes(
    records: Iterable[Mapping[str, Any]],
    method: str,
    lam: float,
    column: str,
    seeds: Sequence[int],
) -> np.ndarray:
    """Per-image outcomes [len(seeds), n] of one method at one λ from result records.

    ``column``: ``"clean"`` or ``"<attack> <norm> <ε>"`` (e.g. ``"worst-case linf 0.1"``), read
    from the ``flags`` of the record's rows (written with ``per_image=True``). A missing seed or
    column is a ``KeyError`` naming it.
    """
    found = {}
    for rec in records:
        if rec["method"] != method or float(rec["lam"]) != float(lam):
            continue
        for row in rec["rows"]:
            if "flags" not in row:
                continue
            name = (
                "clean"
                if row["metric"] == "clean_accuracy"
                else f"{row['attack']} {row['norm']} {row['eps']:g}"
            )
            if name == column:
                found[rec["seed"]] = np.frombuffer(row["flags"].encode(), np.uint8) == ord("1")
    missing = [s for s in seeds if s not in found]
    if missing:
        raise KeyError(f"no per-image {column!r} of {method} λ = {lam:g} for seeds {missing}")
    return np.stack([found[s] for s in seeds])


def paired_difference(
    a: Sequence | np.ndarray,
    b: Sequence | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Δ = mean(a − b) over seeds and images, with its two-way bootstrap percentile interval.

    ``a``, ``b``: arrays [S, n] of per-image outcomes (0/1 or any number) of two methods, row s
    from seed s of each. Returns ``{"diff", "low", "high", "se"}`` (``se`` the bootstrap standard
    error). Draws come from ``numpy.random.default_rng(seed)``, so the interval is reproducible.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"a and b must be arrays [seeds, images] of one shape; got {a.shape}, {b.shape}"
        )
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise ValueError(f"n_boot must be an integer ≥ 100, got {n_boot!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")
    d = a - b
    s, n = d.shape
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    for k in range(n_boot):
        rows = rng.integers(0, s, s)
        cols = rng.integers(0, n, n)
        # mean over the resampled grid = mean over rows of each row's mean over the columns
        reps[k] = d[rows][:, cols].mean()
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return {
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "se": float(reps.std()),
    }


def resolved(interval: dict[str, float]) -> bool:
    """Whether a :func:`paired_difference` interval excludes 0 (the sign of Δ is established)."""
    return interval["low"] > 0 or interval["high"] < 0

"""Paired comparisons of two training methods: an interval that keeps its coverage with few seeds,
and Holm's correction for a family of comparisons.

Two methods A and B trained with the same seeds s = 1..S (same initial weights and batch order)
and evaluated on the same test images i = 1..n give per-image outcomes a_si, b_si ∈ {0, 1}
(robust or not), and differences d_si = a_si − b_si. The estimate of the difference in accuracy is

    Δ̂ = (1/(S n)) Σ_s Σ_i d_si.

Its uncertainty has two sources: which seeds were drawn and which test images. In the model
d_si = μ + u_s + v_i + e_si (a seed effect u, an image effect v shared by every seed, noise e),

    Var Δ̂ = σ_u²/S + σ_v²/n + σ_e²/(S n).

:func:`paired_interval` estimates it from the per-seed means Δ_s = (1/n) Σ_i d_si and the
per-image means d̄_i = (1/S) Σ_s d_si,

    SE² = s²(Δ_s)/S + s²(d̄_i)/n,

whose expectation, σ_u²/S + σ_v²/n + 2σ_e²/(S n), is at least Var Δ̂ (each sample variance
carries the noise once), and takes the interval Δ̂ ± t_{S−1, 1−α/2} SE, with Student's t on the
S − 1 degrees of freedom of the seed term (the image term has n − 1 ≫ S − 1; fewer degrees of
freedom make the interval wider, never narrower). With S = 5 seeds, t₄ = 2.78 against the
normal 1.96: the seed term is estimated from five numbers and the interval says so.

Why not the two-way percentile bootstrap (:func:`bootstrap_interval`: seeds and images resampled
with replacement)? With five seeds it under-covers: resampling S values has variance (S − 1)/S of
the usual estimate, and its percentiles are normal-like where the t₄ quantiles are 42 % wider. In
a simulation whose effect varies between seeds it covers about 80–85 % at nominal 95 %
(``tests/test_comparison.py`` checks both intervals' coverage).

A chapter that counts a family of comparisons ("k of n ahead") controls the family-wise error
with Holm's step-down procedure (:func:`holm`) on the intervals' p-values. :func:`replication`
asks whether the comparisons of one study hold in another (the same methods on another network):
Holm's correction over the comparisons of both studies together, then each comparison classed by
the signs that survive it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats

__all__ = [
    "REPLICATION_CLASSES",
    "bootstrap_interval",
    "holm",
    "outcomes",
    "paired_interval",
    "replication",
    "resolved",
]


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


def _differences(a, b, *, min_seeds: int) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"a and b must be arrays [seeds, images] of one shape; got {a.shape}, {b.shape}"
        )
    if a.shape[0] < min_seeds or a.shape[1] < 2:
        raise ValueError(
            f"a paired interval needs ≥ {min_seeds} seeds and ≥ 2 images; got shape {a.shape}"
        )
    return a - b


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must lie in (0, 1), got {level!r}")


def paired_interval(
    a: Sequence | np.ndarray, b: Sequence | np.ndarray, *, level: float = 0.95
) -> dict[str, float]:
    """Δ̂ = mean(a − b) over seeds and images with its t-interval over seeds that also carries the
    test-image variance (module docstring): Δ̂ ± t_{S−1} · SE, SE² = s²(Δ_s)/S + s²(d̄_i)/n.

    ``a``, ``b``: arrays [S, n] (S ≥ 2) of per-image outcomes (0/1 or any number), row s from seed
    s of each method. Returns ``{"diff", "low", "high", "se", "p"}``, ``p`` the two-sided p-value
    of Δ = 0 under the same t distribution (the interval excludes 0 iff ``p < 1 − level``).
    """
    _check_level(level)
    d = _differences(a, b, min_seeds=2)
    s, n = d.shape
    diff = float(d.mean())
    se = float(np.sqrt(d.mean(axis=1).var(ddof=1) / s + d.mean(axis=0).var(ddof=1) / n))
    q = float(stats.t.ppf(0.5 + level / 2, s - 1))
    if se == 0.0:
        p = 1.0 if diff == 0.0 else 0.0
    else:
        p = float(2 * stats.t.sf(abs(diff) / se, s - 1))
    return {"diff": diff, "low": diff - q * se, "high": diff + q * se, "se": se, "p": p}


def bootstrap_interval(
    a: Sequence | np.ndarray,
    b: Sequence | np.ndarray,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Δ̂ with the two-way (seed × image) percentile bootstrap interval: S seeds and, independently,
    n images resampled with replacement (the same images for every seed), Δ̂ recomputed, the middle
    ``level`` of the replicates. **Under-covers with few seeds** (module docstring): kept as the
    reference that :func:`paired_interval` is checked against, not for reporting.

    Returns ``{"diff", "low", "high", "se"}`` (``se`` the replicates' standard deviation); draws
    come from ``numpy.random.default_rng(seed)``.
    """
    _check_level(level)
    if not (isinstance(n_boot, int) and n_boot >= 100):
        raise ValueError(f"n_boot must be an integer ≥ 100, got {n_boot!r}")
    d = _differences(a, b, min_seeds=1)
    s, n = d.shape
    rng = np.random.default_rng(seed)
    # a replicate is the mean over the resampled grid: w_seedsᵀ d w_images, with the weights the
    # multinomial counts of each seed and image divided by S and n
    w_seeds = rng.multinomial(s, np.full(s, 1 / s), size=n_boot) / s
    w_images = rng.multinomial(n, np.full(n, 1 / n), size=n_boot) / n
    reps = ((w_seeds @ d) * w_images).sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return {
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "se": float(reps.std()),
    }


def resolved(interval: Mapping[str, float]) -> bool:
    """Whether an interval excludes 0 (the sign of Δ is established, before any correction for
    the other comparisons of its family: see :func:`holm`)."""
    return interval["low"] > 0 or interval["high"] < 0


def holm(p_values: Sequence[float], *, alpha: float = 0.05) -> list[bool]:
    """Holm's step-down procedure: which of m hypotheses to reject with family-wise error ≤ α.

    Sort the p-values p_(1) ≤ … ≤ p_(m); reject H_(1), …, H_(k−1) for the first k with
    p_(k) > α / (m − k + 1), and none from there on. Returns one boolean per p-value, in the
    given order (True: rejected, i.e. the comparison is resolved within its family).
    """
    _check_level(alpha)
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or np.isnan(p).any() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"p_values must be a list of numbers in [0, 1], got {p_values!r}")
    m = len(p)
    reject = np.zeros(m, dtype=bool)
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        if p[i] > alpha / (m - rank):
            break
        reject[i] = True
    return reject.tolist()


#: The classes of :func:`replication`, in the order a report lists them.
REPLICATION_CLASSES = ("replicated", "reversed", "first only", "second only", "neither")


def replication(
    first: Mapping[Any, Mapping[str, float]],
    second: Mapping[Any, Mapping[str, float]],
    *,
    alpha: float = 0.05,
) -> dict[Any, str]:
    """Whether each comparison of one study holds in another: ``{key: class}``.

    ``first`` and ``second`` map the same keys (a comparison, e.g. ``("curvature", "plain")``)
    to intervals of :func:`paired_interval` (``"diff"`` and ``"p"`` are read). Holm's correction
    (:func:`holm`) runs over the 2m p-values together, so that the chance of declaring even one
    of the 2m differences wrongly is at most about ``alpha``; then a comparison is
    ``"replicated"`` where both studies resolve it with the same sign, ``"reversed"`` where both
    resolve it with opposite signs, ``"first only"`` / ``"second only"`` where one study alone
    resolves it, and ``"neither"`` otherwise (:data:`REPLICATION_CLASSES`).
    """
    if set(first) != set(second):
        raise ValueError(
            "first and second must hold the same comparisons; only in first: "
            f"{sorted(map(str, set(first) - set(second)))}, only in second: "
            f"{sorted(map(str, set(second) - set(first)))}"
        )
    keys = list(first)
    flags = holm([first[k]["p"] for k in keys] + [second[k]["p"] for k in keys], alpha=alpha)
    out = {}
    for k, one, two in zip(keys, flags[: len(keys)], flags[len(keys) :], strict=True):
        if one and two:
            same = (first[k]["diff"] > 0) == (second[k]["diff"] > 0)
            out[k] = "replicated" if same else "reversed"
        else:
            out[k] = "first only" if one else "second only" if two else "neither"
    return out

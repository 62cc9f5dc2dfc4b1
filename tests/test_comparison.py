"""robustreg.comparison: the paired interval keeps its coverage with five seeds and with three
(the converged study), the percentile bootstrap does not, and Holm's procedure controls a family,
also when it runs over two studies together (replication)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from robustreg import comparison


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _study(rng, reps, seeds, images, *, effect, seed_sd, image_sd):
    """``reps`` simulated paired studies [reps, seeds, images] of differences a − b, and the true
    Δ: image difficulty θ_i ~ N(0, 1.5²) shared by both methods and all seeds, a per-image effect
    δ_i ~ N(effect, image_sd²), a seed effect w_s ~ N(0, seed_sd²) per method; both methods see one
    uniform U_si per seed and image (the same image under networks of one seed)."""
    theta = rng.normal(0, 1.5, (reps, 1, images))
    delta = rng.normal(effect, image_sd, (reps, 1, images))
    w_a, w_b = rng.normal(0, seed_sd, (2, reps, seeds, 1))
    u = rng.random((reps, seeds, images))
    d = (u < _sigmoid(theta + delta + w_a)).astype(float) - (u < _sigmoid(theta + w_b))
    # the population value of Δ (over images and seeds), by a large Monte-Carlo sample
    big = 2_000_000
    th, de = rng.normal(0, 1.5, big), rng.normal(effect, image_sd, big)
    wa, wb = rng.normal(0, seed_sd, (2, big))
    truth = float((_sigmoid(th + de + wa) - _sigmoid(th + wb)).mean())
    return d, truth


def _covers(interval, truth):
    return interval["low"] <= truth <= interval["high"]


@pytest.mark.parametrize(
    ("seeds", "images"),
    [(5, 500), (3, 1000)],
    ids=["five seeds, 500 images (the 5,000-image study)", "three seeds, 1,000 images (converged)"],
)
@pytest.mark.parametrize(
    ("seed_sd", "image_sd"),
    [(0.15, 0.3), (0.3, 0.3), (0.05, 0.5), (0.0, 0.0)],
    ids=["seeds vary", "seeds vary more", "images vary", "no variation"],
)
def test_paired_interval_covers_at_least_nominally(seeds, images, seed_sd, image_sd):
    rng = np.random.default_rng(1)
    d, truth = _study(rng, 2000, seeds, images, effect=0.1, seed_sd=seed_sd, image_sd=image_sd)
    zeros = np.zeros_like(d[0])
    hits = [_covers(comparison.paired_interval(r, zeros), truth) for r in d]
    # ≥ 93 % at nominal 95 %: 2,000 studies put the estimate within ±1 point of its coverage
    assert np.mean(hits) >= 0.93, np.mean(hits)


def test_percentile_bootstrap_falls_short_where_seeds_vary():
    """The negative control: the interval chapter 12 used before, in the same simulation."""
    rng = np.random.default_rng(1)
    d, truth = _study(rng, 1000, 5, 500, effect=0.1, seed_sd=0.3, image_sd=0.3)
    zeros = np.zeros_like(d[0])
    boot = np.mean(
        [
            _covers(comparison.bootstrap_interval(r, zeros, n_boot=500, seed=k), truth)
            for k, r in enumerate(d)
        ]
    )
    t = np.mean([_covers(comparison.paired_interval(r, zeros), truth) for r in d])
    assert boot < 0.90 and t >= 0.93, (boot, t)  # measured: about 0.85 and 0.95


def test_paired_interval_is_the_t_interval_of_its_formula():
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 30)), rng.random((4, 30))
    ci = comparison.paired_interval(a, b, level=0.9)
    d = a - b
    se = np.sqrt(d.mean(1).var(ddof=1) / 4 + d.mean(0).var(ddof=1) / 30)
    q = stats.t.ppf(0.95, 3)
    assert ci["diff"] == pytest.approx(d.mean(), rel=1e-12)
    assert ci["se"] == pytest.approx(se, rel=1e-12)
    assert (ci["low"], ci["high"]) == pytest.approx((d.mean() - q * se, d.mean() + q * se))
    # the interval excludes zero exactly when p < 1 − level
    for shift in np.linspace(-0.3, 0.3, 13):
        c = comparison.paired_interval(a + shift, b, level=0.9)
        assert comparison.resolved(c) == (c["p"] < 0.1) or abs(c["p"] - 0.1) < 1e-12


def test_paired_interval_edge_cases_and_errors():
    same = np.ones((5, 10))
    ci = comparison.paired_interval(same, same)
    assert ci == {"diff": 0.0, "low": 0.0, "high": 0.0, "se": 0.0, "p": 1.0}
    assert not comparison.resolved(ci)
    shifted = comparison.paired_interval(same, same - 1)  # every difference exactly 1
    assert shifted["p"] == 0.0 and comparison.resolved(shifted)
    with pytest.raises(ValueError, match="one shape"):
        comparison.paired_interval(np.zeros((2, 3)), np.zeros((3, 2)))
    with pytest.raises(ValueError, match="≥ 2 seeds"):
        comparison.paired_interval(np.zeros((1, 30)), np.zeros((1, 30)))
    with pytest.raises(ValueError, match="level"):
        comparison.paired_interval(same, same, level=95)
    with pytest.raises(ValueError, match="n_boot"):
        comparison.bootstrap_interval(same, same, n_boot=10)


def test_holm_step_down():
    # α/m, α/(m−1), ...: 0.01 ≤ 0.05/4, 0.015 ≤ 0.05/3, 0.03 > 0.05/2 stops: the last two stay
    assert comparison.holm([0.03, 0.01, 0.2, 0.015]) == [False, True, False, True]
    assert comparison.holm([0.001] * 3) == [True] * 3
    assert comparison.holm([]) == []
    # never more rejections than the uncorrected test, never fewer than Bonferroni's
    rng = np.random.default_rng(0)
    for _ in range(200):
        p = rng.random(8) ** 3
        h = np.array(comparison.holm(p))
        assert (h <= (p < 0.05)).all() and (h >= (p <= 0.05 / 8)).all()
    with pytest.raises(ValueError, match="p_values"):
        comparison.holm([0.5, 1.5])


def test_replication_classes():
    # p-values 0.001 ×6 and 0.2 ×4: Holm over the ten rejects the six small ones (0.001 ≤ 0.05/5
    # at the sixth), the four at 0.2 stay
    first = {
        "a": {"diff": 0.05, "p": 0.001},  # resolved on both, the same sign
        "b": {"diff": 0.05, "p": 0.001},  # resolved on both, opposite signs
        "c": {"diff": 0.05, "p": 0.001},  # resolved in the first study only
        "d": {"diff": -0.01, "p": 0.2},  # resolved in the second only
        "e": {"diff": 0.02, "p": 0.2},  # in neither
    }
    second = {  # in another order: the comparisons are matched by key
        "e": {"diff": 0.03, "p": 0.2},
        "d": {"diff": 0.01, "p": 0.001},
        "c": {"diff": 0.01, "p": 0.2},
        "b": {"diff": -0.03, "p": 0.001},
        "a": {"diff": 0.02, "p": 0.001},
    }
    got = comparison.replication(first, second)
    assert got == {
        "a": "replicated",
        "b": "reversed",
        "c": "first only",
        "d": "second only",
        "e": "neither",
    }
    assert set(got.values()) == set(comparison.REPLICATION_CLASSES)
    with pytest.raises(ValueError, match="only in first: \\['c'\\]"):
        comparison.replication(first, {k: v for k, v in second.items() if k != "c"})


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.floats(-0.2, 0.2, allow_nan=False),
            st.floats(0, 1),
            st.floats(-0.2, 0.2, allow_nan=False),
            st.floats(0, 1),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_replication_is_holm_over_both_studies(draws):
    first = {i: {"diff": d1, "p": p1} for i, (d1, p1, _, _) in enumerate(draws)}
    second = {i: {"diff": d2, "p": p2} for i, (_, _, d2, p2) in reversed(list(enumerate(draws)))}
    got = comparison.replication(first, second)
    assert set(got) == set(first) and set(got.values()) <= set(comparison.REPLICATION_CLASSES)
    # swapping the studies swaps "first only" and "second only", nothing else
    swap = {"first only": "second only", "second only": "first only"}
    assert comparison.replication(second, first) == {k: swap.get(c, c) for k, c in got.items()}
    # a comparison counts as resolved in a study exactly where Holm over all 2m rejects it
    flags = comparison.holm([first[i]["p"] for i in first] + [second[i]["p"] for i in first])
    m = len(first)
    for i in first:
        one, two = flags[i], flags[m + i]
        assert (got[i] in ("replicated", "reversed", "first only")) == one
        assert (got[i] in ("replicated", "reversed", "second only")) == two
        if one and two:
            same = (first[i]["diff"] > 0) == (second[i]["diff"] > 0)
            assert got[i] == ("replicated" if same else "reversed")
        if not (one or two):
            assert got[i] == "neither"

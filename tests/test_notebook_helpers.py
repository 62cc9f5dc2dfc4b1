"""robustreg.notebook's helpers for joining per-case results of different shapes."""

import numpy as np
import pytest
import torch

from robustreg.notebook import cat_cases, flatten_cat, pad_cat, pad_stack, quartiles, relative_error


def test_cat_cases_by_key_callable_and_whole_dicts():
    results = [
        {"v": torch.tensor([1.0, 2.0]), "J": torch.ones(2, 3, 4)},
        {"v": torch.tensor([3.0]), "J": torch.ones(1, 5, 4)},
    ]
    assert cat_cases(results, "v").tolist() == [1.0, 2.0, 3.0]
    assert cat_cases(results, lambda r: 2 * r["v"]).tolist() == [2.0, 4.0, 6.0]
    joined = cat_cases(results)
    assert joined["v"].tolist() == [1.0, 2.0, 3.0]
    assert [t.shape for t in joined["J"]] == [(3, 4), (3, 4), (5, 4)]
    again = cat_cases([joined, joined])
    assert again["v"].tolist() == [1.0, 2.0, 3.0] * 2 and len(again["J"]) == 6
    with pytest.raises(ValueError, match="no results"):
        cat_cases([])


def test_pad_cat_and_pad_stack_keep_norms():
    a, b = torch.randn(2, 3, 3), torch.randn(1, 5, 5)
    out = pad_cat([a, b])
    assert out.shape == (3, 5, 5)
    assert (
        torch.equal(out[:2, :3, :3], a)
        and out[:2, 3:].abs().sum() == 0
        and torch.equal(out[2], b[0])
    )
    ref = pad_cat([a + 1, b])
    direct = torch.cat([relative_error(a, a + 1), relative_error(b, b)])
    assert torch.allclose(relative_error(out, ref), direct)
    s = pad_stack([torch.ones(2), torch.ones(4)])
    assert s.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_flatten_cat_and_quartiles():
    assert flatten_cat([torch.ones(2, 2), torch.zeros(3)]).shape == (7,)
    v = np.random.default_rng(0).normal(size=(4, 11))
    q = quartiles(v, dim=1)
    assert q.shape == (3, 4)
    assert np.allclose(q.numpy(), np.quantile(v, [0.25, 0.5, 0.75], axis=1))
    assert np.allclose(q[1].numpy(), np.median(v, axis=1))


def test_verify_identity_scales_by_the_terms_that_cancel(capsys):
    from robustreg.notebook import verify_identity

    f64 = dict(dtype=torch.float64)
    big = torch.tensor([1.0, 1.0], **f64) * 1e8
    computed = (big + torch.tensor([3e-9, 1.0], **f64)) - big  # rounding of the 1e8 terms: ~1e-8
    reference = torch.tensor([3e-9, 1.0], **f64)
    with pytest.raises(AssertionError, match="worst relative error"):
        verify_identity("cancellation, relative", computed, reference)
    verify_identity("cancellation, scaled", computed, reference, scale=("|terms|", big))
    assert "error / (|terms|) ≤ 1e-10 on all 2 cases" in capsys.readouterr().out
    # one part in 10⁶ of a result that is not swamped by cancellation still fails
    with pytest.raises(AssertionError, match="fails"):
        verify_identity("wrong", reference * (1 + 1e-6), reference, scale=("|result|", reference))


def test_verify_identity_reports_nan_and_accepts_empty_selections(capsys):
    from robustreg.notebook import verify_identity, verify_inequality

    with pytest.raises(AssertionError, match="NaN or infinite.*case 1 of 2"):
        verify_identity("nan", torch.tensor([1.0, float("nan")]), torch.ones(2))
    empty = torch.ones(3)[torch.zeros(3, dtype=torch.bool)]
    assert verify_identity("empty", empty, empty) == 0.0
    assert "on all 0 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        verify_inequality("nan", torch.tensor([float("nan")]), torch.ones(1))

"""The chapters' helpers: robustreg.tensors (joining per-case results of different shapes) and
robustreg.checks (the one tolerance rule, its assertions and their printed lines)."""

import numpy as np
import pytest
import torch

from robustreg.checks import check_identity, check_inequality, relative_error
from robustreg.tensors import cat_cases, flatten_cat, pad_cat, pad_stack, quartiles


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
    check_identity("padding keeps norms", relative_error(out, ref), direct)
    s = pad_stack([torch.ones(2), torch.ones(4)])
    assert s.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_flatten_cat_and_quartiles():
    assert flatten_cat([torch.ones(2, 2), torch.zeros(3)]).shape == (7,)
    v = np.random.default_rng(0).normal(size=(4, 11))
    q = quartiles(v, dim=1)
    assert q.shape == (3, 4)
    check_identity("quartiles", q.T, torch.from_numpy(np.quantile(v, [0.25, 0.5, 0.75], axis=1)).T)
    check_identity("median", q[1], torch.from_numpy(np.median(v, axis=1)))


def test_check_identity_scales_by_the_terms_that_cancel(capsys):
    f64 = dict(dtype=torch.float64)
    big = torch.tensor([1.0, 1.0], **f64) * 1e8
    computed = (big + torch.tensor([3e-9, 1.0], **f64)) - big  # rounding of the 1e8 terms: ~1e-8
    reference = torch.tensor([3e-9, 1.0], **f64)
    with pytest.raises(AssertionError, match="worst relative error"):
        check_identity("cancellation, relative", computed, reference)
    check_identity("cancellation, scaled", computed, reference, scale=("|terms|", big))
    assert "error / (|terms|) ≤ 1e-10 on all 2 cases" in capsys.readouterr().out
    # one part in 10⁶ of a result that is not swamped by cancellation still fails
    with pytest.raises(AssertionError, match="fails"):
        check_identity("wrong", reference * (1 + 1e-6), reference, scale=("|result|", reference))


def test_check_identity_reports_nan_and_accepts_empty_selections(capsys):
    with pytest.raises(AssertionError, match="NaN or infinite.*case 1 of 2"):
        check_identity("nan", torch.tensor([1.0, float("nan")]), torch.ones(2))
    empty = torch.ones(3)[torch.zeros(3, dtype=torch.bool)]
    assert check_identity("empty", empty, empty) == 0.0
    assert "on all 0 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError):
        check_inequality("nan", torch.tensor([float("nan")]), torch.ones(1))


def test_check_identity_and_inequality_fail_loudly(capsys):
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    assert check_identity("same", a, a.clone()) == 0.0
    assert "✔ same: relative error ≤ 1e-10 on all 2 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="worst relative error"):
        check_identity("off", a * (1 + 1e-8), a)
    with pytest.raises(AssertionError, match="fails on 1 of 2 cases"):
        check_inequality("le", torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]))
    with pytest.raises(AssertionError):
        check_identity("nan", torch.tensor([float("nan")]), torch.tensor([1.0]))
    assert check_inequality("le", torch.tensor([1.0, 1.0]), torch.tensor([2.0, 1.0])) == 1.0


def test_html_table_is_deterministic_markup_that_keeps_emphasis():
    import pandas as pd

    from robustreg.notebook import html_table

    frame = pd.DataFrame({"ℓ∞ 0.1": ["<b>+1.0 [+0.2, +1.8]</b>", None]}, index=["a", "b"])
    html = html_table(frame).data
    assert html == html_table(frame.copy()).data  # no random ids (a Styler has them)
    assert "<b>+1.0 [+0.2, +1.8]</b>" in html and "—" in html
    assert 'class="dataframe robustreg-table"' in html


def test_html_table_keeps_assignments_in_labels_on_one_line():
    import pandas as pd

    from robustreg.notebook import html_table

    frame = pd.DataFrame({"PGD-ℓ∞, ε = 0.1": ["1.0"]}, index=["CURE, λ = 2.86"])
    html = html_table(frame, text=True).data
    assert "CURE, λ\u00a0=\u00a02.86" in html and "ε\u00a0=\u00a00.1" in html
    assert " = " not in html  # no label may break at its equals sign
    assert '<span class="robustreg-nobr">PGD-ℓ∞</span>,' in html  # nor at its hyphen
    words = html_table(pd.DataFrame({"a": ["1"]}, index=["cross-Lipschitz − PGD-ℓ2"])).data
    assert 'cross-Lipschitz − <span class="robustreg-nobr">PGD-ℓ2</span>' in words
    assert 'class="dataframe robustreg-table robustreg-text"' in html
    assert list(frame.index) == ["CURE, λ = 2.86"]  # the caller's frame is left as it was


def test_glue_md_glues_markdown_that_the_page_shows_as_prose(monkeypatch):
    myst_nb = pytest.importorskip("myst_nb")
    from IPython.display import Markdown

    from robustreg.notebook import glue_md

    calls = []
    monkeypatch.setattr(myst_nb, "glue", lambda *args, **kw: calls.append((args, kw)))
    glue_md("a_sentence", "the **two** radii")
    ((args, kw),) = calls
    assert args[0] == "a_sentence" and kw == {"display": False}
    assert isinstance(args[1], Markdown) and args[1].data == "the **two** radii"


def test_listing_joins_items_as_prose():
    from robustreg.notebook import listing

    assert listing([]) == ""
    assert listing(["a"]) == "a"
    assert listing(["a", "b"]) == "a and b"
    assert listing(x for x in ["a", "b", "c"]) == "a, b and c"
    assert listing([1.5, 2]) == "1.5 and 2"


def test_scientific_writes_powers_of_ten_for_prose():
    from robustreg.notebook import scientific

    assert scientific(4.23e10) == "4.2 × 10¹⁰"
    assert scientific(4.8e-6, 1) == "5 × 10⁻⁶"
    assert scientific(9.96e-3, 2) == "1.0 × 10⁻²"
    assert scientific(-1.5e5) == "-1.5 × 10⁵"
    assert scientific(0.0073) == "7.3 × 10⁻³"
    assert scientific(12.34) == "12" and scientific(0.5, 1) == "0.5" and scientific(0) == "0"


def test_check_claims_asserts_and_prints_each_statement(capsys):
    from robustreg.checks import check_claims

    check_claims({"a holds": True, "b holds": bool(1 < 2)}, "on each of the 3 seeds")
    assert capsys.readouterr().out == (
        "✔ on each of the 3 seeds: a holds\n✔ on each of the 3 seeds: b holds\n"
    )
    with pytest.raises(AssertionError, match=r"claim fails \(here\): c holds"):
        check_claims({"c holds": False}, "here")

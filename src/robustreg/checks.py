"""The book's tolerance rule: a claim of the theory as an assertion with a stated bound.

One rule decides every identity the chapters and the tests check (book/checks.md, "How the checks
decide"): case by case,

    ‖computed − reference‖ ≤ tol · scale,

with ``scale`` the size of the terms whose rounding the computation carries — ‖reference‖ (a
relative error) when nothing cancels, else the size of the terms that cancel, e.g. ‖J‖_F.
:func:`scaled_error` computes the left side over the scale, :func:`check_identity` asserts the
rule and :func:`check_inequality` its one-sided form ``lhs ≤ rhs + tol · scale``; both print one
stable line (the bound, never the error that happened to occur), which nbval compares against the
published output. The references compared with are in :mod:`robustreg.reference`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


def _as_cases(t) -> torch.Tensor:
    """[cases, values]: a scalar is one case, a vector one value per case (also when empty)."""
    t = torch.as_tensor(t, dtype=torch.float64).detach()
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, 1) if t.dim() == 1 else t.flatten(1)


def relative_error(computed, reference) -> torch.Tensor:
    """Per case ‖computed − reference‖₂ / ‖reference‖₂ (absolute error where the reference is 0).

    The first dimension indexes the cases; the norm runs over everything else. Cases of different
    shapes (say, networks with different numbers of classes) can be given as two lists of tensors,
    one tensor per case.
    """
    if isinstance(computed, list | tuple):
        if not isinstance(reference, list | tuple) or len(computed) != len(reference):
            raise ValueError("give computed and reference as lists of the same length")
        return torch.cat(
            [
                relative_error(c.reshape(1, -1), r.reshape(1, -1))
                for c, r in zip(computed, reference, strict=True)
            ]
        )
    a, b = _as_cases(computed), _as_cases(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: computed {tuple(a.shape)} vs reference {tuple(b.shape)}")
    num = (a - b).norm(dim=1)
    den = b.norm(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), num)


def check_identity(name: str, computed, reference, tol: float = 1e-10, *, scale=None) -> float:
    """Assert that ``computed`` equals ``reference`` case by case, up to rounding.

    The rule (the book's "How the checks decide"): a float64 computation of a quantity that is a
    sum or difference of terms carries a rounding error of a few units of 2⁻⁵³ ≈ 1.1e-16 times
    the size of those *terms*, multiplied by the number of operations — not times the size of the
    result, which cancellation can make arbitrarily small. So each case must satisfy

        ‖computed − reference‖ ≤ tol · scale,

    with ``scale`` the size of the terms that cancel. ``scale=None`` takes ``‖reference‖`` (a
    relative error: right when nothing cancels); otherwise give ``(description, per-case
    tensor)``, e.g. ``("‖J‖_F", J.flatten(1).norm(dim=1))``. ``tol = 1e-10`` leaves a factor of
    about 10⁶ over the unit roundoff for the lengths of the sums (K classes, d inputs, depth), so
    a wrong formula — even one wrong by one part in 10⁶ — still fails wherever its result is not
    itself swamped by cancellation. A NaN or infinite value in either side is a failure of the code
    and is reported as such. Prints one stable line (the bound, not the noisy error) and returns
    the worst scaled error.
    """
    what = "relative error"
    if scale is not None:
        what, scale = f"error / ({scale[0]})", scale[1]
    err = scaled_error(computed, reference, scale)
    n = err.numel()
    bad = _non_finite_cases(computed, reference)
    if bad is not None:
        raise AssertionError(f"{name}: a computed value is NaN or infinite (case {bad} of {n})")
    worst = float(err.max()) if n else 0.0
    if not worst <= tol:
        raise AssertionError(
            f"{name}: fails — worst {what} {worst:.3e} > {tol:.0e} "
            f"(case {int(err.argmax())} of {n})"
        )
    print(f"✔ {name}: {what} ≤ {tol:.0e} on all {n} cases")
    return worst


def _non_finite_cases(computed, reference) -> int | None:
    """Index of the first case with a NaN or infinity on either side (None when all finite)."""
    if isinstance(computed, list | tuple):
        for i, (c, r) in enumerate(zip(computed, reference, strict=True)):
            if not (
                torch.isfinite(torch.as_tensor(c)).all()
                and torch.isfinite(torch.as_tensor(r)).all()
            ):
                return i
        return None
    a, b = _as_cases(computed), _as_cases(reference)
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def scaled_error(computed, reference, scale=None) -> torch.Tensor:
    """Per case ‖computed − reference‖ / scale, ``scale`` defaulting to ‖reference‖ (the relative
    error). Where the scale is 0 the absolute error is returned (0 only if both sides are 0)."""
    if scale is None:
        return relative_error(computed, reference)
    if isinstance(computed, list | tuple):
        diff = torch.stack(
            [
                (_as_cases(c.reshape(1, -1)) - _as_cases(r.reshape(1, -1))).norm()
                for c, r in zip(computed, reference, strict=True)
            ]
        )
    else:
        a, b = _as_cases(computed), _as_cases(reference)
        if a.shape != b.shape:
            raise ValueError(
                f"shapes differ: computed {tuple(a.shape)} vs reference {tuple(b.shape)}"
            )
        diff = (a - b).norm(dim=1)
    s = torch.as_tensor(scale, dtype=torch.float64).detach().flatten()
    if s.numel() == 1:
        s = s.expand_as(diff)
    if s.shape != diff.shape:
        raise ValueError(f"scale has {s.numel()} entries for {diff.numel()} cases")
    return torch.where(s > 0, diff / torch.where(s > 0, s, 1.0), diff)


def check_inequality(name: str, lhs, rhs, rtol: float = 1e-12, *, scale=None) -> float:
    """Assert ``lhs ≤ rhs`` on every case, up to rounding: ``lhs ≤ rhs + rtol · scale``.

    ``scale`` (as in :func:`check_identity`, ``(description, per-case tensor)``) is the size of
    the terms whose rounding the two sides carry; by default ``|rhs|``, right when both sides are
    computed without cancellation. A NaN on either side fails. Prints one stable line and returns
    the largest ratio lhs/rhs (how tight the bound gets).
    """
    a, b = _as_cases(lhs).flatten(), _as_cases(rhs).flatten()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: lhs {tuple(a.shape)} vs rhs {tuple(b.shape)}")
    slack = b.abs() if scale is None else _as_cases(scale[1]).flatten().expand_as(b)
    bad = ~(a <= b + rtol * slack)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name}: fails on {int(bad.sum())} of {a.numel()} cases "
            f"(case {i}: lhs {float(a[i]):.6e} > rhs {float(b[i]):.6e})"
        )
    slack_text = "" if scale is None else f" (up to {rtol:.0e}·{scale[0]})"
    print(f"✔ {name}: holds on all {a.numel()} cases{slack_text}")
    if a.numel() == 0:
        return math.nan  # no case selected: no ratio to report
    ratio = torch.where(b != 0, a / torch.where(b != 0, b, 1.0), torch.zeros_like(a))
    return float(ratio.max())


def check_claims(claims: Mapping[str, bool], where: str) -> None:
    """Assert each of a chapter's statements, ``{statement: holds}``, and print one stable line
    per statement, ``✔ <where>: <statement>``; a statement that does not hold is an
    ``AssertionError`` that quotes it (the prose must change, not the check)."""
    for text, holds in claims.items():
        if not bool(holds):
            raise AssertionError(f"claim fails ({where}): {text}")
        print(f"✔ {where}: {text}")

"""Evaluation of trained models: metrics and tables of results.

Metrics on a test set {(x_i, y_i)}_{i=1..n} (NOTATION symbols):

- clean accuracy (1/n) Σ_i 1[argmax f(x_i) = y_i];
- robust accuracy under an attack A at radius ε: (1/n) Σ_i 1[argmax f(A(x_i)) = y_i] with
  ‖A(x_i) − x_i‖ ≤ ε (ℓ∞ or ℓ2) and A(x_i) ∈ [0, 1]^d — A is our :func:`robustreg.attacks.pgd`,
  ART's PGD or ART's AutoAttack (:mod:`robustreg.art_attacks`); an upper bound on the
  true robust accuracy, so the smaller of several attacks is the better estimate;
- median certified radius: median_i of T12's bound (:func:`robustreg.geometry.certified_radius`),
  with the medians of its two terms (the margin radius of the local affine classifier and the
  distance to the linear region's boundary), the share of samples where the boundary term is the
  smaller, and the median smallest ℓ2 perturbation that
  :func:`robustreg.attacks.minimal_l2_perturbation` finds (certified ≤ true minimal ≤ found);
- the five regularizers' test-set means (1/n) Σ_i R(x_i, y_i), exact versions.

:func:`evaluate` returns them as tidy rows ``{"metric", "attack", "norm", "eps", "regularizer",
"value"}`` (:func:`to_frame` makes a pandas DataFrame, :func:`wide` one row per run). The grid of
training runs that the book evaluates lives in :mod:`robustreg.study`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from robustreg import art_attacks, attacks, autoattack, geometry, models, regularizers
from robustreg.extras import require
from robustreg.validation import check_count

__all__ = [
    "accuracy",
    "radii",
    "evaluate",
    "find_row",
    "regularizer_values",
    "robust_accuracy",
    "robust_flags",
    "flags_string",
    "standard_autoattack_rows",
    "parse_flags",
    "to_frame",
    "wide",
]


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """argmax f(x) in batches, on the model's device; returns labels on x's device, with −1 for
    a sample whose logits are not all finite."""
    device, dtype = models.device_dtype(model)
    out = []
    for s in _batches(len(x), batch_size):
        logits = model(x[s].to(device, dtype))
        labels = logits.argmax(1)
        labels[~torch.isfinite(logits).all(1)] = -1
        out.append(labels.to(x.device))
    return torch.cat(out)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy (1/n) Σ 1[argmax f(x_i) = y_i].

    NaN when a sample's logits are NaN or infinite (a diverged network is not "mostly right");
    ``x`` with NaN or infinite values raises ``ValueError``."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x holds NaN or infinite values; accuracy is defined on finite inputs")
    predicted = predict(model, x, batch_size)
    if bool((predicted < 0).any()):
        return math.nan
    return (predicted == y).double().mean().item()


def robust_accuracy(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Sequence[float] | float,
    norm: str = "linf",
    *,
    steps: int = 40,
    restarts: int = 1,
    step_size: float | None = None,
    seed: int = 0,
    batch_size: int = 500,
) -> dict[float, float]:
    """Robust accuracy under :func:`robustreg.attacks.pgd` at every ε: ``{ε: accuracy}``.

    A sample counts as robust iff it is classified correctly at the PGD point (PGD starts from
    a random point of the ball and keeps the strongest iterate, so a sample misclassified at x
    itself almost never counts; ε = 0 gives the clean accuracy). Random starts come from a
    generator seeded with ``seed`` (per ε, in batch order).
    """
    device, dtype = models.device_dtype(model)
    eps_list = [eps] if isinstance(eps, int | float) else list(eps)
    result = {}
    for e in eps_list:
        gen = torch.Generator(device=device).manual_seed(seed)
        correct = 0
        for s in _batches(len(x), batch_size):
            xb, yb = x[s].to(device, dtype), y[s].to(device)
            if e == 0:
                x_adv = xb
            else:
                x_adv = attacks.pgd(
                    model,
                    xb,
                    yb,
                    e,
                    norm=norm,
                    steps=steps,
                    step_size=step_size,
                    restarts=restarts,
                    generator=gen,
                )
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum().item()
        result[float(e)] = correct / len(x)
    return result


def robust_flags(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: Sequence[float],
    norm: str = "linf",
    *,
    steps: int = 100,
    restarts: int = 5,
    seed: int = 0,
    batch_size: int = 500,
    losses: Sequence[str] = ("ce",),
) -> dict[float, Tensor]:
    """Per image and radius, whether PGD (:func:`robustreg.attacks.pgd`) with ``restarts``
    random starts on each of ``losses`` fails to change the class: ``{ε: BoolTensor[n]}``.
    ``("ce", "margin")``: the restarts with the cross-entropy, then as many with the margin
    loss, which a confident network's saturated softmax does not flatten (on a 60-epoch
    Fashion-MNIST MLP, PGD-100 at ℓ∞ 0.1 leaves 7.1 % of 1,000 images with the cross-entropy and
    0.4 % with the margin loss).

    Robust at ε iff correct at x and at the final point of every restart, restart r running only on
    the images that restarts 1…r−1 did not break (the per-image minimum over restarts, at a
    fraction of the cost). Radii are taken in increasing order and an image broken at ε counts as
    broken at every larger radius (its adversarial point lies in the larger ball too), so each
    radius attacks only the survivors of the previous one. Random starts come from one
    generator seeded with ``seed`` per norm.
    """
    attacks.check_eps_norm(0.0, norm)
    check_count("restarts", restarts)
    losses = tuple(losses)
    bad = [v for v in losses if v not in attacks.LOSSES]
    if not losses or bad:
        raise ValueError(f"losses must name PGD losses; got {losses!r}, valid: {attacks.LOSSES}")
    device, dtype = models.device_dtype(model)
    gen = torch.Generator(device=device).manual_seed(seed)
    alive = predict(model, x, batch_size).to(y.device) == y
    result = {}
    for e in sorted(float(v) for v in eps):
        attacks.check_eps_norm(e, norm)
        for loss in [v for v in losses for _ in range(restarts)]:
            idx = alive.nonzero().squeeze(1)
            if len(idx) == 0:
                break
            for part in idx.split(batch_size):
                xb, yb = x[part].to(device, dtype), y[part].to(device)
                x_adv = attacks.pgd(
                    model, xb, yb, e, norm=norm, steps=steps, generator=gen, loss=loss
                )
                alive[part] &= (predict(model, x_adv, batch_size) == yb).to(alive.device)
        result[e] = alive.clone()
    return result


def flags_string(flags: Tensor) -> str:
    """Per-image booleans as a compact string of ``0``/``1`` (for result files)."""
    return "".join("1" if v else "0" for v in flags.tolist())


def parse_flags(text: str) -> Tensor:
    """The inverse of :func:`flags_string`: a BoolTensor."""
    if set(text) - {"0", "1"}:
        raise ValueError("per-image flags must be a string of 0 and 1")
    return torch.tensor([c == "1" for c in text], dtype=torch.bool)


def radii(model: nn.Module, x: Tensor, batch_size: int = 250) -> dict[str, Tensor]:
    """Per sample: T12's two terms ``margin`` (:func:`robustreg.geometry.margin_radius`) and
    ``region`` (:func:`robustreg.geometry.boundary_distance`), ``certified`` = their minimum, and
    ``minimal``, the ℓ2 norm of the smallest perturbation that
    :func:`robustreg.attacks.minimal_l2_perturbation` finds to change the predicted class (in
    R^d, unclipped, the setting of T12), an upper bound on the true minimal one."""
    geometry.check_piecewise_linear(model)
    device, dtype = models.device_dtype(model)
    out: dict[str, list[Tensor]] = {"margin": [], "region": [], "minimal": []}
    for s in _batches(len(x), batch_size):
        xb = x[s].to(device, dtype)
        out["margin"].append(geometry.margin_radius(model, xb).detach().cpu())
        out["region"].append(geometry.boundary_distance(model, xb).detach().cpu())
        out["minimal"].append(attacks.minimal_l2_perturbation(model, xb).detach().cpu())
    result = {k: torch.cat(v) for k, v in out.items()}
    result["certified"] = torch.minimum(result["margin"], result["region"])
    return result


def regularizer_values(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Sequence[str] | None = None,
    *,
    batch_size: int = 250,
    options: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Tensor]:
    """Per-sample values ``{name: Tensor[n]}`` of the regularizers (default: all five, exact).

    ``options`` maps a name to keyword arguments (e.g. ``{"curvature": {"h": 0.1}}``).
    """
    names = regularizers.names() if names is None else tuple(names)
    options = dict(options or {})
    device, dtype = models.device_dtype(model)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in _batches(len(x), batch_size):
        xb, yb = x[s].to(device, dtype), y[s].to(device)
        for name in names:
            fn = regularizers.get(name)
            with torch.no_grad():
                values = fn(model, xb, yb, **options.get(name, {}))
            out[name].append(values.detach().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


# --- the full evaluation ------------------------------------------------------------------------


def _row(metric, value, attack=None, norm=None, eps=None, regularizer=None) -> dict[str, Any]:
    return {
        "metric": metric,
        "attack": attack,
        "norm": norm,
        "eps": eps,
        "regularizer": regularizer,
        "value": float(value),
    }


def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    linf_eps: Sequence[float] = (0.02, 0.05, 0.1, 0.15),
    l2_eps: Sequence[float] = (0.5, 1.0, 1.5),
    steps: int = 40,
    restarts: int = 1,
    seed: int = 0,
    n_certified: int | None = None,
    regularizers: bool | Sequence[str] = True,
    autoattack_eps: Mapping[str, float] | None = None,
    autoattack_n: int = 100,
    autoattack_version: str = "light",
    per_image: bool = False,
    autoattack_steps: int = 100,
    autoattack_queries: int = 5000,
    pgd_losses: Sequence[str] = ("ce",),
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """All metrics of the module docstring on (x, y), as tidy rows.

    Rows (``metric`` / ``attack``): ``clean_accuracy``; ``robust_accuracy`` / ``pgd`` for every
    ε of ``linf_eps`` (norm ``linf``) and ``l2_eps`` (``l2``); on the first ``n_certified``
    samples (all when None; 0 skips them — T12's bound costs about d forward passes per sample)
    the medians of :func:`radii` (``median_certified_radius``, ``median_margin_radius``,
    ``median_region_radius``, ``median_minimal_perturbation``) and ``region_cap_fraction``, the
    share of samples whose certificate is capped by the region's boundary; ``regularizer_mean`` for each regularizer (``regularizers``: True for all five,
    a list of names, or False). ``autoattack_eps`` (e.g. ``{"linf": 0.1}``) also runs
    :func:`robustreg.art_attacks.art_autoattack` on the first ``autoattack_n`` samples, giving ``robust_accuracy`` rows with
    attack ``autoattack``, ``pgd-subset`` (our PGD on the same subset) and ``worst-case`` (a sample
    counts as robust only if it survives both) — AutoAttack well below PGD signals gradient
    masking.

    ``per_image=True`` (the matched-strength study): PGD through :func:`robust_flags` (``restarts``
    on the survivors with each loss of ``pgd_losses``, radii nested) and each robust-accuracy row
    carries ``flags``, the per-image
    outcome (:func:`flags_string`), so that comparisons can be paired image by image;
    ``autoattack_version="standard"`` then runs :func:`robustreg.autoattack.standard_autoattack` on the first
    ``autoattack_n`` images (None: all) with rows ``autoattack`` (alone), ``worst-case`` (robust
    under AutoAttack and PGD at that ε; ``eps`` must be among the PGD radii) and
    ``autoattack_broken_by`` (images each component broke first). ``autoattack_steps`` and
    ``autoattack_queries`` other than the published 100 and 5,000 make a lighter, non-standard
    variant (the seconds-long smoke profile). ``timings``: a dict that receives the process CPU
    seconds AutoAttack took (key ``"autoattack"``, summed over its radii).
    """
    if timings is not None:
        timings.setdefault("autoattack", 0.0)
    if per_image:
        return _evaluate_per_image(
            model,
            x,
            y,
            linf_eps=linf_eps,
            l2_eps=l2_eps,
            steps=steps,
            restarts=restarts,
            seed=seed,
            n_certified=n_certified,
            regularizers=regularizers,
            autoattack_eps=autoattack_eps,
            autoattack_n=autoattack_n,
            autoattack_version=autoattack_version,
            autoattack_steps=autoattack_steps,
            autoattack_queries=autoattack_queries,
            pgd_losses=pgd_losses,
            timings=timings,
        )
    if tuple(pgd_losses) != ("ce",):
        raise ValueError(f"pgd_losses={pgd_losses!r} needs per_image=True (PGD's loss: 'ce' here)")
    rows = [_row("clean_accuracy", accuracy(model, x, y))]
    for norm, eps_list in (("linf", linf_eps), ("l2", l2_eps)):
        if eps_list:
            acc = robust_accuracy(
                model, x, y, eps_list, norm, steps=steps, restarts=restarts, seed=seed
            )
            rows += [_row("robust_accuracy", a, "pgd", norm, e) for e, a in acc.items()]
    device, dtype = models.device_dtype(model)
    for norm, e in (autoattack_eps or {}).items():
        xs, ys = x[:autoattack_n], y[:autoattack_n]
        with _cpu_time(timings, "autoattack"):
            x_aa = art_attacks.art_autoattack(
                model, xs, ys, e, norm, seed=seed, version=autoattack_version
            )
        ok_aa = predict(model, x_aa) == ys
        gen = torch.Generator(device=device).manual_seed(seed)
        x_pgd = attacks.pgd(
            model,
            xs.to(device, dtype),
            ys.to(device),
            e,
            norm=norm,
            steps=steps,
            restarts=restarts,
            generator=gen,
        )
        ok_pgd = predict(model, x_pgd).to(ys.device) == ys
        for name, ok in (
            ("autoattack", ok_aa),
            ("pgd-subset", ok_pgd),
            ("worst-case", ok_aa & ok_pgd),
        ):
            rows.append(_row("robust_accuracy", ok.double().mean(), name, norm, e))
    rows += _radii_and_regularizer_rows(model, x, y, n_certified, regularizers)
    return rows


@contextlib.contextmanager
def _cpu_time(timings: dict[str, float] | None, key: str):
    """Add the process CPU seconds of the block to ``timings[key]`` (nothing when None)."""
    started = time.process_time()
    yield
    if timings is not None:
        timings[key] += time.process_time() - started


def _evaluate_per_image(
    model,
    x,
    y,
    *,
    linf_eps,
    l2_eps,
    steps,
    restarts,
    seed,
    n_certified,
    regularizers,
    autoattack_eps,
    autoattack_n,
    autoattack_version,
    autoattack_steps,
    autoattack_queries,
    pgd_losses,
    timings=None,
) -> list[dict[str, Any]]:
    correct = predict(model, x).to(y.device) == y
    rows = [{**_row("clean_accuracy", correct.double().mean()), "flags": flags_string(correct)}]
    pgd_flags = {}
    for norm, eps_list in (("linf", linf_eps), ("l2", l2_eps)):
        if eps_list:
            flags = robust_flags(
                model,
                x,
                y,
                eps_list,
                norm,
                steps=steps,
                restarts=restarts,
                seed=seed,
                losses=pgd_losses,
            )
            for e, f in flags.items():
                pgd_flags[norm, e] = f
                row = _row("robust_accuracy", f.double().mean(), "pgd", norm, e)
                rows.append({**row, "flags": flags_string(f)})
    for norm, e in (autoattack_eps or {}).items():
        if autoattack_version != "standard":
            raise ValueError(
                f"per_image=True runs AutoAttack's standard version, not {autoattack_version!r}"
            )
        if (norm, float(e)) not in pgd_flags:
            raise ValueError(f"AutoAttack's radius {norm} {e} must be one of the PGD radii")
        rows += standard_autoattack_rows(
            model,
            x,
            y,
            e,
            norm,
            pgd_flags[norm, float(e)],
            n=autoattack_n,
            seed=seed,
            steps=autoattack_steps,
            n_queries=autoattack_queries,
            timings=timings,
        )
    rows += _radii_and_regularizer_rows(model, x, y, n_certified, regularizers)
    return rows


def standard_autoattack_rows(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str,
    pgd_robust: Tensor,
    *,
    n: int | None = None,
    seed: int = 0,
    steps: int = 100,
    n_queries: int = 5000,
    timings: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Standard AutoAttack (:func:`robustreg.autoattack.standard_autoattack`) at one radius on the
    first ``n`` images (None: all), as the rows of :func:`evaluate` with ``per_image=True``:
    ``autoattack`` (robust under AutoAttack alone) and ``worst-case`` (robust under AutoAttack and
    under PGD, whose per-image outcome at this radius is ``pgd_robust``), each with its ``flags``,
    then ``autoattack_broken_by`` (the images each component broke first). ``timings``: as in
    :func:`evaluate`."""
    n = len(x) if n is None else n
    if timings is not None:
        timings.setdefault("autoattack", 0.0)
    with _cpu_time(timings, "autoattack"):
        out = autoattack.standard_autoattack(
            model, x[:n], y[:n], eps, norm, seed=seed, steps=steps, n_queries=n_queries
        )
    worst = out["robust"] & pgd_robust[:n].to(out["robust"].device)
    rows = []
    for name, f in (("autoattack", out["robust"]), ("worst-case", worst)):
        row = _row("robust_accuracy", f.double().mean(), name, norm, float(eps))
        rows.append({**row, "flags": flags_string(f)})
    for component, count in out["broken_by"].items():
        rows.append(_row("autoattack_broken_by", count, component, norm, float(eps)))
    return rows


def _radii_and_regularizer_rows(model, x, y, n_certified, regularizers) -> list[dict[str, Any]]:
    rows = []
    if n_certified is None or n_certified > 0:
        r = radii(model, x[:n_certified])
        for name in ("certified", "margin", "region", "minimal"):
            metric = f"median_{name}_radius" if name != "minimal" else "median_minimal_perturbation"
            rows.append(_row(metric, r[name].median()))
        rows.append(_row("region_cap_fraction", (r["region"] < r["margin"]).double().mean()))
    if regularizers:
        names = None if regularizers is True else list(regularizers)
        for name, v in regularizer_values(model, x, y, names).items():
            rows.append(_row("regularizer_mean", v.mean(), regularizer=name))
    return rows


def find_row(
    rows: Iterable[Mapping[str, Any]],
    metric: str = "robust_accuracy",
    *,
    attack: str | None = None,
    norm: str | None = None,
    eps: float | None = None,
) -> Mapping[str, Any]:
    """The one row of ``rows`` (a result's ``record["rows"]``) with this ``metric`` and, where
    given, ``attack``, ``norm`` and radius ``eps`` (compared with ``math.isclose``).

    No such row, or several, is a ``KeyError`` naming what was asked and how many matched.
    """
    wanted = {"attack": attack, "norm": norm}
    found = [
        r
        for r in rows
        if r["metric"] == metric
        and all(r.get(k) == v for k, v in wanted.items() if v is not None)
        and (eps is None or (r.get("eps") is not None and math.isclose(r["eps"], eps)))
    ]
    if len(found) != 1:
        asked = " ".join(
            f"{k}={v!r}"
            for k, v in {"metric": metric, **wanted, "eps": eps}.items()
            if v is not None
        )
        raise KeyError(f"{len(found)} rows match {asked} (one was expected)")
    return found[0]


def to_frame(rows: Iterable[Mapping[str, Any]]):
    """A pandas DataFrame of tidy rows (from :func:`evaluate` or :func:`~robustreg.study.execute.run_grid`)."""
    require("pandas")
    import pandas as pd

    return pd.DataFrame(list(rows))


def wide(rows: Iterable[Mapping[str, Any]]):
    """One row per training run of :func:`~robustreg.study.execute.run_grid`'s rows (index: method, lam, seed), one column
    per metric: ``clean``, ``<attack> <norm> <ε>`` (e.g. ``pgd linf 0.1``, ``autoattack linf
    0.1``), ``certified radius``, ``margin radius``, ``region radius``, ``minimal perturbation``
    (medians), ``region cap fraction``, ``R <regularizer>`` (test means), ``s/epoch`` and
    ``cpu s/epoch`` (training cost). Runs keep the grid's order."""
    require("pandas")
    import pandas as pd

    frame = to_frame(rows)

    def column(r) -> str:
        if r.metric == "robust_accuracy":
            return f"{r.attack} {r.norm} {r.eps:g}"
        if r.metric == "regularizer_mean":
            return f"R {r.regularizer}"
        names = {
            "clean_accuracy": "clean",
            "median_certified_radius": "certified radius",
            "median_margin_radius": "margin radius",
            "median_region_radius": "region radius",
            "median_minimal_perturbation": "minimal perturbation",
            "region_cap_fraction": "region cap fraction",
        }
        return names.get(r.metric, r.metric)

    frame["column"] = frame.apply(column, axis=1)
    index = ["method", "lam", "seed"]
    order = list(dict.fromkeys(map(tuple, frame[index].itertuples(index=False))))
    table = frame.pivot_table(index=index, columns="column", values="value", sort=False)
    cost = frame.groupby(index, sort=False)[["seconds_per_epoch", "cpu_seconds_per_epoch"]].first()
    cost.columns = ["s/epoch", "cpu s/epoch"]
    table = pd.concat([table, cost], axis=1).loc[order]
    table.columns.name = None
    return table

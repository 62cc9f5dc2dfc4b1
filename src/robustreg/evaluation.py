"""Evaluation of trained models, the cross-check against ART, and the experiment grid.

Metrics on a test set {(x_i, y_i)}_{i=1..n} (NOTATION symbols):

- clean accuracy (1/n) Σ_i 1[argmax f(x_i) = y_i];
- robust accuracy under an attack A at radius ε: (1/n) Σ_i 1[argmax f(A(x_i)) = y_i] with
  ‖A(x_i) − x_i‖ ≤ ε (ℓ∞ or ℓ2) and A(x_i) ∈ [0, 1]^d — A is our :func:`robustreg.attacks.pgd`,
  ART's PGD (:func:`art_pgd`) or ART's AutoAttack (:func:`autoattack`); an upper bound on the
  true robust accuracy, so the smaller of several attacks is the better estimate;
- median certified radius: median_i of T12's bound (:func:`robustreg.geometry.certified_radius`),
  with the medians of its two terms (the margin radius of the local affine classifier and the
  distance to the linear region's boundary), the share of samples where the boundary term is the
  smaller, and the median smallest ℓ2 perturbation that
  :func:`robustreg.attacks.minimal_l2_perturbation` finds (certified ≤ true minimal ≤ found);
- the five regularizers' test-set means (1/n) Σ_i R(x_i, y_i), exact versions.

:func:`evaluate` returns them as tidy rows ``{"metric", "attack", "norm", "eps", "regularizer",
"value"}`` (:func:`to_frame` makes a pandas DataFrame). The grid of :data:`PROFILES` (plain,
each regularizer at several λ, PGD adversarial training; several seeds) is defined here once
and run by :func:`run_grid`, which the notebooks and ``python -m robustreg run-grid`` share;
every training and evaluation is cached on disk, so a rerun is instant and an interrupted grid
resumes.

Results files: with ``results_dir``, :func:`run_grid` also keeps one small JSON file per run
(``<method>[_lam<λ>]_seed<s>.json``: configuration, training history, evaluation rows, wall and
CPU seconds, the machine; no weights) and reads a run back from it when its training key and
evaluation settings match, without training or evaluating. The book commits these files (e.g.
``results/default/``), so its chapters reload a finished grid in seconds; :func:`load_results`
reads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from robustreg import attacks, training

__all__ = [
    "PROFILES",
    "accuracy",
    "art_pgd",
    "autoattack",
    "certified_radii",
    "radii",
    "evaluate",
    "evaluate_cached",
    "grid",
    "load_results",
    "machine",
    "regularizer_values",
    "robust_accuracy",
    "run_grid",
    "to_frame",
    "wide",
]


def _batches(n: int, batch_size: int) -> Iterable[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(iter(model.parameters()))
    return p.device, p.dtype


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    """argmax f(x) in batches, on the model's device; returns labels on x's device."""
    device, dtype = _device_dtype(model)
    out = [
        model(x[s].to(device, dtype)).argmax(1).to(x.device) for s in _batches(len(x), batch_size)
    ]
    return torch.cat(out)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Clean accuracy (1/n) Σ 1[argmax f(x_i) = y_i]."""
    return (predict(model, x, batch_size) == y).double().mean().item()


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
    device, dtype = _device_dtype(model)
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


def radii(model: nn.Module, x: Tensor, batch_size: int = 250) -> dict[str, Tensor]:
    """Per sample: T12's two terms ``margin`` (:func:`robustreg.geometry.margin_radius`) and
    ``region`` (:func:`robustreg.geometry.boundary_distance`), ``certified`` = their minimum, and
    ``minimal``, the ℓ2 norm of the smallest perturbation that
    :func:`robustreg.attacks.minimal_l2_perturbation` finds to change the predicted class (in
    R^d, unclipped, the setting of T12), an upper bound on the true minimal one."""
    from robustreg import geometry

    geometry.check_piecewise_linear(model)
    device, dtype = _device_dtype(model)
    out: dict[str, list[Tensor]] = {"margin": [], "region": [], "minimal": []}
    for s in _batches(len(x), batch_size):
        xb = x[s].to(device, dtype)
        out["margin"].append(geometry.margin_radius(model, xb).detach().cpu())
        out["region"].append(geometry.boundary_distance(model, xb).detach().cpu())
        out["minimal"].append(attacks.minimal_l2_perturbation(model, xb).detach().cpu())
    result = {k: torch.cat(v) for k, v in out.items()}
    result["certified"] = torch.minimum(result["margin"], result["region"])
    return result


def certified_radii(model: nn.Module, x: Tensor, batch_size: int = 250) -> Tensor:
    """T12's certified ℓ2 radius of every sample (:func:`robustreg.geometry.certified_radius`)."""
    from robustreg import geometry

    device, dtype = _device_dtype(model)
    out = [
        geometry.certified_radius(model, x[s].to(device, dtype)).detach().cpu()
        for s in _batches(len(x), batch_size)
    ]
    return torch.cat(out)


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
    from robustreg import regularizers

    names = regularizers.names() if names is None else tuple(names)
    options = dict(options or {})
    device, dtype = _device_dtype(model)
    out: dict[str, list[Tensor]] = {n: [] for n in names}
    for s in _batches(len(x), batch_size):
        xb, yb = x[s].to(device, dtype), y[s].to(device)
        for name in names:
            fn = regularizers.get(name)
            with torch.no_grad():
                values = fn(model, xb, yb, **options.get(name, {}))
            out[name].append(values.detach().cpu())
    return {n: torch.cat(v) for n, v in out.items()}


# --- ART cross-check ----------------------------------------------------------------------------


class _Float32Interface(nn.Module):
    """ART feeds float32 arrays; cast them to the model's dtype and the logits back to float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).float()


def art_classifier(model: nn.Module, input_shape: Sequence[int], num_classes: int):
    """ART's ``PyTorchClassifier`` around ``model`` (cross-entropy loss, inputs clipped to [0, 1])."""
    from art.estimators.classification import PyTorchClassifier

    device, dtype = _device_dtype(model)
    return PyTorchClassifier(
        model=_Float32Interface(model, dtype),
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=int(num_classes),
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def _art_norm(norm: str):
    attacks._check_eps_norm(0.0, norm)
    return math.inf if norm == "linf" else 2


def _project_back(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project ART's output onto the exact ε-ball ∩ [0, 1] (its own check allows 1e-4 slack)."""
    eps_t = torch.full((len(x),), float(eps), dtype=x.dtype)
    return attacks._project(x, x_adv, attacks._per_sample(eps_t, x), norm, box=True)


def art_pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """ART's ``ProjectedGradientDescent`` (Madry et al.) with our PGD's settings; returns x_adv.

    Random start in the ball, ``steps`` iterations of step α (default 2.5ε/steps, as ours),
    ``restarts`` random initialisations (ART keeps, per sample, a successful one). ART draws
    its random starts from numpy's global generator, seeded here with ``seed``.
    """
    import numpy as np
    from art.attacks.evasion import ProjectedGradientDescent

    alpha = 2.5 * eps / steps if step_size is None else step_size
    classifier = art_classifier(model, x.shape[1:], _num_classes(model, x))
    attack = ProjectedGradientDescent(
        classifier,
        norm=_art_norm(norm),
        eps=float(eps),
        eps_step=float(alpha),
        max_iter=steps,
        num_random_init=restarts,
        batch_size=batch_size,
        verbose=False,
    )
    np.random.seed(seed)
    x_np = x.detach().cpu().float().numpy()
    adv = attack.generate(x=x_np, y=y.cpu().numpy())
    return _project_back(x.detach().cpu(), torch.from_numpy(adv).to(x.dtype), eps, norm)


AUTOATTACK_VERSIONS = ("light", "standard")


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    version: str = "light",
    seed: int = 0,
    batch_size: int = 250,
) -> Tensor:
    """ART's ``AutoAttack`` (Croce & Hein's ensemble, untargeted); returns x_adv.

    Each attack runs on the samples the previous ones did not break, and a sample counts as broken
    only if misclassified within the ε-ball:

    - ``version="standard"``: ART's default list — APGD-CE and APGD-DLR (100 iterations,
      5 restarts each), DeepFool, Square (5,000 queries, 5 restarts); thorough, minutes per
      hundred samples on a CPU;
    - ``version="light"`` (default): APGD-CE and APGD-DLR (100 iterations, 1 restart each) and
      Square (1,000 queries, 1 restart) — the gradient-free Square attack is kept because it is
      what exposes gradient masking.

    ``x`` must be image-shaped ``[B, C, H, W]`` (ART's AutoAttack rejects flat inputs; an MLP from
    :func:`robustreg.models.mlp` flattens internally). APGD-DLR needs K ≥ 3 classes and is dropped
    for K = 2. Points ART accepts within its 1e-4 relative slack are projected back onto the exact
    ε-ball ∩ [0, 1]. Numpy's global generator is seeded with ``seed``. Run it on a subset.
    """
    import numpy as np
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown version {version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
    if x.ndim != 4:
        raise ValueError(
            f"ART's AutoAttack needs image-shaped inputs [B, C, H, W]; got shape {tuple(x.shape)}"
        )
    k = _num_classes(model, x)
    classifier = art_classifier(model, x.shape[1:], k)
    art_norm, eps, step = _art_norm(norm), float(eps), float(eps) / 4
    attack_list = None
    if version == "light":
        losses = ["cross_entropy"] + (["difference_logits_ratio"] if k >= 3 else [])
        attack_list = [
            AutoProjectedGradientDescent(
                classifier,
                norm=art_norm,
                eps=eps,
                eps_step=step,
                max_iter=100,
                nb_random_init=1,
                batch_size=batch_size,
                loss_type=loss,
                verbose=False,
            )
            for loss in losses
        ]
        attack_list.append(
            SquareAttack(
                classifier,
                norm=art_norm,
                eps=eps,
                max_iter=1000,
                p_init=0.8,
                nb_restarts=1,
                batch_size=batch_size,
                verbose=False,
            )
        )
    attack = AutoAttack(
        classifier,
        norm=art_norm,
        eps=eps,
        eps_step=step,
        attacks=attack_list,
        batch_size=batch_size,
    )
    np.random.seed(seed)
    x_np = x.detach().cpu().float().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # Square-ℓ2 divides 0/0 on converged rows
        adv = attack.generate(x=x_np, y=y.cpu().numpy())
    return _project_back(x.detach().cpu(), torch.from_numpy(adv).to(x.dtype), eps, norm)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    device, dtype = _device_dtype(model)
    with torch.no_grad():
        return int(model(x[:1].to(device, dtype)).shape[1])


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
) -> list[dict[str, Any]]:
    """All metrics of the module docstring on (x, y), as tidy rows.

    Rows (``metric`` / ``attack``): ``clean_accuracy``; ``robust_accuracy`` / ``pgd`` for every
    ε of ``linf_eps`` (norm ``linf``) and ``l2_eps`` (``l2``); on the first ``n_certified``
    samples (all when None; 0 skips them — T12's bound costs about d forward passes per sample)
    the medians of :func:`radii` (``median_certified_radius``, ``median_margin_radius``,
    ``median_region_radius``, ``median_minimal_perturbation``) and ``region_cap_fraction``, the
    share of samples whose certificate is capped by the region's boundary; ``regularizer_mean`` for each regularizer (``regularizers``: True for all five,
    a list of names, or False). ``autoattack_eps`` (e.g. ``{"linf": 0.1}``) also runs
    :func:`autoattack` on the first ``autoattack_n`` samples, giving ``robust_accuracy`` rows with
    attack ``autoattack``, ``pgd-subset`` (our PGD on the same subset) and ``worst-case`` (a sample
    counts as robust only if it survives both) — AutoAttack well below PGD signals gradient
    masking.
    """
    rows = [_row("clean_accuracy", accuracy(model, x, y))]
    for norm, eps_list in (("linf", linf_eps), ("l2", l2_eps)):
        if eps_list:
            acc = robust_accuracy(
                model, x, y, eps_list, norm, steps=steps, restarts=restarts, seed=seed
            )
            rows += [_row("robust_accuracy", a, "pgd", norm, e) for e, a in acc.items()]
    device, dtype = _device_dtype(model)
    for norm, e in (autoattack_eps or {}).items():
        xs, ys = x[:autoattack_n], y[:autoattack_n]
        x_aa = autoattack(model, xs, ys, e, norm, seed=seed, version=autoattack_version)
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


def to_frame(rows: Iterable[Mapping[str, Any]]):
    """A pandas DataFrame of tidy rows (from :func:`evaluate` or :func:`run_grid`)."""
    import pandas as pd

    return pd.DataFrame(list(rows))


def wide(rows: Iterable[Mapping[str, Any]]):
    """One row per training run of :func:`run_grid`'s rows (index: method, lam, seed), one column
    per metric: ``clean``, ``<attack> <norm> <ε>`` (e.g. ``pgd linf 0.1``, ``autoattack linf
    0.1``), ``certified radius``, ``margin radius``, ``region radius``, ``minimal perturbation``
    (medians), ``region cap fraction``, ``R <regularizer>`` (test means), ``s/epoch`` and
    ``cpu s/epoch`` (training cost). Runs keep the grid's order."""
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


# --- the experiment grid --------------------------------------------------------------------------

#: Profiles of the experiment grid (issue 5). ``lambdas`` per regularizer (chosen from a 5-epoch
#: sweep on mnist5k so that the largest value costs ≤ ~8 points of clean accuracy, except
#: input_gradient/hessian_trace, whose λ are tied by T9); ``regularizer_options`` select the cheap
#: unbiased estimators for training; ``adversarial`` is PGD adversarial training; ``eval`` are the
#: keyword arguments of :func:`evaluate` (plus ``n_test``: the first n test samples);
#: ``autoattack`` adds ART's AutoAttack for the listed seeds on the first ``n`` test samples.
# The λ grid and estimator settings shared by the default and full profiles.
_LAMBDAS = {
    "input_gradient": [0.1, 0.3, 1.0],
    "jacobian_frobenius": [0.001, 0.01, 0.1],
    "cross_lipschitz": [0.005, 0.05, 0.5],  # (K/2)·λ_J: the same weight on ‖CJ‖² (T5)
    "curvature": [0.1, 1.0, 10.0],
    "hessian_trace": [0.1, 0.3, 1.0],  # λ_IG: E_{y~p} R_IG = R_H (T9)
}
_ONE_DRAW = {
    "jacobian_frobenius": {"n_proj": 1},
    "cross_lipschitz": {"n_proj": 1},
    "hessian_trace": {"n_samples": 1},
}
_ADVERSARIAL = {"eps": 0.1, "norm": "linf", "steps": 7}
_ATTACK_RADII = {"linf_eps": [0.02, 0.05, 0.1, 0.15], "l2_eps": [0.5, 1.0, 1.5]}

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": {
        "data": "digits",
        "model": {"name": "mlp", "hidden": [32, 32]},
        "epochs": 2,
        "batch_size": 32,
        "lr": 1e-2,
        "seeds": [0],
        "lambdas": {
            "input_gradient": [0.3],
            "jacobian_frobenius": [0.01],
            "cross_lipschitz": [0.05],
            "curvature": [1.0],
            "hessian_trace": [0.3],
        },
        "regularizer_options": {
            "jacobian_frobenius": {"n_proj": 1},
            "cross_lipschitz": {"n_proj": 1},
            "hessian_trace": {"n_samples": 1},
        },
        "adversarial": {"eps": 0.1, "norm": "linf", "steps": 3},
        "eval": {
            "n_test": 100,
            "n_certified": 50,
            "linf_eps": [0.05, 0.1],
            "l2_eps": [0.5],
            "steps": 10,
        },
        "autoattack": None,
    },
    "default": {
        "data": "mnist5k",
        "model": {"name": "mlp", "hidden": [256, 256]},
        "epochs": 5,
        "batch_size": 128,
        "lr": 1e-3,
        "seeds": [0, 1, 2],
        "lambdas": _LAMBDAS,
        "regularizer_options": _ONE_DRAW,
        "adversarial": _ADVERSARIAL,
        # PGD-20 (α = 2.5ε/20) and T12 on 100 samples keep the default grid near the book's CPU
        # budget; ART's PGD agrees with ours at 20 steps (tests/test_attacks.py).
        "eval": {
            "n_test": 1000,
            "n_certified": 100,
            **_ATTACK_RADII,
            "steps": 20,
        },
        # every seed, so that a sign of gradient masking is judged across seeds (≈ 4 s a run)
        "autoattack": {"seeds": [0, 1, 2], "eps": {"linf": 0.1}, "n": 100},
    },
    "full": {
        "data": "fashion-mnist",
        "model": {"name": "lenet"},
        "epochs": 20,
        "batch_size": 128,
        "lr": 1e-3,
        "seeds": [0, 1, 2],
        "lambdas": _LAMBDAS,
        "regularizer_options": _ONE_DRAW,
        "adversarial": _ADVERSARIAL,
        "eval": {
            "n_test": 10000,
            "n_certified": 1000,
            **_ATTACK_RADII,
            "steps": 40,
        },
        "autoattack": {"seeds": [0, 1, 2], "eps": {"linf": 0.1}, "n": 1000},
    },
}


def grid(profile: str = "default", **overrides) -> list[dict[str, Any]]:
    """The training configurations of a profile (for :func:`robustreg.training.train_cached`).

    Per seed: plain training, every regularizer at every λ of the profile, and PGD adversarial
    training. ``overrides`` replace profile entries (e.g. ``seeds=[0]``, ``epochs=3``).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    p = {**PROFILES[profile], **overrides}
    unknown = sorted(set(overrides) - set(PROFILES[profile]))
    if unknown:
        raise ValueError(f"unknown grid settings {unknown}; valid: {sorted(PROFILES[profile])}")
    base = {k: p[k] for k in ("data", "model", "epochs", "batch_size", "lr")}
    configs = []
    for seed in p["seeds"]:
        configs.append({**base, "seed": seed})
        for reg, lams in p["lambdas"].items():
            for lam in lams:
                configs.append(
                    {
                        **base,
                        "seed": seed,
                        "regularizer": reg,
                        "lam": lam,
                        "regularizer_options": p["regularizer_options"].get(reg, {}),
                    }
                )
        if p.get("adversarial"):
            configs.append({**base, "seed": seed, "adversarial": dict(p["adversarial"])})
    return configs


def label(config: Mapping[str, Any]) -> str:
    """Short name of a configuration's method: ``plain``, ``adversarial`` or the regularizer."""
    if config.get("adversarial"):
        return "adversarial"
    if config.get("regularizer") and config.get("lam", 0):
        return str(config["regularizer"])
    return "plain"


def _eval_key(train_key: str, settings: Mapping[str, Any]) -> str:
    blob = json.dumps(
        {"train": train_key, "eval": settings, "v": training.CACHE_VERSION}, sort_keys=True
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _canonical(settings: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(settings), sort_keys=True))


def _evaluate_payload(model, record, test, settings, cache_dir) -> dict[str, Any]:
    """The cached evaluation file's content: rows, settings, wall and CPU seconds."""
    root = Path(cache_dir) if cache_dir is not None else training.default_cache_dir()
    settings = _canonical(settings)
    path = root / f"{_eval_key(record['key'], settings)}.eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    s = dict(settings)
    n = s.pop("n_test", None)
    x, y = test
    if n is not None:
        x, y = x[:n], y[:n]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = evaluate(model, x, y, **s)
    payload = {
        "rows": rows,
        "settings": settings,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }
    training._atomic_save(payload, path, lambda r, p: Path(p).write_text(json.dumps(r)))
    return payload


def evaluate_cached(
    model: nn.Module,
    record: Mapping[str, Any],
    test: tuple[Tensor, Tensor],
    settings: Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """:func:`evaluate` with ``settings`` (keys of a profile's ``"eval"``), cached on disk under
    ``<cache>/<key>.eval.json``, the key hashing the training key and the settings."""
    return _evaluate_payload(model, record, test, settings, cache_dir)["rows"]


def machine() -> dict[str, Any]:
    """The computer a run happens on: CPU model, cores, torch threads, versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
        # 1-minute load average when the run ended: > cores means a shared, busy machine
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def result_name(config: Mapping[str, Any]) -> str:
    """File name of a run in a results directory: ``plain_seed0.json``,
    ``curvature_lam1_seed2.json``, ``adversarial_seed1.json``."""
    method = label(config)
    lam = f"_lam{float(config['lam']):g}" if method not in ("plain", "adversarial") else ""
    return f"{method}{lam}_seed{config['seed']}.json"


def load_results(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every run file of a results directory (written by :func:`run_grid`), sorted by name."""
    return [json.loads(f.read_text()) for f in sorted(Path(results_dir).glob("*.json"))]


def _stored_result(path: Path, key: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != key or stored.get("eval") != settings:
        return None  # stale: another configuration, evaluation or CACHE_VERSION
    return stored


def run_grid(
    profile: str = "default",
    *,
    cache_dir: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    evaluate_models: bool = True,
    **overrides,
) -> list[dict[str, Any]]:
    """Train (or load) and evaluate every configuration of :func:`grid`; return tidy rows.

    Each row of :func:`evaluate` gains the columns ``method``, ``lam``, ``seed``, ``key``,
    ``seconds_per_epoch`` (mean wall time of an epoch of that training run) and
    ``cpu_seconds_per_epoch`` (median process CPU time of an epoch — on a shared machine the
    better measure of cost, the median skipping a first epoch's warm-up; None for runs trained
    before it was recorded). Every run is cached, so an interrupted grid resumes where it stopped and
    a finished one reloads at once.

    ``results_dir``: read each run from its file there (:func:`result_name`) when the file's
    training key and evaluation settings match — no model is built — and otherwise train (or
    load from ``cache_dir``), evaluate, and write the file (atomically). ``refresh=True`` ignores
    the files and rewrites them. Without ``evaluate_models`` the files are neither read nor written.
    """
    from tqdm import tqdm

    from robustreg import data as data_module

    configs = grid(profile, **overrides)
    p = {**PROFILES[profile], **overrides}
    dtype = training._dtype(training.normalize_config(configs[0])["dtype"])
    train_data = data_module.load(p["data"], "train", dtype=dtype)
    test_data = data_module.load(p["data"], "test", dtype=dtype)
    rows: list[dict[str, Any]] = []
    results = Path(results_dir) if results_dir is not None and evaluate_models else None
    bar = tqdm(configs, desc=f"grid {profile}", disable=not training._show_progress(progress))
    for config in bar:
        bar.set_postfix(method=label(config), lam=config.get("lam", 0.0), seed=config["seed"])
        settings = dict(p["eval"])
        aa = p.get("autoattack")
        if aa and config["seed"] in aa["seeds"]:
            settings.update(autoattack_eps=aa["eps"], autoattack_n=aa["n"])
        settings = _canonical(settings)
        stored = None
        if results is not None and not refresh:
            stored = _stored_result(
                results / result_name(config), training.cache_key(config), settings
            )
        if stored is None:
            model, record = training.train_cached(
                config, cache_dir=cache_dir, device=device, progress=progress, data=train_data
            )
        else:
            record = stored
        times, cpu = record["history"]["time"], record["history"].get("cpu_time")
        extra = {
            "method": label(config),
            "lam": float(config.get("lam", 0.0)),
            "seed": config["seed"],
            "key": record["key"],
            "seconds_per_epoch": sum(times) / max(len(times), 1),
            "cpu_seconds_per_epoch": statistics.median(cpu) if cpu else None,
        }
        if not evaluate_models:
            rows.append({**extra, "metric": "trained", "value": 1.0})
            continue
        if stored is None:
            payload = _evaluate_payload(model, record, test_data, settings, cache_dir)
            if results is not None:
                stored = {
                    "name": result_name(config),
                    "method": extra["method"],
                    "lam": extra["lam"],
                    "seed": extra["seed"],
                    "key": record["key"],
                    "config": record["config"],
                    "eval": settings,
                    "history": record["history"],
                    "train_seconds": record["train_seconds"],
                    "eval_seconds": payload["seconds"],
                    "eval_cpu_seconds": payload.get("cpu_seconds"),
                    "device": str(record["device"]),
                    "machine": machine(),
                    "rows": payload["rows"],
                }
                training._atomic_save(
                    stored,
                    results / result_name(config),
                    lambda r, f: Path(f).write_text(json.dumps(r, indent=1) + "\n"),
                )
            eval_rows = payload["rows"]
        else:
            eval_rows = stored["rows"]
        rows += [{**extra, **r} for r in eval_rows]
    return rows

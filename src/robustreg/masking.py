"""Checks for gradient masking: attacks that do not follow the attacked network's gradient, and
an attack that must succeed.

A network that masks its gradients (Athalye et al., 2018) leaves gradient attacks without a
useful direction, so they overstate its robustness. The standard symptoms (Carlini et al., 2019,
"On evaluating adversarial robustness", §5.2; Croce & Hein, 2020) and the check of each:

==================== ===========================================================================
``square_alone``     a gradient-free attack (Square, 5,000 queries) run on its own on every
                     correctly classified image breaks images that the gradient attacks left
``square_restarts``  Square from several random starts, each on the images the earlier ones
                     left: a stronger gradient-free search than one run
``epsilon_sweep``    robust accuracy does not fall to 0 as the radius grows: at ℓ∞ ε = 1 every
                     image can be replaced by any other, so an attack that works must succeed
``transfer``         adversarial examples crafted on another network (PGD on the *source*) break
                     images of the target that its own white-box attacks left
==================== ===========================================================================

Each check returns per-image robust flags (BoolTensor[n]: correct at x and at the check's
points), so that :func:`newly_broken` can count the images a check breaks that white-box attacks
called robust — the measure of masking that a mean over images would blur.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from robustreg import attacks, autoattack, evaluation, models
from robustreg.validation import check_count

__all__ = ["epsilon_sweep", "newly_broken", "square_alone", "square_restarts", "transfer"]


def square_alone(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    n_queries: int = autoattack.STANDARD["n_queries"],
    seed: int = 0,
) -> Tensor:
    """Per image, whether the Square attack alone (``n_queries`` queries, AutoAttack's settings)
    fails: 1[f(x_i) = y_i and f(x_i^sq) = y_i]. Unlike inside AutoAttack, it runs on every
    correctly classified image, not only on those the gradient attacks left."""
    out = autoattack.standard_autoattack(
        model, x, y, eps, norm, seed=seed, n_queries=n_queries, components=("square",)
    )
    return out["robust"]


def square_restarts(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    seeds: Sequence[int] = (1, 2, 3, 4, 5),
    n_queries: int = autoattack.STANDARD["n_queries"],
) -> Tensor:
    """Per image, whether Square fails from every random start: 1[f(x_i) = y_i and
    f(x_i^(s)) = y_i for every s in ``seeds``], x_i^(s) the point Square finds from seed s
    (:func:`square_alone`) when run on the images that the starts before s left standing (its
    random draws depend on that batch). With one seed this is :func:`square_alone`."""
    if not seeds:
        raise ValueError("seeds must name at least one random start")
    robust = torch.ones(len(y), dtype=torch.bool, device=y.device)
    for seed in seeds:
        idx = robust.nonzero().squeeze(1)
        if not len(idx):
            break
        robust[idx] = square_alone(
            model, x[idx], y[idx], eps, norm, n_queries=n_queries, seed=seed
        ).to(robust.device)
    return robust


def epsilon_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Sequence[float],
    norm: str = "linf",
    *,
    components: tuple[str, ...] = ("apgd-ce", "apgd-t"),
    steps: int = autoattack.STANDARD["steps"],
    seed: int = 0,
) -> dict[float, Tensor]:
    """Per image and radius, robust flags under APGD (``components`` of AutoAttack) at growing
    ``radii``: ``{ε: BoolTensor[n]}``, stopping after the first radius at which no image is left.

    Radii are nested as in :func:`robustreg.evaluation.robust_flags`: an image broken at ε is
    broken at every larger radius, so each radius attacks only the survivors of the previous one.
    An unbounded attack must succeed, so the last entry should be all False; a network whose robust
    accuracy stalls above zero is masking its gradients (or the sweep stops short).
    """
    if not radii:
        raise ValueError("radii must name at least one radius")
    alive = evaluation.predict(model, x).to(y.device) == y
    out = {}
    for e in sorted(float(r) for r in radii):
        idx = alive.nonzero().squeeze(1)
        if len(idx):
            res = autoattack.standard_autoattack(
                model, x[idx], y[idx], e, norm, seed=seed, steps=steps, components=components
            )
            alive[idx] = res["robust"].to(alive.device)
        out[e] = alive.clone()
        if not alive.any():
            break
    return out


def transfer(
    source: nn.Module,
    target: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    steps: int = 100,
    restarts: int = 5,
    seed: int = 0,
    batch_size: int = 500,
) -> Tensor:
    """Per image, whether ``target`` classifies x_i and the transferred point x_i^s correctly,
    x_i^s the strongest of ``restarts`` PGD runs (``steps`` steps, cross-entropy) against
    ``source`` within the ε-ball of x_i. Random starts come from a generator seeded with ``seed``."""
    check_count("steps", steps)
    check_count("restarts", restarts)
    device, dtype = models.device_dtype(source)
    gen = torch.Generator(device=device).manual_seed(seed)
    robust = evaluation.predict(target, x).to(y.device) == y
    for part in torch.arange(len(x)).split(batch_size):
        xb, yb = x[part].to(device, dtype), y[part].to(device)
        x_adv = attacks.pgd(source, xb, yb, eps, norm, steps, restarts=restarts, generator=gen)
        robust[part] &= (evaluation.predict(target, x_adv) == yb).to(robust.device)
    return robust


def newly_broken(white_box: Tensor, check: Tensor) -> int:
    """The number of images robust under the white-box attacks (``white_box``) that a check
    breaks (``check`` False): Σᵢ 1[white_box_i ∧ ¬check_i]."""
    if white_box.shape != check.shape:
        raise ValueError(
            f"flags must have one shape; got {tuple(white_box.shape)}, {tuple(check.shape)}"
        )
    return int((white_box.bool() & ~check.bool()).sum())

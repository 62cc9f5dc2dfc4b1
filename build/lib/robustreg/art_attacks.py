"""Attacks of the adversarial-robustness-toolbox (ART) on our networks: a cross-check of ours.

:func:`art_pgd` is ART's ``ProjectedGradientDescent`` with the settings of
:func:`robustreg.attacks.pgd`; :func:`art_autoattack` is ART's ``AutoAttack`` (Croce & Hein's
parameter-free ensemble). Both return x_adv on the exact ε-ball ∩ [0, 1] around x. ART ships in
the ``experiments`` extra (``pip install robustreg[experiments]``); it is imported when an attack
runs, so the rest of the package works without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from robustreg import attacks, models
from robustreg.extras import require
from robustreg.validation import exponent

__all__ = ["AUTOATTACK_VERSIONS", "art_autoattack", "art_classifier", "art_pgd"]


def art_classifier(model: nn.Module, input_shape: Sequence[int], num_classes: int):
    """ART's ``PyTorchClassifier`` around ``model`` (cross-entropy loss, inputs clipped to [0, 1])."""
    require("art", "the adversarial-robustness-toolbox")
    from art.estimators.classification import PyTorchClassifier

    device, dtype = models.device_dtype(model)
    return PyTorchClassifier(
        model=models.Float32Logits(model),  # ART feeds float32 arrays
        loss=nn.CrossEntropyLoss(),
        input_shape=tuple(input_shape),
        nb_classes=int(num_classes),
        clip_values=(0.0, 1.0),
        device_type="gpu" if device.type == "cuda" else "cpu",
    )


def _art_norm(norm: str):
    """ART's ``norm`` argument: the exponent p of one of :data:`robustreg.attacks.NORMS` (an int
    where finite, as ART's own defaults are)."""
    p = exponent(norm, attacks.NORMS)
    return p if math.isinf(p) else int(p)


def _project_back(x: Tensor, x_adv: Tensor, eps: float, norm: str) -> Tensor:
    """Project ART's output onto the exact ε-ball ∩ [0, 1] (its own check allows 1e-4 slack)."""
    eps_t = torch.full((len(x),), float(eps), dtype=x.dtype)
    return attacks.project(x, x_adv, attacks.per_sample(eps_t, x), norm, box=True)


def _generate(attack, x: Tensor, y: Tensor, eps: float, norm: str, seed: int) -> Tensor:
    """Run an ART attack on float32 copies (numpy's global generator seeded with ``seed``) and
    project its points back onto the exact ε-ball ∩ [0, 1] around x."""
    np.random.seed(seed)
    x_np = x.detach().cpu().float().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # Square-ℓ2 divides 0/0 on converged rows
        adv = attack.generate(x=x_np, y=y.cpu().numpy())
    return _project_back(x.detach().cpu(), torch.from_numpy(adv).to(x.dtype), eps, norm)


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
    from art.attacks.evasion import ProjectedGradientDescent

    alpha = 2.5 * eps / steps if step_size is None else step_size
    classifier = art_classifier(model, x.shape[1:], models.num_classes(model, x))
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
    return _generate(attack, x, y, eps, norm, seed)


AUTOATTACK_VERSIONS = ("light", "standard")


def art_autoattack(
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
    from art.attacks.evasion import AutoAttack, AutoProjectedGradientDescent, SquareAttack

    if version not in AUTOATTACK_VERSIONS:
        raise ValueError(f"unknown version {version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
    if x.ndim != 4:
        raise ValueError(
            f"ART's AutoAttack needs image-shaped inputs [B, C, H, W]; got shape {tuple(x.shape)}"
        )
    k = models.num_classes(model, x)
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
    return _generate(attack, x, y, eps, norm, seed)

"""AutoAttack in its standard version (Croce & Hein, 2020), image by image.

The standard ensemble runs four attacks in turn, each on the images that all earlier ones failed
to break, with the published settings (for ℓ∞ and for ℓ2 alike):

============ ====================================================================================
APGD-CE      APGD on the cross-entropy, 100 iterations, 1 restart, ρ = 0.75
APGD-T       APGD on the targeted DLR loss, 100 iterations, each of the 9 (K − 1) most likely
             other classes as target
FAB-T        targeted FAB (minimal perturbation), 100 iterations, 9 (K − 1) target classes
Square       random search, 5,000 queries, p_init = 0.8 (gradient-free: it exposes masking)
============ ====================================================================================

An image counts as robust iff it is classified correctly at x and at every attack's point, each
point projected onto the exact ε-ball ∩ [0, 1]^d around x (so no attack gains from rounding
slack). The components are torchattacks' implementations (a port of Croce & Hein's code),
constructed here with the published settings — torchattacks' own ``AutoAttack`` wrapper runs
its components with 10 iterations, not 100. Install with ``pip install --no-deps
torchattacks==3.5.1`` (its declared dependencies would pull torchvision).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from robustreg import attacks, models
from robustreg.extras import require

__all__ = ["COMPONENTS", "STANDARD", "standard_autoattack"]

#: The components in the order they run.
COMPONENTS = ("apgd-ce", "apgd-t", "fab-t", "square")

#: The published settings of the standard version.
STANDARD = {"steps": 100, "n_queries": 5000}

#: torchattacks' names of the norms of :data:`robustreg.attacks.NORMS` (a translation, not a table
#: of norms: the norms and their dual exponents are :data:`robustreg.validation.NORMS`).
_TORCHATTACKS_NAME = {"linf": "Linf", "l2": "L2"}


@contextlib.contextmanager
def _float32_default():
    """torchattacks creates tensors in torch's default dtype and mixes them with float32 ones."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _components(model, eps, norm, k, seed, steps, n_queries):
    require("torchattacks", "AutoAttack's standard components")
    import torchattacks

    common = {"norm": _TORCHATTACKS_NAME[norm], "eps": float(eps), "seed": seed}
    targets = {"n_classes": k}
    built = {
        "apgd-ce": torchattacks.APGD(model, loss="ce", steps=steps, n_restarts=1, **common),
        "apgd-t": torchattacks.APGDT(model, steps=steps, n_restarts=1, **targets, **common),
        "fab-t": torchattacks.FAB(
            model, steps=steps, n_restarts=1, multi_targeted=True, **targets, **common
        ),
        "square": torchattacks.Square(model, n_queries=n_queries, n_restarts=1, **common),
    }
    if k < 4:  # the targeted DLR loss needs the 3rd-largest logit of K ≥ 4 classes
        del built["apgd-t"]
    return built


def standard_autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    norm: str = "linf",
    *,
    seed: int = 0,
    steps: int = STANDARD["steps"],
    n_queries: int = STANDARD["n_queries"],
    batch_size: int = 1000,
    components: tuple[str, ...] = COMPONENTS,
    progress=None,
) -> dict[str, Tensor | dict[str, int]]:
    """Standard AutoAttack on (x, y) at radius ``eps`` in ``norm`` (``"linf"`` or ``"l2"``).

    Returns ``{"robust": BoolTensor[n], "broken_by": {component: images it broke first}}``;
    ``robust`` is 1[argmax f(x_i) = y_i and argmax f(x_i^a) = y_i for every component a]. The
    defaults are the published settings (:data:`STANDARD`); other ``steps``/``n_queries`` make a
    lighter, non-standard variant (for tests). Each component's random draws are seeded with
    ``seed`` inside a forked generator (torch's global state is left as it was). ``progress``:
    an optional callable ``(component, survivors)`` called before each component runs.
    ``components``: a subset of :data:`COMPONENTS` to run, in their standard order (e.g.
    ``("square",)``: the gradient-free attack alone, on every correctly classified image — one of
    the gradient-masking checks of :mod:`robustreg.masking`).
    """
    attacks.check_eps_norm(eps, norm)
    unknown = [c for c in components if c not in COMPONENTS]
    if unknown or not components:
        raise ValueError(
            f"components must be a non-empty subset of {COMPONENTS}; got {tuple(components)!r}"
        )
    if x.ndim < 2 or len(x) != len(y):
        raise ValueError(f"x [n, ...] and y [n] must match; got {tuple(x.shape)}, {tuple(y.shape)}")
    device, dtype = models.device_dtype(model)
    x, y = x.to(device, dtype), y.to(device)
    k = models.num_classes(model, x[:1])
    wrapped = models.Float32Logits(model).eval()  # torchattacks computes in float32
    with torch.no_grad():
        robust = (
            torch.cat(
                [model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
            )
            == y
        )
    broken_by = {}
    eps_t = torch.full((len(x),), float(eps), dtype=dtype, device=device)
    for name, attack in _components(wrapped, eps, norm, k, seed, steps, n_queries).items():
        if name not in components:
            continue
        idx = robust.nonzero().squeeze(1)
        if progress is not None:
            progress(name, len(idx))
        if len(idx) == 0:
            broken_by[name] = 0
            continue
        before = int(robust.sum())
        for part in idx.split(batch_size):
            with torch.random.fork_rng(devices=[]), _float32_default():
                x_adv = attack(x[part].float(), y[part]).to(dtype)
            x_adv = attacks.project(
                x[part], x_adv, attacks.per_sample(eps_t[part], x[part]), norm, box=True
            )
            with torch.no_grad():
                robust[part] &= model(x_adv).argmax(1) == y[part]
        broken_by[name] = before - int(robust.sum())
    return {"robust": robust.cpu(), "broken_by": broken_by}

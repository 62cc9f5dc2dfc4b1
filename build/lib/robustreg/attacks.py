"""White-box attacks: FGSM, PGD (ℓ∞ and ℓ2) and the minimal ℓ2 adversarial perturbation.

Notation of book/notation.md: f(x) ∈ R^K logits, ℓ(x, y) = −log softmax(f(x))_y, g = ∇ₓℓ(x, y).

- :func:`fgsm`: x_adv = Π_[0,1](x + ε sign(g)). This is the exact maximizer of the linearization
  ℓ(x) + gᵀδ over the ℓ∞ ball ‖δ‖∞ ≤ ε intersected with the box x + δ ∈ [0, 1]^d (fact T3: the
  linear term's maximum over the ℓ∞ ball is ε‖g‖₁; coordinates with g_i = 0 are left unchanged).
- :func:`pgd`: projected gradient ascent on ℓ (or on the margin loss) from a random start in the
  ε-ball, ``steps`` iterations of x ← Π(x + α sign(g)) (ℓ∞) or x ← Π(x + α g/‖g‖₂) (ℓ2),
  with Π the projection onto the ε-ball around the clean x followed by clipping to [0, 1]
  (exact for ℓ∞; for ℓ2 clipping only shrinks |δ_i|, so the point stays in the ball). Every
  iterate is scored and, per sample, the strongest point over all iterates and ``restarts`` is
  returned, "strongest" meaning misclassified first, then larger loss.
- :func:`minimal_pgd_perturbation`: the smallest ε (ℓ∞ or ℓ2) at which PGD with the margin loss
  changes the prediction, by bisection, each answer the norm of a verified point (an upper
  bound on the minimal perturbation, in [0, 1]^d).
- :func:`minimal_l2_perturbation`: the smallest ‖δ‖₂ found with argmax f(x + δ) ≠ c
  (c = y, or the predicted class when y is None): DeepFool iterations, a bisection along the
  DeepFool direction, then a per-sample bisection over ε with PGD-ℓ2 (margin loss, warm-started
  from the best point so far). Every returned value is the norm of a point that was verified to
  be misclassified; ``inf`` where none was found. An upper bound on the true minimal
  perturbation, hence ≥ any certified radius (fact T12).

All functions leave the model's mode and its parameters' ``.grad`` untouched (gradients are
taken with :func:`torch.autograd.grad`); the model should be in eval mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustreg.geometry import logit_jacobian
from robustreg.validation import (
    check_batch,
    check_count,
    check_labels,
    check_nonnegative,
    check_norm,
    check_positive,
    exponent,
)

__all__ = [
    "NORMS",
    "check_eps_norm",
    "fgsm",
    "minimal_l2_perturbation",
    "minimal_pgd_perturbation",
    "per_sample",
    "pgd",
    "project",
]

#: The norms of the attacks (names of :data:`robustreg.validation.NORMS`).
NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")


# --- argument checks ---------------------------------------------------------------------------


def check_eps_norm(eps, norm: str) -> None:
    """Raise ``ValueError`` unless ``norm`` is one of :data:`NORMS` and ``eps`` is finite, ≥ 0
    (a number, or a tensor of per-sample radii)."""
    check_norm(norm, NORMS)
    if torch.is_tensor(eps):
        if not (torch.isfinite(eps).all() and (eps >= 0).all()):
            raise ValueError("eps must be finite and ≥ 0")
    else:
        check_nonnegative("eps", eps)


def _check_xy(x: Tensor, y: Tensor | None, box: bool) -> None:
    check_batch(x, finite=True, box=box)
    if y is not None:
        check_labels(y, x.shape[0], dtypes=(torch.int64, torch.int32))


def per_sample(eps, x: Tensor) -> Tensor:
    """ε as a tensor broadcastable to x: [B, 1, …, 1]."""
    e = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if e.ndim == 0:
        e = e.expand(x.shape[0])
    if e.shape != x.shape[:1]:
        raise ValueError(
            f"eps must be a number or a tensor of shape [{x.shape[0]}], got {tuple(e.shape)}"
        )
    return e.reshape(-1, *([1] * (x.ndim - 1)))


def _flat_norm(t: Tensor) -> Tensor:
    return t.flatten(1).norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


# --- losses ------------------------------------------------------------------------------------


def _margin(logits: Tensor, y: Tensor) -> Tensor:
    """max_{k≠y} f_k − f_y per sample (> 0 iff misclassified, ties aside)."""
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(1).values - true


def _loss(logits: Tensor, y: Tensor, kind: str) -> Tensor:
    if kind == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return _margin(logits, y)


def _loss_and_grad(model: nn.Module, x: Tensor, y: Tensor, kind: str):
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        losses = _loss(logits, y, kind)
        (grad,) = torch.autograd.grad(losses.sum(), xg)
    return losses.detach(), logits.detach(), grad


# --- FGSM --------------------------------------------------------------------------------------


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method: x_adv = clip_[0,1](x + ε · sign(∇ₓℓ(x, y))).

    The maximizer of the linearized loss ℓ(x) + ∇ₓℓᵀδ over {‖δ‖∞ ≤ ε, x + δ ∈ [0, 1]^d}
    (NOTATION T3). ``x`` must lie in [0, 1]; ``eps`` a number ≥ 0 or a tensor [B].
    """
    check_eps_norm(eps, "linf")
    _check_xy(x, y, box=True)
    _, _, grad = _loss_and_grad(model, x, y, "ce")
    return (x.detach() + per_sample(eps, x) * grad.sign()).clamp(0.0, 1.0)


# --- PGD ---------------------------------------------------------------------------------------


def project(x0: Tensor, x: Tensor, eps: Tensor, norm: str, box: bool) -> Tensor:
    """Π(x): the projection of x onto the ball ‖x − x0‖ ≤ ε (``norm``; ε from
    :func:`per_sample`), then, with ``box``, clipping to [0, 1]."""
    delta = x - x0
    if norm == "linf":
        delta = torch.maximum(torch.minimum(delta, eps), -eps)
    else:
        n = _flat_norm(delta)
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
    out = x0 + delta
    return out.clamp(0.0, 1.0) if box else out


def _random_start(x: Tensor, eps: Tensor, norm: str, generator) -> Tensor:
    """A uniform point of the ε-ball (ℓ∞: uniform cube; ℓ2: direction × ε·U^{1/d})."""
    shape, kw = x.shape, dict(dtype=x.dtype, device=x.device, generator=generator)
    if norm == "linf":
        return (2 * torch.rand(shape, **kw) - 1) * eps
    d = x[0].numel()
    v = torch.randn(shape, **kw)
    v = v / _flat_norm(v).clamp_min(1e-30)
    r = torch.rand(shape[0], **kw).pow(1.0 / d).reshape(-1, *([1] * (x.ndim - 1)))
    return v * r * eps


def _better(loss_new, wrong_new, loss_old, wrong_old) -> Tensor:
    """Per sample: new beats old when it is misclassified and old is not, or both equal and larger loss."""
    return (wrong_new & ~wrong_old) | ((wrong_new == wrong_old) & (loss_new > loss_old))


def _pgd_run(model, x0, y, eps, norm, steps, alpha, start, box, kind):
    """One PGD run from ``start``; returns the strongest iterate per sample and its score."""
    x = start
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    best_wrong = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for t in range(steps + 1):
        losses, logits, grad = _loss_and_grad(model, x, y, kind)
        wrong = logits.argmax(1) != y
        upd = _better(losses, wrong, best_loss, best_wrong)
        best = torch.where(upd.reshape(-1, *([1] * (x.ndim - 1))), x, best)
        best_loss = torch.where(upd, losses, best_loss)
        best_wrong = best_wrong | wrong
        if t == steps:
            break
        if norm == "linf":
            step = grad.sign()
        else:
            step = grad / _flat_norm(grad).clamp_min(1e-30)
        x = project(x0, x + alpha * step, eps, norm, box)
    return best, best_loss, best_wrong


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    norm: str = "linf",
    steps: int = 40,
    step_size: float | None = None,
    restarts: int = 1,
    generator: torch.Generator | None = None,
    *,
    loss: str = "ce",
    random_start: bool = True,
) -> Tensor:
    """Projected gradient descent attack (Madry et al.) within ‖δ‖ ≤ ε, x + δ ∈ [0, 1]^d.

    Iterates x ← Π(x + α·s) with s = sign(∇ₓL) (``norm="linf"``) or ∇ₓL/‖∇ₓL‖₂ (``"l2"``),
    L the cross-entropy ℓ (``loss="ce"``) or the margin max_{k≠y} f_k − f_y (``"margin"``), and
    Π the projection onto the ε-ball around x followed by clipping to [0, 1]. The default step
    is α = 2.5 ε / steps (Madry et al.). Each of the ``restarts`` runs starts at a uniformly
    random point of the ε-ball (drawn from ``generator``) — or at x when ``random_start=False``;
    over all iterates of all runs the strongest point per sample is returned (misclassified
    first, then larger L). ``eps`` is a number or a per-sample tensor [B]; ``x`` must lie in
    [0, 1]. Returns x_adv with ‖x_adv − x‖ ≤ ε (up to rounding) and values in [0, 1].
    """
    check_eps_norm(eps, norm)
    _check_xy(x, y, box=True)
    check_count("steps", steps, minimum=0)
    check_count("restarts", restarts, minimum=1)
    if step_size is not None:
        check_positive("step_size", step_size)
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid: {', '.join(LOSSES)}")
    x0 = x.detach()
    e = per_sample(eps, x0)
    alpha = e * 2.5 / max(steps, 1) if step_size is None else step_size
    best = best_loss = best_wrong = None
    for _ in range(restarts):
        start = x0 + _random_start(x0, e, norm, generator) if random_start else x0
        start = project(x0, start, e, norm, box=True)
        cand, c_loss, c_wrong = _pgd_run(model, x0, y, e, norm, steps, alpha, start, True, loss)
        if best is None:
            best, best_loss, best_wrong = cand, c_loss, c_wrong
            continue
        upd = _better(c_loss, c_wrong, best_loss, best_wrong)
        best = torch.where(upd.reshape(-1, *([1] * (x0.ndim - 1))), cand, best)
        best_loss = torch.where(upd, c_loss, best_loss)
        best_wrong = best_wrong | c_wrong
    return best.detach()


# --- minimal ℓ2 perturbation -------------------------------------------------------------------


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor) -> Tensor:
    return model(x).argmax(1)


def _deepfool(model, x0, ref, max_iter, overshoot, box):
    """DeepFool (Moosavi-Dezfooli et al.) towards the nearest linearized boundary, per sample.

    At x with logit Jacobian J: for k ≠ c, w_k = ∇f_k − ∇f_c, g_k = f_k − f_c < 0; step
    r = (|g_l| / ‖w_l‖²) w_l with l = argmin_k |g_k|/‖w_k‖ — exact within a linear region.
    Returns the accumulated point x0 + (1 + overshoot)·Σ r and a flag "misclassified".
    """
    total = torch.zeros_like(x0)
    x = x0.clone()
    done = _predict(model, x) != ref
    for _ in range(max_iter):
        active = (~done).nonzero()[:, 0]
        if active.numel() == 0:
            break
        xa, ra = x[active], ref[active]
        with torch.no_grad():
            logits = model(xa)
        jac = logit_jacobian(model, xa).flatten(2)  # [A, K, d]
        w = jac - jac.gather(1, ra[:, None, None].expand(-1, 1, jac.shape[2]))
        g = logits - logits.gather(1, ra[:, None])
        dist = g.abs() / w.norm(dim=2).clamp_min(1e-30)
        dist.scatter_(1, ra[:, None], math.inf)
        l = dist.argmin(1)
        wl = w[torch.arange(len(active)), l]
        gl = g[torch.arange(len(active)), l].abs()
        r = (gl / wl.pow(2).sum(1).clamp_min(1e-30) + 1e-6)[:, None] * wl
        total[active] = total[active] + r.reshape(xa.shape)
        x_new = x0[active] + (1 + overshoot) * total[active]
        if box:
            x_new = x_new.clamp(0.0, 1.0)
        x[active] = x_new
        done[active] = _predict(model, x_new) != ra
    return x, done


def _line_search(model, x0, x_adv, ref, found, steps):
    """Bisection on t ∈ [0, 1] for the smallest t with x0 + t(x_adv − x0) misclassified."""
    lo = torch.zeros(x0.shape[0], dtype=x0.dtype, device=x0.device)
    hi = torch.ones_like(lo)
    d = x_adv - x0
    shape = (-1, *([1] * (x0.ndim - 1)))
    for _ in range(steps):
        mid = (lo + hi) / 2
        wrong = _predict(model, x0 + mid.reshape(shape) * d) != ref
        hi = torch.where(wrong & found, mid, hi)
        lo = torch.where(wrong & found, lo, mid)
    return x0 + hi.reshape(shape) * d


def _nearest_other_class(model, x0, ref, candidates) -> tuple[Tensor, Tensor]:
    """For each x, the nearest candidate (ℓ2) that the model assigns a class other than ref."""
    with torch.no_grad():
        cls = _predict(model, candidates)
    dist = torch.cdist(x0.flatten(1), candidates.flatten(1))  # [B, N]
    dist = dist.masked_fill(cls[None, :] == ref[:, None], math.inf)
    best, idx = dist.min(1)
    return candidates[idx], torch.isfinite(best)


def minimal_l2_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    *,
    clip: bool = False,
    max_iter: int = 50,
    overshoot: float = 0.02,
    search_steps: int = 10,
    pgd_steps: int = 20,
    line_steps: int = 20,
    candidates: Tensor | None = None,
    return_points: bool = False,
):
    """Smallest ‖δ‖₂ found with argmax f(x + δ) ≠ c, ``Tensor[B]`` (``inf`` where none found).

    c = y when given (then 0 where x is already misclassified), else the predicted class
    argmax f(x) — the class T12's certificate protects. Steps, per sample:

    1. DeepFool: repeat δ ← δ + (|f_l − f_c| / ‖∇f_l − ∇f_c‖²)(∇f_l − ∇f_c),
       l = argmin_{k≠c} |f_k − f_c| / ‖∇f_k − ∇f_c‖₂, applying (1 + ``overshoot``)·δ, until the
       class changes (at most ``max_iter`` times); exact in one step inside a linear region.
    2. Bisection along the segment from x to the DeepFool point (``line_steps`` halvings); with
       ``candidates`` (points [N, ...], e.g. the other inputs of a data set), also along the
       segment to the nearest candidate that the model assigns another class, for the points
       where DeepFool's linearizations cycle without changing the class.
    3. Bisection over ε ∈ [0, ‖δ_best‖] (``search_steps`` halvings): PGD-ℓ2 with the margin loss
       (``pgd_steps`` steps of 2.5ε/pgd_steps), started from δ_best·ε/‖δ_best‖; a misclassified
       result becomes δ_best.

    Every returned norm belongs to a point whose misclassification was checked by a forward
    pass, so it is an upper bound on the minimal adversarial perturbation (and at least any
    certified radius). ``clip=False`` (default) searches the whole input space R^d, the setting
    of T12's certificate; ``clip=True`` keeps x + δ in [0, 1]^d. ``return_points=True`` also
    returns the adversarial points ``[B, ...]`` (x itself where none was found).
    """
    _check_xy(x, y, box=clip)
    x0 = x.detach()
    shape = (-1, *([1] * (x0.ndim - 1)))
    with torch.no_grad():
        pred = _predict(model, x0)
    ref = pred if y is None else y
    already = pred != ref

    # 1-2. DeepFool, then bisection along its direction.
    x_df, found = _deepfool(model, x0, ref, max_iter, overshoot, clip)
    found = found | already
    x_best = torch.where(already.reshape(shape), x0, x_df)
    x_best = _line_search(model, x0, x_best, ref, found & ~already, line_steps)
    wrong = _predict(model, x_best) != ref
    found = found & (wrong | already)
    if candidates is not None:
        x_c, found_c = _nearest_other_class(model, x0, ref, candidates.detach().to(x0))
        x_c = _line_search(model, x0, x_c, ref, found_c & ~already, line_steps)
        found_c = found_c & (_predict(model, x_c) != ref) & ~already
        fallback = found_c & ~found  # only where DeepFool found nothing
        x_best = torch.where(fallback.reshape(shape), x_c, x_best)
        found = found | fallback
    x_best = torch.where(found.reshape(shape), x_best, x0)
    inf = torch.full((x0.shape[0],), math.inf, dtype=x0.dtype, device=x0.device)
    best = torch.where(found, _flat_norm(x_best - x0).flatten(), inf)
    best = torch.where(already, torch.zeros_like(best), best)

    # 3. Bisection over ε with warm-started PGD-ℓ2.
    todo = found & ~already & (best > 0)
    lo = torch.zeros_like(best)
    hi = best.clone()
    for _ in range(search_steps):
        idx = todo.nonzero()[:, 0]
        if idx.numel() == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        xs, rs = x0[idx], ref[idx]
        direction = x_best[idx] - xs
        e = mid.reshape(shape)
        start = xs + direction * (e / _flat_norm(direction).clamp_min(1e-30))
        cand, _, _ = _pgd_run(
            model,
            xs,
            rs,
            e,
            "l2",
            pgd_steps,
            e * 2.5 / pgd_steps,
            start.clamp(0, 1) if clip else start,
            clip,
            "margin",
        )
        wrong = _predict(model, cand) != rs
        norms = _flat_norm(cand - xs).flatten()
        improve = wrong & (norms < best[idx])
        upd_idx = idx[improve]
        x_best[upd_idx] = cand[improve]
        best[upd_idx] = norms[improve]
        hi[idx] = torch.where(wrong, torch.minimum(mid, best[idx]), hi[idx])
        lo[idx] = torch.where(wrong, lo[idx], mid)

    # Final verification of every returned point.
    check = _predict(model, x_best) != ref
    ok = check | ~torch.isfinite(best)
    if not bool(ok.all()):  # pragma: no cover - guarded by construction
        raise RuntimeError("internal error: a returned perturbation is not adversarial")
    best = torch.where(found, best, torch.full_like(best, math.inf))
    if return_points:
        return best, x_best
    return best


def minimal_pgd_perturbation(
    model: nn.Module,
    x: Tensor,
    y: Tensor | None = None,
    norm: str = "linf",
    *,
    eps_max: float = 1.0,
    search_steps: int = 12,
    steps: int = 100,
    restarts: int = 5,
    generator: torch.Generator | None = None,
    return_points: bool = False,
):
    """Smallest ‖δ‖_p found with argmax f(x + δ) ≠ c and x + δ ∈ [0, 1]^d, ``Tensor[B]``.

    c = y (0 where x is already misclassified) or the predicted class. PGD with the margin loss
    (``steps`` steps, ``restarts`` random starts) at ε = ``eps_max``; where it succeeds, a
    bisection over ε ∈ [0, ``eps_max``] (``search_steps`` halvings), each success recording the
    point's norm ‖δ‖_p (≤ ε). Every returned value is the norm of a point whose prediction was
    checked to differ from c — an upper bound on the minimal perturbation; ``inf`` where
    PGD at ``eps_max`` found none. ``return_points=True`` also returns those points.
    """
    check_eps_norm(eps_max, norm)
    _check_xy(x, y, box=True)
    check_count("search_steps", search_steps, minimum=0)
    x0 = x.detach()
    ref = _predict(model, x0) if y is None else y
    p = exponent(norm, NORMS)
    best = torch.full((len(x0),), math.inf, dtype=x0.dtype, device=x0.device)
    points = x0.clone()
    already = _predict(model, x0) != ref
    best[already] = 0.0

    def attempt(idx: Tensor, eps: Tensor) -> Tensor:
        cand = pgd(
            model, x0[idx], ref[idx], eps, norm, steps, None, restarts, generator, loss="margin"
        )
        wrong = _predict(model, cand) != ref[idx]
        norms = (cand - x0[idx]).flatten(1).norm(p=p, dim=1)
        better = wrong & (norms < best[idx])
        best[idx[better]] = norms[better]
        points[idx[better]] = cand[better]
        return wrong

    idx = (~already).nonzero()[:, 0]
    lo = torch.zeros(len(x0), dtype=x0.dtype, device=x0.device)
    hi = torch.full_like(lo, float(eps_max))
    if len(idx):
        found = attempt(idx, hi[idx])
        idx = idx[found]
    for _ in range(search_steps):
        if len(idx) == 0:
            break
        mid = (lo[idx] + hi[idx]) / 2
        wrong = attempt(idx, mid)
        hi[idx] = torch.where(wrong, torch.minimum(mid, best[idx]), hi[idx])
        lo[idx] = torch.where(wrong, lo[idx], mid)
    return (best, points) if return_points else best

"""Independent reference computations, for checking the library and the book's facts.

Everything here is computed from the model's forward pass with plain autograd
(``torch.autograd.grad``, ``torch.autograd.functional.jacobian`` / ``hessian``, ``torch.func``),
mostly one sample at a time. Nothing goes through :mod:`robustreg.regularizers` or
:mod:`robustreg.geometry` (nothing here imports the package), so agreement with those modules is
evidence, not a tautology. The functions are slow by design and meant for float64 checks on small
networks. The tests and the chapters compare with these same references, by the one tolerance
rule of :mod:`robustreg.checks`.

Notation (the book's notation page, book/notation.md): logits f ∈ R^K, p = softmax(f), ℓ(x, y) = −log p_y, J = ∂f/∂x ∈ R^{K×d}
(row k is ∇f_k), S = diag(p) − ppᵀ. Inputs ``x`` are batches [B, ...]; inputs of any shape are
flattened to d = x[0].numel() where a formula needs vectors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian

NORMS = ("l2", "linf")


def _per_sample(model: nn.Module, x: Tensor):
    """The map v ∈ R^d ↦ f(v) ∈ R^K of one sample (v reshaped to the model's input shape)."""
    shape = x.shape[1:]
    return lambda v: model(v.view(1, *shape))[0]


def stable_cross_entropy(f: Tensor, y: Tensor | None = None) -> Tensor:
    """ℓ = −log softmax(f)_y written without cancellation, for logits ``f`` [..., K].

    ℓ(f, y) = log(1 + Σ_{j≠c} e^{f_j − f_c}) + f_c − f_y, with c = argmax_k f_k (held fixed).

    Algebraically identical to cross-entropy, but it never forms p_y − 1 or 1 − p_c: its
    derivatives keep their relative accuracy when the prediction is confident (1 − p_max ≪ 1),
    where differentiating ``F.cross_entropy`` loses digits like ε/(1 − p_max). With ``y=None``
    returns ℓ(f, k) for every class k, [..., K]; else ℓ(f, y), [...].
    """
    c = f.detach().argmax(-1, keepdim=True)
    f_c = f.gather(-1, c)
    others = torch.exp(f - f_c).scatter(-1, c, 0.0)  # e^{f_j − f_c}, j ≠ c
    # f_c − f_k, exactly 0 (no graph) at k = c, so that ∂ℓ(f, c)/∂f_c = −Σ_{j≠c} p_j is not
    # formed as 1 − 1 − Σ_{j≠c} p_j
    losses = torch.log1p(others.sum(-1, keepdim=True)) + (f_c - f).scatter(-1, c, 0.0)
    return losses if y is None else losses.gather(-1, y[..., None]).squeeze(-1)


def logit_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """J(x) = ∂f/∂x per sample, [B, K, d], by ``torch.autograd.functional.jacobian``."""
    logits = _per_sample(model, x)
    return torch.stack([jacobian(logits, xi.flatten(), vectorize=True) for xi in x])


def probability_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """∂p/∂x per sample, [B, K, d], p = softmax(f(x)), by ``torch.autograd.functional.jacobian``
    of the composed map (differentiating softmax itself, not the formula S J of fact T6)."""
    logits = _per_sample(model, x)
    return torch.stack(
        [jacobian(lambda v: torch.softmax(logits(v), 0), xi.flatten(), vectorize=True) for xi in x]
    )


def loss_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓℓ(x, y) per sample, [B, d]: autograd of Σ_b cross_entropy(f(x_b), y_b) with respect to x.

    This differentiates ``F.cross_entropy`` itself (what training and CURE differentiate), so it
    carries the rounding of p_y − 1 on confident samples; see :func:`label_gradients` for the
    stable form.
    """
    xr = x.detach().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xr), y, reduction="sum"), xr)
    return g.flatten(1)


def label_gradients(model: nn.Module, x: Tensor) -> Tensor:
    """∇ₓℓ(x, k) for every class k, per sample, [B, K, d] (stable form, T2: rows Jᵀ(p − e_k)).

    Jacobian of :func:`stable_cross_entropy` over all labels, by ``torch.autograd.functional.jacobian``.
    """
    logits = _per_sample(model, x)
    return torch.stack(
        [
            jacobian(lambda v: stable_cross_entropy(logits(v)), xi.flatten(), vectorize=True)
            for xi in x
        ]
    )


def loss_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇ₓ²ℓ(x, y) per sample, [B, d, d], by ``torch.autograd.functional.hessian``.

    Differentiates the stable form ℓ = log(1 + Σ_{j≠c} e^{f_j − f_c}) + f_c − f_y
    (:func:`stable_cross_entropy`), so confident samples keep their relative accuracy.
    """
    logits = _per_sample(model, x)
    return torch.stack(
        [
            hessian(
                lambda v, yi=yi: stable_cross_entropy(logits(v), yi), xi.flatten(), vectorize=True
            )
            for xi, yi in zip(x, y, strict=True)
        ]
    )


def softmax_jacobian(p: Tensor) -> Tensor:
    """S = ∂p/∂f = diag(p) − ppᵀ per sample, [B, K, K].

    The diagonal is written as p_k Σ_{j≠k} p_j (= p_k(1 − p_k) without cancellation).
    """
    S = -p[:, :, None] * p[:, None, :]
    S.diagonal(dim1=1, dim2=2).copy_(p * one_minus_p(p))
    return S


def one_minus_p(p: Tensor, k: Tensor | None = None) -> Tensor:
    """1 − p_k computed as Σ_{j≠k} p_j (accurate when p_k ≈ 1), for probabilities ``p`` [B, K].

    ``k=None``: every class, [B, K]; ``k`` a [B] index tensor (a label, or ``p.argmax(1)`` for
    1 − p_max): [B].
    """
    if k is None:
        K = p.shape[-1]
        return (p[..., None, :] * (1 - torch.eye(K, dtype=p.dtype, device=p.device))).sum(-1)
    return p.scatter(-1, k[..., None], 0.0).sum(-1)


def loss_increase(model: nn.Module, x: Tensor, y: Tensor, delta: Tensor) -> Tensor:
    """ℓ(x + δ, y) − ℓ(x, y) per sample, [B], accurate also when the increase is tiny:

    ℓ(x + δ) − ℓ(x) = log(1 + Σ_k p_k (e^{Δ_k − Δ_y} − 1)), Δ = f(x + δ) − f(x), p = p(x).
    """
    with torch.no_grad():
        f0 = model(x)
        D = model(x + delta) - f0
        D = D - D.gather(1, y[:, None])
        return torch.log1p((torch.softmax(f0, 1) * torch.expm1(D)).sum(1))


def cure_direction(g: Tensor) -> Tensor:
    """CURE's direction z = sign(g)/‖sign(g)‖₂ per row of ``g`` [B, d] (z = 0 where g = 0)."""
    s = torch.sign(g)
    n = s.norm(dim=1, keepdim=True)
    return torch.where(n > 0, s / torch.where(n > 0, n, 1.0), s)


def regularizer_values(model: nn.Module, x: Tensor, y: Tensor, h: float) -> dict[str, Tensor]:
    """Every regularizer per sample, [B], straight from its definition (book/notation.md):

    ``input_gradient`` ‖∇ₓℓ‖₂², ``input_gradient-l1`` ‖∇ₓℓ‖₁, ``jacobian_frobenius`` ‖J‖_F²,
    ``cross_lipschitz`` (1/K²) Σ_{l,m} ‖∇f_l − ∇f_m‖₂², ``hessian_trace`` tr ∇ₓ²ℓ and
    ``curvature`` ‖∇ₓℓ(x + hz) − ∇ₓℓ(x)‖₂² with z = :func:`cure_direction` (∇ₓℓ(x)); from
    :func:`logit_jacobian`, :func:`loss_gradient` and :func:`loss_hessian`.
    """
    J = logit_jacobian(model, x)
    K = J.shape[1]
    g = loss_gradient(model, x, y)
    H = loss_hessian(model, x, y)
    z = cure_direction(g)
    g_h = loss_gradient(model, x + h * z.reshape(x.shape), y)
    pair = J[:, :, None, :] - J[:, None, :, :]
    return {
        "input_gradient": g.pow(2).sum(1),
        "input_gradient-l1": g.abs().sum(1),
        "jacobian_frobenius": J.pow(2).sum((1, 2)),
        "cross_lipschitz": pair.pow(2).sum((1, 2, 3)) / K**2,
        "hessian_trace": H.diagonal(dim1=1, dim2=2).sum(1),
        "curvature": (g_h - g).pow(2).sum(1),
    }


_RECTIFIERS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)


def _constraint_inputs(model: nn.Module, x: Tensor) -> list[tuple[nn.Module, Tensor]]:
    """(module, its input) for every rectifier and max-pool along the forward pass of ``x``.

    Walks ``nn.Sequential`` containers and skip connections x ↦ x + block(x) (a module named
    ``Residual`` with a ``block``, as in robustreg.models); any other module that contains a
    rectifier or a max-pool is rejected, since its constraints would be missed.
    """
    found = []

    def run(module: nn.Module, h: Tensor) -> Tensor:
        if isinstance(module, nn.Sequential):
            for layer in module:
                h = run(layer, h)
            return h
        if type(module).__name__ == "Residual" and isinstance(
            getattr(module, "block", None), nn.Module
        ):
            return h + run(module.block, h)
        if isinstance(module, _RECTIFIERS + (nn.MaxPool1d, nn.MaxPool2d)):
            found.append((module, h))
        elif any(
            isinstance(m, _RECTIFIERS + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d))
            or "AdaptiveMaxPool" in type(m).__name__
            for m in module.modules()
        ):
            raise ValueError(
                f"reference.boundary_distance cannot look inside {type(module).__name__}"
            )
        return module(h)

    run(model, x)
    return found


def _check_pool(pool: nn.Module) -> int:
    """The number of spatial dimensions of a max-pool with non-overlapping windows of 2."""
    n = 1 if isinstance(pool, nn.MaxPool1d) else 2
    two = (2,) * n
    as_tuple = lambda v: tuple(v) if isinstance(v, tuple | list) else (v,) * n  # noqa: E731
    if not (
        as_tuple(pool.kernel_size) == two
        and as_tuple(pool.stride or pool.kernel_size) == two
        and as_tuple(pool.padding) == (0,) * n
        and as_tuple(pool.dilation) == (1,) * n
        and not pool.ceil_mode
    ):
        raise ValueError(
            f"reference.boundary_distance handles max-pools over windows of 2 (MaxPool1d(2), "
            f"MaxPool2d(2)) only; got {pool}"
        )
    return n


def boundary_distance(model: nn.Module, x: Tensor) -> Tensor:
    """ρ_B(x), the ℓ2 distance from x to the boundary of its linear region, per sample, [B]:

    ρ_B(x) = min_s |s(x)| / ‖∇ₓs(x)‖₂ over the region's constraints s, which are the input of every
    rectifier unit (the unit switches where it changes sign) and, for each window of a max-pool,
    v_max − v_j for its argmax v_max and every other entry v_j; constraints with ∇ₓs = 0 never
    switch and are skipped (+∞ when none is left). Brute force: ∇ₓs for every constraint by
    ``torch.autograd.functional.jacobian`` of the forward pass (samples are independent, so one
    call differentiates the batch sums). Max-pools must have windows of 2 (``MaxPool1d(2)``,
    ``MaxPool2d(2)``); the library's general pools are checked by the region test.
    """
    B = x.shape[0]
    x = x.detach()
    with torch.no_grad():
        sites = _constraint_inputs(model, x)
    ratios = [torch.full((B, 1), math.inf, dtype=x.dtype)]
    if sites:
        grads = jacobian(
            lambda z: tuple(v.sum(0) for _, v in _constraint_inputs(model, z)), x, vectorize=True
        )
        for (module, v), g in zip(sites, grads, strict=True):
            g = g.reshape(*v.shape[1:], B, -1).movedim(-2, 0)  # [B, *v.shape[1:], d]
            if isinstance(module, _RECTIFIERS):
                s, ds = v.reshape(B, -1), g.reshape(B, v[0].numel(), -1)
            else:
                n = _check_pool(module)
                u, du = v, g
                for dim in range(2, 2 + n):  # windows of 2 along each spatial dimension
                    u, du = u.unfold(dim, 2, 2), du.unfold(dim, 2, 2)
                d = du.shape[2 + n]
                u = u.reshape(B, -1, 2**n)
                du = du.movedim(2 + n, -1).reshape(B, -1, 2**n, d)
                top = u.argmax(2, keepdim=True)
                s = (u.gather(2, top) - u).reshape(B, -1)
                ds = (du.gather(2, top[..., None].expand(-1, -1, 1, d)) - du).reshape(B, -1, d)
            norm = ds.norm(dim=2)
            ratios.append(torch.where(norm > 0, s.abs() / norm, math.inf))
    return torch.cat(ratios, 1).amin(1)


def linear_maximizer(g: Tensor, eps: Tensor, norm: str) -> Tensor:
    """argmax_{‖δ‖_p ≤ ε} ⟨g, δ⟩ per sample (the dual-norm lemma), shaped like ``g``:

    ε g/‖g‖₂ for ``"l2"``, ε sign(g) for ``"linf"`` (the FGSM step); ``eps`` is [B] or a number.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
    e = torch.as_tensor(eps, dtype=g.dtype).reshape(-1, *[1] * (g.dim() - 1))
    if norm == "linf":
        return e * g.sign()
    return e * g / g.flatten(1).norm(dim=1).clamp_min(1e-300).reshape(-1, *[1] * (g.dim() - 1))


def quadratic_form_moments(A: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
    """Mean and variance of vᵀA_b v for each A_b of a batch [B, K, K], by exact quadrature.

    ``"gauss"``: v ~ N(0, I_K), by the tensor product of the 3-point Gauss–Hermite rule (nodes 0,
    ±√3, weights 2/3, 1/6, 1/6), exact for polynomials of degree ≤ 5 in each coordinate, which
    covers (vᵀAv)²; ``"signs"``: v uniform on {−1, 1}^K, by summing over all 2^K sign vectors.
    Returns {name: (mean [B], variance [B])}; cost 3^K · K² per matrix, so keep K ≲ 12.
    """
    B, K, _ = A.shape
    rules = {
        "gauss": ([-(3**0.5), 0.0, 3**0.5], [1 / 6, 2 / 3, 1 / 6]),
        "signs": ([-1.0, 1.0], [0.5, 0.5]),
    }
    out = {}
    for name, (x1, w1) in rules.items():
        nodes = torch.cartesian_prod(*[torch.tensor(x1, dtype=A.dtype)] * K).reshape(-1, K)
        weights = (
            torch.cartesian_prod(*[torch.tensor(w1, dtype=A.dtype)] * K).reshape(-1, K).prod(1)
        )
        m1 = m2 = 0.0
        for v, w in zip(nodes.split(2**16), weights.split(2**16), strict=True):
            q = (v[:, :, None] * v[:, None, :]).reshape(len(v), K * K) @ A.reshape(B, K * K).T
            m1, m2 = m1 + w @ q, m2 + w @ q**2
        out[name] = (m1, m2 - m1**2)
    return out


def input_gradient_parameter_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """∇_θ Σ_b ‖∇ₓℓ(x_b, y_b)‖₂², flattened in ``model.named_parameters()`` order, computed as

    2 d/dt|_{t=0} ∇_θ Σ_b ℓ(x_b + t g_b; θ), g = ∇ₓℓ held fixed (the double-backprop lemma),

    by forward-over-reverse differentiation (``torch.func.jvp`` over ``torch.func.grad``), not by
    reverse-over-reverse as training does.
    """
    params = {n: q.detach() for n, q in model.named_parameters()}

    def loss(prm, u):
        return F.cross_entropy(torch.func.functional_call(model, prm, (u,)), y, reduction="sum")

    g = torch.func.grad(loss, argnums=1)(params, x)
    _, hvp = torch.func.jvp(lambda u: torch.func.grad(loss)(params, u), (x,), (g,))
    return torch.cat([2 * hvp[n].flatten() for n in params])

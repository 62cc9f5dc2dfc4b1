"""Facts T2–T11 of book/notation.md as property tests over random piecewise-affine networks (float64).

Every identity is checked by the book's one rule (:func:`robustreg.checks.check_identity`: error
≤ 1e-10 × the size of the terms that cancel) against the references of :mod:`robustreg.reference`,
computed independently with ``torch.autograd.functional.jacobian`` / ``hessian``; every inequality
must hold on every drawn case (:func:`robustreg.checks.check_inequality`). T1 and T12 (geometry)
are in test_geometry.py.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from strategies import Case, networks
from test_regularizers import ATOL, TOL, saturation_scale
from torch import nn

from robustreg import checks, reference
from robustreg import regularizers as R
from robustreg.geometry import boundary_distance, same_region

torch.set_num_threads(1)


def probs(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(case.model(case.x), dim=1)


def centering(K: int) -> torch.Tensor:
    return torch.eye(K, dtype=torch.float64) - torch.full((K, K), 1.0 / K, dtype=torch.float64)


def rademacher(K: int) -> torch.Tensor:
    """All 2^K sign vectors, [2^K, K]: a distribution with E[v vᵀ] = I, like N(0, I)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=K)), dtype=torch.float64)


def spectral_norm(J: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(J, ord=2)


# --- T2 ------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t2_input_gradient(case: Case):
    """∇ₓℓ = Jᵀ(p − e_y) = Σ_{k≠y} p_k (∇f_k − ∇f_y)."""
    J = reference.logit_jacobian(case.model, case.x)
    g = reference.loss_gradient(case.model, case.x, case.y)
    p = probs(case)
    e = F.one_hot(case.y, case.K).double()
    scale = saturation_scale(g, J.norm(dim=(1, 2)))
    checks.check_identity(
        "T2: ∇ₓℓ = Jᵀ(p − e_y)", torch.einsum("bkd,bk->bd", J, p - e), g, scale=scale
    )
    Jy = J[torch.arange(len(case.y)), case.y]  # ∇f_y, [B, d]
    others = (1.0 - e)[:, :, None]  # k ≠ y
    pairs = (others * p[:, :, None] * (J - Jy[:, None])).sum(1)
    checks.check_identity("T2: ∇ₓℓ = Σ_{k≠y} p_k(∇f_k − ∇f_y)", pairs, g, scale=scale)


# --- T3 ------------------------------------------------------------------------------------------


def _loss(case: Case, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(case.model(x), case.y, reduction="none")


@settings(deadline=None)
@given(networks())
def test_t3_first_order_worst_case(case: Case):
    """max_{‖δ‖_p ≤ ε} ℓ(x+δ) = ℓ(x) + ε‖∇ℓ‖_q + O(ε²): p = 2 (q = 2) and p = ∞ (q = 1)."""
    x, B = case.x, case.x.shape[0]
    g = reference.loss_gradient(case.model, x, case.y)
    J = reference.logit_jacobian(case.model, x)
    dist = boundary_distance(case.model, x)
    # an ℓ2 step length that stays well inside the region and keeps ε‖J‖ small (third order)
    length = torch.minimum(dist / 2, 1e-3 / (1 + spectral_norm(J)))
    loss0 = _loss(case, x)
    gen = torch.Generator().manual_seed(0)
    for q in (2, 1):
        if q == 2:  # normalized-gradient step, ‖δ‖₂ = ε
            u = g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
            eps = length
        else:  # FGSM step, ‖δ‖∞ = ε
            u = torch.sign(g)
            eps = length / u.norm(dim=1).clamp_min(1.0)
        bound = eps * g.norm(p=q, dim=1)
        # the step attains the bound of the linear term ...
        checks.check_identity(f"T3: ⟨∇ℓ, δ⟩ = ε‖∇ℓ‖_{q}", (g * eps[:, None] * u).sum(1), bound)
        # ... which no other δ in the ball exceeds (Hölder)
        if q == 2:
            r = torch.randn(200, B, g.shape[1], dtype=torch.float64, generator=gen)
            r = r / r.norm(dim=2, keepdim=True)
        else:
            r = 2 * torch.rand(200, B, g.shape[1], dtype=torch.float64, generator=gen) - 1
        checks.check_inequality("T3: Hölder", (r * g).sum(2) * eps, bound.expand(200, B))
        # the remainder is second order: 0 ≤ rem ≤ ¼‖J‖₂²‖δ‖₂², and halving ε quarters it
        rems = []
        for scale in (1.0, 0.5):
            delta = (scale * eps)[:, None] * u
            x1 = x + delta.reshape(x.shape)
            assert bool(same_region(case.model, x, x1).all())
            rem = _loss(case, x1) - loss0 - scale * bound
            # the remainder is a difference of losses: it rounds at 1e-13 of 1 + |ℓ(x)|
            size = ("1 + |ℓ(x)|", 1 + loss0.abs())
            checks.check_inequality("T3: rem ≥ 0", -rem, torch.zeros_like(rem), 1e-13, scale=size)
            quadratic = 0.25 * spectral_norm(J) ** 2 * delta.pow(2).sum(1)
            checks.check_inequality("T3: rem ≤ ¼‖J‖₂²‖δ‖²", rem, quadratic, 1e-13, scale=size)
            rems.append(rem)
        big = rems[0] > 1e-9 * (1 + loss0.abs())
        ratio = rems[1][big] / rems[0][big]
        assert bool(((ratio > 0.2) & (ratio < 0.3)).all()), ratio


# --- T4, T5 --------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks(max_classes=10))
def test_t4_jacobian_by_projection(case: Case):
    """‖J‖_F² = E_v ‖Jᵀv‖² for any v with E[v vᵀ] = I (exact expectation over ±1 vectors)."""
    J = reference.logit_jacobian(case.model, case.x)
    frob = J.pow(2).sum((1, 2))
    checks.check_identity("T4: R_J", R.jacobian_frobenius(case.model, case.x, case.y), frob)
    V = rademacher(case.K)
    expectation = torch.einsum("nk,bkd->bnd", V, J).pow(2).sum(2).mean(1)
    checks.check_identity("T4: ‖J‖_F² = E‖Jᵀv‖²", expectation, frob)


@settings(deadline=None)
@given(networks(max_classes=10))
def test_t5_cross_lipschitz_is_a_centered_jacobian(case: Case):
    """R_CL = (2/K)‖CJ‖_F² = (2/K)(‖J‖_F² − ‖Jᵀ1‖²/K) = (2/K) E_v‖JᵀCv‖² ≤ (2/K) R_J."""
    K = case.K
    J = reference.logit_jacobian(case.model, case.x)
    definition = (J[:, :, None] - J[:, None]).pow(2).sum((1, 2, 3)) / K**2
    C = centering(K)
    centered = (2 / K) * torch.einsum("lk,bkd->bld", C, J).pow(2).sum((1, 2))
    frob = J.pow(2).sum((1, 2))
    expanded = (2 / K) * (frob - J.sum(1).pow(2).sum(1) / K)
    V = rademacher(K) @ C  # rows C v
    projected = (2 / K) * torch.einsum("nk,bkd->bnd", V, J).pow(2).sum(2).mean(1)
    for name, form in (("centered", centered), ("expanded", expanded), ("projected", projected)):
        checks.check_identity(f"T5: R_CL, {name}", form, definition)
    checks.check_identity("T5: R_CL", R.cross_lipschitz(case.model, case.x, case.y), definition)
    checks.check_inequality("T5: R_CL ≤ (2/K) R_J", definition, (2 / K) * frob)


# --- T6, T7, T8, T9 --------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t6_softmax_sees_only_the_centered_jacobian(case: Case):
    """∂p/∂x = S J = S C J."""
    model = case.model
    dp = reference.probability_jacobian(model, case.x)
    J = reference.logit_jacobian(model, case.x)
    S = reference.softmax_jacobian(probs(case))
    scale = saturation_scale(dp, J.norm(dim=(1, 2)))
    checks.check_identity("T6: ∂p/∂x = S J", S @ J, dp, scale=scale)
    checks.check_identity("T6: ∂p/∂x = S C J", S @ centering(case.K) @ J, dp, scale=scale)


@settings(deadline=None)
@given(networks())
def test_centering_the_last_layer_removes_only_the_mean_gradient(case: Case):
    """Chapter 9 (T5, T6): W ← CW, b ← Cb in the output layer leaves p, R_IG, R_CL, R_CURE and
    R_H unchanged and makes Jᵀ1 = 0, so R_J = (K/2) R_CL: the Jacobian objective at λ and the
    cross-Lipschitz one at (K/2)λ have the same minimum."""
    model = copy.deepcopy(case.model)
    last = list(model.children())[-1]
    assert isinstance(last, nn.Linear)
    J = reference.logit_jacobian(model, case.x)
    p = probs(case)
    C = centering(case.K)
    with torch.no_grad():
        last.weight.copy_(C @ last.weight)
        last.bias.copy_(C @ last.bias)
    Jc = reference.logit_jacobian(model, case.x)
    with torch.no_grad():
        pc = torch.softmax(model(case.x), dim=1)
    scale = ("‖J‖_F", J.norm(dim=(1, 2)))
    checks.check_identity("centred: p unchanged", pc, p)
    checks.check_identity("centred: J' = CJ", Jc, C @ J, scale=scale)
    checks.check_identity("centred: J'ᵀ1 = 0", Jc.sum(1), torch.zeros_like(Jc.sum(1)), scale=scale)
    r_cl = R.cross_lipschitz(case.model, case.x, case.y)
    r_cl_c = R.cross_lipschitz(model, case.x, case.y)
    r_j_c = R.jacobian_frobenius(model, case.x, case.y)
    cl_scale = ("‖J‖_F²", J.norm(dim=(1, 2)) ** 2)
    checks.check_identity("centred: R_CL unchanged", r_cl_c, r_cl, scale=cl_scale)
    # p is unchanged everywhere, so is the loss: the penalties that see J only through CJ
    for name in ("input_gradient", "hessian_trace", "curvature"):
        fn = getattr(R, name)
        before, after = fn(case.model, case.x, case.y), fn(model, case.x, case.y)
        checks.check_identity(f"centred: {name} unchanged", after, before, scale=cl_scale)
    checks.check_identity("centred: R_J = (K/2) R_CL", r_j_c, case.K / 2 * r_cl_c, scale=cl_scale)


@settings(deadline=None)
@given(networks())
def test_t7_loss_hessian_is_gauss_newton(case: Case):
    """∇ₓ²ℓ = Jᵀ S J, positive semi-definite."""
    H = reference.loss_hessian(case.model, case.x, case.y)
    J = reference.logit_jacobian(case.model, case.x)
    S = reference.softmax_jacobian(probs(case))
    gauss_newton = J.transpose(1, 2) @ S @ J
    scale = saturation_scale(H, J.norm(dim=(1, 2)) ** 2)
    checks.check_identity("T7: ∇ₓ²ℓ = JᵀSJ", gauss_newton, H, scale=scale)
    eig = torch.linalg.eigvalsh(H)
    # rounding: 1e-12 of ‖H‖ plus ATOL·‖J‖² for the saturated softmax, as the scale of 1e-12:
    # −λ ≤ 1e-12‖H‖ + ATOL‖J‖², exactly the former slack
    size = eig.abs().amax(1, keepdim=True) + ATOL / 1e-12 * J.norm(dim=(1, 2))[:, None] ** 2
    psd = ("max|λ| + 0.1‖J‖_F²", size.expand_as(eig))
    checks.check_inequality("T7: ∇ₓ²ℓ ⪰ 0", -eig, torch.zeros_like(eig), 1e-12, scale=psd)


@settings(deadline=None)
@given(networks())
def test_t8_variances(case: Case):
    """R_H = Σ_k p_k‖∇f_k − Jᵀp‖² (p-variance); R_CL = 2 × the uniform variance."""
    H = reference.loss_hessian(case.model, case.x, case.y)
    J = reference.logit_jacobian(case.model, case.x)
    p = probs(case)
    trace = H.diagonal(dim1=1, dim2=2).sum(1)
    mean_p = torch.einsum("bk,bkd->bd", p, J)
    variance_p = (p * (J - mean_p[:, None]).pow(2).sum(2)).sum(1)
    scale = saturation_scale(trace, J.norm(dim=(1, 2)) ** 2)
    checks.check_identity("T8: tr ∇ₓ²ℓ = p-variance", variance_p, trace, scale=scale)
    r_h = R.hessian_trace(case.model, case.x, case.y)
    checks.check_identity("T8: R_H = p-variance", r_h, variance_p)
    variance_u = (J - J.mean(1, keepdim=True)).pow(2).sum(2).mean(1)
    r_cl = R.cross_lipschitz(case.model, case.x, case.y)
    checks.check_identity("T8: R_CL = 2 × uniform variance", r_cl, 2 * variance_u)


@settings(deadline=None)
@given(networks())
def test_t9_fisher(case: Case):
    """E_{y′~p}‖∇ℓ(x, y′)‖² = R_H and E_{y′~p}[g gᵀ] = ∇ₓ²ℓ (summing over y′ weighted by p)."""
    H = reference.loss_hessian(case.model, case.x, case.y)
    p = probs(case)
    B, K = p.shape
    grads = torch.stack(
        [reference.loss_gradient(case.model, case.x, torch.full((B,), k)) for k in range(K)], 1
    )  # [B, K, d]: ∇ℓ(x, k)
    natural = reference.logit_jacobian(case.model, case.x).norm(dim=(1, 2)) ** 2
    trace = H.diagonal(dim1=1, dim2=2).sum(1)
    fisher_trace = (p * grads.pow(2).sum(2)).sum(1)
    scale = saturation_scale(trace, natural)
    checks.check_identity("T9: E‖∇ℓ(x, y′)‖² = R_H", fisher_trace, trace, scale=scale)
    fisher = torch.einsum("bk,bki,bkj->bij", p, grads, grads)
    checks.check_identity("T9: E[g gᵀ] = ∇ₓ²ℓ", fisher, H, scale=saturation_scale(H, natural))


# --- T10 -------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t10_cure_decomposition(case: Case):
    """∇ℓ(x+hz) − ∇ℓ(x) = J(x)ᵀ(p′ − p) + (J(x+hz) − J(x))ᵀ(p′ − e_y); the second term
    vanishes when x and x + hz share a region; R.curvature is ‖that difference‖²."""
    model, x, y = case.model, case.x, case.y
    g = reference.loss_gradient(model, x, y)
    z = reference.cure_direction(g)
    e = F.one_hot(y, case.K).double()
    dist = boundary_distance(model, x)
    for h in (0.3, 2.0, (dist / 2).clamp_max(1.0)):  # the last stays inside every region
        hb = torch.as_tensor(h, dtype=torch.float64).expand(len(x))[:, None]
        x1 = x + (hb * z).reshape(x.shape)
        g1 = reference.loss_gradient(model, x1, y)
        J, J1 = reference.logit_jacobian(model, x), reference.logit_jacobian(model, x1)
        p = probs(case)
        with torch.no_grad():
            p1 = torch.softmax(model(x1), 1)
        softmax_term = torch.einsum("bkd,bk->bd", J, p1 - p)
        change_term = torch.einsum("bkd,bk->bd", J1 - J, p1 - e)
        # a difference of gradients: rounding is relative to the gradients, not to their
        # difference, and the references through the cross-entropy keep only ≈ eps·‖J‖
        # absolute accuracy when the softmax saturates (see saturation_scale). At TOL this scale
        # allows exactly TOL(‖g‖ + ‖g′‖) + ATOL(‖J‖ + ‖J′‖), the former bound.
        size = g.norm(dim=1) + g1.norm(dim=1)
        size = size + ATOL / TOL * (J.norm(dim=(1, 2)) + J1.norm(dim=(1, 2)))
        what = "‖∇ℓ‖ + ‖∇ℓ′‖ + 1e-3(‖J‖_F + ‖J′‖_F)"
        decomposition = softmax_term + change_term
        checks.check_identity("T10: ∇ℓ′ − ∇ℓ", decomposition, g1 - g, TOL, scale=(what, size))
        inside = same_region(model, x, x1)
        if isinstance(h, torch.Tensor):
            assert bool(inside.all())
        if bool(inside.any()):
            checks.check_identity("T1: J′ = J inside the region", J1[inside], J[inside])
            change, zero = change_term[inside], torch.zeros_like(change_term[inside])
            scale = (what, size[inside])
            checks.check_identity("T10: change term = 0 inside", change, zero, TOL, scale=scale)
        for i in range(len(x)):
            hi = float(hb[i])
            if hi > 0:
                value = R.curvature(model, x[i : i + 1], y[i : i + 1], h=hi).detach()
                diff = (g1 - g)[i].norm()
                scale = (what, size[i])
                checks.check_identity("T10: √R_CURE", value.sqrt(), diff, TOL, scale=scale)


@settings(deadline=None)
@given(networks())
def test_t10_finite_difference_tends_to_hessian_vector_product(case: Case):
    """(∇ℓ(x + hz) − ∇ℓ(x))/h → Hz linearly in h, inside the region; R_CURE/h² → ‖Hz‖²."""
    model, x, y = case.model, case.x, case.y
    g = reference.loss_gradient(model, x, y)
    z = reference.cure_direction(g)
    H = reference.loss_hessian(model, x, y)
    Hz = torch.einsum("bij,bj->bi", H, z)
    J = reference.logit_jacobian(model, x)
    scale = 1 + spectral_norm(J) ** 2  # ‖H‖ ≤ ‖J‖₂²/2
    h1 = torch.minimum(boundary_distance(model, x) / 2, 1e-3 / (1 + spectral_norm(J)))
    errors = []
    for h in (h1, h1 / 10):
        x1 = x + (h[:, None] * z).reshape(x.shape)
        assert bool(same_region(model, x, x1).all())
        fd = (reference.loss_gradient(model, x1, y) - g) / h[:, None]
        errors.append((fd - Hz).norm(dim=1))

    def rounding(h):
        """Rounding error of the difference quotient and of Hz: each loss gradient Jᵀ(p − e_y) is
        accurate to ≈ ε‖J‖_F (‖p − e_y‖ ≤ √2; sums over K and d absorbed in the factor 64), their
        difference is divided by h, and Hz = JᵀSJz is accurate to ≈ ε‖J‖₂²."""
        eps = torch.finfo(torch.float64).eps
        return 64 * eps * (J.flatten(1).norm(dim=1) / h + scale)

    noise = rounding(h1 / 10) + rounding(h1)
    # first order: ≈ 1/10
    checks.check_inequality("T10: first order", errors[1], 0.2 * errors[0] + noise)
    checks.check_inequality("T10: → Hz", errors[1], 1e-3 * Hz.norm(dim=1) + noise)
    # the regularizer itself, per sample at its own h
    for i in range(len(x)):
        hi = float(h1[i] / 10)
        if hi > 0 and float(Hz[i].norm()) > 1e-6 * float(scale[i]):
            value = R.curvature(model, x[i : i + 1], y[i : i + 1], h=hi).detach() / hi**2
            checks.check_identity("T10: R_CURE/h² → ‖Hz‖²", value, Hz[i].pow(2).sum(), 1e-2)


# --- T11 -------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t11_bounds(case: Case):
    """R_IG ≤ K(1 − p_y)² R_CL;  R_H ≤ (1 − max_k p_k)(K²/2) R_CL;  ‖Hz‖² ≤ R_H²."""
    model, x, y, K = case.model, case.x, case.y, case.K
    p = probs(case)
    r_ig = R.input_gradient(model, x, y).detach()
    r_cl = R.cross_lipschitz(model, x, y).detach()
    r_h = R.hessian_trace(model, x, y).detach()
    # 1 − p_k as Σ_{j≠k} p_j, accurate also when p_k → 1
    not_y = reference.one_minus_p(p, y)
    not_max = reference.one_minus_p(p, p.argmax(1))
    checks.check_inequality("T11: R_IG ≤ K(1 − p_y)² R_CL", r_ig, K * not_y**2 * r_cl)
    checks.check_inequality("T11: R_H ≤ (1 − p_max)(K²/2) R_CL", r_h, not_max * (K**2 / 2) * r_cl)
    H = reference.loss_hessian(model, x, y)
    z = reference.cure_direction(reference.loss_gradient(model, x, y))
    Hz = torch.einsum("bij,bj->bi", H, z)
    checks.check_inequality("T11: ‖Hz‖² ≤ R_H²", Hz.pow(2).sum(1), r_h**2)


@settings(deadline=None)
@given(networks(min_classes=2, max_classes=2))
def test_t11_first_bound_is_tight_for_two_classes(case: Case):
    """For K = 2, R_IG = 2(1 − p_y)² R_CL exactly."""
    p = probs(case)
    not_y = p[torch.arange(len(case.y)), 1 - case.y]  # 1 − p_y, without cancellation
    r_ig = R.input_gradient(case.model, case.x, case.y)
    r_cl = R.cross_lipschitz(case.model, case.x, case.y)
    checks.check_identity("T11: R_IG = 2(1 − p_y)² R_CL", r_ig, 2 * not_y**2 * r_cl, TOL)

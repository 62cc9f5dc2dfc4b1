"""Facts T2–T11 of book/notation.md as property tests over random piecewise-affine networks (float64).

Every identity is checked to relative error ≤ 1e-10 against references computed independently
with ``torch.autograd.functional.jacobian`` / ``hessian`` (``tests/test_regularizers.py``);
every inequality must hold on every drawn case. T1 and T12 (geometry) are in test_geometry.py.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from strategies import Case, networks
from test_regularizers import (
    ATOL,
    TOL,
    assert_identity,
    ref_cure_direction,
    ref_hessian,
    ref_jacobian,
    ref_loss_grad,
)

from robustreg import regularizers as R
from robustreg.geometry import boundary_distance, same_region

torch.set_num_threads(1)


def probs(case: Case) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(case.model(case.x), dim=1)


def softmax_jacobian(p: torch.Tensor) -> torch.Tensor:
    """S = diag(p) − p pᵀ, [B, K, K]."""
    return torch.diag_embed(p) - p[:, :, None] * p[:, None, :]


def centering(K: int) -> torch.Tensor:
    return torch.eye(K, dtype=torch.float64) - torch.full((K, K), 1.0 / K, dtype=torch.float64)


def rademacher(K: int) -> torch.Tensor:
    """All 2^K sign vectors, [2^K, K]: a distribution with E[v vᵀ] = I, like N(0, I)."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=K)), dtype=torch.float64)


def assert_leq(lhs: torch.Tensor, rhs: torch.Tensor, rtol: float = 1e-12) -> None:
    bad = ~(lhs <= rhs + rtol * rhs.abs() + 1e-300)
    assert not bool(bad.any()), f"violated: lhs {lhs[bad].tolist()} > rhs {rhs[bad].tolist()}"


def spectral_norm(J: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(J, ord=2)


# --- T2 ------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t2_input_gradient(case: Case):
    """∇ₓℓ = Jᵀ(p − e_y) = Σ_{k≠y} p_k (∇f_k − ∇f_y)."""
    J = ref_jacobian(case.model, case.x)
    g = ref_loss_grad(case.model, case.x, case.y)
    p = probs(case)
    e = F.one_hot(case.y, case.K).double()
    scale = J.norm(dim=(1, 2))
    assert_identity(torch.einsum("bkd,bk->bd", J, p - e), g, scale=scale)
    Jy = J[torch.arange(len(case.y)), case.y]  # ∇f_y, [B, d]
    others = (1.0 - e)[:, :, None]  # k ≠ y
    assert_identity((others * p[:, :, None] * (J - Jy[:, None])).sum(1), g, scale=scale)


# --- T3 ------------------------------------------------------------------------------------------


def _loss(case: Case, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(case.model(x), case.y, reduction="none")


@settings(deadline=None)
@given(networks())
def test_t3_first_order_worst_case(case: Case):
    """max_{‖δ‖_p ≤ ε} ℓ(x+δ) = ℓ(x) + ε‖∇ℓ‖_q + O(ε²): p = 2 (q = 2) and p = ∞ (q = 1)."""
    x, B = case.x, case.x.shape[0]
    g = ref_loss_grad(case.model, x, case.y)
    J = ref_jacobian(case.model, x)
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
        assert_identity((g * eps[:, None] * u).sum(1), bound)
        # ... which no other δ in the ball exceeds (Hölder)
        if q == 2:
            r = torch.randn(200, B, g.shape[1], dtype=torch.float64, generator=gen)
            r = r / r.norm(dim=2, keepdim=True)
        else:
            r = 2 * torch.rand(200, B, g.shape[1], dtype=torch.float64, generator=gen) - 1
        assert_leq((r * g).sum(2) * eps, bound.expand(200, B))
        # the remainder is second order: 0 ≤ rem ≤ ¼‖J‖₂²‖δ‖₂², and halving ε quarters it
        rems = []
        for scale in (1.0, 0.5):
            delta = (scale * eps)[:, None] * u
            x1 = x + delta.reshape(x.shape)
            assert bool(same_region(case.model, x, x1).all())
            rem = _loss(case, x1) - loss0 - scale * bound
            slack = 1e-13 * (1 + loss0.abs())
            assert_leq(-rem, slack)
            assert_leq(rem, 0.25 * spectral_norm(J) ** 2 * delta.pow(2).sum(1) + slack)
            rems.append(rem)
        big = rems[0] > 1e-9 * (1 + loss0.abs())
        ratio = rems[1][big] / rems[0][big]
        assert bool(((ratio > 0.2) & (ratio < 0.3)).all()), ratio


# --- T4, T5 --------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks(max_classes=10))
def test_t4_jacobian_by_projection(case: Case):
    """‖J‖_F² = E_v ‖Jᵀv‖² for any v with E[v vᵀ] = I (exact expectation over ±1 vectors)."""
    J = ref_jacobian(case.model, case.x)
    frob = J.pow(2).sum((1, 2))
    assert_identity(R.jacobian_frobenius(case.model, case.x, case.y), frob)
    V = rademacher(case.K)
    expectation = torch.einsum("nk,bkd->bnd", V, J).pow(2).sum(2).mean(1)
    assert_identity(expectation, frob)


@settings(deadline=None)
@given(networks(max_classes=10))
def test_t5_cross_lipschitz_is_a_centered_jacobian(case: Case):
    """R_CL = (2/K)‖CJ‖_F² = (2/K)(‖J‖_F² − ‖Jᵀ1‖²/K) = (2/K) E_v‖JᵀCv‖² ≤ (2/K) R_J."""
    K = case.K
    J = ref_jacobian(case.model, case.x)
    definition = (J[:, :, None] - J[:, None]).pow(2).sum((1, 2, 3)) / K**2
    C = centering(K)
    centered = (2 / K) * torch.einsum("lk,bkd->bld", C, J).pow(2).sum((1, 2))
    frob = J.pow(2).sum((1, 2))
    expanded = (2 / K) * (frob - J.sum(1).pow(2).sum(1) / K)
    V = rademacher(K) @ C  # rows C v
    projected = (2 / K) * torch.einsum("nk,bkd->bnd", V, J).pow(2).sum(2).mean(1)
    for form in (centered, expanded, projected):
        assert_identity(form, definition)
    assert_identity(R.cross_lipschitz(case.model, case.x, case.y), definition)
    assert_leq(definition, (2 / K) * frob)


# --- T6, T7, T8, T9 --------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t6_softmax_sees_only_the_centered_jacobian(case: Case):
    """∂p/∂x = S J = S C J."""
    model = case.model
    dp = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda v: torch.softmax(model(v.unsqueeze(0)), 1).squeeze(0), xi
            ).reshape(case.K, -1)
            for xi in case.x
        ]
    )
    J = ref_jacobian(model, case.x)
    S = softmax_jacobian(probs(case))
    scale = J.norm(dim=(1, 2))
    assert_identity(S @ J, dp, scale=scale)
    assert_identity(S @ centering(case.K) @ J, dp, scale=scale)


@settings(deadline=None)
@given(networks())
def test_t7_loss_hessian_is_gauss_newton(case: Case):
    """∇ₓ²ℓ = Jᵀ S J, positive semi-definite."""
    H = ref_hessian(case.model, case.x, case.y)
    J = ref_jacobian(case.model, case.x)
    S = softmax_jacobian(probs(case))
    assert_identity(J.transpose(1, 2) @ S @ J, H, scale=J.norm(dim=(1, 2)) ** 2)
    eig = torch.linalg.eigvalsh(H)
    # rounding: relative to ‖H‖, and ≈ eps·‖J‖² for the saturated-softmax reference
    slack = 1e-12 * eig.abs().amax(1, keepdim=True) + ATOL * J.norm(dim=(1, 2))[:, None] ** 2
    assert bool((eig >= -slack).all()), eig.min(1).values


@settings(deadline=None)
@given(networks())
def test_t8_variances(case: Case):
    """R_H = Σ_k p_k‖∇f_k − Jᵀp‖² (p-variance); R_CL = 2 × the uniform variance."""
    H = ref_hessian(case.model, case.x, case.y)
    J = ref_jacobian(case.model, case.x)
    p = probs(case)
    trace = H.diagonal(dim1=1, dim2=2).sum(1)
    mean_p = torch.einsum("bk,bkd->bd", p, J)
    variance_p = (p * (J - mean_p[:, None]).pow(2).sum(2)).sum(1)
    scale = J.norm(dim=(1, 2)) ** 2
    assert_identity(variance_p, trace, scale=scale)
    assert_identity(R.hessian_trace(case.model, case.x, case.y), variance_p)
    variance_u = (J - J.mean(1, keepdim=True)).pow(2).sum(2).mean(1)
    assert_identity(R.cross_lipschitz(case.model, case.x, case.y), 2 * variance_u)


@settings(deadline=None)
@given(networks())
def test_t9_fisher(case: Case):
    """E_{y′~p}‖∇ℓ(x, y′)‖² = R_H and E_{y′~p}[g gᵀ] = ∇ₓ²ℓ (summing over y′ weighted by p)."""
    H = ref_hessian(case.model, case.x, case.y)
    p = probs(case)
    B, K = p.shape
    grads = torch.stack(
        [ref_loss_grad(case.model, case.x, torch.full((B,), k)) for k in range(K)], 1
    )  # [B, K, d]: ∇ℓ(x, k)
    scale = ref_jacobian(case.model, case.x).norm(dim=(1, 2)) ** 2
    trace = H.diagonal(dim1=1, dim2=2).sum(1)
    assert_identity((p * grads.pow(2).sum(2)).sum(1), trace, scale=scale)
    assert_identity(torch.einsum("bk,bki,bkj->bij", p, grads, grads), H, scale=scale)


# --- T10 -------------------------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_t10_cure_decomposition(case: Case):
    """∇ℓ(x+hz) − ∇ℓ(x) = J(x)ᵀ(p′ − p) + (J(x+hz) − J(x))ᵀ(p′ − e_y); the second term
    vanishes when x and x + hz share a region; R.curvature is ‖that difference‖²."""
    model, x, y = case.model, case.x, case.y
    g = ref_loss_grad(model, x, y)
    z = ref_cure_direction(g)
    e = F.one_hot(y, case.K).double()
    dist = boundary_distance(model, x)
    for h in (0.3, 2.0, (dist / 2).clamp_max(1.0)):  # the last stays inside every region
        hb = torch.as_tensor(h, dtype=torch.float64).expand(len(x))[:, None]
        x1 = x + (hb * z).reshape(x.shape)
        g1 = ref_loss_grad(model, x1, y)
        J, J1 = ref_jacobian(model, x), ref_jacobian(model, x1)
        p = probs(case)
        with torch.no_grad():
            p1 = torch.softmax(model(x1), 1)
        softmax_term = torch.einsum("bkd,bk->bd", J, p1 - p)
        change_term = torch.einsum("bkd,bk->bd", J1 - J, p1 - e)
        # a difference of gradients: rounding is relative to the gradients, not to their
        # difference, and the references through the cross-entropy keep only ≈ eps·‖J‖
        # absolute accuracy when the softmax saturates (see assert_identity)
        scale = TOL * (g.norm(dim=1) + g1.norm(dim=1))
        scale = scale + ATOL * (J.norm(dim=(1, 2)) + J1.norm(dim=(1, 2)))
        assert_leq((softmax_term + change_term - (g1 - g)).norm(dim=1), scale)
        inside = same_region(model, x, x1)
        if isinstance(h, torch.Tensor):
            assert bool(inside.all())
        if bool(inside.any()):
            assert_identity(J1[inside], J[inside])
            assert_leq(change_term[inside].norm(dim=1), scale[inside])
        for i in range(len(x)):
            hi = float(hb[i])
            if hi > 0:
                value = R.curvature(model, x[i : i + 1], y[i : i + 1], h=hi).detach()
                err = (value.sqrt() - (g1 - g)[i].norm()).abs()
                assert_leq(err, scale[i : i + 1])


@settings(deadline=None)
@given(networks())
def test_t10_finite_difference_tends_to_hessian_vector_product(case: Case):
    """(∇ℓ(x + hz) − ∇ℓ(x))/h → Hz linearly in h, inside the region; R_CURE/h² → ‖Hz‖²."""
    model, x, y = case.model, case.x, case.y
    g = ref_loss_grad(model, x, y)
    z = ref_cure_direction(g)
    H = ref_hessian(model, x, y)
    Hz = torch.einsum("bij,bj->bi", H, z)
    J = ref_jacobian(model, x)
    scale = 1 + spectral_norm(J) ** 2  # ‖H‖ ≤ ‖J‖₂²/2
    h1 = torch.minimum(boundary_distance(model, x) / 2, 1e-3 / (1 + spectral_norm(J)))
    errors = []
    for h in (h1, h1 / 10):
        x1 = x + (h[:, None] * z).reshape(x.shape)
        assert bool(same_region(model, x, x1).all())
        fd = (ref_loss_grad(model, x1, y) - g) / h[:, None]
        errors.append((fd - Hz).norm(dim=1))

    def rounding(h):
        """Rounding error of the difference quotient and of Hz: each loss gradient Jᵀ(p − e_y) is
        accurate to ≈ ε‖J‖_F (‖p − e_y‖ ≤ √2; sums over K and d absorbed in the factor 64), their
        difference is divided by h, and Hz = JᵀSJz is accurate to ≈ ε‖J‖₂²."""
        eps = torch.finfo(torch.float64).eps
        return 64 * eps * (J.flatten(1).norm(dim=1) / h + scale)

    noise = rounding(h1 / 10) + rounding(h1)
    assert_leq(errors[1], 0.2 * errors[0] + noise)  # first order: ≈ 1/10
    assert_leq(errors[1], 1e-3 * Hz.norm(dim=1) + noise)
    # the regularizer itself, per sample at its own h
    for i in range(len(x)):
        hi = float(h1[i] / 10)
        if hi > 0 and float(Hz[i].norm()) > 1e-6 * float(scale[i]):
            value = R.curvature(model, x[i : i + 1], y[i : i + 1], h=hi).detach() / hi**2
            assert abs(float(value) / float(Hz[i].pow(2).sum()) - 1) < 1e-2


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
    not_y = p.scatter(1, y[:, None], 0.0).sum(1)
    not_max = p.scatter(1, p.argmax(1, keepdim=True), 0.0).sum(1)
    assert_leq(r_ig, K * not_y**2 * r_cl)
    assert_leq(r_h, not_max * (K**2 / 2) * r_cl)
    H = ref_hessian(model, x, y)
    z = ref_cure_direction(ref_loss_grad(model, x, y))
    Hz = torch.einsum("bij,bj->bi", H, z)
    assert_leq(Hz.pow(2).sum(1), r_h**2)


@settings(deadline=None)
@given(networks(min_classes=2, max_classes=2))
def test_t11_first_bound_is_tight_for_two_classes(case: Case):
    """For K = 2, R_IG = 2(1 − p_y)² R_CL exactly."""
    p = probs(case)
    not_y = p[torch.arange(len(case.y)), 1 - case.y]  # 1 − p_y, without cancellation
    r_ig = R.input_gradient(case.model, case.x, case.y)
    r_cl = R.cross_lipschitz(case.model, case.x, case.y)
    assert_identity(r_ig, 2 * not_y**2 * r_cl, TOL)

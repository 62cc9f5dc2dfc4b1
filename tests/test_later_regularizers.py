"""The three later regularizers (GradAlign, local linearity, MMR): values against direct
formulas, their relations to facts T3/T7, T10 and T12, the common contract, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from strategies import Case, networks
from torch import nn

from robustreg import checks, geometry, models, reference
from robustreg import regularizers as R


def input_grad(model, x, y):
    """∇ₓℓ per sample, shaped like x (the reference, :func:`robustreg.reference.loss_gradient`)."""
    return reference.loss_gradient(model, x, y).view_as(x)


@settings(deadline=None, max_examples=12)
@given(networks(max_batch=4))
def test_grad_align_matches_the_direct_formula(case: Case):
    model, x, y = case.model, case.x, case.y
    eps = 0.3
    value = R.grad_align(model, x, y, eps, generator=torch.Generator().manual_seed(1))
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g0, g1 = (
        input_grad(model, x, y).flatten(1),
        input_grad(model, x + eps * (2 * u - 1), y).flatten(1),
    )
    ok = (g0.norm(dim=1) > 0) & (g1.norm(dim=1) > 0)
    cos = F.cosine_similarity(g0, g1, dim=1, eps=0.0)
    expected = torch.where(ok, 1 - cos, torch.zeros_like(cos))
    # terms of size 1 (cosines): an absolute 1e-12, as before
    checks.check_identity("GradAlign", value, expected, 1e-12, scale=("1", 1.0))


@pytest.mark.parametrize("scale", [100.0, 200.0, 300.0])
def test_grad_align_gradient_stays_finite_when_the_gradients_are_subnormal(scale):
    """Logit gaps of 90–100 leave loss gradients below float32's smallest normal number: dividing
    by them overflowed the backward pass (22 of 50 such cases before); those rows count as 0."""
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        x = torch.rand(256, 4)
        value = R.grad_align(model, x, model(x).argmax(1), 0.1, generator=torch.Generator())
        value.mean().backward()
        assert torch.isfinite(value).all()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters()), (scale, seed)


@pytest.mark.parametrize("seed", [4, 5, 7])
def test_grad_align_stays_finite_on_confident_float32_networks(seed):
    """A confident float32 network has loss gradients of ≈ 1e-22, whose squares underflow: the
    value stays the float64 one and the parameter gradient stays finite. These seeds gave NaN
    parameter gradients (and values down to −0.22) before the rows were scaled."""
    torch.manual_seed(seed)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(60.0)
    x = torch.rand(256, 4)
    y = model(x).argmax(1)
    value = R.grad_align(model, x, y, 0.1, generator=torch.Generator().manual_seed(1))
    value.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert (value > -1e-6).all() and (value < 2 + 1e-6).all()  # 1 − cos, rounded
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model64 = nn.Linear(4, 3).double()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    x64 = x.double()
    g0 = input_grad(model64, x64, y).flatten(1)
    g1 = input_grad(model64, x64 + 0.1 * (2 * u - 1), y).flatten(1)
    expected = 1 - F.cosine_similarity(g0, g1, dim=1, eps=0.0)
    # where 1 − p_y is below float32's resolution the float32 loss gradient itself is rounded
    # (p − e_y loses its digits), whatever the cosine does; compare the rows whose gradients
    # float32 holds to ≈ 1e-3 relative (|g| > 1e-4 against rounding 6e-8 of terms of size 1)
    kept = (g0.abs().amax(1) > 1e-4) & (g1.abs().amax(1) > 1e-4)
    assert kept.any() and not kept.all()
    assert torch.allclose(value.double()[kept], expected[kept], rtol=0, atol=1e-5)


@settings(deadline=None, max_examples=12)
@given(networks(max_batch=4))
def test_grad_align_difference_is_the_softmax_term_inside_the_region(case: Case):
    """Inside the region of x: ∇ℓ(x + η) − ∇ℓ(x) = Jᵀ(p(x + η) − p(x)) (T10's softmax term)."""
    model, x, y = case.model, case.x, case.y
    dist = geometry.boundary_distance(model, x)
    assume(bool(torch.isfinite(dist).all() and (dist > 1e-8).all()))
    d = x[0].numel()
    eta = (0.5 * dist / math.sqrt(d)).view(-1, *[1] * (x.dim() - 1)) * (
        2 * torch.rand(x.shape, generator=torch.Generator().manual_seed(0), dtype=x.dtype) - 1
    )  # ‖η‖₂ ≤ √d‖η‖∞ ≤ dist/2
    assert geometry.same_region(model, x, x + eta).all()
    J = geometry.logit_jacobian(model, x).flatten(2)
    with torch.no_grad():
        dp = model(x + eta).softmax(1) - model(x).softmax(1)
    lhs = (input_grad(model, x + eta, y) - input_grad(model, x, y)).flatten(1)
    rhs = torch.einsum("bkd,bk->bd", J, dp)
    scale = J.flatten(1).norm(dim=1)  # the gradients that cancel are Jᵀ(p − e_y), |p − e_y| ≤ 2
    assert ((lhs - rhs).norm(dim=1) <= 1e-10 * scale).all()


def remainder_integral(f: torch.Tensor, u: torch.Tensor, nodes: int = 60) -> torch.Tensor:
    """∫₀¹ (1 − t) uᵀ S(f + t u) u dt by Gauss–Legendre quadrature (S = diag(p) − ppᵀ)."""
    t, w = np.polynomial.legendre.leggauss(nodes)
    t, w = (t + 1) / 2, w / 2
    total = torch.zeros(f.shape[0], dtype=f.dtype)
    for ti, wi in zip(t, w, strict=True):
        p = (f + ti * u).softmax(1)
        quad = (p * u * u).sum(1) - (p * u).sum(1) ** 2  # uᵀ S u
        total += wi * (1 - ti) * quad
    return total


@settings(deadline=None, max_examples=12)
@given(networks(max_batch=4))
def test_llr_remainder_is_the_hessian_integral_inside_the_region(case: Case):
    """g(δ) = ℓ(x+δ) − ℓ(x) − δᵀ∇ℓ(x) = ∫₀¹ (1 − t) δᵀ Jᵀ S(x + tδ) J δ dt ≥ 0 (T7), δ ∈ region."""
    model, x, y = case.model, case.x, case.y
    dist = geometry.boundary_distance(model, x)
    assume(bool(torch.isfinite(dist).all() and (dist > 1e-8).all()))
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=x.dtype)
    direction /= direction.flatten(1).norm(dim=1).view(-1, *[1] * (x.dim() - 1))
    delta = 0.9 * dist.view(-1, *[1] * (x.dim() - 1)) * direction
    g = input_grad(model, x, y)
    with torch.no_grad():
        l0, l1 = (
            F.cross_entropy(model(x), y, reduction="none"),
            F.cross_entropy(model(x + delta), y, reduction="none"),
        )
        f = model(x)
    lin = (delta * g).flatten(1).sum(1)
    direct = l1 - l0 - lin
    u = torch.einsum("bkd,bd->bk", geometry.logit_jacobian(model, x).flatten(2), delta.flatten(1))
    integral = remainder_integral(f, u)
    scale = (
        "|ℓ(x)| + |ℓ(x+δ)| + |⟨∇ℓ, δ⟩|",
        l0.abs() + l1.abs() + lin.abs(),
    )  # the terms that cancel
    checks.check_identity("remainder = integral", direct, integral, 1e-10, scale=scale)
    assert (integral >= 0).all()
    checks.check_inequality(
        "remainder ≤ ‖u‖²/4", integral, u.pow(2).sum(1) / 4, 1e-15, scale=("1", 1.0)
    )


def test_local_linearity_without_steps_is_the_formula_at_the_random_start():
    model = models.random_network("mlp", (6,), 4, depth=2, width=8, seed=3)
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0])
    eps, mu = 0.2, 0.7
    value = R.local_linearity(
        model, x, y, eps, mu=mu, steps=0, generator=torch.Generator().manual_seed(4)
    )
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    delta = (x + (eps * (2 * u - 1)).clamp(-eps, eps)).clamp(0, 1) - x
    g = input_grad(model, x, y)
    with torch.no_grad():
        l0 = F.cross_entropy(model(x), y, reduction="none")
        l1 = F.cross_entropy(model(x + delta), y, reduction="none")
    lin = (delta * g).sum(1)
    # the losses are of size 1 (log K): an absolute 1e-13, without allclose's extra relative 1e-5
    expected = (l1 - l0 - lin).abs() + mu * lin.abs()
    checks.check_identity("local linearity", value, expected, 1e-13, scale=("1", 1.0))
    # ascent steps only raise g (the best iterate is kept)
    more = R.local_linearity(
        model, x, y, eps, mu=0.0, steps=10, generator=torch.Generator().manual_seed(4)
    )
    start = (l1 - l0 - lin).abs()
    checks.check_inequality("ascent raises g", start, more, 1e-13, scale=("1", 1.0))


@settings(deadline=None, max_examples=12)
@given(networks(kinds=("mlp", "resmlp"), max_pool=False, max_batch=4))
def test_mmr_distances_are_the_two_terms_of_t12(case: Case):
    """n_B = n_D = 1: the region term recovers boundary_distance, the decision term margin_radius.
    (MLPs: on CNNs one backward pass per unit makes the test slow; the chapter checks CNNs.)"""
    model, x = case.model, case.x
    pred = model(x).argmax(1)
    region, margin = geometry.boundary_distance(model, x), geometry.margin_radius(model, x)
    assume(bool(torch.isfinite(region).all() and torch.isfinite(margin).all()))
    assume(bool((region > 1e-6).all() and (margin > 1e-6).all()))
    tiny = 1e-300  # makes the other term's hinge 0 (its distances are > 0)
    gb, gd = 2 * float(region.max()), 2 * float(margin.max())
    rb = R.mmr(model, x, pred, gamma_b=gb, gamma_d=tiny).detach()
    rd = R.mmr(model, x, pred, gamma_b=tiny, gamma_d=gd).detach()
    checks.check_identity("MMR region term", gb * (1 - rb), region, 1e-9)
    checks.check_identity("MMR decision term", gd * (1 - rd), margin, 1e-9)
    # R_MMR = 0 exactly when both radii reach γ: then the certified radius is ≥ min(γ_B, γ_D)
    cert = geometry.certified_radius(model, x)
    gb0, gd0 = (float(r.min()) * (1 - 1e-9) for r in (region, margin))  # below, by rounding
    zero = R.mmr(model, x, pred, gamma_b=gb0, gamma_d=gd0)
    assert (zero == 0).all() and (cert >= min(gb0, gd0)).all()


@pytest.mark.parametrize("norm", ["l2", "linf", "l1"])
@pytest.mark.parametrize(
    "kind, shape, activation",
    [("mlp", (6,), "leaky_relu"), ("cnn", (1, 5, 5), "relu"), ("resmlp", (5,), "prelu")],
)
def test_mmr_distances_are_geometrys_in_every_norm(norm, kind, shape, activation):
    """MMR traces the network with geometry's tracer (:func:`robustreg.geometry.preactivations`)
    and divides by the one dual norm: with n_B = n_D = 1 its terms recover boundary_distance and
    margin_radius in ℓ2, ℓ∞ and ℓ1, on MLPs, CNNs and residual networks (no max-pool: its
    switching hyperplanes bound the region too, and MMR counts rectifier units only)."""
    model = models.random_network(kind, shape, 4, depth=2, width=4, activation=activation, seed=3)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pred = model(x).argmax(1)
    region = geometry.boundary_distance(model, x, norm=norm)
    margin = geometry.margin_radius(model, x, norm=norm)
    assert bool(torch.isfinite(region).all() and torch.isfinite(margin).all())
    tiny = 1e-300
    gb, gd = 2 * float(region.max()), 2 * float(margin.max())
    rb = R.mmr(model, x, pred, norm=norm, gamma_b=gb, gamma_d=tiny, n_b=1, n_d=1).detach()
    rd = R.mmr(model, x, pred, norm=norm, gamma_b=tiny, gamma_d=gd, n_b=1, n_d=1).detach()
    checks.check_identity(f"MMR region term ({norm})", gb * (1 - rb), region, 1e-9)
    checks.check_identity(f"MMR decision term ({norm})", gd * (1 - rd), margin, 1e-9)
    logits, z = geometry.preactivations(model, x)
    assert torch.equal(logits, model(x)) and z.shape[0] == len(x) and z.shape[1] > 0


@pytest.mark.parametrize("name", R.later_names())
def test_common_contract(name):
    """Differentiable, mode and .grad untouched, detached under no_grad, NaN on NaN logits."""
    model = models.random_network("mlp", (4,), 3, depth=2, width=5, seed=0).train()
    x = torch.rand(3, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    fn = R.get(name)
    kwargs = {} if name == "mmr" else {"generator": torch.Generator().manual_seed(0)}
    if name == "mmr":
        model.eval()  # the piecewise-linear check wants eval mode for dropout/batch norm only
    mode = model.training
    values = fn(model, x, y, **kwargs)
    assert values.shape == (3,) and values.requires_grad
    assert all(p.grad is None for p in model.parameters()) and model.training == mode
    grads = torch.autograd.grad(values.sum(), list(model.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():
        assert not fn(model, x, y, **kwargs).requires_grad
    values, logits = fn(model, x, y, return_logits=True, **kwargs)
    assert torch.equal(logits.detach(), model(x).detach())
    x_nan = x.clone()
    x_nan[1, 0] = math.nan
    assert torch.isnan(fn(model, x_nan, y, **kwargs)[1])
    assert name in R.later_names() and name not in R.names()


def test_bad_input():
    model = models.random_network("mlp", (4,), 3, depth=1, width=5)
    x, y = torch.rand(2, 4, dtype=torch.float64), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="eps must be a positive finite number, got -0.1"):
        R.grad_align(model, x, y, -0.1)
    with pytest.raises(ValueError, match="clean_gradient 'both'.*'differentiated', 'detached'"):
        R.grad_align(model, x, y, clean_gradient="both")
    with pytest.raises(ValueError, match="mu must be a finite number ≥ 0, got -1"):
        R.local_linearity(model, x, y, mu=-1)
    with pytest.raises(ValueError, match="steps must be an integer ≥ 0, got 2.5"):
        R.local_linearity(model, x, y, steps=2.5)
    with pytest.raises(ValueError, match="unknown norm 'l3'; valid: l2, linf, l1"):
        R.mmr(model, x, y, norm="l3")
    with pytest.raises(ValueError, match="n_b must be a positive integer, got 0"):
        R.mmr(model, x, y, n_b=0)
    smooth = models.smooth_copy(model)
    with pytest.raises(ValueError, match="mmr needs a piecewise-linear model"):
        R.mmr(smooth, x, y)
    with pytest.raises(ValueError, match="unknown regularizer 'llr'"):
        R.get("llr")
    assert isinstance(R.get("mmr"), type(R.mmr)) and isinstance(model, nn.Module)


def test_mmr_against_a_transcription_of_the_public_code():
    """max-andr/provable-robustness-max-linear-regions, regularizers.mmr_fc: V_1 = W_1,
    V_{l+1} = W_{l+1} D_l V_l (closed form through the ReLU masks), d_B = |z|/‖V‖_q, signed
    d_D = (f_y − f_k)/‖∇f_k − ∇f_y‖_q, hinges over the n closest, the decision sum over the
    n_db = K closest *including* y (hinge 0) divided by K. Without its 1e-5 stabilizers (they
    matter only for entries below 1e-5) it equals ours with n_d = K − 1, rescaled by (K − 1)/K."""
    torch.manual_seed(0)
    model = models.mlp(6, 4, hidden=(8, 8)).double().eval()
    x = torch.rand(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    n_rb, gamma_b, gamma_d, k, lam = 3, 0.3, 0.5, 4, 0.7
    w1, w2, w3 = model[1].weight, model[3].weight, model[5].weight
    z1 = x @ w1.T + model[1].bias
    d1 = (z1 > 0).double()
    z2 = (d1 * z1) @ w2.T + model[3].bias
    d2 = (z2 > 0).double()
    f = (d2 * z2) @ w3.T + model[5].bias
    v1 = w1.expand(len(x), -1, -1)  # [B, 8, 6]: rows ∇z1_j
    v2 = torch.einsum("uh,bh,bhd->bud", w2, d1, v1)
    v3 = torch.einsum("kh,bh,bhd->bkd", w3, d2, v2)
    q = 2
    d_b = torch.cat([z1.abs() / v1.norm(p=q, dim=2), z2.abs() / v2.norm(p=q, dim=2)], 1)
    rows = torch.arange(len(y))
    diff = (v3 - v3[rows, y][:, None]).norm(p=q, dim=2)
    margin = f[rows, y][:, None] - f
    d_d = torch.where(F.one_hot(y, k).bool(), 2 * gamma_d + 100.0, margin / diff)
    rb = F.relu(1 - d_b.topk(n_rb, largest=False).values / gamma_b).sum(1)
    db = F.relu(1 - d_d.topk(k, largest=False).values / gamma_d).sum(1)
    original = (lam * rb / n_rb + lam * db / k).mean()
    # the region term does not depend on y: at the predicted class every decision distance is
    # ≥ 0, so a vanishing γ_D turns that hinge off; a vanishing γ_B always turns the other off
    pred = f.argmax(1)
    ours_b = R.mmr(model, x, pred, gamma_b=gamma_b, gamma_d=1e-300, n_b=n_rb, n_d=k - 1)
    ours_d = R.mmr(model, x, y, gamma_b=1e-300, gamma_d=gamma_d, n_b=n_rb, n_d=k - 1)
    ours = (lam * ours_b + lam * ours_d * (k - 1) / k).mean()
    checks.check_identity("MMR, original code", ours, original, 1e-12)
    assert (db > 0).any() and (rb > 0).any()  # both terms are exercised
    assert (margin.min(1).values < 0).any()  # a misclassified sample: the signed distance

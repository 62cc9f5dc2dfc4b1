"""robustreg.reference: the independent references, against closed forms (linear models) and the library."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustreg import checks, geometry, reference, regularizers
from robustreg.cases import random_case

torch.set_num_threads(1)
D64 = torch.float64


def linear_case(B=4, d=5, K=4, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, K).to(D64)
    with torch.no_grad():
        model.weight.copy_(scale * torch.randn(K, d, generator=g, dtype=D64))
        model.bias.copy_(torch.randn(K, generator=g, dtype=D64))
    x = torch.randn(B, d, generator=g, dtype=D64)
    y = torch.randint(K, (B,), generator=g)
    with torch.no_grad():
        p = model(x).softmax(1)
    return model, x, y, p, model.weight.detach()


def close(a, b, tol=1e-12):
    """The whole tensor as one case of :func:`robustreg.checks.check_identity` (the book's rule,
    scale ‖b‖): ‖a − b‖ ≤ tol·‖b‖ over all entries, the relative error these tests always used."""
    assert a.shape == b.shape, (a.shape, b.shape)
    checks.check_identity("reference", a.reshape(1, -1), b.reshape(1, -1), tol)


def test_linear_model_closed_forms():
    model, x, y, p, W = linear_case()
    K = W.shape[0]
    E = torch.eye(K, dtype=D64)
    S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    close(reference.logit_jacobian(model, x), W.expand(len(x), -1, -1))
    close(reference.loss_gradient(model, x, y), (p - E[y]) @ W)  # Jᵀ(p − e_y)
    close(reference.label_gradients(model, x), (p[:, None, :] - E) @ W)  # row k: Jᵀ(p − e_k)
    close(reference.loss_hessian(model, x, y), W.T @ S @ W)  # T7: JᵀSJ
    close(reference.softmax_jacobian(p), S)
    close(reference.one_minus_p(p), 1 - p)
    close(reference.one_minus_p(p, y), 1 - p.gather(1, y[:, None])[:, 0])


def test_stable_cross_entropy_matches_and_keeps_precision():
    f = torch.randn(6, 5, dtype=D64)
    y = torch.randint(5, (6,))
    close(reference.stable_cross_entropy(f, y), F.cross_entropy(f, y, reduction="none"))
    close(reference.stable_cross_entropy(f), -f.log_softmax(1))
    # a confident prediction: ℓ(f, c) = log(1 + 2e^{−40}) ≈ 2e^{−40}, 0 in naive float64
    f = torch.tensor([[40.0, 0.0, 0.0]], dtype=D64, requires_grad=True)
    ell = reference.stable_cross_entropy(f, torch.tensor([0]))
    exact = math.log1p(2 * math.exp(-40))
    assert abs(ell.item() - exact) <= 1e-15 * exact
    (g,) = torch.autograd.grad(ell.sum(), f)  # p − e_c: entries e^{−40}/(1 + 2e^{−40})
    q = math.exp(-40) / (1 + 2 * math.exp(-40))
    close(g, torch.tensor([[-2 * q, q, q]], dtype=D64), tol=1e-14)
    p = torch.softmax(f.detach(), 1)
    assert abs(reference.one_minus_p(p, torch.tensor([0])).item() - 2 * q) <= 1e-15 * q
    # what chapter 09 says of autograd through F.cross_entropy: p_c rounds to 1 and p_c − 1 to
    # 0, so the gradient loses its c-entry, as large as the others (the stable form keeps it)
    assert p[0, 0].item() == 1.0
    (naive,) = torch.autograd.grad(F.cross_entropy(f, torch.tensor([0])), f)
    assert naive[0, 0].item() == 0.0
    close(naive[0, 1:], g[0, 1:], tol=1e-14)


def test_loss_hessian_is_accurate_on_confident_samples():
    model, x, y, p, W = linear_case(scale=30.0, seed=1)
    S = reference.softmax_jacobian(p)  # stable diagonal
    assert (1 - p.max(1).values).min() < 1e-8  # confident: naive differentiation loses digits
    close(reference.loss_hessian(model, x, y), W.T @ S @ W, tol=1e-10)


def test_loss_increase():
    model, x, y, p, W = linear_case()
    delta = 1e-3 * torch.randn_like(x)
    with torch.no_grad():
        naive = F.cross_entropy(model(x + delta), y, reduction="none") - F.cross_entropy(
            model(x), y, reduction="none"
        )
    close(reference.loss_increase(model, x, y, delta), naive, tol=1e-9)
    tiny = 1e-7 * torch.randn_like(x)  # first order: ⟨∇ℓ, δ⟩, relative error O(‖δ‖)
    first = (reference.loss_gradient(model, x, y) * tiny).sum(1)
    close(reference.loss_increase(model, x, y, tiny), first, tol=1e-5)


def test_linear_maximizer_attains_the_dual_norm():
    g = torch.randn(3, 1, 4, 4, dtype=D64)
    eps = torch.tensor([0.1, 0.2, 0.3], dtype=D64)
    for norm, p, q in (("l2", 2, 2), ("linf", float("inf"), 1)):
        d = reference.linear_maximizer(g, eps, norm)
        assert d.shape == g.shape
        close(d.flatten(1).norm(p=p, dim=1), eps)
        close((d * g).flatten(1).sum(1), eps * g.flatten(1).norm(p=q, dim=1))
    with pytest.raises(ValueError, match="unknown norm 'l3'; valid: l2, linf"):
        reference.linear_maximizer(g, eps, "l3")


def test_quadratic_form_moments_closed_forms():
    M = torch.randn(3, 4, 4, dtype=D64)
    A = M @ M.mT
    m = reference.quadratic_form_moments(A)
    trace = A.diagonal(dim1=1, dim2=2).sum(1)
    close(m["gauss"][0], trace)
    close(m["gauss"][1], 2 * A.pow(2).sum((1, 2)))  # Var vᵀAv = 2 tr(A²)
    close(m["signs"][0], trace)
    off = A.pow(2).sum((1, 2)) - A.diagonal(dim1=1, dim2=2).pow(2).sum(1)
    close(m["signs"][1], 2 * off)  # 2 Σ_{k≠l} A_kl²


def test_against_the_library_on_random_networks():
    for index in (0, 1):  # an MLP and a CNN
        case = random_case(index, seed=3, batch=2)
        J = geometry.logit_jacobian(case.model, case.x).flatten(2)
        with torch.no_grad():
            p = case.model(case.x).softmax(1)
        close(reference.logit_jacobian(case.model, case.x), J, tol=1e-10)
        S = reference.softmax_jacobian(p)
        close(reference.loss_hessian(case.model, case.x, case.y), J.mT @ S @ J, tol=1e-10)
        close(
            reference.loss_gradient(case.model, case.x, case.y).pow(2).sum(1),
            regularizers.input_gradient(case.model, case.x, case.y),
            tol=1e-10,
        )
        params = [q for _, q in case.model.named_parameters()]
        lib = torch.autograd.grad(
            regularizers.input_gradient(case.model, case.x, case.y).sum(), params
        )
        close(
            reference.input_gradient_parameter_gradient(case.model, case.x, case.y),
            torch.cat([t.flatten() for t in lib]),
            tol=1e-10,
        )


def test_boundary_distance_of_a_known_network():
    """One ReLU layer: ρ_B = min_u |w_uᵀx + b_u|/‖w_u‖; a max-pool of two units adds
    |z_1 − z_2|/‖w_1 − w_2‖ (the distance to the tie); no rectifier: +∞."""
    w = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -2.0]], dtype=D64)
    bias = torch.tensor([0.2, -1.0, 1.5], dtype=D64)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).to(D64)
    with torch.no_grad():
        net[0].weight.copy_(w)
        net[0].bias.copy_(bias)
    x = torch.tensor([[0.5, 0.5], [3.0, -1.0]], dtype=D64)
    z = x @ w.T + bias
    close(reference.boundary_distance(net, x), (z.abs() / w.norm(dim=1)).amin(1))
    pooled = nn.Sequential(
        nn.Linear(2, 2), nn.Unflatten(1, (1, 2)), nn.MaxPool1d(2), nn.Flatten(), nn.Linear(1, 2)
    ).to(D64)
    with torch.no_grad():
        pooled[0].weight.copy_(w[:2])
        pooled[0].bias.copy_(bias[:2])
    close(reference.boundary_distance(pooled, x), (z[:, 0] - z[:, 1]).abs() / (w[0] - w[1]).norm())
    affine = nn.Sequential(nn.Linear(2, 2)).to(D64)
    assert torch.isinf(reference.boundary_distance(affine, x)).all()
    with pytest.raises(ValueError, match="windows of 2"):
        reference.boundary_distance(
            nn.Sequential(nn.Linear(2, 4), nn.Unflatten(1, (1, 4)), nn.MaxPool1d(3)).to(D64), x
        )


def test_cure_direction_and_regularizer_values():
    g = torch.tensor([[3.0, -0.5, 0.0], [0.0, 0.0, 0.0]], dtype=D64)
    z = reference.cure_direction(g)
    close(
        z,
        torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.0, 0.0]], dtype=D64)
        / torch.tensor([[2**0.5], [1.0]], dtype=D64),
    )
    model, x, y, p, W = linear_case()
    values = reference.regularizer_values(model, x, y, h=0.1)
    K = W.shape[0]
    E = torch.eye(K, dtype=D64)
    grad = (p - E[y]) @ W
    close(values["input_gradient"], grad.pow(2).sum(1))
    close(values["jacobian_frobenius"], W.pow(2).sum().expand(len(x)))
    S = reference.softmax_jacobian(p)
    close(values["hessian_trace"], (W.T @ S @ W).diagonal(dim1=1, dim2=2).sum(1))
    pairs = (W[:, None] - W[None]).pow(2).sum() / K**2
    close(values["cross_lipschitz"], pairs.expand(len(x)))
    dp = reference.probability_jacobian(model, x)
    close(dp, S @ W)  # T6: ∂p/∂x = S J

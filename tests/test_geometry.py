"""Property tests for robustreg.geometry: exact Jacobians, linear regions (T1), certified radii (T12)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import Case, networks
from torch import nn

from robustreg import checks, reference
from robustreg.geometry import (
    activation_pattern,
    affine_map,
    boundary_distance,
    certified_radius,
    logit_jacobian,
    margin_radius,
    nearest_boundary,
    same_region,
)
from robustreg.models import Residual, random_network

torch.set_num_threads(1)
TOL = 1e-10


def batch_scale(b: torch.Tensor) -> tuple[str, torch.Tensor]:
    """The scale of these checks (:func:`robustreg.checks.check_identity`): the largest |entry|
    of the reference over the batch. ‖a_i − b_i‖₂ ≤ tol·max|b| on every case implies the
    entrywise max|a − b| ≤ tol·max|b|, the rule these tests had before: at least as strict."""
    return ("max |reference|", b.abs().max())


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector v [B] shaped to broadcast against x [B, ...]."""
    return v.view(-1, *[1] * (x.dim() - 1))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / bcast(v.flatten(1).norm(dim=1), v)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).argmax(1)


# --- logit_jacobian ----------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_logit_jacobian_matches_autograd_functional(case: Case):
    jac = logit_jacobian(case.model, case.x)
    assert jac.shape == (case.x.shape[0], case.K, *case.x.shape[1:])
    assert jac.dtype == torch.float64
    ref = reference.logit_jacobian(case.model, case.x).view_as(jac)
    checks.check_identity("J", jac, ref, TOL, scale=batch_scale(ref))


def test_logit_jacobian_float32_and_any_differentiable_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Softplus(), nn.Linear(7, 3))  # not piecewise linear
    x = torch.randn(4, 5)
    jac = logit_jacobian(model, x)
    assert jac.dtype == torch.float32 and jac.shape == (4, 3, 5)
    ref = reference.logit_jacobian(model, x).view_as(jac)
    checks.check_identity("J, float32", jac, ref, 1e-5, scale=batch_scale(ref))


def test_logit_jacobian_create_graph_in_x_gives_the_hessian():
    """For a smooth net, J differentiable in x: ∂J_k/∂x is ∇²f_k (checked against hessian)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Softplus(), nn.Linear(6, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    jac = logit_jacobian(model, x, create_graph=True)
    (h0,) = torch.autograd.grad(jac[0, 1].sum(), x)  # row sums of ∇²f_1
    ref = torch.autograd.functional.hessian(lambda v: model(v[None])[0, 1], x[0].detach())
    checks.check_identity("∂J/∂x", h0[0], ref.sum(0), TOL, scale=batch_scale(ref.sum(0)))


def test_logit_jacobian_create_graph_gradcheck_in_parameters():
    net = random_network("mlp", (3,), 3, depth=2, width=4, activation="prelu", seed=3)
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    names = ["1.weight", "3.weight", "2.weight"]  # two linear layers and a PReLU slope
    params = dict(net.named_parameters())

    def scalar(w1, w2, a):
        model = lambda v: torch.func.functional_call(
            net, {**params, names[0]: w1, names[1]: w2, names[2]: a}, (v,)
        )
        jac = logit_jacobian(model, x, create_graph=True)
        return (weights * jac).sum() + (jac**2).sum()

    inputs = tuple(params[n].detach().clone().requires_grad_(True) for n in names)
    assert torch.autograd.gradcheck(scalar, inputs)
    assert all(p.grad is None for p in net.parameters())


def test_logit_jacobian_fallback_without_batching_rule(monkeypatch):
    """If the batched backward is unavailable, K backward passes give the same Jacobian."""
    net = random_network("cnn", (1, 8, 8), 4, depth=2, width=2, max_pool=True, seed=0)
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    expected = logit_jacobian(net, x)
    grad = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    assert torch.equal(logit_jacobian(net, x), expected)
    assert logit_jacobian(net, x, create_graph=True).requires_grad


def test_logit_jacobian_without_graph_is_detached():
    net = random_network("mlp", (3,), 3, seed=0)
    jac = logit_jacobian(net, torch.randn(2, 3, dtype=torch.float64))
    assert not jac.requires_grad
    jac = logit_jacobian(net, torch.randn(2, 3, dtype=torch.float64), create_graph=True)
    assert jac.requires_grad


@pytest.mark.parametrize(
    "fn",
    [logit_jacobian, activation_pattern, affine_map, boundary_distance, certified_radius],
)
def test_input_without_batch_dimension_is_rejected(fn):
    net = random_network("mlp", (5,), 3, seed=0)
    with pytest.raises(ValueError, match=r"batch dimension.*\(5,\)"):
        fn(net, torch.randn(5, dtype=torch.float64))


def test_model_output_must_be_logits():
    with pytest.raises(ValueError, match=r"logits of shape \[B, K\].*returned \(2, 3, 1\)"):
        logit_jacobian(nn.Unflatten(1, (3, 1)), torch.randn(2, 3))


@pytest.mark.parametrize(
    "fn", [activation_pattern, affine_map, boundary_distance, certified_radius]
)
def test_region_functions_reject_non_piecewise_linear_models(fn):
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"GELU.*'1'"):
        fn(model, torch.randn(3, 4))


@pytest.mark.parametrize(
    "fn",
    [
        logit_jacobian,
        activation_pattern,
        affine_map,
        boundary_distance,
        nearest_boundary,
        margin_radius,
        certified_radius,
    ],
)
@pytest.mark.parametrize("training", [False, True])
def test_mode_and_grad_untouched(fn, training):
    net = random_network("cnn", (1, 8, 8), 4, depth=2, width=2, max_pool=True, seed=0)
    net.train(training)
    sentinel = {n: torch.full_like(p, 7.0) for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = sentinel[n].clone()
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    fn(net, torch.randn(2, 1, 8, 8, dtype=torch.float64))
    assert all(m.training == training for m in net.modules())
    for n, p in net.named_parameters():
        assert torch.equal(p.grad, sentinel[n]) and torch.equal(p.detach(), before[n])


# --- T1: local affinity ------------------------------------------------------------------------


def in_region_step(model, x, gen):
    """x′ = x + t·u, u random unit, t = 2^-n the largest such step (n ≥ 0) in x's region."""
    u = unit(torch.randn(x.shape, generator=gen, dtype=x.dtype))
    t = torch.ones(x.shape[0], dtype=x.dtype)
    for _ in range(60):
        ok = same_region(model, x, x + bcast(t, x) * u)
        if ok.all():
            break
        t = torch.where(ok, t, t / 2)
    return x + bcast(t, x) * u, ok


@settings(deadline=None)
@given(networks(), st.integers(0, 2**31 - 1))
def test_T1_affine_on_the_region(case: Case, seed: int):
    model, x = case.model, case.x
    jac, b = affine_map(model, x)
    d = x[0].numel()
    assert jac.shape == (x.shape[0], case.K, d) and b.shape == (x.shape[0], case.K)
    x2, ok = in_region_step(model, x, torch.Generator().manual_seed(seed))
    assert ok.all()
    with torch.no_grad():
        f2 = model(x2)
    pred = torch.einsum("bkd,bd->bk", jac, x2.flatten(1)) + b
    checks.check_identity("T1: f = Jx + b", pred, f2, TOL, scale=batch_scale(f2))
    # J is constant on the region: the map found at x2 is the map found at x
    jac2, b2 = affine_map(model, x2)
    checks.check_identity("T1: J′ = J", jac2, jac, TOL, scale=batch_scale(jac))
    checks.check_identity("T1: b′ = b", b2, b, TOL, scale=batch_scale(b))


@settings(deadline=None)
@given(networks(max_batch=2), st.data())
def test_T1_hessian_of_every_logit_vanishes(case: Case, data):
    k = data.draw(st.integers(0, case.K - 1))
    x0 = case.x[0]
    hess = torch.autograd.functional.hessian(lambda v: case.model(v[None])[0, k], x0)
    assert hess.abs().max().item() == 0.0
    # and the test can fail: a smooth net has curvature
    smooth = nn.Sequential(nn.Flatten(), nn.Linear(x0.numel(), 4), nn.Softplus(), nn.Linear(4, 2))
    smooth = smooth.double()
    assert torch.autograd.functional.hessian(lambda v: smooth(v[None])[0, 1], x0).abs().max() > 0


def test_affine_map_detects_a_different_region():
    """Far-away points generally lie in other regions, where the map of x is wrong."""
    net = random_network("mlp", (4,), 3, depth=3, width=8, seed=1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x2 = x + 3 * torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    jac, b = affine_map(net, x)
    out = ~same_region(net, x, x2)
    assert out.any()
    with torch.no_grad():
        err = (net(x2) - torch.einsum("bkd,bd->bk", jac, x2) - b).abs().amax(1)
    assert (err[out] > 1e-6).any()


# --- activation patterns -----------------------------------------------------------------------


def count_units(model: nn.Module, x: torch.Tensor) -> int:
    """Rectifier units plus max-pool outputs, counted by running the layers one by one (the
    blocks of residual layers too)."""
    n, h = 0, x[:1]
    for layer in model:
        if isinstance(layer, Residual):
            n += count_units(layer.block, h)
        if isinstance(layer, nn.ReLU | nn.LeakyReLU | nn.PReLU):
            n += h[0].numel()
        h = layer(h)
        if isinstance(layer, nn.MaxPool1d | nn.MaxPool2d):
            n += h[0].numel()
    return n


@settings(deadline=None)
@given(networks())
def test_activation_pattern_shape_and_values(case: Case):
    pattern = activation_pattern(case.model, case.x)
    assert pattern.dtype == torch.long
    assert pattern.shape == (case.x.shape[0], count_units(case.model, case.x))
    assert same_region(case.model, case.x, case.x.clone()).all()
    if not case.params["max_pool"]:
        assert set(pattern.unique().tolist()) <= {0, 1}


def test_activation_pattern_of_a_known_mlp():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(2))
        net[0].bias.zero_()
    x = torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.5, 0.25]])
    assert activation_pattern(net, x).tolist() == [[1, 0], [0, 1], [1, 1]]
    assert same_region(net, x, x * 2).tolist() == [True, True, True]
    assert same_region(net, x, -x).tolist() == [False, False, False]


def test_same_region_rejects_mismatched_shapes():
    net = random_network("mlp", (3,), 2, seed=0)
    with pytest.raises(ValueError, match="same shape"):
        same_region(
            net, torch.zeros(2, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)
        )


def test_no_rectifiers_means_one_region():
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).double()
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    assert activation_pattern(net, x).shape == (3, 0)
    assert torch.isinf(boundary_distance(net, x)).all()


# --- boundary distance -------------------------------------------------------------------------


@settings(deadline=None)
@given(networks(max_batch=3))
def test_boundary_distance_matches_brute_force(case: Case):
    dist = boundary_distance(case.model, case.x)
    ref = reference.boundary_distance(case.model, case.x)
    checks.check_identity("ρ_B", dist, ref, TOL, scale=batch_scale(ref))


@settings(deadline=None)
@given(networks(), st.integers(0, 2**31 - 1))
def test_boundary_distance_is_exact(case: Case, seed: int):
    """0.99·dist in any direction stays in the region; along the nearest hyperplane's normal
    0.99·dist stays and 1.01·dist leaves."""
    model, x = case.model, case.x
    dist, u = nearest_boundary(model, x)
    assert torch.equal(dist, boundary_distance(model, x))
    assume(bool((dist > 1e-9).all() and torch.isfinite(dist).all()))
    checks.check_identity("‖u‖ = 1", u.flatten(1).norm(dim=1), torch.ones_like(dist), 1e-12)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        v = unit(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        assert same_region(model, x, x + 0.99 * bcast(dist, x) * v).all()
    assert same_region(model, x, x + 0.99 * bcast(dist, x) * u).all()
    assert not same_region(model, x, x + 1.01 * bcast(dist, x) * u).any()


@pytest.mark.parametrize(
    "pool",
    [
        nn.MaxPool2d(3, stride=2, padding=1),
        nn.MaxPool2d(2, stride=1),
        nn.MaxPool2d(3, stride=2, ceil_mode=True),
        nn.MaxPool2d(2, dilation=2),
        nn.AdaptiveMaxPool2d((3, 2)),
    ],
    ids=repr,
)
@pytest.mark.parametrize("seed", range(3))
def test_boundary_distance_general_max_pools(pool, seed):
    gen = torch.Generator().manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.LeakyReLU(0.1), pool, nn.Flatten())
    net = net.double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    net.append(nn.LazyLinear(3, dtype=torch.float64))
    x = torch.randn(3, 1, 7, 7, generator=gen, dtype=torch.float64)
    net(x)  # materialize the lazy layer
    n_pool = net[:3](x)[0].numel()
    assert activation_pattern(net, x).shape == (3, 2 * 49 + n_pool)
    dist, u = nearest_boundary(net, x)
    assert same_region(net, x, x + 0.99 * bcast(dist, x) * u).all()
    assert not same_region(net, x, x + 1.01 * bcast(dist, x) * u).any()
    for _ in range(5):
        v = unit(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        assert same_region(net, x, x + 0.99 * bcast(dist, x) * v).all()


def test_boundary_distance_chunking_does_not_matter():
    net = random_network("cnn", (2, 6, 6), 5, depth=3, width=3, max_pool=True, activation="prelu")
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    whole = boundary_distance(net, x)
    chunked = boundary_distance(net, x, chunk_elements=1)
    checks.check_identity("ρ_B, chunked", chunked, whole, TOL, scale=batch_scale(whole))


def test_boundary_distance_of_a_known_mlp():
    """One ReLU layer with unit-norm rows: the distance is min_u |w_uᵀx + b_u|."""
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    w = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]], dtype=torch.float64)
    with torch.no_grad():
        net[0].weight.copy_(w * torch.tensor([[2.0], [1.0], [5.0]]))  # scaling changes nothing
        net[0].bias.copy_(torch.tensor([0.2, -1.0, 1.5]) * torch.tensor([2.0, 1.0, 5.0]))
    x = torch.tensor([[0.5, 0.5], [3.0, -1.0]], dtype=torch.float64)
    expected = (x @ w.T + torch.tensor([0.2, -1.0, 1.5], dtype=torch.float64)).abs().amin(1)
    dist = boundary_distance(net, x)
    checks.check_identity("ρ_B, known", dist, expected, TOL, scale=batch_scale(expected))


# --- T12: certified radius ---------------------------------------------------------------------


def test_T12_affine_classifier_closed_form():
    """For f = Wx + b (one region) the bound is min_k (f_c − f_k)/‖w_c − w_k‖, and it is the exact
    minimal ℓ2 perturbation: the foot point on the nearest decision hyperplane flips the class."""
    gen = torch.Generator().manual_seed(0)
    for K in (2, 3, 7):
        net = nn.Sequential(nn.Flatten(), nn.Linear(6, K)).double()
        with torch.no_grad():
            for p in net.parameters():
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
        x = torch.randn(5, 2, 3, generator=gen, dtype=torch.float64)
        w, b = net[1].weight, net[1].bias
        with torch.no_grad():
            f = x.flatten(1) @ w.T + b
        c = f.argmax(1)
        radius = certified_radius(net, x)
        for i in range(len(x)):
            ratios = [
                ((f[i, c[i]] - f[i, k]) / (w[c[i]] - w[k]).norm()).item()
                for k in range(K)
                if k != c[i]
            ]
            assert abs(radius[i].item() - min(ratios)) <= TOL * min(ratios)
            k = [k for k in range(K) if k != c[i]][ratios.index(min(ratios))]
            step = -unit((w[c[i]] - w[k]).detach()[None])[0].view(2, 3)
            assert predict(net, (x[i] + 0.999 * radius[i] * step)[None]).item() == c[i]
            assert predict(net, (x[i] + 1.001 * radius[i] * step)[None]).item() == k


def shrink_margin(case: Case) -> nn.Module:
    """A copy of the model in which, for sample 0, the runner-up class k (in the T12 sense) is
    raised through the last bias until (f_c − f_k)/‖∇f_c − ∇f_k‖ = dist/2: same regions, and the
    margin term binds."""
    model = copy.deepcopy(case.model)
    jac = logit_jacobian(model, case.x[:1]).flatten(2)[0]
    with torch.no_grad():
        f = model(case.x[:1])[0]
    c = f.argmax()
    gap = (jac[c] - jac).norm(dim=1)
    ratio = (f[c] - f) / gap
    ratio[c] = math.inf
    k = ratio.argmin()
    dist = boundary_distance(model, case.x[:1])[0]
    if torch.isfinite(dist) and gap[k] > 0 and ratio[k] > dist / 2:
        with torch.no_grad():
            model[-1].bias[k] += (f[c] - f[k]) - dist / 2 * gap[k]
    return model


@settings(deadline=None)
@given(networks(), st.integers(0, 2**31 - 1), st.booleans())
def test_T12_certified_radius(case: Case, seed: int, shrink: bool):
    model = shrink_margin(case) if shrink else case.model
    x = case.x
    radius = certified_radius(model, x)
    margin, dist = margin_radius(model, x), boundary_distance(model, x)
    assert torch.equal(radius, torch.minimum(margin, dist))
    assume(bool(torch.isfinite(radius).all() and (radius > 1e-9).all()))
    c = predict(model, x)
    # random directions of length 0.99·r keep the prediction
    gen = torch.Generator().manual_seed(seed)
    for _ in range(5):
        v = unit(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        assert torch.equal(predict(model, x + 0.99 * bcast(radius, x) * v), c)
    # the optimal direction of the region's affine map, −(∇f_c − ∇f_k)/‖·‖ for the minimizing k
    jac = logit_jacobian(model, x).flatten(2)
    with torch.no_grad():
        f = model(x)
    rows = torch.arange(len(x))
    gap = jac[rows, c][:, None] - jac
    ratio = (f[rows, c][:, None] - f) / gap.norm(dim=2)
    ratio[rows, c] = math.inf
    k = ratio.argmin(1)
    fin = torch.isfinite(margin)  # inf: every ∇f_k equals ∇f_c (e.g. all units dead)
    assert torch.equal(torch.isfinite(ratio.amin(1)), fin)
    if not fin.any():
        return
    ref = ratio.amin(1)[fin]
    checks.check_identity("T12: ρ_D", ref, margin[fin], TOL, scale=batch_scale(margin[fin]))
    u = -unit(gap[rows, k]).view_as(x)
    xs, us, cs, ks = x[fin], u[fin], c[fin], k[fin]
    assert torch.equal(predict(model, xs + 0.99 * bcast(radius[fin], xs) * us), cs)
    # where the margin term binds well inside the region, it is the exact minimal step there
    binding = 1.01 * margin < dist
    flipped = predict(model, xs + 1.01 * bcast(margin[fin], xs) * us)
    assert torch.equal(flipped[binding[fin]], ks[binding[fin]])
    if shrink:
        assert binding[0] or not fin[0]


@settings(deadline=None)
@given(networks(max_batch=2), st.integers(0, 2**31 - 1))
def test_T1_constant_jacobian_check_fails_on_a_smooth_copy(case: Case, seed: int):
    """The check of T1 (J(x') = J(x) inside the region) can fail: on the same network with smooth
    rectifiers (models.smooth_copy) the Jacobian moves by far more than rounding."""
    from robustreg.models import smooth_copy

    model, x = case.model, case.x
    x2, ok = in_region_step(model, x, torch.Generator().manual_seed(seed))
    assert ok.all()
    jac = logit_jacobian(model, x)
    checks.check_identity("T1: J′ = J", logit_jacobian(model, x2), jac, TOL, scale=batch_scale(jac))
    assume((x2 - x).flatten(1).norm(dim=1).max() >= 1e-3)  # a step the smooth net can feel
    smooth = smooth_copy(model)
    before, after = logit_jacobian(smooth, x), logit_jacobian(smooth, x2)
    # the scale times √(entries per case): ‖·‖₂/√n ≤ max|·|, so this moves no more than the
    # former entrywise measure did, and the check that it is large is at least as strict
    n = before[0].numel()
    scale = (before.abs().max() * math.sqrt(n)).expand(len(x))
    moved = float(checks.scaled_error(after, before, scale).max())
    assert moved > 1e3 * TOL, moved


def test_smooth_copy_keeps_the_weights_and_rejects_a_bad_beta():
    from robustreg.models import is_piecewise_linear, smooth_copy

    net = random_network("mlp", (4,), 3, depth=2, width=6, seed=0).double()
    smooth = smooth_copy(net)
    assert is_piecewise_linear(net) and not is_piecewise_linear(smooth)
    assert all(
        torch.equal(a, b) for a, b in zip(net.parameters(), smooth.parameters(), strict=False)
    )
    with pytest.raises(ValueError, match="beta must be a positive number, got 0"):
        smooth_copy(net, beta=0)


@settings(deadline=None)
@given(networks(kinds=("mlp", "resmlp"), max_batch=3), st.sampled_from(["linf", "l1"]))
def test_boundary_distance_in_other_norms_is_exact(case: Case, norm: str):
    """ℓ∞ / ℓ1 distance to the region's boundary: steps of ℓp length 0.99·dist in random
    directions stay in the region, and along the worst direction for the nearest constraint
    (Hölder's equality case) a step of 1.01·dist leaves it."""
    model, x = case.model, case.x
    dist = boundary_distance(model, x, norm=norm)
    assume(bool((dist > 1e-9).all() and torch.isfinite(dist).all()))
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        v = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        v = v.sign() if norm == "linf" else v / v.abs().sum(1, keepdim=True)
        assert same_region(model, x, x + 0.99 * dist[:, None] * v).all()
    # the ℓ2 distance bounds the others: ‖δ‖₂ ≤ ‖δ‖₁ and ‖δ‖₂ ≤ √d ‖δ‖∞
    d2 = boundary_distance(model, x)
    bound = d2 if norm == "l1" else d2 / math.sqrt(x[0].numel())
    assert (dist >= bound * (1 - 1e-12)).all()
    assert (dist <= (d2 if norm == "linf" else d2 * math.sqrt(x[0].numel())) * (1 + 1e-12)).all()


@settings(deadline=None)
@given(networks(), st.sampled_from([2.0, 1.0, math.inf]), st.integers(1, 6))
def test_layerwise_hyperplanes_equal_forward_mode(case: Case, q: float, per_chunk: int):
    """The one-pass computation of every constraint's gradient norm (issue 26) equals the
    forward-mode one on every architecture kind, in every dual norm and chunk size."""
    from robustreg import geometry

    d = case.x[0].numel()
    fast = geometry._constraints_layerwise(case.model, case.x, per_chunk * d * 64, q)
    assert fast is not None, "the property architectures are all layer-wise"
    ref = geometry._constraints_forward(case.model, case.x, 2**22, q)
    assert torch.equal(fast[1], ref[1])
    checks.check_identity("c", fast[0], ref[0], TOL, scale=batch_scale(ref[0]))
    checks.check_identity("‖∇c‖_q", fast[2], ref[2], TOL, scale=batch_scale(ref[2]))


@settings(deadline=None)
@given(networks(), st.sampled_from(["linf", "l1"]))
def test_pruned_distance_equals_every_constraint_computed(case: Case, norm: str):
    """The ℓ∞ / ℓ1 boundary distance, which computes the exact ℓq norm only for constraints whose
    ℓ2 bound could attain the minimum (issue 26), equals the minimum over every constraint's
    exact distance (forward mode) on every architecture kind."""
    from robustreg import geometry

    q = 1.0 if norm == "linf" else math.inf
    c, valid, gnorm = geometry._constraints_forward(case.model, case.x, 2**22, q)
    full = geometry._distances(c, valid, gnorm).min(1).values if c.shape[1] else None
    fast = boundary_distance(case.model, case.x, norm=norm)
    if full is None:
        assert torch.isinf(fast).all()
        return
    assert torch.equal(torch.isinf(fast), torch.isinf(full))
    finite = torch.isfinite(full)
    checks.check_identity("dist", fast[finite], full[finite], TOL, scale=full[finite].abs())


def test_layerwise_hyperplanes_through_every_known_leaf():
    """Batch norm (eval), average pooling, constant and zero padding, transposed convolution,
    a per-channel PReLU, dropout (eval), Unflatten, adaptive max-pooling: equal to forward mode."""
    from robustreg import geometry

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.ConstantPad2d(1, 0.3),
        nn.Conv2d(1, 3, 3),
        bn,
        nn.PReLU(3),
        nn.Dropout(0.5),
        nn.AvgPool2d(2),
        nn.ZeroPad2d((0, 1, 0, 1)),
        nn.ConvTranspose2d(3, 2, 2, stride=2),
        nn.LeakyReLU(0.2),
        nn.AdaptiveMaxPool2d(3),
        nn.Flatten(),
        nn.Linear(18, 4),
    ).double()
    with torch.no_grad():
        net[4].weight.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.rand(5, 36, dtype=torch.float64)
    for q in (2.0, 1.0, math.inf):
        fast = geometry._constraints_layerwise(net, x, 2**22, q)
        assert fast is not None
        ref = geometry._constraints_forward(net, x, 2**22, q)
        assert torch.equal(fast[1], ref[1])
        checks.check_identity("c", fast[0], ref[0], TOL, scale=batch_scale(ref[0]))
        checks.check_identity("‖∇c‖_q", fast[2], ref[2], TOL, scale=batch_scale(ref[2]))
    net.train()  # batch statistics: not piecewise linear, refused by both paths
    assert geometry._constraints_layerwise(net, x, 2**22, 2.0) is None


def test_layerwise_path_leaves_custom_forwards_to_forward_mode():
    """A subclass that overrides ``forward`` is not what its base class computes."""
    from robustreg import geometry

    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2 * super().forward(x)

    class Shifted(nn.ReLU):
        def forward(self, x):
            return super().forward(x - 0.1)

    torch.manual_seed(0)
    for net in (
        Doubled(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)),
        nn.Sequential(nn.Linear(3, 4), Shifted(), nn.Linear(4, 2)),
    ):
        assert (
            geometry._constraints_layerwise(
                net.double(), torch.rand(2, 3, dtype=torch.float64), 2**22, 2.0
            )
            is None
        )

"""The random estimators: unbiased values, variance ∝ 1/n, gradients, reproducibility.

- ``jacobian_frobenius(n_proj=n)``: (1/n) Σ ‖Jᵀv‖², v ~ N(0, I_K) (fact T4);
- ``cross_lipschitz(n_proj=n)``: (2/K)(1/n) Σ ‖JᵀCv‖² (fact T5);
- ``hessian_trace(n_samples=n)``: (1/n) Σ ‖JᵀBv‖², v ~ N(0, I_K), BBᵀ = S (the default), or
  ``estimator="labels"``: (1/n) Σ ‖∇ₓℓ(x, y′)‖², y′ ~ p (fact T9), with the score-function term.

Every training estimator is unbiased in its gradient too (``test_*_gradients_unbiased``); the one
biased variant, ``estimator="labels-pathwise"``, is shown to be biased.

Many independent draws come from one call on a batch that repeats the same samples N times
(each row gets its own draw). The checks are statistical with fixed seeds (deterministic): a mean
within 5 standard errors of the exact value, an empirical variance within 5 standard errors of
its closed form, and the variance ratio between n = 1 and n = 4 near 4.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from robustreg import reference
from robustreg import regularizers as R
from robustreg.models import random_network

torch.set_num_threads(1)
N = 2000  # draws per sample

#: Every estimator a training run can use: label → (regularizer, count keyword, options).
ESTIMATORS = {
    "jacobian_frobenius": ("jacobian_frobenius", "n_proj", {}),
    "cross_lipschitz": ("cross_lipschitz", "n_proj", {}),
    "hessian_trace": ("hessian_trace", "n_samples", {}),  # the Gaussian default
    "hessian_trace, labels": ("hessian_trace", "n_samples", {"estimator": "labels"}),
}

CASES = {
    "mlp": dict(kind="mlp", in_shape=(6,), num_classes=5, depth=2, width=8, activation="prelu"),
    "cnn": dict(kind="cnn", in_shape=(1, 6, 6), num_classes=4, depth=2, width=3, max_pool=True),
}


def make_case(kind: str, seed: int = 0, batch: int = 3):
    model = random_network(**CASES[kind], seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *CASES[kind]["in_shape"], dtype=torch.float64, generator=gen)
    y = torch.randint(CASES[kind]["num_classes"], (batch,), generator=gen)
    return model, x, y


def repeat(x: torch.Tensor, y: torch.Tensor, n: int):
    return x.repeat(n, *[1] * (x.dim() - 1)), y.repeat(n)


def estimate(label: str, model, x, y, n: int, **extra):
    name, key, options = ESTIMATORS[label]
    return R.get(name)(model, x, y, **{key: n, **options, **extra})


def draws(label: str, model, x, y, n: int, count: int = N, seed: int = 0, **extra):
    """``count`` independent estimates with ``n`` projections/samples each: [count, B]."""
    xr, yr = repeat(x, y, count)
    gen = torch.Generator().manual_seed(seed)
    values = estimate(label, model, xr, yr, n, generator=gen, **extra)
    return values.detach().view(count, len(x))


def closed_form_variance(name: str, model, x, y) -> torch.Tensor:
    """Variance of one draw (n = 1), per sample."""
    J = reference.logit_jacobian(model, x)
    K = J.shape[1]
    if name == "hessian_trace":  # Var ‖JᵀBv‖² = 2‖BᵀJJᵀB‖_F² = 2 tr((G S)²)
        with torch.no_grad():
            p = torch.softmax(model(x), 1)
        S = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        GS = J @ J.transpose(1, 2) @ S
        return 2 * torch.einsum("bij,bji->b", GS, GS)
    if name == "jacobian_frobenius":  # Var ‖Jᵀv‖² = 2‖JJᵀ‖_F² for v ~ N(0, I)
        G = J @ J.transpose(1, 2)
        return 2 * G.pow(2).sum((1, 2))
    if name == "cross_lipschitz":  # (2/K)² · 2‖C J Jᵀ C‖_F²
        C = torch.eye(K, dtype=J.dtype) - 1.0 / K
        G = C @ J @ J.transpose(1, 2) @ C
        return (2 / K) ** 2 * 2 * G.pow(2).sum((1, 2))
    with torch.no_grad():  # Σ_k p_k ‖g_k‖⁴ − R_H², g_k = Jᵀ(p − e_k)
        p = torch.softmax(model(x), 1)
    g = torch.einsum("bkd,bjk->bjd", J, p[:, None, :] - torch.eye(K, dtype=J.dtype)[None])
    sq = g.pow(2).sum(2)
    return (p * sq**2).sum(1) - (p * sq).sum(1) ** 2


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_unbiased(name, kind):
    model, x, y = make_case(kind)
    exact = R.get(ESTIMATORS[name][0])(model, x, y).detach()
    d = draws(name, model, x, y, 1)
    se = d.std(0) / math.sqrt(N)
    assert bool(((d.mean(0) - exact).abs() <= 5 * se).all()), (d.mean(0), exact, se)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_variance_falls_as_one_over_n(name, kind):
    model, x, y = make_case(kind, seed=1)
    theory = closed_form_variance(name, model, x, y)
    d1 = draws(name, model, x, y, 1, seed=1)
    d4 = draws(name, model, x, y, 4, seed=2)
    var1, var4 = d1.var(0), d4.var(0)
    for d, var, n in ((d1, var1, 1), (d4, var4, 4)):
        # SE of a sample variance: sqrt((m4 − σ⁴)/N)
        m4 = (d - d.mean(0)).pow(4).mean(0)
        se = ((m4 - var**2).clamp_min(0) / N).sqrt()
        assert bool(((var - theory / n).abs() <= 5 * se + 1e-12 * theory).all()), (var, theory / n)
    ratio = var1 / var4
    assert bool(((ratio > 2.5) & (ratio < 6.5)).all()), ratio


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_reproducible_with_generator(name):
    model, x, y = make_case("mlp", seed=2)
    a = draws(name, model, x, y, 2, count=5, seed=11)
    b = draws(name, model, x, y, 2, count=5, seed=11)
    c = draws(name, model, x, y, 2, count=5, seed=12)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    torch.manual_seed(3)
    u = estimate(name, model, x, y, 2)
    torch.manual_seed(3)
    v = estimate(name, model, x, y, 2)
    assert torch.equal(u, v)  # generator=None draws from torch's global generator


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_same_draws_in_float32_and_float64(name):
    model, x, y = make_case("mlp", seed=3)
    model32 = copy.deepcopy(model).float()
    a = draws(name, model, x, y, 3, count=4, seed=5)
    b = draws(name, model32, x.float(), y, 3, count=4, seed=5)
    assert b.dtype == torch.float32
    assert float(((a - b.double()).abs() / a.abs().clamp_min(1e-12)).max()) < 1e-4


# --- gradients -------------------------------------------------------------------------------------


def _grad(values: torch.Tensor, model: nn.Module) -> torch.Tensor:
    grads = torch.autograd.grad(values.sum(), list(model.parameters()), allow_unused=True)
    return torch.cat(
        [
            (torch.zeros_like(p) if g is None else g).flatten()
            for g, p in zip(grads, model.parameters(), strict=True)
        ]
    )


def chunked_gradients(label: str, model, x, y, chunks: int = 40, per_chunk: int = 50, **extra):
    """Gradients of the batch-mean estimate (one draw per sample) averaged within each chunk."""
    out = []
    for c in range(chunks):
        xr, yr = repeat(x, y, per_chunk)
        gen = torch.Generator().manual_seed(100 + c)
        values = estimate(label, model, xr, yr, 1, generator=gen, **extra)
        out.append(_grad(values.view(per_chunk, len(x)).mean(0), model))
    return torch.stack(out)


def assert_mean_matches(samples: torch.Tensor, target: torch.Tensor, extra=()) -> None:
    """The mean of the gradient samples matches ``target`` along several directions, each within
    5 standard errors: the target's direction, 4 random ones and any in ``extra``. (The gradient
    coordinates are strongly correlated, driven by a few random labels or projections, so a
    per-coordinate χ² is not a valid test; one-dimensional projections are.)"""
    gen = torch.Generator().manual_seed(0)
    dirs = [target, *extra]
    dirs += [torch.randn(target.shape, dtype=target.dtype, generator=gen) for _ in range(4)]
    for u in dirs:
        u = u / u.norm()
        proj = samples @ u
        se = proj.std() / math.sqrt(len(proj))
        assert abs(float(proj.mean() - target @ u)) <= 5 * float(se), (
            float(proj.mean()),
            float(target @ u),
            float(se),
        )


@pytest.mark.parametrize("label", list(ESTIMATORS))
def test_training_estimators_have_unbiased_gradients(label):
    """E[∇_θ estimate] = ∇_θ exact value for every estimator a training run can use: projections
    and the Gaussian draw (v does not depend on θ) and sampled labels with the score term."""
    model, x, y = make_case("mlp", seed=4)
    exact = _grad(R.get(ESTIMATORS[label][0])(model, x, y), model)
    assert_mean_matches(chunked_gradients(label, model, x, y), exact)


def test_pathwise_labels_are_biased_and_the_score_term_is_what_they_miss():
    """Labels held fixed: E[∇_θ est] = Σ_k p_k ∇_θ‖g_k‖² (p not differentiated as a weight), a
    biased estimate of ∇_θ R_H; the score term restores it; the values do not change."""
    model, x, y = make_case("mlp", seed=5)
    exact = _grad(R.hessian_trace(model, x, y), model)
    # Σ_k p_k ∇‖g_k‖²: the exact value with the weights p_k detached
    fw = R._forward(model, x, y)
    p = torch.softmax(fw.logits, 1)
    K = p.shape[1]
    cot = R._residual(p, torch.arange(K)[:, None].expand(K, len(x)))
    sq = fw.sqnorm(fw.vjps(cot))
    pathwise = _grad((p.detach().T * sq).sum(0), model)
    assert not torch.allclose(pathwise, exact, rtol=1e-3)  # the score term matters here
    between = [exact - pathwise]
    plain = chunked_gradients("hessian_trace", model, x, y, estimator="labels-pathwise")
    assert_mean_matches(plain, pathwise, between)
    u = between[0] / between[0].norm()  # ... and the pathwise gradient is visibly biased
    assert float(exact @ u - (plain @ u).mean()) > 5 * float(
        (plain @ u).std() / math.sqrt(len(plain))
    )
    scored = chunked_gradients("hessian_trace, labels", model, x, y)
    assert_mean_matches(scored, exact, between)
    for n in (1, 3):
        xr, yr = repeat(x, y, 7)
        a, b = (
            R.hessian_trace(
                model, xr, yr, n, estimator=e, generator=torch.Generator().manual_seed(9)
            ).detach()
            for e in ("labels-pathwise", "labels")
        )
        assert torch.equal(a, b)


def test_unknown_hessian_estimator_is_named():
    model, x, y = make_case("mlp")
    with pytest.raises(ValueError, match="unknown estimator 'fisher'; valid: gaussian, labels"):
        R.hessian_trace(model, x, y, 1, estimator="fisher")

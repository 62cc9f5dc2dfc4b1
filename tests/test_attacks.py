"""robustreg.attacks: FGSM, PGD and the minimal ℓ2 perturbation (float64)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustreg import art_attacks, attacks, data, geometry, models, training

DT = torch.float64


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained briefly on digits, and 100 test samples."""
    torch.set_num_threads(1)
    x, y = data.load("digits", "train", dtype=DT)
    xt, yt = data.load("digits", "test", dtype=DT)
    torch.manual_seed(0)
    model = models.mlp(64, 10, hidden=(32, 32)).to(DT)
    training.train(model, (x, y), epochs=4, lr=3e-3, seed=0, progress=False)
    return model, xt[:100], yt[:100]


def loss_per_sample(model, x, y):
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


def accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


# --- FGSM ----------------------------------------------------------------------------------------


def test_fgsm_is_the_maximizer_of_the_linearization(trained):
    model, x, y = trained
    eps = 0.07
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    x_adv = attacks.fgsm(model, x, y, eps)
    lo, hi = torch.maximum(x - eps, torch.zeros_like(x)), torch.minimum(x + eps, torch.ones_like(x))
    # coordinate-wise maximizer of gᵀδ over the box [lo, hi] (the ℓ∞ ball ∩ [0, 1]^d)
    argmax = torch.where(g > 0, hi, torch.where(g < 0, lo, x))
    torch.testing.assert_close(x_adv, argmax, rtol=0, atol=1e-15)
    # and no random feasible point does better on the linear term
    gen = torch.Generator().manual_seed(0)
    best = (g * (x_adv - x)).flatten(1).sum(1)
    for _ in range(20):
        z = lo + (hi - lo) * torch.rand(x.shape, generator=gen, dtype=DT)
        assert ((g * (z - x)).flatten(1).sum(1) <= best + 1e-12).all()
    # first-order value: the linear term equals ε‖g‖₁ where the box does not bind (T3)
    inner = ((x - eps >= 0) & (x + eps <= 1)).flatten(1).all(1)
    if inner.any():
        torch.testing.assert_close(best[inner], eps * g.flatten(1).abs().sum(1)[inner])


def test_fgsm_exact_for_a_linear_binary_model():
    """For f = (0, wᵀx + b), ℓ is monotone in wᵀx, so FGSM is the exact ℓ∞ maximizer of ℓ."""
    torch.manual_seed(1)
    lin = nn.Linear(6, 1).to(DT)
    model = lambda x: torch.cat([torch.zeros_like(lin(x)), lin(x)], 1)  # noqa: E731
    x = torch.rand(50, 6, dtype=DT)
    y = torch.randint(0, 2, (50,))
    eps = 0.1
    x_adv = attacks.fgsm(model, x, y, eps)
    best = loss_per_sample(model, x_adv, y)
    gen = torch.Generator().manual_seed(2)
    for _ in range(50):
        z = (x + eps * (2 * torch.rand(x.shape, generator=gen, dtype=DT) - 1)).clamp(0, 1)
        assert (loss_per_sample(model, z, y) <= best + 1e-12).all()


# --- PGD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("linf", 0.3), ("l2", 0.5), ("l2", 3.0)])
def test_pgd_stays_in_ball_and_box(trained, norm, eps):
    model, x, y = trained
    gen = torch.Generator().manual_seed(0)
    x_adv = attacks.pgd(model, x, y, eps, norm=norm, steps=10, restarts=2, generator=gen)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-12) + 1e-15).all()
    # it is an attack: the loss does not decrease and accuracy falls
    assert (loss_per_sample(model, x_adv, y) >= loss_per_sample(model, x, y) - 1e-12).all()
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


def test_pgd_per_sample_eps(trained):
    model, x, y = trained
    eps = torch.linspace(0, 0.2, len(x), dtype=DT)
    x_adv = attacks.pgd(model, x, y, eps, steps=5, generator=torch.Generator().manual_seed(0))
    size = (x_adv - x).flatten(1).abs().max(1).values
    assert (size <= eps + 1e-15).all() and size[0] == 0


def test_pgd_stronger_than_fgsm(trained):
    model, x, y = trained
    for eps in (0.05, 0.1):
        gen = torch.Generator().manual_seed(0)
        x_pgd = attacks.pgd(model, x, y, eps, steps=20, generator=gen)
        x_fgsm = attacks.fgsm(model, x, y, eps)
        assert accuracy(model, x_pgd, y) <= accuracy(model, x_fgsm, y)


def test_pgd_keeps_the_worst_restart(trained):
    """restarts=R returns, per sample, the strongest of the R single runs with the same draws."""
    model, x, y = trained
    eps, R = 0.1, 4
    runs = []
    gen = torch.Generator().manual_seed(5)
    for _ in range(R):
        runs.append(attacks.pgd(model, x, y, eps, steps=3, restarts=1, generator=gen))
    combined = attacks.pgd(
        model, x, y, eps, steps=3, restarts=R, generator=torch.Generator().manual_seed(5)
    )
    stack = torch.stack(runs)  # [R, B, ...]
    losses = torch.stack([loss_per_sample(model, r, y) for r in runs])  # [R, B]
    with torch.no_grad():
        wrong = torch.stack([model(r).argmax(1) != y for r in runs])
    score = wrong.double() * 1e6 + losses  # misclassified first, then loss
    pick = score.argmax(0)
    expected = stack[pick, torch.arange(len(x))]
    torch.testing.assert_close(combined, expected, rtol=0, atol=0)
    # runs genuinely differed, so the selection was exercised
    assert (pick != pick[0]).any()


def test_pgd_l2_linear_model_reaches_the_optimum():
    """Binary linear model, no box constraint active: the ℓ2 optimum is x − ε·s·w/‖w‖."""
    lin = nn.Linear(5, 1).to(DT)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.3, -0.2, 0.1, 0.05, -0.4]], dtype=DT))
        lin.bias.zero_()
    model = lambda x: torch.cat([torch.zeros_like(lin(x)), lin(x)], 1)  # noqa: E731
    x = torch.full((4, 5), 0.5, dtype=DT)
    y = torch.tensor([0, 1, 0, 1])
    eps = 0.2
    # from x itself every normalized-gradient step points along ±w, so PGD reaches the optimum
    x_adv = attacks.pgd(model, x, y, eps, norm="l2", steps=50, random_start=False)
    w = lin.weight[0].detach()
    sign = torch.where(y == 1, -1.0, 1.0).to(DT)[:, None]  # class 1 wants wᵀx down
    torch.testing.assert_close(x_adv, x + eps * sign * w / w.norm(), rtol=0, atol=1e-9)


def test_pgd_leaves_model_untouched(trained):
    model, x, y = trained
    assert all(p.grad is None for p in model.parameters())  # train() clears them
    model.train()
    attacks.pgd(model, x[:5], y[:5], 0.1, steps=2)
    attacks.fgsm(model, x[:5], y[:5], 0.1)
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()


def test_eps_zero_is_identity(trained):
    model, x, y = trained
    assert torch.equal(attacks.pgd(model, x, y, 0.0, steps=3), x)
    assert torch.equal(attacks.fgsm(model, x, y, 0.0), x)


def test_attack_argument_errors(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="unknown norm 'l3'; valid: linf, l2"):
        attacks.pgd(model, x, y, 0.1, norm="l3")
    with pytest.raises(ValueError, match="eps must be a finite number ≥ 0"):
        attacks.pgd(model, x, y, -0.1)
    with pytest.raises(ValueError, match="eps must be a finite number"):
        attacks.fgsm(model, x, y, math.nan)
    with pytest.raises(ValueError, match="steps must be an integer"):
        attacks.pgd(model, x, y, 0.1, steps=2.5)
    with pytest.raises(ValueError, match="restarts must be a positive integer, got 0"):
        attacks.pgd(model, x, y, 0.1, restarts=0)
    with pytest.raises(ValueError, match="step_size must be a positive"):
        attacks.pgd(model, x, y, 0.1, step_size=0)
    with pytest.raises(ValueError, match=r"x must lie in \[0, 1\]"):
        attacks.pgd(model, x + 2, y, 0.1)
    with pytest.raises(ValueError, match=r"y must have shape \(100,\), one label per row of x"):
        attacks.pgd(model, x, y[:3], 0.1)
    with pytest.raises(ValueError, match="batch dimension"):
        attacks.fgsm(model, x[0, 0, 0], y[:1], 0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        attacks.pgd(model, x, y, 0.1, loss="hinge")


# --- minimal ℓ2 perturbation ---------------------------------------------------------------------


def test_minimal_perturbation_is_genuine_and_above_certificate(trained):
    model, x, y = trained
    r, pts = attacks.minimal_l2_perturbation(model, x, return_points=True)
    assert r.shape == (len(x),) and torch.isfinite(r).all() and (r > 0).all()
    with torch.no_grad():
        assert (model(pts).argmax(1) != model(x).argmax(1)).all()
    torch.testing.assert_close((pts - x).flatten(1).norm(dim=1), r, rtol=0, atol=0)
    cert = geometry.certified_radius(model, x)
    assert (cert <= r * (1 + 1e-9)).all()
    # and it is not a loose bound: PGD-ℓ2 with a slightly smaller ε rarely succeeds
    x_adv = attacks.pgd(
        model,
        x,
        model(x).argmax(1).detach(),
        0.9 * r.min().item(),
        norm="l2",
        steps=40,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        assert (model(x_adv).argmax(1) == model(x).argmax(1)).all()


def test_minimal_perturbation_exact_for_affine_model():
    """For f = Wx + b the minimal ℓ2 perturbation is min_{k≠c} (f_c − f_k)/‖w_c − w_k‖."""
    torch.manual_seed(3)
    lin = nn.Linear(7, 4).to(DT)
    x = torch.randn(30, 7, dtype=DT)
    with torch.no_grad():
        f = lin(x)
    c = f.argmax(1)
    W = lin.weight.detach()
    diff = W[c][:, None, :] - W[None]  # [B, K, d]
    ratio = (f.gather(1, c[:, None]) - f) / diff.norm(dim=2)
    ratio[torch.arange(30), c] = math.inf
    exact = ratio.min(1).values
    r = attacks.minimal_l2_perturbation(lin, x)
    assert (r >= exact * (1 - 1e-12)).all()
    torch.testing.assert_close(r, exact, rtol=1e-6, atol=0)


def test_minimal_perturbation_inf_where_impossible():
    """A constant classifier cannot be fooled: inf, and no exception."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0]))
    r = attacks.minimal_l2_perturbation(model.to(DT), torch.rand(5, 4, dtype=DT))
    assert torch.isinf(r).all()


def test_minimal_perturbation_with_labels_and_clip(trained):
    model, x, y = trained
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    r = attacks.minimal_l2_perturbation(model, x, y)
    assert (r[wrong] == 0).all() and (r[~wrong] > 0).all()
    rc, pts = attacks.minimal_l2_perturbation(model, x[:20], clip=True, return_points=True)
    assert pts.min() >= 0 and pts.max() <= 1
    r20 = attacks.minimal_l2_perturbation(model, x[:20])
    found = torch.isfinite(rc)
    with torch.no_grad():
        assert (model(pts[found]).argmax(1) != model(x[:20][found]).argmax(1)).all()
    # the box only removes candidates, so unclipped is not much larger than clipped
    assert (r20[found] <= rc[found] * 1.05).all()


# --- cross-check against adversarial-robustness-toolbox --------------------------------------------


@pytest.mark.parametrize("norm, eps", [("linf", 0.05), ("linf", 0.1), ("l2", 0.5), ("l2", 1.0)])
def test_art_pgd_agrees_with_ours(trained, norm, eps):
    from robustreg import evaluation

    model, _, _ = trained
    x, y = data.load("digits", "test", dtype=DT)
    ours = evaluation.robust_accuracy(model, x, y, [eps], norm, steps=20, seed=0)[eps]
    x_art = art_attacks.art_pgd(model, x, y, eps, norm, steps=20, seed=0)
    d = (x_art - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert (size <= eps * (1 + 1e-12)).all() and x_art.min() >= 0 and x_art.max() <= 1
    theirs = accuracy(model, x_art, y)
    assert 0.05 < ours < accuracy(model, x, y)  # a non-trivial operating point
    assert abs(ours - theirs) <= 0.02, (ours, theirs)


def test_autoattack_runs_and_is_consistent(trained):
    from robustreg import evaluation

    model, x, y = trained
    xs, ys = x[:30], y[:30]
    x_aa = art_attacks.art_autoattack(model, xs, ys, 0.1, "linf", seed=0)
    assert ((x_aa - xs).abs().flatten(1).max(1).values <= 0.1 + 1e-12).all()
    aa = accuracy(model, x_aa, ys)
    pgd_acc = evaluation.robust_accuracy(model, xs, ys, [0.1], steps=40)[0.1]
    assert aa <= accuracy(model, xs, ys)
    assert abs(aa - pgd_acc) <= 0.1  # no gradient masking on a plain network
    with pytest.raises(ValueError, match=r"image-shaped inputs \[B, C, H, W\]"):
        art_attacks.art_autoattack(model, xs.flatten(1), ys, 0.1)
    with pytest.raises(ValueError, match="unknown version"):
        art_attacks.art_autoattack(model, xs, ys, 0.1, version="plus")


def test_evaluate_rows(trained):
    from robustreg import evaluation, regularizers

    model, x, y = trained
    rows = evaluation.evaluate(
        model,
        x[:40],
        y[:40],
        linf_eps=[0.05],
        l2_eps=[0.5],
        steps=5,
        n_certified=10,
        autoattack_eps={"linf": 0.05},
        autoattack_n=10,
    )
    frame = evaluation.to_frame(rows)
    assert list(frame.columns) == ["metric", "attack", "norm", "eps", "regularizer", "value"]
    attacks_seen = set(frame[frame.metric == "robust_accuracy"].attack)
    assert attacks_seen == {"pgd", "autoattack", "pgd-subset", "worst-case"}
    sub = frame[frame.attack.isin(["autoattack", "pgd-subset", "worst-case"])].set_index("attack")
    assert sub.value["worst-case"] <= min(sub.value["autoattack"], sub.value["pgd-subset"])
    assert set(frame[frame.metric == "regularizer_mean"].regularizer) == set(regularizers.names())
    radius = frame[frame.metric == "median_certified_radius"].value.item()
    assert radius == geometry.certified_radius(model, x[:10]).median().item()


def test_minimal_perturbation_falls_back_on_candidates_of_another_class():
    torch.manual_seed(0)
    model = models.random_network(
        "mlp", (2,), num_classes=3, depth=2, width=8, activation="leaky_relu", seed=3
    ).double()
    x = 3 * torch.rand(60, 2, dtype=torch.float64) - 1.5
    pred = model(x).argmax(1)
    assert pred.unique().numel() >= 2
    # no DeepFool step: without candidates nothing is found
    none = attacks.minimal_l2_perturbation(model, x, max_iter=0, search_steps=0)
    assert torch.isinf(none).all()
    found, points = attacks.minimal_l2_perturbation(
        model, x, max_iter=0, candidates=x, return_points=True
    )
    assert torch.isfinite(found).all()
    assert (model(points).argmax(1) != pred).all()
    nearest = torch.cdist(x, x).masked_fill(pred[None, :] == pred[:, None], float("inf")).min(1)
    assert (found <= nearest.values + 1e-12).all()  # never farther than the candidate itself
    assert (geometry.certified_radius(model, x).detach() <= found).all()


def test_square_restarts_are_square_alone_from_each_start_on_the_survivors(trained):
    """One start is :func:`masking.square_alone`; more starts only break more images, and an
    image counts as robust only if it survives every start (at a radius where Square breaks
    some images and leaves others)."""
    pytest.importorskip("torchattacks")
    from robustreg import masking

    model, x, y = trained
    xs, ys = x[:40], y[:40]
    eps, q = 0.1, 40
    one = masking.square_restarts(model, xs, ys, eps, seeds=(1,), n_queries=q)
    assert torch.equal(one, masking.square_alone(model, xs, ys, eps, n_queries=q, seed=1))
    three = masking.square_restarts(model, xs, ys, eps, seeds=(1, 2, 3), n_queries=q)
    assert not (three & ~one).any()  # a later start never restores an image
    assert 0 < int(three.sum()) < len(ys)  # the radius tells the starts apart
    with pytest.raises(ValueError, match="at least one random start"):
        masking.square_restarts(model, xs, ys, eps, seeds=())

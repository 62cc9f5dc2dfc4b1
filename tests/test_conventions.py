"""robustreg.conventions against direct transcriptions of the original formulas and code.

Each ``original_*`` function below transcribes the original term (paper formula or public code,
in current PyTorch) independently of robustreg.regularizers; the test checks that
``conventions.to_original(name, our_values, lam)`` equals it.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustreg import checks, reference
from robustreg import conventions as C
from robustreg import regularizers as R
from robustreg.models import random_network

torch.set_num_threads(1)
LAM = 0.7


def case(kind: str = "cnn", seed: int = 0, batch: int = 4):
    shape = (1, 6, 6) if kind == "cnn" else (7,)
    model = random_network(kind, in_shape=shape, num_classes=5, depth=2, width=4, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, dtype=torch.float64, generator=gen)
    y = torch.randint(5, (batch,), generator=gen)
    return model, x, y


def close(a, b, rtol=1e-12):
    """One number against the original's: :func:`robustreg.checks.check_identity` on one case
    (the book's rule; the scale of a scalar is |b|, so this is |a − b| ≤ rtol·|b|, as always)."""
    a, b = (float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for v in (a, b))
    checks.check_identity("convention", torch.tensor(a), torch.tensor(b), rtol)


# --- Hoffman, Roberts & Yaida 2019 (facebookresearch/jacobian_regularizer) ------------------------


def original_hoffman(model, x, n: int, generator=None) -> torch.Tensor:
    """JacobianReg(n).forward(x, model(x)): ½ Σ_proj C‖Jv‖² / (num_proj·B), v unit-norm."""
    x = x.clone().requires_grad_(True)
    y = model(x)
    B, Cn = y.shape
    num_proj = Cn if n == -1 else n
    J2 = 0
    for ii in range(num_proj):
        if n == -1:
            v = torch.zeros(B, Cn, dtype=y.dtype)
            v[:, ii] = 1
        else:
            v = torch.randn(B, Cn, dtype=y.dtype, generator=generator)
            v = v / torch.norm(v, 2, 1, True)
        (Jv,) = torch.autograd.grad(y.reshape(-1), x, v.reshape(-1), retain_graph=True)
        J2 = J2 + Cn * torch.norm(Jv) ** 2 / (num_proj * B)
    return 0.5 * J2


def test_hoffman_exact_mode():
    model, x, y = case()
    ours = R.jacobian_frobenius(model, x, y)
    close(C.to_original("hoffman2019", ours, LAM), LAM * original_hoffman(model, x, -1))
    assert C.factor("hoffman2019", len(x)) == 0.5


def test_hoffman_projection_mean_and_variance():
    """Their per-sample term K‖Jᵀv̂‖² (v̂ uniform on the sphere) is unbiased for R_J, with variance
    (2K/(K+2))(‖JJᵀ‖_F² − R_J²/K), below our Gaussian 2‖JJᵀ‖_F²."""
    model, x, y = case("mlp", seed=1, batch=1)
    N = 4000
    gen = torch.Generator().manual_seed(0)
    xr = x.repeat(N, 1)
    terms = torch.stack(  # per-sample terms: 2·R of a batch of one, one draw each
        [2 * original_hoffman(model, xr[i : i + 1], 1, gen) for i in range(N)]
    ).detach()
    J = reference.logit_jacobian(model, x)[0]
    K = J.shape[0]
    rj = float(J.pow(2).sum())
    gram = float((J @ J.T).pow(2).sum())
    se = float(terms.std()) / math.sqrt(N)
    assert abs(float(terms.mean()) - rj) <= 5 * se
    var_sphere = 2 * K / (K + 2) * (gram - rj**2 / K)
    m4 = float((terms - terms.mean()).pow(4).mean())
    se_var = math.sqrt(max(m4 - float(terms.var()) ** 2, 0.0) / N)
    assert abs(float(terms.var()) - var_sphere) <= 5 * se_var
    assert var_sphere < 2 * gram
    # the batch term R estimates (1/2)·mean R_J: the convention in expectation
    close(C.to_original("hoffman2019", torch.tensor([rj], dtype=torch.float64), 1.0), 0.5 * rj)


# --- Jakubovitz & Giryes 2018 ----------------------------------------------------------------------


def test_jakubovitz_unsquared_frobenius():
    model, x, y = case(seed=2)
    original = LAM * reference.logit_jacobian(model, x).norm(dim=(1, 2)).mean()
    close(C.to_original("jakubovitz2018", R.jacobian_frobenius(model, x, y), LAM), original)
    with pytest.raises(ValueError, match="not linear"):
        C.factor("jakubovitz2018", 4)


def test_jakubovitz_public_code_first_sample():
    """A transcription of their TF graph: tf.gradients of y_flat[i] (i < K) w.r.t. the whole
    batch x, concatenated, then tf.norm (Frobenius over everything)."""
    model, x, y = case(seed=3)
    xg = x.clone().requires_grad_(True)
    y_flat = model(xg).reshape(-1)
    k = model(x[:1]).shape[1]
    rows = [torch.autograd.grad(y_flat[i], xg, retain_graph=True)[0] for i in range(k)]
    original = LAM * torch.cat(rows, 0).norm()
    values = R.jacobian_frobenius(model, x, y)
    close(C.to_original("jakubovitz2018_code", values, LAM), original)
    paper = C.to_original("jakubovitz2018", values, LAM)
    assert not torch.isclose(paper, original)  # the code is not the paper's batch mean


# --- Ross & Doshi-Velez 2018 (dtak/adversarial-robustness-public) ----------------------------------


def input_grads_of_mean_loss(model, x, y) -> torch.Tensor:
    """tf.gradients(reduce_mean(cross-entropy), X)."""
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    return g


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_ross_l2_double_backprop(batch):
    model, x, y = case(seed=3, batch=batch)
    g = input_grads_of_mean_loss(model, x, y)
    original = LAM * g.pow(2).sum() / 2  # λ · tf.nn.l2_loss(...)
    close(C.to_original("ross2018", R.input_gradient(model, x, y), LAM), original)
    close(C.factor("ross2018", batch), 1 / (2 * batch))


def test_ross_l1_double_backprop():
    model, x, y = case(seed=4, batch=5)
    original = LAM * input_grads_of_mean_loss(model, x, y).abs().sum()  # reduce_sum(|·|)
    close(C.to_original("ross2018_l1", R.input_gradient(model, x, y, norm="l1"), LAM), original)
    assert C.factor("ross2018_l1", 5) == 1.0


# --- Hein & Andriushchenko 2017 --------------------------------------------------------------------


def test_hein_cross_lipschitz():
    model, x, y = case(seed=5)
    J = reference.logit_jacobian(model, x)
    n, K = J.shape[:2]
    original = LAM * (J[:, :, None] - J[:, None]).pow(2).sum() / (n * K**2)
    close(C.to_original("hein2017", R.cross_lipschitz(model, x, y), LAM), original)
    assert C.factor("hein2017", 7) == 1.0


# --- CURE public code (F-Salehi/CURE_robustness, PyTorch 1.0) -------------------------------------


def original_cure(net, inputs, targets, h, lambda_, fudge=1e-7) -> torch.Tensor:
    """CURE.regularizer: ``_find_z`` then λ Σ‖grad_diff‖/B, in current PyTorch.

    The original passes grad_outputs=torch.ones(B) for the scalar batch-mean loss; PyTorch 1.0's
    engine summed that to the scalar cotangent B (a scalar is expandable to [B]), which we pass
    explicitly. ``fudge`` is their 1e-7 (0 gives the idealized z).
    """
    criterion = nn.CrossEntropyLoss()
    B = float(targets.size(0))
    inputs = inputs.clone().requires_grad_(True)
    loss_z = criterion(net(inputs), targets)
    (grad,) = torch.autograd.grad(loss_z, inputs, torch.tensor(B, dtype=loss_z.dtype))
    z = torch.sign(grad).detach() + 0.0
    z = 1.0 * h * (z + fudge) / (z.reshape(z.size(0), -1).norm(dim=1)[:, None, None, None] + fudge)
    outputs_pos = net(inputs + z)
    outputs_orig = net(inputs)
    loss_pos = criterion(outputs_pos, targets)
    loss_orig = criterion(outputs_orig, targets)
    (grad_diff,) = torch.autograd.grad(
        loss_pos - loss_orig, inputs, torch.tensor(B, dtype=loss_z.dtype), create_graph=True
    )
    reg = grad_diff.reshape(grad_diff.size(0), -1).norm(dim=1)
    return torch.sum(lambda_ * reg) / B


def test_cure_public_code():
    model, x, y = case(seed=6)
    for h in (0.05, 3.0):
        ours = C.to_original("cure2019", R.curvature(model, x, y, h=h), 4.0)
        close(ours, original_cure(model, x, y, h, 4.0, fudge=0.0), rtol=1e-10)
        close(ours, original_cure(model, x, y, h, 4.0), rtol=1e-4)  # their 1e-7 terms
    with pytest.raises(ValueError, match="not linear"):
        C.factor("cure2019", 4)


def test_cure_grad_outputs_shape_is_rejected_today():
    """Why the transcription passes the cotangent B: current PyTorch refuses ones(B) for a scalar."""
    model, x, y = case(seed=7)
    xg = x.clone().requires_grad_(True)
    loss = nn.CrossEntropyLoss()(model(xg), y)
    with pytest.raises(RuntimeError, match="Mismatch in shape"):
        torch.autograd.grad(loss, xg, grad_outputs=torch.ones(len(y), dtype=loss.dtype))


# --- the module's interface ------------------------------------------------------------------------


def test_registry_and_fields():
    assert C.names() == tuple(C.CONVENTIONS)
    assert set(C.names()) == {
        "hoffman2019",
        "jakubovitz2018",
        "jakubovitz2018_code",
        "ross2018",
        "ross2018_l1",
        "hein2017",
        "cure2019",
        "gradalign2020",
        "llr2019",
    }
    for name in C.names():
        conv = C.get(name)
        assert conv.name == name
        assert conv.regularizer.split("(")[0] in R.names() + R.later_names()
        assert conv.source and conv.original and conv.relation
    with pytest.raises(ValueError, match=r"unknown convention 'ross'.*valid: hoffman2019"):
        C.get("ross")
    with pytest.raises(ValueError, match="did you mean 'hein2017'"):
        C.get("hein2016")


def test_citations_exist_in_the_bibliography():
    bib = Path(__file__).resolve().parents[1] / "book" / "references.bib"
    if not bib.exists():
        pytest.skip("book/references.bib not present")
    keys = set(re.findall(r"@\w+\{([^,]+),", bib.read_text()))
    for conv in C.CONVENTIONS.values():
        assert conv.citation in keys, conv.citation


def test_bad_values():
    for bad in (torch.ones(2, 3), torch.tensor(1.0), torch.ones(0), [1.0, 2.0]):
        with pytest.raises(ValueError, match="non-empty 1-D tensor"):
            C.to_original("hein2017", bad)


def test_differentiable():
    model, x, y = case(seed=8)
    term = C.to_original("ross2018", R.input_gradient(model, x, y), LAM)
    term.backward()
    assert all(p.grad is not None for p in model.parameters())


# --- the later regularizers (tml-epfl/understanding-fast-adv-training, deepmind LLR) ---------------


def test_gradalign_public_code():
    """A transcription of train.py's FGSM recipe: g1 detached at x, g2 at x + η with
    create_graph, λ(1 − mean cos); value and parameter gradient equal ours."""
    model, x, y = case(seed=4)
    eps = 0.3
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    eta = eps * (2 * u - 1)
    xg = x.clone().requires_grad_(True)
    (g1,) = torch.autograd.grad(F.cross_entropy(model(xg), y), xg)
    x2 = (x + eta).requires_grad_(True)
    (g2,) = torch.autograd.grad(F.cross_entropy(model(x2), y), x2, create_graph=True)
    g1, g2 = g1.detach().flatten(1), g2.flatten(1)
    cos = (g1 / g1.norm(dim=1, keepdim=True) * (g2 / g2.norm(dim=1, keepdim=True))).sum(1)
    original = LAM * (1 - cos.mean())
    ours = C.to_original(
        "gradalign2020",
        R.grad_align(
            model, x, y, eps, clean_gradient="detached", generator=torch.Generator().manual_seed(9)
        ),
        LAM,
    )
    close(ours, original)
    params = list(model.parameters())
    for a, b in zip(
        torch.autograd.grad(ours, params), torch.autograd.grad(original, params), strict=True
    ):
        # per entry |a − b| ≤ 1e-10|b| + 1e-12 max|b|, as before: scale |b| + 1e-2 max|b| at 1e-10
        size = b.abs().flatten() + 1e-2 * b.abs().max()
        scale = ("|∇| + 1e-2 max|∇|", size)
        checks.check_identity("∇_θ GradAlign", a.flatten(), b.flatten(), 1e-10, scale=scale)


def test_llr_public_code_at_a_fixed_step():
    """Their outer term for a given δ* (the step search differs): with steps=0 both start from the
    same uniform draw, and the term is λ·mean R_LLR with μ = 0.3."""
    model, x, y = case(seed=5)
    x = x.clamp(0, 1)
    eps, mu = 0.2, 0.3
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    delta = (x + (eps * (2 * u - 1)).clamp(-eps, eps)).clamp(0, 1) - x
    xg = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xg), y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), xg, create_graph=True)  # per-sample G_i
    lin = (delta * grad).flatten(1).sum(1)
    new = F.cross_entropy(model(x + delta), y, reduction="none")
    original = LAM * ((new - (loss + lin)).abs() + mu * lin.abs()).mean()
    values = R.local_linearity(
        model, x, y, eps, mu=mu, steps=0, generator=torch.Generator().manual_seed(3)
    )
    close(C.to_original("llr2019", values, LAM), original)

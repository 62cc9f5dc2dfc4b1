"""Degenerate networks, on purpose: dead (no active path to the logits, J = 0), constant and tied
(two coinciding logit rows). Random draws rarely meet them and training can produce them; every
fact must hold there too, with the infinite radii they have (issue 27)."""

import pytest
import torch

from robustreg import cases, checks, geometry, reference, regularizers

torch.set_num_threads(1)

CASES = cases.degenerate_cases(seed=0) + cases.degenerate_cases(seed=1)
IDS = [c.description for c in CASES]


def test_the_degenerate_cases_are_what_they_claim():
    kinds = {}
    for c in CASES:
        J = reference.logit_jacobian(c.model, c.x)
        how = c.description.rsplit("(", 1)[1].rstrip(")")
        if how in ("dead", "constant"):
            assert bool((J == 0).all()), c.description  # no active path reaches the logits
        else:
            assert torch.equal(J[:, 0], J[:, 1]) and bool((J != 0).any()), c.description
        kinds[how] = kinds.get(how, 0) + 1
    assert kinds == {"dead": 4, "constant": 4, "tied": 4}
    with pytest.raises(ValueError, match="unknown degeneracy 'dying'; valid: dead, constant, tied"):
        cases.degenerate(CASES[0], "dying")


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_t12_with_an_infinite_margin_is_the_region_term(case):
    margin = geometry.margin_radius(case.model, case.x)
    region = geometry.boundary_distance(case.model, case.x)
    radius = geometry.certified_radius(case.model, case.x)
    assert bool(torch.isfinite(region).all())
    J = reference.logit_jacobian(case.model, case.x)
    pred = case.model(case.x).argmax(1)
    gap = (J[torch.arange(len(pred)), pred][:, None] - J).flatten(2).norm(dim=2)  # [B, K]
    own = torch.nn.functional.one_hot(pred, gap.shape[1]).bool()
    unreachable = ((gap == 0) | own).all(1)  # ∇f_k = ∇f_c for every k ≠ c
    assert torch.equal(torch.isinf(margin), unreachable)
    assert torch.equal(radius, torch.minimum(margin, region))
    assert torch.equal(radius[unreachable], region[unreachable])
    # no prediction flip inside the certificate: random steps of 0.999·r in every direction drawn
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        v = torch.randn(case.x.shape, generator=gen, dtype=case.x.dtype)
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * (v.dim() - 1))
        step = 0.999 * radius.view(-1, *[1] * (v.dim() - 1)) * v
        with torch.no_grad():
            assert torch.equal(case.model(case.x + step).argmax(1), pred)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_mmr_terms_with_infinite_margins(case):
    pred = case.model(case.x).argmax(1)
    region = geometry.boundary_distance(case.model, case.x)
    margin = geometry.margin_radius(case.model, case.x)
    gb = 2 * float(region.max())
    with torch.no_grad():
        hinge_b = regularizers.mmr(case.model, case.x, pred, gamma_b=gb, gamma_d=1e-300)
        checks.check_identity("MMR region term", gb * (1 - hinge_b), region)
        for gamma_d in (1e-3, 1.0, 1e6):  # an unreachable class is never penalized
            hinge_d = regularizers.mmr(case.model, case.x, pred, gamma_b=1e-300, gamma_d=gamma_d)
            assert bool((hinge_d[torch.isinf(margin)] == 0).all())
        finite = torch.isfinite(margin)
        if finite.any():
            gd = 2 * float(margin[finite].max())
            hinge_d = regularizers.mmr(case.model, case.x, pred, gamma_b=1e-300, gamma_d=gd)
            checks.check_identity("MMR margin term", gd * (1 - hinge_d[finite]), margin[finite])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_every_regularizer_equals_its_definition_on_degenerate_networks(case):
    """T3–T11's objects, straight from their definitions (robustreg.reference), on networks
    whose gradients vanish or coincide: the zero values must be exact, the others to 1e-10."""
    ref = reference.regularizer_values(case.model, case.x, case.y, h=regularizers.DEFAULT_H)
    for name in regularizers.names():
        with torch.no_grad():
            value = regularizers.get(name)(case.model, case.x, case.y)
        if name == "curvature":  # a difference of gradients: its terms' size is the scale
            g = reference.loss_gradient(case.model, case.x, case.y).norm(dim=1) ** 2
            checks.check_identity(name, value, ref[name], scale=("‖∇ℓ‖²", g))
        else:
            checks.check_identity(name, value, ref[name])
        if "(dead)" in case.description or "(constant)" in case.description:
            assert bool((value == 0).all()), name  # J = 0: every regularizer vanishes exactly

"""Exact minimal perturbations by MILP (robustreg.verification) against brute force, and the
chain certified (T12) ≤ exact ≤ attack."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from robustreg import attacks, geometry, models
from robustreg.verification import SOLVER_TOLERANCE, affine_layers, minimal_perturbation


def brute_force(model: nn.Module, x: torch.Tensor, c: int, norm: str, box: bool) -> float:
    """min ‖x′ − x‖_p over f_k(x′) ≥ f_c(x′), k ≠ c: one linear program per activation pattern
    and target (every pattern of every hidden unit), no big-M and no interval bounds."""
    layers = affine_layers(model)
    x = x.double().flatten().numpy()
    d = len(x)
    sizes = [len(cv) for _, cv, _ in layers[:-1]]
    best = math.inf
    for pattern in itertools.product((0, 1), repeat=sum(sizes)):
        # with the pattern fixed, every pre-activation and the logits are affine: M x′ + m
        m_mat, m_vec, rows, rhs, pos = np.eye(d), np.zeros(d), [], [], 0
        for (w, cv, a), n in zip(layers[:-1], sizes, strict=True):
            z_mat, z_vec = w @ m_mat, w @ m_vec + cv
            s = np.array(pattern[pos : pos + n])
            pos += n
            sign = np.where(s == 1, -1.0, 1.0)  # s = 1: z ≥ 0 → −z ≤ 0; s = 0: z ≤ 0
            rows.append(sign[:, None] * z_mat)
            rhs.append(-sign * z_vec)
            slope = np.where(s == 1, 1.0, a)
            m_mat, m_vec = slope[:, None] * z_mat, slope * z_vec
        w, cv, _ = layers[-1]
        f_mat, f_vec = w @ m_mat, w @ m_vec + cv
        for k in range(len(cv)):
            if k == c:
                continue
            # variables (x′, t) [ℓ∞] or (x′, e) [ℓ1]
            n_aux = 1 if norm == "linf" else d
            a_ub = [np.hstack([r, np.zeros((len(r), n_aux))]) for r in rows]
            b_ub = list(rhs)
            a_ub.append(np.hstack([-(f_mat[k] - f_mat[c])[None], np.zeros((1, n_aux))]))
            b_ub.append(np.array([f_vec[k] - f_vec[c]]))
            eye = np.eye(d)
            aux = -np.ones((d, 1)) if norm == "linf" else -eye
            a_ub += [np.hstack([eye, aux]), np.hstack([-eye, aux])]
            b_ub += [x, -x]
            cost = np.r_[np.zeros(d), np.ones(n_aux)]
            bounds = [(0, 1) if box else (None, None)] * d + [(0, None)] * n_aux
            res = linprog(cost, A_ub=np.vstack(a_ub), b_ub=np.concatenate(b_ub), bounds=bounds)
            if res.status == 0:
                best = min(best, res.fun)
    return best


@pytest.mark.parametrize("norm", ["linf", "l1"])
@pytest.mark.parametrize(
    "activation,slopes,seed",
    [("relu", (0.0, 0.5), 0), ("leaky_relu", (0.0, 0.5), 1), ("prelu", (-1.0, 2.0), 2)],
)
def test_milp_matches_brute_force(norm, activation, slopes, seed):
    net = models.random_network(
        "mlp", (2,), 4, depth=2, width=3, activation=activation, slopes=slopes, seed=seed
    )
    gen = torch.Generator().manual_seed(seed)
    compared = 0
    radius = 10.0  # ≥ ε*_∞ whenever ε*_p ≤ 10 (‖δ‖∞ ≤ ‖δ‖₁)
    for box in (True, False):
        # in [0, 1]² for the box, in [−2, 2]² without it
        x = torch.rand(4, 2, generator=gen, dtype=torch.float64) * (1 if box else 4) - (
            0 if box else 2
        )
        exact = minimal_perturbation(net, x, norm=norm, radius=radius, box=box)
        pred = net(x).argmax(1)
        for i in range(len(x)):
            ref = brute_force(net, x[i], int(pred[i]), norm, box)
            if ref > radius:  # the optimum may lie outside the MILP's box: it cannot beat it
                assert math.isinf(exact.radius[i]) or exact.radius[i] >= ref * (1 - 1e-5)
                continue
            compared += 1
            assert abs(float(exact.radius[i]) - ref) <= 10 * SOLVER_TOLERANCE * (1 + ref)
            # the point attains its radius and changes the prediction, up to the tolerance
            delta = (exact.point[i] - x[i]).flatten()
            p = math.inf if norm == "linf" else 1
            assert float(delta.norm(p)) <= float(exact.radius[i]) + 10 * SOLVER_TOLERANCE
            with torch.no_grad():
                f = net(exact.point[i : i + 1])[0]
            scale = float(f.abs().max()) + 1
            assert float(f[exact.target[i]] - f[pred[i]]) >= -10 * SOLVER_TOLERANCE * scale
    assert compared >= 1  # a test that compares nothing would pass vacuously


@pytest.mark.parametrize("norm", ["linf", "l1"])
def test_certified_exact_attack_chain(norm):
    """T12 in the dual norm ≤ the exact radius ≤ the radius of any point that changes the class."""
    net = models.random_network("mlp", (4,), 3, depth=2, width=6, seed=5)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    certified = geometry.certified_radius(net, x, norm=norm)
    exact = minimal_perturbation(net, x, norm=norm, radius=2.0, box=False)
    finite = torch.isfinite(exact.radius)
    assert finite.any()
    assert (certified[finite] <= exact.radius[finite] + 10 * SOLVER_TOLERANCE).all()
    # an independent upper bound: the ℓ2 attack's point, measured in the norm
    from robustreg.attacks import minimal_l2_perturbation

    _, points = minimal_l2_perturbation(net, x, return_points=True)
    p = math.inf if norm == "linf" else 1
    found = (points - x).flatten(1).norm(p=p, dim=1)
    ok = finite & (found > 0)
    assert (exact.radius[ok] <= found[ok] + 10 * SOLVER_TOLERANCE).all()


def test_bad_input():
    net = models.random_network("mlp", (2,), 2, depth=1, width=3)
    x = torch.rand(1, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="unknown norm 'l2'.*linf, l1"):
        minimal_perturbation(net, x, norm="l2")
    with pytest.raises(ValueError, match="radius must be positive"):
        minimal_perturbation(net, x, radius=0.0)
    cnn = models.random_network("cnn", (1, 4, 4), 2, depth=1, width=2)
    with pytest.raises(ValueError, match="Conv2d is not supported"):
        minimal_perturbation(cnn, torch.rand(1, 1, 4, 4, dtype=torch.float64))


def test_minimal_pgd_perturbation_is_an_upper_bound():
    net = models.random_network("mlp", (4,), 3, depth=2, width=6, seed=7)
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    from robustreg.attacks import minimal_pgd_perturbation

    found, points = minimal_pgd_perturbation(
        net,
        x,
        eps_max=1.0,
        steps=30,
        restarts=2,
        generator=torch.Generator().manual_seed(0),
        return_points=True,
    )
    exact = minimal_perturbation(net, x, norm="linf", radius=1.0, box=True)
    pred = net(x).argmax(1)
    hit = torch.isfinite(found)
    assert hit.any()
    assert (net(points[hit]).argmax(1) != pred[hit]).all()  # verified points
    assert torch.allclose((points - x).abs().flatten(1).amax(1)[hit], found[hit])
    assert (exact.radius[hit] <= found[hit] + 10 * SOLVER_TOLERANCE).all()
    # where the MILP proves no point within ε_max exists, the attack finds none either
    assert not (torch.isinf(exact.radius) & hit).any()


def _moons_network(file: str) -> tuple[nn.Module, torch.Tensor]:
    """A 2-16-16-2 leaky-ReLU network of chapter 08 and its test point, from ``tests/data``."""
    from safetensors.torch import load_file

    state = load_file(Path(__file__).parent / "data" / file)
    x = state.pop("x")
    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(2, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 2),
    ).double()
    net.load_state_dict(state)
    return net, x


@pytest.mark.parametrize(
    "file",
    [
        # seed 1, input gradient, point 171: presolve ended in "Solve error"
        "highs_presolve_failure.safetensors",
        # seed 2, Jacobian, point 101: presolve reported 0.0479 as optimal (truth ≈ 0.0104)
        "highs_presolve_wrong_optimum.safetensors",
    ],
)
def test_programs_that_highs_presolve_got_wrong_are_solved_exactly(file):
    """Two programs of chapter 08's full profile on which HiGHS's presolve failed. The exact
    radius must come back, change the prediction, lie below the attack's, and no point of a fine
    grid over the ℓ∞ ball of 99.9 % of it may change the prediction (in two dimensions the grid
    is an independent check of optimality, up to its spacing)."""
    net, x = _moons_network(file)
    exact = minimal_perturbation(net, x, norm="linf", radius=1.0)
    assert torch.isfinite(exact.radius).all() and exact.violation.max() <= SOLVER_TOLERANCE
    found = attacks.minimal_pgd_perturbation(net, x, generator=torch.Generator().manual_seed(0))
    assert exact.radius[0] <= found[0] + 10 * SOLVER_TOLERANCE
    r = 0.999 * float(exact.radius[0])
    t = torch.linspace(-r, r, 801, dtype=torch.float64)
    grid = (torch.cartesian_prod(t, t) + x).clamp(0, 1)
    with torch.no_grad():
        assert (net(grid).argmax(1) == net(x).argmax(1)).all()


def test_proven_optima_are_kept_and_read_back_for_the_same_problem_only(tmp_path, monkeypatch):
    """A solved problem is kept (keyed by its whole problem) and read back identically, without
    solving; another point, box or network is solved afresh; a corrupt file is solved again."""
    from robustreg import verification

    monkeypatch.setenv("ROBUSTREG_MILP_CACHE", str(tmp_path))
    net = models.random_network("mlp", (3,), 3, depth=2, width=5, seed=7)
    x = torch.rand(3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    first = minimal_perturbation(net, x, norm="linf", radius=1.0)
    kept = sorted(tmp_path.glob("*.npz"))
    assert len(kept) == 3
    calls = []
    monkeypatch.setattr(verification, "_target_program", lambda *a: calls.append(a))
    again = minimal_perturbation(net, x, norm="linf", radius=1.0)
    assert calls == []  # read back: nothing built or solved
    for field in ("radius", "point", "target", "binaries", "violation"):
        assert torch.equal(getattr(again, field), getattr(first, field)), field
    # another radius is another problem: it is built (and fails here, _target_program replaced)
    with pytest.raises(TypeError):
        minimal_perturbation(net, x, norm="linf", radius=0.5)
    monkeypatch.undo()
    monkeypatch.setenv("ROBUSTREG_MILP_CACHE", str(tmp_path))
    kept[0].write_bytes(b"not an npz")  # corrupt: solved again, and rewritten
    third = minimal_perturbation(net, x, norm="linf", radius=1.0)
    assert torch.equal(third.radius, first.radius)
    monkeypatch.setenv("ROBUSTREG_MILP_CACHE", "")  # empty: nothing kept
    assert verification._solutions_dir() is None

"""Tests for robustreg.models: architectures, random networks, the piecewise-linearity check."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from strategies import Case, networks
from torch import nn

from robustreg.models import (
    Residual,
    check_piecewise_linear,
    is_piecewise_linear,
    lenet,
    mlp,
    random_network,
)

torch.set_num_threads(1)
VALID = "relu, leaky_relu, prelu"


# --- architectures -----------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "prelu"])
def test_mlp_shapes_and_layers(activation):
    net = mlp(784, 10, hidden=(32, 16), activation=activation, negative_slope=0.2)
    assert isinstance(net[0], nn.Flatten)
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [32, 16, 10]
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert net(torch.randn(3, 784)).shape == (3, 10)
    kinds = {type(m) for m in net}
    assert {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU}[activation] in kinds
    slopes = [m.negative_slope for m in net if isinstance(m, nn.LeakyReLU)]
    slopes += [m.weight.item() for m in net if isinstance(m, nn.PReLU)]
    assert all(abs(a - 0.2) < 1e-7 for a in slopes)


def test_mlp_default_hidden():
    net = mlp(64, 10)
    assert [m.out_features for m in net if isinstance(m, nn.Linear)] == [256, 256, 10]


@pytest.mark.parametrize(
    "in_channels, input_size, num_classes",
    [(1, 28, 10), (1, 8, 10), (3, 32, 7), (2, (16, 12), 4)],
)
def test_lenet_shapes(in_channels, input_size, num_classes):
    net = lenet(in_channels, num_classes, input_size=input_size)
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    assert net(torch.randn(2, in_channels, h, w)).shape == (2, num_classes)
    assert sum(isinstance(m, nn.MaxPool2d) for m in net) == 2
    assert sum(isinstance(m, nn.Conv2d) for m in net) == 2


def test_lenet_classic_sizes_on_mnist():
    net = lenet()
    assert net[7].in_features == 16 * 5 * 5


def test_lenet_rejects_tiny_inputs():
    with pytest.raises(ValueError, match="input_size=2"):
        lenet(input_size=2)


@pytest.mark.parametrize(
    "factory", [lambda a: mlp(4, 2, activation=a), lambda a: lenet(activation=a)]
)
@pytest.mark.parametrize("bad", ["tanh", "ReLU", "gelu"])
def test_unknown_activation(factory, bad):
    with pytest.raises(ValueError, match=rf"unknown activation '{bad}'; valid: {VALID}"):
        factory(bad)


def test_unknown_activation_random_network_and_kind():
    with pytest.raises(ValueError, match=rf"unknown activation 'elu'; valid: {VALID}"):
        random_network(activation="elu")
    with pytest.raises(ValueError, match="unknown kind 'rnn'; valid: mlp, cnn"):
        random_network(kind="rnn")
    with pytest.raises(ValueError, match=r"in_shape=\(C, H, W\)"):
        random_network(kind="cnn", in_shape=(8, 8))


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), "0.1", None])
def test_negative_slope_not_a_finite_number(slope):
    with pytest.raises(ValueError, match=rf"finite real number.*{slope}"):
        mlp(4, 2, activation="leaky_relu", negative_slope=slope)
    mlp(4, 2, activation="relu", negative_slope=slope)  # ignored for ReLU


@pytest.mark.parametrize("slope", [-0.5, 1.0, 2.0])
def test_any_real_slope_is_a_rectifier(slope):
    """σ_a for any real a (non-monotone for a < 0, the identity at a = 1): piecewise affine."""
    net = mlp(4, 2, activation="leaky_relu", negative_slope=slope)
    assert is_piecewise_linear(net) and net[2].negative_slope == slope


def test_random_network_slopes_interval():
    net = random_network("resmlp", (4,), 3, activation="prelu", slopes=(-1.0, 2.0), seed=3)
    a = torch.cat([m.weight for m in net.modules() if isinstance(m, nn.PReLU)])
    assert (a >= -1).all() and (a < 2).all() and (a < 0).any() and (a > 1).any()
    with pytest.raises(ValueError, match=r"slopes.*\(2.0, 1.0\)"):
        random_network(activation="prelu", slopes=(2.0, 1.0))


# --- random networks ---------------------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_random_network_properties(case: Case):
    model, p = case.model, case.params
    assert not model.training and all(not m.training for m in model.modules())
    assert all(q.dtype == torch.float64 and q.requires_grad for q in model.parameters())
    assert model(case.x).shape == (case.x.shape[0], case.K)
    assert is_piecewise_linear(model)
    rect = nn.Conv2d if p["kind"] in ("cnn", "rescnn") else nn.Linear
    residual = p["kind"].startswith("res")
    n_affine = sum(isinstance(m, rect) for m in model.modules())
    assert n_affine == (2 * p["depth"] + 1 if residual else p["depth"]) + (rect is nn.Linear)
    assert sum(isinstance(m, Residual) for m in model) == (p["depth"] if residual else 0)
    assert any(isinstance(m, nn.MaxPool1d | nn.MaxPool2d) for m in model) == p["max_pool"]
    lo, hi = p["slopes"]
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            if not residual:
                assert m.weight.numel() == p["width"]
            assert ((m.weight >= lo) & (m.weight < hi)).all()
        if isinstance(m, nn.LeakyReLU):
            assert m.negative_slope == p["negative_slope"]
        if isinstance(m, nn.Linear | nn.Conv2d):
            assert (m.bias != 0).all()
    # deterministic in the seed
    again = random_network(**p)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )


def test_random_network_seed_matters_and_regions_are_interesting():
    a = random_network("mlp", (6,), 3, depth=2, width=16, seed=0)
    b = random_network("mlp", (6,), 3, depth=2, width=16, seed=1)
    assert not torch.equal(a[1].weight, b[1].weight)
    x = torch.randn(200, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z = a[1](a[0](x))
    active = (z > 0).double().mean(0)  # each unit is active on some inputs and inactive on others
    assert ((active > 0.02) & (active < 0.98)).float().mean() > 0.7


def test_random_network_dtype():
    net = random_network("cnn", (1, 8, 8), 3, dtype=torch.float32, activation="prelu")
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert net(torch.randn(2, 1, 8, 8)).dtype == torch.float32


# --- piecewise linearity -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [nn.Softplus, nn.GELU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.SiLU])
def test_smooth_activations_are_rejected_by_name_and_place(bad):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), bad()))
    assert not is_piecewise_linear(net)
    with pytest.raises(ValueError, match=rf"{bad.__name__}.* at '2\.1'"):
        check_piecewise_linear(net)


def test_first_offender_is_named():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.GELU())
    with pytest.raises(ValueError, match=r"Tanh.*'1'") as info:
        check_piecewise_linear(net)
    assert "GELU" not in str(info.value)


def test_unknown_leaf_is_rejected():
    class Mystery(nn.Module):
        def forward(self, x):
            return x**2

    with pytest.raises(ValueError, match=r"Mystery \(not a known piecewise-affine module\)"):
        check_piecewise_linear(nn.Sequential(nn.Linear(2, 2), Mystery()))
    with pytest.raises(ValueError, match="'<root>'"):
        check_piecewise_linear(Mystery())


@pytest.mark.parametrize("norm", [nn.BatchNorm1d(4), nn.Dropout(0.3)])
def test_training_mode_layers(norm):
    net = nn.Sequential(nn.Linear(3, 4), norm, nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=rf"{type(norm).__name__} in training mode.*'1'"):
        check_piecewise_linear(net)
    net.eval()
    check_piecewise_linear(net)
    assert is_piecewise_linear(net)


def test_batchnorm_without_running_stats_is_rejected_in_eval():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="without running statistics"):
        check_piecewise_linear(net)


def test_other_norms_are_not_affine_per_sample():
    assert not is_piecewise_linear(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)))


def test_known_architectures_are_piecewise_linear():
    custom = nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.BatchNorm2d(2),
        nn.LeakyReLU(),
        nn.AvgPool2d(2),
        nn.ZeroPad2d(1),
        nn.AdaptiveMaxPool2d(2),
        nn.Flatten(),
        nn.Dropout(),
        nn.Identity(),
        nn.Linear(8, 3),
    ).eval()
    for net in (mlp(4, 2), lenet(), lenet(activation="prelu"), custom, nn.Linear(3, 2)):
        assert is_piecewise_linear(net)
        check_piecewise_linear(net)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_random_cases_meet_every_number_of_classes(seed):
    """22 consecutive cases hold every K in 2…12 for MLPs and CNNs alike (checks that select the
    two-class case, say, never select nothing)."""
    from robustreg import cases

    drawn = [(c.K, i % 2) for i, c in enumerate(cases.random_cases(22, seed=seed, batch=1))]
    assert {k for k, kind in drawn if kind == 0} == set(range(2, 13))
    assert {k for k, kind in drawn if kind == 1} == set(range(2, 13))


def test_random_cases_cycle_through_the_kinds_asked_for():
    from robustreg import cases

    kinds = ("mlp", "cnn", "resmlp", "rescnn")
    drawn = list(cases.random_cases(44, seed=2, batch=1, kinds=kinds))
    for i, c in enumerate(drawn):
        kind = kinds[i % 4]
        assert c.description.startswith(kind + " ")
        assert any(isinstance(m, Residual) for m in c.model) == kind.startswith("res")
    for j in range(4):
        assert {c.K for c in drawn[j::4]} == set(range(2, 13))
    # the default stream (MLPs and CNNs) is the one the chapters were run with
    a = cases.random_case(5, seed=1)
    b = cases.random_case(5, seed=1, kinds=("mlp", "cnn"))
    assert a.description == b.description and torch.equal(a.x, b.x)
    with pytest.raises(ValueError, match="kinds must be.*'lstm'"):
        cases.random_case(0, kinds=("mlp", "lstm"))

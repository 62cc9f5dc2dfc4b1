"""robustreg.regularizers against independent autograd references, gradients, and bad input.

The references are :mod:`robustreg.reference` (each quantity one sample at a time with
``torch.autograd.functional.jacobian`` / ``hessian``, straight from the definitions in
book/notation.md); the tolerance rule is :func:`robustreg.checks.check_identity`, the one the
chapters use. ``tests/test_facts.py`` imports :func:`saturation_scale`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from strategies import Case, networks
from torch import nn

from robustreg import checks, reference
from robustreg import regularizers as R
from robustreg.models import random_network

torch.set_num_threads(1)
TOL = 1e-10
ATOL = 1e-13  # × the natural scale of a quantity; see saturation_scale

NAMES = ("input_gradient", "jacobian_frobenius", "cross_lipschitz", "curvature", "hessian_trace")

#: (name, options) of every regularizer and estimator variant
VARIANTS = [
    ("input_gradient", {}),
    ("input_gradient", {"norm": "l1"}),
    ("jacobian_frobenius", {}),
    ("jacobian_frobenius", {"n_proj": 2}),
    ("cross_lipschitz", {}),
    ("cross_lipschitz", {"n_proj": 2}),
    ("curvature", {"h": 0.1}),
    ("hessian_trace", {}),
    ("hessian_trace", {"n_samples": 2}),
]


def variant_id(v) -> str:
    name, opts = v
    return name + "".join(f"-{k}={val}" for k, val in opts.items())


def is_random(opts: dict) -> bool:
    return "n_proj" in opts or "n_samples" in opts


def call(name: str, model, x, y, seed: int = 0, **opts):
    """Call a regularizer; estimators get a fresh generator seeded with ``seed``."""
    if is_random(opts):
        opts = {**opts, "generator": torch.Generator().manual_seed(seed)}
    return R.get(name)(model, x, y, **opts)


# --- the tolerance rule ----------------------------------------------------------------------------


def saturation_scale(ref, natural) -> tuple[str, torch.Tensor]:
    """The scale of :func:`robustreg.checks.check_identity` for a value whose terms cancel when
    the softmax saturates: ‖reference‖ + (ATOL/TOL)·``natural``, per case.

    When p_k → 1, p − e_k and S = diag(p) − ppᵀ cancel, and autograd through the cross-entropy keeps
    only an absolute accuracy ≈ eps·‖J‖ (‖J‖² for quadratic quantities): the size of the terms
    that cancel is then the natural scale, not ‖reference‖. With this scale the one rule
    ‖computed − reference‖ ≤ TOL·scale is exactly TOL‖reference‖ + ATOL·natural, the rule these
    tests had before: as strict as a relative error of 1e-10 wherever the value is not swamped
    by cancellation, and 1e-13 of the natural scale where it is.
    """
    r = torch.as_tensor(ref).detach().double()
    size = r.reshape(len(r), -1).norm(dim=1)
    extra = torch.as_tensor(natural).detach().double().reshape(-1)
    return (f"‖reference‖ + {ATOL / TOL:.0e}·natural scale", size + ATOL / TOL * extra)


# --- values against the references --------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_exact_values_match_autograd_references(case: Case):
    h = 1e-2
    m, x, y = case.model, case.x, case.y
    ref = reference.regularizer_values(m, x, y, h)
    g = reference.loss_gradient(m, x, y)
    # a gradient coordinate at rounding level could take either sign in the two computations
    tiny = (g != 0) & (g.abs() < 1e-12 * g.abs().amax(1, keepdim=True))
    assume(not bool(tiny.any()))
    jf = reference.logit_jacobian(m, x).norm(dim=(1, 2))
    g_h = reference.loss_gradient(m, x + h * reference.cure_direction(g).reshape(x.shape), y)
    # the natural scales: ‖J‖_F² (quadratic in J), ‖J‖_F√d (ℓ1 norm of a gradient), and for CURE
    # the squared size of the two gradients whose difference it takes
    scale, scale_l1 = jf**2, jf * math.sqrt(g.shape[1])
    scale_cure = (jf + g.norm(dim=1) + g_h.norm(dim=1)) ** 2

    def check(name, computed, natural=None):
        s = None if natural is None else saturation_scale(ref[name], natural)
        checks.check_identity(name, computed, ref[name], scale=s)

    check("input_gradient", R.input_gradient(m, x, y), scale)
    check("input_gradient-l1", R.input_gradient(m, x, y, norm="l1"), scale_l1)
    check("jacobian_frobenius", R.jacobian_frobenius(m, x, y))
    check("cross_lipschitz", R.cross_lipschitz(m, x, y))
    check("hessian_trace", R.hessian_trace(m, x, y), scale)
    check("curvature", R.curvature(m, x, y, h=h), scale_cure)


@settings(deadline=None)
@given(networks())
def test_generic_path_matches_fast_path(case: Case):
    """The explicit first-layer path (plain Sequential) equals plain double backpropagation."""
    rj = R.jacobian_frobenius(case.model, case.x, case.y).detach()  # ‖J‖_F², the natural scale
    for name, opts in VARIANTS:
        fast = call(name, case.model, case.x, case.y, **opts)
        R._FAST_PATHS = False
        try:
            generic = call(name, case.model, case.x, case.y, **opts)
        finally:
            R._FAST_PATHS = True
        scale = (rj * case.x[0].numel()).sqrt() if opts.get("norm") == "l1" else rj
        checks.check_identity(
            variant_id((name, opts)), fast, generic, scale=saturation_scale(generic, scale)
        )


def test_gram_path_matches_generic_path():
    """Wide inputs and many cotangents take ‖aW‖² = a(WWᵀ)aᵀ; values and gradients agree."""
    model = random_network("mlp", in_shape=(64,), num_classes=10, depth=2, width=8, seed=3)
    x = torch.randn(6, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(6) % 10
    fw = R._forward(model, x, y)
    fw.sqnorm(fw.vjps(torch.randn(10, 6, 10, dtype=torch.float64)))
    assert fw._gram is not None, "the Gram path was not taken"
    params = list(model.parameters())
    for name in ("jacobian_frobenius", "cross_lipschitz", "hessian_trace"):
        fast = R.get(name)(model, x, y)
        g_fast = torch.autograd.grad(fast.sum(), params, allow_unused=True)
        R._FAST_PATHS = False
        try:
            generic = R.get(name)(model, x, y)
        finally:
            R._FAST_PATHS = True
        g_gen = torch.autograd.grad(generic.sum(), params, allow_unused=True)
        checks.check_identity(name, fast, generic)
        for a, b in zip(g_fast, g_gen, strict=True):
            if b is not None:
                checks.check_identity(f"∇_θ {name}", a.reshape(1, -1), b.reshape(1, -1))


FIRST_LAYERS = {
    "conv-stride2-groups2": (nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2), (2, 8, 8)),
    "conv-dilation2": (nn.Conv2d(2, 3, 3, dilation=2, padding=2), (2, 7, 7)),
    "conv1d-stride3": (nn.Conv1d(1, 3, 4, stride=3), (1, 11)),
    "unflatten-conv": (nn.Sequential(nn.Unflatten(1, (1, 3, 3)), nn.Conv2d(1, 2, 2)), (9,)),
}


@pytest.mark.parametrize("first", list(FIRST_LAYERS))
def test_fast_path_first_layers(first):
    """Strides (output padding), groups, dilation, 1-D convolutions, leading reshapes."""
    layer, shape = FIRST_LAYERS[first]
    layers = list(layer) if isinstance(layer, nn.Sequential) else [layer]
    torch.manual_seed(0)
    model = nn.Sequential(*layers, nn.LeakyReLU(0.1), nn.Flatten(), nn.LazyLinear(4)).double()
    x = torch.randn(3, *shape, dtype=torch.float64)
    model(x)  # materialize the lazy layer
    y = torch.tensor([0, 3, 1])
    assert R._first_affine(model) == len(layers) - 1
    for name, opts in VARIANTS:
        fast = call(name, model, x, y, **opts)
        R._FAST_PATHS = False
        try:
            generic = call(name, model, x, y, **opts)
        finally:
            R._FAST_PATHS = True
        checks.check_identity(variant_id((name, opts)), fast, generic)


def test_lenet_on_28x28_matches_reference_jacobian():
    """The book's LeNet (convolution first, max-pooling): exact values against autograd."""
    from robustreg.models import lenet

    torch.manual_seed(0)
    model = lenet(1, 10).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([3, 7])
    J = reference.logit_jacobian(model, x)
    rj = J.pow(2).sum((1, 2))
    checks.check_identity("jacobian_frobenius", R.jacobian_frobenius(model, x, y), rj)
    r_ig = reference.loss_gradient(model, x, y).pow(2).sum(1)
    scale = saturation_scale(r_ig, rj)
    checks.check_identity("input_gradient", R.input_gradient(model, x, y), r_ig, scale=scale)


def test_float32_agrees_with_float64():
    model64 = random_network("cnn", in_shape=(1, 8, 8), num_classes=5, depth=2, width=3, seed=1)
    model32 = copy.deepcopy(model64).float()
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 4, 2])
    for name, opts in VARIANTS:
        v64 = call(name, model64, x, y, **opts)
        v32 = call(name, model32, x.float(), y, **opts)
        assert v32.dtype == torch.float32 and v32.shape == (4,)
        assert torch.isfinite(v32).all()
        if name != "curvature":  # z = sign(∇ℓ) may flip on a coordinate near 0 in float32
            # float32 rounding, relative to the largest value of the batch (as before: the worst
            # |v32 − v64| over max |v64|, now through the one rule)
            scale = ("max |float64 value|", v64.detach().abs().max())
            checks.check_identity(variant_id((name, opts)), v32, v64, 1e-4, scale=scale)


def test_values_are_per_sample():
    """Each value depends only on its own sample (a batch equals its single-sample calls)."""
    model = random_network("mlp", in_shape=(5,), num_classes=4, depth=2, width=6, seed=2)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 3, 1])
    for name, opts in VARIANTS:
        if is_random(opts):
            continue
        batch = call(name, model, x, y, **opts)
        single = torch.cat(
            [call(name, model, x[i : i + 1], y[i : i + 1], **opts) for i in range(3)]
        )
        checks.check_identity(variant_id((name, opts)), batch, single)


# --- gradients with respect to the parameters ----------------------------------------------------


class _Apply(nn.Module):
    """``x -> regularizer(model, x, y)``, so that functional_call can swap the model's parameters."""

    def __init__(self, model: nn.Module, name: str, y: torch.Tensor, opts: dict):
        super().__init__()
        self.model, self.name, self.y, self.opts = model, name, y, opts

    def forward(self, x):
        return call(self.name, self.model, x, self.y, **self.opts)


TINY = {
    "mlp": dict(kind="mlp", in_shape=(3,), num_classes=3, depth=2, width=3, activation="prelu"),
    "cnn": dict(kind="cnn", in_shape=(1, 4, 4), num_classes=3, depth=2, width=2, max_pool=True),
}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_gradcheck_parameters(variant, kind, fast, monkeypatch):
    name, opts = variant
    monkeypatch.setattr(R, "_FAST_PATHS", fast)
    model = random_network(**TINY[kind], seed=5)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *TINY[kind]["in_shape"], dtype=torch.float64, generator=gen)
    y = torch.tensor([0, 2])
    wrapper = _Apply(model, name, y, opts)
    names = [f"model.{n}" for n, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in model.parameters())

    def fn(*ps):
        return torch.func.functional_call(wrapper, dict(zip(names, ps, strict=True)), (x,))

    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_training_step_gradients_match_autograd_grad():
    """``(ce + lam R.mean()).backward()`` fills .grad with the gradient of the regularized loss."""
    model = random_network("mlp", in_shape=(4,), num_classes=3, depth=2, width=5, seed=4).train()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0, 1])
    for name, opts in VARIANTS:
        model.zero_grad(set_to_none=True)
        values, logits = R.get(name)(
            model,
            x,
            y,
            return_logits=True,
            **opts,
            **({"generator": torch.Generator().manual_seed(0)} if is_random(opts) else {}),
        )
        loss = F.cross_entropy(logits, y) + 0.3 * values.mean()
        expected = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        loss.backward()
        for p, e in zip(model.parameters(), expected, strict=True):
            assert p.grad is not None and torch.equal(p.grad, e)


# --- behaviour: return_logits, no_grad, x requiring grad, mode and .grad untouched ----------------


def _small():
    model = random_network("cnn", in_shape=(1, 6, 6), num_classes=4, depth=2, width=3, seed=6)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    return model, x, torch.tensor([1, 0, 3])


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_return_logits_and_no_grad(variant):
    name, opts = variant
    model, x, y = _small()
    values, logits = R.get(name)(
        model,
        x,
        y,
        return_logits=True,
        **opts,
        **({"generator": torch.Generator().manual_seed(0)} if is_random(opts) else {}),
    )
    with torch.no_grad():
        assert torch.equal(logits.detach(), model(x))
    assert logits.requires_grad and values.requires_grad
    with torch.no_grad():
        quiet = call(name, model, x, y, **opts)
    assert not quiet.requires_grad
    checks.check_identity(variant_id(variant), quiet, values.detach())


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_mode_and_grad_untouched(variant):
    name, opts = variant
    model, x, y = _small()
    grads = {}
    for i, p in enumerate(model.parameters()):
        if i % 2:
            p.grad = torch.full_like(p, 7.0)
            grads[i] = p.grad
    for training in (True, False):
        model.train(training)
        xg = x.clone().requires_grad_(True)
        call(name, model, xg, y, **opts)
        assert all(m.training == training for m in model.modules())
        assert xg.grad is None
        for i, p in enumerate(model.parameters()):
            if i in grads:
                assert p.grad is grads[i] and bool((p.grad == 7.0).all())
            else:
                assert p.grad is None


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_x_requiring_grad_gives_same_values(variant):
    name, opts = variant
    model, x, y = _small()
    plain = call(name, model, x, y, **opts)
    xg = x.clone().requires_grad_(True)
    with_grad = call(name, model, xg, y, **opts)
    checks.check_identity(variant_id(variant), with_grad, plain)


def test_input_gradient_is_differentiable_in_x():
    """d‖∇ℓ‖²/dx = 2 ∇²ℓ ∇ℓ, against the reference Hessian."""
    model = random_network("mlp", in_shape=(5,), num_classes=4, depth=2, width=6, seed=8)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 3, 2])
    xg = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(R.input_gradient(model, xg, y).sum(), xg)
    H, g = reference.loss_hessian(model, x, y), reference.loss_gradient(model, x, y)
    expected = 2 * torch.einsum("bij,bj->bi", H, g)
    scale = saturation_scale(expected, reference.logit_jacobian(model, x).norm(dim=(1, 2)) ** 3)
    checks.check_identity("d‖∇ℓ‖²/dx = 2∇²ℓ∇ℓ", dx, expected, scale=scale)


def test_registry():
    assert R.names() == NAMES
    for name in NAMES:
        assert R.get(name) is getattr(R, name)
    with pytest.raises(ValueError) as err:
        R.get("jacobian")
    for name in NAMES:
        assert name in str(err.value)
    assert "'jacobian'" in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'curvature'"):
        R.get("curvatur")
    with pytest.raises(ValueError, match="unknown regularizer 3"):
        R.get(3)


# --- bad input -------------------------------------------------------------------------------------


def _mlp():
    model = random_network("mlp", in_shape=(4,), num_classes=3, depth=1, width=5, seed=9)
    x = torch.randn(2, 4, dtype=torch.float64)
    return model, x, torch.tensor([0, 2])


@pytest.mark.parametrize("name", NAMES)
def test_bad_labels(name):
    model, x, y = _mlp()
    fn = R.get(name)
    with pytest.raises(ValueError, match=r"label 3 is out of range.*\[0, 3\).*K = 3"):
        fn(model, x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"label -1 is out of range.*\[0, 3\)"):
        fn(model, x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(2, 1\)"):
        fn(model, x, y.view(2, 1))
    with pytest.raises(ValueError, match=r"shape \(2,\).*got shape \(3,\)"):
        fn(model, x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"torch\.int64.*torch\.int32"):
        fn(model, x, y.int())
    with pytest.raises(ValueError, match=r"torch\.int64.*torch\.float32"):
        fn(model, x, y.float())
    with pytest.raises(TypeError, match="got list"):
        fn(model, x, [0, 2])


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs(name):
    model, x, y = _mlp()
    fn = R.get(name)
    with pytest.raises(ValueError, match=r"batch dimension.*got shape \(4,\)"):
        fn(model, x[0], y[:1])
    with pytest.raises(ValueError, match=r"floating-point.*torch\.int64"):
        fn(model, x.long(), y)
    with pytest.raises(TypeError, match="got ndarray"):
        fn(model, x.numpy(), y)
    with pytest.raises(ValueError, match=r"logits of shape \[B, K\].*returned \(6,\)"):
        fn(nn.Sequential(model, nn.Flatten(0)), x, y)


@pytest.mark.parametrize("n_samples", [None, 3])
@pytest.mark.parametrize(
    "bad", [nn.Softplus(), nn.GELU(), nn.Tanh()], ids=lambda m: type(m).__name__
)
def test_hessian_trace_needs_piecewise_linear(bad, n_samples):
    model = nn.Sequential(nn.Linear(4, 5), bad, nn.Linear(5, 3)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError) as err:
        R.hessian_trace(model, x, torch.tensor([0, 1]), n_samples=n_samples)
    msg = str(err.value)
    assert "piecewise-linear" in msg and type(bad).__name__ in msg and "T7" in msg
    R.input_gradient(model, x, torch.tensor([0, 1]))  # the others accept any model


def test_bad_options():
    model, x, y = _mlp()
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; valid: l2, l1"):
        R.input_gradient(model, x, y, norm="l3")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=rf"n_proj must be None.*got {bad!r}"):
            R.jacobian_frobenius(model, x, y, n_proj=bad)
        with pytest.raises(ValueError, match=rf"n_proj must be None.*got {bad!r}"):
            R.cross_lipschitz(model, x, y, n_proj=bad)
        with pytest.raises(ValueError, match=rf"n_samples must be None.*got {bad!r}"):
            R.hessian_trace(model, x, y, n_samples=bad)
    for bad in (0, -0.1, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match="h must be a positive finite number"):
            R.curvature(model, x, y, h=bad)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        R.jacobian_frobenius(model, x, y, n_proj=1, generator=0)


def test_curvature_zero_gradient_gives_zero():
    """A sample whose loss gradient vanishes (dead network) gets z = 0 and R_CURE = 0, not NaN."""
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    x = torch.randn(2, 3, dtype=torch.float64)
    values = R.curvature(model, x, torch.tensor([0, 1]))
    assert torch.equal(values, torch.zeros(2, dtype=torch.float64))


def test_model_hooks_still_fire():
    """A forward hook on the model itself sees every forward pass (no first-layer shortcut)."""
    model = random_network("mlp", in_shape=(4,), num_classes=3, depth=2, width=5, seed=10)
    x = torch.randn(2, 4, dtype=torch.float64)
    y = torch.tensor([0, 2])
    expected = R.curvature(model, x, y)
    calls = []
    handle = model.register_forward_hook(lambda m, i, o: calls.append(o.shape))
    try:
        checks.check_identity("curvature", R.curvature(model, x, y), expected)
    finally:
        handle.remove()
    assert len(calls) == 2  # at x and at x + hz

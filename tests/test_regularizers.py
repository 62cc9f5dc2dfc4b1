"""robustreg.regularizers against independent autograd references, gradients, and bad input.

The references here (``ref_*``) compute each quantity one sample at a time with
``torch.autograd.functional.jacobian`` / ``hessian`` straight from the definitions in
book/notation.md; ``tests/test_facts.py`` and ``tests/test_estimators.py`` import them.
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

from robustreg import regularizers as R
from robustreg.models import random_network
from robustreg.notebook import relative_error

torch.set_num_threads(1)
TOL = 1e-10
ATOL = 1e-13  # × the natural scale of a quantity; see assert_identity

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


# --- independent references ---------------------------------------------------------------------


def ref_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-sample J = ∂f/∂x flattened: [B, K, d]."""
    rows = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: model(v.unsqueeze(0)).squeeze(0), xi)
        rows.append(J.reshape(J.shape[0], -1))
    return torch.stack(rows)


def _loss_fn(model: nn.Module, yi: torch.Tensor):
    return lambda v: F.cross_entropy(model(v.unsqueeze(0)), yi.view(1))


def ref_loss_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ∇ₓℓ(x, y): [B, d]."""
    return torch.stack(
        [
            torch.autograd.functional.jacobian(_loss_fn(model, yi), xi).flatten()
            for xi, yi in zip(x, y, strict=True)
        ]
    )


def ref_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ∇ₓ²ℓ(x, y): [B, d, d]."""
    d = x[0].numel()
    return torch.stack(
        [
            torch.autograd.functional.hessian(_loss_fn(model, yi), xi).reshape(d, d)
            for xi, yi in zip(x, y, strict=True)
        ]
    )


def ref_cure_direction(g: torch.Tensor) -> torch.Tensor:
    """z = sign(g)/‖sign(g)‖₂ per row (0 where g = 0)."""
    s = torch.sign(g)
    n = s.norm(dim=1, keepdim=True)
    return torch.where(n > 0, s / torch.where(n > 0, n, 1.0), s)


def ref_values(model: nn.Module, x: torch.Tensor, y: torch.Tensor, h: float) -> dict:
    """Every regularizer straight from its definition (book/notation.md)."""
    J = ref_jacobian(model, x)
    K = J.shape[1]
    g = ref_loss_grad(model, x, y)
    H = ref_hessian(model, x, y)
    z = ref_cure_direction(g)
    g_h = ref_loss_grad(model, x + h * z.reshape(x.shape), y)
    pair = J[:, :, None, :] - J[:, None, :, :]
    jf = J.norm(dim=(1, 2))
    return {
        "input_gradient": g.pow(2).sum(1),
        "input_gradient-l1": g.abs().sum(1),
        "jacobian_frobenius": J.pow(2).sum((1, 2)),
        "cross_lipschitz": pair.pow(2).sum((1, 2, 3)) / K**2,
        "hessian_trace": H.diagonal(dim1=1, dim2=2).sum(1),
        "curvature": (g_h - g).pow(2).sum(1),
        "_g": g,
        "_scale": jf**2,
        "_scale_l1": jf * math.sqrt(g.shape[1]),
        "_scale_cure": (jf + g.norm(dim=1) + g_h.norm(dim=1)) ** 2,
    }


def assert_identity(computed, reference, tol: float = TOL, scale=None) -> None:
    """‖computed_i − reference_i‖ ≤ tol·‖reference_i‖ on every case i (first dimension).

    ``scale`` (per case) adds an absolute allowance ATOL·scale_i for values below the rounding
    level of their computation: when the softmax saturates (p_k → 1), p − e_k and S = diag(p) −
    ppᵀ cancel, and autograd's references through the cross-entropy keep only an absolute
    accuracy ≈ eps·‖J‖ (‖J‖² for quadratic quantities), so relative error loses its meaning.
    """
    a = torch.as_tensor(computed).detach().double().reshape(len(computed), -1)
    b = torch.as_tensor(reference).detach().double().reshape(len(reference), -1)
    assert a.shape == b.shape, (a.shape, b.shape)
    err, allowed = (a - b).norm(dim=1), tol * b.norm(dim=1)
    if scale is not None:
        allowed = allowed + ATOL * torch.as_tensor(scale).detach().double().reshape(-1)
    bad = ~(err <= allowed)
    if bool(bad.any()):
        worst = float(relative_error(a, b).max())
        raise AssertionError(
            f"{int(bad.sum())} of {len(a)} cases off: worst relative error {worst:.3e} > {tol:.0e}"
            f" (errors {err[bad].tolist()}, allowed {allowed[bad].tolist()})"
        )


# --- values against the references --------------------------------------------------------------


@settings(deadline=None)
@given(networks())
def test_exact_values_match_autograd_references(case: Case):
    h = 1e-2
    ref = ref_values(case.model, case.x, case.y, h)
    g = ref["_g"]
    # a gradient coordinate at rounding level could take either sign in the two computations
    tiny = (g != 0) & (g.abs() < 1e-12 * g.abs().amax(1, keepdim=True))
    assume(not bool(tiny.any()))
    m, x, y = case.model, case.x, case.y
    scale = ref["_scale"]
    assert_identity(R.input_gradient(m, x, y), ref["input_gradient"], scale=scale)
    l1 = R.input_gradient(m, x, y, norm="l1")
    assert_identity(l1, ref["input_gradient-l1"], scale=ref["_scale_l1"])
    assert_identity(R.jacobian_frobenius(m, x, y), ref["jacobian_frobenius"])
    assert_identity(R.cross_lipschitz(m, x, y), ref["cross_lipschitz"])
    assert_identity(R.hessian_trace(m, x, y), ref["hessian_trace"], scale=scale)
    assert_identity(R.curvature(m, x, y, h=h), ref["curvature"], scale=ref["_scale_cure"])


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
        assert_identity(fast, generic, scale=scale)


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
        assert_identity(fast, generic)
        for a, b in zip(g_fast, g_gen, strict=True):
            if b is not None:
                assert_identity(a.reshape(1, -1), b.reshape(1, -1))


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
        assert_identity(fast, generic)


def test_lenet_on_28x28_matches_reference_jacobian():
    """The book's LeNet (convolution first, max-pooling): exact values against autograd."""
    from robustreg.models import lenet

    torch.manual_seed(0)
    model = lenet(1, 10).double().eval()
    x = torch.rand(2, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([3, 7])
    J = ref_jacobian(model, x)
    assert_identity(R.jacobian_frobenius(model, x, y), J.pow(2).sum((1, 2)))
    g = ref_loss_grad(model, x, y)
    assert_identity(R.input_gradient(model, x, y), g.pow(2).sum(1), scale=J.pow(2).sum((1, 2)))


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
            scale = v64.detach().abs().max().clamp_min(1e-30)
            assert float((v32.double() - v64).detach().abs().max() / scale) < 1e-4, (name, opts)


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
        assert_identity(batch, single)


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
    assert_identity(quiet, values.detach())


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
    assert_identity(with_grad, plain)


def test_input_gradient_is_differentiable_in_x():
    """d‖∇ℓ‖²/dx = 2 ∇²ℓ ∇ℓ, against the reference Hessian."""
    model = random_network("mlp", in_shape=(5,), num_classes=4, depth=2, width=6, seed=8)
    x = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    y = torch.tensor([0, 3, 2])
    xg = x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(R.input_gradient(model, xg, y).sum(), xg)
    H, g = ref_hessian(model, x, y), ref_loss_grad(model, x, y)
    scale = ref_jacobian(model, x).norm(dim=(1, 2)) ** 3
    assert_identity(dx, 2 * torch.einsum("bij,bj->bi", H, g), scale=scale)


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
    with pytest.raises(ValueError, match=r"unknown norm 'l3'; valid: 'l2', 'l1'"):
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
        assert_identity(R.curvature(model, x, y), expected)
    finally:
        handle.remove()
    assert len(calls) == 2  # at x and at x + hz

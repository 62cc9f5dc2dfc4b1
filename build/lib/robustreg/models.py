"""Piecewise-affine classifiers: the book's MLP and LeNet, random networks, and a linearity check.

Every network here is built from affine layers (linear, convolution), the general rectifier
σ_a(t) = max(t, 0) + a·min(t, 0) (``relu``: a = 0, ``leaky_relu``: fixed a, ``prelu``: learned a)
and max-pooling, so it is piecewise affine: the input space splits into linear regions, one per
activation pattern (book/notation.md, fact T1).

- :func:`mlp`, :func:`lenet`: the architectures the chapters train.
- :func:`random_network`: random weights, biases and PReLU slopes, to check the facts T1–T12 on
  many architectures (tests and notebooks).
- :func:`is_piecewise_linear`, :func:`check_piecewise_linear`: whether a module is built only
  from pieces this package knows to be piecewise affine.
- :func:`smooth_copy`: the same network with smooth rectifiers, a negative control for checks of
  T1; :class:`Float32Logits`: a float32 interface for attack libraries.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "leaky_relu", "prelu")
KINDS = ("mlp", "cnn", "resmlp", "rescnn")


def _check_activation(activation: str, negative_slope: float) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
    if activation != "relu" and not (
        isinstance(negative_slope, int | float) and math.isfinite(negative_slope)
    ):
        raise ValueError(
            f"negative_slope must be a finite real number (σ_a, any slope a); got {negative_slope!r}"
        )


class Residual(nn.Module):
    """A skip connection around ``block``: x ↦ x + block(x).

    A sum of two piecewise-affine maps is piecewise affine (fact T1 for directed acyclic
    graphs, book chapter 01): on the common refinement of their regions both are affine. The
    block must keep the shape of its input.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def make_activation(
    activation: str = "relu", negative_slope: float = 0.01, num_parameters: int = 1
) -> nn.Module:
    """The rectifier σ_a as a module: ``nn.ReLU``, ``nn.LeakyReLU(a)`` or ``nn.PReLU`` (a learned,
    initialized to ``negative_slope``; ``num_parameters`` slopes, one per channel when > 1)."""
    _check_activation(activation, negative_slope)
    if activation == "relu":
        return nn.ReLU()
    if activation == "leaky_relu":
        return nn.LeakyReLU(negative_slope)
    return nn.PReLU(num_parameters=num_parameters, init=negative_slope)


def mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    negative_slope: float = 0.01,
) -> nn.Sequential:
    """Multilayer perceptron ``Flatten → (Linear → σ_a)×len(hidden) → Linear``.

    Accepts ``[B, in_features]`` or any ``[B, *shape]`` with ``prod(shape) == in_features``
    (e.g. images ``[B, C, H, W]``) and returns logits ``[B, num_classes]``.
    """
    _check_activation(activation, negative_slope)
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), make_activation(activation, negative_slope)]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def lenet(
    in_channels: int = 1,
    num_classes: int = 10,
    activation: str = "relu",
    negative_slope: float = 0.01,
    input_size: int | Sequence[int] = 28,
) -> nn.Sequential:
    """LeNet-5-style CNN for ``[B, in_channels, H, W]`` inputs, ``(H, W) = input_size``.

    ``Conv(5×5, 6, pad 2) → σ_a → MaxPool(2) → Conv(5×5, 16) → σ_a → MaxPool(2) → Flatten →
    Linear(120) → σ_a → Linear(84) → σ_a → Linear(num_classes)``. On 28×28 (MNIST) the second
    convolution is unpadded (14 → 10 → 5, the classic 16·5·5 features); on small inputs such as
    the 8×8 digits it is padded by 2 (4 → 4 → 2).
    """
    _check_activation(activation, negative_slope)
    h, w = _pair(input_size)
    if min(h, w) < 4:
        raise ValueError(f"lenet needs inputs of at least 4×4; got input_size={input_size!r}")
    h, w = h // 2, w // 2
    pad = 0 if min(h, w) >= 8 else 2
    h, w = (h + 2 * pad - 4) // 2, (w + 2 * pad - 4) // 2

    def act() -> nn.Module:
        return make_activation(activation, negative_slope)

    return nn.Sequential(
        nn.Conv2d(in_channels, 6, 5, padding=2),
        act(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, padding=pad),
        act(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * h * w, 120),
        act(),
        nn.Linear(120, 84),
        act(),
        nn.Linear(84, num_classes),
    )


def random_network(
    kind: str = "mlp",
    in_shape: Sequence[int] = (10,),
    num_classes: int = 3,
    depth: int = 2,
    width: int = 16,
    activation: str = "relu",
    negative_slope: float = 0.1,
    max_pool: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    slopes: tuple[float, float] = (0.0, 0.5),
) -> nn.Sequential:
    """A random piecewise-affine classifier in eval mode, for checking facts on many architectures.

    - ``kind="mlp"``: ``Flatten → (Linear(width) → σ_a [→ MaxPool1d(2)])×depth → Linear(K)``;
      ``in_shape`` is any shape (flattened to ``d = prod(in_shape)``).
    - ``kind="cnn"``: ``(Conv2d(3×3, width channels, pad 1) → σ_a [→ MaxPool2d(2)])×depth →
      Flatten → Linear(K)``; ``in_shape = (C, H, W)``. Pooling is applied while the feature maps
      are at least 2×2.
    - ``kind="resmlp"``: ``Flatten → Linear(width) → σ_a → (Residual(Linear → σ_a → Linear) →
      σ_a [→ MaxPool1d(2)])×depth → Linear(K)``: skip connections, x ↦ x + block(x)
      (:class:`Residual`).
    - ``kind="rescnn"``: ``Conv2d(3×3, width) → σ_a → (Residual(Conv → σ_a → Conv) → σ_a
      [→ MaxPool2d(2)])×depth → Flatten → Linear(K)``.

    Weights are N(0, 2/fan_in) (N(0, 1/fan_in) for the last layer), biases N(0, 0.5²) so that
    inputs x ~ N(0, I) meet many region boundaries (the second layer of a residual block is
    scaled by ½ more, so that depth does not blow up the scale); with ``activation="prelu"``
    each rectifier gets per-unit (MLP) or per-channel (CNN) slopes drawn uniformly from
    ``slopes`` (any real interval: T1–T12 hold for every slope), and ``negative_slope`` is
    ignored. Deterministic given ``seed``; parameters require grad.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    _check_activation(activation, negative_slope)
    if not 1 <= depth:
        raise ValueError(f"depth must be ≥ 1; got {depth!r}")
    if width < 1 or num_classes < 1:
        raise ValueError(f"width and num_classes must be ≥ 1; got {width!r}, {num_classes!r}")
    if not (len(slopes) == 2 and all(math.isfinite(v) for v in slopes) and slopes[0] <= slopes[1]):
        raise ValueError(f"slopes must be a finite interval (lo, hi) with lo ≤ hi; got {slopes!r}")
    in_shape = tuple(int(s) for s in in_shape)
    gen = torch.Generator().manual_seed(seed)

    def act(n: int) -> nn.Module:
        return make_activation(activation, negative_slope, num_parameters=n)

    layers: list[nn.Module] = []
    damped: list[nn.Module] = []  # second affine layer of each residual block

    def block(first: nn.Module, second: nn.Module, n: int) -> nn.Module:
        damped.append(second)
        return Residual(nn.Sequential(first, act(n), second))

    if kind in ("mlp", "resmlp"):
        layers.append(nn.Flatten())
        n = math.prod(in_shape)
        if kind == "resmlp":
            layers += [nn.Linear(n, width), act(width)]
            n = width
        for _ in range(depth):
            if kind == "mlp":
                layers += [nn.Linear(n, width), act(width)]
                n = width
            else:
                layers += [block(nn.Linear(n, n), nn.Linear(n, n), n), act(n)]
            if max_pool and n >= 2:
                layers += [nn.Unflatten(1, (1, n)), nn.MaxPool1d(2), nn.Flatten()]
                n //= 2
        layers.append(nn.Linear(n, num_classes))
    else:
        if len(in_shape) != 3:
            raise ValueError(f"kind={kind!r} needs in_shape=(C, H, W); got {in_shape!r}")
        c, h, w = in_shape
        if kind == "rescnn":
            layers += [nn.Conv2d(c, width, 3, padding=1), act(width)]
            c = width
        for _ in range(depth):
            if kind == "cnn":
                layers += [nn.Conv2d(c, width, 3, padding=1), act(width)]
                c = width
            else:
                conv = [nn.Conv2d(c, c, 3, padding=1) for _ in range(2)]
                layers += [block(*conv, c), act(c)]
            if max_pool and min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    model = nn.Sequential(*layers).to(dtype)

    affine = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    with torch.no_grad():
        for i, m in enumerate(affine):
            fan_in = m.weight[0].numel()
            gain = 1.0 if i == len(affine) - 1 else 2.0
            if any(m is d for d in damped):
                gain /= 4.0  # std halved
            m.weight.copy_(
                torch.randn(m.weight.shape, generator=gen, dtype=dtype) * (gain / fan_in) ** 0.5
            )
            m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen, dtype=dtype))
        lo, hi = slopes
        for m in model.modules():
            if isinstance(m, nn.PReLU):
                m.weight.copy_(
                    lo + (hi - lo) * torch.rand(m.weight.shape, generator=gen, dtype=dtype)
                )
    return model.eval()


# --- piecewise-linearity check -----------------------------------------------------------------

RECTIFIERS = (nn.ReLU, nn.LeakyReLU, nn.PReLU)
MAX_POOLS = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)
AFFINE = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.ZeroPad1d,
    nn.ZeroPad2d,
    nn.ZeroPad3d,
    nn.ConstantPad1d,
    nn.ConstantPad2d,
    nn.ConstantPad3d,
)
DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _offence(module: nn.Module) -> str | None:
    """Why one leaf module is not (known to be) piecewise affine, or None if it is."""
    kind = type(module).__name__
    if isinstance(module, RECTIFIERS + MAX_POOLS + AFFINE):
        return None
    if isinstance(module, DROPOUTS):
        return None if not module.training else f"{kind} in training mode (random)"
    if isinstance(module, BATCH_NORMS):
        if module.training:
            return f"{kind} in training mode (normalizes by batch statistics)"
        if not module.track_running_stats or module.running_mean is None:
            return f"{kind} without running statistics (normalizes by batch statistics)"
        return None
    return f"{kind} (not a known piecewise-affine module)"


def _first_offence(model: nn.Module) -> str | None:
    for name, module in model.named_modules():
        if next(module.children(), None) is not None:
            continue  # containers and custom modules: their children are checked
        reason = _offence(module)
        if reason is not None:
            return f"{reason} at {name or '<root>'!r}"
    return None


def check_piecewise_linear(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first module that is not known to be piecewise affine.

    Allowed leaves: Linear, Conv*/ConvTranspose*, AvgPool*/AdaptiveAvgPool*, Flatten, Unflatten,
    Identity, zero/constant padding, Dropout in eval mode, BatchNorm* in eval mode with running
    statistics, the rectifiers ReLU, LeakyReLU, PReLU (σ_a), and MaxPool*/AdaptiveMaxPool*.
    Everything else (Softplus, GELU, Sigmoid, Tanh, ELU, LayerNorm, any unknown leaf, BatchNorm or
    Dropout in training mode) is rejected. Modules with children (Sequential, custom modules) are
    judged by their children: functions called inside a custom ``forward`` (``F.gelu(...)``) are
    invisible to this check.
    """
    reason = _first_offence(model)
    if reason is not None:
        raise ValueError(f"model is not piecewise linear: {reason}")


def is_piecewise_linear(model: nn.Module) -> bool:
    """Whether :func:`check_piecewise_linear` accepts ``model``."""
    return _first_offence(model) is None


def device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of the model's first floating-point parameter (where its inputs go)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError("the model has no floating-point parameters")


@torch.no_grad()
def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """K, the number of logits the model gives for one sample of ``x``."""
    device, dtype = device_dtype(model)
    mode = model.training
    model.eval()  # no batch-norm statistics touched, no dropout drawn
    try:
        return int(model(x[:1].to(device, dtype)).shape[-1])
    finally:
        model.train(mode)


class Float32Logits(nn.Module):
    """``model`` behind a float32 interface: inputs cast to the model's dtype, logits back to
    float32 — for attack libraries (ART, torchattacks) that compute in float32 only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.dtype = device_dtype(model)[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def smooth_copy(model: nn.Module, beta: float = 1.0) -> nn.Module:
    """A copy of ``model`` with every rectifier σ_a replaced by a smooth one,
    t ↦ a·t + (1 − a)·softplus_β(t) (softplus_β(t) = log(1 + e^{βt})/β → max(t, 0) as β → ∞);
    same weights. Not piecewise affine: its Jacobian changes at every step, so a check of T1
    that still passes on it cannot tell the two kinds of network apart (a negative control)."""
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    copy_ = copy.deepcopy(model)
    for module in list(copy_.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, RECTIFIERS):
                setattr(module, child_name, _SmoothRectifier(negative_slope(child), beta))
    return copy_


def negative_slope(rectifier: nn.Module) -> torch.Tensor:
    """The negative slope a of a rectifier σ_a (``ReLU``: 0, ``LeakyReLU``: its slope, ``PReLU``:
    its weight, one per channel for a multi-slope PReLU), as a float64 tensor (a float32 one
    would round a LeakyReLU's Python-float slope)."""
    if isinstance(rectifier, nn.PReLU):
        return rectifier.weight.detach().to(torch.float64, copy=True)
    if isinstance(rectifier, nn.LeakyReLU):
        return torch.tensor([rectifier.negative_slope], dtype=torch.float64)
    if isinstance(rectifier, nn.ReLU):
        return torch.zeros(1, dtype=torch.float64)
    raise TypeError(f"not a rectifier (ReLU, LeakyReLU, PReLU): {type(rectifier).__name__}")


class _SmoothRectifier(nn.Module):
    def __init__(self, slope: torch.Tensor, beta: float):
        super().__init__()
        self.register_buffer("slope", slope)
        self.beta = beta

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        a = self.slope.to(t.dtype)
        if a.numel() > 1:  # one slope per channel (dimension 1), as nn.PReLU
            a = a.view(1, -1, *[1] * (t.dim() - 2))
        return a * t + (1 - a) * nn.functional.softplus(t, beta=self.beta)

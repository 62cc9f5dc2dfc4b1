"""Random test cases for checking the book's facts over many architectures.

:func:`random_cases` draws piecewise-affine classifiers with :func:`robustreg.models.random_network`
— MLPs and CNNs (and, on request, their residual forms) of depth 1–4, ReLU / leaky ReLU / PReLU
with slopes a ∈ [0, 0.4) (leaky ReLU; PReLU draws per-unit slopes in [0, 0.5)), with and without
max-pooling, K ∈ {2, …, 12} classes — together with
inputs and labels, all in float64 and deterministic given the seed. The notebooks use it for their "(a) random networks" checks.

:func:`degenerate_cases` builds, on purpose, the networks a random draw almost never meets but a
trained network can: a *dead* network (the last hidden layer's rectifiers all off at the samples,
so no active path reaches the logits: J = 0, constant logits on the region, an infinite margin
radius), a *constant* one (the output layer ignores its input: J = 0 everywhere) and a *tied* one
(two coinciding logit rows, ∇f_k = ∇f_l for every x). Every fact must hold there too, with the
infinite radii that such networks have.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .models import KINDS, random_network

ACTIVATIONS = ("relu", "leaky_relu", "prelu")
#: The kinds of :func:`degenerate_cases`.
DEGENERACIES = ("dead", "constant", "tied")


@dataclass
class Case:
    """One drawn case: a network, a batch of inputs ``x`` and labels ``y``; ``K`` classes."""

    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    K: int
    description: str


def random_case(
    index: int,
    seed: int = 0,
    batch: int = 3,
    dtype: torch.dtype = torch.float64,
    kinds: tuple[str, ...] = ("mlp", "cnn"),
) -> Case:
    """The ``index``-th case of the stream of seed ``seed``: its kind is ``kinds[index % len(kinds)]``
    (``mlp``, ``resmlp`` on R¹²; ``cnn``, ``rescnn`` on 1×6×6)."""
    unknown = [k for k in kinds if k not in KINDS]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty tuple of {', '.join(KINDS)}; got {kinds!r}")
    case_seed = seed * 1_000_003 + index
    gen = torch.Generator().manual_seed(case_seed)

    def draw(n: int) -> int:
        return int(torch.randint(n, (1,), generator=gen))

    kind = kinds[index % len(kinds)]
    in_shape = (12,) if kind in ("mlp", "resmlp") else (1, 6, 6)
    draw(11)  # (kept so that the rest of the stream is unchanged)
    # K cycles through 2, …, 12 over every 11·len(kinds) consecutive cases (every kind alike): a
    # chapter that checks ≥ 22 cases of two kinds meets every K, the two-class case included
    K = 2 + (index // len(kinds) + seed) % 11
    depth, width = 1 + draw(4), 4 + draw(12)
    activation = ACTIVATIONS[draw(3)]
    slope = 0.4 * float(torch.rand(1, generator=gen, dtype=torch.float64))
    max_pool = bool(draw(2))
    model = random_network(
        kind=kind,
        in_shape=in_shape,
        num_classes=K,
        depth=depth,
        width=width,
        activation=activation,
        negative_slope=slope,
        max_pool=max_pool,
        seed=case_seed,
        dtype=dtype,
    )
    x = torch.randn(batch, *in_shape, generator=gen, dtype=dtype)
    y = torch.randint(K, (batch,), generator=gen)
    description = (
        f"{kind} depth {depth} width {width} {activation}"
        f"{f' a={slope:.2f}' if activation == 'leaky_relu' else ''}{' maxpool' if max_pool else ''} K={K}"
    )
    return Case(model, x, y, K, description)


def random_cases(
    n: int,
    seed: int = 0,
    batch: int = 3,
    dtype: torch.dtype = torch.float64,
    kinds: tuple[str, ...] = ("mlp", "cnn"),
) -> Iterator[Case]:
    """``n`` cases, cycling through ``kinds`` (default: alternating MLPs and CNNs; see
    :func:`random_case`)."""
    if n < 1:
        raise ValueError(f"n must be ≥ 1, got {n!r}")
    for index in range(n):
        yield random_case(index, seed=seed, batch=batch, dtype=dtype, kinds=kinds)


def degenerate(case: Case, how: str) -> Case:
    """A copy of ``case`` made degenerate (see the module docstring): ``"dead"`` (the last hidden
    layer's biases lowered so that its ReLUs are off at every sample of ``case.x``), ``"constant"``
    (the output layer's weights zeroed) or ``"tied"`` (the output layer's second row set to its
    first: f₁ ≡ f₀)."""
    if how not in DEGENERACIES:
        raise ValueError(f"unknown degeneracy {how!r}; valid: {', '.join(DEGENERACIES)}")
    model = copy.deepcopy(case.model)
    affine = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    last = affine[-1]
    with torch.no_grad():
        if how == "constant":
            last.weight.zero_()
        elif how == "tied":
            last.weight[1] = last.weight[0]
            last.bias[1] = last.bias[0]
        else:  # dead: a hidden layer whose pre-activations are < 0 at every sample
            hidden = affine[-2]
            captured = []
            handle = hidden.register_forward_hook(lambda m, i, o: captured.append(o))
            model(case.x)
            handle.remove()
            z = captured[0].transpose(0, 1).flatten(1)  # [units or channels, everything else]
            hidden.bias -= z.max(1).values + 1.0
    description = f"{case.description} ({how})"
    return Case(model.eval(), case.x, case.y, case.K, description)


def degenerate_cases(
    seed: int = 0, batch: int = 3, dtype: torch.dtype = torch.float64
) -> list[Case]:
    """Degenerate networks of every kind in :data:`DEGENERACIES`, built from ReLU MLPs and CNNs
    without max-pooling (one of each, K ≥ 2), deterministic given ``seed``."""
    out = []
    for kind in ("mlp", "cnn"):
        for i, how in enumerate(DEGENERACIES):
            case_seed = 7_000_003 * (seed + 1) + 10 * i + (kind == "cnn")
            in_shape = (12,) if kind == "mlp" else (1, 6, 6)
            K = 2 + i  # the two-class case included (dead networks have an infinite margin)
            model = random_network(
                kind=kind,
                in_shape=in_shape,
                num_classes=K,
                depth=2,
                width=6,
                activation="relu",
                max_pool=False,
                seed=case_seed,
                dtype=dtype,
            )
            gen = torch.Generator().manual_seed(case_seed)
            x = torch.randn(batch, *in_shape, generator=gen, dtype=dtype)
            y = torch.randint(K, (batch,), generator=gen)
            base = Case(model, x, y, K, f"{kind} depth 2 width 6 relu K={K}")
            out.append(degenerate(base, how))
    return out

"""Random test cases for checking the book's facts over many architectures.

:func:`random_cases` draws piecewise-affine classifiers with :func:`robustreg.models.random_network`
— MLPs and CNNs (and, on request, their residual forms) of depth 1–4, ReLU / leaky ReLU / PReLU
with slopes a ∈ [0, 0.4) (leaky ReLU; PReLU draws per-unit slopes in [0, 0.5)), with and without
max-pooling, K ∈ {2, …, 12} classes — together with
inputs and labels, all in float64 and deterministic given the seed. The notebooks use it for their "(a) random networks" checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .models import KINDS, random_network

ACTIVATIONS = ("relu", "leaky_relu", "prelu")


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

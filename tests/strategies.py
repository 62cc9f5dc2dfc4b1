"""Hypothesis strategies for random piecewise-affine classifiers (shared by the test modules).

Interface (stable; other test modules import it)::

    from strategies import Case, networks

    @given(networks())                       # MLPs, CNNs and their residual forms, every option
    @given(networks(kinds=("mlp",), max_pool=False, min_classes=2, max_classes=2))
    def test_something(case: Case):
        case.model   # nn.Sequential from robustreg.models.random_network, eval mode, float64
        case.x       # float64 inputs [B, *in_shape], B in [min_batch, max_batch] (default 2..6), x ~ N(0, I)
        case.y       # int64 labels [B], uniform in range(K)
        case.K       # number of classes
        case.params  # dict of the random_network arguments (kind, in_shape, depth, width, ...)

``networks(kinds=("mlp", "cnn", "resmlp", "rescnn"), activations=("relu", "leaky_relu", "prelu"), max_pool=None,
min_depth=1, max_depth=4, min_classes=2, max_classes=12, min_batch=2, max_batch=6)``;
``max_pool=None`` draws it, True/False fixes it. Shapes are small so that property tests are fast:
MLP inputs (d,) with d in 2..12 and widths 2..16; CNN inputs (1, 8, 8) or (2, 6, 6) with 2..4
channels per layer (the residual kinds keep that width through their blocks). Negative slopes a
are 0 (a ReLU written as a leaky ReLU) or drawn from [MIN_SLOPE, 0.5) or, since T1–T12 hold for
any real slope, from [−1, −MIN_SLOPE] ∪ [1, 2) (a non-monotone or an expanding rectifier); PReLU
draws its own per-channel slopes from [0, 0.5) or [−1, 2). The excluded interval (0, MIN_SLOPE) is a stated rule, not a tuning: at 400 draws hypothesis reached slopes like 1e-292 and
2e-311, where a·s underflows to subnormal numbers. The network is then numerically another
piecewise-affine map than its formula (region boundaries decided by the signs of subnormals, and a
tolerance scaled by such products underflows to 0), which no float64 identity check can follow;
practical leaky ReLUs use a ≥ 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

from robustreg.models import ACTIVATIONS, KINDS, random_network

#: The smallest nonzero negative slope drawn (see the module docstring).
MIN_SLOPE = 1e-4
CNN_SHAPES = ((1, 8, 8), (2, 6, 6))


@dataclass
class Case:
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    K: int
    params: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return f"Case(K={self.K}, B={self.x.shape[0]}, params={self.params})"


@st.composite
def networks(
    draw,
    kinds: tuple[str, ...] = KINDS,
    activations: tuple[str, ...] = ACTIVATIONS,
    max_pool: bool | None = None,
    min_depth: int = 1,
    max_depth: int = 4,
    min_classes: int = 2,
    max_classes: int = 12,
    min_batch: int = 2,
    max_batch: int = 6,
) -> Case:
    kind = draw(st.sampled_from(kinds))
    if kind in ("mlp", "resmlp"):
        in_shape = (draw(st.integers(2, 12)),)
        width = draw(st.integers(2, 16))
    else:
        in_shape = draw(st.sampled_from(CNN_SHAPES))
        width = draw(st.integers(2, 4))
    params = dict(
        kind=kind,
        in_shape=in_shape,
        num_classes=draw(st.integers(min_classes, max_classes)),
        depth=draw(st.integers(min_depth, max_depth)),
        width=width,
        activation=draw(st.sampled_from(activations)),
        negative_slope=draw(
            st.just(0.0)
            | st.floats(MIN_SLOPE, 0.5, exclude_max=True)
            | st.floats(-1.0, -MIN_SLOPE)
            | st.floats(1.0, 2.0, exclude_max=True)
        ),
        slopes=draw(st.sampled_from([(0.0, 0.5), (-1.0, 2.0)])),
        max_pool=draw(st.booleans()) if max_pool is None else max_pool,
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    model = random_network(**params, dtype=torch.float64)
    batch = draw(st.integers(min_batch, max_batch))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((batch, *in_shape), generator=gen, dtype=torch.float64)
    y = torch.randint(params["num_classes"], (batch,), generator=gen)
    return Case(model=model, x=x, y=y, K=params["num_classes"], params=params)

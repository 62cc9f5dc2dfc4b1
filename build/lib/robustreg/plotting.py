"""Reusable figures of the book (matplotlib). Each function draws on a given ``Axes`` and returns it."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robustreg.extras import require

from .geometry import activation_pattern

#: How tables and legends name the training methods of the experiment grid
#: (:func:`robustreg.study.grid.label`): plain training, the five regularizers, and PGD
#: adversarial training against ℓ∞ and against ℓ2.
METHOD_NAMES = {
    "plain": "plain",
    "input_gradient": "input gradient",
    "jacobian_frobenius": "Jacobian",
    "cross_lipschitz": "cross-Lipschitz",
    "curvature": "CURE",
    "hessian_trace": "Hessian trace",
    "adversarial": "PGD training ℓ∞",
    "adversarial-l2": "PGD training ℓ2",
}


def grid_2d(
    xlim, ylim, resolution: int = 300, dtype=None
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """A ``resolution × resolution`` grid over ``xlim × ylim``: (points [R², 2], xs, ys)."""
    xs = np.linspace(*xlim, resolution)
    ys = np.linspace(*ylim, resolution)
    gx, gy = np.meshgrid(xs, ys)
    points = torch.tensor(
        np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype or torch.get_default_dtype()
    )
    return points, xs, ys


@torch.no_grad()
def region_ids(model: nn.Module, points: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """An integer id per point, equal for two points iff they share an activation pattern."""
    patterns = torch.cat([activation_pattern(model, p) for p in points.split(batch_size)])
    _, ids = torch.unique(patterns, dim=0, return_inverse=True)
    return ids


def linear_regions(
    model: nn.Module,
    ax,
    xlim=(-0.1, 1.1),
    ylim=(-0.1, 1.1),
    resolution: int = 300,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
):
    """Draw the linear regions of a 2-D classifier (one random colour per activation pattern),
    its decision boundary (where the top two logits tie) and optionally the data points.

    Returns ``(ax, number_of_regions_seen_on_the_grid)``.
    """
    points, xs, ys = grid_2d(xlim, ylim, resolution)
    ids = region_ids(model, points).numpy().reshape(resolution, resolution)
    n_regions = int(ids.max()) + 1
    rng = np.random.default_rng(seed)
    palette = rng.uniform(0.35, 0.95, size=(n_regions, 3))
    ax.grid(False)
    ax.imshow(
        palette[ids], origin="lower", extent=(*xlim, *ylim), interpolation="nearest", aspect="auto"
    )
    with torch.no_grad():
        logits = model(points)
    pred = logits.argmax(1).numpy().reshape(resolution, resolution)
    # the decision boundary: where the predicted class changes (margin → 0)
    ax.contour(xs, ys, pred, levels=np.arange(logits.shape[1]) + 0.5, colors="k", linewidths=1.5)
    if data is not None:
        x, y = data
        ax.scatter(x[:, 0], x[:, 1], c=y, cmap="coolwarm", s=6, edgecolors="k", linewidths=0.2)
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_xlabel("$x_1$")
    ax.set_ylabel("$x_2$")
    return ax, n_regions


def scatter_matrix(
    values: dict[str, np.ndarray],
    rho: np.ndarray | None = None,
    highlight: np.ndarray | None = None,
    log: bool = True,
    size: float = 1.7,
):
    """Pairwise scatter plots of per-sample values, e.g. several regularizers on one test set.

    ``values`` maps a label to an array of N values (positive when ``log``). Lower triangle: one
    scatter plot per pair (log–log when ``log``); diagonal: a histogram of each quantity; upper
    triangle: the number ``rho[i, j]`` (e.g. a rank correlation), shaded by its size.
    ``highlight``: a boolean array [N]; those points are drawn on top in a second colour.
    Returns the Figure.
    """
    require("matplotlib")
    import matplotlib.pyplot as plt

    labels = list(values)
    n = len(labels)
    data = [np.asarray(values[k], dtype=float) for k in labels]
    if log:
        bad = [k for k, v in zip(labels, data, strict=True) if np.any(v <= 0)]
        if bad:
            raise ValueError(f"log scale needs positive values; not positive: {bad}")
    mark = np.zeros(len(data[0]), bool) if highlight is None else np.asarray(highlight, bool)
    fig, axes = plt.subplots(n, n, figsize=(size * n, size * n), squeeze=False)
    for i in range(n):
        for j in range(n):
            ax = axes[i, j]
            if i == j:
                v = np.log10(data[i]) if log else data[i]
                ax.hist(v, bins=30, color="C0", alpha=0.8)
                ax.set_yticks([])
                if log:
                    ax.xaxis.set_major_formatter(
                        plt.FuncFormatter(lambda t, _: f"$10^{{{t:.0f}}}$")
                    )
            elif i > j:
                ax.scatter(data[j][~mark], data[i][~mark], s=3, color="C0", alpha=0.6, linewidths=0)
                ax.scatter(data[j][mark], data[i][mark], s=6, color="C1", linewidths=0)
                if log:
                    ax.set_xscale("log")
                    ax.set_yscale("log")
            else:
                ax.axis("off")
                if rho is not None:
                    r = float(rho[i, j])
                    ax.text(
                        0.5,
                        0.5,
                        f"ρ = {r:.2f}",
                        ha="center",
                        va="center",
                        transform=ax.transAxes,
                        fontsize=11,
                        bbox=dict(
                            boxstyle="round", fc=plt.cm.Blues(0.15 + 0.6 * abs(r)), ec="none"
                        ),
                    )
            ax.tick_params(labelsize=7)
            if i < n - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel(labels[j])
            if j > 0 and i != j:
                ax.set_yticklabels([])
            elif j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            ax.minorticks_off()
    fig.tight_layout()
    return fig


def logits_along_line(model: nn.Module, ax, x0: torch.Tensor, v: torch.Tensor, t: torch.Tensor):
    """Plot every logit f_k(x0 + t v) against t, with a grey line where the activation pattern
    changes between consecutive values of t (a region boundary). Returns ``(ax, n_boundaries)``."""
    line = x0 + t[:, None] * v
    with torch.no_grad():
        logits = model(line)
    pattern = activation_pattern(model, line)
    kinks = t[1:][(pattern[1:] != pattern[:-1]).any(dim=1)]
    for k in range(logits.shape[1]):
        ax.plot(t, logits[:, k], label=f"$f_{k}(x + t v)$")
    for s in kinks:
        ax.axvline(float(s), color="0.7", lw=0.6, zorder=0)
    ax.set_xlabel("$t$")
    ax.set_ylabel("logit")
    ax.legend()
    return ax, len(kinks)

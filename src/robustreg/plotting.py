"""Reusable figures of the book (matplotlib), and the one style every figure shares.

Each drawing function draws on a given ``Axes`` and returns it. :func:`use_book_style` sets the
book's style (called by :func:`robustreg.notebook.setup`); :func:`legible` checks a finished
figure against the rules the browser check enforces on the built page (text ≥ :data:`MIN_FONT_PT`
at the size the page shows it, no overlapping labels) before it is glued.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from robustreg.extras import require

from .geometry import activation_pattern
from .study.grid import baseline_radius

#: How tables and legends name the training methods of the experiment grid
#: (:func:`robustreg.study.grid.label`): plain training, the regularizers, and PGD adversarial
#: training against ℓ∞ and against ℓ2 (at the radius in the name where it is not 0.1 or 1).
METHOD_NAMES = {
    "plain": "plain",
    "input_gradient": "input gradient",
    "jacobian_frobenius": "Jacobian",
    "cross_lipschitz": "cross-Lipschitz",
    "curvature": "CURE",
    "hessian_trace": "Hessian trace",
    "grad_align": "GradAlign",
    "local_linearity": "local linearity",
    "adversarial": "PGD training ℓ∞",
    "adversarial-l2": "PGD training ℓ2",
    # the converged study's baselines at other radii (ℓ∞ 0.1 and ℓ2 1 are the two above)
    "adversarial-eps0.01": "PGD training ℓ∞ 0.01",
    "adversarial-eps0.03": "PGD training ℓ∞ 0.03",
    "adversarial-eps0.05": "PGD training ℓ∞ 0.05",
    "adversarial-l2-eps0.3": "PGD training ℓ2 0.3",
    "adversarial-l2-eps0.6": "PGD training ℓ2 0.6",
    "adversarial-l2-eps1.5": "PGD training ℓ2 1.5",
}

#: Okabe & Ito's palette by name, told apart by the common colour-vision deficiencies, and a
#: neutral grey (the study has more methods than the palette has colours).
COLORS = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
    "grey": "#7F7F7F",
}
#: The same colours as a list, in Okabe & Ito's order (grey last).
PALETTE = list(COLORS.values())

#: One look per training method in every chapter: a colour of :data:`COLORS` *and* a marker and a
#: line style, so that methods stay apart in greyscale and for colour-blind readers.
METHOD_STYLE = {
    "plain": dict(color=COLORS["black"], marker="o", linestyle="-"),
    "input_gradient": dict(color=COLORS["orange"], marker="s", linestyle="--"),
    "jacobian_frobenius": dict(color=COLORS["sky blue"], marker="^", linestyle="-."),
    "cross_lipschitz": dict(color=COLORS["green"], marker="D", linestyle=":"),
    "curvature": dict(color=COLORS["vermillion"], marker="v", linestyle="-"),
    "hessian_trace": dict(color=COLORS["purple"], marker="P", linestyle="--"),
    "adversarial": dict(color=COLORS["blue"], marker="X", linestyle="-."),
    "adversarial-l2": dict(color=COLORS["blue"], marker="h", linestyle=":"),
    "grad_align": dict(color=COLORS["grey"], marker="*", linestyle="--"),
    "local_linearity": dict(color=COLORS["green"], marker="p", linestyle="-"),
    "adversarial-eps0.01": dict(color=COLORS["blue"], marker="<", linestyle="-."),
    "adversarial-eps0.03": dict(color=COLORS["blue"], marker=">", linestyle="-."),
    "adversarial-eps0.05": dict(color=COLORS["blue"], marker="8", linestyle="-."),
    "adversarial-l2-eps0.3": dict(color=COLORS["blue"], marker="d", linestyle=":"),
    "adversarial-l2-eps0.6": dict(color=COLORS["blue"], marker="1", linestyle=":"),
    "adversarial-l2-eps1.5": dict(color=COLORS["blue"], marker="H", linestyle=":"),
}


def method_name(method: str) -> str:
    """How the book names a training method: :data:`METHOD_NAMES`, or for PGD training at a
    radius of its own (a study's selected baselines, ``adversarial-eps0.0132``,
    ``adversarial-l2-eps0.417``) "PGD training ℓ∞ 0.0132"."""
    if method in METHOD_NAMES:
        return METHOD_NAMES[method]
    norm, eps = _baseline_norm(method)
    return f"{METHOD_NAMES['adversarial' if norm == 'linf' else 'adversarial-l2']} {eps:g}"


def method_style(method: str) -> dict:
    """The colour, marker and line style of a training method (:data:`METHOD_STYLE`; PGD training
    at a radius of its own takes its norm's)."""
    if method in METHOD_STYLE:
        return dict(METHOD_STYLE[method])
    norm, _ = _baseline_norm(method)
    return dict(METHOD_STYLE["adversarial" if norm == "linf" else "adversarial-l2"])


def config_name(method: str, lam: float = 0.0, *, short: bool = False) -> str:
    """A configuration as prose names it: "plain training", "PGD-ℓ∞ training at ε = 0.0477",
    "CURE at λ = 2.86"; ``short``: as a table row or a legend names it (:func:`short_name`)."""
    if method == "plain":
        return "plain" if short else "plain training"
    joint = ", " if short else " at "
    if method.startswith("adversarial"):
        norm, eps = baseline_radius(method)
        kind = f"PGD-{'ℓ2' if norm == 'l2' else 'ℓ∞'}" + ("" if short else " training")
        return f"{kind}{joint}ε = {eps:g}"
    return method_name(method) + (f"{joint}λ = {lam:g}" if lam else "")


def short_name(method: str, lam: float = 0.0) -> str:
    """A configuration as a table row or a legend names it: "plain", "PGD-ℓ∞, ε = 0.0477",
    "CURE, λ = 2.86"."""
    return config_name(method, lam, short=True)


def _baseline_norm(method: str) -> tuple[str, float]:
    """``(norm, ε)`` of a method outside :data:`METHOD_NAMES` that names PGD training at a radius
    (:func:`~robustreg.study.grid.baseline_radius`); a ``KeyError`` naming the valid methods
    otherwise (as a lookup in the tables would)."""
    try:
        return baseline_radius(method)
    except ValueError:
        valid = ", ".join(METHOD_NAMES)
        raise KeyError(
            f"unknown training method {method!r}; valid: {valid}, or adversarial[-l2]-eps<ε>"
        ) from None


#: The smallest text a figure may carry at the size the page shows it (points). The theme shows
#: a figure at its natural size up to :data:`MAX_WIDTH_IN`, so this is the font size in the file.
MIN_FONT_PT = 9.0
#: The widest figure the book's column shows without shrinking it: 720 CSS px at 96 px per inch
#: (the column holds about 750 px at a desktop width).
MAX_WIDTH_IN = 7.5


def book_style() -> dict:
    """The book's matplotlib settings (rcParams): text of 10 pt (ticks and legends 9 pt), the
    palette cycled with line styles, SVG output with its text kept as text (so that the browser
    check can read its size) and stable ids."""
    from cycler import cycler

    # the palette's yellow is too faint for lines on white: cycled without it
    colors = [c for name, c in COLORS.items() if name not in ("yellow", "grey")]
    colors = colors[1:] + colors[:1]  # black last: it is plain training's
    styles = ["-", "--", "-.", ":", "-", "--", "-."]
    return {
        "figure.dpi": 100,
        "savefig.dpi": 200,
        "figure.figsize": (6.4, 4.0),
        "figure.constrained_layout.use": True,
        "font.size": 10,
        "axes.titlesize": 10,
        "axes.labelsize": 10,
        "xtick.labelsize": MIN_FONT_PT,
        "ytick.labelsize": MIN_FONT_PT,
        "legend.fontsize": MIN_FONT_PT,
        "figure.titlesize": 11,
        "axes.prop_cycle": cycler(color=colors, linestyle=styles),
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "svg.fonttype": "none",
        "svg.hashsalt": "robustreg",
    }


def use_book_style() -> None:
    """Apply :func:`book_style`; inside IPython, show figures as SVG without a date (so that a
    rerun writes the same file)."""
    require("matplotlib")
    import matplotlib as mpl

    mpl.rcParams.update(book_style())
    try:
        from IPython import get_ipython
        from matplotlib_inline.backend_inline import set_matplotlib_formats
    except ImportError:  # plain Python: nothing to configure
        return
    if get_ipython() is not None:
        set_matplotlib_formats("svg", metadata={"Date": None})


def _drawn_texts(fig, renderer) -> list:
    """The texts of ``fig`` that its last draw put on the canvas: visible, non-empty, with every
    ancestor visible, and inside the figure (tick labels of ticks outside the view are skipped)."""
    from matplotlib.text import Text

    page = fig.bbox.padded(2)
    hidden = set()  # labels of ticks outside the view: kept by matplotlib, not drawn
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            low, high = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                slack = 1e-12 * (high - low)
                if not low - slack <= tick.get_loc() <= high + slack:
                    hidden.update({id(tick.label1), id(tick.label2)})
    out = []
    for t in fig.findobj(lambda a: isinstance(a, Text)):
        if id(t) in hidden or not (t.get_visible() and t.get_text().strip()):
            continue
        if t.axes is not None and not t.axes.get_visible():
            continue
        box = t.get_window_extent(renderer)
        if box.width > 0 and box.height > 0 and page.contains(*box.p0) and page.contains(*box.p1):
            out.append((t, box))
    return out


def legible(fig, min_pt: float = MIN_FONT_PT, max_width_in: float = MAX_WIDTH_IN):
    """Return ``fig`` unchanged if a reader can read it as the book shows it, else raise.

    Rules: the figure is at most ``max_width_in`` wide (wider ones are shrunk by the page, and
    their text with them); every text is at least ``min_pt`` points (sub- and superscripts of
    mathematics are drawn at 70 % of their label's size by matplotlib and are not counted); no two
    texts overlap (tick labels, axis labels, titles, legend entries, annotations). Raises
    ``ValueError`` naming each offending text.
    """
    width = float(fig.get_figwidth())
    problems = []
    if width > max_width_in + 1e-9:
        problems.append(
            f"figure is {width:g} in wide; at most {max_width_in:g} in is shown unshrunk"
        )
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()  # text sizes and places are known once drawn
    texts = _drawn_texts(fig, renderer)
    for t, _ in texts:
        if t.get_fontsize() < min_pt - 1e-9:
            problems.append(
                f"text {t.get_text()!r} is {t.get_fontsize():g} pt (at least {min_pt:g})"
            )
    # glyph boxes carry a blank margin (line spacing): shrink them before testing for overlap
    boxes = [(t, box.shrunk(0.94, 0.8)) for t, box in texts]
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                problems.append(f"texts {a.get_text()!r} and {b.get_text()!r} overlap")
    if problems:
        raise ValueError("figure not legible: " + "; ".join(problems[:12]))
    return fig


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
    size: float = 1.45,
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
                ax.hist(v, bins=30, color=COLORS["blue"], alpha=0.8)
                ax.set_yticks([])
                if log:
                    ax.xaxis.set_major_formatter(
                        plt.FuncFormatter(lambda t, _: f"$10^{{{t:.0f}}}$")
                    )
            elif i > j:
                ax.scatter(
                    data[j][~mark],
                    data[i][~mark],
                    s=3,
                    color=COLORS["blue"],
                    alpha=0.6,
                    linewidths=0,
                )
                ax.scatter(
                    data[j][mark],
                    data[i][mark],
                    s=8,
                    marker="s",
                    color=COLORS["orange"],
                    linewidths=0,
                )
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
                        fontsize=10,
                        bbox=dict(
                            boxstyle="round", fc=plt.cm.Blues(0.15 + 0.6 * abs(r)), ec="none"
                        ),
                    )
            ax.tick_params(labelsize=MIN_FONT_PT)
            if i < n - 1:
                ax.set_xticklabels([])
            else:
                ax.set_xlabel(labels[j])
            if j > 0 and i != j:
                ax.set_yticklabels([])
            elif j == 0 and i > 0:
                ax.set_ylabel(labels[i])
            ax.minorticks_off()
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

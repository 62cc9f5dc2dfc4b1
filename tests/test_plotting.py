"""The book's figure style and the legibility rule every glued figure passes."""

import matplotlib

matplotlib.use("agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from robustreg import plotting  # noqa: E402


@pytest.fixture(autouse=True)
def _style():
    with matplotlib.rc_context(plotting.book_style()):
        yield
    plt.close("all")


def test_a_plain_figure_in_the_book_style_is_legible():
    fig, ax = plt.subplots()
    for name, style in plotting.METHOD_STYLE.items():
        ax.plot([0, 1, 2], [0, 1, len(name)], label=plotting.METHOD_NAMES[name], **style)
    ax.set_xlabel("$\\lambda_1$")
    ax.legend(ncol=2)
    assert plotting.legible(fig) is fig


def test_small_text_is_refused_with_its_size():
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    ax.set_title("six points", fontsize=6)
    with pytest.raises(ValueError, match="'six points' is 6 pt"):
        plotting.legible(fig)


def test_overlapping_labels_are_refused():
    fig, ax = plt.subplots()
    ax.plot(range(20))
    ax.set_xticks(range(20), [f"label {i}" for i in range(20)])
    with pytest.raises(ValueError, match="overlap"):
        plotting.legible(fig)


def test_a_figure_wider_than_the_column_is_refused():
    fig, _ = plt.subplots(figsize=(plotting.MAX_WIDTH_IN + 2, 3))
    with pytest.raises(ValueError, match="in wide"):
        plotting.legible(fig)


def test_methods_differ_in_more_than_colour():
    looks = [(s["marker"], s["linestyle"]) for s in plotting.METHOD_STYLE.values()]
    assert len(set(looks)) == len(looks)  # told apart in greyscale
    assert set(plotting.METHOD_STYLE) == set(plotting.METHOD_NAMES)
    assert {s["color"] for s in plotting.METHOD_STYLE.values()} <= set(plotting.PALETTE)


def test_svg_keeps_text_as_text_and_no_date(tmp_path):
    fig, ax = plt.subplots()
    ax.set_xlabel("epsilon")
    fig.savefig(tmp_path / "f.svg", metadata={"Date": None})
    svg = (tmp_path / "f.svg").read_text()
    assert ">epsilon</text>" in svg and "<dc:date>" not in svg


def test_the_browser_check_reads_label_sizes_from_the_svg(tmp_path):
    """The rule the browser check applies to a page: each label's body size, read from the file
    (sub- and superscripts excluded), scaled by the shown width."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    import browser_check

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.set_xlabel("$f_k$ six points", fontsize=6)
    ax.set_ylabel("ten points", fontsize=10)
    fig.savefig(tmp_path / "f.svg", metadata={"Date": None})
    sizes = browser_check.svg_label_sizes(tmp_path / "f.svg")
    assert min(sizes) == pytest.approx(6) and max(sizes) == pytest.approx(10)
    assert browser_check.svg_width(tmp_path / "f.svg") == pytest.approx(4 * 72)
    base = "http://127.0.0.1:1/"
    shown = {"src": base + "f.svg", "natural": 384, "shown": 384.0, "caption": True}
    problems = browser_check.figure_problems(shown, base, tmp_path)
    assert len(problems) == 1 and "8.0 px" in problems[0]  # 6 pt = 8 CSS px at natural size
    raster = {"src": base + "f.png", "natural": 640, "shown": 640.0, "caption": False}
    problems = browser_check.figure_problems(raster, base, tmp_path)
    assert any("without a caption" in p for p in problems)
    assert any("1.00 image pixels per shown pixel" in p for p in problems)


def test_every_baseline_radius_has_a_name_and_its_norms_look():
    assert plotting.method_name("curvature") == "CURE"
    assert plotting.method_name("adversarial-eps0.0132") == "PGD training ℓ∞ 0.0132"
    assert plotting.method_name("adversarial-l2-eps0.417") == "PGD training ℓ2 0.417"
    assert (
        plotting.method_style("adversarial-l2-eps0.417") == plotting.METHOD_STYLE["adversarial-l2"]
    )
    assert plotting.method_style("adversarial-eps0.2") == plotting.METHOD_STYLE["adversarial"]
    with pytest.raises(KeyError, match="unknown training method 'mystery'"):
        plotting.method_name("mystery")


def test_configurations_are_named_with_their_weight_or_radius():
    assert plotting.config_name("plain") == "plain training"
    assert plotting.config_name("adversarial-eps0.0477") == "PGD-ℓ∞ training at ε = 0.0477"
    assert plotting.config_name("adversarial-l2") == "PGD-ℓ2 training at ε = 1"
    assert plotting.config_name("curvature", 2.86) == "CURE at λ = 2.86"
    assert plotting.short_name("adversarial-l2-eps0.582") == "PGD-ℓ2, ε = 0.582"
    assert plotting.short_name("curvature", 2.86) == "CURE, λ = 2.86"
    assert plotting.short_name("plain") == "plain"

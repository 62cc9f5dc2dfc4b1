"""The notebook contract: parameters cell, validation, committed outputs without volatile metadata."""

import ast
import copy
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from robustreg import notebook

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import install_cell  # noqa: E402
import strip_notebooks  # noqa: E402
from chapters import chapter_notebooks, toc_files  # noqa: E402
from strip_notebooks import coalesce_streams, volatile_metadata  # noqa: E402

NOTEBOOKS = chapter_notebooks()
IDS = [p.stem for p in NOTEBOOKS]


def _code_cells(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    return nb, [c for c in nb["cells"] if c["cell_type"] == "code"]


def _source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


# --- the committed notebooks ---------------------------------------------------------------------


def test_every_book_notebook_is_in_the_toc():
    listed = {f"{f}.ipynb" for f in toc_files()}
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "book").glob("*.ipynb")}
    assert on_disk <= listed, f"notebooks missing from _toc.yml: {sorted(on_disk - listed)}"
    for f in toc_files():
        assert any((ROOT / f"{f}{s}").exists() for s in (".ipynb", ".md")), (
            f"_toc.yml lists missing {f}"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_parameters_cell_comes_first_with_typed_defaults(path):
    _, cells = _code_cells(path)
    first = cells[0]
    assert "parameters" in first["metadata"].get("tags", []), (
        "first code cell must be tagged 'parameters'"
    )
    tree = ast.parse(_source(first))
    assigned = [n for n in tree.body if not isinstance(n, ast.Expr)]
    assert assigned and all(
        isinstance(n, ast.AnnAssign) and n.value is not None for n in assigned
    ), (
        "every statement of the parameters cell must be an annotated assignment `name: type = default`"
    )
    names = {n.target.id for n in assigned}
    assert {"profile", "seed"} <= names, (
        f"parameters cell must declare profile and seed; has {names}"
    )
    assert "setup(globals()" in "".join(_source(cells[2]).split()), (
        "third code cell (after the install cell) must call setup(globals(), ...)"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_outputs_present_and_no_volatile_metadata(path):
    nb, cells = _code_cells(path)
    assert volatile_metadata(nb) == [], "run `python tools/strip_notebooks.py` on it"
    assert not coalesce_streams(copy.deepcopy(nb)), (
        "a cell's printed text is split over several outputs: run `python tools/strip_notebooks.py`"
    )
    unexecuted = [
        i for i, c in enumerate(cells) if c.get("execution_count") is None and _source(c).strip()
    ]
    assert not unexecuted, (
        f"code cells without outputs of a run (indices {unexecuted}): run `make reproduce`"
    )
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, "a committed notebook carries an error output"
    checked = [c for c in cells if _checked(c)]
    assert checked, "no cell is tagged nbval-check-output: nbval would check nothing"
    markers = [i for i, c in enumerate(cells) if "NBVAL_" in _source(c)]
    assert not markers, f"code cells {markers}: nbval markers belong in the tags, not the code"
    kinds = [  # shown directly, or glued (myst-nb stores those under a papermill record type)
        k.rsplit("/", 2)[-2] + "/" + k.rsplit("/", 1)[-1]
        for c in cells
        for o in c.get("outputs", [])
        for k in o.get("data", {})
        if "image/" in k
    ]
    assert "image/svg+xml" in kinds, (
        "no figure in the published outputs (nbval does not compare images: look at the page)"
    )
    raster = sorted(set(kinds) - {"image/svg+xml"})
    assert not raster, f"figures are vector (robustreg.plotting.use_book_style), found {raster}"


# A float printed with many significant digits (plain or scientific) depends on rounding: on another
# CPU (instruction set, thread count) its last digits differ. Constants such as "h = 1e-5" are fine.
_ROUNDING_DEPENDENT = re.compile(r"\d\.\d{5,}|\d\.\d{2,}e[-+]\d+")


def _checked(cell) -> bool:
    """Whether nbval compares the cell's outputs (the tag; readers never see it)."""
    return "nbval-check-output" in cell.get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_checked_outputs_are_machine_independent_text(path):
    """What nbval compares must be the same on every machine: checked cells print stable lines
    only — no expression value (Out[...]), no glue record, no float with rounding-level digits."""
    _, cells = _code_cells(path)
    for i, cell in enumerate(cells):
        if not _checked(cell):
            continue
        for output in cell.get("outputs", []):
            assert output["output_type"] == "stream", (
                f"{path.name}, code cell {i}: a checked cell may only print "
                f"(found {output['output_type']} {sorted(output.get('data', {}))})"
            )
            text = "".join(output["text"])
            bad = _ROUNDING_DEPENDENT.search(text)
            assert bad is None, (
                f"{path.name}, code cell {i}: rounding-dependent number {bad.group()!r} "
                "in a checked output; check it numerically instead of printing it"
            )


def _comment_lines(markdown: str) -> list[str]:
    """The lines of a markdown cell that MyST reads as comments (a ``%`` first, outside a code
    fence): text wrapped onto such a line vanishes from the page without a warning."""
    found, fence = [], False
    for line in markdown.split("\n"):
        if line.lstrip().startswith(("```", "~~~")):
            fence = not fence
        elif not fence and line.startswith("%"):
            found.append(line)
    return found


def test_a_percent_sign_first_on_a_line_is_found():
    text = "accuracy of 90.2\n% on its seeds\n```python\n%timeit f()\n```\n%"
    assert _comment_lines(text) == ["% on its seeds", "%"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_no_prose_line_is_a_myst_comment(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            lost = _comment_lines(_source(cell))
            assert not lost, (
                f"{path.name}, cell {i}: MyST drops these lines as comments (a '%' first): "
                f"{lost}; wrap the text so that the '%' ends the line before"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_glued_numbers_are_plain_python_numbers(path):
    """myst-nb formats a glued number (`{glue:text}` with a format spec) by float() of its stored
    text: NumPy 2 stores a NumPy scalar as `np.float64(...)`, which fails the book's build (-W);
    glue float(...) instead."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    bad = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            text = out.get("data", {}).get("application/papermill.record/text/plain")
            if text is not None and re.match(r"np\.\w+\(", "".join(text)):
                bad.append((out.get("metadata", {}).get("scrapbook", {}).get("name"), text))
    assert not bad, f"{path.name}: NumPy scalars glued (wrap them in float()): {bad}"


@pytest.mark.skipif(not NOTEBOOKS, reason="no chapter notebook yet")
def test_misspelt_parameter_fails_the_notebook(tmp_path):
    """papermill only warns on an unknown -p name; setup() must turn it into a failure."""
    path = NOTEBOOKS[0]
    cmd = [
        sys.executable,
        "-m",
        "papermill",
        str(path),
        str(tmp_path / "out.ipynb"),
        "-p",
        "profle",
        "smoke",
        "--cwd",
        str(path.parent),
        "-k",
        "python3",
        "--no-progress-bar",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode != 0
    assert "unknown parameter 'profle'" in run.stderr + run.stdout
    assert "Did you mean 'profile'" in run.stderr + run.stdout


# --- setup() itself ------------------------------------------------------------------------------


def _namespace(**values):
    ns = {"__annotations__": {"profile": str, "seed": int, "n": int | None, "lr": float}}
    ns.update(
        {"profile": "default", "seed": 0, "n": None, "lr": 0.1, "In": [], "_i1": "", "np": types}
    )
    ns.update(values)
    return ns


def test_setup_fills_profile_values_and_explicit_values_win():
    dtype = torch.get_default_dtype()
    try:
        p = notebook.setup(_namespace(), {"smoke": {"n": 2}, "default": {"n": 50}}, show=False)
        assert p.n == 50 and p.lr == 0.1
        p = notebook.setup(
            _namespace(profile="smoke"), {"smoke": {"n": 2}, "default": {"n": 50}}, show=False
        )
        assert p.n == 2
        p = notebook.setup(_namespace(n=7), {"smoke": {"n": 2}, "default": {"n": 50}}, show=False)
        assert p.n == 7
        p = notebook.setup(_namespace(lr=1), {"default": {"n": 3}}, show=False)
        assert isinstance(p.lr, float) and torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"nn": 3}, "unknown parameter 'nn'. Did you mean 'n'?"),
        ({"seed": "0"}, "parameter 'seed' = '0' has type str; expected int"),
        ({"seed": True}, "expected int"),
        ({"lr": "fast"}, "expected float"),
        ({"profile": "quick"}, "unknown profile 'quick'; valid profiles: smoke, default, full"),
        ({"n": 0}, "parameter 'n' = 0 is a count and must be ≥ 1"),
        ({"n": -4}, "parameter 'n' = -4 is a count and must be ≥ 1"),
        ({"seed": -1}, "parameter 'seed' = -1 must be in 0 … 4294967295"),
        ({"seed": 2**32}, "must be in 0 … 4294967295 (numpy's range)"),
    ],
)
def test_setup_rejects_bad_parameters(values, message):
    with pytest.raises(ValueError) as err:
        notebook.setup(_namespace(**values), {"default": {"n": 1}}, show=False)
    assert message in str(err.value)


def test_setup_allows_zero_where_a_profile_uses_it_to_skip():
    """0 is a valid count only for a parameter that one of the chapter's profiles sets to 0."""
    dtype = torch.get_default_dtype()
    try:
        profiles = {"smoke": {"n": 0}, "default": {"n": 10}}
        assert notebook.setup(_namespace(n=0), profiles, show=False).n == 0
        with pytest.raises(ValueError, match=r"'n' = -1 is a count \(0 skips it\) and must be ≥ 0"):
            notebook.setup(_namespace(n=-1), profiles, show=False)
    finally:
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(False)


def test_setup_checks_only_the_parameters_and_injected_cells():
    """A variable of an earlier cell is no parameter; a misspelt injected name still fails."""
    params = 'profile: str = "default"\nseed: int = 0\nn: int | None = None\nlr: float = 0.1'
    history = [
        "",
        'REPO = "https://example.org/book"',
        params,
        "# Parameters\nn = 3\n",
        'EDITION = "https://example.org/book.zip"',  # the install cell: not a parameter
        "P = setup()",
    ]
    dtype = torch.get_default_dtype()
    try:
        ns = _namespace(REPO="https://example.org/book", EDITION="x", n=3, In=history)
        assert notebook.setup(ns, {"default": {"n": 1}}, show=False).n == 3
        history[3] = "# Parameters\nnn = 3\n"
        with pytest.raises(ValueError, match="unknown parameter 'nn'"):
            notebook.setup(_namespace(nn=3, In=history), {"default": {"n": 1}}, show=False)
    finally:
        torch.set_default_dtype(dtype)
        torch.use_deterministic_algorithms(False)


def test_setup_rejects_profile_setting_undeclared_name():
    with pytest.raises(ValueError, match="sets 'm', which the parameters cell does not declare"):
        notebook.setup(_namespace(), {"default": {"m": 1}}, show=False)


def test_strip_removes_volatile_metadata(tmp_path):
    nb = {
        "metadata": {
            "papermill": {"duration": 1.0},
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python", "version": "3.11.7"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
        "cells": [
            {
                "cell_type": "code",
                "execution_count": 3,
                "id": "a1",
                "metadata": {"execution": {"t": 1}, "papermill": {}, "tags": ["x"]},
                "outputs": [{"name": "stdout", "output_type": "stream", "text": ["kept\n"]}],
                "source": "print('kept')",
            }
        ],
    }
    assert volatile_metadata(nb)
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))
    assert strip_notebooks.main([str(path)]) == 0
    clean = json.loads(path.read_text())
    assert volatile_metadata(clean) == []
    cell = clean["cells"][0]
    assert cell["metadata"] == {"tags": ["x"]} and cell["execution_count"] == 3
    assert cell["outputs"][0]["text"] == ["kept\n"] and cell["id"] == "a1"
    assert clean["metadata"]["language_info"] == {"name": "python"}


def test_strip_command_rewrites_in_place(tmp_path):
    path = tmp_path / "nb.ipynb"
    nb = {
        "metadata": {"papermill": {}, "kernelspec": {"name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
        "cells": [
            {
                "cell_type": "code",
                "execution_count": 1,
                "id": "c1",
                "metadata": {"execution": {}},
                "outputs": [],
                "source": "π = 3",
            }
        ],
    }
    path.write_text(json.dumps(nb), encoding="utf-8")
    assert strip_notebooks.main([str(path)]) == 0
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and "π = 3" in text  # Jupyter's layout: UTF-8, final newline
    assert volatile_metadata(json.loads(text)) == [] and not list(tmp_path.glob(".*.tmp"))


def _defined_functions(path):
    """Names a notebook defines as functions: `def name` or `name = lambda` at any level."""
    _, cells = _code_cells(path)
    names = set()
    for cell in cells:
        try:
            tree = ast.parse(_source(cell))
        except SyntaxError:  # IPython magics: not our concern here
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                names.add(node.name)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
                names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return names


def test_no_function_is_defined_in_two_notebooks():
    """Reusable code belongs in src/robustreg: a helper two chapters need is defined once, there."""
    seen: dict[str, str] = {}
    clashes = []
    for path in NOTEBOOKS:
        for name in sorted(_defined_functions(path)):
            if name in seen:
                clashes.append(f"{name!r} in {seen[name]} and {path.stem}")
            seen.setdefault(name, path.stem)
    assert not clashes, "move these into src/robustreg: " + "; ".join(clashes)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_the_install_cell_follows_the_parameters(path):
    """Outside a checkout a chapter installs what it imports (tools/install_cell.py, built from the
    repository URL of _config.yml and the package's version); in a checkout the cell is silent."""
    _, cells = _code_cells(path)
    assert "install" in cells[1]["metadata"].get("tags", []), "the second code cell installs"
    assert _source(cells[1]) == install_cell.source(), "run `python tools/install_cell.py`"
    assert cells[1].get("outputs") == [], "in a checkout the install cell prints nothing"

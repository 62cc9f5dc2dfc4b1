"""The chapters' install cell: outside a checkout, install what a chapter imports.

Every chapter's second code cell (after the parameters) is :func:`source`, built from the
repository URL of `_config.yml` and `robustreg.__version__`, so a fork or a new edition changes
it in one place: `python tools/install_cell.py` rewrites the cell in every chapter (then re-execute
them); `tests/test_notebook_contract.py` checks that each chapter carries today's cell.
"""

import json
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

from chapters import chapter_notebooks  # noqa: E402

TAGS = ["hide-input", "hide-output", "install"]


def source() -> str:
    import robustreg

    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    archive = f"{url}/archive/refs/tags/v{robustreg.__version__}.zip"
    return f'''# Outside a checkout (Colab, Binder, this notebook downloaded alone), install what
# the chapter imports: the book's package at this edition and myst-nb (for `glue`).
# In a checkout `make` has installed both, and this cell does nothing. (Private
# names: they are not parameters.)
import importlib.util
import subprocess
import sys

_EDITION = "{archive}"
_wanted = {{"robustreg": f"robustreg[experiments] @ {{_EDITION}}", "myst_nb": "myst-nb"}}
_missing = [s for m, s in _wanted.items() if importlib.util.find_spec(m) is None]
if _missing:
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, *_missing], check=True)'''


def install(path: Path) -> bool:
    """Put today's install cell after the parameters cell of ``path``; True if it changed."""
    nb = json.loads(path.read_text())
    cells = nb["cells"]
    first = next(i for i, c in enumerate(cells) if c["cell_type"] == "code")
    cell = {
        "cell_type": "code",
        "execution_count": None,
        "id": "install",
        "metadata": {"tags": TAGS},
        "outputs": [],
        "source": source().splitlines(keepends=True),
    }
    following = cells[first + 1] if first + 1 < len(cells) else None
    if following is not None and "install" in following.get("metadata", {}).get("tags", []):
        if "".join(following["source"]) == source():
            return False
        cells[first + 1] = cell
    else:
        cells.insert(first + 1, cell)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


if __name__ == "__main__":
    for nb_path in chapter_notebooks():
        if install(nb_path):
            print(f"install cell written: {nb_path.relative_to(ROOT)}")

"""Drop volatile metadata from committed notebooks (timings, papermill records), in place.

    python tools/strip_notebooks.py book/*.ipynb

``make reproduce`` runs it after papermill has executed a chapter; the notebook-contract test
(tests/test_notebook_contract.py) fails on a committed notebook that still carries such metadata.
Execution counts and outputs are kept. Each notebook is rewritten atomically
(:func:`robustreg.files.write_json`), in the layout Jupyter writes (indent 1, UTF-8).
"""

from __future__ import annotations

import argparse
import sys

from robustreg import files

_VOLATILE_CELL_METADATA = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime")
_KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def strip_volatile(nb: dict) -> dict:
    """Drop per-run metadata (timings, papermill records, execution counts are kept)."""
    nb["metadata"] = {
        k: v for k, v in nb.get("metadata", {}).items() if k in _KEEP_NOTEBOOK_METADATA
    }
    info = nb["metadata"].get("language_info")
    if isinstance(info, dict):
        nb["metadata"]["language_info"] = {"name": info.get("name", "python")}
    for cell in nb["cells"]:
        md = cell.get("metadata", {})
        for key in _VOLATILE_CELL_METADATA:
            md.pop(key, None)
        cell["metadata"] = md
        cell.pop("id", None) if nb.get("nbformat_minor", 0) < 5 else None
    return nb


def volatile_metadata(nb: dict) -> list[str]:
    """The volatile metadata keys a notebook still carries (empty when clean)."""
    found = [f"notebook:{k}" for k in nb.get("metadata", {}) if k not in _KEEP_NOTEBOOK_METADATA]
    for i, cell in enumerate(nb["cells"]):
        found += [f"cell {i}:{k}" for k in cell.get("metadata", {}) if k in _VOLATILE_CELL_METADATA]
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="+", help="notebook files, rewritten in place")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    for path in args.notebooks:
        nb = files.read_json(path, "notebook", "restore it from git")
        files.write_json(path, strip_volatile(nb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Drop volatile metadata from committed notebooks (timings, papermill records), in place.

    python tools/strip_notebooks.py book/*.ipynb

A thin wrapper around nbstripout with the options this book needs (:data:`OPTIONS`: outputs,
execution counts and cell ids kept; papermill's records and the run-specific parts of
``language_info`` dropped); it first joins a cell's consecutive outputs to one stream (how the
kernel chunks printed text varies from run to run; nbval compares them joined). ``make reproduce`` runs it after papermill has executed a chapter; the
notebook-contract test (tests/test_notebook_contract.py) fails on a committed notebook that still
carries such metadata (:func:`volatile_metadata`).
"""

from __future__ import annotations

import subprocess
import sys

import nbformat

#: Metadata nbstripout drops beyond its defaults (which include the cells' execution timings).
EXTRA_KEYS = [
    "metadata.papermill",
    "cell.metadata.papermill",
    "metadata.widgets",
    *(
        f"metadata.language_info.{k}"
        for k in (
            "codemirror_mode",
            "file_extension",
            "mimetype",
            "nbconvert_exporter",
            "pygments_lexer",
            "version",
        )
    ),
]
#: nbstripout's options: keep what a reader sees and what nbval compares.
OPTIONS = ["--keep-output", "--keep-count", "--keep-id", "--extra-keys", " ".join(EXTRA_KEYS)]

_VOLATILE_CELL_METADATA = ("execution", "papermill", "collapsed", "scrolled", "ExecuteTime")
_KEEP_NOTEBOOK_METADATA = ("kernelspec", "language_info")


def volatile_metadata(nb: dict) -> list[str]:
    """The volatile metadata keys a notebook still carries (empty when clean)."""
    found = [f"notebook:{k}" for k in nb.get("metadata", {}) if k not in _KEEP_NOTEBOOK_METADATA]
    info = nb.get("metadata", {}).get("language_info", {})
    found += [f"notebook:language_info.{k}" for k in info if k != "name"]
    for i, cell in enumerate(nb["cells"]):
        found += [f"cell {i}:{k}" for k in cell.get("metadata", {}) if k in _VOLATILE_CELL_METADATA]
    return found


def coalesce_streams(nb: dict) -> bool:
    """Join each cell's consecutive ``stream`` outputs of one name (stdout, stderr) into one, in
    place (a notebook read by :func:`nbformat.read`, whose texts are strings); whether anything
    changed."""
    changed = False
    for cell in nb["cells"]:
        merged = []
        for out in cell.get("outputs", []):
            last = merged[-1] if merged else None
            if (
                last is not None
                and out["output_type"] == last["output_type"] == "stream"
                and out["name"] == last["name"]
            ):
                last["text"] += out["text"]
                changed = True
            else:
                merged.append(out)
        if changed and "outputs" in cell:
            cell["outputs"] = merged
    return changed


def main(argv: list[str] | None = None) -> int:
    paths = sys.argv[1:] if argv is None else argv
    if not paths:
        print(__doc__)
        return 2
    for path in paths:
        nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
        if coalesce_streams(nb):
            nbformat.write(nb, path)
    return subprocess.run([sys.executable, "-m", "nbstripout", *OPTIONS, *paths]).returncode


if __name__ == "__main__":
    raise SystemExit(main())

"""Print the chapter notebooks listed in _toc.yml, in book order (one path per line)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def toc_files(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every document of the table of contents in book order (root first), without suffix, as
    Jupyter Book's own parser (sphinx-external-toc) reads it."""
    from sphinx_external_toc.parsing import parse_toc_yaml

    site = parse_toc_yaml(str(toc_path))
    files: list[str] = []

    def walk(docname: str) -> None:
        files.append(docname)
        for tree in site[docname].subtrees:
            for item in tree.items:
                if isinstance(item, str):  # a document (not a URL or glob)
                    walk(item)

    walk(site.root.docname)
    return files


def chapter_notebooks() -> list[Path]:
    """The notebooks of the table of contents that exist as .ipynb files."""
    return [ROOT / f"{f}.ipynb" for f in toc_files() if (ROOT / f"{f}.ipynb").exists()]


if __name__ == "__main__":
    for path in chapter_notebooks():
        print(path.relative_to(ROOT))

"""Sphinx extension for the API reference: the package's docstrings write formulas in plain text,
where ``|x|`` is an absolute value, not an RST substitution; escape those bars before autodoc
parses a docstring (literals between double backquotes and table borders are left alone)."""

import re

_LITERAL = re.compile(r"(``.*?``)")


def _escape(line: str) -> str:
    stripped = line.strip()
    if stripped.startswith(("+-", "+=", "|")) and stripped.endswith(("+", "|")):
        return line  # a grid table
    parts = _LITERAL.split(line)
    return "".join(p if p.startswith("``") else re.sub(r"(?<!\\)\|", r"\\|", p) for p in parts)


def _process(app, what, name, obj, options, lines):
    lines[:] = [_escape(line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", _process)
    return {"parallel_read_safe": True, "parallel_write_safe": True}

"""The notebook contract: the chapters' parameters and reproducibility.

Every chapter notebook starts with a cell tagged ``parameters`` whose assignments carry type
annotations (papermill injects its overrides after it, without annotations)::

    profile: str = "default"        # "smoke" | "default" | "full"
    seed: int = 0
    n_networks: int | None = None   # None: the profile's value

and follows it with::

    P = setup(
        globals(),
        profiles={"smoke": dict(n_networks=3), "default": dict(n_networks=40)},
    )

:func:`setup` rejects names that are not declared parameters (papermill only warns on them),
checks each value against its annotation and its range (``seed`` in numpy's range, every other
integer a count ≥ 1), fills ``None`` values from the chosen profile, and makes the run
reproducible (seeds, thread count, deterministic algorithms, float64, fixed figure style).

The chapters' checks are in :mod:`robustreg.checks`, the helpers that join their per-case results
in :mod:`robustreg.tensors`; ``tools/strip_notebooks.py`` drops volatile metadata from committed
notebooks.
"""

from __future__ import annotations

import ast
import difflib
import os
import random
import re
import types
import typing
from collections.abc import Mapping

import numpy as np
import torch

from robustreg.plotting import use_book_style
from robustreg.study.config import PROFILES

THREADS = 2

# Names IPython and Python put in a notebook's namespace; anything else that is not annotated
# in the parameters cell when setup() runs was injected by papermill under a wrong name.
_NAMESPACE_NAMES = {"In", "Out", "exit", "quit", "get_ipython", "open"}


def _declared(namespace: Mapping) -> dict[str, object]:
    return dict(namespace.get("__annotations__", {}))


def _type_ok(value, annotation) -> bool:
    """Whether ``value`` fits ``annotation`` (str, int, float, bool, X | None, list[...] ...)."""
    if isinstance(annotation, str):  # postponed annotations: evaluate the simple ones
        try:
            annotation = eval(annotation, {"typing": typing, "list": list, "tuple": tuple})
        except Exception:
            return True
    if annotation is typing.Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (list, tuple):
        return isinstance(value, list | tuple)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _assigned(source: str) -> list[str]:
    """Names a cell's source assigns at its top level (``x = …``, ``x: T = …``)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:  # IPython magics and the like: not a parameters cell
        return []
    names = []
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.AnnAssign):
            targets = [node.target]
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _injected(namespace: Mapping) -> list[str] | None:
    """The names assigned by the parameters cell and by papermill's injected cell (whose source
    starts with ``# Parameters``; it follows the parameters cell), from IPython's input history
    ``In``; None without a history that holds the parameters cell. Variables of other cells (an
    install cell, a reader's own) are not parameters and are left alone."""
    history = list(namespace.get("In") or [])
    starts = [
        i
        for i, source in enumerate(history[:-1])
        if isinstance(source, str) and "profile" in _assigned(source) and "profile:" in source
    ]
    if not starts:
        return None
    cells = [history[starts[-1]]] + [
        source
        for source in history[starts[-1] + 1 : -1]
        if isinstance(source, str) and source.lstrip().startswith("# Parameters")
    ]
    return [name for source in cells for name in _assigned(source)]


def check_parameters(namespace: Mapping) -> dict[str, object]:
    """Return the declared parameters of a notebook namespace, or raise ``ValueError``.

    A declared parameter is a name annotated in the parameters cell. The error names an undeclared
    (misspelt) name with the closest declared ones — among the names the parameters cell and
    papermill's injected cell assign (or, without an input history, every variable of the
    namespace) — or a value whose type does not match its annotation.
    """
    declared = _declared(namespace)
    if not declared:
        raise ValueError(
            "no parameters declared: the cell tagged 'parameters' must annotate its names, "
            'e.g. `profile: str = "default"`'
        )
    candidates = _injected(namespace)
    if candidates is None:
        candidates = [
            name
            for name, value in namespace.items()
            if not name.startswith("_")
            and name not in _NAMESPACE_NAMES
            and not isinstance(value, types.ModuleType)
            and not callable(value)
        ]
    unknown = [name for name in candidates if name not in declared]
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, declared, n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"unknown parameter {name!r}.{hint} Valid parameters: {', '.join(sorted(declared))}."
        )
    values = {}
    for name, annotation in declared.items():
        if name not in namespace:
            raise ValueError(f"parameter {name!r} is annotated but has no value")
        value = namespace[name]
        if not _type_ok(value, annotation):
            raise ValueError(
                f"parameter {name!r} = {value!r} has type {type(value).__name__}; "
                f"expected {_type_name(annotation)}"
            )
        if isinstance(annotation, type) and annotation is float and isinstance(value, int):
            value = float(value)
        values[name] = value
    return values


def reproducible(seed: int, threads: int = THREADS, dtype: torch.dtype = torch.float64) -> None:
    """Seed every generator, fix the thread count, and make torch deterministic."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(dtype)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


#: Seeds reach numpy, which accepts 0 … 2³² − 1.
MAX_SEED = 2**32 - 1


def _check_ranges(values: Mapping[str, object], profiles: Mapping[str, Mapping]) -> None:
    """``seed`` in numpy's range; every other integer parameter is a count (of networks, seeds,
    epochs, test points, grid points …) and must be ≥ 1, or ≥ 0 where one of the chapter's own
    profiles sets it to 0 (there 0 means "skip this part", e.g. no benchmark in the smoke run)."""
    seed = values["seed"]
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"parameter 'seed' = {seed!r} must be in 0 … {MAX_SEED} (numpy's range)")
    for name, value in values.items():
        if name == "seed" or not isinstance(value, int) or isinstance(value, bool):
            continue
        minimum = 0 if any(p.get(name) == 0 for p in profiles.values()) else 1
        if value < minimum:
            meaning = "a count (0 skips it)" if minimum == 0 else "a count"
            raise ValueError(f"parameter {name!r} = {value!r} is {meaning} and must be ≥ {minimum}")


def setup(
    namespace: Mapping,
    profiles: Mapping[str, Mapping[str, object]] | None = None,
    *,
    threads: int = THREADS,
    dtype: torch.dtype = torch.float64,
    show: bool = True,
) -> types.SimpleNamespace:
    """Validate a notebook's parameters, resolve its profile and make the run reproducible.

    ``namespace`` is the notebook's ``globals()``. It must declare ``profile: str`` and
    ``seed: int``. ``profiles`` maps each of ``"smoke"``, ``"default"``, ``"full"`` to the values
    of the parameters left as ``None``; a value given explicitly (in the cell or by
    ``papermill -p``) wins over the profile. Returns the resolved parameters as attributes.

    ``threads`` is the chapter's thread count; the environment variable ``ROBUSTREG_THREADS``
    overrides it (``make test`` re-checks every chapter under another thread count and
    instruction set, since nothing a chapter checks may depend on them).
    """
    values = check_parameters(namespace)
    for required in ("profile", "seed"):
        if required not in values:
            raise ValueError(f"the parameters cell must declare {required!r}")
    profile = values["profile"]
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid profiles: {', '.join(PROFILES)}")
    profiles = dict(profiles or {})
    for name in profiles:
        if name not in PROFILES:
            raise ValueError(f"profiles has unknown key {name!r}; valid: {', '.join(PROFILES)}")
    chosen = dict(profiles.get(profile, {}))
    for name in chosen:
        if name not in values:
            raise ValueError(
                f"profile {profile!r} sets {name!r}, which the parameters cell does not declare"
            )
    resolved = {}
    for name, value in values.items():
        if value is None and name in chosen:
            value = chosen[name]
        if value is None and any(name in p for p in profiles.values()):
            raise ValueError(f"parameter {name!r} is None and profile {profile!r} gives no value")
        resolved[name] = value
    _check_ranges(resolved, profiles)
    threads = int(os.environ.get("ROBUSTREG_THREADS", threads))  # the portability check's override
    reproducible(int(resolved["seed"]), threads=threads, dtype=dtype)
    use_book_style()
    if show:
        print("parameters: " + ", ".join(f"{k}={v!r}" for k, v in resolved.items()))
    return types.SimpleNamespace(**resolved)


def html_table(frame, *, index: bool = True, text: bool = False):
    """A results table as the book shows it: ``frame`` (cells already formatted as text, which may
    carry ``<b>`` for emphasis) as an HTML table, for ``myst_nb.glue`` and a ``glue:figure`` with
    a caption. Unlike a pandas ``Styler`` the markup has no random ids, so a rerun writes the same
    notebook; the book's CSS aligns the numbers and lets a wide table scroll inside its box.

    Row and column labels may wrap at their spaces where the column is narrow (a phone), but
    never inside an assignment such as "λ = 2.86" (its spaces become no-break spaces) nor at
    the hyphen of a symbol such as "PGD-ℓ∞" (a word whose part after the hyphen has three
    characters or fewer is kept whole; "cross-Lipschitz" may break as prose does), in the
    markup only. ``text=True`` marks a table whose cells are phrases rather than numbers: they
    wrap as well, and align left."""
    from IPython.display import HTML

    def label(value):
        if not isinstance(value, str):
            return value
        value = value.replace(" = ", "\u00a0=\u00a0")
        return re.sub(
            r"\S+-[^\s,]{1,3}(?=,|\s|$)", r'<span class="robustreg-nobr">\g<0></span>', value
        )

    classes = ["robustreg-table", *(["robustreg-text"] if text else [])]
    frame = frame.rename(index=label, columns=label)
    html = frame.to_html(escape=False, border=0, index=index, na_rep="—", classes=classes)
    return HTML(html)


def glue_md(name: str, text: str) -> None:
    """Glue a sentence as Markdown (``myst_nb.glue`` of an ``IPython.display.Markdown``): the page
    shows it, through myst-nb's ``glue:md`` role, as prose, where the ``glue:text`` role would show
    the string quoted."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(name, Markdown(text), display=False)


def listing(items) -> str:
    """Items in a sentence, as the chapters' prose glues them: ``""``, ``"a"``, ``"a and b"``,
    ``"a, b and c"``."""
    items = [str(i) for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


_SUPERSCRIPT = str.maketrans("-0123456789", "⁻⁰¹²³⁴⁵⁶⁷⁸⁹")


def scientific(value: float, digits: int = 2) -> str:
    """A number for prose in powers of ten, as a glued text can show it (no mathematics):
    ``scientific(4.23e10)`` is ``"4.2 × 10¹⁰"``, ``scientific(4.8e-6, 1)`` ``"5 × 10⁻⁶"``;
    ``digits`` significant digits. Between 0.01 and 1000 the plain number, to those digits."""
    value = float(value)
    if value == 0 or 1e-2 <= abs(value) < 1e3:
        return f"{value:.{digits}g}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa} × 10{str(int(exponent)).translate(_SUPERSCRIPT)}"

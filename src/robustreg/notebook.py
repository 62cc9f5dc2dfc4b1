"""The notebook contract: parameters, reproducibility and checks for the book's chapters.

Every chapter notebook starts with a cell tagged ``parameters`` whose assignments carry type
annotations (papermill injects its overrides after it, without annotations)::

    profile: str = "default"        # "smoke" | "default" | "full"
    seed: int = 0
    n_networks: int | None = None   # None: the profile's value

and follows it with::

    P = setup(globals(), profiles={"smoke": dict(n_networks=3), "default": dict(n_networks=40)})

:func:`setup` rejects names that are not declared parameters (papermill only warns on them),
checks each value against its annotation, fills ``None`` values from the chosen profile, and makes
the run reproducible (seeds, thread count, deterministic algorithms, float64, fixed figure style).

:func:`verify_identity` and :func:`verify_inequality` turn a mathematical claim into an assertion
and print one stable line, which nbval compares against the published output.

Run as a module to maintain committed notebooks::

    python -m robustreg.notebook strip book/*.ipynb    # drop volatile metadata
"""

from __future__ import annotations

import difflib
import json
import math
import os
import random
import sys
import types
import typing
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from robustreg.extras import require
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


def check_parameters(namespace: Mapping) -> dict[str, object]:
    """Return the declared parameters of a notebook namespace, or raise ``ValueError``.

    A declared parameter is a name annotated in the parameters cell. The error names an undeclared
    (misspelt) name with the closest declared ones, or a value whose type does not match its
    annotation.
    """
    declared = _declared(namespace)
    if not declared:
        raise ValueError(
            "no parameters declared: the cell tagged 'parameters' must annotate its names, "
            'e.g. `profile: str = "default"`'
        )
    unknown = [
        name
        for name, value in namespace.items()
        if not name.startswith("_")
        and name not in _NAMESPACE_NAMES
        and name not in declared
        and not isinstance(value, types.ModuleType)
        and not callable(value)
    ]
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


def _figure_style() -> None:
    require("matplotlib")
    import matplotlib as mpl

    mpl.rcParams.update(
        {
            "figure.dpi": 100,
            "savefig.dpi": 100,
            "figure.figsize": (6.4, 4.0),
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "svg.hashsalt": "robustreg",
        }
    )


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
    threads = int(os.environ.get("ROBUSTREG_THREADS", threads))  # the portability check's override
    reproducible(int(resolved["seed"]), threads=threads, dtype=dtype)
    _figure_style()
    if show:
        print("parameters: " + ", ".join(f"{k}={v!r}" for k, v in resolved.items()))
    return types.SimpleNamespace(**resolved)


def _as_cases(t) -> torch.Tensor:
    """[cases, values]: a scalar is one case, a vector one value per case (also when empty)."""
    t = torch.as_tensor(t, dtype=torch.float64).detach()
    if t.dim() == 0:
        return t.reshape(1, 1)
    return t.reshape(-1, 1) if t.dim() == 1 else t.flatten(1)


def relative_error(computed, reference) -> torch.Tensor:
    """Per case ‖computed − reference‖₂ / ‖reference‖₂ (absolute error where the reference is 0).

    The first dimension indexes the cases; the norm runs over everything else. Cases of different
    shapes (say, networks with different numbers of classes) can be given as two lists of tensors,
    one tensor per case.
    """
    if isinstance(computed, list | tuple):
        if not isinstance(reference, list | tuple) or len(computed) != len(reference):
            raise ValueError("give computed and reference as lists of the same length")
        return torch.cat(
            [
                relative_error(c.reshape(1, -1), r.reshape(1, -1))
                for c, r in zip(computed, reference, strict=True)
            ]
        )
    a, b = _as_cases(computed), _as_cases(reference)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: computed {tuple(a.shape)} vs reference {tuple(b.shape)}")
    num = (a - b).norm(dim=1)
    den = b.norm(dim=1)
    return torch.where(den > 0, num / torch.where(den > 0, den, 1.0), num)


def verify_identity(name: str, computed, reference, tol: float = 1e-10, *, scale=None) -> float:
    """Assert that ``computed`` equals ``reference`` case by case, up to rounding.

    The rule (the book's "How the checks decide"): a float64 computation of a quantity that is a
    sum or difference of terms carries a rounding error of a few units of 2⁻⁵³ ≈ 1.1e-16 times
    the size of those *terms*, multiplied by the number of operations — not times the size of the
    result, which cancellation can make arbitrarily small. So each case must satisfy

        ‖computed − reference‖ ≤ tol · scale,

    with ``scale`` the size of the terms that cancel. ``scale=None`` takes ``‖reference‖`` (a
    relative error: right when nothing cancels); otherwise give ``(description, per-case
    tensor)``, e.g. ``("‖J‖_F", J.flatten(1).norm(dim=1))``. ``tol = 1e-10`` leaves a factor of
    about 10⁶ over the unit roundoff for the lengths of the sums (K classes, d inputs, depth), so
    a wrong formula — even one wrong by one part in 10⁶ — still fails wherever its result is not
    itself swamped by cancellation. A NaN or infinite value in either side is a failure of the code
    and is reported as such. Prints one stable line (the bound, not the noisy error) and returns
    the worst scaled error.
    """
    what = "relative error"
    if scale is not None:
        what, scale = f"error / ({scale[0]})", scale[1]
    err = scaled_error(computed, reference, scale)
    n = err.numel()
    bad = _non_finite_cases(computed, reference)
    if bad is not None:
        raise AssertionError(f"{name}: a computed value is NaN or infinite (case {bad} of {n})")
    worst = float(err.max()) if n else 0.0
    if not worst <= tol:
        raise AssertionError(
            f"{name}: fails — worst {what} {worst:.3e} > {tol:.0e} "
            f"(case {int(err.argmax())} of {n})"
        )
    print(f"✔ {name}: {what} ≤ {tol:.0e} on all {n} cases")
    return worst


def _non_finite_cases(computed, reference) -> int | None:
    """Index of the first case with a NaN or infinity on either side (None when all finite)."""
    if isinstance(computed, list | tuple):
        for i, (c, r) in enumerate(zip(computed, reference, strict=True)):
            if not (
                torch.isfinite(torch.as_tensor(c)).all()
                and torch.isfinite(torch.as_tensor(r)).all()
            ):
                return i
        return None
    a, b = _as_cases(computed), _as_cases(reference)
    finite = torch.isfinite(a).all(1) & torch.isfinite(b).all(1)
    return None if bool(finite.all()) else int((~finite).nonzero()[0])


def scaled_error(computed, reference, scale=None) -> torch.Tensor:
    """Per case ‖computed − reference‖ / scale, ``scale`` defaulting to ‖reference‖ (the relative
    error). Where the scale is 0 the absolute error is returned (0 only if both sides are 0)."""
    if scale is None:
        return relative_error(computed, reference)
    if isinstance(computed, list | tuple):
        diff = torch.stack(
            [
                (_as_cases(c.reshape(1, -1)) - _as_cases(r.reshape(1, -1))).norm()
                for c, r in zip(computed, reference, strict=True)
            ]
        )
    else:
        a, b = _as_cases(computed), _as_cases(reference)
        if a.shape != b.shape:
            raise ValueError(
                f"shapes differ: computed {tuple(a.shape)} vs reference {tuple(b.shape)}"
            )
        diff = (a - b).norm(dim=1)
    s = torch.as_tensor(scale, dtype=torch.float64).detach().flatten()
    if s.numel() == 1:
        s = s.expand_as(diff)
    if s.shape != diff.shape:
        raise ValueError(f"scale has {s.numel()} entries for {diff.numel()} cases")
    return torch.where(s > 0, diff / torch.where(s > 0, s, 1.0), diff)


def verify_inequality(name: str, lhs, rhs, rtol: float = 1e-12, *, scale=None) -> float:
    """Assert ``lhs ≤ rhs`` on every case, up to rounding: ``lhs ≤ rhs + rtol · scale``.

    ``scale`` (as in :func:`verify_identity`, ``(description, per-case tensor)``) is the size of
    the terms whose rounding the two sides carry; by default ``|rhs|``, right when both sides are
    computed without cancellation. A NaN on either side fails. Prints one stable line and returns
    the largest ratio lhs/rhs (how tight the bound gets).
    """
    a, b = _as_cases(lhs).flatten(), _as_cases(rhs).flatten()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: lhs {tuple(a.shape)} vs rhs {tuple(b.shape)}")
    slack = b.abs() if scale is None else _as_cases(scale[1]).flatten().expand_as(b)
    bad = ~(a <= b + rtol * slack)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(
            f"{name}: fails on {int(bad.sum())} of {a.numel()} cases "
            f"(case {i}: lhs {float(a[i]):.6e} > rhs {float(b[i]):.6e})"
        )
    slack_text = "" if scale is None else f" (up to {rtol:.0e}·{scale[0]})"
    print(f"✔ {name}: holds on all {a.numel()} cases{slack_text}")
    if a.numel() == 0:
        return math.nan  # no case selected: no ratio to report
    ratio = torch.where(b != 0, a / torch.where(b != 0, b, 1.0), torch.zeros_like(a))
    return float(ratio.max())


# --- joining results over cases ---------------------------------------------------------------
# A chapter checks a fact on many cases (random networks with different K and d, a trained one);
# these helpers join the per-case results, whose shapes may differ, into one tensor.


def cat_cases(results: list, key=None):
    """Join per-case results (a list, one entry per network) along the first (sample) dimension.

    ``key`` a string: ``torch.cat([r[key] for r in results])``; a callable:
    ``torch.cat([key(r) for r in results])``; ``None`` (results are dicts): a dict with, for each
    key, the concatenation when the values are 1-D (one number per sample), else the list of
    per-sample tensors (their shapes may differ between cases; :func:`verify_identity` accepts
    such lists). Values that are already such lists are concatenated, so joined results join again.
    """
    if not results:
        raise ValueError("no results to join")
    if callable(key):
        return torch.cat([key(r) for r in results])
    if key is not None:
        return torch.cat([r[key] for r in results])

    def join(values):
        if all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in values):
            return torch.cat(values)
        return [row for v in values for row in v]

    return {k: join([r[k] for r in results]) for k in results[0]}


def pad_cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad every trailing dimension to the largest size, then concatenate along dim 0.

    Padding with zeros leaves per-row norms, hence :func:`relative_error`, unchanged.
    """
    shape = [max(t.shape[i] for t in tensors) for i in range(1, tensors[0].dim())]
    padded = []
    for t in tensors:
        pad = [q for i in reversed(range(1, t.dim())) for q in (0, shape[i - 1] - t.shape[i])]
        padded.append(torch.nn.functional.pad(t, pad))
    return torch.cat(padded)


def pad_stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Zero-pad tensors of equal rank to a common shape and stack them: [len(tensors), ...]."""
    return pad_cat([t[None] for t in tensors])


def flatten_cat(tensors) -> torch.Tensor:
    """One vector from many tensors (e.g. the gradients of all parameters): cat of flattenings."""
    return torch.cat([t.flatten() for t in tensors])


def quartiles(values, dim: int = -1) -> torch.Tensor:
    """Lower quartile, median and upper quartile along ``dim``, stacked: [3, ...].

    Linear interpolation between order statistics (``torch.quantile``'s default).
    """
    t = torch.as_tensor(values, dtype=torch.float64)
    return torch.quantile(t, torch.tensor([0.25, 0.5, 0.75], dtype=t.dtype), dim=dim)


# --- maintenance of committed notebooks -------------------------------------------------------

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


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("strip",):
        print("usage: python -m robustreg.notebook strip NOTEBOOK.ipynb [...]", file=sys.stderr)
        return 2
    for name in argv[1:]:
        path = Path(name)
        nb = json.loads(path.read_text(encoding="utf-8"))
        _write_json_atomic(path, strip_volatile(nb))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

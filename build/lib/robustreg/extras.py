"""Optional dependencies: the ``experiments`` extra and the error that names it.

``pip install robustreg`` brings what the regularizers need (torch, numpy). The experiment stack
(adversarial-robustness-toolbox, pandas, mlxtend, scikit-learn, matplotlib, tqdm, safetensors)
comes with ``pip install "robustreg[experiments]"`` (``.[dev]`` includes it). Code that needs one
of them calls :func:`require` first, so a missing package is an error that says how to install it.
"""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRA", "missing", "require"]

EXTRA = "experiments"


#: Optional modules that no extra can bring (their declared dependencies would pull torchvision).
OUTSIDE_EXTRAS = {"torchattacks": "pip install --no-deps torchattacks==3.5.1"}


def missing(module: str, what: str | None = None) -> str:
    """The message for a missing optional ``module``: what it is and the extra that brings it."""
    if module in OUTSIDE_EXTRAS:
        return (
            f"{what or module} (module {module!r}) is needed here but not installed; "
            f"install it with: {OUTSIDE_EXTRAS[module]}"
        )
    return (
        f"{what or module} (module {module!r}) is needed here but not installed; "
        f'install the extra: pip install "robustreg[{EXTRA}]"'
    )


def require(module: str, what: str | None = None) -> None:
    """Raise ``ImportError`` naming the extra when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(missing(module, what))

"""Argument checks shared by the library, and the one table of norms.

Every public function of the core checks its inputs with these, so a bad value gets the same clear
error everywhere: it names the argument, the value and what is valid. A batch must be a float32
or float64 tensor ``[B, ...]`` (float16 and bfloat16 are refused: the identities and certificates
of the book are not sound at their precision). :data:`NORMS` maps each ℓp norm the package knows
to its dual exponent q (1/p + 1/q = 1); :func:`dual_norm` is ‖·‖_q.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "FLOAT_DTYPES",
    "NORMS",
    "check_batch",
    "check_count",
    "check_generator",
    "check_label_values",
    "check_labels",
    "check_logits",
    "check_model",
    "check_nonnegative",
    "check_norm",
    "check_positive",
    "dual_exponent",
    "dual_norm",
    "exponent",
]

#: The ℓp norms of the package (name → dual exponent q): ℓ1 ↔ ℓ∞, ℓ2 ↔ ℓ2, ℓ∞ ↔ ℓ1. Modules that
#: accept only some of them say which, as a tuple of these names.
NORMS = {"l1": math.inf, "l2": 2.0, "linf": 1.0}
#: The dtypes a batch may have.
FLOAT_DTYPES = (torch.float32, torch.float64)


def check_norm(norm, valid: Sequence[str] = tuple(NORMS)) -> str:
    """Return ``norm`` if it is one of ``valid`` (names of :data:`NORMS`), else raise
    ``ValueError: unknown norm 'l3'; valid: …``."""
    if not isinstance(norm, str) or norm not in valid:
        raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(valid)}")
    return norm


def dual_exponent(norm, valid: Sequence[str] = tuple(NORMS)) -> float:
    """The dual exponent q of the ℓp norm ``norm`` (checked against ``valid``)."""
    return NORMS[check_norm(norm, valid)]


def exponent(norm, valid: Sequence[str] = tuple(NORMS)) -> float:
    """The exponent p of the ℓp norm ``norm`` (checked against ``valid``): the dual of
    :func:`dual_exponent`, 1/p + 1/q = 1 ("l1" → 1, "l2" → 2, "linf" → ∞)."""
    q = dual_exponent(norm, valid)
    return math.inf if q == 1 else 1.0 if q == math.inf else q / (q - 1)


def dual_norm(v: Tensor, q: float, dim: int | tuple[int, ...]) -> Tensor:
    """‖v‖_q along ``dim`` (q = ∞: the largest absolute entry)."""
    return torch.linalg.vector_norm(v, ord=q, dim=dim)


def check_batch(
    x,
    name: str = "x",
    *,
    finite: bool = False,
    box: bool = False,
    dtypes: Sequence[torch.dtype] = FLOAT_DTYPES,
) -> Tensor:
    """Return ``x`` if it is a tensor ``[B, ...]`` of one of ``dtypes``; with ``finite``, without
    NaN or infinity; with ``box``, inside [0, 1]. Otherwise raise (``TypeError`` for a non-tensor,
    ``ValueError`` else) naming ``name``, the bad value and what is valid."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [B, ...]; got {type(x).__name__}")
    if x.dtype not in dtypes:
        valid = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have a floating-point dtype ({valid}); got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(
            f"{name} must have a batch dimension, shape [B, ...]; got shape {tuple(x.shape)} "
            f"(for a single sample pass {name}.unsqueeze(0))"
        )
    if finite and not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).flatten(1).any(1)
        raise ValueError(
            f"{name} holds NaN or infinite values in {int(bad.sum())} of {x.shape[0]} samples "
            f"(first: sample {int(bad.nonzero()[0, 0])})"
        )
    if box and x.numel() and (x.min() < 0 or x.max() > 1):
        lo, hi = x.min().item(), x.max().item()
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{lo:.4g}, {hi:.4g}]"
            + (" (0–255 pixels? divide by 255)" if hi > 1.5 else "")
        )
    return x


def check_labels(
    y,
    batch_size: int,
    num_classes: int | None = None,
    *,
    dtypes: Sequence[torch.dtype] = (torch.int64,),
) -> Tensor:
    """Return ``y`` if it holds one label of one of ``dtypes`` per row of a batch of
    ``batch_size``, each in [0, ``num_classes``) when that is given; else raise naming it."""
    if not isinstance(y, Tensor):
        raise TypeError(f"y must be a torch.Tensor of int64 labels; got {type(y).__name__}")
    if y.dtype not in dtypes:
        valid = " or ".join(str(d) for d in dtypes)
        raise ValueError(f"y must have dtype {valid} (class indices); got {y.dtype}")
    if tuple(y.shape) != (batch_size,):
        raise ValueError(
            f"y must have shape ({batch_size},), one label per row of x; got shape {tuple(y.shape)}"
        )
    if num_classes is not None:
        check_label_values(y, num_classes)
    return y


def check_label_values(y: Tensor, num_classes: int | None) -> Tensor:
    """Return the labels ``y`` if each lies in [0, ``num_classes``) (≥ 0 when that is None);
    else raise naming the first bad label and K."""
    if not y.numel():
        return y
    lo, hi = (int(v) for v in torch.aminmax(y))
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        bad = lo if lo < 0 else hi
        if num_classes is None:
            raise ValueError(f"label {bad} is out of range: labels must be ≥ 0 (class indices)")
        raise ValueError(
            f"label {bad} is out of range: labels must lie in [0, {num_classes}) "
            f"for a model with K = {num_classes} classes"
        )
    return y


def check_logits(f, x: Tensor) -> Tensor:
    """Return ``f`` if it is a batch of logits ``[B, K]`` for the batch ``x``; else raise."""
    if not isinstance(f, Tensor) or f.dim() != 2 or f.shape[0] != x.shape[0]:
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ValueError(
            f"model must map x of shape [B, ...] to logits of shape [B, K]; x has shape "
            f"{tuple(x.shape)} and the model returned {shape} (does x have a batch dimension?)"
        )
    return f


def check_model(model, x: Tensor | None = None) -> nn.Module:
    """Return ``model`` if it is an ``nn.Module`` whose parameters and buffers hold values (not
    on the ``meta`` device) on the device of ``x``, or another callable (nothing to inspect);
    else raise naming what is wrong."""
    if not isinstance(model, nn.Module):
        if callable(model):
            return model
        raise TypeError(f"model must be a torch.nn.Module or callable; got {type(model).__name__}")
    tensors = [*model.parameters(), *model.buffers()]
    if any(t.is_meta for t in tensors):
        raise ValueError(
            "the model's parameters are on the meta device (shapes without values); "
            "materialize them first, e.g. model.to_empty(device='cpu') and then "
            "model.load_state_dict(...) or robustreg.study.load_model(result_file)"
        )
    if x is not None:
        devices = {t.device for t in tensors}
        if devices and devices != {x.device}:
            found = ", ".join(sorted(str(d) for d in devices))
            raise ValueError(
                f"the model is on {found} and x on {x.device}; move one of them (model.to(x.device))"
            )
    return model


def check_count(name: str, value, *, minimum: int = 1, none: str | None = None) -> None:
    """Raise unless ``value`` is an int ≥ ``minimum`` (or None, when ``none`` says what None
    means): ``ValueError: steps must be an integer ≥ 0, got 2.5``."""
    if value is None and none is not None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        allowed = f"None ({none}) or {what}" if none is not None else what
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def _is_real(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float)


def check_positive(name: str, value) -> None:
    """Raise unless ``value`` is a positive finite number."""
    if not (_is_real(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def check_nonnegative(name: str, value) -> None:
    """Raise unless ``value`` is a finite number ≥ 0."""
    if not (_is_real(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number ≥ 0, got {value!r}")


def check_generator(generator) -> None:
    """Raise unless ``generator`` is None or a ``torch.Generator``."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator or None; got {type(generator).__name__}"
        )

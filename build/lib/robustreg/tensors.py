"""Joining per-case results whose shapes differ into one tensor.

A chapter checks a fact on many cases (random networks with different K and d, a trained one);
these helpers join the per-case results — concatenation along the sample dimension, zero padding
to a common shape, flattening — and summarize them (quartiles).
"""

from __future__ import annotations

import torch


def cat_cases(results: list, key=None):
    """Join per-case results (a list, one entry per network) along the first (sample) dimension.

    ``key`` a string: ``torch.cat([r[key] for r in results])``; a callable:
    ``torch.cat([key(r) for r in results])``; ``None`` (results are dicts): a dict with, for each
    key, the concatenation when the values are 1-D (one number per sample), else the list of
    per-sample tensors (their shapes may differ between cases;
    :func:`robustreg.checks.check_identity` accepts such lists). Values that are already such
    lists are concatenated, so joined results join again.
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

    Padding with zeros leaves per-row norms, hence :func:`robustreg.checks.relative_error`,
    unchanged.
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

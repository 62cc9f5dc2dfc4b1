"""Weight files: a network's tensors in safetensors, labelled with the key of the run they belong to.

The one path by which the experiment layer writes and reads weights (the run cache of
:mod:`robustreg.study.cache` and the published models of :mod:`robustreg.study.store`). A file is
written atomically (:func:`robustreg.files.atomic_write`) and carries ``{"key": <run key>}`` as
safetensors metadata; :func:`read_weights` checks that label before it returns a tensor, so the
weights of one run are never loaded as another's. safetensors holds tensors only: loading executes
no code.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from robustreg import files
from robustreg.extras import missing

try:  # the experiment stack: pip install "robustreg[experiments]"
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(missing(err.name)) from err

__all__ = ["WeightsMismatchError", "read_weights", "stored_key", "write_weights"]


class WeightsMismatchError(RuntimeError):
    """A weight file whose key label is not the run's."""


def write_weights(model: nn.Module, path: str | os.PathLike, key: str) -> Path:
    """Write ``model``'s state (on the CPU, contiguous) to ``path`` labelled with ``key``."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return files.atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"key": key}))


def stored_key(path: str | os.PathLike) -> str | None:
    """The run key a weight file is labelled with (None for an unlabelled file)."""
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get("key")


def read_weights(
    path: str | os.PathLike,
    key: str,
    *,
    device: str | torch.device = "cpu",
    unlabelled_ok: bool = False,
) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, after checking that the file is labelled with ``key``
    (:class:`WeightsMismatchError` names both keys otherwise). ``unlabelled_ok``: also accept a
    file without a label (run-cache entries written before labels, named by their key)."""
    label = stored_key(path)
    if label != key and not (label is None and unlabelled_ok):
        raise WeightsMismatchError(f"{path} belongs to run {label!r}, not to {key!r}")
    return load_file(str(path), device=str(device))

"""Weight files: a network's tensors in safetensors, labelled with their run's key and verified by
their content's SHA-256.

The one path by which the experiment layer writes and reads weights (the run cache of
:mod:`robustreg.study.cache` and the published models of :mod:`robustreg.study.store`). A file is
written atomically (:func:`robustreg.files.atomic_write`) and carries ``{"key": <run key>}`` as
safetensors metadata; :func:`write_weights` returns the :func:`digest` of the tensors, which the
caller records (the cache entry, the result file). :func:`read_weights` loads nothing it has not
checked:

1. the file is a safetensors file (its header is parsed and bounded before anything else);
2. it is labelled with the run's key;
3. its tensor names, dtypes and shapes are those the configuration's network expects
   (``expected``, from a network built on the meta device: no memory is allocated for a file that
   claims a billion-parameter layer);
4. the SHA-256 of the loaded tensors equals the recorded one.

Any failure is a :class:`WeightsError` naming the file, what differs and how to recover.
safetensors holds tensors only: loading executes no code.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from robustreg import files
from robustreg.extras import missing

try:  # the experiment stack: pip install "robustreg[experiments]"
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(missing(err.name)) from err

__all__ = [
    "WeightsError",
    "digest",
    "expected_layout",
    "read_header",
    "read_weights",
    "stored_key",
    "write_weights",
]

#: A safetensors header larger than this is not one of ours (a few kB for the book's networks).
MAX_HEADER_BYTES = 1 << 24
#: safetensors' dtype names for the dtypes a network of the book can hold.
_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class WeightsError(ValueError):
    """A weight file that is not what its run expects (format, label, layout or content)."""


def digest(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a state dict's content: for every tensor, in name order, its name, dtype,
    shape and bytes (on the CPU, contiguous). Equal for equal tensors whatever the file layout."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write_weights(model: nn.Module, path: str | os.PathLike, key: str) -> str:
    """Write ``model``'s state to ``path`` labelled with ``key``; return its :func:`digest`."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        files.atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"key": key}))
    except OSError as err:
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from err
    except SafetensorError as err:  # safetensors reports a full disk as its own error
        raise OSError(f"cannot write {path} ({err}); is there space left on its device?") from err
    return digest(state)


def read_header(path: str | os.PathLike) -> dict:
    """The parsed safetensors header of ``path`` (tensor entries and ``__metadata__``), checked
    for form and bounds without reading the tensors; :class:`WeightsError` if it is not a
    safetensors file."""
    path = Path(path)
    recover = "delete it and recompute the run (python -m robustreg run-grid ... --refresh)"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path}: not a safetensors file (only {size} bytes); {recover}")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise WeightsError(
                f"{path}: not a safetensors file (its first 8 bytes announce a header of {n} "
                f"bytes in a file of {size}); {recover}"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(
            f"{path}: not a safetensors file (unreadable header); {recover}"
        ) from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: not a safetensors file (header is not a table); {recover}")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict):
                raise WeightsError(f"{path}: malformed metadata; {recover}")
            continue
        ok = (
            isinstance(entry, dict)
            and isinstance(entry.get("dtype"), str)
            and isinstance(entry.get("shape"), list)
            and all(isinstance(s, int) and s >= 0 for s in entry["shape"])
            and isinstance(entry.get("data_offsets"), list)
            and len(entry["data_offsets"]) == 2
        )
        if not ok:
            raise WeightsError(f"{path}: malformed entry for tensor {name!r}; {recover}")
        end = max(end, int(entry["data_offsets"][1]))
    if 8 + n + end != size:
        raise WeightsError(
            f"{path}: truncated or padded safetensors file ({size} bytes, its header describes "
            f"{8 + n + end}); {recover}"
        )
    return header


def stored_key(path: str | os.PathLike) -> str | None:
    """The run key a weight file is labelled with (None for an unlabelled file)."""
    return (read_header(path).get("__metadata__") or {}).get("key")


def expected_layout(model: nn.Module) -> dict[str, tuple[str, list[int]]]:
    """Name → (safetensors dtype, shape) of every tensor of ``model``'s state (a model on the meta
    device will do: only shapes and dtypes are read)."""
    return {
        k: (_DTYPES.get(v.dtype, str(v.dtype)), list(v.shape))
        for k, v in model.state_dict().items()
    }


def read_weights(
    path: str | os.PathLike,
    key: str,
    *,
    sha256: str | None,
    expected: Mapping[str, tuple[str, list[int]]] | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` after the checks of the module docstring: the label ``key``, the
    layout ``expected`` (when given, before any tensor is read) and the content's ``sha256``
    (None only where no digest was ever recorded, which the caller must decide to allow)."""
    header = read_header(path)
    label = (header.get("__metadata__") or {}).get("key")
    if label != key:
        raise WeightsError(f"{path} belongs to run {label!r}, not to {key!r}")
    if expected is not None:
        found = {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}
        if found != dict(expected):
            diffs = [
                f"{k}: {found.get(k)} in the file, {expected.get(k)} expected"
                for k in sorted(set(found) | set(expected))
                if found.get(k) != expected.get(k)
            ]
            raise WeightsError(
                f"{path} does not hold the network its configuration describes ("
                + "; ".join(diffs[:5])
                + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
                + ")"
            )
    state = load_file(str(path), device="cpu")
    if sha256 is not None and digest(state) != sha256:
        raise WeightsError(
            f"{path}: its tensors' SHA-256 {digest(state)[:16]}… is not the recorded "
            f"{sha256[:16]}… (the file was altered or damaged); restore it (git checkout, or "
            "recompute the run with --refresh)"
        )
    return {k: v.to(device) for k, v in state.items()}

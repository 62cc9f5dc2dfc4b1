"""Training with a regularizer, adversarial training, and a disk cache of trained models.

Objective of :func:`train` on a batch B (NOTATION: ℓ(x, y) = −log p_y(x)):

    L(θ) = (1/|B|) Σ_{(x,y)∈B} ℓ(x, y) + λ · (1/|B|) Σ_{(x,y)∈B} R(x, y),

with R one of the regularizers of :mod:`robustreg.regularizers` (per-sample values, in the book's
normalization) or any callable ``(model, x, y, **options) -> Tensor[B]``. With λ = 0 the
regularizer is not evaluated (plain training).

:func:`adversarial_training` (Madry et al.) minimizes instead

    L(θ) = (1/|B|) Σ_{(x,y)∈B} max_{‖δ‖ ≤ ε, x+δ ∈ [0,1]^d} ℓ(x + δ, y),

the inner maximum approximated by :func:`robustreg.attacks.pgd` (the model in eval mode while
attacking, gradients of the attack not propagated to θ).

Optimizer: Adam (β = (0.9, 0.999), default lr 1e-3) — robust to the scale changes a large λ
brings, with no tuning of a schedule; ``optimizer="sgd"`` gives SGD with (heavy-ball) momentum
0.9. No learning-rate schedule, no data augmentation.

Determinism: minibatch order comes from a ``torch.Generator`` seeded with ``seed``; the random
draws of a regularizer's estimator (and of PGD's random starts) come from a dedicated generator
seeded with ``seed + 2``, passed as ``generator=`` when the callable accepts one, and otherwise
from torch's global generator, which :func:`train` seeds with ``seed + 1`` inside
:func:`torch.random.fork_rng` (the caller's random state is left untouched). Same seed, data,
model initialisation and device → identical weights (on CUDA, up to nondeterministic kernels).

Caching: :func:`train_cached` builds the model and data from a plain configuration dictionary,
trains, and stores the weights (safetensors) and the history (JSON) under
``<cache>/<sha256 of the configuration>``; a rerun with the same configuration loads them
instead of training. Writes are atomic (temporary file + :func:`os.replace`); a run interrupted
mid-training resumes from its last finished epoch (checkpoint read with
``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CACHE_VERSION",
    "History",
    "TrainResult",
    "adversarial_training",
    "build_model",
    "cache_key",
    "default_cache_dir",
    "default_device",
    "normalize_config",
    "train",
    "train_cached",
]

OPTIMIZERS = ("adam", "sgd")
# Bump when a change in this package alters what a configuration trains to.
CACHE_VERSION = 1


@dataclass
class History:
    """Per-epoch records of a training run (means over the epoch's batches)."""

    loss: list[float] = field(default_factory=list)  # mean total objective L
    ce: list[float] = field(default_factory=list)  # mean cross-entropy (on x_adv when adversarial)
    reg: list[float] = field(default_factory=list)  # mean regularizer value (0 when λ = 0)
    accuracy: list[float] = field(default_factory=list)  # running training accuracy
    time: list[float] = field(default_factory=list)  # wall seconds per epoch
    cpu_time: list[float] = field(default_factory=list)  # process CPU seconds per epoch

    @property
    def total_time(self) -> float:
        return float(sum(self.time))

    def as_dict(self) -> dict[str, list[float]]:
        return asdict(self)


class TrainResult(NamedTuple):
    """``(model, history)``; the model is the one passed in, trained in place, in eval mode."""

    model: nn.Module
    history: History


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS when available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _resolve_regularizer(regularizer) -> tuple[str | None, Callable | None]:
    if regularizer is None:
        return None, None
    if isinstance(regularizer, str):
        from robustreg import regularizers

        return regularizer, regularizers.get(regularizer)
    if callable(regularizer):
        return getattr(regularizer, "__name__", type(regularizer).__name__), regularizer
    raise TypeError(
        f"regularizer must be None, a name or a callable (model, x, y, **options) -> Tensor[B]; "
        f"got {type(regularizer).__name__}"
    )


def _accepts(fn: Callable, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_common(data, epochs, batch_size, lr, optimizer) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError("data must be a pair (x, y) of tensors")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError("data must be a pair (x, y) of tensors")
    if x.shape[0] != y.shape[0] or y.ndim != 1 or x.shape[0] == 0:
        raise ValueError(
            f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)} do not form a data set "
            "(need x [N, ...] and y [N] with N ≥ 1)"
        )
    if not (isinstance(epochs, int) and epochs >= 1):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    return x, y


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype, p.device
    raise ValueError("the model has no floating-point parameters to train")


def _atomic_save(obj, path: Path, saver: Callable[[Any, str], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        saver(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _show_progress(progress: bool | None) -> bool:
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _fit(
    model: nn.Module,
    data,
    batch_objective: Callable,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    optimizer: str,
    weight_decay: float,
    progress: bool | None,
    checkpoint: str | os.PathLike | None,
    describe: str,
) -> TrainResult:
    """Shared minibatch loop: ``batch_objective(model, xb, yb, generator) -> (L, ce, reg, logits)``."""
    x, y = _check_common(data, epochs, batch_size, lr, optimizer)
    dtype, device = _model_dtype_device(model)
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=torch.int64)
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    estimator = torch.Generator(device=device).manual_seed(seed + 2)
    history = History()
    start = 0
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed + 1)
        if checkpoint is not None and Path(checkpoint).is_file():
            # RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            order.set_state(state["order"])
            estimator.set_state(state["estimator"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            history = History(**{k: list(map(float, v)) for k, v in state["history"].items()})
            start = int(state["epoch"])
        from tqdm import tqdm  # text bar: no ipywidgets needed in notebooks

        bar = tqdm(
            total=epochs * n_batches,
            initial=start * n_batches,
            desc=describe,
            disable=not _show_progress(progress),
            leave=False,
        )
        try:
            for epoch in range(start, epochs):
                t0, c0 = time.perf_counter(), time.process_time()
                model.train()
                perm = torch.randperm(n, generator=order).to(device)
                sums = torch.zeros(4, dtype=torch.float64, device=device)
                for b in range(n_batches):
                    idx = perm[b * batch_size : (b + 1) * batch_size]
                    xb, yb = x[idx], y[idx]
                    loss, ce, reg, logits = batch_objective(model, xb, yb, estimator)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"non-finite training loss {loss.item()} (cross-entropy "
                            f"{ce.item():.4g}, regularizer {reg.item():.4g}) at epoch "
                            f"{epoch + 1}/{epochs}, batch {b + 1}/{n_batches}, {describe}; "
                            "lower the learning rate or λ"
                        )
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        correct = (logits.argmax(1) == yb).sum()
                        sums += torch.stack(
                            [
                                loss.detach() * len(yb),
                                ce.detach() * len(yb),
                                reg.detach() * len(yb),
                                correct,
                            ]
                        ).to(sums.dtype)
                    bar.update(1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                sums = (sums / n).tolist()
                history.loss.append(sums[0])
                history.ce.append(sums[1])
                history.reg.append(sums[2])
                history.accuracy.append(sums[3])
                history.time.append(time.perf_counter() - t0)
                history.cpu_time.append(time.process_time() - c0)
                bar.set_postfix(loss=f"{sums[0]:.4f}", acc=f"{sums[3]:.3f}")
                if checkpoint is not None and epoch + 1 < epochs:
                    state = {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "order": order.get_state(),
                        "estimator": estimator.get_state(),
                        "rng": torch.get_rng_state(),
                        "history": history.as_dict(),
                        "epoch": epoch + 1,
                    }
                    if device.type == "cuda":
                        state["cuda_rng"] = torch.cuda.get_rng_state(device)
                    _atomic_save(state, Path(checkpoint), torch.save)
        finally:
            bar.close()
    opt.zero_grad(set_to_none=True)
    model.eval()
    return TrainResult(model, history)


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    regularizer: str | Callable | None = None,
    lam: float = 0.0,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    **regularizer_options,
) -> TrainResult:
    """Train ``model`` in place on ``data = (x, y)``; return ``(model, history)``.

    Minimizes mean cross-entropy + ``lam`` · mean ``regularizer`` (module docstring) with Adam
    (or ``optimizer="sgd"``: momentum 0.9) for ``epochs`` passes over shuffled minibatches of
    ``batch_size``. ``regularizer`` is a name from :func:`robustreg.regularizers.names` or a
    callable ``(model, x, y, **options) -> Tensor[B]``; ``regularizer_options`` are passed to it
    (e.g. ``n_proj=1``, ``h=...``).

    ``progress``: a tqdm bar over batches (``None``: only when stderr is a terminal).
    ``checkpoint``: a file to save the state after every epoch and to resume from when it exists.
    A non-finite loss raises :class:`FloatingPointError` naming the epoch, batch and λ.
    The model ends in eval mode; ``x`` is cast to the dtype and device of the model's parameters.
    """
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number ≥ 0, got {lam!r}")
    name, fn = _resolve_regularizer(regularizer)
    if lam > 0 and fn is None:
        raise ValueError(f"lam={lam} > 0 needs a regularizer (a name or a callable)")
    if regularizer_options and fn is None:
        raise ValueError(
            f"regularizer options {sorted(regularizer_options)} given without a regularizer"
        )
    use_reg = fn is not None and lam > 0
    pass_generator = (
        use_reg and "generator" not in regularizer_options and _accepts(fn, "generator")
    )

    reuse_logits = use_reg and _accepts(fn, "return_logits")

    def objective(model, xb, yb, generator):
        if use_reg:
            options = dict(regularizer_options)
            if pass_generator:
                options["generator"] = generator
            if reuse_logits:  # the regularizer's forward pass also gives the data loss
                values, logits = fn(model, xb, yb, return_logits=True, **options)
            else:
                values, logits = fn(model, xb, yb, **options), model(xb)
            ce = F.cross_entropy(logits, yb)
            if values.shape != yb.shape:
                raise ValueError(
                    f"regularizer {name!r} returned shape {tuple(values.shape)}; expected per-sample "
                    f"values of shape {tuple(yb.shape)}"
                )
            reg = values.mean()
            return ce + lam * reg, ce, reg, logits
        logits = model(xb)
        ce = F.cross_entropy(logits, yb)
        zero = torch.zeros((), dtype=ce.dtype, device=ce.device)
        return ce, ce, zero, logits

    describe = f"λ={lam}, regularizer={name}" if use_reg else f"λ={lam}, plain"
    return _fit(
        model,
        data,
        objective,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        optimizer=optimizer,
        weight_decay=weight_decay,
        progress=progress,
        checkpoint=checkpoint,
        describe=describe,
    )


def adversarial_training(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
) -> TrainResult:
    """PGD adversarial training (Madry et al.): minimize mean ℓ(x_adv, y), x_adv = PGD(x).

    Each minibatch is replaced by :func:`robustreg.attacks.pgd` ``(model, x, y, eps, norm, steps,
    step_size, restarts)`` computed with the model in eval mode; the optimizer, seeding and
    checkpointing are those of :func:`train`. The history's ``accuracy`` is on the adversarial
    batches.
    """
    from robustreg import attacks

    attacks._check_eps_norm(eps, norm)

    def objective(model, xb, yb, generator):
        model.eval()
        x_adv = attacks.pgd(
            model,
            xb,
            yb,
            eps,
            norm=norm,
            steps=steps,
            step_size=step_size,
            restarts=restarts,
            generator=generator,
        )
        model.train()
        logits = model(x_adv)
        ce = F.cross_entropy(logits, yb)
        return ce, ce, torch.zeros((), dtype=ce.dtype, device=ce.device), logits

    return _fit(
        model,
        data,
        objective,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        optimizer=optimizer,
        weight_decay=weight_decay,
        progress=progress,
        checkpoint=checkpoint,
        describe=f"PGD-{norm} adversarial training, ε={eps}",
    )


# ---------------------------------------------------------------------------------------------
# Cached training from a configuration dictionary
# ---------------------------------------------------------------------------------------------

DEFAULT_CONFIG: dict[str, Any] = {
    "data": "mnist5k",
    "model": {"name": "mlp"},
    "regularizer": None,
    "lam": 0.0,
    "regularizer_options": {},
    "adversarial": None,  # or {"eps": 0.1, "norm": "linf", "steps": 10, "step_size": None, "restarts": 1}
    "epochs": 10,
    "batch_size": 128,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "seed": 0,
    "dtype": "float32",
}


def default_cache_dir() -> Path:
    """``$ROBUSTREG_CACHE`` if set, else ``$XDG_CACHE_HOME/robustreg/runs`` (``~/.cache/...``)."""
    if os.environ.get("ROBUSTREG_CACHE"):
        return Path(os.environ["ROBUSTREG_CACHE"])
    from robustreg.data import cache_dir

    return cache_dir() / "runs"


def normalize_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Fill defaults (:data:`DEFAULT_CONFIG`), reject unknown keys, make it JSON-canonical."""
    unknown = sorted(set(config) - set(DEFAULT_CONFIG))
    if unknown:
        raise ValueError(f"unknown configuration keys {unknown}; valid: {sorted(DEFAULT_CONFIG)}")
    full = copy.deepcopy(DEFAULT_CONFIG)
    full.update(copy.deepcopy(dict(config)))
    if isinstance(full["model"], str):
        full["model"] = {"name": full["model"]}
    full["lam"] = float(full["lam"])
    full["lr"] = float(full["lr"])
    full["weight_decay"] = float(full["weight_decay"])
    if full["regularizer"] is not None and not isinstance(full["regularizer"], str):
        raise ValueError("a cached configuration needs the regularizer by name (a string)")
    if full["lam"] == 0.0:
        full["regularizer"], full["regularizer_options"] = None, {}
    elif full["regularizer"] is not None:
        full["regularizer_options"] = regularizer_options(
            full["regularizer"], full["regularizer_options"]
        )
    if full["adversarial"] is not None:
        adv = {"norm": "linf", "steps": 10, "step_size": None, "restarts": 1}
        adv.update(full["adversarial"])
        full["adversarial"] = adv
    # Canonical JSON round trip (tuples → lists, key order irrelevant).
    return json.loads(json.dumps(full, sort_keys=True))


#: Keyword arguments of a regularizer that select nothing about the trained objective.
_NOT_OPTIONS = ("generator", "return_logits")


def regularizer_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The effective options of regularizer ``name``: its keyword defaults updated by ``options``.

    A run's key hashes these, so a changed default (say CURE's step ``h``) changes the key of
    every run that relied on it, and its stored results become stale instead of being reused.
    """
    from robustreg import regularizers

    parameters = inspect.signature(regularizers.get(name)).parameters
    defaults = {
        k: p.default
        for k, p in list(parameters.items())[3:]  # after (model, x, y)
        if p.default is not inspect.Parameter.empty and k not in _NOT_OPTIONS
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown options {unknown} for regularizer {name!r}; valid: {sorted(defaults)}"
        )
    return {**defaults, **options}


def cache_key(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex, first 24 digits) of the canonical JSON of the normalized configuration."""
    full = normalize_config(config)
    blob = json.dumps({"config": full, "version": CACHE_VERSION}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def build_model(spec: Mapping[str, Any], x_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a :mod:`robustreg.models` network from ``{"name": ..., **kwargs}`` for the data shape.

    ``mlp`` gets ``in_features = prod(x_shape)``; ``lenet`` gets ``in_channels = x_shape[0]`` and
    ``input_size = x_shape[1:]``; both get ``num_classes``. Other keys are passed through.
    """
    from robustreg import models

    spec = dict(spec)
    name = spec.pop("name")
    builders = {"mlp": "mlp", "lenet": "lenet"}
    if name not in builders:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(builders)}")
    kwargs = dict(spec)
    if name == "mlp":
        kwargs.setdefault("in_features", int(math.prod(x_shape)))
        if "hidden" in kwargs:
            kwargs["hidden"] = tuple(kwargs["hidden"])
    else:
        kwargs.setdefault("in_channels", int(x_shape[0]))
        kwargs.setdefault("input_size", tuple(int(s) for s in x_shape[1:]))
    kwargs.setdefault("num_classes", int(num_classes))
    return getattr(models, builders[name])(**kwargs)


def _dtype(name: str) -> torch.dtype:
    valid = {"float32": torch.float32, "float64": torch.float64}
    if name not in valid:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(valid)}")
    return valid[name]


def train_cached(
    config: Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    data: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the configuration (or load it from the cache); return ``(model, record)``.

    ``config`` keys (defaults in :data:`DEFAULT_CONFIG`): ``data`` (a :func:`robustreg.data.load`
    name; its train split is used), ``model`` (``{"name": "mlp" | "lenet", **kwargs}``),
    ``regularizer``, ``lam``, ``regularizer_options``, ``adversarial`` (None or PGD settings:
    then :func:`adversarial_training` is used), ``epochs``, ``batch_size``, ``lr``, ``optimizer``,
    ``weight_decay``, ``seed`` (also seeds the initialisation), ``dtype``.

    Files under ``cache_dir`` (default :func:`default_cache_dir`): ``<key>.safetensors`` (weights),
    ``<key>.json`` (configuration, history, device, time; written last, so its presence marks a
    finished run) and, while training, ``<key>.partial.pt`` (per-epoch resume state). ``record``
    is the JSON content plus ``"cached": True`` when it was loaded. The returned model is on
    ``device`` (default :func:`default_device`), in eval mode. ``data`` may pass the training
    tensors to skip loading them (they must be the configuration's data set).
    """
    from safetensors.torch import load_file, save_file

    from robustreg import data as data_module

    full = normalize_config(config)
    key = cache_key(full)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, meta, partial = (
        root / f"{key}.safetensors",
        root / f"{key}.json",
        root / f"{key}.partial.pt",
    )
    device = torch.device(device) if device is not None else default_device()
    dtype = _dtype(full["dtype"])
    if data is None:
        x, y = data_module.load(full["data"], "train", dtype=dtype)
    else:
        x, y = data
    num_classes = int(y.max()) + 1
    # Initialise in the configuration's dtype whatever torch's default dtype is (a float32 draw
    # and a float64 draw from the same seed differ), so the weights depend on the key only.
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(full["seed"])
        torch.set_default_dtype(dtype)
        try:
            model = build_model(full["model"], tuple(x.shape[1:]), num_classes).to(dtype)
        finally:
            torch.set_default_dtype(default_dtype)
    model = model.to(device)

    if meta.is_file() and weights.is_file():
        record = json.loads(meta.read_text())
        state = load_file(str(weights), device=str(device))
        model.load_state_dict(state)
        model.eval()
        record["cached"] = True
        return model, record

    t0 = time.perf_counter()
    common = dict(
        epochs=full["epochs"],
        batch_size=full["batch_size"],
        lr=full["lr"],
        seed=full["seed"],
        optimizer=full["optimizer"],
        weight_decay=full["weight_decay"],
        progress=progress,
        checkpoint=partial,
    )
    if full["adversarial"] is not None:
        adv = dict(full["adversarial"])
        _, history = adversarial_training(model, (x, y), adv.pop("eps"), **adv, **common)
    else:
        _, history = train(
            model, (x, y), full["regularizer"], full["lam"], **common, **full["regularizer_options"]
        )
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic_save(state, weights, lambda s, p: save_file(s, p))
    record = {
        "key": key,
        "config": full,
        "history": history.as_dict(),
        "device": str(device),
        "train_seconds": time.perf_counter() - t0,
        "version": CACHE_VERSION,
    }
    _atomic_save(record, meta, lambda r, p: Path(p).write_text(json.dumps(r, indent=1)))
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    record["cached"] = False
    return model, record

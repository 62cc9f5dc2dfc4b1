"""Training with a regularizer or against an attack: one minibatch loop.

Objective of :func:`train` on a batch B (NOTATION: ℓ(x, y) = −log p_y(x)):

    L(θ) = (1/|B|) Σ_{(x,y)∈B} ℓ(x, y) + λ · (1/|B|) Σ_{(x,y)∈B} R(x, y),

with R one of the regularizers of :mod:`robustreg.regularizers` (per-sample values, in the book's
normalization) or any callable ``(model, x, y, **options) -> Tensor[B]``. With λ = 0 the
regularizer is not evaluated (plain training).

With ``attack=`` (a callable ``(model, x, y, generator) -> x_adv``) the same loop trains on the
attacked batch instead — :func:`adversarial_training` (Madry et al.) passes PGD:

    L(θ) = (1/|B|) Σ_{(x,y)∈B} max_{‖δ‖ ≤ ε, x+δ ∈ [0,1]^d} ℓ(x + δ, y),

the inner maximum approximated by :func:`robustreg.attacks.pgd` (the model in eval mode while
attacking, gradients of the attack not propagated to θ).

Optimizer: Adam (β = (0.9, 0.999), default lr 1e-3) — robust to the scale changes a large λ
brings; ``optimizer="sgd"`` gives SGD with (heavy-ball) momentum 0.9. Learning rate: constant
(``schedule="constant"``), or ``schedule="onecycle"``: PyTorch's
:class:`~torch.optim.lr_scheduler.OneCycleLR` over all the run's batches, peaking at ``lr`` (warm-up
over the first 30 %, cosine annealing to lr/(25·10⁴), momentum β₁ cycled between 0.85 and 0.95) —
a schedule that converges in few epochs (Smith & Topin). No data augmentation.

Validation curves: with ``validation=(x_val, y_val)`` the clean accuracy on it is recorded after
every epoch (``History.val_accuracy``, the model in eval mode), so that a run's convergence can be
read off its curve; it does not change the training.

Determinism: minibatch order comes from a ``torch.Generator`` seeded with ``seed``; the random
draws of a regularizer's estimator (and of PGD's random starts) come from a dedicated generator
seeded with ``seed + 2``, passed as ``generator=`` when the callable accepts one, and otherwise
from torch's global generator, which :func:`train` seeds with ``seed + 1`` inside
:func:`torch.random.fork_rng` (the caller's random state is left untouched). Same seed, data,
model initialisation and device → identical weights (on CUDA, up to nondeterministic kernels).

Data are checked before training (:func:`check_data`): floating inputs in [0, 1], finite, integer
labels in [0, K). Checkpoints (``checkpoint=``) hold the fingerprint of the training call's inputs
(:func:`checkpoint_fingerprint`: the objective, the optimizer settings, a hash of the data and of
the initial weights); a checkpoint of another call is refused, a corrupt one is discarded with a
warning, a finished run deletes it. The identity of a *run* is its configuration's key
(:func:`robustreg.study.cache.cache_key`), which names the cache entry, its checkpoint file and its
result file; the fingerprint only guards a checkpoint against being resumed by other inputs.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from robustreg import attacks, evaluation, files, models, regularizers
from robustreg.extras import require
from robustreg.validation import (
    check_batch,
    check_count,
    check_label_values,
    check_nonnegative,
    check_positive,
)

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "CheckpointMismatchError",
    "History",
    "TrainResult",
    "adversarial_training",
    "check_data",
    "default_device",
    "progress_enabled",
    "checkpoint_fingerprint",
    "train",
]

OPTIMIZERS = ("adam", "sgd")
#: Learning-rate schedules of :func:`train`.
SCHEDULES = ("constant", "onecycle")


@dataclass
class History:
    """Per-epoch records of a training run (means over the epoch's batches)."""

    loss: list[float] = field(default_factory=list)  # mean total objective L
    ce: list[float] = field(default_factory=list)  # mean cross-entropy (on x_adv when adversarial)
    reg: list[float] = field(default_factory=list)  # mean regularizer value (0 when λ = 0)
    accuracy: list[float] = field(default_factory=list)  # running training accuracy
    time: list[float] = field(default_factory=list)  # wall seconds per epoch
    cpu_time: list[float] = field(default_factory=list)  # process CPU seconds per epoch
    val_accuracy: list[float] = field(default_factory=list)  # clean accuracy on `validation`

    @property
    def total_time(self) -> float:
        return float(sum(self.time))

    def as_dict(self) -> dict[str, list[float]]:
        """The records as a dictionary; ``val_accuracy`` only when a validation set was given
        (the records of runs without one are what they were before it existed)."""
        out = asdict(self)
        if not out["val_accuracy"]:
            del out["val_accuracy"]
        return out


class TrainResult(NamedTuple):
    """``(model, history)``; the model is the one passed in, trained in place, in eval mode."""

    model: nn.Module
    history: History


class CheckpointMismatchError(RuntimeError):
    """A checkpoint file that belongs to another training run than the one asked for."""


def default_device() -> torch.device:
    """CUDA when available, else Apple's MPS when available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def progress_enabled(progress: bool | None) -> bool:
    """Whether to draw a progress bar: ``progress``, or (``None``) when stderr is a terminal."""
    if progress is None:
        return bool(getattr(sys.stderr, "isatty", lambda: False)())
    return bool(progress)


def _progress_bar(progress: bool | None, **kwargs):
    if not progress_enabled(progress):
        return _NoBar()
    require("tqdm")
    from tqdm import tqdm  # optional: text bars, no ipywidgets needed in notebooks

    return tqdm(**kwargs)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def _resolve_regularizer(regularizer) -> tuple[str | None, Callable | None]:
    if regularizer is None:
        return None, None
    if isinstance(regularizer, str):
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


def check_data(data, num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a training set ``data = (x, y)`` and return it.

    ``x``: a floating tensor ``[N, ...]`` (N ≥ 1), finite, with values in [0, 1] (the box every
    attack and certificate of the package assumes — scale 0–255 images by 1/255); ``y``: integer
    labels ``[N]`` in ``[0, num_classes)``. Errors name the bad value and K.
    """
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError("data must be a pair (x, y) of tensors")
    x, y = data
    if not (torch.is_tensor(x) and torch.is_tensor(y)):
        raise TypeError("data must be a pair (x, y) of tensors")
    if x.ndim < 2 or y.ndim != 1 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x of shape {tuple(x.shape)} and y of shape {tuple(y.shape)} do not form a data set "
            "(need x [N, ...] and y [N] with N ≥ 1)"
        )
    check_batch(x, finite=True, box=True)
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"y must hold integer labels, got {y.dtype}")
    check_label_values(y, num_classes)
    return x, y


def _check_settings(epochs, batch_size, lr, optimizer, schedule) -> None:
    check_count("epochs", epochs)
    check_count("batch_size", batch_size)
    check_positive("lr", lr)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def _scheduler(opt, schedule: str, lr: float, total_steps: int):
    """The learning-rate schedule, stepped after every batch (None: constant)."""
    if schedule == "constant":
        return None
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_fingerprint(model: nn.Module, data, describe: str, settings: dict) -> str:
    """SHA-256 of the inputs of a training call: the objective (``describe``: regularizer, λ,
    options or attack), the ``settings`` (epochs, batch size, lr, seed, optimizer, weight decay),
    the data and the model's initial parameters and buffers. A checkpoint stores it, and resumes
    only a call with the same fingerprint."""
    h = hashlib.sha256(repr((describe, sorted(settings.items()))).encode())
    h.update(_digest(data).encode())
    h.update(_digest(model.state_dict().values()).encode())
    return h.hexdigest()[:24]


def _load_checkpoint(path: Path, identity: str) -> dict | None:
    """The checkpoint's state if it belongs to this run; None (with a warning) if corrupt."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or "epoch" not in state:
            raise ValueError("not a training checkpoint")
    except Exception as err:  # truncated, not a checkpoint, or unpicklable: start afresh
        warnings.warn(
            f"{path}: corrupt checkpoint discarded ({type(err).__name__}: {err}); "
            "training restarts from the first epoch",
            RuntimeWarning,
            stacklevel=4,
        )
        path.unlink(missing_ok=True)
        return None
    if state.get("identity") != identity:
        raise CheckpointMismatchError(
            f"{path} is the checkpoint of another training run (identity "
            f"{state.get('identity')!r}, this run {identity!r}: objective, settings, data or "
            "initial weights differ); delete it or pass another checkpoint path"
        )
    return state


def _fit(
    model: nn.Module,
    data,
    batch_objective: Callable,
    settings: dict,
    *,
    progress: bool | None,
    checkpoint: str | os.PathLike | None,
    describe: str,
    validation=None,
) -> TrainResult:
    """The minibatch loop: ``batch_objective(model, xb, yb, generator) -> (L, ce, reg, logits)``;
    ``settings``: epochs, batch_size, lr, seed, optimizer, weight_decay and, when not constant,
    schedule."""
    epochs, batch_size, lr, seed, optimizer, weight_decay = (
        settings[k] for k in ("epochs", "batch_size", "lr", "seed", "optimizer", "weight_decay")
    )
    schedule = settings.get("schedule", "constant")
    _check_settings(epochs, batch_size, lr, optimizer, schedule)
    device, dtype = models.device_dtype(model)
    x, y = check_data(data)
    check_label_values(y, models.num_classes(model, x))
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=torch.int64)
    if validation is not None:
        x_val, y_val = check_data(validation)
        check_label_values(y_val, models.num_classes(model, x))
        x_val = x_val.to(device=device, dtype=dtype)
        y_val = y_val.to(device=device, dtype=torch.int64)
    n = x.shape[0]
    n_batches = math.ceil(n / batch_size)
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = _scheduler(opt, schedule, lr, epochs * n_batches)
    order = torch.Generator().manual_seed(seed)
    estimator = torch.Generator(device=device).manual_seed(seed + 2)
    history = History()
    start = 0
    identity = None
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        identity = checkpoint_fingerprint(model, (x, y), describe, settings)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(seed + 1)
        state = (
            _load_checkpoint(checkpoint, identity) if checkpoint and checkpoint.is_file() else None
        )
        if state is not None:
            # RNG states must stay CPU tensors; load_state_dict moves the rest to the device.
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])
            order.set_state(state["order"])
            estimator.set_state(state["estimator"])
            torch.set_rng_state(state["rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            history = History(**{k: list(map(float, v)) for k, v in state["history"].items()})
            start = int(state["epoch"])
        bar = _progress_bar(
            progress,
            total=epochs * n_batches,
            initial=start * n_batches,
            desc=describe,
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
                    if scheduler is not None:
                        scheduler.step()
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
                if validation is not None:
                    model.eval()
                    history.val_accuracy.append(evaluation.accuracy(model, x_val, y_val))
                shown = {"loss": f"{sums[0]:.4f}", "acc": f"{sums[3]:.3f}"}
                if history.val_accuracy:
                    shown["val"] = f"{history.val_accuracy[-1]:.3f}"
                bar.set_postfix(**shown)
                if checkpoint is not None and epoch + 1 < epochs:
                    state = {
                        "identity": identity,
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "order": order.get_state(),
                        "estimator": estimator.get_state(),
                        "rng": torch.get_rng_state(),
                        "history": history.as_dict(),
                        "epoch": epoch + 1,
                    }
                    if scheduler is not None:
                        state["scheduler"] = scheduler.state_dict()
                    if device.type == "cuda":
                        state["cuda_rng"] = torch.cuda.get_rng_state(device)
                    files.atomic_write(checkpoint, functools.partial(torch.save, state))
        finally:
            bar.close()
    if checkpoint is not None:  # finished: the partial state is of no further use
        checkpoint.unlink(missing_ok=True)
    opt.zero_grad(set_to_none=True)
    model.eval()
    return TrainResult(model, history)


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    regularizer: str | Callable | None = None,
    lam: float = 0.0,
    *,
    attack: Callable | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    optimizer: str = "adam",
    weight_decay: float = 0.0,
    schedule: str = "constant",
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    **regularizer_options,
) -> TrainResult:
    """Train ``model`` in place on ``data = (x, y)``; return ``(model, history)``.

    Minimizes mean cross-entropy + ``lam`` · mean ``regularizer`` (module docstring) with Adam
    (or ``optimizer="sgd"``: momentum 0.9) for ``epochs`` passes over shuffled minibatches of
    ``batch_size``, with the learning rate ``schedule`` (``"constant"`` or ``"onecycle"``, peaking
    at ``lr``; module docstring). ``regularizer`` is a name from :func:`robustreg.regularizers.names` or a
    callable ``(model, x, y, **options) -> Tensor[B]``; ``regularizer_options`` are passed to it
    (e.g. ``n_proj=1``, ``h=...``). ``attack``: a callable ``(model, x, y, generator) -> x_adv``
    run on every batch (model in eval mode), the loss then taken on ``x_adv`` (adversarial
    training; see :func:`adversarial_training`).

    ``data`` (and ``validation``, a held-out pair ``(x_val, y_val)`` whose clean accuracy is
    recorded after every epoch in ``history.val_accuracy``) is validated by :func:`check_data`
    against the model's number of classes.
    ``progress``: a tqdm bar over batches (``None``: only when stderr is a terminal).
    ``checkpoint``: a file that holds the state after every epoch; a later call with the same
    inputs (:func:`checkpoint_fingerprint`) resumes from it, a call of another run raises
    :class:`CheckpointMismatchError`, a corrupt file is discarded with a warning, and the file is
    deleted when the run finishes. A non-finite loss raises :class:`FloatingPointError` naming the
    epoch, batch and λ. The model ends in eval mode; ``x`` is cast to the dtype and device of the
    model's parameters.
    """
    check_nonnegative("lam", lam)
    name, fn = _resolve_regularizer(regularizer)
    if lam > 0 and fn is None:
        raise ValueError(f"lam={lam} > 0 needs a regularizer (a name or a callable)")
    if regularizer_options and fn is None:
        raise ValueError(
            f"regularizer options {sorted(regularizer_options)} given without a regularizer"
        )
    if attack is not None and not callable(attack):
        raise TypeError(
            f"attack must be a callable (model, x, y, generator) -> x_adv, got {attack!r}"
        )
    use_reg = fn is not None and lam > 0
    pass_generator = (
        use_reg and "generator" not in regularizer_options and _accepts(fn, "generator")
    )
    reuse_logits = use_reg and _accepts(fn, "return_logits")

    def objective(model, xb, yb, generator):
        if attack is not None:
            model.eval()
            xb = attack(model, xb, yb, generator)
            model.train()
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
    if use_reg and regularizer_options:
        describe += f", options={sorted(regularizer_options.items())}"
    if attack is not None:
        describe = getattr(attack, "describe", None) or f"attack={attack!r}, {describe}"
    settings = dict(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        optimizer=optimizer,
        weight_decay=weight_decay,
    )
    if schedule != "constant":  # the checkpoints of constant-rate runs keep their fingerprint
        settings["schedule"] = schedule
    return _fit(
        model,
        data,
        objective,
        settings,
        progress=progress,
        checkpoint=checkpoint,
        describe=describe,
        validation=validation,
    )


class _PGD:
    """The attack of :func:`adversarial_training`: ``pgd(model, x, y, eps, ...)`` with fixed settings."""

    def __init__(self, eps, norm, steps, step_size, restarts):
        attacks.check_eps_norm(eps, norm)
        self.settings = dict(
            eps=eps, norm=norm, steps=steps, step_size=step_size, restarts=restarts
        )
        self.describe = f"PGD-{norm} adversarial training, ε={eps}, {self.settings}"

    def __call__(self, model, x, y, generator):
        return attacks.pgd(model, x, y, generator=generator, **self.settings)

    def __repr__(self):
        return self.describe


def adversarial_training(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    eps: float,
    *,
    norm: str = "linf",
    steps: int = 10,
    step_size: float | None = None,
    restarts: int = 1,
    **train_options,
) -> TrainResult:
    """PGD adversarial training (Madry et al.): minimize mean ℓ(x_adv, y), x_adv = PGD(x).

    :func:`train` with ``attack`` = :func:`robustreg.attacks.pgd` ``(model, x, y, eps, norm, steps,
    step_size, restarts)``, computed with the model in eval mode; ``train_options`` (epochs,
    batch_size, lr, seed, optimizer, weight_decay, schedule, validation, progress, checkpoint)
    are those of
    :func:`train`. The history's ``accuracy`` is on the adversarial batches.
    """
    return train(model, data, attack=_PGD(eps, norm, steps, step_size, restarts), **train_options)

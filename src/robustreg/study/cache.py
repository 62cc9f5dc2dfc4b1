"""One training run named by its configuration: the run's identity (its key) and the disk cache.

A *configuration* is a plain dictionary (:data:`DEFAULT_CONFIG`: data set, model, regularizer,
λ and options, or PGD adversarial training, optimizer settings, seed, dtype). Its *effective* form
(:func:`normalize_config`) fills every default — the package's and the regularizer's own keyword
defaults (:func:`regularizer_options`) — so its *key* (:func:`cache_key`, a SHA-256 of the
canonical JSON) changes whenever anything that changes the trained network does.

:func:`train_cached` trains a configuration with :func:`robustreg.training.train` on the train
split of its data set (always loaded by name, so a cache entry cannot hold a model trained on other
data) and keeps, under the cache directory::

    <key>.safetensors   the weights, labelled with the key (written first)
    <key>.json          configuration, the weights' SHA-256, history, device,
                        time (written last: marks a finished run)
    <key>.partial.pt    per-epoch resume state while training (its run identity
                        checked; in ``checkpoint_dir`` when one is given, e.g. a
                        study's results directory)
    <key>.partial.provenance
                        beside it: the CPU and numeric environment of each process
                        that began or resumed the training (a resume under others
                        is warned about; the record lists them as ``resumed_by``)
    <key>.diverged.json a run whose loss became non-finite: its configuration and
                        the message (:class:`DivergedError`; not trained again)

A rerun with the same configuration loads the files instead of training, after verifying the
weights (:func:`robustreg.study.weights.read_weights`: label, layout, SHA-256); an interrupted run
resumes from its last finished epoch; a corrupt ``.json`` is an error that names the file. The key
is the one identity of a run: it names the cache entry, labels its weights
(:mod:`robustreg.study.weights`) and is stored in the run's result file
(:mod:`robustreg.study.store`).
:func:`digits_mlp` is the small digits network the theory chapters (02–07) share.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustreg import data as data_module
from robustreg import files, models, regularizers, training
from robustreg.study import provenance
from robustreg.study import weights as weight_files

__all__ = [
    "CACHE_VERSION",
    "DEFAULT_CONFIG",
    "DIGITS_MLP",
    "DivergedError",
    "build_model",
    "cache_key",
    "default_cache_dir",
    "digits_mlp",
    "normalize_config",
    "partial_path",
    "regularizer_options",
    "torch_dtype",
    "training_split",
    "train_cached",
]

# Bump when a change in this package alters what a configuration trains to.
CACHE_VERSION = 1

#: The defaults of a configuration.
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
    "schedule": "constant",  # or "onecycle" (robustreg.training.SCHEDULES)
    "seed": 0,
    "dtype": "float32",
    "validation": False,  # True: train on the "fit" split, keeping "val" out (robustreg.data)
}

#: Keys added after results were published: left out of the canonical form at their default, so
#: the keys of configurations that predate them stay what they were.
_LATER_KEYS = {"validation": False, "schedule": "constant"}


def default_cache_dir() -> Path:
    """``$ROBUSTREG_CACHE`` if set, else ``$XDG_CACHE_HOME/robustreg/runs`` (``~/.cache/...``)."""
    if os.environ.get("ROBUSTREG_CACHE"):
        return Path(os.environ["ROBUSTREG_CACHE"])
    return data_module.cache_dir() / "runs"


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
    full["validation"] = bool(full["validation"])
    if full["schedule"] not in training.SCHEDULES:
        raise ValueError(
            f"unknown schedule {full['schedule']!r}; valid: {', '.join(training.SCHEDULES)}"
        )
    for k, default in _LATER_KEYS.items():
        if full[k] == default:
            del full[k]
    # Canonical JSON round trip (tuples → lists, key order irrelevant).
    return json.loads(json.dumps(full, sort_keys=True))


#: Keyword arguments of a regularizer that select nothing about the trained objective.
_NOT_OPTIONS = ("generator", "return_logits")


def regularizer_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The effective options of regularizer ``name``: its keyword defaults updated by ``options``.

    A run's key hashes these, so a changed default (say CURE's step ``h``) changes the key of
    every run that relied on it, and its stored results become stale instead of being reused.
    """
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


def partial_path(directory: str | os.PathLike, key: str) -> Path:
    """``<directory>/<key>.partial.pt``: where :func:`train_cached` keeps the per-epoch resume
    state of the run with cache key ``key`` while it trains (``directory``: its
    ``checkpoint_dir``, else the cache)."""
    return Path(directory) / f"{key}.partial.pt"


def build_model(spec: Mapping[str, Any], x_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build a :mod:`robustreg.models` network from ``{"name": ..., **kwargs}`` for the data shape.

    ``mlp`` gets ``in_features = prod(x_shape)``; ``lenet`` gets ``in_channels = x_shape[0]`` and
    ``input_size = x_shape[1:]``; both get ``num_classes``. Other keys are passed through.
    """
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


def training_split(config: Mapping[str, Any]) -> str:
    """The split a configuration trains on: ``"fit"`` with ``validation``, else ``"train"``."""
    return "fit" if config.get("validation") else "train"


def torch_dtype(name: str) -> torch.dtype:
    """A configuration's ``dtype`` entry ("float32" or "float64") as a torch dtype."""
    valid = {"float32": torch.float32, "float64": torch.float64}
    if name not in valid:
        raise ValueError(f"unknown dtype {name!r}; valid: {', '.join(valid)}")
    return valid[name]


def _cached_record(meta: Path, weights: Path, key: str) -> dict[str, Any] | None:
    """The record of a finished cache entry, or None when there is none (or only one written
    before entries recorded their weights' SHA-256: such an entry is trained again)."""
    if not (meta.is_file() and weights.is_file()):
        return None
    record = files.read_json(
        meta, "cache entry", f"delete it and {weights.name} to retrain the run"
    )
    if not isinstance(record, dict) or record.get("key") != key:
        got = record.get("key") if isinstance(record, dict) else record
        raise ValueError(f"{meta}: holds run {got!r}, not {key!r}; delete it")
    if "weights_sha256" not in record:
        return None
    return record


def _sessions(partial: Path, key: str) -> list[dict[str, Any]]:
    """Record this process beside a run's checkpoint and return every process that has trained
    the run so far (one entry: a training begun here). A run resumed under another CPU or numeric
    environment than it began in may not have the bits of a run trained in one piece: warned."""
    here = {
        "cpu": provenance.machine()["cpu"],
        "numeric_environment": provenance.numeric_environment(),
        "threads": torch.get_num_threads(),
    }
    path = partial.with_suffix(".provenance")
    earlier = []
    if partial.is_file() and path.is_file():
        try:
            earlier = json.loads(path.read_text())
        except (OSError, ValueError):
            earlier = []
    if earlier and any({k: e.get(k) for k in here} != here for e in earlier if isinstance(e, dict)):
        warnings.warn(
            f"run {key} resumes under {here}, begun under {earlier[0]}: its weights may differ "
            "in the last bits from a training in one piece (the record lists both)",
            RuntimeWarning,
            stacklevel=3,
        )
    sessions = [*earlier, here]
    files.write_json(path, sessions)
    return sessions


class DivergedError(FloatingPointError):
    """A configuration whose training loss became non-finite (:func:`train_cached`): ``key`` and
    ``message`` (the training's, naming the epoch, batch and terms)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def train_cached(
    config: Mapping[str, Any],
    *,
    cache_dir: str | os.PathLike | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the configuration (or load it from the cache); return ``(model, record)``.

    ``config`` keys (defaults in :data:`DEFAULT_CONFIG`): ``data`` (a :func:`robustreg.data.load`
    name; its train split is used), ``model`` (``{"name": "mlp" | "lenet", **kwargs}``),
    ``regularizer``, ``lam``, ``regularizer_options``, ``adversarial`` (None or PGD settings:
    then :func:`robustreg.training.adversarial_training` is used), ``epochs``, ``batch_size``,
    ``lr``, ``optimizer``, ``weight_decay``, ``schedule``, ``seed`` (also seeds the
    initialisation), ``dtype``, ``validation`` (train on the "fit" split and record the accuracy
    on "val" after every epoch in the history's ``val_accuracy``).

    Files under ``cache_dir`` (default :func:`default_cache_dir`): see the module docstring; the
    per-epoch resume state goes to ``checkpoint_dir`` instead when it is given (one left in the
    cache by an earlier call is moved there first). A
    training whose loss becomes non-finite raises :class:`DivergedError`, now and on every
    later call (the divergence is kept in the cache).
    ``record`` is the JSON content plus ``"cached": True`` when it was loaded. The returned model
    is on ``device`` (default :func:`robustreg.training.default_device`), in eval mode. The data
    are always the configuration's (loaded by name, memoized by :mod:`robustreg.data`).
    """
    full = normalize_config(config)
    key = cache_key(full)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    weights, meta = root / f"{key}.safetensors", root / f"{key}.json"
    partial = partial_path(checkpoint_dir if checkpoint_dir is not None else root, key)
    files.remove_leftovers(root)
    if partial.parent != root:
        files.remove_leftovers(partial.parent)
        in_cache = root / partial.name
        if in_cache.is_file():  # written before checkpoint_dir was given: moved there, or dropped
            if not partial.exists():
                files.atomic_write(partial, lambda tmp: shutil.copyfile(in_cache, tmp))
            in_cache.unlink()
    device = torch.device(device) if device is not None else training.default_device()
    dtype = torch_dtype(full["dtype"])
    x, y = data_module.load(full["data"], training_split(full), dtype=dtype)
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

    diverged = root / f"{key}.diverged.json"
    if diverged.is_file():  # trained before, to a non-finite loss: the same again
        raise DivergedError(key, files.read_json(diverged, "divergence record")["diverged"])
    record = _cached_record(meta, weights, key)
    if record is not None:
        expected = weight_files.expected_layout(model)
        try:
            state = weight_files.read_weights(
                weights, key, sha256=record["weights_sha256"], expected=expected, device=device
            )
        except weight_files.WeightsError as err:
            raise weight_files.WeightsError(
                f"{err}. The cache entry is not used; delete {weights.name} and {meta.name} "
                f"in {root} to retrain the run"
            ) from None
        model.load_state_dict(state)
        model.eval()
        if partial.exists():  # a leftover of a run killed after its last write
            partial.unlink(missing_ok=True)
        record["cached"] = True
        return model, record

    sessions = _sessions(partial, key)
    t0 = time.perf_counter()
    common = dict(
        epochs=full["epochs"],
        batch_size=full["batch_size"],
        lr=full["lr"],
        seed=full["seed"],
        optimizer=full["optimizer"],
        weight_decay=full["weight_decay"],
        schedule=full.get("schedule", "constant"),
        progress=progress,
        checkpoint=partial,
    )
    if full.get("validation"):  # the validation curve: clean accuracy on "val" after every epoch
        common["validation"] = data_module.load(full["data"], "val", dtype=dtype)
    try:
        if full["adversarial"] is not None:
            adv = dict(full["adversarial"])
            _, history = training.adversarial_training(
                model, (x, y), adv.pop("eps"), **adv, **common
            )
        else:
            _, history = training.train(
                model,
                (x, y),
                full["regularizer"],
                full["lam"],
                **common,
                **full["regularizer_options"],
            )
    except FloatingPointError as err:  # deterministic: kept, so that a rerun does not repeat it
        files.write_json(diverged, {"key": key, "config": full, "diverged": str(err)})
        partial.unlink(missing_ok=True)
        partial.with_suffix(".provenance").unlink(missing_ok=True)
        raise DivergedError(key, str(err)) from None
    partial.with_suffix(".provenance").unlink(missing_ok=True)
    if partial.parent != root:  # the folder goes with the last of its runs still training
        with contextlib.suppress(OSError):  # not empty (another run's state) or already gone
            partial.parent.rmdir()
    sha256 = weight_files.write_weights(model, weights, key)
    record = {
        "key": key,
        "weights_sha256": sha256,
        "config": full,
        "history": history.as_dict(),
        "device": str(device),
        "train_seconds": time.perf_counter() - t0,
        "version": CACHE_VERSION,
    }
    if len(sessions) > 1:  # resumed: by whom
        record["resumed_by"] = sessions
    files.write_json(meta, record)
    record["cached"] = False
    return model, record


#: The digits network of chapters 02–07: an MLP 64 → 64 → 64 → 10 (ReLU), trained in float64 on
#: scikit-learn's 8×8 digits with Adam (lr 3·10⁻³, batches of 64).
DIGITS_MLP: dict[str, Any] = {
    "data": "digits",
    "model": {"name": "mlp", "hidden": [64, 64]},
    "batch_size": 64,
    "lr": 3e-3,
    "dtype": "float64",
}


def digits_mlp(epochs: int, seed: int = 0, *, progress: bool | None = False, **config) -> nn.Module:
    """The book's digits network (:data:`DIGITS_MLP`) trained for ``epochs`` with ``seed``,
    through the cache of :func:`train_cached`, on the CPU; ``config`` overrides entries (e.g.
    ``regularizer="cross_lipschitz", lam=0.05``)."""
    model, _ = train_cached(
        {**DIGITS_MLP, "epochs": epochs, "seed": seed, **config}, device="cpu", progress=progress
    )
    return model

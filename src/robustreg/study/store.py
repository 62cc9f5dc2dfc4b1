"""Result files: one JSON file per run in a results directory, with the weights of published runs.

::

    <dir>/<method>[_lam<λ>]_seed<s>.json         configuration, history, metrics, machine
    <dir>/<method>[_lam<λ>]_seed<s>.safetensors  the weights of a published run
    <dir>/.checkpoints/<key>.partial.pt          the per-epoch state of a run in training

A result file carries the run's key (:func:`robustreg.study.cache.cache_key`, a hash of its
effective configuration) and its effective evaluation settings. :class:`ResultStore` reads and
writes them safely:

- a file is reused only when both match; a file of another configuration is never overwritten
  (:class:`StaleResultError` names the file, the differences and ``refresh=True``/``--refresh``,
  which replaces it on purpose);
- files are written atomically, the weights first (a result file never lacks its weights); a
  corrupt file is an error naming it;
- a run trained for the directory keeps its per-epoch state beside its results, not in the
  machine's run cache (:attr:`ResultStore.checkpoint_dir`), and drops it when it finishes: a study
  whose directory is committed with a run cut off mid-training resumes that run in a new clone;
- a weight file carries its run's key, the result file the SHA-256 of its tensors; :func:`load_model`
  checks both, the tensors' shapes against the configuration before it reads them, and that the
  stored configuration still hashes to the stored key.

:func:`results_root` finds the published results: ``$ROBUSTREG_RESULTS`` when set, else the
``results/`` folder of the checkout the package runs from, else the edition's release asset
(:mod:`robustreg.study.release`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustreg import files
from robustreg.study import cache, release, weights
from robustreg.study.grid import result_name

__all__ = [
    "ResultStore",
    "StaleResultError",
    "load_model",
    "load_results",
    "read_result",
    "results_root",
    "trained_model",
]


class StaleResultError(RuntimeError):
    """A result file that belongs to another configuration or evaluation than the one asked for."""


def results_root() -> Path:
    """Where the published results live (one directory per profile, e.g. ``results/default``):
    ``$ROBUSTREG_RESULTS`` if set, else the checkout's ``results/``, else this edition's release
    asset, fetched and verified (:mod:`robustreg.study.release` gives the order and the errors)."""
    if os.environ.get("ROBUSTREG_RESULTS"):
        root = Path(os.environ["ROBUSTREG_RESULTS"])
        if not root.is_dir():
            raise FileNotFoundError(f"ROBUSTREG_RESULTS={root} is not a directory")
        return root
    package = Path(__file__).resolve().parents[1]  # src/robustreg in a checkout
    checkout = package.parents[1] / "results"
    if package.parent.name == "src" and checkout.is_dir():
        return checkout
    return release.fetch_results()


#: The fields every result file has, with their types.
RESULT_FIELDS = {
    "name": str,
    "method": str,
    "key": str,
    "config": dict,
    "eval": dict,
    "input_shape": list,
    "num_classes": int,
    "rows": list,
}


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """One result file; a truncated, corrupt or malformed file raises ``ValueError`` naming it
    and the field that is wrong."""
    recover = "delete it and rerun the grid to recreate it (or restore it with git checkout)"
    try:
        record = files.read_json(path, "result file", recover)
    except RecursionError:
        raise ValueError(
            f"{path}: not a valid result file (nested too deeply); {recover}"
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{path}: not a valid result file (a JSON {type(record).__name__}, not an object); "
            + recover
        )
    for name, kind in RESULT_FIELDS.items():
        if not isinstance(record.get(name), kind) or isinstance(record.get(name), bool):
            got = "missing" if name not in record else f"a {type(record[name]).__name__}"
            raise ValueError(
                f"{path}: not a valid result file (field {name!r} is {got}, a "
                f"{kind.__name__} expected); {recover}"
            )
    shape = record["input_shape"]
    if not shape or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape
    ):
        raise ValueError(f"{path}: field 'input_shape' must list positive sizes, got {shape!r}")
    if record["num_classes"] < 2:
        raise ValueError(f"{path}: field 'num_classes' must be ≥ 2, got {record['num_classes']!r}")
    return record


def load_results(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result file of a results directory, sorted by name. Other JSON files (a study's
    ``selection.json``, a sharded grid's plan, a cross-check) are left out: a result file is one
    whose name is its record's ``name``."""
    out = []
    for f in sorted(Path(directory).glob("*.json")):
        head = files.read_json(f, "JSON file", "delete it or restore it")
        if isinstance(head, dict) and head.get("name") == f.name:
            out.append(read_result(f))
    return out


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        out = []
        for k in sorted(set(stored) | set(wanted)):
            out += _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")
        return out
    if stored == wanted:
        return []
    return [f"{prefix.rstrip('.')}: {stored!r} in the file, {wanted!r} now"]


def load_model(result_file: str | os.PathLike) -> nn.Module:
    """The trained network of a result file, from ``<stem>.safetensors`` beside it, in eval mode.

    The stored configuration must hash to the stored key, and the weights file must carry that
    key (they are written together); the model has the configuration's dtype and lives on the CPU.
    """
    path = Path(result_file)
    record = read_result(path)
    weight_file = path.with_suffix(".safetensors")
    if not weight_file.is_file():
        raise FileNotFoundError(
            f"{weight_file}: no weights stored for this run (a profile publishes the seed-0 "
            "models of its tables: see robustreg.study.grid.publishes_weights)"
        )
    config = record["config"]
    try:
        key = cache.cache_key(config)
    except (ValueError, TypeError) as err:
        raise StaleResultError(f"{path}: its configuration is not valid ({err})") from None
    if key != record["key"]:
        raise StaleResultError(
            f"{path}: its configuration hashes to {key!r}, not to the stored key "
            f"{record['key']!r} (the file was edited, or a default changed since it was "
            "written); restore it (git checkout) or recompute it with --refresh"
        )
    if not isinstance(record.get("weights_sha256"), str):
        raise StaleResultError(
            f"{path}: no SHA-256 of its weights is recorded (field 'weights_sha256'), so "
            f"{weight_file.name} cannot be verified; recompute the run with --refresh"
        )
    dtype = cache.torch_dtype(config["dtype"])
    shape, k = tuple(record["input_shape"]), record["num_classes"]
    with torch.device("meta"):  # shapes only: nothing is allocated before the file is checked
        expected = weights.expected_layout(cache.build_model(config["model"], shape, k).to(dtype))
    try:
        state = weights.read_weights(
            weight_file, record["key"], sha256=record["weights_sha256"], expected=expected
        )
    except weights.WeightsError as err:
        raise StaleResultError(f"{err} ({path.name} is not loaded)") from None
    model = cache.build_model(config["model"], shape, k).to(dtype)
    model.load_state_dict(state)
    return model.eval()


class ResultStore:
    """The result files of one directory (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"ResultStore({str(self.directory)!r})"

    @property
    def checkpoint_dir(self) -> Path:
        """Where the runs trained for this directory keep their per-epoch state
        (``.checkpoints/``; hidden, so that the release asset leaves it out)."""
        return self.directory / ".checkpoints"

    def partial_path(self, config: Mapping[str, Any]) -> Path:
        """Where a run of this directory keeps its per-epoch state while it trains:
        :func:`robustreg.study.cache.partial_path` in :attr:`checkpoint_dir`, by the run's cache
        key (the file exists while the run is in flight, or was cut off)."""
        return cache.partial_path(self.checkpoint_dir, cache.cache_key(config))

    def path(self, config: Mapping[str, Any]) -> Path:
        """The result file of a run configuration."""
        return self.directory / result_name(config)

    def remove_leftovers(self) -> None:
        """Delete the temporary files a killed writer left behind."""
        files.remove_leftovers(self.directory)

    def read(self, config: Mapping[str, Any]) -> dict[str, Any] | None:
        """The stored record of a run, or None when there is none."""
        path = self.path(config)
        return read_result(path) if path.is_file() else None

    def check(
        self, stored: Mapping[str, Any], config: Mapping[str, Any], settings: Mapping[str, Any]
    ) -> None:
        """Raise :class:`StaleResultError` unless ``stored`` is this run under these evaluation
        settings, naming every difference."""
        key = cache.cache_key(config)
        if stored.get("key") == key and stored.get("eval") == settings:
            return
        diffs = _differences(
            {"config": stored.get("config"), "eval": stored.get("eval")},
            {"config": cache.normalize_config(config), "eval": settings},
        ) or [f"key: {stored.get('key')!r} in the file, {key!r} now (CACHE_VERSION changed)"]
        raise StaleResultError(
            f"{self.path(config)} belongs to another configuration than this run ("
            + "; ".join(diffs)
            + "). It is left untouched; pass refresh=True (--refresh) to replace it on purpose, "
            "or use another results directory."
        )

    @staticmethod
    def gains_autoattack(stored: Mapping[str, Any], key: str, settings: Mapping[str, Any]) -> bool:
        """Whether ``stored`` is this very run evaluated without the AutoAttack that ``settings``
        add (a sweep λ that the selection then picked); nothing else may differ."""
        old = stored.get("eval") or {}
        if stored.get("key") != key or old.get("autoattack_eps"):
            return False
        if not settings.get("autoattack_eps"):
            return False
        same = {k: v for k, v in settings.items() if not k.startswith("autoattack")}
        return {k: v for k, v in old.items() if not k.startswith("autoattack")} == same

    @staticmethod
    def missing_autoattack(
        stored: Mapping[str, Any], key: str, settings: Mapping[str, Any]
    ) -> dict[str, float]:
        """The AutoAttack radii ``{norm: ε}`` that ``settings`` add to ``stored``, this very run
        evaluated with AutoAttack at fewer norms (a profile whose AutoAttack gained a norm after
        the run was evaluated; :func:`robustreg.study.evaluate.add_autoattack` computes them);
        nothing else may differ, the radii it already has included. Empty otherwise."""
        old = dict(stored.get("eval") or {})
        new = dict(settings)
        if not new.get("per_image") or new.get("autoattack_version") != "standard":
            return {}  # only the per-image, standard AutoAttack pairs with the stored PGD flags
        old_eps, new_eps = old.pop("autoattack_eps", None), new.pop("autoattack_eps", None)
        if stored.get("key") != key or not old_eps or not new_eps or old != new:
            return {}
        if any(new_eps.get(norm) != e for norm, e in old_eps.items()):
            return {}
        return {norm: e for norm, e in new_eps.items() if norm not in old_eps}

    def write(self, record: Mapping[str, Any], model: nn.Module | None = None) -> Path:
        """Write a run's record (``record["name"]`` in this directory), and first, when ``model``
        is given, its weights labelled with ``record["key"]``, whose SHA-256 the record then
        carries (``weights_sha256``)."""
        path = self.directory / record["name"]
        record = dict(record)
        if model is not None:
            weight_file = path.with_suffix(".safetensors")
            record["weights_sha256"] = weights.write_weights(model, weight_file, record["key"])
        return files.write_json(path, record)

    def records(self) -> list[dict[str, Any]]:
        """Every result file of the directory (:func:`load_results`)."""
        return load_results(self.directory)

    def load_model(self, name: str) -> nn.Module:
        """The published model of result file ``name`` (``plain_seed0`` or ``plain_seed0.json``)."""
        return load_model(self.directory / (name if name.endswith(".json") else f"{name}.json"))


def trained_model(
    profile: str,
    config: Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    train: bool = True,
) -> nn.Module:
    """The network of one run of a profile's grid, in eval mode.

    The published model of ``results_dir`` (default ``results_root()/<profile>``) when its
    weights are there — the very network whose metrics the result file reports — and otherwise
    the run trained through :func:`robustreg.study.cache.train_cached` (a seed or profile whose
    runs were not published); with ``train=False`` an unpublished run is a
    ``FileNotFoundError`` instead. A published file of another configuration raises
    :class:`StaleResultError` rather than being used.
    """
    root = Path(results_dir) if results_dir is not None else results_root() / profile
    path = root / result_name(config)
    if path.with_suffix(".safetensors").is_file():
        key = cache.cache_key(config)
        if read_result(path)["key"] != key:
            raise StaleResultError(
                f"{path} belongs to another configuration than {result_name(config)} asks for "
                f"under today's code; recompute it with `python -m robustreg run-grid --profile "
                f"{profile} --results-dir {root} --refresh`"
            )
        return load_model(path)
    if not train:
        raise FileNotFoundError(
            f"{path.with_suffix('.safetensors')}: the weights of this run are not published (yet); "
            f"compute them with `python -m robustreg run-grid --profile {profile} --results-dir "
            f"{root}`"
        )
    model, _ = cache.train_cached(config, cache_dir=cache_dir, device="cpu", progress=False)
    return model

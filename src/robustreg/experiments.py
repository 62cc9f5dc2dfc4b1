"""The experiment grid: its profiles, its runs, their result files and the published models.

A *run* is one training configuration of :func:`grid` (plain training, a regularizer at one λ, or
PGD adversarial training; one seed). :func:`run_grid` trains each run (through the disk cache of
:func:`robustreg.runs.train_cached`), evaluates it (:func:`robustreg.evaluation.evaluate`)
and, with ``results_dir``, keeps one JSON *result file* per run::

    <results_dir>/<method>[_lam<λ>]_seed<s>.json     configuration, history, metrics, machine
    <results_dir>/<method>[_lam<λ>]_seed<s>.safetensors  the weights, for the runs a profile
                                                     publishes (:func:`publishes_weights`)

A result file carries the run's *key*: a hash of its effective configuration, defaults included
(a regularizer's default step or estimator, :func:`robustreg.runs.regularizer_options`), and
the effective evaluation settings (:func:`eval_settings`). The files are safe by construction:

- a file is reused only when both match; a file of another configuration is never overwritten
  (:class:`StaleResultError` names the file, the differences and ``refresh=True``/``--refresh``,
  which replaces it on purpose);
- ``read_only=True`` (how the book reads its committed results) never trains: a missing or stale
  file is an error that says how to produce it;
- files are written atomically; a corrupt file is an error naming it;
- a weights file stores its run's key and :func:`load_model` checks it.

:func:`check_reproduction` retrains committed runs and compares their metrics with the files,
within tolerances derived from the seed-to-seed spread (``python -m robustreg verify-results``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from robustreg import data as data_module
from robustreg import evaluation, files, runs, training
from robustreg.extras import missing
from robustreg.profiles import PROFILES

try:  # the experiment stack: pip install "robustreg[experiments]"
    import joblib
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(missing(err.name)) from err

#: The repository's committed results, one directory per profile (``results/default``).
RESULTS_ROOT = Path(__file__).resolve().parents[2] / "results"

__all__ = [
    "PROFILES",
    "REPRODUCED_METRICS",
    "RESULTS_ROOT",
    "StaleResultError",
    "check_reproduction",
    "eval_settings",
    "grid",
    "label",
    "load_model",
    "load_results",
    "machine",
    "numeric_environment",
    "publishes_weights",
    "read_result",
    "result_name",
    "run_grid",
    "run_study",
    "select_lambdas",
    "selected_runs",
    "trained_model",
]


def grid(
    profile: str = "default",
    *,
    selection: Mapping[str, Any] | None = None,
    **overrides,
) -> list[dict[str, Any]]:
    """The training configurations of a profile (for :func:`robustreg.runs.train_cached`).

    Per seed: plain training, every regularizer at every λ of the profile, and PGD adversarial
    training (one run per entry when ``adversarial`` is a list); with ``selection`` (from
    :func:`select_lambdas`) also each regularizer at its selected λ not already in the sweep.
    ``overrides`` replace profile entries (e.g. ``seeds=[0]``, ``epochs=3``).
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; valid: {', '.join(PROFILES)}")
    p = {**PROFILES[profile], **overrides}
    unknown = sorted(set(overrides) - set(PROFILES[profile]))
    if unknown:
        raise ValueError(f"unknown grid settings {unknown}; valid: {sorted(PROFILES[profile])}")
    base = {k: p[k] for k in ("data", "model", "epochs", "batch_size", "lr")}
    if p.get("validation"):
        base["validation"] = True
    adversarial = p.get("adversarial") or []
    adversarial = [adversarial] if isinstance(adversarial, Mapping) else list(adversarial)
    extra = {reg: [] for reg in p["lambdas"]}
    for reg, lam in selected_runs(selection):
        if lam not in p["lambdas"][reg] and lam not in extra[reg]:
            extra[reg].append(lam)
    configs = []
    for seed in p["seeds"]:
        configs.append({**base, "seed": seed})
        for reg, lams in p["lambdas"].items():
            for lam in [*lams, *extra[reg]]:
                configs.append(
                    {
                        **base,
                        "seed": seed,
                        "regularizer": reg,
                        "lam": lam,
                        "regularizer_options": p["regularizer_options"].get(reg, {}),
                    }
                )
        for adv in adversarial:
            configs.append({**base, "seed": seed, "adversarial": dict(adv)})
    return configs


def selected_runs(selection: Mapping[str, Any] | None) -> list[tuple[str, float]]:
    """The (regularizer, λ) pairs a selection (:func:`select_lambdas`) picked, in its order."""
    out = []
    for reg, targets in ((selection or {}).get("lambdas") or {}).items():
        for entry in targets.values():
            if entry.get("lam") is not None and (reg, entry["lam"]) not in out:
                out.append((reg, float(entry["lam"])))
    return out


def _round_significant(value: float, digits: int = 3) -> float:
    return float(f"{value:.{digits - 1}e}")


def select_lambdas(profile: str, rows: Sequence[Mapping[str, Any]], **overrides) -> dict[str, Any]:
    """λ at matched clean validation accuracy, per regularizer and target of the profile.

    For a target t (points), the wanted validation accuracy is a₀ − t/100, a₀ plain training's
    mean over seeds. Along the sweep (λ increasing, mean validation accuracy over seeds a(λ)),
    the first λ_i with a(λ_i) ≤ a₀ − t/100 and its predecessor λ_{i−1} bracket the target; λ*
    interpolates log λ linearly in a and is rounded to 3 significant digits. ``lam`` is None
    (with ``reason``) when the sweep never loses t points or its smallest λ already does.
    ``rows``: ``val_accuracy`` rows (``method``, ``lam``, ``value``) of every seed's sweep;
    ``overrides`` replace profile entries (``lambdas``, ``targets``), as in :func:`grid`.
    """
    p = {**PROFILES[profile], **overrides}
    val = {}
    for r in rows:
        if r["metric"] == "val_accuracy":
            val.setdefault((r["method"], float(r["lam"])), []).append(r["value"])
    if ("plain", 0.0) not in val:
        raise ValueError("select_lambdas needs plain training's val_accuracy rows")
    mean = {k: statistics.fmean(v) for k, v in val.items()}
    plain = mean["plain", 0.0]
    out: dict[str, Any] = {
        "plain_val_accuracy": plain,
        "targets": list(p["targets"]),
        "lambdas": {},
    }
    for reg, lams in p["lambdas"].items():
        curve = [(float(lam), mean[reg, float(lam)]) for lam in sorted(lams)]
        out["lambdas"][reg] = {}
        for t in p["targets"]:
            wanted = plain - t / 100
            entry: dict[str, Any] = {"wanted_val_accuracy": wanted, "curve": curve}
            hit = next((i for i, (_, a) in enumerate(curve) if a <= wanted), None)
            if hit is None:
                entry.update(lam=None, reason=f"the largest λ loses less than {t} points")
            elif hit == 0:
                entry.update(
                    lam=None, reason=f"the smallest λ already loses {t} points: extend the sweep"
                )
            else:
                (l0, a0), (l1, a1) = curve[hit - 1], curve[hit]
                w = (a0 - wanted) / (a0 - a1) if a0 != a1 else 1.0
                lam = math.exp(math.log(l0) + w * (math.log(l1) - math.log(l0)))
                entry.update(lam=_round_significant(lam), reason=None)
            out["lambdas"][reg][str(t)] = entry
    return out


def label(config: Mapping[str, Any]) -> str:
    """Short name of a configuration's method: ``plain``, ``adversarial`` or the regularizer."""
    if config.get("adversarial"):
        norm = config["adversarial"].get("norm", "linf")
        return "adversarial" if norm == "linf" else f"adversarial-{norm}"
    if config.get("regularizer") and config.get("lam", 0):
        return str(config["regularizer"])
    return "plain"


def publishes_weights(
    profile: str, config: Mapping[str, Any], selection: Mapping[str, Any] | None = None
) -> bool:
    """Whether a run's weights are kept next to its result file. Profiles with ``targets`` (the
    matched-strength sweeps): the models of seed 0 that :func:`run_grid` attacks with
    AutoAttack (plain training, the adversarial baselines, each regularizer at its selected λ).
    Otherwise: plain training and each regularizer at the profile's largest λ (the models chapter
    9 measures), every seed."""
    method = label(config)
    if PROFILES[profile].get("targets"):
        return config["seed"] == 0 and _attacked(config, selection)
    if method == "plain":
        return True
    lambdas = PROFILES[profile]["lambdas"]
    return method in lambdas and float(config["lam"]) == float(max(lambdas[method]))


#: Evaluation settings added after results were published, left out at their defaults.
_LATER_SETTINGS = {"per_image": False, "autoattack_steps": 100, "autoattack_queries": 5000}


def eval_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The effective evaluation settings: :func:`robustreg.evaluation.evaluate`'s keyword defaults
    updated by ``settings`` (a profile's ``"eval"``, plus ``n_test``), as canonical JSON."""
    defaults = {
        k: p.default
        for k, p in inspect.signature(evaluation.evaluate).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = sorted(set(settings) - set(defaults) - {"n_test"})
    if unknown:
        raise ValueError(f"unknown evaluation settings {unknown}; valid: {sorted(defaults)}")
    full = {**defaults, **settings}
    for k, default in _LATER_SETTINGS.items():  # absent from earlier result files' settings
        if full[k] == default:
            del full[k]
    return json.loads(json.dumps(full, sort_keys=True))


def _attacked(config: Mapping[str, Any], selection: Mapping[str, Any] | None) -> bool:
    """Whether a matched-strength run gets AutoAttack: plain, the baselines, selected λ."""
    method = label(config)
    if method == "plain" or method.startswith("adversarial"):
        return True
    return (method, float(config["lam"])) in selected_runs(selection)


def _run_eval_settings(
    p: Mapping[str, Any], config: Mapping[str, Any], selection: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    settings = dict(p["eval"])
    aa = p.get("autoattack")
    if p.get("targets"):
        if aa and _attacked(config, selection):
            settings.update(
                autoattack_eps=aa["eps"],
                autoattack_n=aa["n"],
                autoattack_version=aa["version"],
                autoattack_steps=aa.get("steps", 100),
                autoattack_queries=aa.get("n_queries", 5000),
            )
    elif aa and config["seed"] in aa["seeds"]:
        settings.update(autoattack_eps=aa["eps"], autoattack_n=aa["n"])
    return eval_settings(settings)


def machine() -> dict[str, Any]:
    """The computer a run happens on: CPU model, cores, torch threads, versions, load average."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "system": platform.system(),
        "environment": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")},
        # 1-minute load average when the run ended: > cores means a shared, busy machine
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def result_name(config: Mapping[str, Any]) -> str:
    """File name of a run in a results directory: ``plain_seed0.json``,
    ``curvature_lam1_seed2.json``, ``adversarial_seed1.json`` (ℓ∞), ``adversarial-l2_seed1.json``."""
    method = label(config)
    plain = method == "plain" or method.startswith("adversarial")
    lam = "" if plain else f"_lam{float(config['lam']):g}"
    return f"{method}{lam}_seed{config['seed']}.json"


class StaleResultError(RuntimeError):
    """A result file that belongs to another configuration or evaluation than the one asked for."""


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    """One result file; a truncated or corrupt file raises ``ValueError`` naming it."""
    return files.read_json(path, "result file", "delete it and rerun the grid to recreate it")


def load_results(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every result file of a results directory (written by :func:`run_grid`), sorted by name."""
    return [read_result(f) for f in sorted(Path(results_dir).glob("*.json"))]


def _differences(stored: Any, wanted: Any, prefix: str = "") -> list[str]:
    if isinstance(stored, Mapping) and isinstance(wanted, Mapping):
        out = []
        for k in sorted(set(stored) | set(wanted)):
            out += _differences(stored.get(k), wanted.get(k), f"{prefix}{k}.")
        return out
    return (
        []
        if stored == wanted
        else [f"{prefix.rstrip('.')}: {stored!r} in the file, {wanted!r} now"]
    )


def _check_stored(
    path: Path, stored: Mapping, config: Mapping, key: str, settings: Mapping
) -> None:
    if stored.get("key") == key and stored.get("eval") == settings:
        return
    diffs = _differences(
        {"config": stored.get("config"), "eval": stored.get("eval")},
        {"config": runs.normalize_config(config), "eval": settings},
    ) or [f"key: {stored.get('key')!r} in the file, {key!r} now (runs.CACHE_VERSION changed)"]
    raise StaleResultError(
        f"{path} belongs to another configuration than this run ("
        + "; ".join(diffs)
        + "). It is left untouched; pass refresh=True (--refresh) to replace it on purpose, "
        "or use another results directory."
    )


def _gains_autoattack(stored: Mapping, key: str, settings: Mapping) -> bool:
    """Whether a file holds this very run evaluated without the AutoAttack that ``settings`` add
    (a sweep λ that :func:`select_lambdas` then selected); nothing else may differ."""
    old = stored.get("eval") or {}
    if stored.get("key") != key or old.get("autoattack_eps") or not settings.get("autoattack_eps"):
        return False
    same = {k: v for k, v in settings.items() if not k.startswith("autoattack")}
    return {k: v for k, v in old.items() if not k.startswith("autoattack")} == same


def _save_weights(model: nn.Module, key: str, path: Path) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    files.atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"key": key}))


def load_model(result_file: str | os.PathLike) -> nn.Module:
    """The trained network of a result file, from ``<stem>.safetensors`` beside it, in eval mode.

    The weights file must carry the result's key (they are written together by :func:`run_grid`);
    the model has the configuration's dtype and lives on the CPU.
    """
    path = Path(result_file)
    record = read_result(path)
    weights = path.with_suffix(".safetensors")
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: no weights stored for this run (a profile publishes the seed-0 "
            "models of its tables: see experiments.publishes_weights)"
        )
    with safe_open(str(weights), framework="pt") as f:
        stored_key = (f.metadata() or {}).get("key")
    if stored_key != record["key"]:
        raise StaleResultError(
            f"{weights} belongs to run {stored_key!r}, not to {path.name} ({record['key']!r})"
        )
    config = record["config"]
    dtype = runs.torch_dtype(config["dtype"])
    model = runs.build_model(config["model"], tuple(record["input_shape"]), record["num_classes"])
    model = model.to(dtype)
    model.load_state_dict(load_file(str(weights)))
    return model.eval()


def _evaluate(model, test, settings) -> dict[str, Any]:
    s = dict(settings)
    n = s.pop("n_test", None)
    x, y = test
    if n is not None:
        x, y = x[:n], y[:n]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = evaluation.evaluate(model, x, y, **s)
    return {
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


def numeric_environment() -> dict[str, Any]:
    """What decides the bits of a computation besides its inputs: ATen's instruction set and
    Intel MKL's reproducibility mode (both fixed when torch loads)."""
    return {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "MKL_CBWR": os.environ.get("MKL_CBWR"),
    }


@contextlib.contextmanager
def _inherited_environment(environment: Mapping[str, Any]):
    """Worker processes started inside load torch with this process's numeric environment."""
    wanted = {
        "ATEN_CPU_CAPABILITY": environment["cpu_capability"].lower(),
        "MKL_CBWR": environment["MKL_CBWR"],
    }
    saved = {k: os.environ.get(k) for k in wanted}

    def apply(values):
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    apply(wanted)
    try:
        yield
    finally:
        apply(saved)


def _shard(configs: list, shard) -> list:
    """The configurations of shard ``(i, n)`` (or ``"i/n"``), i in 1..n: every n-th from the i-th."""
    if shard is None:
        return configs
    if isinstance(shard, str):
        try:
            i, n = (int(v) for v in shard.split("/"))
        except ValueError:
            raise ValueError(f"shard must read I/N (e.g. 2/4), got {shard!r}") from None
    else:
        i, n = shard
    if not (isinstance(n, int) and isinstance(i, int) and 1 <= i <= n):
        raise ValueError(f"shard I/N needs integers 1 ≤ I ≤ N, got {i}/{n}")
    return configs[i - 1 :: n]


def _run_one(
    config: Mapping[str, Any],
    *,
    profile: str,
    settings: Mapping[str, Any],
    results: Path | None,
    cache_dir,
    refresh: bool,
    read_only: bool,
    device,
    progress,
    evaluate_models: bool,
    threads: int | None = None,
    environment: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train (or load) and evaluate one run of a grid; write its result file; return its rows
    and its record."""
    if threads is not None:  # a worker process computes with the caller's thread count
        torch.set_num_threads(threads)
    if environment is not None and numeric_environment() != environment:
        raise RuntimeError(
            f"a worker process computes under {numeric_environment()}, the grid under "
            f"{environment}: its files would differ from a serial run's; use jobs=1"
        )
    eval_s = _run_eval_settings(settings, config, selection)
    key = runs.cache_key(config)
    dtype = runs.torch_dtype(runs.normalize_config(config)["dtype"])
    path = results / result_name(config) if results is not None else None
    stored = None
    if path is not None and path.is_file() and not refresh:
        stored = read_result(path)
        if not (_gains_autoattack(stored, key, eval_s) and not read_only):
            _check_stored(path, stored, config, key, eval_s)
        else:  # the same run, selected after its sweep evaluation: evaluate it again with AA
            stored = None
    if stored is None and read_only:
        raise FileNotFoundError(
            f"{path}: no result file for this run; compute it with "
            f"`python -m robustreg run-grid --profile {profile} --results-dir {results}`"
        )
    model = None
    if stored is None or not evaluate_models:
        model, record = runs.train_cached(
            config, cache_dir=cache_dir, device=device, progress=progress
        )
    if stored is not None:
        record = stored
    times, cpu = record["history"]["time"], record["history"].get("cpu_time")
    extra = {
        "method": label(config),
        "lam": float(config.get("lam", 0.0)),
        "seed": config["seed"],
        "key": record["key"],
        "seconds_per_epoch": sum(times) / max(len(times), 1),
        "cpu_seconds_per_epoch": statistics.median(cpu) if cpu else None,
    }
    if not evaluate_models:
        return [{**extra, "metric": "trained", "value": 1.0}], record
    if stored is None:
        train_x, train_y = data_module.load(settings["data"], "train", dtype=dtype)
        payload = _evaluate(model, data_module.load(settings["data"], "test", dtype=dtype), eval_s)
        if config.get("validation"):
            x_val, y_val = data_module.load(settings["data"], "val", dtype=dtype)
            acc = evaluation.accuracy(model, x_val, y_val)
            row = {"metric": "val_accuracy", "attack": None, "norm": None, "eps": None}
            payload["rows"].insert(0, {**row, "regularizer": None, "value": acc})
        stored = {
            "name": result_name(config),
            "method": extra["method"],
            "lam": extra["lam"],
            "seed": extra["seed"],
            "key": key,
            "config": record["config"],
            "eval": eval_s,
            "input_shape": list(train_x.shape[1:]),
            "num_classes": int(train_y.max()) + 1,
            "history": record["history"],
            "train_seconds": record["train_seconds"],
            "eval_seconds": payload["seconds"],
            "eval_cpu_seconds": payload["cpu_seconds"],
            "device": str(record["device"]),
            "machine": machine(),
            "rows": payload["rows"],
        }
        if path is not None:  # the weights first: a result file never lacks its published weights
            if publishes_weights(profile, config, selection):
                _save_weights(model, key, path.with_suffix(".safetensors"))
            files.write_json(path, stored)
    return [{**extra, **r} for r in stored["rows"]], stored


def run_grid(
    profile: str = "default",
    *,
    cache_dir: str | os.PathLike | None = None,
    results_dir: str | os.PathLike | None = None,
    refresh: bool = False,
    read_only: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    evaluate_models: bool = True,
    shard: str | tuple[int, int] | None = None,
    jobs: int = 1,
    with_records: bool = False,
    selection: Mapping[str, Any] | None = None,
    **overrides,
):
    """Train (or load) and evaluate every configuration of :func:`grid`; return tidy rows.

    Each row of :func:`robustreg.evaluation.evaluate` gains the columns ``method``, ``lam``,
    ``seed``, ``key``, ``seconds_per_epoch`` (mean wall time of an epoch of that training run) and
    ``cpu_seconds_per_epoch`` (median process CPU time of an epoch — on a shared machine the better
    measure of cost, the median skipping a first epoch's warm-up). Every training is cached, so
    an interrupted grid resumes where it stopped.

    ``results_dir``: read each run from its result file when the file's key and evaluation
    settings match — no model is built — and otherwise train, evaluate and write the file
    (atomically), with the weights of the runs the profile publishes (written together, so the
    weights always belong to the metrics beside them). A file of another
    configuration raises :class:`StaleResultError` unless ``refresh=True``, which recomputes and
    replaces every file. ``read_only=True`` never trains: a missing or stale file is an error.
    Without ``evaluate_models`` the files are neither read nor written.

    ``shard="I/N"`` runs every N-th configuration from the I-th (1 ≤ I ≤ N), so N jobs of a
    scheduler's array share a grid, each writing its own files into one directory; ``jobs``
    runs that many local processes (joblib), each with this process's thread count, so the
    files are those of a serial run. Ctrl-C stops after saying what is saved.

    ``with_records=True`` returns ``(rows, records)``: also each run's full record (its result
    file's content: configuration, history, timings, machine), in the order of the grid — all a
    chapter needs, from one read of the directory.
    """
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    settings = {**PROFILES[profile], **overrides} if profile in PROFILES else None
    configs = _shard(grid(profile, selection=selection, **overrides), shard)
    results = Path(results_dir) if results_dir is not None and evaluate_models else None
    if read_only and results is None:
        raise ValueError("read_only=True needs a results_dir to read from")
    if results is not None:
        files.remove_leftovers(results)
    task = functools.partial(
        _run_one,
        profile=profile,
        settings=settings,
        results=results,
        cache_dir=cache_dir,
        refresh=refresh,
        read_only=read_only,
        device=device,
        progress=progress if jobs == 1 else False,
        evaluate_models=evaluate_models,
        selection=selection,
    )
    bar = tqdm(
        total=len(configs), desc=f"grid {profile}", disable=not training.progress_enabled(progress)
    )
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    done = 0
    env = numeric_environment()
    try:
        with _inherited_environment(env) if jobs > 1 else contextlib.nullcontext():
            if jobs == 1:
                outputs = map(task, configs)
            else:  # results stream back in the grid's order, so the bar moves as runs finish
                outputs = joblib.Parallel(n_jobs=jobs, return_as="generator")(
                    joblib.delayed(task)(c, threads=torch.get_num_threads(), environment=env)
                    for c in configs
                )
            for config, (out, record) in zip(configs, outputs, strict=True):
                rows += out
                records.append(record)
                done += 1
                bar.set_postfix(
                    method=label(config), lam=config.get("lam", 0.0), seed=config["seed"]
                )
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        where = f"result files in {results}" if results is not None else "nothing written"
        print(
            f"\ninterrupted: {done} of {len(configs)} runs finished ({where}; trained models and "
            "per-epoch checkpoints in the run cache); rerun the same command to resume",
            file=sys.stderr,
        )
        raise
    bar.close()
    return (rows, records) if with_records else rows


SELECTION_FILE = "selection.json"


def _validation_rows(profile: str, kwargs: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Clean validation accuracy of every trained run of the sweep (from the run cache; a run not
    trained yet raises FileNotFoundError)."""
    overrides = {k: v for k, v in kwargs.items() if k in PROFILES[profile]}
    cache = kwargs.get("cache_dir")
    root = Path(cache) if cache is not None else runs.default_cache_dir()
    rows = []
    for config in grid(profile, **overrides):
        if not (root / f"{runs.cache_key(config)}.json").is_file():
            raise FileNotFoundError(f"{result_name(config)} is not trained yet")
        model, _ = runs.train_cached(config, cache_dir=cache, progress=False)
        dtype = runs.torch_dtype(runs.normalize_config(config)["dtype"])
        x_val, y_val = data_module.load(config["data"], "val", dtype=dtype)
        method = label(config)
        lam = float(config.get("lam", 0.0))
        acc = evaluation.accuracy(model, x_val, y_val)
        rows.append({"metric": "val_accuracy", "method": method, "lam": lam, "value": acc})
    return rows


def run_study(
    profile: str = "sweep",
    *,
    results_dir: str | os.PathLike,
    read_only: bool = False,
    with_records: bool = False,
    **kwargs,
):
    """The matched-strength study of a profile with ``targets``, in three resumable stages.

    1. train plain training, the λ sweep and the adversarial baselines (:func:`run_grid` without
       evaluation: seconds a run) and measure their clean accuracy on the validation split;
    2. :func:`select_lambdas` from those accuracies, kept in ``selection.json`` (read, never
       recomputed, once it exists: delete it to select again);
    3. :func:`run_grid` with the selection: every run evaluated on the test set (PGD with
       restarts at every radius, per image) and plain training, the baselines and each
       regularizer at its selected λ also under standard AutoAttack; one result file per run.

    Returns ``(rows, selection)`` (``(rows, records, selection)`` with ``with_records``).
    ``kwargs`` go to :func:`run_grid` (``jobs``, ``shard``, ``refresh``, ``progress``, ...).
    With ``shard`` the selection waits until every shard has finished stage 1: rerun then.
    """
    if not PROFILES.get(profile, {}).get("targets"):
        raise ValueError(
            f"profile {profile!r} has no matched-strength targets; valid: "
            + ", ".join(k for k, v in PROFILES.items() if v.get("targets"))
        )
    results = Path(results_dir)
    path = results / SELECTION_FILE
    stored = (
        files.read_json(path, "selection file", "delete it to select again")
        if path.is_file()
        else None
    )
    if stored is None:
        if read_only:
            raise FileNotFoundError(
                f"{path}: no selection; compute it with "
                f"`python -m robustreg run-grid --profile {profile} --results-dir {results}`"
            )
        run_grid(profile, evaluate_models=False, **kwargs)  # stage 1: train (jobs, shards)
        try:
            val_rows = _validation_rows(profile, kwargs)
        except FileNotFoundError as err:
            raise RuntimeError(
                f"stage 1 of the study is incomplete ({err}); when every shard has finished, "
                "rerun to select λ and evaluate the models"
            ) from None
        overrides = {k: v for k, v in kwargs.items() if k in PROFILES[profile]}
        selection = select_lambdas(profile, val_rows, **overrides)
        files.write_json(path, selection)
    else:
        selection = stored
    out = run_grid(
        profile,
        results_dir=results,
        read_only=read_only,
        selection=selection,
        with_records=with_records,
        **kwargs,
    )
    return (*out, selection) if with_records else (out, selection)


# --- reproduction check -------------------------------------------------------------------------


def _metric_name(row: Mapping[str, Any]) -> str:
    parts = [
        row["metric"],
        row.get("attack"),
        row.get("norm"),
        row.get("eps"),
        row.get("regularizer"),
    ]
    return " ".join(f"{p:g}" if isinstance(p, float) else str(p) for p in parts if p is not None)


def _metrics(record: Mapping[str, Any]) -> dict[str, float]:
    return {_metric_name(r): float(r["value"]) for r in record["rows"]}


#: Metrics that :func:`check_reproduction` compares: the accuracies and the regularizers' means.
#: The medians of the radii (distances to the nearest activation boundary of 100 points) and the
#: region-cap fraction are left out: a last-bit change of the weights moves them by more than a
#: change of seed does (measured across instruction sets: up to 4 seed standard deviations).
REPRODUCED_METRICS = ("clean_accuracy", "robust_accuracy", "regularizer_mean")


def check_reproduction(
    results_dir: str | os.PathLike,
    names: Sequence[str],
    *,
    fraction: float = 1.0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
) -> list[dict[str, Any]]:
    """Retrain and re-evaluate committed runs; compare their metrics with the result files.

    Trained weights differ in their last bits from one CPU (instruction set, thread count) to
    another, and training amplifies that difference the way a change of seed does. So the
    tolerance of a metric is a ``fraction`` (default 1) of its seed-to-seed spread: the sample
    standard deviation of that metric over the seeds of the same method and λ in ``results_dir``
    — a retraining elsewhere must land within the spread of a change of seed — and, for an
    accuracy, at least one test image (the metric's resolution). Only the
    :data:`REPRODUCED_METRICS` are compared. Returns one row per metric (``run``, ``metric``,
    ``stored``, ``recomputed``, ``tolerance``, ``ok``); the caller decides what a failure means.
    """
    results = Path(results_dir)
    everything = load_results(results)
    rows = []
    for name in names:
        path = results / (name if name.endswith(".json") else f"{name}.json")
        stored = read_result(path)
        config = stored["config"]
        if runs.cache_key(config) != stored["key"]:
            raise StaleResultError(
                f"{path}: its key does not match its configuration under today's code (a default "
                "or runs.CACHE_VERSION changed); recompute it with --refresh"
            )
        siblings = [
            _metrics(r)
            for r in everything
            if r["method"] == stored["method"]
            and r["lam"] == stored["lam"]
            and r["eval"] == stored["eval"]
        ]
        if len(siblings) < 2:
            raise ValueError(
                f"{path}: the tolerance needs at least two seeds of this run in {results}"
            )
        dtype = runs.torch_dtype(config["dtype"])
        test = data_module.load(config["data"], "test", dtype=dtype)
        with tempfile.TemporaryDirectory(prefix="robustreg-verify-") as tmp:
            model, _ = runs.train_cached(
                config, cache_dir=cache_dir or tmp, device="cpu", progress=progress
            )
            fresh = _metrics(_evaluate(model, test, stored["eval"]))
        n_test = stored["eval"].get("n_test") or len(test[1])
        for metric, value in _metrics(stored).items():
            if not metric.startswith(REPRODUCED_METRICS):
                continue
            spread = statistics.stdev([s[metric] for s in siblings if metric in s])
            resolution = 1.0 / n_test if "accuracy" in metric else 0.0
            if "autoattack" in metric or "pgd-subset" in metric or "worst-case" in metric:
                resolution = 1.0 / stored["eval"]["autoattack_n"]
            tolerance = max(fraction * spread, resolution)
            got = fresh.get(metric, math.nan)
            rows.append(
                {
                    "run": path.stem,
                    "metric": metric,
                    "stored": value,
                    "recomputed": got,
                    "tolerance": tolerance,
                    "ok": abs(got - value) <= tolerance,
                }
            )
    return rows


def trained_model(
    profile: str,
    config: Mapping[str, Any],
    *,
    results_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """The network of one run of a profile's grid, in eval mode.

    The published model of ``results_dir`` (default ``results/<profile>`` of the repository) when
    its weights are there — the very network whose metrics the result file reports — and
    otherwise the run trained through :func:`robustreg.runs.train_cached` (a seed or profile
    whose runs were not published). A published file of another configuration raises
    :class:`StaleResultError` rather than being used.
    """
    root = Path(results_dir) if results_dir is not None else RESULTS_ROOT / profile
    path = root / result_name(config)
    if path.with_suffix(".safetensors").is_file():
        key = runs.cache_key(config)
        if read_result(path)["key"] != key:
            raise StaleResultError(
                f"{path} belongs to another configuration than {result_name(config)} asks for "
                f"under today's code; recompute it with `python -m robustreg run-grid --profile "
                f"{profile} --results-dir {root} --refresh`"
            )
        return load_model(path)
    model, _ = runs.train_cached(config, cache_dir=cache_dir, device="cpu", progress=False)
    return model

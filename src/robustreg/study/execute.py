"""Running a grid: every run trained (through the cache), evaluated and written to its result file.

One run (:func:`run_one`) trains or loads its network (:func:`robustreg.study.cache.train_cached`),
evaluates it (:func:`robustreg.study.evaluate.evaluate_model`) and keeps the outcome in its result
file (:class:`robustreg.study.store.ResultStore`). :func:`run_grid` runs a profile's grid with one
of the :data:`EXECUTORS`, all of which write the files of a serial run, bit for bit:

- ``"serial"``: one after the other, in this process;
- ``"processes"``: ``jobs`` local worker processes (joblib);
- ``"slurm"``: one Slurm job per run, submitted through submitit (``executor_options`` are its
  ``update_parameters``, e.g. ``{"slurm_partition": "cpu", "timeout_min": 60}``);
- ``"local"``: the same submission through submitit's local backend (one process per run on this
  machine: how the Slurm path is tested without a cluster).

``shard="I/N"`` keeps every N-th run from the I-th, for any other scheduler's job array sharing one
results directory; the directory records the split (:data:`SHARD_PLAN`) and refuses a shard of
another. ``jobs`` is capped at the cores available, and a worker process exits when the grid that
started it is killed. An interrupted grid resumes where it stopped: every training is cached and every
finished run has its result file.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustreg import data as data_module
from robustreg import evaluation, files, training
from robustreg.extras import missing, require
from robustreg.study import cache, provenance
from robustreg.study.config import profile as get_profile
from robustreg.study.evaluate import add_autoattack, evaluate_model
from robustreg.study.grid import grid, label, publishes_weights, result_name, run_eval_settings
from robustreg.study.store import ResultStore, StaleResultError

try:  # the experiment stack: pip install "robustreg[experiments]"
    import joblib
    from tqdm import tqdm
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError(missing(err.name)) from err

__all__ = ["EXECUTORS", "SHARD_PLAN", "available_cores", "run_grid", "run_one", "select_shard"]

#: The executors of :func:`run_grid`.
EXECUTORS = ("serial", "processes", "slurm", "local")
#: The file of a results directory that records how a sharded grid is split.
SHARD_PLAN = "shard-plan.json"


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return os.cpu_count() or 1


_watching_parent = False


def _exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone (a SIGKILLed
    grid leaves no worker writing files behind it). Started once per process."""
    global _watching_parent
    if _watching_parent:
        return
    _watching_parent = True
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _check_shard_plan(results: Path, profile: str, which, total: int) -> None:
    """Record the split of a sharded grid in its results directory, and refuse a shard of
    another split (which would leave runs that no shard computes)."""
    if isinstance(which, str):
        n = int(which.split("/")[1])
    else:
        n = which[1]
    plan = {"profile": profile, "shards": n, "runs": total}
    path = results / SHARD_PLAN
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != plan:
            raise ValueError(
                f"{path}: this results directory is split into {stored.get('shards')} shards of "
                f"{stored.get('runs')} runs of profile {stored.get('profile')!r}; --shard {which} "
                f"would leave runs that no shard computes. Run the missing shards with --shard "
                f"I/{stored.get('shards')} (I = 1 … {stored.get('shards')}), or without --shard "
                "to compute every missing run here"
            )
        return
    files.write_json(path, plan)


def select_shard(configs: list, which: str | tuple[int, int] | None) -> list:
    """The configurations of shard ``(i, n)`` (or ``"i/n"``), i in 1..n: every n-th from the i-th."""
    if which is None:
        return configs
    if isinstance(which, str):
        try:
            i, n = (int(v) for v in which.split("/"))
        except ValueError:
            raise ValueError(f"shard must read I/N (e.g. 2/4), got {which!r}") from None
    else:
        i, n = which
    if not (isinstance(n, int) and isinstance(i, int) and 1 <= i <= n):
        raise ValueError(f"shard I/N needs integers 1 ≤ I ≤ N, got {i}/{n}")
    return configs[i - 1 :: n]


def run_one(
    config: Mapping[str, Any],
    *,
    profile: str,
    results: Path | None,
    cache_dir=None,
    refresh: bool = False,
    read_only: bool = False,
    partial: bool = False,
    device=None,
    progress=None,
    evaluate_models: bool = True,
    threads: int | None = None,
    environment: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Train (or load) and evaluate one run of a grid; write its result file; return its rows
    and its record (``([], None)`` for a run without a file when ``read_only`` and ``partial``).
    ``threads`` and ``environment``: what a worker process must compute with (the caller's thread
    count and :func:`robustreg.study.provenance.numeric_environment`)."""
    if environment is not None:  # a worker process: it dies with the grid that started it
        _exit_with_parent()
    if threads is not None:  # a worker process computes with the caller's thread count
        torch.set_num_threads(threads)
    if environment is not None and provenance.numeric_environment() != environment:
        raise RuntimeError(
            f"a worker process computes under {provenance.numeric_environment()}, the grid under "
            f"{environment}: its files would differ from a serial run's; use jobs=1"
        )
    p = get_profile(profile, **(overrides or {}))
    eval_s = run_eval_settings(p, config, selection)
    key = cache.cache_key(config)
    dtype = cache.torch_dtype(cache.normalize_config(config)["dtype"])
    store = ResultStore(results) if results is not None else None
    stored = None
    if store is not None and not refresh:
        stored = store.read(config)
        if stored is not None:
            if store.gains_autoattack(stored, key, eval_s):
                # the same run, selected after its sweep evaluation: add AutoAttack (read-only, a
                # study in progress: not computed yet)
                if read_only and not partial:
                    store.check(stored, config, eval_s)  # names what differs
                stored = None
            elif missing := store.missing_autoattack(stored, key, eval_s):
                # evaluated before the profile's AutoAttack gained a norm: add that norm only
                if read_only:
                    if not partial:
                        raise StaleResultError(
                            f"{store.path(config)}: evaluated before the profile's AutoAttack "
                            f"gained {missing}; add it with `python -m robustreg run-grid "
                            f"--profile {profile} --results-dir {results}` (it attacks at those "
                            "radii only; --refresh would evaluate the run again in full)"
                        )
                    stored = None
                else:
                    stored = _add_autoattack(
                        p, config, stored, store, eval_s, missing, cache_dir, device, dtype
                    )
            else:
                store.check(stored, config, eval_s)
    if stored is None and read_only and partial:
        return [], None
    if stored is None and read_only:
        raise FileNotFoundError(
            f"{store.path(config)}: no result file for this run; compute it with "
            f"`python -m robustreg run-grid --profile {profile} --results-dir {results}`"
        )
    model = None
    if stored is None or not evaluate_models:
        try:
            model, record = cache.train_cached(
                config,
                cache_dir=cache_dir,
                checkpoint_dir=store.checkpoint_dir if store is not None else None,
                device=device,
                progress=progress,
            )
        except cache.DivergedError as err:  # a result of the run too: it has no metrics
            return [], _diverged_record(config, key, eval_s, err, store)
    if stored is not None:
        if stored.get("diverged"):
            return [], stored
        record = stored
        if store is not None and not read_only and evaluate_models:
            _publish_missing_weights(p, config, selection, stored, store, cache_dir, device, dtype)
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
        train_x, train_y = data_module.load(p.data, "train", dtype=dtype)
        payload = evaluate_model(model, data_module.load(p.data, "test", dtype=dtype), eval_s)
        if config.get("validation"):
            x_val, y_val = data_module.load(p.data, "val", dtype=dtype)
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
            "autoattack_cpu_seconds": payload["autoattack_cpu_seconds"],
            "device": str(record["device"]),
            "machine": provenance.machine(),
            "rows": payload["rows"],
        }
        if record.get("resumed_by"):  # trained in pieces: by which machines
            stored["resumed_by"] = record["resumed_by"]
        if store is not None:
            published = publishes_weights(p, config, selection)
            store.write(stored, model if published else None)
    return [{**extra, **r} for r in stored["rows"]], stored


def _add_autoattack(
    p, config, stored, store, eval_s, missing, cache_dir, device, dtype
) -> dict[str, Any]:
    """The stored result of a run completed with AutoAttack at the radii ``missing`` that
    ``eval_s`` add (:func:`robustreg.study.evaluate.add_autoattack`), written back with the
    radii added, the machine and the device (``autoattack_added``): its network from its
    published weights or the training cache (or trained again), after checking that it
    reproduces the stored validation accuracy and per-image clean outcomes."""
    if stored.get("diverged"):  # no network to attack at any radius: the settings are updated
        record = {**stored, "eval": eval_s}
        store.write(record)
        return record
    model = _stored_network(p, config, stored, store, cache_dir, device, dtype, published=True)
    test = data_module.load(p.data, "test", dtype=dtype)
    # the stored per-image clean outcomes too, exactly: the network the stored attacks saw
    n = eval_s.get("n_test")
    clean = evaluation.find_row(stored["rows"], "clean_accuracy")["flags"]
    got = evaluation.predict(model, test[0][:n]).to(test[1].device) == test[1][:n]
    if evaluation.flags_string(got) != clean:
        raise RuntimeError(
            f"{store.path(config)}: the network classifies the test images otherwise than the "
            "file records: it is not this run's (another numeric environment?); AutoAttack is "
            "not added"
        )
    added = add_autoattack(model, test, eval_s, stored["rows"])
    record = {
        **stored,
        # the file was completed later, and by what: the radii added, the machine and device
        "autoattack_added": [
            *stored.get("autoattack_added", []),
            {
                "eps": missing,
                "machine": provenance.machine(),
                "device": str(next(model.parameters()).device),
            },
        ],
        "eval": eval_s,
        "rows": added["rows"],
        "eval_seconds": (stored.get("eval_seconds") or 0.0) + added["seconds"],
        "eval_cpu_seconds": (stored.get("eval_cpu_seconds") or 0.0) + added["cpu_seconds"],
        "autoattack_cpu_seconds": (stored.get("autoattack_cpu_seconds") or 0.0)
        + added["autoattack_cpu_seconds"],
    }
    store.write(record)
    return record


def _publish_missing_weights(p, config, selection, stored, store, cache_dir, device, dtype):
    """Add the weights of a stored run that the profile publishes but whose file has none (a
    rule that came after the run: :func:`~robustreg.study.grid.publishes_weights`), from the
    training cache or trained again, after checking that the model reproduces the stored
    validation accuracy (the runs of a study, the only profiles whose rule can grow, have a
    validation split)."""
    if not publishes_weights(p, config, selection):
        return
    if store.path(config).with_suffix(".safetensors").is_file() or not config.get("validation"):
        return
    model = _stored_network(p, config, stored, store, cache_dir, device, dtype, published=False)
    store.write(stored, model)


def _stored_network(p, config, stored, store, cache_dir, device, dtype, *, published):
    """The network of a stored run: from its published weights where ``published`` and they
    exist, else from the training cache (or trained again), after checking, for a run with a
    validation split, that it reproduces the stored validation accuracy: a ``RuntimeError``
    otherwise (weights of another numeric environment are not this run's)."""
    path = store.path(config)
    if published and path.with_suffix(".safetensors").is_file():
        model = store.load_model(path.name).to(device or training.default_device())
    else:
        model, _ = cache.train_cached(
            config,
            cache_dir=cache_dir,
            checkpoint_dir=store.checkpoint_dir,
            device=device,
            progress=False,
        )
    if config.get("validation"):
        x, y = data_module.load(p.data, "val", dtype=dtype)
        want = evaluation.find_row(stored["rows"], "val_accuracy")["value"]
        got = evaluation.accuracy(model, x, y)
        if got != want:
            raise RuntimeError(
                f"{path}: the network scores a validation accuracy of {got}, the file {want}: "
                "it is not this run's (another numeric environment?)"
            )
    return model


def _diverged_record(config, key, eval_s, err, store) -> dict[str, Any]:
    """The result file of a run whose training diverged: its identity, the message, no rows."""
    x, y = data_module.load(config["data"], "train")
    record = {
        "name": result_name(config),
        "method": label(config),
        "lam": float(config.get("lam", 0.0)),
        "seed": config["seed"],
        "key": key,
        "config": cache.normalize_config(config),
        "eval": eval_s,
        "input_shape": list(x.shape[1:]),
        "num_classes": int(y.max()) + 1,
        "diverged": err.message,
        "machine": provenance.machine(),
        "rows": [],
    }
    if store is not None:
        store.write(record)
    return record


def _submitit_outputs(task, configs, kind, folder, options, threads, environment):
    """Submit one job per run through submitit (``kind``: "slurm" or "local") and yield each
    run's output in the grid's order as the jobs finish."""
    require("submitit", "the Slurm executor")
    import submitit

    executor = submitit.AutoExecutor(folder=str(folder), cluster=kind)
    executor.update_parameters(**(options or {}))
    call = functools.partial(task, threads=threads, environment=environment)
    with provenance.inherited_environment(environment):
        jobs = executor.map_array(call, configs)
    for job in jobs:
        yield job.result()


def run_grid(
    profile: str = "default",
    *,
    cache_dir=None,
    results_dir=None,
    refresh: bool = False,
    read_only: bool = False,
    partial: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    evaluate_models: bool = True,
    shard: str | tuple[int, int] | None = None,
    jobs: int = 1,
    executor: str | None = None,
    executor_options: Mapping[str, Any] | None = None,
    with_records: bool = False,
    selection: Mapping[str, Any] | None = None,
    **overrides,
):
    """Train (or load) and evaluate every configuration of a profile's grid; return tidy rows.

    Each row of :func:`robustreg.evaluation.evaluate` gains the columns ``method``, ``lam``,
    ``seed``, ``key``, ``seconds_per_epoch`` (mean wall time of an epoch of that training run) and
    ``cpu_seconds_per_epoch`` (median process CPU time of an epoch — on a shared machine the better
    measure of cost, the median skipping a first epoch's warm-up).

    ``results_dir``: read each run from its result file when the file's key and evaluation
    settings match — no model is built — and otherwise train, evaluate and write the file
    (atomically), with the weights of the runs the profile publishes. A file of another
    configuration raises :class:`~robustreg.study.store.StaleResultError` unless ``refresh=True``,
    which recomputes and replaces every file. ``read_only=True`` never trains: a missing or stale
    file is an error, unless ``partial=True`` (a study in progress), which leaves the runs without
    a file out of the rows and records, and so a run selected after its sweep whose AutoAttack is
    still to be added (any other stale file is still an error). Without
    ``evaluate_models`` the files are neither read nor written.

    ``executor`` (default ``"processes"`` when ``jobs > 1``, else ``"serial"``): see the module
    docstring; ``shard="I/N"`` runs every N-th configuration from the I-th. Ctrl-C stops after
    saying what is saved. ``with_records=True`` returns ``(rows, records)``: also each run's full
    record (its result file's content), in the order of the grid.
    """
    if not (isinstance(jobs, int) and not isinstance(jobs, bool) and jobs >= 1):
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    cores = available_cores()
    if jobs > cores:
        warnings.warn(
            f"jobs={jobs} exceeds the {cores} cores available: running {cores} processes",
            RuntimeWarning,
            stacklevel=2,
        )
        jobs = cores
    executor = executor or ("processes" if jobs > 1 else "serial")
    if executor not in EXECUTORS:
        raise ValueError(f"unknown executor {executor!r}; valid: {', '.join(EXECUTORS)}")
    everything = grid(profile, selection=selection, **overrides)
    configs = select_shard(everything, shard)
    results = Path(results_dir) if results_dir is not None and evaluate_models else None
    if read_only and results is None:
        raise ValueError("read_only=True needs a results_dir to read from")
    if partial and not read_only:
        raise ValueError("partial=True reads a study in progress: it needs read_only=True")
    if results is not None:
        ResultStore(results).remove_leftovers()
        if shard is not None and not read_only:  # the plan counts the grid before any selection
            _check_shard_plan(results, str(profile), shard, len(grid(profile, **overrides)))
    task = functools.partial(
        run_one,
        profile=profile,
        results=results,
        cache_dir=cache_dir,
        refresh=refresh,
        read_only=read_only,
        partial=partial,
        device=device,
        progress=progress if executor == "serial" else False,
        evaluate_models=evaluate_models,
        selection=selection,
        overrides=overrides,
    )
    bar = tqdm(
        total=len(configs), desc=f"grid {profile}", disable=not training.progress_enabled(progress)
    )
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    done = 0
    env = provenance.numeric_environment()
    threads = torch.get_num_threads()
    try:
        if executor == "serial":
            outputs = map(task, configs)
        elif executor == "processes":  # results stream back in the grid's order
            outputs = _joblib_outputs(task, configs, jobs, threads, env)
        else:
            folder = Path(cache_dir or cache.default_cache_dir()) / "submitit"
            outputs = _submitit_outputs(
                task, configs, executor, folder, executor_options, threads, env
            )
        for config, (out, record) in zip(configs, outputs, strict=True):
            rows += out
            if record is not None:  # None: not computed yet (partial)
                records.append(record)
            done += 1
            bar.set_postfix(method=label(config), lam=config.get("lam", 0.0), seed=config["seed"])
            bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        where = (
            f"result files in {results}, per-epoch checkpoints in {results / '.checkpoints'}, "
            "trained models in the run cache"
            if results is not None
            else "trained models and per-epoch checkpoints in the run cache"
        )
        print(
            f"\ninterrupted: {done} of {len(configs)} runs finished ({where}); rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        raise
    bar.close()
    return (rows, records) if with_records else rows


def _joblib_outputs(task, configs, jobs, threads, environment):
    with provenance.inherited_environment(environment):
        yield from joblib.Parallel(n_jobs=jobs, return_as="generator")(
            joblib.delayed(task)(c, threads=threads, environment=environment) for c in configs
        )

"""The gradient-masking battery of a study: four checks on every published model, one file each.

For each published seed-0 model of a study (plain training, the baselines, every regularizer at
its selected λ: the models AutoAttack evaluates), at each norm of the study's AutoAttack radius ε:

1. ``square``: Square alone (the study's queries) on all test images of AutoAttack; the images it
   breaks among those the white-box attacks left (:func:`robustreg.masking.newly_broken`, against
   the per-image minimum over PGD and AutoAttack) plus those AutoAttack's own Square broke after
   its gradient attacks had failed;
2. ``sweep``: APGD-CE and APGD-T at ε·(1, 1.5, 2, 3, …) until no image is left (:data:`SWEEP`);
3. ``transfer``: PGD (the study's steps and restarts) on plain training and on every published
   PGD-training network of that norm (:func:`transfer_sources`), of the same seed, transferred to
   the model;
4. ``beyond``: standard AutoAttack at :data:`BEYOND` × ε (ℓ∞ 0.15 and ℓ2 1.5 for the MNIST
   study), beyond every training and selection radius, per image.

A model shows a sign of masking (:func:`verdict`) when a check that does not follow its gradient
(1, 3, or Square inside 4) breaks more than :data:`ALLOWANCE` of the images that its gradient
attacks left standing, or when robust accuracy has not reached 0 at the end of the sweep (2).

Files: ``<results>/masking/<model>.json``, written atomically when a model's battery is complete,
keyed by the model's run key and the battery's settings; a rerun reuses a matching file, refuses
to overwrite a file of other settings (``refresh=True`` replaces it), and resumes where it
stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from robustreg import autoattack, evaluation, files, masking
from robustreg import data as data_module
from robustreg.study import grid, store
from robustreg.study.config import Profile, profile
from robustreg.study.execute import select_shard
from robustreg.study.matched import SELECTION_FILE
from robustreg.study.provenance import machine, numeric_environment

__all__ = [
    "ALLOWANCE",
    "BEYOND",
    "SWEEP",
    "battery_settings",
    "expected",
    "published",
    "RESTARTS_FILE",
    "STARTS",
    "run_battery",
    "square_restarts",
    "transfer_sources",
    "verdict",
]

#: The radius of check 4, as a multiple of the study's AutoAttack radius.
BEYOND = 1.5
#: The radii of check 2, as multiples of AutoAttack's radius (ℓ∞ capped at 1, the whole box).
SWEEP = {"linf": (1, 1.5, 2, 3, 4, 6, 8, 10), "l2": (1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32)}
#: The share of the test images a check that does not follow the gradient may break among those
#: the gradient attacks left (0.5 %: 5 of 1,000) before it counts as a sign of masking.
ALLOWANCE = 0.005
#: The subdirectory of a study's results that holds the battery's files.
DIRECTORY = "masking"
#: The random starts (seeds) of :func:`square_restarts`, besides the battery's own (its ``seed``, 0).
STARTS = (1, 2, 3, 4, 5)
#: The file of a study's results directory that keeps :func:`square_restarts`.
RESTARTS_FILE = "square_restarts.json"


def _radius(v: float) -> float:
    return float(f"{v:.12g}")


def battery_settings(p: Profile) -> dict[str, Any]:
    """The battery's settings for profile ``p``, from its AutoAttack and evaluation settings."""
    aa = p.autoattack
    if aa is None:
        raise ValueError(f"profile {p.name!r} has no AutoAttack settings to build a battery on")
    return {
        "n": aa.n or p.eval.n_test,
        "eps": dict(aa.eps),
        "beyond": {n: _radius(BEYOND * e) for n, e in aa.eps.items()},
        "sweep": {
            n: [_radius(m * e) for m in SWEEP[n] if n != "linf" or m * e <= 1 + 1e-12]
            for n, e in aa.eps.items()
        },
        "steps": aa.steps,
        "n_queries": aa.n_queries,
        "transfer_steps": p.eval.steps,
        "transfer_restarts": p.eval.restarts,
        "seed": p.eval.seed,
        "allowance": ALLOWANCE,
    }


def _battery_of_model(model, record, sources, x, y, s, progress) -> dict[str, Any]:
    checks: dict[str, Any] = {"square": {}, "sweep": {}, "transfer": {}, "beyond": {}}
    n = len(y)
    for norm, eps in s["eps"].items():
        white = evaluation.parse_flags(
            evaluation.find_row(record["rows"], attack="worst-case", norm=norm, eps=eps)["flags"]
        )[:n]
        aa_square = evaluation.find_row(  # images AutoAttack's own Square broke
            record["rows"], "autoattack_broken_by", attack="square", norm=norm, eps=eps
        )
        in_aa = int(aa_square["value"])
        progress(f"{norm} Square alone")
        sq = masking.square_alone(model, x, y, eps, norm, n_queries=s["n_queries"], seed=s["seed"])
        checks["square"][norm] = {
            "eps": eps,
            "robust": float(sq.double().mean()),
            "white_box": float(white.double().mean()),
            "newly_broken": masking.newly_broken(white, sq) + in_aa,
            "flags": evaluation.flags_string(sq),
        }
        progress(f"{norm} ε-sweep")
        sweep = masking.epsilon_sweep(
            model, x, y, s["sweep"][norm], norm, steps=s["steps"], seed=s["seed"]
        )
        checks["sweep"][norm] = {
            "radii": list(sweep),
            "robust": [float(f.double().mean()) for f in sweep.values()],
            "reached_zero": not next(reversed(sweep.values())).any().item(),
        }
        checks["transfer"][norm] = {}
        for source_name, source in sources[norm].items():
            if source_name == record["name"]:
                continue
            progress(f"{norm} transfer from {source_name}")
            tr = masking.transfer(
                source,
                model,
                x,
                y,
                eps,
                norm,
                steps=s["transfer_steps"],
                restarts=s["transfer_restarts"],
                seed=s["seed"],
            )
            checks["transfer"][norm][source_name] = {
                "robust": float(tr.double().mean()),
                "newly_broken": masking.newly_broken(white, tr),
            }
        far = s["beyond"][norm]
        progress(f"{norm} AutoAttack at ε = {far:g}")
        aa = autoattack.standard_autoattack(
            model, x, y, far, norm, seed=s["seed"], steps=s["steps"], n_queries=s["n_queries"]
        )
        checks["beyond"][norm] = {
            "eps": far,
            "robust": float(aa["robust"].double().mean()),
            "broken_by": aa["broken_by"],
            "flags": evaluation.flags_string(aa["robust"]),
        }
    return checks


def verdict(result: Mapping[str, Any]) -> dict[str, Any]:
    """A model's verdict from its battery file: ``{"masking": bool, "signs": [...]}``, each sign a
    sentence naming the check, the norm and the count against the criterion (module docstring)."""
    s = result["settings"]
    limit = s["allowance"] * s["n"]
    signs = []
    checks = result["checks"]
    for norm in s["eps"]:
        k = checks["square"][norm]["newly_broken"]
        if k > limit:
            signs.append(f"Square breaks {k} images the gradient attacks left ({norm})")
        if not checks["sweep"][norm]["reached_zero"]:
            last = checks["sweep"][norm]["radii"][-1]
            signs.append(f"robust accuracy above 0 at ε = {last:g} ({norm})")
        for source, t in checks["transfer"][norm].items():
            if t["newly_broken"] > limit:
                signs.append(f"transfer from {source} breaks {t['newly_broken']} images ({norm})")
        k = checks["beyond"][norm]["broken_by"].get("square", 0)
        if k > limit:
            far = checks["beyond"][norm]["eps"]
            signs.append(f"Square breaks {k} images at ε = {far:g} after APGD and FAB ({norm})")
    return {"masking": bool(signs), "signs": signs}


def _stored(path: Path, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """A battery file, when it is of this model and these settings; else StaleResultError."""
    stored = files.read_json(path, "battery file", "delete it to recompute it")
    if {k: stored.get(k) for k in wanted} != dict(wanted):
        raise store.StaleResultError(
            f"{path} belongs to another model or other battery settings than this run; "
            "it is left untouched: pass refresh=True (--refresh) to replace it on purpose"
        )
    return stored


def published(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The models the battery checks: the seed-0 runs of a results directory that AutoAttack
    evaluated and whose weights are published, ``{result file name: record}``."""
    results = Path(results_dir)
    return {
        r["name"]: r
        for r in store.load_results(results)
        if r["seed"] == 0
        and r["eval"].get("autoattack_eps")
        and (results / r["name"]).with_suffix(".safetensors").is_file()
    }


def expected(p: Profile, results_dir: str | os.PathLike) -> set[str]:
    """The result files of the models :func:`published` lists once the study of ``p`` is
    complete: the seed-0 runs that AutoAttack evaluates and whose weights are published
    (:func:`~robustreg.study.grid.attacked`, :func:`~robustreg.study.grid.publishes_weights`;
    a study's selection read from its ``selection.json``)."""
    path = Path(results_dir) / SELECTION_FILE
    selection = files.read_json(path, "selection file", "delete it") if path.is_file() else None
    return {
        grid.result_name(c)
        for c in grid.grid(p, selection=selection)
        if c["seed"] == 0
        and grid.attacked(p, c, selection)
        and grid.publishes_weights(p, c, selection)
    }


def transfer_sources(records: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """The sources of the transfer attacks per norm, among the published models ``records``
    (:func:`published`): plain training and every PGD-training network of that norm (a study
    that selects its baselines publishes one per target), ``{"linf": [file names], "l2": [...]}``.
    """
    out: dict[str, list[str]] = {"linf": [], "l2": []}
    for name, record in records.items():
        method = record["method"]
        if method == "plain":
            for names in out.values():
                names.append(name)
        elif method.startswith("adversarial-l2"):
            out["l2"].append(name)
        elif method.startswith("adversarial"):
            out["linf"].append(name)
    return out


def run_battery(
    name: str | Profile,
    results_dir: str | os.PathLike,
    *,
    refresh: bool = False,
    read_only: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    shard: str | tuple[int, int] | None = None,
    partial: bool = False,
    **overrides,
) -> dict[str, dict[str, Any]]:
    """The battery on every published model of a study's results directory (module docstring):
    ``{model name: battery file contents}``. Computes what is missing (``read_only``: raise
    ``FileNotFoundError`` instead, or with ``partial`` leave it out: the battery of a study still
    being computed) and reuses what matches. ``overrides`` replace profile fields
    (as in :func:`~robustreg.study.matched.run_study`). The transfer sources are
    :func:`transfer_sources`. ``shard="I/N"`` computes every N-th model from the
    I-th (of the sorted names) for N processes or machines sharing the directory; a model whose
    file another process wrote meanwhile is read, not recomputed."""
    p = profile(name, **overrides)
    s = battery_settings(p)
    results = Path(results_dir)
    out_dir = results / DIRECTORY
    records = published(results)
    if not records:
        raise FileNotFoundError(f"{results}: no published model with AutoAttack results")
    done: dict[str, dict[str, Any]] = {}
    todo = []
    for model_name, record in records.items():
        path = out_dir / model_name
        wanted = {"model": model_name, "key": record["key"], "settings": s}
        if path.is_file() and not refresh:
            done[model_name] = _stored(path, wanted)
        elif read_only and partial:
            continue
        elif read_only:
            raise FileNotFoundError(
                f"{path}: no battery result; compute it with `python -m robustreg "
                f"masking-battery --profile {p.name} --results-dir {results}`"
            )
        else:
            todo.append(model_name)
    if todo:  # the transfer attacks need every source: a check is never made without one
        missing = sorted(expected(p, results) - set(records))
        if missing:
            raise RuntimeError(
                f"{results}: the battery's transfer attacks need every published seed-0 "
                f"model, and {len(missing)} are not published yet ({', '.join(missing)}); "
                f"finish `python -m robustreg run-grid --profile {p.name} --results-dir "
                f"{results}` first"
            )
    if shard is not None:
        mine = set(select_shard(sorted(records), shard))
        todo = [m for m in todo if m in mine]
    if not todo:
        return dict(sorted(done.items()))
    from tqdm import tqdm  # text bars: no ipywidgets needed in notebooks

    loaded = {m: store.load_model(results / m) for m in records}
    model0 = next(iter(loaded.values()))
    dtype = next(model0.parameters()).dtype
    x, y = data_module.load(p.data, "test", dtype=dtype)
    x, y = x[: s["n"]].to(device), y[: s["n"]].to(device)
    sources = {
        norm: {m: loaded[m].to(device) for m in names}
        for norm, names in transfer_sources(records).items()
        if norm in s["eps"]
    }
    bar = tqdm(todo, desc="masking battery", unit="model", disable=not progress)
    for model_name in bar:
        bar.set_postfix_str(model_name)
        if (out_dir / model_name).is_file() and not refresh:  # another process finished it
            wanted = {"model": model_name, "key": records[model_name]["key"], "settings": s}
            done[model_name] = _stored(out_dir / model_name, wanted)
            continue
        model = loaded[model_name].to(device)
        t0, c0 = time.perf_counter(), time.process_time()
        checks = _battery_of_model(
            model,
            records[model_name],
            sources,
            x,
            y,
            s,
            lambda what, m=model_name: bar.set_postfix_str(f"{m}: {what}"),
        )
        result = {
            "model": model_name,
            "key": records[model_name]["key"],
            "settings": s,
            "checks": checks,
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "machine": machine(),
            "numeric_environment": numeric_environment(),
        }
        result["verdict"] = verdict(result)
        files.write_json(out_dir / model_name, result)
        done[model_name] = result
    return dict(sorted(done.items()))


def square_restarts(
    name: str | Profile,
    results_dir: str | os.PathLike,
    models: list[str],
    *,
    norm: str = "linf",
    starts: tuple[int, ...] = STARTS,
    read_only: bool = False,
    refresh: bool = False,
    device: str | torch.device = "cpu",
    **overrides,
) -> dict[str, dict[str, Any]]:
    """Square from further random starts at the study's AutoAttack radius of ``norm``
    (:func:`robustreg.masking.square_restarts` with the battery's queries; ``starts``, its seeds,
    must differ from the battery's own), on the test images of each published model ``models``
    (result file names; the weights must be beside them) that its per-image worst case (PGD and
    AutoAttack) left standing: ``{model: {"key", "settings", "white_box", "broken",
    "broken_images", "cpu_seconds", "machine"}}``, ``white_box`` the number of those images,
    ``broken_images`` the indices (into the test set) of those that Square breaks from some start
    and ``broken`` their number.

    Kept in ``<results>/square_restarts.json``, written atomically after each model: a rerun
    reuses an entry of the same run key and settings and refuses one of others
    (:class:`~robustreg.study.store.StaleResultError`; ``refresh=True`` recomputes it); with
    ``read_only`` a missing entry is a ``FileNotFoundError`` that names the command."""
    p = profile(name, **overrides)
    s = battery_settings(p)
    if norm not in s["eps"]:
        raise ValueError(
            f"norm {norm!r} has no AutoAttack radius in {p.name!r}; valid: {list(s['eps'])}"
        )
    if s["seed"] in starts:
        raise ValueError(
            f"starts {list(starts)} must not repeat the battery's own seed {s['seed']}"
        )
    results = Path(results_dir)
    path = results / RESTARTS_FILE
    done = files.read_json(path, "square-restarts file", "delete it") if path.is_file() else {}
    settings = {
        "norm": norm,
        "eps": s["eps"][norm],
        "starts": list(starts),
        "n_queries": s["n_queries"],
        "n": s["n"],
    }
    out = {}
    for model_name in models:
        record = store.read_result(results / model_name)
        wanted = {"key": record["key"], "settings": settings}
        entry = done.get(model_name)
        if entry is not None and not refresh:
            if {k: entry.get(k) for k in wanted} != wanted:
                raise store.StaleResultError(
                    f"{path}: the entry of {model_name} belongs to another run or other "
                    "settings; it is left untouched: pass refresh=True to replace it"
                )
            out[model_name] = entry
            continue
        if read_only:
            raise FileNotFoundError(
                f"{path}: no Square restarts of {model_name}; compute them with "
                f"`python tools/square_restarts.py --profile {p.name} {results} {model_name}`"
            )
        model = store.load_model(results / model_name).to(device)
        dtype = next(model.parameters()).dtype
        x, y = data_module.load(p.data, "test", dtype=dtype)
        x, y = x[: s["n"]].to(device), y[: s["n"]].to(device)
        white = evaluation.parse_flags(
            evaluation.find_row(
                record["rows"], attack="worst-case", norm=norm, eps=settings["eps"]
            )["flags"]
        )
        idx = white[: s["n"]].nonzero().squeeze(1).to(device)
        c0 = time.process_time()
        robust = masking.square_restarts(
            model, x[idx], y[idx], settings["eps"], norm, seeds=starts, n_queries=s["n_queries"]
        )
        broken = idx[~robust.to(idx.device)]
        out[model_name] = done[model_name] = {
            **wanted,
            "white_box": len(idx),
            "broken": len(broken),
            "broken_images": broken.tolist(),
            "cpu_seconds": time.process_time() - c0,
            "machine": machine(),
        }
        files.write_json(path, dict(sorted(done.items())))
    return out

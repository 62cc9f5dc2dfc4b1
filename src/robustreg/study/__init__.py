"""The experiment layer: grids of training runs, their result files, and the studies built on them.

Needs the extra ``robustreg[experiments]``. One module per concept, from the bottom up:

==================  ==============================================================================
``config``          typed, validated settings: :class:`~robustreg.study.config.Profile`,
                    :class:`~robustreg.study.config.EvalSettings`,
                    :class:`~robustreg.study.config.AutoAttackSettings`,
                    :class:`~robustreg.study.config.Study`; the
                    :data:`~robustreg.study.config.PROFILES`
``grid``            profile → run configurations; method labels, result-file names, which runs
                    are attacked and published
``cache``           one run by configuration: its key (the one run identity) and the disk cache
``weights``         weight files labelled with their run's key (the one weight path)
``store``           result files: :class:`~robustreg.study.store.ResultStore`, staleness,
                    :func:`~robustreg.study.store.load_model`
``convergence``     validation accuracy against the training budget: has training converged?
``evaluate``        a run's effective evaluation settings and its metrics
``provenance``      the machine and numeric environment a run is computed in
``execute``         :func:`~robustreg.study.execute.run_grid`: serial, local processes, Slurm
                    (submitit), shards
``matched``         the matched-strength study:
                    :func:`~robustreg.study.matched.select_lambdas`,
                    :func:`~robustreg.study.matched.run_study`,
                    :func:`~robustreg.study.matched.progress`
``reproduce``       retrain committed runs and compare their metrics with the files
``release``         the published results outside a checkout: the release asset, fetched and verified
``battery``         the gradient-masking battery on a study's published models, and its verdicts
==================  ==============================================================================

``from robustreg import study`` imports nothing heavy: the submodules (and the names below, which
they define) load on first use, so that the command line can read the profiles before torch loads.
"""

from __future__ import annotations

import importlib

SUBMODULES = (
    "battery",
    "cache",
    "config",
    "convergence",
    "evaluate",
    "execute",
    "grid",
    "matched",
    "provenance",
    "release",
    "reproduce",
    "store",
    "weights",
)

#: The names most code needs, and the submodule that defines each.
NAMES = {
    "PROFILES": "config",
    "Profile": "config",
    "EvalSettings": "config",
    "AutoAttackSettings": "config",
    "Study": "config",
    "cache_key": "cache",
    "train_cached": "cache",
    "digits_mlp": "cache",
    "ResultStore": "store",
    "StaleResultError": "store",
    "load_model": "store",
    "load_results": "store",
    "read_result": "store",
    "results_root": "store",
    "trained_model": "store",
    "run_grid": "execute",
    "run_study": "matched",
    "study_profile": "matched",
    "select_lambdas": "matched",
    "check_reproduction": "reproduce",
    "run_battery": "battery",
}

__all__ = [*SUBMODULES, *NAMES]


def __getattr__(name: str):
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in NAMES:
        return getattr(importlib.import_module(f"{__name__}.{NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

"""A profile's grid: its training configurations, their names, and what each run is given.

:func:`grid` expands a :class:`~robustreg.study.config.Profile` into run configurations (the
dictionaries of :func:`robustreg.study.cache.normalize_config`): per seed, plain training, every
regularizer at every λ, and each PGD adversarial-training baseline. Each run has a method
(:func:`label`), a result-file name (:func:`result_name`), its evaluation settings
(:func:`run_eval_settings`: the profile's, with AutoAttack where :func:`attacked`) and, for some,
published weights (:func:`publishes_weights`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from robustreg.study import evaluate
from robustreg.study.config import Profile, profile

__all__ = [
    "BASELINE_EPS",
    "attacked",
    "baseline_radius",
    "baselines_at",
    "family",
    "grid",
    "label",
    "publishes_weights",
    "result_name",
    "run_eval_settings",
    "selected_baselines",
    "selected_runs",
    "stale_baselines",
]


def grid(
    name: str | Profile = "default",
    *,
    selection: Mapping[str, Any] | None = None,
    **overrides,
) -> list[dict[str, Any]]:
    """The training configurations of a profile (for :func:`robustreg.study.cache.train_cached`).

    Per seed: plain training, every regularizer at every λ of the profile (for its own number of
    epochs if ``regularizer_epochs`` names one), and each PGD adversarial-training baseline (for
    its own ``epochs`` if its entry names them); with ``selection`` (from
    :func:`robustreg.study.matched.select_lambdas`) also each regularizer at its selected λ not
    already in the sweep, and each selected baseline (a study that selects them). In a study with
    ``selection_seeds``, the other seeds train no sweep: only each regularizer at its selected λ
    (none before the selection), and, if the study selects baselines, only each norm's PGD
    training at its selected ε. ``overrides`` replace
    profile fields (e.g. ``seeds=[0]``, ``epochs=3``).
    """
    p = profile(name, **overrides)
    base = {"data": p.data, "model": dict(p.model), "epochs": p.epochs}
    base.update(batch_size=p.batch_size, lr=p.lr)
    if p.schedule != "constant":
        base["schedule"] = p.schedule
    if p.validation:
        base["validation"] = True
    picked = {reg: [] for reg in p.lambdas}
    for reg, lam in selected_runs(selection):
        if lam not in picked[reg]:
            picked[reg].append(lam)
    chosen = p.study.selection_seeds if p.study is not None else None
    baselines = selected_baselines(selection)
    select = p.study is not None and p.study.select_baselines

    def own_epochs(epochs):  # a run's own epochs, unless an override sets every run's
        return base["epochs"] if epochs is None or "epochs" in overrides else epochs

    configs = []
    for seed in p.seeds:
        configs.append({**base, "seed": seed})
        sweeps = chosen is None or seed in chosen
        for reg, lams in p.lambdas.items():
            extra = [lam for lam in picked[reg] if lam not in lams]
            for lam in [*lams, *extra] if sweeps else picked[reg]:
                configs.append(
                    {
                        **base,
                        "epochs": own_epochs(p.regularizer_epochs.get(reg)),
                        "seed": seed,
                        "regularizer": reg,
                        "lam": lam,
                        "regularizer_options": dict(p.regularizer_options.get(reg, {})),
                    }
                )
        radii = [] if select and not sweeps else list(p.adversarial)
        known = {(a.get("norm", "linf"), a["eps"]) for a in radii}
        for adv in [*radii, *(a for a in baselines if (a["norm"], a["eps"]) not in known)]:
            attack, epochs = _attack_and_epochs(adv)
            configs.append(
                {**base, "seed": seed, "epochs": own_epochs(epochs), "adversarial": attack}
            )
    return configs


def _attack_and_epochs(entry: Mapping[str, Any]) -> tuple[dict[str, Any], int | None]:
    """A baseline entry split into the attack it trains against and its own epochs (or None)."""
    attack = {k: v for k, v in entry.items() if k != "epochs"}
    return attack, entry.get("epochs")


def selected_baselines(selection: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """The PGD baselines a selection picked (``adversarial`` entries at the selected ε, with the
    norm's steps and epochs), in its order; none unless the study selects baselines."""
    out = []
    for targets in ((selection or {}).get("baselines") or {}).values():
        for entry in targets.values():
            if entry.get("adversarial") is not None and entry["adversarial"] not in out:
                out.append(dict(entry["adversarial"]))
    return out


def stale_baselines(
    name: str | Profile, selection: Mapping[str, Any] | None, **overrides
) -> list[dict[str, Any]]:
    """The baselines a selection picked under other training settings than the profile now
    gives its norm's baselines (its PGD steps or epochs: a budget doubled after the selection).
    Their radius was chosen from first-stage runs the profile no longer trains, so it is to be
    chosen again. Each is ``{"norm", "eps", "epochs", "profile_epochs"}`` (the selected entry's
    epochs and the profile's), in the selection's order; ``overrides`` as for :func:`grid`."""
    p = profile(name, **overrides)
    out = []
    for entry in selected_baselines(selection):
        attack, epochs = _attack_and_epochs(entry)
        norm = attack.get("norm", "linf")
        same_norm = [a for a in p.adversarial if a.get("norm", "linf") == norm]
        if not same_norm:
            continue
        now_attack, now_epochs = _attack_and_epochs(same_norm[0])
        if "epochs" in overrides:  # an override sets every run's epochs
            epochs = now_epochs = None
        then = p.epochs if epochs is None else epochs
        now = p.epochs if now_epochs is None else now_epochs
        settings = {k: v for k, v in attack.items() if k != "eps"}
        now_settings = {k: v for k, v in now_attack.items() if k != "eps"}
        if then != now or settings != now_settings:
            out.append({"norm": norm, "eps": attack["eps"], "epochs": then, "profile_epochs": now})
    return out


def selected_runs(
    selection: Mapping[str, Any] | None, target: int | None = None
) -> list[tuple[str, float]]:
    """The (regularizer, λ) pairs a selection picked, in its order (``target``: for that target
    only)."""
    out = []
    for reg, targets in ((selection or {}).get("lambdas") or {}).items():
        for t, entry in targets.items():
            if target is not None and t != str(target):
                continue
            if entry.get("lam") is not None and (reg, entry["lam"]) not in out:
                out.append((reg, float(entry["lam"])))
    return out


def baselines_at(
    name: str | Profile, selection: Mapping[str, Any] | None, target: int
) -> dict[str, str | None]:
    """The PGD baseline each norm is compared with at a target, by method name (:func:`label`):
    in a study that selects its baselines, the radius selected for that target (None where the
    norm's radii do not reach it); otherwise the profile's baseline of that norm, the same at
    every target. ``{"linf": "adversarial-eps0.0477", "l2": None}``, in the profile's order of
    norms."""
    p = profile(name)
    norms = list(dict.fromkeys(a.get("norm", "linf") for a in p.adversarial))
    out: dict[str, str | None] = {}
    for norm in norms:
        if p.study is not None and p.study.select_baselines:
            entry = ((selection or {}).get("baselines") or {}).get(norm, {}).get(str(target))
            attack = (entry or {}).get("adversarial")
            out[norm] = None if attack is None else label({"adversarial": attack})
        else:
            first = next(a for a in p.adversarial if a.get("norm", "linf") == norm)
            out[norm] = label({"adversarial": _attack_and_epochs(first)[0]})
    return out


#: The radius of each norm's first baseline: its runs keep the names they were published under
#: (``adversarial``, ``adversarial-l2``); a baseline at another radius carries it in its name.
BASELINE_EPS = {"linf": 0.1, "l2": 1.0}


def label(config: Mapping[str, Any]) -> str:
    """Short name of a configuration's method: ``plain``, ``adversarial`` (PGD-ℓ∞ training at
    ε = 0.1), ``adversarial-l2`` (PGD-ℓ2 at ε = 1), ``adversarial-eps0.03`` /
    ``adversarial-l2-eps0.3`` (at another ε, :data:`BASELINE_EPS`), or the regularizer."""
    if config.get("adversarial"):
        adv = config["adversarial"]
        norm = adv.get("norm", "linf")
        name = "adversarial" if norm == "linf" else f"adversarial-{norm}"
        eps = float(adv["eps"])
        return name if eps == BASELINE_EPS[norm] else f"{name}-eps{eps:g}"
    if config.get("regularizer") and config.get("lam", 0):
        return str(config["regularizer"])
    return "plain"


def family(method: str) -> str:
    """The sweep a method label (:func:`label`) belongs to: a regularizer's own name, or
    ``adversarial`` / ``adversarial-l2`` for PGD training at any radius of that norm."""
    if method.startswith("adversarial-l2"):
        return "adversarial-l2"
    if method.startswith("adversarial"):
        return "adversarial"
    return method


def baseline_radius(method: str) -> tuple[str, float]:
    """``(norm, ε)`` of a PGD-training label: ``adversarial`` is ℓ∞ at ε = 0.1,
    ``adversarial-l2-eps0.582`` ℓ2 at ε = 0.582 (:data:`BASELINE_EPS`)."""
    fam = family(method)
    if not fam.startswith("adversarial"):
        raise ValueError(
            f"{method!r} is not PGD training; valid: adversarial, adversarial-l2, "
            "adversarial[-l2]-eps<ε>"
        )
    norm = "l2" if fam == "adversarial-l2" else "linf"
    head, sep, eps = method.rpartition("-eps")
    if not sep:
        if method != fam:
            raise ValueError(f"{method!r}: expected {fam} or {fam}-eps<ε>")
        return norm, BASELINE_EPS[norm]
    try:
        return norm, float(eps)
    except ValueError:
        raise ValueError(f"{method!r}: the radius {eps!r} is not a number") from None


def strength(method: str, lam: float = 0.0) -> float:
    """How strongly a configuration trains against perturbation, on its method's own scale:
    the radius ε of PGD training (:func:`baseline_radius`), else the weight λ (0 for plain
    training)."""
    if family(method).startswith("adversarial"):
        return baseline_radius(method)[1]
    return float(lam)


def result_name(config: Mapping[str, Any]) -> str:
    """File name of a run in a results directory: ``plain_seed0.json``,
    ``curvature_lam1_seed2.json``, ``adversarial_seed1.json`` (ℓ∞), ``adversarial-l2_seed1.json``,
    ``adversarial-eps0.03_seed1.json`` (:func:`label`)."""
    method = label(config)
    plain = method == "plain" or method.startswith("adversarial")
    lam = "" if plain else f"_lam{float(config['lam']):g}"
    return f"{method}{lam}_seed{config['seed']}.json"


def attacked(
    name: str | Profile, config: Mapping[str, Any], selection: Mapping[str, Any] | None = None
) -> bool:
    """Whether a run is evaluated with the profile's AutoAttack: in a study, plain training, the
    baselines (in a study that selects them, each selected ε only) and each selected λ; in a
    grid, every run; in both, of the seeds its
    :class:`~robustreg.study.config.AutoAttackSettings` lists (None: every seed)."""
    p = profile(name)
    if p.autoattack is None:
        return False
    if p.study is None:
        seeds = p.autoattack.seeds
        return seeds is None or config["seed"] in seeds
    if p.autoattack.seeds is not None and config["seed"] not in p.autoattack.seeds:
        return False
    method = label(config)
    if method == "plain":
        return True
    if method.startswith("adversarial"):  # of a study that selects them, the selected only
        if not p.study.select_baselines:
            return True
        chosen = [_attack_and_epochs(a)[0] for a in selected_baselines(selection)]
        return dict(config["adversarial"]) in chosen
    return (method, float(config["lam"])) in selected_runs(selection)


def run_eval_settings(
    name: str | Profile, config: Mapping[str, Any], selection: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """A run's effective evaluation settings (:func:`robustreg.study.evaluate.effective_settings`):
    the profile's, with its AutoAttack where :func:`attacked`."""
    p = profile(name)
    settings = p.eval.as_dict()
    if attacked(p, config, selection):
        settings.update(p.autoattack.as_eval())
    return evaluate.effective_settings(settings)


def publishes_weights(
    name: str | Profile, config: Mapping[str, Any], selection: Mapping[str, Any] | None = None
) -> bool:
    """Whether a run's weights are kept next to its result file. Studies: the models of seed 0
    that AutoAttack evaluates (plain training, the baselines, each regularizer at its selected
    λ), and with ``publish_every_seed`` plain training and each regularizer at its λ selected for
    the largest target on every seed. Grids: plain training and each regularizer at the
    profile's largest λ (the models chapter 9 measures), every seed."""
    p = profile(name)
    method = label(config)
    if p.study is not None:
        if config["seed"] == 0 and attacked(p, config, selection):
            return True
        if not p.study.publish_every_seed or method.startswith("adversarial"):
            return False
        if method == "plain":
            return True
        largest = selected_runs(selection, target=max(p.study.targets))
        return (method, float(config["lam"])) in largest
    if method == "plain":
        return True
    return method in p.lambdas and float(config["lam"]) == float(max(p.lambdas[method]))

"""The matched-strength study (issue 11): validation split, selection of λ, per-image attacks,
standard AutoAttack, paired intervals, published models."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustreg import autoattack, comparison, data, evaluation, models, study
from robustreg.__main__ import main as cli
from robustreg.study import PROFILES, cache

DT = torch.float64


# --- validation split ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["digits", "mnist5k", "moons"])
def test_validation_split_partitions_the_training_split(name):
    x_tr, y_tr = data.load(name, "train", dtype=DT)
    x_fit, y_fit = data.load(name, "fit", dtype=DT)
    x_val, y_val = data.load(name, "val", dtype=DT)
    assert len(x_val) == data.VALIDATION_SIZE[name] and len(x_fit) + len(x_val) == len(x_tr)

    # the two parts are the training split, rearranged: same multiset of (image, label) rows
    def rows(x, y):
        return sorted(map(tuple, torch.cat([x.flatten(1), y[:, None].to(DT)], 1).tolist()))

    assert rows(torch.cat([x_fit, x_val]), torch.cat([y_fit, y_val])) == rows(x_tr, y_tr)
    # stratified: class shares within one image of the training split's
    share = torch.bincount(y_tr) / len(y_tr) * len(y_val)
    assert (torch.bincount(y_val) - share).abs().max() <= 1
    # and disjoint from the test split
    x_te, _ = data.load(name, "test", dtype=DT)
    assert (
        not set(map(tuple, x_val.flatten(1).tolist())) & set(map(tuple, x_te.flatten(1).tolist()))
        or name == "digits"
    )


def test_validation_key_leaves_earlier_keys_alone_and_selects_the_fit_split():
    config = {"data": "digits", "seed": 3}
    assert "validation" not in cache.normalize_config(config)
    assert cache.cache_key(config) == cache.cache_key({**config, "validation": False})
    assert cache.cache_key(config) != cache.cache_key({**config, "validation": True})
    assert cache.training_split(cache.normalize_config(config)) == "train"
    assert cache.training_split(cache.normalize_config({**config, "validation": True})) == "fit"


# --- PGD per image --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_model():
    config = {"data": "digits", "model": {"name": "mlp", "hidden": [32]}, "epochs": 3, "lr": 1e-2}
    model, _ = cache.train_cached(config, progress=False)
    x, y = data.load("digits", "test")
    return model, x[:120], y[:120]


def test_robust_flags_are_nested_and_below_clean_and_single_pgd(digits_model):
    model, x, y = digits_model
    flags = evaluation.robust_flags(model, x, y, [0.1, 0.03, 0.2], "linf", steps=10, restarts=3)
    assert list(flags) == [0.03, 0.1, 0.2]
    correct = evaluation.predict(model, x) == y
    assert bool((flags[0.03] <= correct).all())
    assert bool((flags[0.1] <= flags[0.03]).all()) and bool((flags[0.2] <= flags[0.1]).all())
    # an image counted robust survives a fresh PGD run at that radius more often than not
    g = torch.Generator().manual_seed(5)
    x_adv = evaluation.attacks.pgd(model, x, y, 0.1, steps=10, generator=g)
    broken_fresh = evaluation.predict(model, x_adv) != y
    assert int((flags[0.1] & broken_fresh).sum()) <= max(2, int(flags[0.1].sum()) // 10)
    assert 0 < int(flags[0.1].sum()) < int(correct.sum())  # not vacuous at this radius


def test_margin_restarts_break_what_a_saturated_cross_entropy_hides(digits_model):
    """Logits scaled by 10³ (the same classifier) saturate float32's softmax: PGD on the
    cross-entropy then sees no gradient and leaves most images standing, the margin loss breaks
    them. ("ce", "margin") runs the cross-entropy's restarts exactly as ("ce",) does, then the
    margin's on the survivors: never more robust, image by image."""
    import copy

    model, x, y = digits_model
    sharp = copy.deepcopy(model)
    last = [m for m in sharp.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e3)
        last.bias.mul_(1e3)
    assert torch.equal(evaluation.predict(sharp, x), evaluation.predict(model, x))
    kw = dict(steps=10, restarts=2)
    ce = evaluation.robust_flags(sharp, x, y, [0.1], "linf", **kw)[0.1]
    both = evaluation.robust_flags(sharp, x, y, [0.1], "linf", losses=("ce", "margin"), **kw)[0.1]
    reference = evaluation.robust_flags(model, x, y, [0.1], "linf", **kw)[0.1]
    assert bool((both <= ce).all())
    assert int(both.sum()) <= int(reference.sum()) + 3  # the margin attack sees the classifier
    assert int(ce.sum()) > int(both.sum()) + 10  # the saturated cross-entropy does not
    with pytest.raises(ValueError, match="valid"):
        evaluation.robust_flags(sharp, x, y, [0.1], "linf", losses=("dlr",))


def test_full_test_accuracy_is_the_clean_accuracy_on_every_test_image(digits_model):
    """The attacks run on the first n_test images; ``full_test_accuracy`` adds the clean accuracy
    on all of them (the converged study's 10,000 against its attacks' 1,000), and leaves the
    recorded settings of files that never asked for it as they were."""
    model, _, _ = digits_model
    test = data.load("digits", "test")
    settings = study.evaluate.effective_settings(
        {
            "n_test": 50,
            "full_test_accuracy": True,
            "linf_eps": [],
            "l2_eps": [],
            "n_certified": 0,
            "regularizers": False,
        }
    )
    rows = study.evaluate.evaluate_model(model, test, settings)["rows"]
    by_metric = {r["metric"]: r["value"] for r in rows}
    assert by_metric["test_accuracy"] == evaluation.accuracy(model, *test)
    assert by_metric["clean_accuracy"] == evaluation.accuracy(model, test[0][:50], test[1][:50])
    plain = study.evaluate.effective_settings({"n_test": 50})
    assert "full_test_accuracy" not in plain
    assert "full_test_accuracy" not in study.evaluate.effective_settings(
        {"n_test": 50, "full_test_accuracy": False}
    )
    with pytest.raises(ValueError, match="full_test_accuracy"):
        PROFILES["smoke"].eval.replace(full_test_accuracy="yes")


def test_flags_string_round_trip():
    f = torch.tensor([True, False, True, True])
    assert evaluation.flags_string(f) == "1011"
    assert torch.equal(evaluation.parse_flags("1011"), f)
    with pytest.raises(ValueError, match="0 and 1"):
        evaluation.parse_flags("10x1")


def test_find_row_picks_one_row_by_metric_attack_norm_and_radius():
    rows = [
        {"metric": "clean_accuracy", "attack": None, "norm": None, "eps": None, "value": 0.9},
        *(
            {"metric": "robust_accuracy", "attack": a, "norm": n, "eps": e, "value": v}
            for a, n, e, v in [
                ("pgd", "linf", 0.1, 0.5),
                ("pgd", "linf", 0.3, 0.2),
                ("worst-case", "linf", 0.1, 0.4),
                ("pgd", "l2", 0.1, 0.7),
            ]
        ),
    ]
    assert evaluation.find_row(rows, "clean_accuracy")["value"] == 0.9
    # the radius is compared up to rounding (0.1 from a sum of tenths is not 0.1)
    row = evaluation.find_row(rows, attack="pgd", norm="linf", eps=0.3 * 1 / 3 + 1e-17)
    assert row["value"] == 0.5
    assert evaluation.find_row(rows, attack="worst-case")["value"] == 0.4
    with pytest.raises(KeyError, match="2 rows match .*attack='pgd' norm='linf'"):
        evaluation.find_row(rows, attack="pgd", norm="linf")
    with pytest.raises(KeyError, match="0 rows match .*eps=0.2"):
        evaluation.find_row(rows, attack="pgd", norm="linf", eps=0.2)


# --- standard AutoAttack --------------------------------------------------------------------


def test_autoattack_components_carry_the_published_settings(digits_model):
    pytest.importorskip("torchattacks")
    model, x, y = digits_model
    built = autoattack._components(model, 0.1, "linf", 10, 0, **autoattack.STANDARD)
    assert list(built) == list(autoattack.COMPONENTS)
    assert built["apgd-ce"].steps == 100 and built["apgd-ce"].n_restarts == 1
    assert built["apgd-t"].steps == 100 and built["apgd-t"].n_target_classes == 9
    assert built["fab-t"].steps == 100 and built["fab-t"].n_target_classes == 9
    assert built["fab-t"].multi_targeted
    assert built["square"].n_queries == 5000 and built["square"].p_init == 0.8


@pytest.mark.parametrize("norm, eps", [("linf", 0.1), ("l2", 1.0)])
def test_autoattack_breaks_at_least_what_its_first_component_does(digits_model, norm, eps):
    pytest.importorskip("torchattacks")
    model, x, y = digits_model
    out = autoattack.standard_autoattack(model, x, y, eps, norm, steps=10, n_queries=50)
    correct = evaluation.predict(model, x) == y
    robust = out["robust"]
    assert bool((robust <= correct).all())
    assert sum(out["broken_by"].values()) == int(correct.sum() - robust.sum())
    # no stronger than the truth: a PGD with restarts cannot make many more images robust
    pgd = evaluation.robust_flags(model, x, y, [eps], norm, steps=20, restarts=2)[eps]
    assert int(robust.sum()) <= int(pgd.sum()) + 3
    assert out["broken_by"]["apgd-ce"] > 0  # the attack does something on this model


def test_autoattack_works_under_a_float64_default_dtype(digits_model):
    """Measured: torchattacks mixed float64 (the default dtype the chapters set) and float32."""
    pytest.importorskip("torchattacks")
    model, x, y = digits_model
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        out = autoattack.standard_autoattack(model, x[:20], y[:20], 0.1, steps=2, n_queries=5)
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(saved)
    assert out["robust"].dtype == torch.bool


def test_autoattack_leaves_torch_global_generator_alone(digits_model):
    pytest.importorskip("torchattacks")
    model, x, y = digits_model
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    autoattack.standard_autoattack(model, x[:10], y[:10], 0.1, steps=2, n_queries=5)
    assert torch.equal(torch.rand(3), expected)


# --- selection of λ ---------------------------------------------------------------------------


def _val_rows(curves, plain):
    rows = [{"metric": "val_accuracy", "method": "plain", "lam": 0.0, "value": plain}]
    for reg, pts in curves.items():
        rows += [
            {"metric": "val_accuracy", "method": reg, "lam": lam, "value": a} for lam, a in pts
        ]
    return rows


def _baseline_rows(p, top, step=0.02):
    """Validation rows of a profile's baselines: each norm's accuracy falls by ``step`` per
    radius from ``top``."""
    rows = []
    for norm in ("linf", "l2"):
        radii = sorted(a["eps"] for a in p.adversarial if a["norm"] == norm)
        for i, eps in enumerate(radii):
            method = study.grid.label({"adversarial": {"eps": eps, "norm": norm}})
            rows.append(
                {"metric": "val_accuracy", "method": method, "lam": 0.0, "value": top - step * i}
            )
    return rows


def _converged_selection():
    """Seed-0 validation rows of the converged profile (plain training at 0.905, each sweep and
    the baselines' radii falling two points a step from 0.90) and their selection."""
    p = PROFILES["converged"]
    curves = {
        reg: [(lam, 0.90 - 0.02 * i) for i, lam in enumerate(lams)]
        for reg, lams in p.lambdas.items()
    }
    rows = [{**r, "seed": 0} for r in _val_rows(curves, 0.905)]
    rows += [{**r, "seed": 0} for r in _baseline_rows(p, 0.90)]
    return rows, study.select_lambdas("converged", rows)


def test_baselines_are_selected_like_lambdas_and_trained_on_every_seed():
    """A study that selects baselines picks, per norm, the radius where PGD training's validation
    accuracy crosses each target, and trains it (with the norm's steps and epochs) on every seed."""
    p = PROFILES["converged"]
    assert p.study.select_baselines
    # ℓ∞ radii 0.01, 0.03, 0.05, 0.1 at 0.90, 0.88, 0.86, 0.84: plain − 1 point (0.895) lies a
    # quarter of the way from 0.01 to 0.03, plain − 3 (0.875) a quarter from 0.03 to 0.05 (in
    # log ε; rounded to 3 significant digits: within half a unit of the last, 0.5 / 100)
    rows, sel = _converged_selection()
    linf = sel["baselines"]["linf"]
    assert linf["1"]["eps"] == pytest.approx(
        math.exp(math.log(0.01) + 0.25 * math.log(3)), rel=5e-3
    )
    assert linf["3"]["eps"] == pytest.approx(
        math.exp(math.log(0.03) + 0.25 * math.log(0.05 / 0.03)), rel=5e-3
    )
    assert linf["1"]["adversarial"] == {
        "eps": linf["1"]["eps"],
        "norm": "linf",
        "steps": 7,
        "epochs": 120,
    }
    assert sel["baselines"]["l2"]["3"]["adversarial"]["norm"] == "l2"
    after = study.grid.grid("converged", selection=sel)
    for seed in p.seeds:
        advs = [c for c in after if c["seed"] == seed and c.get("adversarial")]
        chosen = {(c["adversarial"]["norm"], c["adversarial"]["eps"], c["epochs"]) for c in advs}
        assert {("linf", linf[t]["eps"], 120) for t in ("1", "3")} <= chosen
        assert len(advs) == (4 if seed else 8 + 4)  # seed 0: the radii and the selected
    names = [study.grid.result_name(c) for c in after]
    assert len(set(names)) == len(names)
    attacked = [
        c for c in after if c.get("adversarial") and study.grid.attacked("converged", c, sel)
    ]
    # AutoAttack: the selected ε on every seed (the comparisons are paired by seed), no radius
    assert len(attacked) == 4 * len(p.seeds)
    assert all(
        (c["adversarial"]["norm"], c["adversarial"]["eps"])
        in {(a["norm"], a["eps"]) for a in study.grid.selected_baselines(sel)}
        for c in attacked
    )
    # the baseline each norm is compared with at each target, by name (the selected radius)
    for t in ("1", "3"):
        at = study.grid.baselines_at("converged", sel, int(t))
        assert list(at) == ["linf", "l2"]
        assert at["linf"] == f"adversarial-eps{linf[t]['eps']:g}"
        assert at["l2"] == study.grid.label(
            {"adversarial": sel["baselines"]["l2"][t]["adversarial"]}
        )
    assert study.grid.baselines_at("sweep", None, 3) == {
        "linf": "adversarial",
        "l2": "adversarial-l2",
    }
    # a norm with one radius cannot be selected
    with pytest.raises(ValueError, match="at least two l2 radii"):
        p.replace(adversarial=[*p.adversarial[:4], {"eps": 1.0, "norm": "l2"}])
    # the smallest radius already loses the target: no ε, and the reason
    rows = [r for r in rows if not r["method"].startswith("adversarial")]
    rows += [{**r, "seed": 0} for r in _baseline_rows(p, 0.80)]
    unreached = study.select_lambdas("converged", rows)
    entry = unreached["baselines"]["linf"]["1"]
    assert entry["eps"] is None and entry["adversarial"] is None and "smallest ε" in entry["reason"]
    assert study.grid.baselines_at("converged", unreached, 1)["linf"] is None


def test_select_lambdas_interpolates_log_lambda_at_the_target():
    lambdas = PROFILES["sweep"].lambdas
    curves = {reg: [(lam, 0.95) for lam in lams] for reg, lams in lambdas.items()}
    # input gradient: 0.30 → 0.94, 1.0 → 0.90: −1 point at 0.94 exactly, −3 halfway in accuracy
    curves["input_gradient"] = [
        (0.03, 0.95),
        (0.1, 0.945),
        (0.3, 0.94),
        (1.0, 0.90),
        (3.0, 0.8),
        (10.0, 0.5),
    ]
    curves["curvature"] = [(lam, 0.90) for lam in lambdas["curvature"]]  # too strong from the start
    sel = study.select_lambdas("sweep", _val_rows(curves, 0.95))
    ig = sel["lambdas"]["input_gradient"]
    assert ig["1"]["lam"] == pytest.approx(0.3, rel=1e-2)
    w = (0.94 - 0.92) / (0.94 - 0.90)
    assert ig["3"]["lam"] == pytest.approx(
        math.exp(math.log(0.3) + w * math.log(1.0 / 0.3)), rel=5e-3
    )
    assert sel["lambdas"]["jacobian_frobenius"]["1"]["lam"] is None  # never loses a point
    assert "extend the sweep" in sel["lambdas"]["curvature"]["1"]["reason"]
    assert study.grid.selected_runs(sel) == [
        ("input_gradient", ig["1"]["lam"]),
        ("input_gradient", ig["3"]["lam"]),
    ]
    assert study.grid.selected_runs(sel, target=3) == [("input_gradient", ig["3"]["lam"])]


def test_selected_lambda_is_evaluated_with_autoattack_and_named_by_value():
    sel = {"lambdas": {"curvature": {"1": {"lam": 4.2}, "3": {"lam": None}}}}
    configs = study.grid.grid("sweep", selection=sel, seeds=[0])
    lams = [c["lam"] for c in configs if c.get("regularizer") == "curvature"]
    assert lams == [*PROFILES["sweep"].lambdas["curvature"], 4.2]
    assert all(c.get("validation") for c in configs)
    names = [study.grid.result_name(c) for c in configs]
    assert "curvature_lam4.2_seed0.json" in names and "adversarial-l2_seed0.json" in names
    chosen = next(c for c in configs if c.get("lam") == 4.2)
    assert study.grid.publishes_weights("sweep", chosen, sel)
    assert not study.grid.publishes_weights("sweep", {**chosen, "seed": 1}, sel)
    assert not study.grid.publishes_weights("sweep", {**chosen, "lam": 10.0}, sel)


def test_selection_seeds_sweep_alone_and_the_other_seeds_train_the_selected_lambdas():
    """``converged`` selects λ on seed 0's sweeps: seeds 1 and 2 train no sweep, then each
    regularizer at its selected λ; the selection averages the selecting seed's rows only;
    published weights are seed 0's attacked models and, on every seed, plain training and the λ
    of the largest target; every baseline has its own file name."""
    p = PROFILES["converged"]
    assert p.study.selection_seeds == (0,)
    before = study.grid.grid("converged")
    per_seed = {s: [c for c in before if c["seed"] == s] for s in p.seeds}
    n_sweep = sum(len(v) for v in p.lambdas.values())
    assert len(per_seed[0]) == 1 + n_sweep + len(p.adversarial)
    # the baselines' radii are a sweep too (select_baselines): seed 0 only
    assert len(per_seed[1]) == len(per_seed[2]) == 1
    names = [study.grid.result_name(c) for c in before]
    assert len(set(names)) == len(names)  # eight baselines, eight names
    sel = {"lambdas": {"curvature": {"1": {"lam": 4.2}, "3": {"lam": 10.0}}}}
    after = study.grid.grid("converged", selection=sel)
    seed1 = [c["lam"] for c in after if c["seed"] == 1 and c.get("regularizer")]
    assert seed1 == [4.2, 10.0]
    curv0 = [c["lam"] for c in after if c["seed"] == 0 and c.get("regularizer") == "curvature"]
    assert curv0 == [*p.lambdas["curvature"], 4.2]  # 10 is in the sweep already
    # AutoAttack on every seed of the models compared (plain, the selected λ), weights of seed 0
    attacked = [c for c in after if study.grid.attacked("converged", c, sel)]
    assert {c["seed"] for c in attacked} == {0, 1, 2}
    assert {study.grid.label(c) for c in attacked} == {"plain", "curvature"}
    assert not any(c.get("adversarial") for c in attacked)  # no ε selected here
    assert study.grid.publishes_weights("converged", {**attacked[0], "seed": 0}, sel)
    # and on every seed (publish_every_seed) plain training and the λ of the largest target
    published = {
        (study.grid.label(c), c.get("lam"))
        for c in after
        if c["seed"] == 1 and study.grid.publishes_weights("converged", c, sel)
    }
    assert published == {("plain", None), ("curvature", 10.0)}
    # the selection reads seed 0's rows: seed 1's (far lower) accuracies change nothing
    curves = {
        reg: [(lam, 0.90 - 0.01 * i) for i, lam in enumerate(lams)]
        for reg, lams in p.lambdas.items()
    }
    rows = [{**r, "seed": 0} for r in _val_rows(curves, 0.905)]
    rows += [{**r, "seed": 0} for r in _baseline_rows(p, 0.90)]
    noise = [{**r, "seed": 1, "value": 0.5} for r in rows]
    assert study.select_lambdas("converged", rows) == study.select_lambdas(
        "converged", rows + noise
    )
    with pytest.raises(ValueError, match="selection_seeds"):
        p.replace(study={"targets": [1], "selection_seeds": [7]})


# --- the whole study, end to end ---------------------------------------------------------------


def test_a_diverged_training_is_kept_written_and_never_selected(tmp_path, monkeypatch):
    """A loss that becomes non-finite is a result too: the cache keeps the divergence (a rerun
    raises at once, training nothing), the grid writes the run's file with the message and no
    rows and goes on, and the selection names the divergence instead of interpolating to it."""
    from robustreg import training

    config = {
        "data": "digits",
        "model": {"name": "mlp", "hidden": [8]},
        "epochs": 2,
        "lr": 1e8,
        "regularizer": "input_gradient",
        "lam": 1e6,
    }
    with pytest.raises(cache.DivergedError, match="non-finite training loss"):
        cache.train_cached(config, cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path / "c").glob("*.partial.pt"))

    grid = dict(
        cache_dir=tmp_path / "c",
        results_dir=tmp_path / "r",
        progress=False,
        device="cpu",
        seeds=[0],
        lr=1e8,
        epochs=2,
        lambdas={"input_gradient": [1e6]},
        adversarial=[],
    )
    rows = study.run_grid("smoke", **grid)
    assert {r["method"] for r in rows} == {"plain"}  # the diverged run has no rows
    stored = study.read_result(tmp_path / "r" / "input_gradient_lam1e+06_seed0.json")
    assert "non-finite" in stored["diverged"] and stored["rows"] == []

    def no_training(*args, **kwargs):
        raise AssertionError("a kept divergence is not trained again")

    monkeypatch.setattr(training, "train", no_training)
    with pytest.raises(cache.DivergedError, match="non-finite training loss"):
        cache.train_cached(config, cache_dir=tmp_path / "c", progress=False)
    assert study.run_grid("smoke", **grid) == rows  # the files read back
    diverged = tmp_path / "r" / "input_gradient_lam1e+06_seed0.json"
    diverged.unlink()  # rewritten from the cache's record: raised, not trained
    assert study.run_grid("smoke", **grid) == rows
    assert study.read_result(diverged)["diverged"] == stored["diverged"]
    curves = {reg: [(lam, 0.95) for lam in lams] for reg, lams in PROFILES["sweep"].lambdas.items()}
    curves["input_gradient"] = [(0.03, 0.95), (0.1, 0.945), (0.3, math.nan)] + [
        (lam, math.nan) for lam in (1.0, 3.0, 10.0)
    ]
    sel = study.select_lambdas("sweep", _val_rows(curves, 0.95))
    assert sel["lambdas"]["input_gradient"]["1"]["lam"] is None
    assert "diverges at λ = 0.3" in sel["lambdas"]["input_gradient"]["1"]["reason"]


def _tiny_sweep():
    """Profile overrides of a two-λ sweep on one seed, one epoch, with a validation split and no
    AutoAttack: a stage 1 that trains in a second."""
    return {
        "seeds": [0],
        "epochs": 1,
        "lambdas": {"input_gradient": [0.1, 1.0]},
        "adversarial": [],
        "eval": PROFILES["sweep-smoke"].eval.replace(n_test=20, steps=2, restarts=1),
        "autoattack": None,
        "study": None,
        "validation": True,
    }


def test_a_sharded_study_keeps_one_plan_across_its_stages(tmp_path):
    """Stage 1 writes the shard plan; stage 3's grid has the selected λ on top, and the same plan
    must accept it (the plan counts the grid before any selection)."""
    small = _tiny_sweep()
    kw = dict(cache_dir=tmp_path / "c", results_dir=tmp_path / "r", progress=False, device="cpu")
    study.run_grid("sweep-smoke", shard="1/2", **kw, **small)
    selection = {"lambdas": {"input_gradient": {"1": {"lam": 0.3}}}}
    study.run_grid("sweep-smoke", shard="1/2", selection=selection, **kw, **small)
    study.run_grid("sweep-smoke", shard="2/2", selection=selection, **kw, **small)
    with pytest.raises(ValueError, match="split into 2 shards"):
        study.run_grid("sweep-smoke", shard="1/3", **kw, **small)


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_lowered_is_the_per_seed_ratio_to_plain_and_its_geometric_mean(draw):
    """ρ_s(r, q) = R̄_q(f_{r,s}) / R̄_q(f_{plain,s}) and exp(mean_s log ρ_s), for the regularizers
    the evaluation measures; a selected regularizer that is not measured (a later one) is a row,
    not a column, and one whose sweep missed a target is left out there."""
    positive = st.floats(1e-4, 1e3)
    seeds = list(range(draw.draw(st.integers(1, 4))))
    measured = ["input_gradient", "curvature"]
    lams = {"input_gradient": 0.5, "curvature": 3.0, "grad_align": 20.0}
    value = {
        (m, s, q): draw.draw(positive) for m in ["plain", *lams] for s in seeds for q in measured
    }
    rows = [
        {
            "method": m,
            "lam": lams.get(m, 0.0),
            "seed": s,
            "metric": "regularizer_mean",
            "regularizer": q,
            "attack": None,
            "norm": None,
            "eps": None,
            "value": v,
            "seconds_per_epoch": 1.0,
            "cpu_seconds_per_epoch": 1.0,
        }
        for (m, s, q), v in value.items()
    ]
    entry = {
        reg: {"1": {"lam": lam}, "3": {"lam": None if reg == "curvature" else lam}}
        for reg, lam in lams.items()
    }
    out = study.matched.lowered(rows, {"targets": [1, 3], "lambdas": entry})
    assert set(out[3]["per_seed"]) == {"input_gradient", "grad_align"}
    g = out[1]["geometric_mean"]
    assert list(g.columns) == measured and list(g.index) == list(lams)
    for r in lams:
        for q in measured:
            ratios = [value[r, s, q] / value["plain", s, q] for s in seeds]
            assert list(out[1]["per_seed"][r][q]) == pytest.approx(ratios, rel=1e-12)
            mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
            assert g.loc[r, q] == pytest.approx(mean, rel=1e-10)


def test_selection_reads_validation_accuracy_from_result_files_without_the_cache(tmp_path):
    """A study resumed on a machine whose training cache is empty (a new session, a clone) selects
    from its result files: the same rows as from the cache, and no training (an empty cache with
    no result files is an error that names the run)."""
    small = _tiny_sweep()
    res, cache_dir = tmp_path / "r", tmp_path / "c"
    study.run_grid("sweep-smoke", cache_dir=cache_dir, results_dir=res, progress=False, **small)
    from_cache = study.matched.validation_rows("sweep-smoke", cache_dir=cache_dir, **small)
    empty = tmp_path / "empty"
    from_files = study.matched.validation_rows(
        "sweep-smoke", cache_dir=empty, results_dir=res, **small
    )
    assert from_files == from_cache and len(from_files) == 3
    assert not empty.exists() or not any(empty.iterdir())  # nothing was trained
    with pytest.raises(FileNotFoundError, match="not trained yet"):
        study.matched.validation_rows("sweep-smoke", cache_dir=empty, **small)


def test_progress_counts_the_runs_of_a_study_in_progress(tmp_path):
    """Stage 1 counts the sweep; once a selection exists, stage 3 counts its grid, and a run
    selected after its sweep is not done until its AutoAttack is added."""
    pytest.importorskip("torchattacks")
    small = {
        **_tiny_sweep(),
        "study": {"targets": [1]},
        "autoattack": PROFILES["sweep-smoke"].autoattack.replace(n=10, steps=2, n_queries=10),
    }
    res = tmp_path / "r"
    kw = dict(cache_dir=tmp_path / "c", results_dir=res, progress=False, device="cpu")
    assert study.matched.progress("sweep-smoke", res, **small) == {
        "stage": 1,
        "done": 0,
        "planned": 3,
        "selection": None,
        "records": [],
    }
    study.run_grid("sweep-smoke", **kw, **small)  # plain training (attacked) and two λ
    got = study.matched.progress("sweep-smoke", res, **small)
    assert got["done"] == 3 and len({r["name"] for r in got["records"]}) == 3
    selection = {"lambdas": {"input_gradient": {"1": {"lam": 1.0}}}}
    (res / study.matched.SELECTION_FILE).write_text(json.dumps(selection))
    got = study.matched.progress("sweep-smoke", res, **small)
    assert {k: v for k, v in got.items() if k != "records"} == {
        "stage": 3,
        "done": 2,
        "planned": 3,
        "selection": selection,
    }
    assert "input_gradient_lam1_seed0.json" not in {r["name"] for r in got["records"]}
    with pytest.raises(study.StaleResultError):  # read in full, the same file is stale
        study.run_grid("sweep-smoke", read_only=True, selection=selection, **kw, **small)
    study.run_grid("sweep-smoke", selection=selection, **kw, **small)  # AutoAttack added
    assert study.matched.progress("sweep-smoke", res, **small)["done"] == 3


def test_a_norm_added_to_autoattack_is_attacked_alone_with_the_rows_of_a_full_evaluation(
    tmp_path, monkeypatch
):
    """A profile whose AutoAttack gains a norm after its runs were evaluated (the LeNet study's
    ℓ2): the stored result gains that norm's rows, computed alone (nothing else is evaluated or
    trained again), and then equals, row for row and in order, the result of evaluating the run
    afresh with both norms; a radius changed at a norm already attacked is still stale."""
    pytest.importorskip("torchattacks")
    aa = PROFILES["sweep-smoke"].autoattack.replace(n=10, steps=2, n_queries=10)
    small = {**_tiny_sweep(), "lambdas": {}, "study": {"targets": [1]}}
    del small["autoattack"]
    linf, both = aa.replace(eps={"linf": 0.1}), aa.replace(eps={"linf": 0.1, "l2": 1.0})
    kw = dict(cache_dir=tmp_path / "c", progress=False, device="cpu")
    res, fresh = tmp_path / "r", tmp_path / "fresh"
    study.run_grid("sweep-smoke", results_dir=res, autoattack=linf, **kw, **small)
    (name,) = [p.name for p in res.glob("*.json")]
    before = json.loads((res / name).read_text())
    assert {r["norm"] for r in before["rows"] if r["attack"] == "autoattack"} == {"linf"}
    with pytest.raises(study.StaleResultError, match="gained .'l2': 1.0.; add it with"):
        study.run_grid(
            "sweep-smoke", results_dir=res, autoattack=both, read_only=True, **kw, **small
        )
    full_evaluations = []
    real = study.execute.evaluate_model
    monkeypatch.setattr(
        study.execute,
        "evaluate_model",
        lambda *a, **k: full_evaluations.append(1) or real(*a, **k),
    )
    study.run_grid("sweep-smoke", results_dir=res, autoattack=both, **kw, **small)
    assert not full_evaluations  # only the new norm's AutoAttack ran
    added = json.loads((res / name).read_text())
    assert added["autoattack_cpu_seconds"] > before["autoattack_cpu_seconds"]
    assert [a["eps"] for a in added["autoattack_added"]] == [{"l2": 1.0}]
    study.run_grid("sweep-smoke", results_dir=fresh, autoattack=both, **kw, **small)
    assert full_evaluations == [1]
    afresh = json.loads((fresh / name).read_text())
    assert added["eval"] == afresh["eval"] and added["key"] == afresh["key"]
    assert added["rows"] == afresh["rows"]
    assert {r["norm"] for r in added["rows"] if r["attack"] == "autoattack"} == {"linf", "l2"}
    other = aa.replace(eps={"linf": 0.05, "l2": 1.0})
    with pytest.raises(study.StaleResultError, match="autoattack_eps"):
        study.run_grid("sweep-smoke", results_dir=res, autoattack=other, **kw, **small)
    # a network that classifies one test image otherwise than the file records is not attacked
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    clean = next(r for r in before["rows"] if r["metric"] == "clean_accuracy")
    clean["flags"] = ("1" if clean["flags"][0] == "0" else "0") + clean["flags"][1:]
    (tampered / name).write_text(json.dumps(before))
    with pytest.raises(RuntimeError, match="otherwise than the file records"):
        study.run_grid("sweep-smoke", results_dir=tampered, autoattack=both, **kw, **small)
    assert json.loads((tampered / name).read_text()) == before
    # a diverged run has nothing to attack: its file takes the new settings, nothing is trained
    diverged, empty = tmp_path / "diverged", tmp_path / "empty-cache"
    diverged.mkdir()
    record = {**before, "rows": [], "diverged": "non-finite loss at epoch 1"}
    (diverged / name).write_text(json.dumps(record))
    study.run_grid(
        "sweep-smoke", results_dir=diverged, autoattack=both, **{**kw, "cache_dir": empty}, **small
    )
    after = json.loads((diverged / name).read_text())
    assert after["eval"] == afresh["eval"] and after["diverged"] and after["rows"] == []
    assert not empty.exists() or not any(empty.iterdir())


def test_study_end_to_end_resumes_and_publishes_loadable_models(tmp_path):
    pytest.importorskip("torchattacks")
    small = {  # the smoke profile, smaller still: two regularizers, one baseline, 40 images
        "seeds": [0],
        "epochs": 1,
        "lambdas": {"input_gradient": [0.1, 1.0, 10.0], "curvature": [1.0, 10.0, 100.0]},
        "adversarial": [{"eps": 1.0, "norm": "l2", "steps": 2}],
        "eval": PROFILES["sweep-smoke"].eval.replace(n_test=40, steps=5),
        "autoattack": PROFILES["sweep-smoke"].autoattack.replace(n=20, steps=3, n_queries=20),
    }
    kw = dict(cache_dir=tmp_path / "cache", progress=False, device="cpu", **small)
    out = tmp_path / "res"
    rows, sel = study.run_study("sweep-smoke", results_dir=out, **kw)
    stored = json.loads((out / "selection.json").read_text())
    assert stored == json.loads(json.dumps(sel))
    attacked = {r["method"] + f"@{r['lam']:g}" for r in rows if r.get("attack") == "autoattack"}
    expected = {"plain@0", "adversarial-l2@0"}
    expected |= {f"{reg}@{lam:g}" for reg, lam in study.grid.selected_runs(sel)}
    assert attacked == expected
    # per-image flags: worst case = AutoAttack ∧ PGD at that radius
    by = {
        (r["method"], r["lam"], r["attack"], r["norm"], r["eps"]): r for r in rows if "flags" in r
    }
    for (method, lam, attack, norm, eps), r in by.items():
        if attack == "worst-case":
            aa = evaluation.parse_flags(by[method, lam, "autoattack", norm, eps]["flags"])
            pgd = evaluation.parse_flags(by[method, lam, "pgd", norm, eps]["flags"])
            assert torch.equal(evaluation.parse_flags(r["flags"]), aa & pgd[: len(aa)])
    # the published models load and reproduce their clean accuracy exactly
    x, y = data.load("digits", "test")
    published = sorted(out.glob("*.safetensors"))
    assert len(published) == len(expected)
    for weights in published:
        model = study.load_model(weights.with_suffix(".json"))
        record = study.read_result(weights.with_suffix(".json"))
        clean = next(r["value"] for r in record["rows"] if r["metric"] == "clean_accuracy")
        n = record["eval"]["n_test"]
        dtype = models.device_dtype(model)[1]
        assert evaluation.accuracy(model, x[:n].to(dtype), y[:n]) == clean
    # a rerun reads everything back; read_only never trains
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again, _ = study.run_study("sweep-smoke", results_dir=out, read_only=True, **kw)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert len(again) == len(rows)
    # per-image outcomes for paired comparisons
    records = [study.read_result(p) for p in sorted(out.glob("*_seed0.json"))]
    clean = comparison.outcomes(records, "plain", 0.0, "clean", [0])
    plain = next(rec for rec in records if rec["method"] == "plain")
    stored = next(row["value"] for row in plain["rows"] if row["metric"] == "clean_accuracy")
    assert clean.shape == (1, 40) and clean.mean() == stored
    with pytest.raises(KeyError, match="seeds \\[1\\]"):
        comparison.outcomes(records, "plain", 0.0, "clean", [0, 1])
    # a study in progress: a run without its files is an error, or left out with partial;
    # its model is trained on demand, or, with train=False, an error that names the weights
    config = next(c for c in study.grid.grid("sweep-smoke", selection=sel, **small))
    name = study.grid.result_name(config)
    for suffix in (".json", ".safetensors"):
        (out / name).with_suffix(suffix).rename(tmp_path / f"aside{suffix}")
    with pytest.raises(FileNotFoundError, match=name):
        study.run_study("sweep-smoke", results_dir=out, read_only=True, **kw)
    fewer, _ = study.run_study("sweep-smoke", results_dir=out, read_only=True, partial=True, **kw)
    assert 0 < len(fewer) < len(rows)
    with pytest.raises(FileNotFoundError, match="not published"):
        study.trained_model("sweep-smoke", config, results_dir=out, train=False)


# --- the committed study ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sweep", "converged"])
def test_committed_study_models_load_and_reproduce_their_clean_accuracy(name):
    """Every published model of a committed study: load_model, then the stored per-image clean
    outcomes and clean accuracy. Exactly, except on an image whose two largest logits lie within
    float32 rounding of each other (another CPU may break that tie the other way)."""
    published = sorted((study.results_root() / name).glob("*.safetensors"))
    if not published:
        pytest.skip("no committed study models yet")
    for weights in published:
        record = study.read_result(weights.with_suffix(".json"))
        model = study.load_model(weights.with_suffix(".json"))
        x, y = data.load(record["config"]["data"], "test")
        n = record["eval"]["n_test"]
        with torch.no_grad():
            logits = model(x[:n])
        top2 = logits.topk(2, dim=1).values
        # float32 logits of a 784-256-256-10 MLP: rounding well below 1e-5 of their scale
        near = (top2[:, 0] - top2[:, 1]) <= 1e-5 * logits.abs().max()
        correct = logits.argmax(1) == y[:n]
        row = next(r for r in record["rows"] if r["metric"] == "clean_accuracy")
        stored = evaluation.parse_flags(row["flags"])
        assert torch.equal(correct[~near], stored[~near]), weights.name
        if not near.any():
            assert correct.double().mean().item() == row["value"], weights.name


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_method_of_every_profile_has_a_display_name(profile):
    """The chapters' tables and legends name each method (plotting.method_name: METHOD_NAMES, or
    PGD training at a radius of its own) and draw it in its style."""
    from robustreg import plotting

    for config in study.grid.grid(profile):
        method = study.grid.label(config)
        assert plotting.method_name(method) and plotting.method_style(method)


# --- the gradient-masking battery ---------------------------------------------------------------


def test_transfer_sources_are_plain_training_and_every_published_baseline_of_the_norm():
    """A study that selects its baselines publishes one per target: each is a transfer source for
    its norm; plain training is one for both; regularized networks are none."""
    from robustreg.study import battery

    records = {
        f"{m}_seed0.json": {"method": m}
        for m in [
            "plain",
            "adversarial-eps0.0477",
            "adversarial-eps0.0671",
            "adversarial-l2-eps0.582",
            "adversarial-l2",
            "adversarial",
            "curvature",
        ]
    }
    got = battery.transfer_sources(records)
    assert got == {
        "linf": [
            "plain_seed0.json",
            "adversarial-eps0.0477_seed0.json",
            "adversarial-eps0.0671_seed0.json",
            "adversarial_seed0.json",
        ],
        "l2": [
            "plain_seed0.json",
            "adversarial-l2-eps0.582_seed0.json",
            "adversarial-l2_seed0.json",
        ],
    }


def test_masking_battery_on_a_small_study_resumes_and_refuses_other_settings(tmp_path):
    pytest.importorskip("torchattacks")
    from robustreg.study import battery

    small = {
        "seeds": [0],
        "epochs": 1,
        "lambdas": {"input_gradient": [0.1, 1.0, 10.0]},
        "eval": PROFILES["sweep-smoke"].eval.replace(n_test=30, steps=5),
        "autoattack": PROFILES["sweep-smoke"].autoattack.replace(n=20, steps=3, n_queries=20),
    }
    out = tmp_path / "res"
    study.run_study(
        "sweep-smoke", results_dir=out, cache_dir=tmp_path / "c", progress=False, **small
    )
    done = battery.run_battery("sweep-smoke", out, progress=False, **small)
    published = {p.stem + ".json" for p in out.glob("*.safetensors")}
    assert set(done) == published
    for name, result in done.items():
        checks = result["checks"]
        for norm in ("linf", "l2"):
            sweep = checks["sweep"][norm]
            assert sweep["robust"] == sorted(sweep["robust"], reverse=True)  # nested radii
            sources = set(checks["transfer"][norm])
            assert name not in sources and sources <= published
            far = checks["beyond"][norm]
            assert far["eps"] == pytest.approx(battery.BEYOND * small["autoattack"].eps[norm])
            # Square alone can only break correctly classified images
            clean = next(
                r for r in study.read_result(out / name)["rows"] if r["metric"] == "clean_accuracy"
            )
            sq = evaluation.parse_flags(checks["square"][norm]["flags"])
            assert not (sq & ~evaluation.parse_flags(clean["flags"])[:20]).any()
        assert result["verdict"] == battery.verdict(result)
    # a rerun reuses every file; read_only never computes; other settings are refused
    before = {p.name: p.read_bytes() for p in (out / "masking").iterdir()}
    battery.run_battery("sweep-smoke", out, progress=False, read_only=True, **small)
    assert {p.name: p.read_bytes() for p in (out / "masking").iterdir()} == before
    # a battery still being computed: read_only raises for a missing file, partial leaves it out
    missing = sorted(out.glob("masking/*.json"))[0]
    missing.rename(tmp_path / "aside.json")
    with pytest.raises(FileNotFoundError, match="masking-battery"):
        battery.run_battery("sweep-smoke", out, progress=False, read_only=True, **small)
    part = battery.run_battery(
        "sweep-smoke", out, progress=False, read_only=True, partial=True, **small
    )
    assert set(part) == set(battery.published(out)) - {missing.name}
    (tmp_path / "aside.json").rename(missing)
    other = {**small, "autoattack": small["autoattack"].replace(n_queries=30)}
    with pytest.raises(study.StaleResultError, match="other battery settings"):
        battery.run_battery("sweep-smoke", out, progress=False, **other)
    assert {p.name: p.read_bytes() for p in (out / "masking").iterdir()} == before
    # a transfer source not yet published (the study still running): nothing is computed
    assert battery.expected(battery.profile("sweep-smoke", **small), out) == set(
        battery.published(out)
    )
    # Square from further starts, on the images the worst case left: resumes, refuses others
    names = sorted(battery.published(out))[:2]
    with pytest.raises(FileNotFoundError, match="square_restarts.py"):
        battery.square_restarts("sweep-smoke", out, names, read_only=True, **small)
    restarts = battery.square_restarts("sweep-smoke", out, names, starts=(1, 2), **small)
    for name, entry in restarts.items():
        record = study.read_result(out / name)
        worst = next(
            r
            for r in record["rows"]
            if r.get("attack") == "worst-case" and r["norm"] == "linf" and "flags" in r
        )
        white = evaluation.parse_flags(worst["flags"])[:20]
        assert entry["white_box"] == int(white.sum())
        assert entry["broken"] == len(entry["broken_images"]) <= entry["white_box"]
        assert all(white[i] for i in entry["broken_images"])  # only images the worst case left
    kept = (out / battery.RESTARTS_FILE).read_bytes()
    assert (
        battery.square_restarts("sweep-smoke", out, names, starts=(1, 2), read_only=True, **small)
        == restarts
    )
    with pytest.raises(study.StaleResultError, match="other settings"):
        battery.square_restarts("sweep-smoke", out, names, starts=(1, 2, 3), **small)
    assert (out / battery.RESTARTS_FILE).read_bytes() == kept
    with pytest.raises(ValueError, match="repeat the battery's own seed 0"):
        battery.square_restarts("sweep-smoke", out, names, starts=(0, 1), **small)
    with pytest.raises(ValueError, match="valid: \\['linf', 'l2'\\]"):
        battery.square_restarts("sweep-smoke", out, names, norm="l1", **small)
    missing.unlink()
    (out / "adversarial_seed0.safetensors").rename(tmp_path / "aside.safetensors")
    with pytest.raises(RuntimeError, match="adversarial_seed0.json"):
        battery.run_battery("sweep-smoke", out, progress=False, **small)
    assert not missing.exists()


def test_masking_verdict_names_each_sign_against_its_criterion():
    from robustreg.study import battery

    clean = {
        "square": {"linf": {"newly_broken": 5}},
        "sweep": {"linf": {"reached_zero": True, "radii": [0.1, 0.2]}},
        "transfer": {"linf": {"plain_seed0.json": {"newly_broken": 0}}},
        "beyond": {"linf": {"eps": 0.15, "broken_by": {"square": 5}}},
    }
    result = {"settings": {"allowance": 0.005, "n": 1000, "eps": {"linf": 0.1}}, "checks": clean}
    assert battery.verdict(result) == {"masking": False, "signs": []}  # 5 of 1,000 allowed
    bad = json.loads(json.dumps(clean))
    bad["square"]["linf"]["newly_broken"] = 6
    bad["sweep"]["linf"]["reached_zero"] = False
    bad["transfer"]["linf"]["plain_seed0.json"]["newly_broken"] = 9
    bad["beyond"]["linf"]["broken_by"]["square"] = 7
    signs = battery.verdict({**result, "checks": bad})["signs"]
    assert len(signs) == 4
    assert "Square breaks 6" in signs[0] and "0.2" in signs[1] and "9 images" in signs[2]


def test_a_selection_made_before_a_baseline_budget_doubled_is_stale_and_refused(tmp_path, capsys):
    """A baseline's radius chosen from first-stage runs at another budget than the profile now
    trains (the budget doubled after the selection) is stale: the study refuses to train it at
    the old budget, before training anything, and says to delete the selection file."""
    p = PROFILES["converged"]
    _, sel = _converged_selection()
    assert study.grid.stale_baselines("converged", sel) == []
    assert study.grid.stale_baselines("converged", None) == []
    doubled = [
        {**a, "epochs": 2 * a.get("epochs", p.epochs)} if a["norm"] == "linf" else dict(a)
        for a in p.adversarial
    ]
    stale = study.grid.stale_baselines("converged", sel, adversarial=doubled)
    linf = sel["baselines"]["linf"]
    assert sorted((s["norm"], s["eps"], s["epochs"], s["profile_epochs"]) for s in stale) == sorted(
        ("linf", linf[t]["eps"], 120, 240) for t in ("1", "3")
    )
    # an override of the epochs is every run's: nothing is stale then
    assert study.grid.stale_baselines("converged", sel, adversarial=doubled, epochs=2) == []
    res = tmp_path / "res"
    res.mkdir()
    (res / "selection.json").write_text(json.dumps(sel))
    with pytest.raises(RuntimeError, match=r"stale .*linf ε = .*120 epochs.*240 epochs.*Delete"):
        study.run_study(
            "converged",
            results_dir=res,
            cache_dir=tmp_path / "cache",
            progress=False,
            adversarial=doubled,
        )
    assert not (tmp_path / "cache").exists()  # nothing trained
    # the command line: a selection made when PGD-ℓ∞ training had half the profile's epochs
    for entry in sel["baselines"]["linf"].values():
        entry["adversarial"]["epochs"] = p.adversarial[0]["epochs"] // 2
    (res / "selection.json").write_text(json.dumps(sel))
    argv = ["run-grid", "--profile", "converged", "--results-dir", str(res), "--quiet"]
    assert cli([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "Delete the file and rerun" in err and "Traceback" not in err
    assert not (tmp_path / "cache").exists()


def test_a_baseline_trains_for_its_own_epochs_and_others_keep_their_keys():
    adv = [{"eps": 0.1, "norm": "linf", "steps": 7, "epochs": 120}, {"eps": 0.05, "norm": "linf"}]
    base = study.grid.grid("converged", seeds=[0])
    configs = study.grid.grid("converged", seeds=[0], adversarial=adv)
    baselines = {study.grid.label(c): c for c in configs if c.get("adversarial")}
    assert baselines["adversarial"]["epochs"] == 120
    assert "epochs" not in baselines["adversarial"]["adversarial"]  # not an attack setting
    assert baselines["adversarial-eps0.05"]["epochs"] == PROFILES["converged"].epochs
    # the other runs are the profile's, with the keys they had
    keys = {cache.cache_key(c) for c in base if not c.get("adversarial")}
    assert keys == {cache.cache_key(c) for c in configs if not c.get("adversarial")}
    # an override of the epochs is every run's, the baselines' included
    short = study.grid.grid("converged", seeds=[0], adversarial=adv, epochs=2)
    assert {c["epochs"] for c in short} == {2}
    with pytest.raises(ValueError, match="adversarial epochs must be a positive integer"):
        PROFILES["converged"].replace(adversarial=[{"eps": 0.1, "epochs": 0}])


def test_a_regularizer_trains_for_its_own_epochs_and_others_keep_their_keys():
    base = study.grid.grid("converged", seeds=[0])
    configs = study.grid.grid("converged", seeds=[0], regularizer_epochs={"grad_align": 15})
    own = [c for c in configs if c.get("regularizer") == "grad_align"]
    assert own and {c["epochs"] for c in own} == {15}
    others = [c for c in configs if c.get("regularizer") != "grad_align"]
    assert {cache.cache_key(c) for c in others} == {
        cache.cache_key(c) for c in base if c.get("regularizer") != "grad_align"
    }
    # an override of the epochs is every run's
    short = study.grid.grid("converged", seeds=[0], regularizer_epochs={"grad_align": 15}, epochs=2)
    assert {c["epochs"] for c in short} == {2}
    with pytest.raises(ValueError, match=r"regularizer_epochs is 'mmr'; valid: input_gradient"):
        PROFILES["converged"].replace(regularizer_epochs={"mmr": 15})
    with pytest.raises(ValueError, match=r"regularizer_epochs\['grad_align'\] must be a positive"):
        PROFILES["converged"].replace(regularizer_epochs={"grad_align": 0})


def test_a_study_that_selects_baselines_trains_them_on_every_seed_end_to_end(tmp_path):
    """Stage 1 trains the radii on the selecting seed, the selection picks an ε per norm and
    target (or says why not), stage 3 trains it on every seed: one result file each."""
    small = {
        "seeds": [0, 1],
        "epochs": 1,
        "lambdas": {"input_gradient": [0.1, 1.0, 10.0]},
        "adversarial": [{"eps": e, "norm": "linf", "steps": 2} for e in (0.02, 0.1, 0.3)],
        "study": {"targets": [1, 3], "selection_seeds": [0], "select_baselines": True},
        "eval": PROFILES["sweep-smoke"].eval.replace(n_test=20, steps=3, restarts=1),
        "autoattack": None,
    }
    kw = dict(cache_dir=tmp_path / "cache", progress=False, device="cpu", **small)
    rows, sel = study.run_study("sweep-smoke", results_dir=tmp_path / "res", **kw)
    chosen = study.grid.selected_baselines(sel)
    entries = sel["baselines"]["linf"]
    assert chosen, entries  # these radii cross a target
    assert all((e["eps"] is None) == (e["reason"] is not None) for e in entries.values())
    assert len(chosen) == len({e["eps"] for e in entries.values() if e["eps"] is not None})
    trained = {(r["method"], r["seed"]) for r in rows if r["method"].startswith("adversarial")}
    for adv in chosen:
        method = study.grid.label({"adversarial": adv})
        assert {(method, 0), (method, 1)} <= trained
    # seed 1 trains no radius of the sweep
    radii = {study.grid.label({"adversarial": a}) for a in small["adversarial"]}
    assert not {(m, 1) for m in radii} & trained - {
        (study.grid.label({"adversarial": a}), 1) for a in chosen
    }


def test_a_study_that_publishes_every_seed_publishes_the_chapter_9_models(tmp_path):
    """publish_every_seed: plain training and each λ of the largest target on every seed; a
    weight file that a stored run lacks is added from the cache on the next run, and a model
    that does not reproduce the stored validation accuracy is refused."""
    small = {
        "seeds": [0, 1],
        "epochs": 1,
        "lambdas": {"input_gradient": [0.1, 1.0, 10.0, 100.0]},
        "adversarial": [],
        "study": {"targets": [1, 3], "selection_seeds": [0], "publish_every_seed": True},
        "eval": PROFILES["sweep-smoke"].eval.replace(
            n_test=20, steps=2, restarts=1, n_certified=0, regularizers=False
        ),
        "autoattack": None,
    }
    kw = dict(cache_dir=tmp_path / "cache", progress=False, device="cpu", **small)
    res = tmp_path / "res"
    _, sel = study.run_study("sweep-smoke", results_dir=res, **kw)
    p = PROFILES["sweep-smoke"].replace(**small)
    lam3 = sel["lambdas"]["input_gradient"]["3"]["lam"]
    lam1 = sel["lambdas"]["input_gradient"]["1"]["lam"]
    assert lam3 is not None, sel
    published = {f.stem for f in res.glob("*.safetensors")}
    assert {"plain_seed0", "plain_seed1", f"input_gradient_lam{lam3:g}_seed1"} <= published
    if lam1 is not None and lam1 != lam3:
        assert f"input_gradient_lam{lam1:g}_seed1" not in published
    # without the option, seed 1 publishes nothing
    off = p.replace(study=p.study.__class__(targets=(1, 3), selection_seeds=(0,)))
    seed1 = [c for c in study.grid.grid(off, selection=sel) if c["seed"] == 1]
    assert not any(study.grid.publishes_weights(off, c, sel) for c in seed1)
    # a missing weight file is added again, the same bytes
    weight = res / "plain_seed1.safetensors"
    before = weight.read_bytes()
    weight.unlink()
    study.run_study("sweep-smoke", results_dir=res, **kw)
    assert weight.read_bytes() == before
    # a stored accuracy the model does not reproduce: refused, nothing written
    weight.unlink()
    record = json.loads((res / "plain_seed1.json").read_text())
    for row in record["rows"]:
        if row["metric"] == "val_accuracy":
            row["value"] += 0.5
    (res / "plain_seed1.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="not this run's"):
        study.run_study("sweep-smoke", results_dir=res, **kw)
    assert not weight.exists()


def test_the_evaluation_records_autoattacks_cpu_time(tmp_path):
    """A run AutoAttack evaluates records the CPU seconds its AutoAttack took; one it does not, 0."""
    p = PROFILES["sweep-smoke"]
    config = next(c for c in study.grid.grid(p, seeds=[0]) if study.grid.label(c) == "plain")
    test = data.load(p.data, "test")
    model, _ = study.cache.train_cached(config, cache_dir=tmp_path, device="cpu", progress=False)
    settings = {**p.eval.as_dict(), "n_test": 20, "steps": 2, "restarts": 1, "n_certified": 0}
    with_aa = study.evaluate.evaluate_model(
        model, test, {**settings, **p.autoattack.replace(n=10, n_queries=20).as_eval()}
    )
    without = study.evaluate.evaluate_model(model, test, settings)
    assert 0 < with_aa["autoattack_cpu_seconds"] <= with_aa["cpu_seconds"]
    assert without["autoattack_cpu_seconds"] == 0.0


def test_study_profile_names_the_matched_strength_studies():
    assert study.study_profile("converged") is study.PROFILES["converged"]
    for bad in ("default", "no-such-profile"):
        with pytest.raises(ValueError, match=rf"{bad!r} is not a matched-strength .*converged"):
            study.study_profile(bad)


def test_baseline_labels_give_their_sweep_norm_and_radius():
    from robustreg.study import grid

    assert grid.family("adversarial-l2-eps0.582") == "adversarial-l2"
    assert grid.family("adversarial-eps0.0477") == "adversarial"
    assert grid.family("curvature") == "curvature"
    assert grid.baseline_radius("adversarial") == ("linf", 0.1)
    assert grid.baseline_radius("adversarial-l2") == ("l2", 1.0)
    assert grid.baseline_radius("adversarial-l2-eps0.582") == ("l2", 0.582)
    for bad in ("curvature", "adversarial-epsx", "adversarial-foo"):
        with pytest.raises(ValueError, match="adversarial"):
            grid.baseline_radius(bad)
    # every label the grid makes is read back to its own norm and radius
    for config in grid.grid("converged"):
        method = grid.label(config)
        if method.startswith("adversarial"):
            adv = config["adversarial"]
            assert grid.baseline_radius(method) == (adv.get("norm", "linf"), float(adv["eps"]))
            assert grid.strength(method) == float(adv["eps"])  # a radius, at either norm
        else:  # a regularizer's weight; plain training's 0
            assert grid.strength(method, config.get("lam", 0.0)) == config.get("lam", 0.0)

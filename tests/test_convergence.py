"""The convergence check of the converged study (robustreg.study.convergence)."""

import json
from pathlib import Path

import pytest

from robustreg.study import cache, convergence

BASE = {"data": "fashion-mnist", "model": {"name": "mlp", "hidden": [8]}, "seed": 0}


def _write(path, config, val):
    hist = {"val_accuracy": val, "accuracy": val, "cpu_time": [1.0] * len(val)}
    path.write_text(json.dumps({"config": config, "history": hist, "cpu_seconds": len(val)}))


@pytest.fixture
def runs(tmp_path):
    # plain: rises to 15 epochs, then 0.2 points below; PGD: still rising 0.7 points at 60
    finals = {("plain", 15): 0.907, ("plain", 30): 0.905, ("plain", 60): 0.905}
    finals |= {("adv", 15): 0.828, ("adv", 30): 0.831, ("adv", 60): 0.838}
    for (method, epochs), final in finals.items():
        config = {**BASE, "epochs": epochs}
        if method == "adv":
            config["adversarial"] = {"eps": 0.1, "norm": "linf", "steps": 7}
        _write(tmp_path / f"{method}_ep{epochs}.json", config, [0.5] * (epochs - 1) + [final])
    config = {**BASE, "epochs": 60, "seed": 1}
    _write(tmp_path / "plain_seed1_ep60.json", config, [0.5] * 59 + [0.899])
    (tmp_path / "diverged.json").write_text(json.dumps({"config": config, "diverged": "nan"}))
    return convergence.read_runs([tmp_path])


def test_runs_are_read_with_their_method_budget_and_curve(runs):
    assert len(runs) == 7  # the diverged run has no history
    row = runs[(runs.method == "adversarial") & (runs.epochs == 30)].iloc[0]
    assert row.val_accuracy == pytest.approx(83.1) and len(row.curve) == 30


def test_gap_is_to_the_best_budget_and_seeds_are_averaged(runs):
    table = convergence.budget_table(runs, used=30, paired=False)
    plain = table.xs("plain", level="method").iloc[0]
    assert plain[60] == pytest.approx(90.2)  # (90.5 + 89.9) / 2
    assert plain.plateau == pytest.approx(90.7)
    assert plain.gap == pytest.approx(0.2) and plain.longer and plain.converged
    adv = table.xs("adversarial", level="method").iloc[0]
    assert adv.gap == pytest.approx(0.7) and not adv.converged


def test_paired_budgets_compare_the_same_seeds(runs):
    # seed 1 trained plain at 60 epochs only: the paired table leaves it out of every budget
    plain = convergence.budget_table(runs, used=60).xs("plain", level="method").iloc[0]
    assert plain[60] == pytest.approx(90.5) and plain.seeds == (0,)
    unpaired = convergence.budget_table(runs, used=60, paired=False)
    assert unpaired.xs("plain", level="method").iloc[0].seeds == (0, 1)


def test_a_gap_equal_to_the_tolerance_in_images_is_converged(tmp_path):
    # 90.34 − 90.04 points is 0.30000000000001137 in floating point: 15 of 5,000 images
    for epochs, final in [(15, 0.8990), (30, 0.9004), (60, 0.9034)]:
        config = {**BASE, "epochs": epochs}
        _write(tmp_path / f"plain_ep{epochs}.json", config, [0.5] * (epochs - 1) + [final])
    table = convergence.budget_table(convergence.read_runs([tmp_path]), used=30, tol=0.3)
    row = table.iloc[0]
    assert row.gap == 0.3 and row.converged


def test_the_longest_budget_is_converged_only_if_the_last_doubling_gained_little(runs):
    table = convergence.budget_table(runs, used={"plain": 60, "adversarial": 60}, paired=False)
    assert not table["longer"].any()
    adv = table.xs("adversarial", level="method").iloc[0]
    # the best budget, but 0.7 points above the run of half its length: still rising
    assert adv.gap == pytest.approx(0.0) and adv.half_gap == pytest.approx(0.7)
    assert not adv.converged
    plain = table.xs("plain", level="method").iloc[0]
    # 0.5 below the plateau (seed 1 is 89.9): too far, however flat the curve
    assert plain.gap == pytest.approx(0.5) and not plain.converged
    table = convergence.budget_table(runs, used={"plain": 30}, tol=0.3, paired=False)
    plain = table.xs("plain", level="method").iloc[0]
    assert plain.longer and plain.converged


def test_no_history_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no run files"):
        convergence.read_runs([tmp_path])


def test_train_run_writes_a_run_file_that_read_runs_reads_and_is_not_retrained(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("ROBUSTREG_CACHE", str(tmp_path / "cache"))
    config = {
        "data": "digits",
        "model": {"name": "mlp", "hidden": [8]},
        "epochs": 2,
        "batch_size": 64,
        "lr": 1e-2,
        "validation": True,
        "seed": 0,
    }
    first = convergence.train_run(config, tmp_path / "runs" / "plain_ep2.json")
    assert len(first["history"]["val_accuracy"]) == 2 and first["cpu_seconds"] > 0
    row = convergence.read_runs([tmp_path / "runs"]).iloc[0]
    assert (row.method, row.epochs) == ("plain", 2)
    assert row.key == first["key"] == cache.cache_key(config)
    # a second call reads the file back (the cache is gone: it could not retrain silently)
    import shutil

    shutil.rmtree(tmp_path / "cache")
    assert convergence.train_run(config, tmp_path / "runs" / "plain_ep2.json") == first


def test_the_pilot_says_how_far_each_of_its_runs_has_got(tmp_path, monkeypatch):
    """``tools/converged_pilot.py --status``: a run is not started, in flight at the epoch its
    per-epoch state (where :func:`convergence.train_run` keeps it) has reached, done with its
    final validation accuracy, or diverged."""
    import torch

    from robustreg.study import store

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "tools"))
    import converged_pilot

    name = "lenet_adversarial-eps0.08_ep480"
    config = converged_pilot.runs("lenet", 15)[name]
    assert converged_pilot.status(name, config, tmp_path) == f"{name}: not started (480 epochs)"
    partial = store.ResultStore(tmp_path).partial_path(config)
    partial.parent.mkdir()
    torch.save({"epoch": 289}, partial)
    assert converged_pilot.status(name, config, tmp_path).startswith(f"{name}: epoch 289 of 480")
    _write(tmp_path / f"{name}.json", config, [0.5] * 479 + [0.8612])
    assert converged_pilot.status(name, config, tmp_path) == f"{name}: done, validation 86.12 %"
    (tmp_path / f"{name}.json").write_text(json.dumps({"config": config, "diverged": "nan"}))
    assert converged_pilot.status(name, config, tmp_path) == f"{name}: diverged"

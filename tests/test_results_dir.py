"""run_grid's results directory (the files the book commits): reuse, safety, published weights."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from robustreg import data, evaluation, regularizers, study
from robustreg.study import cache

FAST = dict(device="cpu", progress=False, epochs=1)


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    rows = study.run_grid("smoke", cache_dir=root / "cache", results_dir=root / "results", **FAST)
    return root, rows


def test_one_file_per_run_with_metadata(grid_dirs):
    root, rows = grid_dirs
    configs = study.grid.grid("smoke", epochs=1)
    names = sorted(p.name for p in (root / "results").glob("*.json"))
    assert names == sorted(study.grid.result_name(c) for c in configs)
    assert "plain_seed0.json" in names and "curvature_lam1_seed0.json" in names
    for record in study.load_results(root / "results"):
        assert {"key", "config", "eval", "history", "rows", "machine", "eval_seconds"} <= set(
            record
        )
        assert len(record["history"]["cpu_time"]) == 1
        assert record["num_classes"] == 10 and record["input_shape"] == [1, 8, 8]
    published = sorted(p.stem for p in (root / "results").glob("*.safetensors"))
    expected = sorted(
        study.grid.result_name(c)[:-5] for c in configs if study.grid.publishes_weights("smoke", c)
    )
    assert published == expected and "plain_seed0" in published
    assert "adversarial_seed0" not in published
    assert all(r["cpu_seconds_per_epoch"] > 0 for r in rows)


def test_results_are_reused_without_training(grid_dirs, monkeypatch, tmp_path):
    root, rows = grid_dirs

    def forbidden(*args, **kwargs):
        raise AssertionError("trained although the results file exists")

    monkeypatch.setattr(cache, "train_cached", forbidden)
    again = study.run_grid(
        "smoke", cache_dir=tmp_path / "empty", results_dir=root / "results", **FAST
    )
    assert again == rows
    assert not (tmp_path / "empty").exists()


def test_file_of_another_configuration_is_never_overwritten(grid_dirs, tmp_path):
    root, _ = grid_dirs
    results = tmp_path / "results"
    results.mkdir()
    name = "plain_seed0.json"
    record = json.loads((root / "results" / name).read_text())
    record["key"] = "0" * 24  # written for another configuration
    record["config"]["lr"] = 0.5
    text = json.dumps(record)
    (results / name).write_text(text)
    with pytest.raises(study.StaleResultError, match=r"plain_seed0.json.*lr: 0.5.*refresh"):
        study.run_grid("smoke", cache_dir=root / "cache", results_dir=results, seeds=[0], **FAST)
    assert (results / name).read_text() == text
    # a smoke run into a copy of the committed default results changes nothing there
    default = tmp_path / "default"
    default.mkdir()
    committed = Path(__file__).resolve().parent.parent / "results" / "default" / name
    (default / name).write_text(committed.read_text())
    with pytest.raises(study.StaleResultError, match="epochs"):
        study.run_grid("smoke", cache_dir=root / "cache", results_dir=default, seeds=[0], **FAST)
    assert (default / name).read_text() == committed.read_text()


def test_read_only_never_trains(grid_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="no result file.*run-grid --profile smoke"):
        study.run_grid("smoke", results_dir=tmp_path, read_only=True, **FAST)
    assert not list(tmp_path.iterdir())


def test_corrupt_result_file_names_itself(grid_dirs, tmp_path):
    root, _ = grid_dirs
    bad = tmp_path / "plain_seed0.json"
    bad.write_text((root / "results" / "plain_seed0.json").read_text()[:100])
    with pytest.raises(ValueError, match="plain_seed0.json: not a valid result file"):
        study.run_grid("smoke", results_dir=tmp_path, read_only=True, **FAST)


def test_load_model_reproduces_the_stored_accuracy(grid_dirs):
    root, _ = grid_dirs
    path = root / "results" / "curvature_lam1_seed0.json"
    model = study.load_model(path)
    assert not model.training
    record = study.read_result(path)
    x, y = data.load("digits", "test")
    n = record["eval"]["n_test"]
    clean = next(r["value"] for r in record["rows"] if r["metric"] == "clean_accuracy")
    assert evaluation.accuracy(model, x[:n], y[:n]) == clean


def test_load_model_checks_the_weights_belong_to_the_run(grid_dirs, tmp_path):
    root, _ = grid_dirs
    for suffix in (".json", ".safetensors"):
        shutil.copy(root / "results" / f"plain_seed0{suffix}", tmp_path / f"plain_seed0{suffix}")
    shutil.copy(root / "results" / "curvature_lam1_seed0.safetensors", tmp_path / "x.safetensors")
    (tmp_path / "x.json").write_text((tmp_path / "plain_seed0.json").read_text())
    with pytest.raises(study.StaleResultError, match="belongs to run"):
        study.load_model(tmp_path / "x.json")
    with pytest.raises(FileNotFoundError, match="no weights stored"):
        study.load_model(root / "results" / "adversarial_seed0.json")


def test_effective_configuration_records_defaults():
    config = {"regularizer": "curvature", "lam": 1.0}
    full = cache.normalize_config(config)
    assert full["regularizer_options"] == {"h": regularizers.DEFAULT_H}
    assert cache.cache_key(config) == cache.cache_key(
        {**config, "regularizer_options": {"h": regularizers.DEFAULT_H}}
    )
    assert cache.cache_key(config) != cache.cache_key(
        {**config, "regularizer_options": {"h": 0.25}}
    )
    with pytest.raises(ValueError, match=r"unknown options \['step'\].*valid: \['h'\]"):
        cache.normalize_config({**config, "regularizer_options": {"step": 1}})


def test_initialisation_ignores_default_dtype(tmp_path):
    config = {"data": "digits", "model": {"name": "mlp", "hidden": [8]}, "epochs": 1, "seed": 3}
    m32, _ = cache.train_cached(config, cache_dir=tmp_path / "a", device="cpu", progress=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m64, _ = cache.train_cached(config, cache_dir=tmp_path / "b", device="cpu", progress=False)
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(m32.state_dict().values(), m64.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_refresh_rewrites_the_files(grid_dirs, tmp_path):
    root, rows = grid_dirs
    results = tmp_path / "results"
    results.mkdir()
    name = "plain_seed0.json"
    (results / name).write_text((root / "results" / name).read_text())
    stale = json.loads((results / name).read_text())
    stale["rows"] = []  # same key and settings: reused unless refreshed
    (results / name).write_text(json.dumps(stale))
    kept = study.run_grid("smoke", cache_dir=root / "cache", results_dir=results, **FAST)
    assert not [r for r in kept if r["method"] == "plain"]
    fresh = study.run_grid(
        "smoke", cache_dir=root / "cache", results_dir=results, refresh=True, **FAST
    )
    assert fresh == rows and json.loads((results / name).read_text())["rows"]


def test_one_read_gives_rows_and_records(grid_dirs):
    """A chapter gets the rows and the records of its runs from one call (no second read)."""
    root, rows = grid_dirs
    again, records = study.run_grid(
        "smoke", results_dir=root / "results", read_only=True, with_records=True, **FAST
    )
    assert again == rows
    stored = {r["name"]: r for r in study.load_results(root / "results")}
    assert records == [stored[r["name"]] for r in records]
    assert [r["name"] for r in records] == [
        study.grid.result_name(c) for c in study.grid.grid("smoke", epochs=1)
    ]


def test_a_study_in_progress_is_read_in_part(grid_dirs, tmp_path):
    root, rows = grid_dirs
    results = tmp_path / "results"
    shutil.copytree(root / "results", results)
    (results / "curvature_lam1_seed0.json").unlink()
    with pytest.raises(FileNotFoundError, match="curvature_lam1_seed0.json: no result file"):
        study.run_grid("smoke", results_dir=results, read_only=True, **FAST)
    part, records = study.run_grid(
        "smoke", results_dir=results, read_only=True, partial=True, with_records=True, **FAST
    )
    names = sorted(r["name"] for r in records)
    assert names == sorted(p.name for p in results.glob("*_seed*.json"))
    assert (
        "curvature_lam1_seed0.json" not in names
        and len(names) == len(study.grid.grid("smoke", epochs=1)) - 1
    )
    gone = [r for r in rows if (r["method"], r["lam"], r["seed"]) == ("curvature", 1.0, 0)]
    assert gone and part == [r for r in rows if r not in gone]
    with pytest.raises(ValueError, match="partial=True.*read_only=True"):
        study.run_grid("smoke", results_dir=results, partial=True, **FAST)

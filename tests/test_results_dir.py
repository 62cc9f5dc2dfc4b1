"""run_grid's results directory (the metrics files the book commits) and dtype-independent init."""

import json

import pytest
import torch

from robustreg import evaluation, training

FAST = dict(device="cpu", progress=False, epochs=1)


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid")
    rows = evaluation.run_grid(
        "smoke", cache_dir=root / "cache", results_dir=root / "results", **FAST
    )
    return root, rows


def test_one_file_per_run_with_metadata(grid_dirs):
    root, rows = grid_dirs
    configs = evaluation.grid("smoke", epochs=1)
    names = sorted(p.name for p in (root / "results").glob("*.json"))
    assert names == sorted(evaluation.result_name(c) for c in configs)
    assert "plain_seed0.json" in names and "curvature_lam1_seed0.json" in names
    for record in evaluation.load_results(root / "results"):
        assert {"key", "config", "eval", "history", "rows", "machine", "eval_seconds"} <= set(
            record
        )
        assert len(record["history"]["cpu_time"]) == 1
        assert not any(name.endswith(".safetensors") for name in record)
    assert not list((root / "results").glob("*.safetensors"))
    assert all(r["cpu_seconds_per_epoch"] > 0 for r in rows)


def test_results_are_reused_without_training(grid_dirs, monkeypatch, tmp_path):
    root, rows = grid_dirs

    def forbidden(*args, **kwargs):
        raise AssertionError("trained although the results file exists")

    monkeypatch.setattr(training, "train_cached", forbidden)
    again = evaluation.run_grid(
        "smoke", cache_dir=tmp_path / "empty", results_dir=root / "results", **FAST
    )
    assert again == rows
    assert not (tmp_path / "empty").exists()


def test_stale_file_is_recomputed(grid_dirs, tmp_path):
    root, _ = grid_dirs
    results = tmp_path / "results"
    results.mkdir()
    name = "plain_seed0.json"
    record = json.loads((root / "results" / name).read_text())
    record["key"] = "0" * 24  # written for another configuration
    record["rows"] = []
    (results / name).write_text(json.dumps(record))
    rows = evaluation.run_grid(
        "smoke", cache_dir=root / "cache", results_dir=results, seeds=[0], **FAST
    )
    fresh = json.loads((results / name).read_text())
    assert fresh["key"] != "0" * 24 and fresh["rows"]
    assert any(r["method"] == "plain" for r in rows)


def test_initialisation_ignores_default_dtype(tmp_path):
    config = {"data": "digits", "model": {"name": "mlp", "hidden": [8]}, "epochs": 1, "seed": 3}
    m32, _ = training.train_cached(config, cache_dir=tmp_path / "a", device="cpu", progress=False)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        m64, _ = training.train_cached(
            config, cache_dir=tmp_path / "b", device="cpu", progress=False
        )
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
    kept = evaluation.run_grid("smoke", cache_dir=root / "cache", results_dir=results, **FAST)
    assert not [r for r in kept if r["method"] == "plain"]
    fresh = evaluation.run_grid(
        "smoke", cache_dir=root / "cache", results_dir=results, refresh=True, **FAST
    )
    assert fresh == rows and json.loads((results / name).read_text())["rows"]

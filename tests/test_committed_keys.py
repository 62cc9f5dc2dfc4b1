"""Guardrail: the committed results stay what they are.

Every result file and every weight file under ``results/`` is recomputed from today's code: the
profile's grid must name exactly the committed runs, each configuration must hash to the stored key,
its effective evaluation settings must equal the stored ones, and the weights the profile publishes
must be exactly the committed ``.safetensors`` files, each carrying its run's key. A refactoring of
the experiment layer that changed any key, name or setting fails here before it could mark the
committed results stale.
"""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from robustreg import study
from robustreg.study import PROFILES, cache, grid, store

ROOT = Path(__file__).resolve().parents[1] / "results"
DIRECTORIES = sorted(p.name for p in ROOT.iterdir() if p.is_dir() and any(p.glob("*.json")))


def _in_progress(directory: Path) -> bool:
    """A study still running commits its result files as they come, and says so in a file
    ``IN_PROGRESS``: then the committed runs must be some of the grid's, not all."""
    return (directory / "IN_PROGRESS").is_file()


def _selection(directory: Path):
    path = directory / "selection.json"
    return json.loads(path.read_text()) if path.is_file() else None


@pytest.mark.parametrize("profile", DIRECTORIES)
def test_every_committed_result_reproduces_its_key_and_settings(profile):
    directory = ROOT / profile
    selection = _selection(directory)
    configs = grid.grid(profile, selection=selection)
    by_name = {grid.result_name(c): c for c in configs}
    committed = {p.name for p in directory.glob("*.json") if "key" in json.loads(p.read_text())}
    if _in_progress(directory):
        assert committed <= set(by_name), committed - set(by_name)
        by_name = {n: c for n, c in by_name.items() if n in committed}
    else:
        assert set(by_name) == committed
    for name, config in by_name.items():
        stored = store.read_result(directory / name)
        assert cache.cache_key(config) == stored["key"], name
        assert cache.cache_key(stored["config"]) == stored["key"], name
        assert cache.normalize_config(config) == stored["config"], name
        assert grid.label(config) == stored["method"], name
        wanted = grid.run_eval_settings(PROFILES[profile], config, selection)
        if _in_progress(directory) and (
            store.ResultStore.gains_autoattack(stored, stored["key"], wanted)
            or store.ResultStore.missing_autoattack(stored, stored["key"], wanted)
        ):  # selected after its sweep evaluation, or evaluated before AutoAttack gained a norm:
            continue  # its AutoAttack is still to come
        assert wanted == stored["eval"], name


@pytest.mark.parametrize("profile", DIRECTORIES)
def test_every_published_weight_file_is_the_profiles_and_carries_its_key(profile):
    directory = ROOT / profile
    selection = _selection(directory)
    published = {
        grid.result_name(c)
        for c in grid.grid(profile, selection=selection)
        if grid.publishes_weights(profile, c, selection)
    }
    weights = {p.with_suffix(".json").name for p in directory.glob("*.safetensors")}
    published -= {  # a diverged training has no network to publish
        p.name for p in directory.glob("*.json") if json.loads(p.read_text()).get("diverged")
    }
    if _in_progress(directory):
        published &= {p.name for p in directory.glob("*.json")}
    assert weights == published
    for name in weights:
        with safe_open(str(directory / name.replace(".json", ".safetensors")), "pt") as f:
            key = (f.metadata() or {}).get("key")
        record = store.read_result(directory / name)
        assert key == record["key"], name
        model = store.load_model(directory / name)  # verifies label, layout and SHA-256
        assert study.weights.digest(model.state_dict()) == record["weights_sha256"], name

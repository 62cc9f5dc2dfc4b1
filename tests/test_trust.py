"""Trust what is loaded, refuse what is unsound (issue 23's probes of the experiment layer, each a
test): weights verified by content, result files checked before use, bounded processes."""

import copy
import json
import math
import multiprocessing
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from strategies import networks

from robustreg import attacks, geometry, models, regularizers, study, verification
from robustreg.__main__ import main as cli
from robustreg.study import cache, weights

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ROOT / "results" / "default"
SMALL = {"data": "digits", "model": {"name": "mlp", "hidden": [16]}, "epochs": 1, "lr": 3e-3}
FAST = dict(device="cpu", progress=False, epochs=1)
LIGHT = dict(
    FAST,
    eval={"n_test": 20, "n_certified": 0, "linf_eps": [0.1], "l2_eps": [], "steps": 2},
    lambdas={"curvature": [1.0]},
    adversarial=[],
)


@pytest.fixture
def published(tmp_path):
    """A copy of one published run (result file and weights) and of a second run's weights."""
    for name in ("plain_seed0", "curvature_lam10_seed0"):
        for suffix in (".json", ".safetensors"):
            shutil.copy(PUBLISHED / f"{name}{suffix}", tmp_path / f"{name}{suffix}")
    return tmp_path


def _flip(path: Path, offset_from_end: int, mask: int = 0xFF, count: int = 1) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):
        data[len(data) - offset_from_end - i] ^= mask
    path.write_bytes(bytes(data))


def test_published_model_loads_and_its_digest_is_recorded(published):
    record = study.read_result(published / "plain_seed0.json")
    model = study.load_model(published / "plain_seed0.json")
    assert weights.digest(model.state_dict()) == record["weights_sha256"]


@pytest.mark.parametrize("count, mask", [(64, 0xFF), (1, 0x01)], ids=["64 bytes", "one bit"])
def test_flipped_bytes_are_refused(published, count, mask):
    _flip(published / "plain_seed0.safetensors", 1000, mask, count)
    with pytest.raises(study.StaleResultError, match="SHA-256.*altered or damaged"):
        study.load_model(published / "plain_seed0.json")


def test_another_runs_weights_with_a_forged_key_are_refused(published):
    target = published / "plain_seed0.safetensors"
    key = study.read_result(published / "plain_seed0.json")["key"]
    other = load_file(str(published / "curvature_lam10_seed0.safetensors"))
    save_file(other, str(target), metadata={"key": key})
    with pytest.raises(study.StaleResultError, match="SHA-256"):
        study.load_model(published / "plain_seed0.json")


def test_an_edited_configuration_is_refused(published):
    path = published / "plain_seed0.json"
    record = json.loads(path.read_text())
    record["config"]["model"]["activation"] = "leaky_relu"
    path.write_text(json.dumps(record))
    with pytest.raises(study.StaleResultError, match="hashes to .* not to the stored key"):
        study.load_model(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"\x80\x04\x95pickle", struct.pack("<Q", 10**12) + b"{}", "truncate"],
    ids=["empty", "pickle", "huge header", "truncated"],
)
def test_a_file_that_is_not_safetensors_says_so(published, content):
    target = published / "plain_seed0.safetensors"
    if content == "truncate":
        target.write_bytes(target.read_bytes()[:-100])
        match = "truncated"
    else:
        target.write_bytes(content)
        match = "not a safetensors file"
    with pytest.raises(study.StaleResultError, match=match):
        study.load_model(published / "plain_seed0.json")


@pytest.mark.parametrize(
    "edit",
    [
        lambda r: r.update(input_shape=[10**10]),
        lambda r: r["config"]["model"].update(hidden=[10**6] * 3),
    ],
    ids=["input_shape 1e10", "hidden 1e6x3"],
)
def test_absurd_shapes_are_refused_before_anything_is_allocated(published, edit):
    path = published / "plain_seed0.json"
    record = json.loads(path.read_text())
    edit(record)
    # a consistent but absurd file: its key is its configuration's, its weights carry that key
    record["key"] = cache.cache_key(record["config"])
    state = load_file(str(published / "plain_seed0.safetensors"))
    save_file(state, str(published / "plain_seed0.safetensors"), metadata={"key": record["key"]})
    path.write_text(json.dumps(record))
    t0 = time.perf_counter()
    with pytest.raises(study.StaleResultError, match="does not hold the network"):
        study.load_model(path)
    assert time.perf_counter() - t0 < 30  # nothing of 10¹² parameters was allocated


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nested too deeply|not a valid result file"),
        ("[1, 2, 3]", "a JSON list, not an object"),
        ('{"name": "x"}', "field 'method' is missing"),
    ],
    ids=["nested", "list", "missing fields"],
)
def test_malformed_result_files_name_themselves(tmp_path, text, match):
    path = tmp_path / "plain_seed0.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        study.read_result(path)
    assert str(path) in str(err.value)


def test_missing_input_shape_is_named(published):
    path = published / "plain_seed0.json"
    record = json.loads(path.read_text())
    del record["input_shape"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="'input_shape' is missing"):
        study.load_model(path)


# --- the run cache ------------------------------------------------------------------------------


def test_a_swapped_cache_entry_is_never_published(tmp_path):
    a, b = {**SMALL, "seed": 0}, {**SMALL, "seed": 1}
    cache.train_cached(a, cache_dir=tmp_path, device="cpu", progress=False)
    cache.train_cached(b, cache_dir=tmp_path, device="cpu", progress=False)
    ka, kb = cache.cache_key(a), cache.cache_key(b)
    shutil.copy(tmp_path / f"{kb}.safetensors", tmp_path / f"{ka}.safetensors")
    with pytest.raises(weights.WeightsError, match=f"belongs to run '{kb}'.*delete"):
        cache.train_cached(a, cache_dir=tmp_path, device="cpu", progress=False)
    # relabelled: the content check still refuses it
    state = load_file(str(tmp_path / f"{kb}.safetensors"))
    save_file(state, str(tmp_path / f"{ka}.safetensors"), metadata={"key": ka})
    with pytest.raises(weights.WeightsError, match="SHA-256"):
        cache.train_cached(a, cache_dir=tmp_path, device="cpu", progress=False)


def test_a_cache_entry_without_a_digest_is_trained_again(tmp_path):
    _, first = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    meta = tmp_path / f"{first['key']}.json"
    record = json.loads(meta.read_text())
    del record["weights_sha256"]  # an entry written before entries carried it
    meta.write_text(json.dumps(record))
    _, again = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    assert again["cached"] is False and again["weights_sha256"] == first["weights_sha256"]


def test_a_complete_cache_on_a_read_only_file_system_is_usable(tmp_path, monkeypatch):
    cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)

    def read_only(self, *a, **k):
        raise OSError(30, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "unlink", read_only)
    _, record = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    assert record["cached"] is True


# --- bounded, well-behaved processes ------------------------------------------------------------


def test_jobs_are_capped_at_the_cores(tmp_path):
    cores = study.execute.available_cores()
    with pytest.warns(RuntimeWarning, match=f"jobs=1000 exceeds the {cores} cores"):
        rows = study.run_grid(
            "smoke", cache_dir=tmp_path, jobs=1000, evaluate_models=False, **LIGHT
        )
    assert len(rows) == 2


def _children(pid: int) -> set[int]:
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.add(int(stat.parent.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
def test_workers_die_with_their_killed_parent(tmp_path):
    argv = [sys.executable, "-m", "robustreg", "run-grid", "--profile", "smoke", "--jobs", "2"]
    argv += ["--epochs", "30", "--device", "cpu", "--quiet", "--no-eval"]
    argv += ["--cache-dir", str(tmp_path / "c")]
    parent = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        workers: set[int] = set()
        deadline = time.time() + 120
        # until both workers are training (each has written a checkpoint of its run)
        while time.time() < deadline and len(list((tmp_path / "c").glob("*.partial.pt"))) < 2:
            time.sleep(0.5)
        workers = {c for c in _children(parent.pid) if "resource_tracker" not in _cmdline(c)}
        assert len(workers) == 2, [_cmdline(w) for w in workers]
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    t0 = time.time()
    while time.time() - t0 < 5 and any(_alive(w) for w in workers):
        time.sleep(0.2)
    survivors = [w for w in workers if _alive(w)]
    for w in survivors:
        os.kill(w, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their killed parent by 5 s"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_shard_of_another_plan_is_refused(tmp_path):
    kw = dict(cache_dir=tmp_path / "c", results_dir=tmp_path / "r", **LIGHT)
    study.run_grid("smoke", shard="1/2", **kw)
    with pytest.raises(ValueError, match=r"split into 2 shards.*--shard I/2"):
        study.run_grid("smoke", shard="2/3", **kw)
    study.run_grid("smoke", shard="2/2", **kw)  # the plan's other shard completes the grid
    assert len(study.load_results(tmp_path / "r")) == 2  # plain and curvature


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "-1"], "-1 must be ≥ 0"),
        (["--seeds", str(2**32)], "must be ≥ 0 and ≤ 4294967295"),
        (["--jobs", "0"], "0 must be ≥ 1"),
        (["--epochs", "x"], "'x' is not an integer"),
    ],
)
def test_the_command_line_checks_ranges(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        cli(["run-grid", "--profile", "smoke", *argv])
    assert err.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "change, message",
    [
        ({"seeds": [-1]}, "seeds must be an integer ≥ 0, got -1"),
        ({"seeds": [2**32]}, "seeds must be at most 4294967295"),
        ({"epochs": 0}, "epochs must be a positive integer, got 0"),
        ({"lambdas": {"jacobian": [0.1]}}, "lambdas is 'jacobian'; valid: input_gradient"),
        ({"eval": {"steps": 0}}, "steps must be a positive integer, got 0"),
        ({"eval": {"stepz": 3}}, r"unknown settings \['stepz'\]"),
        ({"autoattack": {"eps": {"l3": 0.1}}}, "eps is 'l3'; valid: linf, l2"),
    ],
)
def test_a_bad_setting_is_an_error_when_the_profile_is_built(change, message):
    with pytest.raises(ValueError, match=message):
        study.PROFILES["smoke"].replace(**change)


# --- sound or refused: certificates, exact radii, time limits ---------------------------------


@settings(deadline=None)
@given(
    networks(max_batch=4),
    st.sampled_from([torch.float32, torch.float64]),
    st.sampled_from(["l2", "linf"]),
    st.integers(0, 2**31 - 1),
)
def test_no_attack_inside_a_certificate_changes_the_prediction(case, dtype, norm, seed):
    """certified_radius in any accepted dtype is the float64 certificate of the same weights, and
    PGD (two restarts, margin loss) inside 0.999·r never changes the prediction of the float64
    network (the function the certificate is about)."""
    model = copy.deepcopy(case.model).to(dtype)
    x = torch.sigmoid(case.x).to(dtype)  # in [0, 1], as the attack requires
    radius = geometry.certified_radius(model, x, norm)
    exact = copy.deepcopy(model).double()
    assert radius.dtype == torch.float64
    assert torch.equal(radius, geometry.certified_radius(exact, x.double(), norm))
    inside = torch.isfinite(radius) & (radius > 0)
    assume(bool(inside.any()))
    x64 = x.double()[inside]
    with torch.no_grad():
        c = exact(x64).argmax(1)
    gen = torch.Generator().manual_seed(seed)
    eps = 0.999 * radius[inside]
    adv = attacks.pgd(exact, x64, c, eps, norm, steps=20, restarts=2, generator=gen, loss="margin")
    with torch.no_grad():
        assert torch.equal(exact(adv).argmax(1), c)


def test_certificates_refuse_what_they_cannot_certify():
    torch.manual_seed(0)
    model = models.mlp(4, 3, hidden=(5,)).double()
    x = torch.rand(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float32 or float64"):
        geometry.certified_radius(model.half(), x.half())
    for bad in (math.inf, math.nan):
        with pytest.raises(ValueError, match="NaN or infinite values in 1 of 3 samples"):
            geometry.certified_radius(model.double(), torch.cat([x[:2], torch.full((1, 4), bad)]))
    empty = geometry.certified_radius(model.double(), x[:0])
    assert empty.shape == (0,) and empty.dtype == torch.float64
    with torch.device("meta"):
        ghost = models.mlp(4, 3, hidden=(5,))
    for fn in (geometry.certified_radius, verification.minimal_perturbation):
        with pytest.raises(ValueError, match="meta device"):
            fn(ghost, x.float())


@pytest.mark.parametrize("limit", [-1, 0, math.nan, math.inf, "5"])
def test_a_time_limit_must_be_a_positive_number(limit):
    model = models.mlp(4, 3, hidden=(5,)).double()
    with pytest.raises(ValueError, match="time_limit must be a positive finite number"):
        verification.minimal_perturbation(
            model, torch.rand(1, 4, dtype=torch.float64), time_limit=limit
        )


def test_an_exact_radius_out_of_time_is_an_error_and_leaves_no_process():
    """784-512-512-10 at a box of 0.1: a program with about a thousand binaries, which HiGHS does
    not finish in a second (nor answers to its own time limit inside presolve)."""
    torch.manual_seed(0)
    model = models.mlp(784, 10, hidden=(512, 512)).double()
    x = torch.rand(1, 784, dtype=torch.float64)
    before = set(multiprocessing.active_children())
    with pytest.raises(TimeoutError, match=r"time_limit=1 s .* binary"):
        verification.minimal_perturbation(model, x, radius=0.1, time_limit=1)
    assert set(multiprocessing.active_children()) <= before


@pytest.mark.parametrize(
    "name",
    [
        "input_gradient",
        "grad_align",
        "jacobian_frobenius",
        "curvature",
        "cross_lipschitz",
        "hessian_trace",
        "local_linearity",
        "mmr",
    ],
)
def test_regularizers_refuse_float16(name):
    """float16 made input_gradient 100 % wrong on its worst sample and grad_align 171×."""
    torch.manual_seed(0)
    model = models.mlp(4, 3, hidden=(5,)).half()
    x, y = torch.rand(3, 4).half(), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"float32 or float64\); got torch.float16"):
        regularizers.get(name)(model, x, y)


def test_an_exact_radius_of_a_nan_input_is_refused():
    model = models.mlp(4, 3, hidden=(5,)).double()
    x = torch.full((1, 4), math.nan, dtype=torch.float64)
    with pytest.raises(ValueError, match="NaN or infinite values in 1 of 1 samples"):
        verification.minimal_perturbation(model, x)


def test_each_command_computes_in_its_profiles_numeric_environment(tmp_path):
    """run-grid and masking-battery set the profile's environment before torch loads;
    reproduce-results the one its run's file records (portable when none, or no file)."""
    import argparse

    from robustreg.__main__ import _environment
    from robustreg.study.config import NUMERIC_ENVIRONMENTS

    portable, avx2 = NUMERIC_ENVIRONMENTS["portable"], NUMERIC_ENVIRONMENTS["avx2"]
    ns = argparse.Namespace
    assert _environment(ns(command="run-grid", profile="converged")) == avx2
    assert _environment(ns(command="masking-battery", profile="sweep")) == portable
    (tmp_path / "a_seed0.json").write_text(json.dumps({"machine": {"environment": avx2}}))
    (tmp_path / "b_seed0.json").write_text(json.dumps({"machine": {"environment": {}}}))
    older = {k: avx2[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")}  # before oneDNN's pin
    (tmp_path / "c_seed0.json").write_text(json.dumps({"machine": {"environment": older}}))
    reproduce = ns(command="reproduce-results", results_dir=str(tmp_path))
    assert _environment(ns(**vars(reproduce), runs=["a_seed0"])) == avx2
    assert _environment(ns(**vars(reproduce), runs=["b_seed0.json"])) == portable
    assert _environment(ns(**vars(reproduce), runs=["missing"])) == portable
    assert _environment(ns(**vars(reproduce), runs=["c_seed0"])) == avx2

"""The experiment layer loses nothing and mixes nothing (issue 10's probes, each a test)."""

import functools
import json
import math
import os
import shutil
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch

from robustreg import attacks, data, evaluation, files, models, regularizers, study, training
from robustreg.__main__ import main as cli
from robustreg.study import cache, provenance

ROOT = Path(__file__).resolve().parent.parent
DT = torch.float64
SMALL = {"data": "digits", "model": {"name": "mlp", "hidden": [16]}, "epochs": 2, "lr": 3e-3}
FAST = dict(device="cpu", progress=False, epochs=1)


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train", dtype=DT)


def fresh(seed=0):
    torch.manual_seed(seed)
    return models.mlp(64, 10, hidden=(16,)).to(DT)


# --- result files are never replaced by another configuration ---------------------------------


def test_smoke_grid_into_committed_results_replaces_nothing(tmp_path, capsys):
    """Measured: run-grid --profile smoke into a copy of results/default replaced 7 files."""
    committed = ROOT / "results" / "default"
    target = tmp_path / "results"
    target.mkdir()
    for name in ("plain_seed0.json", "input_gradient_lam0.3_seed0.json"):
        shutil.copy(committed / name, target / name)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(study.StaleResultError, match="plain_seed0.json.*--refresh"):
        study.run_grid("smoke", cache_dir=tmp_path / "cache", results_dir=target, **FAST)
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.suffix == ".json"} == before
    # the command line says so in a line, without a traceback, and exits 2
    argv = ["run-grid", "--profile", "smoke", "--results-dir", str(target), "--quiet"]
    assert cli([*argv, "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "plain_seed0.json" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.suffix == ".json"} == before


# --- checkpoints resume only their own run ------------------------------------------------------


def _interrupted(model, data_, ckpt, stop_after_batches, **kw):
    calls = {"n": 0}

    def reg(model, x, y):
        calls["n"] += 1
        if calls["n"] == stop_after_batches:
            raise Interrupt
        return model(x).pow(2).mean(1)

    with pytest.raises(Interrupt):
        training.train(model, data_, reg, 0.01, checkpoint=ckpt, **kw)


def test_finished_run_removes_its_checkpoint(digits, tmp_path):
    ckpt = tmp_path / "run.partial.pt"
    training.train(fresh(), digits, epochs=3, batch_size=256, checkpoint=ckpt, progress=False)
    assert not ckpt.exists()


def test_checkpoint_of_another_run_is_refused(digits, tmp_path):
    """Measured: a λ = 1 run resumed a plain run's checkpoint (three of its four epochs)."""
    ckpt = tmp_path / "run.partial.pt"
    kw = dict(epochs=4, batch_size=256, progress=False)
    _interrupted(fresh(), digits, ckpt, stop_after_batches=2 * 6 + 1, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    for other in (
        dict(regularizer="input_gradient", lam=1.0),  # another objective
        dict(lr=1e-2),  # another optimizer setting
        dict(seed=5),
    ):
        options = {**kw, **{k: v for k, v in other.items() if k not in ("regularizer", "lam")}}
        with pytest.raises(training.CheckpointMismatchError, match="another training run"):
            training.train(
                fresh(),
                digits,
                other.get("regularizer"),
                other.get("lam", 0.0),
                checkpoint=ckpt,
                **options,
            )
    with pytest.raises(training.CheckpointMismatchError):  # other data
        training.train(fresh(), (digits[0][:500], digits[1][:500]), checkpoint=ckpt, **kw)
    with pytest.raises(training.CheckpointMismatchError):  # other initial weights
        training.train(fresh(seed=1), digits, checkpoint=ckpt, **kw)
    assert ckpt.is_file()  # refused, not deleted


@pytest.mark.parametrize("garbage", [b"", b"not a checkpoint", None])
def test_corrupt_checkpoint_is_discarded_with_a_warning(digits, tmp_path, garbage):
    ckpt = tmp_path / "run.partial.pt"
    if garbage is None:  # a valid torch file that is not a training state
        torch.save({"weights": torch.zeros(3)}, ckpt)
    else:
        ckpt.write_bytes(garbage)
    kw = dict(epochs=2, batch_size=256, seed=3, progress=False)
    with pytest.warns(RuntimeWarning, match="corrupt checkpoint discarded"):
        model, _ = training.train(fresh(), digits, checkpoint=ckpt, **kw)
    clean, _ = training.train(fresh(), digits, **kw)
    for a, b in zip(model.parameters(), clean.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not ckpt.exists()


def test_cached_run_with_a_corrupt_partial_checkpoint_trains_afresh(tmp_path):
    key = cache.cache_key(SMALL)
    (tmp_path / f"{key}.partial.pt").write_bytes(b"\x80\x02truncated")
    with pytest.warns(RuntimeWarning, match="corrupt checkpoint"):
        _, record = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    assert record["cached"] is False and not (tmp_path / f"{key}.partial.pt").exists()


# --- the cache holds only what its configuration trains -----------------------------------------


def test_cache_cannot_be_fed_other_data(tmp_path, digits):
    """Measured: train_cached(config, data=20 samples) cached a model served for that config."""
    with pytest.raises(TypeError):
        cache.train_cached(
            SMALL, cache_dir=tmp_path, device="cpu", data=(digits[0][:20], digits[1][:20])
        )
    assert not list(tmp_path.glob("*.json"))


def test_corrupt_cache_entry_names_the_file(tmp_path):
    _, record = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    meta = tmp_path / f"{record['key']}.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(ValueError, match=f"{meta.name}.*not a valid cache entry.*delete"):
        cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)


def test_files_have_the_default_mode_and_leftovers_are_cleaned(tmp_path):
    old = os.umask(0o022)
    try:
        orphan = tmp_path / ".abc.json.x1y2.tmp"
        orphan.write_text("{")
        os.utime(orphan, (time.time() - 3600, time.time() - 3600))
        recent = tmp_path / ".def.json.z3.tmp"  # a concurrent writer's file: kept
        recent.write_text("{")
        _, record = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu", progress=False)
    finally:
        os.umask(old)
    assert not orphan.exists() and recent.exists()
    stale = tmp_path / f"{record['key']}.partial.pt"  # left by a run killed after its last write
    stale.write_bytes(b"old")
    assert cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu")[1]["cached"] is True
    assert not stale.exists()
    for suffix in (".json", ".safetensors"):
        mode = stat.S_IMODE((tmp_path / f"{record['key']}{suffix}").stat().st_mode)
        assert mode == 0o644, oct(mode)


# --- data are validated against the configuration -----------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y: (x, y.double()), "integer labels"),
        (
            lambda x, y: (x, torch.where(y == 9, 10, y)),
            r"label 10 is out of range.*\[0, 10\).*K = 10",
        ),
        (lambda x, y: (x * 255, y), r"\[0, 1\].*divide by 255"),
        (lambda x, y: (torch.where(torch.arange(len(x))[:, None] == 3, math.nan, x), y), "NaN"),
        (lambda x, y: (x[:10], y[:9]), "do not form a data set"),
        (lambda x, y: (x.long(), y), "floating"),
    ],
)
def test_train_validates_its_data(digits, change, message):
    x, y = digits
    x = x.flatten(1)
    with pytest.raises(ValueError, match=message):
        training.train(fresh(), change(x, y), epochs=1, progress=False)


# --- NaN is reported, never hidden --------------------------------------------------------------


def test_every_regularizer_gives_nan_for_a_sample_with_nan_logits(digits):
    model = fresh()
    x, y = digits[0][:4].flatten(1).clone(), digits[1][:4]
    x[1, 5] = math.nan
    gen = torch.Generator().manual_seed(0)
    estimators = {
        "jacobian_frobenius": {"n_proj": 2, "generator": gen},
        "cross_lipschitz": {"n_proj": 2, "generator": gen},
        "hessian_trace": {"n_samples": 2, "generator": gen},
    }
    for name in regularizers.names():
        for opts in ({}, estimators.get(name, {})):
            values = regularizers.get(name)(model, x, y, **opts)
            assert math.isnan(values[1].item()), (name, opts, values)
            assert torch.isfinite(values[[0, 2, 3]]).all(), (name, opts, values)


def test_attacks_and_metrics_reject_or_propagate_nan(digits):
    model = fresh()
    x, y = digits[0][:4].flatten(1).clone(), digits[1][:4]
    bad = x.clone()
    bad[2, 0] = math.nan
    for attack in (attacks.fgsm, attacks.pgd):
        with pytest.raises(ValueError, match="NaN or infinite values"):
            attack(model, bad, y, 0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        evaluation.accuracy(model, bad, y)
    broken = fresh()
    with torch.no_grad():
        broken[-1].bias[3] = math.nan
    assert math.isnan(evaluation.accuracy(broken, x, y))
    assert (evaluation.predict(broken, x) == -1).all()


def _cut_off_after_first_epoch(real):
    """training.train, interrupted at the first forward pass after its first checkpoint."""

    def train(model, *a, checkpoint=None, **k):
        def stop(module, args):
            if checkpoint is not None and Path(checkpoint).exists():
                raise Interrupt

        handle = model.register_forward_pre_hook(stop)
        try:
            return real(model, *a, checkpoint=checkpoint, **k)
        finally:
            handle.remove()

    return train


def test_a_run_cut_off_resumes_from_its_results_directory_in_a_new_clone(tmp_path, monkeypatch):
    """Measured: the runs in flight when a session ended lost their per-epoch state with the
    machine's run cache. A run trained for a results directory keeps it there (``.checkpoints/``),
    so a clone with an empty cache resumes it, and drops it when the run finishes; a checkpoint an
    earlier version left in the cache is moved there and resumed too."""
    real, starts = training.train, []

    def spy(model, *a, checkpoint=None, **k):  # where each training starts from
        starts.append((Path(checkpoint), Path(checkpoint).exists()))
        return real(model, *a, checkpoint=checkpoint, **k)

    res = tmp_path / "r"
    kw = dict(results_dir=res, progress=False, device="cpu", epochs=3, seeds=[0])
    monkeypatch.setattr(training, "train", _cut_off_after_first_epoch(real))
    with pytest.raises(Interrupt):
        study.run_grid("smoke", cache_dir=tmp_path / "c1", **kw)
    (saved,) = (res / ".checkpoints").glob("*.partial.pt")
    assert not list((tmp_path / "c1").glob("*.partial.pt"))
    monkeypatch.setattr(training, "train", spy)
    study.run_grid("smoke", cache_dir=tmp_path / "c2", **kw)  # a new clone: an empty cache
    assert starts[0] == (saved, True) and all(not resumed for _, resumed in starts[1:])
    # the result says the run was trained in two pieces, and by what (here: the same machine)
    resumed = [json.loads(f.read_text()) for f in sorted(res.glob("*.json"))]
    assert [len(r.get("resumed_by", [])) for r in resumed].count(2) == 1
    (key,) = (r["key"] for r in resumed if len(r.get("resumed_by", [])) == 2)
    assert saved == cache.partial_path(study.store.ResultStore(res).checkpoint_dir, key)
    (config,) = (r["config"] for r in resumed if r["key"] == key)
    assert saved == study.store.ResultStore(res).partial_path(config)
    assert not (res / ".checkpoints").exists() and not list((tmp_path / "c2").glob("*.pt"))
    again = tmp_path / "again"  # the same grid uninterrupted: the same result files
    study.run_grid("smoke", **{**kw, "results_dir": again}, cache_dir=tmp_path / "c3")
    for f in sorted(again.glob("*.json")):
        a, b = json.loads(f.read_text()), json.loads((res / f.name).read_text())
        assert a["key"] == b["key"] and a["rows"] == b["rows"]
    # a checkpoint left in the cache by an earlier version: moved beside the results, resumed
    monkeypatch.setattr(training, "train", _cut_off_after_first_epoch(real))
    with pytest.raises(Interrupt):
        study.run_grid("smoke", **{**kw, "results_dir": tmp_path / "r2"}, cache_dir=tmp_path / "c4")
    (saved,) = (tmp_path / "r2" / ".checkpoints").glob("*.partial.pt")
    (tmp_path / "c4").mkdir(exist_ok=True)
    shutil.move(saved, tmp_path / "c4" / saved.name)
    starts.clear()
    monkeypatch.setattr(training, "train", spy)
    other = {**provenance.machine(), "cpu": "another CPU"}  # resumed elsewhere: warned
    monkeypatch.setattr(provenance, "machine", lambda: other)
    with pytest.warns(RuntimeWarning, match="resumes under .*another CPU.*begun under"):
        study.run_grid("smoke", **{**kw, "results_dir": tmp_path / "r2"}, cache_dir=tmp_path / "c4")
    assert starts[0] == (saved, True)
    assert not (tmp_path / "c4" / saved.name).exists()


def test_a_pilot_run_cut_off_resumes_from_beside_its_run_file(tmp_path, monkeypatch):
    """The convergence pilots' runs keep their per-epoch state beside their run files too; the
    folder goes once its last run has finished."""
    from robustreg.study import convergence

    real, starts = training.train, []

    def spy(model, *a, checkpoint=None, **k):
        starts.append((Path(checkpoint), Path(checkpoint).exists()))
        return real(model, *a, checkpoint=checkpoint, **k)

    path = tmp_path / "pilot" / "plain_ep3.json"
    config = {**SMALL, "epochs": 3}
    monkeypatch.setattr(training, "train", _cut_off_after_first_epoch(real))
    with pytest.raises(Interrupt):
        convergence.train_run(config, path, cache_dir=tmp_path / "c1")
    (saved,) = (path.parent / ".checkpoints").glob("*.partial.pt")
    monkeypatch.setattr(training, "train", spy)
    out = convergence.train_run(config, path, cache_dir=tmp_path / "c2")
    assert starts == [(saved, True)] and len(out["history"]["loss"]) == 3
    assert not (path.parent / ".checkpoints").exists()


# --- Ctrl-C says what is saved ------------------------------------------------------------------


def test_ctrl_c_says_what_is_saved_and_how_to_resume(tmp_path, monkeypatch, capsys):
    real, calls = training.train, {"n": 0}

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train", interrupted)
    argv = ["run-grid", "--profile", "smoke", "--epochs", "1", "--device", "cpu", "--quiet"]
    rc = cli(argv + ["--cache-dir", str(tmp_path / "c"), "--results-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted: 1 of 7 runs finished" in err and "rerun the same command" in err
    assert [p.name for p in (tmp_path / "r").glob("*.json")] == ["plain_seed0.json"]


# --- shards and local processes reproduce the serial grid ---------------------------------------

#: Fields of a result file that measure the machine rather than the run.
VOLATILE = (
    "machine",
    "train_seconds",
    "eval_seconds",
    "eval_cpu_seconds",
    "autoattack_cpu_seconds",
)


def _comparable(directory: Path) -> dict[str, object]:
    out = {}
    for p in sorted(directory.iterdir()):
        if p.name == study.execute.SHARD_PLAN:  # how the directory was split, not a run
            continue
        if p.suffix == ".json":
            record = json.loads(p.read_text())
            for k in VOLATILE:
                record.pop(k)
            record["history"] = {
                k: v for k, v in record["history"].items() if k not in ("time", "cpu_time")
            }
            out[p.name] = record
        else:
            out[p.name] = p.read_bytes()
    return out


#: A light evaluation: the test is about files and bits, not about the metrics.
LIGHT = dict(
    FAST, eval={"n_test": 40, "n_certified": 5, "linf_eps": [0.1], "l2_eps": [0.5], "steps": 3}
)


def test_shards_and_jobs_reproduce_the_serial_grid(tmp_path):
    serial = tmp_path / "serial"
    rows = study.run_grid("smoke", cache_dir=tmp_path / "c1", results_dir=serial, **LIGHT)
    sharded = tmp_path / "sharded"
    for i in (1, 2, 3):  # the shards share the trained models (one cache), as on a cluster
        study.run_grid(
            "smoke", cache_dir=tmp_path / "c1", results_dir=sharded, shard=f"{i}/3", **LIGHT
        )
    parallel = tmp_path / "parallel"  # trains afresh in two worker processes
    rows_parallel = study.run_grid(
        "smoke", cache_dir=tmp_path / "c9", results_dir=parallel, jobs=2, **LIGHT
    )
    reference = _comparable(serial)
    assert len(reference) == 7 + 6  # result files + published weights
    assert _comparable(sharded) == reference
    assert _comparable(parallel) == reference
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(rows_parallel) == strip(rows)


def test_cluster_executor_reproduces_the_serial_grid_file_for_file(tmp_path):
    """``executor="slurm"`` submits through submitit; its local backend runs the same submission
    as processes on this machine, training afresh in each, and must write a serial run's files."""
    pytest.importorskip("submitit")
    serial = tmp_path / "serial"
    rows = study.run_grid("smoke", cache_dir=tmp_path / "c1", results_dir=serial, **LIGHT)
    local = tmp_path / "local"
    rows_local = study.run_grid(
        "smoke",
        cache_dir=tmp_path / "c2",
        results_dir=local,
        executor="local",
        executor_options={"timeout_min": 10},
        **LIGHT,
    )
    reference = _comparable(serial)
    assert len(reference) == 7 + 6  # the whole smoke grid: result files + published weights
    assert _comparable(local) == reference
    strip = lambda rs: [{k: v for k, v in r.items() if "seconds" not in k} for r in rs]
    assert strip(rows_local) == strip(rows)
    assert list((tmp_path / "c2" / "submitit").iterdir())  # submitit's job folders, in the cache


def test_bad_shard_and_jobs_are_named():
    with pytest.raises(ValueError, match="I/N"):
        study.run_grid("smoke", shard="2-3", **FAST)
    with pytest.raises(ValueError, match="1 ≤ I ≤ N"):
        study.run_grid("smoke", shard="4/3", **FAST)
    with pytest.raises(ValueError, match="jobs"):
        study.run_grid("smoke", jobs=0, **FAST)
    with pytest.raises(ValueError, match="unknown executor 'sge'; valid: serial, processes"):
        study.run_grid("smoke", executor="sge", **FAST)


# --- the I/O helpers ----------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.json"
    files.write_json(target, {"a": 1})

    def failing(tmp):
        Path(tmp).write_text("partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.atomic_write(target, failing)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert files.remove_leftovers(tmp_path / "missing") == []


def _iostream_error(tmp):
    Path(tmp).write_bytes(b"partial")
    raise RuntimeError("basic_ios::clear: iostream error")  # what torch.save says on a full disk


def test_a_full_disk_says_no_space_left_with_the_path(tmp_path, monkeypatch):
    """Simulated: a writer fails with little space left on the device."""
    target = tmp_path / "run.pt"
    monkeypatch.setattr(files.shutil, "disk_usage", lambda d: shutil._ntuple_diskusage(1, 1, 0))
    with pytest.raises(
        OSError, match=f"no space left on the device of {tmp_path} while writing run.pt"
    ):
        files.atomic_write(target, _iostream_error)
    assert list(tmp_path.iterdir()) == []


def test_an_error_with_space_left_is_passed_on_unchanged(tmp_path):
    with pytest.raises(RuntimeError, match="iostream error"):
        files.atomic_write(tmp_path / "run.pt", _iostream_error)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root and mount rights; skipped where they are missing)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_on_a_full_disk_says_no_space_left(tiny_disk):
    """Real: torch.save of a 4 MiB checkpoint into a 256 KiB file system."""
    state = {"w": torch.zeros(1 << 20)}
    with pytest.raises(OSError, match=f"no space left on the device of {tiny_disk}"):
        files.atomic_write(tiny_disk / "ckpt.pt", functools.partial(torch.save, state))
    assert list(tiny_disk.iterdir()) == []

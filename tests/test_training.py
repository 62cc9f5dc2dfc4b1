"""robustreg.training and the grid of robustreg.experiments: determinism, errors, cache, resume, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from robustreg import data, evaluation, models, regularizers, study, training
from robustreg.__main__ import main as cli
from robustreg.study import cache

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits():
    x, y = data.load("digits", "train", dtype=torch.float32)
    return x[:400], y[:400]


def fresh_model(seed=0, hidden=(16,)):
    torch.manual_seed(seed)
    return models.mlp(64, 10, hidden=hidden)


def params(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


# --- train ----------------------------------------------------------------------------------------


def test_same_seed_same_weights(digits):
    kw = dict(epochs=2, batch_size=64, seed=3, progress=False)
    m1, h1 = training.train(fresh_model(), digits, **kw)
    m2, h2 = training.train(fresh_model(), digits, **kw)
    assert same(params(m1), params(m2)) and h1.loss == h2.loss
    m3, _ = training.train(fresh_model(), digits, **{**kw, "seed": 4})
    assert not same(params(m1), params(m3))


def test_estimator_regularizer_is_deterministic_and_rng_untouched(digits):
    kw = dict(epochs=1, batch_size=64, seed=0, progress=False, n_proj=1)
    model = fresh_model()  # seeds the global generator: before the state is taken
    state = torch.get_rng_state()
    m1, _ = training.train(model, digits, "cross_lipschitz", 0.1, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    m2, _ = training.train(fresh_model(), digits, "cross_lipschitz", 0.1, **kw)
    assert same(params(m1), params(m2))


def test_history_and_final_state(digits):
    model, hist = training.train(fresh_model(), digits, epochs=3, lr=3e-3, progress=False)
    assert isinstance(hist, training.History)
    for series in (hist.loss, hist.ce, hist.reg, hist.accuracy, hist.time):
        assert len(series) == 3
    assert hist.reg == [0.0] * 3 and hist.loss == hist.ce
    assert hist.loss[-1] < hist.loss[0] and all(t > 0 for t in hist.time)
    assert math.isclose(hist.total_time, sum(hist.time))
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_regularized_loss_is_ce_plus_lambda_r(digits):
    """The history's loss is mean CE + λ·mean R, and a strong Jacobian penalty lowers R_J."""
    lam = 1.0
    model, hist = training.train(
        fresh_model(), digits, "jacobian_frobenius", lam, epochs=2, lr=3e-3, progress=False
    )
    for total, ce, reg in zip(hist.loss, hist.ce, hist.reg, strict=True):
        assert math.isclose(total, ce + lam * reg, rel_tol=1e-5)
    plain, _ = training.train(fresh_model(), digits, epochs=2, lr=3e-3, progress=False)
    x, y = digits
    r_reg = regularizers.jacobian_frobenius(model, x, y).mean()
    r_plain = regularizers.jacobian_frobenius(plain, x, y).mean()
    assert r_reg < 0.5 * r_plain


def test_callable_regularizer_and_shape_check(digits):
    def logit_energy(model, x, y):
        return model(x).pow(2).sum(1)

    _, hist = training.train(fresh_model(), digits, logit_energy, 1e-3, epochs=1, progress=False)
    assert hist.reg[0] > 0

    def scalar(model, x, y):
        return model(x).pow(2).sum()

    with pytest.raises(ValueError, match=r"regularizer 'scalar' returned shape \(\)"):
        training.train(fresh_model(), digits, scalar, 1.0, epochs=1, progress=False)


def test_non_finite_loss_names_epoch_batch_lambda(digits):
    calls = {"n": 0}

    def explodes(model, x, y):
        calls["n"] += 1
        v = model(x).pow(2).sum(1)
        return v * math.nan if calls["n"] == 9 else v  # batch 2 of epoch 2 (7 batches/epoch)

    with pytest.raises(FloatingPointError, match=r"epoch 2/3, batch 2/7.*λ=0\.5.*explodes"):
        training.train(
            fresh_model(), digits, explodes, 0.5, epochs=3, batch_size=64, progress=False
        )


def test_train_argument_errors(digits):
    m = fresh_model()
    with pytest.raises(ValueError, match="needs a regularizer"):
        training.train(m, digits, None, 1.0, progress=False)
    with pytest.raises(ValueError, match="unknown regularizer 'input_grad'"):
        training.train(m, digits, "input_grad", 1.0, progress=False)
    with pytest.raises(ValueError, match="given without a regularizer"):
        training.train(m, digits, n_proj=1, progress=False)
    with pytest.raises(ValueError, match="lam must be a finite number"):
        training.train(m, digits, "curvature", -1.0, progress=False)
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        training.train(m, digits, epochs=0, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer 'adamw'; valid: adam, sgd"):
        training.train(m, digits, optimizer="adamw", progress=False)
    with pytest.raises(ValueError, match="do not form a data set"):
        training.train(m, (digits[0], digits[1][:5]), progress=False)
    with pytest.raises(TypeError, match="pair"):
        training.train(m, digits[0], progress=False)


def test_sgd_and_adversarial_training(digits):
    model, hist = training.train(
        fresh_model(), digits, epochs=1, optimizer="sgd", lr=0.05, progress=False
    )
    assert len(hist.loss) == 1
    a1, h1 = training.adversarial_training(
        fresh_model(), digits, 0.1, steps=2, epochs=1, progress=False
    )
    a2, _ = training.adversarial_training(
        fresh_model(), digits, 0.1, steps=2, epochs=1, progress=False
    )
    assert same(params(a1), params(a2)) and not a1.training
    # the adversarial loss is the loss at the attacked points, above the clean loss
    x, y = digits
    with torch.no_grad():
        clean = F.cross_entropy(a1(x), y).item()
    assert h1.ce[0] > clean
    with pytest.raises(ValueError, match="unknown norm"):
        training.adversarial_training(fresh_model(), digits, 0.1, norm="l1", progress=False)


class Interrupt(Exception):
    pass


def test_checkpoint_resume_is_exact(digits, tmp_path):
    """Interrupt during epoch 3, resume from the epoch-2 checkpoint: same weights as no interrupt."""
    state = {"n": 0, "stop_at": None}

    def reg(model, x, y, generator=None):
        state["n"] += 1
        if state["stop_at"] is not None and state["n"] == state["stop_at"]:
            raise Interrupt
        noise = torch.rand(len(x), generator=generator)  # exercises the estimator generator
        return model(x).pow(2).mean(1) * noise

    kw = dict(epochs=4, batch_size=64, seed=1, progress=False)
    full, hfull = training.train(fresh_model(), digits, reg, 0.01, **kw)
    ckpt = tmp_path / "run.partial.pt"
    state.update(n=0, stop_at=2 * 7 + 3)
    with pytest.raises(Interrupt):
        training.train(fresh_model(), digits, reg, 0.01, checkpoint=ckpt, **kw)
    assert ckpt.is_file()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] == 2
    state.update(n=0, stop_at=None)
    resumed, hres = training.train(fresh_model(), digits, reg, 0.01, checkpoint=ckpt, **kw)
    assert state["n"] == 2 * 7  # only epochs 3 and 4 ran
    assert same(params(full), params(resumed))
    assert hres.loss == hfull.loss


def test_onecycle_schedule_and_validation_curve(digits, tmp_path):
    """One-cycle: the rate rises to lr and anneals far below it; the validation curve is the
    clean accuracy after each epoch and does not change the training; resuming is exact."""
    x_val, y_val = data.load("digits", "test", dtype=torch.float32)
    kw = dict(epochs=3, batch_size=64, lr=3e-3, seed=2, progress=False, schedule="onecycle")
    rates = []
    real_step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    torch.optim.Adam.step = spy
    try:
        m1, h1 = training.train(fresh_model(), digits, validation=(x_val, y_val), **kw)
    finally:
        torch.optim.Adam.step = real_step
    assert len(rates) == 3 * 7
    assert math.isclose(max(rates), 3e-3, rel_tol=1e-2) and rates[0] < 3e-3 / 20
    assert rates[-1] < 3e-3 / 1e3 and 0.2 * 21 <= rates.index(max(rates)) <= 0.4 * 21
    assert len(h1.val_accuracy) == 3
    assert h1.val_accuracy[-1] == evaluation.accuracy(m1, x_val, y_val)
    m2, h2 = training.train(fresh_model(), digits, **kw)  # no validation: same weights
    assert same(params(m1), params(m2)) and h2.val_accuracy == []
    assert "val_accuracy" not in h2.as_dict() and "val_accuracy" in h1.as_dict()
    m3, _ = training.train(fresh_model(), digits, **{**kw, "schedule": "constant"})
    assert not same(params(m1), params(m3))
    # interrupted during epoch 3, resumed: the schedule continues where it stood
    ckpt = tmp_path / "run.partial.pt"
    calls = {"n": 0, "stop_at": None}

    def reg(model, x, y):
        calls["n"] += 1
        if calls["n"] == calls["stop_at"]:
            raise Interrupt
        return model(x).pow(2).mean(1)

    full, _ = training.train(fresh_model(), digits, reg, 1e-3, **kw)
    calls.update(n=0, stop_at=2 * 7 + 3)
    with pytest.raises(Interrupt):
        training.train(fresh_model(), digits, reg, 1e-3, checkpoint=ckpt, **kw)
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2
    calls.update(n=0, stop_at=None)
    resumed, _ = training.train(fresh_model(), digits, reg, 1e-3, checkpoint=ckpt, **kw)
    assert calls["n"] == 7 and same(params(full), params(resumed))


def test_schedule_errors_name_the_valid_ones(digits):
    with pytest.raises(ValueError, match="unknown schedule 'cosine'; valid: constant, onecycle"):
        training.train(fresh_model(), digits, epochs=1, schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="unknown schedule"):
        cache.normalize_config({"schedule": "cosine"})
    with pytest.raises(ValueError, match="schedule is 'cosine'; valid: constant, onecycle"):
        study.config.profile("smoke", schedule="cosine")
    assert study.config.SCHEDULES == training.SCHEDULES
    # a constant schedule leaves the key of every earlier configuration as it was
    assert cache.cache_key({"schedule": "constant"}) == cache.cache_key({})
    assert cache.cache_key({"schedule": "onecycle"}) != cache.cache_key({})


# --- cached training ---------------------------------------------------------------------------

SMALL = {"data": "digits", "model": {"name": "mlp", "hidden": [16]}, "epochs": 2, "lr": 3e-3}


def test_train_cached_hit(tmp_path, digits):
    m1, r1 = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu")
    assert r1["cached"] is False
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [f"{r1['key']}.json", f"{r1['key']}.safetensors"]  # no temp or partial files
    m2, r2 = cache.train_cached(dict(SMALL), cache_dir=tmp_path, device="cpu")
    assert r2["cached"] is True  # loaded, not trained (no timing: CI machines are shared)
    assert same(params(m1), params(m2)) and r2["history"] == r1["history"]
    assert not m2.training
    # key: order/tuple-insensitive, sensitive to every setting, defaults filled in
    assert cache.cache_key(SMALL) == cache.cache_key(
        {**SMALL, "model": {"hidden": (16,), "name": "mlp"}, "seed": 0}
    )
    assert cache.cache_key(SMALL) != cache.cache_key({**SMALL, "lr": 1e-3})
    assert cache.cache_key(SMALL) == cache.cache_key(
        {**SMALL, "regularizer": "curvature", "lam": 0.0}  # λ = 0 is plain training
    )
    with pytest.raises(ValueError, match=r"unknown configuration keys \['epoch'\]"):
        cache.cache_key({**SMALL, "epoch": 3})


def test_train_cached_atomic(tmp_path, monkeypatch):
    """A crash while writing leaves no result behind; the next call trains again and succeeds."""
    from robustreg.study import weights  # the one weight path

    real = weights.save_file

    def crash(tensors, filename, *a, **k):
        with open(filename, "wb") as fh:
            fh.write(b"partial")
        raise Interrupt

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(Interrupt):
        cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu")
    assert not any(p.suffix in (".json", ".safetensors") for p in tmp_path.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temp file removed
    monkeypatch.setattr(weights, "save_file", real)
    _, record = cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu")
    assert record["cached"] is False
    assert cache.train_cached(SMALL, cache_dir=tmp_path, device="cpu")[1]["cached"] is True


def test_adversarial_config_is_kept(tmp_path):
    cfg = {**SMALL, "epochs": 1, "adversarial": {"eps": 0.1, "steps": 1}}
    _, record = cache.train_cached(cfg, cache_dir=tmp_path, device="cpu")
    assert record["config"]["adversarial"]["eps"] == 0.1
    assert (
        json.loads((tmp_path / f"{record['key']}.json").read_text())["config"] == record["config"]
    )


# --- the grid -----------------------------------------------------------------------------------


def test_grid_definition():
    configs = study.grid.grid("default")
    n_lams = sum(len(v) for v in study.PROFILES["default"].lambdas.values())
    assert len(configs) == 3 * (1 + n_lams + 1)
    labels = {study.grid.label(c) for c in configs}
    assert labels == {"plain", "adversarial", *regularizers.names()}
    assert len({cache.cache_key(c) for c in configs}) == len(configs)
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        study.grid.grid("fast")
    with pytest.raises(ValueError, match=r"unknown settings \['seed'\]"):
        study.grid.grid("smoke", seed=[1])


def test_run_grid_resumes_and_caches(tmp_path, monkeypatch):
    settings = dict(cache_dir=tmp_path, device="cpu", progress=False, epochs=1)
    n = len(study.grid.grid("smoke"))
    real = training.train
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise Interrupt
        return real(*a, **k)

    monkeypatch.setattr(training, "train", flaky)
    with pytest.raises(Interrupt):
        study.run_grid("smoke", evaluate_models=False, **settings)
    done = len(list(tmp_path.glob("*.json")))
    assert done == 2
    calls["n"] = -100  # no more failures
    rows = study.run_grid("smoke", evaluate_models=False, **settings)
    assert len(rows) == n and calls["n"] == -100 + (n - done)  # adversarial training too
    assert len(list(tmp_path.glob("*.json"))) == n


def test_run_grid_evaluates_and_cli(tmp_path, capsys, monkeypatch):
    out = tmp_path / "rows.csv"
    code = cli(
        [
            "run-grid",
            "--profile",
            "smoke",
            "--cache-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    frame = evaluation.to_frame(__import__("pandas").read_csv(out).to_dict("records"))
    n = len(study.grid.grid("smoke"))
    assert frame.key.nunique() == n
    metrics = set(frame.metric)
    assert {
        "clean_accuracy",
        "robust_accuracy",
        "median_certified_radius",
        "regularizer_mean",
    } <= metrics
    assert set(frame[frame.metric == "regularizer_mean"].regularizer) == set(regularizers.names())
    acc = frame[frame.metric.str.endswith("accuracy")].value
    assert ((acc >= 0) & (acc <= 1)).all()
    printed = capsys.readouterr().out
    assert "clean" in printed and "pgd-linf@0.1" in printed

    # second run: every model from the cache, nothing trained (no timing: CI machines are shared)
    def forbidden(*args, **kwargs):
        raise AssertionError("trained although the model is cached")

    monkeypatch.setattr(training, "train", forbidden)
    monkeypatch.setattr(training, "adversarial_training", forbidden)
    rows = study.run_grid("smoke", cache_dir=tmp_path, device="cpu", progress=False, epochs=1)
    assert len(rows) == len(frame)

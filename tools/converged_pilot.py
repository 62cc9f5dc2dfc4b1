"""The converged study's pilot (issue 22): how many epochs, and which λ ranges, on seed 0.

Two measurements on Fashion-MNIST (the "fit" split, validation curves on "val"), the MLP
784-256-256-10, Adam with a one-cycle schedule peaking at lr 3·10⁻³, batches of 128:

- ``epochs``: plain training, input gradient λ = 1, CURE λ = 10, GradAlign λ = 100, local
  linearity λ = 1, PGD-ℓ∞ (ε = 0.1) and PGD-ℓ2 (ε = 1.5) adversarial training, at E, 2E, 4E
  and 8E epochs (:data:`MULTIPLES`: plain training at E and 2E, local linearity at 2E and 4E,
  GradAlign at E, 2E and 4E, PGD-ℓ∞ also at 16E and at ε = 0.05 at 4E and 16E; the Jacobian λ = 0.1,
  cross-Lipschitz λ = 0.5 and Hessian trace λ = 1 at 2E and 8E): a method has converged
  at an epoch count when its final validation accuracy is within 0.3 points of the longer runs'
  (the plateau; :mod:`robustreg.study.convergence`).
- ``lambdas``: every regularizer of the sweep at decade-spaced λ, E epochs: the range from no
  measurable effect to more than eight points of clean validation accuracy lost, from which the
  sweep's √10-spaced grid is taken.
- ``plain-seeds``: plain training on seeds 1 and 2 at E, 2E and 4E (on seed 0 its validation
  accuracy fell by half a point from 15 to 60 epochs: is that a trend or noise?).
- ``lenet``: the LeNet of the headline comparison: plain and PGD-ℓ∞ training at E and 2E, CURE
  λ = 10 at E, 2E and 4E, CURE λ = 1 at E, 2E, 4E, 8E, 16E and 32E, λ = 100 at E (its epochs and
  CURE's λ range on a CNN), PGD-ℓ∞ at ε = 0.02 at 2E, 4E and 8E, at ε = 0.04 at 4E, 8E and 32E
  and at ε = 0.08 (its largest radius) at 4E, 8E, 16E and 32E, cross-Lipschitz at λ = 0.1 and 1
  at E and at λ = 0.1 at 2E and 8E.

Every run goes through the training cache (:func:`robustreg.study.train_cached`: an interrupted
pilot resumes, a finished run is loaded), and its record (configuration, history with the
validation curve, CPU seconds) is written to ``results/converged/pilot/<stage>/<name>.json``.
Runs go ``--jobs`` at a time, one thread each; a diverged run is recorded as such.

    python tools/converged_pilot.py [--stage epochs lambdas] [--epochs 15] [--jobs 2]
    python tools/converged_pilot.py --stage lenet --status   # done, in flight (epoch), not started
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "data": "fashion-mnist",
    "model": {"name": "mlp", "hidden": [256, 256]},
    "batch_size": 128,
    "lr": 3e-3,
    "schedule": "onecycle",
    "validation": True,
    "seed": 0,
}
ONE_DRAW = {
    "jacobian_frobenius": {"n_proj": 1},
    "cross_lipschitz": {"n_proj": 1},
    "hessian_trace": {"n_samples": 1},
}
EPOCH_RUNS = {
    "plain": {},
    "input_gradient_lam1": {"regularizer": "input_gradient", "lam": 1.0},
    "curvature_lam10": {"regularizer": "curvature", "lam": 10.0},
    "adversarial": {"adversarial": {"eps": 0.1, "norm": "linf", "steps": 7}},
    "adversarial-l2": {"adversarial": {"eps": 1.5, "norm": "l2", "steps": 7}},
    # the study trains PGD-ℓ∞ at every radius for 8E: at a middle radius, is 4E within 0.3 of 8E?
    "adversarial-eps0.05": {"adversarial": {"eps": 0.05, "norm": "linf", "steps": 7}},
    "grad_align_lam100": {"regularizer": "grad_align", "lam": 100.0},
    "local_linearity_lam1": {"regularizer": "local_linearity", "lam": 1.0},
    # the other gradient penalties near the target plain − 3 (seed 0's sweep): 30 and 120 epochs
    # beside the study's own 60-epoch run
    "jacobian_frobenius_lam0.1": {"regularizer": "jacobian_frobenius", "lam": 0.1},
    "cross_lipschitz_lam0.5": {"regularizer": "cross_lipschitz", "lam": 0.5},
    "hessian_trace_lam1": {"regularizer": "hessian_trace", "lam": 1.0},
}
#: The multiples of E each method is trained for: plain training's plateau is reached at E; the
#: study trains 4E (60 epochs), so the others are compared with 8E; local linearity (ten PGD steps
#: per batch) only at 2E and 4E; PGD-ℓ∞ training, which the study trains for 8E, also at 16E.
MULTIPLES = {
    "plain": (1, 2),
    "local_linearity_lam1": (2, 4),
    "adversarial": (1, 2, 4, 8, 16),
    # 8E: the study's own run on seed 0; it still gained 0.74 from 4E: 16E says whether it stops
    "adversarial-eps0.05": (4, 16),
    # falls from 2E to 4E and oscillates within the run: the study trains it for E
    "grad_align_lam100": (1, 2, 4),
    "jacobian_frobenius_lam0.1": (2, 8),
    "cross_lipschitz_lam0.5": (2, 8),
    "hessian_trace_lam1": (2, 8),
}
DECADES = {
    "input_gradient": [0.01, 0.1, 1.0, 10.0, 100.0],
    "jacobian_frobenius": [0.001, 0.01, 0.1, 1.0, 10.0],
    "cross_lipschitz": [0.005, 0.05, 0.5, 5.0, 50.0],
    "curvature": [1.0, 10.0, 100.0, 1000.0, 10000.0],
    "hessian_trace": [0.01, 0.1, 1.0, 10.0, 100.0],
    "grad_align": [0.01, 0.1, 1.0, 10.0, 100.0],
    "local_linearity": [0.01, 0.1, 1.0, 10.0, 100.0],
}


STAGES = ("epochs", "lambdas", "plain-seeds", "lenet")


def runs(stage: str, epochs: int) -> dict[str, dict]:
    """``{file name: configuration}`` of a stage."""
    out = {}
    if stage == "lenet":  # the CNN of the headline comparison: its epochs and CURE's λ range
        lenet = {**BASE, "model": {"name": "lenet"}}
        for m, name, extra in (
            (1, "plain", {}),
            (2, "plain", {}),
            (1, "adversarial", EPOCH_RUNS["adversarial"]),
            (2, "adversarial", EPOCH_RUNS["adversarial"]),
            *((m, "curvature_lam10", EPOCH_RUNS["curvature_lam10"]) for m in (1, 2, 4, 8)),
            # the half gaps of the study's other CURE weights at their 16E: the study trained
            # λ = 3 for 4E and 8E and λ = 10 for 8E before CURE's budget doubled (those runs'
            # records are kept here, from the study's result files of the time)
            *((m, "curvature_lam3", {"regularizer": "curvature", "lam": 3.0}) for m in (4, 8)),
            # CURE λ = 10 still gains 0.7 from 2E to 4E: near the weight the headline selects?
            # (λ = 1 gained 0.8 from E to 2E and 0.4 from 2E to 4E: 8E says whether 4E suffices;
            # it gained 0.6 more, so the study trained CURE for 8E: 16E says whether 8E suffices;
            # it gained 0.5 more, so the study trains CURE for 16E: 32E says whether 16E suffices)
            *(
                (m, "curvature_lam1", {"regularizer": "curvature", "lam": 1.0})
                for m in (2, 4, 8, 16, 32)
            ),
            # PGD-ℓ∞ training, radius by radius. At ε = 0.1 it still gains 1.8 points from E to
            # 2E: near the radius the headline selects (0.02), 2E beside 4E, then 8E (it gained
            # 0.7 from 2E to 4E and +0.28 from 4E to 8E: 4E sufficed there). The budget of a
            # baseline is piloted at its largest radius too (on the MLP the larger radius gained
            # more from longer training): the study trained ε = 0.04 and 0.08 for 4E (those runs
            # are kept here, from the training cache); 8E at 0.08 gained 1.28 points, so the
            # study trained PGD-ℓ∞ for 8E (ε = 0.04's run at 8E is kept here too); 16E gained
            # 0.44 more, so the study trains PGD-ℓ∞ for 16E, and 32E says whether 16E suffices.
            # The study's 16E run at ε = 0.04 gained 0.36 over 8E, so 32E at 0.04 as well: the
            # radius the headline selects lies between 0.04 and 0.08, and both ends are checked
            *(
                (
                    m,
                    f"adversarial-eps{eps:g}",
                    {"adversarial": {"eps": eps, "norm": "linf", "steps": 7}},
                )
                for eps, ms in ((0.02, (4, 2, 8)), (0.04, (4, 8, 32)), (0.08, (4, 8, 16, 32)))
                for m in ms
            ),
            # the cross-Lipschitz regularizer (the best of the paper's other four on the MLP at
            # plain − 3 under ℓ∞ attacks): where its λ range lies on the LeNet
            *(
                (1, f"cross_lipschitz_lam{lam:g}", {"regularizer": "cross_lipschitz", "lam": lam})
                for lam in (0.1, 1.0)
            ),
            # the headline trains it for 4E: 2E beside the study's own 4E run gives its half gap
            # (it gained 0.6 from 2E to 4E: 8E says whether 4E suffices; it does, +0.26)
            *(
                (m, "cross_lipschitz_lam0.1", {"regularizer": "cross_lipschitz", "lam": 0.1})
                for m in (2, 8)
            ),
        ):
            config = {**lenet, **extra, "epochs": m * epochs}
            if extra.get("regularizer") in ONE_DRAW:  # the study's one-draw estimators
                config["regularizer_options"] = dict(ONE_DRAW[extra["regularizer"]])
            out[f"lenet_{name}_ep{m * epochs}"] = config
        for lam in (1.0, 100.0):
            config = {**lenet, "regularizer": "curvature", "lam": lam, "epochs": epochs}
            out[f"lenet_curvature_lam{lam:g}_ep{epochs}"] = config
    elif stage == "plain-seeds":  # does plain training lose accuracy from E to 4E? seeds 1, 2
        for seed in (1, 2):
            for m in (1, 2, 4):
                out[f"plain_seed{seed}_ep{m * epochs}"] = {
                    **BASE,
                    "seed": seed,
                    "epochs": m * epochs,
                }
    elif stage == "epochs":
        for m in (1, 2, 4, 8, 16):
            for name, extra in EPOCH_RUNS.items():
                if m in MULTIPLES.get(name, (1, 2, 4, 8)):
                    config = {**BASE, **extra, "epochs": m * epochs}
                    if extra.get("regularizer"):
                        config["regularizer_options"] = dict(ONE_DRAW.get(extra["regularizer"], {}))
                    out[f"{name}_ep{m * epochs}"] = config
    else:
        for reg, lams in DECADES.items():
            for lam in lams:
                config = {**BASE, "regularizer": reg, "lam": lam, "epochs": epochs}
                config["regularizer_options"] = dict(ONE_DRAW.get(reg, {}))
                out[f"{reg}_lam{lam:g}"] = config
    return out


def run(name: str, config: dict, out: Path) -> str:
    import torch

    from robustreg.study import convergence

    torch.set_num_threads(1)
    if (out / f"{name}.json").is_file():
        return f"{name}: done before"
    record = convergence.train_run(config, out / f"{name}.json")
    if "diverged" in record:
        return f"{name}: diverged"
    hist = record["history"]
    val = hist["val_accuracy"]
    return f"{name}: val {val[-1]:.4f} (best {max(val):.4f}), {record['cpu_seconds']:.0f} CPU-s"


def status(name: str, config: dict, out: Path) -> str:
    """One run's state: its final validation accuracy, the epoch its per-epoch state has reached
    (``.checkpoints/``, by the training's cache key), or "not started"."""
    import torch

    from robustreg.study import store

    path, epochs = out / f"{name}.json", config["epochs"]
    if path.is_file():
        record = json.loads(path.read_text())
        if "diverged" in record:
            return f"{name}: diverged"
        return f"{name}: done, validation {100 * record['history']['val_accuracy'][-1]:.2f} %"
    partial = store.ResultStore(out).partial_path(config)
    if not partial.is_file():
        return f"{name}: not started ({epochs} epochs)"
    try:
        epoch = torch.load(partial, weights_only=True, map_location="cpu")["epoch"]
    except Exception as err:  # finished meanwhile, or not a checkpoint
        epoch = f"? ({type(err).__name__})"
    return f"{name}: epoch {epoch} of {epochs} ({partial.parent.name}/{partial.name})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", nargs="+", default=list(STAGES))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "converged" / "pilot")
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="these runs of the stages only, in this order"
    )
    parser.add_argument(
        "--status", action="store_true", help="say how far each run has got; train nothing"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # the study's numeric environment: the runs it shares with the pilot (same configuration, same
    # cache key) are then the ones it would have trained itself (torch loads in the workers)
    from robustreg.study.config import NUMERIC_ENVIRONMENTS, PROFILES

    for k, v in NUMERIC_ENVIRONMENTS[PROFILES["converged"].environment].items():
        os.environ.setdefault(k, v)
    todo = []
    for stage in args.stage:
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; valid: {', '.join(STAGES)}")
        todo += [(n, c, args.out / stage) for n, c in runs(stage, args.epochs).items()]
    if args.only:
        by_name = {job[0]: job for job in todo}
        unknown = sorted(set(args.only) - set(by_name))
        if unknown:
            parser.error(f"unknown runs {unknown}; valid: {', '.join(by_name)}")
        todo = [by_name[n] for n in args.only]
    if args.status:
        for job in todo:
            print(status(*job))
        return 0
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run, *job) for job in todo]
        for i, fut in enumerate(as_completed(futures), 1):
            print(f"[{i}/{len(todo)}] {fut.result()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

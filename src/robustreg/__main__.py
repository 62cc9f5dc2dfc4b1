"""Command line: ``python -m robustreg run-grid --profile smoke|default|full``.

Runs the experiment grid of a profile (:data:`robustreg.study.config.PROFILES`) outside Jupyter (e.g. on a
GPU machine): every configuration is trained or loaded from the cache, evaluated (also cached),
and the tidy result rows are written to ``--out`` (``.csv`` or ``.json``). Interrupt it at any
time; rerunning the same command resumes. The device is CUDA, then MPS, then the CPU unless
``--device`` says otherwise. ``--results-dir results/default`` also keeps (and reuses) one small
JSON file of metrics per run there — the files the book commits. A file of another configuration
is never overwritten: the run stops and names it. To recompute them from scratch, point the cache
at an empty directory and add ``--refresh``::

    ROBUSTREG_CACHE=$(mktemp -d) python -m robustreg run-grid --profile default \
        --results-dir results/default --refresh

``--executor slurm`` submits one Slurm job per run through submitit (``--executor local``: the same
through submitit's local backend); ``--jobs N`` runs N local processes; ``--shard I/N`` runs one of
N parts for any other scheduler's job array. All write the files of a serial run.

``python -m robustreg reproduce-results results/default plain_seed0 ...`` retrains committed runs
and compares every metric with its file, within a tolerance derived from the seed-to-seed spread
(:func:`robustreg.study.reproduce.check_reproduction`); it exits 1 when one differs.

A matched-strength profile (``--profile sweep``) runs the study's stages and, last, its masking
battery. ``python -m robustreg masking-battery --profile sweep --results-dir results/sweep`` runs
only the gradient-masking checks (:mod:`robustreg.study.battery`) on a study's published models, one file
per model in ``results/sweep/masking/``; it resumes too.

``python -m robustreg data NAME...`` loads data sets (verifying their checksums) and prints
their shapes — a quick check that the files are where the loader looks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from robustreg.study.config import NUMERIC_ENVIRONMENTS, PROFILES  # plain data: no torch yet

# The package is imported inside the commands, not at the top: PORTABLE_ENVIRONMENT must be set
# before torch loads.


#: The executors of run-grid (robustreg.study.execute.EXECUTORS, named here before torch loads).
EXECUTORS = ("serial", "processes", "slurm", "local")


def _run_grid(args) -> int:
    import torch

    from robustreg import evaluation, files, training
    from robustreg.study import cache, execute, grid, matched

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else training.default_device()
    executor = args.executor or ("processes" if args.jobs > 1 else "serial")
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    n = len(grid.grid(args.profile, **overrides))
    shard = f", shard {args.shard}" if args.shard else ""
    print(
        f"profile {args.profile}: {n} training runs{shard} on {device}, executor {executor}; cache "
        f"{args.cache_dir or cache.default_cache_dir()}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    kwargs = dict(
        cache_dir=args.cache_dir,
        refresh=args.refresh,
        device=device,
        progress=not args.quiet,
        shard=args.shard,
        jobs=args.jobs,
        executor=executor,
        **overrides,
    )
    if PROFILES[args.profile].study is not None:  # the matched-strength study
        if args.no_eval or not args.results_dir:
            print("a matched-strength profile needs --results-dir and evaluation", file=sys.stderr)
            return 2
        rows, selection = matched.run_study(args.profile, results_dir=args.results_dir, **kwargs)
        for reg, targets in selection["lambdas"].items():
            chosen = ", ".join(f"−{t} pts: λ = {e['lam']}" for t, e in targets.items())
            print(f"selected {reg}: {chosen}", file=sys.stderr)
        if args.shard:  # the battery needs every published model: one process runs it at the end
            print(
                "the masking battery runs when the grid is complete: rerun without --shard, or "
                "run `python -m robustreg masking-battery` with --shard I/N",
                file=sys.stderr,
            )
        else:  # stage 4: the gradient-masking battery on the published models
            from robustreg.study import battery

            battery.run_battery(
                args.profile,
                args.results_dir,
                refresh=args.refresh,
                progress=not args.quiet,
                device=device,
                **overrides,
            )
    else:
        rows = execute.run_grid(
            args.profile,
            results_dir=args.results_dir,
            evaluate_models=not args.no_eval,
            **kwargs,
        )
    seconds = time.perf_counter() - t0
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".json":
            meta = {
                "profile": args.profile,
                "device": str(device),
                "seconds": seconds,
                "torch": torch.__version__,
            }
            files.write_json(out, {"meta": meta, "rows": rows})
        else:
            files.atomic_write(out, lambda tmp: evaluation.to_frame(rows).to_csv(tmp, index=False))
        print(f"wrote {len(rows)} rows to {out}", file=sys.stderr)
    if not args.no_eval:
        frame = evaluation.to_frame(rows)
        acc = frame[frame.metric.isin(["clean_accuracy", "robust_accuracy"])].copy()
        acc["column"] = acc.apply(
            lambda r: "clean" if r.metric == "clean_accuracy" else f"{r.attack}-{r.norm}@{r.eps:g}",
            axis=1,
        )
        table = acc.pivot_table(
            index=["method", "lam"], columns="column", values="value", aggfunc="mean"
        )
        print(table.round(3).to_string())
    print(f"done in {seconds:.1f} s", file=sys.stderr)
    return 0


def _reproduce(args) -> int:
    import torch

    from robustreg.study import reproduce

    torch.set_num_threads(args.threads)
    rows = reproduce.check_reproduction(
        args.results_dir, args.runs, fraction=args.fraction, progress=not args.quiet
    )
    width = max(len(r["metric"]) for r in rows)
    for r in rows:
        mark = "ok  " if r["ok"] else "DIFF"
        print(
            f"{mark} {r['run']:<34} {r['metric']:<{width}} stored {r['stored']:.6g}  "
            f"recomputed {r['recomputed']:.6g}  |diff| {abs(r['recomputed'] - r['stored']):.2g}"
            f" ≤ {r['tolerance']:.2g}"
        )
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} metrics reproduce within their tolerance")
    return 1 if bad else 0


def _masking_battery(args) -> int:
    import torch

    from robustreg.study import battery

    torch.set_num_threads(args.threads)
    results = battery.run_battery(
        args.profile,
        args.results_dir,
        refresh=args.refresh,
        progress=not args.quiet,
        device=args.device or "cpu",
        shard=args.shard,
    )
    for name, result in results.items():
        v = result["verdict"]
        print(f"{name:42s} {'; '.join(v['signs']) if v['masking'] else 'no sign of masking'}")
    return 0


def _data(args) -> int:
    from robustreg import data

    for name in args.names:
        for split in data.SPLITS:
            x, y = data.load(name, split)
            print(
                f"{name:14s} {split:5s} x {tuple(x.shape)} in [{x.min():.3g}, {x.max():.3g}], "
                f"{int(y.max()) + 1} classes"
            )
    return 0


#: The numeric environment of the committed runs: ATen's portable kernels and Intel MKL's
#: conditional numerical reproducibility make a training bitwise identical on every x86-64 CPU
#: (one thread). Both are read when torch loads, so they are set before it is imported. A profile
#: may name another (:data:`robustreg.study.config.NUMERIC_ENVIRONMENTS`).
PORTABLE_ENVIRONMENT = NUMERIC_ENVIRONMENTS["portable"]


def _environment(args) -> dict[str, str]:
    """The numeric environment a command computes in: its profile's, or for reproduce-results the
    one its first run's file records (portable when it records none)."""
    if args.command != "reproduce-results":
        return NUMERIC_ENVIRONMENTS[PROFILES[args.profile].environment]
    path = Path(args.results_dir) / f"{args.runs[0].removesuffix('.json')}.json"
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))["machine"]["environment"]
    except (OSError, ValueError, KeyError, TypeError):
        return PORTABLE_ENVIRONMENT  # check_reproduction names a missing file
    for env in NUMERIC_ENVIRONMENTS.values():  # files before oneDNN was pinned record two
        if recorded and all(recorded.get(k) == env[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR")):
            return env
    return PORTABLE_ENVIRONMENT


def _count(minimum: int, maximum: int | None = None):
    """An argparse type: an integer in [minimum, maximum], else a message naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum or (maximum is not None and value > maximum):
            upper = f" and ≤ {maximum}" if maximum is not None else ""
            raise argparse.ArgumentTypeError(f"{value} must be ≥ {minimum}{upper}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m robustreg", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("run-grid", help="train and evaluate the experiment grid of a profile")
    g.add_argument("--profile", choices=list(PROFILES), default="default")
    g.add_argument(
        "--cache-dir",
        default=None,
        help="cache directory (default: $ROBUSTREG_CACHE or ~/.cache/robustreg/runs)",
    )
    g.add_argument(
        "--results-dir",
        default=None,
        help="keep one JSON file of metrics per run here and reuse it (e.g. results/default)",
    )
    g.add_argument(
        "--refresh", action="store_true", help="ignore the files of --results-dir and rewrite them"
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: automatic)")
    g.add_argument(
        "--seeds", type=_count(0, 2**32 - 1), nargs="+", default=None, help="override the seeds"
    )
    g.add_argument("--epochs", type=_count(1), default=None, help="override the number of epochs")
    g.add_argument("--threads", type=_count(1), default=None, help="torch.set_num_threads")
    g.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="run every N-th configuration from the I-th (1 ≤ I ≤ N): one job of an array",
    )
    g.add_argument(
        "--jobs", type=_count(1), default=1, help="local worker processes (default 1; joblib)"
    )
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default=None,
        help="serial, processes (--jobs), slurm (one Slurm job per run, submitit) or local "
        "(submitit's local backend); default: processes with --jobs > 1, else serial",
    )
    g.add_argument("--out", default=None, help="write the result rows to this .csv or .json")
    g.add_argument("--no-eval", action="store_true", help="train only")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    g.set_defaults(func=_run_grid)
    v = sub.add_parser("reproduce-results", help="retrain committed runs and compare their metrics")
    v.add_argument("results_dir", help="a directory of result files, e.g. results/default")
    v.add_argument("runs", nargs="+", help="result file stems, e.g. plain_seed0")
    v.add_argument(
        "--fraction",
        type=float,
        default=1.0,
        help="tolerance as a fraction of the seed-to-seed standard deviation (default 1)",
    )
    v.add_argument("--threads", type=_count(1), default=1, help="torch.set_num_threads (default 1)")
    v.add_argument("--quiet", action="store_true", help="no progress bars")
    v.set_defaults(func=_reproduce)
    m = sub.add_parser(
        "masking-battery", help="the gradient-masking checks on a study's published models"
    )
    m.add_argument("--profile", choices=[k for k, v in PROFILES.items() if v.study], required=True)
    m.add_argument("--results-dir", required=True, help="the study's results, e.g. results/sweep")
    m.add_argument("--refresh", action="store_true", help="recompute and replace existing files")
    m.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, mps")
    m.add_argument("--threads", type=_count(1), default=1, help="torch.set_num_threads (default 1)")
    m.add_argument(
        "--shard", default=None, metavar="I/N", help="every N-th model from the I-th (1 ≤ I ≤ N)"
    )
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_masking_battery)
    d = sub.add_parser("data", help="load data sets and print their shapes")
    d.add_argument("names", nargs="+")
    d.set_defaults(func=_data)
    args = parser.parse_args(argv)
    if args.command in ("run-grid", "reproduce-results", "masking-battery"):
        wanted = _environment(args)
        if "torch" not in sys.modules:
            for k, v in wanted.items():
                os.environ.setdefault(k, v)
        elif any(os.environ.get(k) != v for k, v in wanted.items()):
            print(
                f"note: torch is already loaded; the numeric environment {wanted} is not in effect",
                file=sys.stderr,
            )
    from robustreg.study import matched, store  # after the numeric environment is set

    try:
        return args.func(args)
    except (store.StaleResultError, matched.StaleSelectionError) as err:
        print(f"error: {err}", file=sys.stderr)  # a file to delete or refresh: no traceback
        return 2
    except KeyboardInterrupt:  # what is saved was said where it happened
        return 130


if __name__ == "__main__":
    sys.exit(main())

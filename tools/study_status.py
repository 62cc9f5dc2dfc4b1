"""Where a study stands: runs finished of its grid, CPU time spent per stage, what is left.

    python tools/study_status.py [--profile converged] [--results-dir results/converged]

Reads the result files only (nothing is trained or attacked): the study's stage and runs done
(:func:`robustreg.study.matched.progress`: a run counts when its result file is complete, a
selected run still waiting for its AutoAttack does not) and, per method, the runs done, their
training CPU-seconds (the sum of the per-epoch process times in the history), evaluation and
AutoAttack CPU-seconds, and the runs of the grid still missing (before the selection, the grid
without the selected λ); last, the runs cut off or still training, with the epoch their
per-epoch state in ``.checkpoints/`` has reached, and any state there of no run still to finish
(a finished run's, or one the grid no longer has).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="converged")
    parser.add_argument("--results-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from robustreg.study import grid, matched, store

    results = args.results_dir or ROOT / "results" / args.profile
    status = matched.progress(args.profile, results)
    selection = status["selection"]
    done = {r["name"]: r for r in status["records"]}
    checkpoints = store.ResultStore(results).checkpoint_dir
    in_flight = []  # (result file, epoch reached, epochs)
    planned_partials = set()  # the checkpoint names of the runs still to finish
    table = defaultdict(
        lambda: {"done": 0, "left": 0, "train": 0.0, "eval": 0.0, "aa": 0.0, "diverged": 0}
    )
    for config in grid.grid(args.profile, selection=selection):
        row = table[grid.label(config)]
        record = done.get(grid.result_name(config))
        if record is None:
            row["left"] += 1
            partial = store.ResultStore(results).partial_path(config)
            planned_partials.add(partial.name)
            if partial.is_file():
                try:
                    state = torch.load(partial, weights_only=True, map_location="cpu")
                    epoch = state["epoch"]
                except Exception as err:  # finished meanwhile, or not a checkpoint
                    epoch = f"? ({type(err).__name__})"
                in_flight.append((grid.result_name(config), epoch, config["epochs"]))
            continue
        row["done"] += 1
        row["diverged"] += bool(record.get("diverged"))
        row["train"] += sum(record.get("history", {}).get("cpu_time") or [])
        row["eval"] += record.get("eval_cpu_seconds") or 0.0
        row["aa"] += record.get("autoattack_cpu_seconds") or 0.0  # recorded since issue 22
    print(
        f"{args.profile}: stage {status['stage']}, {status['done']} of {status['planned']} runs "
        "done" + ("" if selection else " (before the selection)")
    )
    print(
        f"{'method':24s} {'done':>5s} {'left':>5s} {'train CPU-h':>12s} {'eval CPU-h':>11s}"
        f" {'of which AA':>12s}"
    )
    for method, r in table.items():
        flag = f"  ({r['diverged']} diverged)" if r["diverged"] else ""
        print(
            f"{method:24s} {r['done']:5d} {r['left']:5d} {r['train'] / 3600:12.2f} "
            f"{r['eval'] / 3600:11.2f} {r['aa'] / 3600:12.2f}{flag}"
        )
    train, evaluation, aa = (
        sum(r[k] for r in table.values()) / 3600 for k in ("train", "eval", "aa")
    )
    print(f"{'total':24s} {'':5s} {'':5s} {train:12.2f} {evaluation:11.2f} {aa:12.2f}")
    for name, epoch, epochs in in_flight:
        print(f"in flight: {name} at epoch {epoch} of {epochs} ({checkpoints.name}/)")
    for orphan in sorted(checkpoints.glob("*.partial.pt")):
        if orphan.name not in planned_partials:
            print(
                f"left over: {checkpoints.name}/{orphan.name} is no run still to finish; delete it"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())

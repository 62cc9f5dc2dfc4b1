"""Square from further random starts on published models of a study (a check of gradient masking
stronger than the battery's single Square run; ``robustreg.study.battery.square_restarts``).

On the test images each model's per-image worst case (PGD and AutoAttack) left standing at the
study's AutoAttack radius, Square with the battery's queries from the starts
``robustreg.study.battery.STARTS``; kept in ``<results_dir>/square_restarts.json`` (one entry per
model, written after each: an interrupted run resumes).

    python tools/square_restarts.py --profile converged results/converged \\
        local_linearity_lam0.391_seed0.json adversarial-eps0.0671_seed0.json
"""

import argparse
import sys
from pathlib import Path

import torch

from robustreg.study import battery


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profile", required=True)
    parser.add_argument("--norm", default="linf")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("models", nargs="+", help="result file names of published models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for model in args.models:  # one at a time: each is written as soon as it is done
        entry = battery.square_restarts(args.profile, args.results_dir, [model], norm=args.norm)
        r = entry[model]
        print(
            f"{model}: Square from starts {r['settings']['starts']} broke {r['broken']} of the "
            f"{r['white_box']} images the worst case left ({r['cpu_seconds']:.0f} CPU-s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cross-check the study's AutoAttack against a second implementation, on published models.

For each published model of a results directory (``<stem>.safetensors`` beside its result file,
loaded with ``robustreg.study.load_model``) and each AutoAttack radius of its result file,
runs ART's AutoAttack (``robustreg.art_attacks.art_autoattack``: APGD-CE and APGD-DLR, 100 iterations
each, then Square with 1,000 queries; written independently of torchattacks) on the same test
images and compares its robust accuracy with the stored one of the standard AutoAttack
(torchattacks' components). Writes ``<results_dir>/crosscheck.json`` (atomically; models already
in it are skipped, so an interrupted run resumes) and prints a line per model and radius.

    python tools/crosscheck_autoattack.py results/sweep --stems plain_seed0 adversarial_seed0
"""

import argparse
import sys
from pathlib import Path

import torch

from robustreg import art_attacks, data, evaluation, files, study

AGREEMENT = 0.01  # the criterion: within one point


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results_dir")
    parser.add_argument("--stems", nargs="*", default=None, help="result stems (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = Path(args.results_dir)
    out_path = results / "crosscheck.json"
    done = files.read_json(out_path, "cross-check file", "delete it") if out_path.is_file() else {}
    stems = args.stems or sorted(p.stem for p in results.glob("*.safetensors"))
    worst = 0.0
    for stem in stems:
        record = study.read_result(results / f"{stem}.json")
        model = study.load_model(results / f"{stem}.json")
        settings = record["eval"]
        x, y = data.load(record["config"]["data"], "test")
        n = settings["n_test"] if settings.get("autoattack_n") is None else settings["autoattack_n"]
        x, y = x[:n], y[:n]
        for norm, eps in (settings.get("autoattack_eps") or {}).items():
            key = f"{stem} {norm} {eps:g}"
            if key not in done:
                stored = evaluation.find_row(
                    record["rows"], attack="autoattack", norm=norm, eps=eps
                )
                x_adv = art_attacks.art_autoattack(model, x, y, eps, norm, seed=0, version="light")
                art = evaluation.predict(model, x_adv) == y
                ours = evaluation.parse_flags(stored["flags"])
                done[key] = {
                    "torchattacks_standard": float(ours.double().mean()),
                    "art_light": float(art.double().mean()),
                    "both": float((ours & art).double().mean()),
                    "art_only_breaks": int((ours & ~art).sum()),
                    "n": int(n),
                }
                files.write_json(out_path, done)
            r = done[key]
            diff = r["art_light"] - r["torchattacks_standard"]
            worst = max(worst, -diff)
            print(
                f"{key:36s} standard AA {100 * r['torchattacks_standard']:5.1f}%  "
                f"ART {100 * r['art_light']:5.1f}%  ART breaks {r['art_only_breaks']} more",
                flush=True,
            )
    print(f"ART below the standard AutoAttack by at most {100 * worst:.1f} points")
    return 0 if worst <= AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(main())

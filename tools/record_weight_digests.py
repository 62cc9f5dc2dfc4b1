"""Record the SHA-256 of published weights in result files written before results carried it.

    python tools/record_weight_digests.py results/default results/sweep

For every ``<run>.safetensors`` beside a ``<run>.json`` that lacks ``weights_sha256``, the file's
label must already be the run's key; the digest of its tensors
(:func:`robustreg.study.weights.digest`) is then written into the result file (atomically).
From then on :func:`robustreg.study.load_model` refuses weights whose content differs. Run it only
on weights you trust (e.g. as committed): it records what is there.
"""

import argparse
import sys
from pathlib import Path

from robustreg import files
from robustreg.study import store, weights


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directories", nargs="+")
    args = parser.parse_args(argv)
    for directory in map(Path, args.directories):
        for weight_file in sorted(directory.glob("*.safetensors")):
            path = weight_file.with_suffix(".json")
            record = store.read_result(path)
            if "weights_sha256" in record:
                continue
            state = weights.read_weights(weight_file, record["key"], sha256=None)
            record["weights_sha256"] = weights.digest(state)
            files.write_json(path, record)
            print(f"{path}: weights_sha256 {record['weights_sha256'][:16]}…", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

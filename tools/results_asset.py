"""Write this edition's results asset (results/ as a reproducible .tar.gz) and print its SHA-256.

    python tools/results_asset.py [OUT]     # default: _build/results-<version>.tar.gz

For a release: attach the file to the release named in robustreg.study.release.RESULTS_ASSET and
set that entry's sha256 to the printed value (the same files always give the same bytes).
"""

import sys
from pathlib import Path

import robustreg
from robustreg.study import release

ROOT = Path(__file__).resolve().parent.parent

out = (
    Path(sys.argv[1])
    if len(sys.argv) > 1
    else ROOT / "_build" / f"results-{robustreg.__version__}.tar.gz"
)
sha256 = release.build_asset(ROOT / "results", out)
print(f"{out}  sha256 {sha256}")

"""Rerun every chapter as readers do: default profile at seeds 1–5, full profile once (`make reruns`).

Each run is a papermill execution into `_build/reruns/` (the committed notebooks are untouched);
a run passes when the notebook completes, i.e. every check it asserts holds for that seed and
profile (at the smoke profile, chapter 12 once more with the parameters of
:data:`EXTRA_SMOKE`). Prints one line per run with its wall time and a summary; exits 1 if any run
failed.
Runs go two at a time (the chapters use one or two threads).

    python tools/reruns.py                 # everything
    python tools/reruns.py --seeds 1 2 --profiles default --chapters 05 07
    python tools/reruns.py --profiles smoke --seeds 1 --out _build/smoke   # `make smoke`

The environment passes to the runs (``ROBUSTREG_THREADS=1`` gives each chapter one thread).
"""

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chapters import ROOT, chapter_notebooks  # noqa: E402

NEEDS_RESULTS: dict = {}  # every full profile reads committed results


EXTRA_SMOKE: dict = {}  # further smoke runs with other parameters

#: Chapters whose runs take several times the others' (08: exact radii by MILP; 12: a study and
#: its masking battery): started first.
LONGEST = ("08_", "12_")
# A kernel that dies before its first reply has run nothing (two kernels starting side by side
# can pick the same free port; book/conftest.py says more): such a run is started again.
KERNEL_DIED_AT_START = "Kernel died before replying to kernel_info"
STARTS = 3


def run(
    nb: Path, profile: str, seed: int, params: dict, out_dir: Path
) -> tuple[str, bool, float, str]:
    extra = "".join(f" {k}={v}" for k, v in params.items())
    name = f"{nb.stem} {profile} seed {seed}{extra}"
    needed = NEEDS_RESULTS.get((nb.stem, profile))
    if needed is not None and not needed.is_dir():
        return name, True, 0.0, f"skipped: needs {needed.relative_to(ROOT)}"
    tag = "".join(f"_{v}" for v in params.values())
    out = out_dir / f"{nb.stem}_{profile}_seed{seed}{tag}.ipynb"
    t0 = time.perf_counter()
    for _attempt in range(STARTS):
        proc = _papermill(nb, out, profile, seed, params)
        if proc.returncode == 0 or KERNEL_DIED_AT_START not in proc.stderr:
            break
    seconds = time.perf_counter() - t0
    if proc.returncode == 0:
        return name, True, seconds, ""
    lines = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "fails" in ln]
    return name, False, seconds, (lines[-1] if lines else proc.stderr[-300:]).strip()


def _papermill(
    nb: Path, out: Path, profile: str, seed: int, params: dict
) -> subprocess.CompletedProcess:
    given = [a for k, v in params.items() for a in ("-p", k, str(v))]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "papermill",
            str(nb),
            str(out),
            "-p",
            "profile",
            profile,
            "-p",
            "seed",
            str(seed),
            *given,
            "--cwd",
            str(ROOT / "book"),
            "-k",
            "python3",
            "--no-progress-bar",
        ],
        capture_output=True,
        text=True,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--profiles", nargs="+", default=["default", "full"])
    parser.add_argument("--chapters", nargs="+", default=None, help="number prefixes, e.g. 05 07")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "reruns")
    args = parser.parse_args(argv)
    notebooks = [
        nb
        for nb in chapter_notebooks()
        if args.chapters is None or any(nb.stem.startswith(c) for c in args.chapters)
    ]
    # the longest runs first, so that none of them is left running alone at the end
    notebooks.sort(key=lambda nb: not nb.stem.startswith(LONGEST))
    out_dir = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = []
    for nb in notebooks:
        for profile in args.profiles:
            seeds = args.seeds if profile == "default" else [args.seeds[0]]
            jobs += [(nb, profile, seed, {}) for seed in seeds]
            if profile == "smoke" and nb.stem in EXTRA_SMOKE:
                jobs.append((nb, profile, seeds[0], EXTRA_SMOKE[nb.stem]))
    jobs.sort(key=lambda j: not j[0].stem.startswith(LONGEST))
    failed = 0
    with ThreadPoolExecutor(args.jobs) as pool:
        for name, ok, seconds, message in pool.map(lambda j: run(*j, out_dir), jobs):
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {name:45s} {seconds:7.1f} s  {message}", flush=True)
    print(f"reruns: {len(jobs) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

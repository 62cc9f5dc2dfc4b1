"""Execute every chapter into `make book`'s jupyter-cache, two at a time, before the build.

Jupyter Book executes the chapters of a build one after the other; jupyter-cache can execute them
in parallel (its ``local-parallel`` executor: one process per core, each chapter in its own
directory, as the build would). The build then finds every chapter's outputs in the cache and
executes nothing. Chapters whose code is unchanged since their cached execution are skipped; the
longest chapter (08) is queued first. A failing chapter fails the command, with its traceback.

    python tools/execute_parallel.py _build/.jupyter_cache
"""

import sys
from pathlib import Path

from chapters import chapter_notebooks
from jupyter_cache import get_cache
from jupyter_cache.executors import load_executor

LONGEST = ("08_",)


def main(cache_path: str) -> int:
    cache = get_cache(cache_path)
    notebooks = sorted(chapter_notebooks(), key=lambda nb: not nb.stem.startswith(LONGEST))
    for nb in notebooks:
        cache.add_nb_to_project(str(nb.resolve()))
    executor = load_executor("local-parallel", cache=cache)
    result = executor.run_and_cache(timeout=None, allow_errors=False)
    for uri in result.succeeded:
        print(f"executed {Path(uri).name}")
    failed = [*result.excepted, *result.errored]
    for uri in failed:
        record = cache.get_project_record(uri)
        print(f"FAILED {Path(uri).name}\n{record.traceback or ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))

"""Test-wide settings: hypothesis draws the same examples on every run (CI must be reproducible).

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (default) draws 30 random architectures per property,
within the budget of ``make test``; ``full`` draws 400, as many as the largest full profile of a
chapter checks (``make reruns`` uses it); ``explore`` draws fresh random examples locally.
"""

import os

from hypothesis import HealthCheck, settings

common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=30, derandomize=True, print_blob=True, **common)
settings.register_profile("full", max_examples=400, derandomize=True, print_blob=True, **common)
settings.register_profile("explore", max_examples=30, **common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Every exact radius of the tests is solved by HiGHS, never read back from the optima that
# robustreg.verification keeps for the chapters (a test of that store points it at its own folder).
os.environ["ROBUSTREG_MILP_CACHE"] = ""


#: The longest tests (tens of seconds each on 2 cores: grids trained in worker processes, MILPs,
#: coverage simulations), longest first. Under `pytest -n N --dist worksteal` each worker starts
#: on one N-th of the collection in order: these tests are dealt to the starts of those shares, so
#: that they run side by side from the beginning and none is left running alone at the end.
LONGEST = (
    "test_cluster_executor_reproduces_the_serial_grid_file_for_file",
    "test_shards_and_jobs_reproduce_the_serial_grid",
    "test_milp_matches_brute_force",
    "test_percentile_bootstrap_falls_short_where_seeds_vary",
    "test_study_end_to_end_resumes_and_publishes_loadable_models",
    "test_workers_die_with_their_killed_parent",
    "test_jobs_are_capped_at_the_cores",
)


def pytest_collection_modifyitems(config, items):
    workers = config.getoption("numprocesses", None)
    if not isinstance(workers, int) or workers < 2:
        return
    rank = {name: i for i, name in enumerate(LONGEST)}
    order = lambda item: rank.get(item.originalname or item.name, len(LONGEST))
    slow = sorted((i for i in items if order(i) < len(LONGEST)), key=order)
    rest = [i for i in items if order(i) == len(LONGEST)]
    shares = [slow[w::workers] for w in range(workers)]
    size = -(-len(items) // workers)
    out = []
    for share in shares:
        take = max(0, size - len(share))
        out += share + rest[:take]
        rest = rest[take:]
    items[:] = out + rest

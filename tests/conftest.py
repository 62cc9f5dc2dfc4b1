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

"""Shared test configuration.

Hypothesis profiles: ``ci`` (the default) keeps runs short and deterministic enough for a
two-core CI box; ``thorough`` digs deeper when run by hand:
``HYPOTHESIS_PROFILE=thorough python -m pytest tests/core``.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

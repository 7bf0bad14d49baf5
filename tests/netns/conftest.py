"""Fixtures of the network-namespace tests: a lab that is always torn down."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.harness import Lab, unavailable


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A fresh lab (namespaces, bridges) for one test module; skipped, with the reason,
    only where namespaces cannot be created (not root, no iproute2, refused)."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)
    built = Lab(Path(tmp_path_factory.mktemp("netns")))
    try:
        yield built
    finally:
        built.close()

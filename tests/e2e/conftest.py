"""End-to-end, fault and multi-process tests: every test here is marked ``e2e`` (run with
``pytest -m e2e tests/e2e``; ``.ci/run`` runs them after the default suite)."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test collected below this folder ``e2e``."""
    for item in items:
        if "tests/e2e/" in item.nodeid.replace("\\", "/") or item.nodeid.startswith("e2e/"):
            item.add_marker(pytest.mark.e2e)

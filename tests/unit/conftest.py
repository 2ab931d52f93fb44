"""The unit tier: pure logic and fakes, no database, no network. Each test gets 10 seconds."""

from __future__ import annotations

import pytest

UNIT_TIMEOUT_SECONDS = 10


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/unit/" in str(item.path) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(UNIT_TIMEOUT_SECONDS))

"""Server tests run their async tests on asyncio only."""

import pytest


@pytest.fixture
def anyio_backend():
    return "asyncio"

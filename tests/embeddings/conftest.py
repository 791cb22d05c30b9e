"""Each test starts with no index loaded in this process, as a new process would."""

import pytest

from embeddings import services


@pytest.fixture(autouse=True)
def fresh_indexes():
    services.forget_indexes()
    yield
    services.forget_indexes()

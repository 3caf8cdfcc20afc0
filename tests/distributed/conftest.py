"""Fixtures shared by the multi-process parity tests."""

import pytest

from tests.distributed.parity import reference_run


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The 1-process llama3 debug-model run every parity matrix compares with (made once per session)."""
    return reference_run(tmp_path_factory.mktemp("ref"))

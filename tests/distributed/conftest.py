"""The order of the multi-process tests (their fixtures, the pool and the cached runs, are in tests/conftest.py)."""

from tests.distributed.layouts import LAYOUTS


def pytest_collection_modifyitems(items):
    """Run the layouts of more than 8 ranks last: their pool takes every core's worth of ranks, so the smaller pools
    are closed to make room, and running them last saves restarting those."""
    def widest(item) -> bool:
        layout = getattr(item, "callspec", None) and item.callspec.params.get("layout")
        return layout in LAYOUTS and LAYOUTS[layout][0] > 8

    items.sort(key=widest)  # stable: everything else keeps its order

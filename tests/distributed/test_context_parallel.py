"""Context parallel (ring attention over SDPA, on CPU through our shim) against a 1-process run."""

import pytest

from tests.distributed.parity import assert_matches_reference

MATRIX = [  # (layout, slow): `-m "not slow"` keeps plain cp=2, CP folded into FSDP and CP over DDP; all run in CI
    ("cp=2", False), ("cp=4", True), ("cp=2 alltoall", True), ("cp=2 no load balance", True),
    ("dp_shard=2 x cp=2", False), ("cp=2 x tp=2", True), ("pp=2 x cp=2", True),
    ("pp=2 x dp_shard=2 x cp=2 x tp=2", True), ("cp=2 replicated", False), ("dp_replicate=2 x cp=2 replicated", True),
]

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("layout", [pytest.param(layout, marks=[pytest.mark.slow] if slow else [])
                                    for layout, slow in MATRIX])
def test_layout_matches_single_process(layout, runs):
    assert_matches_reference(runs.steps(layout), runs.steps("1 process"))

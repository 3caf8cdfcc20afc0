"""FSDP2 / HSDP / replication and gradient accumulation against a 1-process run of the same seed and data."""

import pytest

from tests.distributed.parity import assert_matches_reference, assert_reference_moves

# (layout, model): llama3 unless named; smollm shares one matrix between embedding and output, which FSDP must
# shard once and whose two gradients it must sum.
MATRIX = [("dp_shard=2", "llama3"), ("dp_shard=4", "llama3"), ("dp_replicate=2", "llama3"),
          ("dp_replicate=2 x dp_shard=2", "llama3"), ("accumulation=2", "llama3"), ("dp_shard=2", "smollm")]

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("model", ["llama3", "smollm"])
def test_reference_moves(model, runs):
    assert_reference_moves(runs.steps("1 process", model), name=model)


@pytest.mark.parametrize("layout,model", MATRIX, ids=[f"{layout} ({model})" for layout, model in MATRIX])
def test_layout_matches_single_process(layout, model, runs):
    assert_matches_reference(runs.steps(layout, model), runs.steps("1 process", model))

"""FSDP2 / HSDP / replication and gradient accumulation against a 1-process run of the same seed and data."""

import pytest

from tests.distributed.parity import assert_reference_moves, check_layout, reference_run

# name -> (ranks, overrides); local batch chosen so every layout has the reference's global batch of 4.
LAYOUTS = {
    "dp_shard=2": (2, {"parallelism.data_parallel_shard_degree": 2, "training.local_batch_size": 2}),
    "dp_shard=4": (4, {"parallelism.data_parallel_shard_degree": 4, "training.local_batch_size": 1}),
    "dp_replicate=2": (2, {"parallelism.data_parallel_replicate_degree": 2,
                           "parallelism.data_parallel_shard_degree": 1, "training.local_batch_size": 2}),
    "dp_replicate=2 x dp_shard=2": (4, {"parallelism.data_parallel_replicate_degree": 2,
                                        "parallelism.data_parallel_shard_degree": 2, "training.local_batch_size": 1}),
    "accumulation=2 (1 process)": (1, {"training.local_batch_size": 2}),
}

pytestmark = pytest.mark.distributed


def test_reference_moves(reference):
    assert_reference_moves(reference)


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, reference, tmp_path):
    ranks, spec = LAYOUTS[name]
    check_layout(ranks, spec, reference, tmp_path / "run.pt")


def test_tied_embeddings_under_fsdp(tmp_path):
    # SmolLM shares one matrix between embedding and output: FSDP must shard it once and sum both gradients.
    ref = reference_run(tmp_path, flavor="debugmodel", name="smollm")
    assert_reference_moves(ref, flavor="debugmodel", name="smollm")
    check_layout(2, LAYOUTS["dp_shard=2"][1], ref, tmp_path / "run.pt", flavor="debugmodel", name="smollm")

"""Context parallel (ring attention over SDPA, on CPU through our shim) against a 1-process run."""

import pytest

from tests.distributed.parity import check_layout

# name -> (ranks, overrides); every layout keeps the reference's global batch of 4 sequences of 64 tokens.
LAYOUTS = {
    "cp=2": (2, {"parallelism.context_parallel_degree": 2, "parallelism.data_parallel_shard_degree": 1}),
    "cp=4": (4, {"parallelism.context_parallel_degree": 4, "parallelism.data_parallel_shard_degree": 1}),
    "cp=2 alltoall": (2, {"parallelism.context_parallel_degree": 2, "parallelism.data_parallel_shard_degree": 1,
                          "parallelism.context_parallel_rotate_method": "alltoall"}),
    "cp=2 no load balance": (2, {"parallelism.context_parallel_degree": 2,
                                 "parallelism.data_parallel_shard_degree": 1,
                                 "parallelism.context_parallel_load_balance": False}),
    "dp_shard=2 x cp=2": (4, {"parallelism.context_parallel_degree": 2, "parallelism.data_parallel_shard_degree": 2,
                              "training.local_batch_size": 2}),
    "cp=2 x tp=2": (4, {"parallelism.context_parallel_degree": 2, "parallelism.tensor_parallel_degree": 2,
                        "parallelism.data_parallel_shard_degree": 1}),
    "pp=2 x cp=2": (4, {"parallelism.context_parallel_degree": 2, "parallelism.pipeline_parallel_degree": 2,
                        "parallelism.data_parallel_shard_degree": 1}),
}
# The full 5-D layout: 16 ranks on a 2-core machine, so slow; it still runs in CI.
FIVE_D = (16, {"parallelism.pipeline_parallel_degree": 2, "parallelism.data_parallel_shard_degree": 2,
               "parallelism.context_parallel_degree": 2, "parallelism.tensor_parallel_degree": 2,
               "training.local_batch_size": 2})

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_single_process(name, reference, tmp_path):
    ranks, spec = LAYOUTS[name]
    spec = {"training.local_batch_size": 4, **spec}
    check_layout(ranks, spec, reference, tmp_path / "run.pt")


@pytest.mark.slow
def test_five_d_layout_matches_single_process(reference, tmp_path):
    ranks, spec = FIVE_D
    check_layout(ranks, spec, reference, tmp_path / "run.pt")

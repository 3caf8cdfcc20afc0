"""Tensor parallel (with sequence and loss parallel), alone and under FSDP / HSDP, against a 1-process run.

Each layout must match the reference loss and global gradient norm at every step and every parameter after step 1.
"""

import pytest

from tests.distributed.parity import assert_reference_moves, check_layout, reference_run

LLAMA, SMOLLM = ("llama3", "debugmodel"), ("smollm", "debugmodel")  # smollm debugmodel: tied, 4 heads, 2 kv heads
TP = "parallelism.tensor_parallel_degree"

# name -> (model, ranks, overrides); local batch chosen so every layout has the reference's global batch of 4.
LAYOUTS = {
    "tp=2": (LLAMA, 2, {TP: 2, "training.local_batch_size": 4}),
    "tp=4": (LLAMA, 4, {TP: 4, "training.local_batch_size": 4}),
    "tp=2, loss parallel disabled": (LLAMA, 2, {TP: 2, "parallelism.disable_loss_parallel": True,
                                                "training.local_batch_size": 4}),
    "dp_shard=2 x tp=2": (LLAMA, 4, {"parallelism.data_parallel_shard_degree": 2, TP: 2,
                                     "training.local_batch_size": 2}),
    "dp_replicate=2 x dp_shard=2 x tp=2": (LLAMA, 8, {"parallelism.data_parallel_replicate_degree": 2,
                                                      "parallelism.data_parallel_shard_degree": 2, TP: 2,
                                                      "training.local_batch_size": 1}),
    "tied: tp=2": (SMOLLM, 2, {TP: 2, "training.local_batch_size": 4}),
    "tied: dp_shard=2 x tp=2": (SMOLLM, 4, {"parallelism.data_parallel_shard_degree": 2, TP: 2,
                                            "training.local_batch_size": 2}),
}
SLOW = {"dp_replicate=2 x dp_shard=2 x tp=2"}  # 8 ranks on 2 cores

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One 1-process reference per model, run on first use."""
    cache = {}

    def get(model):
        if model not in cache:
            name, flavor = model
            cache[model] = reference_run(tmp_path_factory.mktemp(f"ref-{name}"), flavor=flavor, name=name)
            assert_reference_moves(cache[model], flavor=flavor, name=name)
        return cache[model]

    return get


@pytest.mark.parametrize("layout", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in LAYOUTS])
def test_layout_matches_single_process(layout, references, tmp_path):
    (name, flavor), ranks, spec = LAYOUTS[layout]
    check_layout(ranks, spec, references((name, flavor)), tmp_path / "run.pt", flavor=flavor, name=name)

"""Tensor parallel (with and without sequence or loss parallel), alone and under FSDP / HSDP, vs one process.

Each layout must match the reference loss and global gradient norm at every step and every parameter after step 1.
The smollm debug model is tied, with 4 heads and 2 kv heads.
"""

import pytest

from tests.distributed.parity import assert_matches_reference

MATRIX = [  # (layout, model, slow)
    ("tp=2", "llama3", False),
    ("tp=4", "llama3", True),  # -m "not slow" keeps tp=2 and dp_shard=2 x tp=2 on 4 ranks
    ("tp=2, loss parallel disabled", "llama3", False),
    ("tp=2, sequence parallel disabled", "smollm", False),  # tied embeddings, replicated norms
    ("dp_shard=2 x tp=2", "llama3", False),
    ("dp_replicate=2 x dp_shard=2 x tp=2", "llama3", True),  # 8 ranks on 2 cores
    ("tp=2", "smollm", False),
    ("dp_shard=2 x tp=2", "smollm", True),
]

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("layout,model", [pytest.param(layout, model, marks=[pytest.mark.slow] if slow else [],
                                                       id=f"{layout} ({model})") for layout, model, slow in MATRIX])
def test_layout_matches_single_process(layout, model, runs):
    assert_matches_reference(runs.steps(layout, model), runs.steps("1 process", model))

"""Float8 training (emulated on CPU) in parallel layouts against float8 in one process, same seed and data.

dp_shard=2 runs with plain FSDP all-gathers and with enable_fsdp_float8_all_gather + precompute (the weight shards
travel as float8 with one scale per weight, computed after each optimizer step) against one process accumulating
the same micro-batches; tp=2 runs Float8Linear under the
plain tensor-parallel styles (gloo cannot all-gather float8, so torchao's float8 styles are for CUDA only).
"""

import pytest

from tests.distributed.parity import assert_matches_reference, assert_reference_moves

pytestmark = pytest.mark.distributed

FLOAT8 = {"model.converters": "quantize.linear.float8", "quantize.linear.float8.emulate": True,
          "quantize.linear.float8.filter_fqns": "output"}
ALL_GATHER = {**FLOAT8, "quantize.linear.float8.enable_fsdp_float8_all_gather": True,
              "quantize.linear.float8.precompute_float8_dynamic_scale_for_fsdp": True}

# Tensorwise scaling gives each activation and gradient tensor one scale, from its amax: a micro-batch's float8
# values depend on which sequences share it. With one sequence per micro-batch, dp_shard=2 (2 micro-batches per
# rank) and accumulation=4 in one process scale every tensor alike, and differ only in the order gradients are
# summed: measured 4.4e-6 loss, 1.1e-6 grad norm (relative), 6e-8 params after step 1, with and without float8
# all-gather (whose numbers were identical), so the default parity bounds (1e-5) hold.
# tp=2 sees the whole batch, like 1 process, but sums the row-wise partial products in another order; an
# activation entry moved by ~1e-7 can round to the neighbouring float8 value (2^-4 apart, relatively), and Adam's
# first step moves each weight by ~lr = 8e-4 whatever its gradient's size, so the weights after step 1 differ by
# up to 1.24e-4 (loss 3.8e-6, grad norm 8.7e-6 relative): bounds 3e-5 and 5e-4.
ONE_SEQUENCE = {"training.local_batch_size": 1}
MATRIX = {  # name -> (layout, its settings, the 1-process reference layout, rtol, param_atol)
    "dp_shard=2": ("dp_shard=2", {**FLOAT8, **ONE_SEQUENCE}, "accumulation=4", 1e-5, 1e-5),
    "dp_shard=2, float8 all-gather + precompute": ("dp_shard=2", {**ALL_GATHER, **ONE_SEQUENCE}, "accumulation=4",
                                                   1e-5, 1e-5),
    "tp=2": ("tp=2", FLOAT8, "1 process", 3e-5, 5e-4),
}


@pytest.mark.parametrize("reference", ["1 process", "accumulation=4"])
def test_float8_reference_moves(reference, runs):
    assert_reference_moves(runs.steps(reference, **FLOAT8))


# `-m "not slow"` keeps dp_shard=2 with float8 all-gather (the plain FSDP float8 path plus the float8 weight shards).
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "dp_shard=2" else n for n in MATRIX])
def test_float8_layout_matches_single_process(name, runs):
    layout, settings, reference, rtol, param_atol = MATRIX[name]
    assert_matches_reference(runs.steps(layout, **settings), runs.steps(reference, **FLOAT8), rtol, param_atol)

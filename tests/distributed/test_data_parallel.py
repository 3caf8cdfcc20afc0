"""FSDP2 / HSDP / DDP replication and gradient accumulation against a 1-process run of the same seed and data."""

import pytest
import torch

from tests.distributed.parity import assert_matches_reference, assert_reference_moves

# (layout, model): llama3 unless named; smollm shares one matrix between embedding and output, which FSDP must
# shard once and whose two gradients it must sum.
MATRIX = [("dp_shard=2", "llama3"), ("dp_replicate=2", "llama3"), ("accumulation=2", "llama3"),
          ("dp_shard=2", "smollm")]

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("model", ["llama3", "smollm"])
def test_reference_moves(model, runs):
    assert_reference_moves(runs.steps("1 process", model), name=model)


# DDP (pure replication) reduces only the last micro-batch's backward, the sum of the accumulated gradients. FSDP over
# 4 ranks and HSDP: left out of -m "not slow" (dp_shard=2 and dp_replicate=2 are there), run in CI.
SLOW = [("dp_replicate=2 x accumulation=2", "llama3"), ("dp_shard=4", "llama3"),
        ("dp_replicate=2 x dp_shard=2", "llama3")]


@pytest.mark.parametrize("layout,model", [*MATRIX, *(pytest.param(*case, marks=pytest.mark.slow) for case in SLOW)],
                         ids=[f"{layout} ({model})" for layout, model in MATRIX + SLOW])
def test_layout_matches_single_process(layout, model, runs):
    assert_matches_reference(runs.steps(layout, model), runs.steps("1 process", model))


# bf16 mixed precision, dp_shard=2 against one process in bf16. The two round differently: FSDP's MixedPrecisionPolicy
# casts the parameters to bf16 (the embedding output and the residual stream are bf16 too), while one process, which
# has no FSDP, runs the forward under bf16 autocast over fp32 weights (bf16 matmuls, an fp32 residual stream).
# Measured over the 5 steps (debug model, seq 64): loss up to 1.8e-4 relative, grad norm 8.8e-5 .. 1.7e-3 (the
# trajectories drift apart step by step), parameters after step 1 7.6e-4. Bounds: loss 1e-3, grad norm 4e-3, and
# parameters 2 x lr = 1.6e-3, the most by which one Adam first step (lr x g / |g|) can differ (a flipped sign).
# bf16 is in effect: the same layout in fp32 is 3.9e-5 .. 2e-4 away in loss, where fp32 layouts agree to ~1e-7.
BF16 = {"training.mixed_precision_param": "bfloat16"}


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                    reason="this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 would be emulated, far too slow")
def test_bf16_dp_shard_matches_single_process_bf16(runs):
    ref, got = runs.steps("1 process", **BF16), runs.steps("dp_shard=2", **BF16)
    assert_reference_moves(ref)
    deltas = assert_matches_reference(got, ref, rtol=4e-3, param_atol=1.6e-3)
    assert deltas["max_loss_rel"] <= 1e-3, deltas
    fp32 = runs.steps("dp_shard=2")
    assert max(abs(a - b) / b for a, b in zip(got["losses"], fp32["losses"])) > 1e-5, "dp_shard=2 trained in fp32"

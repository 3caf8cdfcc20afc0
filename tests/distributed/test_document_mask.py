"""Document masking (block-causal attention, llama3 debugmodel_flex_attn) under every parallelism, against one process.

The matrix runs at seq 256, where the shipped corpus packs several documents into a window (its documents average
~400 tokens; at the other matrices' seq 64 most windows hold one document and the mask would change nothing), and
the reference must differ from the causal model's run, or the mask was not applied. On CPU the flex flavor runs
SDPA with a boolean block-causal mask (trainer/models/attention.py); tensor parallel keeps the mask whole on every
rank, and pipeline parallel cuts the document ids into microbatches with the tokens.
"""

import pytest

from tests.distributed.parity import assert_matches_reference, assert_reference_moves

BLOCK_CAUSAL = {"model.flavor": "debugmodel_flex_attn", "training.seq_len": 256}
SELECTIVE_OP = {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "op"}
# Measured on 2 shared cores, with warm pools: a 1-process run here is ~6 s (4x the tokens of the seq-64 matrices).
# The fast cases cover FSDP, PP and checkpointing with the mask; TP (4 ranks, ~30 s), full AC (the same checkpoint
# path as "op"), compile (cold compile, ~60 s) and the varlen flavor (the same CPU kernel as flex) are slow.
MATRIX = {  # name -> (layout, extra settings, slow)
    "dp_shard=2": ("dp_shard=2", {}, False),
    "pp=2 1F1B": ("pp=2 1F1B", {}, False),
    "selective AC op": ("1 process", SELECTIVE_OP, False),
    "dp_shard=2 x tp=2": ("dp_shard=2 x tp=2", {}, True),
    "full AC": ("1 process", {"activation_checkpoint.mode": "full"}, True),
    "compile": ("1 process", {"compile.enable": True}, True),
    "varlen flavor, dp_shard=2": ("dp_shard=2", {"model.flavor": "debugmodel_varlen_attn"}, True),
}

pytestmark = pytest.mark.distributed


@pytest.mark.slow  # the fast subset keeps the mask's layout parity; this runs in CI's full suite
def test_reference_moves_and_differs_from_causal(runs):
    ref = runs.steps("1 process", **BLOCK_CAUSAL)
    assert_reference_moves(ref)
    causal = runs.steps("1 process", **{**BLOCK_CAUSAL, "model.flavor": "debugmodel"})
    deltas = [abs(a - b) for a, b in zip(ref["losses"], causal["losses"])]
    print(f"block-causal vs causal loss per step: {ref['losses']} vs {causal['losses']}")
    assert deltas[0] > 1e-4, "the block-causal mask changed nothing on the shipped corpus"


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if slow else [])
                                  for name, (_, _, slow) in MATRIX.items()])
def test_layout_matches_single_process(name, runs):
    layout, extra, _ = MATRIX[name]
    assert_matches_reference(runs.steps(layout, **{**BLOCK_CAUSAL, **extra}), runs.steps("1 process", **BLOCK_CAUSAL))

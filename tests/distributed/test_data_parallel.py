"""FSDP2 / HSDP / replication and gradient accumulation against a 1-process run of the same seed and data.

The matrix is data: (name, ranks, overrides). Every layout reads the same global batch per step (the data
loader's sharding rule), so losses and parameters must agree with the reference to fp32 round-off.
"""

import pytest
import torch

from tests.distributed.launch import run_steps
from trainer.models.llama import Transformer, get_model_args

STEPS = 5
GLOBAL_BATCH = 4
BASE = ["--job.config_file", "configs/debug_model.toml", "--training.steps", str(STEPS), "--training.seq_len", "64",
        "--training.global_batch_size", str(GLOBAL_BATCH), "--training.mixed_precision_param", "float32",
        "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "1", "--debug.seed", "7"]

LAYOUTS = [  # name, ranks, overrides (local batch chosen so that every layout has the same global batch)
    ("dp_shard=2", 2, ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"]),
    ("dp_shard=4", 4, ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"]),
    ("dp_replicate=2", 2, ["--parallelism.data_parallel_replicate_degree", "2",
                           "--parallelism.data_parallel_shard_degree", "1", "--training.local_batch_size", "2"]),
    ("dp_replicate=2 x dp_shard=2", 4, ["--parallelism.data_parallel_replicate_degree", "2",
                                        "--parallelism.data_parallel_shard_degree", "2",
                                        "--training.local_batch_size", "1"]),
    ("accumulation=2 (1 process)", 1, ["--training.local_batch_size", "2"]),
]

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return run_steps(1, tmp_path_factory.mktemp("ref") / "ref.pt", BASE + ["--training.local_batch_size", "4"])


def assert_matches_reference(got: dict, ref: dict, rtol: float = 1e-5, param_atol: float = 1e-5) -> None:
    """Loss within rtol at every step; every parameter after step 1 within param_atol."""
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"]), start=1):
        assert abs(a - b) <= rtol * abs(b), f"step {step}: loss {a!r} vs reference {b!r}"
    assert got["params_after_step1"].keys() == ref["params_after_step1"].keys()
    for name, ref_p in ref["params_after_step1"].items():
        diff = (got["params_after_step1"][name] - ref_p).abs().max().item()
        assert diff <= param_atol, f"{name}: max |param - reference| = {diff:.3g} after step 1"


def test_reference_moves(reference):
    # A matrix of runs that all did nothing would agree trivially: step 1 must move every parameter off its init.
    model = Transformer(get_model_args("llama3", "debugmodel"))
    model.init_weights(seed=7)
    for name, init in model.named_parameters():
        moved = (reference["params_after_step1"][name] - init.detach()).abs().max().item()
        assert moved > 1e-5, f"{name} did not move in step 1"
    assert all(g > 0 for g in reference["grad_norms"])


@pytest.mark.parametrize("name,ranks,overrides", LAYOUTS, ids=[layout[0] for layout in LAYOUTS])
def test_layout_matches_single_process(name, ranks, overrides, reference, tmp_path):
    got = run_steps(ranks, tmp_path / "run.pt", BASE + overrides)
    assert got["world_size"] == ranks
    assert_matches_reference(got, reference)

"""The shared parity recipe: a layout matrix is data, compared with one 1-process reference run.

Every layout reads the same global batch per step (the data loader's sharding rule), starts from the same
weights (init by seed and name) and must match the reference loss at every step and every parameter after step 1.
"""

from pathlib import Path

import torch

from tests.distributed.launch import run_steps
from trainer.models.llama import Transformer, get_model_args

STEPS = 5
GLOBAL_BATCH = 4
SEED = 7


def base_overrides(flavor: str = "debugmodel", name: str = "llama3") -> list[str]:
    """fp32, 5 steps, seq 64, global batch 4: small enough for 8 ranks on 2 cores."""
    return ["--job.config_file", "configs/debug_model.toml", "--model.name", name, "--model.flavor", flavor,
            "--training.steps", str(STEPS), "--training.seq_len", "64",
            "--training.global_batch_size", str(GLOBAL_BATCH), "--training.mixed_precision_param", "float32",
            "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "1", "--debug.seed", str(SEED)]


def reference_run(out_dir: Path, flavor: str = "debugmodel", name: str = "llama3") -> dict:
    """The 1-process run every layout is compared with (local batch = global batch, no accumulation)."""
    return run_steps(1, out_dir / "ref.pt", base_overrides(flavor, name) + ["--training.local_batch_size",
                                                                          str(GLOBAL_BATCH)])


def assert_reference_moves(ref: dict, flavor: str = "debugmodel", name: str = "llama3") -> None:
    """A matrix of runs that all did nothing would agree trivially: step 1 must move every parameter."""
    model = Transformer(get_model_args(name, flavor))
    model.init_weights(seed=SEED)
    for pname, init in model.named_parameters():
        moved = (ref["params_after_step1"][pname] - init.detach()).abs().max().item()
        assert moved > 1e-5, f"{pname} did not move in step 1"
    assert all(g > 0 for g in ref["grad_norms"])


def assert_matches_reference(got: dict, ref: dict, rtol: float = 1e-5, param_atol: float = 1e-5,
                             check_grad_norm: bool = False) -> dict:
    """Loss within rtol at every step, every parameter after step 1 within param_atol, and with `check_grad_norm`
    the grad norm within rtol at every step; returns the deltas."""
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    loss_rel = [abs(a - b) / abs(b) for a, b in zip(got["losses"], ref["losses"])]
    for step, (rel, a, b) in enumerate(zip(loss_rel, got["losses"], ref["losses"]), start=1):
        assert rel <= rtol, f"step {step}: loss {a!r} vs reference {b!r} (relative {rel:.3g})"
    norm_rel = [abs(a - b) / abs(b) for a, b in zip(got["grad_norms"], ref["grad_norms"])]
    for step, (rel, a, b) in enumerate(zip(norm_rel, got["grad_norms"], ref["grad_norms"]), start=1):
        assert rel <= rtol or not check_grad_norm, f"step {step}: grad norm {a!r} vs reference {b!r} ({rel:.3g})"
    assert got["params_after_step1"].keys() == ref["params_after_step1"].keys()
    param_diff = 0.0
    for pname, ref_p in ref["params_after_step1"].items():
        diff = (got["params_after_step1"][pname] - ref_p).abs().max().item()
        assert diff <= param_atol, f"{pname}: max |param - reference| = {diff:.3g} after step 1"
        param_diff = max(param_diff, diff)
    deltas = {"max_loss_rel": max(loss_rel), "max_param_abs": param_diff, "max_grad_norm_rel": max(norm_rel)}
    print(f"parity: {deltas}")
    return deltas


def layout_args(spec: dict[str, int | str | bool]) -> list[str]:
    """{"parallelism.tensor_parallel_degree": 2, ...} -> CLI overrides."""
    return [a for key, value in spec.items() for a in (f"--{key}", str(value).lower()
                                                       if isinstance(value, bool) else str(value))]


def check_layout(ranks: int, spec: dict, ref: dict, out: Path, flavor: str = "debugmodel",
                 name: str = "llama3", **tol) -> dict:
    """Run one layout of the matrix and compare it with `ref`."""
    got = run_steps(ranks, out, base_overrides(flavor, name) + layout_args(spec))
    assert got["world_size"] == ranks
    return assert_matches_reference(got, ref, **tol)

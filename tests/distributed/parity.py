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
    """fp32, 5 steps, seq 64, global batch 4: small enough for 8 ranks on 2 cores. max_norm 0.5 is below the
    debug model's gradient norms, so clipping over sharded parameters is exercised at every step.

    Adam eps 1e-6 rather than 1e-8: Adam's first step is lr * g / (|g| + eps), so with eps 1e-8 a gradient entry
    of ~5e-9 turns fp32 reduction-order noise (~1e-9, which every layout has) into a parameter difference of
    ~1e-5 (seen with tp=2 on the smollm debug model). The larger eps keeps that amplification below lr / eps.
    """
    return ["--job.config_file", "configs/debug_model.toml", "--model.name", name, "--model.flavor", flavor,
            "--training.steps", str(STEPS), "--training.seq_len", "64",
            "--training.global_batch_size", str(GLOBAL_BATCH), "--training.mixed_precision_param", "float32",
            "--training.max_norm", "0.5",
            "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "1", "--debug.seed", str(SEED),
            "--optimizer.eps", "1e-6"]


_REFERENCES: dict[tuple[str, str], dict] = {}


def reference_run(out_dir: Path, flavor: str = "debugmodel", name: str = "llama3") -> dict:
    """The 1-process run every layout is compared with (local batch = global batch, no accumulation).

    Run once per model per test session: every parallelism's matrix compares with the same run. Read-only.
    """
    if (flavor, name) not in _REFERENCES:
        _REFERENCES[flavor, name] = run_steps(1, out_dir / "ref.pt", base_overrides(flavor, name) + [
            "--training.local_batch_size", str(GLOBAL_BATCH)])
    return _REFERENCES[flavor, name]


def assert_reference_moves(ref: dict, flavor: str = "debugmodel", name: str = "llama3") -> None:
    """A matrix of runs that all did nothing would agree trivially: step 1 must move every parameter."""
    model = Transformer(get_model_args(name, flavor))
    model.init_weights(seed=SEED)
    for pname, init in model.named_parameters():
        moved = (ref["params_after_step1"][pname] - init.detach()).abs().max().item()
        assert moved > 1e-5, f"{pname} did not move in step 1"
    assert all(g > 0.5 for g in ref["grad_norms"]), "clipping (max_norm 0.5) must be active at every step"


def assert_matches_reference(got: dict, ref: dict, rtol: float = 1e-5, param_atol: float = 1e-5) -> dict:
    """Loss and gradient norm within rtol at every step, every parameter after step 1 within param_atol; returns
    the deltas. The gradient norm is the global one clipping uses, so it checks the norm over every shard too."""
    assert len(got["losses"]) == len(ref["losses"]) == STEPS
    rel = {}
    for what, label in (("losses", "loss"), ("grad_norms", "grad norm")):
        rel[what] = [abs(a - b) / abs(b) for a, b in zip(got[what], ref[what])]
        for step, (r, a, b) in enumerate(zip(rel[what], got[what], ref[what]), start=1):
            assert r <= rtol, f"step {step}: {label} {a!r} vs reference {b!r} (relative {r:.3g})"
    assert got["params_after_step1"].keys() == ref["params_after_step1"].keys()
    param_diff = 0.0
    for pname, ref_p in ref["params_after_step1"].items():
        diff = (got["params_after_step1"][pname] - ref_p).abs().max().item()
        assert diff <= param_atol, f"{pname}: max |param - reference| = {diff:.3g} after step 1"
        param_diff = max(param_diff, diff)
    deltas = {"max_loss_rel": max(rel["losses"]), "max_grad_norm_rel": max(rel["grad_norms"]),
              "max_param_abs": param_diff}
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

"""The parity checks every layout matrix uses: a run must match the 1-process reference of the same seed and data.

Every layout reads the same global batch per step (tests/distributed/layouts.py) and starts from the same weights
(init by seed and name), so it must match the reference loss and gradient norm at every step and every parameter
after step 1.
"""

from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer

from tests.distributed.layouts import SEED, STEPS


def assert_reference_moves(ref: dict, name: str = "llama3", flavor: str = "debugmodel") -> None:
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

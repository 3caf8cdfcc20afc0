"""Activation checkpointing and torch.compile against eager runs without checkpointing.

Compile with tensor parallel is its own case: on CPU each block's attention and feed_forward are compiled and its
norms stay eager (compile.py), and it must still match. Several cases compile the same graphs in one session, so
they also catch a warm compile cache handing back wrong code (torch_private.set_autograd_cache). memory_budget recomputes inside the compiled blocks, so it has compile's tolerance.

Recomputation reruns the same ops on the same inputs, so a checkpointed run must match the eager run of its
layout to rounding (1e-6; bit-identical in practice); compiled kernels fuse and reorder float math, so compile
gets 1e-5. Every run must also match the 1-process reference within the data-parallel tolerance (FSDP alone moves
parameters by ~5e-6 there, which is why the tight check is against the same layout).
"""

import pytest

from tests.distributed.parity import assert_matches_reference

RECOMPUTED = {"rtol": 1e-6, "param_atol": 1e-6}
COMPILED = {"rtol": 1e-5, "param_atol": 1e-5}
SELECTIVE_OP = {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "op"}

FEATURES = {  # name -> (overrides, tolerance against eager, slow: cold compile is 13-22 s per process on 2 cores)
    "full AC": ({"activation_checkpoint.mode": "full"}, RECOMPUTED, False),
    "selective AC 2": ({"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "2"},
                       RECOMPUTED, False),
    "selective AC op": (SELECTIVE_OP, RECOMPUTED, False),
    "compile": ({"compile.enable": True}, COMPILED, True),
}
LAYOUTS = ("1 process", "dp_shard=2")
MATRIX = {f"{feature}, {layout}": (layout, spec, tol, slow)
          for feature, (spec, tol, slow) in FEATURES.items() for layout in LAYOUTS}
# Both together under FSDP: checkpointing is applied first and compile traces through it.
for feature in ("full AC", "selective AC op"):
    MATRIX[f"compile + {feature}, dp_shard=2"] = ("dp_shard=2", {**FEATURES[feature][0], "compile.enable": True},
                                                  COMPILED, True)

COMPILE = {"compile.enable": True}
MEMORY_BUDGET = {"activation_checkpoint.mode": "memory_budget", "activation_checkpoint.memory_budget": 0.5, **COMPILE}
MATRIX |= {  # name -> (layout, overrides, tolerance against eager, slow)
    "compile, tp=2": ("tp=2", COMPILE, COMPILED, True),  # slow: inductor per rank; memory_budget below is fast
    "compile, pp=2 x tp=2": ("pp=2 x tp=2 1F1B", COMPILE, COMPILED, True),
    "compile + full AC, dp_shard=2 x tp=2": ("dp_shard=2 x tp=2", {**FEATURES["full AC"][0], **COMPILE},
                                             COMPILED, True),
    "compile + selective AC op, tp=2": ("tp=2", {**SELECTIVE_OP, **COMPILE}, COMPILED, True),
    "memory_budget 0.5, 1 process": ("1 process", MEMORY_BUDGET, COMPILED, False),
    "memory_budget 0.5, dp_shard=2 x tp=2": ("dp_shard=2 x tp=2", MEMORY_BUDGET, COMPILED, True),
}

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if case[3] else name
                                  for name, case in MATRIX.items()])
def test_matches_eager(name, runs):
    layout, spec, tol, _ = MATRIX[name]
    got = runs.steps(layout, **spec)
    assert_matches_reference(got, runs.steps(layout), **tol)  # the feature's own effect, against eager
    assert_matches_reference(got, runs.steps("1 process"))  # and the layout's, as in test_data_parallel.py

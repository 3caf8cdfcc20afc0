"""Activation checkpointing: transformer blocks keep less for backward and recompute the rest there.

Modes (config [activation_checkpoint]):
  full            every block keeps only its input and reruns its whole forward in backward
  selective "N"   the same for every N-th block (layer ids N-1, 2N-1, ...), a memory/compute trade in between
  selective "op"  torchtitan's per-op policy: every block keeps the outputs of attention, of sequence parallel's
                  reduce-scatters (recomputing them would rerun a collective), of max (float8's amax) and of
                  every other matmul (the 1st, 3rd, ... of the block's forward: wq, wv, w1, w2), and recomputes
                  the rest (wk, wo, w3, norms, RoPE, SwiGLU gating, residual adds); torch's selective policy
                  `create_selective_checkpoint_contexts` decides op by op. On Llama 3.1 8B at seq 8192 that is
                  torchtitan's published memory (82.4 GiB on 8 x H100, FSDP, local batch 2; the planner 82.7).
  memory_budget   no block is wrapped: the compiler's partitioner, which splits each compiled graph into forward
                  and backward, keeps at most `memory_budget` of the activations it would keep unconstrained
                  (1.0) and recomputes the cheapest rest (0.0: as little as checkpointing the compiled region).
                  Needs compile (validate() says so); where compile covers only part of a block (CPU with tensor
                  parallel: see compile.py) the eager rest keeps all its activations.

The wrapped modes pass activation_checkpoint.preserve_rng_state, determinism_check, early_stop and debug to
torch.utils.checkpoint, as torchtitan does.

How: a checkpointed block's class is swapped for a subclass whose forward runs the original one under
torch.utils.checkpoint (non-reentrant), the same trick FSDP2's fully_shard uses. Unlike torch's
`checkpoint_wrapper`, which nests the block one level down, nothing is renamed: named_parameters() and
state_dict() keys stay those of the plain model, so init by name, checkpoints and HF export need no mapping.
Applied after tensor/context parallel and before compile and FSDP (see `parallelize`).
"""

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from trainer.config.job_config import ActivationCheckpoint
from trainer.torch_private import set_activation_memory_budget

# Ops whose outputs "op" keeps (matmuls: every other one): every SDPA backend (the CPU one included, which also
# runs the boolean block-causal mask), the document-masking kernels of CUDA (FlexAttention, varlen attention),
# sequence parallel's reduce-scatter, and max (float8's amax, from which its scale is computed).
_SAVE_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.higher_order.flex_attention,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
}
try:
    import torch.nn.attention.varlen  # noqa: F401  (registers its op)

    _SAVE_OPS.add(torch.ops.torch_attn._varlen_attn.default)
except (ImportError, AttributeError):  # a torch without varlen attention
    pass


def per_op_policy():
    """Context functions for one checkpointed block's forward and its recompute: keep _SAVE_OPS outputs except
    every second matmul, recompute everything else. The matmuls are counted per pass (the forward, then the
    recompute in backward) so that both passes decide alike."""
    matmuls = {False: 0, True: 0}  # per ctx.is_recompute

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if op == torch.ops.aten.mm.default:
            matmuls[ctx.is_recompute] += 1
            if matmuls[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if op in _SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


class _CheckpointedForward:
    """Mixed in front of a block's own class: the block's forward runs under torch.utils.checkpoint."""

    _ac_context_fn = None  # None: keep only the inputs; else a selective policy's context functions
    _ac_options: dict = {}  # torch.utils.checkpoint's preserve_rng_state, determinism_check, early_stop, debug

    def forward(self, *args, **kwargs):
        # Non-reentrant: works with kwargs, with FSDP2's hooks around the block and under torch.compile. Pass
        # context_fn only when selective: torch.compile (2.13) rejects an explicit noop_context_fn.
        selective = {} if self._ac_context_fn is None else {"context_fn": self._ac_context_fn}
        return checkpoint(super().forward, *args, use_reentrant=False, **selective, **self._ac_options, **kwargs)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_CheckpointedForward, cls), {})


def checkpoint_module(module: nn.Module, context_fn=None, **options) -> None:
    """Make `module` checkpoint its forward, in place; `context_fn` (selective) and `options` (preserve_rng_state,
    determinism_check, early_stop, debug) as for torch.utils.checkpoint."""
    module.__class__ = _checkpointed_class(type(module))
    module._ac_context_fn = context_fn
    module._ac_options = options


def checkpoint_options(ac: ActivationCheckpoint) -> dict:
    """The [activation_checkpoint] keys torch.utils.checkpoint takes, as its keywords."""
    return {"preserve_rng_state": ac.preserve_rng_state, "determinism_check": ac.determinism_check,
            "early_stop": ac.early_stop, "debug": ac.debug}


def apply_activation_checkpointing(model: nn.Module, ac: ActivationCheckpoint, pareto_dir: str | None = None) -> None:
    """Checkpoint the blocks of `model.layers` as `ac.mode` (none | full | selective | memory_budget) and
    `ac.selective_ac_option` ("N" | "op") say. With memory_budget, set the compiler's budget instead (and with
    visualize_memory_budget_pareto, draw each compiled graph's trade-off as an SVG in `pareto_dir`).

    "Every N-th block" counts by layer id, not by position on this rank, so a pipeline stage checkpoints the
    same blocks it would in an unsplit model.
    """
    # The budget is process-wide: every build sets it (1.0, torch's default, when the mode is another), so a run
    # never inherits the budget of an earlier one in the same process (the tests' worker pools run many).
    budget = ac.mode == "memory_budget"
    set_activation_memory_budget(ac.memory_budget if budget else 1.0,
                                 pareto_dir if budget and ac.visualize_memory_budget_pareto else None)
    if ac.mode in ("none", "memory_budget"):
        return
    options = checkpoint_options(ac)
    for layer_id, block in model.layers.items():
        if ac.mode == "full":
            checkpoint_module(block, **options)
        elif ac.selective_ac_option == "op":
            checkpoint_module(block, per_op_policy, **options)
        elif (int(layer_id) + 1) % int(ac.selective_ac_option) == 0:
            checkpoint_module(block, **options)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether `apply_activation_checkpointing` made `module` checkpoint its forward."""
    return isinstance(module, _CheckpointedForward)

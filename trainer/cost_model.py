"""Predicted step time of one layout (trainer/planner.py): compute at an achievable fraction of the device peak, plus
the collectives each parallelism issues, over intra- or inter-node bandwidth, less what torch overlaps.

Per optimizer step on the slowest rank:
- compute: training FLOPs of its tokens (trainer.models.llama.flops_per_token, attention included) split over tp,
  cp and pp, times the recompute of activation checkpointing (full: the forward again, 4/3; a selective every-N:
  1 + 1/(3N); per-op: wk, wo and w3 rerun, ~1.12 on Llama 3 8B).
- FSDP: per microbatch an all-gather of the rank's unsharded parameters in forward and again in backward (unless
  they stay unsharded: reshard never) and a reduce-scatter of the gradients. Under PP torch's pipeline stages turn
  FSDP's gradient sync off and reduce-scatter once after the last backward (PipelineStage.perform_reduce_grad),
  and with the blocks kept unsharded (reshard default under PP) they are gathered once a step. FSDP2 prefetches
  the next block's all-gather during this block's compute, so only what exceeds the compute shows, plus the first
  block's gather.
- HSDP: one all-reduce of the sharded gradients over dp_replicate per block wherever FSDP reduce-scatters, half of
  it hidden under backward. DDP (dp_replicate alone, or x cp when cp replicates parameters): one all-reduce of the
  whole gradients per step (its C++ reducer skips the sync on all but the last microbatch), in buckets of
  trainer.parallel.ddp.BUCKET_CAP_MB.
- TP with sequence parallel: per block two all-gathers and two reduce-scatters of the activations in forward and as
  many in backward (and again in a recomputed forward), exposed (no async TP). Loss parallel adds nothing that
  matters.
- CP: the ring passes K and V around cp - 1 times per block in forward and twice as much in backward, exposed.
- PP: the bubble: (pp - 1) / microbatches of the compute for GPipe / 1F1B, divided by the stages per rank for the
  interleaved schedules, a third of the 1F1B bubble for the zero-bubble ones; plus the sends between stages.
- optimizer: AdamW streams ~32 bytes per local parameter through memory.
- on a device whose collectives take the same cores as compute (CPU), nothing overlaps.
- framework: the device profile's measured seconds per block (forward and backward, per microbatch, times the
  recompute) of Python and autograd, and what TP (DTensor) and CP (the ring) add to it, and FSDP's per round of
  its collectives (two gathers and a reduce measured); zero on a GPU.
- more ranks than cores (CPU): everything but the matmuls (whose peak the profile already shares among the ranks)
  takes `oversubscription` times longer: the framework, the optimizer and gloo's copies and reductions (the bytes
  of a collective), but not a collective's latency, which the profile already measured among oversubscribed ranks
  (the wait until all of them are scheduled); and the bubble shows only where one rank's path, at a whole core's
  speed, is longer than all ranks' work over the cores.

Ring collectives: an all-gather or reduce-scatter of B bytes over n ranks moves B (n - 1) / n per rank, an
all-reduce twice that, and each costs (n - 1) x the device's collective latency besides. A group crosses nodes when
it spans more ranks than a node has, counting the mesh dims inside it (tp innermost, then cp, dp_shard,
dp_replicate, pp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from trainer.parallel.ddp import BUCKET_CAP_MB

if TYPE_CHECKING:
    from trainer.device_profiles import DeviceProfile

BUBBLE_SCALE = {"GPipe": 1.0, "1F1B": 1.0, "Interleaved1F1B": 1.0, "LoopedBFS": 1.0,
                "InterleavedZeroBubble": 1 / 3, "ZBVZeroBubble": 1 / 3, "DualPipeV": 1 / 3}
TP_COLLECTIVES_PER_BLOCK = 8
"""Sequence parallel: an all-gather before attention and before the FFN, a reduce-scatter after each, in forward;
the same four in backward."""
CP_PASSES_PER_BLOCK = 3
"""The ring passes K and V around once in forward and their gradients twice as much in backward."""


def recompute_factor(ac_mode: str, selective_ac_option: str, args) -> float:
    """Training FLOPs with activation checkpointing over those without, for a model of ModelArgs `args`. "op"
    (torchtitan's per-op policy) reruns wk, wo and w3 of every block: their share of the block's matmuls, of the
    forward (a third of the training FLOPs)."""
    if ac_mode == "full":
        return 4 / 3
    if ac_mode == "selective" and selective_ac_option == "op":
        d, kv, f = args.dim, args.kv_dim, args.ffn_hidden_dim
        return 1 + (d * kv + d * d + d * f) / (2 * d * d + 2 * d * kv + 3 * d * f) / 3
    if ac_mode == "selective":
        return 1 + 1 / (3 * int(selective_ac_option))
    return 1.0


@dataclass
class StepShape:
    """What the cost model needs of a layout, in numbers (filled by the planner)."""

    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    schedule: str | None
    stages_per_rank: int
    microbatches: int
    """Pipeline microbatches per local batch (1 without PP)."""
    accum_steps: int
    tokens_per_rank: int
    """Tokens one rank's forward sees per local batch: local_batch x seq_len / cp."""
    train_flops: float
    """FLOPs of one local batch on one rank (after the tp / cp / pp split), without recompute."""
    recompute: float
    unsharded_param_bytes: int
    """The rank's parameters unsharded over FSDP, in the compute dtype: what FSDP all-gathers."""
    grad_reduce_bytes: int
    """The same parameters in the gradient-reduce dtype: what FSDP reduce-scatters."""
    local_params: int
    reshard: bool
    """Whether FSDP gathers the blocks again in backward."""
    n_layers_rank: int
    dim: int
    kv_dim: int
    act_bytes: int
    """Bytes of one activation element (the compute dtype)."""
    ddp: bool = False
    """dp_replicate (and cp, with context_parallel_replicate_parameters) is torch's DDP, not FSDP2."""


def step_seconds(s: StepShape, dev: DeviceProfile, gpus_per_node: int) -> dict[str, float]:
    """Seconds of one optimizer step on the slowest rank, by part, and the total."""
    o = dev.oversubscription

    def ring(bytes_: float, n: int, inner: int, count: int) -> float:
        """`count` ring all-gathers / reduce-scatters over `n` ranks `inner` apart, moving `bytes_` in all."""
        if n == 1:
            return 0.0
        crosses = inner * n > gpus_per_node
        bandwidth = dev.inter_node_bandwidth if crosses else dev.intra_node_bandwidth
        return o * bytes_ * (n - 1) / n / bandwidth + count * (n - 1) * dev.collective_latency

    compute = s.train_flops * s.recompute / (dev.peak_flops * dev.achievable)
    fsdp_n, blocks = 1 if s.ddp else s.dp_shard * s.cp, max(1, s.n_layers_rank)
    if s.pp > 1:  # gradients reduced once a step; blocks gathered once unless resharded after each forward
        gathers, reduces = (2 * s.microbatches if s.reshard else 1), 1
    else:
        gathers, reduces = (2 if s.reshard else 1), s.microbatches
    fsdp = (ring(gathers * s.unsharded_param_bytes, fsdp_n, s.tp, gathers * blocks)
            + ring(reduces * s.grad_reduce_bytes, fsdp_n, s.tp, reduces * blocks))
    fsdp_exposed = max(0.0, fsdp - compute) + fsdp / blocks if dev.overlaps_comm else fsdp
    # An all-reduce is a reduce-scatter and an all-gather; about half of it hides under backward.
    all_reduce = 1 if dev.overlaps_comm else 2
    replicate = replicate_step = 0.0
    if s.ddp:
        buckets = math.ceil(s.grad_reduce_bytes / (BUCKET_CAP_MB * 2**20))
        replicate_step = all_reduce * ring(s.grad_reduce_bytes, s.dp_replicate * s.cp, s.tp, buckets)
    else:
        replicate = all_reduce * ring(reduces * s.grad_reduce_bytes / fsdp_n, s.dp_replicate, s.tp * fsdp_n,
                                      reduces * blocks)
    mb_tokens = s.tokens_per_rank / s.microbatches
    # sequence parallel's collectives, half of them forward's, again in the recomputed part of the forward (the
    # forward is a third of the training FLOPs: 3 (recompute - 1) of it runs twice)
    tp_count = TP_COLLECTIVES_PER_BLOCK * s.n_layers_rank * (1 + 1.5 * (s.recompute - 1))
    tp = ring(tp_count * mb_tokens * s.dim * s.act_bytes, s.tp, 1, tp_count) * s.microbatches
    kv_bytes = 2 * mb_tokens * s.kv_dim / s.tp * s.act_bytes
    cp = ring(CP_PASSES_PER_BLOCK * s.n_layers_rank * s.cp * kv_bytes, s.cp, s.tp,
              CP_PASSES_PER_BLOCK * s.n_layers_rank) * s.microbatches
    # The framework's own cost per block (zero on a GPU, where it hides under the kernels): forward and backward of
    # every microbatch, recomputed forward included; on time-shared cores it takes `o` times longer.
    # FSDP's part goes with its collectives (copies in and out of the flat buffers, the waits), measured where each
    # block gathers twice and reduces once: under PP it is paid once a step, not per microbatch, and a recomputed
    # forward reuses the blocks gathered for backward.
    framework = o * ((dev.block_overhead + (dev.tp_block_overhead if s.tp > 1 else 0.0)
                      + (dev.cp_block_overhead if s.cp > 1 else 0.0)) * s.n_layers_rank * s.microbatches * s.recompute
                     + (dev.fsdp_block_overhead * s.n_layers_rank * (gathers + reduces) / 3 if fsdp_n > 1 else 0.0))
    pp = bubble = 0.0
    if s.pp > 1:
        # each stage sends its output forward and receives its gradient back, per microbatch
        sends = 2 * s.stages_per_rank * s.microbatches
        pp = sends * (o * mb_tokens * s.dim * s.act_bytes / dev.inter_node_bandwidth + dev.collective_latency)
    per_batch = compute + fsdp_exposed + replicate + tp + cp + pp + framework
    if s.pp > 1:
        staged = compute + tp + cp + framework  # the work that waits on the stage before
        bubble = staged * (s.pp - 1) / (s.microbatches * s.stages_per_rank) * BUBBLE_SCALE[s.schedule]
        # A rank idle in the bubble leaves its core to the others: with more ranks than cores the step takes
        # max(all ranks' work over the cores, one rank's path at a whole core's speed).
        if o > 1:
            bubble = max(0.0, (per_batch + bubble) / o - per_batch)
    optimizer = o * 32 * s.local_params / dev.memory_bandwidth
    k = s.accum_steps
    parts = {"compute": compute * k, "fsdp": fsdp_exposed * k, "replicate": replicate * k + replicate_step,
             "tp": tp * k, "cp": cp * k, "pp": pp * k, "framework": framework * k, "bubble": bubble * k,
             "optimizer": optimizer}
    parts["total"] = (per_batch + bubble) * k + replicate_step + optimizer
    return parts

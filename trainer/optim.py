"""Optimizer, learning-rate schedule and gradient clipping."""

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.optim.lr_scheduler import LambdaLR

from trainer.config.job_config import LRScheduler, Optimizer


def optimizer_kernel(implementation: str, params: list[nn.Parameter]) -> str:
    """optimizer.implementation with `auto` resolved: fused (one kernel over every tensor) when every parameter is a
    floating-point tensor on one device type with a fused kernel (CUDA or CPU), else foreach. On CPU the fused
    kernel is one vectorized pass: foreach runs each op over every tensor in turn and allocates its intermediates,
    2.2M parameters (a TP rank of the benchmark model) cost 15 ms of CPU per step with foreach and 2.3 ms fused
    (1 thread, `time.thread_time`)."""
    if implementation != "auto":
        return implementation
    devices = {p.device.type for p in params}
    fusable = len(devices) == 1 and devices <= {"cuda", "cpu"} and all(p.is_floating_point() for p in params)
    return "fused" if fusable else "foreach"


def build_optimizer(params: list[nn.Parameter], cfg: Optimizer) -> torch.optim.Optimizer:
    """AdamW / Adam with the configured kernel (auto, for-loop, foreach or fused; see `optimizer_kernel`); with
    early_step_in_backward, one per parameter stepped in backward (trainer/optim_in_backward.py)."""
    cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[cfg.name]
    impl = {"for-loop": {"foreach": False, "fused": False}, "foreach": {"foreach": True},
            "fused": {"fused": True}}[optimizer_kernel(cfg.implementation, params)]

    def make(group: list[nn.Parameter]) -> torch.optim.Optimizer:
        return cls(group, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay,
                   **impl)

    if cfg.early_step_in_backward:
        from trainer.optim_in_backward import OptimizerInBackward  # which builds on this module's norm helpers

        return OptimizerInBackward(params, make)
    return make(params)


def lr_factor(step: int, cfg: LRScheduler, total_steps: int) -> float:
    """Multiplier of the peak lr after `step` optimizer steps: linear warmup, a stable phase, then decay.

    The first step runs at lr / (warmup_steps + 1) rather than 0, so no step is wasted.
    """
    warmup = min(cfg.warmup_steps, total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    after = total_steps - warmup
    decay_steps = after if cfg.decay_ratio is None else round(after * cfg.decay_ratio)
    stable_end = total_steps - decay_steps
    if step < stable_end or decay_steps == 0:
        return 1.0
    progress = min((step - stable_end) / decay_steps, 1.0)
    shape = {"linear": 1.0 - progress, "sqrt": 1.0 - math.sqrt(progress),
             "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[cfg.decay_type]
    return cfg.min_lr_factor + (1.0 - cfg.min_lr_factor) * shape


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: LRScheduler, total_steps: int) -> LambdaLR:
    """A LambdaLR stepping once per optimizer step along `lr_factor`."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg, total_steps))


def norm_group(grad: torch.Tensor) -> tuple[tuple, torch.Tensor]:
    """(key, local tensor) of one gradient for the global norm: gradients sharded over the same mesh dims share a
    key, and their squares are summed over those dims once per key (`total_norm`)."""
    if not isinstance(grad, DTensor):
        return (None, ()), grad
    if any(p.is_partial() for p in grad.placements):  # unreduced sums: reduce them before squaring
        grad = grad.redistribute(placements=[Replicate() if p.is_partial() else p for p in grad.placements])
    # Shard and _StridedShard (FSDP over TP), which is no Shard subclass in torch 2.13: not replicated.
    sharded = tuple(i for i, p in enumerate(grad.placements) if not p.is_replicate())
    return (grad.device_mesh, sharded), grad.to_local()


def local_squares(local: list[torch.Tensor]) -> torch.Tensor:
    """Sum of squares of local tensors. On CUDA one foreach norm (its reductions are accurate in fp32). torch's CPU
    fp32 norm kernel accumulates sequentially (~1e-4 relative error on a 2048x256 gradient, 7e-4 at 4096^2), so on
    CPU each tensor's squares, exact per element whatever the sharding, are summed in fp64: layouts that shard a
    gradient differently agree to ~1e-15 (an fp32 sum of each shard moved them ~1e-8 apart, enough to change the
    clip factor), at 4 ms of CPU for 4.4M parameters against 9.4 ms for a foreach norm in fp64 (1 thread)."""
    if local[0].device.type == "cpu":
        wide = [t if t.dtype in (torch.float32, torch.float64) else t.float() for t in local]  # bf16 squares: exact
        return torch.stack([torch.sum(t * t, dtype=torch.float64) for t in wide]).sum()
    return torch.stack(torch._foreach_norm(local, 2.0)).square().sum()


def total_norm(squares: dict[tuple, torch.Tensor], device, pp_group=None) -> torch.Tensor:
    """The global L2 norm from each group's local sum of squares (keys from `norm_group`): summed over the group's
    shard dims, then over groups, then over pipeline stages. No host sync."""
    device = torch.device(device if device is not None else "cpu")
    total = torch.zeros((), device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    for (mesh, sharded), group_squares in squares.items():
        if sharded:  # each rank holds a part of these gradients: add the parts' squares up over the shard dims
            partial = [Partial() if i in sharded else Replicate() for i in range(mesh.ndim)]
            group_squares = DTensor.from_local(group_squares, mesh, partial).full_tensor()
        total = total + group_squares.to(total.dtype)
    if pp_group is not None:  # each stage holds different parameters: sum squares over stages
        torch.distributed.all_reduce(total, group=pp_group)
    return total.sqrt().float()


@torch.no_grad()
def clip_grad_norm_(params: list[nn.Parameter], max_norm: float, pp_group=None,
                    norm_skip: list[nn.Parameter] = ()) -> torch.Tensor:
    """Clip to the true global L2 norm over every shard (DTensor) and every pipeline stage; return that norm.

    `norm_skip`: parameters left out of the norm (still clipped) because another stage counts the same weight,
    e.g. the last stage's copy of tied embeddings. No host sync: the norm stays a device tensor until someone
    logs it. max_norm <= 0 only measures.
    """
    skip = {id(p) for p in norm_skip}
    # One foreach norm over the local shards of each group of gradients that is sharded over the same mesh dims,
    # then one sum of squares over those dims per group. torch._foreach_norm on the DTensors themselves would go
    # through DTensor's sharding propagation for a foreach op over mixed placements (seconds on a 3-D mesh's first
    # step, see the scaling below), and get_total_norm has no fp64 accumulation.
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None and id(p) not in skip:
            key, local = norm_group(p.grad)
            groups.setdefault(key, []).append(local)
    squares = {key: local_squares(local) for key, local in groups.items()}
    total = total_norm(squares, params[0].device if params else None, pp_group)
    if max_norm > 0:
        # Scaling is elementwise, so it runs on each shard's local tensor: a foreach op over DTensors of mixed
        # placements goes through DTensor's sharding propagation, which took seconds on a 3-D mesh's first step.
        # (torch.nn.utils.clip_grads_with_norm_'s arithmetic, which needs parameters, not shards).
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
        torch._foreach_mul_(local, torch.clamp(max_norm / (total + 1e-6), max=1.0))
    return total

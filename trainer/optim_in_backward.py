"""optimizer.early_step_in_backward: each parameter is updated by its own optimizer as soon as its gradient is
complete in backward, and the gradient is freed at once, so the whole model's gradients never exist together.

torch's recipe (one optimizer per parameter, stepped from `register_post_accumulate_grad_hook`). FSDP2 calls those
hooks on the sharded parameter after its reduce-scatter, so with FSDP the step sees the averaged shard.

`OptimizerInBackward` is one torch Optimizer to everything else: its single param group (all parameters) is what
the LR scheduler drives and what checkpoints save, and its `state` is the very dict every per-parameter optimizer
writes into (keys are distinct parameters). So `state_dict()` has exactly the layout of one AdamW over every
parameter, DCP's get/set_state_dict path is unchanged, and a checkpoint moves between runs with and without it.
"""

from collections.abc import Callable

import torch
from torch import nn

from trainer.config import ConfigError, JobConfig
from trainer.optim import local_squares, norm_group, total_norm


def check_early_step(cfg: JobConfig, accum_steps: int, ddp: bool = False) -> None:
    """What optimizer.early_step_in_backward cannot compose with (config-only conflicts are in validate()). `ddp`:
    the layout replicates with DDP, whose all-reduce runs after the hooks that would step each parameter."""
    if cfg.optimizer.early_step_in_backward and ddp:
        raise ConfigError(f"optimizer.early_step_in_backward = true with pure replication "
                          f"(parallelism.data_parallel_replicate_degree = "
                          f"{cfg.parallelism.data_parallel_replicate_degree}, run by DDP): each parameter would step "
                          f"before its gradient is averaged; shard instead (data_parallel_shard_degree > 1, "
                          f"replicate degree 1), or early_step_in_backward = false")
    if cfg.optimizer.early_step_in_backward and accum_steps > 1:
        raise ConfigError(f"optimizer.early_step_in_backward = true with gradient accumulation ({accum_steps} "
                          f"micro-batches per step): each micro-batch's backward would step the optimizer; set "
                          f"training.global_batch_size to local_batch_size x data-parallel degree, or "
                          f"early_step_in_backward = false")


class OptimizerInBackward(torch.optim.Optimizer):
    """Per-parameter optimizers stepped in backward, seen from outside as one optimizer (see the module doc).

    `make(params)` builds one optimizer (AdamW, ...) over a list of parameters. `step()` steps the parameters that
    still hold a gradient (none after a backward; every one in DCP's state initialisation, which sets zero
    gradients and calls step). The squared norms of the gradients it stepped are kept until `grad_norm()`.
    """

    def __init__(self, params: list[nn.Parameter], make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]):
        unique = list({id(p): p for p in params}.values())  # a tied weight is one parameter, stepped once
        template = make(unique[:1])
        super().__init__(unique, {k: v for k, v in template.param_groups[0].items() if k != "params"})
        self._optimizers = {p: template if i == 0 else make([p]) for i, p in enumerate(unique)}
        self._share_state()
        self._squares: dict[tuple, list[torch.Tensor]] = {}
        self._handles = [p.register_post_accumulate_grad_hook(self._step_param) for p in unique]

    def _share_state(self) -> None:
        for optimizer in self._optimizers.values():
            optimizer.state = self.state

    @torch.no_grad()
    def _step_param(self, param: nn.Parameter) -> None:
        key, local = norm_group(param.grad)
        self._squares.setdefault(key, []).append(local_squares([local]))
        optimizer = self._optimizers[param]
        # The scheduler (and a checkpoint load) set the hyperparameters of the one group: pass them on.
        optimizer.param_groups[0].update({k: v for k, v in self.param_groups[0].items() if k != "params"})
        optimizer.step()
        param.grad = None

    def step(self, closure=None) -> None:
        for param in self._optimizers:
            if param.grad is not None:
                self._step_param(param)

    def grad_norm(self, pp_group=None) -> torch.Tensor:
        """The global L2 norm of the gradients stepped since the last call (over every shard and stage)."""
        squares = {key: torch.stack(values).sum() for key, values in self._squares.items()}
        self._squares = {}
        device = next(iter(self._optimizers)).device
        return total_norm(squares, device, pp_group)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # replaces self.state: point the per-parameter optimizers at it again
        self._share_state()

"""Run N training steps of the real Trainer under torchrun and dump what a parity test compares.

    torchrun --nproc-per-node K tests/distributed/run_steps.py OUT.pt --section.key value ...

Writes (from rank 0) a dict: losses (global mean per step), grad_norms, params_after_step1 (full tensors of the
whole model, gathered over pipeline stages), world_size. Every rank drives the same Trainer.train_step the
training loop uses.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.config import load_config
from trainer.distributed import shutdown
from trainer.train import Trainer


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Every parameter of the whole model as a full tensor, by its unsplit name."""
    # full_tensor() is a collective: every rank calls it for every parameter, in the same order.
    state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().cpu()
             for part in trainer.model_parts for name, p in part.named_parameters()}
    if trainer.pipeline is None:
        return state
    # Each pp rank holds only its stages: the union over the pp group is the whole model.
    parts = [None] * trainer.dims.pp
    dist.all_gather_object(parts, state, group=trainer.pipeline.group)
    state = {name: t for part in parts for name, t in part.items()}
    if trainer.model_args.tie_word_embeddings:  # the last stage's copy of the tied matrix must equal the first's
        copy = state.pop("output.weight")
        diff = (copy - state["tok_embeddings.weight"]).abs().max().item()
        assert diff == 0, f"the tied output/embedding copies diverged by {diff:.3g}"
    return state


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(argv))
    data_iter = iter(trainer.dataloader)
    losses, grad_norms, params = [], [], None
    for _ in range(trainer.cfg.training.steps):
        loss, grad_norm = trainer.train_step([next(data_iter) for _ in range(trainer.accum_steps)])
        losses.append(trainer.global_loss(loss)[0])
        grad_norms.append(grad_norm.item())
        if trainer.step == 1:
            params = full_state(trainer)
    if trainer.dist.rank == 0:
        torch.save({"losses": losses, "grad_norms": grad_norms, "params_after_step1": params,
                    "world_size": trainer.dist.world_size}, out_path)
    trainer.close()
    shutdown(0, clean=True)


if __name__ == "__main__":
    main()

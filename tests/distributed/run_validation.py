"""Run the real training loop (Trainer.train) under torchrun and record what the validation tests compare.

    torchrun --nproc-per-node K tests/distributed/run_validation.py OUT.pt [--dcp DIR] --section.key value ...

Writes (from rank 0) a dict: losses (step -> global mean training loss, as logged), validations (one per validation:
step, loss, tokens, batches, the full parameters validation saw, whether the RNG state was left unchanged),
world_size. With --dcp DIR, the final model is also saved there with torch.distributed.checkpoint under the key
"model" in its trained layout (what scripts/generate.py reads).
"""

import sys

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from tests.distributed.run_steps import full_state
from trainer.config import load_config
from trainer.distributed import shutdown
from trainer.train import Trainer


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    dcp_dir = None
    if argv[:1] == ["--dcp"]:
        dcp_dir, argv = argv[1], argv[2:]
    trainer = Trainer(load_config(argv))
    record = {"losses": {}, "validations": [], "world_size": trainer.dist.world_size}

    log = trainer.metrics.log

    def log_and_keep(step, loss_avg, *rest):
        record["losses"][step] = loss_avg
        return log(step, loss_avg, *rest)

    trainer.metrics.log = log_and_keep
    if trainer.validator is not None:
        validate = trainer.validator.validate

        def validate_and_keep(model_parts, step):
            params = full_state(trainer)  # the weights this validation evaluates (a collective)
            rng = torch.get_rng_state()
            result = validate(model_parts, step)
            record["validations"].append({"step": step, "loss": result.loss, "tokens": result.tokens,
                                          "batches": result.batches, "params": params,
                                          "rng_unchanged": torch.equal(rng, torch.get_rng_state()),
                                          "training_mode": all(p.training for p in model_parts)})
            return result

        trainer.validator.validate = validate_and_keep
    trainer.train()
    if dcp_dir is not None:
        dcp.save({"model": get_model_state_dict(trainer.model)}, checkpoint_id=dcp_dir)
    if trainer.dist.rank == 0:
        torch.save(record, out_path)
    trainer.close()
    shutdown(0, clean=True)


if __name__ == "__main__":
    main()

"""Run the real training loop (Trainer.train, which saves and loads its checkpoints) and record every step's loss.

    torchrun --nproc-per-node K tests/distributed/run_train.py OUT.pt [test switches] --section.key value ...

Test switches, before the config overrides:
    --signal-at-step N   the last rank sends itself SIGTERM during step N (the Trainer saves after it and stops)
    --kill-at-step N     every rank SIGKILLs itself as soon as step N's checkpoint save call returns
    --slow-writes S      checkpoint data files take S extra seconds to write (a slow disk), so that an async save
                         is still in flight at --kill-at-step

Writes (from rank 0) {"losses": {step: global mean loss}, "first_step": the first step this run trained} to OUT.
Needs metrics.log_freq = 1: the losses are the exact floats the Trainer logs.
"""

import os
import signal
import sys
import time

import torch
from torch.distributed.checkpoint import FileSystemWriter

from trainer.config import load_config
from trainer.distributed import shutdown
from trainer.train import Trainer


def main() -> None:
    out_path, argv = sys.argv[1], sys.argv[2:]
    switches = {}
    while argv and argv[0] in ("--signal-at-step", "--kill-at-step", "--slow-writes"):
        switches[argv[0][2:]] = float(argv[1])
        argv = argv[2:]
    if "slow-writes" in switches:
        write_data = FileSystemWriter.write_data

        def slow_write_data(self, plan, planner):
            time.sleep(switches["slow-writes"])
            return write_data(self, plan, planner)

        FileSystemWriter.write_data = slow_write_data

    trainer = Trainer(load_config(argv))
    assert trainer.cfg.metrics.log_freq == 1, "run_train.py records the logged loss: set metrics.log_freq = 1"
    losses, log = {}, trainer.metrics.log
    last_rank = trainer.dist.rank == trainer.dist.world_size - 1

    def record(step, loss_avg, *args, **kwargs):
        losses[step] = loss_avg
        if step == switches.get("signal-at-step") and last_rank:
            os.kill(os.getpid(), signal.SIGTERM)
        return log(step, loss_avg, *args, **kwargs)

    trainer.metrics.log = record
    if "kill-at-step" in switches:
        save = trainer.checkpointer.save

        def save_then_die(step, **kwargs):
            save(step, **kwargs)
            if step == switches["kill-at-step"]:
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.checkpointer.save = save_then_die
    first_step = trainer.step + 1
    trainer.train()
    if trainer.dist.rank == 0:
        torch.save({"losses": losses, "first_step": first_step}, out_path)
    trainer.close()
    shutdown(0, clean=True)


if __name__ == "__main__":
    main()

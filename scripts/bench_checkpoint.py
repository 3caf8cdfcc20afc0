"""Time checkpoint saves (sync and async) and resumes of a model, and measure the checkpoint's size on disk.

    python scripts/bench_checkpoint.py [--repeats 3] [--section.key value ...]                   # one process
    torchrun --nproc-per-node 2 scripts/bench_checkpoint.py --parallelism.data_parallel_shard_degree 2

Defaults: configs/debug_model.toml on synthetic data, in {job.dump_folder}/bench_checkpoint (emptied first). After
one training step (so the optimizer state exists) it saves through the Trainer's own Checkpointer and prints, per
mode, the median of: the time training is blocked by the save call, the time until the checkpoint is complete,
and the wall time of "save + 3 training steps", which shows how much of an async write overlaps training. Then the
resume time (Checkpointer.load of the newest checkpoint: model, optimizer, schedule, data, RNG).
"""

import shutil
import statistics
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.checkpoint_files import folder_bytes  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.distributed import shutdown  # noqa: E402
from trainer.train import Trainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STEPS_DURING_SAVE = 3


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def main() -> None:
    argv = sys.argv[1:]
    repeats = 3
    if argv[:1] == ["--repeats"]:
        repeats, argv = int(argv[1]), argv[2:]
    cfg = load_config(["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--training.dataset", "synthetic",
                       "--metrics.enable_tensorboard", "false", "--training.steps", "100000", *argv,
                       "--checkpoint.enable", "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "0",
                       "--checkpoint.folder", "bench_checkpoint", "--checkpoint.interval", "1"])
    folder = Path(cfg.job.dump_folder) / "bench_checkpoint"
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        shutil.rmtree(folder, ignore_errors=True)
    trainer = Trainer(cfg)
    ckpt, data = trainer.checkpointer, iter(trainer.dataloader)

    def train_steps(n: int) -> None:
        for _ in range(n):
            trainer.train_step([next(data) for _ in range(trainer.plan.accum_steps)])

    train_steps(1)
    results = {}
    for mode in ("disabled", "async"):
        ckpt.c.async_mode = mode  # the async process group exists: the run was built with async
        blocked, complete, with_steps = [], [], []
        for _ in range(repeats):
            barrier()
            start = time.perf_counter()
            ckpt.save(trainer.step)
            blocked.append(time.perf_counter() - start)
            ckpt.wait()
            barrier()
            complete.append(time.perf_counter() - start)
            train_steps(1)  # a new step number for the next save
            barrier()
            start = time.perf_counter()
            ckpt.save(trainer.step)
            train_steps(STEPS_DURING_SAVE)
            ckpt.wait()
            barrier()
            with_steps.append(time.perf_counter() - start)
        results[mode] = [statistics.median(x) for x in (blocked, complete, with_steps)]
    barrier()
    start = time.perf_counter()
    train_steps(STEPS_DURING_SAVE)
    barrier()
    steps_alone = time.perf_counter() - start
    loads = []
    for _ in range(repeats):
        barrier()
        start = time.perf_counter()
        ckpt.load()
        barrier()
        loads.append(time.perf_counter() - start)

    newest = max(folder.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    if trainer.dist.rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        params = sum(p.numel() for p in trainer.params)
        print(f"\n{cfg.model.name} {cfg.model.flavor}, {params:,} parameters, {world} rank(s) {trainer.dims}: "
              f"checkpoint {folder_bytes(newest) / 2**20:.1f} MiB ({newest}); median of {repeats}")
        print(f"{STEPS_DURING_SAVE} training steps alone: {steps_alone:.2f}s")
        for mode, (blocked, complete, with_steps) in results.items():
            print(f"save {'sync ' if mode == 'disabled' else 'async'}: training blocked {blocked:.3f}s, complete after "
                  f"{complete:.3f}s; save + {STEPS_DURING_SAVE} steps {with_steps:.2f}s")
        print(f"resume (load everything): {statistics.median(loads):.3f}s")
    trainer.close()
    shutdown(0, clean=True)


if __name__ == "__main__":
    main()

"""Peak memory per rank of each memory lever: baseline, CPU offload, full bf16, optimizer steps in backward, and
each activation-checkpointing mode, one fresh torchrun launch per case.

    PYTHONPATH=. python scripts/memory_levers.py [--dim 1024 --layers 4 --seq-len 512 --batch 2 --steps 3]
        [--ranks 2] [--ac-modes none full selective:op selective:2] [--levers baseline cpu_offload ...]
        [-- --any.config value ...]

Each case runs the real Trainer at dp_shard = --ranks on a debug Llama scaled up to where the training state
matters (dim --dim, --layers layers, vocab 2048; registered here as flavor "memory_levers"), fp32 unless the case
says otherwise. Every rank reads its own peak RSS (getrusage ru_maxrss = VmHWM: CPU has no allocator statistics)
before the first step and after the last; the table shows the largest over ranks, and the difference to the
baseline. An AC mode is "MODE" or "MODE:VALUE", VALUE going to the mode's own key (AC_VALUE_KEY), so a mode that
lands later (memory_budget:0.5) is one more argument. Arguments after `--` go to every case (e.g. compile).
Figures, not asserts: RSS also holds torch itself, and glibc keeps freed memory.
"""

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAVOR = "memory_levers"
LEVERS = {  # name -> overrides (the baseline: fp32, AC off, no offload, the optimizer after backward)
    "baseline": [],
    "cpu_offload": ["--training.enable_cpu_offload", "true"],
    "full_bf16": ["--training.dtype", "bfloat16", "--training.mixed_precision_param", "bfloat16"],
    "early_step_in_backward": ["--optimizer.early_step_in_backward", "true"],
}
AC_VALUE_KEY = {"selective": "selective_ac_option", "memory_budget": "memory_budget"}


def ac_overrides(spec: str) -> list[str]:
    """"selective:op" -> the activation_checkpoint overrides of that mode."""
    mode, _, value = spec.partition(":")
    out = ["--activation_checkpoint.mode", mode]
    if value:
        out += [f"--activation_checkpoint.{AC_VALUE_KEY[mode]}", value]
    return out


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(model: dict, steps: int, overrides: list[str]) -> None:
    """One rank of one case: train `steps` steps, then rank 0 prints every rank's RSS figures as one JSON line."""
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.distributed import shutdown
    from trainer.models.flavors import register_flavor
    from trainer.models.llama import ModelArgs
    from trainer.train import Trainer

    register_flavor("llama3", FLAVOR, ModelArgs(**model))
    trainer = Trainer(load_config(overrides))
    data_iter = iter(trainer.dataloader)
    batches = [[next(data_iter) for _ in range(trainer.plan.accum_steps)] for _ in range(steps)]
    before = _peak_rss_gib()
    losses = [trainer.train_step(batch)[0].item() for batch in batches]
    record = {"before_gib": before, "peak_gib": _peak_rss_gib(), "losses": losses}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, record)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(every), flush=True)
    trainer.close()
    shutdown(0, clean=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(name: str, overrides: list[str], args, model: dict) -> list[dict]:
    common = ["--job.config_file", "configs/debug_model.toml", "--model.flavor", FLAVOR,
              "--training.seq_len", str(args.seq_len), "--training.local_batch_size", str(args.batch),
              "--training.steps", str(args.steps), "--training.mixed_precision_param", "float32",
              "--training.max_norm", "0",  # early_step_in_backward refuses clipping: no case clips
              "--parallelism.data_parallel_shard_degree", str(args.ranks), "--metrics.enable_tensorboard", "false",
              "--metrics.log_freq", str(10**6)]
    # glibc serves a freed block's memory again from its heap but keeps it resident, and raises its mmap threshold
    # as blocks are freed: peak RSS then drifts with the allocation history. A fixed threshold maps every tensor
    # above 64 KiB on its own and unmaps it when freed, so peak RSS follows the peak of live tensors.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.ranks)),
           "LOG_RANK": "0", "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), __file__, "--child",
           json.dumps(model), str(args.steps), *common, *overrides, *args.extra]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
        return
    argv, extra = (sys.argv[1:], []) if "--" not in sys.argv else \
        (sys.argv[1:sys.argv.index("--")], sys.argv[sys.argv.index("--") + 1:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2, help="dp_shard degree (one rank per process)")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=list(LEVERS))
    parser.add_argument("--ac-modes", nargs="+", default=["full", "selective:op", "selective:2"],
                        help="activation_checkpoint modes, MODE or MODE:VALUE (none is the baseline)")
    args = parser.parse_args(argv)
    args.extra = extra
    model = {"dim": args.dim, "n_layers": args.layers, "n_heads": args.dim // 64, "vocab_size": 2048,
             "rope_theta": 500000.0}
    cases = {name: LEVERS[name] for name in args.levers}
    cases.update({f"activation_checkpoint {spec}": ac_overrides(spec) for spec in args.ac_modes if spec != "none"})
    print(f"llama3 dim {args.dim} x {args.layers} layers (vocab 2048), dp_shard {args.ranks} on CPU (gloo), seq "
          f"{args.seq_len} x batch {args.batch} per rank, {args.steps} steps, fp32 unless the case says otherwise"
          f"{' | ' + ' '.join(extra) if extra else ''}")
    print(f"{'case':34} {'RSS before step 1':>18} {'peak RSS':>10} {'peak - baseline':>16} {'peak - before':>14}")
    baseline = None
    for name, overrides in cases.items():
        ranks = run_case(name, overrides, args, model)
        before, peak = max(r["before_gib"] for r in ranks), max(r["peak_gib"] for r in ranks)
        baseline = peak if baseline is None else baseline
        print(f"{name:34} {before:15.2f} GiB {peak:6.2f} GiB {peak - baseline:+12.2f} GiB {peak - before:10.2f} GiB",
              flush=True)
    print("(GiB, max over ranks: ru_maxrss of each rank; 'before' is after building the model, optimizer and data)")


if __name__ == "__main__":
    main()

"""Peak memory and step time per activation-checkpointing mode, eager and compiled, one fresh process each.

    PYTHONPATH=. python scripts/ac_memory.py --seq-len 1024 --batch 8 --steps 4 [--compile] [--threads 2]
    PYTHONPATH=. python scripts/ac_memory.py --compile --modes none full "budget 1.0" "budget 0.5" "budget 0.0"

The "budget B" cases are mode = memory_budget with memory_budget = B: they need compile, so they run only in the
compiled pass.

Each case runs the real Trainer (debug model, fp32, 1 process) for --steps steps in its own subprocess, so peak RSS
(ru_maxrss: CPU has no allocator statistics) belongs to that case alone, and a compiled case starts with an empty
inductor cache (cold compile). Prints a table: RSS before the first step (weights, data, torch itself), peak RSS,
their difference (activations + gradients + optimizer state), the first step's time and the median of the rest.
Figures, not asserts: the machine is shared and timings move.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {  # name -> overrides
    "none": ["--activation_checkpoint.mode", "none"],
    "selective 2": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "2"],
    "selective op": ["--activation_checkpoint.mode", "selective", "--activation_checkpoint.selective_ac_option", "op"],
    "full": ["--activation_checkpoint.mode", "full"],
    **{f"budget {b}": ["--activation_checkpoint.mode", "memory_budget", "--activation_checkpoint.memory_budget", b]
       for b in ("1.0", "0.5", "0.0")},
}


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(steps: int, overrides: list[str]) -> None:
    """Inside the subprocess: build the Trainer, time `steps` steps, print one JSON line."""
    from trainer.config import load_config
    from trainer.train import Trainer

    trainer = Trainer(load_config(overrides))
    data_iter = iter(trainer.dataloader)
    batches = [[next(data_iter) for _ in range(trainer.plan.accum_steps)] for _ in range(steps)]
    before, times, losses = _rss_gib(), [], []
    for batch in batches:
        start = time.perf_counter()
        loss, _ = trainer.train_step(batch)
        losses.append(loss.item())  # waits for the step, so the time is the step's
        times.append(time.perf_counter() - start)
    print(json.dumps({"rss_before_gib": before, "peak_rss_gib": _rss_gib(), "step_s": times, "losses": losses}))


def run_case(name: str, compiled: bool, args) -> dict:
    overrides = ["--job.config_file", "configs/debug_model.toml", "--training.seq_len", str(args.seq_len),
                 "--training.local_batch_size", str(args.batch), "--training.steps", str(args.steps),
                 "--training.mixed_precision_param", "float32", "--metrics.enable_tensorboard", "false",
                 "--compile.enable", str(compiled).lower(), *CASES[name]]
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
               "TORCHINDUCTOR_CACHE_DIR": cache}
        proc = subprocess.run([sys.executable, __file__, "--child", str(args.steps), *overrides], env=env, cwd=ROOT,
                              capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{name} (compile {compiled}) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also run each mode compiled")
    parser.add_argument("--modes", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    print(f"debug model, fp32, 1 process, {args.threads} threads, seq {args.seq_len} x batch {args.batch}, "
          f"{args.steps} steps")
    print(f"{'mode':<14}{'compile':<9}{'RSS before':>11}{'peak RSS':>10}{'delta':>8}{'step 1':>9}{'steady':>9}  loss 1")
    for compiled in ([False, True] if args.compile else [False]):
        for name in args.modes:
            if name.startswith("budget") and not compiled:
                continue
            r = run_case(name, compiled, args)
            steady = statistics.median(r["step_s"][1:]) if len(r["step_s"]) > 1 else float("nan")
            print(f"{name:<14}{'yes' if compiled else 'no':<9}{r['rss_before_gib']:>9.2f}Gi"
                  f"{r['peak_rss_gib']:>8.2f}Gi{r['peak_rss_gib'] - r['rss_before_gib']:>6.2f}Gi"
                  f"{r['step_s'][0]:>8.2f}s{steady:>8.3f}s  {r['losses'][0]:.6f}", flush=True)


if __name__ == "__main__":
    main()

"""Time to first step: `./run_train.sh --training.steps 1` on the default config (the debug model), repeated.

    python scripts/startup_time.py [--repeats 5] [--ngpu 1] [--imports] [--root CHECKOUT] [-- run_train.sh args]

Per run: the wall time to the step-1 log line and to the exit, and the CPU time (user + sys) of every process the
run started, which a loaded machine inflates far less than the wall time; then min and median of each, with the
load average before the runs. `--imports`: also the wall and CPU time of `import trainer.train` in a fresh
interpreter. `--root`: time another checkout's run_train.sh (e.g. the one before a change), with its code.
Each run writes into a fresh temporary dump folder. Compare figures only from runs taken back to back.
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict, first_line: str | None = None) -> tuple[float, float | None, float, int, str]:
    """Run `cmd` to its end: (wall s, wall s to the first output line containing `first_line`, CPU s of every
    process it started and waited for, exit code, its output)."""
    cpu0, t0, first = _children_cpu(), time.perf_counter(), None
    proc = subprocess.Popen(cmd, env=env, cwd=env["PYTHONPATH"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if first is None and first_line is not None and first_line in line:
            first = time.perf_counter() - t0
    code = proc.wait()
    return time.perf_counter() - t0, first, _children_cpu() - cpu0, code, "".join(lines)


def summary(name: str, values: list[float]) -> str:
    return f"{name}: min {min(values):.2f} s, median {statistics.median(values):.2f} s ({len(values)} runs)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ngpu", type=int, default=1)
    parser.add_argument("--imports", action="store_true", help="also time `import trainer.train` alone")
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout to time (default: this one)")
    parser.add_argument("extra", nargs="*", help="more run_train.sh arguments (after --)")
    args = parser.parse_args()
    root = args.root.resolve()
    env = {**os.environ, "NGPU": str(args.ngpu), "PYTHONPATH": str(root)}
    load = os.getloadavg()
    print(f"{root}/run_train.sh; {os.cpu_count()} cores; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
          f"NGPU={args.ngpu}")
    walls, firsts, cpus = [], [], []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as dump:
            cmd = [str(root / "run_train.sh"), "--training.steps", "1", "--job.dump_folder", dump, *args.extra]
            wall, first, cpu, code, out = timed(cmd, env, first_line="step:     1")
        if code != 0:
            sys.exit(f"run {i + 1} exited {code}:\n{out[-3000:]}")
        walls.append(wall)
        cpus.append(cpu)
        firsts.append(first if first is not None else wall)
        print(f"run {i + 1}: wall {wall:.2f} s (step 1 logged at {firsts[-1]:.2f} s), CPU {cpu:.2f} s", flush=True)
    print(summary("wall", walls))
    print(summary("to step 1", firsts))
    print(summary("CPU (user+sys)", cpus))
    if args.imports:
        runs = [timed([sys.executable, "-c", "import trainer.train"], env) for _ in range(args.repeats)]
        print(summary("import trainer.train, wall", [run[0] for run in runs]))
        print(summary("import trainer.train, CPU", [run[2] for run in runs]))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()

"""Check the layout planner (trainer/planner.py) against measurements on this machine's CPU.

    python scripts/plan_check.py memory     # >= 8 layouts, 1-8 ranks: predicted vs measured peak memory per rank
    python scripts/plan_check.py speed      # 6+ layouts on 4 ranks: predicted vs measured tokens/s, Spearman rank

Each layout runs through run_train.sh via scripts/bench.py (warm-up steps left out, figures from every rank's
TensorBoard scalars), back to back, on the debug model scaled up in sequence length so that activations dominate
(memory: seq 2048, local batch 4; speed: seq 512, local batch 8; fp32, synthetic data). Measured memory is the
fullest rank's peak RSS minus the RSS of a process that has only imported the trainer (measured first), with glibc's
mmap threshold fixed (MALLOC_MMAP_THRESHOLD_=131072, see below) so that the RSS follows the live tensors; predicted
is the planner's fullest rank with `--device cpu`. The speed check first calibrates the CPU profile again
(trainer/cpu_calibration.py: gloo, the framework's cost per block, the wait of a collective among ranks that
time-share the cores; and the matmul peak, whose cache keeps its highest measurement), then runs every layout
--repeats times round-robin and compares the median. Run it on a quiet machine: other processes change the measured
throughput and the calibration alike. Writes a Markdown table to stdout and the raw figures to --out (JSON).
"""

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import bench_layout  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.device_profiles import GiB, cpu_profile  # noqa: E402
from trainer.planner import Layout, Planner  # noqa: E402

MEMORY_LAYOUTS = [
    Layout(1, 1, 1, 1, 1), Layout(1, 1, 1, 1, 1, ac_mode="full"), Layout(1, 2, 1, 1, 1),
    Layout(1, 4, 1, 1, 1, ac_mode="full"),
    Layout(1, 1, 1, 2, 1), Layout(1, 2, 1, 2, 1), Layout(1, 1, 2, 1, 1), Layout(1, 1, 1, 1, 2, "1F1B", 1),
    Layout(1, 2, 2, 2, 1, ac_mode="full"), Layout(1, 2, 1, 1, 2, "Interleaved1F1B", 1, ac_mode="full"),
]
SPEED_LAYOUTS = [
    Layout(1, 4, 1, 1, 1), Layout(2, 2, 1, 1, 1), Layout(4, 1, 1, 1, 1), Layout(1, 2, 1, 2, 1), Layout(1, 1, 1, 4, 1),
    Layout(1, 1, 4, 1, 1), Layout(1, 2, 1, 1, 2, "1F1B", 1), Layout(1, 4, 1, 1, 1, ac_mode="full"),
]
# memory: two steps reach the peak (AdamW's state exists from the first), so no warm-up steps are measured apart.
SHAPES = {"memory": {"seq_len": 2048, "batch": 4, "warmup": 1, "steps": 1},
          "speed": {"seq_len": 512, "batch": 8, "warmup": 2, "steps": 5}}


def import_baseline_gib(env: dict) -> float:
    """Peak RSS of a process that imported the trainer and nothing more."""
    code = "import resource, trainer.train; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip()) / 2**20


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r

    rx, ry, n = ranks(xs), ranks(ys), len(xs)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("memory", "speed"))
    ap.add_argument("--flavor", default="debugmodel")
    ap.add_argument("--warmup", type=int, help="steps left out (default: 1 for memory, 2 for speed)")
    ap.add_argument("--steps", type=int, help="steps measured (default: 1 for memory, 5 for speed)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--first", type=int, default=0, help="only the first N layouts (a smoke test)")
    ap.add_argument("--repeats", type=int, default=2, help="speed: runs of each layout (the median counts)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "plan_check.json"))
    args = ap.parse_args()
    shape = SHAPES[args.what]
    bench_args = argparse.Namespace(flavor=args.flavor, seq_len=shape["seq_len"], batch=shape["batch"],
                                    warmup=shape["warmup"] if args.warmup is None else args.warmup,
                                    steps=args.steps or shape["steps"], dtype="float32", threads=0,
                                    timeout=args.timeout)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), LOG_RANK="0")
    if args.what == "memory":
        # glibc raises its mmap threshold after large frees, so later tensors come from the heap and their memory
        # stays in the RSS after they die (a 1-rank AC-full run: 1.42 GiB peak RSS by default, 0.82 GiB with a
        # fixed threshold). Fixed, every tensor above 128 KiB is its own mapping and the RSS follows live tensors.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    common = ["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--model.flavor", args.flavor,
              "--training.seq_len", str(shape["seq_len"]), "--training.mixed_precision_param", "float32",
              "--training.dataset", "synthetic"]
    baseline = import_baseline_gib(env) if args.what == "memory" else 0.0
    if args.what == "speed":  # calibrate the CPU profile now, in the conditions the layouts then run in
        print(json.dumps(dataclasses.asdict(cpu_profile(4, measure=True))), file=sys.stderr, flush=True)
    rows = []
    layouts = [dataclasses.replace(lay, local_batch=shape["batch"])
               for lay in (MEMORY_LAYOUTS if args.what == "memory" else SPEED_LAYOUTS)[:args.first or None]]
    # Repeats go round the layouts (A B C ... A B C ...), so that a change in the machine's load touches them all.
    runs = {lay: [] for lay in layouts}
    for _ in range(args.repeats if args.what == "speed" else 1):
        for layout in layouts:
            ranks = layout.dp_replicate * layout.dp_shard * layout.cp * layout.tp * layout.pp
            overrides = {**layout.overrides(), "training.dataset": "synthetic"}
            if not any("skipped" in r for r in runs[layout]):
                runs[layout].append(bench_layout(layout.describe(), ranks, overrides, bench_args, env))
                print(json.dumps({k: v for k, v in runs[layout][-1].items() if k != "command"}), file=sys.stderr,
                      flush=True)
    for layout, results in runs.items():
        ranks = layout.dp_replicate * layout.dp_shard * layout.cp * layout.tp * layout.pp
        cfg = load_config([*common, "--training.local_batch_size", str(shape["batch"])])
        est = Planner(cfg, ranks, "cpu", ranks).estimate(layout)
        name = f"{layout.describe()} {layout.schedule} AC {layout.ac_mode}".replace("  ", " ")
        row = {**results[-1], "layout": name,
               "predicted_gib": est.memory["total"] / GiB, "predicted_tokens_per_s": est.tokens_per_second * ranks,
               "predicted_seconds": est.seconds}
        if "skipped" not in row:
            row["measured_gib"] = max(max(r["memory_gib_per_rank"]) for r in results) - baseline
            row["measured_tokens_per_s"] = statistics.median(r["global_tokens_per_step"] / r["step_time_median_s"]
                                                             for r in results)
            row["measured_tokens_per_s_all"] = [r["global_tokens_per_step"] / r["step_time_median_s"] for r in results]
        rows.append(row)
    done = [r for r in rows if "skipped" not in r]
    if args.what == "memory":
        print(f"import baseline {baseline:.2f} GiB (subtracted from every measured peak)\n")
        print("| ranks | layout | predicted GiB | measured GiB | error |\n|---|---|---|---|---|")
        for r in done:
            err = r["predicted_gib"] / r["measured_gib"] - 1
            print(f"| {r['ranks']} | {r['layout']} | {r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {err:+.0%} |")
    else:
        rho = spearman([r["predicted_tokens_per_s"] for r in done], [r["measured_tokens_per_s"] for r in done])
        print("| layout | predicted tokens/s | measured tokens/s |\n|---|---|---|")
        for r in done:
            print(f"| {r['layout']} | {r['predicted_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} |")
        print(f"\nSpearman rank correlation over {len(done)} layouts: {rho:.2f}")
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['layout']}: {r['skipped']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"baseline_gib": baseline, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

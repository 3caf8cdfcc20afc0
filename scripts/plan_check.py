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
throughput and the calibration alike. Writes a Markdown table to stdout and the raw figures, the calibration and
the predictions to --out (JSON, default benchmarks/plan_check_{memory,speed}.json).

    python scripts/plan_check.py memory --layouts 9          # one layout of the table (0-based index)
    python scripts/plan_check.py speed --measured benchmarks/plan_check_speed.json   # re-predict, run nothing

--measured re-predicts a previous run's figures with this checkout's model (and, for speed, that run's own CPU
calibration), so the cost model can be improved against one quiet measurement without measuring again.
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
from trainer.device_profiles import GiB, cpu_calibration, cpu_profile_from  # noqa: E402
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


def layout_name(layout: Layout) -> str:
    return f"{layout.describe()} {layout.schedule} AC {layout.ac_mode}".replace("  ", " ")


def measure(args, layouts: list[Layout], shape: dict, env: dict) -> list[dict]:
    """Run every layout (speed: --repeats times, round-robin) and return one row per layout of raw figures."""
    bench_args = argparse.Namespace(flavor=args.flavor, seq_len=shape["seq_len"], batch=shape["batch"],
                                    warmup=shape["warmup"] if args.warmup is None else args.warmup,
                                    steps=args.steps or shape["steps"], dtype="float32", threads=0,
                                    timeout=args.timeout)
    # Repeats go round the layouts (A B C ... A B C ...), so that a change in the machine's load touches them all.
    runs = {lay: [] for lay in layouts}
    for _ in range(args.repeats if args.what == "speed" else 1):
        for layout in layouts:
            overrides = {**layout.overrides(), "training.dataset": "synthetic"}
            if not any("skipped" in r for r in runs[layout]):
                runs[layout].append(bench_layout(layout.describe(), ranks_of(layout), overrides, bench_args, env))
                print(json.dumps({k: v for k, v in runs[layout][-1].items() if k != "command"}), file=sys.stderr,
                      flush=True)
    rows = []
    for layout, results in runs.items():
        row = {**results[-1], "layout": layout_name(layout), "spec": dataclasses.asdict(layout)}
        if "skipped" not in row:
            row["measured_peak_gib"] = max(max(r["memory_gib_per_rank"]) for r in results)
            row["measured_tokens_per_s"] = statistics.median(r["global_tokens_per_step"] / r["step_time_median_s"]
                                                             for r in results)
            row["measured_tokens_per_s_all"] = [r["global_tokens_per_step"] / r["step_time_median_s"] for r in results]
        rows.append(row)
    return rows


def ranks_of(layout: Layout) -> int:
    return layout.dp_replicate * layout.dp_shard * layout.cp * layout.tp * layout.pp


def predict(rows: list[dict], what: str, flavor: str, calibration: dict | None) -> None:
    """Add this checkout's predictions to measured rows (in place), on the CPU profile of `calibration` (the
    figures the measurement's own calibration took) when given, else this machine's."""
    shape = SHAPES[what]
    cfg = load_config(["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--model.flavor", flavor,
                       "--training.seq_len", str(shape["seq_len"]), "--training.mixed_precision_param", "float32",
                       "--training.dataset", "synthetic", "--training.local_batch_size", str(shape["batch"])])
    for row in rows:
        layout = Layout(**row["spec"])
        ranks = ranks_of(layout)
        planner = Planner(cfg, ranks, "cpu", ranks)
        if calibration is not None:
            planner.device = cpu_profile_from(calibration, ranks)
        est = planner.estimate(layout)
        row.update(predicted_gib=est.memory["total"] / GiB, predicted_tokens_per_s=est.tokens_per_second * ranks,
                   predicted_seconds=est.seconds,
                   predicted_gib_per_pp_rank=[m["total"] / GiB for m in est.memory_per_rank])


def report(rows: list[dict], what: str, baseline: float) -> None:
    done = [r for r in rows if "skipped" not in r]
    if what == "memory":
        print(f"import baseline {baseline:.2f} GiB (subtracted from every measured peak)\n")
        print("| ranks | layout | predicted GiB | measured GiB | error |\n|---|---|---|---|---|")
        for r in done:
            measured = r["measured_peak_gib"] - baseline
            print(f"| {r['ranks']} | {r['layout']} | {r['predicted_gib']:.2f} | {measured:.2f} | "
                  f"{r['predicted_gib'] / measured - 1:+.0%} |")
    else:
        rho = spearman([r["predicted_tokens_per_s"] for r in done], [r["measured_tokens_per_s"] for r in done])
        print("| layout | predicted tokens/s | measured tokens/s | error |\n|---|---|---|---|")
        for r in done:
            print(f"| {r['layout']} | {r['predicted_tokens_per_s']:,.0f} | {r['measured_tokens_per_s']:,.0f} | "
                  f"{r['predicted_tokens_per_s'] / r['measured_tokens_per_s'] - 1:+.0%} |")
        print(f"\nSpearman rank correlation over {len(done)} layouts: {rho:.2f}")
    for r in rows:
        if "skipped" in r:
            print(f"skipped {r['layout']}: {r['skipped']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("memory", "speed"))
    ap.add_argument("--flavor", default="debugmodel")
    ap.add_argument("--warmup", type=int, help="steps left out (default: 1 for memory, 2 for speed)")
    ap.add_argument("--steps", type=int, help="steps measured (default: 1 for memory, 5 for speed)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--layouts", help="only these layouts, by their 0-based index in the table, e.g. 9 or 0,3")
    ap.add_argument("--first", type=int, default=0, help="only the first N layouts (a smoke test)")
    ap.add_argument("--repeats", type=int, default=2, help="speed: runs of each layout (the median counts)")
    ap.add_argument("--out", help="the raw figures and predictions, JSON (default: benchmarks/plan_check_WHAT.json; "
                                  "with --measured, only where given)")
    ap.add_argument("--measured", metavar="FILE",
                    help="run nothing: re-predict the figures a previous run wrote to --out (with that run's CPU "
                         "calibration) and print the table again")
    args = ap.parse_args()
    if args.measured:
        data = json.loads(Path(args.measured).read_text())
        rows = data["rows"]
        for row in rows:  # files written before rows carried their layout's fields
            row.setdefault("spec", next(dataclasses.asdict(lay) for lay in MEMORY_LAYOUTS + SPEED_LAYOUTS
                                        if layout_name(lay) == row["layout"]) | {"local_batch": SHAPES[args.what]["batch"]})
            if "measured_gib" in row and "measured_peak_gib" not in row:
                row["measured_peak_gib"] = row["measured_gib"] + data["baseline_gib"]
        predict(rows, args.what, data.get("flavor", args.flavor), data.get("calibration"))
        report(rows, args.what, data["baseline_gib"])
        if args.out:  # the same figures with this checkout's predictions
            Path(args.out).write_text(json.dumps(data, indent=1))
        return
    args.out = args.out or str(ROOT / "benchmarks" / f"plan_check_{args.what}.json")
    shape = SHAPES[args.what]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(PYTHONPATH=str(ROOT), LOG_RANK="0")
    if args.what == "memory":
        # glibc raises its mmap threshold after large frees, so later tensors come from the heap and their memory
        # stays in the RSS after they die (a 1-rank AC-full run: 1.42 GiB peak RSS by default, 0.82 GiB with a
        # fixed threshold). Fixed, every tensor above 128 KiB is its own mapping and the RSS follows live tensors.
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    baseline = import_baseline_gib(env) if args.what == "memory" else 0.0
    calibration = None
    if args.what == "speed":  # calibrate the CPU profile now, in the conditions the layouts then run in
        calibration = cpu_calibration(measure=True)
        print(json.dumps(calibration), file=sys.stderr, flush=True)
    table = MEMORY_LAYOUTS if args.what == "memory" else SPEED_LAYOUTS
    chosen = [table[int(i)] for i in args.layouts.split(",")] if args.layouts else table[:args.first or None]
    rows = measure(args, [dataclasses.replace(lay, local_batch=shape["batch"]) for lay in chosen], shape, env)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    data = {"what": args.what, "flavor": args.flavor, "baseline_gib": baseline, "calibration": calibration,
            "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=1))
    predict(rows, args.what, args.flavor, calibration)
    report(rows, args.what, baseline)
    Path(args.out).write_text(json.dumps(data, indent=1))  # with the predictions of this checkout


if __name__ == "__main__":
    main()

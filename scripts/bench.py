"""Throughput, MFU, memory and scaling efficiency of every landed layout, beside a plain PyTorch loop.

Each layout runs through the real launcher (run_train.sh) on the benchmark model (llama3 `benchmodel`: dim 256,
4 layers, 4 heads, ffn 768, vocab 2048; seq 128, micro-batch 4 per data-parallel rank, fp32). Warm-up steps are
left out; each layout is repeated and reported as median and min-max. Figures come from every rank's TensorBoard
scalars. The baseline row is scripts/plain_loop.py: the same model and data in a loop with no trainer code.

    python scripts/bench.py --quick          # a few layouts, one repeat: under 10 minutes on 2 CPU cores
    python scripts/bench.py                  # the full grid, 3 repeats -> benchmarks/results.{md,json,png}
    NGPU=8 python scripts/bench.py --device-ranks 8 --flavor 8B --seq-len 2048   # on an 8-GPU node

MFU on CPU is against one fp32 matmul peak of the whole machine (all cores), measured here; on CUDA against the
device's peak for --dtype (trainer.metrics.GPU_PEAK_FLOPS) times the ranks, and not reported for a GPU the table
lacks.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.models.flavors import get_model_args  # noqa: E402
from trainer.models.llama import flops_per_token  # noqa: E402

P = "parallelism."
# name -> (ranks, overrides). Local batch is per data-parallel rank, so global batch grows with dp (weak scaling).
LAYOUTS = {
    "1 process": (1, {}),
    "FSDP dp_shard=2": (2, {P + "data_parallel_shard_degree": 2}),
    "FSDP dp_shard=2 reshard never": (2, {P + "data_parallel_shard_degree": 2,
                                          P + "fsdp_reshard_after_forward": "never"}),
    "DDP dp_replicate=2": (2, {P + "data_parallel_replicate_degree": 2, P + "data_parallel_shard_degree": 1}),
    "HSDP 2x2": (4, {P + "data_parallel_replicate_degree": 2, P + "data_parallel_shard_degree": 2}),
    "FSDP dp_shard=4": (4, {P + "data_parallel_shard_degree": 4}),
    "TP tp=2": (2, {P + "tensor_parallel_degree": 2, P + "data_parallel_shard_degree": 1}),
    "TP tp=2 no SP": (2, {P + "tensor_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                          P + "enable_sequence_parallel": "false"}),
    "FSDP+TP 2x2": (4, {P + "tensor_parallel_degree": 2, P + "data_parallel_shard_degree": 2}),
    "PP pp=2 1F1B": (2, {P + "pipeline_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                         P + "pipeline_parallel_schedule": "1F1B"}),
    "PP pp=2 GPipe": (2, {P + "pipeline_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                          P + "pipeline_parallel_schedule": "GPipe"}),
    "PP pp=2 Interleaved1F1B": (2, {P + "pipeline_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                                    P + "pipeline_parallel_schedule": "Interleaved1F1B"}),
    "CP cp=2": (2, {P + "context_parallel_degree": 2, P + "data_parallel_shard_degree": 1}),
    "CP cp=2 reshard never": (2, {P + "context_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                                  P + "fsdp_reshard_after_forward": "never"}),
    "CP cp=2 replicated (DDP)": (2, {P + "context_parallel_degree": 2, P + "data_parallel_shard_degree": 1,
                                     P + "context_parallel_replicate_parameters": "true"}),
    "DDP+TP 2x2": (4, {P + "data_parallel_replicate_degree": 2, P + "data_parallel_shard_degree": 1,
                       P + "tensor_parallel_degree": 2}),
    "TP+PP 2x2 1F1B": (4, {P + "tensor_parallel_degree": 2, P + "pipeline_parallel_degree": 2,
                           P + "data_parallel_shard_degree": 1, P + "pipeline_parallel_schedule": "1F1B"}),
}
QUICK = ["1 process", "FSDP dp_shard=2", "DDP dp_replicate=2", "TP tp=2", "PP pp=2 1F1B", "CP cp=2"]


def machine_peak_flops(dtype=torch.float32) -> float:
    """fp32 matmul FLOP/s with every core, the best of a few timed 2048^2 products."""
    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    torch.mm(a, b)
    best = 0.0
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * 2048**3 / (time.perf_counter() - start))
    return best


def _cpu_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(cmd: list[str], env: dict, timeout: int) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; return it with its wall time and the fraction of the machine other processes used."""
    busy0, ours0, t0 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    others = (_cpu_busy_seconds() - busy0) - (_children_cpu_seconds() - ours0)
    return proc, wall, max(0.0, others) / (wall * (os.cpu_count() or 1))


def read_scalars(run_dir: Path) -> dict[int, dict[str, list[tuple[int, float]]]]:
    """rank -> tag -> [(step, value)] from every rank's TensorBoard folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = {}
    for rank_dir in sorted(run_dir.glob("tb/*/rank_*")):
        acc = EventAccumulator(str(rank_dir))
        acc.Reload()
        out[int(rank_dir.name.split("_")[1])] = {t: [(e.step, e.value) for e in acc.Scalars(t)]
                                                 for t in acc.Tags()["scalars"]}
    return out


# Every step logged, TensorBoard on every rank: the figures are read back from there.
METRICS = {"metrics.log_freq": 1, "metrics.enable_tensorboard": "true", "metrics.save_for_all_ranks": "true"}


def add_set_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a trainer config override for every layout, e.g. "
                         "--set parallelism.fsdp_reshard_after_forward=never (repeatable)")


def layout_flags(args, dump: str, overrides: dict, extra: dict) -> dict:
    """The trainer flags of one layout on the benchmark model: shape and steps from `args`, then `extra` (metrics,
    profiling), then the layout's `overrides`, then every --set."""
    sets = dict(kv.split("=", 1) for kv in getattr(args, "set", []))
    return {"model.flavor": args.flavor, "training.seq_len": args.seq_len, "training.local_batch_size": args.batch,
            "training.steps": args.warmup + args.steps, "training.mixed_precision_param": args.dtype,
            "job.dump_folder": dump, "lr_scheduler.warmup_steps": 2, **extra, **overrides, **sets}


def bench_layout(name: str, ranks: int, overrides: dict, args, env_base: dict,
                 launcher: list[str] | None = None) -> dict:
    """One repeat of one layout through run_train.sh (or `launcher`, e.g. `python -m trainer.train --job.config_file
    ...` for one process without torchrun); figures after the warm-up steps."""
    with tempfile.TemporaryDirectory() as dump:
        flags = layout_flags(args, dump, overrides, METRICS)
        cli = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
        threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
        env = {**env_base, "NGPU": str(ranks), "OMP_NUM_THREADS": str(threads)}
        launch = launcher or [str(ROOT / "run_train.sh")]
        proc, wall, busy = run_measured([*launch, *cli], env, timeout=args.timeout)
        shown = [a for k, v in flags.items() if k != "job.dump_folder" for a in (f"--{k}", str(v))]
        launch_text = "./run_train.sh" if launcher is None else " ".join(
            "python" if a == sys.executable else str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT)) else a
            for a in launcher)
        command = f"NGPU={ranks} OMP_NUM_THREADS={threads} {launch_text} " + " ".join(shown)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            return {"layout": name, "ranks": ranks, "skipped": reason[:300], "command": command}
        scalars = read_scalars(Path(dump))
    non_dp = 1
    for key in ("tensor_parallel_degree", "pipeline_parallel_degree", "context_parallel_degree"):
        non_dp *= int(overrides.get(P + key, 1))
    dp = ranks // non_dp
    step_times = [v for s, v in scalars[0]["time_metrics/end_to_end(s)"] if s > args.warmup]
    memory = [max(v for _, v in per["memory/max_reserved(GiB)"]) for per in scalars.values()]
    global_tokens = args.batch * args.seq_len * dp
    return {"layout": name, "ranks": ranks, "threads_per_rank": threads, "dp": dp,
            "step_time_median_s": statistics.median(step_times), "step_time_min_s": min(step_times),
            "step_time_max_s": max(step_times), "global_tokens_per_step": global_tokens,
            "memory_gib_per_rank": memory, "busy_fraction": busy, "wall_s": wall, "command": command}


def bench_plain(args, env_base: dict, extra: list[str] = ()) -> dict:
    """The baseline: scripts/plain_loop.py on the same model and data, all cores in one process; `extra`: more
    plain_loop.py arguments (--device, --dtype, --dataset, --compile)."""
    cmd = [sys.executable, str(ROOT / "scripts/plain_loop.py"), "--flavor", args.flavor, "--seq-len",
           str(args.seq_len), "--batch", str(args.batch), "--steps", str(args.warmup + args.steps),
           "--warmup", str(args.warmup), *extra]
    env = {**env_base, "OMP_NUM_THREADS": str(args.threads or os.cpu_count() or 1)}
    proc, wall, busy = run_measured(cmd, env, timeout=args.timeout)
    if proc.returncode != 0:
        return {"layout": "plain PyTorch loop", "ranks": 1, "skipped": proc.stderr[-300:], "command": " ".join(cmd)}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"layout": "plain PyTorch loop", "ranks": 1, "threads_per_rank": res["threads"], "dp": 1,
            "step_time_median_s": res["step_time_median_s"], "step_time_min_s": res["step_time_median_s"],
            "step_time_max_s": res["step_time_median_s"], "global_tokens_per_step": args.batch * args.seq_len,
            "memory_gib_per_rank": [res.get("memory_gib", float("nan"))], "busy_fraction": busy, "wall_s": wall,
            "command": "python scripts/plain_loop.py " + " ".join(cmd[2:])}


def summarize(repeats: list[dict], fpt: int, peak: float | None, base_tps: float | None,
              peak_per_rank: bool = False) -> dict:
    """Median and min-max over repeats of one layout."""
    ok = [r for r in repeats if "skipped" not in r]
    if not ok:
        return repeats[0]
    tps = sorted(r["global_tokens_per_step"] / r["step_time_median_s"] for r in ok)
    med = statistics.median(tps)
    first = ok[0]
    if peak is not None and peak_per_rank:
        peak *= first["ranks"]
    return {"layout": first["layout"], "ranks": first["ranks"], "threads_per_rank": first["threads_per_rank"],
            "tokens_per_s": med, "tokens_per_s_min": tps[0], "tokens_per_s_max": tps[-1],
            "tokens_per_s_per_rank": med / first["ranks"],
            "step_time_median_s": statistics.median(r["step_time_median_s"] for r in ok),
            "step_time_min_s": min(r["step_time_min_s"] for r in ok),
            "step_time_max_s": max(r["step_time_max_s"] for r in ok),
            "memory_gib_per_rank": max(max(r["memory_gib_per_rank"]) for r in ok),
            "efficiency": med / base_tps if base_tps else None, "mfu_pct": 100 * med * fpt / peak if peak else None,
            "busy_fraction": max(r["busy_fraction"] for r in ok), "repeats": len(ok), "command": first["command"]}


def write_outputs(rows: list[dict], meta: dict, out_dir: Path) -> None:
    """results.json (raw), results.md (the table) and results.png (tokens/s and memory by layout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Benchmark: {meta['model']}", "",
             f"{meta['device']}; {meta['date']}; peak {meta['peak_tflops'] or float('nan'):.3f} TFLOP/s "
             f"({meta['peak_note']}); "
             f"{meta['warmup']} warm-up + {meta['steps']} measured steps, {meta['repeats']} repeat(s)"
             + "".join(f"; --set {kv}" for kv in meta.get("set", [])) + ".", "",
             "| ranks | layout | tokens/s (min–max) | tokens/s/rank | step time ms (min–max) | memory/rank GiB | "
             "efficiency | MFU | machine busy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['ranks']} | {r['layout']} | skipped: {r['skipped'][:80]} | | | | | | |")
            continue
        eff = f"{r['efficiency']:.2f}" if r["efficiency"] is not None else "—"
        mfu = f"{r['mfu_pct']:.1f}%" if r["mfu_pct"] is not None else "—"
        busy = f"{100 * r['busy_fraction']:.0f}%" + (" ⚠" if r["busy_fraction"] > 0.1 else "")
        lines.append(f"| {r['ranks']} | {r['layout']} | {r['tokens_per_s']:,.0f} ({r['tokens_per_s_min']:,.0f}–"
                     f"{r['tokens_per_s_max']:,.0f}) | {r['tokens_per_s_per_rank']:,.0f} | "
                     f"{1e3 * r['step_time_median_s']:.1f} ({1e3 * r['step_time_min_s']:.1f}–"
                     f"{1e3 * r['step_time_max_s']:.1f}) | {r['memory_gib_per_rank']:.2f} | {eff} | "
                     f"{mfu} | {busy} |")
    lines += ["", "Efficiency: global tokens/s over the 1-process trainer's. ⚠: other processes used more than 10% "
              "of the machine during that layout.", "", "Commands:", ""]
    lines += [f"- {r['layout']}: `{r['command']}`" for r in rows]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e .[bench]): no chart", file=sys.stderr)
        return
    done = [r for r in rows if "skipped" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    names = [f"{r['layout']} ({r['ranks']})" for r in done]
    ax1.barh(names, [r["tokens_per_s"] for r in done],
             xerr=[[r["tokens_per_s"] - r["tokens_per_s_min"] for r in done],
                   [r["tokens_per_s_max"] - r["tokens_per_s"] for r in done]], color="tab:blue")
    ax1.set_xlabel("global tokens/s")
    ax1.invert_yaxis()
    ax2.barh(names, [r["memory_gib_per_rank"] for r in done], color="tab:orange")
    ax2.set_xlabel("peak memory per rank (GiB)")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle(f"{meta['model']} on {meta['device']}")
    fig.tight_layout()
    fig.savefig(out_dir / "results.png", dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a few layouts, one repeat")
    ap.add_argument("--layouts", nargs="*", help=f"subset of: {', '.join(LAYOUTS)}")
    ap.add_argument("--flavor", default="benchmodel")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per data-parallel rank")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per rank (default: cores / ranks)")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    add_set_option(ap)
    args = ap.parse_args()
    names = args.layouts or (QUICK if args.quick else list(LAYOUTS))
    repeats = 1 if args.quick else args.repeats
    env_base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env_base.update(PYTHONPATH=str(ROOT), LOG_RANK="0")

    margs = get_model_args("llama3", args.flavor)
    fpt = flops_per_token(margs, args.seq_len)
    cuda = torch.cuda.is_available()
    if cuda:
        from trainer.metrics import peak_flops

        device, note = torch.cuda.get_device_name(0), f"{args.dtype} table peak per GPU"
        peak = peak_flops(torch.device("cuda", 0), getattr(torch, args.dtype), -1)
    else:
        device = f"CPU, {os.cpu_count()} cores"
        peak, note = machine_peak_flops(), "fp32 matmul 2048², all cores, measured now"

    raw, rows = {}, []
    plain = [] if cuda else [bench_plain(args, env_base) for _ in range(repeats)]
    for name in names:
        ranks, overrides = LAYOUTS[name]
        raw[name] = []
        for i in range(repeats):
            res = bench_layout(name, ranks, overrides, args, env_base)
            raw[name].append(res)
            print(json.dumps({k: v for k, v in res.items() if k != "command"}), flush=True)
            if "skipped" in res:
                break
    base = summarize(raw["1 process"], fpt, peak, None, cuda) if "1 process" in raw else None
    base_tps = base.get("tokens_per_s") if base else None
    if plain:
        rows.append(summarize(plain, fpt, peak, base_tps, cuda))
    rows += [summarize(raw[n], fpt, peak, base_tps, cuda) for n in names]
    meta = {"model": f"llama3 {args.flavor} (seq {args.seq_len}, micro-batch {args.batch}/dp rank, {args.dtype})",
            "device": device, "date": time.strftime("%Y-%m-%d %H:%M"), "peak_tflops": peak / 1e12 if peak else None,
            "peak_note": note, "warmup": args.warmup, "steps": args.steps, "repeats": repeats,
            "flops_per_token": fpt, "set": args.set, "raw": raw, "plain_raw": plain}
    write_outputs(rows, meta, Path(args.out))
    print((Path(args.out) / "results.md").read_text())


if __name__ == "__main__":
    main()

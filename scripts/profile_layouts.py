"""Where a step's time goes, per layout: compute, collectives (by kind and bytes), framework overhead, idle.

Each layout of scripts/bench.py's grid (same model, shape and overrides) runs a few steps through run_train.sh
with the trainer's own torch.profiler traces on every rank (profiling.enable_profiling); this script reads the
Chrome traces back and splits each recorded step of the main thread into:

- compute: leaf operator time (operators with no operator inside), outside FSDP's own copy-in/out;
- framework: operator time above the kernels (the self time of operators that call others: DTensor dispatch and
  redistribution, autograd nodes), FSDP copy-in/out and hooks, collective launches;
- host/Python: main-thread time outside any operator that no collective overlaps (the loop, Python glue);
- collectives (exposed): main-thread time outside operators while a gloo collective runs on a gloo thread, less
- idle: the part of that wait spent on a peer that had not yet arrived (a collective's duration on this rank
  minus its shortest duration on any rank, the same collective matched by kind and order across ranks).

Collectives are also totalled as run on the gloo threads (overlapped or not): count, MB, ms per kind.
Figures are medians over ranks of the mean over recorded steps. On a loaded machine they vary from run to run:
compare layouts within one run.

    python scripts/profile_layouts.py --layouts "DDP dp_replicate=2" "TP tp=2"   # a subset, about a minute
    python scripts/profile_layouts.py              # the whole grid -> benchmarks/profile.{md,json}
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LAYOUTS, METRICS, ROOT, add_set_option, layout_flags, run_measured  # noqa: E402

DTYPE_BYTES = {"float": 4, "c10::BFloat16": 2, "c10::Half": 2, "double": 8, "long int": 8, "int": 4,
               "unsigned char": 1, "bool": 1, "c10::Float8_e4m3fn": 1}
PARTS = ("compute", "framework", "host", "collectives", "idle")


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _bytes(event: dict) -> int:
    args = event.get("args", {})
    total = 0
    for dims, dtype in zip(args.get("Input Dims", []), args.get("Input type", [])):
        n = 1
        for d in dims if isinstance(dims, list) else []:
            n *= d if isinstance(d, int) else 1
        total += n * DTYPE_BYTES.get(dtype, 4)
    return total


def read_trace(path: Path) -> dict:
    """One rank's trace -> its steps (main-thread events per ProfilerStep span) and its gloo collectives."""
    events = [e for e in json.loads(path.read_text())["traceEvents"] if e.get("ph") == "X"]
    steps = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e["name"].startswith("ProfilerStep#"))
    main_tid = next(e["tid"] for e in events if e["name"].startswith("ProfilerStep#"))
    main = sorted((e for e in events if e["tid"] == main_tid and not e["name"].startswith("ProfilerStep#")),
                  key=lambda e: (e["ts"], -e["dur"]))
    comms = sorted((e for e in events if e["name"].startswith("gloo:")), key=lambda e: e["ts"])
    return {"steps": steps, "main": main, "comms": comms}


def split_step(trace: dict, window: tuple[float, float], idle_share: dict[int, float]) -> dict:
    """Milliseconds of one step in each part, and the collectives run in it by kind."""
    lo, hi = window
    kernels: list[tuple[float, float]] = []  # self time of aten operators: compute
    framework: list[tuple[float, float]] = []  # self time of everything else: annotations, autograd nodes, c10d
    stack: list[dict] = []
    tops: list[tuple[float, float]] = []

    def close(e: dict) -> None:
        own, t = [], e["ts"]
        for s, end in _merge(e["children"]):
            own.append((t, s))
            t = max(t, end)
        own.append((t, e["end"]))
        compute = e["name"].startswith("aten::") and not e["under_fsdp"]
        (kernels if compute else framework).extend((a, b) for a, b in own if b > a)

    for e in (e for e in trace["main"] if lo <= e["ts"] < hi):
        e = {**e, "end": min(e["ts"] + e["dur"], hi), "children": [], "under_fsdp": e["name"].startswith("FSDP::")}
        while stack and stack[-1]["end"] <= e["ts"]:
            close(stack.pop())
        if stack:
            stack[-1]["children"].append((e["ts"], e["end"]))
            e["under_fsdp"] |= stack[-1]["under_fsdp"]
        else:
            tops.append((e["ts"], e["end"]))
        stack.append(e)
    while stack:
        close(stack.pop())
    busy = _merge(tops)
    gaps = [(a, b) for a, b in zip([lo] + [e for _, e in busy], [s for s, _ in busy] + [hi]) if b > a]
    framework = _merge(framework)
    waitable = _merge(framework + gaps)  # the main thread is not computing: it may be waiting on a collective
    kinds: dict[str, dict] = defaultdict(lambda: {"count": 0, "mb": 0.0, "ms": 0.0})
    running, waits, idle = [], 0.0, 0.0
    for i, c in enumerate(trace["comms"]):
        if not lo <= c["ts"] < hi:
            continue
        kind = kinds[c["name"].removeprefix("gloo:")]
        kind["count"] += 1
        kind["mb"] += _bytes(c) / 2**20
        kind["ms"] += c["dur"] / 1e3
        running.append((c["ts"], c["ts"] + c["dur"]))
        wait = _overlap([running[-1]], waitable)
        waits += wait
        idle += wait * idle_share.get(i, 0.0)
    running = _merge(running)
    fw_wait, gap_wait = _overlap(framework, running), _overlap(gaps, running)
    exposed = fw_wait + gap_wait  # two collectives may run at once: the idle share is a weighted mean
    idle_part = exposed * (idle / waits if waits else 0.0)
    parts = {"compute": sum(b - a for a, b in _merge(kernels)) / 1e3,
             "framework": (sum(b - a for a, b in framework) - fw_wait) / 1e3,
             "host": (sum(b - a for a, b in gaps) - gap_wait) / 1e3,
             "collectives": (exposed - idle_part) / 1e3, "idle": idle_part / 1e3, "step": (hi - lo) / 1e3}
    parts.update({f"span:{e['name'].removeprefix('trainer::')}": 0.0 for e in trace["main"]
                  if e["name"].startswith("trainer::")})
    for e in trace["main"]:
        if e["name"].startswith("trainer::") and lo <= e["ts"] < hi:
            parts[f"span:{e['name'].removeprefix('trainer::')}"] += e["dur"] / 1e3
    return {"parts": parts, "kinds": kinds}


def idle_shares(traces: list[dict]) -> list[dict[int, float]]:
    """Per rank, collective index -> the fraction of its duration spent waiting for the slowest peer. The same
    collective is matched across ranks by (kind, input dims, occurrence); one that has no match on every rank of
    the same count (point-to-point, subgroups of different sizes) counts as all transfer."""
    keyed = []
    for t in traces:
        seen: dict[tuple, int] = defaultdict(int)
        keys = []
        for c in t["comms"]:
            base = (c["name"], json.dumps(c.get("args", {}).get("Input Dims")))
            keys.append((*base, seen[base]))
            seen[base] += 1
        keyed.append(keys)
    shortest: dict[tuple, float] = {}
    count: dict[tuple, int] = defaultdict(int)
    for t, keys in zip(traces, keyed):
        for c, k in zip(t["comms"], keys):
            shortest[k] = min(shortest.get(k, c["dur"]), c["dur"])
            count[k] += 1
    out = []
    for t, keys in zip(traces, keyed):
        shares = {}
        for i, (c, k) in enumerate(zip(t["comms"], keys)):
            if count[k] > 1 and c["dur"] > 0:
                shares[i] = 1.0 - shortest[k] / c["dur"]
        out.append(shares)
    return out


def profile_layout(name: str, args, env_base: dict) -> dict:
    """Run one layout with traces on every rank; return the split per rank and its median over ranks."""
    ranks, overrides = LAYOUTS[name]
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as dump:
        flags = layout_flags(args, dump, overrides, {  # metrics as bench.py's: their cost is part of its step
            **METRICS, "profiling.enable_profiling": "true", "profiling.profile_freq": total,
            "profiling.profiler_warmup": min(2, args.warmup), "profiling.profiler_active": args.steps})
        cli = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
        threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
        env = {**env_base, "NGPU": str(ranks), "OMP_NUM_THREADS": str(threads)}
        proc, wall, busy = run_measured([str(ROOT / "run_train.sh"), *cli], env, timeout=args.timeout)
        shown = " ".join(f"--{k} {v}" for k, v in flags.items() if k != "job.dump_folder")
        command = f"NGPU={ranks} OMP_NUM_THREADS={threads} ./run_train.sh {shown}"
        files = sorted(Path(dump).glob(f"profile_traces/iteration_{total}/rank*_trace.json"),
                       key=lambda p: int(p.name[4:].split("_")[0]))
        if proc.returncode != 0 or len(files) != ranks:
            reason = (proc.stderr.strip().splitlines() or ["no traces"])[-1]
            return {"layout": name, "ranks": ranks, "skipped": reason[:300], "command": command}
        traces = [read_trace(f) for f in files]
    shares = idle_shares(traces)
    per_rank = []
    for t, share in zip(traces, shares):
        splits = [split_step(t, w, share) for w in t["steps"]]
        parts = {k: statistics.mean(s["parts"].get(k, 0.0) for s in splits) for k in splits[0]["parts"]}
        kinds: dict[str, dict] = defaultdict(lambda: {"count": 0, "mb": 0.0, "ms": 0.0})
        for s in splits:
            for kind, v in s["kinds"].items():
                for f in ("count", "mb", "ms"):
                    kinds[kind][f] += v[f] / len(splits)
        per_rank.append({"parts": parts, "kinds": dict(kinds)})
    median = {k: statistics.median(r["parts"].get(k, 0.0) for r in per_rank) for k in per_rank[0]["parts"]}
    kinds = {}
    for kind in sorted({k for r in per_rank for k in r["kinds"]}):
        kinds[kind] = {f: statistics.median(r["kinds"].get(kind, {}).get(f, 0.0) for r in per_rank)
                       for f in ("count", "mb", "ms")}
    return {"layout": name, "ranks": ranks, "threads_per_rank": threads, "step_ms": median["step"],
            "parts_ms": {k: median[k] for k in PARTS}, "collectives": kinds,
            "spans_ms": {k.removeprefix("span:"): v for k, v in median.items() if k.startswith("span:")},
            "per_rank": per_rank,
            "busy_fraction": busy, "wall_s": wall, "command": command}


def write_outputs(rows: list[dict], meta: dict, out_dir: Path) -> None:
    """profile.json (every rank) and profile.md (the median rank's split)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "profile.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# Step profile: {meta['model']}", "",
             f"{meta['device']}; {meta['date']}; {meta['steps']} recorded steps after {meta['warmup']}, "
             "torch.profiler on every rank; median over ranks; ms per step (share of the step)"
             + "".join(f"; --set {kv}" for kv in meta["set"]) + ".", "",
             "| layout (ranks) | step ms | compute | framework | host/Python | collectives (exposed) | idle | "
             "collectives run (count × kind, MB, ms) | grad norm, log ms | machine busy |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['layout']} ({r['ranks']}) | skipped: {r['skipped'][:80]} | | | | | | | | |")
            continue
        cells = [f"{r['parts_ms'][k]:.0f} ({100 * r['parts_ms'][k] / r['step_ms']:.0f}%)" for k in PARTS]
        comms = "; ".join(f"{v['count']:.0f}× {k} {v['mb']:.1f} MB {v['ms']:.0f} ms"
                          for k, v in r["collectives"].items()) or "—"
        busy = f"{100 * r['busy_fraction']:.0f}%" + (" ⚠" if r["busy_fraction"] > 0.1 else "")
        spans = ", ".join(f"{r['spans_ms'].get(k, 0.0):.1f}" for k in ("grad_norm", "log"))
        lines.append(f"| {r['layout']} ({r['ranks']}) | {r['step_ms']:.0f} | {' | '.join(cells)} | {comms} | {spans} "
                     f"| {busy} |")
    lines += ["", "Parts (see scripts/profile_layouts.py): compute = leaf operators; framework = operator time above "
              "the kernels (DTensor dispatch, autograd nodes), FSDP copies and hooks, collective launches; "
              "host/Python = main thread outside operators with no collective running; collectives = main thread "
              "waiting on a running gloo collective; idle = the part of that wait spent on a late peer. The profiler "
              "itself adds time to every operator. Grad norm, log: the trainer's spans (norm and clipping; the "
              "logging step's loss all-gather, console line and TensorBoard write), inside the parts. ⚠: other "
              "processes used more than 10% of the machine.", "",
              "Commands:", ""]
    lines += [f"- {r['layout']}: `{r['command']}`" for r in rows]
    (out_dir / "profile.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", nargs="*", help=f"subset of: {', '.join(LAYOUTS)}")
    ap.add_argument("--flavor", default="benchmodel")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=4, help="micro-batch per data-parallel rank")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--warmup", type=int, default=3, help="steps before the recorded ones")
    ap.add_argument("--steps", type=int, default=2, help="recorded steps")
    ap.add_argument("--threads", type=int, default=0, help="OMP threads per rank (default: cores / ranks)")
    ap.add_argument("--timeout", type=int, default=600)
    ap.add_argument("--out", default=str(ROOT / "benchmarks"))
    add_set_option(ap)
    args = ap.parse_args()
    names = args.layouts or list(LAYOUTS)
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        ap.error(f"unknown layouts {unknown}; choose from: {', '.join(LAYOUTS)}")
    env_base = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env_base.update(PYTHONPATH=str(ROOT), LOG_RANK="0")
    rows = []
    for name in names:
        row = profile_layout(name, args, env_base)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("per_rank", "command")}), flush=True)
    meta = {"model": f"llama3 {args.flavor} (seq {args.seq_len}, micro-batch {args.batch}/dp rank, {args.dtype})",
            "device": f"CPU, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
            "warmup": args.warmup, "steps": args.steps, "set": args.set}
    write_outputs(rows, meta, Path(args.out))
    print((Path(args.out) / "profile.md").read_text())


if __name__ == "__main__":
    main()

"""The GPU check: one command that measures the trainer on one GPU and checks what only CUDA can show.

    ./scripts/gpu_check.sh                        # installs what is missing (scripts/install.sh), then this script
    python scripts/gpu_check.py [--out benchmarks] [--budget-s 420] [--only 1B ...]
    python scripts/gpu_check.py --cpu-smoke --out /tmp/smoke     # the same, end to end, on CPU in about a minute

Rows (GPU): Llama 3.2 1B and 3B, and Llama 3.1 8B cut to 4 layers (flavor 8B-4L), at seq 2048 and 8192, about 16k
tokens per step, synthetic data, compile + selective (per-op) activation checkpointing:
- the trainer in bf16 (fp32 master weights, bf16 autocast), and with float8 linears (model.converters =
  ["quantize.linear.float8"], the output projection kept in bf16);
- scripts/plain_loop.py, a plain PyTorch loop on the same model, batch and bf16 autocast, its blocks compiled and
  nothing recomputed, for the ratio trainer / plain.
Each gives tokens/s, TFLOP/s (6·N + attention, trainer.models.llama.flops_per_token), MFU against 989 TFLOP/s (the
dense bf16 peak of the H100 SXM and H200) and the peak reserved CUDA memory. The float8 rows are measured against
the same bf16 peak.

Checks: an async checkpoint with pinned memory (checkpoint.async_mode = "async_with_pinned_mem") resumes
bit-exactly (run A saves step 2 in the background and step 4; run B resumes from A's step 2 and saves step 4; the
two step-4 checkpoints, every tensor and value, and the losses of steps 3-4 must be equal); a profiler trace with
GPU kernels and a CUDA memory snapshot are written; scripts/generate.py gives the same greedy tokens on CUDA as on
CPU (fp32, a sharpened debug model, so that no choice is a near tie); in bf16 on CUDA, how many agree is reported.

Every row and check is its own process, through the trainer's entry point (`python -m trainer.train` with CLI
overrides, timed by scripts/bench.py from the trainer's own TensorBoard scalars), so one that fails, runs out of
memory or times out is reported and the others still run (on CPU two checks at a time, the rows always alone).
{out}/gpu.json and {out}/gpu.md are rewritten after each one; what would start after the time budget is listed
as not run. Rows run cheapest-first: the checks, then the bf16 rows, then float8.

--cpu-smoke runs the same on CPU with the debug model: seq 64, 4 sequences per step, fp32, no compile, float8
emulated, the plain loop in fp32; the checks that CPU can do (no pinned staging, no memory snapshot; generation
compares the KV-cached CPU run with the uncached one).
"""

import argparse
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

from bench import bench_layout, bench_plain, read_scalars, summarize  # noqa: E402
from trainer.metrics import gpu_peak_flops  # noqa: E402
from trainer.models.flavors import get_model_args  # noqa: E402
from trainer.models.llama import flops_per_token  # noqa: E402

# MFU is against one peak on any GPU, so that figures compare: the H100 SXM's and H200's dense bf16 peak, 989.4
# TFLOP/s, from the trainer's table.
H100_H200_BF16_PEAK = gpu_peak_flops("NVIDIA H200", torch.bfloat16)
TOKENIZER = ROOT / "tests/assets/tokenizer"
FLOAT8 = {"model.converters": "quantize.linear.float8", "quantize.linear.float8.filter_fqns": "output"}
SELECTIVE_AC = {"activation_checkpoint.mode": "selective", "activation_checkpoint.selective_ac_option": "op"}


@dataclass
class Mode:
    """What a run of this script measures and where."""

    device: str
    models: list[tuple[str, str]]
    """(label, llama3 flavor)."""
    seqs: list[int]
    tokens_per_step: int
    dtype: str
    compile: bool
    warmup: int
    steps: int
    float8: dict
    budget_s: float
    row_timeout_s: float
    min_start_s: float
    """A row or check is not started with less of the budget left."""
    concurrent_checks: int
    """Checks run side by side (their processes are one thread each on CPU; one at a time on the one GPU)."""
    check_seq: int
    check_dtype: str


GPU = Mode(device="cuda", models=[("Llama 3.2 1B", "1B"), ("Llama 3.2 3B", "3B"), ("Llama 3.1 8B, 4 layers", "8B-4L")],
           seqs=[2048, 8192], tokens_per_step=16384, dtype="bfloat16", compile=True, warmup=3, steps=5,
           float8=FLOAT8, budget_s=420, row_timeout_s=240, min_start_s=40, concurrent_checks=1, check_seq=256,
           check_dtype="bfloat16")
CPU_SMOKE = Mode(device="cpu", models=[("debug model", "debugmodel")], seqs=[64], tokens_per_step=256,
                 dtype="float32", compile=False, warmup=1, steps=2,
                 float8={**FLOAT8, "quantize.linear.float8.emulate": True}, budget_s=110, row_timeout_s=240,
                 min_start_s=5, concurrent_checks=2, check_seq=32, check_dtype="float32")


@dataclass
class Row:
    """One throughput measurement: the trainer (bf16 or float8) or the plain loop, on one model and sequence."""

    label: str
    flavor: str
    seq: int
    batch: int
    precision: str
    """bf16 / fp32 / float8."""
    runner: str
    """trainer or plain."""
    result: dict = field(default_factory=lambda: {"status": "not run", "reason": "time budget"})

    @property
    def name(self) -> str:
        return f"{self.flavor} seq {self.seq} {self.precision} {self.runner}"


def plan_rows(mode: Mode) -> list[Row]:
    """Every row, in the order they run: bf16 trainer and plain by sequence length, then float8."""
    dtype = "bf16" if mode.dtype == "bfloat16" else "fp32"
    rows = []
    for precision, runners in ((dtype, ("trainer", "plain")), ("float8", ("trainer",))):
        for seq in mode.seqs:
            for label, flavor in mode.models:
                batch = max(1, mode.tokens_per_step // seq)
                rows += [Row(label, flavor, seq, batch, precision, runner) for runner in runners]
    return rows


def trainer_launcher() -> list[str]:
    return [sys.executable, "-m", "trainer.train", "--job.config_file", str(ROOT / "configs/debug_model.toml")]


def trainer_overrides(row: Row, mode: Mode, peak: float) -> dict:
    """The config a trainer row sets on top of scripts/bench.py's (model, seq, batch, steps, dtype, logging)."""
    return {"training.dataset": "synthetic", "compile.enable": mode.compile, **SELECTIVE_AC,
            "metrics.peak_flops": peak, "debug.seed": 0, "checkpoint.enable": False,
            **(mode.float8 if row.precision == "float8" else {})}


def run_row(row: Row, mode: Mode, peak: float, env: dict, timeout: float) -> dict:
    """Measure one row in its own process (scripts/bench.py's runners); a failure is the row's result."""
    args = SimpleNamespace(flavor=row.flavor, seq_len=row.seq, batch=row.batch, warmup=mode.warmup,
                           steps=mode.steps, dtype=mode.dtype, threads=int(os.environ.get("OMP_NUM_THREADS", "0")),
                           timeout=timeout)
    fpt = flops_per_token(get_model_args("llama3", row.flavor), row.seq)
    start = time.perf_counter()
    try:
        if row.runner == "plain":
            extra = ["--device", mode.device, "--dtype", mode.dtype, "--dataset", "synthetic",
                     "--peak-flops", str(peak), *(["--compile"] if mode.compile else [])]
            raw = bench_plain(args, env, extra)
        else:
            raw = bench_layout(row.name, 1, trainer_overrides(row, mode, peak), args, env, launcher=trainer_launcher())
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
    except Exception as e:  # e.g. a run that ended without its scalars: this row's failure, not the whole run's
        return {"status": "failed", "reason": f"{type(e).__name__}: {str(e)[:300]}",
                "wall_s": time.perf_counter() - start}
    if "skipped" in raw:
        return {"status": "failed", "reason": raw["skipped"], "command": raw["command"],
                "wall_s": time.perf_counter() - start}
    s = summarize([raw], fpt, peak, None)
    return {"status": "ok", "tokens_per_s": s["tokens_per_s"], "tflops": s["tokens_per_s"] * fpt / 1e12,
            "mfu_pct": s["mfu_pct"], "memory_gib": s["memory_gib_per_rank"],
            "step_time_ms": 1e3 * s["step_time_median_s"], "command": s["command"],
            "wall_s": time.perf_counter() - start}


# --- checks ------------------------------------------------------------------------------------------------------

def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"exit {proc.returncode}: {tail[:300]}")
    return proc


def _small_run(mode: Mode, dump: Path, steps: int, *extra: str) -> list[str]:
    """A debug-model run of the trainer on synthetic data that logs every step to TensorBoard."""
    return [*trainer_launcher(), "--job.dump_folder", str(dump), "--training.dataset", "synthetic",
            "--training.seq_len", str(mode.check_seq), "--training.local_batch_size", "2",
            "--training.steps", str(steps), "--training.mixed_precision_param", mode.check_dtype,
            "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "true", "--metrics.save_for_all_ranks",
            "true", "--debug.seed", "0", *extra]


def _losses(dump: Path) -> dict[int, float]:
    return dict(read_scalars(dump)[0]["loss_metrics/global_avg_loss"])


def _flat(obj, prefix: str = "") -> dict:
    """{"a/b/c": leaf} of a checkpoint's nested state; the pickled entries (data loader positions, RNG states),
    which DCP hands back as BytesIO, unpickled and flattened too, so that a difference names its leaf."""
    if hasattr(obj, "getvalue"):
        obj = obj.getvalue()
    if isinstance(obj, bytes):
        try:
            obj = pickle.loads(obj)
        except Exception:
            pass
    if isinstance(obj, dict):
        return {k: v for key, value in obj.items() for k, v in _flat(value, f"{prefix}{key}/").items()}
    return {prefix.rstrip("/"): obj}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    return type(a) is type(b) and a == b


def check_async_checkpoint(mode: Mode, env: dict, timeout: float, tmp: Path) -> tuple[bool, str]:
    """Run A saves step 2 asynchronously (pinned staging on CUDA) and step 4; run B resumes from A's step 2 and saves
    step 4. Both step-4 checkpoints must hold equal tensors and values, and steps 3-4 log equal losses."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flags = ("--checkpoint.enable", "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.interval", "2",
             "--checkpoint.last_save_model_only", "false", "--checkpoint.keep_latest_k", "0",
             "--debug.deterministic", "--debug.deterministic_warn_only")
    a, b = tmp / "ckpt_a", tmp / "ckpt_b"
    out_a = _run(_small_run(mode, a, 4, *flags), env, timeout / 2).stdout
    shutil.copytree(a / "checkpoint" / "step-2", b / "checkpoint" / "step-2")
    out_b = _run(_small_run(mode, b, 4, *flags), env, timeout / 2).stdout
    if "resuming at step 2" not in out_b:
        return False, "run B did not resume from step 2"
    states = []
    for run in (a, b):
        dcp_to_torch_save(run / "checkpoint" / "step-4", run / "step4.pt")
        states.append(_flat(torch.load(run / "step4.pt", weights_only=False)))
    differ = sorted(k for k in states[0].keys() | states[1].keys()
                    if k not in states[0] or k not in states[1] or not _same(states[0][k], states[1][k]))
    losses_a, losses_b = _losses(a), _losses(b)
    same_losses = all(losses_a[s] == losses_b[s] for s in (3, 4))
    staged = "pinned staging" if mode.device == "cuda" else "plain async (pinned staging is CUDA only)"
    tensors = sum(isinstance(v, torch.Tensor) for v in states[0].values())
    if "staged in" not in out_a:
        return False, "run A logged no background save"
    detail = (f"{staged}; step-4 checkpoints: {len(states[0])} entries ({tensors} tensors), "
              f"{len(differ)} differ{': ' + ', '.join(differ[:5]) if differ else ''}; losses of steps 3-4 "
              f"{'equal' if same_losses else 'differ'} ({losses_a[3]!r}, {losses_a[4]!r} vs "
              f"{losses_b[3]!r}, {losses_b[4]!r})")
    return not differ and same_losses, detail


def check_profiler(mode: Mode, env: dict, timeout: float, tmp: Path) -> tuple[bool, str]:
    """A trace at step 2 (with GPU kernels on CUDA) and, on CUDA, a memory snapshot."""
    dump = tmp / "profile"
    _run(_small_run(mode, dump, 2, "--profiling.enable_profiling", "--profiling.profile_freq", "2",
                    "--profiling.profiler_warmup", "0", "--profiling.profiler_active", "1",
                    "--profiling.enable_memory_snapshot"), env, timeout)
    traces = sorted(dump.glob("profile_traces/iteration_2/rank0_trace.json"))
    if not traces:
        return False, "no profile_traces/iteration_2/rank0_trace.json"
    trace = traces[0].read_text()
    detail = f"trace {traces[0].stat().st_size / 2**20:.1f} MiB"
    if mode.device != "cuda":
        return True, detail + "; memory snapshot: CUDA only, not checked"
    kernels = len(re.findall(r'"cat":\s*"kernel"', trace))
    snapshots = sorted(dump.glob("memory_snapshot/iteration_2/rank0_memory_snapshot.pickle"))
    detail += f" with {kernels} GPU kernel events; memory snapshot " + (
        f"{snapshots[0].stat().st_size / 2**20:.1f} MiB" if snapshots else "missing")
    return bool(kernels and snapshots), detail


def check_generation(mode: Mode, env: dict, timeout: float, tmp: Path) -> tuple[bool, str]:
    """scripts/generate.py's greedy tokens on the device (fp32) equal those on CPU, from one DCP checkpoint of a
    debug model whose attention is sharpened (so every greedy choice is clear: the smallest top-2 gap is given)."""
    import torch.distributed.checkpoint as dcp

    from trainer.data.tokenizer import Tokenizer
    from trainer.generation import generate
    from trainer.models.llama import Transformer

    model = Transformer(get_model_args("llama3", "debugmodel"))
    model.init_weights(seed=5)
    with torch.no_grad():
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(8.0)
            layer.attention.wk.weight.mul_(8.0)
    step = tmp / "generate" / "step-1"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "complete.json").write_text(json.dumps({"step": 1, "model": "llama3 debugmodel"}))
    prompt, new = "Return the", 24
    ids = Tokenizer.from_path(TOKENIZER).encode(prompt, bos=True)
    ref = generate(model.eval(), ids, new, keep_logits=True)
    margin = min((top[0] - top[1]).item() for top in (logits.topk(2).values for logits in ref.logits))

    def script(*extra: str) -> list[int]:
        cmd = [sys.executable, str(ROOT / "scripts/generate.py"), "--checkpoint", str(step), "--tokenizer",
               str(TOKENIZER), "--prompt", prompt, "--max-new-tokens", str(new), "--ignore-eos", "--json", *extra]
        return json.loads(_run(cmd, env, timeout / 3).stdout.strip().splitlines()[-1])["ids"]

    cpu = script("--device", "cpu", "--dtype", "float32")
    if mode.device == "cuda":
        other, what = script("--device", "cuda", "--dtype", "float32"), "CUDA fp32"
        bf16 = script("--device", "cuda", "--dtype", "bfloat16")
        agree = next((i for i, (x, y) in enumerate(zip(cpu, bf16)) if x != y), len(cpu))
        extra = f"; CUDA bf16 agrees on the first {agree} of {new}"
    else:
        other, what, extra = script("--device", "cpu", "--no-cache"), "CPU without KV cache", ""
    ok = cpu == ref.tokens and other == cpu
    return ok, (f"{what} {'equals' if other == cpu else 'differs from'} CPU fp32 on {new} greedy tokens; CPU script "
                f"{'equals' if cpu == ref.tokens else 'differs from'} in-process; smallest top-2 gap {margin:.3f}{extra}")


CHECKS = {"async checkpoint (pinned memory) resumes bit-exactly": check_async_checkpoint,
          "profiler trace and memory snapshot": check_profiler,
          "generation: greedy tokens on the device = CPU": check_generation}


# --- output ------------------------------------------------------------------------------------------------------

def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "—"


def write_outputs(out: Path, meta: dict, rows: list[Row], checks: dict[str, dict]) -> None:
    """{out}/gpu.json (everything) and {out}/gpu.md (the tables)."""
    out.mkdir(parents=True, exist_ok=True)
    plain = {(r.flavor, r.seq): r.result.get("tokens_per_s") for r in rows if r.runner == "plain"}
    table = []
    for r in rows:
        tps, base = r.result.get("tokens_per_s"), plain.get((r.flavor, r.seq))
        ratio = tps / base if r.runner == "trainer" and tps and base else None
        table.append({"name": r.name, "model": r.label, "flavor": r.flavor, "seq_len": r.seq, "batch": r.batch,
                      "precision": r.precision, "runner": r.runner, "trainer_over_plain": ratio, **r.result})
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": table, "checks": checks}, indent=1))
    lines = [f"# GPU check: {meta['device']}", "",
             f"{meta['date']}; torch {meta['torch']}; {meta['mode']}. Synthetic data, {meta['warmup']} warm-up + "
             f"{meta['steps']} measured steps (median step time), about {meta['tokens_per_step']:,} tokens per step; "
             f"trainer: {meta['trainer_setup']}; plain: {meta['plain_setup']}. MFU against {meta['peak_tflops']:.4g} "
             f"TFLOP/s ({meta['peak_note']}). Memory: {meta['memory_note']}. Wall time {meta['wall_s']:.0f} s.", "",
             "| model | seq | batch | precision | runner | tokens/s | TFLOP/s | MFU | memory GiB | step ms | "
             "trainer/plain |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in sorted(table, key=lambda t: ([f for _, f in meta["models"]].index(t["flavor"]), t["seq_len"],
                                          t["runner"] == "plain", t["precision"] == "float8")):
        if t["status"] != "ok":
            lines.append(f"| {t['model']} | {t['seq_len']} | {t['batch']} | {t['precision']} | {t['runner']} | "
                         f"{t['status']}: {str(t.get('reason', ''))[:120]} | | | | | |")
            continue
        lines.append(f"| {t['model']} | {t['seq_len']} | {t['batch']} | {t['precision']} | {t['runner']} | "
                     f"{t['tokens_per_s']:,.0f} | {t['tflops']:.1f} | {t['mfu_pct']:.1f}% | {t['memory_gib']:.1f} | "
                     f"{t['step_time_ms']:.0f} | {_fmt(t['trainer_over_plain'], '.2f')} |")
    lines += ["", "## Checks", "", "| check | result | detail |", "|---|---|---|"]
    for name, c in checks.items():
        lines.append(f"| {name} | {c['status']} | {c.get('detail', c.get('reason', ''))} |")
    lines += ["", "Commands (each row's dump folder is a temporary one):", ""]
    lines += [f"- {t['name']}: `{t['command']}`" for t in table if t.get("command")]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")


def gpu_name() -> str:
    """The GPU's name without creating a CUDA context in this process (its memory would sit beside the rows')."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return torch.cuda.get_device_name(0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="the same on CPU: debug model, tiny, fp32")
    ap.add_argument("--out", default=str(ROOT / "benchmarks"), help="folder for gpu.json and gpu.md")
    ap.add_argument("--budget-s", type=float, default=None, help="no row or check starts after this many seconds")
    ap.add_argument("--only", nargs="*", default=None,
                    help="run only the rows and checks whose name contains one of these (e.g. 1B, float8, generation)")
    ap.add_argument("--no-checks", action="store_true", help="rows only")
    a = ap.parse_args()
    mode = CPU_SMOKE if a.cpu_smoke else GPU
    if mode.device == "cuda" and not torch.cuda.is_available():
        print("error: no GPU is visible; run with --cpu-smoke for the CPU version", file=sys.stderr)
        return 2
    budget = a.budget_s if a.budget_s is not None else mode.budget_s
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    # The repository first, then whatever the caller's path held (packages unpacked beside the system's, say).
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), LOG_RANK="0",
               HF_HUB_OFFLINE="1")
    if mode.device == "cuda":
        env.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")  # as run_train.sh sets it on CUDA
        peak, note, device = H100_H200_BF16_PEAK, "dense bf16 peak of the H100 SXM and H200", gpu_name()
    else:
        env["CUDA_VISIBLE_DEVICES"] = ""
        from trainer.metrics import peak_flops

        peak = peak_flops(torch.device("cpu"), torch.float32, -1)
        note, device = "fp32 matmul measured on this CPU", f"CPU, {os.cpu_count()} cores (smoke run)"
    wanted = (lambda name: any(s in name for s in a.only)) if a.only else (lambda name: True)
    rows = [r for r in plan_rows(mode) if wanted(r.name)]
    check_names = [] if a.no_checks else [n for n in CHECKS if wanted(n)]
    checks = {name: {"status": "not run", "reason": "time budget"} for name in check_names}
    dtype_text = "bf16 autocast over fp32 weights" if mode.dtype == "bfloat16" else "fp32"
    meta = {"device": device, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "mode": "CPU smoke run" if a.cpu_smoke else "one GPU",
            "models": mode.models, "warmup": mode.warmup, "steps": mode.steps,
            "tokens_per_step": mode.tokens_per_step, "peak_tflops": peak / 1e12, "peak_note": note,
            "trainer_setup": f"python -m trainer.train, {dtype_text}, "
                             f"{'compile, ' if mode.compile else 'no compile, '}selective AC (op)",
            "plain_setup": f"scripts/plain_loop.py, {dtype_text}, {'blocks compiled, ' if mode.compile else ''}"
                           f"no activation checkpointing",
            "memory_note": "peak reserved CUDA memory" if mode.device == "cuda" else "peak RSS of the process",
            "budget_s": budget, "wall_s": 0.0}
    out = Path(a.out)

    def left() -> float:
        return budget - (time.perf_counter() - start)

    def save() -> None:
        meta["wall_s"] = time.perf_counter() - start
        write_outputs(out, meta, rows, checks)

    save()
    # Checks side by side share the cores: with every process on all cores, two at a time took 2-3 times as long.
    threads = max(1, len(os.sched_getaffinity(0)) // mode.concurrent_checks)
    check_env = env if mode.concurrent_checks == 1 else {**env, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        def check(name: str) -> dict | None:
            if left() < mode.min_start_s:
                return None
            t0 = time.perf_counter()
            try:
                ok, detail = CHECKS[name](mode, check_env, min(mode.row_timeout_s, left()), Path(tmp))
                result = {"status": "pass" if ok else "FAIL", "detail": detail}
            except Exception as e:  # a check that breaks is a failed check, never a lost run
                result = {"status": "FAIL", "reason": f"{type(e).__name__}: {str(e)[:300]}"}
            return {**result, "wall_s": round(time.perf_counter() - t0, 1)}

        with ThreadPoolExecutor(mode.concurrent_checks) as pool:
            futures = {pool.submit(check, name): name for name in check_names}
            for future in as_completed(futures):
                if (result := future.result()) is not None:
                    checks[futures[future]] = result
                    print(f"{futures[future]}: {result}", flush=True)
                    save()
        for row in rows:
            if left() < mode.min_start_s:
                continue
            row.result = run_row(row, mode, peak, env, min(mode.row_timeout_s, left()))
            print(f"{row.name}: " + json.dumps({k: v for k, v in row.result.items() if k != "command"}), flush=True)
            save()
    save()
    print((out / "gpu.md").read_text())
    bad = [r.name for r in rows if r.result["status"] == "failed"] + [n for n, c in checks.items()
                                                                      if c["status"] == "FAIL"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

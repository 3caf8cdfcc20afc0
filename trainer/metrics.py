"""The per-step log line, TensorBoard and W&B scalars, MFU and memory."""

import dataclasses
import json
import os
import platform
import resource
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

from trainer.config import ConfigError

# Dense peak FLOP/s per GPU (no 2:4 sparsity) as (bf16/fp16 tensor, tf32 tensor, fp32 non-tensor), from the vendors'
# datasheets, keyed by the exact torch.cuda.get_device_name(): a substring would take "NVIDIA H20" for an H200 and
# "NVIDIA L40" for an L4. An unlisted name gets no MFU, and a warning that says to set metrics.peak_flops.
_H100_SXM = (989.4e12, 494.7e12, 66.9e12)
_H100_NVL = (835.5e12, 417.5e12, 60.0e12)  # H200 NVL too
_A100 = (312e12, 156e12, 19.5e12)
GPU_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": _H100_SXM, "NVIDIA H100 PCIe": (756.5e12, 378e12, 51.2e12), "NVIDIA H100 NVL": _H100_NVL,
    "NVIDIA H200": _H100_SXM, "NVIDIA H200 NVL": _H100_NVL, "NVIDIA GH200 480GB": _H100_SXM,
    "NVIDIA H20": (148e12, 74e12, 44e12),
    "NVIDIA A100-SXM4-40GB": _A100, "NVIDIA A100-SXM4-80GB": _A100, "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA A10": (125e12, 62.5e12, 31.2e12), "NVIDIA L4": (121e12, 60e12, 30.3e12),
    "NVIDIA L40": (181e12, 90.5e12, 90.5e12), "NVIDIA L40S": (362e12, 183e12, 91.6e12),
    "NVIDIA B200": (2.25e15, 1.1e15, 75e12),
    "AMD Instinct MI300X": (1307.4e12, 653.7e12, 163.4e12),
}
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def cpu_peak_flops(dtype: torch.dtype, threads: int = 0, measure: bool = False) -> float:
    """Matmul FLOP/s of this machine's CPU with `threads` threads (0: this process's), cached per CPU model, core
    count, thread count and dtype in ~/.cache/trainer/cpu_peak_flops.json; measured when not cached, or again when
    `measure`. The cache keeps the highest measurement: one taken while other processes load the cores is low (and
    would make MFU exceed 100%, so not reported), and a later one on a quiet machine replaces it. The one
    measurement behind MFU (trainer.metrics) and the planner's CPU profile (trainer.device_profiles)."""
    previous = torch.get_num_threads()
    threads = threads or previous
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trainer" / "cpu_peak_flops.json"
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{threads}|{dtype}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if key not in table or measure:
        n = 1024
        torch.set_num_threads(threads)
        try:
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up
            reps, start = 0, time.perf_counter()
            while time.perf_counter() - start < 0.3:
                torch.mm(a, b)
                reps += 1
            table[key] = max(table.get(key, 0.0), 2 * n**3 * reps / (time.perf_counter() - start))
        finally:
            torch.set_num_threads(previous)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table, indent=1))
            tmp.replace(cache)
        except OSError:
            pass  # a read-only home only costs re-measuring next time
    return table[key]


def gpu_peak_flops(name: str, dtype: torch.dtype) -> float | None:
    """Dense peak FLOP/s of the GPU called `name` for matmuls in `dtype`, or None for a GPU not in the table. fp32
    counts tensor cores (TF32) only when torch lets fp32 matmuls use them (torch.set_float32_matmul_precision)."""
    peaks = GPU_PEAK_FLOPS.get(name)
    if peaks is None:
        return None
    if dtype in (torch.bfloat16, torch.float16):
        return peaks[0]
    return peaks[1] if torch.get_float32_matmul_precision() != "highest" else peaks[2]


def peak_flops(device: torch.device, dtype: torch.dtype, override: float) -> float | None:
    """Peak FLOP/s of one device for MFU: the user's value, the GPU table for `dtype`, or a CPU measurement. None
    (no MFU, with one warning) for a GPU the table does not know."""
    if override > 0:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        if peak is None:
            _warn_once(name, f"metrics: no peak FLOP/s known for GPU {name!r}, so MFU is not reported; set "
                             f"metrics.peak_flops to its dense {str(dtype).removeprefix('torch.')} peak")
        return peak
    return cpu_peak_flops(dtype)


def mfu_percent(flops: float, peak: float | None) -> float | None:
    """Achieved FLOP/s as % of `peak`; None without a peak, or above 100% (then the peak is wrong: warned once)."""
    if peak is None:
        return None
    if flops > peak:
        _warn_once(f"above:{peak}", f"metrics: achieved {flops / 1e12:.1f} TFLOP/s exceeds the peak "
                                    f"{peak / 1e12:.1f} TFLOP/s, so MFU is not reported; set metrics.peak_flops to "
                                    f"the device's real peak")
        return None
    return 100 * flops / peak


def memory_gib(device: torch.device) -> tuple[float, float | None]:
    """(peak GiB, % of device) — CUDA reserved memory, or peak process RSS on CPU (no % there)."""
    if device.type == "cuda":
        reserved = torch.cuda.max_memory_reserved(device)
        return reserved / 2**30, 100 * reserved / torch.cuda.get_device_properties(device).total_memory
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None  # ru_maxrss is KiB on Linux


class _TensorBoard:
    """Scalars into TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir), max_queue=1000)

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    """Scalars into a Weights & Biases run, named as wandb users expect: WANDB_PROJECT (default "trainer"),
    WANDB_ENTITY / WANDB_TEAM, WANDB_RUN_NAME, WANDB_RUN_ID, WANDB_RUN_GROUP, WANDB_TAGS (comma-separated) and
    WANDB_MODE (offline keeps the run on disk under job.dump_folder/wandb). The resolved config is the run's
    config."""

    def __init__(self, cfg, run_name: str | None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("metrics.enable_wandb = true needs the wandb package: pip install -e .[wandb] "
                              "(or set it to false)") from None
        env = os.environ.get
        folder = Path(cfg.job.dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.wandb = wandb
        self.run = wandb.init(project=env("WANDB_PROJECT", "trainer"), entity=env("WANDB_ENTITY") or env("WANDB_TEAM"),
                              name=env("WANDB_RUN_NAME") or run_name, id=env("WANDB_RUN_ID"),
                              group=env("WANDB_RUN_GROUP"), tags=[t for t in env("WANDB_TAGS", "").split(",") if t],
                              dir=str(folder), config=dataclasses.asdict(cfg))

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Turns per-step measurements into the console line, and scalars for TensorBoard and W&B, on the logging
    ranks."""

    def __init__(self, cfg, device: torch.device, flops_per_token: int, peak: float | None, enabled: bool,
                 tokens_divisor: int, rank: int = 0, run_name: str | None = None):
        """`enabled`: this rank prints. `peak`: FLOP/s for MFU (None: no MFU). `run_name`: the TensorBoard run
        folder, the same on every rank."""
        self.device, self.flops_per_token, self.peak, self.enabled = device, flops_per_token, peak, enabled
        # Ranks that split one sequence's work (tp, cp, pp) process the same tokens: count them once per device.
        self.tokens_divisor = tokens_divisor
        self.color = not cfg.metrics.disable_color_printing
        self.writers = []
        all_ranks = cfg.metrics.save_for_all_ranks
        if cfg.metrics.enable_tensorboard and (enabled or all_ranks):
            log_dir = Path(cfg.job.dump_folder) / cfg.metrics.save_tb_folder / (
                run_name or datetime.now().strftime("%Y%m%d-%H%M%S"))
            if all_ranks:
                log_dir = log_dir / f"rank_{rank}"
            self.writers.append(_TensorBoard(log_dir))
        if cfg.metrics.enable_wandb and enabled:
            self.writers.append(_WandB(cfg, run_name))

    def log(self, step: int, loss_avg: float, loss_max: float, grad_norm: float, lr: float, tokens: int,
            elapsed: float, data_time: float, steps: int) -> dict[str, float]:
        """Log the window of `steps` steps that ended at `step`; `tokens` were read by this rank in it."""
        tps = tokens / elapsed / self.tokens_divisor
        flops = self.flops_per_token * tps
        mem, mem_pct = memory_gib(self.device)
        mfu = mfu_percent(flops, self.peak)
        scalars = {"loss_metrics/global_avg_loss": loss_avg, "loss_metrics/global_max_loss": loss_max,
                   "grad_norm": grad_norm, "lr": lr, "throughput(tps)": tps, "tflops": flops / 1e12,
                   **({"mfu(%)": mfu} if mfu is not None else {}), "memory/max_reserved(GiB)": mem,
                   "time_metrics/end_to_end(s)": elapsed / steps, "time_metrics/data_loading(s)": data_time / steps}
        for writer in self.writers:
            writer.write(scalars, step)
        if not self.enabled:
            return scalars
        c = ("\033[31m", "\033[36m", "\033[33m", "\033[34m", "\033[35m", "\033[0m") if self.color else ("",) * 6
        mem_txt = f"{mem:.2f}GiB" + (f"({mem_pct:.1f}%)" if mem_pct is not None else "")
        print(f"{c[0]}step: {step:>5}  {c[1]}loss: {loss_avg:8.4f}  {c[2]}grad_norm: {grad_norm:7.4f}  "
              f"lr: {lr:.2e}  {c[3]}memory: {mem_txt}  {c[4]}tps: {tps:,.0f}  tflops: {flops / 1e12:.3f}  "
              f"mfu: {'n/a' if mfu is None else f'{mfu:.2f}%'}  {c[1]}time: {elapsed / steps:.3f}s/step "
              f"(data {100 * data_time / elapsed:.1f}%){c[5]}", flush=True)
        return scalars

    def log_validation(self, step: int, loss: float, perplexity: float, tokens: int, batches: int,
                       elapsed: float) -> dict[str, float]:
        """Log one validation: `loss` is the token-weighted mean over the `tokens` of all `batches` evaluated."""
        scalars = {"validation_metrics/loss": loss, "validation_metrics/perplexity": perplexity}
        if not self.enabled:
            return scalars
        for writer in self.writers:
            writer.write(scalars, step)
        c = ("\033[32m", "\033[36m", "\033[33m", "\033[0m") if self.color else ("",) * 4
        print(f"{c[0]}validate step: {step:>5}  {c[1]}loss: {loss:8.4f}  perplexity: {perplexity:,.2f}  "
              f"{c[2]}batches: {batches}  tokens: {tokens:,}  time: {elapsed:.2f}s{c[3]}", flush=True)
        return scalars

    def close(self) -> None:
        """Flush and close TensorBoard and W&B (must happen before os._exit, which skips atexit)."""
        for writer in self.writers:
            writer.close()
        self.writers = []

"""What the layout planner (trainer/planner.py) assumes about a device: memory, compute peak, achievable fraction of
it, memory bandwidth, and collective bandwidth inside a node and between nodes.

GPU figures are vendors' datasheet numbers: dense bf16 peaks from trainer.metrics.GPU_PEAK_FLOPS, memory as
torch.cuda.get_device_properties reports it, HBM bandwidth, per-GPU NVLink / Infinity Fabric bandwidth in one
direction and a 400 Gb/s NIC per GPU between nodes. Bus bandwidths are scaled by an efficiency that NCCL's own
all-gather / reduce-scatter tests reach on such nodes (~80% of the link). `cpu` is measured on this machine: the
matmul peak with every core (trainer.metrics.cpu_peak_flops, cached), and by trainer.cpu_calibration a gloo
all-reduce's bandwidth and latency between two local processes and the framework's cost per block (plain, FSDP,
TP, CP), cached beside it; with more ranks than cores they time-share the cores (oversubscription).
"""

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from trainer.cost_model import CP_PASSES_PER_BLOCK, TP_COLLECTIVES_PER_BLOCK
from trainer.cpu_calibration import measure as measure_cpu
from trainer.metrics import GPU_PEAK_FLOPS, cpu_peak_flops

GB, GiB = 1e9, 2**30
_LINK_EFFICIENCY = 0.8


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    memory_bytes: int
    """Memory one rank may use: the GPU's, or on CPU the host's RAM shared by the ranks."""
    peak_flops: float
    """Dense matmul FLOP/s of one rank in the compute dtype."""
    achievable: float
    """Fraction of peak_flops a training step reaches in its matmuls (eager mode, no float8)."""
    memory_bandwidth: float
    """Bytes/s the optimizer step streams through (HBM, or the host's DRAM)."""
    intra_node_bandwidth: float
    """Bytes/s one rank sends in a ring collective among ranks of its node."""
    inter_node_bandwidth: float
    """Bytes/s one rank sends in a ring collective that crosses nodes."""
    collective_latency: float
    """Seconds a collective costs however small (launch and synchronization)."""
    overlaps_comm: bool
    """Whether collectives run beside compute (GPU: NCCL on its own streams and SMs), or take the same cores (CPU:
    gloo's copies and reductions compete with the matmuls), so that nothing hides behind compute."""
    overhead_bytes: int
    """Memory a rank uses beyond its tensors: allocator slack, cuBLAS/NCCL workspaces in the caching allocator."""
    block_overhead: float = 0.0
    """Seconds of one block's forward and backward that are framework, not compute (Python, autograd), per
    microbatch: measured on CPU (trainer.cpu_calibration); on a GPU it hides under the kernels."""
    fsdp_block_overhead: float = 0.0
    """What FSDP adds to block_overhead (hooks, copy-in/out, its small collectives' waits)."""
    tp_block_overhead: float = 0.0
    """What tensor parallel adds to it (DTensor dispatch, redistributions)."""
    cp_block_overhead: float = 0.0
    """What context parallel adds to it (the ring's rounds, the merge of partial attention outputs)."""
    oversubscription: float = 1.0
    """Ranks per core (CPU, more ranks than cores): the ranks time-share the cores, so work done on the CPU (the
    framework, gloo's copies) takes that much longer, and a rank's idle time (the pipeline bubble) is another's."""


def _gpu(name: str, torch_name: str, memory_gib: float, hbm_tb_s: float, link_gb_s: float, nic_gb_s: float = 50,
         achievable: float = 0.40) -> DeviceProfile:
    return DeviceProfile(name, int(memory_gib * GiB), GPU_PEAK_FLOPS[torch_name][0], achievable, hbm_tb_s * 1e12,
                         link_gb_s * GB * _LINK_EFFICIENCY, nic_gb_s * GB * _LINK_EFFICIENCY, 20e-6, True,
                         int(1.0 * GiB))


# achievable 0.40: torchtitan reports 33-39% MFU for Llama 3.1 8B FSDP on H100 without float8
# (benchmarks/llama3_h100_202412_torchtitan.md at v0.2.2).
GPU_PROFILES = {
    "h100": _gpu("h100", "NVIDIA H100 80GB HBM3", 79.6, 3.35, 450),
    "h200": _gpu("h200", "NVIDIA H200", 139.8, 4.8, 450),
    "a100": _gpu("a100", "NVIDIA A100-SXM4-80GB", 79.2, 2.04, 300, nic_gb_s=25),
    "b200": _gpu("b200", "NVIDIA B200", 178.4, 8.0, 900),
    "mi300": _gpu("mi300", "AMD Instinct MI300X", 191.5, 5.3, 448, achievable=0.30),
}
DEVICES = (*GPU_PROFILES, "cpu")


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "trainer" / "cpu_planner_profile.json"


_CALIBRATED = {"gloo_bandwidth", "gloo_latency", "block_overhead", "fsdp_block_overhead", "tp_block_overhead",
               "cp_block_overhead", "probe_block_bytes", "oversubscribed_ranks", "oversubscribed_sync"}


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_calibration(measure: bool = False) -> dict[str, float]:
    """The raw figures behind this machine's CPU profile: trainer.cpu_calibration's (measured once and cached in
    ~/.cache/trainer/cpu_planner_profile.json; `measure`: again now), the matmul peak with every core (trainer.metrics'
    cache, which keeps its highest measurement, see cpu_peak_flops), the cores and the RAM. `cpu_profile_from` turns
    them into a profile; scripts/plan_check.py stores them so a measurement can be re-predicted elsewhere."""
    cache = _cache_path()
    key = f"{platform.processor() or platform.machine()}|{os.cpu_count()}|{torch.__version__}"
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError):
        table = {}
    if measure or not _CALIBRATED <= table.get(key, {}).keys():  # not yet, or by an older version
        table[key] = measure_cpu()
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(table, indent=1))
        except OSError:
            pass
    cores = cpu_cores()
    return {**table[key], "peak_flops": cpu_peak_flops(torch.float32, cores, measure), "cores": cores,
            "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")}


def cpu_profile_from(measured: dict[str, float], world_size: int) -> DeviceProfile:
    """The CPU profile for `world_size` ranks sharing the cores and RAM (as run_train.sh shares them) from
    cpu_calibration's figures."""
    cores = measured["cores"]
    # achievable 0.5: a training step's matmuls on CPU are smaller than the 1024^2 product the peak is timed on.
    # overhead: a training process of a tiny model (benchmodel, seq 16, 4.4M parameters) peaks 0.12 GiB (1 rank) /
    # 0.09 GiB (2 ranks) above one that only imported the trainer, of which 0.066 / 0.033 GiB are its parameters,
    # gradients and AdamW state: 0.06 GiB is the process's own (gloo, data loader, metrics writers).
    latency = measured["gloo_latency"]
    # The probe's FSDP, TP and CP blocks (degree 2, 8 tokens) include their collectives, which the cost model prices
    # on their own (per collective and per byte): take them out as it prices them, so they count once. Per block:
    # FSDP two all-gathers of the parameters and one reduce-scatter of the gradients (half of each moves), TP its
    # 8 sequence-parallel collectives, CP its 3 ring passes (activations of 8 tokens: latency only). CP shards its
    # parameters with FSDP over the cp ranks: the CP probe includes the FSDP probe's cost, which the cost model
    # adds on its own wherever FSDP runs.
    fsdp = measured["fsdp_block_overhead"] - 3 * (measured["probe_block_bytes"] / 2 / measured["gloo_bandwidth"]
                                                  + latency)
    tp = measured["tp_block_overhead"] - TP_COLLECTIVES_PER_BLOCK * latency
    cp = measured["cp_block_overhead"] - measured["fsdp_block_overhead"] - CP_PASSES_PER_BLOCK * latency
    if world_size > cores:  # a collective waits for its ranks to be scheduled: per hop of a ring, as priced
        latency = max(latency, measured["oversubscribed_sync"] / (measured["oversubscribed_ranks"] - 1))
    return DeviceProfile("cpu", int(measured["ram_bytes"]) // world_size, measured["peak_flops"] / world_size, 0.5,
                         10 * GB, measured["gloo_bandwidth"], measured["gloo_bandwidth"], latency,
                         False, int(0.06 * GiB), measured["block_overhead"], max(0.0, fsdp), max(0.0, tp),
                         max(0.0, cp), max(1.0, world_size / cores))


def cpu_profile(world_size: int, measure: bool = False) -> DeviceProfile:
    """This machine's CPU profile for `world_size` ranks (cpu_calibration, cached; `measure`: again now)."""
    return cpu_profile_from(cpu_calibration(measure), world_size)


def device_profile(name: str, world_size: int) -> DeviceProfile:
    if name == "cpu":
        return cpu_profile(world_size)
    return GPU_PROFILES[name]

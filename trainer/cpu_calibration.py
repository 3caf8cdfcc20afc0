"""What the layout planner's `--device cpu` profile measures on this machine besides the matmul peak
(trainer.metrics.cpu_peak_flops): two local processes on gloo time

- a 16 MiB all-reduce (bandwidth) and a 1-element one (the latency every collective pays);
- one forward and backward of the debug model on 8 tokens, where compute is negligible and what is left is the
  framework's cost per block: Python and autograd per op on plain tensors, and on top of it under FSDP (hooks,
  copy-in/out, its collectives), TP (DTensor dispatch and sharding propagation, redistributions, the sequence-
  parallel collectives) and CP (the ring's rounds and its merge of partial attention outputs).

On a GPU those costs hide under the kernels of real shapes; on CPU they take the cores the matmuls need, and on a
small model they decide which layout is fastest. Then, with twice as many processes as cores busy with matmuls:
what one tiny all-reduce costs when its ranks time-share the cores (it waits until all of them are scheduled).
`measure()` runs this module as those processes and returns the figures; trainer.device_profiles caches them.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
_TOKENS = 8
# layout name -> parallelism overrides (dp_shard 1 everywhere else); "plain" runs each process on its own.
_LAYOUTS = {"plain": {}, "fsdp": {"data_parallel_shard_degree": 2}, "tp": {"tensor_parallel_degree": 2},
            "cp": {"context_parallel_degree": 2}}


def _gloo(rank: int, quick: bool = False) -> tuple[float, float]:
    import torch.distributed as dist

    x = torch.ones(2**18 if quick else 4 * 2**20)  # 1 MiB quick, else 16 MiB
    dist.all_reduce(x)
    best = float("inf")
    for _ in range(2 if quick else 5):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(x)
        best = min(best, time.perf_counter() - start)
    tiny, latency = torch.ones(1), float("inf")
    for _ in range(5 if quick else 20):
        dist.barrier()
        start = time.perf_counter()
        dist.all_reduce(tiny)
        latency = min(latency, time.perf_counter() - start)
    return x.numel() * 4 / best, latency  # a 2-rank ring all-reduce sends each rank's whole buffer once


def _step_seconds(name: str, repeats: int = 8) -> tuple[float, int, int]:
    """Best time of a forward + loss + backward of the debug model on _TOKENS tokens in layout `name`, its number
    of blocks and the bytes of one block's (unsharded) parameters."""
    import torch.distributed as dist

    from trainer.build import build_model, plan_run
    from trainer.config import load_config
    from trainer.train import cross_entropy_loss

    keys = {"data_parallel_shard_degree": 1, **_LAYOUTS[name]}
    cfg = load_config(["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--model.flavor", "debugmodel",
                       "--training.seq_len", str(_TOKENS), "--training.local_batch_size", "1",
                       "--training.mixed_precision_param", "float32", "--training.dataset", "synthetic",
                       *[a for k, v in keys.items() for a in (f"--parallelism.{k}", str(v))]])
    world = 1 if name == "plain" else dist.get_world_size()
    plan = plan_run(cfg, world, "cpu")
    if world > 1:
        plan.dims.build_mesh("cpu")
    model = build_model(plan, torch.device("cpu"))
    tokens = torch.randint(0, plan.model_args.vocab_size, (1, _TOKENS + 1), generator=torch.Generator().manual_seed(0))
    best = float("inf")
    for i in range(repeats + 2):
        inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        with model.batch_context(inputs, labels):
            cross_entropy_loss(model.model(inputs), labels).backward()
        if i >= 2:  # the first steps build caches (sharding propagation, autograd graphs)
            best = min(best, time.perf_counter() - start)
    block = sum(p.numel() for n, p in model.model.named_parameters() if n.startswith("layers.0."))
    return best, plan.model_args.n_layers, block * 4  # DTensor.numel() is the unsharded count


def _sync_seconds(rounds: int = 30) -> float:
    """Seconds one tiny all-reduce adds to a loop of ~2 ms matmul work per round on every rank: with more ranks
    than cores, a collective waits until every rank in it is scheduled again."""
    import torch.distributed as dist

    a = torch.randn(192, 192)

    def work() -> None:
        for _ in range(16):
            torch.mm(a, a)

    tiny = torch.ones(1)
    timings = []
    for sync in (False, True, False, True):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(rounds):
            work()
            if sync:
                dist.all_reduce(tiny)
        timings.append(time.perf_counter() - start)
    seconds = torch.tensor([min(timings[1::2]) - min(timings[0::2])])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return max(0.0, seconds.item() / rounds)


def _probe(rank: int, port: str, world: int, quick: bool = False) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if world > 2:  # the oversubscribed probe: only the cost of a collective's synchronization
        sync = _sync_seconds(5 if quick else 30)
        if rank == 0:
            print(json.dumps({"oversubscribed_ranks": world, "oversubscribed_sync": sync}))
        dist.destroy_process_group()
        return
    bandwidth, latency = _gloo(rank, quick)
    seconds = {}
    for name in _LAYOUTS:
        seconds[name], layers, block_bytes = _step_seconds(name, 1 if quick else 8)
        if name == "plain":
            probe_block_bytes = block_bytes
    if rank == 0:
        per_block = {name: s / layers for name, s in seconds.items()}
        print(json.dumps({"gloo_bandwidth": bandwidth, "gloo_latency": latency,
                          "block_overhead": per_block["plain"], "probe_block_bytes": probe_block_bytes,
                          **{f"{n}_block_overhead": max(0.0, per_block[n] - per_block["plain"])
                             for n in ("fsdp", "tp", "cp")}}))
    dist.barrier()
    dist.destroy_process_group()


def measure(quick: bool = False) -> dict[str, float]:
    """The figures, from two processes of one thread each on this machine (best of several repeats): gloo_bandwidth
    (bytes/s one rank moves in an all-reduce), gloo_latency (seconds), block_overhead (seconds of one block's
    forward and backward that are not compute, plain tensors) and fsdp_/tp_/cp_block_overhead (what a degree of 2
    adds to it, its collectives included: trainer.device_profiles takes those out, priced as the cost model prices
    them, with probe_block_bytes, the fp32 bytes of one block's parameters); then from twice as many processes as
    cores, oversubscribed_sync: the seconds a collective costs busy ranks that time-share the cores
    (oversubscribed_ranks of them). `quick`: every measurement with smaller
    buffers and fewer repeats (tests/unit/test_planner.py; the figures are then only sane, not calibrated)."""
    from trainer.device_profiles import cpu_cores

    return {**_run(2, quick), **_run(max(4, 2 * cpu_cores()), quick)}


def _run(world: int, quick: bool = False) -> dict[str, float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    procs = [subprocess.Popen([sys.executable, "-m", "trainer.cpu_calibration", str(r), port, str(world),
                               *(["quick"] if quick else [])],
                              stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT) for r in range(world)]
    out = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the CPU calibration probe failed (exit codes {[p.returncode for p in procs]})")
    return json.loads(out[0].strip().splitlines()[-1])


if __name__ == "__main__":
    _probe(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), quick=sys.argv[4:] == ["quick"])

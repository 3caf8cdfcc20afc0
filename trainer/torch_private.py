"""Every private torch API this trainer touches, in one place.

Checked against torch 2.13.0. tests/unit/test_torch_private.py fails loudly when an upgrade moves one of these.
"""

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh


def flatten_mesh(mesh: DeviceMesh, dims: tuple[str, ...], name: str) -> DeviceMesh:
    """Merge named dims of `mesh` into one 1-D mesh called `name` (torch has no public flatten in 2.13).

    Keep the returned object: slicing the flattened name back out of the root mesh is deprecated in 2.13.
    """
    return mesh[dims]._flatten(name)


def unflatten_mesh(mesh: DeviceMesh, sizes: tuple[int, ...], names: tuple[str, ...]) -> DeviceMesh:
    """Split a 1-D mesh into a mesh of shape `sizes` with dims `names` (private `_unflatten` in 2.13)."""
    return mesh._unflatten(0, sizes, names)


def nvshmem_available() -> bool:
    """Whether this torch build and machine can use NVSHMEM for symmetric memory (private module in 2.13)."""
    try:
        from torch.distributed._symmetric_memory import is_nvshmem_available
    except ImportError:
        return False
    return bool(is_nvshmem_available())


def use_nvshmem_symmetric_memory() -> None:
    """Back torch's symmetric memory (async TP, fused collectives) with NVSHMEM (private module in 2.13)."""
    from torch.distributed._symmetric_memory import set_backend

    set_backend("NVSHMEM")


def enable_async_tensor_parallel(tp_group_name: str) -> None:
    """Let inductor overlap TP collectives with the matmuls around them (micro-pipeline TP; private config in
    2.13). Only compiled code on CUDA benefits.

    The pass fuses an all-gather or reduce-scatter with its matmul only where
    `is_symm_mem_enabled_for_group(group)` is true, which in 2.13 still means "enable_symm_mem_for_group was called
    for it", although that function warns it is no longer needed (FutureWarning). Without the call the fusions are
    skipped silently, so the tp group is registered here, the warning silenced.
    """
    import warnings

    import torch._inductor.config
    from torch.distributed._symmetric_memory import enable_symm_mem_for_group

    torch._inductor.config._micro_pipeline_tp = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        enable_symm_mem_for_group(tp_group_name)


def symmetric_memory_enabled(group_name: str) -> bool:
    """Whether inductor's micro-pipeline TP pass will fuse collectives of this group (private module in 2.13)."""
    from torch.distributed._symmetric_memory import is_symm_mem_enabled_for_group

    return bool(is_symm_mem_enabled_for_group(group_name))


def set_activation_memory_budget(budget: float, pareto_dir: str | None = None) -> None:
    """The share of activations the compiler's partitioner may keep for backward in every graph compiled from now
    on: 1.0 (torch's default) optimizes for runtime, 0.0 recomputes as much as checkpointing the whole compiled
    region would (private torch._functorch.config in 2.13, as torchtitan sets it). With `pareto_dir`, each graph
    also draws its runtime-against-memory curve there as an SVG (needs matplotlib)."""
    import torch._functorch.config

    torch._functorch.config.activation_memory_budget = budget
    # Below 1.0 the partitioner sizes every graph input, and refuses the opaque objects it cannot measure; the only
    # such inputs of our graphs are the process groups of tensor parallel's collectives (in the compiled attention
    # and feed_forward), which hold no activations: size zero is exact for them.
    torch._functorch.config.unsafe_treat_script_objects_as_zero_size = budget < 1.0
    torch._functorch.config.visualize_memory_budget_pareto = pareto_dir is not None
    torch._functorch.config.memory_budget_pareto_dir = pareto_dir


def set_autograd_cache(enabled: bool) -> None:
    """Whether torch.compile may reuse compiled forward/backward graphs from its on-disk AOTAutograd cache for every
    graph compiled from now on (private torch._functorch.config in 2.13; torch's default is on). In 2.13 a cached
    graph over DTensors can come back wrong. Measured on CPU at tp=2: the loss under loss parallel, read back from
    the same config's cache, turned the first loss from 8.00 into 3.40 (cold: equal to eager within 1e-7); and
    attention and MLP graphs read from a cache that other layouts had filled gave gradients off by up to 116%."""
    import torch._functorch.config

    torch._functorch.config.enable_autograd_cache = enabled


def abort_process_groups() -> None:
    """Abort every process group at once, without waiting for collectives still in flight (private
    `_abort_process_group` in 2.13; destroy_process_group waits on them, on NCCL up to its 10-minute watchdog)."""
    from torch.distributed.distributed_c10d import _abort_process_group

    _abort_process_group()


def init_fake_process_group(rank: int, world_size: int) -> None:
    """A process group whose collectives do nothing, so DRY_RUN can build any rank's real sharded layout in one
    process (torch.testing._internal in 2.13; torchtitan's dry run uses the same)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)


# --- Context parallel on CPU -------------------------------------------------------------------------------------
# torch 2.13's context parallel handles only the CUDA SDPA kernels (flash, efficient, cuDNN). On CPU, SDPA runs
# aten._scaled_dot_product_flash_attention_for_cpu (+ _backward), which has no handler and no sharding strategy
# ("does not have a sharding strategy registered"). We register handlers for that op pair in the context-parallel
# module's custom-op table; they run torch's own ring-attention kernels on the local shards (sequence on dim 2)
# and wrap the results back as DTensors sharded on dim 2 — the same thing torch does for the CUDA kernels.

def _cp_attention_module():
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


def enable_cpu_context_parallel() -> None:
    """Teach torch's context parallel the CPU flash-attention kernels (idempotent)."""
    import torch
    from torch.distributed.tensor import DTensor, Shard

    cp = _cp_attention_module()
    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    if fwd in cp.custom_ops:
        return

    def handler(op_call, args, kwargs):
        mesh = next(a.device_mesh for a in args if isinstance(a, DTensor))
        local = [a.to_local() if isinstance(a, DTensor) else a for a in args]
        if kwargs.get("attn_mask") is not None:
            raise NotImplementedError("context parallel supports causal attention only, not an explicit attn_mask")
        scale, group = kwargs.get("scale"), mesh.get_group()
        if op_call is fwd:
            q, k, v = local[:3]
            dropout_p = local[3] if len(local) > 3 else kwargs.get("dropout_p", 0.0)
            is_causal = local[4] if len(local) > 4 else kwargs.get("is_causal", False)
            results = cp._templated_ring_attention(group, 2, fwd, q, k, v, is_causal=is_causal,
                                                   dropout_p=dropout_p, scale=scale)
        else:
            grad_out, q, k, v, out, lse, dropout_p, is_causal = local[:8]
            results = cp._templated_ring_attention_backward(
                group, 2, bwd, grad_out=grad_out, grad_out_name="grad_out", query=q, key=k, value=v, out=out,
                logsumexp=lse, is_causal=is_causal, dropout_p=dropout_p, scale=scale)
        return tuple(DTensor.from_local(r, mesh, [Shard(2)], run_check=False) for r in results)

    cp.custom_ops[fwd] = handler
    cp.custom_ops[bwd] = handler


def set_context_parallel_options(load_balance: bool, rotate_method: str) -> None:
    """Head-tail load balancing on/off and the KV rotation (allgather | alltoall); both are module globals that
    torch's context_parallel reads on entry (private in 2.13)."""
    cp = _cp_attention_module()
    cp._cp_options.enable_load_balance = load_balance
    cp.set_rotate_method(rotate_method)


def record_cuda_memory_history(enabled: bool, max_entries: int = 100_000) -> None:
    """Start (or stop) recording CUDA allocator events with stack traces for memory snapshots (private in 2.13;
    absent from CPU builds)."""
    import torch

    torch.cuda.memory._record_memory_history("all" if enabled else None, max_entries=max_entries)


def dump_cuda_memory_snapshot(path: str) -> None:
    """Write the recorded CUDA allocator history as a pickle for pytorch.org/memory_viz (private in 2.13)."""
    import torch

    torch.cuda.memory._dump_snapshot(path)


# --- Reference cycles that hold tensors (training.gc_debug) ------------------------------------------------------
def warn_tensor_cycles():
    """Until the returned function is called, every garbage collection that frees a reference cycle holding a CUDA
    tensor warns with a picture of the cycle (torch.utils.viz._cycles, private; CUDA builds only)."""
    from torch.utils.viz._cycles import warn_tensor_cycles as warn

    return warn()


# --- Process-group timeouts (comm.train_timeout_seconds) ---------------------------------------------------------
def process_groups() -> list:
    """Every process group this process created, the default one included (c10d's private `_world.pg_map`)."""
    from torch.distributed import distributed_c10d as c10d

    return list(c10d._world.pg_map)


def reuse_device_mesh_groups() -> dict:
    """Make every DeviceMesh built afterwards in this process reuse the process group it made before for the same
    ranks and backend, instead of a new one per mesh (for a process that runs job after job: the test pool,
    tests/distributed/worker.py). DeviceMesh calls `new_group`, which torch.distributed.device_mesh imports into its
    own namespace in torch 2.13; that name is replaced. Groups made with pg_options are left alone. Returns the
    groups made so far, by (ranks, backend)."""
    from torch.distributed import device_mesh

    made, create = {}, device_mesh.new_group

    def new_group(ranks=None, timeout=None, backend=None, pg_options=None, **kwargs):
        if pg_options is not None:
            return create(ranks=ranks, timeout=timeout, backend=backend, pg_options=pg_options, **kwargs)
        key = (tuple(ranks) if ranks is not None else None, backend)
        if key not in made:
            made[key] = create(ranks=ranks, timeout=timeout, backend=backend, **kwargs)
        return made[key]

    device_mesh.new_group = new_group
    return made


def set_process_group_timeouts(timeout) -> None:
    """Set the collective timeout of every process group this process belongs to (the default one, the mesh's, the
    checkpointer's and pipeline's), as torchtitan does after its first step. c10d keeps the groups in
    `_world.pg_map` and changes one's timeout with `_set_pg_timeout`; both private in torch 2.13."""
    from torch.distributed import distributed_c10d as c10d

    for group in process_groups():
        if not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)


def shutdown_loader_workers(loader) -> None:
    """Stop a torchdata StatefulDataLoader's worker processes now (torchdata 0.11, the DataLoader API of torch
    2.13, has no public close).

    The loader keeps its live iterator (`_iterator`, for state_dict), and the iterator refers back to the loader:
    only the garbage collector frees that cycle, and it may finalize the iterator's queues before the iterator's
    own shutdown runs. The workers then never hear they should stop, and each is waited for 5 s before it is
    killed. Shutting down while everything is alive takes milliseconds.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


def storage_extents(metadata) -> dict[str, int]:
    """file name -> the bytes it must hold at least, for every data file a DCP checkpoint's `.metadata` refers to.
    Reads `Metadata.storage_data`, whose values are the private `_StorageInfo` (relative_path, offset, length) of
    FileSystemWriter in 2.13; torch has no public listing of a checkpoint's files."""
    extents: dict[str, int] = {}
    for info in metadata.storage_data.values():
        extents[info.relative_path] = max(extents.get(info.relative_path, 0), info.offset + info.length)
    return extents


# --- Pipeline schedules: CSV files and forward-only passes -------------------------------------------------------
# torch 2.13 runs a schedule written as a CSV through its private `_PipelineScheduleRuntime` (`_load_csv`; one row
# per pp rank, one action per cell such as 0F1 / 2B3, an empty cell an idle step), which torchtitan also uses.

def read_schedule_csv(path: str) -> dict[int, list]:
    """pp rank -> its actions (torch's private `_Action`: stage_index, computation_type, microbatch_index; None for
    an idle step), parsed as `_PipelineScheduleRuntime._load_csv` parses them. ValueError for a cell it cannot read."""
    import csv

    from torch.distributed.pipelining.schedules import _Action

    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    try:
        return {rank: [_Action.from_str(cell) for cell in row] for rank, row in enumerate(rows)}
    except RuntimeError as e:  # from_str raises RuntimeError("Invalid action string: ...")
        raise ValueError(str(e).split(",")[0]) from None


def check_schedule_actions(actions: dict[int, list], pp: int, n_stages: int, n_microbatches: int) -> dict[int, int]:
    """torch's own check of a compute-only schedule (private `_validate_schedule`): every stage runs every
    microbatch forward, then backward, on one rank. Returns stage -> pp rank; ValueError (first line only) if not."""
    from torch.distributed.pipelining.schedules import _validate_schedule

    try:
        return _validate_schedule(actions, pp, n_stages, n_microbatches)
    except (AssertionError, KeyError) as e:
        raise ValueError(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None


def csv_schedule(stages: list, n_microbatches: int, loss_fn, path: str):
    """A `_PipelineScheduleRuntime` over this rank's `stages` that runs the CSV at `path` (compute actions only;
    the runtime adds the sends, receives and FSDP unshard/reshard), gradients unscaled like the named schedules."""
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    schedule = _PipelineScheduleRuntime(stages, n_microbatches=n_microbatches, loss_fn=loss_fn, scale_grads=False)
    schedule._load_csv(path)
    return schedule


@contextlib.contextmanager
def forward_only_order(schedule):
    """Inside, a runtime schedule (looped, V-shaped, DualPipeV, CSV) runs only the forward half of its order.

    torch 2.13's `schedule.eval` runs the whole training order with backward turned off. Single-stage and looped
    schedules then skip each backward action, but a V-shaped order passes a gradient between a rank's own two
    stages (`get_local_bwd_output`), which asserts "can't steal_bwd_input if this stage doesn't have backward".
    The forward actions (with their receives and sends, and FSDP's unshard/reshard) of a schedule that does not
    deadlock do not deadlock either: dropping actions only drops waits. DualPipeV's overlapped F+B pairs keep their
    forward. `pipeline_order_with_comms` is the runtime's private lowered order in 2.13.
    """
    from torch.distributed.pipelining.schedules import _ComputationType as A
    from torch.distributed.pipelining.schedules import _PipelineScheduleRuntime

    if not isinstance(schedule, _PipelineScheduleRuntime):
        yield
        return
    keep = (A.FORWARD, A.SEND_F, A.RECV_F, A.UNSHARD, A.RESHARD)

    def forward_part(action) -> list:
        if action.computation_type == A.OVERLAP_F_B:
            return [a for a in action.sub_actions if a.computation_type in keep]
        return [action] if action.computation_type in keep else []

    full = schedule.pipeline_order_with_comms
    schedule.pipeline_order_with_comms = {rank: [a for action in order for a in forward_part(action)]
                                          for rank, order in full.items()}
    try:
        yield
    finally:
        schedule.pipeline_order_with_comms = full


def fake_peak_bytes(build, step) -> dict[str, int]:
    """Bytes by kind (param, buffer, grad, act, temp, opt, oth) and "total" at the peak of `step(module)`, where
    `module = build()`, counted on fake tensors: no memory is allocated, so any size can be counted on any machine.
    torch 2.13: FakeTensorMode (torch._subclasses.fake_tensor) and MemTracker (torch.distributed._tools.mem_tracker,
    whose peak snapshot is the breakdown at the moment the total peaked). The layout planner's tests check their
    activation figures against it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        module = build()
        tracker = MemTracker()
        tracker.track_external(module)
        with tracker:
            step(module)
        peak = tracker.get_tracker_snapshot("peak")
    out: dict[str, int] = {}
    for per_kind in peak.values():
        for kind, n in per_kind.items():
            name = str(kind).rsplit(".", 1)[-1].lower()
            out[name] = out.get(name, 0) + n
    return out


# --- FSDP2's offload policy (training.enable_cpu_offload) -----------------------------------------------------------
def fsdp_offload_policies(module: nn.Module) -> list:
    """The OffloadPolicy of each FSDP2 parameter group that fully_shard made under `module` (torch 2.13 keeps it on
    the module's private FSDPState): a check that CPU offload is in force where the device is the CPU anyway."""
    return [group.offload_policy for m in module.modules() if hasattr(m, "_get_fsdp_state")
            for group in m._get_fsdp_state()._fsdp_param_groups]


def replicate_module(module: nn.Module, process_group, **ddp_kwargs) -> None:
    """torch's DDP applied in place (composable `replicate`, private torch.distributed._composable in 2.13): the
    module keeps its class's attributes and its parameter names (no `module.` prefix), and gains
    `set_requires_gradient_sync(bool)`. DistributedDataParallel is built at the first forward, over the module's
    parameters; `ddp_kwargs` go to it (bucket_cap_mb, gradient_as_bucket_view, ...)."""
    from torch.distributed._composable.replicate import replicate

    replicate(module, process_group=process_group, **ddp_kwargs)

"""Fails loudly when a torch upgrade moves a private API that trainer/torch_private.py relies on.

Checked against torch 2.13.0. Each test names what broke; the fix belongs in trainer/torch_private.py only.
"""

import inspect

import torch
from torch.distributed.device_mesh import DeviceMesh


def test_device_mesh_flatten_unflatten():
    assert callable(getattr(DeviceMesh, "_flatten", None)), "DeviceMesh._flatten is gone: update flatten_mesh"
    assert callable(getattr(DeviceMesh, "_unflatten", None)), "DeviceMesh._unflatten is gone: update unflatten_mesh"
    params = list(inspect.signature(DeviceMesh._unflatten).parameters)
    assert params[:4] == ["self", "dim", "mesh_sizes", "mesh_dim_names"], params


def test_fake_process_group_for_dry_run():
    from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401


def test_context_parallel_internals():
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp

    for name in ("custom_ops", "_templated_ring_attention", "_templated_ring_attention_backward", "_cp_options",
                 "set_rotate_method"):
        assert hasattr(cp, name), f"torch context parallel lost {name}: update enable_cpu_context_parallel"
    assert isinstance(cp.custom_ops, dict)
    assert hasattr(cp._cp_options, "enable_load_balance")
    ring = inspect.signature(cp._templated_ring_attention).parameters
    assert list(ring)[:7] == ["group", "seq_dim", "op", "query", "key", "value", "is_causal"], list(ring)
    back = inspect.signature(cp._templated_ring_attention_backward).parameters
    assert list(back)[:11] == ["group", "seq_dim", "op", "grad_out", "grad_out_name", "query", "key", "value", "out",
                               "logsumexp", "is_causal"], list(back)


def test_cpu_sdpa_kernels_keep_their_schemas():
    # The shim reads these ops' arguments by position.
    fwd = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default._schema)
    bwd = str(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default._schema)
    assert "(Tensor query, Tensor key, Tensor value, float dropout_p=0., bool is_causal=False, *" in fwd, fwd
    assert ("(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, "
            "float dropout_p, bool is_causal, *") in bwd, bwd


def test_cpu_sdpa_runs_the_flash_kernel():
    # If CPU SDPA stops dispatching to this kernel, the shim silently stops being used: make it loud.
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Spy():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default in seen
    assert torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default in seen


def test_tensor_cycle_warnings_for_gc_debug():
    from torch.utils.viz import _cycles

    assert callable(getattr(_cycles, "warn_tensor_cycles", None)), \
        "torch.utils.viz._cycles.warn_tensor_cycles is gone: update warn_tensor_cycles (training.gc_debug)"


def test_process_group_registry():
    from torch.distributed import distributed_c10d as c10d

    assert isinstance(getattr(c10d._world, "pg_map", None), dict), "c10d._world.pg_map is gone: update process_groups"
    assert callable(getattr(c10d, "_set_pg_timeout", None)), "c10d._set_pg_timeout is gone: update " \
                                                             "set_process_group_timeouts"


def test_loader_workers_stop_at_once():
    # A StatefulDataLoader keeps its iterator (a reference cycle the garbage collector may tear down in an order
    # that leaves the workers waiting): shutdown_loader_workers must end them while everything is alive.
    import time

    from torchdata.stateful_dataloader import StatefulDataLoader

    from trainer.torch_private import shutdown_loader_workers

    loader = StatefulDataLoader(list(range(64)), batch_size=2, num_workers=2)
    iterator = iter(loader)
    next(iterator)
    assert loader._iterator is iterator, "StatefulDataLoader no longer keeps _iterator: update shutdown_loader_workers"
    workers = list(iterator._workers)
    start = time.monotonic()
    shutdown_loader_workers(loader)
    assert not any(w.is_alive() for w in workers) and time.monotonic() - start < 2, "loader workers did not stop"
    assert loader._iterator is None


def test_process_groups_can_be_aborted():
    from torch.distributed.distributed_c10d import _abort_process_group

    assert callable(_abort_process_group), "_abort_process_group is gone: update abort_process_groups"


def test_checkpoint_storage_extents(tmp_path):
    import torch.distributed.checkpoint as dcp

    from trainer.torch_private import storage_extents

    dcp.save({"a": torch.zeros(100), "b": torch.ones(3, 7)}, checkpoint_id=str(tmp_path))
    extents = storage_extents(dcp.FileSystemReader(str(tmp_path)).read_metadata())
    assert list(extents) == ["__0_0.distcp"]  # one file per rank, every item in it
    assert 100 * 4 + 21 * 4 <= extents["__0_0.distcp"] <= (tmp_path / "__0_0.distcp").stat().st_size


def _pipeline_stages(stage_ids: list[int], n_stages: int) -> list:
    """PipelineStages of rank 0 of a 2-rank fake process group (construction needs a group, nothing runs)."""
    from torch.distributed.pipelining import PipelineStage

    return [PipelineStage(torch.nn.Linear(2, 2), i, n_stages, torch.device("cpu")) for i in stage_ids]


def test_pipeline_schedule_csv_and_forward_only_order():
    import torch.distributed as dist
    from torch.distributed.pipelining.schedules import _ComputationType as A
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    from tests.unit.test_pipeline import SCHEDULE_CSV
    from trainer.torch_private import (check_schedule_actions, csv_schedule, forward_only_order,
                                       init_fake_process_group, read_schedule_csv)

    init_fake_process_group(0, 2)
    try:
        actions = read_schedule_csv(str(SCHEDULE_CSV))
        assert str(actions[1][1]) == "1F0" and actions[1][0] is None, "torch's _Action.from_str changed"
        assert check_schedule_actions(actions, 2, 4, 4) == {0: 0, 2: 0, 1: 1, 3: 1}, "_validate_schedule changed"
        schedule = csv_schedule(_pipeline_stages([0, 2], 4), 4, lambda out, target: out.sum(), str(SCHEDULE_CSV))
        assert schedule.pipeline_order == actions, "_PipelineScheduleRuntime._load_csv no longer keeps the order"
        full = schedule.pipeline_order_with_comms
        kinds = {a.computation_type for a in full[0]}
        assert {A.SEND_F, A.RECV_B, A.BACKWARD_INPUT, A.BACKWARD_WEIGHT} <= kinds, "the runtime's lowering changed"

        for sched, overlapped in ((schedule, False),
                                  (ScheduleDualPipeV(_pipeline_stages([0, 3], 4), n_microbatches=4,
                                                     loss_fn=lambda out, target: out.sum()), True)):
            full = sched.pipeline_order_with_comms
            assert (A.OVERLAP_F_B in {a.computation_type for a in full[0]}) == overlapped
            forwards = [str(s) for a in full[0] for s in (a.sub_actions or (a,)) if s.computation_type == A.FORWARD]
            with forward_only_order(sched):
                inside = sched.pipeline_order_with_comms[0]
                assert {a.computation_type for a in inside} <= {A.FORWARD, A.SEND_F, A.RECV_F, A.UNSHARD, A.RESHARD}
                assert [str(a) for a in inside if a.computation_type == A.FORWARD] == forwards
            assert sched.pipeline_order_with_comms is full, "the training order must come back"
    finally:
        dist.destroy_process_group()


def test_fake_peak_bytes_counts_a_linear_layer():
    from trainer.torch_private import fake_peak_bytes

    def step(linear):
        linear(torch.randn(128, 64, requires_grad=True)).sum().backward()

    counted = fake_peak_bytes(lambda: torch.nn.Linear(64, 32, bias=False), step)
    assert counted["param"] == 64 * 32 * 4, counted  # MemTracker's kinds or its peak snapshot changed
    assert counted["total"] == sum(v for k, v in counted.items() if k != "total") and counted["act"] > 0, counted


def test_fsdp_offload_policy_internals():
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    assert callable(getattr(FSDPModule, "_get_fsdp_state", None)), "FSDPModule._get_fsdp_state is gone: update " \
                                                                    "fsdp_offload_policies"
    assert "_fsdp_param_groups" in inspect.getsource(FSDPState.__init__), "FSDPState._fsdp_param_groups is gone"
    assert "self.offload_policy" in inspect.getsource(FSDPParamGroup.__init__), "FSDPParamGroup.offload_policy is gone"


def test_activation_memory_budget_config():
    import torch._functorch.config as functorch_config

    from trainer.torch_private import set_activation_memory_budget

    for name in ("activation_memory_budget", "visualize_memory_budget_pareto", "memory_budget_pareto_dir",
                 "unsafe_treat_script_objects_as_zero_size"):
        assert hasattr(functorch_config, name), f"torch._functorch.config lost {name}: update " \
                                                "set_activation_memory_budget"
    try:
        set_activation_memory_budget(0.25, "/tmp/pareto")
        assert functorch_config.activation_memory_budget == 0.25
        assert functorch_config.visualize_memory_budget_pareto
        assert functorch_config.memory_budget_pareto_dir == "/tmp/pareto"
    finally:
        set_activation_memory_budget(1.0)
    assert functorch_config.activation_memory_budget == 1.0 and not functorch_config.visualize_memory_budget_pareto


def test_autograd_cache_switch():
    import torch._functorch.config as functorch_config

    from trainer.torch_private import set_autograd_cache

    assert hasattr(functorch_config, "enable_autograd_cache"), "torch._functorch.config lost enable_autograd_cache: " \
                                                                 "update set_autograd_cache"
    before = functorch_config.enable_autograd_cache
    try:
        set_autograd_cache(False)
        assert functorch_config.enable_autograd_cache is False
    finally:
        functorch_config.enable_autograd_cache = before


def test_async_tp_symmetric_memory_registration():
    import torch._inductor.config
    from torch._inductor.fx_passes import micro_pipeline_tp
    from torch.distributed import _symmetric_memory as symm

    assert hasattr(torch._inductor.config, "_micro_pipeline_tp"), "inductor lost _micro_pipeline_tp: update " \
                                                                 "enable_async_tensor_parallel"
    for name in ("enable_symm_mem_for_group", "is_symm_mem_enabled_for_group"):
        assert callable(getattr(symm, name, None)), f"{name} is gone: update enable_async_tensor_parallel"
    # The reason the deprecated registration is still made: the pass checks it. When this fails, torch no longer
    # needs it and enable_async_tensor_parallel can drop the call.
    assert "is_symm_mem_enabled_for_group" in inspect.getsource(micro_pipeline_tp), \
        "micro-pipeline TP no longer checks symmetric-memory registration: drop it from enable_async_tensor_parallel"


def test_composable_replicate():
    from torch.distributed._composable.replicate import DDP, replicate

    params = inspect.signature(replicate).parameters
    assert "module" in params and "ignored_modules" in params, f"replicate changed: update replicate_module {params}"
    assert callable(getattr(DDP, "set_requires_gradient_sync", None)), "replicate lost set_requires_gradient_sync"


def test_device_mesh_creates_groups_through_its_own_new_group_name():
    # reuse_device_mesh_groups replaces that name; if DeviceMesh stopped calling it, the test pool's jobs would
    # silently make new groups again (and slow down as they pile up, tests/distributed/worker.py)
    import inspect

    from torch.distributed import device_mesh, distributed_c10d

    assert device_mesh.new_group is distributed_c10d.new_group
    assert "new_group(" in inspect.getsource(device_mesh.DeviceMesh._init_one_process_group)

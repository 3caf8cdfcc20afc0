"""What FSDP2 is given: the mesh (1-D without replicas, 2-D for HSDP), built as rank 0 of an NGPU run on a fake
process group (pure replication goes to DDP instead); and the RoPE table a block sees under bf16 FSDP, on a real
1-rank gloo group."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from trainer.build import build_model, plan_run
from trainer.config import load_config
from trainer.models.llama import ModelArgs, Transformer
from trainer.parallel.fsdp import apply_fsdp
from trainer.torch_private import init_fake_process_group


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size,degrees,shape", [
    (4, {"data_parallel_shard_degree": 4}, (4,)),
    (4, {"data_parallel_shard_degree": 2, "context_parallel_degree": 2}, (4,)),
    (4, {"data_parallel_shard_degree": 2, "tensor_parallel_degree": 2}, (2,)),
    (4, {"data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 2}, (2, 2)),
    (4, {"data_parallel_replicate_degree": 2, "data_parallel_shard_degree": 1, "tensor_parallel_degree": 2}, (2, 1)),
], ids=["dp_shard=4", "dp_shard=2 x cp=2", "dp_shard=2 x tp=2", "HSDP 2x2", "dp_replicate=2 x tp=2"])
def test_fsdp_mesh_is_1d_without_replicas(world_size, degrees, shape):
    # FSDP2 runs a 2-D mesh as HSDP even when its replicate dim has size 1: an extra all-reduce per block.
    overrides = [a for key, value in degrees.items() for a in (f"--parallelism.{key}", str(value))]
    plan = plan_run(load_config(["--training.seq_len", "64", *overrides]), world_size, "cpu")
    init_fake_process_group(rank=0, world_size=world_size)
    plan.dims.build_mesh("cpu")
    assert tuple(plan.dims.mesh("fsdp").shape) == shape
    model = build_model(plan, torch.device("cpu"), init=False).model
    weight = model.layers["0"].attention.wq.weight  # a DTensor on FSDP's mesh (x tp)
    fsdp_dims = weight.device_mesh.ndim - (1 if "tp" in weight.device_mesh.mesh_dim_names else 0)
    assert fsdp_dims == len(shape)


def test_pure_replication_runs_on_ddp_with_the_plain_names():
    # dp_replicate=2 alone: DDP (composable replicate), not FSDP2 over a shard dim of size 1; the state dict keeps
    # the plain model's names, so checkpoints move between layouts.
    plan = plan_run(load_config(["--training.seq_len", "64", "--parallelism.data_parallel_replicate_degree", "2",
                                 "--parallelism.data_parallel_shard_degree", "1"]), 2, "cpu")
    assert plan.dims.ddp_enabled and not plan.dims.fsdp_enabled
    init_fake_process_group(rank=0, world_size=2)
    plan.dims.build_mesh("cpu")
    model = build_model(plan, torch.device("cpu"), init=False).model
    assert not isinstance(model.layers["0"].attention.wq.weight, DTensor)
    assert callable(getattr(model, "set_requires_gradient_sync", None)), "not replicated with DDP"
    with torch.device("meta"):
        plain = Transformer(plan.model_args)
    assert list(model.state_dict()) == list(plain.state_dict())


def test_rope_table_reaches_attention_in_fp32_under_bf16_fsdp():
    # The table is a forward input of every block: FSDP2's cast_forward_inputs made it bf16, unlike one process
    # (autocast leaves it fp32).
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=32, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args)
    apply_fsdp(model, init_device_mesh("cpu", (1,)), param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
               reshard_after_forward="default")
    seen = []
    for block in model.layers.values():
        block.attention.register_forward_pre_hook(lambda m, inputs: seen.append((inputs[0].dtype, inputs[1].dtype)))
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    assert seen == [(torch.bfloat16, torch.float32)] * 2

"""The tensor-parallel layout, built as rank 0 of an NGPU run on a fake process group (no collectives run).

Checked here: every parameter is a DTensor (foreach AdamW and clipping refuse a mix), the tied embedding is one
parameter sharded on the vocab dim, and DRY_RUN's per-rank parameter count shrinks by tp for the sharded layers.
"""

import re

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from trainer.build import build_model, plan_run
from trainer.config import load_config
from trainer.dry_run import dry_run
from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer, num_params
from trainer.torch_private import init_fake_process_group

# Column-wise layers shard their [out, in] weight on dim 0, row-wise ones on dim 1, norms are replicated.
EXPECTED_TP_PLACEMENT = {"wq": Shard(0), "wk": Shard(0), "wv": Shard(0), "w1": Shard(0), "w3": Shard(0),
                         "wo": Shard(1), "w2": Shard(1), "tok_embeddings": Shard(0), "output": Shard(0),
                         "attention_norm": Replicate(), "ffn_norm": Replicate(), "norm": Replicate()}


def build(name: str, world_size: int, overrides: list[str]) -> Transformer:
    """The meta model exactly as rank 0 of a `world_size`-rank run parallelizes it (the build path DRY_RUN uses)."""
    cfg = load_config(["--model.name", name, "--training.seq_len", "64", *overrides])
    plan = plan_run(cfg, world_size, "cpu")
    init_fake_process_group(rank=0, world_size=world_size)
    plan.dims.build_mesh("cpu")
    return build_model(plan, torch.device("cpu"), init=False).model


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["llama3", "smollm"])
@pytest.mark.parametrize("world_size,overrides", [
    (2, ["--parallelism.tensor_parallel_degree", "2"]),
    (4, ["--parallelism.tensor_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2"]),
], ids=["tp=2", "dp_shard=2 x tp=2"])
def test_every_parameter_is_a_dtensor_on_the_tp_plan(name, world_size, overrides):
    model = build(name, world_size, overrides)
    for pname, param in model.named_parameters():
        assert isinstance(param, DTensor), f"{pname} is a plain tensor"
        tp_dim = param.device_mesh.mesh_dim_names.index("tp")
        assert param.placements[tp_dim] == EXPECTED_TP_PLACEMENT[pname.split(".")[-2]], (pname, param.placements)
    if get_model_args(name, "debugmodel").tie_word_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
        assert [n for n, _ in model.named_parameters()].count("output.weight") == 0


def local_elements(world_size: int, overrides: list[str]) -> int:
    """The per-rank parameter count DRY_RUN reports for rank 0."""
    report = dry_run(load_config(["--training.seq_len", "64", *overrides]), world_size)
    return int(re.search(r"\(([\d,]+) local elements\)", report).group(1).replace(",", ""))


def test_dry_run_parameter_memory_shrinks_by_tp():
    args = get_model_args("llama3", "debugmodel")
    norms = (2 * args.n_layers + 1) * args.dim  # the only replicated parameters
    sharded = num_params(args) - norms
    for tp in (1, 2, 4):
        degrees = ["--parallelism.tensor_parallel_degree", str(tp)]
        # NGPU=4, the rest replicas: only TP shards, so each rank holds 1/tp of every sharded layer.
        replicated = local_elements(4, degrees + ["--parallelism.data_parallel_replicate_degree", str(4 // tp),
                                                  "--parallelism.data_parallel_shard_degree", "1"])
        assert replicated == sharded // tp + norms, tp
        # NGPU=4, the rest FSDP: 4 shards of every matrix whatever tp is; only the norms are split by dp_shard.
        fsdp = local_elements(4, degrees)
        assert fsdp == sharded // 4 + norms // (4 // tp), tp


def test_async_tp_registers_the_tp_group_for_symmetric_memory(monkeypatch):
    # Inductor's micro-pipeline pass fuses a collective with its matmul only for a group registered for symmetric
    # memory; torch 2.13 still skips the fusion silently otherwise. The build refuses async TP off CUDA, so the
    # TP plan is applied directly. Registrations are per process (and fake groups reuse names), so the call is
    # recorded rather than its effect.
    import torch._inductor.config
    from torch.distributed import _symmetric_memory

    from trainer.parallel.tensor_parallel import apply_tensor_parallel

    registered = []
    monkeypatch.setattr(_symmetric_memory, "enable_symm_mem_for_group", registered.append)
    monkeypatch.setattr(torch._inductor.config, "_micro_pipeline_tp", False)
    cfg = load_config(["--training.seq_len", "64", "--parallelism.tensor_parallel_degree", "2"])
    plan = plan_run(cfg, 2, "cpu")
    init_fake_process_group(rank=0, world_size=2)
    plan.dims.build_mesh("cpu")
    model = Transformer(get_model_args("llama3", "debugmodel"))
    apply_tensor_parallel(model.to("meta"), plan.dims.mesh("tp"), loss_parallel_enabled=True, async_tp=True)
    assert torch._inductor.config._micro_pipeline_tp
    assert registered == [plan.dims.mesh("tp").get_group().group_name]

"""What FSDP2 is given: the RoPE table a block sees under bf16 FSDP, on a real 1-rank gloo group."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from trainer.models.llama import ModelArgs, Transformer
from trainer.parallel.fsdp import apply_fsdp


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


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

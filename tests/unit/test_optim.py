"""Gradient clipping against fp64 values computed by hand."""

import torch

from trainer.optim import clip_grad_norm_


def test_grad_norm_is_accurate_on_large_cpu_tensors():
    # torch's CPU fp32 norm kernel drifts by ~7e-4 relative on a 4096^2 tensor; ours must not.
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(4096, 4096)), torch.nn.Parameter(torch.zeros(300))]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    expected = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).item()
    total = clip_grad_norm_(params, max_norm=0.0)
    assert abs(total.item() - expected) / expected < 1e-6


def test_clipping_scales_to_max_norm():
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))]
    params[0].grad, params[1].grad = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([4.0])
    total = clip_grad_norm_(params, max_norm=1.0)
    assert total.item() == 5.0
    assert torch.allclose(params[0].grad, torch.tensor([0.6, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(params[1].grad, torch.tensor([0.8]), atol=1e-6)


def test_grad_norm_over_dtensors_of_mixed_placements():
    # One foreach norm per group of gradients sharded over the same mesh dims, then a sum of squares over those
    # dims: on a 1-rank 2-D mesh every local shard is the whole gradient, so the norm is the hand-computed one.
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        torch.manual_seed(0)
        layouts = [(Shard(0), Shard(0)), (Shard(0), Shard(1)), (Shard(0), Replicate()), (Replicate(), Replicate()),
                   (Shard(0), Partial()), None]
        params, expected = [], 0.0
        for placements in layouts:
            grad = torch.randn(64, 32) * 1e-2
            expected += grad.double().pow(2).sum().item()
            if placements is None:  # a plain tensor among DTensors
                param = torch.nn.Parameter(torch.zeros(64, 32))
                param.grad = grad
            else:
                param = torch.nn.Parameter(DTensor.from_local(torch.zeros(64, 32), mesh, placements[:1] * 2))
                param.grad = DTensor.from_local(grad, mesh, placements)
            params.append(param)
        total = clip_grad_norm_(params, max_norm=0.0)
        assert not isinstance(total, DTensor) and total.dtype == torch.float32
        assert abs(total.item() - expected ** 0.5) / expected ** 0.5 < 1e-7
    finally:
        dist.destroy_process_group()

"""The memory levers in one process: what is refused (one line naming the conflict and the fix), per-parameter
optimizers stepped in backward against one AdamW, CPU offload in force under FSDP2, the full-bf16 model, the
start-up line about bf16 speed and the DRY_RUN estimate. Multi-process parity:
tests/distributed/test_memory_levers.py."""

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy

import trainer.build as build
from trainer.build import bf16_speed_note, build_model, plan_run
from trainer.checkpoint_state import OPTIONS
from trainer.config import ConfigError, load_config
from trainer.config.job_config import Optimizer
from trainer.dry_run import dry_run
from trainer.models.llama import ModelArgs, Transformer
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.optim_in_backward import OptimizerInBackward
from trainer.parallel.fsdp import apply_fsdp
from trainer.torch_private import fsdp_offload_policies

EARLY = ["--optimizer.early_step_in_backward", "true"]


@pytest.fixture(autouse=True)
def _destroy_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("args,world,expected", [
    ([*EARLY], 1,
     r"optimizer.early_step_in_backward = true with training.max_norm = 1.0: .* set training.max_norm = 0"),
    ([*EARLY, "--training.max_norm", "0", "--parallelism.pipeline_parallel_degree", "2"], 2,
     r"with parallelism.pipeline_parallel_degree = 2: .* set early_step_in_backward = false"),
    ([*EARLY, "--training.max_norm", "0", "--training.local_batch_size", "2", "--training.global_batch_size", "4"], 1,
     r"with gradient accumulation \(2 micro-batches per step\): .* set training.global_batch_size"),
    (["--training.enable_cpu_offload", "true"], 1,
     r"training.enable_cpu_offload = true needs FSDP.*: set parallelism.data_parallel_shard_degree > 1"),
    (["--training.enable_cpu_offload", "true", "--parallelism.tensor_parallel_degree", "2"], 2, r"needs FSDP"),
    (["--training.dtype", "bfloat16", "--training.mixed_precision_param", "float32"], 1,
     r"training.dtype = 'bfloat16' with mixed_precision_param = 'float32': .* set mixed_precision_param = 'bfloat16'"),
    (["--training.dtype", "float16"], 1, r"training.dtype"),
], ids=["early step + clipping", "early step + PP", "early step + accumulation", "offload without FSDP",
        "offload with TP only", "bf16 storage, fp32 compute", "float16"])
def test_refusals_are_one_line(args, world, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        plan_run(load_config(["--training.seq_len", "64", *args]), world, "cpu")
    assert "\n" not in str(e.value)


def test_offload_and_early_step_are_accepted_where_they_compose():
    plan_run(load_config(["--training.enable_cpu_offload", "true"]), 2, "cpu")
    plan_run(load_config([*EARLY, "--training.max_norm", "0", "--parallelism.tensor_parallel_degree", "2"]), 4, "cpu")


def _model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=64, multiple_of=32, max_seq_len=16))


def _train(model, optimizer, steps: int = 3) -> list[float]:
    scheduler = build_lr_scheduler(optimizer, load_config([]).lr_scheduler, 10)
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(step))
        loss = model(tokens).float().logsumexp(-1).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses


def test_early_step_is_adamw_stepped_in_backward():
    cfg = Optimizer(lr=1e-2, weight_decay=0.1)
    plain, early = _model(), _model()
    plain_opt, early_opt = build_optimizer(list(plain.parameters()), cfg), \
        build_optimizer(list(early.parameters()), Optimizer(lr=1e-2, weight_decay=0.1, early_step_in_backward=True))
    assert isinstance(early_opt, OptimizerInBackward)
    assert _train(plain, plain_opt) == _train(early, early_opt)
    for (name, a), b in zip(plain.named_parameters(), early.parameters()):
        assert torch.equal(a, b), name
        assert b.grad is None, f"{name}: gradient kept after its step"
    # the scheduler drove every per-parameter optimizer: one group, as AdamW has, at the same lr
    assert early_opt.param_groups[0]["lr"] == plain_opt.param_groups[0]["lr"]
    # the state dict has one AdamW's layout and values
    a, b = plain_opt.state_dict(), early_opt.state_dict()
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:
        for name in a["state"][key]:
            assert torch.equal(a["state"][key][name], b["state"][key][name]), (key, name)


def test_early_step_state_goes_through_dcp_state_dicts_and_back():
    # The checkpointer's path: get_state_dict on a fresh optimizer creates its state (a zero step at lr 0), and
    # set_state_dict loads it; the per-parameter optimizers must then step from the loaded state.
    source = _model()
    source_opt = build_optimizer(list(source.parameters()), Optimizer(early_step_in_backward=True))
    _train(source, source_opt, steps=2)
    # deep-copied: a state dict aliases the live state tensors, which the loaded optimizer would then share
    saved = copy.deepcopy(get_state_dict(source, source_opt, options=OPTIONS)[1])

    target = _model()
    target.load_state_dict(source.state_dict())
    target_opt = build_optimizer(list(target.parameters()), Optimizer(early_step_in_backward=True))
    build_lr_scheduler(target_opt, load_config([]).lr_scheduler, 10)  # as the Trainer does, before loading
    model_sd, fresh = get_state_dict(target, target_opt, options=OPTIONS)
    assert fresh.keys() == saved.keys()
    assert all(torch.equal(p, q) for p, q in zip(source.parameters(), target.parameters())), "the zero step moved"
    set_state_dict(target, target_opt, model_state_dict=model_sd, optim_state_dict=saved, options=OPTIONS)
    for p, q in zip(source.parameters(), target.parameters()):
        assert all(torch.equal(source_opt.state[p][k], target_opt.state[q][k]) for k in source_opt.state[p])
    _train(source, source_opt, steps=1)
    _train(target, target_opt, steps=1)
    for (name, a), b in zip(source.named_parameters(), target.parameters()):
        assert torch.equal(a, b), name


def test_cpu_offload_policy_is_in_force():
    # On a CPU mesh the shards live in host memory either way: the policy itself must be FSDP2's CPU offload
    # (without pinning, which needs an accelerator), on every block and the root.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model = _model()
    apply_fsdp(model, init_device_mesh("cpu", (1,)), param_dtype=torch.float32, reduce_dtype=torch.float32,
               reshard_after_forward="default", cpu_offload=True)
    policies = fsdp_offload_policies(model)
    assert len(policies) == 3  # two blocks and the root
    assert all(isinstance(p, CPUOffloadPolicy) and not p.pin_memory for p in policies)
    assert all(p.device.type == "cpu" for p in model.parameters())
    model(torch.randint(0, 64, (2, 16))).sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "cpu" for p in model.parameters())


def test_full_bf16_model():
    plan = plan_run(load_config(["--training.seq_len", "64", "--training.dtype", "bfloat16"]), 1, "cpu")
    assert (plan.dtype, plan.param_dtype) == (torch.bfloat16, torch.bfloat16)  # auto follows the storage
    parts = build_model(plan, torch.device("cpu"))
    model = parts.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rope_cache.dtype == torch.float32  # RoPE in fp32, as torchtitan's full bf16
    assert isinstance(parts.autocast, contextlib.nullcontext)  # no autocast over weights in the compute dtype
    fp32 = build_model(plan_run(load_config(["--training.seq_len", "64"]), 1, "cpu"), torch.device("cpu")).model
    for (name, a), b in zip(model.named_parameters(), fp32.parameters()):
        assert torch.equal(a, b.bfloat16()), f"{name}: not the fp32 run's initial weights, rounded"


def test_bf16_speed_note(monkeypatch):
    plan = plan_run(load_config(["--training.seq_len", "64", "--training.dtype", "bfloat16"]), 1, "cpu")
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: False)
    assert "no avx512_bf16 or amx_bf16" in bf16_speed_note(plan)
    assert bf16_speed_note(plan_run(load_config(["--training.seq_len", "64"]), 1, "cpu")) is None  # fp32
    assert bf16_speed_note(plan_run(load_config(["--training.dtype", "bfloat16"]), 1, "cuda")) is None
    monkeypatch.setattr(build, "cpu_has_native_bf16", lambda: True)
    assert bf16_speed_note(plan) is None


def _memory_line(*args: str) -> str:
    report = dry_run(load_config(["--model.flavor", "8B", "--training.seq_len", "64", *args]), 2, target="cpu")
    return next(line for line in report.splitlines() if line.startswith("memory per rank"))


def _gib(line: str, what: str) -> float:
    return float(line.split(f"{what} ")[1].split(" GiB")[0])


def test_dry_run_memory_estimate_accounts_for_the_levers():
    base = _memory_line()
    offload = _memory_line("--training.enable_cpu_offload", "true")
    bf16 = _memory_line("--training.dtype", "bfloat16")
    early = _memory_line(*EARLY, "--training.max_norm", "0")
    assert "host memory" in offload
    assert _gib(offload, "total on the device") == _gib(offload, "activations")
    for what in ("parameters", "gradients", "optimizer"):
        assert _gib(bf16, what) == pytest.approx(_gib(base, what) / 2, rel=1e-3)
    assert _gib(early, "gradients") == 0 < _gib(base, "gradients")

"""The memory levers against their references: CPU offload and optimizer-in-backward against runs without them,
full bf16 against a plain one-process bf16 loop written here with no trainer code.

Figures measured on the debug model (seq 64, 5 steps) are in the README's "Memory levers" section.
"""

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.layouts import SEED, STEPS, layout_overrides
from tests.distributed.parity import assert_matches_reference, assert_reference_moves
from trainer.build import cpu_has_native_bf16, model_args_for
from trainer.config import load_config
from trainer.data.dataloader import build_dataloader
from trainer.data.tokenizer import Tokenizer
from trainer.models.llama import Transformer
from trainer.optim import lr_factor, optimizer_kernel

pytestmark = pytest.mark.distributed
# bf16 is emulated on CPUs without native bf16 (AVX2 only): far too slow to test there, and never timed here.
NATIVE_BF16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 on this CPU (AVX512-BF16/AMX)")

OFFLOAD = ["dp_shard=2 cpu offload", "dp_shard=2 x tp=2 cpu offload", "pp=2 x dp_shard=2 1F1B cpu offload"]


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if i else name
                                    for i, name in enumerate(OFFLOAD)])
def test_cpu_offload_matches_single_process(layout, runs):
    # The optimizer steps on the host shards, clipping reads their norm: the same numbers as one process, at the
    # fp32 tolerance of every other layout.
    assert_matches_reference(runs.steps(layout), runs.steps("1 process"))


# Clipping is refused with early steps (each parameter steps before the others' gradients exist): both runs off.
NO_CLIP = {"training.max_norm": 0}
EARLY_STEP = {**NO_CLIP, "optimizer.early_step_in_backward": True}


EARLY_STEP_LAYOUTS = ["dp_shard=2", "dp_replicate=2 x dp_shard=2", "dp_shard=2 x tp=2"]


@pytest.mark.parametrize("layout", [pytest.param(name, marks=pytest.mark.slow) if i else name
                                    for i, name in enumerate(EARLY_STEP_LAYOUTS)])
def test_early_step_in_backward_matches_the_same_run_without(layout, runs):
    # Each parameter's AdamW step in its post-accumulate-grad hook, on FSDP's reduced shard (after HSDP's
    # all-reduce too), is the step the optimizer takes after backward: the same elementwise arithmetic on the same
    # numbers, so bit-identical (measured: 0 in loss, grad norm and parameters). The grad norm is summed in the
    # hooks instead.
    ref, got = runs.steps(layout, **NO_CLIP), runs.steps(layout, **EARLY_STEP)
    assert_reference_moves(ref)
    assert_matches_reference(got, ref, rtol=0.0, param_atol=0.0)
    assert_matches_reference(got, runs.steps("1 process", **NO_CLIP))


# Full bf16: parameters, gradients and AdamW moments in bf16, no fp32 master; compute in bf16 too.
FULL_BF16 = {"training.dtype": "bfloat16", "training.mixed_precision_param": "bfloat16"}


def plain_bf16_run() -> dict:
    """The reference: one process, plain PyTorch. The model initialized in fp32 and cast to bf16 (the RoPE table
    kept fp32), AdamW over the bf16 parameters, the loss on fp32 logits, the norm summed in fp64, clipping,
    the schedule's lr factor: what the trainer's config says, written out."""
    cfg = load_config(layout_overrides("1 process", **FULL_BF16)[1])
    t = cfg.training
    model = Transformer(model_args_for(cfg))
    model.init_weights(seed=SEED)
    model.to(torch.bfloat16)
    model.rope_cache = model.rope_cache.float()
    model.init_buffers()
    o = cfg.optimizer
    kernel = optimizer_kernel(o.implementation, list(model.parameters()))  # fused, as auto resolves on CPU
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps,
                            weight_decay=o.weight_decay, **{kernel: True})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, cfg.lr_scheduler, t.steps))
    loader = build_dataloader(t.dataset, t.dataset_path, Tokenizer.from_path(cfg.model.hf_assets_path), t.seq_len,
                              t.local_batch_size, 0, 1, seed=SEED, vocab_size=model.args.vocab_size,
                              options=t.dataloader, device_type="cpu")
    losses, norms, params = [], [], None
    for _, (inputs, labels) in zip(range(STEPS), loader):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs).flatten(0, 1).float(), labels.flatten())
        loss.backward()
        grads = [p.grad for p in model.parameters()]
        norm = torch.stack([g.double().square().sum() for g in grads]).sum().sqrt().float()
        torch._foreach_mul_(grads, torch.clamp(t.max_norm / (norm + 1e-6), max=1.0))
        opt.step()
        sched.step()
        losses.append(loss.item())
        norms.append(norm.item())
        if params is None:
            params = {name: p.detach().clone() for name, p in model.named_parameters()}
    return {"losses": losses, "grad_norms": norms, "params_after_step1": params}


def assert_moves_but_norms(run: dict) -> None:
    """Step 1 moves every weight matrix. The RMSNorm weights start at 1.0, and their first Adam step (lr x ~1 =
    4e-4 in warmup) is under half of bf16's spacing below 1.0 (2^-8): rounded back to 1.0, they stay put. That is
    full bf16's known cost (no master copy keeps updates smaller than the weight's precision), shown here."""
    model = Transformer(model_args_for(load_config(layout_overrides("1 process")[1])))
    model.init_weights(seed=SEED)
    for name, init in model.named_parameters():
        moved = (run["params_after_step1"][name].float() - init.detach().bfloat16().float()).abs().max().item()
        if name.endswith("norm.weight"):
            assert moved == 0, f"{name} moved by {moved:.3g}: bf16 rounding no longer swallows the first step?"
        else:
            assert moved > 1e-5, f"{name} did not move in step 1"


@pytest.fixture(scope="module")
def plain_bf16():
    # One thread, as the pool's ranks run: some bf16 CPU kernels round differently with the work split over more
    # threads (this reference's step-2 grad norm moved by 8e-7 relative at 2 threads, after a fused AdamW step 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return plain_bf16_run()
    finally:
        torch.set_num_threads(threads)


@NATIVE_BF16
def test_full_bf16_one_process_is_the_plain_bf16_loop(plain_bf16, runs):
    got = runs.steps("1 process", **FULL_BF16)
    assert all(p.dtype == torch.bfloat16 for p in got["params_after_step1"].values())
    assert_moves_but_norms(got)
    assert_matches_reference(got, plain_bf16, rtol=0.0, param_atol=0.0)
    fp32 = runs.steps("1 process")
    assert max(abs(a - b) / b for a, b in zip(got["losses"], fp32["losses"])) > 1e-4, "full bf16 trained in fp32"


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits): 2^(floor(log2 |x|) - 7)."""
    return torch.exp2(torch.floor(torch.log2(x.float().abs().clamp_min(2.0**-126))) - 7)


# FSDP computes each rank's bf16 gradients over half the batch, reduce-scatters them in fp32 (mixed_precision_reduce)
# and rounds the averaged shard to bf16, where one process rounds the whole batch's gradient once: the gradients
# differ by bf16 rounding. Measured over 5 steps: loss 1.7e-5 relative, grad norm 5.4e-5, parameters after step 1
# 4.9e-4 apart at most. Bounds: half a bf16 spacing, 2^-9 = 2e-3 relative, for loss and grad norm (what a single
# rounding of the result may differ by). Per weight element: Adam's first step is lr1 x g / (|g| + eps), about
# +-lr1 whatever |g|, so a gradient entry near 0 whose sign the rounding flips moves 2 x lr1 the other way; on top,
# the result rounds to bf16, within one spacing of the weight's magnitude. So |got - ref| <= 2 lr1 + spacing.
@pytest.mark.slow
@NATIVE_BF16
def test_full_bf16_dp_shard_matches_the_plain_bf16_loop(plain_bf16, runs):
    got = runs.steps("dp_shard=2", **FULL_BF16)
    assert all(p.dtype == torch.bfloat16 for p in got["params_after_step1"].values())
    assert_matches_reference(got, plain_bf16, rtol=2.0**-9, param_atol=float("inf"))
    cfg = load_config(layout_overrides("dp_shard=2", **FULL_BF16)[1])
    lr1 = cfg.optimizer.lr * lr_factor(0, cfg.lr_scheduler, cfg.training.steps)
    for name, ref in plain_bf16["params_after_step1"].items():
        excess = (got["params_after_step1"][name].float() - ref.float()).abs() - (2 * lr1 + bf16_ulp(ref))
        assert excess.max().item() <= 0, f"{name}: {excess.max().item():.3g} beyond 2 lr1 + one bf16 spacing"

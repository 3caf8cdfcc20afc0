"""Activation checkpointing against the plain model: same names, same numbers, and the recomputation each mode
promises (counted in matmul FLOPs during backward)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.config import load_config
from trainer.config.job_config import ActivationCheckpoint
from trainer.dry_run import activation_bytes, dry_run
from trainer.models.flavors import get_model_args
from trainer.models.llama import ModelArgs, Transformer
from trainer.parallel import activation_checkpoint
from trainer.parallel.activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from trainer.parallel.compile import apply_compile

TINY = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=128, max_seq_len=32)
MODES = {"full": ("full", "2"), "selective 2": ("selective", "2"), "selective 3": ("selective", "3"),
         "selective op": ("selective", "op")}


def _model(mode: str = "none", option: str = "2", **options) -> Transformer:
    model = Transformer(TINY)
    model.init_weights(seed=3)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode=mode, selective_ac_option=option, **options))
    return model


def _loss_and_grads(model: Transformer, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(tokens).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def _backward_flops(model: Transformer, tokens: torch.Tensor) -> int:
    loss = model(tokens).logsumexp(-1).mean()
    with FlopCounterMode(display=False) as counter:
        loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", MODES)
def test_names_and_state_dict_keys_unchanged(name):
    plain, ac = _model(), _model(*MODES[name])
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(ac.state_dict()) == list(plain.state_dict())
    ac.load_state_dict(plain.state_dict())  # strict: a plain checkpoint loads into a checkpointed model
    apply_compile(ac, "inductor")  # in place: compile adds no prefix either (nothing is traced until called)
    assert [n for n, _ in ac.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert list(ac.state_dict()) == list(plain.state_dict())


def test_which_blocks_are_checkpointed():
    def checkpointed(mode, option):
        return [lid for lid, block in _model(mode, option).layers.items() if is_checkpointed(block)]

    assert checkpointed("none", "2") == []
    assert checkpointed("full", "2") == ["0", "1", "2", "3"]
    assert checkpointed("selective", "2") == ["1", "3"]  # every 2nd block, by layer id: torchtitan's choice
    assert checkpointed("selective", "3") == ["2"]
    assert checkpointed("selective", "1") == ["0", "1", "2", "3"]
    assert checkpointed("selective", "op") == ["0", "1", "2", "3"]


@pytest.mark.parametrize("name", MODES)
def test_loss_and_grads_bit_identical(name):
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(_model(), tokens)
    loss, grads = _loss_and_grads(_model(*MODES[name]), tokens)
    assert torch.equal(loss, ref_loss)
    for pname, g in grads.items():
        assert torch.equal(g, ref_grads[pname]), pname


def test_recomputation_per_mode():
    # Backward matmul FLOPs exceed the plain model's by exactly the forward matmuls that are rerun: the whole block
    # (early_stop false, torchtitan's default), or with early_stop all but its last matmul (w2), whose output
    # backward does not need.
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = _backward_flops(_model(), tokens)
    with FlopCounterMode(display=False) as counter:
        _model().layers["0"](torch.randn(2, 32, TINY.dim), _model().rope_cache)
    block = counter.get_total_flops()
    early = block - 2 * tokens.numel() * TINY.dim * TINY.ffn_hidden_dim
    assert _backward_flops(_model("full", "2"), tokens) - plain == TINY.n_layers * block
    assert _backward_flops(_model("full", "2", early_stop=True), tokens) - plain == TINY.n_layers * early > 0
    assert _backward_flops(_model("selective", "2"), tokens) - plain == TINY.n_layers // 2 * block
    assert _backward_flops(_model("selective", "2", early_stop=True), tokens) - plain == TINY.n_layers // 2 * early
    # "op" (torchtitan's policy) keeps attention and every other matmul of a block's forward (wq, wv, w1, w2) and
    # reruns the other three (wk, wo, w3) with the cheap ops: exactly their forward FLOPs again per block.
    rerun = 2 * tokens.numel() * TINY.dim * (TINY.kv_dim + TINY.dim + TINY.ffn_hidden_dim)
    assert _backward_flops(_model("selective", "op"), tokens) - plain == TINY.n_layers * rerun


@pytest.mark.parametrize("options", [{"preserve_rng_state": False}, {"determinism_check": "none"},
                                     {"debug": True}])
def test_checkpoint_options_reach_torch(options, monkeypatch):
    seen = []
    checkpoint = activation_checkpoint.checkpoint
    monkeypatch.setattr(activation_checkpoint, "checkpoint", lambda *a, **kw: seen.append(kw) or checkpoint(*a, **kw))
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(_model(), tokens)
    loss, grads = _loss_and_grads(_model("full", "2", **options), tokens)
    assert len(seen) == TINY.n_layers and all(kw.items() >= options.items() for kw in seen)
    assert torch.equal(loss, ref_loss)
    for pname, g in grads.items():
        assert torch.equal(g, ref_grads[pname]), pname


def _saved_bytes(model: Transformer, tokens: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (the compiled blocks' included)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        model(tokens).logsumexp(-1).mean().backward()
    return sum(saved)


def test_memory_budget_makes_the_compiler_recompute():
    # No block is wrapped: the partitioner of each compiled block keeps less for backward at a lower budget, and
    # the gradients stay those of the plain model.
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(_model(), tokens)
    saved = {}
    for budget in (1.0, 0.0):
        torch._dynamo.reset()
        model = _model("memory_budget", memory_budget=budget)
        assert not any(is_checkpointed(block) for block in model.layers.values())
        apply_compile(model, "inductor")
        saved[budget] = _saved_bytes(model, tokens)
        model.zero_grad()
        loss, grads = _loss_and_grads(model, tokens)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
        for pname, g in grads.items():
            torch.testing.assert_close(g, ref_grads[pname], rtol=1e-5, atol=1e-6, msg=pname)
    assert saved[0.0] < 0.8 * saved[1.0], saved
    _model()  # a later build in the same process resets the budget to torch's default
    assert torch._functorch.config.activation_memory_budget == 1.0


@pytest.mark.parametrize("name", MODES)
def test_traces_under_compile(name):
    # Dynamo must trace each mode's checkpoint (the graph is the same for every backend; aot_eager skips codegen).
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    ref_loss, ref_grads = _loss_and_grads(_model(), tokens)
    model = _model(*MODES[name])
    apply_compile(model, "aot_eager")
    torch._dynamo.reset()
    loss, grads = _loss_and_grads(model, tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    for pname, g in grads.items():
        torch.testing.assert_close(g, ref_grads[pname], rtol=1e-5, atol=1e-7, msg=pname)


def test_dry_run_memory_budget_estimate_and_eager_note():
    # The estimate interpolates between no checkpointing (budget 1) and full (budget 0), as torch defines it.
    args = get_model_args("llama3", "debugmodel")
    none, full = (activation_bytes(args, 4096, 4, ac_mode=mode) for mode in ("none", "full"))
    budget = {b: activation_bytes(args, 4096, 4, ac_mode="memory_budget", memory_budget=b) for b in (0, 0.5, 1)}
    assert budget[1] == none and budget[0] == full and abs(budget[0.5] - (none + full) / 2) <= 1
    report = dry_run(load_config(["--training.seq_len", "64", "--compile.enable", "true",
                                  "--activation_checkpoint.mode", "memory_budget",
                                  "--parallelism.tensor_parallel_degree", "2"]), 2, target="cpu")
    assert "attention and feed_forward are compiled" in report and "dry run OK" in report


def test_memory_budget_pareto_is_drawn(tmp_path):
    torch._dynamo.reset()
    model = Transformer(TINY)
    model.init_weights(seed=3)
    apply_activation_checkpointing(model, ActivationCheckpoint(mode="memory_budget", memory_budget=0.5,
                                                               visualize_memory_budget_pareto=True),
                                   pareto_dir=str(tmp_path))
    try:
        apply_compile(model, "inductor")
        _loss_and_grads(model, torch.randint(0, TINY.vocab_size, (2, 32)))
    finally:
        apply_activation_checkpointing(Transformer(TINY), ActivationCheckpoint())  # back to torch's defaults
    assert list(tmp_path.glob("memory_budget_pareto*.svg"))

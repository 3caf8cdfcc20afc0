"""Activation checkpointing against the plain model: same names, same numbers, and the recomputation each mode
promises (counted in matmul FLOPs during backward)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer.models.llama import ModelArgs, Transformer
from trainer.parallel.activation_checkpoint import apply_activation_checkpointing, is_checkpointed
from trainer.parallel.compile import apply_compile

TINY = ModelArgs(dim=64, n_layers=4, n_heads=4, vocab_size=128, max_seq_len=32)
MODES = {"full": ("full", "2"), "selective 2": ("selective", "2"), "selective 3": ("selective", "3"),
         "selective op": ("selective", "op")}


def _model(mode: str = "none", option: str = "2") -> Transformer:
    model = Transformer(TINY)
    model.init_weights(seed=3)
    apply_activation_checkpointing(model, mode, option)
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
    # Backward matmul FLOPs exceed the plain model's by exactly the forward matmuls that are rerun. A rerun block
    # stops before its last matmul (w2): backward needs only that matmul's input (torch's early stop).
    tokens = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = _backward_flops(_model(), tokens)
    with FlopCounterMode(display=False) as counter:
        _model().layers["0"](torch.randn(2, 32, TINY.dim), _model().rope_cache)
    rerun_per_block = counter.get_total_flops() - 2 * tokens.numel() * TINY.dim * TINY.ffn_hidden_dim
    assert _backward_flops(_model("full", "2"), tokens) - plain == TINY.n_layers * rerun_per_block > 0
    assert _backward_flops(_model("selective", "2"), tokens) - plain == TINY.n_layers // 2 * rerun_per_block
    # "op" keeps every matmul and attention output: it reruns only the cheap ops (norms, RoPE, gating).
    assert _backward_flops(_model("selective", "op"), tokens) == plain


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

"""Where compile is refused, and what it covers: whole blocks, or on CPU with tensor parallel each block's attention
and MLP."""

import pytest

from trainer.config import ConfigError, JobConfig
from trainer.models.llama import ModelArgs, Transformer
from trainer.parallel.compile import (apply_compile, check_compile_supported, compile_summary, eager_note,
                                      maybe_compile_loss)
from trainer.train import cross_entropy_loss


def _cfg(enable=True, components=("model", "loss"), tp=1, backend="inductor") -> JobConfig:
    cfg = JobConfig()
    cfg.compile.enable, cfg.compile.components, cfg.compile.backend = enable, list(components), backend
    cfg.parallelism.tensor_parallel_degree = tp
    return cfg


CASES = [  # (config, the device type the run trains on, expected one-line error or None)
    (_cfg(tp=2), "cpu", None),  # compiles each block's attention and feed_forward (eager_note says so)
    (_cfg(tp=2, components=["loss"]), "cpu", None),
    (_cfg(tp=2), "cuda", None),
    (_cfg(tp=2, enable=False), "cpu", None),
    (_cfg(tp=2, components=[]), "cpu", None),  # enabled but nothing to compile
    (_cfg(tp=1), "cpu", None),
    (_cfg(backend="inductr"), "cuda", "compile.backend = 'inductr' is not a torch.compile backend"),
    (_cfg(backend="aot_eager"), "cpu", None),
]


@pytest.mark.parametrize("cfg,device_type,error", CASES)
def test_check_compile_supported(cfg, device_type, error):
    if error is None:
        check_compile_supported(cfg, device_type)
    else:
        with pytest.raises(ConfigError, match=error) as info:
            check_compile_supported(cfg, device_type)
        assert "\n" not in str(info.value)


def test_loss_compiled_only_when_asked():
    assert maybe_compile_loss(cross_entropy_loss, _cfg(enable=False)) is cross_entropy_loss
    assert maybe_compile_loss(cross_entropy_loss, _cfg(components=["model"])) is cross_entropy_loss
    assert maybe_compile_loss(cross_entropy_loss, _cfg(components=["loss"])) is not cross_entropy_loss


def test_what_compile_covers_and_says():
    assert compile_summary(_cfg(tp=2), "cuda", 2) == "model+loss (inductor)"
    assert compile_summary(_cfg(tp=2), "cpu", 2) == "model (attention + feed_forward)+loss (inductor)"
    assert compile_summary(_cfg(enable=False), "cpu", 1) == "off"
    assert eager_note(_cfg(tp=2), "cuda", 2) is None
    assert eager_note(_cfg(tp=1), "cpu", 1) is None
    assert eager_note(_cfg(tp=2, components=["loss"]), "cpu", 2) is None  # no block compiled: nothing left eager
    note = eager_note(_cfg(tp=2), "cpu", 2)
    assert "\n" not in note and "attention and feed_forward are compiled" in note and "norms and residual adds run eager" in note


def _compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


@pytest.mark.parametrize("whole_blocks", [True, False])
def test_apply_compile_scope(whole_blocks):
    model = Transformer(ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=32))
    apply_compile(model, "inductor", whole_blocks=whole_blocks)
    for block in model.layers.values():
        assert _compiled(block) == whole_blocks
        assert _compiled(block.attention) == _compiled(block.feed_forward) == (not whole_blocks)
        assert not any(_compiled(m) for m in (block.attention_norm, block.ffn_norm))

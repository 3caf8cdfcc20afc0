"""HF <-> ours: a tiny random transformers Llama must give our model the same logits, both ways, via safetensors."""

import dataclasses
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trainer.models.hf import (
    args_from_hf_config,
    from_hf_state_dict,
    hf_config_from_args,
    load_hf_checkpoint,
    save_hf_checkpoint,
    to_hf_state_dict,
)
from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer

ATOL = 1e-5


def _hf_model(tied: bool, rope_scaling: bool) -> "transformers.LlamaForCausalLM":
    # original_max_position_embeddings=32 puts head_dim 16's frequencies in all three llama3 regimes
    # (kept, interpolated, divided by factor) and lets sequences run past the original context.
    config = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=160,
        vocab_size=128, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32} if rope_scaling else None,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF inits norms to ones; random ones would show a swapped norm.
                p.uniform_(0.5, 1.5)
            elif "q_proj" in name or "k_proj" in name:  # sharper attention makes RoPE errors visible
                p.mul_(5.0)
    return model


def _hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


def _ours(path) -> tuple[Transformer, dict]:
    args, hf_sd = load_hf_checkpoint(path)
    model = Transformer(args).eval()
    model.load_state_dict(from_hf_state_dict(hf_sd, args))
    return model, hf_sd


CASES = [(False, True), (True, False)]
IDS = ["gqa_llama3_rope", "tied"]


@pytest.mark.parametrize("tied, rope_scaling", CASES, ids=IDS)
@pytest.mark.parametrize("seq", [16, 96])
def test_hf_to_ours_logits(tmp_path, tied, rope_scaling, seq):
    hf = _hf_model(tied, rope_scaling)
    hf.save_pretrained(tmp_path)
    ours, _ = _ours(tmp_path)
    assert ours.args.n_kv_heads == 2 and ours.args.tie_word_embeddings == tied
    assert (ours.args.rope_scaling is not None) == rope_scaling
    tokens = torch.randint(0, 128, (2, seq))
    with torch.no_grad():
        diff = (ours(tokens) - _hf_logits(hf, tokens)).abs().max().item()
    assert diff < ATOL


@pytest.mark.parametrize("tied, rope_scaling", CASES, ids=IDS)
def test_to_hf_state_dict_reproduces_hf_tensors(tmp_path, tied, rope_scaling):
    _hf_model(tied, rope_scaling).save_pretrained(tmp_path)
    ours, hf_sd = _ours(tmp_path)
    back = to_hf_state_dict(ours.state_dict(), ours.args)
    assert back.keys() == hf_sd.keys()
    for key, tensor in hf_sd.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize("tied, rope_scaling", CASES, ids=IDS)
@pytest.mark.parametrize("max_shard_bytes", [5 * 2**30, 20_000], ids=["single", "sharded"])
def test_save_hf_checkpoint_loads_in_transformers(tmp_path, tied, rope_scaling, max_shard_bytes):
    _hf_model(tied, rope_scaling).save_pretrained(tmp_path / "src")
    ours, hf_sd = _ours(tmp_path / "src")
    save_hf_checkpoint(tmp_path / "out", ours.args, ours.state_dict(), max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes == 20_000)
    if sharded:
        assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) > 2

    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="sdpa").eval()
    tokens = torch.randint(0, 128, (2, 48))
    with torch.no_grad():
        assert (reloaded(tokens).logits - ours(tokens)).abs().max().item() < ATOL

    # And back through our loader: the same tensors and args.
    args2, hf_sd2 = load_hf_checkpoint(tmp_path / "out")
    assert args2 == ours.args
    assert hf_sd2.keys() == hf_sd.keys()
    assert all(torch.equal(hf_sd2[k], hf_sd[k]) for k in hf_sd)


def test_save_casts_dtype_and_config_records_it(tmp_path):
    args = get_model_args("llama3", "debugmodel")
    model = Transformer(args)
    save_hf_checkpoint(tmp_path, args, model.state_dict(), dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    _, hf_sd = load_hf_checkpoint(tmp_path)
    assert all(t.dtype == torch.bfloat16 for t in hf_sd.values())


@pytest.mark.parametrize("name, flavor", [("llama3", "8B"), ("llama3", "1B"), ("llama2", "7B"), ("smollm", "1.7B")])
def test_config_round_trip_through_llama_config(name, flavor):
    args = get_model_args(name, flavor)
    cfg = transformers.LlamaConfig.from_dict(hf_config_from_args(args))
    back = args_from_hf_config(cfg.to_dict())  # transformers 5 rewrites rope keys as rope_parameters
    assert back.ffn_hidden_dim == args.ffn_hidden_dim
    assert back.rope_scaling == args.rope_scaling and back.rope_theta == args.rope_theta
    # The FFN size comes back literal, and the RoPE table at least as long as the llama3 original context.
    expected = dataclasses.replace(args, ffn_hidden=args.ffn_hidden_dim, ffn_dim_multiplier=None,
                                   multiple_of=back.multiple_of, max_seq_len=back.max_seq_len)
    assert back == expected
    assert back.max_seq_len == (8192 if args.rope_scaling else args.max_seq_len)


def test_user_errors_are_one_line_value_errors(tmp_path):
    with pytest.raises(ValueError, match="config.json not found"):
        load_hf_checkpoint(tmp_path)
    hf = _hf_model(tied=False, rope_scaling=True)
    hf.save_pretrained(tmp_path)
    args, hf_sd = load_hf_checkpoint(tmp_path)
    missing = dict(hf_sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="up_proj"):
        from_hf_state_dict(missing, args)
    wrong = dict(hf_sd, **{"model.norm.weight": torch.ones(65)})
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        from_hf_state_dict(wrong, args)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf_checkpoint(tmp_path)

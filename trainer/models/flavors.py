"""The model flavors by name and size (torchtitan's names: llama3 debugmodel ... 405B, llama2, smollm), and how a
run picks one (model.name, model.flavor) or adds one (experimental.custom_import)."""

import dataclasses

from trainer.models.llama import ModelArgs, RopeScaling


_LLAMA31_ROPE = RopeScaling(factor=8.0)
_LLAMA32_ROPE = RopeScaling(factor=32.0)
_LLAMA3 = dict(vocab_size=128256, n_kv_heads=8, rope_theta=500000.0)
_SMOLLM = dict(vocab_size=49152, tie_word_embeddings=True)
# torchtitan's document-masked siblings (llama3 debugmodel_flex_attn, 8B_flex, ...): block-causal attention.
_FLEX = dict(attn_type="flex", attn_mask_type="block_causal")
_VARLEN = dict(attn_type="varlen", attn_mask_type="block_causal")

FLAVORS: dict[str, dict[str, ModelArgs]] = {
    "llama3": {
        "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000.0),
        "debugmodel_flex_attn": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000.0,
                                          **_FLEX),
        "debugmodel_varlen_attn": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048, rope_theta=500000.0,
                                            **_VARLEN),
        # The benchmark shape of scripts/bench.py (dim 256, 4 layers, 4 heads, ffn 768, vocab 2048), shared with
        # other trainers' CPU benchmarks so figures compare.
        "benchmodel": ModelArgs(dim=256, n_layers=4, n_heads=4, vocab_size=2048, rope_theta=500000.0),
        "1B": ModelArgs(dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256,
                        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, **_LLAMA3),
        "3B": ModelArgs(dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256,
                        rope_scaling=_LLAMA32_ROPE, tie_word_embeddings=True, **_LLAMA3),
        "8B": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                        rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
        "8B_flex": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                             rope_scaling=_LLAMA31_ROPE, **_LLAMA3, **_FLEX),
        "8B_varlen": ModelArgs(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                               rope_scaling=_LLAMA31_ROPE, **_LLAMA3, **_VARLEN),
        # 8B's first 4 layers (with its full vocabulary): its layer and logit shapes on one GPU (scripts/gpu_check.py).
        "8B-4L": ModelArgs(dim=4096, n_layers=4, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024,
                           rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
        "70B": ModelArgs(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096,
                         rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
        "405B": ModelArgs(dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2, multiple_of=4096,
                          rope_scaling=_LLAMA31_ROPE, **_LLAMA3),
    },
    "llama2": {
        "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=16, vocab_size=2048),
        "7B": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    },
    "smollm": {
        "debugmodel": ModelArgs(dim=256, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=768, vocab_size=2048,
                                tie_word_embeddings=True),
        "135M": ModelArgs(dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_hidden=1536, **_SMOLLM),
        "360M": ModelArgs(dim=960, n_layers=32, n_heads=15, n_kv_heads=5, ffn_hidden=2560, **_SMOLLM),
        "1.7B": ModelArgs(dim=2048, n_layers=24, n_heads=32, n_kv_heads=32, ffn_hidden=8192, rope_theta=130000.0,
                          **_SMOLLM),
        # 1.7B's first 5 layers: its layer shapes at a size one test machine holds (configs/smollm_1.7b_3d.toml).
        "1.7B-5L": ModelArgs(dim=2048, n_layers=5, n_heads=32, n_kv_heads=32, ffn_hidden=8192, rope_theta=130000.0,
                             **_SMOLLM),
    },
}


def register_flavor(name: str, flavor: str, args: ModelArgs) -> None:
    """Add a flavor (e.g. from a module named by experimental.custom_import); a new name adds a model family."""
    FLAVORS.setdefault(name, {})[flavor] = args


def get_model_args(name: str, flavor: str) -> ModelArgs:
    """A fresh copy of the args of model `name` (e.g. "llama3") in size `flavor` (e.g. "8B")."""
    if name not in FLAVORS:
        raise ValueError(f"model.name={name!r} is unknown; choose one of {sorted(FLAVORS)}")
    if flavor not in FLAVORS[name]:
        raise ValueError(f"model.flavor={flavor!r} is unknown for {name}; choose one of {list(FLAVORS[name])}")
    return dataclasses.replace(FLAVORS[name][flavor])

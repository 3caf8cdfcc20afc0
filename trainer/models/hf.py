"""Hugging Face Llama <-> our Llama: state-dict names, config.json, and safetensors checkpoints.

Our RoPE uses HF's rotate_half layout, so the mapping is a pure renaming: no tensor is permuted or reshaped.
"""

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from trainer.models.llama import ModelArgs, RopeScaling, Transformer

# Per-layer names: ours -> HF (under "model.layers.{i}.").
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
              "output.weight": "lm_head.weight"}
_LAYER_RE = re.compile(r"layers\.(\d+)\.(.+)")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def _hf_name(ours: str) -> str:
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    m = _LAYER_RE.fullmatch(ours)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise ValueError(f"to_hf_state_dict: {ours!r} is not a Llama parameter name; pass a Transformer state dict")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def _expected_shapes(args: ModelArgs) -> dict[str, torch.Size]:
    """Keys and shapes of `Transformer(args).state_dict()`, from a meta-device model (no memory, no init)."""
    with torch.device("meta"):
        model = Transformer(args)
    return {name: t.shape for name, t in model.state_dict().items()}


def to_hf_state_dict(sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename our full state dict to HF LlamaForCausalLM names; lm_head is left out when embeddings are tied."""
    hf_sd = {}
    for name, tensor in sd.items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        hf_sd[_hf_name(name)] = tensor
    return hf_sd


def from_hf_state_dict(hf_sd: dict[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Rename an HF LlamaForCausalLM state dict to ours, checking every tensor is present with the right shape.

    The result has exactly the keys of `Transformer(args).state_dict()`, so `load_state_dict` is strict.
    Rotary `inv_freq` buffers are ignored (we recompute RoPE). With tied embeddings `lm_head.weight` is not
    needed (ignored if present) and our `output.weight` is the very tensor of `tok_embeddings.weight`.
    """
    expected = _expected_shapes(args)
    tied = args.tie_word_embeddings
    to_ours = {_hf_name(name): name for name in expected if not (tied and name == "output.weight")}
    sd = {}
    for hf_name, tensor in hf_sd.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue
        if hf_name not in to_ours:
            raise ValueError(
                f"HF checkpoint has tensor {hf_name!r} that a Llama with these args does not have; "
                "check config.json (num_hidden_layers, biases, tie_word_embeddings) matches the weights"
            )
        ours = to_ours[hf_name]
        if tensor.shape != expected[ours]:
            raise ValueError(
                f"HF tensor {hf_name!r} has shape {tuple(tensor.shape)} but args expect {tuple(expected[ours])}; "
                "check config.json matches the weights"
            )
        sd[ours] = tensor
    missing = sorted(set(to_ours) - set(hf_sd))
    if missing:
        raise ValueError(
            f"HF checkpoint lacks {len(missing)} tensor(s), first {missing[0]!r}; "
            "check that every shard listed in model.safetensors.index.json is present"
        )
    if tied:
        sd["output.weight"] = sd["tok_embeddings.weight"]
    return sd


def hf_config_from_args(args: ModelArgs, dtype: torch.dtype = torch.bfloat16) -> dict:
    """A config.json dict that transformers' LlamaConfig loads for this model.

    Written in the pre-v5 keys (rope_theta, rope_scaling, torch_dtype), which transformers 4.x and 5.x both read.
    """
    rope_scaling, max_positions = None, args.max_seq_len
    if args.rope_scaling is not None:
        s = args.rope_scaling
        rope_scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                        "high_freq_factor": s.high_freq_factor,
                        "original_max_position_embeddings": s.original_max_position_embeddings}
        # transformers warns when this is below the original context; our RoPE table extends to any length.
        max_positions = max(max_positions, s.original_max_position_embeddings)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": args.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def args_from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs for an HF Llama config.json dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`).

    The FFN size is taken literally as `ffn_hidden`; max_seq_len is max_position_embeddings, which callers
    usually lower to the training sequence length.
    """
    def unsupported(key: str, value) -> ValueError:
        return ValueError(f"HF config {key}={value!r} is not supported by our Llama; only plain Llama configs load")

    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if cfg.get(key, ok) != ok:
            raise unsupported(key, cfg[key])
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise unsupported("rope_type", rope_type)
    n_heads = cfg["num_attention_heads"]
    if cfg.get("head_dim") not in (None, cfg["hidden_size"] // n_heads):
        raise unsupported("head_dim", cfg["head_dim"])
    return ModelArgs(
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        vocab_size=cfg["vocab_size"],
        ffn_hidden=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_scaling=RopeScaling(
            factor=rope["factor"], low_freq_factor=rope["low_freq_factor"],
            high_freq_factor=rope["high_freq_factor"],
            original_max_position_embeddings=rope["original_max_position_embeddings"],
        ) if rope_type == "llama3" else None,
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", False),
    )


def load_hf_checkpoint(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor]]:
    """Read an HF Llama folder (config.json + model.safetensors, or shards + index). Returns args and the state
    dict under HF names; pass it through `from_hf_state_dict` for ours."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file} not found; point at an HF model folder (scripts/download_hf_assets.py)")
    args = args_from_hf_config(json.loads(config_file.read_text()))
    if (path / SAFETENSORS_INDEX).is_file():
        weight_map = json.loads((path / SAFETENSORS_INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (path / SAFETENSORS_FILE).is_file():
        files = [SAFETENSORS_FILE]
    else:
        raise ValueError(
            f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {path}; only safetensors checkpoints load "
            "(re-save .bin weights with save_pretrained(safe_serialization=True))"
        )
    hf_sd = {}
    for file in files:
        if not (path / file).is_file():
            raise ValueError(f"{path / file} listed in {SAFETENSORS_INDEX} is missing; download every shard")
        hf_sd.update(load_file(path / file))
    return args, hf_sd


def save_hf_checkpoint(
    path: str | Path,
    args: ModelArgs,
    sd_ours: dict[str, Tensor],
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Write our full state dict as an HF Llama folder: config.json and safetensors, sharded with an
    index.json when it exceeds max_shard_bytes. dtype casts floating tensors (default: keep theirs)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_sd = {}
    for name, tensor in to_hf_state_dict(sd_ours, args).items():
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        hf_sd[name] = tensor.contiguous()
    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes = 0
    for name, tensor in hf_sd.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += nbytes
    if len(shards) == 1:
        save_file(shards[0], path / SAFETENSORS_FILE, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, path / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, file))
        total = sum(t.numel() * t.element_size() for t in hf_sd.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    saved_dtype = dtype or next(t.dtype for t in hf_sd.values() if t.is_floating_point())
    (path / "config.json").write_text(json.dumps(hf_config_from_args(args, saved_dtype), indent=2) + "\n")

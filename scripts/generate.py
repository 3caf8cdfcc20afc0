"""Generate text from a trained checkpoint, on CPU or CUDA, in one process or tensor-parallel under torchrun.

    python scripts/generate.py --checkpoint outputs/checkpoint/step-10 --prompt "The meaning of" \
        [--tokenizer tests/assets/tokenizer] [--max-new-tokens 64] [--temperature 0 | 0.8 --top-k 50 --top-p 0.9]
        [--seed 0] [--no-cache] [--json]
    torchrun --standalone --nproc-per-node 2 scripts/generate.py --tp 2 --checkpoint ... (the same arguments)

--checkpoint is one of:
- a DCP folder (`.metadata` + `*.distcp`), as torch.distributed.checkpoint writes it from a run of any layout
  (FSDP, TP, PP: DCP reshards on load, here into one process without a process group). The weights are the tensors
  under `model.` with the names of `Transformer.state_dict()` (`model.layers.0.attention.wq.weight`, ...); other
  keys (optimizer, data loader, ...) are not read. Tensors saved without the `model.` prefix are found too.
  The smallest such folder is `dcp.save({"model": model.state_dict()}, checkpoint_id=folder)`.
  The architecture comes from --name/--flavor, else from the folder's `complete.json` ({"model": "llama3
  debugmodel", ...}, written by the trainer's checkpointer).
- a run's checkpoint folder, holding step-N DCP folders (and export/step-N): the newest step is taken, complete
  ones (with complete.json) first.
- an HF model folder (config.json + model.safetensors or shards + index), as trainer.models.hf writes and
  transformers' save_pretrained writes for a Llama.

The tokenizer is --tokenizer, else the checkpoint folder's tokenizer.json, else model.hf_assets_path's default.
The prompt is encoded with BOS; generation stops at EOS (unless --ignore-eos) or after --max-new-tokens. Output:
the prompt and its continuation as text, or with --json an object with the ids too. Mistakes are one line on stderr
and exit code 2.

Under torchrun (WORLD_SIZE > 1) the model is tensor-parallel over all the processes (--tp, which defaults to and
must equal their number; it must divide n_heads, n_kv_heads and the FFN hidden dim). It is built on the meta device,
sharded with the inference plan of trainer/parallel/tensor_parallel.py (Megatron column/row pairs without sequence
parallel, which a one-token decode step could not split; the full logits all-gathered on every rank), materialized
on each rank's device (its GPU with NCCL, or the CPU with gloo) and then loaded: DCP reads each rank's shards of
the saved tensors (any saved layout), and from an HF folder every rank reads each full tensor and keeps its slice.
Each rank holds 1/tp of the weights and of the KV cache (its own heads). Every rank samples from the same logits
with the same seed, and rank 0's token is broadcast each step so that no rank can drift or stop alone. Only rank 0
prints.
"""

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.build import build_inference_model, resolve_param_dtype  # noqa: E402
from trainer.checkpoint_files import MARKER, read_marker, step_folders  # noqa: E402
from trainer.config import ConfigError  # noqa: E402
from trainer.config.job_config import Model  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402
from trainer.distributed import DistInfo, init_distributed, shutdown  # noqa: E402
from trainer.generation import cast_weights, generate  # noqa: E402
from trainer.models.flavors import get_model_args  # noqa: E402
from trainer.models.hf import from_hf_state_dict, load_hf_checkpoint  # noqa: E402
from trainer.models.llama import ModelArgs, Transformer  # noqa: E402
from trainer.weights import load_dcp_weights, load_full_state  # noqa: E402

# DCP says on every load without a process group that it assumes one process, which is what we mean.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


class UsageError(ValueError):
    """A mistake in the arguments or files: printed as one line."""


def find_checkpoint(path: Path) -> tuple[str, Path]:
    """("hf" | "dcp", folder) for a checkpoint path; a run's checkpoint folder resolves to its newest step."""
    if not path.is_dir():
        raise UsageError(f"--checkpoint {path}: no such folder")
    if (path / "config.json").is_file():
        return "hf", path
    if (path / ".metadata").is_file():
        return "dcp", path
    # A run's checkpoint folder: its step-N folders, and the final model-only saves in export/step-N.
    for complete_only in (True, False):
        steps = {**step_folders(path, complete_only), **step_folders(path / "export", complete_only)}
        if steps:
            return find_checkpoint(steps[max(steps)])
    raise UsageError(f"--checkpoint {path}: neither a DCP folder (.metadata), a folder of step-N checkpoints, nor an "
                     f"HF model folder (config.json)")


def dcp_model_args(path: Path, name: str | None, flavor: str | None) -> ModelArgs:
    """Architecture of a DCP checkpoint: --name/--flavor, else the checkpointer's complete.json."""
    if name is None or flavor is None:
        saved = next((m["model"] for folder in (path, path.parent) if "model" in (m := read_marker(folder) or {})),
                     None)
        if saved is None or len(saved.split()) != 2:
            raise UsageError(f"{path} does not say which model it holds (no {MARKER}); pass --name and --flavor, "
                             f"e.g. --name llama3 --flavor debugmodel")
        saved_name, saved_flavor = saved.split()
        name, flavor = name or saved_name, flavor or saved_flavor
    try:
        return get_model_args(name, flavor)
    except ValueError as e:
        raise UsageError(str(e)) from None


def load_dcp_model(path: Path, args: ModelArgs, device: torch.device | str = "cpu",
                   tp_mesh: DeviceMesh | None = None, model_name: str | None = None) -> Transformer:
    """Read the model tensors of a DCP folder into one full model in this process, or with `tp_mesh` into this
    rank's shards of the tensor-parallel model (DCP reshards any saved layout into either)."""
    model = build_inference_model(args, device, tp_mesh)
    load_dcp_weights(model, path, model_name)
    return model


def load_hf_model(path: Path, device: torch.device | str = "cpu", tp_mesh: DeviceMesh | None = None) -> Transformer:
    """Read an HF Llama folder (config.json + safetensors) into our model; with `tp_mesh`, every rank reads each full
    tensor and keeps its shard."""
    try:
        args, hf_sd = load_hf_checkpoint(path)
        sd = from_hf_state_dict(hf_sd, args)
    except ValueError as e:
        raise UsageError(str(e)) from None
    model = build_inference_model(args, device, tp_mesh)
    load_full_state(model, sd)
    return model


def with_max_seq_len(model: Transformer, max_seq_len: int) -> Transformer:
    """RoPE tables are derived from the args, not saved: recompute them for the length generation needs."""
    if model.rope_cache.shape[0] < max_seq_len:
        model.args.max_seq_len = max_seq_len
        model.rope_cache = torch.empty(max_seq_len, model.rope_cache.shape[1], device=model.rope_cache.device)
        model.init_buffers()
    return model


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="DCP step folder, folder of step folders, or HF model folder")
    p.add_argument("--prompt", default="", help="text to continue (BOS is added)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json or its folder")
    p.add_argument("--name", default=None, help="model family for a DCP checkpoint (llama3, llama2, smollm)")
    p.add_argument("--flavor", default=None, help="model size for a DCP checkpoint (debugmodel, 8B, ...)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence every step (slow; a check)")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at EOS")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tp", type=int, default=None,
                   help="tensor-parallel degree under torchrun: the number of processes (the default)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="compute dtype: auto is bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--json", action="store_true", help="print a JSON object with ids and text")
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> None:
    if a.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens {a.max_new_tokens} must be >= 1")
    if a.temperature < 0:
        raise UsageError(f"--temperature {a.temperature} must be >= 0 (0 is greedy)")
    if a.top_k is not None and a.top_k < 1:
        raise UsageError(f"--top-k {a.top_k} must be >= 1")
    if a.top_p is not None and not 0 < a.top_p <= 1:
        raise UsageError(f"--top-p {a.top_p} must be in (0, 1]")


def resolve_tokenizer(a: argparse.Namespace, folder: Path) -> Tokenizer:
    candidates = [Path(a.tokenizer)] if a.tokenizer else [folder, Path(Model().hf_assets_path)]
    for path in candidates:
        for p in (path, ROOT / path) if not path.is_absolute() else (path,):
            if (p / "tokenizer.json").is_file() or (p.is_file() and p.suffix == ".json"):
                return Tokenizer.from_path(p)
    raise UsageError(f"no tokenizer.json at {', '.join(map(str, candidates))}; pass --tokenizer")


def resolve_device(a: argparse.Namespace, info: DistInfo) -> torch.device:
    """--device, with this rank's GPU for a bare "cuda"; refuses a device the process group cannot serve."""
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no GPU is visible; use --device cpu")
    if device.type == "cuda" and info.device.type != "cuda":
        raise UsageError("--device cuda with COMM_BACKEND=gloo, which runs on CPU; unset COMM_BACKEND or use --device "
                         "cpu")
    if device.type == "cuda" and device.index is None:
        device = info.device  # cuda:LOCAL_RANK, which init_distributed made current
    if dist.is_initialized() and device.type == "cpu" and dist.get_backend() == "nccl":
        raise UsageError("--device cpu under torchrun with a GPU visible: set COMM_BACKEND=gloo")
    return device


def tp_mesh_for(a: argparse.Namespace, info: DistInfo, device: torch.device) -> DeviceMesh | None:
    """The 1-D `tp` mesh over every process, or None in one process."""
    tp = info.world_size if a.tp is None else a.tp
    if tp != info.world_size:
        fix = f"launch torchrun --nproc-per-node {tp}" if tp > 1 else "run without torchrun"
        raise UsageError(f"--tp {tp} with {info.world_size} process(es): generation shards the model over every "
                         f"process (no data parallel); {fix}, or pass --tp {info.world_size}")
    return init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",)) if tp > 1 else None


def run(a: argparse.Namespace, info: DistInfo) -> int:
    """Load, generate, print (rank 0); the exit code."""
    try:
        check_args(a)
        device = resolve_device(a, info)
        tp_mesh = tp_mesh_for(a, info, device)
        kind, folder = find_checkpoint(Path(a.checkpoint))
        model = load_hf_model(folder, device, tp_mesh) if kind == "hf" else \
            load_dcp_model(folder, dcp_model_args(folder, a.name, a.flavor), device, tp_mesh)
        tokenizer = resolve_tokenizer(a, folder)
        if tokenizer.vocab_size > model.args.vocab_size:
            raise UsageError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model embeds only "
                             f"{model.args.vocab_size}; pass the model's own tokenizer")
        prompt = tokenizer.encode(a.prompt, bos=True)
        if not prompt:
            raise UsageError("--prompt is empty and the tokenizer has no BOS token to start from; give a prompt")
    except (UsageError, ConfigError) as e:
        # Every rank reads the same arguments and files and reaches the same verdict; rank 0 says it.
        if info.rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    dtype = resolve_param_dtype(a.dtype, device.type)
    model = with_max_seq_len(model, len(prompt) + a.max_new_tokens).eval()
    # The weights are cast to the compute dtype once (the RoPE table stays fp32): no autocast, which would recast
    # every weight at every token.
    model = cast_weights(model, dtype)
    # Under TP the logits are all-gathered, so the ranks' draws agree already; the broadcast makes sure of it.
    sync_token = (lambda token: dist.broadcast(token, group=tp_mesh.get_group(), group_src=0)) if tp_mesh else None
    out = generate(model, prompt, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                   seed=a.seed, use_cache=not a.no_cache, stop_ids=() if a.ignore_eos else (tokenizer.eos_id,),
                   sync_token=sync_token)
    if info.rank != 0:
        return 0
    shown_prompt = prompt[1:] if prompt and prompt[0] == tokenizer.bos_id else prompt
    completion = tokenizer.decode(out.tokens)
    if a.json:
        print(json.dumps({"checkpoint": str(folder), "format": kind, "tp": tp_mesh.size() if tp_mesh else 1,
                          "prompt": a.prompt, "prompt_ids": prompt, "ids": out.tokens, "completion": completion,
                          "text": tokenizer.decode(shown_prompt + out.tokens)}))
    else:
        print(tokenizer.decode(shown_prompt + out.tokens))
    return 0


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for mistakes, tracebacks for bugs, an exit that is safe under gloo."""
    a = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code = run(a, init_distributed())
    except ConfigError as e:  # COMM_BACKEND and LOG_RANK, read by init_distributed
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 1
    # A mistake is the same on every rank (same arguments, same files): meet at the barrier, so that no rank exits,
    # and has torchrun stop the others, before rank 0 has said what is wrong.
    shutdown(code, clean=code in (0, 2))


if __name__ == "__main__":
    main()

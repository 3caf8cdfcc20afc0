"""Convert model weights between this trainer's DCP checkpoints and HF model folders, offline, in one process.

    python scripts/convert_checkpoint.py dcp-to-hf OUTPUTS/checkpoint/step-1000 ./hf-out [--dtype bfloat16]
    python scripts/convert_checkpoint.py hf-to-dcp ./Llama-3.1-8B ./seed-dcp [--name llama3 --flavor 8B]

dcp-to-hf reads the model.* tensors of a full checkpoint or a model-only save (not the optimizer) and writes
config.json + safetensors that transformers loads; the model comes from the checkpoint's complete.json, or from
--name/--flavor. hf-to-dcp writes a model-only DCP folder to start training from with
`--checkpoint.initial_load_path ./seed-dcp` (initial_load_model_only = true, the default); --name/--flavor record
which model it is, so a run of another model refuses it. Both need memory for the whole model, as one process.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.checkpoint_files import MARKER, read_marker  # noqa: E402
from trainer.weights import read_dcp_model, save_dcp_model  # noqa: E402
from trainer.models.flavors import get_model_args  # noqa: E402
from trainer.models.hf import from_hf_state_dict, load_hf_checkpoint, save_hf_checkpoint  # noqa: E402


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def dcp_to_hf(src: Path, dst: Path, dtype: str | None, name: str | None, flavor: str | None,
              seq_len: int | None) -> None:
    marker = read_marker(src) or {}
    if (dst / "config.json").exists():
        fail(f"{dst} holds an HF model already; pick a new folder (nothing is overwritten)")
    if not (src / ".metadata").is_file():
        fail(f"{src}: no .metadata; point at a checkpoint folder such as step-N")
    if not (marker or name):
        fail(f"{src} has no {MARKER} (an unfinished save, or not ours); give --name and --flavor to convert it anyway")
    name, flavor = (name, flavor) if name else marker["model"].split(" ", 1)
    try:
        args = get_model_args(name, flavor)
    except ValueError as e:
        fail(str(e))
    args.max_seq_len = seq_len or marker.get("seq_len", args.max_seq_len)
    try:
        sd = read_dcp_model(src)
    except (ValueError, OSError) as e:
        fail(str(e))
    save_hf_checkpoint(dst, args, sd, dtype=getattr(torch, dtype) if dtype else None)
    print(f"wrote {dst} ({name} {flavor}, {len(sd)} tensors)")


def hf_to_dcp(src: Path, dst: Path, dtype: str | None, name: str | None, flavor: str | None) -> None:
    if (dst / MARKER).exists() or (dst / ".metadata").exists():
        fail(f"{dst} holds a checkpoint already; pick a new folder (nothing is overwritten)")
    try:
        args, hf_sd = load_hf_checkpoint(src)
        sd = from_hf_state_dict(hf_sd, args)
    except ValueError as e:
        fail(str(e))
    if dtype:
        sd = {k: v.to(getattr(torch, dtype)) for k, v in sd.items()}
    dst.mkdir(parents=True, exist_ok=True)
    info = {"step": 0, "source": str(src), "seq_len": args.max_seq_len}
    if name:
        info["model"] = f"{name} {flavor}"
    save_dcp_model(dst, sd, info)
    print(f"wrote {dst} ({len(sd)} tensors, model only)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("direction", choices=("dcp-to-hf", "hf-to-dcp"))
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: keep)")
    parser.add_argument("--name", help="model.name, e.g. llama3 (dcp-to-hf: overrides complete.json)")
    parser.add_argument("--flavor", help="model.flavor, e.g. 8B")
    parser.add_argument("--seq_len", type=int, help="dcp-to-hf: max_position_embeddings (default: the run's seq_len)")
    a = parser.parse_args(argv)
    if bool(a.name) != bool(a.flavor):
        fail("give --name and --flavor together")
    if a.direction == "dcp-to-hf":
        dcp_to_hf(a.src, a.dst, a.dtype, a.name, a.flavor, a.seq_len)
    else:
        hf_to_dcp(a.src, a.dst, a.dtype, a.name, a.flavor)


if __name__ == "__main__":
    main()

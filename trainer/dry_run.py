"""DRY_RUN=1: check a config for NGPU ranks on any machine, without a GPU or a real process group.

Parses and validates the config, resolves the mesh, builds the model on the meta device and parallelizes it
exactly as rank 0 of an NGPU run would (collectives go to a fake process group), then prints the resolved config,
the mesh, parameter count, FLOPs per token and an estimate of memory per rank. Exit 0 if the config is valid,
else one line naming the problem and exit 2.
"""

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from trainer.checkpoint_files import plan_load
from trainer.config import ConfigError, JobConfig, help_text, load_config
from trainer.models.llama import Transformer, flops_per_token, num_params
from trainer.parallel import parallelize
from trainer.parallel.compile import check_compile_supported
from trainer.parallel.pipeline import build_pipeline, plan_pipeline
from trainer.parallel_dims import ParallelDims, device_type
from trainer.torch_private import init_fake_process_group
from trainer.train import build_model_args, build_tokenizer, check_dataset, check_device, gradient_accumulation_steps
from trainer.validate import check_validation_data, check_validation_layout

GiB = 2**30


def _fmt_config(cfg: JobConfig) -> str:
    lines = []
    for section in dataclasses.fields(cfg):
        lines.append(f"[{section.name}]")
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            lines.append(f"  {key} = {value!r}")
    return "\n".join(lines)


def activation_bytes(args, tokens: int, bytes_per_el: int, tp: int = 1, loss_parallel: bool = False,
                     n_layers: int | None = None, logits: bool = True, ac_mode: str = "none",
                     selective_ac_option: str = "2") -> int:
    """Rough bytes of activations saved for backward on one rank.

    Per layer and token a block keeps: norm inputs/outputs and attention in/out (~7 x dim), k/v (2 x kv dim), the
    SwiGLU intermediates (4 x hidden). Tensor parallel splits all of it over tp except the two sequence-gathered
    norm outputs the column-wise layers keep. A checkpointed block keeps only its input, and in backward one block
    at a time is recomputed in full; "op" keeps the matmul and attention outputs. Plus the logits in the compute
    dtype and their fp32 copy for the loss (split over tp under loss parallel). A pipeline rank passes the layers
    it holds, and logits=False unless it holds the output.
    """
    kv_dim = (args.n_kv_heads or args.n_heads) * args.head_dim
    gathered = 2 * args.dim if tp > 1 else 0
    full = gathered + (7 * args.dim - gathered + 2 * kv_dim + 4 * args.ffn_hidden_dim) / tp
    layers = args.n_layers if n_layers is None else n_layers
    if ac_mode == "selective" and selective_ac_option == "op":
        kept = layers * (gathered + (5 * args.dim - gathered + 2 * kv_dim + 2 * args.ffn_hidden_dim) / tp)
    else:
        every = {"none": 0, "full": 1}.get(ac_mode)
        every = int(selective_ac_option) if every is None else every
        n_ckpt = layers // every if every else 0
        kept = (layers - n_ckpt) * full + n_ckpt * args.dim / tp + (full if n_ckpt else 0)
    logit_bytes = tokens * args.vocab_size * (bytes_per_el + 4) / (tp if loss_parallel else 1) if logits else 0
    return int(tokens * kept * bytes_per_el + logit_bytes)


def dry_run(cfg: JobConfig, world_size: int, require_assets: bool = False) -> str:
    """Validate `cfg` for `world_size` ranks and return the report (raises ConfigError when invalid).

    Missing assets (tokenizer, dataset files) are an error only with `require_assets` (the launcher's check
    before training): DRY_RUN checks a config on a machine that may never hold the weights or data.
    """
    args = build_model_args(cfg)
    dims = ParallelDims.resolve(cfg.parallelism, world_size)
    dims.validate_model(args, cfg.training.seq_len)
    check_validation_layout(cfg, dims)
    accum = gradient_accumulation_steps(cfg, dims.dp)
    plan = plan_pipeline(cfg.parallelism, cfg.training.local_batch_size, args.n_layers) if dims.pp > 1 else None
    notes = []
    try:
        check_dataset(cfg)
        build_tokenizer(cfg, args)
        check_validation_data(cfg)
    except ConfigError as e:
        if require_assets:
            raise
        notes.append(f"note: {e} (needed before training, not for this dry run)")
    load = plan_load(cfg)
    check_compile_supported(cfg, device_type=None)  # the training host's device is not known here
    param_dtype = torch.bfloat16 if cfg.training.mixed_precision_param == "bfloat16" else torch.float32
    init_fake_process_group(rank=0, world_size=world_size)
    try:
        dims.build_mesh("cpu")
        with torch.device("meta"):
            model = Transformer(args)
        if plan is not None:  # rank 0's stages, schedule included: its constructor checks the layout too
            parts = build_pipeline(model, plan, dims, torch.device("cpu"),
                                   lambda part: parallelize(part, dims, cfg, param_dtype),
                                   loss_fn=lambda logits, labels: logits.sum()).model_parts
        else:
            parts = [parallelize(model, dims, cfg, param_dtype)]
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                    for part in parts for p in part.parameters())
    finally:
        dist.destroy_process_group()
    total = num_params(args)
    # fp32 master weights + fp32 gradients + two fp32 Adam moments, each sharded like the parameters.
    state = local * 4 * 4
    # With PP this is an upper bound: it counts every microbatch in flight at once, as GPipe has them.
    tokens = cfg.training.local_batch_size * cfg.training.seq_len // dims.cp
    ac = cfg.activation_checkpoint
    act = activation_bytes(args, tokens, 2 if param_dtype == torch.bfloat16 else 4, dims.tp,
                           dims.loss_parallel_enabled, n_layers=sum(len(part.layers) for part in parts),
                           logits=any(part.output is not None for part in parts), ac_mode=ac.mode,
                           selective_ac_option=ac.selective_ac_option)
    return "\n".join([
        _fmt_config(cfg),
        f"mesh: {world_size} ranks = pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x "
        f"cp {dims.cp} x tp {dims.tp}; gradient accumulation {accum}",
        *([plan.describe()] if plan is not None else []),
        f"model: {cfg.model.name} {cfg.model.flavor}, {total / 1e9:.2f}B parameters ({total:,}); "
        f"{flops_per_token(args, cfg.training.seq_len) / 1e9:.2f} GFLOPs per token at seq_len {cfg.training.seq_len}",
        f"memory per rank (rank 0, estimate): parameters {local * 4 / GiB:.2f} GiB ({local:,} local elements), "
        f"gradients {local * 4 / GiB:.2f} GiB, optimizer {local * 8 / GiB:.2f} GiB, activations {act / GiB:.2f} GiB, "
        f"total {(state + act) / GiB:.2f} GiB",
        *notes,
        "checkpoint: " + ("disabled" if not cfg.checkpoint.enable else "starts fresh" if load is None else
                          f"{'resumes from' if load.resume else 'initial load from'} {load.path}"
                          f"{' (model only)' if load.model_only else ''}{' (HF)' if load.hf else ''}"),
        "dry run OK",
    ])


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.dry_run [--section.key value ...]`, world size from NGPU (default 1)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    # --preflight: run_train.sh's check before torchrun on this machine; silent when valid, and the
    # assets and the device-dependent checks must pass too.
    preflight = "--preflight" in argv
    argv = [a for a in argv if a != "--preflight"]
    try:
        world_size = int(os.environ.get("NGPU", "1"))
        if world_size < 1:
            raise ValueError
    except ValueError:
        print(f"error: NGPU = {os.environ.get('NGPU')!r}: expected a positive number of ranks", file=sys.stderr)
        sys.exit(2)
    try:
        cfg = load_config(argv)
        if preflight:
            check_device(cfg, device_type())
        report = dry_run(cfg, world_size, require_assets=preflight)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not preflight:
        print(report)


if __name__ == "__main__":
    main()

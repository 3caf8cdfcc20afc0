"""DRY_RUN=1: check a config for NGPU ranks on any machine, without a GPU or a real process group.

Plans the run (trainer/build.py: the same checks and figures the Trainer uses), builds the model on the meta
device and parallelizes it exactly as rank 0 of an NGPU run would (collectives go to a fake process group), then
prints the resolved config, the mesh, parameter count, FLOPs per token and an estimate of memory per rank. The run
is planned for CUDA devices unless `--device cpu` says otherwise (the dtype `auto` picks, and the device checks,
depend on it). Exit 0 if the config is valid, else one line naming the problem and exit 2.
"""

import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from trainer.build import (attention_summary, build_model, check_data, load_tokenizer, local_param_elements, plan_run,
                           state_bytes_per_element)
from trainer.checkpoint_files import plan_load
from trainer.config import ConfigError, JobConfig, help_text, load_config
from trainer.models.llama import flops_per_token, num_params
from trainer.parallel.compile import eager_note
from trainer.parallel_dims import device_type
from trainer.torch_private import init_fake_process_group

GiB = 2**30


def _fmt_config(cfg: JobConfig) -> str:
    """The resolved config as TOML-like tables, nested sections as [a.b]."""
    lines = []

    def table(name: str, section) -> None:
        lines.append(f"[{name}]")
        nested = []
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                nested.append((f"{name}.{f.name}", value))
            else:
                lines.append(f"  {f.name} = {value!r}")
        for sub_name, sub in nested:
            table(sub_name, sub)

    for section in dataclasses.fields(cfg):
        table(section.name, getattr(cfg, section.name))
    return "\n".join(lines)


def activation_bytes(args, tokens: int, bytes_per_el: int, tp: int = 1, loss_parallel: bool = False,
                     n_layers: int | None = None, logits: bool = True, ac_mode: str = "none",
                     selective_ac_option: str = "2", memory_budget: float = 1.0) -> int:
    """Rough bytes of activations saved for backward on one rank.

    Per layer and token a block keeps: norm inputs/outputs and attention in/out (~7 x dim), k/v (2 x kv dim), the
    SwiGLU intermediates (4 x hidden). Tensor parallel splits all of it over tp except the two sequence-gathered
    norm outputs the column-wise layers keep. A checkpointed block keeps only its input, and in backward one block
    at a time is recomputed in full; "op" keeps attention's and every other matmul's outputs. Plus the logits in
    the compute dtype and their fp32 copy for the loss (split over tp under loss parallel). A pipeline rank passes
    the layers it holds, and logits=False unless it holds the output. memory_budget B keeps B of what the blocks keep
    without checkpointing and 1 - B of what they keep fully checkpointed: torch's definition of the budget.
    """
    if ac_mode == "memory_budget":
        common = (args, tokens, bytes_per_el, tp, loss_parallel, n_layers, logits)
        return int(memory_budget * activation_bytes(*common, ac_mode="none")
                   + (1 - memory_budget) * activation_bytes(*common, ac_mode="full"))
    kv_dim = args.kv_dim
    gathered = 2 * args.dim if tp > 1 else 0
    full = gathered + (7 * args.dim - gathered + 2 * kv_dim + 4 * args.ffn_hidden_dim) / tp
    layers = args.n_layers if n_layers is None else n_layers
    if ac_mode == "selective" and selective_ac_option == "op":
        # every matmul's and attention's output but those of wk, wo and w3, which the policy recomputes
        kept = layers * (gathered + (4 * args.dim - gathered + kv_dim + args.ffn_hidden_dim) / tp)
    else:
        every = {"none": 0, "full": 1}.get(ac_mode)
        every = int(selective_ac_option) if every is None else every
        n_ckpt = layers // every if every else 0
        kept = (layers - n_ckpt) * full + n_ckpt * args.dim / tp + (full if n_ckpt else 0)
    logit_bytes = tokens * args.vocab_size * (bytes_per_el + 4) / (tp if loss_parallel else 1) if logits else 0
    return int(tokens * kept * bytes_per_el + logit_bytes)


def dry_run(cfg: JobConfig, world_size: int, require_assets: bool = False, target: str = "cuda") -> str:
    """Validate `cfg` for `world_size` ranks on `target` devices and return the report (ConfigError when invalid).

    Missing assets (tokenizer, dataset files) are an error only with `require_assets` (the launcher's check
    before training): DRY_RUN checks a config on a machine that may never hold the weights or data.
    """
    plan = plan_run(cfg, world_size, target)
    args, dims = plan.model_args, plan.dims
    notes = []
    try:
        check_data(cfg)
        load_tokenizer(plan)
    except ConfigError as e:
        if require_assets:
            raise
        notes.append(f"note: {e} (needed before training, not for this dry run)")
    load = plan_load(cfg)
    init_fake_process_group(rank=0, world_size=world_size)
    try:
        dims.build_mesh("cpu")  # rank 0's shards, computed on the fake group whatever device the run uses
        parts = build_model(plan, torch.device("cpu"), init=False).parts
        local = local_param_elements(parts)
    finally:
        dist.destroy_process_group()
    total = num_params(args)
    state_bytes = {what: local * size for what, size in state_bytes_per_element(plan).items()}
    offload, early = cfg.training.enable_cpu_offload, cfg.optimizer.early_step_in_backward
    # With PP this is an upper bound: it counts every microbatch in flight at once, as GPipe has them.
    tokens = cfg.training.local_batch_size * cfg.training.seq_len // dims.cp
    ac = cfg.activation_checkpoint
    act_bytes = plan.param_dtype.itemsize
    act = activation_bytes(args, tokens, act_bytes, dims.tp, dims.loss_parallel_enabled,
                           n_layers=sum(len(part.layers) for part in parts),
                           logits=any(part.output is not None for part in parts), ac_mode=ac.mode,
                           selective_ac_option=ac.selective_ac_option, memory_budget=ac.memory_budget)
    dtype_name = str(plan.param_dtype).removeprefix("torch.")
    dtype_why = (f"mixed_precision_param = auto on {target}" if cfg.training.mixed_precision_param == "auto"
                 else f"mixed_precision_param = {cfg.training.mixed_precision_param}")
    return "\n".join([
        _fmt_config(cfg),
        f"mesh: {world_size} ranks = pp {dims.pp} x dp_replicate {dims.dp_replicate} x dp_shard {dims.dp_shard} x "
        f"cp {dims.cp} x tp {dims.tp}; gradient accumulation {plan.accum_steps}",
        *([plan.pp_plan.describe()] if plan.pp_plan is not None else []),
        f"model: {cfg.model.name} {cfg.model.flavor}, {total / 1e9:.2f}B parameters ({total:,}); "
        f"{flops_per_token(args, cfg.training.seq_len) / 1e9:.2f} GFLOPs per token at seq_len {cfg.training.seq_len}",
        f"{attention_summary(args, target)}",
        *([note] if (note := eager_note(cfg, target, dims.tp)) else []),
        f"device: {target}; compute dtype {dtype_name} ({dtype_why}; --device cpu or cuda plans for the other)",
        f"memory per rank (rank 0, estimate): parameters {state_bytes['parameters'] / GiB:.2f} GiB ({local:,} local "
        f"elements) in {str(plan.dtype).removeprefix('torch.')}, gradients {state_bytes['gradients'] / GiB:.2f} GiB"
        f"{' (each freed once its parameter is stepped: early_step_in_backward)' if early else ''}"
        f", optimizer {state_bytes['optimizer'] / GiB:.2f} GiB"
        f"{' (all three in host memory: enable_cpu_offload)' if offload else ''}, activations {act / GiB:.2f} GiB "
        f"({dtype_name}), total on the device {((0 if offload else sum(state_bytes.values())) + act) / GiB:.2f} GiB",
        *notes,
        "checkpoint: " + ("disabled" if not cfg.checkpoint.enable else "starts fresh" if load is None else
                          f"{'resumes from' if load.resume else 'initial load from'} {load.path}"
                          f"{' (model only)' if load.model_only else ''}{' (HF)' if load.hf else ''}"),
        "dry run OK",
    ])


def _world_size() -> int:
    """NGPU (default 1); exits with one line when it is not a positive number."""
    try:
        world_size = int(os.environ.get("NGPU", "1"))
        if world_size < 1:
            raise ValueError
    except ValueError:
        print(f"error: NGPU = {os.environ.get('NGPU')!r}: expected a positive number of ranks", file=sys.stderr)
        sys.exit(2)
    return world_size


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.dry_run [--section.key value ...]`, world size from NGPU (default 1)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    # --preflight: the checks a training run makes on this machine (its ranks make them themselves, see
    # run_train.sh); silent when valid, and the assets must be there. --device cuda|cpu: the devices the run is
    # planned for (default cuda; the preflight check plans for this machine's).
    if "--plan" in argv:  # every valid layout for NGPU ranks instead of the configured one (trainer/planner.py)
        from trainer.plan_report import plan_main

        sys.exit(plan_main([a for a in argv if a != "--plan"], _world_size()))
    preflight = "--preflight" in argv
    argv = [a for a in argv if a != "--preflight"]
    target = device_type() if preflight else "cuda"
    if "--device" in argv:
        i = argv.index("--device")
        target = argv[i + 1] if i + 1 < len(argv) else ""
        argv = argv[:i] + argv[i + 2:]
        if target not in ("cuda", "cpu"):
            print(f"error: --device {target!r}: expected cuda or cpu", file=sys.stderr)
            sys.exit(2)
    world_size = _world_size()
    try:
        cfg = load_config(argv)
        report = dry_run(cfg, world_size, require_assets=preflight, target=target)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if not preflight:
        print(report)


if __name__ == "__main__":
    main()

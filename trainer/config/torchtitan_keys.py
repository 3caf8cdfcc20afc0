"""How this trainer treats every key of torchtitan v0.2.2's JobConfig, so that its TOML files run unchanged.

Each key is implemented (perhaps under another name, mapped by the loader), planned (accepted where its value
leaves the feature off, refused in one line otherwise), or never (a feature llama3 or this trainer has no use for,
accepted only off). validate() enforces `accepted`; --help prints each status next to the key's docstring; when a
planned feature lands, its entry becomes `implemented`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyStatus:
    """How this trainer treats one key of torchtitan v0.2.2's JobConfig."""

    status: str
    """implemented (here, perhaps under another name), planned (not implemented yet) or never (no use for llama3)."""
    accepted: tuple | None = ()
    """planned / never: the values accepted, those that leave the feature off; None: any value, because only a
    feature that is off here reads the key."""
    why: str = ""
    """planned / never: why other values are refused, or which feature reads the key."""


NOT_YET = "not implemented yet in this trainer"
NO_EXPERTS = "llama3 has no experts (this is for mixture-of-experts models)"
NO_FT = "torchft fault tolerance is not supported here (a run resumes from its checkpoints instead)"
_IMPLEMENTED = KeyStatus("implemented")


def _implemented(section: str, *keys: str) -> dict[str, KeyStatus]:
    return {f"{section}.{key}": _IMPLEMENTED for key in keys}


def _planned(*accepted, why: str = NOT_YET) -> KeyStatus:
    return KeyStatus("planned", accepted, why)


def _never(*accepted, why: str) -> KeyStatus:
    return KeyStatus("never", accepted, why)


def _read_only_by(status: str, feature: str) -> KeyStatus:
    return KeyStatus(status, None, f"read only by {feature}")


def _dataloader(section: str) -> dict[str, KeyStatus]:
    return _implemented(f"{section}.dataloader", "num_workers", "persistent_workers", "pin_memory", "prefetch_factor")


_MX = ("model.converters = [\"quantize.linear.mx\"], which is refused when a run starts (it needs a GPU of compute "
       "capability 10.x, and torchao 0.18 lacks the MXLinearConfig API these keys configure)")
_GROUPED = "grouped-matmul converters for mixture-of-experts layers; llama3 has none"

# Every key of torchtitan v0.2.2's JobConfig, in its order. validate() refuses a planned or never key set to a value
# outside `accepted`; --help shows each status next to the key's docstring.
TORCHTITAN_KEYS: dict[str, KeyStatus] = {
    **_implemented("job", "config_file", "dump_folder", "description", "print_config"),
    "job.save_config_file": _IMPLEMENTED,
    "job.custom_config_module": _IMPLEMENTED,
    **_implemented("profiling", "enable_profiling", "save_traces_folder", "profile_freq", "profiler_active",
                   "profiler_warmup", "enable_memory_snapshot", "save_memory_snapshot_folder"),
    **_implemented("metrics", "log_freq", "enable_tensorboard", "disable_color_printing", "save_tb_folder",
                   "save_for_all_ranks"),
    "metrics.enable_wandb": _IMPLEMENTED,
    **_implemented("model", "name", "flavor", "hf_assets_path", "tokenizer_path"),
    **_implemented("model", "converters", "print_after_conversion"),
    **_implemented("optimizer", "name", "lr", "beta1", "beta2", "eps", "weight_decay", "implementation",
                   "early_step_in_backward"),
    "lr_scheduler.warmup_steps": _IMPLEMENTED,
    "lr_scheduler.total_steps": _IMPLEMENTED,
    **_implemented("lr_scheduler", "decay_ratio", "decay_type", "min_lr_factor"),
    **_implemented("training", "dataset", "dataset_path", "local_batch_size", "global_batch_size", "seq_len",
                   "max_norm", "steps"),
    **_implemented("training", "enable_cpu_offload", "dtype"),
    **_implemented("training", "mixed_precision_param", "mixed_precision_reduce", "gc_freq"),
    "training.gc_debug": _IMPLEMENTED,
    **_dataloader("training"),
    **_implemented("parallelism", "data_parallel_replicate_degree", "data_parallel_shard_degree",
                   "fsdp_reshard_after_forward", "tensor_parallel_degree", "disable_loss_parallel",
                   "enable_async_tensor_parallel", "pipeline_parallel_degree", "module_fqns_per_model_part",
                   "pipeline_parallel_first_stage_less_layers", "pipeline_parallel_last_stage_less_layers",
                   "pipeline_parallel_layers_per_stage", "pipeline_parallel_schedule",
                   "pipeline_parallel_schedule_csv", "pipeline_parallel_microbatch_size"),
    "parallelism.pipeline_parallel_expert_parallel_overlap": _read_only_by("never", "expert parallel; " + NO_EXPERTS),
    **_implemented("parallelism", "context_parallel_degree", "context_parallel_load_balancer",
                   "context_parallel_rotate_method"),
    "parallelism.expert_parallel_degree": _never(1, why=NO_EXPERTS),
    "parallelism.expert_tensor_parallel_degree": _never(1, why=NO_EXPERTS),
    "parallelism.expert_parallel_comm_backend": _never("standard", why=NO_EXPERTS),
    "checkpoint.enable": _IMPLEMENTED,
    "checkpoint.enable_ft_dataloader_checkpoints": _read_only_by("never", "fault tolerance; " + NO_FT),
    **_implemented("checkpoint", "folder", "interval", "initial_load_path", "initial_load_model_only",
                   "initial_load_in_hf"),
    "checkpoint.initial_load_in_hf_quantized": _never(False, why="llama3's HF checkpoints hold unquantized weights"),
    **_implemented("checkpoint", "last_save_model_only", "last_save_in_hf", "export_dtype", "async_mode",
                   "keep_latest_k", "load_step", "exclude_from_loading", "enable_first_step_checkpoint"),
    "checkpoint.create_seed_checkpoint": _IMPLEMENTED,
    "checkpoint.load_only": _IMPLEMENTED,
    **_implemented("activation_checkpoint", "mode", "selective_ac_option"),
    "activation_checkpoint.per_op_sac_force_recompute_mm_shapes_by_fqns": _planned(["moe.router.gate"]),
    **_implemented("activation_checkpoint", "early_stop", "memory_budget", "visualize_memory_budget_pareto",
                   "preserve_rng_state", "determinism_check", "debug"),
    **_implemented("compile", "enable", "components", "backend"),
    **_implemented("quantize.linear.float8", "enable_fsdp_float8_all_gather",
                   "precompute_float8_dynamic_scale_for_fsdp", "recipe_name", "filter_fqns", "emulate"),
    **{f"quantize.linear.mx.{key}": _read_only_by("planned", _MX)
       for key in ("mxfp8_dim1_cast_kernel_choice", "recipe_name", "filter_fqns")},
    **{key: _read_only_by("never", _GROUPED)
       for key in ("quantize.grouped_mm.float8.fqns", "quantize.grouped_mm.mx.recipe_name",
                   "quantize.grouped_mm.mx.fqns")},
    **_implemented("comm", "init_timeout_seconds", "train_timeout_seconds", "trace_buf_size", "save_traces_folder",
                   "save_traces_file_prefix"),
    "comm.mode": _never("default", "fake_backend", why="local_tensor (one process simulating every rank) is not "
                        "supported here; fake_backend checks a layout as DRY_RUN=1 does"),
    "memory_estimation.enable": _never(False, why="DRY_RUN=1 estimates memory per rank instead"),
    "memory_estimation.disable_fake_mode": _read_only_by("never", "memory_estimation; DRY_RUN=1 estimates memory "
                                                         "per rank instead"),
    "fault_tolerance.enable": _never(False, why=NO_FT),
    **{f"fault_tolerance.{key}": _read_only_by("never", "fault_tolerance.enable; " + NO_FT)
       for key in ("process_group", "process_group_timeout_ms", "replica_id", "group_size", "min_replica_size",
                   "semi_sync_method")},
    "experimental.custom_import": _IMPLEMENTED,
    "experimental.custom_args_module": _planned("", why="the former name of job.custom_config_module, " + NOT_YET),
    **_implemented("validation", "enable", "dataset", "dataset_path", "local_batch_size", "seq_len", "freq",
                   "steps"),
    **_dataloader("validation"),
    **_implemented("debug", "seed", "deterministic"),
    "debug.deterministic_warn_only": _IMPLEMENTED,
    "debug.moe_force_load_balance": _never(False, why=NO_EXPERTS),
}

"""Every cross-field check of a loaded config, in one explicit validate() (lingua's way), and the one-line
ConfigError it raises: each names the key, the value and the fix. Layout checks that need the world size live in
ParallelDims; reading the TOML file and the CLI is manager.py's.
"""

import difflib
from collections.abc import Iterable
from operator import attrgetter

from trainer.config.job_config import JobConfig
from trainer.config.torchtitan_keys import TORCHTITAN_KEYS


class ConfigError(ValueError):
    """A user error in the configuration: the message is one line naming the key, the value and the fix."""


def suggest(name: str, options: Iterable[str]) -> str:
    """The closest valid name to `name`, as the end of an error line; else the valid ones."""
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(sorted(options))}"


def show(value) -> str:
    """A value as a TOML file spells it."""
    if isinstance(value, bool):
        return str(value).lower()
    return "unset" if value is None else repr(value)


def check(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `ok`."""
    if not ok:
        raise ConfigError(msg)


def _one_of(key: str, value, choices) -> None:
    check(value in choices, f"{key} = {value!r} is not one of {', '.join(map(str, choices))}")


def check_load_balancer(value) -> None:
    """parallelism.context_parallel_load_balancer is headtail or unset (checked before load maps it onto ours)."""
    key = "parallelism.context_parallel_load_balancer"
    check(value != "ptrr", f"{key} = 'ptrr' balances FlexAttention, but attention here is SDPA; use headtail (or "
                           f"none to turn balancing off)")
    check(value in ("headtail", None), f"{key} = {value!r} is not one of headtail, none (none: on the CLI only)")


def _check_torchtitan_keys(cfg: JobConfig) -> None:
    """A torchtitan key of a feature this trainer lacks is accepted only at a value that leaves the feature off."""
    for name, s in TORCHTITAN_KEYS.items():
        value = attrgetter(name)(cfg)
        if s.accepted and value not in s.accepted:  # () for implemented keys, None for any value
            leave = "unset" if s.accepted[0] is None else f"at {show(s.accepted[0])}"
            raise ConfigError(f"{name} = {show(value)}: {s.why}; leave it {leave}")


def validate(cfg: JobConfig) -> None:
    """Every check that needs only the config (layout checks that need the world size live in ParallelDims)."""
    t, p, o, s, m = cfg.training, cfg.parallelism, cfg.optimizer, cfg.lr_scheduler, cfg.metrics
    for key, value in (("training.local_batch_size", t.local_batch_size), ("training.seq_len", t.seq_len),
                       ("training.gc_freq", t.gc_freq), ("metrics.log_freq", m.log_freq),
                       ("parallelism.data_parallel_replicate_degree", p.data_parallel_replicate_degree),
                       ("parallelism.tensor_parallel_degree", p.tensor_parallel_degree),
                       ("parallelism.pipeline_parallel_degree", p.pipeline_parallel_degree),
                       ("parallelism.context_parallel_degree", p.context_parallel_degree)):
        check(value >= 1, f"{key} = {value} must be >= 1")
    check(t.steps >= 0, f"training.steps = {t.steps} must be >= 0")
    check(p.data_parallel_shard_degree == -1 or p.data_parallel_shard_degree >= 1,
          f"parallelism.data_parallel_shard_degree = {p.data_parallel_shard_degree} must be -1 (the rest) or >= 1")
    check(t.global_batch_size == -1 or t.global_batch_size >= 1,
          f"training.global_batch_size = {t.global_batch_size} must be -1 (local x dp) or >= 1")
    _one_of("parallelism.context_parallel_rotate_method", p.context_parallel_rotate_method, ("allgather", "alltoall"))
    check(p.pipeline_parallel_microbatch_size >= 1,
          f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size} must be >= 1")
    check(p.pipeline_parallel_layers_per_stage is None or p.pipeline_parallel_layers_per_stage >= 1,
          f"parallelism.pipeline_parallel_layers_per_stage = {p.pipeline_parallel_layers_per_stage} must be >= 1 "
          f"(or left unset)")
    for key, value in (("parallelism.pipeline_parallel_first_stage_less_layers",
                        p.pipeline_parallel_first_stage_less_layers),
                       ("parallelism.pipeline_parallel_last_stage_less_layers",
                        p.pipeline_parallel_last_stage_less_layers)):
        check(value >= 0, f"{key} = {value} must be >= 0")
    check(p.pipeline_parallel_degree == 1 or t.local_batch_size % p.pipeline_parallel_microbatch_size == 0,
          f"training.local_batch_size = {t.local_batch_size} is not a multiple of "
          f"parallelism.pipeline_parallel_microbatch_size = {p.pipeline_parallel_microbatch_size}; make it one")
    _one_of("training.mixed_precision_param", t.mixed_precision_param, ("auto", "float32", "bfloat16"))
    _one_of("training.mixed_precision_reduce", t.mixed_precision_reduce, ("float32", "bfloat16"))
    _one_of("training.dtype", t.dtype, ("float32", "bfloat16"))
    check(t.dtype == "float32" or t.mixed_precision_param != "float32",
          f"training.dtype = {t.dtype!r} with mixed_precision_param = 'float32': the weights are stored in {t.dtype} "
          f"and would only be upcast for compute; set mixed_precision_param = 'bfloat16' (or auto), or training.dtype "
          f"= 'float32' for float32 master weights")
    check(not o.early_step_in_backward or t.max_norm <= 0,
          f"optimizer.early_step_in_backward = true with training.max_norm = {t.max_norm}: clipping needs the norm "
          f"over every gradient, but each parameter is stepped as soon as its own is ready; set "
          f"training.max_norm = 0, or early_step_in_backward = false")
    check(not o.early_step_in_backward or p.pipeline_parallel_degree == 1,
          f"optimizer.early_step_in_backward = true with parallelism.pipeline_parallel_degree = "
          f"{p.pipeline_parallel_degree}: a schedule runs several microbatches' backwards per step, and each would "
          f"step the optimizer; set early_step_in_backward = false (or pipeline_parallel_degree = 1)")
    _one_of("parallelism.fsdp_reshard_after_forward", p.fsdp_reshard_after_forward, ("default", "always", "never"))
    _one_of("optimizer.name", o.name, ("AdamW", "Adam"))
    _one_of("optimizer.implementation", o.implementation, ("auto", "for-loop", "foreach", "fused"))
    _one_of("lr_scheduler.decay_type", s.decay_type, ("linear", "sqrt", "cosine"))
    check(o.lr > 0, f"optimizer.lr = {o.lr} must be > 0")
    check(o.eps > 0, f"optimizer.eps = {o.eps} must be > 0")
    check(o.weight_decay >= 0, f"optimizer.weight_decay = {o.weight_decay} must be >= 0")
    for key, value in (("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)):
        check(0 <= value < 1, f"{key} = {value} must be in [0, 1)")
    check(s.warmup_steps >= 0, f"lr_scheduler.warmup_steps = {s.warmup_steps} must be >= 0")
    check(s.total_steps is None or s.total_steps >= 1,
          f"lr_scheduler.total_steps = {s.total_steps} must be >= 1 (or left unset for training.steps)")
    check(s.decay_ratio is None or 0 <= s.decay_ratio <= 1,
          f"lr_scheduler.decay_ratio = {s.decay_ratio} must be in [0, 1] (or left unset)")
    check(0 <= s.min_lr_factor <= 1, f"lr_scheduler.min_lr_factor = {s.min_lr_factor} must be in [0, 1]")
    v = cfg.validation
    check(v.freq >= 1, f"validation.freq = {v.freq} must be >= 1 (validate every this many steps)")
    for key, value in (("validation.steps", v.steps), ("validation.local_batch_size", v.local_batch_size),
                       ("validation.seq_len", v.seq_len)):
        check(value == -1 or value >= 1, f"{key} = {value} must be -1 or >= 1")
    # The model's RoPE table has training.seq_len rows (context parallel shards it with the sequence): no longer.
    check(not v.enable or v.seq_len <= t.seq_len,
          f"validation.seq_len = {v.seq_len} exceeds training.seq_len = {t.seq_len}, the length of the model's RoPE "
          f"table; set it to at most {t.seq_len} (or -1)")
    check(not (v.enable and (v.dataset or t.dataset) == "synthetic" and v.steps == -1),
          "validation.steps = -1 evaluates the whole split, but the synthetic dataset is endless; set "
          "validation.steps to a number of batches")
    ac, prof = cfg.activation_checkpoint, cfg.profiling
    _one_of("activation_checkpoint.mode", ac.mode, ("none", "full", "selective", "memory_budget"))
    compiled_model = cfg.compile.enable and "model" in cfg.compile.components
    check(ac.mode != "memory_budget" or compiled_model,
          "activation_checkpoint.mode = 'memory_budget' needs the model compiled (the compiler's partitioner does "
          "the recomputing); set compile.enable = true with \"model\" in compile.components, or use full or selective")
    check(0 <= ac.memory_budget <= 1, f"activation_checkpoint.memory_budget = {ac.memory_budget} must be in [0, 1]")
    _one_of("activation_checkpoint.determinism_check", ac.determinism_check, ("default", "none"))
    # torch.utils.checkpoint's debug mode refuses any context_fn: a selective policy's, and the one compile adds.
    check(not ac.debug or not (compiled_model or (ac.mode == "selective" and ac.selective_ac_option == "op")),
          "activation_checkpoint.debug = true works only for eager checkpoints without a per-op policy (torch "
          "refuses debug with a context_fn); set compile.enable = false and use full or selective \"N\", or "
          "debug = false")
    check(ac.selective_ac_option == "op" or (ac.selective_ac_option.isdigit() and int(ac.selective_ac_option) >= 1),
          f"activation_checkpoint.selective_ac_option = {ac.selective_ac_option!r} must be \"op\" or a positive "
          f"integer N (checkpoint every N-th block), e.g. \"2\"")
    for component in cfg.compile.components:
        _one_of("compile.components", component, ("model", "loss"))
    check(prof.profile_freq >= 1, f"profiling.profile_freq = {prof.profile_freq} must be >= 1")
    check(prof.profiler_warmup >= 0, f"profiling.profiler_warmup = {prof.profiler_warmup} must be >= 0")
    check(prof.profiler_active >= 1, f"profiling.profiler_active = {prof.profiler_active} must be >= 1")
    check(not prof.enable_profiling or prof.profiler_warmup + prof.profiler_active <= prof.profile_freq,
          f"profiling.profiler_warmup {prof.profiler_warmup} + profiler_active {prof.profiler_active} > "
          f"profile_freq {prof.profile_freq}: a window must fit between two traces; lower them or raise profile_freq")
    for section in ("training", "validation"):
        d = getattr(cfg, section).dataloader
        key = f"{section}.dataloader"
        check(d.num_workers >= 0, f"{key}.num_workers = {d.num_workers} must be >= 0")
        check(d.num_workers > 0 or (d.prefetch_factor is None and not d.persistent_workers),
              f"{key}: prefetch_factor and persistent_workers need worker processes; set {key}.num_workers > 0 "
              f"or leave them unset")
        check(d.prefetch_factor is None or d.prefetch_factor >= 1,
              f"{key}.prefetch_factor = {d.prefetch_factor} must be >= 1 (or left unset)")
    _validate_checkpoint(cfg.checkpoint)
    check_load_balancer(p.context_parallel_load_balancer)
    _check_torchtitan_keys(cfg)


# What checkpoint.exclude_from_loading may name: the top-level keys of the Trainer's checkpoints (a unit test keeps
# this and the Checkpointer in step; the config imports nothing of the trainer's).
CHECKPOINT_PARTS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")


def _validate_checkpoint(c) -> None:
    _one_of("checkpoint.async_mode", c.async_mode, ("disabled", "async", "async_with_pinned_mem"))
    _one_of("checkpoint.export_dtype", c.export_dtype, ("float32", "bfloat16", "float16"))
    check(c.interval >= 1, f"checkpoint.interval = {c.interval} must be >= 1")
    check(c.keep_latest_k >= 0, f"checkpoint.keep_latest_k = {c.keep_latest_k} must be >= 0 (0 keeps all)")
    check(c.load_step >= -1, f"checkpoint.load_step = {c.load_step} must be a step >= 0, or -1 for the newest")
    for part in c.exclude_from_loading:
        check(part in CHECKPOINT_PARTS,
              f"checkpoint.exclude_from_loading: {part!r} is not a checkpoint part{suggest(part, CHECKPOINT_PARTS)}")
    check(not c.last_save_in_hf or c.last_save_model_only,
          "checkpoint.last_save_in_hf = true needs checkpoint.last_save_model_only = true (an HF folder holds only "
          "weights)")
    check(not c.initial_load_in_hf or c.initial_load_path,
          "checkpoint.initial_load_in_hf = true needs checkpoint.initial_load_path, the HF model folder to load")
    check(not c.initial_load_in_hf or c.initial_load_model_only,
          "checkpoint.initial_load_model_only = false with initial_load_in_hf: an HF folder holds only weights; "
          "set initial_load_model_only = true")

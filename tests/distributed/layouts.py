"""Every parallel layout the distributed tests run, in one table: name -> (ranks, config overrides).

Each layout reads the same global batch of GLOBAL_BATCH sequences per step (the data loader's sharding rule), so
any two are comparable step by step; test files pick layouts from here by name and add only what they test.
"""

# Three steps: the losses of steps 2 and 3 check the updates of step 1 (fresh Adam, warmup lr) and step 2 (Adam's
# moments, peak lr), the gradient norms check every step's gradients, and the parameters are compared after step 1.
# Tolerances in the test files were measured over 5 steps, which bound 3 (the trajectories drift apart step by step).
STEPS = 3
GLOBAL_BATCH = 4
SEED = 7
# The config's dataset (c4_test through the text reader): what a run reads unless the session runs on prepared data
# (pytest --dataset tokens, tests/conftest.py) or its test names another.
TEXT = {"training.dataset": "c4_test"}

DP_REP = "parallelism.data_parallel_replicate_degree"
DP_SHARD = "parallelism.data_parallel_shard_degree"
TP = "parallelism.tensor_parallel_degree"
CP = "parallelism.context_parallel_degree"
PP = "parallelism.pipeline_parallel_degree"
SCHEDULE = "parallelism.pipeline_parallel_schedule"
LOCAL = "training.local_batch_size"
OFFLOAD = "training.enable_cpu_offload"


def _pp(degree: int, schedule: str, **spec) -> dict:
    """Pipeline only: no data parallelism, so the local batch is the whole global batch (4 microbatches of 1)."""
    return {PP: degree, SCHEDULE: schedule, DP_SHARD: 1, LOCAL: 4, **spec}


def _cp(degree: int, **spec) -> dict:
    return {CP: degree, DP_SHARD: 1, LOCAL: 4, **spec}


LAYOUTS: dict[str, tuple[int, dict]] = {
    # one process
    "1 process": (1, {LOCAL: 4}),
    "accumulation=2": (1, {LOCAL: 2}),
    "accumulation=4": (1, {LOCAL: 1}),
    # data parallel
    "dp_shard=2": (2, {DP_SHARD: 2, LOCAL: 2}),
    "dp_shard=4": (4, {DP_SHARD: 4, LOCAL: 1}),
    "dp_replicate=2": (2, {DP_REP: 2, DP_SHARD: 1, LOCAL: 2}),
    "dp_replicate=2 x accumulation=2": (2, {DP_REP: 2, DP_SHARD: 1, LOCAL: 1}),
    "dp_replicate=2 x dp_shard=2": (4, {DP_REP: 2, DP_SHARD: 2, LOCAL: 1}),
    # tensor parallel
    "tp=2": (2, {TP: 2, DP_SHARD: 1, LOCAL: 4}),
    "tp=4": (4, {TP: 4, DP_SHARD: 1, LOCAL: 4}),
    "tp=2, loss parallel disabled": (2, {TP: 2, DP_SHARD: 1, LOCAL: 4, "parallelism.disable_loss_parallel": True}),
    "tp=2, sequence parallel disabled": (2, {TP: 2, DP_SHARD: 1, LOCAL: 4,
                                             "parallelism.enable_sequence_parallel": False}),
    "dp_shard=2 x tp=2": (4, {DP_SHARD: 2, TP: 2, LOCAL: 2}),
    "dp_replicate=2 x dp_shard=2 x tp=2": (8, {DP_REP: 2, DP_SHARD: 2, TP: 2, LOCAL: 1}),
    # context parallel
    "cp=2": (2, _cp(2)),
    "cp=4": (4, _cp(4)),
    "cp=2 alltoall": (2, _cp(2, **{"parallelism.context_parallel_rotate_method": "alltoall"})),
    "cp=2 no load balance": (2, _cp(2, **{"parallelism.context_parallel_load_balance": False})),
    "dp_shard=2 x cp=2": (4, {CP: 2, DP_SHARD: 2, LOCAL: 2}),
    "cp=2 x tp=2": (4, _cp(2, **{TP: 2})),
    "pp=2 x cp=2": (4, _cp(2, **{PP: 2})),
    "pp=2 x dp_shard=2 x cp=2 x tp=2": (16, {PP: 2, DP_SHARD: 2, CP: 2, TP: 2, LOCAL: 2}),
    # the parameters replicated over cp and the gradients all-reduced by DDP (picotron's context parallel)
    "cp=2 replicated": (2, _cp(2, **{"parallelism.context_parallel_replicate_parameters": True})),
    "dp_replicate=2 x cp=2 replicated": (4, {DP_REP: 2, DP_SHARD: 1, CP: 2, LOCAL: 2,
                                             "parallelism.context_parallel_replicate_parameters": True}),
    # pipeline parallel
    "pp=2 GPipe": (2, _pp(2, "GPipe")),
    "pp=2 1F1B": (2, _pp(2, "1F1B")),
    "pp=2 Interleaved1F1B": (2, _pp(2, "Interleaved1F1B")),
    "pp=2 LoopedBFS": (2, _pp(2, "LoopedBFS")),
    "pp=2 InterleavedZeroBubble": (2, _pp(2, "InterleavedZeroBubble")),
    "pp=2 ZBVZeroBubble": (2, _pp(2, "ZBVZeroBubble")),
    "pp=2 DualPipeV": (2, _pp(2, "DualPipeV")),
    # torch's InterleavedZeroBubble order for this layout, written as a CSV (tests/unit/test_pipeline.py)
    "pp=2 CSV schedule": (2, _pp(2, "PipelineScheduleMulti", **{
        "parallelism.pipeline_parallel_schedule_csv": "tests/assets/pipeline/zero_bubble_pp2_4stages_4mb.csv"})),
    "pp=4 GPipe": (4, _pp(4, "GPipe")),
    "pp=4 1F1B": (4, _pp(4, "1F1B")),
    "pp=2 1F1B accumulation=2": (2, _pp(2, "1F1B", **{LOCAL: 2})),
    "pp=2 x dp_shard=2 1F1B": (4, _pp(2, "1F1B", **{DP_SHARD: 2, LOCAL: 2})),
    "pp=2 x dp_shard=2 Interleaved1F1B": (4, _pp(2, "Interleaved1F1B", **{DP_SHARD: 2, LOCAL: 2})),
    "pp=2 explicit uneven stages": (2, _pp(2, "1F1B", **{
        "parallelism.module_fqns_per_model_part":
            '[["tok_embeddings", "layers.0"], ["layers.1", "layers.2", "layers.3", "layers.4", "layers.5", '
            '"norm", "output"]]'})),
    "pp=2 x tp=2 1F1B": (4, _pp(2, "1F1B", **{TP: 2})),
    "pp=2 x dp_shard=2 x tp=2 1F1B": (8, _pp(2, "1F1B", **{DP_SHARD: 2, TP: 2, LOCAL: 2})),
    # FSDP2's CPU offload policy (parameters, gradients and optimizer states in host memory)
    "dp_shard=2 cpu offload": (2, {DP_SHARD: 2, LOCAL: 2, OFFLOAD: True}),
    "dp_shard=2 x tp=2 cpu offload": (4, {DP_SHARD: 2, TP: 2, LOCAL: 2, OFFLOAD: True}),
    "pp=2 x dp_shard=2 1F1B cpu offload": (4, _pp(2, "1F1B", **{DP_SHARD: 2, LOCAL: 2, OFFLOAD: True})),
}


def base_overrides(name: str = "llama3", flavor: str = "debugmodel") -> list[str]:
    """fp32, STEPS steps, seq 64, global batch 4: small enough for 8 ranks on 2 cores. max_norm 0.5 is below the
    debug model's gradient norms, so clipping over sharded parameters is exercised at every step.

    Adam eps 1e-6 rather than 1e-8: Adam's first step is lr * g / (|g| + eps), so with eps 1e-8 a gradient entry
    of ~5e-9 turns fp32 reduction-order noise (~1e-9, which every layout has) into a parameter difference of
    ~1e-5 (seen with tp=2 on the smollm debug model). The larger eps keeps that amplification below lr / eps.
    """
    return ["--job.config_file", "configs/debug_model.toml", "--model.name", name, "--model.flavor", flavor,
            "--training.steps", str(STEPS), "--training.seq_len", "64",
            "--training.global_batch_size", str(GLOBAL_BATCH), "--training.mixed_precision_param", "float32",
            "--training.max_norm", "0.5",
            "--metrics.enable_tensorboard", "false", "--lr_scheduler.warmup_steps", "1", "--debug.seed", str(SEED),
            "--optimizer.eps", "1e-6"]


def layout_args(spec: dict[str, int | str | bool]) -> list[str]:
    """{"parallelism.tensor_parallel_degree": 2, ...} -> CLI overrides."""
    return [a for key, value in spec.items() for a in (f"--{key}", str(value).lower()
                                                       if isinstance(value, bool) else str(value))]


def layout_overrides(layout: str, model: str = "llama3", **extra) -> tuple[int, list[str]]:
    """(ranks, CLI overrides) of `layout` for `model`, with `extra` settings ({"a.b": value}) on top."""
    ranks, spec = LAYOUTS[layout]
    return ranks, base_overrides(model) + layout_args({**spec, **extra})

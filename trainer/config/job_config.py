"""The TOML schema: one dataclass per section, a docstring under every field.

Section and key names follow torchtitan v0.2.2 wherever the feature is the same, so a torchtitan TOML
runs unchanged for every feature this trainer has. A field whose type is a dataclass is a nested section
([training.dataloader]). Every key of torchtitan v0.2.2's JobConfig is here; torchtitan_keys.py says for each
whether it is implemented, planned, or never will be for llama3, and which values are accepted meanwhile.
`--help` prints these docstrings and that status.
"""

from dataclasses import dataclass, field


@dataclass
class Job:
    config_file: str | None = None
    """TOML file to read; CLI overrides (`--section.key value`) win over it."""
    dump_folder: str = "./outputs"
    """Folder for everything a run writes: TensorBoard events, checkpoints, traces."""
    description: str = "default job"
    """Free text naming the run; printed at start."""
    print_config: bool = False
    """Print the resolved config (TOML + overrides + defaults) at start."""
    save_config_file: str | None = None
    """File name inside dump_folder to write the resolved config to at start, so the run records exactly what it ran
    with; unset writes nothing."""
    custom_config_module: str = ""
    """Dotted name of an importable module whose JobConfig dataclass adds sections or keys to this schema before
    the TOML is read; empty adds none."""


@dataclass
class Model:
    name: str = "llama3"
    """Model family: llama3, llama2 or smollm."""
    flavor: str = "debugmodel"
    """Size within the family, e.g. debugmodel, 1B, 8B, 70B (llama3); 7B (llama2); 135M, 1.7B (smollm)."""
    hf_assets_path: str = "./tests/assets/tokenizer"
    """Folder with tokenizer.json (and, for HF import, config.json + safetensors); see scripts/download_hf_assets.py."""
    tokenizer_path: str | None = None
    """Former name of hf_assets_path, which torchtitan deprecated: when set, it is used as hf_assets_path."""
    converters: list[str] = field(default_factory=list)
    """Module swaps applied to the whole model before it is parallelized, by name: quantize.linear.float8 (float8
    training of nn.Linear through torchao, set up in [quantize.linear.float8]; "float8" is its older name; needs
    pip install -e .[float8]) or quantize.linear.mx (MX-FP8: needs a GPU of compute capability 10.x, refused when a
    run starts). Empty keeps plain nn.Linear."""
    print_after_conversion: bool = False
    """Print the model's module tree (rank 0) once the converters have run."""


@dataclass
class DataLoader:
    num_workers: int = 0
    """Background processes that read, tokenize and batch the data; 0 does it in the training process."""
    persistent_workers: bool = False
    """Keep the worker processes from one pass over the data to the next instead of starting new ones; needs
    num_workers > 0."""
    pin_memory: bool | None = None
    """Hand out batches in page-locked host memory, so that their copy to the GPU runs asynchronously (the step
    copies with non_blocking); unset means on when the run is on CUDA and off on CPU, where nothing is copied."""
    prefetch_factor: int | None = None
    """Batches each worker prepares ahead of use; unset means torch's choice (2 with workers); needs num_workers > 0."""


@dataclass
class Training:
    dataset: str = "c4_test"
    """Dataset: c4_test (shipped), c4 (allenai/c4 streaming), synthetic, text/json/jsonl/parquet with dataset_path,
    or tokens: a folder made by scripts/prepare_data.py (pre-tokenized; a rank reads only its own windows)."""
    dataset_path: str | None = None
    """Local file or folder to read instead of the named dataset's default location (for tokens: the prepared
    folder)."""
    local_batch_size: int = 8
    """Sequences per data-parallel rank per micro-step (forward/backward)."""
    global_batch_size: int = -1
    """Sequences per optimizer step over all ranks; -1 means local_batch_size x data-parallel degree. A multiple of
    that product turns the rest into gradient accumulation steps."""
    seq_len: int = 2048
    """Tokens per sequence."""
    max_norm: float = 1.0
    """Clip gradients to this global L2 norm (over every shard of every parameter); <= 0 disables clipping."""
    steps: int = 10000
    """Optimizer steps to train for; 0 only builds, loads and writes the final checkpoint (e.g. to re-export an HF
    import)."""
    mixed_precision_param: str = "auto"
    """Parameter dtype in forward/backward: float32, bfloat16, or auto (bfloat16 on CUDA, float32 on CPU, where
    float32 is the safe default). Never float16 on CPU: it runs ~100x slower than bfloat16 there."""
    mixed_precision_reduce: str = "float32"
    """Dtype of the data-parallel gradient reduction: float32 or bfloat16."""
    gc_freq: int = 50
    """Run Python's garbage collector every this many steps (automatic collection is disabled to avoid stalls)."""
    gc_debug: bool = False
    """Collect garbage every step and report reference cycles that keep device tensors alive (slow; for finding
    leaks in a short run)."""
    enable_cpu_offload: bool = False
    """Keep the FSDP shards of parameters, gradients and optimizer states in host memory, bringing them to the device
    only while in use: fits a bigger model on a device, at the cost of speed."""
    dtype: str = "float32"
    """Dtype the model is stored and updated in: float32 (forward/backward then use mixed_precision_param), or
    bfloat16 for pure bfloat16 training (parameters, gradients and optimizer states, with no float32 master copy)."""
    dataloader: DataLoader = field(default_factory=DataLoader)
    """Worker processes and memory pinning of the training data loader."""


@dataclass
class Parallelism:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP-style); with data_parallel_shard_degree > 1 as well this is HSDP."""
    data_parallel_shard_degree: int = -1
    """FSDP2 sharding degree; -1 takes whatever the other degrees leave of the world size."""
    fsdp_reshard_after_forward: str = "default"
    """Free gathered parameters after forward: default (yes, except the root module), always, or never (faster,
    more memory)."""
    tensor_parallel_degree: int = 1
    """Tensor-parallel degree: every transformer block, the embedding and the output projection are split over
    this many ranks (Megatron column/row-wise layers with sequence-parallel norms between them). It must divide
    the model's n_heads, n_kv_heads and FFN hidden dim, and training.seq_len. Composes with FSDP / HSDP."""
    enable_sequence_parallel: bool = True
    """With tensor parallel: keep the residual stream between attention and the MLP sharded over the sequence
    (norms on 1/tp of it; an all-gather and a reduce-scatter per region), as torchtitan always does. false: plain
    TP (picotron's), the stream replicated on every rank and one all-reduce per region instead (half the
    collectives, the same bytes, full-size activations between the regions); scripts/bench.py's "TP tp=2 no SP"
    row compares the two. Not a torchtitan v0.2.2 key (it always uses sequence parallel)."""
    disable_loss_parallel: bool = False
    """With tensor parallel: compute the loss on gathered logits instead of vocab-sharded ones (loss parallel
    saves the [batch, seq, vocab] all-gather and its memory)."""
    enable_async_tensor_parallel: bool = False
    """With tensor parallel: overlap its collectives with the matmuls around them (inductor micro-pipeline TP).
    Needs CUDA and torch.compile."""
    pipeline_parallel_degree: int = 1
    """Pipeline-parallel degree: ranks the model's layers are split over (torch.distributed.pipelining)."""
    pipeline_parallel_schedule: str = "1F1B"
    """Pipeline schedule: GPipe or 1F1B (one stage per rank); Interleaved1F1B, LoopedBFS or InterleavedZeroBubble
    (looped: rank r runs stages r, r + pp, ...); ZBVZeroBubble or DualPipeV (V-shaped: exactly 2 stages per rank,
    rank r runs stages r and 2 x pp - 1 - r); PipelineScheduleSingle or PipelineScheduleMulti (one or several
    looped stages per rank) with pipeline_parallel_schedule_csv. Names are case-insensitive."""
    pipeline_parallel_microbatch_size: int = 1
    """Sequences per pipeline microbatch; training.local_batch_size / this = microbatches per schedule step."""
    pipeline_parallel_schedule_csv: str | None = ""
    """CSV file with a custom pipeline schedule, run by torch's schedule runtime: one row per pp rank, one compute
    action per cell (stage, F / B / I / W, microbatch: 0F1, 2B3; empty: idle). Needs pipeline_parallel_schedule
    PipelineScheduleSingle or PipelineScheduleMulti, which lay out the stages. Empty (or unset): none."""
    pipeline_parallel_expert_parallel_overlap: bool = True
    """With DualPipeV and expert parallel: overlap one microbatch's expert all-to-all with another's compute."""
    pipeline_parallel_layers_per_stage: int | None = None
    """Transformer layers per stage (the embedding and the output count as first/last_stage_less_layers layers);
    sets the number of stages. None: one stage per rank for single-stage schedules, two for the others."""
    pipeline_parallel_first_stage_less_layers: int = 1
    """Layers' worth of work the token embedding counts for: the first stage gets this many fewer layers."""
    pipeline_parallel_last_stage_less_layers: int = 1
    """Layers' worth of work the final norm + output projection count for: the last stage gets this many fewer."""
    module_fqns_per_model_part: list[list[str]] | None = None
    """Explicit split, one list of module names per stage, e.g. [["tok_embeddings", "layers.0"], ["layers.1",
    "norm", "output"]]; every module once, in model order. Overrides the three keys above. On the CLI give it
    in TOML syntax."""
    context_parallel_degree: int = 1
    """Context-parallel degree: each sequence is split over this many ranks and attention runs as a ring."""
    context_parallel_load_balance: bool = True
    """Give each context-parallel rank chunks i and 2cp-1-i of the sequence so causal attention is balanced."""
    context_parallel_load_balancer: str | None = "headtail"
    """torchtitan's spelling of context_parallel_load_balance: headtail (the chunk pairing above, = true) or none
    (on the CLI; = false). ptrr, its balancer for FlexAttention, does not apply: attention here is SDPA. When both
    keys are set they must agree."""
    context_parallel_rotate_method: str = "allgather"
    """How keys/values travel around the ring: allgather (gather all once) or alltoall (pass one chunk a step)."""
    context_parallel_replicate_parameters: bool = False
    """Keep the whole model on every context-parallel rank and all-reduce the gradients over dp_replicate x cp with
    torch's DDP (picotron's context parallel), instead of sharding parameters, gradients and optimizer states over
    cp with FSDP2 (torchtitan's, the default). For data_parallel_shard_degree = 1 without tensor or pipeline
    parallel (refused with them; no effect without context parallel). cp times the training state's memory per
    rank, for a gradient all-reduce overlapped with backward in place of FSDP's gathers and reduce-scatters: cp=2
    on the CPU benchmark model steps ~1.4x faster."""
    expert_parallel_degree: int = 1
    """Ranks the experts of a mixture-of-experts layer are spread over."""
    expert_tensor_parallel_degree: int = 1
    """Tensor-parallel degree inside each expert when experts are spread over ranks."""
    expert_parallel_comm_backend: str = "standard"
    """How tokens travel to their experts and back: standard (torch all-to-all) or deepep (DeepEP kernels)."""


@dataclass
class Optimizer:
    name: str = "AdamW"
    """Optimizer: AdamW or Adam."""
    lr: float = 8e-4
    """Peak learning rate (reached at the end of warmup)."""
    beta1: float = 0.9
    """Adam first-moment decay."""
    beta2: float = 0.95
    """Adam second-moment decay."""
    eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.1
    """Decoupled weight decay."""
    implementation: str = "auto"
    """Kernel: auto (fused when every parameter is on one device type with a fused kernel, CUDA or CPU, else
    foreach), for-loop, foreach or fused (fused needs every parameter on one device type that supports it)."""
    early_step_in_backward: bool = False
    """Update each parameter as soon as its gradient is complete in backward and free that gradient, so the whole
    model's gradients never exist at once (saves memory; rules out gradient clipping)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup from ~0 to optimizer.lr."""
    total_steps: int | None = None
    """Steps the schedule is laid out over (warmup, stable part, decay); unset means training.steps. Larger than
    training.steps, a short run follows the first part of a long run's learning-rate curve."""
    decay_ratio: float | None = None
    """Fraction of the steps after warmup spent decaying, the rest held at lr; None decays over all of them."""
    decay_type: str = "linear"
    """Decay shape: linear, sqrt or cosine."""
    min_lr_factor: float = 0.0
    """Final learning rate as a fraction of optimizer.lr."""


@dataclass
class Metrics:
    log_freq: int = 10
    """Log (console and TensorBoard) every this many steps; step 1 is always logged."""
    enable_tensorboard: bool = False
    """Write TensorBoard scalars."""
    save_tb_folder: str = "tb"
    """TensorBoard folder inside job.dump_folder."""
    save_for_all_ranks: bool = False
    """Write TensorBoard scalars on every rank (into rank_N subfolders), not only on the logging ranks."""
    disable_color_printing: bool = False
    """Plain console output without ANSI colors."""
    enable_wandb: bool = False
    """Send the scalars TensorBoard gets to Weights & Biases too (project and run from the WANDB_* environment)."""
    peak_flops: float = -1.0
    """Peak FLOP/s of one device for MFU; -1 looks it up for known GPUs, or measures it once on CPU (cached)."""


@dataclass
class Validation:
    enable: bool = False
    """Every `freq` steps, evaluate the model on a held-out split and log validation_metrics/loss and perplexity."""
    dataset: str | None = None
    """Dataset whose validation split is evaluated: c4_test, c4 (or torchtitan's name c4_validation), synthetic, or
    text/json/jsonl/parquet with dataset_path; unset: training.dataset (and training.dataset_path)."""
    dataset_path: str | None = None
    """Local file or folder to read instead of the dataset's default location; in a folder the files named after
    the split (validation.jsonl, c4-validation.00000-of-00008.json.gz) are read."""
    freq: int = 10
    """Validate after every this many training steps."""
    steps: int = -1
    """Batches per validation; -1 evaluates the whole split (every complete global batch of local_batch_size x
    data-parallel degree windows; a shorter tail is left out, as in training)."""
    local_batch_size: int = -1
    """Sequences per data-parallel rank per validation batch; -1 uses training.local_batch_size."""
    seq_len: int = -1
    """Tokens per validation sequence, at most training.seq_len (the length of the model's RoPE table); -1 uses
    training.seq_len."""
    dataloader: DataLoader = field(default_factory=DataLoader)
    """Worker processes and memory pinning of the validation data loader."""


@dataclass
class Checkpoint:
    enable: bool = False
    """Save checkpoints to {job.dump_folder}/{folder}/step-N and resume from the newest complete one at start; on
    SIGTERM/SIGINT finish the step, save it and exit 0."""
    folder: str = "checkpoint"
    """Checkpoint folder inside job.dump_folder (or an absolute path)."""
    interval: int = 500
    """Save a full checkpoint every this many steps."""
    async_mode: str = "disabled"
    """disabled (training waits for the write), async (writes in a background thread on its own process group
    while training continues), or async_with_pinned_mem (async with pinned staging memory; CUDA only, plain async
    on CPU)."""
    keep_latest_k: int = 10
    """Keep only the newest k complete full checkpoints, deleting older ones once a newer one is complete; 0 keeps
    all."""
    load_step: int = -1
    """Resume from step-N of this run's folder; -1 resumes from the newest complete checkpoint."""
    initial_load_path: str | None = None
    """Checkpoint to start from when this run's folder has none yet: a step folder (DCP), or with
    initial_load_in_hf an HF model folder (config.json + safetensors)."""
    initial_load_model_only: bool = True
    """Load only the weights from initial_load_path; false also loads optimizer, schedule, data position and step."""
    initial_load_in_hf: bool = False
    """initial_load_path is an HF model folder (config.json + safetensors), e.g. from scripts/download_hf_assets.py."""
    last_save_model_only: bool = True
    """At the end of training write only the weights, in export_dtype, to {folder}/export/step-N; false writes a
    full, resumable checkpoint instead."""
    last_save_in_hf: bool = False
    """Write the final model-only save as an HF model folder (config.json + safetensors) that transformers loads;
    needs last_save_model_only."""
    export_dtype: str = "float32"
    """Dtype of the final model-only save: float32, bfloat16 or float16."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """Parts of a checkpoint not to load on resume: model, optimizer, lr_scheduler, dataloader, train_state, rng
    (a TOML list, or comma-separated on the CLI)."""
    enable_first_step_checkpoint: bool = False
    """Also save a full checkpoint after step 1, to check early that checkpointing works on this storage."""
    create_seed_checkpoint: bool = False
    """Build the model on one rank (NGPU=1, no parallelism), save its initial weights as step-0 and exit; runs of
    any layout can then start from the same weights."""
    load_only: bool = False
    """Load checkpoints as usual but never save one, e.g. to evaluate or debug from a seed checkpoint."""
    initial_load_in_hf_quantized: bool = False
    """The HF folder in initial_load_path holds quantized weights (low-precision blocks plus scales) to dequantize
    while loading."""
    enable_ft_dataloader_checkpoints: bool = True
    """With fault tolerance: checkpoint each replica group's data position, so a group that rejoins does not train
    on batches again."""


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """Recompute activations in backward instead of keeping them: none, full (every transformer block keeps only
    its input), selective (see selective_ac_option) or memory_budget (the compiler picks what to recompute within
    memory_budget; needs compile.enable with "model"). torchtitan defaults to selective; we default to none, the
    fastest setting, and the loss is the same either way."""
    selective_ac_option: str = "2"
    """With mode = selective: an integer N checkpoints every N-th block (blocks N-1, 2N-1, ... counted by layer id);
    "op" is torchtitan's per-op policy: keep attention's outputs, sequence parallel's reduce-scatters, max and every
    other matmul of a block, recompute the rest (the other matmuls: wk, wo, w3; norms, RoPE, SwiGLU gating)."""
    per_op_sac_force_recompute_mm_shapes_by_fqns: list[str] = field(default_factory=lambda: ["moe.router.gate"])
    """With selective "op": nn.Linear modules by name whose weight shape marks matmuls to recompute anyway; every
    matmul of such a shape is recomputed, whichever module it belongs to. The default names an MoE router, which
    llama3 does not have."""
    early_stop: bool = False
    """In backward, end a block's recomputation as soon as every tensor backward needs from it is back (full and
    selective; false reruns the whole block, as torchtitan's default does)."""
    memory_budget: float = 0.5
    """With mode = memory_budget: the share of activation memory the compiler's partitioner may keep, from 0.0 (as
    little as full checkpointing) to 1.0 (as much as no checkpointing); it recomputes to fit."""
    visualize_memory_budget_pareto: bool = False
    """With mode = memory_budget: draw expected runtime against activation memory for budgets 0 to 1 as an SVG in
    {dump_folder}/memory_budget_pareto."""
    preserve_rng_state: bool = True
    """Save the RNG state before a checkpointed forward and restore it for the recomputation, so random ops repeat
    exactly (full and selective; the model has no random op, so false only saves the stashing)."""
    determinism_check: str = "default"
    """How torch.utils.checkpoint checks that recomputed tensors match the first forward's: default (shape, dtype
    and device) or none (full and selective)."""
    debug: bool = False
    """Record the ops each recomputation runs, to debug a checkpointing mismatch (slow). Full and selective "N"
    without compile only: torch refuses it together with a per-op policy or compile."""


@dataclass
class Compile:
    enable: bool = False
    """torch.compile the components below (first step pays the compile time; CPU needs gcc for inductor)."""
    components: list[str] = field(default_factory=lambda: ["model", "loss"])
    """What to compile: model (each transformer block in place, so parameter names do not change) and/or loss."""
    backend: str = "inductor"
    """torch.compile backend: inductor (generates kernels), or aot_eager / eager to narrow down a compile problem."""


@dataclass
class Profiling:
    enable_profiling: bool = False
    """Record torch.profiler traces: one per rank every profile_freq steps, as
    {dump_folder}/{save_traces_folder}/iteration_N/rankR_trace.json (open in Perfetto or chrome://tracing)."""
    save_traces_folder: str = "profile_traces"
    """Trace folder inside job.dump_folder."""
    profile_freq: int = 10
    """Steps between traces: steps profile_freq, 2 x profile_freq, ... are recorded."""
    profiler_warmup: int = 3
    """Steps the profiler runs unrecorded before each recorded window (the first profiled steps are distorted)."""
    profiler_active: int = 1
    """Steps recorded in each window (the window ends at a multiple of profile_freq); warmup + active <=
    profile_freq."""
    enable_memory_snapshot: bool = False
    """CUDA only: record the allocator history and write it every profile_freq steps, and on out-of-memory, as
    {dump_folder}/{save_memory_snapshot_folder}/iteration_N/rankR_memory_snapshot.pickle (view it at
    pytorch.org/memory_viz). On CPU a warning says it is unavailable and training goes on."""
    save_memory_snapshot_folder: str = "memory_snapshot"
    """Memory snapshot folder inside job.dump_folder."""


@dataclass
class Debug:
    seed: int | None = None
    """Seed for weights, data order and dropout-free RNG use; None picks 0 so runs are reproducible by default."""
    deterministic: bool = False
    """Use deterministic algorithms only (torch.use_deterministic_algorithms); slower."""
    deterministic_warn_only: bool = False
    """With deterministic: warn on an op without a deterministic implementation instead of failing."""
    moe_force_load_balance: bool = False
    """Send tokens to experts round-robin so each expert gets the same number (for debugging MoE models)."""


@dataclass
class Float8Linear:
    enable_fsdp_float8_all_gather: bool = False
    """All-gather FSDP-sharded weights in float8 rather than in the parameter dtype: half the bytes (tensorwise
    scaling)."""
    precompute_float8_dynamic_scale_for_fsdp: bool = False
    """Compute the float8 scales of all weights together right after the optimizer step instead of layer by layer
    (tensorwise scaling with float8 all-gather)."""
    recipe_name: str | None = None
    """Scaling recipe: tensorwise, rowwise or rowwise_with_gw_hp; unset builds tensorwise from the keys above."""
    filter_fqns: list[str] = field(default_factory=list)
    """Linear modules to keep in high precision: those whose name contains an entry (e.g. output); layers with a
    dimension that is not a multiple of 16 always are. The entry auto_filter_small_kn also lets torchao skip
    layers too small to gain from float8."""
    emulate: bool = False
    """Emulate the float8 matmuls in the parameter dtype on float8-rounded values, to test on hardware without
    float8 (needed on CPU and on GPUs below compute capability 8.9)."""


@dataclass
class MXLinear:
    mxfp8_dim1_cast_kernel_choice: str = "triton"
    """Kernel for the MX-FP8 cast along dimension 1: triton, cuda (fastest) or torch."""
    recipe_name: str = "mxfp8_cublas"
    """MX recipe by torchao's name, e.g. mxfp8_cublas."""
    filter_fqns: list[str] = field(default_factory=lambda: ["output"])
    """Linear modules to keep in high precision, by name; the output projection unless changed."""


@dataclass
class Float8GroupedMM:
    fqns: list[str] | str = field(default_factory=list)
    """MoE modules, by name, whose grouped matmuls run in float8 (a torchao prototype)."""


@dataclass
class MXGroupedMM:
    recipe_name: str = "mxfp8"
    """MX recipe for grouped matmuls; mxfp8 is the one there is."""
    fqns: list[str] | str = field(default_factory=list)
    """MoE modules, by name, whose grouped matmuls run in MX-FP8 (a torchao prototype)."""


@dataclass
class QuantizedLinear:
    float8: Float8Linear = field(default_factory=Float8Linear)
    """Float8 training of nn.Linear layers (converter quantize.linear.float8)."""
    mx: MXLinear = field(default_factory=MXLinear)
    """MX (microscaling) training of nn.Linear layers (converter quantize.linear.mx)."""


@dataclass
class QuantizedGroupedMM:
    """torchtitan's grouped-matmul quantization of mixture-of-experts layers: llama3 has no experts, so these keys
    are accepted (torchtitan's TOML files set them) and read by nothing here."""

    float8: Float8GroupedMM = field(default_factory=Float8GroupedMM)
    """Float8 grouped matmuls of MoE experts (converter quantize.grouped_mm.float8)."""
    mx: MXGroupedMM = field(default_factory=MXGroupedMM)
    """MX grouped matmuls of MoE experts (converter quantize.grouped_mm.mx)."""


@dataclass
class Quantize:
    linear: QuantizedLinear = field(default_factory=QuantizedLinear)
    """Low-precision training of nn.Linear layers, read only by the converter model.converters names:
    quantize.linear.float8 (torchao; emulated on CPU, see the README's Float8 section) or quantize.linear.mx (needs
    a GPU of compute capability 10.x; refused until torchao's MX API and torchtitan's keys agree again)."""
    grouped_mm: QuantizedGroupedMM = field(default_factory=QuantizedGroupedMM)
    """Low-precision grouped matmuls of mixture-of-experts layers; read only by their converter."""


@dataclass
class Comm:
    init_timeout_seconds: int = 300
    """Seconds a collective may wait before the job fails, from start until the first step is done (loading and
    compiling make that stretch slow)."""
    train_timeout_seconds: int = 100
    """The same limit from then on, usually tighter, so a stalled rank ends the job soon."""
    trace_buf_size: int = 20000
    """Entries in NCCL's flight recorder, a ring buffer of each rank's latest collectives that is dumped when one
    times out; 0 turns it off."""
    save_traces_folder: str = "comm_traces"
    """Folder inside job.dump_folder for the flight-recorder dumps."""
    save_traces_file_prefix: str = "rank_"
    """File-name prefix of each rank's flight-recorder dump."""
    mode: str = "default"
    """default (real collectives), fake_backend (a stand-in process group that checks a layout without devices,
    as DRY_RUN=1 does here) or local_tensor (one process simulates every rank, for checking numerics)."""


@dataclass
class MemoryEstimation:
    enable: bool = False
    """Estimate each rank's FSDP memory before training."""
    disable_fake_mode: bool = False
    """Estimate on real tensors rather than fake ones."""


@dataclass
class FaultTolerance:
    enable: bool = False
    """TorchFT: replica groups may fail and rejoin while the others go on training."""
    process_group: str = "gloo"
    """Backend of the process group between replica groups: gloo or nccl."""
    process_group_timeout_ms: int = 10000
    """Milliseconds before that process group gives up on an operation."""
    replica_id: int = 0
    """This replica group's id."""
    group_size: int = 0
    """How many replica groups there are; the data is split over them."""
    min_replica_size: int = 1
    """Fewest replica groups a step needs to go ahead."""
    semi_sync_method: str | None = None
    """Synchronize replica groups only now and then: local_sgd or diloco; unset synchronizes every step."""


@dataclass
class Experimental:
    custom_import: str = ""
    """Dotted module to import at start, e.g. one that registers a model or a flavor; empty imports nothing."""
    custom_args_module: str = ""
    """Former name of job.custom_config_module, which torchtitan deprecated."""


@dataclass
class JobConfig:
    """The whole run, one attribute per TOML section."""

    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    training: Training = field(default_factory=Training)
    parallelism: Parallelism = field(default_factory=Parallelism)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    metrics: Metrics = field(default_factory=Metrics)
    validation: Validation = field(default_factory=Validation)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    profiling: Profiling = field(default_factory=Profiling)
    debug: Debug = field(default_factory=Debug)
    quantize: Quantize = field(default_factory=Quantize)
    comm: Comm = field(default_factory=Comm)
    memory_estimation: MemoryEstimation = field(default_factory=MemoryEstimation)
    fault_tolerance: FaultTolerance = field(default_factory=FaultTolerance)
    experimental: Experimental = field(default_factory=Experimental)

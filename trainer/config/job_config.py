"""The TOML schema: one dataclass per section, a docstring under every field.

Section and key names follow torchtitan v0.2.2 wherever the feature is the same, so a torchtitan TOML
runs unchanged for every feature this trainer has. `--help` prints these docstrings.
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


@dataclass
class Model:
    name: str = "llama3"
    """Model family: llama3, llama2 or smollm."""
    flavor: str = "debugmodel"
    """Size within the family, e.g. debugmodel, 1B, 8B, 70B (llama3); 7B (llama2); 135M, 1.7B (smollm)."""
    hf_assets_path: str = "./tests/assets/tokenizer"
    """Folder with tokenizer.json (and, for HF import, config.json + safetensors); see scripts/download_hf_assets.py."""


@dataclass
class Training:
    dataset: str = "c4_test"
    """Dataset: c4_test (shipped), c4 (allenai/c4 streaming), synthetic, or text/json/jsonl/parquet with dataset_path."""
    dataset_path: str | None = None
    """Local file or folder to read instead of the named dataset's default location."""
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
    rank r runs stages r and 2 x pp - 1 - r). Names are case-insensitive."""
    pipeline_parallel_microbatch_size: int = 1
    """Sequences per pipeline microbatch; training.local_batch_size / this = microbatches per schedule step."""
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
    context_parallel_rotate_method: str = "allgather"
    """How keys/values travel around the ring: allgather (gather all once) or alltoall (pass one chunk a step)."""


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
    implementation: str = "foreach"
    """Kernel: for-loop, foreach or fused (fused needs every parameter on one device type that supports it)."""


@dataclass
class LRScheduler:
    warmup_steps: int = 200
    """Steps of linear warmup from ~0 to optimizer.lr."""
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


@dataclass
class ActivationCheckpoint:
    mode: str = "none"
    """Recompute activations in backward instead of keeping them: none, full (every transformer block keeps only
    its input) or selective (see selective_ac_option). torchtitan defaults to selective; we default to none, the
    fastest setting, and the loss is the same either way."""
    selective_ac_option: str = "2"
    """With mode = selective: an integer N checkpoints every N-th block (blocks N-1, 2N-1, ... counted by layer id);
    "op" keeps the outputs of every matmul and attention and recomputes the rest (norms, RoPE, SwiGLU gating)."""


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

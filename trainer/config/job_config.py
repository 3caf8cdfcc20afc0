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
    """Optimizer steps to train for."""
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
    """Tensor-parallel degree (not available yet in this version: must be 1)."""
    disable_loss_parallel: bool = False
    """With tensor parallel: compute the loss on gathered logits instead of vocab-sharded ones."""
    pipeline_parallel_degree: int = 1
    """Pipeline-parallel degree (not available yet in this version: must be 1)."""
    context_parallel_degree: int = 1
    """Context-parallel degree (not available yet in this version: must be 1)."""


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
    disable_color_printing: bool = False
    """Plain console output without ANSI colors."""
    peak_flops: float = -1.0
    """Peak FLOP/s of one device for MFU; -1 looks it up for known GPUs, or measures it once on CPU (cached)."""


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
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    compile: Compile = field(default_factory=Compile)
    profiling: Profiling = field(default_factory=Profiling)
    debug: Debug = field(default_factory=Debug)

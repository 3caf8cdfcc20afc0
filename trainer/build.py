"""The one build path: `plan_run` makes every check and derived figure of a run, `build_model` builds the model it
trains. The Trainer, DRY_RUN, scripts/generate.py and the tests all call these, so a layout is planned, checked and
built the same way wherever it is.

The model is built as picotron and torchtitan build it: the whole Transformer on the meta device, converted
(model.converters, e.g. float8 linears: trainer/converters.py), cut into this rank's pipeline stages, each
parallelized from the outside (TP -> CP -> AC -> compile -> FSDP, see `trainer.parallel.parallelize`), then
materialized shard by shard with weights that depend only on (seed, name).
"""

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from trainer.config import ConfigError, JobConfig
from trainer.converters import check_converters, check_hardware, convert, post_optimizer_hook
from trainer.data.datasets import DATASET_NAMES
from trainer.data.prepared import check_tokenizer, read_manifest
from trainer.data.tokenizer import Tokenizer
from trainer.models.attention import document_ids
from trainer.models.flavors import get_model_args
from trainer.models.llama import ModelArgs, Transformer
from trainer.optim_in_backward import check_early_step
from trainer.parallel import parallelize
from trainer.parallel.compile import check_compile_supported
from trainer.parallel.context_parallel import cp_context
from trainer.parallel.ddp import set_gradient_sync
from trainer.parallel.fsdp import check_cpu_offload
from trainer.parallel.pipeline import Pipeline, PipelinePlan, build_pipeline, plan_pipeline
from trainer.parallel.tensor_parallel import apply_tensor_parallel, loss_context
from trainer.parallel_dims import ParallelDims, tp_shape_problem
from trainer.validate import check_validation_data, check_validation_layout, validation_data
from trainer.weights import init_weights, materialize


def resolve_param_dtype(name: str, device_type: str, training_dtype: str = "float32") -> torch.dtype:
    """training.mixed_precision_param (or generate.py's --dtype) -> dtype; auto is bf16 on CUDA and fp32 on CPU, and
    bf16 wherever the model is stored in bf16 (training.dtype)."""
    if name == "auto":
        return torch.bfloat16 if device_type == "cuda" or training_dtype == "bfloat16" else torch.float32
    return getattr(torch, name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags). Without, torch
    emulates bf16 matmuls at a small fraction of fp32 speed (minutes for a 2048^2 loop on an AVX2-only EPYC)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True  # no way to tell (not Linux): say nothing
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_speed_note(plan: "RunPlan") -> str | None:
    """The start-up line for a CPU run that computes in bf16 on a CPU without native bf16, else None."""
    if plan.device_type != "cpu" or plan.param_dtype != torch.bfloat16 or cpu_has_native_bf16():
        return None
    return ("bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in /proc/cpuinfo): torch emulates it, and "
            "training will be many times slower than float32; set training.dtype = float32 and "
            "mixed_precision_param = float32 for speed here")


def check_device(cfg: JobConfig, device_type: str) -> None:
    """Checks that depend on the device the run trains on."""
    check_compile_supported(cfg, device_type)
    if cfg.parallelism.enable_async_tensor_parallel:
        if device_type != "cuda":
            raise ConfigError(f"parallelism.enable_async_tensor_parallel = true needs CUDA (and torch.compile), but "
                              f"this run is on {device_type}; set it to false")
        if not cfg.compile.enable:
            raise ConfigError("parallelism.enable_async_tensor_parallel = true needs torch.compile; set "
                              "compile.enable = true")


def check_attention(cfg: JobConfig, args: ModelArgs, cp: int, device_type: str) -> None:
    """The flavor's attention kernel and mask (models/attention.py) fit this run: one-line ConfigErrors."""
    flavor = f"model.flavor = {cfg.model.flavor!r} (attn_type {args.attn_type!r}, attn_mask_type {args.attn_mask_type!r})"
    if args.attn_mask_type != "block_causal":
        return
    if cp > 1:
        # torch 2.13 shards a FlexAttention BlockMask for context parallel only through its private module-level
        # _ContextParallel style on CUDA, and its ring attention takes no explicit mask (our CPU path).
        raise ConfigError(f"{flavor} with parallelism.context_parallel_degree = {cp}: context parallel runs causal "
                          "attention only here; use a causal flavor (e.g. debugmodel) or context_parallel_degree 1")
    if cfg.training.dataset == "synthetic":
        raise ConfigError(f"{flavor} with training.dataset = 'synthetic': random tokens have no document "
                          "boundaries; use a text dataset (c4_test, c4, ...) or a causal flavor")
    if device_type == "cuda" and args.attn_type == "varlen":
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        except ImportError:
            raise ConfigError(f"{flavor}: torch {torch.__version__} has no torch.nn.attention.varlen; use "
                              f"attn_type flex (e.g. {cfg.model.flavor.replace('varlen', 'flex')}) or torch >= 2.10"
                              ) from None


def attention_summary(args: ModelArgs, device_type: str) -> str:
    """The attention kernel and mask a run uses, in words (start-up line and DRY_RUN)."""
    if args.attn_mask_type == "causal":
        return f"attention {args.attn_type}, causal mask"
    kernel = {"flex": "FlexAttention with a compiled BlockMask", "varlen": "varlen_attn over packed documents",
              "sdpa": "SDPA with a boolean mask"}[args.attn_type]
    if device_type != "cuda":
        kernel = "SDPA with a boolean [batch, 1, seq, seq] mask on CPU"
    return f"attention {args.attn_type} ({kernel}), block_causal mask (documents end at EOS; RoPE positions global)"


def model_args_for(cfg: JobConfig) -> ModelArgs:
    """The model's shape from model.name / model.flavor (ConfigError if unknown), RoPE tables of training.seq_len."""
    try:
        args = get_model_args(cfg.model.name, cfg.model.flavor)
    except ValueError as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}, model.flavor = {cfg.model.flavor!r}: {e}") from None
    # The tables must match the sequence exactly: context parallel shards them alongside the tokens.
    args.max_seq_len = cfg.training.seq_len
    return args


def gradient_accumulation_steps(cfg: JobConfig, dp: int) -> int:
    """global_batch_size / (local_batch_size x dp), which must divide exactly."""
    t = cfg.training
    per_step = t.local_batch_size * dp
    if t.global_batch_size == -1:
        return 1
    if t.global_batch_size % per_step:
        raise ConfigError(f"training.global_batch_size = {t.global_batch_size} is not a multiple of local_batch_size "
                          f"{t.local_batch_size} x data-parallel degree {dp} = {per_step}; make it a multiple")
    return t.global_batch_size // per_step


@dataclass
class RunPlan:
    """Everything decided about a run before anything is allocated: made by `plan_run`, from the config alone."""

    cfg: JobConfig
    device_type: str
    """The device the run trains on ("cuda" or "cpu"); for DRY_RUN, the one it checks the config for."""
    model_args: ModelArgs
    dims: ParallelDims
    accum_steps: int
    """Micro-batches per optimizer step (gradient accumulation)."""
    pp_plan: PipelinePlan | None
    """Stages, schedule and microbatches with pipeline parallel; None without."""
    param_dtype: torch.dtype
    """Dtype of the parameters in forward and backward."""
    seed: int
    dtype: torch.dtype = torch.float32
    """Dtype the parameters, gradients and optimizer states are kept in (training.dtype): float32 master weights,
    or bfloat16 for full-bf16 training."""

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch: every window is full (packed), so the count is fixed."""
        t = self.cfg.training
        return t.local_batch_size * t.seq_len * self.accum_steps * self.dims.dp

    @property
    def needs_tokenizer(self) -> bool:
        """Whether training or validation reads text (everything but synthetic data)."""
        v = self.cfg.validation
        return self.cfg.training.dataset != "synthetic" or (v.enable and validation_data(self.cfg).dataset != "synthetic")


def plan_run(cfg: JobConfig, world_size: int, device_type: str) -> RunPlan:
    """Check `cfg` for `world_size` ranks on `device_type` and derive the run's figures; ConfigError if invalid.

    Needs no process group and reads no data: DRY_RUN plans any layout on any machine with it."""
    check_device(cfg, device_type)
    if cfg.checkpoint.create_seed_checkpoint and (world_size != 1 or not cfg.checkpoint.enable):
        raise ConfigError(f"checkpoint.create_seed_checkpoint = true needs one rank (NGPU=1, here {world_size}) and "
                          f"checkpoint.enable = true: the seed is the unsharded model's initial weights")
    model_args = model_args_for(cfg)
    dims = ParallelDims.resolve(cfg.parallelism, world_size)
    dims.validate_model(model_args)
    check_attention(cfg, model_args, dims.cp, device_type)
    check_converters(cfg, dims, device_type)
    dims.check_seq_len("training.seq_len", cfg.training.seq_len)
    check_validation_layout(cfg, dims)
    check_cpu_offload(cfg.training.enable_cpu_offload, dims.fsdp_enabled)
    accum = gradient_accumulation_steps(cfg, dims.dp)
    check_early_step(cfg, accum, dims.ddp_enabled)
    pp_plan = (plan_pipeline(cfg.parallelism, cfg.training.local_batch_size, model_args.n_layers)
               if dims.pp > 1 else None)
    param_dtype = resolve_param_dtype(cfg.training.mixed_precision_param, device_type, cfg.training.dtype)
    seed = cfg.debug.seed if cfg.debug.seed is not None else 0
    return RunPlan(cfg, device_type, model_args, dims, accum, pp_plan, param_dtype, seed,
                   getattr(torch, cfg.training.dtype))


def check_data(cfg: JobConfig) -> None:
    """The training and validation datasets are known and their paths exist, checked without reading them."""
    t = cfg.training
    if t.dataset not in DATASET_NAMES:
        raise ConfigError(f"training.dataset = {t.dataset!r} is not one of {', '.join(DATASET_NAMES)}")
    if t.dataset_path and not Path(t.dataset_path).exists():
        raise ConfigError(f"training.dataset_path = {t.dataset_path!r} does not exist; point it at a file or folder")
    check_validation_data(cfg)


def load_tokenizer(plan: RunPlan) -> Tokenizer | None:
    """The tokenizer in model.hf_assets_path, or None when no data needs one; ConfigError if missing or too large."""
    if not plan.needs_tokenizer:
        return None
    cfg = plan.cfg
    try:
        tokenizer = Tokenizer.from_path(cfg.model.hf_assets_path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.hf_assets_path = {cfg.model.hf_assets_path!r}: {e}") from None
    if tokenizer.vocab_size > plan.model_args.vocab_size:
        raise ConfigError(f"model.hf_assets_path: the tokenizer has {tokenizer.vocab_size} tokens but {cfg.model.name} "
                          f"{cfg.model.flavor} embeds only {plan.model_args.vocab_size}; use the model's own tokenizer")
    check_prepared_data(cfg, tokenizer)
    return tokenizer


def check_prepared_data(cfg: JobConfig, tokenizer: Tokenizer) -> None:
    """A prepared dataset (training or validation dataset "tokens") has a manifest and was made with `tokenizer`;
    ConfigError naming the folder if not."""
    v = validation_data(cfg)
    v_key = "validation.dataset_path" if cfg.validation.dataset_path is not None else "training.dataset_path"
    for key, name, path in (("training.dataset_path", cfg.training.dataset, cfg.training.dataset_path),
                            (v_key, v.dataset if cfg.validation.enable else None, v.dataset_path)):
        if name != "tokens":
            continue
        if path is None:
            raise ConfigError(f"{key} is unset: dataset 'tokens' reads a folder made by scripts/prepare_data.py; "
                              f"set {key} to it")
        try:
            check_tokenizer(read_manifest(Path(path)), tokenizer, Path(path))
        except ValueError as e:
            raise ConfigError(f"{key} = {path!r}: {e}") from None


class ModelParts:
    """What this rank holds of the model, and how a batch runs through it.

    `parts`: one module per pipeline stage this rank runs (a single module without PP); `pipeline`: the schedule
    that drives them, or None. `batch_context(inputs, labels)` is the context a batch's forward, loss and backward
    run in (context parallel's sharding of the batch and the RoPE tables, loss parallel); `autocast` wraps the
    forward when no FSDP MixedPrecisionPolicy casts the parameters; `post_optimizer_hook(parts)`, when a model
    converter has one, runs after every optimizer step (`after_optimizer_step`). `forward_kwargs(inputs)` are the
    keywords every model part's forward takes with this batch: its document ids for a block-causal model.
    """

    def __init__(self, parts: list[nn.Module], pipeline: Pipeline | None, dims: ParallelDims,
                 autocast: contextlib.AbstractContextManager,
                 post_optimizer_hook: Callable[[list[nn.Module]], None] | None = None, eos_id: int | None = None):
        self.parts, self.pipeline, self.dims, self.autocast = parts, pipeline, dims, autocast
        self._post_optimizer_hook = post_optimizer_hook
        self._cp_mesh = dims.optional_mesh("cp")
        self._eos_id = eos_id if parts[0].args.attn_mask_type == "block_causal" else None
        if parts[0].args.attn_mask_type == "block_causal" and eos_id is None:
            raise ValueError("a block_causal model needs the tokenizer's eos_id (build_model(..., eos_id=...))")

    def forward_kwargs(self, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Keywords for the forward of every part with this batch of tokens: the document ids of a block-causal
        model, computed once per batch (under PP the schedule cuts them into microbatches with the tokens)."""
        return {} if self._eos_id is None else {"document_ids": document_ids(inputs, self._eos_id)}

    @property
    def model(self) -> nn.Module | None:
        """The one part, when this rank holds the model in one piece (no PP, or a single-stage schedule)."""
        return self.parts[0] if len(self.parts) == 1 else None

    def parameters(self) -> list[nn.Parameter]:
        return [p for part in self.parts for p in part.parameters()]

    def batch_context(self, inputs: torch.Tensor, labels: torch.Tensor) -> contextlib.ExitStack:
        """Enter around one batch's forward, loss and backward. With context parallel, inputs and labels are this
        rank's part of the sequence inside (and stay so); the RoPE tables are restored on exit."""
        stack = contextlib.ExitStack()
        stack.enter_context(cp_context(self._cp_mesh, self.parts, inputs, labels))
        stack.enter_context(loss_context(self.dims.loss_parallel_enabled))
        return stack

    def set_gradient_sync(self, enabled: bool) -> None:
        """Under DDP, whether the next backward all-reduces the gradients (call before each micro-batch's forward:
        off for all but the last of a step). FSDP keeps reducing every micro-batch: holding unsharded gradients
        until the last would cost a whole model's gradients in memory."""
        if self.dims.ddp_enabled:
            for part in self.parts:
                set_gradient_sync(part, enabled)

    def train(self, mode: bool = True) -> None:
        for part in self.parts:
            part.train(mode)

    def after_optimizer_step(self) -> None:
        """Call right after each optimizer step (float8: precompute the weights' scales for the next all-gather)."""
        if self._post_optimizer_hook is not None:
            self._post_optimizer_hook(self.parts)


def state_bytes_per_element(plan: RunPlan) -> dict[str, int]:
    """Bytes per local parameter element of the parameters, their gradients and AdamW's two moments, each kept in
    training.dtype and sharded like the parameters: 4 + 4 + 8 in float32, half in full bf16. With
    early_step_in_backward a gradient is freed as soon as its parameter is stepped: only one is alive at a time,
    counted as none here."""
    size = plan.dtype.itemsize
    gradients = 0 if plan.cfg.optimizer.early_step_in_backward else size
    return {"parameters": size, "gradients": gradients, "optimizer": 2 * size}


def local_param_elements(parts: list[nn.Module]) -> int:
    """Elements of the parameters this rank holds (its shards of DTensors), countable on the meta device."""
    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel()
               for part in parts for p in part.parameters())


def check_device_memory(plan: RunPlan, parts: list[nn.Module], device: torch.device) -> None:
    """ConfigError, before anything is allocated, when this rank's parameters, gradients and AdamW states alone
    outgrow the GPU (activations come on top: DRY_RUN estimates them). Pipeline stages hold different shares, so
    the ranks agree on the largest one first: every rank refuses alike, none is left waiting in a collective. With
    CPU offload they live in host memory: nothing to check."""
    if plan.cfg.training.enable_cpu_offload:
        return
    local = local_param_elements(parts)
    if torch.distributed.is_initialized():
        largest = torch.tensor([local], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
        local = int(largest.item())
    per_element = sum(state_bytes_per_element(plan).values())
    need, have = local * per_element, torch.cuda.get_device_properties(device).total_memory
    if need > have:
        cfg = plan.cfg
        raise ConfigError(f"model {cfg.model.name} {cfg.model.flavor}: the fullest rank's parameters, gradients and "
                          f"AdamW states need {need / 2**30:.1f} GiB ({per_element} bytes x "
                          f"{local:,} local elements) but {device} has {have / 2**30:.1f} GiB; shard it over more "
                          f"GPUs: NGPU with parallelism.data_parallel_shard_degree, parallelism.tensor_parallel_degree "
                          f"or parallelism.pipeline_parallel_degree")


def build_model(plan: RunPlan, device: torch.device,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                init: bool = True, eos_id: int | None = None) -> ModelParts:
    """This rank's model: built on meta, converted (model.converters), cut into its pipeline stages, parallelized,
    and (with `init`) materialized on `device` with the run's seed. The mesh must be built (plan.dims.build_mesh)
    when the world has several ranks.

    `loss_fn(logits, labels)`: the loss of one local batch, which the pipeline schedule calls on the last stage.
    init=False leaves the weights on meta (DRY_RUN counts them without allocating). `eos_id`: the tokenizer's,
    where documents end; needed by a block-causal model with init (DRY_RUN builds it without).
    """
    dims, cfg = plan.dims, plan.cfg
    if init:
        check_hardware(cfg, device)
    with torch.device("meta"):
        model = Transformer(plan.model_args)
    if plan.dtype != torch.float32:
        to_training_dtype(model, plan.dtype)
    convert(model, cfg, dims)  # e.g. float8 linears: on the whole model, before any split or sharding

    def parallelize_part(part: nn.Module) -> nn.Module:
        return parallelize(part, dims, cfg, plan.param_dtype, plan.device_type)

    pipeline = None
    if plan.pp_plan is not None:
        pipeline = build_pipeline(model, plan.pp_plan, dims, device, parallelize_part,
                                  loss_fn or (lambda logits, labels: logits.sum()))
        parts = pipeline.model_parts
    else:
        parts = [parallelize_part(model)]
    if init:
        if device.type == "cuda":
            check_device_memory(plan, parts, device)
        # CPU offload: the FSDP shards start (and stay) in host memory; buffers (the RoPE table) on the device.
        param_device = torch.device("cpu") if cfg.training.enable_cpu_offload else device
        for part in parts:
            init_weights(part, plan.seed, device, param_device)
            part.train()
    # Without FSDP there is no MixedPrecisionPolicy to cast parameters, so autocast does it (when they are stored in
    # another dtype than the compute one).
    autocast = (torch.autocast(device.type, dtype=plan.param_dtype)
                if plan.param_dtype != plan.dtype and not dims.fsdp_enabled else contextlib.nullcontext())
    if not init and eos_id is None:
        eos_id = 0  # a meta model runs no batch
    return ModelParts(parts, pipeline, dims, autocast, post_optimizer_hook(cfg, dims), eos_id)


def to_training_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Store a meta model's parameters in `dtype` (full-bf16 training, as torchtitan's training.dtype builds it).
    Buffers stay float32: the RoPE table is computed and applied in fp32, like the logits' loss."""
    model.to(dtype)  # swaps each parameter's data in place: a tied weight stays one parameter
    for module in model.modules():
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.float())


def build_inference_model(args: ModelArgs, device: torch.device | str,
                          tp_mesh: DeviceMesh | None = None) -> Transformer:
    """A model for generation with uninitialised weights on `device` (a checkpoint fills them) and its RoPE table
    computed; with `tp_mesh`, sharded over it with the inference tensor-parallel plan (no sequence parallel, full
    logits). ConfigError when the tp degree cannot shard this model."""
    with torch.device("meta"):
        model = Transformer(args)
    if tp_mesh is not None:
        if problem := tp_shape_problem(args, tp_mesh.size()):
            raise ConfigError(f"--tp {tp_mesh.size()} {problem}")
        apply_tensor_parallel(model, tp_mesh, loss_parallel_enabled=False, sequence_parallel=False)
    materialize(model, device)
    return model

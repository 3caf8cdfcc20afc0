"""The Trainer: build everything from a JobConfig, then loop. Read it top to bottom like a recipe.

Launched by run_train.sh (torchrun), or as `python -m trainer.train --job.config_file ...` for one process.
"""

import contextlib
import gc
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, JobConfig, help_text, load_config
from trainer.data.dataloader import build_dataloader
from trainer.data.datasets import DATASET_NAMES
from trainer.data.tokenizer import Tokenizer
from trainer.distributed import init_distributed, shutdown
from trainer.metrics import MetricsLogger, peak_flops
from trainer.models.llama import Transformer, flops_per_token, get_model_args, num_params
from trainer.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_
from trainer.parallel import parallelize
from trainer.parallel.context_parallel import cp_context, setup_context_parallel
from trainer.parallel.compile import check_compile_supported, maybe_compile_loss
from trainer.parallel.init_weights import init_weights
from trainer.parallel.pipeline import ModelPartsView, build_pipeline, plan_pipeline
from trainer.parallel.tensor_parallel import loss_context
from trainer.parallel_dims import ParallelDims
from trainer.validate import Validator, check_validation_layout
from trainer.profiling import maybe_profile


def resolve_param_dtype(name: str, device: torch.device) -> torch.dtype:
    """training.mixed_precision_param -> dtype; auto is bf16 on CUDA and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


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


def check_device(cfg: JobConfig, device_type: str) -> None:
    """Checks that depend on the device the run trains on; DRY_RUN checks configs for any machine, so it runs
    these only for the machine it is on (run_train.sh does so before torchrun, the Trainer again)."""
    check_compile_supported(cfg, device_type)
    if cfg.parallelism.enable_async_tensor_parallel:
        if device_type != "cuda":
            raise ConfigError(f"parallelism.enable_async_tensor_parallel = true needs CUDA (and torch.compile), but "
                              f"this run is on {device_type}; set it to false")
        if not cfg.compile.enable:
            raise ConfigError("parallelism.enable_async_tensor_parallel = true needs torch.compile; set "
                              "compile.enable = true")


def build_model_args(cfg: JobConfig):
    """The model's shape from model.name / model.flavor (ConfigError if unknown), RoPE tables of training.seq_len."""
    try:
        args = get_model_args(cfg.model.name, cfg.model.flavor)
    except ValueError as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}, model.flavor = {cfg.model.flavor!r}: {e}") from None
    # The tables must match the sequence exactly: context parallel shards them alongside the tokens.
    args.max_seq_len = cfg.training.seq_len
    return args


def build_tokenizer(cfg: JobConfig, model_args) -> Tokenizer | None:
    """The tokenizer in model.hf_assets_path (None for synthetic data); ConfigError if missing or too large."""
    if cfg.training.dataset == "synthetic":
        return None
    try:
        tokenizer = Tokenizer.from_path(cfg.model.hf_assets_path)
    except FileNotFoundError as e:
        raise ConfigError(f"model.hf_assets_path = {cfg.model.hf_assets_path!r}: {e}") from None
    if tokenizer.vocab_size > model_args.vocab_size:
        raise ConfigError(f"model.hf_assets_path: the tokenizer has {tokenizer.vocab_size} tokens but {cfg.model.name} "
                          f"{cfg.model.flavor} embeds only {model_args.vocab_size}; use the model's own tokenizer")
    return tokenizer


def check_dataset(cfg: JobConfig) -> None:
    """The dataset name is known and its path exists, checked without reading it (DRY_RUN and before training)."""
    t = cfg.training
    if t.dataset not in DATASET_NAMES:
        raise ConfigError(f"training.dataset = {t.dataset!r} is not one of {', '.join(DATASET_NAMES)}")
    if t.dataset_path and not Path(t.dataset_path).exists():
        raise ConfigError(f"training.dataset_path = {t.dataset_path!r} does not exist; point it at a file or folder")


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the micro-batch, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def feature_summary(cfg: JobConfig) -> str:
    """Activation checkpointing and compile settings for the start-up line."""
    ac, c = cfg.activation_checkpoint, cfg.compile
    ac_text = f"selective {ac.selective_ac_option}" if ac.mode == "selective" else ac.mode
    compile_text = f"{'+'.join(c.components)} ({c.backend})" if c.enable and c.components else "off"
    return f"activation checkpointing {ac_text} | compile {compile_text}"


class Trainer:
    def __init__(self, cfg: JobConfig):
        self.cfg = cfg
        self.dist = init_distributed()
        self.device = self.dist.device
        check_device(cfg, self.device.type)
        self.seed = cfg.debug.seed if cfg.debug.seed is not None else 0
        torch.manual_seed(self.seed)
        if cfg.debug.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        # Layout: degrees checked against the world size and the model before anything is allocated.
        self.model_args = build_model_args(cfg)
        self.dims = ParallelDims.resolve(cfg.parallelism, self.dist.world_size)
        self.dims.validate_model(self.model_args, cfg.training.seq_len)
        check_validation_layout(cfg, self.dims)
        self.accum_steps = gradient_accumulation_steps(cfg, self.dims.dp)
        # Every window is full (packed), so the global batch holds a fixed number of tokens.
        self.tokens_per_step = cfg.training.local_batch_size * cfg.training.seq_len * self.accum_steps * self.dims.dp
        self.pp_plan = (plan_pipeline(cfg.parallelism, cfg.training.local_batch_size, self.model_args.n_layers)
                        if self.dims.pp > 1 else None)
        if self.dist.world_size > 1:
            self.dims.build_mesh(self.device.type)

        # Data: every data-parallel rank reads its own share of one global stream.
        check_dataset(cfg)
        self.tokenizer = build_tokenizer(cfg, self.model_args)
        dp_rank, dp_degree = self.dims.dp_coordinate()
        try:
            self.dataloader = build_dataloader(
                cfg.training.dataset, cfg.training.dataset_path, self.tokenizer, cfg.training.seq_len,
                cfg.training.local_batch_size, dp_rank, dp_degree, seed=self.seed,
                vocab_size=self.model_args.vocab_size)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"training.dataset = {cfg.training.dataset!r}: {e}") from None

        # Model: built on meta, split into pipeline stages, parallelized from the outside, materialized shard by shard.
        # self.model_parts: what this rank holds, one module per pipeline stage it runs (one part without PP).
        # self.model: that part when there is only one (no PP, or a single-stage schedule), else None.
        self.param_dtype = resolve_param_dtype(cfg.training.mixed_precision_param, self.device)
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self.cross_entropy = maybe_compile_loss(cross_entropy_loss, cfg)
        self.pipeline = None
        if self.pp_plan is not None:
            self.pipeline = build_pipeline(model, self.pp_plan, self.dims, self.device,
                                           lambda part: parallelize(part, self.dims, cfg, self.param_dtype),
                                           self.loss_fn)
            self.model_parts = self.pipeline.model_parts
        else:
            self.model_parts = [parallelize(model, self.dims, cfg, self.param_dtype)]
        for part in self.model_parts:
            init_weights(part, self.seed, self.device)
            part.train()
        self.model = self.model_parts[0] if len(self.model_parts) == 1 else None
        self.params = [p for part in self.model_parts for p in part.parameters()]
        self.cp_mesh = self.dims.mesh("cp") if self.dims.cp > 1 else None
        if self.cp_mesh is not None:
            setup_context_parallel(self.device.type, cfg.parallelism.context_parallel_load_balance,
                                   cfg.parallelism.context_parallel_rotate_method)
        # Without FSDP there is no MixedPrecisionPolicy to cast parameters, so autocast does it.
        self.autocast = (torch.autocast(self.device.type, dtype=self.param_dtype)
                         if self.param_dtype != torch.float32 and not self.dims.fsdp_enabled
                         else contextlib.nullcontext())

        self.optimizer = build_optimizer(self.params, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        self.step, self.tokens_seen = 0, 0
        self.metrics = MetricsLogger(
            cfg, self.device, flops_per_token(self.model_args, cfg.training.seq_len),
            peak_flops(self.device, self.param_dtype, cfg.metrics.peak_flops), enabled=self.dist.should_log,
            tokens_divisor=self.dims.tp * self.dims.cp * self.dims.pp, rank=self.dist.rank, run_name=self._run_name())
        self.validator = (Validator(cfg, self.dims, self.device, self.tokenizer, self.model_args.vocab_size, self.seed,
                                    self.metrics, self.autocast,
                                    loss_context=lambda: loss_context(self.dims.loss_parallel_enabled))
                          if cfg.validation.enable else None)
        self._log(f"model {cfg.model.name} {cfg.model.flavor}: {num_params(self.model_args):,} parameters | "
                  f"{self.dims} | accumulation {self.accum_steps} | {self.device} {self.param_dtype} | "
                  f"{feature_summary(cfg)}")
        if self.pp_plan is not None:
            self._log(self.pp_plan.describe())

        # Checkpoint: now that everything it restores exists, resume (or start from checkpoint.initial_load_path).
        # With several stages on this rank, a view of them under the unsplit model's names.
        self.checkpointer = Checkpointer(cfg, self.model or ModelPartsView(self.model_parts), self.optimizer, self.lr_scheduler, self.dataloader, self,
                                         self.dims, self.model_args, self.device, self._log)
        self.checkpointer.load()

    def state_dict(self) -> dict:
        """The train state a checkpoint keeps besides model, optimizer, schedule and data."""
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]

    def _run_name(self) -> str:
        """A timestamp taken on rank 0 and shared, so every rank's TensorBoard files land in one run folder."""
        name = [time.strftime("%Y%m%d-%H%M%S")]
        if dist.is_initialized():
            dist.broadcast_object_list(name, src=0)
        return name[0]

    def _log(self, msg: str) -> None:
        if self.dist.should_log:
            print(msg, flush=True)

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean cross-entropy of one micro-batch / accum_steps: summed over micro-steps, the global-batch mean."""
        return self.cross_entropy(logits, labels) / self.accum_steps

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, loss, backward (through the pipeline schedule with PP); returns the loss.

        Context parallel shards inputs, labels and RoPE tables for the duration; under loss parallel the logits are
        a vocab-sharded DTensor, whose loss and backward must run inside loss_parallel too.
        """
        with cp_context(self.cp_mesh, self.model_parts, inputs, labels), loss_context(self.dims.loss_parallel_enabled):
            if self.pipeline is not None:
                with self.autocast:  # the schedule runs forward and backward inside
                    loss = self.pipeline_step(inputs, labels)
            else:
                with self.autocast:
                    logits = self.model(inputs)
                loss = self.loss_fn(logits, labels)
                loss.backward()
        loss = loss.detach()
        # A loss-parallel loss is a DTensor replicated over tp: every tp rank's local value is the whole loss.
        return loss.to_local() if isinstance(loss, DTensor) else loss

    def pipeline_step(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The schedule cuts the micro-batch into pipeline microbatches: the first stage is fed the tokens, the last
        computes the loss. Other ranks return 0; global_loss fetches the real one."""
        pipeline, losses = self.pipeline, []
        pipeline.schedule.step(*([inputs] if pipeline.has_first_stage else []),
                               target=labels if pipeline.has_last_stage else None, losses=losses,
                               return_outputs=False)
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum_steps` micro-batches; returns (local loss, global grad norm), on device.

        With PP the loss is only known on the last stage (0 elsewhere until global_loss broadcasts it)."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(self.forward_backward(inputs.to(self.device), labels.to(self.device)) for inputs, labels in batches)
        if self.pipeline:
            self.pipeline.sync_tied_grads()
        grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm,
                                    pp_group=self.pipeline.group if self.pipeline else None,
                                    norm_skip=self.pipeline.norm_skip if self.pipeline else ())
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step
        return loss, grad_norm

    def global_loss(self, loss: torch.Tensor) -> tuple[float, float]:
        """(mean, max) of the loss over data-parallel ranks: one all-gather, only on logging steps.

        With PP every rank gets the last stage's loss first (a broadcast over the pp group)."""
        if not self.dims.meshes:
            return loss.item(), loss.item()
        if self.pipeline:
            loss = loss.clone()
            dist.broadcast(loss, group=self.pipeline.group, group_src=self.pipeline.plan.last_stage_rank)
        mesh = self.dims.mesh("dp_cp")
        gathered = torch.empty(mesh.size(), dtype=loss.dtype, device=loss.device)
        dist.all_gather_into_tensor(gathered, loss.reshape(1), group=mesh.get_group())
        return gathered.mean().item(), gathered.max().item()

    def train(self) -> None:
        """The training loop: data, step, profile, log, validation, checkpoint, garbage collection."""
        cfg = self.cfg.training
        data_iter = iter(self.dataloader)  # created after the checkpoint load, so it starts at the saved position
        gc.disable()  # collections at random times stall ranks at different moments; collect on a schedule instead
        window_start, data_time, tokens, window_steps = time.perf_counter(), 0.0, 0, 0
        with maybe_profile(self.cfg, self.dist.rank, self.device, self.step, log=self._log) as profiler:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batches = [next(data_iter) for _ in range(self.accum_steps)]
                data_time += time.perf_counter() - t0
                tokens += self.tokens_per_step // self.dims.dp  # this rank's share (every window is full)
                loss, grad_norm = self.train_step(batches)
                window_steps += 1
                profiler.step()
                if self.step % cfg.gc_freq == 0:
                    gc.collect(1)
                if self.step == 1 or self.step % self.cfg.metrics.log_freq == 0 or self.step == cfg.steps:
                    # Reading loss and grad norm waits for the device: only on logging steps.
                    loss_avg, loss_max = self.global_loss(loss)
                    self.metrics.log(self.step, loss_avg, loss_max, grad_norm.item(),
                                     self.lr_scheduler.get_last_lr()[0], tokens, time.perf_counter() - window_start,
                                     data_time, window_steps)
                    window_start, data_time, tokens, window_steps = time.perf_counter(), 0.0, 0, 0
                if self.validator is not None and self.validator.should_validate(self.step):
                    val_start = time.perf_counter()
                    self.validator.validate(self.model_parts, self.step)
                    window_start += time.perf_counter() - val_start  # validation time is no training throughput
                if self.checkpointer.stop_requested():  # SIGTERM/SIGINT on any rank: save this step and stop
                    self.checkpointer.save(self.step, force=True)
                    self._log(f"stopped by a signal after step {self.step}; the next run resumes from here")
                    return
                self.checkpointer.save(self.step)
        self.checkpointer.save(self.step, last=True)
        self.checkpointer.wait()  # async saves complete before the process exits
        self._log(f"training done after {self.step} steps")

    def close(self) -> None:
        """Release what must not wait for interpreter exit."""
        self.metrics.close()
        self.checkpointer.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for user mistakes, tracebacks for bugs, a clean gloo-safe exit."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    trainer, code, clean = None, 0, True
    try:
        cfg = load_config(argv)
        trainer = Trainer(cfg)
        trainer.train()
    except ConfigError as e:
        # Every rank reaches the same verdict; one line from rank 0 is enough.
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        code, clean = 2, False
    except BaseException:
        import traceback

        traceback.print_exc()
        code, clean = 1, False
    finally:
        if trainer is not None:
            trainer.close()
    shutdown(code, clean)


if __name__ == "__main__":
    main()

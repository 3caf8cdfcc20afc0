"""The Trainer: build everything from a JobConfig, then loop. Read it top to bottom like a recipe.

Launched by run_train.sh (torchrun), or as `python -m trainer.train --job.config_file ...` for one process.
"""

import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.profiler import record_function

from trainer.build import attention_summary, bf16_speed_note, build_model, check_data, load_tokenizer, plan_run
from trainer.checkpoint import Checkpointer
from trainer.config import ConfigError, JobConfig, help_text, load_config, save_config
from trainer.data.dataloader import build_dataloader, to_device
from trainer.distributed import agreed_errors, init_distributed, report_failure, set_timeouts, shutdown
from trainer.metrics import MetricsLogger, peak_flops
from trainer.models.llama import flops_per_token, num_params
from trainer.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_
from trainer.optim_in_backward import OptimizerInBackward
from trainer.parallel.compile import compile_summary, eager_note, maybe_compile_loss
from trainer.parallel.tensor_parallel import reduce_partial_grads
from trainer.parallel_dims import device_type
from trainer.profiling import maybe_profile
from trainer.torch_private import shutdown_loader_workers, warn_tensor_cycles
from trainer.validate import ValidationResult, Validator


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the micro-batch, computed in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def enable_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa products, fp32
    accumulation): a float32 run, and any fp32 matmul outside the bf16 compute of a mixed-precision one, runs several
    times faster. torch's default is full fp32 there; CPU math is left alone. Through the allow_tf32 switches, whose
    state torch.get_float32_matmul_precision() reports ("high") to the MFU peak; setting the newer per-backend
    fp32_precision instead makes that call raise (torch refuses to mix the two APIs)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def feature_summary(cfg: JobConfig, device_type: str, tp: int) -> str:
    """Activation checkpointing, compile and model converter settings for the start-up line."""
    ac = cfg.activation_checkpoint
    ac_text = f"selective {ac.selective_ac_option}" if ac.mode == "selective" else ac.mode
    compile_text = compile_summary(cfg, device_type, tp)
    converters = f" | converters {', '.join(cfg.model.converters)}" if cfg.model.converters else ""
    levers = [text for on, text in ((cfg.training.enable_cpu_offload, "CPU offload"),
                                    (cfg.training.dtype != "float32", f"full {cfg.training.dtype} (no fp32 master)"),
                                    (cfg.optimizer.early_step_in_backward, "optimizer steps in backward")) if on]
    return (f"activation checkpointing {ac_text} | compile {compile_text}{converters}"
            + "".join(f" | {text}" for text in levers))


@dataclass
class TrainState:
    """The loop's own position, saved with every checkpoint as `train_state`."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]


class LoopObserver:
    """Hooks into Trainer.train, called on every rank; each does nothing unless overridden (tests and tools)."""

    def before_training(self, trainer: "Trainer") -> None:
        """Once the model is built and any checkpoint loaded, before the first step (trainer.step is where it starts)."""

    def after_step(self, trainer: "Trainer", step: int, loss: float | None) -> None:
        """After optimizer step `step` and its log line; `loss` is the logged global mean, None if it did not log."""

    def before_validation(self, trainer: "Trainer", step: int) -> None:
        """Before the validation pass after step `step`."""

    def after_validation(self, trainer: "Trainer", step: int, result: ValidationResult) -> None:
        """After the validation pass after step `step`, with its result."""

    def after_checkpoint(self, trainer: "Trainer", step: int) -> None:
        """After the checkpointer was given step `step` (it saved if one was due)."""


class Trainer:
    def __init__(self, cfg: JobConfig, observers: tuple[LoopObserver, ...] = ()):
        self.cfg, self.observers = cfg, observers
        self.dist = init_distributed(cfg.comm, cfg.job.dump_folder, cpu_backend=cfg.training.enable_cpu_offload)
        self.device = self.dist.device
        enable_tf32(self.device)
        # Layout: every check and derived figure, before anything is allocated (trainer/build.py). What reads files
        # per rank (the data, the tokenizer) fails on every rank alike, before the first collective.
        with agreed_errors():
            self.plan = plan = plan_run(cfg, self.dist.world_size, self.device.type)
            check_data(cfg)
            self.tokenizer = load_tokenizer(plan)
        self.dims = plan.dims
        torch.manual_seed(plan.seed)
        if cfg.debug.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=cfg.debug.deterministic_warn_only)
        if self.dist.world_size > 1:
            self.dims.build_mesh(self.device.type)

        # Data: every data-parallel rank reads its own share of one global stream.
        dp_rank, dp_degree = self.dims.coordinate("dp")
        with agreed_errors():
            self.dataloader = self._build_dataloader(dp_rank, dp_degree)

        # Model: this rank's pipeline stages (one part without PP), parallelized and initialized (trainer/build.py).
        self.cross_entropy = maybe_compile_loss(cross_entropy_loss, cfg)
        self.model = build_model(plan, self.device, self.loss_fn,
                                 eos_id=self.tokenizer.eos_id if self.tokenizer is not None else None)
        self.params = self.model.parameters()
        self.optimizer = build_optimizer(self.params, cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler,
                                               cfg.lr_scheduler.total_steps or cfg.training.steps)
        self.state = TrainState()
        self.metrics = MetricsLogger(
            cfg, self.device, flops_per_token(plan.model_args, cfg.training.seq_len),
            peak_flops(self.device, plan.param_dtype, cfg.metrics.peak_flops), enabled=self.dist.should_log,
            tokens_divisor=self.dims.tp * self.dims.cp * self.dims.pp, rank=self.dist.rank, run_name=self._run_name())
        with agreed_errors():
            self.validator = (Validator(cfg, self.dims, self.device, self.tokenizer, plan.model_args.vocab_size,
                                        plan.seed, self.metrics)
                              if cfg.validation.enable else None)
        self._log(f"model {cfg.model.name} {cfg.model.flavor}: {num_params(plan.model_args):,} parameters | "
                  f"{self.dims} | accumulation {plan.accum_steps} | {self.device} {plan.param_dtype} | "
                  f"{feature_summary(cfg, self.device.type, self.dims.tp)} | "
                  f"{attention_summary(plan.model_args, self.device.type)}")
        if note := eager_note(cfg, self.device.type, self.dims.tp):
            self._log(note)
        if plan.pp_plan is not None:
            self._log(plan.pp_plan.describe())
        if (note := bf16_speed_note(plan)) is not None:
            self._log(note)
        if cfg.job.save_config_file and self.dist.rank == 0:
            self._log(f"config saved to {save_config(cfg, Path(cfg.job.dump_folder) / cfg.job.save_config_file)}")

        # Checkpoint: now that everything it restores exists, resume (or start from checkpoint.initial_load_path).
        self.checkpointer = Checkpointer(cfg, self.model.parts, self.optimizer, self.lr_scheduler, self.dataloader,
                                         {"train_state": self.state}, self.dims, plan.model_args, self.device,
                                         self._log)
        self.checkpointer.load()
        if self.step:
            self._log(f"resuming at step {self.step}")

    def _build_dataloader(self, dp_rank: int, dp_degree: int):
        cfg, plan = self.cfg, self.plan
        try:
            return build_dataloader(
                cfg.training.dataset, cfg.training.dataset_path, self.tokenizer, cfg.training.seq_len,
                cfg.training.local_batch_size, dp_rank, dp_degree, seed=plan.seed,
                vocab_size=plan.model_args.vocab_size, options=cfg.training.dataloader,
                device_type=self.device.type)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"training.dataset = {cfg.training.dataset!r}: {e}") from None

    @property
    def step(self) -> int:
        """Optimizer steps taken (restored by a resume)."""
        return self.state.step

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
        return self.cross_entropy(logits, labels) / self.plan.accum_steps

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: forward, loss, backward (through the pipeline schedule with PP); returns the loss.

        Inside the model's batch context, context parallel holds this rank's part of the sequence; under loss
        parallel the logits are a vocab-sharded DTensor, whose loss and backward run inside that context too.
        """
        model = self.model
        kwargs = model.forward_kwargs(inputs)  # document ids (block-causal models), once per micro-batch
        with model.batch_context(inputs, labels):
            if model.pipeline is not None:
                with model.autocast:  # the schedule runs forward and backward inside
                    loss = self.pipeline_step(inputs, labels, kwargs)
            else:
                with model.autocast:
                    logits = model.model(inputs, **kwargs)
                loss = self.loss_fn(logits, labels)
                loss.backward()
        loss = loss.detach()
        # A loss-parallel loss is a DTensor replicated over tp: every tp rank's local value is the whole loss.
        return loss.to_local() if isinstance(loss, DTensor) else loss

    def pipeline_step(self, inputs: torch.Tensor, labels: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The schedule cuts the micro-batch into pipeline microbatches: the first stage is fed the tokens, the last
        computes the loss; `kwargs` (document ids) are cut alike and reach every stage. Other ranks return 0;
        global_loss fetches the real one."""
        pipeline, losses = self.model.pipeline, []
        pipeline.schedule.step(*([inputs] if pipeline.has_first_stage else []),
                               target=labels if pipeline.has_last_stage else None, losses=losses,
                               return_outputs=False, **kwargs)
        return torch.stack(losses).sum() if losses else torch.zeros((), device=self.device)

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum_steps` micro-batches; returns (local loss, global grad norm), on device.

        With PP the loss is only known on the last stage (0 elsewhere until global_loss broadcasts it)."""
        pipeline = self.model.pipeline
        self.optimizer.zero_grad(set_to_none=True)
        loss = 0
        for i, batch in enumerate(batches):
            self.model.set_gradient_sync(i == len(batches) - 1)  # DDP: reduce the accumulated sum once
            loss = loss + self.forward_backward(*to_device(batch, self.device))
        reduce_partial_grads(self.params)  # TP: sequence-parallel norm weights, in one all-reduce
        if pipeline:
            pipeline.sync_tied_grads()
        if isinstance(self.optimizer, OptimizerInBackward):  # stepped in backward, gradients freed (no clipping)
            grad_norm = self.optimizer.grad_norm()
        else:
            with record_function("trainer::grad_norm"):  # a span in profiles (scripts/profile_layouts.py)
                grad_norm = clip_grad_norm_(self.params, self.cfg.training.max_norm,
                                            pp_group=pipeline.group if pipeline else None,
                                            norm_skip=pipeline.norm_skip if pipeline else ())
        self.optimizer.step()
        self.model.after_optimizer_step()  # float8 with FSDP: the next all-gather's weight scales, all at once
        self.lr_scheduler.step()
        self.state.step += 1
        self.state.tokens_seen += self.plan.tokens_per_step
        return loss, grad_norm

    def global_loss(self, loss: torch.Tensor) -> tuple[float, float]:
        """(mean, max) of the loss over data-parallel ranks: one all-gather, only on logging steps.

        With PP every rank gets the last stage's loss first (a broadcast over the pp group)."""
        pipeline = self.model.pipeline
        if pipeline:
            loss = loss.clone()
            dist.broadcast(loss, group=pipeline.group, group_src=pipeline.plan.last_stage_rank)
        mesh = self.dims.optional_mesh("dp_cp")
        if mesh is None:
            return loss.item(), loss.item()
        gathered = torch.empty(mesh.size(), dtype=loss.dtype, device=loss.device)
        dist.all_gather_single(gathered, loss.reshape(1), group=mesh.get_group())
        return gathered.mean().item(), gathered.max().item()

    def train(self) -> None:
        """The training loop: data, step, profile, log, validation, checkpoint, garbage collection.

        With checkpoint.create_seed_checkpoint it saves the initial weights as step-0 instead, and returns."""
        if self.cfg.checkpoint.create_seed_checkpoint:
            self.checkpointer.save(0, force=True)
            self._log("seed checkpoint saved (step 0); runs of any layout can start from it")
            return
        cfg = self.cfg.training
        for observer in self.observers:
            observer.before_training(self)
        # Created after the checkpoint load, so it starts at the saved position. Making an iterator draws its base
        # seed from the global generator: forked, so that a resumed run's RNG states stay those of an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            data_iter = iter(self.dataloader)
        gc_was_enabled = gc.isenabled()
        gc.disable()  # collections at random times stall ranks at different moments; collect on a schedule instead
        stop_watching = None
        if cfg.gc_debug and self.device.type == "cuda":
            stop_watching = warn_tensor_cycles()
        elif cfg.gc_debug:
            self._log("training.gc_debug: collecting every step; reports of cycles holding tensors need CUDA")
        try:
            with maybe_profile(self.cfg, self.dist.rank, self.device, self.step, log=self._log) as profiler:
                self._loop(cfg, data_iter, profiler)
        finally:
            if stop_watching is not None:
                stop_watching()
            if gc_was_enabled:
                gc.enable()

    def _loop(self, cfg, data_iter, profiler) -> None:
        window_start, data_time, tokens, window_steps = time.perf_counter(), 0.0, 0, 0
        first_step = self.step + 1
        while self.step < cfg.steps:
            t0 = time.perf_counter()
            batches = [next(data_iter) for _ in range(self.plan.accum_steps)]
            data_time += time.perf_counter() - t0
            tokens += self.plan.tokens_per_step // self.dims.dp  # this rank's share (every window is full)
            loss, grad_norm = self.train_step(batches)
            if self.step == first_step:  # start-up (loading, compiling) is over: a stalled rank now fails sooner
                set_timeouts(self.cfg.comm.train_timeout_seconds, self.device)
            window_steps += 1
            profiler.step()
            if cfg.gc_debug:
                gc.collect()  # every generation, every step: a cycle holding tensors shows at the step it appears
            elif self.step % cfg.gc_freq == 0:
                gc.collect(1)
            loss_avg = None
            if self.step == 1 or self.step % self.cfg.metrics.log_freq == 0 or self.step == cfg.steps:
                # Reading loss and grad norm waits for the device: only on logging steps.
                with record_function("trainer::log"):
                    loss_avg, loss_max = self.global_loss(loss)
                    self.metrics.log(self.step, loss_avg, loss_max, grad_norm.item(),
                                     self.lr_scheduler.get_last_lr()[0], tokens, time.perf_counter() - window_start,
                                     data_time, window_steps)
                window_start, data_time, tokens, window_steps = time.perf_counter(), 0.0, 0, 0
            for observer in self.observers:
                observer.after_step(self, self.step, loss_avg)
            if self.validator is not None and self.validator.should_validate(self.step):
                val_start = time.perf_counter()
                for observer in self.observers:
                    observer.before_validation(self, self.step)
                result = self.validator.validate(self.model, self.step)
                for observer in self.observers:
                    observer.after_validation(self, self.step, result)
                window_start += time.perf_counter() - val_start  # validation time is no training throughput
            stop = self.checkpointer.stop_requested()  # SIGTERM/SIGINT on any rank: save this step and stop
            self.checkpointer.save(self.step, force=stop)
            for observer in self.observers:
                observer.after_checkpoint(self, self.step)
            if stop:
                self._log(f"stopped by a signal after step {self.step}; the next run resumes from here")
                return
        self.checkpointer.save(self.step, last=True)
        self.checkpointer.wait()  # async saves complete before the process exits
        self._log(f"training done after {self.step} steps")

    def close(self) -> None:
        """Release what must not wait for interpreter exit."""
        self.metrics.close()
        self.checkpointer.close()
        for loader in (self.dataloader, self.validator and self.validator.loader):
            if loader is not None:  # worker processes stop now, not when the garbage collector gets to them
                shutdown_loader_workers(loader)


def run(argv: list[str], observers: tuple[LoopObserver, ...] = ()) -> int:
    """Train as the config in `argv` says; the exit code: 0, 2 for a mistake in the config (one line on stderr from
    rank 0), 1 for a bug (its traceback) or a failed collective (one line per rank). Leaves the process group up:
    `main` ends the process."""
    trainer, rank = None, int(os.environ.get("RANK", "0"))
    try:
        cfg = load_config(argv)
        if cfg.comm.mode == "fake_backend":  # torchtitan's way to check a layout without devices: DRY_RUN's
            from trainer.dry_run import dry_run

            world = int(os.environ.get("NGPU") or os.environ.get("WORLD_SIZE", "1"))
            if rank == 0:
                print(dry_run(cfg, world, target=device_type()), flush=True)
            return 0
        trainer = Trainer(cfg, observers)
        trainer.train()
        return 0
    except BaseException as e:
        return report_failure(e, rank)
    finally:
        if trainer is not None:
            trainer.close()


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors for user mistakes, tracebacks for bugs, a clean gloo-safe exit."""
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        sys.exit(0)
    code = run(argv)
    shutdown(code, clean=code == 0)


if __name__ == "__main__":
    main()

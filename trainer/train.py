"""The Trainer: build everything from a JobConfig, then loop. Read it top to bottom like a recipe.

Launched by run_train.sh (torchrun), or as `python -m trainer.train --job.config_file ...` for one process.
"""

import contextlib
import gc
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import ConfigError, JobConfig, help_text, load_config
from trainer.data.dataloader import build_dataloader
from trainer.data.tokenizer import Tokenizer
from trainer.distributed import init_distributed, shutdown
from trainer.metrics import MetricsLogger, peak_flops
from trainer.models.llama import Transformer, flops_per_token, get_model_args
from trainer.optim import build_lr_scheduler, build_optimizer, clip_grad_norm_
from trainer.parallel import parallelize
from trainer.parallel.compile import check_compile_supported, maybe_compile_loss
from trainer.parallel.init_weights import init_weights
from trainer.parallel_dims import ParallelDims
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


def build_model_args(cfg: JobConfig):
    """The model's shape from model.name / model.flavor (ConfigError if unknown), RoPE tables of training.seq_len."""
    try:
        args = get_model_args(cfg.model.name, cfg.model.flavor)
    except ValueError as e:
        raise ConfigError(f"model.name = {cfg.model.name!r}, model.flavor = {cfg.model.flavor!r}: {e}") from None
    # The tables must match the sequence exactly: context parallel shards them alongside the tokens.
    args.max_seq_len = cfg.training.seq_len
    return args


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
        self.seed = cfg.debug.seed if cfg.debug.seed is not None else 0
        torch.manual_seed(self.seed)
        if cfg.debug.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        # Layout: degrees checked against the world size and the model before anything is allocated.
        self.model_args = build_model_args(cfg)
        self.dims = ParallelDims.resolve(cfg.parallelism, self.dist.world_size)
        self.dims.validate_model(self.model_args, cfg.training.seq_len)
        check_compile_supported(cfg, self.device.type)
        self.accum_steps = gradient_accumulation_steps(cfg, self.dims.dp)
        if self.dist.world_size > 1:
            self.dims.build_mesh(self.device.type)

        # Data: every data-parallel rank reads its own share of one global stream.
        self.tokenizer = None if cfg.training.dataset == "synthetic" else self._tokenizer()
        dp_rank, dp_degree = self.dims.dp_coordinate()
        try:
            self.dataloader = build_dataloader(
                cfg.training.dataset, cfg.training.dataset_path, self.tokenizer, cfg.training.seq_len,
                cfg.training.local_batch_size, dp_rank, dp_degree, seed=self.seed,
                vocab_size=self.model_args.vocab_size)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"training.dataset = {cfg.training.dataset!r}: {e}") from None

        # Model: built on meta, parallelized from the outside, then materialized shard by shard.
        self.param_dtype = resolve_param_dtype(cfg.training.mixed_precision_param, self.device)
        with torch.device("meta"):
            model = Transformer(self.model_args)
        self.model = parallelize(model, self.dims, cfg, self.param_dtype)
        init_weights(self.model, self.seed, self.device)
        self.model.train()
        self.loss_fn = maybe_compile_loss(cross_entropy_loss, cfg)
        # Without FSDP there is no MixedPrecisionPolicy to cast parameters, so autocast does it.
        self.autocast = (torch.autocast(self.device.type, dtype=self.param_dtype)
                         if self.param_dtype != torch.float32 and not self.dims.fsdp_enabled
                         else contextlib.nullcontext())

        self.optimizer = build_optimizer(list(self.model.parameters()), cfg.optimizer)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, cfg.training.steps)
        self.step = 0
        self.metrics = MetricsLogger(
            cfg, self.device, flops_per_token(self.model_args, cfg.training.seq_len),
            peak_flops(self.device, self.param_dtype, cfg.metrics.peak_flops), enabled=self.dist.should_log,
            tokens_divisor=self.dims.tp * self.dims.cp * self.dims.pp)
        self._log(f"model {cfg.model.name} {cfg.model.flavor}: {sum(p.numel() for p in self.model.parameters()):,} "
                  f"parameters | {self.dims} | accumulation {self.accum_steps} | {self.device} {self.param_dtype} | "
                  f"{feature_summary(cfg)}")

    def _tokenizer(self) -> Tokenizer:
        try:
            tokenizer = Tokenizer.from_path(self.cfg.model.hf_assets_path)
        except FileNotFoundError as e:
            raise ConfigError(f"model.hf_assets_path = {self.cfg.model.hf_assets_path!r}: {e}") from None
        if tokenizer.vocab_size > self.model_args.vocab_size:
            raise ConfigError(f"model.hf_assets_path: the tokenizer has {tokenizer.vocab_size} tokens but "
                              f"{self.cfg.model.name} {self.cfg.model.flavor} embeds only {self.model_args.vocab_size};"
                              f" use the model's own tokenizer")
        return tokenizer

    def _log(self, msg: str) -> None:
        if self.dist.should_log:
            print(msg, flush=True)

    def forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One micro-batch: loss scaled so that the accumulated gradient is the global-batch mean."""
        with self.autocast:
            logits = self.model(inputs)
        loss = self.loss_fn(logits, labels) / self.accum_steps
        loss.backward()
        return loss.detach()

    def train_step(self, batches) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over `accum_steps` micro-batches; returns (local loss, global grad norm), on device."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = sum(self.forward_backward(inputs.to(self.device), labels.to(self.device)) for inputs, labels in batches)
        grad_norm = clip_grad_norm_(list(self.model.parameters()), self.cfg.training.max_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.step += 1
        return loss, grad_norm

    def global_loss(self, loss: torch.Tensor) -> tuple[float, float]:
        """(mean, max) of the loss over data-parallel ranks: one all-gather, only on logging steps."""
        if not self.dims.meshes:
            return loss.item(), loss.item()
        mesh = self.dims.mesh("dp_cp")
        gathered = torch.empty(mesh.size(), dtype=loss.dtype, device=loss.device)
        dist.all_gather_into_tensor(gathered, loss.reshape(1), group=mesh.get_group())
        return gathered.mean().item(), gathered.max().item()

    def train(self) -> None:
        """The training loop: data, step, profile, log, garbage collection."""
        cfg = self.cfg.training
        data_iter = iter(self.dataloader)
        gc.disable()  # collections at random times stall ranks at different moments; collect on a schedule instead
        window_start, data_time, tokens, window_steps = time.perf_counter(), 0.0, 0, 0
        with maybe_profile(self.cfg, self.dist.rank, self.device, self.step, log=self._log) as profiler:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                batches = [next(data_iter) for _ in range(self.accum_steps)]
                data_time += time.perf_counter() - t0
                tokens += sum(inputs.numel() for inputs, _ in batches)
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
        self._log(f"training done after {self.step} steps")

    def close(self) -> None:
        """Release what must not wait for interpreter exit."""
        self.metrics.close()


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

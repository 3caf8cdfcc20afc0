"""Validation: every `validation.freq` steps, the loss of the current weights on a held-out split.

What is evaluated. Each data-parallel rank reads its share of the split (window i goes to dp rank i % dp, as in
training), `local_batch_size` windows at a time, so ranks may hold different numbers of batches. Before every batch
all ranks agree, with one all-reduce MIN of a has-a-batch flag over the world, whether every rank still has one; the
first rank to run out ends the pass for all. No rank may stop alone: FSDP's all-gathers, the context-parallel ring
and the final sum need every rank. The evaluated windows are therefore the first batches x local_batch_size x dp
windows of the split in any layout; with steps = -1 that is every complete global batch.

The loss is the token-weighted mean cross-entropy over everything evaluated: each rank sums the loss of its tokens
(float64), and one all-reduce SUM of (loss sum, token count) over the world adds the ranks up at the end. Every token
is counted by exactly one rank (see `_owns_tokens`): context-parallel ranks hold different parts of a sequence, ranks
that hold the same tokens add zeros.

Validation leaves training exactly as it was: forward only, under no_grad, in eval mode (modes restored after); the
RNG states restored (a DataLoader iterator draws its seed from the global generator); the training loader, optimizer
and scheduler untouched; FSDP modules resharded as a training step leaves them.

The model runs through the same `ModelParts.batch_context` as training (context parallel's sharding, loss
parallel), so every layout validates as it trains. With pipeline parallel each batch runs forward only through the
training's schedule (`Pipeline.evaluate`, every schedule, composed with TP, CP and FSDP): the schedule cuts it into
the training's number of microbatches, so validation.local_batch_size must be a multiple of that number; the
last stage's ranks hold the loss sum, and the others count no tokens, so the final all-reduce adds it up once.
"""

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from trainer.config import ConfigError, JobConfig
from trainer.data.dataloader import build_dataloader, to_device
from trainer.data.datasets import DATASET_NAMES
from trainer.data.tokenizer import Tokenizer
from trainer.metrics import MetricsLogger
from trainer.parallel_dims import ParallelDims

# torchtitan's dataset name for C4's validation split; here every dataset is read through its validation split.
DATASET_ALIASES = {"c4_validation": "c4"}
# The validation stream of the synthetic dataset is seeded apart from the training one, so it is held out too.
SYNTHETIC_SEED_OFFSET = 1


@dataclass(frozen=True)
class ValidationData:
    """The [validation] section with its defaults filled in from [training]."""

    dataset: str
    dataset_path: str | None
    seq_len: int
    local_batch_size: int


def validation_data(cfg: JobConfig) -> ValidationData:
    """Resolve the unset fields of [validation]: dataset and path from [training], -1 sizes from [training]."""
    v, t = cfg.validation, cfg.training
    dataset = v.dataset if v.dataset is not None else t.dataset
    # The training path goes with the training dataset only: a named validation dataset has its own location.
    path = v.dataset_path if (v.dataset_path is not None or v.dataset is not None) else t.dataset_path
    return ValidationData(DATASET_ALIASES.get(dataset, dataset), path,
                          t.seq_len if v.seq_len == -1 else v.seq_len,
                          t.local_batch_size if v.local_batch_size == -1 else v.local_batch_size)


def check_validation_layout(cfg: JobConfig, dims: ParallelDims) -> None:
    """Checks of [validation] against the parallel layout (DRY_RUN and the Trainer); ConfigError if one fails."""
    if not cfg.validation.enable:
        return
    data, p = validation_data(cfg), cfg.parallelism
    n_microbatches = cfg.training.local_batch_size // p.pipeline_parallel_microbatch_size
    if dims.pp > 1 and data.local_batch_size % n_microbatches:
        raise ConfigError(f"validation.local_batch_size = {data.local_batch_size} with pipeline parallel: the "
                          f"schedule cuts a batch into {n_microbatches} microbatches (training.local_batch_size "
                          f"{cfg.training.local_batch_size} / pipeline_parallel_microbatch_size "
                          f"{p.pipeline_parallel_microbatch_size}); use a multiple of {n_microbatches}")
    dims.check_seq_len("validation.seq_len", data.seq_len)


def check_validation_data(cfg: JobConfig) -> None:
    """The validation dataset is known and its files exist, checked without reading them; ConfigError if not."""
    v = cfg.validation
    if not v.enable:
        return
    data = validation_data(cfg)
    if data.dataset not in DATASET_NAMES:
        raise ConfigError(f"validation.dataset = {v.dataset!r} is not one of "
                          f"{', '.join((*DATASET_NAMES, *DATASET_ALIASES))}")
    key = "validation.dataset_path" if v.dataset_path is not None else "training.dataset_path"
    if data.dataset_path and not Path(data.dataset_path).exists():
        raise ConfigError(f"{key} = {data.dataset_path!r} does not exist; point it at a file or folder")
    if key == "training.dataset_path" and data.dataset_path and Path(data.dataset_path).is_file():
        raise ConfigError(f"validation: training.dataset_path = {data.dataset_path!r} is a single file, which has "
                          f"no validation split; set validation.dataset_path to held-out data")


@dataclass
class ValidationResult:
    """One validation pass, the same on every rank."""

    loss: float
    """Token-weighted mean cross-entropy over every evaluated token of every rank."""
    perplexity: float
    """exp(loss)."""
    tokens: int
    """Tokens evaluated over all ranks (each counted once)."""
    batches: int
    """Batches evaluated by each data-parallel rank."""
    seconds: float


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")


class Validator:
    """Builds the validation loader once; `validate` evaluates the model on it and logs the result.

    `tokenizer` is the run's (load_tokenizer loads one whenever validation reads text)."""

    def __init__(self, cfg: JobConfig, dims: ParallelDims, device: torch.device, tokenizer: Tokenizer | None,
                 vocab_size: int, seed: int, metrics: MetricsLogger):
        check_validation_data(cfg)
        self.freq, self.steps = cfg.validation.freq, cfg.validation.steps
        self.data = validation_data(cfg)
        self.dims, self.device, self.metrics = dims, device, metrics
        dp_rank, dp_degree = dims.coordinate("dp")
        try:
            self.loader = build_dataloader(
                self.data.dataset, self.data.dataset_path, tokenizer, self.data.seq_len, self.data.local_batch_size,
                dp_rank, dp_degree, seed=seed + SYNTHETIC_SEED_OFFSET, split="validation", infinite=False,
                vocab_size=vocab_size, options=cfg.validation.dataloader, device_type=device.type)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"validation.dataset = {self.data.dataset!r}: {e}") from None
        # Every pass starts from here: a pass cut short (steps = N, or another rank ran out) would otherwise resume.
        self._start_state = self.loader.state_dict()
        # Ranks that hold the same tokens count them once: tp rank 0 (under PP only a last stage, see _batch_loss).
        self._owns_tokens = dims.coordinate("tp")[0] == 0

    def should_validate(self, step: int) -> bool:
        """Whether to validate after training step `step`."""
        return step % self.freq == 0

    @torch.no_grad()
    def validate(self, model, step: int) -> ValidationResult:
        """Evaluate `model` (this rank's ModelParts, see trainer/build.py) on the split; log and return the result.

        Every rank must call it at the same step.
        """
        start = time.perf_counter()
        model_parts = model.parts
        modes = [part.training for part in model_parts]
        for part in model_parts:
            part.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens, batches = 0, 0
        rng_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=rng_devices), self._rope_rows(model_parts):
            self.loader.load_state_dict(self._start_state)
            data_iter = iter(self.loader)
            while self.steps == -1 or batches < self.steps:
                batch = next(data_iter, None)
                if not self._everyone_has(batch is not None):
                    break
                inputs, labels = to_device(batch, self.device)
                batch_sum, batch_tokens = self._batch_loss(model, inputs, labels)
                loss_sum += batch_sum
                tokens += batch_tokens
                batches += 1
        for part, mode in zip(model_parts, modes):
            part.train(mode)
        self._reshard(model_parts)

        totals = torch.stack([loss_sum, torch.tensor(float(tokens), dtype=torch.float64, device=self.device)])
        if not self._owns_tokens:
            totals.zero_()
        if dist.is_initialized():
            dist.all_reduce(totals)
        total_loss, total_tokens = totals.tolist()
        loss = total_loss / total_tokens if total_tokens else math.nan
        try:
            perplexity = math.exp(loss)
        except OverflowError:
            perplexity = math.inf
        result = ValidationResult(loss, perplexity, int(total_tokens), batches, time.perf_counter() - start)
        self.metrics.log_validation(step, result.loss, result.perplexity, result.tokens, result.batches,
                                    result.seconds)
        return result

    def _everyone_has(self, has_batch: bool) -> bool:
        """True when every rank holds a next batch: one all-reduce MIN of a flag, so all ranks stop together."""
        if not dist.is_initialized():
            return has_batch
        flag = torch.tensor([int(has_batch)], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _batch_loss(self, model, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy, token count) of this rank's tokens of one batch."""
        kwargs = model.forward_kwargs(inputs)
        with model.batch_context(inputs, labels):
            # Inside the context inputs and labels are this rank's part of the sequence.
            tokens = labels.numel()
            if model.pipeline is not None:
                with model.autocast:
                    loss = model.pipeline.evaluate(inputs, labels, _summed_cross_entropy, **kwargs)
                if loss is None:  # not a last-stage rank: the loss and its tokens are counted there
                    return torch.zeros((), dtype=torch.float64, device=self.device), 0
            else:
                with model.autocast:
                    logits = model.model(inputs, **kwargs)
                loss = _summed_cross_entropy(logits, labels)
        # A loss-parallel loss is a DTensor replicated over tp: the local value is the whole sum.
        loss = loss.to_local() if isinstance(loss, DTensor) else loss
        return loss.double(), tokens

    @contextlib.contextmanager
    def _rope_rows(self, model_parts: list[nn.Module]):
        """Context parallel shards the RoPE table together with the sequence, so for a validation seq_len below
        training's the table must be cut to seq_len rows for the pass (without CP, attention slices it itself)."""
        tables = [part.rope_cache for part in model_parts]
        if self.dims.cp == 1 or all(t.shape[0] == self.data.seq_len for t in tables):
            yield
            return
        try:
            for part, table in zip(model_parts, tables):
                part.rope_cache = table[: self.data.seq_len].clone()
            yield
        finally:
            for part, table in zip(model_parts, tables):
                part.rope_cache = table

    @staticmethod
    def _reshard(model_parts: list[nn.Module]) -> None:
        # An eval forward leaves FSDP modules that do not reshard after forward (the root) unsharded, which training
        # would otherwise only undo in its next backward; free them now, as a training step leaves them.
        for part in model_parts:
            for module in part.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()

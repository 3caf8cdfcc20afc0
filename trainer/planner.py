"""DRY_RUN --plan: every valid layout of a config's model on NGPU ranks, its memory per rank and predicted speed.

A layout is the parallel degrees (dp_replicate x dp_shard x cp x tp x pp), the pipeline schedule and microbatch
size, the activation-checkpoint mode, the FSDP reshard policy and the local batch (for the config's global batch).
Each candidate is the config with those keys overridden, checked by the same `validate` and `plan_run` the trainer
uses: what they refuse is dropped with their reason, nothing is re-derived here.

Memory per rank (the fullest pipeline rank):
- parameters (fp32), gradients (fp32) and AdamW's two moments: exact, from the real model's shapes after tensor
  parallel (built on meta on a fake process group of tp ranks, once per tp degree) cut into this rank's pipeline
  stages (plan_run's PipelinePlan) and sharded on dim 0 over dp_shard x cp as FSDP2 does (rank 0's chunk is the
  largest). A test checks this against the fully parallelized model.
- activations: what one microbatch's blocks save (trainer.dry_run.activation_bytes for the AC mode and the rank's
  layers) times the microbatches in flight on that rank under its schedule, plus the larger of backward's two
  peaks: at the loss (logits, fp32 log-probabilities and their gradients) or in a checkpointed block (recomputed,
  with its gradients). Checked against a counted forward and backward on fake tensors (tests/unit/test_planner.py).
- communication buffers: FSDP's all-gathered blocks in the compute dtype (current and prefetched, or all of them
  when blocks stay unsharded between forward and backward), its reduce-scatter inputs in the reduce dtype, the root
  module (embedding, norm, output) kept unsharded through the step, and under PP the unsharded gradients FSDP
  accumulates until the step's one reduce-scatter; sequence-parallel, ring-attention and pipeline send/receive
  buffers.
- framework overhead: per device profile (trainer/device_profiles.py).

Speed: trainer/cost_model.py. The printed table and the command line: trainer/plan_report.py.
"""

import copy
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from trainer.build import build_model, model_args_for, plan_run, state_bytes_per_element
from trainer.config import ConfigError, JobConfig, validate
from trainer.cost_model import StepShape, recompute_factor, step_seconds
from trainer.device_profiles import GiB, DeviceProfile, device_profile
from trainer.models.llama import flops_per_token, num_params
from trainer.torch_private import init_fake_process_group

SCHEDULES = ("1F1B", "Interleaved1F1B", "ZBVZeroBubble", "GPipe")
AC_MODES = ("none", "selective", "full")
MEMORY_PARTS = ("params", "grads", "optimizer", "activations", "comm", "overhead")
_P = "parallelism."


@dataclass(frozen=True, order=True)
class Layout:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    schedule: str = ""
    microbatch_size: int = 0
    ac_mode: str = "none"
    reshard: str = "default"
    local_batch: int = 1
    cp_replicate: bool = False
    """parallelism.context_parallel_replicate_parameters: the model replicated over cp by DDP, not sharded by FSDP2."""

    def overrides(self) -> dict[str, object]:
        """The config keys that select this layout."""
        keys = {_P + "data_parallel_replicate_degree": self.dp_replicate,
                _P + "data_parallel_shard_degree": self.dp_shard, _P + "context_parallel_degree": self.cp,
                _P + "tensor_parallel_degree": self.tp,
                _P + "pipeline_parallel_degree": self.pp, _P + "fsdp_reshard_after_forward": self.reshard,
                "activation_checkpoint.mode": self.ac_mode, "training.local_batch_size": self.local_batch}
        if self.pp > 1:
            keys[_P + "pipeline_parallel_schedule"] = self.schedule
            keys[_P + "pipeline_parallel_microbatch_size"] = self.microbatch_size
        if self.cp > 1:
            keys[_P + "context_parallel_replicate_parameters"] = self.cp_replicate
        return keys

    def describe(self) -> str:
        degrees = " x ".join(f"{n} {v}" for n, v in (("dp_rep", self.dp_replicate), ("dp_shard", self.dp_shard),
                                                       ("cp", self.cp), ("tp", self.tp), ("pp", self.pp)) if v > 1)
        return (degrees or "1 rank") + (" (cp replicated)" if self.cp_replicate else "")


def with_overrides(cfg: JobConfig, overrides: dict[str, object]) -> JobConfig:
    """`cfg` with `overrides` ({"section.key": value}) set, `cfg` left alone: the sections overridden are copied,
    the others shared (validate and plan_run only read a config; a deep copy per layout was a third of planning
    405B on 128 ranks)."""
    cfg = copy.copy(cfg)
    copied = set()
    for key, value in overrides.items():
        section, name = key.split(".")
        if section not in copied:
            setattr(cfg, section, copy.copy(getattr(cfg, section)))
            copied.add(section)
        setattr(getattr(cfg, section), name, value)
    return cfg


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _factorizations(n: int, k: int) -> list[tuple[int, ...]]:
    if k == 1:
        return [(n,)]
    return [(d, *rest) for d in _divisors(n) for rest in _factorizations(n // d, k - 1)]


def enumerate_layouts(cfg: JobConfig, world_size: int, ac_modes=AC_MODES) -> list[Layout]:
    """Every combination of the layout keys for `world_size` ranks (valid or not: plan() asks plan_run)."""
    out = []
    g = cfg.training.global_batch_size
    for dp_rep, dp_shard, cp, tp, pp in _factorizations(world_size, 5):
        dp = dp_rep * dp_shard
        batches = _divisors(g // dp) if g != -1 and g % dp == 0 else [cfg.training.local_batch_size]
        reshards = ("default", "always" if pp > 1 else "never") if dp_shard * cp > 1 else ("default",)
        for b in batches:
            pipes = [(s, m) for s in SCHEDULES for m in _divisors(b)] if pp > 1 else [("", 0)]
            for (schedule, mb), ac, reshard in ((p, a, r) for p in pipes for a in ac_modes for r in reshards):
                out.append(Layout(dp_rep, dp_shard, cp, tp, pp, schedule, mb, ac, reshard, b))
            if cp > 1 and dp_shard * tp * pp == 1:  # or the model replicated over cp, with DDP (no reshard policy)
                out += [Layout(dp_rep, 1, cp, 1, 1, ac_mode=ac, local_batch=b, cp_replicate=True) for ac in ac_modes]
    return out


@dataclass
class Estimate:
    layout: Layout
    memory: dict[str, int]
    """Bytes per part on the fullest rank (MEMORY_PARTS), and "total"."""
    seconds: dict[str, float]
    tokens_per_second: float
    """Per device."""
    mfu: float
    accum_steps: int
    local_elements: list[int]
    """Parameter elements each pipeline rank holds (one entry without PP)."""
    memory_per_rank: list[dict[str, int]] = field(default_factory=list)
    """`memory` of each pipeline rank (one entry without PP)."""


class _ParamShapes:
    """Parameter shapes after tensor parallel, per tp degree, from the real model built on meta."""

    def __init__(self, cfg: JobConfig, target: str):
        self.cfg, self.target, self.cache, self.modules = cfg, target, {}, {}

    def by_module(self, tp: int) -> dict[str, dict[str, tuple[int, ...]]]:
        """The shapes grouped by module (layers.N, tok_embeddings, ...): a pipeline rank takes its modules' groups
        instead of testing every name against its modules (405B on 128 ranks: 126 ranks x 1,100 names per layout)."""
        if tp not in self.modules:
            self.modules[tp] = {}
            for name, shape in self(tp).items():
                self.modules[tp].setdefault(_module_of(name), {})[name] = shape
        return self.modules[tp]

    def __call__(self, tp: int) -> dict[str, tuple[int, ...]]:
        if tp not in self.cache:
            c = with_overrides(self.cfg, {**Layout(1, 1, 1, tp, 1).overrides(), "training.global_batch_size": -1,
                                          "compile.enable": False})
            plan = plan_run(c, tp, self.target)
            owns_group = tp > 1 and not dist.is_initialized()
            if owns_group:
                init_fake_process_group(rank=0, world_size=tp)
            try:
                if tp > 1:
                    plan.dims.build_mesh("cpu")
                model = build_model(plan, torch.device("cpu"), init=False).parts[0]
            finally:
                if owns_group:
                    dist.destroy_process_group()
            self.cache[tp] = {name: tuple((p.to_local() if isinstance(p, DTensor) else p).shape)
                              for name, p in model.named_parameters(remove_duplicate=False)}
        return self.cache[tp]


@dataclass(frozen=True)
class _Stage:
    """What the parameters a pipeline rank holds (or the whole model's, without PP) add up to, in elements."""
    local: int  # on this rank after FSDP's dim-0 sharding (rank 0's chunk, the largest)
    unsharded: int
    blocks: int  # transformer blocks held
    block: int  # the largest block
    root: int  # outside the blocks (embedding, final norm, output)
    output: bool  # holds the output projection
    weight: int  # every parameter but the embedding's (the FLOPs' share)


def _stage(shapes: dict[str, tuple[int, ...]], fsdp_n: int) -> _Stage:
    blocks = Counter()
    for n, s in shapes.items():
        if n.startswith("layers."):
            blocks[_module_of(n)] += math.prod(s)
    unsharded = sum(math.prod(s) for s in shapes.values())
    return _Stage(local=sum(-(-s[0] // fsdp_n) * math.prod(s[1:]) for s in shapes.values()),
                  unsharded=unsharded, blocks=len(blocks), block=max(blocks.values(), default=0),
                  root=unsharded - sum(blocks.values()), output=any(n.startswith("output") for n in shapes),
                  weight=sum(math.prod(s) for n, s in shapes.items() if not n.startswith("tok_embeddings")))


def _module_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def _in_flight(schedule: str, n_mb: int, pp: int, v: int, r: int) -> float:
    """Microbatches whose activations pp rank `r` holds at its peak, in units of all its layers' worth."""
    if not schedule:
        return 1
    if schedule in ("GPipe", "LoopedBFS"):
        return n_mb
    if schedule == "1F1B":
        return min(n_mb, pp - r)
    if schedule in ("ZBVZeroBubble", "DualPipeV"):
        return min(n_mb, pp)
    return min(n_mb * v, (v - 1) * pp + 2 * (pp - 1 - r) + 1) / v  # interleaved: stage-microbatches of 1/v each


class Planner:
    """Memory and speed of layouts of one config on one device kind."""

    def __init__(self, cfg: JobConfig, world_size: int, device: str, gpus_per_node: int):
        self.cfg, self.world_size, self.gpus_per_node = cfg, world_size, gpus_per_node
        self.target = "cpu" if device == "cpu" else "cuda"
        self.device: DeviceProfile = device_profile(device, world_size)
        self.shapes = _ParamShapes(cfg, self.target)
        self._stages: dict[tuple, _Stage] = {}

    def stage(self, tp: int, modules: frozenset[str] | None, fsdp_n: int, tied: bool) -> _Stage:
        """The parameters of the pipeline rank holding `modules` (None: the whole model) at tp degree `tp`, sharded
        over `fsdp_n` ranks; computed once per distinct argument (5,400 layouts of 405B on 128 ranks share ~100)."""
        key = (tp, modules, fsdp_n, tied)
        if key not in self._stages:
            if modules is None:
                mine = dict(self.shapes(tp))
                if tied:
                    mine.pop("output.weight", None)  # one matrix when one rank holds both ends
            else:
                mine = {n: s for m in modules for n, s in self.shapes.by_module(tp).get(m, {}).items()}
            self._stages[key] = _stage(mine, fsdp_n)
        return self._stages[key]

    @staticmethod
    def _activations(args, layout: Layout, tokens: int, pbytes: int, n_layers: int, output: bool, option: str,
                     loss_parallel: bool, in_flight: float) -> int:
        """Peak activation bytes of a rank holding `n_layers` blocks (and the output), `in_flight` microbatches of
        `tokens` tokens saved at once. The peak is the larger of two moments of the last microbatch's backward:
        the loss's (the saved logits in the compute dtype and fp32 log-probabilities, their two fp32 gradients and
        the gradient cast back) and a checkpointed block's (recomputed in full, beside the logits the step keeps)."""
        from trainer.dry_run import activation_bytes

        kept = activation_bytes(args, tokens, pbytes, layout.tp, n_layers=n_layers, logits=False,
                                ac_mode=layout.ac_mode, selective_ac_option=option)
        block = activation_bytes(args, tokens, pbytes, layout.tp, n_layers=1, logits=False)
        checkpointed = layout.ac_mode == "full" or (layout.ac_mode == "selective" and option != "op"
                                                    and n_layers >= int(option))
        recompute = block if checkpointed and n_layers else 0
        saved = in_flight * (kept - recompute)
        logits = tokens * args.vocab_size // (layout.tp if loss_parallel else 1) if output else 0
        # bf16: the logits, their fp32 copy, two fp32 gradients and the gradient cast back, 16 bytes per logit. fp32:
        # .float() is the logits themselves, 12 bytes (a 1-rank AC-full run at seq 2048 peaks at 12, not 16).
        at_loss = logits * (pbytes + 8 + (4 + pbytes if pbytes < 4 else 0))
        in_block = recompute + logits * pbytes
        return int(saved + max(at_loss, in_block))

    def estimate(self, layout: Layout) -> Estimate:
        """ConfigError when plan_run refuses the layout."""
        cfg = with_overrides(self.cfg, layout.overrides())
        validate(cfg)
        plan = plan_run(cfg, self.world_size, self.target)
        args, pp_plan = plan.model_args, plan.pp_plan
        fsdp_n = layout.dp_shard * layout.cp if plan.dims.fsdp_enabled else 1  # DDP replicates over cp too
        pbytes = plan.param_dtype.itemsize
        rbytes = getattr(torch, cfg.training.mixed_precision_reduce).itemsize if plan.dims.fsdp_enabled else 4
        seq = cfg.training.seq_len
        mb = layout.microbatch_size if pp_plan else layout.local_batch
        n_mb = layout.local_batch // mb
        mb_tokens = mb * seq // layout.cp
        kv_dim = args.kv_dim
        ac = cfg.activation_checkpoint
        total_weight = self.stage(layout.tp, None, 1, False).weight
        worst, worst_weight, worst_layers, worst_local, worst_unsharded = None, 0, 1, 0, 0
        per_rank, memory_per_rank = [], []
        for r in range(layout.pp):
            stage_ids = pp_plan.stage_ids(r) if pp_plan else [0]
            modules = frozenset(m for s in stage_ids for m in pp_plan.modules_per_stage[s]) if pp_plan else None
            held = self.stage(layout.tp, modules, fsdp_n, modules is None and args.tie_word_embeddings)
            local, unsharded, block = held.local, held.unsharded, held.block
            per_rank.append(local)
            act = self._activations(args, layout, mb_tokens, pbytes, held.blocks, held.output, ac.selective_ac_option,
                                    plan.dims.loss_parallel_enabled,
                                    _in_flight(pp_plan.schedule if pp_plan else "", n_mb, layout.pp,
                                               len(stage_ids), r))
            reshard = {"always": True, "never": False, "default": layout.pp == 1}[layout.reshard]
            comm = 0
            if plan.dims.fsdp_enabled:
                gathered = 2 * block if reshard else held.blocks * block
                comm += (gathered + held.root) * pbytes + 2 * block * rbytes
                if pp_plan:
                    # torch's pipeline stages turn FSDP's gradient sync off for every backward and reduce-scatter
                    # once after the last (PipelineStage.perform_reduce_grad): each stage accumulates its gradients
                    # unsharded, in the reduce dtype, from its first backward to the end of the step.
                    comm += unsharded * rbytes
            elif pbytes < 4:
                comm += unsharded * pbytes  # autocast's cached low-precision copies of the weights
            comm += (2 * mb_tokens * args.dim * pbytes if layout.tp > 1 else 0) + \
                (4 * mb_tokens * kv_dim // layout.tp * pbytes if layout.cp > 1 else 0) + \
                (2 * mb_tokens * args.dim * pbytes * len(stage_ids) if pp_plan else 0)
            state = state_bytes_per_element(plan)
            memory = {"params": local * state["parameters"], "grads": local * state["gradients"],
                      "optimizer": local * state["optimizer"], "activations": int(act),
                      "comm": comm, "overhead": self.device.overhead_bytes}
            memory["total"] = sum(memory.values())
            memory_per_rank.append(memory)
            if worst is None or memory["total"] > worst["total"]:
                worst = memory
            if held.weight > worst_weight:
                worst_weight, worst_layers, worst_local, worst_unsharded = held.weight, max(1, held.blocks), local, \
                    unsharded
        tokens = layout.local_batch * seq
        flops = flops_per_token(args, seq) * tokens / (layout.tp * layout.cp) * worst_weight / total_weight
        shape = StepShape(layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp, layout.pp,
                          pp_plan.schedule if pp_plan else None, len(pp_plan.stage_ids(0)) if pp_plan else 1,
                          n_mb, plan.accum_steps, tokens // layout.cp, flops,
                          recompute_factor(layout.ac_mode, ac.selective_ac_option, args), worst_unsharded * pbytes,
                          worst_unsharded * rbytes, worst_local,
                          {"always": True, "never": False, "default": layout.pp == 1}[layout.reshard],
                          worst_layers, args.dim, kv_dim, pbytes, plan.dims.ddp_enabled)
        seconds = step_seconds(shape, self.device, self.gpus_per_node)
        tps = plan.tokens_per_step / seconds["total"] / self.world_size
        mfu = flops_per_token(args, seq) * tps / self.device.peak_flops
        return Estimate(layout, worst, seconds, tps, mfu, plan.accum_steps, per_rank, memory_per_rank)


def _reason(error: ConfigError) -> str:
    """The config key a ConfigError names first: its drop reason."""
    m = re.match(r"([a-z_]+(?:\.[a-z_]+)?)", str(error))
    return m.group(1) if m else str(error)[:40]


@dataclass
class PlanResult:
    fits: list[Estimate]
    oom: list[Estimate]
    dropped: Counter = field(default_factory=Counter)
    """Reason (the config key a refusal names) -> layouts refused for it."""
    examples: dict[str, str] = field(default_factory=dict)


def plan(cfg: JobConfig, world_size: int, device: str, gpus_per_node: int, ac_modes=AC_MODES,
         planner: Planner | None = None) -> PlanResult:
    """Every layout for `world_size` ranks, split into those that fit (fastest first; ties in a fixed order), those
    that do not (leanest first), and counts of the refused ones by reason."""
    planner = planner or Planner(cfg, world_size, device, gpus_per_node)
    result = PlanResult([], [])
    for layout in enumerate_layouts(cfg, world_size, ac_modes):
        try:
            est = planner.estimate(layout)
        except ConfigError as e:
            reason = _reason(e)
            result.dropped[reason] += 1
            result.examples.setdefault(reason, str(e))
            continue
        (result.fits if est.memory["total"] <= planner.device.memory_bytes else result.oom).append(est)
    result.fits.sort(key=lambda e: (-round(e.tokens_per_second, 6), e.memory["total"], e.layout))
    result.oom.sort(key=lambda e: (e.memory["total"], e.layout))
    return result


def smallest_fitting_world(cfg: JobConfig, world_size: int, device: str, gpus_per_node: int,
                           limit: int = 16384) -> int | None:
    """The fewest ranks above `world_size` (powers of two and whole nodes) on which some layout fits."""
    candidates = sorted({n for n in range(world_size + 1, limit + 1)
                         if n & (n - 1) == 0 or n % gpus_per_node == 0})
    dev = device_profile(device, world_size)
    # Parameters and AdamW's two moments in training.dtype (gradients may be freed early): a lower bound.
    states = 3 * (2 if cfg.training.dtype == "bfloat16" else 4) * num_params(model_args_for(cfg))
    for n in candidates:
        # Every rank holds at least its share of the training state: skip what cannot fit without planning it.
        if states / n > device_profile(device, n).memory_bytes - dev.overhead_bytes:
            continue
        if plan(cfg, n, device, gpus_per_node, ac_modes=("full",)).fits:
            return n
    return None


def no_fit_error(cfg: JobConfig, result: PlanResult, world_size: int, device: str, gpus_per_node: int) -> str:
    """The one line for a model that fits no layout."""
    dev = device_profile(device, world_size)
    smallest = smallest_fitting_world(cfg, world_size, device, gpus_per_node)
    leanest = (f"; the leanest layout ({result.oom[0].layout.describe()}, AC {result.oom[0].layout.ac_mode}) needs "
               f"{result.oom[0].memory['total'] / GiB:.1f} GiB on its fullest rank" if result.oom else "")
    return (f"{cfg.model.name} {cfg.model.flavor} at seq_len {cfg.training.seq_len} fits no layout on {world_size} "
            f"x {device} ({dev.memory_bytes / GiB:.1f} GiB each){leanest}; "
            + (f"the smallest NGPU that fits is {smallest}" if smallest else "no NGPU up to 16384 fits"))

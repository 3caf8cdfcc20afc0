"""Pipeline parallelism: the Llama split into stages from the outside, run by a torch.distributed.pipelining schedule.

Every rank builds only the stages it runs. The full model exists on the meta device; a stage is a deepcopy of it
that drops what it does not own (tok_embeddings / norm / output set to None, `del layers[k]`). Layer keys keep
their names, so init by (seed, name) and checkpoints see the unsplit model's names. Each stage's model part is
then parallelized on its own (TP -> ... -> FSDP) and wrapped in a PipelineStage, which infers the shapes it
sends and receives on the first step.

Stage layout (torchtitan's rule): the embedding counts as `pipeline_parallel_first_stage_less_layers` layers of
work and norm + output as `..._last_stage_less_layers`; the work is split as evenly as it goes, earlier stages
taking the remainder. Single-stage schedules give each rank one stage; looped ones give rank r the stages
r, r + pp, ...; V-shaped ones (ZBVZeroBubble, DualPipeV) give rank r the stages r and 2 pp - 1 - r.

A schedule from a CSV file (pipeline_parallel_schedule_csv, with pipeline_parallel_schedule PipelineScheduleSingle
or PipelineScheduleMulti, as in torchtitan) lays out its stages like a single-stage or a looped schedule and runs
the file's order through torch's runtime. The file is checked against the plan before anything is built: one row
per pp rank, each stage on the rank the plan puts it, each microbatch once forward and once backward per stage.

Validation runs the same schedule forward only (`Pipeline.evaluate`), with a loss of its own passed in.

Loss: the schedule calls loss_fn on each microbatch's logits on the last stage. We divide it by the number of
microbatches and pass scale_grads=False, so the microbatch losses sum to the local-batch mean and the gradients
are those of the unsplit model without any rescaling.

Tied embeddings (SmolLM): the first stage's tok_embeddings.weight and the last stage's output.weight are two
copies of one matrix. After backward their gradients are summed (all-reduce between the two ranks, or a local
add when one rank holds both ends of a V), so both copies take identical optimizer steps; the last stage's copy
is left out of the gradient norm, which must count the shared matrix once.
"""

import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (PipelineScheduleSingle, ScheduleDualPipeV, ScheduleZBVZeroBubble,
                                                    get_schedule_class)

from trainer.config import ConfigError
from trainer.parallel_dims import ParallelDims
from trainer.torch_private import check_schedule_actions, csv_schedule, forward_only_order, read_schedule_csv

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "LoopedBFS", "InterleavedZeroBubble", "ZBVZeroBubble", "DualPipeV")
# The schedule names that take their order from pipeline_parallel_schedule_csv (and only from it).
CSV_SCHEDULES = ("PipelineScheduleSingle", "PipelineScheduleMulti")
_KEY = "parallelism.pipeline_parallel"


@dataclass
class PipelinePlan:
    """Which modules each stage holds, which stages each pp rank runs, and the microbatch count: config only."""

    schedule: str
    """Canonical schedule name, one of SCHEDULES."""
    modules_per_stage: list[list[str]]
    pp: int
    n_microbatches: int
    csv: str | None = None
    """The schedule's CSV file (schedule is then one of CSV_SCHEDULES); None for a named schedule."""

    @property
    def n_stages(self) -> int:
        return len(self.modules_per_stage)

    @property
    def v_style(self) -> bool:
        return self.schedule in ("ZBVZeroBubble", "DualPipeV")

    def stage_ids(self, pp_rank: int) -> list[int]:
        """The stages `pp_rank` runs, in the order the schedule expects them."""
        if self.v_style:
            return [pp_rank, self.n_stages - 1 - pp_rank]
        return list(range(pp_rank, self.n_stages, self.pp))

    @property
    def last_stage_rank(self) -> int:
        """The pp rank that holds the last stage, where the loss is computed."""
        return 0 if self.v_style else (self.n_stages - 1) % self.pp

    def describe(self) -> str:
        """One line: schedule, counts, and each stage's modules (layer runs compressed as layers.a-b)."""
        stages = " | ".join(f"{i}: {_compress(m)}" for i, m in enumerate(self.modules_per_stage))
        source = f" from {self.csv}" if self.csv else ""
        return (f"pipeline {self.schedule}{source}: {self.n_stages} stages ({self.n_stages // self.pp} per rank), "
                f"{self.n_microbatches} microbatches per step; stages {stages}")


def _compress(modules: list[str]) -> str:
    """["tok_embeddings", "layers.0", "layers.1", "layers.2"] -> "tok_embeddings, layers.0-2"."""
    layers = [m for m in modules if m.startswith("layers.")]
    if len(layers) > 1:
        span = f"{layers[0]}-{layers[-1].removeprefix('layers.')}"
        modules = [span if m == layers[0] else m for m in modules if m not in layers[1:]]
    return ", ".join(modules)


def _schedule_class(name: str, csv: str | None) -> type:
    try:
        cls = get_schedule_class(name)
    except ValueError:
        cls = None
    canonical = cls and cls.__name__.removeprefix("Schedule")
    if csv and canonical not in CSV_SCHEDULES:
        raise ConfigError(f"{_KEY}_schedule = {name!r} with {_KEY}_schedule_csv = {csv!r}: a CSV schedule runs as "
                          f"{' or '.join(CSV_SCHEDULES)} (one stage per rank, or looped); set one of them")
    if not csv and canonical in CSV_SCHEDULES:
        raise ConfigError(f"{_KEY}_schedule = {name!r} runs a schedule from a CSV file; set {_KEY}_schedule_csv "
                          f"to one, or use one of {', '.join(SCHEDULES)}")
    if not csv and canonical not in SCHEDULES:
        raise ConfigError(f"{_KEY}_schedule = {name!r} is not one of {', '.join(SCHEDULES)}")
    return cls


def check_schedule_csv(path: str, plan: "PipelinePlan") -> None:
    """ConfigError unless the CSV at `path` runs `plan`: a row per pp rank, the plan's stages on the plan's ranks,
    and every microbatch of every stage once forward and once backward (B, or I then W)."""
    key = f"{_KEY}_schedule_csv = {path!r}"
    try:
        actions = read_schedule_csv(path)
    except FileNotFoundError:
        raise ConfigError(f"{key} does not exist; point it at a schedule CSV (see tests/assets/pipeline)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{key} is not a schedule CSV ({e}); write one action per cell, such as 0F1 or 2B3")
    if len(actions) != plan.pp:
        raise ConfigError(f"{key} has {len(actions)} rows but pipeline_parallel_degree is {plan.pp}; write one row "
                          f"per pipeline rank")
    flat = [(rank, a) for rank, row in actions.items() for action in row if action is not None
            for a in (action.sub_actions or (action,))]
    for rank, a in flat:
        if not 0 <= a.stage_index < plan.n_stages:
            raise ConfigError(f"{key}: rank {rank} runs stage {a.stage_index}, but the plan has {plan.n_stages} "
                              f"stages ({plan.n_stages // plan.pp} per rank); write stages 0 to {plan.n_stages - 1}")
        if a.stage_index not in plan.stage_ids(rank):
            raise ConfigError(f"{key}: rank {rank} runs stage {a.stage_index}, but {plan.schedule} places it on "
                              f"rank {a.stage_index % plan.pp}; stage s runs on rank s mod {plan.pp}")
        if a.computation_type.value not in ("F", "B", "I", "W"):
            raise ConfigError(f"{key}: rank {rank} runs {a}; write compute actions only (F, B, I, W: torch's runtime "
                              f"adds the sends, receives and FSDP unshard/reshard)")
        if a.microbatch_index is None or not 0 <= a.microbatch_index < plan.n_microbatches:
            raise ConfigError(f"{key}: rank {rank} runs {a}, but a step has {plan.n_microbatches} microbatches "
                              f"(training.local_batch_size / {_KEY}_microbatch_size); number them 0 to "
                              f"{plan.n_microbatches - 1}")
    seen = [str(a) for _, a in flat]
    if len(seen) != len(set(seen)):
        twice = next(a for a in seen if seen.count(a) > 1)
        raise ConfigError(f"{key} runs {twice} twice; run each action once")
    missing = sorted({s for s in range(plan.n_stages)} - {a.stage_index for _, a in flat})
    if missing:
        raise ConfigError(f"{key} never runs stage {missing[0]} of the plan's {plan.n_stages} ({plan.schedule} at "
                          f"pipeline_parallel_degree {plan.pp}); write actions for stages 0 to {plan.n_stages - 1} "
                          f"or change the stage count ({_KEY}_layers_per_stage)")
    for stage in range(plan.n_stages):
        forwards = sum(a.stage_index == stage and a.computation_type.value == "F" for _, a in flat)
        if forwards != plan.n_microbatches:
            raise ConfigError(f"{key} runs stage {stage} forward on {forwards} microbatches, but a step has "
                              f"{plan.n_microbatches} (training.local_batch_size / {_KEY}_microbatch_size); "
                              f"run each one")
    try:
        check_schedule_actions(actions, plan.pp, plan.n_stages, plan.n_microbatches)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}; run every microbatch forward, then backward, on every stage") from None


def split_evenly(n_stages: int, n_layers: int, first_less: int, last_less: int) -> list[list[str]]:
    """Module names per stage: n_layers + first_less + last_less units of work over n_stages, the embedding
    taking first_less units of stage 0 and norm + output last_less units of the last stage."""
    units = n_layers + first_less + last_less
    if n_stages > units:
        raise ConfigError(f"parallelism: {n_stages} pipeline stages but the model has only {n_layers} layers "
                          f"(+ {first_less} + {last_less} for embedding and output); use fewer stages "
                          f"(pipeline_parallel_degree, _layers_per_stage, or a single-stage schedule)")
    base, extra = divmod(units, n_stages)
    stages, next_layer = [], 0
    for s in range(n_stages):
        first, last = s == 0, s == n_stages - 1
        n = base + (s < extra) - (first_less if first else 0) - (last_less if last else 0)
        if n < 0:
            which = "first" if first else "last"
            raise ConfigError(f"{_KEY}_{which}_stage_less_layers = {first_less if first else last_less} is more "
                              f"than the {which} stage's share of {base + (s < extra)} layers ({n_layers} layers over "
                              f"{n_stages} stages); lower it")
        stages.append((["tok_embeddings"] if first else []) + [f"layers.{i}" for i in range(next_layer, next_layer + n)]
                      + (["norm", "output"] if last else []))
        next_layer += n
    return stages


def _check_explicit(stages: list[list[str]], n_layers: int) -> None:
    expected = ["tok_embeddings", *(f"layers.{i}" for i in range(n_layers)), "norm", "output"]
    flat = [m for stage in stages for m in stage]
    unknown = [m for m in flat if m not in expected]
    missing = [m for m in expected if m not in flat]
    if unknown:
        problem = f"unknown module {unknown[0]!r}"
    elif missing:
        problem = f"{missing[0]!r} is missing"
    elif len(flat) != len(set(flat)):
        problem = "a module is listed twice"
    elif not all(stages):
        problem = f"stage {[bool(s) for s in stages].index(False)} is empty"
    elif flat != expected:
        problem = f"{next(a for a, b in zip(flat, expected) if a != b)!r} is out of order"
    else:
        return
    raise ConfigError(f"parallelism.module_fqns_per_model_part: {problem}; list tok_embeddings, layers.0 ... "
                      f"layers.{n_layers - 1}, norm, output once each, in that order, over non-empty stages")


def plan_pipeline(parallelism, local_batch_size: int, n_layers: int) -> PipelinePlan:
    """Check the pipeline keys against the model's depth and the batch (ConfigError one-liners) and plan stages."""
    p, pp = parallelism, parallelism.pipeline_parallel_degree
    csv = p.pipeline_parallel_schedule_csv or None
    cls = _schedule_class(p.pipeline_parallel_schedule, csv)
    name = cls.__name__.removeprefix("Schedule")
    single, v_style = issubclass(cls, PipelineScheduleSingle), cls in (ScheduleZBVZeroBubble, ScheduleDualPipeV)
    first_less, last_less = p.pipeline_parallel_first_stage_less_layers, p.pipeline_parallel_last_stage_less_layers
    if p.module_fqns_per_model_part is not None:
        n_stages, why = len(p.module_fqns_per_model_part), "parallelism.module_fqns_per_model_part lists"
    elif p.pipeline_parallel_layers_per_stage is not None:
        lps = p.pipeline_parallel_layers_per_stage
        n_stages = -(-(n_layers + first_less + last_less) // lps)
        why = f"{_KEY}_layers_per_stage = {lps} over {n_layers} layers (+ {first_less} + {last_less}) makes"
    else:
        n_stages, why = pp * (1 if single else 2), f"{name} at pp = {pp} uses"
    per_rank, need = n_stages // pp, ("1" if single else "exactly 2" if v_style else "at least 2")
    fits = per_rank == 1 if single else per_rank == 2 if v_style else per_rank >= 2
    if n_stages % pp or not fits:
        raise ConfigError(f"{why} {n_stages} stages, but {_KEY}_schedule = {name!r} needs {need} per "
                          f"rank at pipeline_parallel_degree = {pp}; change the schedule or the stage count")
    if p.module_fqns_per_model_part is not None:
        _check_explicit(p.module_fqns_per_model_part, n_layers)
        modules = [list(stage) for stage in p.module_fqns_per_model_part]
    else:
        modules = split_evenly(n_stages, n_layers, first_less, last_less)

    n_mb = local_batch_size // p.pipeline_parallel_microbatch_size
    counts = (f"training.local_batch_size {local_batch_size} / {_KEY}_microbatch_size "
              f"{p.pipeline_parallel_microbatch_size} = {n_mb} microbatches")
    if name in ("1F1B", "DualPipeV") and n_mb < n_stages:
        raise ConfigError(f"{_KEY}_schedule = {name!r} needs at least one microbatch per stage ({n_stages}), but "
                          f"{counts}; raise local_batch_size or lower the microbatch size")
    rounds = max(1, n_mb // pp)
    if name in ("Interleaved1F1B", "InterleavedZeroBubble") and n_mb % rounds:
        raise ConfigError(f"{_KEY}_schedule = {name!r} needs the microbatch count to be below "
                          f"pipeline_parallel_degree {pp} or a multiple of {rounds} rounds, but {counts}; "
                          f"use a multiple of {pp}")
    plan = PipelinePlan(name, modules, pp, n_mb, csv)
    if csv:
        check_schedule_csv(csv, plan)
    return plan


def split_model(model: nn.Module, modules: list[str]) -> nn.Module:
    """A copy of the (meta) Transformer that keeps only `modules`; layer keys keep their names."""
    part = copy.deepcopy(model)
    for name in ("tok_embeddings", "norm", "output"):
        if name not in modules:
            setattr(part, name, None)
    for key in list(part.layers.keys()):
        if f"layers.{key}" not in modules:
            del part.layers[key]
    return part


@dataclass
class Pipeline:
    """This rank's share of the pipeline: a model part per stage it runs, and the schedule that drives them."""

    plan: PipelinePlan
    schedule: object
    """The torch schedule (PipelineScheduleSingle or PipelineScheduleMulti): `step` runs one local batch."""
    model_parts: list[nn.Module]
    stage_ids: list[int]
    group: dist.ProcessGroup
    """The pp group, over which the loss is broadcast from `plan.last_stage_rank`."""
    tied: bool
    """Whether the first stage's embedding and the last stage's output share one matrix (tied embeddings)."""
    tied_group: dist.ProcessGroup | None
    """The group joining the first and last stage ranks at this data/tensor coordinate; None when not needed."""

    @property
    def has_first_stage(self) -> bool:
        return 0 in self.stage_ids

    @property
    def has_last_stage(self) -> bool:
        return self.plan.n_stages - 1 in self.stage_ids

    # Parameters are looked up when used: materializing a meta model (to_empty) replaces the Parameter objects.
    @property
    def tied_copies(self) -> list[nn.Parameter]:
        """This rank's copies of the tied embedding/output matrix: none, one, or both ends of a V."""
        ends = dict(zip(self.stage_ids, self.model_parts)) if self.tied else {}
        last = self.plan.n_stages - 1
        return ([ends[0].tok_embeddings.weight] if 0 in ends else []) + \
            ([ends[last].output.weight] if last in ends else [])

    @property
    def norm_skip(self) -> list[nn.Parameter]:
        """Parameters another stage already counts in the gradient norm: the last stage's tied copy."""
        return self.tied_copies[-1:] if self.tied and self.has_last_stage else []

    @torch.no_grad()
    def evaluate(self, inputs: torch.Tensor, labels: torch.Tensor, loss_fn: Callable, **kwargs) -> torch.Tensor | None:
        """Run one local batch forward through the schedule (no backward, no gradients) and return the sum of
        `loss_fn(logits, labels)` over its microbatches on the rank holding the last stage, None on the others.
        `kwargs` (document ids) are cut into microbatches with the tokens and reach every stage, as in training.

        The schedule's own `eval`: torch re-infers the stages' shapes on each switch between training and
        evaluation, so the validation batch may have another sequence length (its size must still split into the
        training's microbatch count). Runtime schedules run the forward half of their order (forward_only_order).
        """
        losses: list[torch.Tensor] = []
        with forward_only_order(self.schedule):
            self.schedule.eval(*([inputs] if self.has_first_stage else []),
                               target=labels if self.has_last_stage else None, losses=losses,
                               loss_kwargs={"evaluation_loss": loss_fn}, return_outputs=False, **kwargs)
        return torch.stack(losses).sum() if self.has_last_stage else None

    @torch.no_grad()
    def sync_tied_grads(self) -> None:
        """Sum the two copies' gradients of a tied embedding/output matrix, so both copies step alike."""
        grads = [p.grad for p in self.tied_copies if p.grad is not None]
        if len(grads) == 2:  # one rank holds both ends of a V
            grads[0].add_(grads[1])
            grads[1].copy_(grads[0])
        elif grads and self.tied_group is not None:
            local = grads[0].to_local() if hasattr(grads[0], "to_local") else grads[0]
            dist.all_reduce(local, group=self.tied_group)


def _first_last_group(dims: ParallelDims, plan: PipelinePlan) -> dist.ProcessGroup | None:
    """A group of the two ranks holding stage 0 and the last stage, one per data/tensor coordinate."""
    if plan.v_style:
        return None
    if dims.pp == 2:
        return dims.mesh("pp").get_group()
    grid = dims.mesh("world").mesh.reshape(dims.pp, -1)  # every rank calls new_group for every pair
    group, _ = dist.new_subgroups_by_enumeration(torch.stack([grid[0], grid[-1]], dim=1).tolist())
    return group


def build_pipeline(model: nn.Module, plan: PipelinePlan, dims: ParallelDims, device: torch.device,
                   parallelize_fn: Callable[[nn.Module], nn.Module],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Pipeline:
    """Split the meta `model` into this rank's stages, parallelize each with `parallelize_fn`, build the schedule.

    `loss_fn(logits, labels)` is the loss of one whole local batch (already divided for gradient accumulation);
    the schedule gets it divided by the number of microbatches. Weights stay on meta: init them afterwards.
    """
    pp_mesh = dims.mesh("pp")
    stage_ids = plan.stage_ids(pp_mesh.get_local_rank())
    parts = [parallelize_fn(split_model(model, plan.modules_per_stage[i])) for i in stage_ids]
    stages = [PipelineStage(part, i, plan.n_stages, device, group=pp_mesh.get_group())
              for i, part in zip(stage_ids, parts)]
    n_mb = plan.n_microbatches

    def microbatch_loss(logits: torch.Tensor, labels: torch.Tensor, evaluation_loss=None) -> torch.Tensor:
        # Pipeline.evaluate passes its own loss through the schedule's loss_kwargs.
        if evaluation_loss is not None:
            return evaluation_loss(logits, labels)
        return loss_fn(logits, labels) / n_mb

    cls = get_schedule_class(plan.schedule)
    try:
        if plan.csv:
            schedule = csv_schedule(stages, n_mb, microbatch_loss, plan.csv)
        else:
            schedule = cls(stages[0] if issubclass(cls, PipelineScheduleSingle) else stages, n_microbatches=n_mb,
                           loss_fn=microbatch_loss, scale_grads=False)
    except ValueError as e:  # a constraint of this torch version that plan_pipeline does not know yet
        raise ConfigError(f"{_KEY}_schedule = {plan.schedule!r}: {' '.join(str(e).split())}") from None

    tied = model.args.tie_word_embeddings
    tied_group = _first_last_group(dims, plan) if tied else None
    return Pipeline(plan, schedule, parts, stage_ids, pp_mesh.get_group(), tied, tied_group)

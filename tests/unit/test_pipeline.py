"""Pipeline stage planning and splitting in one process: the layout arithmetic, and that stages built on meta and
initialized on their own hold exactly the unsplit model's weights and compose to its forward."""

import dataclasses
from pathlib import Path

import pytest
import torch

from trainer.config import ConfigError
from trainer.config.job_config import Parallelism
from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer
from trainer.weights import init_weights
from trainer.parallel.pipeline import plan_pipeline, split_evenly, split_model


def _layers(a: int, b: int) -> list[str]:
    return [f"layers.{i}" for i in range(a, b)]


@pytest.mark.parametrize("n_stages,n_layers,first,last,expected", [
    (2, 6, 1, 1, [["tok_embeddings", *_layers(0, 3)], [*_layers(3, 6), "norm", "output"]]),
    (4, 6, 1, 1, [["tok_embeddings", "layers.0"], _layers(1, 3), _layers(3, 5), ["layers.5", "norm", "output"]]),
    (2, 6, 0, 0, [["tok_embeddings", *_layers(0, 3)], [*_layers(3, 6), "norm", "output"]]),
    (2, 5, 1, 1, [["tok_embeddings", *_layers(0, 3)], [*_layers(3, 5), "norm", "output"]]),  # 7 units: 4 + 3
    (3, 6, 2, 0, [["tok_embeddings", "layers.0"], _layers(1, 4), [*_layers(4, 6), "norm", "output"]]),
    (8, 6, 1, 1, [["tok_embeddings"], *[[f"layers.{i}"] for i in range(6)], ["norm", "output"]]),
])
def test_split_evenly(n_stages, n_layers, first, last, expected):
    assert split_evenly(n_stages, n_layers, first, last) == expected


def _plan(pp: int, schedule: str, local_batch: int = 4, n_layers: int = 6, **keys):
    p = dataclasses.replace(Parallelism(), pipeline_parallel_degree=pp, pipeline_parallel_schedule=schedule, **keys)
    return plan_pipeline(p, local_batch, n_layers)


def test_stage_to_rank_mapping():
    assert [_plan(2, "1F1B").stage_ids(r) for r in range(2)] == [[0], [1]]
    assert [_plan(2, "Interleaved1F1B").stage_ids(r) for r in range(2)] == [[0, 2], [1, 3]]
    assert [_plan(4, "ZBVZeroBubble", local_batch=8).stage_ids(r) for r in range(4)] == [[0, 7], [1, 6], [2, 5],
                                                                                         [3, 4]]
    assert _plan(2, "1F1B").last_stage_rank == 1 and _plan(2, "DualPipeV").last_stage_rank == 0
    assert _plan(2, "1f1b").schedule == "1F1B"  # names are case-insensitive, as in torch
    # layers_per_stage sets the stage count: (6 + 1 + 1) / 2 = 4 stages = 2 per rank for a looped schedule.
    assert _plan(2, "LoopedBFS", pipeline_parallel_layers_per_stage=2).n_stages == 4


@pytest.mark.parametrize("pp,schedule,local_batch,keys,message", [
    (2, "ZeroBubble", 4, {}, "is not one of GPipe, 1F1B, Interleaved1F1B"),
    (8, "Interleaved1F1B", 16, {}, "16 pipeline stages but the model has only 6 layers"),
    (4, "1F1B", 2, {}, "needs at least one microbatch per stage (4)"),
    (2, "DualPipeV", 2, {}, "needs at least one microbatch per stage (4)"),
    (2, "Interleaved1F1B", 5, {}, "use a multiple of 2"),
    (2, "1F1B", 4, {"pipeline_parallel_layers_per_stage": 2}, "needs 1 per rank"),
    (2, "ZBVZeroBubble", 4, {"pipeline_parallel_layers_per_stage": 1}, "needs exactly 2 per rank"),
    (2, "1F1B", 4, {"pipeline_parallel_first_stage_less_layers": 9}, "first_stage_less_layers = 9 is more"),
    (2, "1F1B", 4, {"module_fqns_per_model_part": [["tok_embeddings", "layers.1", "layers.0"],
                                                 [*_layers(2, 6), "norm", "output"]]}, "'layers.1' is out of order"),
    (2, "1F1B", 4, {"module_fqns_per_model_part": [["tok_embeddings"], ["layers.x"]]}, "unknown module"),
])
def test_bad_plan(pp, schedule, local_batch, keys, message):
    with pytest.raises(ConfigError) as e:
        _plan(pp, schedule, local_batch, **keys)
    assert message in str(e.value) and "\n" not in str(e.value)


# The shipped CSV: torch's InterleavedZeroBubble order (pipeline_order, dumped compute-only) for pp=2, 4 stages,
# 4 microbatches; stages 0 and 2 on rank 0, 1 and 3 on rank 1, backward split into input (I) and weight (W) parts.
SCHEDULE_CSV = Path(__file__).resolve().parents[1] / "assets/pipeline/zero_bubble_pp2_4stages_4mb.csv"
CSV_KEY = "parallelism.pipeline_parallel_schedule_csv"


def _csv_plan(path, schedule: str = "PipelineScheduleMulti", local_batch: int = 4, pp: int = 2):
    return _plan(pp, schedule, local_batch, pipeline_parallel_schedule_csv=str(path))


def test_csv_schedule_plan():
    plan = _csv_plan(SCHEDULE_CSV)
    assert (plan.schedule, plan.n_stages, plan.n_microbatches, plan.csv) == ("PipelineScheduleMulti", 4, 4,
                                                                             str(SCHEDULE_CSV))
    assert [plan.stage_ids(r) for r in range(2)] == [[0, 2], [1, 3]] and plan.last_stage_rank == 1
    assert f"from {SCHEDULE_CSV}" in plan.describe()


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "schedule.csv"
    path.write_text(text)
    return path


ONE_F1B = "0F0,0F1,,0B0,0B1\n,1F0,1B0,1F1,1B1\n"  # single-stage 1F1B over 2 ranks and 2 microbatches


@pytest.mark.parametrize("text,schedule,local_batch,message", [
    (None, "PipelineScheduleMulti", 4, "does not exist; point it at a schedule CSV"),
    ("0F0,0X1\n", "PipelineScheduleMulti", 4, "is not a schedule CSV (Invalid action string: 0X1)"),
    ("0F0,0B0\n", "PipelineScheduleMulti", 4, "has 1 rows but pipeline_parallel_degree is 2"),
    (ONE_F1B, "PipelineScheduleMulti", 2, "never runs stage 2 of the plan's 4"),  # the CSV is single-stage
    (ONE_F1B, "PipelineScheduleSingle", 4, "forward on 2 microbatches, but a step has 4"),
    (ONE_F1B.replace("1F1,", "1F7,"), "PipelineScheduleSingle", 2, "number them 0 to 1"),
    (ONE_F1B.replace("1F0,1B0", "0F9,1B0"), "PipelineScheduleSingle", 2, "rank 1 runs stage 0, but"),
    (ONE_F1B.replace("1F1,1B1", "1F1,1F1,1B1"), "PipelineScheduleSingle", 2, "runs 1F1 twice"),
    (ONE_F1B.replace("0B0,0B1", "0B0"), "PipelineScheduleSingle", 2, "expected 2 total backwards"),
    ("0B1,0F0,,0B0,0F1\n,1F0,1B0,1F1,1B1\n", "PipelineScheduleSingle", 2,
     "microbatch 1 without first running Forward"),
    ("1F0\n,\n", "PipelineScheduleMulti", 4, "rank 0 runs stage 1, but"),
    ("4F0\n,\n", "PipelineScheduleMulti", 4, "the plan has 4 stages"),
    ("0F0,0SEND_F0\n,\n", "PipelineScheduleMulti", 4, "runs 0SEND_F0; write compute actions only"),
    ("binary", "PipelineScheduleMulti", 4, "is not a schedule CSV ('utf-8' codec"),
    (ONE_F1B, "1F1B", 2, "a CSV schedule runs as PipelineScheduleSingle or PipelineScheduleMulti"),
])
def test_bad_schedule_csv(text, schedule, local_batch, message, tmp_path):
    path = tmp_path / "missing.csv" if text is None else _write(tmp_path, text)
    if text == "binary":
        path.write_bytes(b"0F0,\xff\xfe\n")
    with pytest.raises(ConfigError) as e:
        _csv_plan(path, schedule, local_batch)
    line = str(e.value)
    assert line.startswith(f"{CSV_KEY} = {str(path)!r}") or line.startswith("parallelism.pipeline_parallel_schedule ")
    assert message in line and "\n" not in line, line


def test_csv_schedule_names_need_a_csv():
    with pytest.raises(ConfigError, match="runs a schedule from a CSV file; set .*_schedule_csv"):
        _plan(2, "PipelineScheduleMulti")


@pytest.mark.parametrize("name,schedule,pp", [("llama3", "1F1B", 4), ("smollm", "Interleaved1F1B", 2),
                                              ("smollm", "ZBVZeroBubble", 2)])
def test_stages_match_unsplit_model(name, schedule, pp):
    # Each stage is built on meta and initialized alone, as a pipeline rank does; together they must be the
    # unsplit model: same values under the same names (the tied output copy equals the embedding) and same logits.
    args = get_model_args(name, "debugmodel")
    args.max_seq_len = 16
    full = Transformer(args)
    full.init_weights(seed=3)
    with torch.device("meta"):
        meta = Transformer(args)
    plan = _plan(pp, schedule, local_batch=8)
    parts = []
    for modules in plan.modules_per_stage:
        part = split_model(meta, modules)
        init_weights(part, seed=3, device=torch.device("cpu"))
        parts.append(part)
    reference = dict(full.named_parameters())
    seen = set()
    for part in parts:
        for pname, param in part.named_parameters():
            key = "tok_embeddings.weight" if args.tie_word_embeddings and pname == "output.weight" else pname
            assert torch.equal(param, reference[key]), pname
            seen.add(key)
    assert seen == set(reference)
    tokens = torch.randint(0, args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    h = tokens
    with torch.no_grad():
        for part in parts:
            h = part(h)
        torch.testing.assert_close(h, full(tokens), rtol=0, atol=0)


def test_materialized_tied_model_stays_tied():
    # to_empty gives each attribute its own tensor; init_weights must tie SmolLM's output to the embedding again,
    # or a 1-process run trains an untied model that no other layout matches.
    args = get_model_args("smollm", "debugmodel")
    with torch.device("meta"):
        model = Transformer(args)
    init_weights(model, seed=3, device=torch.device("cpu"))
    assert model.output.weight is model.tok_embeddings.weight
    reference = Transformer(args)
    reference.init_weights(seed=3)
    assert torch.equal(model.output.weight, reference.output.weight)

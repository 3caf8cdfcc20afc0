"""Validation inside the real training loop, in every landed layout, against a hand evaluation in this process.

Each run trains 4 steps and validates after steps 2 and 4 on a one-document split of 11 windows. Under pipeline
parallel the batch runs forward only through the training's schedule (every kind: single-stage, looped, V-shaped,
DualPipeV, a CSV; and composed with tp and cp), with validation windows of 32 tokens after training ones of 64. Checked: the logged
loss equals a plain forward of the same weights over the same windows (within 1e-6); the windows evaluated are the
first batches x local_batch_size x dp of the split, also when dp ranks hold different numbers of windows (6 and 5
with dp=2, so one rank runs out first and nothing may hang); the RNG state and train mode are left as they were; and
the training losses are bit-identical to a run of the same layout with validation off.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.distributed.launch import ROOT
from tests.distributed.layouts import base_overrides, layout_args
from trainer.data.datasets import C4_TEST_PATH, build_dataset
from trainer.data.tokenizer import Tokenizer
from trainer.models.attention import document_ids
from trainer.models.flavors import get_model_args
from trainer.models.llama import Transformer

TRAIN_STEPS, FREQ, VAL_SEQ, TRAIN_SEQ = 4, 2, 32, 64
TOLERANCE = 1e-6

# name -> (ranks, layout and validation overrides, also run with validation off to compare training losses)
LAYOUTS = {
    "1 process, whole split": (1, {"training.local_batch_size": 4, "validation.local_batch_size": 2}, True),
    "dp_shard=2, whole split": (2, {"parallelism.data_parallel_shard_degree": 2, "training.local_batch_size": 2,
                                    "validation.local_batch_size": 1}, True),
    "dp_shard=2, steps=3": (2, {"parallelism.data_parallel_shard_degree": 2, "training.local_batch_size": 2,
                                "validation.local_batch_size": 1, "validation.steps": 3}, False),
    "cp=2, whole split": (2, {"parallelism.context_parallel_degree": 2, "parallelism.data_parallel_shard_degree": 1,
                              "training.local_batch_size": 4, "validation.local_batch_size": 1}, False),
    "tp=2 (loss parallel), whole split": (2, {"parallelism.tensor_parallel_degree": 2,
                                              "parallelism.data_parallel_shard_degree": 1,
                                              "training.local_batch_size": 4, "validation.local_batch_size": 2},
                                          False),
}


def _pp(schedule: str, **spec) -> dict:
    """Pipeline parallel: 4 microbatches of 1 per training step, so a validation batch of 4 is cut alike."""
    return {"parallelism.pipeline_parallel_degree": 2, "parallelism.pipeline_parallel_schedule": schedule,
            "parallelism.data_parallel_shard_degree": 1, "training.local_batch_size": 4,
            "validation.local_batch_size": 4, **spec}


# name -> (ranks, overrides, slow): validation through the pipeline schedule's forward-only pass.
PP_LAYOUTS = {
    "pp=2 1F1B": (2, _pp("1F1B"), False),
    "pp=2 Interleaved1F1B": (2, _pp("Interleaved1F1B"), True),
    "pp=2 ZBVZeroBubble": (2, _pp("ZBVZeroBubble"), True),
    "pp=2 DualPipeV": (2, _pp("DualPipeV"), True),
    "pp=2 CSV schedule": (2, _pp("PipelineScheduleMulti", **{
        "parallelism.pipeline_parallel_schedule_csv": "tests/assets/pipeline/zero_bubble_pp2_4stages_4mb.csv"}),
        True),
    "pp=2 x dp_shard=2 Interleaved1F1B": (4, _pp("Interleaved1F1B", **{
        "parallelism.data_parallel_shard_degree": 2, "training.local_batch_size": 2,
        "validation.local_batch_size": 2}), True),  # FSDP's unshard/reshard in the forward-only order
    "pp=2 x tp=2 x cp=2 1F1B": (8, _pp("1F1B", **{"parallelism.tensor_parallel_degree": 2,
                                                   "parallelism.context_parallel_degree": 2}), True),
}
LAYOUTS.update({name: (ranks, spec, name == "pp=2 1F1B") for name, (ranks, spec, _) in PP_LAYOUTS.items()})

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """A one-document validation file and its windows, read in one process (dp 1)."""
    path = tmp_path_factory.mktemp("val") / "validation.jsonl"
    first = (C4_TEST_PATH / "validation.jsonl").read_text(encoding="utf-8").splitlines()[0]
    path.write_text(first + "\n", encoding="utf-8")
    tokenizer = Tokenizer.from_path(ROOT / "tests/assets/tokenizer")
    windows = list(build_dataset("jsonl", str(path), tokenizer, VAL_SEQ, 0, 1, split="validation", infinite=False))
    assert len(windows) % 2 == 1, "an odd window count makes the two dp ranks hold different numbers of windows"
    return path, windows


def overrides(spec: dict, val_file, validation: bool) -> list[str]:
    args = base_overrides() + ["--training.steps", str(TRAIN_STEPS), "--training.seq_len", str(TRAIN_SEQ),
                               "--metrics.log_freq", "1", "--metrics.disable_color_printing", "true"]
    if validation:
        args += ["--validation.enable", "true", "--validation.freq", str(FREQ), "--validation.dataset", "jsonl",
                 "--validation.dataset_path", str(val_file), "--validation.seq_len", str(VAL_SEQ),
                 "--validation.steps", "-1"]  # the whole split unless a layout says otherwise (not the config's)
    else:
        spec = {k: v for k, v in spec.items() if not k.startswith("validation.")}
    return args + layout_args(spec)


def run(pool, ranks: int, out, args: list[str], dcp_dir=None) -> tuple[dict, str]:
    proc = pool.run(ranks, "validation", out, [*(["--dcp", str(dcp_dir)] if dcp_dir else []), *args])
    assert proc.returncode == 0, f"{ranks} ranks {args}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return torch.load(out, weights_only=True), proc.stdout


def hand_evaluation(params: dict[str, torch.Tensor], windows: list, flavor: str = "debugmodel",
                    eos_id: int | None = None) -> float:
    """Token-mean cross-entropy of the model with `params` over `windows`, a plain forward in this process; with
    `eos_id`, attention stays within each document (a block-causal flavor)."""
    args = get_model_args("llama3", flavor)
    args.max_seq_len = TRAIN_SEQ
    model = Transformer(args)
    model.load_state_dict(params)
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    with torch.no_grad():
        for inputs, labels in windows:
            kwargs = {} if eos_id is None else {"document_ids": document_ids(inputs[None], eos_id)}
            logits = model(inputs[None], **kwargs)
            total += F.cross_entropy(logits[0], labels, reduction="sum").double()
            count += labels.numel()
    return (total / count).item()


def expected_batches(n_windows: int, local_batch: int, dp: int, steps: int) -> int:
    """Every rank evaluates as many batches as the rank with the fewest holds (dp rank dp-1, with n // dp windows)."""
    available = (n_windows // dp) // local_batch
    return available if steps == -1 else min(steps, available)


# Left out of `-m "not slow"` beside the slow pipeline layouts: CP's validation (8 s; pp=2 x tp=2 x cp=2 runs it in CI).
SLOW = {"cp=2, whole split"}


@pytest.mark.parametrize("name", [pytest.param(name, marks=[pytest.mark.slow] if PP_LAYOUTS.get(name, (0, 0, 0))[2]
                                                or name in SLOW else []) for name in LAYOUTS])
def test_validation_matches_hand_evaluation(name, split, pool, tmp_path):
    ranks, spec, compare_off = LAYOUTS[name]
    val_file, windows = split
    dcp_dir = tmp_path / "dcp" if name == "dp_shard=2, whole split" else None
    got, stdout = run(pool, ranks, tmp_path / "on.pt", overrides(spec, val_file, True), dcp_dir)
    assert got["world_size"] == ranks

    dp = spec.get("parallelism.data_parallel_shard_degree", 1)
    local_batch, steps = spec["validation.local_batch_size"], spec.get("validation.steps", -1)
    batches = expected_batches(len(windows), local_batch, dp, steps)
    evaluated = windows[:batches * local_batch * dp]  # window i is on dp rank i % dp: a prefix of the split
    assert [v["step"] for v in got["validations"]] == [FREQ, 2 * FREQ]
    report = {}
    for v in got["validations"]:
        assert v["rng_unchanged"] and v["training_mode"]
        assert (v["batches"], v["tokens"]) == (batches, len(evaluated) * VAL_SEQ)
        expected = hand_evaluation(v["params"], evaluated)
        assert abs(v["loss"] - expected) <= TOLERANCE, f"step {v['step']}: {v['loss']!r} vs hand {expected!r}"
        assert f"validate step: {v['step']:>5}  loss: {v['loss']:8.4f}" in stdout
        report[v["step"]] = {"loss": v["loss"], "hand": expected, "delta": abs(v["loss"] - expected)}
    print(f"{name}: {len(evaluated)} of {len(windows)} windows, {batches} batches per rank; {json.dumps(report)}")

    if compare_off:
        off, _ = run(pool, ranks, tmp_path / "off.pt", overrides(spec, val_file, False))
        assert got["losses"] == off["losses"], "validation changed the training losses"
        assert off["validations"] == []
    if dcp_dir is not None:
        check_generate_reads_sharded_dcp(dcp_dir, got["validations"][-1]["params"])


@pytest.mark.slow
def test_block_causal_validation_under_pipeline_parallel(pool, tmp_path):
    """The document ids reach every stage of the validation pass (as in training): on a split of short documents
    the logged loss is the block-causal hand evaluation's, which the causal one is far from."""
    tokenizer = Tokenizer.from_path(ROOT / "tests/assets/tokenizer")
    text = (C4_TEST_PATH / "validation.jsonl").read_text(encoding="utf-8").splitlines()[0]
    body = json.loads(text)["text"]
    val_file = tmp_path / "short_documents.jsonl"
    val_file.write_text("".join(json.dumps({"text": body[i:i + 60]}) + "\n" for i in range(0, 60 * 24, 60)))
    windows = list(build_dataset("jsonl", str(val_file), tokenizer, VAL_SEQ, 0, 1, split="validation",
                                 infinite=False))
    ranks, spec, _ = PP_LAYOUTS["pp=2 1F1B"]
    flex = {**spec, "model.flavor": "debugmodel_flex_attn"}
    got, _ = run(pool, ranks, tmp_path / "on.pt", overrides(flex, val_file, True))
    evaluated = windows[:(len(windows) // 4) * 4]
    for v in got["validations"]:
        masked = hand_evaluation(v["params"], evaluated, "debugmodel_flex_attn", tokenizer.eos_id)
        causal = hand_evaluation(v["params"], evaluated, "debugmodel_flex_attn")
        print(f"step {v['step']}: logged {v['loss']!r}, block-causal hand {masked!r}, causal hand {causal!r}")
        assert abs(causal - masked) > 1e-3, "the split's windows must cross documents, or the mask changes nothing"
        assert abs(v["loss"] - masked) <= TOLERANCE


def check_generate_reads_sharded_dcp(dcp_dir, final_params: dict[str, torch.Tensor]) -> None:
    """scripts/generate.py's loader reads a checkpoint saved by 2 FSDP ranks into one process, exactly."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts/generate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    model = script.load_dcp_model(dcp_dir, get_model_args("llama3", "debugmodel"))
    loaded = dict(model.named_parameters())
    assert loaded.keys() == final_params.keys()
    for pname, tensor in final_params.items():
        assert torch.equal(loaded[pname].detach(), tensor), pname

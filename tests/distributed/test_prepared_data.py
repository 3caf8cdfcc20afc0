"""Training on a prepared c4_test (training.dataset = "tokens"): every layout matches one process exactly as on the
text reader, because a rank reads window g of the same global stream when g % dp == its rank; and a run stopped
after step 3 and resumed, in the same layout or at another dp degree, logs the losses of a straight run."""

import pytest

from tests.distributed.layouts import TEXT
from tests.distributed.parity import assert_matches_reference, assert_reference_moves
from tests.distributed.test_checkpoint import RUN, train

pytestmark = pytest.mark.distributed

# dp_shard=2 is the representative; the others are a few of the text reader's matrices run again on prepared data.
# Every matrix runs on prepared data with `pytest --dataset tokens` (tests/conftest.py; the README's Data section).
MATRIX = ["dp_shard=2", "dp_replicate=2 x dp_shard=2", "tp=2", "cp=2", "pp=2 1F1B", "dp_shard=2 x tp=2"]
SLOW = set(MATRIX[1:])


@pytest.fixture(scope="module")
def tokens(prepared_c4_test) -> dict:
    return {"training.dataset": "tokens", "training.dataset_path": str(prepared_c4_test)}


@pytest.mark.parametrize("layout", [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m for m in MATRIX])
def test_layout_matches_single_process_on_prepared_data(layout, runs, tokens):
    reference = runs.steps("1 process", **tokens)
    assert_reference_moves(reference)
    assert reference["losses"] != runs.steps("1 process", **TEXT)["losses"]  # it did read the prepared folder
    assert_matches_reference(runs.steps(layout, **tokens), reference)


# (stopped layout, resumed layout, allowed relative loss difference): bit-identical in the same layout; after a dp
# change the first 3 steps reduced gradients in another order (1e-5, as in test_checkpoint.py).
RESUMES = {"dp_shard=2 -> dp_shard=2": ("dp_shard=2", "dp_shard=2", 0.0),
           "dp_shard=2 -> dp_shard=4 (reshard)": ("dp_shard=2", "dp_shard=4", 1e-5),
           "dp_shard=2 with 2 loader workers -> 1 process": ("dp_shard=2", "1 process", 1e-5)}


# The same layout is the representative (`-m "not slow"`, under 5 minutes); test_checkpoint.py's fast reshard
# covers the position's resharding, which this reader shares with the text readers.
@pytest.mark.parametrize("name", [n if n == "dp_shard=2 -> dp_shard=2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in RESUMES])
def test_resume_on_prepared_data_continues_like_a_straight_run(name, pool, runs, tokens, tmp_path):
    first_layout, resumed_layout, rtol = RESUMES[name]
    workers = {"training.dataloader.num_workers": 2} if "workers" in name else {}
    settings = {"checkpoint.enable": True, "job.dump_folder": str(tmp_path), "checkpoint.interval": 100, **tokens}
    first, _ = train(pool, first_layout, tmp_path / "first.pt", {**settings, **workers}, ["--signal-at-step", "3"])
    straight_first = runs.run("train", first_layout, **RUN, **tokens)[0]["losses"]
    assert first["losses"] == {s: straight_first[s] for s in range(1, 4)}
    resumed, log = train(pool, resumed_layout, tmp_path / "resumed.pt", settings)
    assert resumed["first_step"] == 4 and sorted(resumed["losses"]) == list(range(4, RUN["training.steps"] + 1))
    straight = runs.run("train", resumed_layout, **RUN, **tokens)[0]["losses"]
    worst = max(abs(loss - straight[s]) / abs(straight[s]) for s, loss in resumed["losses"].items())
    print(f"{name}: max relative loss difference to the straight run {worst:.3g}")
    assert worst <= rtol, (resumed["losses"], straight)

"""A rank that dies mid-step: every other rank ends at once with one line that names it (a hung rank, named the
same way after comm.train_timeout_seconds: tests/distributed/test_comm.py)."""

import pytest

from tests.distributed.layouts import layout_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("dead", [2, 0])
def test_a_dead_rank_is_named_by_the_others(dead, launcher, tmp_path):
    # Checkpointing on, as in a real run: the survivors then take the launcher's SIGTERM (torchrun's too, sent
    # when it sees a rank die) as a request to stop, and end on the failed collective instead of being killed.
    ranks, overrides = layout_overrides("dp_shard=2 x tp=2", **{
        "training.steps": 10, "metrics.log_freq": 1, "checkpoint.enable": True, "checkpoint.interval": 100,
        "job.dump_folder": str(tmp_path)})
    run = launcher.launch(ranks, "fault", tmp_path / "losses", [f"forward:{dead}:3:-", tmp_path / "journal",
                                                                 *overrides])
    assert run.codes[dead] == -9 and all(code == 1 for r, code in enumerate(run.codes) if r != dead), run.codes
    for rank in set(range(ranks)) - {dead}:
        lines = [line for line in run.stderr.splitlines() if line.startswith(f"[rank {rank}] error: ")]
        assert len(lines) == 1, run.stderr[-4000:]
        # named alone, or with a rank that was blocked behind a survivor and learned of the failure only when
        # that survivor exited
        named = lines[0].split("did not report it")[0].rsplit("; rank", 1)[1]
        assert str(dead) in named.replace(",", " ").split(), lines[0]
    # the survivors ended on their own, long before the launcher's 10 s grace would SIGKILL them
    assert run.seconds < 60, run.seconds

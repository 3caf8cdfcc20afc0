"""kill -9 of a random rank at a random moment, then resume: seeded chains of faults on 1, 2 and 4 ranks.

A chain is one run that is killed again and again (tests/faults/inject.py: forward, backward, optimizer step, sync
save, async staging, async write, marker write, keep_latest_k purge), each launch resuming where the last left off,
until a last launch trains to the end. After every kill: the steps rank 0 journaled as complete that keep_latest_k
keeps are all still complete on disk (none lost), and the newest of them is the newest complete folder. Every
launch resumes from that folder, and every loss it logs equals the uninterrupted run's, bit for bit (the same
layout), so a chain of N faults checks N resumes. FAULT_SEED=<int> draws other chains (the default is fixed).
"""

import os
import random

import pytest

from tests.distributed.layouts import layout_overrides
from tests.faults.conftest import SUMMARY
from tests.faults.inject import KINDS
from trainer.checkpoint_files import complete_steps

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, INTERVAL, KEEP = 10, 2, 2
SEED = int(os.environ.get("FAULT_SEED", "2026"))
CHAINS = {"1 process": 8, "dp_shard=2": 8, "dp_shard=2 x tp=2": 3}  # layout -> faults (8: every kind once)


def draw_chain(layout: str, faults: int, ranks: int, seed: int) -> list[tuple[str, bool]]:
    """[(fault spec "KIND:RANK:STEP:VARIANT", async save)], steps ascending; every kind at least once in a chain of
    8 faults or more."""
    rng = random.Random(f"{seed} {layout}")
    kinds = list(KINDS) + [rng.choice(KINDS) for _ in range(faults - len(KINDS))]
    rng.shuffle(kinds)
    kinds = kinds[:faults]
    steps = sorted(rng.randint(1, STEPS - 2) for _ in kinds)
    chain = []
    for kind, step in zip(kinds, steps):
        rank = 0 if kind in ("marker", "purge") else rng.randrange(ranks)
        variant = {"sync_save": rng.choice(["before", "after"]), "marker": rng.choice(["torn", "whole"])}.get(kind, "-")
        asynchronous = kind in ("async_staging", "async_write") or (kind != "sync_save" and rng.random() < 0.5)
        chain.append((f"{kind}:{rank}:{step}:{variant}", asynchronous))
    return chain


def read_losses(path) -> dict[int, float]:
    if not path.exists():
        return {}
    return {int(step): float(loss) for step, loss in (line.split() for line in path.read_text().splitlines())}


@pytest.mark.parametrize("layout", CHAINS)
def test_killed_runs_resume_like_an_uninterrupted_run(layout, launcher, runs, tmp_path):
    reference = runs.run("train", layout, **{"training.steps": STEPS, "metrics.log_freq": 1})[0]["losses"]
    folder, journal = tmp_path / "checkpoint", tmp_path / "journal"
    chain = draw_chain(layout, CHAINS[layout], layout_overrides(layout)[0], SEED)
    print(f"{layout}: FAULT_SEED={SEED}, faults {[spec for spec, _ in chain]}")
    for index, (spec, asynchronous) in enumerate([*chain, ("none", False)]):
        newest = max(complete_steps(folder), default=0)
        ranks, overrides = layout_overrides(layout, **{
            "training.steps": STEPS, "metrics.log_freq": 1, "job.dump_folder": str(tmp_path),
            "checkpoint.enable": True, "checkpoint.interval": INTERVAL, "checkpoint.keep_latest_k": KEEP,
            "checkpoint.async_mode": "async" if asynchronous else "disabled"})
        losses_file = tmp_path / f"losses-{index}"
        run = launcher.launch(ranks, "fault", losses_file, [spec, journal, *overrides])
        what = f"{layout}, launch {index} ({spec}, async {asynchronous})"
        logs = f"{what}: exit codes {run.codes}\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}"

        # It resumed from the newest complete checkpoint, and logged the uninterrupted run's losses.
        losses = read_losses(losses_file)
        if newest:
            assert f"resumed from {folder / f'step-{newest}'} " in run.stdout, logs
        assert losses and min(losses) == newest + 1 or not losses and spec != "none", logs
        for step, loss in losses.items():
            assert loss == reference[step], f"{what}: step {step} logged {loss!r}, uninterrupted {reference[step]!r}"
        if newest:
            SUMMARY["resumes verified bit-exact"] += 1
        if spec == "none":
            assert run.codes == [0] * ranks and max(losses) == STEPS, logs
            break

        # The fault fired where it was aimed, and took the run down.
        kind, rank = spec.split(":")[0], int(spec.split(":")[1])
        assert run.codes[rank] == -9 and all(code != 0 for code in run.codes), logs
        SUMMARY["trials"] += 1
        SUMMARY["faults"][kind] += 1
        # Nothing complete was lost: what keep_latest_k keeps of the journal is complete on disk, and no newer
        # folder counts as complete.
        done = [int(s) for s in journal.read_text().split()] if journal.exists() else []
        on_disk = complete_steps(folder)
        lost = [s for s in sorted(set(done))[-KEEP:] if s not in on_disk]
        SUMMARY["complete checkpoints lost"] += len(lost)
        assert not lost, f"{what}: complete checkpoints {lost} lost; on disk {sorted(on_disk)}"
        assert max(on_disk, default=0) == max(done, default=0), f"{what}: complete on disk {sorted(on_disk)}, " \
                                                                f"journaled {done}"

"""A full disk during a save: the run ends with one line naming the folder, the partial folder never looks
complete, and the checkpoint before it still loads and continues exactly like an uninterrupted run.

The disk fills from step 4's save on (a write of a data file fails with ENOSPC halfway, tests/faults/inject.py), on
every rank for a synchronous save and on one rank for an asynchronous one (which every rank then reports at its
next save). Where this process may mount, also a real 110 MiB tmpfs that holds one 72 MiB checkpoint but not two.
"""

import subprocess

import pytest

from tests.distributed.layouts import layout_overrides
from tests.faults.test_kill9 import read_losses
from trainer.checkpoint_files import MARKER, complete_steps

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 10
RUN = {"training.steps": STEPS, "metrics.log_freq": 1}
CASES = {  # name -> (layout, fault spec, async save)
    "sync save, every rank's disk full": ("dp_shard=2", "disk_full:-1:4:-", False),
    "async save, rank 1's disk full": ("dp_shard=2", "disk_full:1:4:-", True),
}


def check_full_disk_run(run, folder, ranks: int) -> str:
    """The run that met the full disk: a clean one-line failure, step-4 unmarked, step-2 complete; the line."""
    logs = f"exit codes {run.codes}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    errors = [line for line in run.stderr.splitlines() if "error: " in line]
    assert run.codes == [2] * ranks and len(errors) == 1 and "Traceback" not in run.stderr, logs
    assert f"saving {folder / 'step-4'} failed (" in errors[0] and " MiB are free there" in errors[0], errors
    assert f"{folder / 'step-2'} is the newest complete checkpoint" in errors[0], errors
    assert (folder / "step-4").is_dir() and not (folder / "step-4" / MARKER).exists()
    assert sorted(complete_steps(folder)) == [2]
    return errors[0]


def check_resume(run, folder, losses_file, reference) -> None:
    assert run.codes == [0] * len(run.codes), f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    assert f"resumed from {folder / 'step-2'} " in run.stdout
    losses = read_losses(losses_file)
    assert sorted(losses) == list(range(3, STEPS + 1))
    assert all(losses[s] == reference[s] for s in losses), (losses, reference)


@pytest.mark.parametrize("name", CASES)
def test_a_full_disk_fails_the_save_cleanly(name, launcher, runs, tmp_path):
    layout, spec, asynchronous = CASES[name]
    settings = {**RUN, "job.dump_folder": str(tmp_path), "checkpoint.enable": True, "checkpoint.interval": 2,
                "checkpoint.async_mode": "async" if asynchronous else "disabled"}
    ranks, overrides = layout_overrides(layout, **settings)
    folder = tmp_path / "checkpoint"
    error = check_full_disk_run(launcher.launch(ranks, "fault", tmp_path / "losses-0",
                                                [spec, tmp_path / "journal", *overrides]), folder, ranks)
    assert "OSError: [Errno 28] No space left on device" in error, error
    # The disk has room again: the run resumes from step 2, saves step 4 over the partial folder, and goes on.
    resumed = launcher.launch(ranks, "fault", tmp_path / "losses-1", ["none", tmp_path / "journal", *overrides])
    check_resume(resumed, folder, tmp_path / "losses-1", runs.run("train", layout, **RUN)[0]["losses"])
    assert sorted(complete_steps(folder)) == [2, 4, 6, 8, 10][-len(complete_steps(folder)):]


def test_a_real_full_tmpfs(launcher, runs, tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=110m", "tmpfs", str(disk)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mount.stderr.decode().strip()}); the injected ENOSPC cases ran")
    try:
        settings = {**RUN, "job.dump_folder": str(disk), "checkpoint.enable": True, "checkpoint.interval": 2}
        ranks, overrides = layout_overrides("1 process", **settings)
        folder = disk / "checkpoint"
        error = check_full_disk_run(launcher.launch(ranks, "fault", tmp_path / "losses-0",
                                                    ["none", tmp_path / "journal", *overrides]), folder, ranks)
        print(error)
        # The disk is still full: load_only resumes from step 2 and trains on without saving.
        resumed = launcher.launch(ranks, "fault", tmp_path / "losses-1",
                                  ["none", tmp_path / "journal", *overrides, "--checkpoint.load_only"])
        check_resume(resumed, folder, tmp_path / "losses-1", runs.run("train", "1 process", **RUN)[0]["losses"])
    finally:
        subprocess.run(["umount", str(disk)], check=True)

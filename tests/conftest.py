"""Fixtures of the multi-process tests (tests/distributed, tests/faults): the worker pool, the launcher of runs that
lose ranks, and every training run cached by what it ran."""

from pathlib import Path

import pytest
import torch

from tests.distributed.layouts import LAYOUTS, TEXT, layout_overrides
from tests.distributed.pool import WorkerPool
from tests.faults.launcher import Launcher


def pytest_addoption(parser):
    parser.addoption("--dataset", choices=("text", "tokens"), default="text",
                     help="what every cached multi-process run reads unless its test names a dataset: text (c4_test "
                          "through the text reader) or tokens (c4_test prepared once per session; the parity "
                          "matrices on prepared data)")


@pytest.fixture(scope="session")
def pool(tmp_path_factory):
    """Workers kept alive across the session, one torchrun launch per world size (tests/distributed/pool.py)."""
    workers = WorkerPool(tmp_path_factory.mktemp("pool"))
    yield workers
    workers.close()


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    """One process that forks the ranks of each run that may lose one (a kill -9), tests/faults/launcher.py."""
    runner = Launcher(tmp_path_factory.mktemp("launcher"))
    yield runner
    runner.close()


class Runs:
    """Runs of `job` (tests/distributed/jobs.py) by (layout, model, extra settings), each made once per session.

    The 1-process reference of every parity matrix is `runs.steps("1 process")`; an identical run asked for by
    two test files is one run. `data`: the dataset settings of every run whose test names no dataset (--dataset).
    """

    def __init__(self, pool: WorkerPool, folder, data: dict):
        self.pool, self.folder, self.cache, self.data = pool, folder, {}, data

    def run(self, job: str, layout: str, model: str = "llama3", argv: list[str] = (), **extra) -> tuple[dict, str]:
        """(rank 0's result, rank 0's stdout); `extra` settings by dotted key, e.g. {"compile.enable": True}."""
        if "training.dataset" not in extra:  # a test that names its dataset reads that, whatever the session's
            extra = {**self.data, **extra}
        key = (job, layout, model, tuple(argv), tuple(sorted(extra.items())))
        if key not in self.cache:
            ranks, overrides = layout_overrides(layout, model, **extra)
            out = self.folder / f"run{len(self.cache)}.pt"
            result = self.pool.run(ranks, job, out, [*argv, *overrides])
            assert result.returncode == 0, (f"{job} {layout} ({model}, {extra}) failed:\n{result.stdout[-3000:]}\n"
                                            f"{result.stderr[-6000:]}")
            self.cache[key] = torch.load(out, weights_only=True), result.stdout
        return self.cache[key]

    def steps(self, layout: str, model: str = "llama3", **extra) -> dict:
        """A parity run: losses and grad norms of every step, params after step 1 (jobs.steps)."""
        got, _ = self.run("steps", layout, model, **extra)
        assert got["world_size"] == LAYOUTS[layout][0]
        return got


@pytest.fixture(scope="session")
def runs(pool, tmp_path_factory, request):
    data = TEXT
    if request.config.getoption("dataset") == "tokens":
        data = {"training.dataset": "tokens", "training.dataset_path": str(request.getfixturevalue("prepared_c4_test"))}
    return Runs(pool, tmp_path_factory.mktemp("runs"), data)


@pytest.fixture(scope="session")
def prepared_c4_test(tmp_path_factory):
    """tests/assets/c4_test prepared with the test tokenizer (scripts/prepare_data.py): training.dataset = "tokens"
    reads it."""
    from trainer.data.prepare import prepare

    folder = tmp_path_factory.mktemp("prepared") / "c4_test"
    prepare("c4_test", None, Path(__file__).parent / "assets/tokenizer", folder, num_proc=1, log=lambda _: None)
    return folder

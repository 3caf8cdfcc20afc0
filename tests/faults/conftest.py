"""The fault suite's launcher (tests/faults/launcher.py) and its one-line summary at the end of the session."""

from collections import Counter

import pytest

from tests.faults.launcher import Launcher

SUMMARY = {"trials": 0, "faults": Counter(), "resumes verified bit-exact": 0, "complete checkpoints lost": 0}


@pytest.fixture(scope="session")
def launcher(tmp_path_factory):
    runner = Launcher(tmp_path_factory.mktemp("launcher"))
    yield runner
    runner.close()


def pytest_terminal_summary(terminalreporter):
    if SUMMARY["trials"]:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(SUMMARY["faults"].items()))
        terminalreporter.write_line(
            f"fault suite: {SUMMARY['trials']} trials | faults injected: {faults} | resumes verified bit-exact: "
            f"{SUMMARY['resumes verified bit-exact']} | complete checkpoints lost: {SUMMARY['complete checkpoints lost']}")

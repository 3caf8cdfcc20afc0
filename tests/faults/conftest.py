"""The fault suite's one-line summary at the end of the session (its launcher fixture is in tests/conftest.py)."""

from collections import Counter

SUMMARY = {"trials": 0, "faults": Counter(), "resumes verified bit-exact": 0, "complete checkpoints lost": 0}


def pytest_terminal_summary(terminalreporter):
    if SUMMARY["trials"]:
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(SUMMARY["faults"].items()))
        terminalreporter.write_line(
            f"fault suite: {SUMMARY['trials']} trials | faults injected: {faults} | resumes verified bit-exact: "
            f"{SUMMARY['resumes verified bit-exact']} | complete checkpoints lost: {SUMMARY['complete checkpoints lost']}")

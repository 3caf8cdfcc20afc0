"""Time single tests before and after a change: each node id alone, in a checkout of REV and in this tree, in turn.

    python scripts/test_times.py --before main TEST_ID [TEST_ID ...] [--repeats 2]
    python scripts/test_times.py --before main --fast-subset     # the `-m "not slow"` subset's size at each

Each run is `python -m pytest -q -p no:cacheprovider --durations=0 TEST_ID` with PYTHONPATH set to its tree and
OMP_NUM_THREADS=1; the figure is the test's own call time (setup and teardown printed apart), the median over
--repeats. REV is checked out with `git worktree add --detach` in a temporary folder and removed after. A node id
that REV lacks prints "-". On a loaded machine compare only the pairs of one run.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def durations(tree: Path, args: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """{test id: {"call": s, "setup": s, "teardown": s}} of one pytest run in `tree`, and its last line."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                           "-vv", *args], cwd=tree, env=env, capture_output=True, text=True)
    found: dict[str, dict[str, float]] = {}
    for seconds, phase, test in re.findall(r"^([\d.]+)s (call|setup|teardown)\s+(\S.*)$", proc.stdout, re.M):
        found.setdefault(test.strip(), {})[phase] = float(seconds)
    lines = proc.stdout.strip().splitlines()
    return found, lines[-1] if lines else proc.stderr.strip()[-300:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("tests", nargs="*", help="pytest node ids, run one at a time")
    ap.add_argument("--before", required=True, help="the git revision to compare with (e.g. main)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--fast-subset", action="store_true", help="count and time the `-m 'not slow'` subset")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="test_times_") as tmp:
        before = Path(tmp) / "before"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(before), a.before], cwd=ROOT, check=True)
        try:
            trees = {"before": before, "after": ROOT}
            if a.fast_subset:
                for name, tree in trees.items():
                    _, last = durations(tree, ["-m", "not slow"])
                    print(f"{name}: {last}", flush=True)
            print(f"{'test':<100} {'before s':>9} {'after s':>9}")
            for test in a.tests:
                calls = {name: [] for name in trees}
                for _ in range(a.repeats):
                    for name, tree in trees.items():
                        found, last = durations(tree, [test])
                        phases = found.get(test)
                        if phases is None and "passed" not in last:
                            print(f"  {name}: {last}", file=sys.stderr)
                        calls[name].append(phases.get("call", 0.0) if phases else None)
                cells = ["-" if None in c else f"{statistics.median(c):.2f}" for c in calls.values()]
                print(f"{test:<100} {cells[0]:>9} {cells[1]:>9}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(before)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Seconds of each job when one test pool (tests/distributed/pool.py) runs the same parity job again and again.

    python scripts/pool_times.py "dp_replicate=2 x dp_shard=2 x tp=2" --jobs 14
    python scripts/pool_times.py "dp_shard=2" "tp=2" "cp=2" --jobs 40      # layouts in turn, one pool per world size

The first job of a pool pays its start (fork, process group) and DTensor's cold sharding caches; every later job
should take about the same time. A pool whose jobs slow down as they pile up makes tests slower in the suite than
alone: that is how the pool's mesh groups came to be reused (tests/distributed/worker.py; 8 ranks went 7.7 s -> 14.2
s over 13 jobs before, 7.5 s flat after). Prints each job's seconds and every rank's RSS at the end (MiB).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.distributed.layouts import LAYOUTS, TEXT, layout_overrides  # noqa: E402
from tests.distributed.pool import WorkerPool  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("layouts", nargs="+", choices=sorted(LAYOUTS), metavar="LAYOUT",
                    help="names in tests/distributed/layouts.py, run in turn")
    ap.add_argument("--jobs", type=int, default=12)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pool_times-"))
    pool = WorkerPool(root)
    try:
        for index in range(args.jobs):
            layout = args.layouts[index % len(args.layouts)]
            ranks, overrides = layout_overrides(layout, **TEXT)
            start = time.perf_counter()
            result = pool.run(ranks, "steps", root / f"job{index}.pt", overrides)
            if result.returncode != 0:
                print(result.stderr[-3000:], file=sys.stderr)
                return 1
            print(f"job {index:3d}  {layout:40s} {time.perf_counter() - start:6.2f} s", flush=True)
        for ranks, running in sorted(pool.pools.items()):
            rss = subprocess.run(["ps", "--ppid", str(running.proc.pid), "-o", "rss="], capture_output=True,
                                 text=True).stdout.split()
            print(f"{ranks}-rank pool: RSS per rank {[int(kib) // 1024 for kib in rss]} MiB")
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

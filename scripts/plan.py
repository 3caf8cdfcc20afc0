"""Plan the layout of a run: every valid layout of the config's model on NGPU ranks, memory per rank, predicted
tokens/s and MFU, the best ones first (trainer/planner.py). The same as DRY_RUN=1 ./run_train.sh --plan.

    python scripts/plan.py --ngpu 64 --device h100 --gpus-per-node 8 --job.config_file configs/llama3_8b.toml \\
        --model.flavor 70B
    python scripts/plan.py --ngpu 4 --device cpu          # configs/debug_model.toml, this machine measured

--device h100|h200|a100|b200|mi300|cpu (default h100), --gpus-per-node N (default 8), --top K rows (default 10);
every other argument is a config override, as for run_train.sh.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from trainer.plan_report import plan_main  # noqa: E402


def main(argv: list[str]) -> int:
    world_size = 1
    if "--ngpu" in argv:
        i = argv.index("--ngpu")
        world_size = int(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    if "--job.config_file" not in argv:
        argv = ["--job.config_file", str(ROOT / "configs/debug_model.toml"), *argv]
    return plan_main(argv, world_size)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""torchrun for run_train.sh's multi-rank runs, with one difference: a mistake in the config ends as the ranks report
it (one line from rank 0, exit code 2) instead of being followed by torchrun's failure report (its own traceback and
a table of every rank's exit code, then exit 1).

The ranks check the config themselves (trainer/train.py: every rank reaches the same verdict, rank 0 prints it), so
a run pays for its imports and model build once, with no check in a separate process before torchrun. Any other
failure is reported by torchrun exactly as without this wrapper: `python -m trainer.launch` takes torchrun's
arguments.
"""

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

CONFIG_ERROR = 2  # trainer.train's exit code for a ConfigError (one line on rank 0's stderr)

# The agent's logger that reports the first failed rank (and the ranks it then stops) as the workers end.
_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


class _HeldRecords(logging.Filter):
    """Holds back the agent's two lines about ending workers (the rank that failed first, and the ranks it stops)
    until the outcome is known: dropped after a config error (rank 0 said it all), else emitted at the end."""

    _ENDING = ("failed (exitcode: %s) local_rank: %s (pid: %s) of binary: %s", "Sending process %s closing signal %s")

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self._ENDING:
            self.held.append(record)
            return False
        return True


def is_config_error(failure: ChildFailedError) -> bool:
    """Whether the ranks stopped on a config error: rank 0 exited 2 (it printed the line), and every other failed
    rank exited 2 as well or was stopped by the agent (a signal: negative exit code)."""
    first = failure.failures.get(0)
    return (first is not None and first.exitcode == CONFIG_ERROR
            and all(f.exitcode == CONFIG_ERROR or f.exitcode < 0 for f in failure.failures.values()))


def main(argv: list[str] | None = None) -> None:
    """`python -m trainer.launch [torchrun arguments]`."""
    logger, held = logging.getLogger(_AGENT_LOGGER), _HeldRecords()
    logger.addFilter(held)
    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except ChildFailedError as e:
        if is_config_error(e):
            held.held.clear()
            sys.exit(CONFIG_ERROR)
        raise
    finally:
        logger.removeFilter(held)
        for record in held.held:
            logger.handle(record)


if __name__ == "__main__":
    main()

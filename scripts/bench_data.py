"""What one rank's data loader costs: tokens/s delivered to rank 0 of dp = 1, 8, 64, 512 (simulated in one process:
rank 0 of a dp degree reads what it would in a real run), for the text reader (c4_test, tokenized on the fly) and
the prepared reader (training.dataset = "tokens"); the time to resume the prepared reader at step 10 and at step
10,000; and prepare throughput (MB of text per second).

    python scripts/bench_data.py                       # c4_test, the test tokenizer, seq 128
    python scripts/bench_data.py --prepare-mb 64       # prepare throughput on a 64 MB generated corpus
    python scripts/bench_data.py --clock cpu           # the loader's CPU time, on a machine shared with other jobs

Acceptance (issue 16): the prepared reader's rank 0 at dp = 512 within 1.5x of dp = 1 per delivered token, and a
resume at step 10,000 within 2x of one at step 10.
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.make_corpus import make_corpus  # noqa: E402
from trainer.data.dataloader import build_dataloader  # noqa: E402
from trainer.data.prepare import prepare  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402

warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
TOKENIZER = Path(__file__).resolve().parents[1] / "tests/assets/tokenizer"


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # the loaders run in this process (no workers)


def tokens_per_second(dataset: str, path: str | None, tokenizer: Tokenizer, seq_len: int, dp: int,
                      windows: int, repeats: int, clock=time.perf_counter) -> float:
    """Tokens/s of `windows` windows delivered to rank 0 of `dp`, from a fresh loader (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        loader = build_dataloader(dataset, path, tokenizer, seq_len, 1, 0, dp, seed=0)
        start = clock()
        it = iter(loader)
        for _ in range(windows):
            next(it)
        best = min(best, clock() - start)
    return windows * seq_len / best


def resume_seconds(path: str, tokenizer: Tokenizer, seq_len: int, batch: int, dp: int, step: int,
                   repeats: int, clock=time.perf_counter) -> float:
    """Seconds from loading rank 0's state at `step` to its first batch (best of `repeats`)."""
    best = float("inf")
    for _ in range(repeats):
        loader = build_dataloader("tokens", path, tokenizer, seq_len, batch, 0, dp, seed=0)
        state = loader.state_dict()
        state["dataset_state"] = {"dp_rank": 0, "dp_degree": dp, "windows_seen": step * batch * dp}
        start = clock()
        loader.load_state_dict(state)
        next(iter(loader))
        best = min(best, clock() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=40, help="windows rank 0 reads, text reader")
    parser.add_argument("--prepared-windows", type=int, default=2000, help="windows rank 0 reads, prepared reader")
    parser.add_argument("--dp", default="1,8,64,512")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prepare-mb", type=float, default=32, help="size of the corpus prepare is timed on")
    parser.add_argument("--num-proc", type=int, default=None, help="prepare's processes (default: every core)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="time the loaders by wall clock or by this process's CPU time (steadier under load)")
    args = parser.parse_args(argv)
    clock = CLOCKS[args.clock]
    tokenizer = Tokenizer.from_path(TOKENIZER)
    degrees = [int(d) for d in args.dp.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        prepared = str(Path(tmp) / "c4_test")
        prepare("c4_test", None, TOKENIZER, prepared, splits=("train",), num_proc=1, log=lambda _: None)

        print(f"| reader | {' | '.join(f'dp={d}' for d in degrees)} | dp={degrees[-1]} / dp={degrees[0]} "
              f"per token |\n|---|{'---|' * (len(degrees) + 1)}")
        for name, dataset, path, windows in (("text (c4_test)", "c4_test", None, args.windows),
                                             ("prepared (tokens)", "tokens", prepared, args.prepared_windows)):
            rates = [tokens_per_second(dataset, path, tokenizer, args.seq_len, d, windows, args.repeats, clock)
                     for d in degrees]
            print(f"| {name} | {' | '.join(f'{r:,.0f}' for r in rates)} | {rates[0] / rates[-1]:.2f}x |", flush=True)

        batch, dp = 8, 64
        r10, r10k = (resume_seconds(prepared, tokenizer, args.seq_len, batch, dp, s, args.repeats, clock)
                     for s in (10, 10_000))
        print(f"\nprepared reader, rank 0 of dp={dp}, local batch {batch}: resume at step 10 {r10 * 1e3:.2f} ms, "
              f"at step 10,000 {r10k * 1e3:.2f} ms ({r10k / r10:.2f}x)")

        corpus = Path(tmp) / "corpus"
        make_corpus(corpus, int(args.prepare_mb * 1e6))
        manifest = prepare("jsonl", str(corpus), TOKENIZER, Path(tmp) / "corpus_tokens", splits=("train",),
                           num_proc=args.num_proc, log=lambda _: None)
        info = manifest["splits"]["train"]
        print(f"\nprepare: {info['text_bytes'] / 1e6:.1f} MB of text, {info['tokens']:,} tokens in "
              f"{info['seconds']:.1f} s: {info['text_bytes'] / 1e6 / info['seconds']:.2f} MB/s "
              f"({args.num_proc or 'every'} core(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The baseline: a plain single-process PyTorch training loop on the same model and data, no trainer code.

Same Llama module, same packed batches, AdamW + grad clipping, nothing else. Prints one JSON line with
tokens/s and MFU measured after warm-up steps, so trainer figures can be put side by side with it:

    python scripts/plain_loop.py --flavor debugmodel --seq-len 128 --batch 8 --steps 30 --warmup 5
    python scripts/plain_loop.py --device cuda --dtype bfloat16 --dataset synthetic --compile --flavor 1B ...

--dtype bfloat16 is what the trainer does in one process: fp32 weights, the forward under bf16 autocast.
--compile compiles each transformer block, as compile.enable does in the trainer.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer.data.dataloader import build_dataloader, to_device  # noqa: E402
from trainer.data.tokenizer import Tokenizer  # noqa: E402
from trainer.metrics import memory_gib, peak_flops  # noqa: E402
from trainer.models.flavors import get_model_args  # noqa: E402
from trainer.models.llama import Transformer, flops_per_token  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", default="llama3")
    ap.add_argument("--flavor", default="debugmodel")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--tokenizer", default=str(Path(__file__).resolve().parents[1] / "tests/assets/tokenizer"))
    ap.add_argument("--dataset", default="c4_test", choices=("c4_test", "synthetic"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="bfloat16: the forward under autocast over fp32 weights")
    ap.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    ap.add_argument("--peak-flops", type=float, default=-1, help="for MFU; default: the device's (trainer.metrics)")
    args = ap.parse_args()

    torch.manual_seed(0)
    device = torch.device(args.device)
    margs = get_model_args(args.name, args.flavor)
    margs.max_seq_len = args.seq_len
    with device:
        model = Transformer(margs)
    model.init_weights(seed=0)
    if args.compile:
        for block in model.layers.values():
            block.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    tokenizer = Tokenizer.from_path(args.tokenizer) if args.dataset != "synthetic" else None
    loader = build_dataloader(args.dataset, None, tokenizer, args.seq_len, args.batch, 0, 1,
                              vocab_size=margs.vocab_size, device_type=device.type)
    data = iter(loader)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.dtype == "bfloat16"
                else contextlib.nullcontext())

    times, losses = [], []
    for step in range(args.steps):
        start = time.perf_counter()
        inputs, labels = to_device(next(data), device)
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # the sync a logging loop pays too
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    tps = args.batch * args.seq_len / step_time
    fpt = flops_per_token(margs, args.seq_len)
    peak = peak_flops(device, getattr(torch, args.dtype), args.peak_flops)
    memory = memory_gib(device)[0]  # peak CUDA reserved memory, or peak RSS on CPU
    print(json.dumps({"runner": "plain_loop", "memory_gib": round(memory, 3), "tokens_per_second": round(tps, 1), "step_time_median_s": step_time,
                      "mfu_pct": round(100 * fpt * tps / peak, 2) if peak else None, "peak_flops": peak, "threads": torch.get_num_threads(),
                      "first_loss": losses[0], "last_loss": losses[-1]}))


if __name__ == "__main__":
    main()

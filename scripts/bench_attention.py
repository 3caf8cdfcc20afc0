"""Cost of document masking on CPU: tokens/s and peak memory of causal vs block-causal attention.

    python scripts/bench_attention.py                 # the debug model, one process, seq 128, 512, 2048
    python scripts/bench_attention.py --kernels       # the attention kernel alone: causal SDPA, SDPA with the
                                                      # boolean block-causal mask, per-document SDPA

Model rows: llama3 debugmodel (causal) and debugmodel_flex_attn (block-causal; SDPA with a boolean mask on CPU),
fp32, forward + backward + AdamW on windows of the shipped corpus, ~4096 tokens per step (batch = 4096 / seq).
Each row runs in its own process, so its peak RSS is its own. Kernel rows: 16 heads of 16, batch 4096 / seq,
documents of the shipped corpus's windows.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TOKENS_PER_STEP = 4096


def _windows(seq: int, batch: int, steps: int):
    from trainer.data.dataloader import build_dataloader
    from trainer.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_path(ROOT / "tests/assets/tokenizer")
    loader = build_dataloader("c4_test", None, tokenizer, seq, batch, 0, 1, seed=0)
    it = iter(loader)
    return [next(it) for _ in range(steps)], tokenizer.eos_id


def model_row(flavor: str, seq: int, steps: int) -> dict:
    """Train `steps` + 1 steps in this process; tokens/s over the last `steps`, peak RSS."""
    from trainer.models.attention import document_ids
    from trainer.models.flavors import get_model_args
    from trainer.models.llama import Transformer

    args = get_model_args("llama3", flavor)
    args.max_seq_len = seq
    batch = max(1, TOKENS_PER_STEP // seq)
    model = Transformer(args)
    model.init_weights(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches, eos = _windows(seq, batch, steps + 1)
    block_causal = args.attn_mask_type == "block_causal"
    for i, (inputs, labels) in enumerate(batches):
        if i == 1:
            start = time.perf_counter()
        kwargs = {"document_ids": document_ids(inputs, eos)} if block_causal else {}
        loss = F.cross_entropy(model(inputs, **kwargs).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    elapsed = time.perf_counter() - start
    return {"flavor": flavor, "seq": seq, "batch": batch, "tokens_per_second": steps * batch * seq / elapsed,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "mask_mib": batch * seq * seq / 2**20 if block_causal else 0.0}


def kernel_rows(seqs: list[int], repeats: int = 3) -> list[dict]:
    """Forward + backward of the attention kernel alone, ms per call."""
    from trainer.models.attention import boolean_block_causal_mask, document_ids

    def causal(q, k, v, ids):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def boolean_mask(q, k, v, ids):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=boolean_block_causal_mask(ids))

    def per_document(q, k, v, ids):
        rows = []
        for b in range(q.shape[0]):
            lengths = torch.unique_consecutive(ids[b], return_counts=True)[1].tolist()
            rows.append(torch.cat([F.scaled_dot_product_attention(*parts, is_causal=True) for parts in
                                   zip(*(t[b:b + 1].split(lengths, dim=2) for t in (q, k, v)))], dim=2))
        return torch.cat(rows)

    out = []
    for seq in seqs:
        batch = max(1, TOKENS_PER_STEP // seq)
        batches, eos = _windows(seq, batch, 1)
        ids = document_ids(batches[0][0], eos)
        q, k, v = (torch.randn(batch, 16, seq, 16, requires_grad=True) for _ in range(3))
        for fn in (causal, boolean_mask, per_document):
            fn(q, k, v, ids).sum().backward()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                fn(q, k, v, ids).sum().backward()
            out.append({"kernel": fn.__name__, "seq": seq, "batch": batch,
                        "documents_per_window": round(float(ids[:, -1].float().mean()) + 1, 1),
                        "ms_fwd_bwd": (time.perf_counter() - start) / repeats * 1e3})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model row (after one warm-up)")
    parser.add_argument("--kernels", action="store_true", help="time the attention kernels alone")
    parser.add_argument("--row", nargs=2, metavar=("FLAVOR", "SEQ"), help=argparse.SUPPRESS)  # one row, as a child
    a = parser.parse_args()
    if a.row:
        print(json.dumps(model_row(a.row[0], int(a.row[1]), a.steps)))
        return
    if a.kernels:
        print("| seq | batch | documents per window | kernel | ms (fwd + bwd) |\n|---|---|---|---|---|")
        for r in kernel_rows(a.seq):
            print(f"| {r['seq']} | {r['batch']} | {r['documents_per_window']} | {r['kernel']} | {r['ms_fwd_bwd']:.1f} |")
        return
    print("| seq | batch | flavor | tokens/s | vs causal | peak RSS GiB | mask MiB |\n|---|---|---|---|---|---|---|")
    for seq in a.seq:
        causal_tps = None
        for flavor in ("debugmodel", "debugmodel_flex_attn"):
            child = subprocess.run([sys.executable, __file__, "--row", flavor, str(seq), "--steps", str(a.steps)],
                                   capture_output=True, text=True, check=True)
            r = json.loads(child.stdout.strip().splitlines()[-1])
            causal_tps = causal_tps or r["tokens_per_second"]
            print(f"| {seq} | {r['batch']} | {flavor} | {r['tokens_per_second']:,.0f} | "
                  f"{r['tokens_per_second'] / causal_tps:.2f} | {r['peak_rss_gib']:.2f} | {r['mask_mib']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()

"""Tensor-parallel generation: scripts/generate.py under torchrun with --tp 2 against the same script in one process
and against transformers' greedy `generate`, from an HF folder (as transformers saves it) and from a DCP folder (as
one process writes it: dcp.save({"model": state_dict})), with and without the KV cache, greedy and sampled.
"""

import json

import pytest
import torch

from tests.unit.test_generation import TOKENIZER, save_hf_llama
from trainer.data.tokenizer import Tokenizer
from trainer.models.flavors import get_model_args
from trainer.models.hf import from_hf_state_dict, load_hf_checkpoint
from trainer.models.llama import ModelArgs

# dcp.save(no_dist=True) says it assumes one process, which is what the fixture means.
pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore:torch.distributed is disabled")]

PROMPT, NEW_TOKENS = "The quick brown fox", 24
# name -> (shape, the flavor a DCP checkpoint names, or None). Both use grouped-query attention with 2 kv heads, so
# under tp=2 each rank computes (and caches) one kv head and its two query heads.
MODELS = {
    "gqa": (ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160, vocab_size=2048,
                      max_seq_len=128), None),
    "tied": (get_model_args("smollm", "debugmodel"), "smollm debugmodel"),  # tied embeddings, 4 heads, 2 kv heads
}
# case -> (model, checkpoint format, extra arguments). Greedy cases must also give transformers' tokens.
CASES = {
    "hf": ("gqa", "hf", []),
    "hf, no cache": ("gqa", "hf", ["--no-cache"]),
    "hf, sampled": ("gqa", "hf", ["--temperature", "0.9", "--top-k", "50", "--top-p", "0.95", "--seed", "3"]),
    "hf, tied": ("tied", "hf", []),
    "dcp, tied": ("tied", "dcp", []),
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Per model, made on first use: its HF folder, DCP folder (for a flavor) and transformers' greedy tokens."""
    import torch.distributed.checkpoint as dcp

    tokenizer, made = Tokenizer.from_path(TOKENIZER), {}

    def get(name: str) -> dict:
        if name not in made:
            args, flavor = MODELS[name]
            assert args.vocab_size == tokenizer.vocab_size
            root = tmp_path_factory.mktemp(name)
            hf = save_hf_llama(root / "hf", args)
            ids = tokenizer.encode(PROMPT, bos=True)
            with torch.no_grad():
                out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=NEW_TOKENS,
                                  eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.eos_id,
                                  output_scores=True, return_dict_in_generate=True)
            # Every greedy choice must be clear, or a rounding difference of the sharded matmuls could flip it.
            margin = min((s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in out.scores)
            assert margin > 1e-3, f"{name}: a greedy choice is nearly tied ({margin:.2g}); pick another seed"
            made[name] = {"hf": root / "hf", "expected": out.sequences[0, len(ids):].tolist()}
            if flavor:
                # The same weights through our HF import, saved by one process in the trainer's layout.
                ours, hf_sd = load_hf_checkpoint(root / "hf")
                dcp.save({"model": from_hf_state_dict(hf_sd, ours)}, checkpoint_id=str(root / "dcp"), no_dist=True)
                (root / "dcp" / "complete.json").write_text(json.dumps({"model": flavor}))
                made[name]["dcp"] = root / "dcp"
        return made[name]

    return get


@pytest.mark.parametrize("case", CASES)
def test_tp_generation_matches_one_process_and_transformers(case, references, pool, tmp_path):
    model, fmt, extra = CASES[case]
    ref = references(model)
    args = ["--checkpoint", str(ref[fmt]), "--tokenizer", str(TOKENIZER), "--prompt", PROMPT,
            "--max-new-tokens", str(NEW_TOKENS), "--json", *extra]
    one = pool.run(1, "generate", tmp_path / "unused", args)  # one process (in a process group of one)
    assert one.returncode == 0, one.stderr
    two = pool.run(2, "generate", tmp_path / "unused", ["--tp", "2", *args])
    assert two.returncode == 0, f"{two.stdout[-3000:]}\n{two.stderr[-6000:]}"
    lines = two.stdout.strip().splitlines()
    assert len(lines) == 1, two.stdout  # only rank 0 prints
    one, two = json.loads(one.stdout), json.loads(lines[0])
    assert (one["format"], one["tp"], two["format"], two["tp"]) == (fmt, 1, fmt, 2)
    assert two["ids"] == one["ids"] and two["text"] == one["text"]
    if "--temperature" not in extra:
        assert two["ids"] == ref["expected"]

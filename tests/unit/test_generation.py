"""KV cache and generation: cached prefill + decode against full forwards, sampling rules, and scripts/generate.py
against transformers' own greedy `generate` (HF folder) and against this process (a DCP folder saved here)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from trainer.data.tokenizer import Tokenizer
from trainer.generation import cast_weights, generate, sample_next
from trainer.models.flavors import get_model_args
from trainer.models.hf import from_hf_state_dict, hf_config_from_args, load_hf_checkpoint, save_hf_checkpoint
from trainer.models.kv_cache import KVCache
from trainer.models.llama import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "tests/assets/tokenizer"
ATOL = 1e-5
GQA = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, max_seq_len=64)
TIED = ModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=128, max_seq_len=64, tie_word_embeddings=True)


def _model(args: ModelArgs, seed: int = 0) -> Transformer:
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():  # sharper attention than the init's, so a wrong position or mask shows in the logits
        for layer in model.layers.values():
            layer.attention.wq.weight.mul_(8.0)
            layer.attention.wk.weight.mul_(8.0)
    return model.eval()


def _script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts/generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(ROOT / "scripts/generate.py"), *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args", [GQA, TIED], ids=["gqa", "tied"])
@pytest.mark.parametrize("chunks", [[20], [7, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [5, 3, 1, 6, 1, 4]],
                         ids=["prefill only", "prefill + decode", "chunked"])
def test_cached_forward_matches_full_forward(args, chunks):
    model = _model(args)
    tokens = torch.randint(0, args.vocab_size, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    cache, parts, start = KVCache(max_len=32), [], 0
    with torch.no_grad():
        full = model(tokens)
        for n in chunks:
            parts.append(model(tokens[:, start:start + n], cache=cache))
            start += n
    assert cache.start == tokens.shape[1]
    diff = (torch.cat(parts, dim=1) - full).abs().max().item()
    assert diff < ATOL, diff


def test_prefill_runs_causal_attention_without_a_mask(monkeypatch):
    # A prompt's prefill must reach SDPA as is_causal without a mask (an explicit mask rules out the flash and
    # memory-efficient kernels); decode steps are one query over every key so far, and need neither.
    calls, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kwargs):
        calls.append((q.shape[2], k.shape[2], attn_mask is None, is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    generate(_model(GQA), [1, 5, 9, 2], 3)
    n = GQA.n_layers
    assert calls == [(4, 4, True, True)] * n + [(1, 5, True, False)] * n + [(1, 6, True, False)] * n, calls


def test_cast_weights_keeps_ties_and_fp32_rope():
    model = cast_weights(_model(TIED), torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.output.weight is model.tok_embeddings.weight
    assert model.rope_cache.dtype == torch.float32
    assert len(generate(model, [1, 5, 9, 2], 5).tokens) == 5


def test_script_casts_weights_once_instead_of_autocast(tmp_path, monkeypatch):
    # --dtype bfloat16: generation runs on bf16 weights (cast once), not on fp32 weights under autocast, which would
    # cast every weight again at every token; the RoPE table stays fp32.
    import torch.distributed.checkpoint as dcp

    step = tmp_path / "step-1"
    dcp.save({"model": _model(get_model_args("llama3", "debugmodel"), seed=5).state_dict()},
             checkpoint_id=str(step), no_dist=True)
    (step / "complete.json").write_text(json.dumps({"model": "llama3 debugmodel"}))
    script, seen = _script(), {}
    real = script.generate

    def spy(model, *args, **kwargs):
        seen.update(dtypes={p.dtype for p in model.parameters()}, rope=model.rope_cache.dtype, kwargs=set(kwargs))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(script, "generate", spy)
    a = script.parse_args(["--checkpoint", str(step), "--tokenizer", str(TOKENIZER), "--prompt", "Return the",
                           "--max-new-tokens", "4", "--device", "cpu", "--dtype", "bfloat16", "--json"])
    assert script.run(a, script.init_distributed()) == 0
    assert seen["dtypes"] == {torch.bfloat16} and seen["rope"] == torch.float32, seen
    assert "autocast" not in seen["kwargs"]


def test_cache_refuses_positions_past_its_end():
    model, cache = _model(GQA), KVCache(max_len=8)
    with torch.no_grad(), pytest.raises(ValueError, match="KVCache holds 8 positions"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3}],
                         ids=["greedy", "sampled"])
def test_generate_with_and_without_cache(sampling):
    model = _model(GQA)
    with_cache = generate(model, [1, 5, 9, 2], 30, use_cache=True, keep_logits=True, **sampling)
    without = generate(model, [1, 5, 9, 2], 30, use_cache=False, keep_logits=True, **sampling)
    assert with_cache.tokens == without.tokens and len(with_cache.tokens) == 30
    diff = max((a - b).abs().max().item() for a, b in zip(with_cache.logits, without.logits))
    assert diff < ATOL, diff
    if sampling:  # the seed alone decides the draws, and a different seed draws differently
        assert generate(model, [1, 5, 9, 2], 30, **sampling).tokens == with_cache.tokens
        assert generate(model, [1, 5, 9, 2], 30, **{**sampling, "seed": 4}).tokens != with_cache.tokens


def test_generate_leaves_global_rng_alone_and_stops_at_stop_token():
    model = _model(GQA)
    state = torch.get_rng_state()
    first = generate(model, [1, 2, 3], 10, temperature=1.0, seed=0).tokens
    assert torch.equal(state, torch.get_rng_state())
    stopped = generate(model, [1, 2, 3], 10, temperature=1.0, seed=0, stop_ids=(first[3],)).tokens
    assert stopped == first[:first.index(first[3]) + 1]


def test_sample_next_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5, -1.0]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits).item() == 1  # temperature 0: greedy
    assert all(sample_next(logits, 1.0, top_k=1, generator=g).item() == 1 for _ in range(20))
    assert all(sample_next(logits, 1.0, top_p=0.01, generator=g).item() == 1 for _ in range(20))
    assert {sample_next(logits, 5.0, top_k=2, generator=g).item() for _ in range(200)} == {1, 3}
    # top_p = 0.7: token 1 holds ~0.55 of the mass, token 3 brings it to ~0.89; the rest are cut.
    assert {sample_next(logits, 1.0, top_p=0.7, generator=g).item() for _ in range(200)} == {1, 3}
    assert len({sample_next(logits, 3.0, generator=g).item() for _ in range(400)}) == 5


def save_hf_llama(path: Path, args: ModelArgs):
    """A random transformers LlamaForCausalLM of shape `args`, sharpened and saved to `path` with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig.from_dict(hf_config_from_args(args, dtype=torch.float32))
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a random model at init scale is nearly uniform: sharpen it so greedy choices are clear
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)
    model.save_pretrained(path)
    return model


def test_script_matches_transformers_greedy_generate(tmp_path):
    tokenizer = Tokenizer.from_path(TOKENIZER)
    hf = save_hf_llama(tmp_path / "hf", ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160,
                                                 vocab_size=tokenizer.vocab_size, max_seq_len=128))
    # Through our HF path both ways: import the transformers folder, export it again, generate from the export.
    args, hf_sd = load_hf_checkpoint(tmp_path / "hf")
    save_hf_checkpoint(tmp_path / "export", args, from_hf_state_dict(hf_sd, args))

    prompt, new = "The quick brown fox", 24
    proc = _run_script(["--checkpoint", str(tmp_path / "export"), "--tokenizer", str(TOKENIZER), "--prompt", prompt,
                        "--max-new-tokens", str(new), "--json"])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    ids = tokenizer.encode(prompt, bos=True)
    assert got["prompt_ids"] == ids and got["format"] == "hf"

    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new, eos_token_id=tokenizer.eos_id,
                          pad_token_id=tokenizer.eos_id)
    expected = out[0, len(ids):].tolist()
    assert got["ids"] == expected
    assert len(expected) == new or expected[-1] == tokenizer.eos_id
    assert got["completion"] == tokenizer.decode(expected)


def test_script_reads_one_process_dcp_checkpoint(tmp_path):
    import torch.distributed.checkpoint as dcp

    args = get_model_args("llama3", "debugmodel")
    args.max_seq_len = 128
    model = _model(args, seed=5)
    step = tmp_path / "checkpoint" / "step-3"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(step), no_dist=True)
    (step / "complete.json").write_text(json.dumps({"step": 3, "model": "llama3 debugmodel", "seq_len": 128}))

    tokenizer = Tokenizer.from_path(TOKENIZER)
    prompt = "Return the"
    ids = tokenizer.encode(prompt, bos=True)
    expected = generate(model, ids, 12, stop_ids=(tokenizer.eos_id,)).tokens
    # The run's checkpoint folder resolves to its newest step; the architecture comes from complete.json.
    proc = _run_script(["--checkpoint", str(tmp_path / "checkpoint"), "--tokenizer", str(TOKENIZER),
                        "--prompt", prompt, "--max-new-tokens", "12", "--json"])
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert (got["format"], got["checkpoint"], got["ids"]) == ("dcp", str(step), expected)
    assert got["text"] == tokenizer.decode(ids[1:] + expected)

    # Saved without the "model." prefix (torchtitan's flat layout) and in bf16 (an export_dtype): read as well.
    flat = tmp_path / "flat"
    dcp.save({k: v.bfloat16() for k, v in model.state_dict().items()}, checkpoint_id=str(flat), no_dist=True)
    loaded = _script().load_dcp_model(flat, args)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.bfloat16().float()), name


@pytest.mark.parametrize("extra, expected", [
    (["--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["--top-p", "1.5"], "--top-p 1.5 must be in (0, 1]"),
    ([], "pass --name and --flavor"),
    (["--name", "llama3", "--flavor", "9B"], "model.flavor='9B' is unknown"),
], ids=["max new tokens", "top-p", "no metadata", "bad flavor"])
def test_script_bad_input_is_one_line(tmp_path, capsys, extra, expected):
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": {"x": torch.zeros(1)}}, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)
    argv = ["--checkpoint", str(tmp_path / "step-1"), *extra]
    if not extra:  # one case through a fresh interpreter: the entry point, its exit code and its shutdown
        proc = _run_script(argv)
        code, stderr = proc.returncode, proc.stdout + proc.stderr
    else:  # the others through the same checks in this process (an interpreter costs ~2.5 s)
        script = _script()
        code, stderr = script.run(script.parse_args(argv), script.init_distributed()), capsys.readouterr().err
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], stderr


def test_run_folder_resolves_to_newest_complete_step(tmp_path):
    find = _script().find_checkpoint
    run = tmp_path / "checkpoint"
    for folder, files in (("step-2", (".metadata", "complete.json")), ("step-9", (".metadata",)),
                          ("export/step-5", ("config.json", "complete.json"))):
        (run / folder).mkdir(parents=True)
        for name in files:
            (run / folder / name).write_text("{}")
    # step-9 has no completeness marker (a save that did not finish): the final HF export at step 5 wins.
    assert find(run) == ("hf", run / "export/step-5")
    (run / "step-9" / "complete.json").write_text("{}")
    assert find(run) == ("dcp", run / "step-9")

"""Checkpoints with the real Trainer in one process: HF import/export against transformers, offline conversion,
keep_latest_k, never overwriting, half-written folders, and one-line errors for checkpoints that do not fit.

Multi-process resume parity, resharding and kill -9 during an async save: tests/distributed/test_checkpoint.py.
"""

import gc
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
from safetensors.torch import load_file

from trainer.checkpoint_files import MARKER
from trainer.config import ConfigError, load_config
from trainer.config.checks import CHECKPOINT_PARTS
from trainer.train import Trainer

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


def config(dump: Path, *overrides: str):
    """The debug model on synthetic data, small and fp32, checkpointing into dump/checkpoint."""
    return load_config(["--job.config_file", str(ROOT / "configs/debug_model.toml"), "--job.dump_folder", str(dump),
                        "--training.dataset", "synthetic", "--training.seq_len", "32",
                        "--training.local_batch_size", "2", "--training.mixed_precision_param", "float32",
                        "--metrics.enable_tensorboard", "false", "--checkpoint.enable", *overrides])


def train(dump: Path, *overrides: str) -> Trainer:
    trainer = Trainer(config(dump, *overrides))
    try:
        trainer.train()
    finally:
        trainer.close()
        gc.enable()  # Trainer.train collects on a schedule; the rest of the test session should not
    return trainer


def hf_debug_llama(path: Path) -> "transformers.LlamaForCausalLM":
    """A random transformers Llama of llama3 debugmodel's shape (written by hand, not from our mapping)."""
    config = transformers.LlamaConfig(
        hidden_size=256, num_hidden_layers=6, num_attention_heads=16, num_key_value_heads=16, intermediate_size=768,
        vocab_size=2048, rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=32,
        tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF inits norms to ones; random ones would show a swapped norm
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)
    return model


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return out.logits if hasattr(out, "logits") else out


TOKENS = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf_source")
    return path, hf_debug_llama(path)


def test_hf_import_then_export_gives_transformers_the_same_logits(hf_source, tmp_path):
    source, hf_model = hf_source
    train(tmp_path, "--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_in_hf",
          "--checkpoint.last_save_in_hf", "--training.steps", "0")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint/export/step-0",
                                                             attn_implementation="eager").eval()
    diff = (logits(exported, TOKENS) - logits(hf_model, TOKENS)).abs().max().item()
    print(f"HF -> trainer -> HF logits: max |diff| = {diff:.3g}")
    assert diff < ATOL


def test_hf_export_after_a_step_holds_the_trained_weights(hf_source, tmp_path):
    source, hf_model = hf_source
    trainer = train(tmp_path, "--checkpoint.initial_load_path", str(source), "--checkpoint.initial_load_in_hf",
                    "--checkpoint.last_save_in_hf", "--training.steps", "1")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "checkpoint/export/step-1",
                                                             attn_implementation="eager").eval()
    ours = logits(trainer.model.model.eval(), TOKENS)
    assert (logits(exported, TOKENS) - ours).abs().max().item() < ATOL
    assert (logits(hf_model, TOKENS) - ours).abs().max().item() > 1e-3  # the step did move the weights


def test_torchtitan_hf_export_flow(tmp_path):
    # torchtitan's flow: one run ends with an HF export (last_save_model_only + last_save_in_hf); the next starts
    # from "<checkpoint folder>/step-N" with initial_load_in_hf. Our export lives in export/step-N: the torchtitan
    # path finds it there.
    first = train(tmp_path / "a", "--training.steps", "2", "--checkpoint.last_save_model_only",
                  "--checkpoint.last_save_in_hf")
    second = train(tmp_path / "b", "--training.steps", "0", "--checkpoint.initial_load_path",
                   str(tmp_path / "a/checkpoint/step-2"), "--checkpoint.initial_load_in_hf",
                   "--checkpoint.initial_load_model_only")
    for (name, a), (_, b) in zip(first.model.model.named_parameters(), second.model.model.named_parameters()):
        assert torch.equal(a, b), name


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/convert_checkpoint.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


def convert_in_process(*args: str) -> int:
    """scripts/convert_checkpoint.py's main() in this process, its exit code: the same conversion as run_script
    without a fresh interpreter's torch import (seconds per call); run_script covers the command line once."""
    spec = importlib.util.spec_from_file_location("convert_checkpoint", ROOT / "scripts/convert_checkpoint.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        script.main(list(args))
    except SystemExit as e:
        return e.code
    return 0


def test_offline_conversion_both_ways(hf_source, tmp_path, capsys):
    source, _ = hf_source
    # HF -> DCP (script, as a command) -> initial load -> HF export (trainer): the very tensors of the source.
    proc = run_script("hf-to-dcp", str(source), str(tmp_path / "seed"), "--name", "llama3", "--flavor", "debugmodel")
    assert proc.returncode == 0, proc.stderr
    train(tmp_path / "a", "--checkpoint.initial_load_path", str(tmp_path / "seed"), "--checkpoint.last_save_in_hf",
          "--training.steps", "0")
    original = load_file(source / "model.safetensors")
    exported = load_file(tmp_path / "a/checkpoint/export/step-0/model.safetensors")
    assert original.keys() == exported.keys() and all(torch.equal(original[k], exported[k]) for k in original)

    # A full training checkpoint -> HF (script) equals the trainer's own HF export of the same step.
    train(tmp_path / "b", "--checkpoint.last_save_in_hf", "--training.steps", "2", "--checkpoint.interval", "2")
    assert convert_in_process("dcp-to-hf", str(tmp_path / "b/checkpoint/step-2"), str(tmp_path / "converted")) == 0
    by_trainer = tmp_path / "b/checkpoint/export/step-2"
    a, b = load_file(tmp_path / "converted/model.safetensors"), load_file(by_trainer / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    config_json = [json.loads((folder / "config.json").read_text()) for folder in (tmp_path / "converted", by_trainer)]
    assert config_json[0] == config_json[1]
    # Nothing is overwritten.
    capsys.readouterr()
    assert convert_in_process("dcp-to-hf", str(tmp_path / "b/checkpoint/step-2"), str(tmp_path / "converted")) == 2
    assert "nothing is overwritten" in capsys.readouterr().err


def test_keep_latest_k_resume_and_never_overwrite(tmp_path, capsys):
    folder = tmp_path / "checkpoint"
    (folder / "step-0").mkdir(parents=True)  # a partial save left by a killed run
    train(tmp_path, "--training.steps", "5", "--checkpoint.interval", "1", "--checkpoint.keep_latest_k", "2")
    assert sorted(p.name for p in folder.iterdir()) == ["export", "step-4", "step-5"]
    assert (folder / "export/step-5" / MARKER).is_file()
    marker5 = (folder / "step-5" / MARKER).read_bytes()

    # A half-written newer folder is never loaded: the run resumes from the newest complete one and has nothing to do.
    shutil.copytree(folder / "step-5", folder / "step-9")
    (folder / "step-9" / MARKER).unlink()
    capsys.readouterr()
    trainer = train(tmp_path, "--training.steps", "5", "--checkpoint.keep_latest_k", "2")
    out = capsys.readouterr().out
    assert trainer.step == 5 and f"resumed from {folder / 'step-5'} " in out
    # What checkpoint.exclude_from_loading may name is exactly what the Trainer's checkpoints hold.
    assert sorted(trainer.checkpointer.state.parts()) == sorted(CHECKPOINT_PARTS)
    assert f"{folder / 'export/step-5'} is complete already; not overwritten" in out

    # Going back with load_step retrains step 5, but the complete step-5 folder is left as it was.
    train(tmp_path, "--training.steps", "5", "--checkpoint.load_step", "4", "--checkpoint.interval", "1")
    out = capsys.readouterr().out
    assert f"resumed from {folder / 'step-4'} " in out and f"{folder / 'step-5'} is complete already" in out
    assert (folder / "step-5" / MARKER).read_bytes() == marker5


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished 2-step run of llama3 debugmodel with a full checkpoint at step 2 and a model-only export."""
    dump = tmp_path_factory.mktemp("saved")
    train(dump, "--training.steps", "2", "--checkpoint.interval", "2")
    return dump


def broken_copy(saved_run: Path, tmp_path: Path, damage) -> Path:
    shutil.copytree(saved_run / "checkpoint", tmp_path / "checkpoint")
    damage(tmp_path / "checkpoint/step-2")
    return tmp_path


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10  # in the middle of the tensors: it loads, but wrong, where nothing checks
    path.write_bytes(bytes(data))


def drop_model_name(step: Path) -> None:
    marker = json.loads((step / MARKER).read_text())
    del marker["model"]
    (step / MARKER).write_text(json.dumps(marker))


BAD_CHECKPOINTS = {  # name -> (damage to step-2, overrides of the loading run, words the one-line error holds)
    "other model, same shapes": (lambda step: None, ["--model.name", "llama2"],
                                 ["saved from model llama3 debugmodel", "this run is llama2 debugmodel"]),
    "other model, other shapes": (drop_model_name, ["--model.name", "smollm"],
                                  ["does not fit model smollm debugmodel", "layers.0.attention.wk.weight"]),
    "data file missing": (lambda step: (step / "__0_0.distcp").unlink(), [],
                          ["step-2 is corrupt: __0_0.distcp is missing", "move it out of"]),
    "truncated data file": (lambda step: truncate(step / "__0_0.distcp"), [],
                            ["step-2 is corrupt: __0_0.distcp is truncated", "the metadata needs"]),
    "a flipped bit in a data file": (lambda step: flip_bit(step / "__0_0.distcp"), [],
                                     ["step-2 is corrupt: __0_0.distcp does not match its CRC-32"]),
    "metadata corrupt": (lambda step: (step / ".metadata").write_bytes(b"garbage"), [],
                         ["step-2 is corrupt: .metadata does not match its CRC-32"]),
    "metadata missing": (lambda step: (step / ".metadata").unlink(), [], ["step-2 is corrupt: .metadata is missing"]),
    "a marker without data": (lambda step: [f.unlink() for f in step.iterdir() if f.name != MARKER], [],
                              ["step-2 is corrupt: .metadata is missing"]),
    "checksum of a data file missing": (lambda step: (step / "__0_0.distcp.crc32").unlink(), [],
                                        ["__0_0.distcp.crc32 is missing or unreadable"]),
}


@pytest.mark.parametrize("name", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_a_one_line_error(name, saved_run, tmp_path):
    damage, overrides, words = BAD_CHECKPOINTS[name]
    dump = broken_copy(saved_run, tmp_path, damage)
    with pytest.raises(ConfigError) as e:
        Trainer(config(dump, "--training.steps", "3", *overrides))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(saved_run, tmp_path, capsys):
    folder = tmp_path / "checkpoint"
    shutil.copytree(saved_run / "checkpoint", folder)
    shutil.copytree(folder / "step-2", folder / "step-4")  # a newer complete checkpoint, then a bit flips in it
    flip_bit(folder / "step-4/__0_0.distcp")
    pinned = config(tmp_path, "--training.steps", "5", "--checkpoint.load_step", "4")
    with pytest.raises(ConfigError, match=r"step-4 is corrupt: __0_0.distcp does not match its CRC-32 .*; set "
                                          r"checkpoint.load_step to another complete step, or -1 for the newest"):
        Trainer(pinned)
    capsys.readouterr()
    trainer = Trainer(config(tmp_path, "--training.steps", "5"))  # load_step unset: the newest that loads
    trainer.close()
    out = capsys.readouterr().out
    assert trainer.step == 2 and f"resumed from {folder / 'step-2'} " in out
    assert f"{folder / 'step-4'} is corrupt (__0_0.distcp does not match its CRC-32 (changed on disk since the " \
           f"save)); moved to step-4.corrupt, " \
           f"resuming from {folder / 'step-2'} instead" in out
    # kept for a look, out of the way: the run can save step 4 again, and the next resume does not trip on it
    assert sorted(p.name for p in folder.iterdir()) == ["export", "step-2", "step-4.corrupt"]


def test_model_only_save_is_no_resume_point(saved_run, tmp_path):
    cfg = ["--checkpoint.initial_load_path", str(saved_run / "checkpoint/export/step-2"),
           "--checkpoint.initial_load_model_only", "false"]
    with pytest.raises(ConfigError, match="has no optimizer state .a model-only save"):
        Trainer(config(tmp_path, *cfg))
    trainer = Trainer(config(tmp_path, *cfg[:2]))  # weights only: fine, and training starts at step 0
    trainer.close()
    assert trainer.step == 0


def test_entry_point_prints_one_line_and_exits_2(saved_run, tmp_path):
    dump = broken_copy(saved_run, tmp_path, lambda step: (step / "__0_0.distcp").unlink())
    args = ["--job.config_file", "configs/debug_model.toml", "--job.dump_folder", str(dump), "--checkpoint.enable",
            "--training.dataset", "synthetic", "--training.seq_len", "32", "--training.local_batch_size", "2",
            "--metrics.enable_tensorboard", "false"]
    proc = subprocess.run([sys.executable, "-m", "trainer.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "is corrupt: __0_0.distcp is missing" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_excluding_the_dataloader_restarts_the_data(saved_run, tmp_path):
    shutil.copytree(saved_run / "checkpoint", tmp_path / "checkpoint")
    first_batch = {}
    for name, extra in (("resumed", []), ("restarted", ["--checkpoint.exclude_from_loading", "dataloader"]),
                        ("fresh", ["--checkpoint.enable", "false"])):
        trainer = Trainer(config(tmp_path, "--training.steps", "3", *extra))
        trainer.close()
        first_batch[name] = (trainer.step, next(iter(trainer.dataloader))[0])
    assert first_batch["resumed"][0] == first_batch["restarted"][0] == 2 and first_batch["fresh"][0] == 0
    assert torch.equal(first_batch["restarted"][1], first_batch["fresh"][1])
    assert not torch.equal(first_batch["resumed"][1], first_batch["fresh"][1])

"""scripts/download_hf_assets.py without a network: which files it asks huggingface_hub for, where they land, that
HF_TOKEN is never printed, and the one-line error when the Hub cannot be reached.

What this does not cover: a real download. The first test replaces huggingface_hub.snapshot_download with a stand-in
that serves a local folder through huggingface_hub's own pattern filter; the second calls the real function with
HF_HUB_OFFLINE=1 and an empty cache.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

huggingface_hub = pytest.importorskip("huggingface_hub")
from huggingface_hub.utils import filter_repo_objects  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SECRET = "hf_not_a_real_token_0123456789"
REPO_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json",
              "README.md", "original/consolidated.00.pth"]


def script():
    spec = importlib.util.spec_from_file_location("download_hf_assets", ROOT / "scripts/download_hf_assets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("assets, expected", [
    (["tokenizer"], ["tokenizer.json", "tokenizer_config.json"]),
    (["tokenizer", "config"], ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]),
    (["safetensors"], ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json"]),
])
def test_fetches_the_asset_files_into_local_dir(assets, expected, tmp_path, monkeypatch, capsys):
    calls = []

    def fake_snapshot_download(repo_id, revision, allow_patterns, local_dir, **kwargs):
        calls.append({"repo_id": repo_id, "allow_patterns": allow_patterns, **kwargs})
        for name in filter_repo_objects(REPO_FILES, allow_patterns=allow_patterns):
            (Path(local_dir) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(local_dir) / name).write_text(name)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    script().main(["--repo_id", "meta-llama/Llama-3.1-8B", "--assets", *assets, "--local_dir", str(tmp_path)])
    dest = tmp_path / "Llama-3.1-8B"
    assert sorted(str(f.relative_to(dest)) for f in dest.rglob("*") if f.is_file()) == expected
    assert calls[0]["repo_id"] == "meta-llama/Llama-3.1-8B" and "token" not in calls[0]  # read from HF_TOKEN by hub
    out = capsys.readouterr()
    assert f"{dest}: {len(expected)} files" in out.out and SECRET not in out.out + out.err


def test_offline_without_a_copy_is_one_line_and_keeps_the_token_secret(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home"), "HF_TOKEN": SECRET}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/download_hf_assets.py"), "--repo_id",
                           "meta-llama/Llama-3.1-8B", "--local_dir", str(tmp_path / "assets")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot reach the Hub" in errors[0] and "Traceback" not in proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    assert not any(SECRET in f.read_text(errors="ignore") for f in tmp_path.rglob("*") if f.is_file())

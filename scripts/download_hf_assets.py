"""Fetch a model's tokenizer, config and/or safetensors weights from the Hugging Face Hub into a local folder.

    python scripts/download_hf_assets.py --repo_id meta-llama/Llama-3.1-8B --assets tokenizer
    python scripts/download_hf_assets.py --repo_id HuggingFaceTB/SmolLM2-1.7B --assets tokenizer config safetensors

Files land in {local_dir}/{repo name}, e.g. assets/hf/Llama-3.1-8B: point model.hf_assets_path there for the
tokenizer, and checkpoint.initial_load_path (with checkpoint.initial_load_in_hf = true) for the weights.
Gated repos need a read token in the HF_TOKEN environment variable: huggingface_hub reads it from there, and this
script never takes it as an argument, prints it or writes it anywhere.
"""

import argparse
import sys
from pathlib import Path

# Asset -> file patterns (huggingface_hub allow_patterns) in an HF model repo.
ASSETS = {
    "tokenizer": ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model"],
    "config": ["config.json", "generation_config.json"],
    "safetensors": ["*.safetensors", "model.safetensors.index.json"],
    "index": ["model.safetensors.index.json"],
}


def fail(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def patterns_for(assets: list[str]) -> list[str]:
    """allow_patterns for the named assets, in order, without repeats."""
    return list(dict.fromkeys(p for asset in assets for p in ASSETS[asset]))


def download(repo_id: str, assets: list[str], local_dir: Path, revision: str | None = None) -> Path:
    """Fetch the files of `assets` from `repo_id` into local_dir/{repo name}; returns that folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    dest = local_dir / repo_id.split("/")[-1]
    try:
        snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=patterns_for(assets), local_dir=dest)
    except GatedRepoError:
        fail(f"{repo_id} is gated: accept its license on huggingface.co and export HF_TOKEN (a read token)")
    except RepositoryNotFoundError:
        fail(f"{repo_id} not found, or private without access: check the name, or export HF_TOKEN")
    except LocalEntryNotFoundError:
        fail(f"cannot reach the Hub for {repo_id} and no copy is in {dest}; check the network or HF_HUB_OFFLINE")
    except HfHubHTTPError as e:
        fail(f"download of {repo_id} failed: HTTP {e.response.status_code if e.response is not None else '?'}")
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", required=True, help="e.g. meta-llama/Llama-3.1-8B")
    parser.add_argument("--assets", nargs="+", choices=sorted(ASSETS), default=["tokenizer"],
                        help="what to fetch (default: tokenizer)")
    parser.add_argument("--local_dir", type=Path, default=Path("assets/hf"), help="parent folder (default assets/hf)")
    parser.add_argument("--revision", help="branch, tag or commit (default: main)")
    a = parser.parse_args(argv)
    dest = download(a.repo_id, a.assets, a.local_dir, a.revision)
    files = sorted(f for f in dest.rglob("*") if f.is_file() and ".cache" not in f.relative_to(dest).parts)
    if not files:
        fail(f"{a.repo_id} has no files matching {patterns_for(a.assets)}")
    size = sum(f.stat().st_size for f in files)
    print(f"{dest}: {len(files)} files, {size / 2**20:.1f} MiB ({', '.join(f.name for f in files[:8])}"
          f"{', ...' if len(files) > 8 else ''})")


if __name__ == "__main__":
    main()

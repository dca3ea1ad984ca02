"""Download a LLaMA-family model from the Hugging Face Hub, only the files convert_hf.py needs.

    python checkpoints/download.py --repo_id TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    python checkpoints/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...   # a gated repo

writes checkpoints/ORG/NAME/ (config.json, tokenizer.model, the weights: safetensors when the repo has them,
else pytorch_model*.bin) and prints the conversion command. Needs `pip install huggingface_hub`.
"""

from pathlib import Path
from typing import Optional


from lit_lora.convert import hf_files_to_download
from lit_lora.utils import cli


def main(repo_id: str, access_token: Optional[str] = None, checkpoint_dir: Path = Path("checkpoints")) -> Path:
    """Download a Hugging Face model repository into checkpoint_dir/ORG/NAME.

    Args:
        repo_id: The repository, ORG/NAME (e.g. meta-llama/Llama-2-7b-hf, openlm-research/open_llama_3b).
        access_token: A Hugging Face token (https://huggingface.co/settings/tokens) for gated repos such as
            Llama 2; by default the HF_TOKEN environment variable or the token saved by `hf auth login`.
        checkpoint_dir: The folder that holds one sub-folder per repository.
    """
    try:
        from huggingface_hub import list_repo_files, snapshot_download
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise ImportError("Downloading needs huggingface_hub: pip install huggingface_hub") from None

    local_dir = checkpoint_dir / repo_id
    try:
        files = hf_files_to_download(list_repo_files(repo_id, token=access_token))
        print(f"Downloading {len(files)} files from {repo_id} to {local_dir}: {', '.join(files)}")
        snapshot_download(repo_id, local_dir=local_dir, allow_patterns=files, token=access_token)
    except GatedRepoError:
        raise PermissionError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, then "
                              "pass --access_token with a token from https://huggingface.co/settings/tokens") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"No repository {repo_id} on the Hugging Face Hub (or it is private: pass "
                                "--access_token)") from None
    print(f"Done. Convert the weights with:\n  python checkpoints/convert_hf.py --hf_dir {local_dir}")
    return local_dir


if __name__ == "__main__":
    cli(main)

"""Download a LLaMA-family model from the Hugging Face Hub, only the files convert_hf.py needs.

    python checkpoints/download.py --repo_id TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    python checkpoints/download.py --repo_id meta-llama/Llama-2-7b-hf --access_token hf_...   # a gated repo
    python checkpoints/download.py --repo_id openlm-research/open_llama_3b_v2 --revision COMMIT_HASH   # pinned

writes checkpoints/ORG/NAME/ (config.json, tokenizer.model, the weights: safetensors when the repo has them,
else pytorch_model*.bin) and prints the conversion command. Needs `pip install huggingface_hub`.
"""

from pathlib import Path
from typing import Optional

from lit_lora.cli import cli
from lit_lora.convert.hf import hf_files_to_download


def first_line(error: BaseException) -> str:
    """huggingface_hub's messages run over several lines (request ids, links): the first says what happened."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def main(repo_id: str, revision: str = "main", access_token: Optional[str] = None,
         checkpoint_dir: Path = Path("checkpoints")) -> Path:
    """Download a Hugging Face model repository into checkpoint_dir/ORG/NAME.

    Args:
        repo_id: The repository, ORG/NAME (e.g. meta-llama/Llama-2-7b-hf, openlm-research/open_llama_3b).
        revision: The branch, tag or commit hash to download; a commit hash pins the exact files.
        access_token: A Hugging Face token (https://huggingface.co/settings/tokens) for gated repos such as
            Llama 2; by default the HF_TOKEN environment variable or the token saved by `hf auth login`.
        checkpoint_dir: The folder that holds one sub-folder per repository.
    """
    try:
        from huggingface_hub import list_repo_files, snapshot_download
        from huggingface_hub.utils import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ImportError("Downloading needs huggingface_hub: pip install huggingface_hub") from None
    # When the Hub cannot be reached, huggingface_hub retries for about half a minute and then lets through the
    # error of the HTTP library it is built on (requests before version 1.0, httpx after), or a ConnectionError
    # (HF_HUB_OFFLINE=1), a TimeoutError, or LocalEntryNotFoundError from snapshot_download. Its own HfHubHTTPError
    # derives from that library's error classes, so they are its ancestors outside Python's builtins.
    http_library_errors = tuple(cls for cls in HfHubHTTPError.__mro__[1:] if cls.__module__ != "builtins")
    unreachable_errors = (ConnectionError, TimeoutError, LocalEntryNotFoundError, *http_library_errors)

    local_dir = checkpoint_dir / repo_id
    what = f"{repo_id} (revision {revision})"
    try:
        files = hf_files_to_download(list_repo_files(repo_id, revision=revision, token=access_token))
        print(f"Downloading {len(files)} files from {what} to {local_dir}: {', '.join(files)}")
        snapshot_download(repo_id, revision=revision, local_dir=local_dir, allow_patterns=files, token=access_token)
    except GatedRepoError:
        raise PermissionError(f"{repo_id} is gated: accept its license on https://huggingface.co/{repo_id}, then "
                              "pass --access_token with a token from https://huggingface.co/settings/tokens") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"No repository {repo_id} on the Hugging Face Hub (or it is private: pass "
                                "--access_token)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{repo_id} has no revision {revision!r}: give a branch, tag or commit hash from "
                                f"https://huggingface.co/{repo_id}/commits/main") from None
    except HfHubHTTPError as error:  # the Hub answered, with an error (a server error, a refused token, ...)
        raise OSError(f"The Hugging Face Hub refused to give {what}: {first_line(error)}. Try again later, or "
                      "check --access_token") from None
    except unreachable_errors as error:
        raise OSError(f"Could not download {what} from the Hugging Face Hub ({first_line(error)}): this machine "
                      "may be offline or behind a proxy. Connect it (or set HTTPS_PROXY) and run the same command "
                      f"again, which resumes; or copy the files from a machine that has them into {local_dir}."
                      ) from None
    print(f"Done: {what}. Convert the weights with:\n  python checkpoints/convert_hf.py --hf_dir {local_dir}")
    return local_dir


if __name__ == "__main__":
    cli(main)

"""Download a Hugging Face checkpoint into checkpoints/<repo_id> and convert it to model.pth.

    python -m scripts.download --repo_id meta-llama/Meta-Llama-3.1-8B [--hf_token TOKEN] [--model_name PRESET]

Fetches only what the conversion needs: config/tokenizer files and the weights (safetensors when
the repo has them, else pytorch_model*.bin; never Meta's consolidated.*.pth duplicates).
Gated repos (Llama) need an accepted license and a token (--hf_token or the HF_TOKEN variable).
checkpoints/ is the folder next to the code (where the default model lives), wherever the command
is started from.
"""
import argparse
import re
import sys
from pathlib import Path
from typing import Optional

from default_model import DEFAULT_CHECKPOINT
from scripts.convert_hf_checkpoint import ConversionError, convert, reason

CHECKPOINTS = DEFAULT_CHECKPOINT.parents[1]


class DownloadError(Exception):
    """A download the user can fix (no access, no network, bad repo id); reported in one line."""


def download(repo_id: str, hf_token: Optional[str] = None, root: Path = CHECKPOINTS) -> Path:
    """The repo's files needed for conversion, in root/<repo_id>; returns that folder."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise DownloadError(f"--repo_id must look like <org>/<name> (e.g. meta-llama/Meta-Llama-3.1-8B), got '{repo_id}'")
    try:
        from huggingface_hub import HfApi, snapshot_download
        # HTTPError: the HTTP client's base error (httpx's or requests'), network failures included.
        from huggingface_hub.errors import GatedRepoError, HFValidationError, HTTPError, RepositoryNotFoundError
    except ImportError:
        raise DownloadError("huggingface_hub is missing or too old; run `pip install -U huggingface_hub`") from None

    dest = root / repo_id
    try:
        files = HfApi(token=hf_token).list_repo_files(repo_id)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["pytorch_model*.bin"]
        patterns = ["*.json", "tokenizer.model", "original/tokenizer.model", *weights]
        snapshot_download(repo_id, local_dir=dest, token=hf_token, allow_patterns=patterns)
    except GatedRepoError:
        raise DownloadError(f"no access to {repo_id}: accept its license on huggingface.co, then pass --hf_token "
                            "(or set HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise DownloadError(f"{repo_id} not found (or private without a token); check --repo_id and --hf_token") from None
    except HFValidationError as e:
        raise DownloadError(f"--repo_id '{repo_id}' is not a valid Hugging Face repo id ({reason(e)}); check its spelling") from None
    except (HTTPError, OSError) as e:  # the network, the Hub, the disk; a bug of ours is none of these
        raise DownloadError(f"downloading {repo_id} failed ({reason(e)}); check the network and the free disk space, "
                            "then run the command again") from None
    return dest


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo_id", required=True,
                        help="Hugging Face repo, e.g. meta-llama/Meta-Llama-3.1-8B; downloaded into checkpoints/<repo_id> "
                             "next to the code")
    parser.add_argument("--hf_token", default=None, help="access token for gated repos (default: HF_TOKEN / saved login)")
    parser.add_argument("--model_name", default=None, help="preset name for the conversion (default: the repo's name)")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    try:
        folder = download(args.repo_id, args.hf_token)
        out = convert(folder, args.model_name)
    except (DownloadError, ConversionError) as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

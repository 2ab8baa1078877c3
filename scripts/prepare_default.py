"""Prepare the embedded default model (what the first `python generate.py` does on its own).

    python -m scripts.prepare_default [--checkpoint_dir checkpoints/SmolLM2-135M-Instruct]
"""
import argparse
import sys
from pathlib import Path

from default_model import DEFAULT_CHECKPOINT, prepare_default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, default=DEFAULT_CHECKPOINT.parent,
                        help=f"folder for model.pth and the GGUF file (default: {DEFAULT_CHECKPOINT.parent})")
    args = parser.parse_args()
    try:
        path = prepare_default(args.checkpoint_dir / "model.pth")
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {path}")


if __name__ == "__main__":
    main()

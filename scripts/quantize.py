"""Weight-only int8 (weight_quant.py): a checkpoint's block matrices (and an untied output layer)
as int8 codes with one scale per output channel, written next to the original.

    python -m scripts.quantize --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model.pth --mode int8
    python generate.py --checkpoint_path checkpoints/SmolLM2-135M-Instruct/model_int8.pth

The original checkpoint is never touched, and an existing output is never replaced.
"""
import argparse
import sys
from pathlib import Path

import torch

from atomic_write import write_atomically
from generate import Parser, UserError, read_state_dict
from weight_quant import FORMAT_KEY, WEIGHT_FORMATS, quantize_state_dict, quantized_path


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", type=Path, required=True, help="model.pth to quantize")
    p.add_argument("--mode", choices=WEIGHT_FORMATS, default="int8", help="weight format (default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="output file (default: model_<mode>.pth next to the input, where generate.py finds the "
                        "tokenizer and the folder name picks the preset)")
    return p


def run(args: argparse.Namespace) -> Path:
    checkpoint = args.checkpoint_path / "model.pth" if args.checkpoint_path.is_dir() else args.checkpoint_path
    if not checkpoint.is_file():
        raise UserError(f"checkpoint {checkpoint} not found; pass the model.pth to quantize")
    out = args.out or quantized_path(checkpoint, args.mode)
    if out.resolve() == checkpoint.resolve() or out.exists():
        raise UserError(f"{out} exists; pass another --out (nothing is overwritten)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file where the folder should be, no permission
        raise UserError(f"cannot make the folder {out.parent} for --out ({e.strerror}); pass another --out")
    state = read_state_dict(checkpoint)
    if FORMAT_KEY in state:
        raise UserError(f"{checkpoint} is already quantized ({state[FORMAT_KEY]}); quantize the original model.pth")
    quantized = quantize_state_dict(state)
    write_atomically(out, lambda tmp: torch.save(quantized, tmp))
    return out


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except UserError as e:
        sys.exit(f"error: {e}")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()

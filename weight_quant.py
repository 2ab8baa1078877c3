"""Weight-only int8: every matrix of the transformer blocks (and an untied output layer) stored as
int8 codes with one symmetric scale per output channel; embeddings and norms stay in the model's
dtype. A checkpoint says what it holds with a `weight_format` entry ("int8"); one without it is
the model's dtype.

    python -m scripts.quantize --checkpoint_path checkpoints/<name>/model.pth --mode int8   # -> model_int8.pth

Int8Linear multiplies by the codes and applies the scale to the output, one multiply per output
element: y = (x @ codes^T) * scale (linear_op.linear). On the GPU the Triton kernel
(linear_kernels.py) reads the codes and converts them in registers: no dequantized copy of the
weights exists in memory.
"""
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

import linear_op

WEIGHT_FORMATS = ("int8",)
FORMAT_KEY = "weight_format"
INT8_MAX = 127
# The linear layers that are quantized, by their name inside a block; plus an untied `output`.
BLOCK_LINEARS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def quantized_path(source: Path, weight_format: str) -> Path:
    """Where scripts.quantize writes `source` in `weight_format` by default: model.pth -> model_int8.pth."""
    return source.with_name(f"{source.stem}_{weight_format}.pth")


def quantized_source(path: Path) -> Optional[tuple[Path, str]]:
    """The (source checkpoint, weight format) whose default output `path` is, or None if its name is
    not one scripts.quantize writes."""
    stem, _, weight_format = path.stem.rpartition("_")
    if stem and weight_format in WEIGHT_FORMATS:
        return path.with_name(f"{stem}.pth"), weight_format
    return None


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (codes int8 [out, in], scale fp32 [out]): symmetric absmax per output row,
    the scale a row's absmax times the fp32 reciprocal of 127 (1 for an all-zero row)."""
    w32 = w.float()
    absmax = w32.abs().amax(dim=1)
    scale = absmax * (1.0 / INT8_MAX)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(w32 / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scale


class Int8Linear(nn.Module):
    """nn.Linear with int8 weights and one scale per output channel (and an optional bias)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.scales = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_op.linear(x, self.weight, self.scales, self.bias)


def quantized_linears(model: nn.Module) -> list[str]:
    """Names of the model's linear layers that int8 weights replace."""
    names = [f"layers.{i}.{name}" for i in range(len(model.layers)) for name in BLOCK_LINEARS]
    return names + (["output"] if model.output is not None else [])


def use_int8_linears(model: nn.Module, quantize: bool = False) -> nn.Module:
    """Swap the model's quantized linears for Int8Linear, in place. quantize=False leaves them
    empty (a model on the meta device, whose weights a checkpoint assigns); quantize=True fills
    them from the current weights."""
    for name in quantized_linears(model):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, attr)
        q = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None, device=linear.weight.device)
        if quantize:
            codes, scale = quantize_int8_per_channel(linear.weight.data)
            q.weight.data, q.scales.data = codes, scale.to(linear.weight.dtype)
            if linear.bias is not None:
                q.bias.data = linear.bias.data
        setattr(parent, attr, q)
    return model


def quantize_state_dict(state: dict) -> dict:
    """A checkpoint's state dict with the quantized linears' weights as int8 codes + fp32 scales."""
    out = dict(state)
    for key, w in state.items():
        name = key.removesuffix(".weight")
        if name == "output" or name.split(".", 2)[-1] in BLOCK_LINEARS:
            out[key], out[f"{name}.scales"] = quantize_int8_per_channel(w)
    out[FORMAT_KEY] = "int8"
    return out

"""Rotary position embeddings as Meta's Llama defines them: interleaved pairs (x[2i], x[2i+1])
rotated by position * frequency, with Llama-3.1's frequency scaling. The model rotates q and k;
compress_kv rotates its sink keys again to number the cache StreamingLLM's way."""
import math
from typing import Optional

import torch


def _scale_llama31(freqs: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.1 RoPE frequency scaling: long wavelengths slowed by `factor`, short ones kept,
    a smooth blend between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_ctx = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * freqs / factor + smooth * freqs
    out = torch.where(wavelen > old_ctx / low, freqs / factor, blended)
    return torch.where(wavelen < old_ctx / high, freqs, out)


def precompute_freqs_cis(seq_len: int, head_dim: int, base: float, rope_scaling: Optional[dict] = None) -> torch.Tensor:
    """cos/sin table [seq_len, head_dim/2, 2] in fp32.

    Angles are computed in float64: at 100K+ positions an fp32 angle is off by ~1e-2 rad.
    """
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64)[: head_dim // 2] / head_dim))
    if rope_scaling is not None:
        freqs = _scale_llama31(freqs, rope_scaling)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), freqs)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).float()


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, H, D] by freqs_cis [T, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # [B, T, H, D/2, 2]
    fc = freqs_cis.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
            xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)

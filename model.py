"""A hand-written Llama-architecture transformer (Llama 2/3, Mistral, Qwen2.5, SmolLM2).

The network knows nothing about KV-cache strategies: each Attention owns one cache object and
calls `cache.rotate_and_update(input_pos, freqs_cis, q, k, v)` (RoPE on q and k, then
`cache.update(input_pos, k, v)`; a cache may fuse the two) then `cache.attend(q, input_pos)`.
Everything a strategy changes lives behind those calls (kv_cache.py, compress_kv.py, quantize_kv.py).
"""
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import linear_op
import norm_op
from profiling import profiler_range
from rope import precompute_freqs_cis


@dataclass
class ModelArgs:
    block_size: int = 2048  # context length the model was trained for
    vocab_size: int = 32000
    n_layer: int = 32
    n_head: int = 32
    dim: int = 4096
    intermediate_size: Optional[int] = None
    n_local_heads: int = -1  # KV heads; -1 means n_head (no GQA)
    head_dim: int = 64
    rope_base: float = 10000
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # Llama-3.1 frequency scaling
    qkv_bias: bool = False  # Qwen2.5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.n_local_heads == -1:
            self.n_local_heads = self.n_head
        if self.intermediate_size is None:
            hidden = int(2 * (4 * self.dim) / 3)
            self.intermediate_size = 256 * math.ceil(hidden / 256)
        self.head_dim = self.dim // self.n_head

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        """A checkpoint folder's name picks the preset: exact match first, then the longest preset
        name contained in it (so 'Meta-Llama-3.1-8B-Instruct' finds 'llama-3.1-8b')."""
        key = name.lower()
        if key in PRESETS:
            return cls(**PRESETS[key])
        matches = [p for p in PRESETS if p in key or p in key.replace("meta-", "")]
        if not matches:
            raise ValueError(f"unknown model '{name}'; known presets: {', '.join(PRESETS)}")
        return cls(**PRESETS[max(matches, key=len)])


_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)

PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(n_layer=32, n_head=32, dim=4096, block_size=4096),
    "mistral-7b": dict(n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=32000, block_size=32768),
    "llama-3-8b": dict(block_size=8192, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256, rope_base=500000),
    "llama-3.1-8b": dict(block_size=131072, n_layer=32, n_head=32, n_local_heads=8, dim=4096, intermediate_size=14336, vocab_size=128256, rope_base=500000, rope_scaling=_LLAMA31_SCALING),
    "llama-3.2-1b": dict(block_size=131072, n_layer=16, n_head=32, n_local_heads=8, dim=2048, intermediate_size=8192, vocab_size=128256, rope_base=500000, rope_scaling=dict(_LLAMA31_SCALING, factor=32.0), tie_embeddings=True),
    "llama-3.2-3b": dict(block_size=131072, n_layer=28, n_head=24, n_local_heads=8, dim=3072, intermediate_size=8192, vocab_size=128256, rope_base=500000, rope_scaling=dict(_LLAMA31_SCALING, factor=32.0), tie_embeddings=True),
    "qwen2.5-7b": dict(block_size=32768, n_layer=28, n_head=28, n_local_heads=4, dim=3584, intermediate_size=18944, vocab_size=152064, rope_base=1000000, norm_eps=1e-6, qkv_bias=True),
    "smollm2-135m": dict(block_size=8192, n_layer=30, n_head=9, n_local_heads=3, dim=576, intermediate_size=1536, vocab_size=49152, rope_base=100000, tie_embeddings=True),
    # Tiny random configs for tests.
    "tiny": dict(block_size=512, n_layer=2, n_head=4, n_local_heads=2, dim=64, intermediate_size=128, vocab_size=256),
    "tiny-mha": dict(block_size=512, n_layer=2, n_head=4, dim=64, intermediate_size=128, vocab_size=256, qkv_bias=True),
}


# A cache factory builds one layer's cache from (batch_size, max_seq_length, n_kv_heads, head_dim,
# dtype, device, freqs_cis): strategies.cache_factory.
CacheFactory = Callable[..., nn.Module]


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = None if config.tie_embeddings else Linear(config.dim, config.vocab_size, bias=False)
        self.freqs_cis: Optional[torch.Tensor] = None

    def setup_caches(self, max_batch_size: int, max_seq_length: int, cache_factory: CacheFactory) -> None:
        """Give every layer its cache; every buffer is allocated here, once.

        max_seq_length bounds the positions (the RoPE table); a strategy may hold fewer tokens.
        """
        dtype = self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        self.freqs_cis = precompute_freqs_cis(
            max_seq_length, self.config.head_dim, self.config.rope_base, self.config.rope_scaling
        ).to(device)
        for layer in self.layers:
            layer.attention.kv_cache = cache_factory(
                batch_size=max_batch_size,
                max_seq_length=max_seq_length,
                n_kv_heads=self.config.n_local_heads,
                head_dim=self.config.head_dim,
                dtype=dtype,
                device=device,
                freqs_cis=self.freqs_cis,
            )

    def caches(self) -> list[nn.Module]:
        return [layer.attention.kv_cache for layer in self.layers]

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False, gather: bool = True) -> torch.Tensor:
        """idx [B, T] token ids at positions input_pos [T]; logits [B, T or 1, vocab] in fp32.
        Under tensor parallelism (tp.shard) each rank computes the logits of its slice of the
        vocabulary: gather=False returns that slice [B, T or 1, V/W] (tp.VocabShard says which),
        without the gather of every rank's."""
        assert self.freqs_cis is not None, "call setup_caches() first"
        freqs_cis = self.freqs_cis[input_pos]
        x, delta = self.tok_embeddings(idx), None
        for layer in self.layers:
            x, delta = layer(x, delta, input_pos, freqs_cis)
        if last_only:
            x, delta = x[:, -1:], (None if delta is None else delta[:, -1:])
        _, x = self.norm(x, delta)
        shard = getattr(self, "vocab_shard", None)  # this rank's slice of the vocabulary (tp.shard)
        if self.output is not None:  # tp.shard cut it to the slice's rows
            logits = self.output(x)
        else:  # tied embeddings: the table stays whole for the lookup; the product reads the slice's rows
            table = self.tok_embeddings.weight
            logits = F.linear(x, table if shard is None else shard.rows(table))
        if shard is None:
            return logits.float()
        logits = shard.pad(logits.float())  # [B, T, V/W]
        return shard.gather(logits) if gather else logits


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor], input_pos: torch.Tensor,
                freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream entering the block is x + delta, delta the block before's MLP output
        (None for the first block): each add happens inside the norm after it (norm_op), one
        kernel on a GPU. Returns (the stream after attention, the MLP's output) for the next
        block, or the final norm, to add the same way."""
        h, normed = self.attention_norm(x, delta)
        h, normed = self.ffn_norm(h, self.attention(normed, input_pos, freqs_cis))
        return h, self.feed_forward(normed)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        assert config.dim % config.n_head == 0
        self.n_head = config.n_head
        self.n_local_heads = config.n_local_heads
        self.head_dim = config.head_dim
        total_head_dim = (config.n_head + 2 * config.n_local_heads) * config.head_dim
        self.wqkv = Linear(config.dim, total_head_dim, bias=config.qkv_bias)
        self.wo = Linear(config.n_head * config.head_dim, config.dim, bias=False)
        self.kv_cache: Optional[nn.Module] = None

    def forward(self, x: torch.Tensor, input_pos: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        kv_size = self.n_local_heads * self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * self.head_dim, kv_size, kv_size], dim=-1)
        q = q.view(bsz, seqlen, self.n_head, self.head_dim)
        k = k.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        v = v.view(bsz, seqlen, self.n_local_heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]

        q = self.kv_cache.rotate_and_update(input_pos, freqs_cis, q, k, v)  # RoPE on q and k, then update
        with profiler_range("kv_attend"):
            y = self.kv_cache.attend(q, input_pos)  # [B, H, T, D]
        y = y.transpose(1, 2).reshape(bsz, seqlen, self.n_head * self.head_dim)
        return self.wo(y)


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs) -> None:
        super().__init__()
        self.w1 = Linear(config.dim, config.intermediate_size, bias=False)
        self.w3 = Linear(config.dim, config.intermediate_size, bias=False)
        self.w2 = Linear(config.intermediate_size, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # silu(w1 x) * w3 x as one product over both weights (on a GPU one kernel, not three)
        return self.w2(linear_op.gated_linear(x, self.w1.weight, self.w3.weight, self.w1.scales, self.w3.scales))


class Linear(nn.Linear):
    """nn.Linear through linear_op: on the GPU a decode step's products run the Triton kernel with
    committed configs (linear_kernels.py), the same in every compile."""

    scales = None  # weight_quant.Int8Linear's per-channel scales; the model's dtype has none

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_op.linear(x, self.weight, None, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the norm of x + delta); without delta (x, the norm of x)."""
        return norm_op.add_rms_norm(x, delta, self.weight, self.eps)

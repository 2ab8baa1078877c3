"""compress_kv: StreamingLLM. Keep the first `sink_size` tokens and a sliding window of the last
`window_size`; drop the middle. Memory is fixed whatever the length of the text.

Positions (`rope="streaming"`, the default): StreamingLLM gives the cached tokens positions by
their order in the cache, so no query-key distance exceeds sink + window. RoPE scores depend only
on distances, and window tokens keep their true distance to the query under that renumbering;
only the sink's distances shrink, to (sink + window - 1 - j) for sink slot j. So keys are stored
rotated at their absolute positions and the sink is scored as if the query stood at position
min(P, sink + window - 1). That is StreamingLLM's attention, exactly, without re-rotating the
window every step. `rope="original"` keeps absolute distances everywhere (for comparison).
"""
import torch

from decode_attention import attention_reference, decode_attention
from rope import apply_rotary_emb
from sink_window import SinkWindowCache

ROPE_MODES = ("streaming", "original")


class CompressedCache(SinkWindowCache):
    def __init__(self, batch_size, n_kv_heads, head_dim, dtype, device, freqs_cis, sink_size, window_size, rope="streaming",
                 decode_kernels=None, **_):
        super().__init__(batch_size, n_kv_heads, head_dim, dtype, device, sink_size, window_size, evict_block=1,
                         decode_kernels=decode_kernels)
        assert rope in ROPE_MODES
        self.streaming = rope == "streaming"
        self.freqs_cis = freqs_cis  # the model's [max_seq, D/2, 2] table, shared

    def sink_shift(self, input_pos: torch.Tensor) -> torch.Tensor:
        """How far each query sits past the last cache-order position (0 with rope=original)."""
        if not self.streaming:
            return torch.zeros_like(input_pos)
        return (input_pos - (self.sink_size + self.window_size - 1)).clamp(min=0)

    def attend(self, q, input_pos):
        bsz, _, t, _ = q.shape
        s = self.sink_size
        shift = self.sink_shift(input_pos)  # [T]
        if self.kernel_step(q):
            # One query: move the sink keys forward by the shift instead of the query back.
            sink_k = apply_rotary_emb(self.exact_k[:bsz, :, :s].transpose(1, 2), self.freqs_cis[shift].expand(s, -1, -1))
            k = torch.cat([sink_k.transpose(1, 2), self.exact_k[:bsz, :, s:]], dim=2)
            mask, _ = self.take_decode_validity()
            return decode_attention(q[:, :, 0], k, self.exact_v[:bsz], exact_len=None, exact_mask=mask)[:, :, None]

        sink, window = self.attention_inputs(input_pos, bsz)
        back = self.freqs_cis[shift] * torch.tensor([1.0, -1.0], device=q.device)  # rotation by -shift
        q_sink = apply_rotary_emb(q.transpose(1, 2), back).transpose(1, 2)
        return attention_reference([(q_sink, *sink), (q, *window)])

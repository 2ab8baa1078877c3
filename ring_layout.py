"""Where each token of a sink + ring cache lives (sink_window.py), as elementwise functions of its
position; the cache, ring_append's reference and (in Triton, the same arithmetic) its kernel use
these rules.

A token at position p lives in sink slot p if p < sink; otherwise, while it is still exact, in
ring slot sink + (p - sink) % ring, where ring = window + evict_block - 1. Tokens leave the exact
slots in blocks of evict_block, oldest first, once a whole block is older than the window.
"""
import torch


def slot_of(pos: torch.Tensor, sink: int, ring: int) -> torch.Tensor:
    """Exact slot of the token at `pos` (elementwise): the sink keeps slot p, the ring wraps."""
    return torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, ring))


def slot_positions(pos: torch.Tensor, n_slots: int, sink: int, window: int, evict_block: int) -> torch.Tensor:
    """Position held by each exact slot once the token at scalar-tensor `pos` is written ([n_slots],
    the last one being the trash slot); -1 where a slot holds nothing valid."""
    ring = window + evict_block - 1
    slots = torch.arange(n_slots, device=pos.device)
    ring_pos = pos - torch.remainder(pos - slots, ring)
    held = torch.where(slots < sink, slots, ring_pos)
    valid = (held <= pos) & (held >= 0) & (slots < n_slots - 1)
    valid &= (slots < sink) | (held >= sink + n_evicted(pos, sink, window, evict_block))
    return torch.where(valid, held, torch.full_like(held, -1))


def n_evicted(pos: torch.Tensor, sink: int, window: int, evict_block: int) -> torch.Tensor:
    """Non-sink tokens no longer exact once the token at `pos` is in (elementwise)."""
    past_window = (pos - sink - window + 1).clamp(min=0)
    return torch.div(past_window, evict_block, rounding_mode="floor") * evict_block

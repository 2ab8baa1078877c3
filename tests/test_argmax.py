"""The decode step's two-stage argmax (argmax.py) against torch.argmax, ties included."""
import torch
from hypothesis import given
from hypothesis import strategies as st

import argmax


@given(rows=st.integers(1, 3), width=st.integers(1, 40_000), levels=st.sampled_from([3, 1000, None]),
       seed=st.integers(0, 2**31 - 1))
def test_equals_torch_argmax(rows, width, levels, seed):
    """Any width (one stage below argmax.GROUPS * MIN_GROUP, padded groups above); few distinct
    values (many ties, where the lowest index must win) or continuous ones; -inf entries as a
    top-k mask leaves them."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, width, generator=g)
    if levels is not None:
        scores = torch.randint(0, levels, (rows, width), generator=g).float()
    scores[torch.rand(rows, width, generator=g) < 0.3] = -float("inf")
    assert torch.equal(argmax.argmax(scores), scores.argmax(dim=-1, keepdim=True))


def test_llama3_vocabulary_compiles_to_the_same_choice():
    """128256 logits, as the decode step sees them, eager and compiled; every row all -inf but one entry."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 128256, generator=g).bfloat16().float()
    scores[1] = -float("inf")
    scores[1, 128255] = 0.0
    want = scores.argmax(dim=-1, keepdim=True)
    assert torch.equal(argmax.argmax(scores), want)
    assert torch.equal(torch.compile(argmax.argmax, fullgraph=True)(scores), want)

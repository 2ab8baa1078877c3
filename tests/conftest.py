"""Shared fixtures and test settings.

Hypothesis runs derandomized (examples drawn from a fixed seed, no example database), so a run's
result does not depend on luck or on what an earlier run in the same clone found. To search for
new failures set HYPOTHESIS_PROFILE=explore (random, with the database) or pass
--hypothesis-seed=N.
"""
import os

import pytest
import torch
from hypothesis import settings

from default_model import DEFAULT_CHECKPOINT, prepare_default

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter (tests/test_decode_attention.py,
    # tests/test_ring_append.py); it must be chosen before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def default_checkpoint():
    """model.pth of the real default model, prepared (downloaded and converted) on first use."""
    return prepare_default(DEFAULT_CHECKPOINT)

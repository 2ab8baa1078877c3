"""Shared fixtures and test settings.

Hypothesis runs derandomized (examples drawn from a fixed seed, no example database), so a run's
result does not depend on luck or on what an earlier run in the same clone found. To search for
new failures set HYPOTHESIS_PROFILE=explore (random, with the database) or pass
--hypothesis-seed=N.
"""
import os

import pytest
from hypothesis import settings

from default_model import DEFAULT_CHECKPOINT, prepare_default

settings.register_profile("repeatable", derandomize=True, database=None)
settings.register_profile("explore")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))


@pytest.fixture(scope="session")
def default_checkpoint():
    """model.pth of the real default model, prepared (downloaded and converted) on first use."""
    return prepare_default(DEFAULT_CHECKPOINT)

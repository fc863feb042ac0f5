import os

import pytest
import torch

# Warm inductor cache between runs (torch.compile tests compile C++ on CPU).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "inductor-cache"))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield

import hashlib
import os
from pathlib import Path

import pytest
import torch

import gmvq_ext


def _build_fingerprint() -> str:
    """The compiled library and the fake kernels: what inductor's caches do not key on."""
    package = Path(gmvq_ext.__file__).parent
    digest = hashlib.sha1()
    for path in sorted(package.glob("_C*")) + [package / "ops.py"]:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Warm inductor cache between runs (torch.compile tests compile C++ on CPU), one per
# build: a cache filled by an earlier build of the ops replayed stale graphs (seen as
# "shape '[94016217451600, ...]' is invalid" in a compiled training step).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).parent.parent / "build" / "inductor-cache" /
                                                     _build_fingerprint()))


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield

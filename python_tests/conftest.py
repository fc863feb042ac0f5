import hashlib
import importlib.util
import os
from pathlib import Path


def _build_fingerprint() -> str:
    """The compiled library and the package's Python (the fake kernels, the quantizers' traced
    code): what inductor's caches do not key on fully.
    Found without importing gmvq_ext: importing it (and torch) fixes inductor's cache
    directory, so the variable below must be set first."""
    package = Path(importlib.util.find_spec("gmvq_ext").origin).parent
    digest = hashlib.sha1()
    for path in sorted(package.glob("_C*")) + sorted(package.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# Warm inductor cache between runs (torch.compile tests compile C++ on CPU), one per
# build of the ops and their Python, so that no test reads graphs another version compiled.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(__file__).parent.parent / "build" / "inductor-cache" /
                                                     _build_fingerprint()))

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread for the test: tiny models and runs are dominated by OpenMP
    overhead on a shared machine (and their results must not depend on it anyway).
    A file uses it for every test with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

"""Test-wide set-up: Triton runs in its CPU interpreter, kernels go to a per-session cache."""

import os
import sys
from pathlib import Path

# Before anything imports triton: the interpreter is how Triton kernels run without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (randprog) import as modules

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny models: torch's thread pool only adds contention on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """A fresh kernel cache for the session, so tests see cold compiles and never a user's files."""
    root = tmp_path_factory.mktemp("autolr-cache")
    old = os.environ.get("AUTOLR_CACHE")
    os.environ["AUTOLR_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("AUTOLR_CACHE", None)
    else:
        os.environ["AUTOLR_CACHE"] = old

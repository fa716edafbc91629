"""Shared test setup: verify the IR after every pass, and keep the cache in a per-session folder.

What the tests run (every built-in optimizer, its configurations and references, every backend
and its flags) is one registry, tests/optimizers.py: parametrize from it, never copy it."""
import os
import tempfile

os.environ.setdefault("OPTCOMPILE_VERIFY", "1")
os.environ.setdefault("OPTCOMPILE_CACHE_DIR", tempfile.mkdtemp(prefix="optcompile-test-cache-"))
# subprocesses (cache and distributed workers, CLI runs) import the checkout under test, not the
# one the venv's editable install points at (another worktree: other specs, other cache keys)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")]))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private, empty cache for tests that inspect cache files."""
    d = tmp_path / "cache"
    monkeypatch.setenv("OPTCOMPILE_CACHE_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors, many small ops: a second intra-op thread only adds synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

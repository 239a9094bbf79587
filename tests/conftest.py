import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# the embedded corpus and base are built once per machine and cached; tests use their own cache
os.environ.setdefault("COMIGS_CACHE_DIR", str(Path(os.environ.get("TMPDIR", "/tmp")) / "comigs_test_cache"))
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "data" / "tiktoken_cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# submitit configures logging when first imported, closing the handlers that exist then; absl's
# (dp-accounting imports it) holds the stream pytest captured when it was made, and closing that
# one ends the session with "I/O operation on closed file" (e.g. tests/test_privacy.py before
# tests/test_config.py). Imported first, submitit finds no handler to close.
import submitit  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _no_leftover_process_group():
    """A test that fails mid-way must not leave a process group to the next one."""
    yield
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


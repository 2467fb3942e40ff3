"""Shared fixtures; the environment is set here, before anything imports rerankd."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# Set before anything imports rerankd or huggingface: offline, and a cache of our own so
# tests never depend on (or pollute) ~/.cache. Child sidecar processes inherit both.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "RERANKD_CACHE" not in os.environ:
    os.environ["RERANKD_CACHE"] = tempfile.mkdtemp(prefix="rerankd-test-cache-")

from tests.helpers import dl19_candidates, write_tiny_checkpoint


@pytest.fixture(scope="session")
def dl19() -> list[tuple[str, list[tuple[str, str]]]]:
    return dl19_candidates()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-ce"))

"""Model files rerankd writes are readable as the umask allows (safetensors alone writes
0600, which a sidecar running as another user could not open)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from safetensors.torch import load_file

from rerankd.engine.checkpoint import write_safetensors
from rerankd.train.modeling import save_safetensors


def test_safetensors_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_safetensors(tmp_path / "a.safetensors", {"w": torch.ones(2)}, {"format": "pt"})
        save_safetensors(tmp_path / "b.safetensors", {"w": torch.ones(2)}, {})
        os.umask(0o077)
        write_safetensors(tmp_path / "c.safetensors", {"w": torch.ones(2)})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.safetensors": 0o644, "b.safetensors": 0o644, "c.safetensors": 0o600}
    assert torch.equal(load_file(str(tmp_path / "b.safetensors"))["w"], torch.ones(2))

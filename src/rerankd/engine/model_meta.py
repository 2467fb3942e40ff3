"""`rerankd.json`: what rerankd records beside a checkpoint's weights.

Training length (`max_length`), Matryoshka heads, pooling and LoRA (`matryoshka`), tensors
read from elsewhere (`external_tensors`), provenance. One reader for every consumer, and
free of torch so that naming or configuring a model stays light.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rerankd.errors import ModelLoadError

META_FILE = "rerankd.json"


def read_meta(folder: Path) -> dict[str, Any]:
    """The folder's rerankd.json as a dict ({} where there is none, or where it holds no
    JSON object); a clear error if it is not JSON."""
    path = folder / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
    return meta if isinstance(meta, dict) else {}

"""An optional LRU cache of raw scores, keyed by model, scoring options, query and document.

Rerank traffic repeats itself (the same popular queries over the same top documents), and
a cross-encoder score is a pure function of (weights, options, query, document): caching
it is exact. Keys are SHA-256 digests, so memory is bounded by entries and bytes whatever
the text sizes; the model's weight fingerprint is part of the key so a new model never
reads an old model's scores.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

# digest (32 bytes) + float + OrderedDict node overhead, measured roughly with tracemalloc
_ENTRY_BYTES = 32 + 24 + 100


@dataclass(frozen=True)
class CacheConfig:
    max_entries: int = 0  # 0 = cache off
    max_bytes: int = 64 << 20


class ScoreCache:
    """Thread-safe LRU: `get` and `put` many keys at once (one lock round-trip each)."""

    def __init__(self, config: CacheConfig) -> None:
        self.max_entries = min(config.max_entries, max(0, config.max_bytes // _ENTRY_BYTES))
        self._data: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def bytes(self) -> int:
        return len(self._data) * _ENTRY_BYTES

    @staticmethod
    def keys(scope: str, query: str, documents: list[str]) -> list[bytes]:
        """One key per document; `scope` names the model and every score-changing option."""
        prefix = hashlib.sha256(f"{scope}\x00{query}\x00".encode()).digest()
        return [hashlib.sha256(prefix + d.encode()).digest() for d in documents]

    def get_many(self, keys: list[bytes]) -> dict[int, float]:
        found: dict[int, float] = {}
        with self._lock:
            for i, k in enumerate(keys):
                v = self._data.get(k)
                if v is not None:
                    self._data.move_to_end(k)
                    found[i] = v
            self.hits += len(found)
            self.misses += len(keys) - len(found)
        return found

    def put_many(self, items: list[tuple[bytes, float]]) -> None:
        with self._lock:
            for k, v in items:
                self._data[k] = v
                self._data.move_to_end(k)
            while len(self._data) > self.max_entries:
                self._data.popitem(last=False)

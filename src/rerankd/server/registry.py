"""What a server holds: rerankers by name (the first is the default) and encoders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rerankd.engine.reranker import Reranker
from rerankd.errors import UnknownModelError


@dataclass
class Registry:
    rerankers: dict[str, Reranker] = field(default_factory=dict)
    dense: dict[str, Any] = field(default_factory=dict)
    sparse: dict[str, Any] = field(default_factory=dict)
    default_reranker: str = ""

    def add_reranker(self, model: Reranker) -> None:
        if model.name in self.rerankers:
            raise ValueError(f"two models named {model.name!r}; give each a distinct --name")
        self.rerankers[model.name] = model
        self.default_reranker = self.default_reranker or model.name

    def reranker(self, name: str) -> Reranker:
        if not name:
            name = self.default_reranker
        try:
            return self.rerankers[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown model {name!r}; loaded models: {sorted(self.rerankers)}"
            ) from None

    def encoder(self, kind: str, name: str) -> Any:
        table = self.dense if kind == "dense" else self.sparse
        if not table:
            raise UnknownModelError(f"this server has no {kind} encoder loaded")
        if not name:
            return next(iter(table.values()))
        try:
            return table[name]
        except KeyError:
            raise UnknownModelError(
                f"unknown {kind} encoder {name!r}; loaded: {sorted(table)}"
            ) from None

    def close(self) -> None:
        for model in self.rerankers.values():
            model.close(drain=True)

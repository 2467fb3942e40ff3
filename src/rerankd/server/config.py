"""`rerankd serve` settings: every flag also reads a `RERANKD_*` environment variable.

Precedence: command-line flag > environment variable > default. The table in the README
is generated from `FLAGS`, so docs and behaviour cannot drift.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rerankd.engine.shipped import DEFAULT_RERANKER

DEFAULT_MODEL = DEFAULT_RERANKER
DEFAULT_DENSE = "bundled:all-minilm-l6-v2"
DEFAULT_SPARSE = "bundled:splade-tiny"


@dataclass(frozen=True)
class Flag:
    name: str  # flag without dashes, e.g. "max-documents"
    type: type
    default: Any
    help: str
    # Repeatable flags: given several times, or comma-separated in the environment variable.
    repeatable: bool = False

    @property
    def env(self) -> str:
        return "RERANKD_" + self.name.replace("-", "_").upper()

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")


FLAGS: tuple[Flag, ...] = (
    Flag(
        "model",
        str,
        (DEFAULT_MODEL,),
        "cross-encoder [NAME=]rerankd-NAME|folder|hub-id|bundled:NAME; repeatable, first = default",
        repeatable=True,
    ),
    Flag("name", str, "", "name of the first model if it has no NAME= (default: last path part)"),
    Flag("host", str, "127.0.0.1", "address to bind; 0.0.0.0 only when you mean it"),
    Flag("port", int, 50051, "gRPC port (0 = pick a free one and print it)"),
    Flag("http-port", int, 8080, "HTTP/JSON API and /metrics port (0 = pick a free one, -1 = off)"),
    Flag("backend", str, "auto", "auto | torch | onnx (auto: torch on CUDA, onnx on CPU)"),
    Flag("precision", str, "auto", "auto | fp32 | bf16 | fp16 | int8"),
    Flag("device", str, "auto", "auto | cpu | cuda | cuda:N"),
    Flag(
        "threads",
        int,
        0,
        "CPU threads for inference in total (0 = every core; set it to a container's CPU limit)",
    ),
    Flag(
        "workers",
        int,
        0,
        "batches scored at once, onnx backend only, sharing --threads (0 = one "
        "single-threaded worker per thread)",
    ),
    Flag(
        "max-length",
        int,
        0,
        "default tokens per (query, document) pair; 0 = the model's own: the length it was "
        "trained on (`max_length` in its rerankd.json, 192 for rerankd-minilm-l6), else 512",
    ),
    Flag("max-documents", int, 1000, "documents per request"),
    Flag("max-query-chars", int, 8192, "characters per query"),
    Flag("max-document-chars", int, 100_000, "characters per document"),
    Flag("max-batch-tokens", int, 1024, "padded tokens per inference batch"),
    Flag("max-batch-size", int, 32, "pairs per inference batch"),
    Flag("max-queued-pairs", int, 8192, "pairs waiting before RESOURCE_EXHAUSTED"),
    Flag("cache-entries", int, 0, "score cache size in entries per model (0 = off)"),
    Flag("cache-bytes", int, 64 << 20, "score cache bound in bytes per model"),
    Flag("max-message-bytes", int, 32 << 20, "largest gRPC message or HTTP body accepted"),
    Flag("dense-encoder", str, DEFAULT_DENSE, "dense encoder for Embed ('' to disable)"),
    Flag(
        "sparse-encoder", str, DEFAULT_SPARSE, "sparse (SPLADE) encoder for Embed ('' to disable)"
    ),
    Flag("auth-token-file", str, "", "bearer tokens, one per line (or env RERANKD_AUTH_TOKENS)"),
    Flag("tls-cert", str, "", "PEM certificate: serve gRPC and HTTP over TLS"),
    Flag("tls-key", str, "", "PEM private key of --tls-cert"),
    Flag("tls-client-ca", str, "", "PEM CA: require client certificates it signed (mTLS)"),
    Flag("grace", float, 10.0, "seconds to drain in-flight calls on shutdown"),
    Flag("log-level", str, "INFO", "DEBUG | INFO | WARNING | ERROR"),
)


@dataclass(frozen=True)
class ServeConfig:
    model: tuple[str, ...] = (DEFAULT_MODEL,)
    name: str = ""
    host: str = "127.0.0.1"
    port: int = 50051
    http_port: int = 8080
    backend: str = "auto"
    precision: str = "auto"
    device: str = "auto"
    threads: int = 0
    workers: int = 0
    max_length: int = 0
    max_documents: int = 1000
    max_query_chars: int = 8192
    max_document_chars: int = 100_000
    max_batch_tokens: int = 1024
    max_batch_size: int = 32
    max_queued_pairs: int = 8192
    cache_entries: int = 0
    cache_bytes: int = 64 << 20
    max_message_bytes: int = 32 << 20
    dense_encoder: str = DEFAULT_DENSE
    sparse_encoder: str = DEFAULT_SPARSE
    auth_token_file: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    grace: float = 10.0
    log_level: str = "INFO"


def add_serve_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    for flag in FLAGS:
        raw = env.get(flag.env)
        help_text = f"{flag.help} [env {flag.env}, default {flag.default!r}]"
        if flag.repeatable:
            default = tuple(v.strip() for v in raw.split(",") if v.strip()) if raw else flag.default
            parser.add_argument(
                f"--{flag.name}", type=flag.type, action="append", default=None, help=help_text
            )
            parser.set_defaults(**{f"_{flag.dest}_default": default})
            continue
        default = flag.type(raw) if raw is not None else flag.default
        parser.add_argument(f"--{flag.name}", type=flag.type, default=default, help=help_text)


def model_specs(cfg: ServeConfig) -> list[tuple[str | None, str]]:
    """(name or None, source) per `--model`; `--name` names the first one if it has none."""
    specs: list[tuple[str | None, str]] = []
    for i, entry in enumerate(cfg.model):
        name, sep, source = entry.partition("=")
        if not sep or "/" in name or name.startswith("bundled:"):
            name, source = "", entry  # a path or source that merely contains "="
        specs.append((name or (cfg.name if i == 0 else "") or None, source))
    return specs


def parse_serve_args(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> ServeConfig:
    parser = argparse.ArgumentParser(prog="rerankd serve")
    try:
        add_serve_arguments(parser, os.environ if env is None else env)
    except ValueError as exc:
        parser.error(f"bad RERANKD_* environment value: {exc}")
    ns = parser.parse_args(argv)
    values = {}
    for f in FLAGS:
        value = getattr(ns, f.dest)
        if f.repeatable:
            value = tuple(value) if value else getattr(ns, f"_{f.dest}_default")
        values[f.dest] = value
    if values["max_length"] < 0:
        parser.error("--max-length must be >= 0 (0 = the model's own default)")
    return ServeConfig(**values)

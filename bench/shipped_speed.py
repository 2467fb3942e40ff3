"""Speed of rerankd's shipped rerankers against each other, as they are served.

    python bench/shipped_speed.py [--queries 8] [--rounds 5] [--backend auto]
                                  [--model NAME=PATH ...] [--json out.json]

Issue #6 asks for two ratios, both against the full `rerankd-minilm-l6` measured in the same
run: its own depth 2 (Rerank option `depth`) at least 2.5x faster, and the distilled
`rerankd-tiny-l2` at least 3x faster. `--model NAME=PATH` adds a candidate folder (a trial
student) to the same rounds.

Every model runs in its own `rerankd serve` child process on 127.0.0.1 at its own default
length (its `max_length`, 192 tokens for both shipped models) on the default backend, and
is called over gRPC with `RerankClient`, so the figures include tokenisation, batching and
the gRPC hop. Requests are TREC DL 2019 queries with their BM25 top-100 (../shared/data).
All sidecars start first; then each round sends the request list to each configuration in
turn (the order reversed every other round), with the score cache off. A configuration's
speed is its median round; its ratio is the median of its per-round ratios to the full
teacher, so drift on a busy machine moves both sides of a round instead of the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank_throughput import DATA, load_requests, summary

TEACHER = "rerankd-minilm-l6"
#: (label, model, depth option, the ratio to the full teacher #6 asks for)
SHIPPED = [
    (f"{TEACHER} full", TEACHER, 0, None),
    (f"{TEACHER} depth 2", TEACHER, 2, 2.5),
    ("rerankd-tiny-l2", "rerankd-tiny-l2", 0, 3.0),
]


def parse_extra(specs: list[str]) -> list[tuple[str, str, int, float | None]]:
    """`NAME=PATH` -> a row measured alongside the shipped ones (held to the student's 3x)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model wants NAME=PATH, got {spec!r}")
        if not Path(path).is_dir():
            raise SystemExit(f"--model {spec!r}: {path} is not a folder")
        out.append((name, path, 0, 3.0))
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=8, help="DL19 queries (100 candidates each)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--backend", default="auto")
    p.add_argument("--model", action="append", default=[], help="NAME=PATH: another model")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    if ns.rounds < 1 or ns.queries < 1:
        p.error("--rounds and --queries must be >= 1")
    rows = SHIPPED + parse_extra(ns.model)
    if not DATA.exists():
        print(f"skip: {DATA} not found", file=sys.stderr)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sidecars inherit it
    from rerankd import RerankClient
    from rerankd.server.process import spawn_sidecar

    requests = load_requests(ns.queries)
    pairs = sum(len(d) for _, d in requests)
    models = list(dict.fromkeys(m for _, m, _, _ in rows))
    sidecars = {}
    try:
        for m in models:
            sidecars[m] = spawn_sidecar(
                [
                    "--model", m, "--backend", ns.backend, "--cache-entries", "0",
                    "--dense-encoder", "", "--sparse-encoder", "", "--log-level", "WARNING",
                ]
            )  # fmt: skip
        clients = {m: RerankClient(s.address, timeout=600) for m, s in sidecars.items()}
        infos = {m: c.list_models()[0] for m, c in clients.items()}
        rates: dict[str, list[float]] = {label: [] for label, *_ in rows}
        lat: dict[str, list[float]] = {label: [] for label, *_ in rows}
        for _label, m, depth, _ in rows:  # warm every configuration (ONNX graphs per depth)
            clients[m].rerank(*requests[0], depth=depth)
        for r in range(ns.rounds):
            for label, m, depth, _ in rows if r % 2 == 0 else rows[::-1]:
                t0 = time.perf_counter()
                for q, docs in requests:
                    t = time.perf_counter()
                    clients[m].rerank(q, docs, depth=depth)
                    lat[label].append(time.perf_counter() - t)
                rates[label].append(pairs / (time.perf_counter() - t0))
        for c in clients.values():
            c.close()
    finally:
        for s in sidecars.values():
            s.stop()
    base = rates[rows[0][0]]
    report = {"queries": len(requests), "rounds": ns.rounds, "rows": []}
    print(
        f"\nDL19 BM25 top-100, {len(requests)} queries, {ns.rounds} rounds, "
        f"{os.cpu_count()} CPU cores\n"
    )
    print("| model | backend | max_length | pairs/s | p50 ms/request | x full teacher | target |")
    print("|---|---|---:|---:|---:|---:|---|")
    verdicts = []
    for label, m, _, target in rows:
        ratios = [a / b for a, b in zip(rates[label], base, strict=True)]
        ratio = statistics.median(ratios)
        s = summary(pairs, pairs / statistics.median(rates[label]), lat[label])
        info = infos[m]
        goal = (
            "" if target is None else f">= {target:g}x: {'meets' if ratio >= target else 'MISSES'}"
        )
        print(
            f"| {label} | {info.backend} {info.precision} | {info.default_max_length} "
            f"| {s['pairs_s']:.0f} | {s['p50_ms']:.0f} | {ratio:.2f} | {goal} |"
        )
        if target is not None:
            rounds = ", ".join(f"{x:.2f}" for x in ratios)
            verdicts.append(f"{label}: {ratio:.2f}x the full teacher (rounds {rounds}); {goal}")
        report["rows"].append(
            {
                "label": label,
                "model": m,
                **s,
                "ratio": ratio,
                "round_ratios": ratios,
                "target": target,
            }
        )
    print("\n" + "\n".join(verdicts))
    if ns.json:
        ns.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

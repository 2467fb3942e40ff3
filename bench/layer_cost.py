"""Issue #6's speed ratios against the ceiling the models' shapes allow.

    python bench/layer_cost.py [--queries 4] [--rounds 5]

`shipped_speed.py` measures the ratios as served; this script says how far they could go.
For each configuration (the full `rerankd-minilm-l6`, its depth 2, `rerankd-tiny-l2`) it
scores the same batches (TREC DL 2019 BM25 top-100 pairs, tokenised at the model's default
length and packed as the scheduler packs them) on the ONNX Runtime int8 graph as served,
one intra-op thread, in interleaved rounds, and prints beside the measured ratio to the
full teacher the ratio of encoder multiply-adds, counted from each model's config:

- a layer over n tokens of width d with FFN width i: n(4d^2 + 2di) projections and FFN,
  plus 2n^2 d for attention;
- a last layer that computes r rows (the first r positions) still computes K and V for
  every token, the rest for those rows alone (`CrossEncoder.forward`): 2nd^2 +
  r(2d^2 + 2di) + 2rnd. A head that reads [CLS] has r = 1; one on the query segment's mean
  (`rerankd.engine.models.bert.QUERY_POOLING`) the batch's longest query segment; one on
  every token's mean (`MEAN_POOLING`: their [CLS] heads could not learn) r = n.

Embeddings, heads and per-batch overheads are left out of the count, so the multiply-add
ratio is a ceiling: a measured ratio near it means the configuration has no waste left to
remove, and a target above it is out of reach for that shape, however it is trained.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rerank_throughput import DATA, load_requests

TEACHER = "rerankd-minilm-l6"
#: (label, model, depth option, the ratio to the full teacher #6 asks for)
CONFIGS = [
    (f"{TEACHER} full", TEACHER, None, None),
    (f"{TEACHER} depth 2", TEACHER, 2, 2.5),
    ("rerankd-tiny-l2", "rerankd-tiny-l2", None, 3.0),
]


#: what the last layer computes, by head pooling (`rerankd.engine.models.bert.POOLINGS`)
LAST_LAYER = {
    "cls": "[CLS] (K, V: every token)",
    "query": "query segment (K, V: every token)",
    "mean": "every token (mean head)",
}


def multiply_adds(shapes: list[tuple[int, int]], layers: int, d: int, i: int) -> int:
    """Encoder multiply-adds for pairs of (padded width n, rows r its last layer computes)."""
    total = 0
    for n, r in shapes:
        full_layer = n * (4 * d * d + 2 * d * i) + 2 * n * n * d
        last = 2 * n * d * d + r * (2 * d * d + 2 * d * i) + 2 * r * n * d
        total += (layers - 1) * full_layer + last
    return total


def last_rows(batch: dict, pooling: str) -> int:
    """How many positions the last layer computes for this batch under `pooling`."""
    if pooling == "cls":
        return 1
    if pooling == "query":
        segment = (batch["attention_mask"] != 0) & (batch["token_type_ids"] == 0)
        return int(segment.sum(axis=1).max())
    return int(batch["input_ids"].shape[1])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=4, help="DL19 queries (100 candidates each)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    ns = p.parse_args()
    if ns.rounds < 1 or ns.queries < 1:
        p.error("--rounds and --queries must be >= 1")
    if not DATA.exists():
        print(f"skip: {DATA} not found", file=sys.stderr)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rerankd.engine.factory import load_reranker
    from rerankd.engine.loading import load_cross_encoder
    from rerankd.engine.scheduler import pack
    from rerankd.engine.tokenize import collate
    from rerankd.types import Document, RerankOptions

    requests = load_requests(ns.queries)
    rerankers = {m: load_reranker(m, backend="onnx", precision="int8", threads=1, workers=1)
                 for m in dict.fromkeys(m for _, m, _, _ in CONFIGS)}  # fmt: skip
    packed = {}  # model -> (its batches, each pair's padded width, its model)
    for m, r in rerankers.items():
        batches, widths = [], []
        sc = r.scheduler.config
        for q, texts in requests:
            docs = [Document(str(k), t) for k, t in enumerate(texts)]
            pairs = r.encode(q, docs, RerankOptions()).encoded.pairs
            for group in pack([len(x) for x in pairs], sc.max_batch_tokens, sc.max_batch_size):
                batch = collate([pairs[k] for k in group], r.config.pad_token_id)
                batches.append(batch)
                widths += [batch["input_ids"].shape[1]] * len(group)
        packed[m] = (batches, widths, load_cross_encoder(r.folder))
    work = {}  # label -> (batches, multiply-adds)
    last_layer = {}  # label -> what its last layer computes
    for label, m, depth, _ in CONFIGS:
        batches, widths, model = packed[m]
        c = rerankers[m].config
        pooling = model.pooling(depth)
        rows = [last_rows(b, pooling) for b in batches for _ in range(len(b["input_ids"]))]
        macs = multiply_adds(
            list(zip(widths, rows, strict=True)), depth or c.num_layers, c.hidden_size,
            c.intermediate_size,
        )  # fmt: skip
        last_layer[label] = LAST_LAYER[pooling]
        rerankers[m].backend.score(batches[0], depth)  # build / warm the graph
        work[label] = (batches, macs)
    seconds: dict[str, list[float]] = {label: [] for label, *_ in CONFIGS}
    for rnd in range(ns.rounds):
        for label, m, depth, _ in CONFIGS if rnd % 2 == 0 else CONFIGS[::-1]:
            backend = rerankers[m].backend
            t0 = time.perf_counter()
            for batch in work[label][0]:
                backend.score(batch, depth)
            seconds[label].append(time.perf_counter() - t0)
    for r in rerankers.values():
        r.close()
    base_label = CONFIGS[0][0]
    base_macs = work[base_label][1]
    print(
        f"\nDL19 BM25 top-100, {len(requests)} queries, {ns.rounds} rounds, ONNX Runtime int8, "
        "1 thread\n"
    )
    print("| configuration | last layer | GMAC | ms (median round) | x full: measured "
          "| x full: multiply-add ceiling | target |")  # fmt: skip
    print("|---|---|---:|---:|---:|---:|---|")
    for label, _m, _depth, target in CONFIGS:
        ratios = [b / s for b, s in zip(seconds[base_label], seconds[label], strict=True)]
        ceiling = base_macs / work[label][1]
        verdict = "" if target is None else (
            f">= {target:g}x: {'within' if target <= ceiling else 'ABOVE'} the ceiling"
        )  # fmt: skip
        print(
            f"| {label} | {last_layer[label]} | {work[label][1] / 1e9:.0f} "
            f"| {statistics.median(seconds[label]) * 1e3:.0f} | {statistics.median(ratios):.2f} "
            f"| {ceiling:.2f} | {verdict} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

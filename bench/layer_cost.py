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
- a head that reads [CLS] lets the last layer compute K and V for every token and the rest
  for [CLS] alone (`CrossEncoder.forward`): 2nd^2 + 2d^2 + 2di + 2nd. A head that reads the
  token mean (both small configurations: their [CLS] heads could not learn, see
  `rerankd.engine.models.bert.MEAN_POOLING`) needs every token of its last layer.

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


def multiply_adds(widths: list[int], layers: int, d: int, i: int, cls_last: bool) -> int:
    """Encoder multiply-adds for batches of padded widths (one entry per pair)."""
    total = 0
    for n in widths:
        full_layer = n * (4 * d * d + 2 * d * i) + 2 * n * n * d
        last = (2 * n * d * d + 2 * d * d + 2 * d * i + 2 * n * d) if cls_last else full_layer
        total += (layers - 1) * full_layer + last
    return total


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
    packed = {}  # model -> (its batches, each pair's padded width, its mean-pooled depths)
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
        mean_pooled = getattr(load_cross_encoder(r.folder), "mean_pooled", frozenset())
        packed[m] = (batches, widths, mean_pooled)
    work = {}  # label -> (batches, multiply-adds)
    last_layer = {}  # label -> what its last layer computes
    for label, m, depth, _ in CONFIGS:
        batches, widths, mean_pooled = packed[m]
        c = rerankers[m].config
        layers = depth or c.num_layers
        mean_head = layers in mean_pooled
        macs = multiply_adds(widths, layers, c.hidden_size, c.intermediate_size, not mean_head)
        last_layer[label] = "every token (mean head)" if mean_head else "[CLS] (K, V: every token)"
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

"""Speed curve of run-time cost control: pairs/s and p50 per 100-candidate request for each
depth and each token keep ratio, through a real sidecar on 127.0.0.1.

    python bench/matryoshka_curve.py [--queries 4] [--backend torch] [--png out.png]

Shapes: MiniLM-L6 and TinyBERT-L2 (real weights from the bundled backbones) and a
JinaBERT-tiny-shaped model (4 layers x 384, ALiBi, gated GELU; random weights: speed only).
Keep ratios r apply from layer 2 on (layer 1 reads every token). The baseline of each
row is the full model (all layers, no pruning) measured in the same run; the table
prints each configuration's speed-up against it, and the PNG plots the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rerankd import RerankClient
from rerankd.server.process import spawn_sidecar

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec-dl-2019"
RATIOS = (1.0, 0.75, 0.5, 0.25)


def load_requests(n: int) -> list[tuple[str, list[str]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rerank_throughput import load_requests as load

    return load(n)


def write_jina_tiny(folder: Path) -> Path:
    """A JinaBERT-tiny-shaped checkpoint with random weights (no real one can be had here)."""
    import torch
    from safetensors.torch import save_file

    from rerankd.engine.bundled import backbone_dir
    from rerankd.engine.models.config import ModelConfig
    from rerankd.engine.models.jina import JinaCrossEncoder

    raw = {
        "model_type": "bert",
        "position_embedding_type": "alibi",
        "feed_forward_type": "geglu",
        "vocab_size": 30522,
        "hidden_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
        "num_labels": 1,
        "hidden_act": "gelu",
    }
    torch.manual_seed(0)
    model = JinaCrossEncoder(ModelConfig.from_dict(raw))
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw))
    tok = backbone_dir("all-minilm-l6-v2") / "tokenizer.json"
    (folder / "tokenizer.json").write_bytes(tok.read_bytes())
    return folder


def measure(client: RerankClient, requests, **options) -> dict:
    client.rerank(*requests[0], **options)  # warm this configuration (graph, caches)
    lat = []
    pairs = 0
    t0 = time.perf_counter()
    for q, docs in requests:
        t = time.perf_counter()
        client.rerank(q, docs, **options)
        lat.append(time.perf_counter() - t)
        pairs += len(docs)
    return {"pairs_s": pairs / (time.perf_counter() - t0), "p50_ms": statistics.median(lat) * 1e3}


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--backend", default="torch", help="torch prunes tokens; onnx runs depths only")
    p.add_argument("--png", type=Path, default=Path("bench/out/matryoshka_curve.png"))
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    if not DATA.exists():
        print(f"skip: {DATA} not found", file=sys.stderr)
        return 0
    requests = load_requests(ns.queries)
    tmp = tempfile.TemporaryDirectory()
    shapes = {
        "MiniLM-L6": "bundled:all-minilm-l6-v2",
        "TinyBERT-L2": "bundled:splade-tiny",
        "JinaBERT-tiny (random)": str(write_jina_tiny(Path(tmp.name) / "jina-tiny")),
    }
    rows = []
    for shape, source in shapes.items():
        sidecar = spawn_sidecar(
            [
                "--model",
                source,
                "--backend",
                ns.backend,
                "--max-length",
                str(ns.max_length),
                "--dense-encoder",
                "",
                "--sparse-encoder",
                "",
                "--log-level",
                "WARNING",
            ]
        )
        try:
            with RerankClient(sidecar.address, timeout=600) as client:
                info = client.list_models()[0]
                base = measure(client, requests)
                for depth in range(info.num_layers, 0, -1):
                    ratios = RATIOS if info.supports_token_pruning and depth >= 2 else (1.0,)
                    for r in ratios:
                        opts = {"depth": depth}
                        if r < 1.0:
                            opts.update(keep_ratio=r, keep_from_layer=2)
                        m = (
                            base
                            if (depth == info.num_layers and r == 1.0)
                            else measure(client, requests, **opts)
                        )
                        rows.append(
                            {
                                "shape": shape,
                                "depth": depth,
                                "keep": r,
                                **m,
                                "speedup": m["pairs_s"] / base["pairs_s"],
                                "backend": f"{info.backend}/{info.precision}",
                            }
                        )
        finally:
            sidecar.stop()
    print(
        f"\nDL19 BM25 top-100, {len(requests)} queries x 100 candidates, max_length "
        f"{ns.max_length}, backend {ns.backend}\n"
    )
    print("| shape | depth | keep ratio (from layer 2) | pairs/s | p50 ms/request | x full model |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['depth']} | {r['keep']:.2f} | {r['pairs_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['speedup']:.2f} |"
        )
    if ns.json:
        ns.json.write_text(json.dumps(rows, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes, strict=True):
        for r in RATIOS:
            pts = sorted(
                (x["depth"], x["pairs_s"]) for x in rows if x["shape"] == shape and x["keep"] == r
            )
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"keep {r:.2f}")
        ax.set_title(shape)
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("pairs/s")
        ax.grid(alpha=0.3)
        ax.legend()
    ns.png.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(ns.png, dpi=100)
    print(f"\nplot: {ns.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

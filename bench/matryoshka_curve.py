"""Speed curve of run-time cost control: pairs/s and p50 per 100-candidate request for each
depth and each token keep ratio (1.0, 0.75, 0.5, 0.25), through a real sidecar.

    python bench/matryoshka_curve.py [--queries 4] [--repeats 2] [--min-seconds 2] [--backend torch]
                                     [--models MiniLM-L6,TinyBERT-L2,JinaBERT-tiny]
                                     [--plot bench/out/matryoshka_curve.png] [--json out.json]

Each model is served by its own `rerankd serve` child process on 127.0.0.1 (spawned with
`rerankd.server.process.spawn_sidecar`) and called over gRPC with `RerankClient`, so the
numbers include tokenisation, batching and the gRPC hop, like the throughput bench. Requests
are TREC DL 2019 queries, each with its BM25 top-100 (read from ../shared/data).

Models: MiniLM-L6 (bundled:all-minilm-l6-v2) and TinyBERT-L2 (bundled:splade-tiny) with
their real weights, and a JinaBERT-tiny-shaped model (jina-reranker-v1-tiny-en shapes:
4 layers x 384, 12 heads, ALiBi, gated GELU) with random weights: speed only.

Depth runs on every backend. Keep ratios (token pruning, applied from layer 2 on: layer 1
reads every token) run only on the torch backend and only for BERT-family models: the
JinaBERT model and `--backend onnx` get the depth curve at keep 1.0 only. Depth 1 has no
layer to prune, so it is measured once, at keep 1.0, and that point ends every keep curve
(in the plot and in the monotonic check).

Every configuration is warmed once, then all of them are measured in `--repeats` passes
over the queries, interleaved (forward, then reverse order) so that drift on a busy machine
spreads evenly; more passes follow (up to 20) while any configuration has been timed for
less than `--min-seconds`, which gives the small models more samples at little cost.
The table gives each row's speed against the full model (all layers, keep 1.0) measured in
the same run; a "monotonic" line per model says whether pairs/s rises strictly each time
depth falls (at every keep ratio) and each time the keep ratio falls (at every depth).
The PNG has one panel per model: pairs/s against depth, one line per keep ratio.

Run time: the defaults (4 queries x 2 passes, --min-seconds 2, 3 models, max_length 256)
are sized to finish within 10 minutes on 2 quiet cores; raise --queries/--repeats/
--min-seconds for tighter numbers. The smallest run: --queries 1 --repeats 1 --min-seconds 0.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "trec-dl-2019"
RATIOS = (1.0, 0.75, 0.5, 0.25)
JINA = "JinaBERT-tiny"
BUNDLED = {"MiniLM-L6": "bundled:all-minilm-l6-v2", "TinyBERT-L2": "bundled:splade-tiny"}
MODELS = (*BUNDLED, JINA)
KEEP_FROM_LAYER = 2
DEFAULT_PLOT = Path(__file__).resolve().parent / "out" / "matryoshka_curve.png"

Config = tuple[int, float]  # (depth, keep ratio)


def load_requests(n: int) -> list[tuple[str, list[str]]]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from rerank_throughput import load_requests as load

    return load(n)


def write_jina_tiny(folder: Path) -> Path:
    """A jina-reranker-v1-tiny-en-shaped checkpoint with random weights (no real one here)."""
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


def configurations(num_layers: int, depth_ok: bool, pruning_ok: bool) -> list[Config]:
    """Full model first, then every (depth, keep) the model and backend can run."""
    depths = range(num_layers, 0, -1) if depth_ok else (num_layers,)
    out = []
    for d in depths:
        ratios = RATIOS if pruning_ok and d >= KEEP_FROM_LAYER else (1.0,)
        out += [(d, r) for r in ratios]
    return out


def request_options(config: Config, num_layers: int) -> dict:
    depth, keep = config
    opts: dict = {}
    if depth < num_layers:
        opts["depth"] = depth
    if keep < 1.0:
        opts.update(keep_ratio=keep, keep_from_layer=KEEP_FROM_LAYER)
    return opts


def run_once(client, requests, opts: dict) -> tuple[float, list[float], int]:
    """One pass over the requests: (seconds, per-request latencies, pairs scored)."""
    lat = []
    pairs = 0
    t0 = time.perf_counter()
    for q, docs in requests:
        t = time.perf_counter()
        client.rerank(q, docs, **opts)
        lat.append(time.perf_counter() - t)
        pairs += len(docs)
    return time.perf_counter() - t0, lat, pairs


def sweep(
    client,
    requests,
    configs: list[Config],
    num_layers: int,
    repeats: int,
    min_seconds: float = 0.0,
    max_repeats: int = 20,
) -> dict:
    """pairs/s and p50 per configuration; repeats interleaved, alternating direction.

    After `repeats` passes, more passes run (up to `max_repeats`) until every configuration
    has been timed for `min_seconds`: small models get more samples at little cost."""
    opts = {c: request_options(c, num_layers) for c in configs}
    for c in configs:  # warm each configuration (its batch shapes, allocator, caches)
        client.rerank(*requests[0], **opts[c])
    seconds = dict.fromkeys(configs, 0.0)
    lat: dict[Config, list[float]] = {c: [] for c in configs}
    pairs = dict.fromkeys(configs, 0)
    rep = 0
    while rep < repeats or (min(seconds.values()) < min_seconds and rep < max_repeats):
        for c in configs if rep % 2 == 0 else configs[::-1]:
            s, lt, n = run_once(client, requests, opts[c])
            seconds[c] += s
            lat[c] += lt
            pairs[c] += n
        rep += 1
    return {
        c: {
            "pairs_s": pairs[c] / seconds[c],
            "p50_ms": statistics.median(lat[c]) * 1e3,
            "passes": rep,
        }
        for c in configs
    }


def curve(rows: list[dict], keep: float) -> list[tuple[int, float]]:
    """(depth, pairs/s) at one keep ratio, shallowest first. Below layer KEEP_FROM_LAYER
    nothing is pruned, so those depths share the keep-1.0 measurement."""
    pts = {}
    for r in rows:
        if r["keep"] == keep or (r["keep"] == 1.0 and r["depth"] < KEEP_FROM_LAYER):
            pts[r["depth"]] = r["pairs_s"]
    return sorted(pts.items()) if any(r["keep"] == keep for r in rows) else []


def monotonic_violations(rows: list[dict]) -> list[str]:
    """Where pairs/s fails to rise strictly as depth falls (at a fixed keep ratio) or as the
    keep ratio falls (at a fixed depth), for one model's rows; empty means monotonic."""
    out = []
    for keep in sorted({r["keep"] for r in rows}, reverse=True):
        pts = curve(rows, keep)[::-1]  # deepest first
        for (a, sa), (b, sb) in itertools.pairwise(pts):
            if sb <= sa:
                out.append(f"depth {a}->{b} at keep {keep:.2f}: {sa:.0f} -> {sb:.0f} pairs/s")
    for depth in sorted({r["depth"] for r in rows}, reverse=True):
        pts = sorted(((r["keep"], r["pairs_s"]) for r in rows if r["depth"] == depth), reverse=True)
        for (a, sa), (b, sb) in itertools.pairwise(pts):
            if sb <= sa:
                out.append(f"keep {a:.2f}->{b:.2f} at depth {depth}: {sa:.0f} -> {sb:.0f} pairs/s")
    return out


def monotonic_line(model: str, rows: list[dict], pruning_note: str = "") -> str:
    bad = monotonic_violations(rows)
    depths = sorted({r["depth"] for r in rows})
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    scope = f"depth {depths[-1]}->{depths[0]} x keep " + "/".join(f"{k:.2f}" for k in keeps)
    if pruning_note:
        scope += f"; keep ratios n/a: {pruning_note}"
    if not bad:
        return f"{model}: monotonic: yes ({scope})"
    return f"{model}: monotonic: no ({scope}); " + "; ".join(bad)


def write_plot(path: Path, rows: list[dict], models: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(models), figsize=(5 * len(models), 4.4), squeeze=False, layout="constrained"
    )
    for ax, model in zip(axes[0], models, strict=True):
        mine = [x for x in rows if x["model"] == model]
        for r in RATIOS:
            if pts := curve(mine, r):
                ax.plot(*zip(*pts, strict=True), marker="o", label=f"keep {r:.2f}")
        ax.set_title(model + (" (random weights)" if model == JINA else ""))
        ax.set_xlabel("depth (layers run)")
        ax.set_ylabel("pairs/s")
        ax.set_xticks(sorted({x["depth"] for x in mine}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(title=f"from layer {KEEP_FROM_LAYER}", fontsize="small")
    fig.suptitle(textwrap.fill(title, 60 * len(models)), fontsize="medium")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--queries", type=int, default=4, help="DL19 queries (100 candidates each)")
    p.add_argument("--repeats", type=int, default=2, help="passes over the queries per config")
    p.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="extra passes (up to 20) until each configuration is timed this long",
    )
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--backend", default="torch", help="torch prunes tokens; onnx runs depths only")
    p.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated, of " + ", ".join(MODELS)
    )
    p.add_argument("--serve-arg", action="append", default=[], help="extra `rerankd serve` flag")
    p.add_argument("--plot", "--png", type=Path, default=DEFAULT_PLOT, help="PNG to write")
    p.add_argument("--json", type=Path)
    ns = p.parse_args()
    models = ns.models.split(",")
    if unknown := [m for m in models if m not in MODELS]:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if not DATA.exists():
        print(f"skip: {DATA} not found", file=sys.stderr)
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the sidecar inherits it
    from rerankd import RerankClient
    from rerankd.server.process import spawn_sidecar

    started = time.perf_counter()
    requests = load_requests(ns.queries)
    tmp = tempfile.TemporaryDirectory()
    sources = dict(BUNDLED)
    if JINA in models:
        sources[JINA] = str(write_jina_tiny(Path(tmp.name) / "jina-tiny"))
    rows: list[dict] = []
    notes: dict[str, str] = {}
    for model in models:
        sidecar = spawn_sidecar(
            [
                "--model",
                sources[model],
                "--backend",
                ns.backend,
                "--max-length",
                str(ns.max_length),
                "--cache-entries",
                "0",  # every request is scored, never answered from the score cache
                "--dense-encoder",
                "",
                "--sparse-encoder",
                "",
                "--log-level",
                "WARNING",
                *ns.serve_arg,
            ]
        )
        try:
            with RerankClient(sidecar.address, timeout=600) as client:
                info = client.list_models()[0]
                if not info.supports_token_pruning:
                    notes[model] = (
                        "JinaBERT (ALiBi) is not token-pruned"
                        if model == JINA
                        else f"the {info.backend} backend does not prune tokens"
                    )
                configs = configurations(
                    info.num_layers, info.supports_depth, info.supports_token_pruning
                )
                result = sweep(
                    client, requests, configs, info.num_layers, ns.repeats, ns.min_seconds
                )
        finally:
            sidecar.stop()
        full = result[info.num_layers, 1.0]
        for (depth, keep), m in result.items():
            rows.append(
                {
                    "model": model,
                    "depth": depth,
                    "keep": keep,
                    **m,
                    "speedup": m["pairs_s"] / full["pairs_s"],
                    "p50_vs_full": m["p50_ms"] / full["p50_ms"],
                    "backend": f"{info.backend}/{info.precision}",
                }
            )
    elapsed = time.perf_counter() - started
    title = (
        f"DL19 BM25 top-100: {len(requests)} queries x 100 candidates, >= {ns.repeats} passes, "
        f"max_length {ns.max_length}, backend {ns.backend}, {os.cpu_count()} CPU cores"
    )
    print(f"\n{title}\n")
    print(
        "| model | depth | keep ratio (from layer 2) | pairs/s | p50 ms/request "
        "| pairs/s x full | p50 x full | passes |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['model']} | {r['depth']} | {r['keep']:.2f} | {r['pairs_s']:.0f} "
            f"| {r['p50_ms']:.0f} | {r['speedup']:.2f} | {r['p50_vs_full']:.2f} | {r['passes']} |"
        )
    print("\n(full = all layers, keep 1.00, measured in this run on the same sidecar)\n")
    verdicts = {}
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        line = monotonic_line(model, mine, notes.get(model, ""))
        verdicts[model] = not monotonic_violations(mine)
        print(line)
    print(f"\nwall time {elapsed:.0f} s")
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"title": title, "rows": rows, "monotonic": verdicts, "notes": notes}
        ns.json.write_text(json.dumps(report, indent=2))
    try:
        write_plot(ns.plot, rows, models, title)
    except ImportError:
        print("matplotlib not installed (pip install 'rerankd[dev]'): no plot", file=sys.stderr)
        return 0
    print(f"plot: {ns.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

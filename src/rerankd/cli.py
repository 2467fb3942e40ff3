"""`rerankd` command line: wiring only; each subcommand calls a function tests reach directly."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path


def _serve(argv: Sequence[str]) -> int:
    from rerankd.errors import RerankdError
    from rerankd.server.app import serve
    from rerankd.server.config import parse_serve_args

    cfg = parse_serve_args(argv)
    logging.basicConfig(
        level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(serve(cfg))
    except RerankdError as exc:
        print(f"rerankd serve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _convert(argv: Sequence[str]) -> int:
    from rerankd.engine.convert import backbone_to_cross_encoder

    p = argparse.ArgumentParser(
        prog="rerankd convert-backbone",
        description="Make a cross-encoder from a bare BERT encoder (seeded, untrained head).",
    )
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--seed", type=int, default=0)
    ns = p.parse_args(argv)
    print(backbone_to_cross_encoder(ns.src, ns.dst, seed=ns.seed))
    return 0


def _rerank(argv: Sequence[str]) -> int:
    from rerankd.client import RerankClient

    p = argparse.ArgumentParser(prog="rerankd rerank", description="Call a running sidecar.")
    p.add_argument("query")
    p.add_argument("documents", nargs="+", help="document texts")
    p.add_argument("--address", default="127.0.0.1:50051")
    p.add_argument("--model", default="")
    p.add_argument("--top-n", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0)
    ns = p.parse_args(argv)
    with RerankClient(ns.address, timeout=ns.timeout) as client:
        resp = client.rerank(ns.query, ns.documents, top_n=ns.top_n, model=ns.model)
    for r in resp.results:
        print(
            json.dumps(
                {"index": r.index, "score": round(r.score, 6), "text": ns.documents[r.index]}
            )
        )
    return 0


def _models(argv: Sequence[str]) -> int:
    from rerankd.client import RerankClient

    p = argparse.ArgumentParser(prog="rerankd models")
    p.add_argument("--address", default="127.0.0.1:50051")
    ns = p.parse_args(argv)
    with RerankClient(ns.address) as client:
        for m in client.list_models():
            print(json.dumps(m.__dict__))
    return 0


def _demo(argv: Sequence[str]) -> int:
    from rerankd.demo import main as demo_main

    return demo_main(argv)


def _train(argv: Sequence[str]) -> int:
    from rerankd.train.cli import main_train

    return main_train(argv)


def _distill(argv: Sequence[str]) -> int:
    from rerankd.train.cli import main_distill

    return main_distill(argv)


def _extract_depth(argv: Sequence[str]) -> int:
    from rerankd.train.cli import main_extract_depth

    return main_extract_depth(argv)


def _graft_depth(argv: Sequence[str]) -> int:
    from rerankd.train.cli import main_graft_depth

    return main_graft_depth(argv)


def _fit_fusion(argv: Sequence[str]) -> int:
    from rerankd.train.fusion_fit import main as fit_main

    return fit_main(argv)


def _eval(argv: Sequence[str]) -> int:
    from rerankd.eval.runner import main as eval_main

    return eval_main(argv)


COMMANDS = {
    "serve": (_serve, "run the gRPC sidecar"),
    "demo": (_demo, "start a sidecar on the bundled model and rerank examples"),
    "eval": (_eval, "first-stage vs reranked NDCG/MRR/Recall on a BEIR data set"),
    "rerank": (_rerank, "rerank documents with a running sidecar"),
    "models": (_models, "list the models a running sidecar holds"),
    "convert-backbone": (_convert, "make a cross-encoder checkpoint from a bare encoder"),
    "train": (_train, "fine-tune a cross-encoder on a BEIR train split (hard negatives)"),
    "distill": (_distill, "teacher -> student, or Matryoshka cascaded self-distillation"),
    "extract-depth": (_extract_depth, "a Matryoshka model's depth cut as a model of its own"),
    "graft-depth": (_graft_depth, "a k-layer model back into a Matryoshka model as its depth k"),
    "fit-fusion": (_fit_fusion, "fit a model's fusion with the first stage on dev queries"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in COMMANDS:
        print("usage: rerankd COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<18}{text}")
        return 0 if not args or args[0] in ("-h", "--help") else 2
    fn, _ = COMMANDS[args[0]]
    return fn(args[1:])


if __name__ == "__main__":
    raise SystemExit(main())

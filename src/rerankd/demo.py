"""`make demo`: start a real sidecar process on loopback and rerank an example through gRPC.

Until rerankd ships its own trained default model, the bundled cross-encoder is the real
all-MiniLM-L6-v2 backbone with an untrained (seeded) head: the path is real end to end,
but its scores are not yet meaningful relevance. The demo says so.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from rerankd.client import RerankClient
from rerankd.server.process import spawn_sidecar

QUERY = "how do vaccines train the immune system?"
DOCUMENTS = [
    "Vaccines expose the immune system to a harmless antigen so that memory B and T cells "
    "recognise the real pathogen later and respond faster.",
    "The Great Barrier Reef is the world's largest coral reef system, off Queensland.",
    "Antibodies are proteins produced by B cells that bind to specific antigens.",
    "Sourdough bread is leavened by a culture of wild yeast and lactic acid bacteria.",
    "Herd immunity arises when enough of a population is immune to slow transmission.",
    "A cross-encoder reads the query and the document together and outputs one score.",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="rerankd demo")
    p.add_argument("--model", default="bundled:all-minilm-l6-v2")
    ns = p.parse_args(argv)
    print(f"starting sidecar with {ns.model} ...", flush=True)
    t0 = time.perf_counter()
    sidecar = spawn_sidecar(
        ["--model", ns.model, "--log-level", "WARNING", "--dense-encoder", "", "--sparse-encoder", ""]
    )
    try:
        print(f"sidecar SERVING on {sidecar.address} after {time.perf_counter() - t0:.1f}s\n")
        with RerankClient(sidecar.address) as client:
            info = client.list_models()[0]
            print(f"model {info.name}: {info.architecture}, {info.num_layers} layers x "
                  f"{info.hidden_size}, {info.backend}/{info.precision}")
            resp = client.rerank(QUERY, DOCUMENTS, return_documents=True)
        print("NOTE: the bundled head is untrained (seed 0) until rerankd ships its trained "
              "default; scores show the path works, not relevance.\n")
        print(f"query: {QUERY}")
        for rank, r in enumerate(resp.results, 1):
            print(f"{rank:>2}. [{r.score:+.4f}] (doc {r.index}) {r.text[:80]}")
        t = resp.timings
        print(f"\ntokens {resp.tokens}; queue {t.queue_us} us, tokenize {t.tokenize_us} us, "
              f"inference {t.inference_us} us")
    finally:
        sidecar.stop()
    return 0

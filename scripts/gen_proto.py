"""Generate the Python gRPC stubs from proto/ into src/ (one command: `make proto`).

The proto package `rerankd.v1` maps onto the Python package `rerankd.v1`, so the
generated imports (`from rerankd.v1 import reranker_pb2`) resolve inside rerankd.
`--check` regenerates into a temporary folder and fails if the committed stubs differ.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "src"
GENERATED = ("reranker_pb2.py", "reranker_pb2.pyi", "reranker_pb2_grpc.py")


def generate(out_dir: Path) -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if committed stubs drift")
    ns = parser.parse_args()
    if not ns.check:
        generate(OUT_DIR)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        drift = [
            name
            for name in GENERATED
            if not filecmp.cmp(
                Path(tmp) / "rerankd/v1" / name, OUT_DIR / "rerankd/v1" / name, shallow=False
            )
        ]
    if drift:
        print(f"stubs drift from proto: {drift}; run `make proto`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

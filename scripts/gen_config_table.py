"""Print (or check) the README's configuration table from `rerankd.server.config.FLAGS`.

python scripts/gen_config_table.py          # rewrite the table in README.md
python scripts/gen_config_table.py --check  # fail if README.md drifted from FLAGS
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rerankd.server.config import FLAGS

README = Path(__file__).resolve().parent.parent / "README.md"
BEGIN = "<!-- config-table:begin -->"
END = "<!-- config-table:end -->"


def table() -> str:
    rows = ["| flag | env | default | meaning |", "|---|---|---|---|"]
    for f in FLAGS:
        default = ",".join(f.default) if isinstance(f.default, tuple) else f.default
        shown = f"`{default}`" if default not in ("", None) else "—"
        rows.append(f"| `--{f.name}` | `{f.env}` | {shown} | {f.help.replace('|', '/')} |")
    return "\n".join(rows)


def render(text: str) -> str:
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return f"{head}{BEGIN}\n{table()}\n{END}{tail}"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--check", action="store_true")
    ns = p.parse_args()
    text = README.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks {BEGIN} ... {END}", file=sys.stderr)
        return 1
    new = render(text)
    if ns.check:
        if new != text:
            print("README config table drifted from FLAGS: run scripts/gen_config_table.py")
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

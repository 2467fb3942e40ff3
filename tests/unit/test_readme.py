"""The README's configuration table is generated from the flags: it must not drift."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO


def test_config_table_matches_flags() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gen_config_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr

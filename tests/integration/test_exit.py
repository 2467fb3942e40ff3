"""A script that loads a torch reranker and exits without `close()` exits cleanly. Before
the scheduler's exit hook, the model's worker thread was still alive when the C++ runtime
tore down, which aborted the process ("terminate called without an active exception",
exit code 134) in one run out of two to six on this machine. The script checks the cause
itself, which does not depend on luck: its own exit hook, registered before rerankd's and
so run after it, reports any rerankd thread still alive."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

SCRIPT = """
import atexit, threading

@atexit.register
def report_live_workers():
    print("alive:", sorted(t.name for t in threading.enumerate() if t.name.startswith("rerankd")))

from rerankd.engine.factory import load_reranker
from rerankd.types import Document
r = load_reranker("rerankd-tiny-l2", backend="torch")
docs = [Document("a", "cats eat grass"), Document("b", "the sky is blue")]
print("scored:", sorted(x.id for x in r.rerank("what do cats eat", docs).results))
"""


def test_a_script_that_never_closes_its_reranker_exits_cleanly() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    # it scored both (how it ranks them is test_shipped_models' business), then exited
    assert proc.stdout.split("\n")[-3:] == ["scored: ['a', 'b']", "alive: []", ""], proc.stdout

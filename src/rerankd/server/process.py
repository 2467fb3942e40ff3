"""Run `rerankd serve` as a child process: for the demo, tests and benchmarks.

The child prints `rerankd serving on HOST:PORT` once health is SERVING; we wait for that
line (bounded by `timeout`), so callers never poll or sleep.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

READY_PREFIX = "rerankd serving on "


@dataclass
class SidecarProcess:
    proc: subprocess.Popen
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful drain), then SIGKILL if it has not exited in `timeout`."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: a crash, for fault tests."""
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


def spawn_sidecar(
    args: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> SidecarProcess:
    """Start `rerankd serve --host HOST --port PORT ARGS...` and wait until it serves."""
    cmd = [sys.executable, "-m", "rerankd.cli", "serve", "--host", host, "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, text=True, env=dict(os.environ if env is None else env)
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while (remaining := deadline - time.monotonic()) > 0:
            if not sel.select(remaining):
                continue
            line = proc.stdout.readline()
            if not line:  # EOF: the child exited
                raise RuntimeError(f"sidecar exited with code {proc.wait()} before serving")
            if line.startswith(READY_PREFIX):
                h, p = line[len(READY_PREFIX) :].strip().rsplit(":", 1)
                return SidecarProcess(proc, h, int(p))
        proc.kill()
        proc.wait()
        raise TimeoutError(f"sidecar did not serve within {timeout}s")
    finally:
        sel.close()

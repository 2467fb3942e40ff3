"""Run `rerankd serve` as a child process: for the demo, tests and benchmarks.

The child prints `rerankd serving on HOST:PORT` (gRPC), followed by ` http HOST:PORT` when
the HTTP API is on, once health is SERVING; we wait for that line (bounded by `timeout`),
so callers never poll or sleep.
"""

from __future__ import annotations

import os
import selectors
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

READY_PREFIX = "rerankd serving on "
HTTP_MARK = " http "


@dataclass
class SidecarProcess:
    proc: subprocess.Popen
    host: str
    port: int
    http_port: int | None = None  # None: the HTTP API is off (--http-port -1)

    @property
    def address(self) -> str:
        """The gRPC address, `host:port`."""
        return f"{self.host}:{self.port}"

    @property
    def http_address(self) -> str:
        """The HTTP API's `host:port`."""
        if self.http_port is None:
            raise RuntimeError("this sidecar runs without the HTTP API (--http-port -1)")
        return f"{self.host}:{self.http_port}"

    @property
    def http_url(self) -> str:
        """`http://host:port`, ready for an HTTP client's base URL."""
        return f"http://{self.http_address}"

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


def parse_ready_line(line: str) -> tuple[str, int, int | None]:
    """`rerankd serving on H:P[ http H:P2]` -> (H, P, P2 or None)."""
    grpc_part, _, http_part = line[len(READY_PREFIX) :].strip().partition(HTTP_MARK)
    host, port = grpc_part.rsplit(":", 1)
    http_port = int(http_part.rsplit(":", 1)[1]) if http_part else None
    return host, int(port), http_port


def spawn_sidecar(
    args: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    http_port: int | None = 0,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
    log: IO[str] | None = None,
) -> SidecarProcess:
    """Start `rerankd serve --host HOST --port PORT ARGS...` and wait until it serves.

    `http_port` defaults to 0 (a free port) rather than the server's 8080, so several
    sidecars (tests, benchmarks) never race for one port; None leaves the flag unset and
    `--http-port` in `args` wins over it either way. `log` receives the child's stderr
    (its log); by default it goes to ours.
    """
    cmd = [sys.executable, "-m", "rerankd.cli", "serve", "--host", host, "--port", str(port)]
    if http_port is not None:
        cmd += ["--http-port", str(http_port)]
    cmd += list(args)
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=dict(os.environ if env is None else env),
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
                return SidecarProcess(proc, *parse_ready_line(line))
        proc.kill()
        proc.wait()
        raise TimeoutError(f"sidecar did not serve within {timeout}s")
    finally:
        sel.close()

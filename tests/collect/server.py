"""A real `diffalign collect serve` process on a free port, for the concurrency, restart and browser tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

CLI = "from diffalign.cli import main; main()"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """Start, SIGKILL and restart the server on one store and port."""

    def __init__(self, store: str, images: Path, log: Path, rate: float = 100000.0) -> None:
        self.store, self.images, self.log = store, images, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.rate = rate
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Server:
        args = [sys.executable, "-c", CLI, "collect", "serve", "--store", self.store]
        args += ["--store-images", str(self.images), "--port", str(self.port)]
        args += ["--rate", str(self.rate), "--burst", str(int(max(self.rate, 1)))]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"the server exited with {code}: {self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/next", timeout=2).status_code == 401:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the server did not answer within {timeout} s: {self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, nothing is flushed."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
        self.process = None

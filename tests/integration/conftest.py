"""A real `levante serve` process on a loopback port, for tests that talk HTTP with real clients."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path
    home: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_server(args: list[str], tmp: Path, env: dict[str, str] | None = None, timeout: float = 120) -> Server:
    """Start `levante serve ARGS` on a free port; wait until /health answers 200."""
    port = free_port()
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    log = tmp / f"server-{port}.log"
    full_env = {**os.environ, "LEVANTE_HOME": str(home), **(env or {})}
    cmd = [sys.executable, "-m", "levante.cli", "serve", "--port", str(port), "--log-level", "info", *args]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    server = Server(f"http://127.0.0.1:{port}", process, log, home)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become healthy in {timeout}s:\n{server.log_text()}")


# Small KV pool and queue so the defaults do not take a quarter of the machine's memory per server.
SMOLLM2_ARGS = ["smollm2", "--kv-cache-memory", "512MiB", "--max-model-len", "4096"]


@pytest.fixture(scope="session")
def server_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def make(args: list[str] | None = None, env: dict[str, str] | None = None) -> Server:
        server = start_server(args if args is not None else SMOLLM2_ARGS, tmp_path_factory.mktemp("server"), env)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def smollm2_server(server_factory: Callable[..., Server]) -> Server:
    """The default model served with no API keys; shared by the API-compatibility tests."""
    return server_factory()

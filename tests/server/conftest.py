"""Server fixtures: a tiny random model with a tokenizer, and real `kiln serve` processes on free loopback
ports (started once per module; their logs go to a file, never a pipe that could fill and block them)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.hf_cases import build_text_model

CORPUS = [Path(os.__file__), Path(json.__file__)]
REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-123"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The `tiny` preset (RoPE, GQA, 1024 positions) with a byte-level BPE tokenizer and a ChatML template."""
    return build_text_model(tmp_path_factory.mktemp("server-model"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`python -m kiln.cli serve` (or `python -m MODULE serve`, a test's wrapper of the CLI) in a
    subprocess, stopped with SIGTERM."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *args: str,
        api_key: str | None = None,
        module: str = "kiln.cli",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        self.log_path = log_path
        command = [sys.executable, "-m", module, "serve", "--model", str(model_dir)]
        command += ["--port", str(self.port), "--log-level", "warning", "--no-access-log", *args]
        env = {**os.environ, "KILN_API_KEY": api_key or ""}
        if api_key is None:
            env.pop("KILN_API_KEY")
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self._wait_ready()

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"kiln serve did not become healthy in {timeout}s:\n{self.log()}")

    def metric(self, name: str) -> float:
        """One sample of /metrics by name (the first series with that name)."""
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def start_server(model_dir, tmp_path_factory):
    """start_server(*flags, api_key=None, module="kiln.cli") -> a running ServerProcess; all are stopped
    after the module."""
    servers: list[ServerProcess] = []

    def start(*args: str, api_key: str | None = None, module: str = "kiln.cli") -> ServerProcess:
        log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
        server = ServerProcess(model_dir, log_path, *args, api_key=api_key, module=module)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()

"""Start and stop a `vllm-promprune serve` subprocess (demo, tests, benchmarks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests


class ServerProcess:
    """A pruning-enabled OpenAI server on 127.0.0.1, stopped by PID on exit.

    `env` adds to (or overrides) this process's environment for the server;
    with `inherit_env=False` it is the server's whole environment.
    """

    def __init__(
        self,
        model: str,
        serve_args: list[str],
        port: int,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        *,
        inherit_env: bool = True,
    ) -> None:
        self.model = model
        self.serve_args = serve_args
        self.env = {**(os.environ if inherit_env else {}), **(env or {})}
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds: float | None = None
        self._launched = 0.0

    def start(self, timeout: float = 600.0) -> ServerProcess:
        """Launch the server and wait until /health answers."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> ServerProcess:
        """Start the server process without waiting for it (then `wait_ready`); idempotent."""
        if self.process is not None:
            return self
        command = [
            sys.executable, "-m", "vllm_promprune.tools.cli", "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), *self.serve_args,
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._launched = time.monotonic()
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env
        )
        return self

    def wait_ready(self, timeout: float = 600.0) -> ServerProcess:
        """Wait until the launched server answers /health (`startup_seconds`: since its launch)."""
        if self.process is None:
            raise RuntimeError("wait_ready before launch")
        while time.monotonic() - self._launched < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.process.returncode}; log: {self.log_path}\n"
                    + self.log_tail()
                )
            try:
                if requests.get(f"{self.url}/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - self._launched
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout:.0f}s; log: {self.log_path}")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the server's process group (its engine children too), then wait."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

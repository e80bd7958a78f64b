"""Serving a run for tests: ``gradstore serve`` in a subprocess, or an app under uvicorn in a thread, on a free
loopback port; the server's RSS; a private copy of a run to damage or rebuild."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

API_KEY_ENV = "GRADSTORE_API_KEY"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def copy_run(config: Path, dest: Path) -> Path:
    """A copy of the run folder holding ``config`` (the demo's: run.toml, store, index, weights); its run.toml."""
    shutil.copytree(config.parent, dest, ignore=shutil.ignore_patterns("*.lock"))
    return dest / config.name


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


class ServeProcess:
    """``gradstore serve --config ...`` in a subprocess: ``url``, ``proc``, ``log()``."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        preexec: Callable[[], Any] | None = None,
        ready_timeout: float = 90,
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if env is None or API_KEY_ENV not in env:
            full_env.pop(API_KEY_ENV, None)
        argv = [sys.executable, "-m", "gradstore.server.cli", "serve", "--config", str(config)]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*argv, "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
                preexec_fn=preexec,
            )
        self._wait_ready(ready_timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"gradstore serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"gradstore serve not ready after {timeout} s:\n{self.log()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=15)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serve_in_thread(app: Any, **uvicorn_kwargs: Any) -> Iterator[str]:
    """``app`` under uvicorn in a background thread (with gradstore's protocol and limits); yields its URL."""
    from gradstore.server.http.serving import GradstoreServer, uvicorn_config

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, "127.0.0.1", port, app.state.settings, log_level="warning")
    for key, value in uvicorn_kwargs.items():
        setattr(config, key, value)
    server = GradstoreServer(config, app.state.lifecycle, app.state.settings.drain_s)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()

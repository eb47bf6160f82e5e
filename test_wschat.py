"""Tests for wschat, in the module's order.

Three layers: manager unit tests with fake sockets (no network); app tests through
Starlette's TestClient for protocol details; end-to-end tests against
``python wschat.py serve`` started as a user starts it, with real WebSocket clients
(the ``websockets`` package), a real ``redis-server`` and a real Chromium.

Every test is bounded (pytest-timeout, plus ``asyncio.wait_for`` around async bodies);
every process a test starts is stopped by its PID; all traffic stays on 127.0.0.1.
Suites that need Chromium or redis-server skip when those are missing, unless
WSCHAT_REQUIRE_BROWSER=1 / WSCHAT_REQUIRE_REDIS=1 (as in CI) turn the skip into a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Awaitable, Callable

import pytest
import websockets
from websockets.asyncio.client import connect as ws_connect

import wschat

HERE = pathlib.Path(__file__).resolve().parent
ARTIFACTS = HERE / "test-artifacts"
REQUIRE_BROWSER = os.environ.get("WSCHAT_REQUIRE_BROWSER") == "1"
REQUIRE_REDIS = os.environ.get("WSCHAT_REQUIRE_REDIS") == "1"
CHROMIUM = os.environ.get("WSCHAT_CHROMIUM", "/usr/bin/chromium")


# ---------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(coro: Awaitable[Any], timeout: float = 30) -> Any:
    """Run an async test body on a fresh event loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def wait_for_condition(check: Callable[[], Any], timeout: float = 5.0, interval: float = 0.02) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if inspect_awaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        await asyncio.sleep(interval)


def inspect_awaitable(value: Any) -> bool:
    return hasattr(value, "__await__")


def http(method: str, url: str, body: Any = None, headers: dict | None = None,
         timeout: float = 5) -> tuple[int, Any]:
    """A plain HTTP request with the standard library: (status, parsed JSON or text)."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


class ServerProcess:
    """``python wschat.py serve`` (or another command) on a free port, stopped by PID."""

    def __init__(self, args: list[str], *, port: int, log_path: pathlib.Path, env: dict | None = None,
                 command: list[str] | None = None, ready_path: str = "/healthz") -> None:
        self.port = port
        self.log_path = log_path
        self.ready_path = ready_path
        base = command or [sys.executable, str(HERE / "wschat.py"), "serve"]
        self.argv = [*base, "--host", "127.0.0.1", "--port", str(port), *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15) -> ServerProcess:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                        cwd=HERE, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log}")
            try:
                status, _ = http("GET", self.url + self.ready_path, timeout=1)
                if status in (200, 503):
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout} s:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int | None:
        """Stop by PID: ``sig``, then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self._log.close()
        return self.process.returncode

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def serve(tmp_path: pathlib.Path):
    """Factory: ``serve("--history", "5")`` starts a server on a free port; all are stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None, port: int | None = None, **kwargs: Any) -> ServerProcess:
        port = port or free_port()
        server = ServerProcess(list(args), port=port, env=env,
                               log_path=tmp_path / f"server-{port}-{len(started)}.log", **kwargs)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


class Client:
    """A real WebSocket client (``websockets``) with helpers for JSON frames."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket

    async def send(self, data: Any) -> None:
        await self.socket.send(data if isinstance(data, (str, bytes)) else json.dumps(data))

    async def recv(self, timeout: float = 5) -> Any:
        raw = await asyncio.wait_for(self.socket.recv(), timeout)
        try:
            return json.loads(raw)
        except (TypeError, ValueError):
            return raw

    async def recv_until(self, predicate: Callable[[Any], bool], timeout: float = 5) -> Any:
        """Receive frames until one satisfies ``predicate``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(frame):
                return frame

    async def messages(self, count: int, timeout: float = 10) -> list[dict]:
        """The next ``count`` chat messages (frames of type message), skipping presence and the like."""
        found: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(found) < count:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(frame, dict) and frame.get("type") == "message":
                found.append(frame)
        return found

    async def closed(self, timeout: float = 5) -> tuple[int | None, str]:
        """Read until the server closes; return (code, reason)."""
        with contextlib.suppress(websockets.ConnectionClosed):
            while True:
                await asyncio.wait_for(self.socket.recv(), timeout)
        await asyncio.wait_for(self.socket.wait_closed(), timeout)
        received = self.socket.close_code, self.socket.close_reason
        return received

    async def close(self) -> None:
        await self.socket.close()


@contextlib.asynccontextmanager
async def client(url: str, **kwargs: Any):
    """``async with client(server.ws_url + "/rooms/r/ws?client_id=a") as alice: ...``"""
    socket = await asyncio.wait_for(ws_connect(url, open_timeout=5, close_timeout=2, **kwargs), 10)
    try:
        yield Client(socket)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(socket.close(), 3)


async def join(url: str, **kwargs: Any) -> tuple[Client, dict]:
    """Connect to a room URL and read the welcome frame."""
    socket = await asyncio.wait_for(ws_connect(url, open_timeout=5, close_timeout=2, **kwargs), 10)
    joined = Client(socket)
    welcome = await joined.recv()
    assert welcome["type"] == "welcome", welcome
    return joined, welcome


@pytest.fixture
def redis_server(tmp_path: pathlib.Path):
    """A private redis-server on a free port, without persistence; stopped by PID."""
    binary = shutil.which("redis-server")
    if binary is None:
        if REQUIRE_REDIS:
            pytest.fail("redis-server is required (WSCHAT_REQUIRE_REDIS=1) but not installed")
        pytest.skip("redis-server not installed")
    try:
        import redis  # noqa: F401
    except ImportError:
        if REQUIRE_REDIS:
            pytest.fail("the redis package is required (WSCHAT_REQUIRE_REDIS=1): pip install -e '.[test,redis]'")
        pytest.skip("the redis package is not installed")
    server = RedisProcess(binary, tmp_path)
    server.start()
    yield server
    server.stop()


class RedisProcess:
    def __init__(self, binary: str, directory: pathlib.Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def browser():
    """Headless Debian Chromium driven by Playwright (no browser download)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRE_BROWSER:
            pytest.fail("playwright is required (WSCHAT_REQUIRE_BROWSER=1): pip install -e '.[test]'")
        pytest.skip("playwright not installed")
    if not os.path.exists(CHROMIUM):
        if REQUIRE_BROWSER:
            pytest.fail(f"Chromium is required (WSCHAT_REQUIRE_BROWSER=1) but {CHROMIUM} is missing")
        pytest.skip(f"{CHROMIUM} not installed")
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        try:
            yield instance
        finally:
            instance.close()


class FakeSocket:
    """The ten-line socket the manager talks to: records what is sent, feeds what is received."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: tuple[int, str | None] | None = None
        self.inbox: asyncio.Queue = asyncio.Queue()

    async def accept(self) -> None:
        pass

    async def receive(self) -> dict:
        return await self.inbox.get()

    async def send_text(self, data: str) -> None:
        self.sent.append(data)

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed_with = (code, reason)
        self.inbox.put_nowait({"type": "websocket.disconnect", "code": code})

    def frames(self) -> list[Any]:
        return [json.loads(frame) if frame.startswith("{") else frame for frame in self.sent]

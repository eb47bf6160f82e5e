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
import base64
import concurrent.futures
import contextlib
import itertools
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Awaitable, Callable, Iterator
from urllib.parse import quote

import httpx
import pytest
import websockets
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
from starlette.requests import HTTPConnection
from starlette.websockets import WebSocketDisconnect
from websockets.asyncio.client import connect as ws_connect

import wschat
from wschat import (ConnectionManager, ProtocolError, Settings, create_app, parse_client_frame, plan_replay,
                    valid_client_id, valid_room)

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
                 command: list[str] | None = None, ready_path: str = "/healthz", cwd: pathlib.Path = HERE) -> None:
        self.port = port
        self.cwd = cwd
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
                                        cwd=self.cwd, start_new_session=True)
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
    server = RedisProcess(redis_binary(), tmp_path)
    server.start()
    yield server
    server.stop()


class RedisProcess:
    """One redis-server (or, given its command, a sentinel) on a free port; stopped by PID."""

    def __init__(self, binary: str, directory: pathlib.Path) -> None:
        self.binary = binary
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.extra: list[str] = []
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10, command: list[str] | None = None) -> None:
        self.process = subprocess.Popen(
            command or [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(self.directory), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing written or said."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def redis_program(name: str) -> str:
    """A Redis program on the PATH (redis-server, redis-cli), or a skip (a failure with WSCHAT_REQUIRE_REDIS=1)."""
    binary = shutil.which(name)
    if binary is None:
        if REQUIRE_REDIS:
            pytest.fail(f"{name} is required (WSCHAT_REQUIRE_REDIS=1) but not installed")
        pytest.skip(f"{name} not installed")
    return binary


def redis_binary() -> str:
    """redis-server and the redis package, or a skip (a failure with WSCHAT_REQUIRE_REDIS=1)."""
    binary = redis_program("redis-server")
    try:
        import redis  # noqa: F401
    except ImportError:
        if REQUIRE_REDIS:
            pytest.fail("the redis package is required (WSCHAT_REQUIRE_REDIS=1): pip install -e '.[test,redis]'")
        pytest.skip("the redis package is not installed")
    return binary


def redis_command(port: int, *command: Any) -> Any:
    """One command to one redis-server on 127.0.0.1, its reply as Redis sent it (no cluster
    routing, none of redis-py's parsing: INFO is text, CLUSTER SLOTS nested lists)."""
    import redis
    with redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5) as plain:
        plain.response_callbacks.clear()
        return plain.execute_command(*command)


class SentinelSet:
    """A master, a replica and three sentinels watching them (service ``wschat``), on
    127.0.0.1; every process stopped by PID. Failover is quick: a master is taken
    for down after 1 s."""

    SERVICE = "wschat"

    def __init__(self, binary: str, directory: pathlib.Path) -> None:
        self.master = RedisProcess(binary, directory / "master")
        self.replica = RedisProcess(binary, directory / "replica")
        self.sentinels = [RedisProcess(binary, directory / f"sentinel-{n}") for n in range(3)]
        self.replica.extra = ["--replicaof", "127.0.0.1", str(self.master.port)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/0/{self.SERVICE}"

    def start(self) -> None:
        self.master.start()
        self.replica.start()
        for sentinel in self.sentinels:
            config = sentinel.directory / "sentinel.conf"
            config.write_text(f"port {sentinel.port}\nbind 127.0.0.1\ndir {sentinel.directory}\n"
                              f"sentinel monitor {self.SERVICE} 127.0.0.1 {self.master.port} 2\n"
                              f"sentinel down-after-milliseconds {self.SERVICE} 1000\n"
                              f"sentinel failover-timeout {self.SERVICE} 5000\n")
            sentinel.start(command=[sentinel.binary, str(config), "--sentinel"])
        deadline = time.monotonic() + 30
        while not self._settled():   # replica in sync, and the sentinels know it and each other
            assert time.monotonic() < deadline, "the sentinel set did not settle"
            time.sleep(0.1)

    def _settled(self) -> bool:
        if "master_link_status:up" not in redis_command(self.replica.port, "INFO", "replication"):
            return False
        for sentinel in self.sentinels:
            state = redis_command(sentinel.port, "SENTINEL", "MASTER", self.SERVICE)
            state = dict(zip(state[::2], state[1::2])) if isinstance(state, list) else state
            if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                return False
        return True

    def current_master(self) -> int:
        host, port = redis_command(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(port)

    def stop(self) -> None:
        for process in (*self.sentinels, self.replica, self.master):
            process.stop()


class RedisCluster:
    """Three masters, each with one replica, as a Redis Cluster on 127.0.0.1 (bus ports
    chosen free too); a replica takes over within about 2 s of its master's death."""

    def __init__(self, binary: str, directory: pathlib.Path) -> None:
        self.nodes = [RedisProcess(binary, directory / f"node-{n}") for n in range(6)]
        for node in self.nodes:
            node.extra = ["--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                          "--cluster-config-file", str(node.directory / "nodes.conf"),
                          "--cluster-node-timeout", "1000"]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port},127.0.0.1:{self.nodes[1].port}/"

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        subprocess.run([redis_program("redis-cli"), "--cluster", "create", *(f"127.0.0.1:{node.port}" for node in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, timeout=60,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ok()

    def wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not all("cluster_state:ok" in redis_command(node.port, "CLUSTER", "INFO") for node in self.alive()):
            assert time.monotonic() < deadline, "the cluster is not ok"
            time.sleep(0.1)

    def alive(self) -> list[RedisProcess]:
        return [node for node in self.nodes if node.process is not None and node.process.poll() is None]

    def masters(self) -> dict[int, str]:
        """port -> node id of every live master that owns slots."""
        found = {}
        for line in redis_command(self.alive()[0].port, "CLUSTER", "NODES").splitlines():
            node_id, address, flags, *_, = line.split()[:3]
            if "master" in flags and "fail" not in flags and len(line.split()) > 8:
                found[int(address.split("@")[0].rsplit(":", 1)[1])] = node_id
        return found

    def owner(self, key: str) -> int:
        """The port of the master that owns ``key``'s slot."""
        slot = redis_command(self.alive()[0].port, "CLUSTER", "KEYSLOT", key)
        for start, end, (host, port, *_), *_ in redis_command(self.alive()[0].port, "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(port)
        raise AssertionError(f"no master owns slot {slot}")

    def flush(self) -> None:
        for port in self.masters():
            redis_command(port, "FLUSHALL")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextlib.contextmanager
def running(kind: type, directory: pathlib.Path) -> Iterator[Any]:
    """A SentinelSet or RedisCluster in ``directory``, started, and stopped (by PID) afterwards."""
    servers = kind(redis_binary(), directory)
    try:
        servers.start()
        yield servers
    finally:
        servers.stop()


@pytest.fixture(scope="session")
def sentinel_set(tmp_path_factory: pytest.TempPathFactory):
    with running(SentinelSet, tmp_path_factory.mktemp("sentinel")) as servers:
        yield servers


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    with running(RedisCluster, tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_sentinel_set(tmp_path: pathlib.Path):
    """A Sentinel set of this test's own, for a test that kills its master."""
    with running(SentinelSet, tmp_path / "sentinel-set") as servers:
        yield servers


@pytest.fixture
def own_cluster(tmp_path: pathlib.Path):
    """A Cluster of this test's own, for a test that kills a master or moves slots."""
    with running(RedisCluster, tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture(params=["single", "sentinel", "cluster"])
def any_redis(request: pytest.FixtureRequest):
    """Each test that takes it runs three times: on one redis-server, on the Sentinel set
    (through the sentinels), and on the Cluster; emptied first, so every test starts clean."""
    if request.param == "single":
        yield request.getfixturevalue("redis_server")
        return
    shared = request.getfixturevalue("sentinel_set" if request.param == "sentinel" else "redis_cluster")
    if request.param == "sentinel":
        redis_command(shared.current_master(), "FLUSHALL")
    else:
        shared.flush()
    yield shared


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


class FakeServer:
    """The ``wschat.server`` extension of a fake socket: ``send_nowait`` takes a frame while
    the socket is ``writable``, as wschat's uvicorn protocol does, so unit tests run the
    production path (direct writes first, the queue and writer only while a client is behind)."""

    def __init__(self, sock: FakeSocket) -> None:
        self.sock = sock
        self.writable = True
        self.attached: Any = None
        self.aborted = False
        self.connections = 1

    def send_nowait(self, message: dict) -> bool:
        if self.writable and self.sock.closed_with is None:
            self.sock.sent.append(message["text"])
            return True
        return False

    def abort(self) -> None:
        self.aborted = True
        self.sock.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})

    def open_connections(self) -> int:
        return self.connections

    def attach(self, connection: Any) -> None:
        self.attached = connection

    def take_frames(self) -> bool:
        return False   # frames come through the socket's receive, as without wschat's protocol


class FakeSocket:
    """The ten-line socket the manager talks to: records what is sent, feeds what is received."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed_with: tuple[int, str | None] | None = None
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.server = FakeServer(self)
        self.scope = {"extensions": {wschat.SERVER_EXTENSION: self.server}}

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


# ---------------------------------------------------------------------------
# Core helpers: fake sockets with extra behaviour, TestClient frame readers
# ---------------------------------------------------------------------------

class StuckSocket(FakeSocket):
    """A peer that stopped reading: the server cannot take a frame, ``send_text`` blocks until ``release`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.server.writable = False

    async def send_text(self, data: str) -> None:
        await self.release.wait()
        await super().send_text(data)


class VanishingSocket(FakeSocket):
    """A peer that vanishes after its welcome: later sends raise, and its reader sees the disconnect."""

    def __init__(self) -> None:
        super().__init__()
        self.server.writable = False   # every frame goes through send_text

    async def send_text(self, data: str) -> None:
        if self.sent:
            self.inbox.put_nowait({"type": "websocket.disconnect", "code": 1006})
            raise ConnectionResetError("peer vanished")
        self.sent.append(data)


class TimedSocket(FakeSocket):
    """Records when each frame reached the socket."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []
        self.server.writable = False   # every frame goes through send_text, which times it

    async def send_text(self, data: str) -> None:
        self.times.append(time.monotonic())
        await super().send_text(data)


def chat_messages(sock: FakeSocket) -> list[dict]:
    return [f for f in sock.frames() if isinstance(f, dict) and f.get("type") == "message"]


def presence_frames(sock: FakeSocket) -> list[dict]:
    return [f for f in sock.frames() if isinstance(f, dict) and f.get("type") == "presence"]


async def reader(manager: ConnectionManager, conn: Any) -> None:
    """What a route does with a connection: feed its frames to the manager, always disconnect."""
    try:
        async for frame in manager.frames(conn):
            await manager.handle_frame(conn, frame)
    finally:
        manager.disconnect(conn)


def wait_until(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Synchronous wait_for_condition, for tests that already run an event loop (Playwright's)."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {check}")
        time.sleep(0.02)
    return result


def next_frame(ws: Any, kind: str) -> dict:
    """The next JSON frame of type ``kind`` on a TestClient WebSocket, skipping presence and the like."""
    while True:
        frame = ws.receive_json()
        if frame["type"] == kind:
            return frame


def refused_code(tc: TestClient, url: str, **kwargs: Any) -> int:
    """The close code of a handshake the app refuses (fails the test when it is accepted)."""
    with pytest.raises(WebSocketDisconnect) as refused:
        with tc.websocket_connect(url, **kwargs) as ws:
            ws.receive_text()
    return refused.value.code


def post(tc: TestClient, room: str, text: str, **body: Any) -> dict:
    response = tc.post(f"/rooms/{room}/messages", json={"text": text, **body})
    assert response.status_code == 201, response.text
    return response.json()


def room_url(server: Any, room: str, client_id: str | None = None, **query: Any) -> str:
    params = {"client_id": client_id, **query} if client_id else query
    qs = "&".join(f"{key}={value}" for key, value in params.items())
    return f"{server.ws_url}/rooms/{room}/ws" + (f"?{qs}" if qs else "")


# ---- Shape: repository, dependencies, import ----

def test_shape_repository_has_the_documented_top_level():
    """The repository holds wschat.py, test_wschat.py, pyproject.toml, README.md, .ci/run and bench/."""
    for name in ("wschat.py", "test_wschat.py", "pyproject.toml", "README.md", ".ci/run"):
        assert (HERE / name).is_file(), f"{name} is missing"
    assert (HERE / "bench").is_dir()


def test_shape_dependencies_are_fastapi_uvicorn_click_with_redis_extra():
    """Runtime deps are fastapi, uvicorn[standard], click; redis is an extra; Python 3.10+; `wschat` script."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((HERE / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ ;]", dep)[0] for dep in project["dependencies"]}
    assert names == {"fastapi", "uvicorn[standard]", "click"}
    assert any(dep.startswith("redis") for dep in project["optional-dependencies"]["redis"])
    assert project["requires-python"] == ">=3.10"
    assert project["scripts"]["wschat"] == "wschat:main"


IMPORT_PROBE = r"""
import gc, json, os, socket, sys, threading
events = []
WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if (mode and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & WRITE):
            events.append(f"open {path} {mode}")
    elif event.startswith(("socket.", "subprocess.", "os.fork", "os.system", "os.posix_spawn")):
        events.append(event)
sys.addaudithook(hook)
import wschat
import asyncio
loops = [o for o in gc.get_objects() if isinstance(o, asyncio.AbstractEventLoop)]
sockets = [o for o in gc.get_objects() if isinstance(o, socket.socket)]
print(json.dumps({"events": events, "threads": [t.name for t in threading.enumerate()],
                  "loops": len(loops), "sockets": len(sockets), "create_app": callable(wschat.create_app)}))
"""


def test_import_has_no_side_effects(tmp_path):
    """Importing wschat starts no thread, loop, server or socket and writes no file."""
    result = subprocess.run([sys.executable, "-B", "-c", IMPORT_PROBE], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(HERE)})
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe == {"events": [], "threads": ["MainThread"], "loops": 0, "sockets": 0, "create_app": True}
    assert list(tmp_path.iterdir()) == []


def test_import_serves_without_the_redis_extra(serve, tmp_path):
    """With `redis` not importable, `python wschat.py serve` starts and a room chat works."""
    blocker = tmp_path / "blocked" / "redis"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('redis is not installed (test)')\n")
    server = serve(env={"PYTHONPATH": f"{blocker.parent}{os.pathsep}{HERE}"})

    async def body():
        alice, _ = await join(room_url(server, "r", "alice"))
        await alice.send({"type": "message", "text": "no redis needed"})
        assert (await alice.messages(1))[0]["text"] == "no redis needed"
        await alice.close()

    run(body())
    assert "Traceback" not in server.log


# ---- Settings ----

SPEC_DEFAULTS = {"host": "127.0.0.1", "port": 8000, "timeout": 300, "broker": "memory://", "tokens": (),
                 "allowed_origins": (), "history": 100, "max_message_size": 65536, "rate": 20,
                 "max_connections": 10000, "send_queue": 1024, "workers": 1, "log_level": "info",
                 "root_path": "", "presence_interval": 0.25}


def test_settings_defaults_match_spec():
    """Settings() carries the SPEC defaults of every CLI option plus presence_interval."""
    assert {name: getattr(Settings(), name) for name in SPEC_DEFAULTS} == SPEC_DEFAULTS


@pytest.mark.parametrize("name, value", [
    ("port", 0), ("timeout", -1), ("history", -1), ("max_message_size", 0), ("rate", -1),
    ("max_connections", 0), ("send_queue", 0), ("workers", 0), ("presence_interval", 0),
    ("log_level", "loud"), ("broker", "ftp://x"), ("root_path", "chat/"),
])
def test_settings_bad_value_raises_value_error_naming_it(name, value):
    """A bad setting fails at create_app() with ValueError naming the setting."""
    with pytest.raises(ValueError, match=name):
        create_app(**{name: value})


def test_settings_create_app_is_keyword_only_with_one_setting_per_cli_option():
    """create_app() works as is, takes only keywords, and has one setting per `serve` option."""
    assert isinstance(create_app(), FastAPI)
    with pytest.raises(TypeError):
        create_app(100)  # type: ignore[misc]
    with pytest.raises(TypeError):
        create_app(no_such_setting=1)
    options = {param.name for param in wschat.main.commands["serve"].params if param.name != "help"}
    fields = {name for name in Settings.__dataclass_fields__}
    assert fields == options | {"presence_interval"}


# ---- Protocol: names, frames, replay ----

@pytest.mark.parametrize("name, ok", [
    ("general", True), ("A-Z_a.z-09", True), ("x" * 64, True), ("lobby", True),
    ("", False), ("x" * 65, False), ("two words", False), ("a/b", False), ("café", False), ("r?x", False),
])
def test_protocol_valid_room(name, ok):
    """Room names are 1-64 of A-Z a-z 0-9 _ . -"""
    assert valid_room(name) is ok


@pytest.mark.parametrize("client_id, ok", [
    ("alice", True), ("Zoë Ω 🙂", True), ("x" * 64, True), ("with space", True),
    ("", False), ("x" * 65, False), ("a\nb", False), ("a\x00", False), ("a\x7f", False),
    ("\ud800", False), (42, False), (None, False),
])
def test_protocol_valid_client_id(client_id, ok):
    """Client ids are 1-64 characters without control characters."""
    assert valid_client_id(client_id) is ok


@pytest.mark.parametrize("frame, kind, text, to", [
    ('{"type": "message", "text": "hi"}', "message", "hi", None),
    ('{"type": "message", "text": "psst", "to": "bob"}', "message", "psst", "bob"),
    ('{"type": "ping"}', "ping", "", None),
    ("hello there", "message", "hello there", None),
    ("[sic]", "message", "[sic]", None),
    ("42", "message", "42", None),
])
def test_protocol_parse_client_frame_accepts(frame, kind, text, to):
    """JSON message/ping frames and bare text frames are understood."""
    command = parse_client_frame(frame)
    assert (command.kind, command.text, command.to) == (kind, text, to)


@pytest.mark.parametrize("frame, reason", [
    ("{not json", "invalid JSON"),
    ('  {"type": "message"', "invalid JSON"),
    ('{"text": "hi"}', "type"),
    ('{"type": "shout", "text": "hi"}', "shout"),
    ('{"type": "message"}', "text"),
    ('{"type": "message", "text": 5}', "text"),
    ('{"type": "message", "text": ""}', "text"),
    ('{"type": "message", "text": "\\ud800"}', "text"),
    ('{"type": "message", "text": "hi", "to": ""}', "to"),
    ("", "text"),
])
def test_protocol_parse_client_frame_rejects(frame, reason):
    """Bad frames raise ProtocolError saying what is wrong."""
    with pytest.raises(ProtocolError, match=reason):
        parse_client_frame(frame)


def retained(*ids: int) -> list[tuple[int, str]]:
    return [(i, f"frame{i}") for i in ids]


@pytest.mark.parametrize("since, epoch_matches, replayed, recovered", [
    (None, True, [3, 4, 5], None),     # no since: everything retained, no verdict
    (3, True, [4, 5], True),           # gap fully retained
    (2, True, [3, 4, 5], True),        # since just before the oldest retained
    (5, True, [], True),               # nothing missed
    (1, True, [3, 4, 5], False),       # id 2 is no longer retained
    (3, False, [3, 4, 5], False),      # another epoch: the id means nothing
    (9, True, [3, 4, 5], False),       # an id from the future is stale
])
def test_protocol_plan_replay(since, epoch_matches, replayed, recovered):
    """Replay exactly the missed messages when the whole gap is retained and the epoch matches."""
    messages, verdict = plan_replay(retained(3, 4, 5), 5, since, epoch_matches)
    assert [message_id for message_id, _ in messages] == replayed
    assert verdict is recovered


def test_protocol_plan_replay_with_no_history_kept():
    """With history 0, only a client that missed nothing is told it recovered."""
    assert plan_replay([], 7, 7, True) == ([], True)
    assert plan_replay([], 7, 6, True) == ([], False)


# ---- Connection manager (fake sockets) ----

async def enter(manager: ConnectionManager, room: str | None, client_id: str | None,
                sock: FakeSocket | None = None, **kwargs: Any) -> tuple[FakeSocket, Any]:
    sock = sock or FakeSocket()
    conn = await manager.connect(sock, client_id=client_id, room=room, **kwargs)
    return sock, conn


def test_manager_fans_out_every_message_once_in_order():
    """Every member receives every message of its room exactly once, in id order."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        socks = [(await enter(manager, "r", f"u{i}"))[0] for i in range(5)]
        outsider, _ = await enter(manager, "other", "x")
        for i in range(30):
            await manager.publish("r", f"m{i}", sender=f"u{i % 5}")
        await wait_for_condition(lambda: all(len(chat_messages(s)) >= 30 for s in socks))
        for sock in socks:
            assert [(m["id"], m["text"]) for m in chat_messages(sock)] == [(i + 1, f"m{i}") for i in range(30)]
        assert chat_messages(outsider) == []

    run(body())


def test_manager_stuck_socket_delays_nobody_and_is_dropped_with_1013():
    """A socket whose send blocks forever delays no one and is dropped with 1013 once its queue exceeds send_queue."""
    async def body():
        manager = ConnectionManager(Settings(send_queue=8, presence_interval=60))
        fast, _ = await enter(manager, "r", "fast")
        stuck, _ = await enter(manager, "r", "stuck", sock=StuckSocket())
        for i in range(7):                      # welcome + 7 messages = 8 frames queued
            await manager.publish("r", f"m{i}")
        await wait_for_condition(lambda: len(chat_messages(fast)) == 7)
        assert manager.slow_clients_dropped == 0 and "stuck" in await manager.members("r")
        await manager.publish("r", "m7")        # the 9th frame exceeds send_queue
        assert manager.slow_clients_dropped == 1
        async def only_fast() -> bool:
            return await manager.members("r") == ["fast"]

        await wait_for_condition(only_fast)     # it left the room at once
        await manager.publish("r", "m8")
        await wait_for_condition(lambda: len(chat_messages(fast)) == 9)
        stuck.release.set()                     # its socket drains: the close frame goes out
        await wait_for_condition(lambda: stuck.closed_with is not None)
        assert stuck.closed_with[0] == 1013
        assert manager.slow_clients_dropped == 1

    run(body())


def test_manager_vanished_socket_cleaned_up_once_without_error_log(caplog):
    """A socket whose send raises is removed once, quietly, and the others carry on."""
    caplog.set_level(logging.DEBUG)

    async def body():
        manager = ConnectionManager(Settings(presence_interval=0.05))
        watcher, _ = await enter(manager, "r", "watcher")
        gone, conn = await enter(manager, "r", "gone", sock=VanishingSocket())
        task = asyncio.create_task(reader(manager, conn))
        await wait_for_condition(lambda: any("gone" in f["joined"] for f in presence_frames(watcher)))
        await manager.publish("r", "first")     # "gone" vanishes on its next frame
        await wait_for_condition(lambda: task.done())
        await wait_for_condition(lambda: any("gone" in f["left"] for f in presence_frames(watcher)))
        manager.disconnect(conn)                # a second cleanup is harmless
        await manager.publish("r", "second")
        await wait_for_condition(lambda: len(chat_messages(watcher)) == 2)
        await asyncio.sleep(0.2)                # proving no second "left" arrives
        assert sum(f["left"].count("gone") for f in presence_frames(watcher)) == 1
        assert await manager.members("r") == ["watcher"]
        assert manager.active_connections == [watcher]
        task.result()

    run(body())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_manager_presence_coalesced_at_most_one_frame_per_interval():
    """A join storm costs each member a few presence frames, at most one per presence_interval."""
    interval = 0.2

    async def body():
        manager = ConnectionManager(Settings(presence_interval=interval))
        watcher, _ = await enter(manager, "r", "watcher", sock=TimedSocket())
        joiners = []
        for wave in range(4):
            for i in range(15):
                joiners.append((await enter(manager, "r", f"j{wave}-{i}"))[0])
            await asyncio.sleep(interval / 3)   # spread the storm over several intervals
        names = {f"j{w}-{i}" for w in range(4) for i in range(15)}
        await wait_for_condition(lambda: names <= {j for f in presence_frames(watcher) for j in f["joined"]})
        stamps = [t for t, f in zip(watcher.times, watcher.frames()) if f["type"] == "presence"]
        assert all(later - earlier >= interval * 0.5 for earlier, later in zip(stamps, stamps[1:])), stamps
        assert len(stamps) <= 5
        assert presence_frames(watcher)[-1]["count"] == 61
        assert sum(len(presence_frames(j)) for j in joiners) <= 3 * len(joiners)

    run(body())


def test_manager_join_then_leave_within_interval_cancels_out():
    """A client that joins and leaves within one presence interval is never announced."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=0.15))
        watcher, _ = await enter(manager, "r", "watcher")
        await wait_for_condition(lambda: presence_frames(watcher))
        _, blink = await enter(manager, "r", "blink")
        manager.disconnect(blink)
        await enter(manager, "r", "carol")
        await wait_for_condition(lambda: len(presence_frames(watcher)) == 2)
        assert presence_frames(watcher)[1] == {"type": "presence", "room": "r", "joined": ["carol"], "left": [],
                                               "count": 2}

    run(body())


def test_manager_send_personal_message_to_socket():
    """send_personal_message(text, socket) sends the text as is to that socket only."""
    async def body():
        manager = ConnectionManager()
        a, conn_a = await enter(manager, None, "a")
        b, _ = await enter(manager, None, "b")
        await manager.send_personal_message("just for a", a)
        await manager.send_personal_message("again for a", conn_a)
        await wait_for_condition(lambda: len(a.sent) == 2)
        assert a.sent == ["just for a", "again for a"] and b.sent == []
        with pytest.raises(LookupError):
            await manager.send_personal_message("nobody", FakeSocket())

    run(body())


def test_manager_send_personal_message_to_client_id():
    """send_personal_message(text, client_id) is a direct message frame to that client only."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        a, _ = await enter(manager, "r", "a")
        b, _ = await enter(manager, "r", "b")
        b_elsewhere, _ = await enter(manager, "other", "b")
        await manager.send_personal_message("psst", "b", room="r")
        await manager.send_personal_message("everywhere", "b", sender="billing")
        await manager.publish("r", "public")
        await wait_for_condition(lambda: len(chat_messages(b)) == 3 and len(chat_messages(b_elsewhere)) == 1)
        direct = chat_messages(b)[0]
        assert {k: direct[k] for k in ("room", "from", "to", "text")} == {"room": "r", "from": "server", "to": "b",
                                                                         "text": "psst"}
        assert "id" not in direct
        assert chat_messages(b)[1]["from"] == "billing"
        assert [m["text"] for m in chat_messages(b_elsewhere)] == ["everywhere"]
        await wait_for_condition(lambda: chat_messages(a))
        assert [m["text"] for m in chat_messages(a)] == ["public"]

    run(body())


def test_manager_broadcast_reaches_every_connection_or_one_room():
    """broadcast() sends text as is to every connection, or to one room's, and says how many."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        plain, _ = await enter(manager, None, "plain")
        r1, _ = await enter(manager, "r", "a")
        r2, _ = await enter(manager, "r", "b")
        assert await manager.broadcast("to all") == 3
        assert await manager.broadcast("to r", room="r") == 2
        assert await manager.broadcast("to none", room="empty") == 0
        await wait_for_condition(lambda: plain.sent and len(r1.sent) == 3 and len(r2.sent) == 3)
        assert plain.sent == ["to all"]
        assert r1.sent[1:] == r2.sent[1:] == ["to all", "to r"]

    run(body())


def test_manager_active_connections_tracks_connect_and_disconnect():
    """active_connections lists connected sockets; disconnect removes them (twice is safe)."""
    async def body():
        manager = ConnectionManager()
        a, conn_a = await enter(manager, "r", "a")
        b, _ = await enter(manager, None, "b")
        assert set(manager.active_connections) == {a, b}
        manager.disconnect(conn_a)
        manager.disconnect(a)
        assert manager.active_connections == [b]
        assert await manager.members("r") == []

    run(body())


def test_manager_host_api_publish_history_members_stats():
    """publish/history/members/stats: what host code reads from app.state.chat."""
    async def body():
        manager = ConnectionManager(Settings(history=3, presence_interval=60))
        sock, _ = await enter(manager, "r", "alice")
        sent = [await manager.publish("r", f"m{i}", sender="billing") for i in range(5)]
        assert [m["id"] for m in sent] == [1, 2, 3, 4, 5]
        assert {k: sent[0][k] for k in ("type", "room", "from", "text")} == {
            "type": "message", "room": "r", "from": "billing", "text": "m0"}
        assert isinstance(sent[0]["ts"], float) and abs(sent[0]["ts"] - time.time()) < 60
        assert [m["id"] for m in await manager.history("r")] == [3, 4, 5]
        assert [m["id"] for m in await manager.history("r", since=3)] == [4, 5]
        assert [m["id"] for m in await manager.history("r", limit=2)] == [3, 4]
        assert await manager.members("r") == ["alice"]
        await wait_for_condition(lambda: len(chat_messages(sock)) == 5)
        stats = manager.stats()
        assert (stats["connections"], stats["rooms"], stats["messages_out"]) == (1, 1, 5)
        for bad in [("bad room", "x"), ("r", "")]:
            with pytest.raises(ValueError):
                await manager.publish(*bad)

    run(body())


def test_manager_two_managers_are_independent():
    """Two managers share nothing: rooms, ids, epochs and counters are their own."""
    async def body():
        one, two = ConnectionManager(Settings(presence_interval=60)), ConnectionManager(Settings(presence_interval=60))
        s1, _ = await enter(one, "r", "a")
        s2, _ = await enter(two, "r", "a")
        assert (await one.publish("r", "in one"))["id"] == 1
        assert (await two.publish("r", "in two"))["id"] == 1
        await wait_for_condition(lambda: chat_messages(s1) and chat_messages(s2))
        assert [m["text"] for m in chat_messages(s1)] == ["in one"]
        assert [m["text"] for m in chat_messages(s2)] == ["in two"]
        assert s1.frames()[0]["epoch"] != s2.frames()[0]["epoch"]
        assert one.active_connections == [s1] and one.stats()["messages_out"] == 1

    run(body())


class GatedBroker(wschat.MemoryBroker):
    """A memory broker whose room subscription waits until ``opened`` is set, so a join can be caught half way."""

    def __init__(self) -> None:
        super().__init__()
        self.subscribing = asyncio.Event()
        self.opened = asyncio.Event()

    async def subscribe(self, room: str) -> None:
        self.subscribing.set()
        await self.opened.wait()


class LaggingBroker(wschat.MemoryBroker):
    """Numbers and stores messages at once but delivers them only on ``release()``, like Redis pub/sub behind its history."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[tuple[str, dict, str]] = []

    async def start(self, listener: Any) -> None:
        await super().start(listener)
        self.manager = listener

    async def publish(self, room: str, sender: str, text: str, **kwargs: Any) -> tuple[dict, str]:
        self.manager.deliver = lambda *delivery: self.held.append(delivery)   # hold instead of delivering
        try:
            return await super().publish(room, sender, text, **kwargs)
        finally:
            del self.manager.deliver

    def release(self) -> None:
        held, self.held = self.held, []
        for delivery in held:
            self.manager.deliver(*delivery)


class BrokenHistoryBroker(wschat.MemoryBroker):
    async def history(self, room: str) -> tuple[str, int, list[tuple[int, str]]]:
        raise RuntimeError("history store corrupted")


def test_manager_broadcast_reaches_a_joining_client_after_its_welcome():
    """broadcast(room=...) while a client is still joining reaches it once, after its welcome frame."""
    async def body():
        broker = GatedBroker()
        manager = ConnectionManager(Settings(presence_interval=60), broker=broker)
        await manager.start()
        sock = FakeSocket()
        joining = asyncio.create_task(manager.connect(sock, room="r", client_id="x"))
        await asyncio.wait_for(broker.subscribing.wait(), 5)   # x is in the room, waiting for the subscription
        await manager.broadcast("notice", room="r")
        broker.opened.set()
        await joining
        await wait_for_condition(lambda: "notice" in sock.sent)
        first = sock.frames()[0]
        assert isinstance(first, dict) and first["type"] == "welcome", sock.sent
        assert sock.sent.count("notice") == 1

    run(body())


def test_manager_disconnect_closes_a_live_connection_and_mutes_it():
    """Host code's disconnect(websocket) closes it with 1000, it leaves the room at once, and what it sends after is not delivered."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        a, conn_a = await enter(manager, "r", "a")
        b, _ = await enter(manager, "r", "b")
        task = asyncio.create_task(reader(manager, conn_a))
        manager.disconnect(a)
        assert await manager.members("r") == ["b"]
        a.inbox.put_nowait({"type": "websocket.receive", "text": "sent after the disconnect"})
        await wait_for_condition(lambda: a.closed_with is not None)
        assert a.closed_with[0] == 1000
        await asyncio.wait_for(task, 5)
        await manager.publish("r", "marker")
        await wait_for_condition(lambda: chat_messages(b))
        assert [m["text"] for m in chat_messages(b)] == ["marker"]
        assert manager.active_connections == [b]

    run(body())


def test_manager_join_while_deliveries_lag_behind_history_gets_each_message_once():
    """Joining while the broker's deliveries lag its history (Redis): the replay and the late deliveries give each id once."""
    async def body():
        broker = LaggingBroker()
        manager = ConnectionManager(Settings(presence_interval=60), broker=broker)
        a, _ = await enter(manager, "r", "a")
        await manager.publish("r", "m1")
        await manager.publish("r", "m2")              # stored, not yet delivered
        b, _ = await enter(manager, "r", "b")
        await wait_for_condition(lambda: b.sent)
        assert b.frames()[0]["last_id"] == 2
        broker.release()                              # m1 and m2 arrive late: a gets them, b already has them
        await manager.publish("r", "m3")
        broker.release()
        await wait_for_condition(lambda: len(chat_messages(a)) >= 3 and len(chat_messages(b)) >= 3)
        assert [m["id"] for m in chat_messages(a)] == [1, 2, 3]
        assert [m["id"] for m in chat_messages(b)] == [1, 2, 3]

    run(body())


def test_manager_restarted_id_sequence_closes_room_clients_with_1012():
    """A delivered id not above the last one, or from another epoch (a flushed Redis), closes the room's
    protocol clients with 1012 to resume with since; nothing of the new sequence reaches them first."""
    def stored(message_id: int, epoch: str) -> tuple[dict, str, str]:
        message = wschat.message_event("r", message_id, "server", f"message {message_id}")
        return message, wschat.encode(message), epoch

    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        sock, _ = await enter(manager, "r", "a")
        other, _ = await enter(manager, "r", "b")
        epoch = sock.frames()[0]["epoch"]
        manager.deliver("r", *stored(5, epoch))
        await wait_for_condition(lambda: chat_messages(sock))
        assert sock.closed_with is None
        manager.deliver("r", *stored(1, epoch))           # ids went backwards
        await wait_for_condition(lambda: sock.closed_with is not None and other.closed_with is not None)
        assert sock.closed_with[0] == other.closed_with[0] == 1012
        assert [m["id"] for m in chat_messages(sock)] == [5]
        assert manager.stats()["messages_out"] == 2        # message 5 to a and b; message 1 to nobody

        third, _ = await enter(manager, "r", "c")
        manager.deliver("r", *stored(9, "another-epoch"))   # a new sequence with higher ids
        await wait_for_condition(lambda: third.closed_with is not None)
        assert third.closed_with[0] == 1012 and chat_messages(third) == []

    run(body())


def test_manager_unexpected_join_error_closes_with_1011_and_leaks_nothing(caplog):
    """A join failing unexpectedly (history raises) closes with 1011, logs the error once, and leaves no connection or member."""
    caplog.set_level(logging.INFO, logger="wschat")

    async def body():
        manager = ConnectionManager(Settings(presence_interval=60), broker=BrokenHistoryBroker())
        sock, conn = await enter(manager, "r", "a")
        task = asyncio.create_task(reader(manager, conn))
        await wait_for_condition(lambda: sock.closed_with is not None)
        assert sock.closed_with[0] == 1011
        await asyncio.wait_for(task, 5)
        assert manager.active_connections == []
        assert await manager.members("r") == []
        assert manager.stats()["connections"] == 0

    run(body())
    errors = [r for r in caplog.records if r.name == "wschat" and r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].exc_info and errors[0].exc_info[0] is RuntimeError


def test_manager_process_wide_broadcast_reaches_a_joining_client_after_its_welcome():
    """broadcast() without a room, while a client is still joining, reaches it once, after its welcome."""
    async def body():
        broker = GatedBroker()
        manager = ConnectionManager(Settings(presence_interval=60), broker=broker)
        await manager.start()
        plain, _ = await enter(manager, None, "plain")
        sock = FakeSocket()
        joining = asyncio.create_task(manager.connect(sock, room="r", client_id="x"))
        await asyncio.wait_for(broker.subscribing.wait(), 5)
        assert await manager.broadcast("to everyone") == 1      # plain now; x once welcomed
        broker.opened.set()
        await joining
        await wait_for_condition(lambda: "to everyone" in sock.sent)
        assert sock.frames()[0]["type"] == "welcome" and sock.sent.count("to everyone") == 1
        assert plain.sent == ["to everyone"]

    run(body())


def test_manager_joiner_catching_up_when_the_sequence_restarts_is_closed_with_1012():
    """A joiner whose replay is ahead of the broker's deliveries (Redis) is closed with 1012 when the next
    delivery belongs to a new epoch (a flushed Redis), instead of silently skipping it."""
    async def body():
        broker = LaggingBroker()
        manager = ConnectionManager(Settings(presence_interval=60), broker=broker)
        a, _ = await enter(manager, "r", "a")
        for text in ("m1", "m2", "m3"):
            await manager.publish("r", text)               # stored, not yet delivered here
        b, _ = await enter(manager, "r", "b")
        await wait_for_condition(lambda: b.sent)
        assert b.frames()[0]["last_id"] == 3 and len(chat_messages(b)) == 3
        broker.held.clear()                                 # the flush: those deliveries never come
        fresh = wschat.message_event("r", 1, "server", "after the flush")
        manager.deliver("r", fresh, wschat.encode(fresh), "new-epoch")
        await wait_for_condition(lambda: b.closed_with is not None and a.closed_with is not None)
        assert b.closed_with[0] == a.closed_with[0] == 1012
        assert [m["text"] for m in chat_messages(b)] == ["m1", "m2", "m3"]

    run(body())


def test_manager_closing_connection_leaves_its_room_and_is_given_up_after_the_close_timeout():
    """close(): the connection leaves its room at once and receives nothing more; if its socket has not ended
    CLOSE_TIMEOUT seconds later the manager drops it through the server and releases it."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        stuck, conn = await enter(manager, "r", "stuck", sock=StuckSocket())
        other, _ = await enter(manager, "r", "other")
        manager.disconnect(stuck)
        assert conn.state is wschat.ConnectionState.CLOSING
        assert manager.active_connections == [other] and await manager.members("r") == ["other"]
        queued = conn.pending                                 # its welcome, still waiting on the socket
        await manager.publish("r", "after")
        await wait_for_condition(lambda: chat_messages(other))
        assert conn.pending == queued == 1 and conn.give_up is not None
        conn.give_up._run()                                  # the CLOSE_TIMEOUT timer fires
        assert stuck.server.aborted and conn.state is wschat.ConnectionState.ENDED
        assert manager.stats()["connections"] == 1

    run(body())


def test_manager_direct_writes_go_through_send_nowait_and_the_queue_only_when_behind():
    """With the server's send_nowait, frames are written at once (no writer task); when the socket cannot take
    them they queue, in order, up to send_queue, and the client is dropped past it."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60, send_queue=4))
        sock, conn = await enter(manager, "r", "a")
        await manager.publish("r", "direct")
        assert chat_messages(sock)[-1]["text"] == "direct" and conn.writer is None
        sock.server.writable = False
        for i in range(4):
            await manager.publish("r", f"queued {i}")
        assert conn.pending == 4 and manager.slow_clients_dropped == 0
        await manager.publish("r", "one too many")
        assert manager.slow_clients_dropped == 1 and conn.state is wschat.ConnectionState.CLOSING

    run(body())


def test_manager_pings_over_the_rate_are_refused_and_put_the_client_in_debt():
    """ping_received(): PINGs within the burst are answered; past it each one is refused with the seconds
    the client must not be read, growing with the flood."""
    async def body():
        manager = ConnectionManager(Settings(rate=5, presence_interval=60))
        sock, conn = await enter(manager, "r", "a")
        assert sock.server.attached is conn
        assert [conn.ping_received() for _ in range(10)] == [0.0] * 10
        waits = [conn.ping_received() for _ in range(5)]
        assert all(wait > 0 for wait in waits) and waits == sorted(waits) and waits[-1] > 1.0

    run(body())


def test_settings_rate_below_one_still_lets_a_message_through():
    """burst = max(2 x rate, 1): at --rate 0.4 the first message is delivered, the next is limited."""
    assert Settings(rate=0.4).rate_burst == 1 and Settings(rate=20).rate_burst == 40
    with TestClient(create_app(rate=0.4)) as tc, tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
        next_frame(ws, "welcome")
        ws.send_text("first")
        assert next_frame(ws, "message")["text"] == "first"
        ws.send_text("second")
        assert "rate limit" in next_frame(ws, "error")["error"]


def test_app_room_name_or_client_id_with_a_trailing_newline_is_invalid_everywhere():
    """'general\\n' is no room name on any route, WebSocket or HTTP; 'bob\\n' is no client id."""
    assert not valid_room("general\n") and not valid_client_id("bob\n")
    with TestClient(create_app()) as tc:
        assert refused_code(tc, "/rooms/general%0A/ws?client_id=a") == 1008
        assert refused_code(tc, "/rooms/general/ws?client_id=bob%0A") == 1008
        assert refused_code(tc, "/ws/bob%0A") == 1008
        for method, path in (("GET", "/rooms/general%0A/members"), ("GET", "/rooms/general%0A/messages"),
                             ("POST", "/rooms/general%0A/messages")):
            assert tc.request(method, path, json={"text": "x"}).status_code == 422, path
        assert tc.get("/rooms").json() == {"rooms": []}


# ---- App: HTTP routes (TestClient) ----

def test_app_page_served_at_root():
    """GET / serves the chat page as HTML."""
    with TestClient(create_app()) as tc:
        response = tc.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<title>wschat</title>" in response.text


def test_app_healthz_ok():
    """GET /healthz answers {"status": "ok"} with the memory broker."""
    with TestClient(create_app()) as tc:
        response = tc.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


def test_app_healthz_503_with_reason_when_broker_down():
    """GET /healthz answers 503 with the broker's reason when the broker reports itself down."""
    app = create_app()
    app.state.chat.broker.health = lambda: (False, "connection refused")
    with TestClient(app) as tc:
        response = tc.get("/healthz")
    assert response.status_code == 503
    assert "connection refused" in response.text


def test_app_stats_counts_connections_rooms_and_messages():
    """GET /stats counts connections, rooms, frames in, deliveries out and names the broker."""
    with TestClient(create_app()) as tc:
        assert tc.get("/stats").json() == {"connections": 0, "rooms": 0, "messages_in": 0, "messages_out": 0,
                                           "slow_clients_dropped": 0,
                                           "broker": {"url": "memory://", "ok": True, "status": "ok"}}
        with tc.websocket_connect("/rooms/r/ws?client_id=a") as a, tc.websocket_connect("/rooms/r/ws?client_id=b") as b:
            for ws in (a, b):
                next_frame(ws, "welcome")
            a.send_json({"type": "message", "text": "hi"})
            for ws in (a, b):
                next_frame(ws, "message")
            a.send_json({"type": "ping"})
            next_frame(a, "pong")
            stats = tc.get("/stats").json()
        assert {k: stats[k] for k in ("connections", "rooms", "messages_in", "messages_out")} == {
            "connections": 2, "rooms": 1, "messages_in": 2, "messages_out": 2}


def test_app_rooms_lists_rooms_with_member_counts():
    """GET /rooms lists the rooms that have members, with their counts."""
    with TestClient(create_app()) as tc:
        post(tc, "quiet", "nobody is here")
        with tc.websocket_connect("/rooms/b/ws?client_id=x"), tc.websocket_connect("/rooms/a/ws?client_id=x"), \
                tc.websocket_connect("/rooms/a/ws?client_id=y"):
            assert tc.get("/rooms").json() == {"rooms": [{"room": "a", "count": 2}, {"room": "b", "count": 1}]}
        assert tc.get("/rooms").json() == {"rooms": []}


def test_app_members_lists_distinct_client_ids():
    """GET /rooms/{room}/members lists distinct connected client ids and their count."""
    with TestClient(create_app()) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=alice"), tc.websocket_connect("/rooms/r/ws?client_id=bob"), \
                tc.websocket_connect("/rooms/r/ws?client_id=bob"):
            body = tc.get("/rooms/r/members").json()
        assert (body["room"], sorted(body["members"]), body["count"]) == ("r", ["alice", "bob"], 2)
        assert tc.get("/rooms/r/members").json() == {"room": "r", "members": [], "count": 0}


def test_app_post_message_returns_201_with_stored_message():
    """POST /rooms/{room}/messages stores, numbers and delivers the message; "from" defaults to server, and
    a caller without an identity is host code: "system": true."""
    with TestClient(create_app()) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=alice") as alice:
            next_frame(alice, "welcome")
            first = post(tc, "r", "deploy done")
            second = post(tc, "r", "paid", **{"from": "billing"})
            assert next_frame(alice, "message") == first
            assert next_frame(alice, "message") == second
    assert set(first) == {"type", "id", "room", "from", "text", "ts", "system"} and first["system"] is True
    assert (first["id"], first["room"], first["from"], first["text"]) == (1, "r", "server", "deploy done")
    assert (second["id"], second["from"]) == (2, "billing")
    assert isinstance(first["ts"], float)


@pytest.mark.parametrize("room, body, code", [
    ("bad room!", {"text": "x"}, 422), ("x" * 65, {"text": "x"}, 422), ("r", {"text": ""}, 422),
    ("r", {}, 422), ("r", {"text": "x" * 101}, 413),
])
def test_app_post_message_rejects_bad_input(room, body, code):
    """Bad room name or empty text: 422; text over max_message_size: 413."""
    with TestClient(create_app(max_message_size=100)) as tc:
        assert tc.post(f"/rooms/{room}/messages", json=body).status_code == code
        assert tc.get("/rooms/r/messages").json()["messages"] == []


def test_app_messages_since_and_limit_oldest_first():
    """GET /rooms/{room}/messages returns retained messages with id > since, oldest first, at most limit."""
    with TestClient(create_app()) as tc:
        for i in range(5):
            post(tc, "r", f"m{i}")
        page = tc.get("/rooms/r/messages").json()
        assert set(page) == {"room", "epoch", "last_id", "messages"}
        assert (page["room"], page["last_id"]) == ("r", 5)
        assert [m["id"] for m in page["messages"]] == [1, 2, 3, 4, 5]
        assert [m["text"] for m in tc.get("/rooms/r/messages?since=2").json()["messages"]] == ["m2", "m3", "m4"]
        assert [m["id"] for m in tc.get("/rooms/r/messages?since=1&limit=2").json()["messages"]] == [2, 3]
        assert tc.get("/rooms/bad!/messages").status_code == 422


def test_app_history_keeps_the_last_n_messages():
    """History retains the last `history` messages (default 100); 0 keeps none, ids still count up."""
    with TestClient(create_app(rate=0)) as tc:
        for i in range(105):
            post(tc, "r", f"m{i}")
        assert [m["id"] for m in tc.get("/rooms/r/messages").json()["messages"]] == list(range(6, 106))
    with TestClient(create_app(history=0)) as tc, tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
        next_frame(ws, "welcome")
        assert [post(tc, "r", "a")["id"], post(tc, "r", "b")["id"]] == [1, 2]
        page = tc.get("/rooms/r/messages").json()
        assert (page["messages"], page["last_id"]) == ([], 2)
        assert next_frame(ws, "message")["id"] == 1


def test_app_message_ids_are_per_room():
    """Each room numbers its own messages from 1."""
    with TestClient(create_app()) as tc:
        assert [post(tc, "a", "x")["id"], post(tc, "b", "x")["id"], post(tc, "a", "y")["id"]] == [1, 1, 2]


# ---- App: echo, lobby and item routes (TestClient) ----

def test_app_echo_route():
    """WS /ws replies `Message text was: {data}` to each text message."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/ws") as ws:
        for text in ("hello", "{not json} ✓"):
            ws.send_text(text)
            assert ws.receive_text() == f"Message text was: {text}"


def test_app_lobby_texts():
    """The lobby text view: `You wrote:`, `Client #id says:`, joined and left lines, exactly."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/ws/alice") as alice:
        with tc.websocket_connect("/ws/bob") as bob:
            assert alice.receive_text() == "Client #bob joined the chat"
            alice.send_text("Hello, bob")
            assert alice.receive_text() == "You wrote: Hello, bob"
            assert bob.receive_text() == "Client #alice says: Hello, bob"
            bob.send_text("hi")
            assert bob.receive_text() == "You wrote: hi"
            assert alice.receive_text() == "Client #bob says: hi"
        assert alice.receive_text() == "Client #bob left the chat"


def test_app_lobby_text_view_and_room_json_view_share_the_lobby():
    """A message posted through /ws/{id} or /rooms/lobby/ws reaches both views."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/ws/alice") as alice:
        with tc.websocket_connect("/rooms/lobby/ws?client_id=bob") as bob:
            assert alice.receive_text() == "Client #bob joined the chat"
            next_frame(bob, "welcome")
            bob.send_json({"type": "message", "text": "from json"})
            assert alice.receive_text() == "Client #bob says: from json"
            assert next_frame(bob, "message")["text"] == "from json"
            alice.send_text("from text")
            assert alice.receive_text() == "You wrote: from text"
            frame = next_frame(bob, "message")
            assert (frame["id"], frame["room"], frame["from"], frame["text"]) == (2, "lobby", "alice", "from text")
            bob.send_json({"type": "message", "text": "psst", "to": "alice"})
            assert alice.receive_text() == "Client #bob says to you: psst"
        assert alice.receive_text() == "Client #bob left the chat"
        assert [m["text"] for m in tc.get("/rooms/lobby/messages").json()["messages"]] == ["from json", "from text"]


def test_app_lobby_sends_no_history_on_connect():
    """Joining the lobby text view replays nothing; the next line is live."""
    with TestClient(create_app()) as tc:
        post(tc, "lobby", "old news")
        with tc.websocket_connect("/ws/alice") as alice:
            post(tc, "lobby", "fresh")
            assert alice.receive_text() == "Client #server says: fresh"


@pytest.mark.parametrize("query, q_line", [("?token=T1&q=5", ["Query parameter q is: 5"]), ("?token=T1", [])])
def test_app_item_route_texts(query, q_line):
    """WS /items/{id}/ws answers credential, q (when given) and the message, in order."""
    with TestClient(create_app()) as tc, tc.websocket_connect(f"/items/foo/ws{query}") as ws:
        for text in ("one", "two"):
            ws.send_text(text)
            lines = [ws.receive_text() for _ in range(2 + len(q_line))]
            assert lines == ["Session cookie or query token value is: T1", *q_line,
                             f"Message text was: {text}, for item ID: foo"]


def test_app_item_route_accepts_session_cookie():
    """The item route takes its credential from the `session` cookie too."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/items/7/ws?q=0", headers={"cookie": "session=C00KIE"}) as ws:
        ws.send_text("hi")
        assert [ws.receive_text() for _ in range(3)] == ["Session cookie or query token value is: C00KIE",
                                                          "Query parameter q is: 0",
                                                          "Message text was: hi, for item ID: 7"]


@pytest.mark.parametrize("url", ["/items/foo/ws", "/items/foo/ws?q=1", "/items/foo/ws?token=", "/items/foo/ws?token=T&q=x"])
def test_app_item_route_refuses_without_credential(url):
    """Without a credential (or with a non-integer q) the item handshake is refused with 1008."""
    with TestClient(create_app()) as tc:
        assert refused_code(tc, url) == 1008


def test_app_item_route_refuses_a_credential_the_tokens_reject():
    """With tokens set, the item route admits a valid token and refuses any other credential with 1008."""
    with TestClient(create_app(tokens=["good"])) as tc:
        assert refused_code(tc, "/items/foo/ws?token=bad") == 1008
        with tc.websocket_connect("/items/foo/ws?token=good") as ws:
            ws.send_text("hi")
            assert ws.receive_text() == "Session cookie or query token value is: good"


# ---- App: room protocol (TestClient) ----

def test_app_welcome_has_documented_fields():
    """The first frame is the welcome with room, client_id, members, count, last_id, epoch, timeout."""
    with TestClient(create_app(timeout=42)) as tc:
        post(tc, "r", "before")
        with tc.websocket_connect("/rooms/r/ws?client_id=alice") as alice:
            welcome = alice.receive_json()
            with tc.websocket_connect("/rooms/r/ws?client_id=bob") as bob:
                second = bob.receive_json()
    epoch = tc.get("/rooms/r/messages").json()["epoch"]
    assert welcome == {"type": "welcome", "room": "r", "client_id": "alice", "members": ["alice"], "count": 1,
                       "last_id": 1, "epoch": epoch, "timeout": 42}
    assert isinstance(epoch, str) and epoch
    assert (sorted(second["members"]), second["count"]) == (["alice", "bob"], 2)


def test_app_welcome_members_capped_at_100_with_count():
    """Welcome lists at most 100 members with the full count; GET members lists them all."""
    async def body():
        app = create_app(presence_interval=0.5)
        chat = app.state.chat
        first = FakeSocket()
        await chat.connect(first, client_id="m000", room="big")
        for i in range(1, 120):
            await chat.connect(FakeSocket(), client_id=f"m{i:03}", room="big")
        last = FakeSocket()
        await chat.connect(last, client_id="last", room="big")
        await wait_for_condition(lambda: last.sent)
        welcome = last.frames()[0]
        assert (len(welcome["members"]), welcome["count"]) == (100, 121)
        assert set(welcome["members"]) <= {f"m{i:03}" for i in range(120)} | {"last"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http_client:
            listed = (await http_client.get("/rooms/big/members")).json()
        assert (len(set(listed["members"])), listed["count"]) == (121, 121)
        await wait_for_condition(lambda: presence_frames(first))
        storm = presence_frames(first)[0]
        assert (len(storm["joined"]), storm["truncated"], storm["count"]) == (100, True, 121)

    run(body())


def test_app_room_replays_retained_history_after_welcome():
    """Without since, a joiner gets the welcome, then every retained message in id order."""
    with TestClient(create_app(history=3)) as tc:
        for i in range(5):
            post(tc, "r", f"m{i}")
        with tc.websocket_connect("/rooms/r/ws?client_id=alice") as alice:
            welcome = alice.receive_json()
            assert (welcome["type"], welcome["last_id"], "recovered" in welcome) == ("welcome", 5, False)
            assert [next_frame(alice, "message")["id"] for _ in range(3)] == [3, 4, 5]
            post(tc, "r", "live")
            assert next_frame(alice, "message")["id"] == 6


@pytest.mark.parametrize("query, recovered, replayed", [
    ("since=1&epoch={epoch}", True, [2, 3]),
    ("since=2", True, [3]),                        # an omitted epoch is taken to match
    ("since=3&epoch={epoch}", True, []),
    ("since=1&epoch=not-the-epoch", False, [1, 2, 3]),
    ("since=0&epoch=not-the-epoch", False, [1, 2, 3]),
    ("since=7&epoch={epoch}", False, [1, 2, 3]),   # an id the room never reached
])
def test_app_reconnect_with_since_and_epoch(query, recovered, replayed):
    """Reconnecting with since/epoch recovers exactly the missed messages, or says recovered false."""
    with TestClient(create_app()) as tc:
        for i in range(3):
            post(tc, "r", f"m{i}")
        epoch = tc.get("/rooms/r/messages").json()["epoch"]
        with tc.websocket_connect(f"/rooms/r/ws?client_id=a&{query.format(epoch=epoch)}") as ws:
            welcome = ws.receive_json()
            assert (welcome["type"], welcome["recovered"], welcome["epoch"]) == ("welcome", recovered, epoch)
            post(tc, "r", "live")
            got = []
            while not got or got[-1] != 4:
                got.append(next_frame(ws, "message")["id"])
        assert got == replayed + [4]


def test_app_reconnect_past_retained_history_not_recovered():
    """When the gap is no longer retained, the client gets what is retained and recovered false."""
    with TestClient(create_app(history=2)) as tc:
        for i in range(4):
            post(tc, "r", f"m{i}")
        with tc.websocket_connect("/rooms/r/ws?client_id=a&since=1") as ws:
            assert ws.receive_json()["recovered"] is False
            assert [next_frame(ws, "message")["id"] for _ in range(2)] == [3, 4]
        with tc.websocket_connect("/rooms/r/ws?client_id=a&since=2") as ws:
            assert ws.receive_json()["recovered"] is True
            assert next_frame(ws, "message")["id"] == 3


def test_app_epoch_changes_when_the_sequence_starts_again():
    """A restarted memory broker starts rooms again under a new epoch, so an old id is not trusted."""
    with TestClient(create_app(history=0)) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
            old_epoch = ws.receive_json()["epoch"]
            ws.send_text("one")
            assert next_frame(ws, "message")["id"] == 1
        with tc.websocket_connect(f"/rooms/r/ws?client_id=a&since=1&epoch={old_epoch}") as ws:
            same = ws.receive_json()
    assert (same["epoch"], same["last_id"], same["recovered"]) == (old_epoch, 1, True)
    with TestClient(create_app(history=0)) as restarted:
        with restarted.websocket_connect(f"/rooms/r/ws?client_id=a&since=1&epoch={old_epoch}") as ws:
            welcome = ws.receive_json()
    assert welcome["epoch"] != old_epoch
    assert (welcome["last_id"], welcome["recovered"]) == (0, False)


def test_app_ping_gets_pong():
    """{"type": "ping"} is answered with {"type": "pong"}."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/rooms/r/ws") as ws:
        next_frame(ws, "welcome")
        ws.send_text('{"type": "ping"}')
        assert next_frame(ws, "pong") == {"type": "pong"}


def test_app_bare_text_frame_is_a_message():
    """A bare (non-JSON) text frame is a message with that text."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
        next_frame(ws, "welcome")
        ws.send_text("just words [1]")
        frame = next_frame(ws, "message")
        assert (frame["id"], frame["from"], frame["text"]) == (1, "a", "just words [1]")


def test_app_direct_message_reaches_recipient_and_sender_only():
    """A message with "to" goes to that member and back to the sender, carries "to" and no id."""
    with TestClient(create_app()) as tc:
        urls = [f"/rooms/r/ws?client_id={name}" for name in ("alice", "bob", "carol")]
        with tc.websocket_connect(urls[0]) as alice, tc.websocket_connect(urls[1]) as bob, \
                tc.websocket_connect(urls[2]) as carol:
            for ws in (alice, bob, carol):
                next_frame(ws, "welcome")
            alice.send_json({"type": "message", "text": "psst", "to": "bob"})
            for ws in (alice, bob):
                frame = next_frame(ws, "message")
                assert {k: frame[k] for k in ("room", "from", "to", "text")} == {
                    "room": "r", "from": "alice", "to": "bob", "text": "psst"}
                assert "id" not in frame
            alice.send_json({"type": "message", "text": "everyone"})
            assert next_frame(carol, "message")["text"] == "everyone"
        page = tc.get("/rooms/r/messages").json()
        assert ([m["text"] for m in page["messages"]], page["last_id"]) == (["everyone"], 1)


def test_app_direct_message_to_unknown_client_is_an_error():
    """A direct message to a client id not in the room gives an error frame; the connection stays open."""
    with TestClient(create_app()) as tc:
        with tc.websocket_connect("/rooms/other/ws?client_id=dave"), \
                tc.websocket_connect("/rooms/r/ws?client_id=alice") as alice:
            next_frame(alice, "welcome")
            alice.send_json({"type": "message", "text": "psst", "to": "dave"})
            assert "dave" in next_frame(alice, "error")["error"]
            alice.send_json({"type": "ping"})
            assert next_frame(alice, "pong") == {"type": "pong"}
        assert tc.get("/rooms/r/messages").json()["last_id"] == 0


def test_app_guest_ids_are_unique():
    """Without client_id the server assigns distinct guest-… ids."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/rooms/r/ws") as a, tc.websocket_connect("/rooms/r/ws") as b:
        ids = [next_frame(a, "welcome")["client_id"], next_frame(b, "welcome")["client_id"]]
        assert all(i.startswith("guest-") for i in ids) and ids[0] != ids[1]
        assert sorted(tc.get("/rooms/r/members").json()["members"]) == sorted(ids)


@pytest.mark.parametrize("url", [
    "/rooms/bad%20name/ws", f"/rooms/{'x' * 65}/ws", "/rooms/caf%C3%A9/ws",
    f"/rooms/r/ws?client_id={'x' * 65}", "/rooms/r/ws?client_id=a%0Ab", "/rooms/r/ws?client_id=",
    "/rooms/r/ws?since=-1", "/rooms/r/ws?since=abc", "/ws/a%01b",
])
def test_app_invalid_room_or_client_id_refused(url):
    """Invalid room names, client ids or since are refused at the handshake with 1008."""
    with TestClient(create_app()) as tc:
        assert refused_code(tc, url) == 1008


def test_app_longest_valid_names_accepted():
    """A 64-character room name and a 64-character client id are accepted."""
    with TestClient(create_app()) as tc, tc.websocket_connect(f"/rooms/{'r' * 64}/ws?client_id={'c' * 64}") as ws:
        welcome = ws.receive_json()
    assert (welcome["room"], welcome["client_id"]) == ("r" * 64, "c" * 64)


# ---- App: embedding (host code, mounting, several apps) ----

def test_app_two_apps_in_one_process_are_independent():
    """Two create_app() share no rooms, ids, history, epochs or counters."""
    with TestClient(create_app()) as one, TestClient(create_app()) as two:
        with one.websocket_connect("/rooms/r/ws?client_id=a") as a:
            epoch_one = next_frame(a, "welcome")["epoch"]
            assert post(two, "r", "in two")["id"] == 1
            assert post(one, "r", "in one")["id"] == 1
            assert next_frame(a, "message")["text"] == "in one"
            assert two.get("/rooms/r/members").json()["members"] == []
        assert two.get("/rooms/r/messages").json()["epoch"] != epoch_one
        assert [m["text"] for m in two.get("/rooms/r/messages").json()["messages"]] == ["in two"]
        assert (one.get("/stats").json()["messages_out"], two.get("/stats").json()["messages_out"]) == (1, 0)


def test_app_host_code_publishes_through_state_chat():
    """Host code reaches the manager at app.state.chat: publish, members, history, stats."""
    chat_app = create_app()
    host = FastAPI()

    @host.post("/invoices/{number}/paid")
    async def paid(number: int) -> dict:
        chat = chat_app.state.chat
        message = await chat.publish("billing", f"invoice {number} paid", sender="billing")
        return {"message": message, "members": await chat.members("billing"),
                "history": await chat.history("billing", since=0), "stats": chat.stats()}

    host.mount("/chat", chat_app)
    with TestClient(host) as tc, tc.websocket_connect("/chat/rooms/billing/ws?client_id=ops") as ops:
        next_frame(ops, "welcome")
        result = tc.post("/invoices/7/paid").json()
        frame = next_frame(ops, "message")
    assert (frame["from"], frame["text"], frame["id"]) == ("billing", "invoice 7 paid", 1)
    assert result["message"] == frame and result["history"] == [frame]
    assert result["members"] == ["ops"] and result["stats"]["connections"] == 1


def test_app_every_route_works_mounted_under_a_prefix():
    """Mounted at /chat, every HTTP and WebSocket route answers under the prefix."""
    host = FastAPI()
    host.mount("/chat", create_app())
    with TestClient(host) as tc:
        assert "<title>wschat</title>" in tc.get("/chat/").text
        assert tc.get("/chat/healthz").json() == {"status": "ok"}
        assert tc.post("/chat/rooms/r/messages", json={"text": "posted"}).status_code == 201
        assert [m["text"] for m in tc.get("/chat/rooms/r/messages").json()["messages"]] == ["posted"]
        with tc.websocket_connect("/chat/rooms/r/ws?client_id=alice") as room:
            assert next_frame(room, "welcome")["last_id"] == 1
            assert tc.get("/chat/rooms/r/members").json()["members"] == ["alice"]
            assert tc.get("/chat/rooms").json() == {"rooms": [{"room": "r", "count": 1}]}
            assert tc.get("/chat/stats").json()["connections"] == 1
        with tc.websocket_connect("/chat/ws") as echo:
            echo.send_text("e")
            assert echo.receive_text() == "Message text was: e"
        with tc.websocket_connect("/chat/ws/bob") as lobby:
            lobby.send_text("l")
            assert lobby.receive_text() == "You wrote: l"
        with tc.websocket_connect("/chat/items/i/ws?token=t") as item:
            item.send_text("m")
            assert [item.receive_text() for _ in range(2)][1] == "Message text was: m, for item ID: i"


@pytest.mark.parametrize("hook", ["sync", "async"])
def test_app_authenticate_hook_identity_becomes_client_id(hook):
    """create_app(authenticate=...) (sync or async) admits by credential; its identity is the client id."""
    users = {"s3cret": "alice"}

    async def async_lookup(credential: str) -> str | None:
        return users.get(credential)

    app = create_app(authenticate=users.get if hook == "sync" else async_lookup)
    with TestClient(app) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=mallory&token=s3cret") as ws:
            assert ws.receive_json()["client_id"] == "alice"
        assert refused_code(tc, "/rooms/r/ws?client_id=mallory&token=wrong") == 1008


# ---- CLI: options, environment, help ----

CLI_OPTIONS = [  # option, value given, setting name, parsed value, env variable
    ("--host", "0.0.0.0", "host", "0.0.0.0", "WSCHAT_HOST"),
    ("--port", "9123", "port", 9123, "WSCHAT_PORT"),
    ("--timeout", "2.5", "timeout", 2.5, "WSCHAT_TIMEOUT"),
    ("--broker", "memory://", "broker", "memory://", "WSCHAT_BROKER"),
    ("--token", "t1", "tokens", ("t1",), "WSCHAT_TOKENS"),
    ("--allowed-origin", "https://a.example", "allowed_origins", ("https://a.example",), "WSCHAT_ALLOWED_ORIGIN"),
    ("--history", "7", "history", 7, "WSCHAT_HISTORY"),
    ("--max-message-size", "1000", "max_message_size", 1000, "WSCHAT_MAX_MESSAGE_SIZE"),
    ("--rate", "3", "rate", 3.0, "WSCHAT_RATE"),
    ("--max-connections", "5", "max_connections", 5, "WSCHAT_MAX_CONNECTIONS"),
    ("--send-queue", "16", "send_queue", 16, "WSCHAT_SEND_QUEUE"),
    ("--workers", "1", "workers", 1, "WSCHAT_WORKERS"),
    ("--log-level", "warning", "log_level", "warning", "WSCHAT_LOG_LEVEL"),
    ("--root-path", "/chat", "root_path", "/chat", "WSCHAT_ROOT_PATH"),
]


def serve_settings(monkeypatch, args: list[str], env: dict | None = None) -> Settings:
    """The Settings `wschat serve ARGS` would run with (the server itself is not started)."""
    captured: list[Settings] = []
    monkeypatch.setattr(wschat, "_run", lambda app, settings: captured.append(settings))
    result = CliRunner().invoke(wschat.main, ["serve", *args], env=env or {})
    assert result.exit_code == 0, result.output
    return captured[0]


@pytest.mark.parametrize("option, value, name, parsed, env", CLI_OPTIONS)
def test_cli_option_and_env_variable_set_the_setting(monkeypatch, option, value, name, parsed, env):
    """Each serve option, and its WSCHAT_ environment variable, sets the matching setting."""
    assert getattr(serve_settings(monkeypatch, [option, value]), name) == parsed
    assert getattr(serve_settings(monkeypatch, [], {env: value}), name) == parsed


def test_cli_repeatable_options_and_comma_separated_env(monkeypatch):
    """--token and --allowed-origin repeat; their environment variables take comma-separated lists."""
    settings = serve_settings(monkeypatch, ["--token", "a", "--token", "b", "--allowed-origin", "*"])
    assert (settings.tokens, settings.allowed_origins) == (("a", "b"), ("*",))
    settings = serve_settings(monkeypatch, [], {"WSCHAT_TOKENS": "a,b", "WSCHAT_ALLOWED_ORIGIN": "https://x.io,*"})
    assert (settings.tokens, settings.allowed_origins) == (("a", "b"), ("https://x.io", "*"))


def test_cli_bad_option_value_is_a_usage_error():
    """A bad option value exits with status 2 and names the option."""
    result = CliRunner().invoke(wschat.main, ["serve", "--history", "-1"])
    assert result.exit_code == 2 and "history" in result.output


HELP_DEFAULTS = {"--host": "127.0.0.1", "--port": "8000", "--timeout": "300", "--broker": "memory://",
                 "--token": "None", "--allowed-origin": "same origin", "--history": "100",
                 "--max-message-size": "65536", "--rate": "20", "--max-connections": "10000",
                 "--send-queue": "1024", "--workers": "1", "--log-level": "info", "--root-path": '""'}


def test_cli_help_documents_every_option_with_default_and_env_variable():
    """`python wschat.py serve --help` lists every SPEC option with its default and WSCHAT_ variable."""
    result = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    blocks = {m.group(1): " ".join(m.group(2).split())
              for m in re.finditer(r"^  (--[a-z-]+)(.*?)(?=^  -|\Z)", result.stdout, re.M | re.S)}
    envs = {option: env for option, _, _, _, env in CLI_OPTIONS}
    for option, default in HELP_DEFAULTS.items():
        assert option in blocks, f"{option} missing from --help"
        assert envs[option] in blocks[option], f"{option}: no {envs[option]} in {blocks[option]!r}"
        assert default in blocks[option], f"{option}: default {default} not shown in {blocks[option]!r}"


def test_cli_workers_above_one_with_memory_broker_exits_with_clear_error():
    """`serve --workers 2` with the memory broker exits non-zero, saying a shared broker is needed."""
    result = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--workers", "2",
                             "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "--workers" in result.stderr and "redis://" in result.stderr
    assert "Traceback" not in result.stderr


# ---- End to end: python wschat.py serve with real clients ----

@pytest.mark.parametrize("args, path", [((), "/"), (("--root-path", "/chat"), "/chat/")])
def test_e2e_serve_prints_the_url_to_open(serve, args, path):
    """On start, serve prints the URL to open in a browser, including --root-path."""
    server = serve(*args)
    assert f"http://127.0.0.1:{server.port}{path} " in server.log


def test_e2e_two_clients_chat_in_a_room(serve):
    """Two clients in a room see each other's messages, with ids, in the same order."""
    server = serve()

    async def body():
        alice, welcome = await join(room_url(server, "team", "alice"))
        bob, _ = await join(room_url(server, "team", "bob"))
        assert welcome["members"] == ["alice"]
        await alice.recv_until(lambda f: f["type"] == "presence" and "bob" in f["joined"])
        await alice.send("hi bob")
        await bob.send({"type": "message", "text": "hi alice"})
        for who in (alice, bob):
            got = [(m["id"], m["from"], m["text"]) for m in await who.messages(2)]
            assert sorted(got) == [(1, "alice", "hi bob"), (2, "bob", "hi alice")] and got == sorted(got)
        await bob.close()
        left = await alice.recv_until(lambda f: f["type"] == "presence" and "bob" in f["left"])
        assert left["count"] == 1
        await alice.close()

    run(body())
    assert [m["text"] for m in http("GET", server.url + "/rooms/team/messages")[1]["messages"]] == ["hi bob", "hi alice"]


def test_e2e_lobby_text_view_and_room_json_view_see_each_other(serve):
    """A text-view lobby client and a JSON client of room `lobby` see each other's messages."""
    server = serve()

    async def body():
        async with client(server.ws_url + "/ws/alice") as alice:
            bob, _ = await join(room_url(server, "lobby", "bob"))
            assert await alice.recv() == "Client #bob joined the chat"
            await alice.send("hello from text")
            assert await alice.recv() == "You wrote: hello from text"
            frame = (await bob.messages(1))[0]
            assert (frame["from"], frame["text"]) == ("alice", "hello from text")
            await bob.send({"type": "message", "text": "hello from json"})
            assert await alice.recv() == "Client #bob says: hello from json"
            await bob.close()
            assert await alice.recv() == "Client #bob left the chat"

    run(body())


def test_e2e_many_clients_receive_every_message_once_in_order(serve):
    """50 clients in one room each receive every message of 5 publishers exactly once, in id order."""
    server = serve()

    async def body():
        members = [(await join(room_url(server, "crowd", f"c{i}")))[0] for i in range(50)]
        publishers = members[:5]
        await asyncio.gather(*(p.send({"type": "message", "text": f"p{n}-{k}"})
                               for k in range(10) for n, p in enumerate(publishers)))
        await wait_for_condition(lambda: http("GET", server.url + "/rooms/crowd/messages")[1]["last_id"] == 50, 20)
        await publishers[0].send("end")  # any duplicate would arrive before this last message

        async def collect(member: Client) -> list[dict]:
            got: list[dict] = []
            while not got or got[-1]["text"] != "end":
                got += await member.messages(1, timeout=20)
            return got[:-1]

        everyone = await asyncio.gather(*(collect(m) for m in members))
        expected = {f"p{n}-{k}" for n in range(5) for k in range(10)}
        for got in everyone:
            assert [m["id"] for m in got] == list(range(1, 51))
            assert {m["text"] for m in got} == expected
        await asyncio.gather(*(m.close() for m in members))

    run(body(), 60)


def connect_with_small_receive_buffer(url: str, port: int) -> Any:
    """A websockets client whose kernel receive buffer is small, so a client that never reads fills up fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return ws_connect(url, sock=sock, open_timeout=5, close_timeout=2)


def test_e2e_client_that_stops_reading_delays_nobody_and_is_dropped(serve):
    """A client that never reads does not delay others, is dropped (counted) and closed with 1013."""
    server = serve("--send-queue", "16", "--rate", "0")

    async def body():
        fast, _ = await join(room_url(server, "r", "fast"))
        slow = Client(await asyncio.wait_for(connect_with_small_receive_buffer(room_url(server, "r", "slow"),
                                                                               server.port), 10))
        big = "x" * 60_000
        dropped = False
        for i in range(1, 601):
            await fast.send({"type": "message", "text": f"{i} {big}"})
            assert (await fast.messages(1))[0]["id"] == i      # the fast client never waits for the slow one
            if i % 20 == 0 and http("GET", server.url + "/stats")[1]["slow_clients_dropped"] == 1:
                dropped = True
                break
        assert dropped, "the client that stopped reading was never dropped"
        assert http("GET", server.url + "/rooms/r/members")[1]["members"] == ["fast"]
        for j in range(i + 1, i + 6):
            await fast.send(f"after {j}")
            assert (await fast.messages(1))[0]["text"] == f"after {j}"
        assert (await slow.closed(timeout=10))[0] == 1013
        await fast.close()

    run(body(), 90)
    assert http("GET", server.url + "/stats")[1]["slow_clients_dropped"] == 1
    assert "Traceback" not in server.log


def test_e2e_client_killed_mid_stream_leaves_no_trace(serve):
    """A client whose TCP connection is aborted mid-stream is cleaned up; others unaffected; no traceback."""
    server = serve("--rate", "0")
    baseline = http("GET", server.url + "/stats")[1]["connections"]

    async def body():
        watcher, _ = await join(room_url(server, "k", "watcher"))
        victim, _ = await join(room_url(server, "k", "victim"))
        for i in range(40):
            await watcher.send(f"m{i} " + "y" * 2000)
        await victim.messages(1)
        victim.socket.transport.abort()
        assert [m["id"] for m in await watcher.messages(40)] == list(range(1, 41))
        await wait_for_condition(lambda: http("GET", server.url + "/rooms/k/members")[1]["members"] == ["watcher"])
        await watcher.send("still here")
        assert (await watcher.messages(1))[0]["text"] == "still here"
        await watcher.close()
        await wait_for_condition(lambda: http("GET", server.url + "/stats")[1]["connections"] == baseline)

    run(body())
    assert http("GET", server.url + "/rooms/k/members")[1] == {"room": "k", "members": [], "count": 0}
    assert "Traceback" not in server.log and "ERROR" not in server.log


HOST_APP = '''
from fastapi import FastAPI
from wschat import create_app

app = FastAPI()
chat_app = create_app()
app.mount("/chat", chat_app)


@app.post("/notify/{room}")
async def notify(room: str):
    return await chat_app.state.chat.publish(room, "invoice paid", sender="billing")
'''


def test_e2e_mounted_under_chat_in_a_host_app(serve, tmp_path):
    """Mounted at /chat in a host FastAPI app under uvicorn: the page and a room chat work, host code publishes."""
    (tmp_path / "hostapp.py").write_text(HOST_APP)
    server = serve(command=[sys.executable, "-m", "uvicorn", "hostapp:app"], ready_path="/chat/healthz",
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"})
    status, page = http("GET", server.url + "/chat/")
    assert status == 200 and "<title>wschat</title>" in page

    async def body():
        alice, _ = await join(f"{server.ws_url}/chat/rooms/r/ws?client_id=alice")
        bob, _ = await join(f"{server.ws_url}/chat/rooms/r/ws?client_id=bob")
        await alice.send("hello under /chat")
        assert (await bob.messages(1))[0]["text"] == "hello under /chat"
        assert http("POST", server.url + "/notify/r")[0] == 200
        frame = (await bob.messages(1))[0]
        assert (frame["id"], frame["from"], frame["text"]) == (2, "billing", "invoice paid")
        await alice.close()
        await bob.close()

    run(body())
    assert http("GET", server.url + "/chat/rooms/r/messages")[1]["last_id"] == 2


@pytest.mark.parametrize("deflate", ["true", "false"])
def test_e2e_host_app_with_wschat_protocol(serve, tmp_path, deflate):
    """An embedder's uvicorn with --ws wschat:coalescing_websocket_protocol chats in order, with or
    without permessage-deflate negotiated (the websockets client asks for it; then uvicorn frames)."""
    (tmp_path / "hostapp.py").write_text(HOST_APP)
    server = serve(command=[sys.executable, "-m", "uvicorn", "hostapp:app", "--ws",
                            "wschat:coalescing_websocket_protocol", "--ws-per-message-deflate", deflate],
                   ready_path="/chat/healthz", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"})

    async def body():
        members = [(await join(f"{server.ws_url}/chat/rooms/r/ws?client_id=m{n}"))[0] for n in range(5)]
        for n in range(20):
            await members[n % 5].send(f"message {n}")
        seen = [[(m["id"], m["text"]) for m in await member.messages(20)] for member in members]
        assert all(sequence == seen[0] for sequence in seen)          # everyone, the same order
        assert [message_id for message_id, _ in seen[0]] == list(range(1, 21))
        assert sorted(text for _, text in seen[0]) == sorted(f"message {n}" for n in range(20))
        for member in members:
            await member.close()

    run(body())
    assert "Traceback" not in server.log


def test_serving_protocols_fall_back_to_uvicorn_when_what_they_rely_on_is_missing():
    """wschat's protocol subclasses check what they rely on in uvicorn; a class lacking a method or an
    attribute its __init__ sets is reported, and then uvicorn's own protocol is used."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    class Older:   # like uvicorn 0.52.0: no pause_writing, never assigns `disconnected`
        def __init__(self) -> None:
            self.writable = self.transport = None

        def handle_ping(self) -> None: ...

    assert wschat._lacks(Older, ("handle_ping", "pause_writing"), ("writable", "disconnected")) == [
        "pause_writing", "disconnected"]
    assert wschat._lacks(WebSocketsSansIOProtocol, wschat._SANSIO_NEEDS, wschat._SANSIO_ATTRIBUTES) == []
    assert wschat._serving_protocols() == {"http": "wschat:bounded_http_protocol",
                                           "ws": "wschat:coalescing_websocket_protocol"}


def test_e2e_uvicorn_factory(serve):
    """`uvicorn --factory wschat:create_app` serves the chat."""
    server = serve(command=[sys.executable, "-m", "uvicorn", "--factory", "wschat:create_app"],
                   env={"PYTHONPATH": str(HERE)})
    assert http("GET", server.url + "/healthz") == (200, {"status": "ok"})

    async def body():
        alice, _ = await join(room_url(server, "f", "alice"))
        await alice.send("made by a factory")
        assert (await alice.messages(1))[0]["text"] == "made by a factory"
        async with client(server.ws_url + "/ws") as echo:
            await echo.send("e")
            assert await echo.recv() == "Message text was: e"
        await alice.close()

    run(body())


def test_e2e_sigterm_closes_clients_with_a_close_frame(serve):
    """SIGTERM makes the server send every client a close frame (1001 or 1012) within 5 s."""
    server = serve()

    async def body():
        room, _ = await join(room_url(server, "r", "a"))
        lobby = Client(await ws_connect(server.ws_url + "/ws/b", open_timeout=5))
        assert await room.recv_until(lambda f: f["type"] == "presence")
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        codes = await asyncio.gather(room.closed(5), lobby.closed(5))
        assert time.monotonic() - started < 5
        assert {code for code, _ in codes} <= {1001, 1012}, codes

    run(body())
    assert server.process.wait(10) is not None


def test_e2e_environment_variables_take_effect(serve):
    """WSCHAT_HISTORY and WSCHAT_TOKENS configure `serve` like their options."""
    server = serve(env={"WSCHAT_HISTORY": "1", "WSCHAT_TOKENS": "a,b"})
    assert http("POST", server.url + "/rooms/r/messages", {"text": "x"})[0] == 401
    for token in ("a", "b"):
        status, _ = http("POST", server.url + "/rooms/r/messages", {"text": token},
                         headers={"Authorization": f"Bearer {token}"})
        assert status == 201
    status, page = http("GET", server.url + "/rooms/r/messages?token=b")
    assert status == 200 and [(m["id"], m["text"]) for m in page["messages"]] == [(2, "b")]

    async def body():
        with pytest.raises(websockets.InvalidStatus):
            await ws_connect(room_url(server, "r", "eve"), open_timeout=5)
        alice, welcome = await join(room_url(server, "r", "alice", token="a"))
        assert welcome["last_id"] == 2
        await alice.close()

    run(body())


def test_e2e_idle_timeout_closes_silent_client_but_not_a_pinging_one(serve):
    """With --timeout 1 a silent client is closed 1000 "Session timeout"; one pinging every 0.3 s stays open."""
    server = serve("--timeout", "1")

    async def body():
        idle, welcome = await join(room_url(server, "t", "idle"))
        busy, _ = await join(room_url(server, "t", "busy"))
        assert welcome["timeout"] == 1

        async def keep_pinging() -> None:
            for _ in range(8):
                await busy.send({"type": "ping"})
                await busy.recv_until(lambda f: f["type"] == "pong")
                await asyncio.sleep(0.3)

        closed, _ = await asyncio.gather(idle.closed(5), keep_pinging())
        assert closed == (1000, "Session timeout")
        await busy.send("still open")
        assert (await busy.messages(1))[0]["text"] == "still open"
        await busy.close()

    run(body())


# ---------------------------------------------------------------------------
# Embedding: identity, authorization, hooks (SPEC section 11)
# ---------------------------------------------------------------------------

# ---- Hooks through the app (TestClient) ----

def both(hook: Callable) -> list[Callable]:
    """A plain hook and the same as a coroutine function: SPEC 11 takes either."""
    async def async_version(*args: Any) -> Any:
        await asyncio.sleep(0)
        return hook(*args)
    return [hook, async_version]


def header_identity(connection: HTTPConnection) -> str | None:
    """identify=: the X-User header (any header or cookie would do)."""
    return connection.headers.get("x-user")


def as_user(name: str) -> dict:
    return {"headers": {"X-User": name}}


@pytest.mark.parametrize("identify", both(header_identity), ids=["sync", "async"])
def test_hooks_identify_names_the_client_and_none_refuses(identify):
    """identify(connection): its answer is the client id (a client_id query cannot override it); None is
    HTTP 401 and WebSocket 1008 before accept; a custom cookie reaches it too."""
    def cookie_or_header(connection: HTTPConnection) -> Any:
        return connection.cookies.get("sid") or identify(connection)

    with TestClient(create_app(identify=cookie_or_header)) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=mallory", **as_user("alice")) as ws:
            assert ws.receive_json()["client_id"] == "alice"
        tc.cookies.set("sid", "bob")
        with tc.websocket_connect("/ws/whoever") as ws:
            ws.send_text("hi")
            assert ws.receive_text() == "You wrote: hi"
        tc.cookies.clear()
        assert refused_code(tc, "/rooms/r/ws") == 1008
        assert tc.get("/rooms").status_code == 401 and tc.get("/rooms", **as_user("alice")).status_code == 200
        assert tc.get("/healthz").status_code == 200 and tc.get("/").status_code == 200


def test_hooks_authorize_is_asked_for_every_action_with_identity_action_and_room():
    """authorize(identity, action, room) is asked before join (room route and lobby), read, members, post
    (WebSocket, direct and HTTP), list, delete and stats; a refusal is 403, 1008 before accept, or an error
    frame; what it allows works as before."""
    asked: list[tuple] = []

    def authorize(identity: str | None, action: str, room: str | None) -> bool:
        asked.append((identity, action, room))
        return not (identity == "carol" and room == "secret") and not (action == "stats" and identity != "root")

    with TestClient(create_app(identify=header_identity, authorize=authorize)) as tc:
        with tc.websocket_connect("/rooms/secret/ws", **as_user("alice")) as alice:
            next_frame(alice, "welcome")
            with tc.websocket_connect("/rooms/secret/ws", **as_user("bob")) as bob:
                next_frame(bob, "welcome")
                alice.send_json({"type": "message", "text": "hi"})
                alice.send_json({"type": "message", "text": "psst", "to": "bob"})
                assert [next_frame(bob, "message")["text"] for _ in range(2)] == ["hi", "psst"]
                assert tc.post("/rooms/secret/messages", json={"text": "over http"}, **as_user("alice")).status_code == 201
                assert tc.get("/rooms", **as_user("carol")).json() == {"rooms": []}
                assert [r["room"] for r in tc.get("/rooms", **as_user("alice")).json()["rooms"]] == ["secret"]
        with tc.websocket_connect("/ws/alice", **as_user("alice")) as lobby:
            lobby.send_text("in the lobby")
            assert lobby.receive_text() == "You wrote: in the lobby"
        for method, path in (("GET", "/rooms/secret/messages"), ("GET", "/rooms/secret/members"),
                             ("POST", "/rooms/secret/messages"), ("DELETE", "/rooms/secret/messages/1")):
            response = tc.request(method, path, json={"text": "x"}, **as_user("carol"))
            assert response.status_code == 403 and "not allowed" in response.json()["detail"], (method, path)
        assert refused_code(tc, "/rooms/secret/ws", **as_user("carol")) == 1008
        assert tc.get("/stats", **as_user("alice")).status_code == 403
        assert tc.get("/stats", **as_user("root")).status_code == 200
        assert tc.delete("/rooms/secret/messages/1", **as_user("alice")).status_code == 204
    actions = {action for _, action, _ in asked}
    assert actions == set(wschat.ACTIONS), actions
    assert ("alice", "join", "lobby") in asked and ("root", "stats", None) in asked
    assert asked.count(("alice", "post", "secret")) == 3          # WebSocket, direct, HTTP


def test_hooks_authorize_refusing_a_message_gives_an_error_frame_and_the_connection_stays():
    """A message authorize refuses ("post") gets an error frame, is not stored, and the client can go on."""
    muted = {"bob"}
    with TestClient(create_app(identify=header_identity, authorize=lambda who, action, room:
                               not (action == "post" and who in muted))) as tc:
        with tc.websocket_connect("/rooms/r/ws", **as_user("bob")) as bob:
            next_frame(bob, "welcome")
            bob.send_text("let me speak")
            assert "not allowed to post" in next_frame(bob, "error")["error"]
            muted.clear()
            bob.send_text("thanks")
            assert next_frame(bob, "message")["text"] == "thanks"
        assert [m["text"] for m in tc.get("/rooms/r/messages", **as_user("bob")).json()["messages"]] == ["thanks"]


def test_hooks_authorize_that_raises_refuses_and_is_logged_once_with_its_traceback(caplog):
    """Fail closed: a raising authorize refuses (403, 1008) and logs one record with the traceback."""
    def authorize(identity: str | None, action: str, room: str | None) -> bool:
        raise KeyError("user table unreachable")

    caplog.set_level(logging.ERROR, logger="wschat")
    with TestClient(create_app(identify=header_identity, authorize=authorize)) as tc:
        assert tc.get("/rooms/r/messages", **as_user("alice")).status_code == 403
    records = [r for r in caplog.records if "authorize hook" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info and records[0].exc_info[0] is KeyError
    with TestClient(create_app(identify=header_identity, authorize=authorize)) as tc:
        assert refused_code(tc, "/rooms/r/ws", **as_user("alice")) == 1008


def test_hooks_authorize_without_an_identity_hook_gets_none():
    """Without identify/authenticate the identity is None: authorize can still decide by room."""
    asked = []
    with TestClient(create_app(authorize=lambda who, action, room: asked.append(who) or room != "closed")) as tc:
        assert tc.get("/rooms/open/messages").status_code == 200
        assert tc.get("/rooms/closed/messages").status_code == 403
        assert refused_code(tc, "/rooms/closed/ws?client_id=a") == 1008
    assert set(asked) == {None}


@pytest.mark.parametrize("rewrite", both(lambda draft: draft.text.upper() if draft.text != "keep" else None),
                         ids=["sync", "async"])
def test_hooks_on_message_rewrites_or_keeps_on_every_source_and_what_is_stored_is_what_is_delivered(rewrite):
    """on_message sees every client message (room route, direct, lobby, POST) as a Draft; None keeps the text,
    a string replaces it; the stored and the delivered text are the same."""
    drafts: list[wschat.Draft] = []

    def hook(draft: wschat.Draft) -> Any:
        drafts.append(draft)
        return rewrite(draft)

    with TestClient(create_app(identify=header_identity, on_message=hook)) as tc:
        with tc.websocket_connect("/rooms/lobby/ws", **as_user("alice")) as alice, \
                tc.websocket_connect("/rooms/lobby/ws", **as_user("bob")) as bob:
            next_frame(alice, "welcome")
            next_frame(bob, "welcome")
            alice.send_text("hello")
            alice.send_text("keep")
            alice.send_json({"type": "message", "text": "psst", "to": "bob"})
            assert [next_frame(bob, "message")["text"] for _ in range(3)] == ["HELLO", "keep", "PSST"]
            with tc.websocket_connect("/ws/carol", **as_user("carol")) as carol:
                carol.send_text("from the lobby")
                assert carol.receive_text() == "You wrote: FROM THE LOBBY"
            assert tc.post("/rooms/lobby/messages", json={"text": "posted"}, **as_user("alice")).json()["text"] == "POSTED"
        stored = [m["text"] for m in tc.get("/rooms/lobby/messages", **as_user("alice")).json()["messages"]]
    assert stored == ["HELLO", "keep", "FROM THE LOBBY", "POSTED"]
    assert [(d.room, d.sender, d.text, d.to, d.source) for d in drafts] == [
        ("lobby", "alice", "hello", None, "ws"), ("lobby", "alice", "keep", None, "ws"),
        ("lobby", "alice", "psst", "bob", "ws"), ("lobby", "carol", "from the lobby", None, "lobby"),
        ("lobby", "alice", "posted", None, "http")]


def test_hooks_on_message_reject_and_errors_refuse_with_nothing_stored(caplog):
    """Reject(reason): an error frame / HTTP 422 with the reason. Any other exception: refused with a generic
    reason, logged once. A rewrite over max_message_size is refused. Nothing of it is stored or delivered."""
    def hook(draft: wschat.Draft) -> str | None:
        if "spam" in draft.text:
            raise wschat.Reject("no spam here")
        if "boom" in draft.text:
            raise RuntimeError("moderation service down")
        return "x" * 200 if "grow" in draft.text else None

    caplog.set_level(logging.ERROR, logger="wschat")
    with TestClient(create_app(on_message=hook, max_message_size=100)) as tc:
        with tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
            next_frame(ws, "welcome")
            for text, reason in (("buy spam", "no spam here"), ("boom", "message refused"),
                                 ("grow", "larger than 100 bytes")):
                ws.send_text(text)
                assert reason in next_frame(ws, "error")["error"], text
            ws.send_text("fine")
            assert next_frame(ws, "message")["text"] == "fine"
        response = tc.post("/rooms/r/messages", json={"text": "spam again"})
        assert (response.status_code, response.json()["detail"]) == (422, "no spam here")
        assert [m["text"] for m in tc.get("/rooms/r/messages").json()["messages"]] == ["fine"]
    raised = [r for r in caplog.records if "on_message hook" in r.getMessage()]
    assert len(raised) == 1 and raised[0].exc_info[0] is RuntimeError


def test_hooks_on_published_hears_every_stored_message_with_its_epoch_in_the_background():
    """on_published gets each stored message plus its epoch, from clients, POST and publish(); a slow async
    hook never delays delivery; one that raises is logged and the chat goes on."""
    heard: list[dict] = []
    release = asyncio.Event()

    async def slow(message: dict) -> None:
        await release.wait()              # delivery must not wait for this
        heard.append(message)

    def failing(message: dict) -> None:
        raise ValueError("database down")

    async def body():
        manager = ConnectionManager(Settings(presence_interval=60), hooks=wschat.Hooks(on_published=slow))
        sock, conn = await enter(manager, "r", "alice")
        await manager.submit(wschat.Draft("r", "alice", "from a client"), None)
        await manager.publish("r", "from the host")
        assert [m["text"] for m in chat_messages(sock)] == ["from a client", "from the host"]
        assert heard == []
        release.set()
        await wait_for_condition(lambda: len(heard) == 2)
        epoch = sock.frames()[0]["epoch"]
        assert [(m["id"], m["text"], m["epoch"]) for m in heard] == [(1, "from a client", epoch),
                                                                       (2, "from the host", epoch)]
        assert "system" not in heard[0] and heard[1]["system"] is True
        broken = ConnectionManager(Settings(presence_interval=60), hooks=wschat.Hooks(on_published=failing))
        other, _ = await enter(broken, "r", "bob")
        await broken.publish("r", "still delivered")
        await broken.publish("r", "and again")
        assert [m["text"] for m in chat_messages(other)] == ["still delivered", "and again"]

    run(body())
    with TestClient(create_app(on_published=heard.append)) as tc:
        tc.post("/rooms/p/messages", json={"text": "over http"})
        wait_until(lambda: heard[-1]["text"] == "over http")


def test_hooks_on_join_and_on_leave_fire_per_client_id_not_per_socket_and_never_for_a_refusal():
    """on_join/on_leave fire when a client id gets its first / loses its last connection to a room here;
    a second socket of the same id fires nothing; a refused handshake fires nothing."""
    events: list[tuple] = []

    def on_join(room: str, client_id: str) -> None:
        events.append(("join", room, client_id))

    async def on_leave(room: str, client_id: str) -> None:
        events.append(("leave", room, client_id))

    app = create_app(identify=header_identity, on_join=on_join, on_leave=on_leave,
                     authorize=lambda who, action, room: who != "carol")
    with TestClient(app) as tc:
        with tc.websocket_connect("/rooms/r/ws", **as_user("alice")) as first:
            next_frame(first, "welcome")
            with tc.websocket_connect("/rooms/r/ws", **as_user("alice")) as second:
                next_frame(second, "welcome")
            assert refused_code(tc, "/rooms/r/ws", **as_user("carol")) == 1008
            wait_until(lambda: events)
            assert events == [("join", "r", "alice")]
        wait_until(lambda: len(events) == 2)
    assert events == [("join", "r", "alice"), ("leave", "r", "alice")]


def test_hooks_kick_closes_a_clients_connections_in_one_room_or_all():
    """kick(client_id, room=None, code=4003, reason="removed") closes that client's connections (in a room or
    everywhere) and says how many; others stay."""
    async def body():
        manager = ConnectionManager(Settings(presence_interval=60))
        in_r, _ = await enter(manager, "r", "bob")
        in_s, _ = await enter(manager, "s", "bob")
        alice, _ = await enter(manager, "r", "alice")
        assert await manager.kick("bob", room="r") == 1
        await wait_for_condition(lambda: in_r.closed_with is not None)
        assert in_r.closed_with == (4003, "removed") and in_s.closed_with is None
        assert await manager.kick("bob", code=4001, reason="banned") == 1
        await wait_for_condition(lambda: in_s.closed_with is not None)
        assert in_s.closed_with == (4001, "banned") and alice.closed_with is None
        assert await manager.kick("nobody") == 0
        with pytest.raises(ValueError):
            await manager.kick("alice", code=1011)

    run(body())


def test_hooks_delete_message_removes_it_and_tells_the_room():
    """delete_message / DELETE /rooms/{room}/messages/{id}: gone from history, a deleted frame to members,
    204; 404 when no such message is retained."""
    with TestClient(create_app()) as tc, tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
        next_frame(ws, "welcome")
        ids = [post(tc, "r", text)["id"] for text in ("one", "two", "three")]
        for _ in ids:
            next_frame(ws, "message")
        assert tc.delete(f"/rooms/r/messages/{ids[1]}").status_code == 204
        assert next_frame(ws, "deleted") == {"type": "deleted", "room": "r", "id": ids[1]}
        assert [m["text"] for m in tc.get("/rooms/r/messages").json()["messages"]] == ["one", "three"]
        assert tc.delete(f"/rooms/r/messages/{ids[1]}").status_code == 404
        assert tc.delete("/rooms/r/messages/999").status_code == 404
        with tc.websocket_connect("/rooms/r/ws?client_id=b") as later:
            assert next_frame(later, "welcome") and [next_frame(later, "message")["text"] for _ in range(2)] == [
                "one", "three"]


def test_hooks_messages_from_host_code_are_system_and_a_host_dm_reaches_only_its_recipient():
    """publish, send_personal_message and POST without an identity carry "system": true; a direct message from
    host code reaches only its recipient, even when some client is called "server"."""
    app = create_app()
    chat = app.state.chat
    with TestClient(app) as tc, tc.websocket_connect("/rooms/r/ws?client_id=alice") as alice, \
            tc.websocket_connect("/rooms/r/ws?client_id=server") as impostor:
        next_frame(alice, "welcome")
        next_frame(impostor, "welcome")
        tc.portal.call(chat.send_personal_message, "your invoice", "alice")
        direct = next_frame(alice, "message")
        assert (direct["text"], direct["to"], direct["system"]) == ("your invoice", "alice", True)
        tc.portal.call(chat.publish, "r", "maintenance at noon")
        posted = post(tc, "r", "deploy done")
        assert next_frame(alice, "message")["system"] is True and next_frame(alice, "message")["system"] is True
        assert [next_frame(impostor, "message")["text"] for _ in range(2)] == ["maintenance at noon", "deploy done"]
        assert posted["system"] is True
        alice.send_text("from a person")
        assert "system" not in next_frame(impostor, "message")


def test_hooks_routes_choose_the_groups_served_and_an_identity_hook_turns_the_tutorial_routes_off():
    """routes= serves exactly the named groups (off: 404, WebSocket refused before accept); by default all,
    but with identify=/authenticate= the echo and item routes only when named."""
    with TestClient(create_app(identify=header_identity)) as tc:   # off: Starlette's not-found close, before accept
        assert refused_code(tc, "/ws", **as_user("a")) == 1000
        assert refused_code(tc, "/items/i/ws?token=x", **as_user("a")) == 1000
        with tc.websocket_connect("/rooms/r/ws", **as_user("a")) as ws:
            assert ws.receive_json()["type"] == "welcome"
    with TestClient(create_app(identify=header_identity, routes={"rooms", "items", "api"})) as tc:
        with tc.websocket_connect("/items/i/ws?token=tok", **as_user("a")) as item:
            item.send_text("x")
            assert item.receive_text() == "Session cookie or query token value is: tok"
        assert tc.get("/").status_code == 404 and tc.get("/healthz").status_code == 200
        assert refused_code(tc, "/ws/a", **as_user("a")) == 1000
    with TestClient(create_app(routes={"page"})) as tc:
        assert tc.get("/").status_code == 200 and tc.get("/rooms").status_code == 404
        assert refused_code(tc, "/rooms/r/ws") == 1000
    with pytest.raises(ValueError):
        create_app(routes={"rooms", "nonsense"})
    with pytest.raises(ValueError):
        create_app(identify=header_identity, authenticate=lambda credential: credential)


def test_hooks_absent_change_nothing():
    """Without hooks every route behaves as before: open rooms, echo and items served, messages as sent."""
    with TestClient(create_app()) as tc:
        with tc.websocket_connect("/ws") as echo:
            echo.send_text("x")
            assert echo.receive_text() == "Message text was: x"
        with tc.websocket_connect("/rooms/r/ws?client_id=a") as ws:
            next_frame(ws, "welcome")
            ws.send_text("as is")
            assert next_frame(ws, "message")["text"] == "as is"
        assert tc.get("/stats").status_code == 200


# ---- Embedding: the README's SaaS host, served by uvicorn ----

def readme_saas_host(serve: Callable, directory: pathlib.Path, *args: str, env: dict | None = None) -> ServerProcess:
    """The host app of the README's "Embedding in your app", exactly as written, under uvicorn."""
    section = (HERE / "README.md").read_text().split("## Embedding in your app", 1)[1]
    (directory / "saas.py").write_text(section.split("```python\n", 1)[1].split("```", 1)[0])
    return serve(command=[sys.executable, "-m", "uvicorn", "saas:app", *args], ready_path="/chat/healthz",
                 cwd=directory, env={"PYTHONPATH": f"{directory}{os.pathsep}{HERE}", **(env or {})})


class SaasUser:
    """Someone logged in to the SaaS host: their session cookie on every request and handshake."""

    def __init__(self, server: ServerProcess, name: str) -> None:
        self.server, self.name = server, name
        status, headers, _ = http_with_headers("POST", f"{server.url}/login/{name}")
        assert status == 200, (name, status)
        self.cookie = {k.lower(): v for k, v in headers.items()}["set-cookie"].split(";")[0]

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return http(method, self.server.url + path, body, headers={"Cookie": self.cookie})

    async def join(self, room: str, **query: str) -> tuple[Client, dict]:
        return await join(room_url(self.server, room, **query).replace("/rooms/", "/chat/rooms/"),
                          additional_headers={"Cookie": self.cookie})

    async def handshake(self, path: str) -> int:
        return await handshake_status(self.server.ws_url + path, additional_headers={"Cookie": self.cookie})


def test_embedding_the_readme_saas_host_refuses_every_leak(serve, tmp_path):
    """The README's host: outsider / member / admin against every route. An outsider reads, lists, posts to
    and joins nothing of another team; 1:1 rooms are private; no session, no access; the tutorial routes
    (the item route would echo the session cookie) are off; a client id cannot be spoofed."""
    server = readme_saas_host(serve, tmp_path)
    carol, alice, root = (SaasUser(server, name) for name in ("carol", "alice", "root"))
    assert alice.call("POST", "/chat/rooms/team-1/messages", {"text": "hello team"})[0] == 201
    expected = {   # (outsider, member, admin)
        ("GET", "/chat/rooms/team-1/messages"): (403, 200, 200),
        ("GET", "/chat/rooms/team-1/members"): (403, 200, 200),
        ("POST", "/chat/rooms/team-1/messages"): (403, 201, 201),
        ("GET", "/chat/rooms/dm-alice-bob/messages"): (403, 200, 200),
        ("GET", "/chat/stats"): (403, 403, 200),
        ("DELETE", "/chat/rooms/team-1/messages/999"): (403, 403, 404),
    }
    for (method, path), codes in expected.items():
        body = {"text": "x"} if method == "POST" else None
        assert tuple(user.call(method, path, body)[0] for user in (carol, alice, root)) == codes, (method, path)
    for method, path in expected:
        assert http(method, server.url + path, {"text": "x"} if method == "POST" else None)[0] == 401, path
    assert http("GET", server.url + "/chat/")[0] == 200

    async def body():
        handshakes = {path: tuple([await user.handshake(path) for user in (carol, alice, root)])
                      for path in ("/chat/rooms/team-1/ws", "/chat/rooms/dm-alice-bob/ws", "/chat/ws/x",
                                   "/chat/ws", "/chat/items/i/ws?token=t")}
        assert handshakes == {"/chat/rooms/team-1/ws": (403, 101, 101), "/chat/rooms/dm-alice-bob/ws": (403, 101, 101),
                              "/chat/ws/x": (403, 403, 101), "/chat/ws": (403, 403, 403),
                              "/chat/items/i/ws?token=t": (403, 403, 403)}, handshakes
        assert await handshake_status(server.ws_url + "/chat/rooms/team-1/ws") == 403
        member, welcome = await alice.join("team-1", client_id="bob")
        assert welcome["client_id"] == "alice"                  # the session decides, not the query
        outsider, _ = await carol.join("team-2")
        assert [r["room"] for r in carol.call("GET", "/chat/rooms")[1]["rooms"]] == ["team-2"]
        assert [r["room"] for r in alice.call("GET", "/chat/rooms")[1]["rooms"]] == ["team-1"]
        assert [r["room"] for r in root.call("GET", "/chat/rooms")[1]["rooms"]] == ["team-1", "team-2"]
        await member.send("team secret")
        await outsider.send("marker")
        assert [m["text"] for m in await outsider.messages(1)] == ["marker"]   # nothing of team-1 before it
        await member.close()
        await outsider.close()

    run(body())
    assert "Traceback" not in server.log


def test_embedding_the_readme_saas_host_hooks_moderation_and_persistence(serve, tmp_path):
    """The README's host: moderation rewrites and refuses, every stored message lands in the host's SQLite,
    join/leave notices per user, an admin kicks (4003) and deletes (the room is told), a host DM reaches its
    recipient alone."""
    server = readme_saas_host(serve, tmp_path)
    alice, bob, root = (SaasUser(server, name) for name in ("alice", "bob", "root"))

    async def body():
        a, _ = await alice.join("team-1")
        b, _ = await bob.join("team-1")
        b_watch = Collector(b)
        await a.send("darn it")
        await a.send("see http://example.com")
        assert (await a.recv_until(lambda f: f.get("type") == "error"))["error"] == "links are not allowed here"
        status, refused = alice.call("POST", "/chat/rooms/team-1/messages", {"text": "http://again"})
        assert (status, refused["detail"]) == (422, "links are not allowed here")
        await wait_for_condition(lambda: b_watch.texts() == ["d**n it"])
        assert http("POST", server.url + "/remind/alice")[0] == 200
        direct = await a.recv_until(lambda f: f.get("type") == "message" and f.get("to") == "alice")
        assert (direct["text"], direct["system"]) == ("your invoice is due", True)
        await a.send("after the reminder")
        await wait_for_condition(lambda: b_watch.texts() == ["d**n it", "after the reminder"])

        stored = alice.call("GET", "/chat/rooms/team-1/messages")[1]
        rows = sqlite3.connect(tmp_path / "saas.db").execute(
            "SELECT id, epoch, sender, text FROM messages WHERE room = 'team-1' ORDER BY id").fetchall()
        assert rows == [(m["id"], stored["epoch"], m["from"], m["text"]) for m in stored["messages"]]

        first_id = stored["messages"][0]["id"]
        assert alice.call("DELETE", f"/chat/rooms/team-1/messages/{first_id}")[0] == 403
        assert root.call("DELETE", f"/chat/rooms/team-1/messages/{first_id}")[0] == 204
        assert (await a.recv_until(lambda f: f.get("type") == "deleted"))["id"] == first_id
        await wait_for_condition(lambda: any(f.get("type") == "deleted" for f in b_watch.frames if isinstance(f, dict)))
        assert [m["id"] for m in alice.call("GET", "/chat/rooms/team-1/messages")[1]["messages"]] == [
            m["id"] for m in stored["messages"][1:]]

        assert alice.call("POST", "/admin/kick/bob")[0] == 403
        assert root.call("POST", "/admin/kick/bob") == (200, {"closed": 1})
        await wait_for_condition(lambda: b_watch.task.done())
        assert (b.socket.close_code, b.socket.close_reason) == (4003, "removed")
        await a.close()
        await wait_for_condition(lambda: "alice left team-1" in http("GET", server.url + "/notices")[1])
        notices = http("GET", server.url + "/notices")[1]
        assert notices.count("alice joined team-1") == 1 and notices.count("bob joined team-1") == 1
        assert "bob left team-1" in notices

    run(body(), 40)
    assert "Traceback" not in server.log


SLOW_AUTHORIZE_APP = '''
import asyncio
from wschat import create_app


async def authorize(identity, action, room):
    if identity == "slow":
        await asyncio.sleep(3)   # a user directory that answers slowly, for one user
    return True

app = create_app(authenticate=lambda token: token, authorize=authorize, rate=0)
'''


def test_embedding_a_slow_authorize_on_one_handshake_delays_nobody_else(serve, tmp_path):
    """While an async authorize takes its time over one client's handshake, the others chat on."""
    (tmp_path / "slowauth.py").write_text(SLOW_AUTHORIZE_APP)
    server = serve(command=[sys.executable, "-m", "uvicorn", "slowauth:app"], cwd=tmp_path,
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"}, ready_path="/healthz")

    async def body():
        alice, _ = await join(f"{server.ws_url}/rooms/r/ws?token=alice")
        bob, _ = await join(f"{server.ws_url}/rooms/r/ws?token=bob")
        slow = asyncio.ensure_future(join(f"{server.ws_url}/rooms/r/ws?token=slow"))
        for i in range(20):
            await alice.send(f"m{i}")
        assert [m["text"] for m in await bob.messages(20)] == [f"m{i}" for i in range(20)]
        assert not slow.done()                      # still being authorized: nobody waited for it
        late, welcome = await asyncio.wait_for(slow, 15)
        assert welcome["client_id"] == "slow"
        for ws in (alice, bob, late):
            await ws.close()

    run(body(), 40)


# ---------------------------------------------------------------------------
# Durable history on one node: the SQLite broker (SPEC section 12)
# ---------------------------------------------------------------------------

def sqlite_url(path: pathlib.Path) -> str:
    return f"sqlite:///{path}"       # an absolute path: sqlite:////tmp/.../chat.db


def stored_rows(path: pathlib.Path, room: str) -> list[tuple[int, str]]:
    """(id, text) of what the file keeps for ``room`` (read while no server holds it)."""
    with contextlib.closing(sqlite3.connect(path)) as db:
        return [(message_id, json.loads(frame)["text"]) for message_id, frame in db.execute(
            "SELECT id, frame FROM wschat_messages WHERE room = ? ORDER BY id", (room,))]


@pytest.mark.parametrize("stop", ["SIGTERM", "kill -9"])
def test_sqlite_restart_keeps_epoch_ids_and_history_and_a_resume_recovers_exactly_the_gap(serve, tmp_path, stop):
    """Restarted on the same file (after SIGTERM or kill -9): every room keeps its epoch and last id; a client
    that resumes with since/epoch gets exactly the messages it missed and "recovered": true; ids go on."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0")

    async def before_restart() -> tuple[str, int]:
        alice, welcome = await join(room_url(server, "r", "alice"))
        for i in range(3):
            await alice.send(f"seen {i}")
        seen = await alice.messages(3)
        await alice.close()
        for i in range(4):
            assert (await ahttp("POST", server.url + "/rooms/r/messages", {"text": f"missed {i}"}))[0] == 201
        return welcome["epoch"], seen[-1]["id"]

    epoch, last_seen = run(before_restart())
    server.stop(signal.SIGTERM if stop == "SIGTERM" else signal.SIGKILL)
    again = serve("--broker", sqlite_url(path), "--rate", "0", port=server.port)

    async def after_restart() -> None:
        alice, welcome = await join(room_url(again, "r", "alice", since=last_seen, epoch=epoch))
        assert (welcome["epoch"], welcome["last_id"], welcome["recovered"]) == (epoch, 7, True)
        assert [m["text"] for m in await alice.messages(4)] == [f"missed {i}" for i in range(4)]
        await alice.send("after the restart")
        assert (await alice.messages(1))[0]["id"] == 8
        await alice.close()

    run(after_restart())
    assert "Traceback" not in again.log


def test_sqlite_kill9_while_publishing_loses_no_acknowledged_message(serve, tmp_path):
    """kill -9 while several clients publish (over WebSocket and HTTP): after a restart on the same file every
    acknowledged message is there, once, in id order, and the file opens cleanly."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0", "--history", "1000")
    acknowledged: set[str] = set()

    async def publisher(n: int) -> None:
        with contextlib.suppress(Exception):   # the server dies under it
            async with client(room_url(server, "k", f"p{n}")) as ws:
                await ws.recv()
                i = 0
                while True:
                    text = f"p{n}-{i}"
                    await ws.send(text)
                    await ws.recv_until(lambda f: isinstance(f, dict) and f.get("text") == text)
                    acknowledged.add(text)   # delivered back to its sender: acknowledged
                    i += 1

    def poster() -> None:
        i = 0
        with contextlib.suppress(OSError):
            while True:
                text = f"http-{i}"
                if http("POST", server.url + "/rooms/k/messages", {"text": text}, timeout=2)[0] == 201:
                    acknowledged.add(text)
                i += 1

    async def body() -> None:
        tasks = [asyncio.ensure_future(publisher(n)) for n in range(4)]
        posting = asyncio.ensure_future(asyncio.to_thread(poster))
        await wait_for_condition(lambda: len(acknowledged) >= 300, timeout=30)
        os.kill(server.process.pid, signal.SIGKILL)
        await asyncio.wait_for(asyncio.gather(*tasks, posting), 15)

    run(body(), 60)
    server.stop()
    rows = stored_rows(path, "k")
    texts = [text for _, text in rows]
    assert acknowledged <= set(texts), sorted(acknowledged - set(texts))[:10]
    assert len(texts) == len(set(texts)) and [i for i, _ in rows] == sorted({i for i, _ in rows})
    again = serve("--broker", sqlite_url(path), "--history", "1000")
    page = http("GET", again.url + "/rooms/k/messages")[1]
    assert page["last_id"] >= max(i for i, _ in rows) and set(texts) <= {m["text"] for m in page["messages"]}


def test_sqlite_concurrent_writers_share_one_strictly_increasing_sequence_per_room(serve, tmp_path):
    """Many clients publishing at once into two rooms: per room the ids are 1..N, each message stored and
    delivered once, in id order, to a listener."""
    server = serve("--broker", sqlite_url(tmp_path / "chat.db"), "--rate", "0", "--history", "1000")

    async def body() -> None:
        listeners = {room: Collector((await join(room_url(server, room, "listener")))[0]) for room in ("a", "b")}
        writers = [(await join(room_url(server, room, f"w{n}")))[0] for n in range(6) for room in ("a", "b")]
        await asyncio.gather(*(ws.send(f"{id(ws)}-{i}") for ws in writers for i in range(40)))
        for room, listener in listeners.items():
            await wait_for_condition(lambda: len(listener.texts()) == 240, timeout=20)
            frames = [f for f in listener.frames if isinstance(f, dict) and f.get("type") == "message"]
            assert [f["id"] for f in frames] == list(range(1, 241))
            stored = http("GET", f"{server.url}/rooms/{room}/messages")[1]["messages"]
            assert [(m["id"], m["text"]) for m in stored] == [(f["id"], f["text"]) for f in frames]
        for ws in (*writers, *(listener.ws for listener in listeners.values())):
            await ws.close()

    run(body(), 60)


@pytest.mark.parametrize("broker", ["memory", "sqlite", "redis"])
def test_history_pages_backwards_with_before_on_every_broker(serve, tmp_path, broker, request):
    """GET /rooms/{room}/messages?before=ID&limit=N: the latest N kept messages with id < ID, oldest first, on
    every broker; the SQLite one reaches back past --history, as far as --retain."""
    url = {"memory": "memory://", "sqlite": sqlite_url(tmp_path / "chat.db")}.get(broker)
    if url is None:
        url = request.getfixturevalue("redis_server").url
    server = serve("--broker", url, "--rate", "0", "--history", "5", "--retain", "12")
    for i in range(1, 21):
        assert http("POST", f"{server.url}/rooms/p/messages", {"text": f"m{i}"})[0] == 201

    def page(**query: Any) -> list[int]:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        status, body = http("GET", f"{server.url}/rooms/p/messages?{qs}")
        assert status == 200, body
        return [m["id"] for m in body["messages"]]

    assert page() == [16, 17, 18, 19, 20]                       # what a join replays: --history
    assert page(before=19, limit=2) == [17, 18]
    if broker == "sqlite":
        assert page(before=16, limit=3) == [13, 14, 15]         # older than --history: from the file
        assert page(before=12, limit=10) == [9, 10, 11]          # --retain keeps 9..20
    else:
        assert page(before=17, limit=10) == [16]                 # within what the broker keeps
    assert http("GET", f"{server.url}/rooms/p/messages?before=5&since=2")[0] == 422


def test_sqlite_deleted_messages_leave_the_file_and_retain_bounds_it(serve, tmp_path):
    """A deleted message is deleted from the file; the file keeps the last --retain messages per room."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0", "--history", "2", "--retain", "5")
    ids = [http("POST", f"{server.url}/rooms/d/messages", {"text": f"m{i}"})[1]["id"] for i in range(10)]
    assert http("DELETE", f"{server.url}/rooms/d/messages/{ids[-2]}")[0] == 204
    assert http("DELETE", f"{server.url}/rooms/d/messages/{ids[0]}")[0] == 404    # no longer kept
    server.stop()
    assert stored_rows(path, "d") == [(6, "m5"), (7, "m6"), (8, "m7"), (10, "m9")]


def test_sqlite_ids_never_restart_even_when_the_newest_message_was_deleted_or_trimmed(serve, tmp_path):
    """The room's last id outlives its messages: delete the newest one, or let --retain trim, restart, and the
    next id is still one more than any id ever given."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0", "--history", "1", "--retain", "1")
    ids = [http("POST", f"{server.url}/rooms/n/messages", {"text": f"m{i}"})[1]["id"] for i in range(3)]
    assert http("DELETE", f"{server.url}/rooms/n/messages/{ids[-1]}")[0] == 204
    server.stop(signal.SIGKILL)
    assert stored_rows(path, "n") == []
    again = serve("--broker", sqlite_url(path), "--rate", "0", port=server.port)
    assert http("POST", f"{again.url}/rooms/n/messages", {"text": "next"})[1]["id"] == 4


def test_sqlite_relative_path_is_relative_to_the_working_directory(serve, tmp_path):
    """sqlite:///chat.db is chat.db in the server's working directory."""
    server = serve("--broker", "sqlite:///chat.db", cwd=tmp_path)
    assert http("POST", f"{server.url}/rooms/r/messages", {"text": "here"})[0] == 201
    server.stop()
    assert stored_rows(tmp_path / "chat.db", "r") == [(1, "here")]


def serve_fails(*args: str, cwd: pathlib.Path = HERE) -> tuple[int, str]:
    """``python wschat.py serve ARGS`` that must refuse to start: (exit status, what it printed)."""
    done = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=30, cwd=cwd)
    return done.returncode, (done.stdout + done.stderr).strip()


def test_sqlite_bad_files_stop_serve_with_one_line_naming_the_file(serve, tmp_path):
    """A file that is not a wschat database (not SQLite, or another application's), read-only, or locked by
    another wschat: serve exits non-zero with one line naming the file. --workers 2 is refused too."""
    text_file = tmp_path / "notes.db"
    text_file.write_text("these are my notes, not a database\n" * 100)
    other_app = tmp_path / "other.db"
    with contextlib.closing(sqlite3.connect(other_app)) as db:
        db.execute("CREATE TABLE invoices (id INTEGER)")
    read_only = tmp_path / "readonly.db"
    serve("--broker", sqlite_url(read_only)).stop()
    read_only.chmod(0o444)
    locked = tmp_path / "locked.db"
    holder = serve("--broker", sqlite_url(locked))
    for path, reason in ((text_file, "not a wschat database"), (other_app, "not a wschat database"),
                         (read_only, "read-only"), (locked, "locked by another process")):
        status, output = serve_fails("--broker", sqlite_url(path))
        assert status != 0 and len(output.splitlines()) == 1, output
        assert str(path) in output and reason in output, output
    assert "Traceback" not in holder.log and http("GET", holder.url + "/healthz")[0] == 200
    status, output = serve_fails("--broker", sqlite_url(tmp_path / "w.db"), "--workers", "2")
    assert status != 0 and "--workers" in output
    with contextlib.closing(sqlite3.connect(other_app)) as db:   # nothing of ours was written into it
        assert [row[0] for row in db.execute("SELECT name FROM sqlite_master")] == ["invoices"]


# ---------------------------------------------------------------------------
# Metrics (SPEC section 13)
# ---------------------------------------------------------------------------

SPEC_METRICS = {"wschat_connections", "wschat_connections_accepted", "wschat_messages_received",
                "wschat_messages_delivered", "wschat_slow_clients_dropped", "wschat_disconnects",
                "wschat_rate_limited", "wschat_resumes", "wschat_broker_up", "wschat_publish_duration_seconds"}


def scrape(url: str, headers: dict | None = None) -> dict[str, Any]:
    """GET /metrics parsed with prometheus_client's own parser: {family name: family}."""
    from prometheus_client.parser import text_string_to_metric_families
    status, text = http("GET", url + "/metrics", headers=headers)
    assert status == 200, text
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample (e.g. ``wschat_disconnects_total`` with code="1000"), summed over the rest."""
    family = families[name.removesuffix("_total").removesuffix("_count")]
    return sum(s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_scrape_has_every_metric_of_the_spec_without_room_or_client_labels(serve):
    """GET /metrics: Prometheus text that prometheus_client parses, with every metric of SPEC 13 counting what
    happened (accepted, received, delivered, rate limited, resumes, disconnects by code, slow drops, broker up,
    publish durations), and no label carries a room or a client id."""
    server = serve("--rate", "100", "--send-queue", "8")

    async def body() -> None:
        alice, welcome = await join(room_url(server, "m", "alice"))
        bob = Collector((await join(room_url(server, "m", "bob")))[0])
        for i in range(260):                                    # burst 200: some are rate limited
            await alice.send(f"m{i}")
        await wait_for_condition(lambda: len(bob.texts()) >= 200 and sample(
            scrape(server.url), "wschat_rate_limited_total") >= 1)
        await alice.close()
        newest = max(f["id"] for f in bob.frames if isinstance(f, dict) and f.get("type") == "message")
        resumed, _ = await join(room_url(server, "m", "alice", since=newest, epoch=welcome["epoch"]))
        stale, _ = await join(room_url(server, "m", "carol", since=0, epoch="another"))
        for ws in (resumed, stale):    # they would not read what follows either
            await ws.close()
        stalled = raw_websocket(server.port, "/rooms/m/ws?client_id=stalled")
        await asyncio.to_thread(fill_room, server, "m", 100, 60_000)   # 6 MB: more than the kernel takes
        await wait_for_condition(lambda: http("GET", server.url + "/stats")[1]["slow_clients_dropped"] == 1, 15)
        stalled.close()
        await bob.stop()
        await bob.ws.close()

    run(body(), 60)
    families = scrape(server.url)
    assert SPEC_METRICS <= set(families), set(families)
    assert sample(families, "wschat_connections_accepted_total") >= 5
    assert sample(families, "wschat_messages_received_total") >= 260
    assert sample(families, "wschat_messages_delivered_total") >= 400
    assert sample(families, "wschat_rate_limited_total") >= 1
    assert sample(families, "wschat_resumes_total", recovered="true") == 1
    assert sample(families, "wschat_resumes_total", recovered="false") == 1
    assert sample(families, "wschat_disconnects_total", code="1000") >= 1
    assert sample(families, "wschat_slow_clients_dropped_total") == 1
    assert sample(families, "wschat_broker_up") == 1
    assert sample(families, "wschat_publish_duration_seconds_count") >= 200 + 100
    assert sample(families, "wschat_connections") == 0
    labels = {key for family in families.values() for s in family.samples for key in s.labels}
    assert labels <= {"code", "recovered", "le"}, labels


def test_metrics_are_guarded_like_stats_and_each_app_has_its_own():
    """/metrics needs what /stats needs (a token; authorize "stats"); two apps in one process count apart."""
    with TestClient(create_app(tokens=["tok"])) as tc:
        assert tc.get("/metrics").status_code == 401
        assert tc.get("/metrics", headers={"Authorization": "Bearer tok"}).status_code == 200
    with TestClient(create_app(identify=header_identity, authorize=lambda who, action, room:
                               action != "stats" or who == "root")) as tc:
        assert tc.get("/metrics", **as_user("alice")).status_code == 403
        assert tc.get("/metrics", **as_user("root")).status_code == 200
    one, two = create_app(), create_app()
    with TestClient(one) as first, TestClient(two) as second:
        post(first, "r", "counted once")
        count = lambda tc: [line for line in tc.get("/metrics").text.splitlines()   # noqa: E731
                            if line.startswith("wschat_messages_delivered_total")]
        assert count(second) == ["wschat_messages_delivered_total 0.0"]
        assert count(first) == ["wschat_messages_delivered_total 0.0"]   # nobody was in the room
        with first.websocket_connect("/rooms/r/ws?client_id=a") as ws:
            next_frame(ws, "welcome")
            post(first, "r", "delivered")
            next_frame(ws, "message")
        assert count(first) != count(second)


def test_metrics_without_prometheus_client_answer_404_and_say_once_how_to_enable_them(serve):
    """Without the metrics extra, /metrics answers 404 with the fix, and the log says it once."""
    blocked = "import sys; sys.modules['prometheus_client'] = None; import wschat; wschat.main()"
    server = serve(command=[sys.executable, "-c", blocked, "serve"])
    for _ in range(3):
        status, body = http("GET", server.url + "/metrics")
        assert status == 404 and "wschat[metrics]" in body["detail"]
    assert server.log.count("pip install 'wschat[metrics]'") == 1, server.log


def test_metrics_with_several_workers_cover_every_worker(serve, redis_server):
    """serve --workers 2: the figures of /metrics are the sum over the workers (multiprocess mode)."""
    server = serve("--broker", redis_server.url, "--workers", "2")
    wait_health(server)

    async def body() -> None:
        # The kernel hands each connection to whichever worker accepts first, often the
        # same one: join until /stats (one worker's view) shows fewer than are open.
        clients = []
        for i in range(60):
            clients.append(await _join_retrying(room_url(server, "w", f"c{i}")))
            views = {(await ahttp("GET", server.url + "/stats"))[1]["connections"] for _ in range(5)}
            if len(clients) >= 4 and min(views) < len(clients):
                break
        assert min(views) < len(clients), "every connection and every /stats went to one worker"
        families = scrape(server.url)                     # ... /metrics is all of them
        assert sample(families, "wschat_connections") == len(clients)
        assert sample(families, "wschat_connections_accepted_total") >= len(clients)
        for ws, _ in clients:
            await ws.close()

    run(body(), 60)


# ---------------------------------------------------------------------------
# Clients: wschat.connect and the terminal chat (SPEC section 14)
# ---------------------------------------------------------------------------

def test_client_yields_every_message_once_across_a_restart_and_resumes(serve, tmp_path):
    """wschat.connect: the replayed history once, live messages, then a server restart (same SQLite file):
    it reconnects by itself, resumes with since/epoch and yields the missed messages once, nothing twice."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0")
    for i in range(3):
        http("POST", server.url + "/rooms/bots/messages", {"text": f"old {i}"})
    events: list[tuple[str, str]] = []

    async def body() -> None:
        nonlocal server
        async with wschat.connect(server.ws_url + "/", room="bots", client_id="bot",
                                  on_status=lambda event, detail: events.append((event, detail))) as chat:
            seen: list[str] = []

            async def collect(count: int) -> None:
                async for frame in chat:
                    if frame["type"] == "message":
                        seen.append(frame["text"])
                        if len(seen) == count:
                            return

            await chat.send("live 0")
            await asyncio.wait_for(collect(4), 10)
            server.stop(signal.SIGTERM)
            server = serve("--broker", sqlite_url(path), "--rate", "0", port=server.port)
            for i in range(3):
                http("POST", server.url + "/rooms/bots/messages", {"text": f"missed {i}"})
            await wait_for_condition(lambda: any(event == "resumed" for event, _ in events), 20)
            await chat.send("live 1")
            await asyncio.wait_for(collect(8), 10)
            assert seen == ["old 0", "old 1", "old 2", "live 0", "missed 0", "missed 1", "missed 2", "live 1"]
            assert [m["text"] for m in await chat.history(limit=2)] == ["missed 2", "live 1"]
            assert await chat.members() == ["bot"]
            assert chat.client_id == "bot" and chat.last_id == 8

    run(body(), 60)
    assert [event for event, _ in events] == ["reconnecting", "resumed"] or \
        [event for event, _ in events if event != "reconnecting"] == ["resumed"], events


def test_client_pings_inside_the_timeout_ends_when_kicked_and_refused_says_so(serve, tmp_path):
    """The client stays connected past --timeout by pinging; a refused connection raises ConnectionError; a
    kick (4003) ends the iteration with the code and does not reconnect."""
    server = serve("--timeout", "1", "--token", TOKEN)

    async def body() -> None:
        with pytest.raises(ConnectionError):
            async with wschat.connect(server.ws_url, room="r", client_id="nobody"):
                pass
        async with wschat.connect(server.ws_url, room="r", client_id="idle", token=TOKEN) as chat:
            await asyncio.sleep(2.5)       # proving a negative: idle past the timeout, still connected
            await chat.send("still here")

            async def next_message() -> dict:
                async for frame in chat:
                    if frame["type"] == "message":
                        return frame
                raise AssertionError("the iteration ended")
            assert (await asyncio.wait_for(next_message(), 5))["text"] == "still here"

    run(body(), 30)

    async def kicked() -> None:   # a kick, on a server whose host code can reach chat.kick
        (tmp_path / "kicker.py").write_text(KICK_APP)
        env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}", "REDIS_URL": "memory://"}
        host = serve(command=[sys.executable, "-m", "uvicorn", "kicker:app"], cwd=tmp_path, env=env)
        async with wschat.connect(host.ws_url, room="r", token="bob") as chat:
            assert (await ahttp("POST", host.url + "/kick/bob")) == (200, {"closed": 1})
            remaining = [frame async for frame in chat]
            assert all(f["type"] != "message" for f in remaining)
            assert (chat.close_code, chat.close_reason) == (4003, "removed")

    run(kicked(), 30)


def test_sqlite_commits_are_grouped_and_the_event_loop_never_waits_on_the_disk(tmp_path):
    """500 messages published at once are committed in far fewer transactions than messages (one fsync per
    batch), each acknowledged after its commit, in id order; meanwhile the event loop keeps turning."""
    async def body() -> None:
        manager = ConnectionManager(Settings(broker=sqlite_url(tmp_path / "chat.db"), presence_interval=60))
        sock, _ = await enter(manager, "g", "reader")
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        counting = asyncio.ensure_future(ticker())
        stored = await asyncio.gather(*(manager.publish("g", f"m{i}") for i in range(500)))
        counting.cancel()
        assert [m["id"] for m in stored] == list(range(1, 501))
        assert [m["id"] for m in chat_messages(sock)] == list(range(1, 501))
        assert manager.broker._file.commits < 100, manager.broker._file.commits
        assert ticks > manager.broker._file.commits            # the loop ran while the file was written
        await manager.stop()

    run(body())


def test_sqlite_a_join_while_a_message_is_being_written_gets_it_once(tmp_path):
    """A message has its id before its commit: a client joining in between is told the replay ends before it,
    and receives it live once committed (neither lost nor twice)."""
    async def body() -> None:
        manager = ConnectionManager(Settings(broker=sqlite_url(tmp_path / "chat.db"), presence_interval=60))
        await enter(manager, "g", "reader")
        await manager.publish("g", "first")
        disk = threading.Event()
        stalled = manager.broker._file.read(lambda db: disk.wait(10))   # the file's thread is busy
        publishing = asyncio.ensure_future(manager.publish("g", "second"))
        await wait_for_condition(lambda: manager.broker._rooms["g"].pending == 1)
        joiner, _ = await enter(manager, "g", "late", since=0)
        welcome = next(f for f in joiner.frames() if f["type"] == "welcome")
        assert welcome["last_id"] == 1
        disk.set()
        await stalled
        assert (await publishing)["id"] == 2
        await wait_for_condition(lambda: len(chat_messages(joiner)) >= 2)
        assert [m["text"] for m in chat_messages(joiner)] == ["first", "second"]
        await manager.stop()

    run(body())


def test_client_readme_bot_runs_as_written(serve, tmp_path):
    """The README's echo bot, exactly as written, answers a direct message to whoever speaks."""
    section = (HERE / "README.md").read_text().split("## Talking to it", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    server = serve()
    (tmp_path / "bot.py").write_text(code.replace("ws://127.0.0.1:8000/", server.ws_url + "/"))
    bot = subprocess.Popen([sys.executable, str(tmp_path / "bot.py")], env={**os.environ, "PYTHONPATH": str(HERE)},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async def body() -> None:
            await wait_for_condition(lambda: members_are(server, "general", ["echo-bot"]), 15)
            alice, _ = await join(room_url(server, "general", "alice"))
            await alice.send("hello bot")
            answer = await alice.recv_until(lambda f: f.get("type") == "message" and f.get("from") == "echo-bot")
            assert (answer["text"], answer["to"]) == ("you said: hello bot", "alice")
            await alice.close()

        run(body(), 30)
    finally:
        os.killpg(bot.pid, signal.SIGTERM)
        bot.wait(10)


def open_terminal_chat(url: str, *args: str) -> tuple[subprocess.Popen, int]:
    """``python wschat.py chat URL ARGS`` on a real pseudo-terminal: (process, the terminal's master fd)."""
    import pty
    master, slave = pty.openpty()
    process = subprocess.Popen([sys.executable, str(HERE / "wschat.py"), "chat", url, *args], stdin=slave,
                               stdout=slave, stderr=slave, close_fds=True, start_new_session=True)
    os.close(slave)
    return process, master


class Terminal:
    """What the terminal chat prints, read from its pty as it comes."""

    def __init__(self, master: int) -> None:
        self.master, self.output = master, ""

    def type(self, line: str) -> None:
        os.write(self.master, (line + "\n").encode())

    def wait_for(self, pattern: str, timeout: float = 15) -> str:
        import select
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            left = deadline - time.monotonic()
            assert left > 0, f"{pattern!r} not printed; the terminal shows:\n{self.output}"
            if select.select([self.master], [], [], min(left, 0.2))[0]:
                with contextlib.suppress(OSError):
                    self.output += os.read(self.master, 65536).decode(errors="replace")
        return self.output


def test_terminal_chat_sends_lines_prints_messages_and_presence_and_resumes_after_a_restart(serve, tmp_path):
    """wschat chat on a real pseudo-terminal: typed lines are sent, messages print as [HH:MM] name: text,
    presence as "* name joined/left", /msg sends a direct message; across a server restart it says it is
    reconnecting, resumes, and shows what was missed; /quit leaves with status 0."""
    path = tmp_path / "chat.db"
    server = serve("--broker", sqlite_url(path), "--rate", "0")
    process, master = open_terminal_chat(server.ws_url + "/", "--room", "term", "--name", "tess")
    terminal = Terminal(master)
    try:
        terminal.wait_for(r"\* connected to term as tess")
        terminal.type("hello from the terminal")
        terminal.wait_for(r"\[\d\d:\d\d\] tess: hello from the terminal")

        async def bob_visits() -> None:
            bob, _ = await join(room_url(server, "term", "bob"))
            terminal_sees = asyncio.to_thread(terminal.wait_for, r"\* bob joined")
            await terminal_sees
            await bob.send("hi tess")
            await asyncio.to_thread(terminal.wait_for, r"\[\d\d:\d\d\] bob: hi tess")
            terminal.type("/msg bob just for you")
            direct = await bob.recv_until(lambda f: f.get("type") == "message" and f.get("to") == "bob")
            assert direct["text"] == "just for you"
            await bob.close()
            await asyncio.to_thread(terminal.wait_for, r"\* bob left")

        run(bob_visits(), 30)
        server.stop(signal.SIGTERM)
        terminal.wait_for(r"\* connection lost")
        server = serve("--broker", sqlite_url(path), "--rate", "0", port=server.port)
        http("POST", server.url + "/rooms/term/messages", {"text": "while you were away", "from": "ops"})
        terminal.wait_for(r"\* reconnected, nothing missed")
        terminal.wait_for(r"\[\d\d:\d\d\] ops: while you were away")
        terminal.type("/quit")
        assert process.wait(10) == 0
        assert terminal.output.count("while you were away") == 1 and "Traceback" not in terminal.output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        os.close(master)


# ---------------------------------------------------------------------------
# Security and limits: helpers
# ---------------------------------------------------------------------------

TOKEN = "s3cret"


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` appended to its query string (values URL-encoded)."""
    extra = "&".join(f"{key}={quote(value, safe='')}" for key, value in params.items())
    return url + ("&" if "?" in url else "?") + extra


def credential_in(place: str, url: str, token: str) -> tuple[str, dict]:
    """(url, connect kwargs) carrying ``token`` in the query, the ``session`` cookie or a Bearer header."""
    if place == "query":
        return with_query(url, token=token), {}
    if place == "cookie":
        return url, {"additional_headers": {"Cookie": f"session={token}"}}
    return url, {"additional_headers": {"Authorization": f"Bearer {token}"}}


async def handshake_status(url: str, **kwargs: Any) -> int:
    """101 when the server accepts the WebSocket handshake, else the HTTP status it refused with."""
    try:
        async with client(url, **kwargs):
            return 101
    except websockets.InvalidStatus as exc:
        return exc.response.status_code


async def assert_route_answers(path: str, url: str, credential: str | None = None, **kwargs: Any) -> None:
    """Open ``url`` (one of the four WebSocket routes) and check it answers a message as the SPEC says."""
    expected = {
        "/ws": lambda f: f == "Message text was: hi",
        "/ws/carol": lambda f: f == "You wrote: hi",
        "/items/foo/ws": lambda f: f == f"Session cookie or query token value is: {credential}",
        "/rooms/sec/ws": lambda f: isinstance(f, dict) and f.get("type") == "message" and f["text"] == "hi",
    }[path]
    async with client(url, **kwargs) as ws:
        await ws.send("hi")
        await ws.recv_until(expected)


def http_with_headers(method: str, url: str, body: Any = None, headers: dict | None = None) -> tuple[int, dict, Any]:
    """Like ``http`` but also returns the response headers."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=5) as response:
            status, head, raw = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, head, json.loads(raw)
    except ValueError:
        return status, head, raw.decode()


def assert_no_traceback(server: Any) -> None:
    assert "Traceback" not in server.log, server.log[-4000:]


async def get_stats(server: Any) -> dict:
    status, body = await asyncio.to_thread(http, "GET", server.url + "/stats")
    assert status == 200, body
    return body


async def get_members(server: Any, room: str) -> list[str]:
    status, body = await asyncio.to_thread(http, "GET", f"{server.url}/rooms/{room}/members")
    assert status == 200, body
    return sorted(body["members"])


def small_window_socket(port: int) -> socket.socket:
    """A TCP socket to the server with a tiny receive buffer, so a client that stops reading stalls fast."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


class Collector:
    """Reads a client's frames in the background so it never counts as slow; keeps them all."""

    def __init__(self, ws: Client) -> None:
        self.ws = ws
        self.frames: list[Any] = []
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):   # closed: the frames so far are what it got
            async for raw in self.ws.socket:
                self.frames.append(json.loads(raw) if isinstance(raw, str) and raw.startswith("{") else raw)

    def texts(self, senders: tuple[str, ...] | None = None) -> list[str]:
        return [f["text"] for f in self.frames if isinstance(f, dict) and f.get("type") == "message"
                and (senders is None or f["from"] in senders)]

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError, websockets.ConnectionClosed):
            await self.task


async def connections_are(server: Any, count: int) -> bool:
    return (await get_stats(server))["connections"] == count


async def members_are(server: Any, room: str, expected: list[str]) -> bool:
    return await get_members(server, room) == sorted(expected)


def presence_ids(who: Collector, key: str) -> list[str]:
    """Every id in the ``joined`` or ``left`` lists of the presence frames a client received."""
    return [i for f in who.frames if isinstance(f, dict) and f.get("type") == "presence" for i in f[key]]


# ---------------------------------------------------------------------------
# Security: tokens
# ---------------------------------------------------------------------------

WS_ROUTES = ["/ws", "/ws/carol", "/items/foo/ws", "/rooms/sec/ws"]


@pytest.mark.parametrize("place", ["query", "cookie", "bearer"])
def test_tokens_admit_websockets_with_token_in_query_cookie_or_bearer(serve, place):
    """With --token, every WebSocket route works for a client carrying the token in the query, cookie or header."""
    server = serve("--token", TOKEN)

    async def body():
        for path in WS_ROUTES:
            url, kwargs = credential_in(place, server.ws_url + path, TOKEN)
            await assert_route_answers(path, url, credential=TOKEN, **kwargs)

    run(body(), 30)
    assert_no_traceback(server)


def test_tokens_refuse_websockets_without_the_right_token(serve):
    """With --token, a missing, wrong, partial or mis-schemed token is refused with HTTP 403 on every route."""
    server = serve("--token", TOKEN)
    same_origin = {"Origin": f"http://127.0.0.1:{server.port}"}

    async def body():
        for path in WS_ROUTES:
            url = server.ws_url + path
            assert await handshake_status(url) == 403, path
            for wrong in ("nope", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
                for place in ("query", "cookie", "bearer"):
                    wrong_url, kwargs = credential_in(place, url, wrong)
                    assert await handshake_status(wrong_url, **kwargs) == 403, (path, place, wrong)
            assert await handshake_status(url, additional_headers={"Authorization": f"Basic {TOKEN}"}) == 403
            assert await handshake_status(url, additional_headers={"Cookie": f"token={TOKEN}"}) == 403
            # The right token does not make a foreign origin acceptable.
            assert await handshake_status(with_query(url, token=TOKEN),
                                          additional_headers={"Origin": "http://evil.example"}) == 403
            assert await handshake_status(with_query(url, token=TOKEN), additional_headers=same_origin) == 101

    run(body(), 60)
    assert_no_traceback(server)


def test_tokens_guard_the_http_api_but_not_page_or_healthz(serve):
    """With --token, /stats, /rooms, members, history and POST answer 401 + WWW-Authenticate without it; / and /healthz stay open."""
    server = serve("--token", TOKEN)
    base = server.url
    api = [("GET", "/stats", None), ("GET", "/rooms", None), ("GET", "/rooms/sec/members", None),
           ("GET", "/rooms/sec/messages", None), ("POST", "/rooms/sec/messages", {"text": "hello"})]
    for method, path, body in api:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Cookie": "session=nope"}):
            status, head, _ = http_with_headers(method, base + path, body, headers)
            assert status == 401, (method, path, headers)
            assert head.get("www-authenticate", head.get("WWW-Authenticate", "")).startswith("Bearer")
        status, _, _ = http_with_headers(method, with_query(base + path, token="nope"), body)
        assert status == 401, (method, path)
        for headers, url in (({"Authorization": f"Bearer {TOKEN}"}, base + path),
                             ({"Cookie": f"session={TOKEN}"}, base + path),
                             ({}, with_query(base + path, token=TOKEN))):
            status, _, answer = http_with_headers(method, url, body, headers)
            assert status == (201 if method == "POST" else 200), (method, path, answer)
    assert http("GET", base + "/healthz") == (200, {"status": "ok"})
    status, page = http("GET", base + "/")
    assert status == 200 and "<html" in page


def test_tokens_from_env_comma_separated(serve):
    """WSCHAT_TOKENS=a,b makes each of a and b a valid token (and not the whole string)."""
    server = serve(env={"WSCHAT_TOKENS": "alpha-1,beta-2"})
    url = server.ws_url + "/rooms/sec/ws"

    async def body():
        for token in ("alpha-1", "beta-2"):
            await assert_route_answers("/rooms/sec/ws", with_query(url, token=token))
        assert await handshake_status(with_query(url, token="alpha-1,beta-2")) == 403
        assert await handshake_status(url) == 403

    run(body(), 30)
    status, _ = http("POST", server.url + "/rooms/sec/messages", {"text": "x"}, {"Authorization": "Bearer beta-2"})
    assert status == 201
    assert http("POST", server.url + "/rooms/sec/messages", {"text": "x"})[0] == 401


# ---------------------------------------------------------------------------
# Security: the authenticate hook
# ---------------------------------------------------------------------------

IDENTITIES = {"tok-alice": "alice", "tok-bob": "bob"}


def sync_hook(credential: str) -> str | None:
    return IDENTITIES.get(credential)


async def async_hook(credential: str) -> str | None:
    await asyncio.sleep(0)
    return IDENTITIES.get(credential)


@pytest.mark.parametrize("hook", [sync_hook, async_hook], ids=["sync", "async"])
def test_authenticate_identity_becomes_client_id(hook):
    """The hook's identity is the client id: ?client_id= and the lobby path cannot override it."""
    with TestClient(wschat.create_app(authenticate=hook, presence_interval=0.01)) as http_client:
        with http_client.websocket_connect("/rooms/r/ws?client_id=mallory&token=tok-alice") as alice:
            welcome = alice.receive_json()
            assert welcome["client_id"] == "alice" and welcome["members"] == ["alice"]
            alice.send_json({"type": "message", "text": "hi"})
            frame = alice.receive_json()
            while frame["type"] != "message":
                frame = alice.receive_json()
            assert frame["from"] == "alice"
        with http_client.websocket_connect("/ws/mallory", headers={"Authorization": "Bearer tok-bob"}) as bob:
            with http_client.websocket_connect("/ws/eve", headers={"Cookie": "session=tok-alice"}) as alice:
                assert bob.receive_text() == "Client #alice joined the chat"
                alice.send_text("hello")
                assert alice.receive_text() == "You wrote: hello"
                assert bob.receive_text() == "Client #alice says: hello"
                listed = http_client.get("/rooms/lobby/members", headers={"Authorization": "Bearer tok-bob"})
                assert sorted(listed.json()["members"]) == ["alice", "bob"]


@pytest.mark.parametrize("hook", [sync_hook, async_hook], ids=["sync", "async"])
def test_authenticate_none_refuses_with_1008(hook):
    """When the hook returns None (or there is no credential) every WebSocket route is refused with 1008, HTTP with 401."""
    with TestClient(wschat.create_app(authenticate=hook, routes=wschat.ROUTE_GROUPS)) as http_client:
        for path in ("/ws", "/ws/carol", "/items/foo/ws", "/rooms/r/ws"):
            for suffix in ("", "?token=unknown"):
                with pytest.raises(WebSocketDisconnect) as refused:
                    with http_client.websocket_connect(path + suffix):
                        pass
                assert refused.value.code == 1008, (path, suffix)
        assert http_client.get("/stats", headers={"Authorization": "Bearer unknown"}).status_code == 401
        assert http_client.get("/stats", headers={"Authorization": "Bearer tok-bob"}).status_code == 200


def test_authenticate_overrides_tokens_and_failures_refuse():
    """With a hook, static tokens no longer admit; a hook that raises or returns a bad id refuses (1008), not 500."""
    def hook(credential: str) -> str | None:
        if credential == "boom":
            raise RuntimeError("database down")
        return {"tok-alice": "alice", "ctl": "bad\x01id"}.get(credential)

    with TestClient(wschat.create_app(authenticate=hook, tokens=["static"])) as http_client:
        for credential in ("static", "boom", "ctl"):
            with pytest.raises(WebSocketDisconnect) as refused:
                with http_client.websocket_connect(f"/rooms/r/ws?token={credential}"):
                    pass
            assert refused.value.code == 1008, credential
        with http_client.websocket_connect("/rooms/r/ws?token=tok-alice") as alice:
            assert alice.receive_json()["client_id"] == "alice"


def test_authenticate_post_sender_is_the_identity():
    """POST with a hook publishes as the caller's identity; claiming another "from" is refused with 403."""
    with TestClient(wschat.create_app(authenticate=sync_hook)) as http_client:
        auth = {"Authorization": "Bearer tok-alice"}
        posted = http_client.post("/rooms/r/messages", json={"text": "hi"}, headers=auth)
        assert posted.status_code == 201 and posted.json()["from"] == "alice"
        spoofed = http_client.post("/rooms/r/messages", json={"text": "hi", "from": "bob"}, headers=auth)
        assert spoofed.status_code == 403
        assert [m["from"] for m in http_client.get("/rooms/r/messages", headers=auth).json()["messages"]] == ["alice"]


# ---------------------------------------------------------------------------
# Security: demo mode
# ---------------------------------------------------------------------------

def test_demo_mode_chat_open_item_route_needs_a_credential(serve):
    """Without tokens chat and POST are open; the item route still refuses a missing or empty credential."""
    server = serve()

    async def body():
        await assert_route_answers("/rooms/sec/ws", server.ws_url + "/rooms/sec/ws")
        await assert_route_answers("/ws/carol", server.ws_url + "/ws/carol")
        await assert_route_answers("/ws", server.ws_url + "/ws")
        item = server.ws_url + "/items/foo/ws"
        assert await handshake_status(item) == 403
        assert await handshake_status(item + "?token=") == 403
        assert await handshake_status(item, additional_headers={"Cookie": "session="}) == 403
        await assert_route_answers("/items/foo/ws", item + "?token=anything", credential="anything")
        await assert_route_answers("/items/foo/ws", item, credential="cookie-value",
                                   additional_headers={"Cookie": "session=cookie-value"})

    run(body(), 30)
    assert http("POST", server.url + "/rooms/sec/messages", {"text": "open"})[0] == 201
    assert http("GET", server.url + "/stats")[0] == 200


def test_demo_mode_serve_warns_on_non_loopback_host(serve):
    """`serve --host 0.0.0.0` without tokens prints a warning; on loopback or with a token it does not."""
    exposed = serve("--host", "0.0.0.0")
    assert "warning" in exposed.log.lower() and "demo mode" in exposed.log, exposed.log
    exposed.stop()
    loopback = serve()
    guarded = serve("--host", "0.0.0.0", "--token", TOKEN)
    for quiet in (loopback, guarded):
        assert "demo mode" not in quiet.log and "warning" not in quiet.log.lower(), quiet.log


# ---------------------------------------------------------------------------
# Security: Origin check
# ---------------------------------------------------------------------------

def test_origin_default_accepts_same_origin_and_no_origin_only(serve):
    """By default a foreign Origin is refused (403) on every WebSocket route; same origin and no Origin are accepted."""
    server = serve()
    same = f"http://127.0.0.1:{server.port}"

    async def body():
        for path in WS_ROUTES:
            url = with_query(server.ws_url + path, token="t")
            for foreign in ("http://evil.example", f"http://127.0.0.1:{server.port + 1}",
                            f"https://127.0.0.1:{server.port}.evil.example", "null"):
                assert await handshake_status(url, additional_headers={"Origin": foreign}) == 403, (path, foreign)
            assert await handshake_status(url, additional_headers={"Origin": same}) == 101, path
            assert await handshake_status(url) == 101, path

    run(body(), 30)
    assert http("POST", server.url + "/rooms/o/messages", {"text": "x"}, {"Origin": "http://evil.example"})[0] == 403
    assert http("POST", server.url + "/rooms/o/messages", {"text": "x"}, {"Origin": same})[0] == 201


def test_origin_allowed_origin_allows_exactly_that_origin(serve):
    """--allowed-origin https://a.example admits that origin and refuses look-alikes."""
    server = serve("--allowed-origin", "https://a.example")
    url = server.ws_url + "/rooms/o/ws"

    async def body():
        assert await handshake_status(url, additional_headers={"Origin": "https://a.example"}) == 101
        for other in ("https://b.example", "http://a.example", "https://a.example:8443",
                      "https://sub.a.example", "https://a.example.evil.com"):
            assert await handshake_status(url, additional_headers={"Origin": other}) == 403, other

    run(body(), 30)


def test_origin_star_allows_all(serve):
    """--allowed-origin '*' admits a handshake from any Origin."""
    server = serve("--allowed-origin", "*")

    async def body():
        for origin in ("http://evil.example", "https://a.example", "null"):
            status = await handshake_status(server.ws_url + "/rooms/o/ws", additional_headers={"Origin": origin})
            assert status == 101, origin

    run(body(), 20)


def test_origin_malformed_origin_is_refused_like_a_foreign_one(serve):
    """A malformed Origin (http://[evil) gets 403 on the WebSocket handshake and on POST, never a 500 or a traceback."""
    server = serve()
    bad = {"Origin": "http://[evil"}

    async def body():
        assert await handshake_status(server.ws_url + "/rooms/o/ws", additional_headers=bad) == 403

    run(body(), 20)
    assert http("POST", server.url + "/rooms/o/messages", {"text": "x"}, bad)[0] == 403
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# Limits: names, timeout, size, binary, bad input
# ---------------------------------------------------------------------------

def test_limits_invalid_room_and_client_id_are_refused(serve):
    """Bad room names and client ids are refused at the handshake (HTTP 403); edge-valid ones are accepted."""
    server = serve()
    ws = server.ws_url

    async def body():
        for path in ("/rooms/bad%20name%21/ws", "/rooms/" + "r" * 65 + "/ws", "/rooms/caf%C3%A9/ws",
                     "/rooms/ok/ws?client_id=" + "c" * 65, "/rooms/ok/ws?client_id=a%01b",
                     "/rooms/ok/ws?client_id=tab%09", "/rooms/ok/ws?client_id=del%7F",
                     "/rooms/ok/ws?client_id=", "/ws/" + "c" * 65, "/ws/bell%07"):
            assert await handshake_status(ws + path) == 403, path
        edge, welcome = await join(ws + "/rooms/" + "r" * 64 + "/ws?client_id=" + "c" * 64)
        assert welcome["client_id"] == "c" * 64
        await edge.close()
        spaced, welcome = await join(ws + "/rooms/a.b_c-9/ws?client_id=" + quote("é ok 😀"))
        assert welcome["client_id"] == "é ok 😀" and welcome["room"] == "a.b_c-9"
        await spaced.close()

    run(body(), 30)
    assert http("GET", server.url + "/rooms/bad%20name%21/members")[0] == 422
    assert http("POST", server.url + "/rooms/bad%20name%21/messages", {"text": "x"})[0] == 422
    with TestClient(wschat.create_app()) as http_client:
        for path in ("/rooms/bad%20name%21/ws", "/rooms/ok/ws?client_id=" + "c" * 65):
            with pytest.raises(WebSocketDisconnect) as refused:
                with http_client.websocket_connect(path):
                    pass
            assert refused.value.code == 1008, path


def test_limits_idle_timeout_closes_with_1000_session_timeout(serve):
    """With --timeout 1 a silent client on any route is closed 1000 'Session timeout'; a pinging one stays."""
    server = serve("--timeout", "1")
    ws = server.ws_url

    async def silent(url: str) -> tuple[int | None, str]:
        async with client(url) as quiet:
            return await quiet.closed(timeout=6)

    async def pinging() -> int:
        chatty, welcome = await join(ws + "/rooms/idle/ws?client_id=chatty")
        assert welcome["timeout"] == 1
        pongs = 0
        for _ in range(8):   # 8 x 0.3 s = 2.4 s, well past the 1 s timeout
            await chatty.send({"type": "ping"})
            await chatty.recv_until(lambda f: f == {"type": "pong"}, timeout=2)
            pongs += 1
            await asyncio.sleep(0.3)
        await chatty.close()
        return pongs

    async def body():
        return await asyncio.gather(silent(ws + "/rooms/idle/ws?client_id=quiet"), silent(ws + "/ws/quiet"),
                                    silent(ws + "/ws"), silent(ws + "/items/foo/ws?token=t"), pinging())

    *closes, pongs = run(body(), 30)
    assert closes == [(1000, "Session timeout")] * 4
    assert pongs == 8
    assert_no_traceback(server)


def test_limits_frame_over_max_message_size_closes_with_1009(serve):
    """A frame over --max-message-size (counted in UTF-8 bytes) closes with 1009; one at the limit is delivered."""
    server = serve("--max-message-size", "1000", "--rate", "0")
    room = server.ws_url + "/rooms/big/ws?client_id="

    async def body():
        alice, _ = await join(room + "alice")
        bob, _ = await join(room + "bob")
        await alice.send("a" * 1000)
        assert [m["text"] for m in await bob.messages(1)] == ["a" * 1000]
        await alice.send("a" * 1001)
        assert (await alice.closed())[0] == 1009
        async with client(room + "carol") as carol:
            await carol.send('{"type":"message","text":"' + "é" * 490 + '"}')   # 1007 bytes, 516 characters
            assert (await carol.closed())[0] == 1009
        for url in (server.ws_url + "/ws", server.ws_url + "/ws/dave", server.ws_url + "/items/i/ws?token=t"):
            async with client(url) as other:
                await other.send("x" * 1001)
                assert (await other.closed())[0] == 1009, url
        await bob.send("still here")
        assert [m["text"] for m in await bob.messages(1)] == ["still here"]
        await bob.close()

    run(body(), 30)
    assert_no_traceback(server)
    with TestClient(wschat.create_app(max_message_size=1000)) as http_client:   # mounted: no uvicorn limit
        with http_client.websocket_connect("/rooms/big/ws") as mounted:
            assert mounted.receive_json()["type"] == "welcome"
            mounted.send_text("é" * 501)
            with pytest.raises(WebSocketDisconnect) as closed:
                while mounted.receive_json()["type"] != "message":   # delivering it would end the loop
                    pass
            assert closed.value.code == 1009


def test_limits_binary_frame_on_text_routes_closes_with_1003(serve):
    """A binary frame on any of the four text routes closes that connection with 1003."""
    server = serve()

    async def probe(path: str) -> int | None:
        async with client(server.ws_url + path) as ws:
            await ws.send(b"\x00\x01binary")
            return (await ws.closed())[0]

    async def body():
        paths = ("/ws", "/ws/carol", "/items/foo/ws?token=t", "/rooms/bin/ws?client_id=a")
        return await asyncio.gather(*(probe(path) for path in paths))

    codes = run(body(), 20)
    assert codes == [1003] * 4
    assert_no_traceback(server)


BAD_FRAMES = [
    "{not json",
    "   {still not json",
    '{"type":"message","text":"x"} trailing',
    '{"a":' * 3000 + "1" + "}" * 3000,          # nested too deep
    '{"text": "no type"}',
    '{"type": "dance", "text": "x"}',
    '{"type": 5}',
    '{"type": "message"}',
    '{"type": "message", "text": 42}',
    '{"type": "message", "text": null}',
    '{"type": "message", "text": ["a"]}',
    '{"type": "message", "text": {"nested": "x"}}',
    '{"type": "message", "text": ""}',
    '{"type": "message", "text": "\\ud800"}',
    '{"type": "message", "text": "x", "to": 7}',
    '{"type": "message", "text": "x", "to": "nobody-here"}',
    "",
]


def test_limits_bad_input_gets_error_frames_and_connection_stays_open(serve):
    """Invalid JSON, unknown type, missing/non-string text and the like get one error frame each; nothing is delivered; the connection stays open."""
    server = serve("--rate", "0")
    room = server.ws_url + "/rooms/bad/ws?client_id="

    async def body():
        alice, _ = await join(room + "alice")
        bob, _ = await join(room + "bob")
        for frame in BAD_FRAMES:
            await alice.send(frame)
        await alice.send({"type": "message", "text": "valid after all that"})
        errors = []
        while True:
            frame = await alice.recv()
            if frame.get("type") == "message":
                break
            if frame.get("type") == "error":
                errors.append(frame["error"])
        assert len(errors) == len(BAD_FRAMES) and all(isinstance(e, str) and e for e in errors), errors
        assert frame["text"] == "valid after all that"
        assert [m["text"] for m in await bob.messages(1)] == ["valid after all that"]
        async with client(server.ws_url + "/ws/lobbyist") as lobbyist:
            await lobbyist.send("")
            assert (await lobbyist.recv()).startswith("Error: ")
            await lobbyist.send("hi")
            assert await lobbyist.recv() == "You wrote: hi"
        await bob.close()
        await alice.close()

    run(body(), 30)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# Limits: rate, connections, slow and vanished clients, shutdown
# ---------------------------------------------------------------------------

def test_limits_rate_burst_over_twice_rate_gets_errors_not_delivery(serve):
    """With --rate 5, a burst of 30 frames: the first 10 (2 x rate) are delivered, the excess gets error frames and reaches nobody; the connection stays open."""
    server = serve("--rate", "5")
    room = server.ws_url + "/rooms/rate/ws?client_id="

    async def body():
        alice, _ = await join(room + "alice")
        bob, _ = await join(room + "bob")
        started = time.monotonic()
        for i in range(30):
            await alice.socket.send(f"burst {i}")
        replies = []
        while len(replies) < 30:
            frame = await alice.recv()
            if frame.get("type") in ("message", "error"):
                replies.append(frame)
        elapsed = time.monotonic() - started     # the server took at most this long over the burst
        delivered = [f["text"] for f in replies if f["type"] == "message"]
        errors = [f["error"] for f in replies if f["type"] == "error"]
        assert [f["type"] for f in replies[:10]] == ["message"] * 10
        assert len(delivered) <= 10 + 5 * elapsed + 1, (len(delivered), elapsed)
        assert errors and all("rate" in e for e in errors), errors
        assert [m["text"] for m in await bob.messages(len(delivered))] == delivered
        await asyncio.sleep(0.5)          # the bucket refills at 5/s: let it earn a couple of tokens
        await alice.send("after the burst")
        assert [m["text"] for m in await bob.messages(1)] == ["after the burst"]
        await bob.close()
        await alice.close()

    run(body(), 30)


def test_limits_max_connections_refuses_the_next_with_1013(serve):
    """With --max-connections 3 the 4th client is closed with 1013; once one leaves a new one gets in."""
    server = serve("--max-connections", "3")
    room = server.ws_url + "/rooms/full/ws?client_id="

    async def body():
        first = [(await join(room + f"c{i}"))[0] for i in range(3)]
        async with client(room + "c3") as fourth:
            assert (await fourth.closed())[0] == 1013
        async with client(server.ws_url + "/ws") as echo:
            assert (await echo.closed())[0] == 1013
        assert await get_members(server, "full") == ["c0", "c1", "c2"]
        await first[0].close()
        await wait_for_condition(lambda: connections_are(server, 2))
        later, welcome = await join(room + "c4")
        assert welcome["client_id"] == "c4"
        for ws in (later, *first[1:]):
            await ws.close()

    run(body(), 30)


def test_limits_slow_client_closed_with_1013_others_get_everything(serve):
    """A client that never reads is closed with 1013 and counted once its queue passes --send-queue; the others receive every message in order."""
    server = serve("--send-queue", "8", "--rate", "0")
    room = server.ws_url + "/rooms/slow/ws?client_id="
    payload = "x" * 32_000

    async def body():
        lazy = Client(await ws_connect(room + "lazy", sock=small_window_socket(server.port), max_queue=1,
                                       open_timeout=5, close_timeout=2))
        alice = Collector((await join(room + "alice"))[0])
        bob = Collector((await join(room + "bob"))[0])
        sent: list[str] = []
        tail = None
        for i in range(600):
            text = f"{i:04d} {payload}"
            await alice.ws.send(text)
            sent.append(text)
            await wait_for_condition(lambda: len(alice.texts()) == len(sent), timeout=10, interval=0.002)
            if tail is None and i % 10 == 0 and (await get_stats(server))["slow_clients_dropped"]:
                tail = i + 20            # keep chatting a while after the drop
            if i == tail:
                break
        assert tail is not None, "the client that never reads was never dropped"
        await wait_for_condition(lambda: len(bob.texts()) == len(sent), timeout=20)
        assert bob.texts() == sent and alice.texts() == sent
        assert await get_members(server, "slow") == ["alice", "bob"]
        assert (await get_stats(server))["slow_clients_dropped"] == 1
        assert (await lazy.closed(timeout=20))[0] == 1013
        for who in (alice, bob):
            await who.stop()
            await who.ws.close()

    run(body(), 90)
    assert_no_traceback(server)


def test_limits_vanished_client_cleaned_up_once_quietly(serve):
    """Clients whose TCP connection vanishes (one while the server is blocked sending to it) are removed once; others get every message; no traceback."""
    server = serve("--rate", "0", "--log-level", "debug")
    room = server.ws_url + "/rooms/gone/ws?client_id="

    async def body():
        alice = Collector((await join(room + "alice"))[0])
        bob = Collector((await join(room + "bob"))[0])
        reader, _ = await join(room + "reader")
        stalled = Client(await ws_connect(room + "stalled", sock=small_window_socket(server.port), max_queue=1,
                                          open_timeout=5, close_timeout=2))
        await wait_for_condition(lambda: {"reader", "stalled"} <= set(presence_ids(bob, "joined")))
        sent = []
        for i in range(60):
            text = f"{i:03d} " + "y" * 20_000
            await alice.ws.send(text)
            sent.append(text)
            if i == 10:
                reader.socket.transport.abort()       # vanishes while frames are flowing to it
            if i == 50:
                stalled.socket.transport.abort()      # vanishes while its writer waits on a full socket
        await wait_for_condition(lambda: len(bob.texts()) == len(sent), timeout=20)
        assert bob.texts() == sent and alice.texts() == sent
        await wait_for_condition(lambda: members_are(server, "gone", ["alice", "bob"]), timeout=10)
        await wait_for_condition(lambda: connections_are(server, 2), timeout=10)
        await asyncio.sleep(0.6)   # proving a negative: no second "left" arrives after a few presence intervals
        assert sorted(presence_ids(bob, "left")) == ["reader", "stalled"], bob.frames
        assert (await get_stats(server))["slow_clients_dropped"] == 0
        for who in (alice, bob):
            await who.stop()
            await who.ws.close()

    run(body(), 60)
    assert_no_traceback(server)


def test_limits_shutdown_sends_every_client_a_close_frame(serve):
    """On SIGTERM every connected client, on every route, gets close 1001 or 1012 within 5 s, and the server exits cleanly."""
    server = serve()
    ws = server.ws_url

    async def body():
        clients = [Client(await ws_connect(ws + path, open_timeout=5)) for path in
                   ("/rooms/down/ws?client_id=a", "/rooms/down/ws?client_id=b", "/ws/c", "/ws",
                    "/items/i/ws?token=t")]
        await wait_for_condition(lambda: connections_are(server, len(clients)))
        os.kill(server.process.pid, signal.SIGTERM)
        return await asyncio.wait_for(asyncio.gather(*(c.closed(timeout=5) for c in clients)), 5)

    closes = run(body(), 20)
    assert all(code in (1001, 1012) for code, _ in closes), closes
    assert server.process.wait(10) in (0, -signal.SIGTERM)   # uvicorn re-raises the signal it handled
    assert_no_traceback(server)


def test_limits_dropped_client_that_never_reads_is_given_up_within_the_close_timeout(serve):
    """A dropped slow client that never reads its close frame stops counting as a connection within 5 s (+ margin), without closing its side."""
    server = serve("--send-queue", "8", "--rate", "0")
    room = server.ws_url + "/rooms/stall/ws?client_id="
    payload = "z" * 32_000

    async def body():
        lazy = Client(await ws_connect(room + "lazy", sock=small_window_socket(server.port), max_queue=1,
                                       open_timeout=5, close_timeout=2))
        alice = Collector((await join(room + "alice"))[0])
        dropped = False
        for i in range(600):
            await alice.ws.send(f"{i:04d} {payload}")
            await wait_for_condition(lambda: len(alice.texts()) == i + 1, timeout=10, interval=0.002)
            if i % 10 == 0 and (await get_stats(server))["slow_clients_dropped"]:
                dropped = True
                break
        assert dropped, "the client that never reads was never dropped"
        await wait_for_condition(lambda: connections_are(server, 1), timeout=15)   # CLOSE_TIMEOUT is 5 s
        assert lazy.socket.state is websockets.protocol.State.OPEN   # the client never saw a close
        await alice.stop()
        await alice.ws.close()
        lazy.socket.transport.abort()

    run(body(), 90)
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# Hardening: hostile clients, raw sockets, bounds (end to end)
# ---------------------------------------------------------------------------

def raw_websocket(port: int, path: str, *, rcvbuf: int = 4096, host: str | None = None,
                  headers: dict | None = None, expect: int = 101) -> socket.socket:
    """A WebSocket handshaken by hand on a blocking socket with a tiny receive buffer: a client that
    misbehaves (never reads, floods pings, sends bad bytes) without a library's good manners."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(5)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
                 .encode())
    head = b""
    while b"\r\n\r\n" not in head:   # byte by byte: what follows the head is frames
        byte = sock.recv(1)
        assert byte, f"connection closed during the handshake: {head!r}"
        head += byte
    assert head.startswith(f"HTTP/1.1 {expect} ".encode()), head
    return sock


def client_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame, FIN set (payload under 64 KiB)."""
    mask = os.urandom(4)
    size = len(payload)
    length = bytes([0x80 | size]) if size < 126 else bytes([0x80 | 126]) + size.to_bytes(2, "big")
    return bytes([0x80 | opcode]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def server_frames(sock: socket.socket, quiet: float = 1.0, until_close: bool = False) -> list[tuple[int, bytes]]:
    """The frames a server sends on a raw socket: read until ``quiet`` seconds pass without
    data (or, with ``until_close``, until a close frame); (opcode, payload) each."""
    buffer, frames = b"", []
    sock.settimeout(quiet)
    while True:
        try:
            chunk = sock.recv(65536)
        except (socket.timeout, ConnectionResetError):
            break
        if not chunk:
            break
        buffer += chunk
        while len(buffer) >= 2:
            size, start = buffer[1] & 0x7F, 2
            if size == 126:
                size, start = int.from_bytes(buffer[2:4], "big"), 4
            elif size == 127:
                size, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + size:
                break
            frames.append((buffer[0] & 0x0F, buffer[start:start + size]))
            buffer = buffer[start + size:]
        if until_close and any(opcode == 0x8 for opcode, _ in frames):
            break
    return frames


def server_side_tcp(port: int) -> int:
    """TCP connections the kernel holds on the server's side of ``port``, process-owned or orphaned,
    that still hold the peer or data: every state but LISTEN, TIME_WAIT, CLOSE and FIN_WAIT2 (our
    side closed, everything sent acknowledged: the kernel only waits for the peer's FIN)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in pathlib.Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] not in ("0A", "06", "07", "05"):
                    count += 1
    return count


def fill_room(server: Any, room: str, count: int, size: int = 16_000) -> None:
    """Publish ``count`` messages of ``size`` bytes over HTTP: more than a stalled client's buffers take."""
    for i in range(count):
        status, body = http("POST", f"{server.url}/rooms/{room}/messages", {"text": f"{i} " + "x" * size})
        assert status == 201, body


def close_payload(code: int = 1000) -> bytes:
    return struct.pack("!H", code)


def test_hardening_client_that_closes_then_stops_reading_is_dropped_within_close_timeout(serve):
    """A client that sends a close frame while the server still has data for it and then never reads loses
    its TCP connection within CLOSE_TIMEOUT (+ margin), with nothing left in the kernel; until then it counts
    toward --max-connections."""
    server = serve("--max-connections", "3", "--rate", "0")
    stallers = [raw_websocket(server.port, f"/rooms/stall/ws?client_id=s{i}") for i in range(3)]
    fill_room(server, "stall", 60)
    for sock in stallers:
        sock.sendall(client_frame(0x8, close_payload()))

    async def body():
        async with client(server.ws_url + "/rooms/other/ws?client_id=late") as late:
            assert (await late.closed())[0] == 1013          # the three still count
        await wait_for_condition(lambda: server_side_tcp(server.port) == 0, timeout=wschat.CLOSE_TIMEOUT + 3)
        later, welcome = await join(server.ws_url + "/rooms/other/ws?client_id=later")
        assert welcome["client_id"] == "later"
        await later.close()

    run(body(), 30)
    for sock in stallers:
        sock.close()
    assert_no_traceback(server)


def test_hardening_sigterm_with_stalled_and_half_closed_clients_exits_cleanly(serve):
    """SIGTERM while clients have closed without reading, half-closed, or stopped reading: every well-behaved
    client gets 1001/1012 within 5 s and the process ends within 10 s, by the signal or with 0, no traceback."""
    server = serve("--rate", "0")
    closed_unread = raw_websocket(server.port, "/rooms/down/ws?client_id=closed")
    half_closed = raw_websocket(server.port, "/rooms/down/ws?client_id=half")
    not_reading = raw_websocket(server.port, "/rooms/down/ws?client_id=stalled")
    fill_room(server, "down", 100, size=60_000)   # 6 MB: more than the kernel's buffers take
    closed_unread.sendall(client_frame(0x8, close_payload()))
    half_closed.shutdown(socket.SHUT_WR)

    async def body():
        good = [Client(await ws_connect(server.ws_url + path, open_timeout=5))
                for path in ("/rooms/down/ws?client_id=good", "/ws/lobbyist", "/ws")]
        started = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        codes = await asyncio.wait_for(asyncio.gather(*(c.closed(timeout=5) for c in good)), 6)
        return codes, time.monotonic() - started

    codes, _ = run(body(), 30)
    assert all(code in (1001, 1012) for code, _ in codes), codes
    assert server.process.wait(10) in (0, -signal.SIGTERM)
    assert_no_traceback(server)
    assert "InvalidState" not in server.log
    for sock in (closed_unread, half_closed, not_reading):
        sock.close()


def test_hardening_pings_beyond_the_rate_get_no_pong(serve):
    """Protocol PINGs count toward --rate: a burst of 60 gets at most burst (2 x rate) + rate x elapsed PONGs."""
    server = serve("--rate", "5")
    sock = raw_websocket(server.port, "/rooms/pings/ws?client_id=pinger", rcvbuf=65536)
    assert server_frames(sock, quiet=0.5)[0][0] == 0x1          # the welcome
    started = time.monotonic()
    sock.sendall(b"".join(client_frame(0x9, f"p{i}".encode()) for i in range(60)))
    pongs = [payload for opcode, payload in server_frames(sock, quiet=1.0) if opcode == 0xA]
    elapsed = time.monotonic() - started
    assert 1 <= len(pongs) <= 10 + 5 * elapsed + 1, (len(pongs), elapsed)
    assert pongs == [f"p{i}".encode() for i in range(len(pongs))]   # the first ones, in order
    sock.close()

    async def bystander():
        other, _ = await join(server.ws_url + "/rooms/pings/ws?client_id=other")
        await other.send({"type": "ping"})
        assert (await other.recv_until(lambda f: f.get("type") == "pong"))["type"] == "pong"
        await other.close()

    run(bystander())


def test_hardening_ping_flood_from_a_client_that_never_reads_stays_bounded(serve):
    """A client flooding PINGs and never reading costs bounded memory (before: about 33 MB/s), and a
    bystander's JSON ping is still answered."""
    server = serve()
    rss_before = _rss_kib(server.process.pid)
    flood = raw_websocket(server.port, "/rooms/flood/ws?client_id=flooder")
    frame = client_frame(0x9, b"x" * 100)
    deadline, sent = time.monotonic() + 4, 0
    flood.settimeout(0.05)
    while time.monotonic() < deadline:
        with contextlib.suppress(socket.timeout, BlockingIOError):
            sent += flood.send(frame * 200)
    rss_after = _rss_kib(server.process.pid)
    assert sent > 100_000, sent                              # the flood really was sent
    assert rss_after - rss_before < 30_000, (rss_before, rss_after)

    async def bystander():
        other, _ = await join(server.ws_url + "/rooms/flood/ws?client_id=other")
        await other.send({"type": "ping"})
        assert (await other.recv_until(lambda f: f.get("type") == "pong"))["type"] == "pong"
        await other.close()

    run(bystander())
    flood.close()
    assert_no_traceback(server)


BURST_APP = '''
from fastapi import FastAPI
from wschat import create_app

app = FastAPI()
chat_app = create_app(rate=0)
app.mount("/chat", chat_app)


@app.post("/burst/{room}")
async def burst(room: str, count: int, size: int = 10_000):
    chat = chat_app.state.chat
    for i in range(count):   # the memory broker's publish never yields: all of it in one loop tick
        await chat.publish(room, f"{i} " + "x" * size)
    return chat.stats()


@app.post("/disconnect-all")
async def disconnect_all():
    chat = chat_app.state.chat
    for websocket in chat.active_connections:
        chat.disconnect(websocket)
    return chat.stats()
'''


def burst_host(serve: Callable, tmp_path: pathlib.Path) -> ServerProcess:
    (tmp_path / "burstapp.py").write_text(BURST_APP)
    return serve(command=[sys.executable, "-m", "uvicorn", "burstapp:app", "--ws",
                          "wschat:coalescing_websocket_protocol", "--ws-per-message-deflate", "false"],
                 ready_path="/chat/healthz", env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"})


def test_hardening_host_publishing_in_one_tick_drops_a_client_that_never_reads(serve, tmp_path):
    """Host code publishing 3,000 x 10 KB without yielding: the client that never reads is dropped once its
    frames pass --send-queue (they used to pile up unseen in the per-tick write buffer), and its TCP
    connection is gone within CLOSE_TIMEOUT."""
    server = burst_host(serve, tmp_path)
    stalled = raw_websocket(server.port, "/chat/rooms/burst/ws?client_id=stalled")
    status, stats = http("POST", server.url + "/burst/burst?count=3000", timeout=30)
    assert status == 200, stats
    assert stats["slow_clients_dropped"] == 1, stats

    async def gone():
        await wait_for_condition(lambda: server_side_tcp(server.port) == 0, timeout=wschat.CLOSE_TIMEOUT + 3)

    run(gone())
    stalled.close()
    assert_no_traceback(server)


def test_hardening_host_disconnect_of_a_client_that_never_reads_drops_its_tcp_connection(serve, tmp_path):
    """disconnect() from host code on a client that never reads: it is forgotten at once, and its TCP
    connection is dropped within CLOSE_TIMEOUT (the give-up timer is no longer cancelled)."""
    server = burst_host(serve, tmp_path)
    stalled = raw_websocket(server.port, "/chat/rooms/kick/ws?client_id=stalled")
    assert http("POST", server.url + "/burst/kick?count=300", timeout=30)[0] == 200
    status, stats = http("POST", server.url + "/disconnect-all")
    assert status == 200 and stats["slow_clients_dropped"] == 0, stats

    async def gone():
        await wait_for_condition(lambda: server_side_tcp(server.port) == 0, timeout=wschat.CLOSE_TIMEOUT + 3)

    run(gone())
    assert http("GET", server.url + "/chat/rooms/kick/members")[1]["members"] == []
    stalled.close()


def test_hardening_partial_request_heads_time_out_and_count_toward_max_connections(serve):
    """Half-received request heads count toward --max-connections and are dropped REQUEST_HEAD_TIMEOUT
    seconds after they started; then clients get in again."""
    server = serve("--max-connections", "3")
    partial = []
    for _ in range(3):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        partial.append(sock)

    async def body():
        async with client(server.ws_url + "/rooms/r/ws?client_id=late") as late:
            assert (await late.closed())[0] == 1013
        await wait_for_condition(lambda: server_side_tcp(server.port) == 0,
                                 timeout=wschat.REQUEST_HEAD_TIMEOUT + 3)
        later, _ = await join(server.ws_url + "/rooms/r/ws?client_id=later")
        await later.close()

    run(body(), 40)
    for sock in partial:
        assert sock.recv(100) == b""                      # closed by the server, nothing answered
        sock.close()


def test_hardening_oversized_request_head_is_answered_431_without_reading_on(serve):
    """A request head over 64 KiB is answered 431 after at most a little more than 64 KiB was read, and the
    server's memory does not grow with the rest (a 20 MB header value is offered)."""
    server = serve()
    rss_before = _rss_kib(server.process.pid)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    sock.setblocking(False)
    sent, answer = 0, b""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        while sent < 20_000_000 and not answer:
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(b"a" * 16384)
            with contextlib.suppress(BlockingIOError):
                answer = sock.recv(4096)
            time.sleep(0.001)
    sock.setblocking(True)
    sock.settimeout(5)
    with contextlib.suppress(ConnectionResetError):
        answer += sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:100]
    assert sent < 2_000_000, sent
    assert _rss_kib(server.process.pid) - rss_before < 10_000
    sock.close()


def raw_request(port: int, head: str, body: Iterable[bytes] = (), *, settle: float = 0.5) -> tuple[bytes, int]:
    """Send a request head, then body chunks while the server lets us; return (its answer, body bytes sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head.encode())
    sent, answer = 0, b""
    sock.setblocking(False)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        for chunk in body:
            with contextlib.suppress(BlockingIOError):
                answer += sock.recv(65536)
            if answer:
                break
            with contextlib.suppress(BlockingIOError):
                sent += sock.send(chunk)
    sock.setblocking(True)
    sock.settimeout(settle)
    with contextlib.suppress(socket.timeout, ConnectionResetError):
        while chunk := sock.recv(65536):
            answer += chunk
    sock.close()
    return answer, sent


def test_hardening_request_bodies_are_refused_before_they_are_read(serve):
    """Without the token, a 300 MB POST is refused before its body is read; with it, a declared body over
    max_message_size + 4 KiB gets 413 at once and a chunked one 413 after little more than the limit."""
    server = serve("--token", TOKEN)
    path = "/rooms/r/messages"
    huge = (b"x" * 65536 for _ in range(4600))              # 300 MB, offered lazily
    answer, sent = raw_request(server.port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                               f"application/json\r\nContent-Length: 300000000\r\n\r\n", huge)
    assert answer.split(b" ")[1] in (b"401", b"413") and sent < 5_000_000, (answer[:80], sent)
    chunked = (b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(4600))
    answer, sent = raw_request(server.port, f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               f"Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 401 ") and sent < 5_000_000, (answer[:80], sent)
    authorized = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
    answer, _ = raw_request(server.port, authorized + "Content-Length: 1000000\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ") and b"larger than" in answer, answer[:200]
    chunked = (b"10000\r\n" + b"x" * 65536 + b"\r\n" for _ in range(4600))
    answer, sent = raw_request(server.port, authorized + "Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert answer.startswith(b"HTTP/1.1 413 ") and sent < 5_000_000, (answer[:80], sent)
    assert http("GET", f"{server.url}/rooms/r/messages", headers={"Authorization": f"Bearer {TOKEN}"})[1][
        "messages"] == []
    assert_no_traceback(server)


def test_hardening_posts_are_rate_limited_per_caller_with_429_and_retry_after(serve):
    """With --rate 5, a caller's POSTs beyond burst + rate are answered 429 with Retry-After, and not stored."""
    server = serve("--rate", "5")
    started, answers = time.monotonic(), []
    for i in range(30):
        answers.append(http_with_headers("POST", f"{server.url}/rooms/rl/messages", {"text": f"m{i}"}))
    elapsed = time.monotonic() - started
    stored = [body for status, _, body in answers if status == 201]
    limited = [(head, body) for status, head, body in answers if status == 429]
    assert len(stored) + len(limited) == 30
    assert 10 <= len(stored) <= 10 + 5 * elapsed + 1, (len(stored), elapsed)
    assert limited and all(int(head["retry-after"]) >= 1 and "rate limit" in body["detail"] for head, body in limited)
    history = http("GET", f"{server.url}/rooms/rl/messages")[1]["messages"]
    assert [m["text"] for m in history] == [m["text"] for m in stored]


def test_hardening_max_rooms_refuses_new_rooms_and_keeps_the_existing_ones(serve):
    """--max-rooms 2: a message or join that would create a third room is refused (HTTP 503 with the reason,
    WebSocket 1013); the two existing rooms work on."""
    server = serve("--max-rooms", "2", "--rate", "0")
    assert http("POST", f"{server.url}/rooms/r1/messages", {"text": "one"})[0] == 201
    assert http("POST", f"{server.url}/rooms/r2/messages", {"text": "two"})[0] == 201
    status, body = http("POST", f"{server.url}/rooms/r3/messages", {"text": "three"})
    assert status == 503 and "too many rooms" in body["detail"], body

    async def body_():
        async with client(server.ws_url + "/rooms/r4/ws?client_id=a") as refused:
            code, reason = await refused.closed()
            assert code == 1013 and "too many rooms" in reason
        member, welcome = await join(server.ws_url + "/rooms/r1/ws?client_id=a")
        assert welcome["last_id"] == 1
        await member.send("still here")
        assert (await member.messages(2))[-1]["text"] == "still here"
        async with client(server.ws_url + "/rooms/r1/ws?client_id=b") as other:
            await other.recv()
        await member.close()

    run(body_())
    assert http("GET", f"{server.url}/rooms/r3/messages")[1]["messages"] == []


def test_hardening_invalid_utf8_closes_with_1007_and_one_log_line(serve):
    """Invalid UTF-8 in a text frame closes with 1007; each costs at most one log line, never a traceback."""
    server = serve()
    for attempt in range(5):
        sock = raw_websocket(server.port, "/rooms/u/ws?client_id=bad", rcvbuf=65536)
        sock.sendall(client_frame(0x1, b"caf\xc3 \xff\xfe"))
        closes = [payload for opcode, payload in server_frames(sock, quiet=2, until_close=True) if opcode == 0x8]
        assert closes and struct.unpack("!H", closes[0][:2])[0] == 1007, closes
        sock.close()
    http("GET", server.url + "/healthz")
    assert_no_traceback(server)
    assert server.log.count("invalid UTF-8") <= 5, server.log[-3000:]


def test_hardening_dns_rebinding_host_is_refused_in_loopback_demo_mode(serve):
    """Demo mode on 127.0.0.1: a foreign Host (a rebound DNS name) gets HTTP 400 on every route, the WebSocket
    handshake included; loopback names pass; --allowed-host adds names; with tokens any Host is served."""
    server = serve()
    evil = {"Host": f"evil.test:{server.port}", "Origin": f"http://evil.test:{server.port}"}
    for method, path, body in (("GET", "/", None), ("GET", "/rooms", None), ("GET", "/healthz", None),
                               ("POST", "/rooms/r/messages", {"text": "x"})):
        assert http(method, server.url + path, body, headers=evil)[0] == 400, path
    raw_websocket(server.port, "/rooms/r/ws", host=evil["Host"], headers={"Origin": evil["Origin"]},
                  expect=400).close()
    for host in (f"localhost:{server.port}", f"[::1]:{server.port}", f"127.0.0.1:{server.port}", "127.0.0.2"):
        assert http("GET", server.url + "/rooms", headers={"Host": host})[0] == 200, host
    raw_websocket(server.port, "/rooms/r/ws", host=f"localhost:{server.port}").close()
    assert http("GET", server.url + "/rooms/r/messages")[1]["messages"] == []

    listed = serve("--allowed-host", "chat.example.com")
    assert http("GET", listed.url + "/rooms", headers={"Host": "chat.example.com"})[0] == 200
    assert http("GET", listed.url + "/rooms", headers={"Host": "evil.test"})[0] == 400
    guarded = serve("--token", TOKEN)
    assert http("GET", guarded.url + "/", headers={"Host": "chat.example.com"})[0] == 200
    assert http("GET", guarded.url + "/rooms", headers={"Host": "evil.test", **{"Authorization": f"Bearer {TOKEN}"}})[0] == 200


def test_hardening_short_token_never_logged_even_in_a_quoted_cookie(serve):
    """A token shorter than the literal-masking threshold, sent as a quoted session cookie, in the query and as
    a bearer header, never appears in a --log-level debug log."""
    secret = "q-z7"
    server = serve("--token", secret, "--log-level", "debug")

    async def body():
        for kwargs, url in ((dict(additional_headers={"Cookie": f'session="{secret}"'}), "/rooms/s/ws?client_id=a"),
                            ({}, f"/rooms/s/ws?client_id=b&token={secret}"),
                            (dict(additional_headers={"Authorization": f"Bearer {secret}"}), "/ws/c")):
            async with client(server.ws_url + url, **kwargs) as ws:
                await ws.send("hello")
                await ws.recv()

    run(body())
    http("GET", server.url + "/rooms", headers={"Cookie": f'session="{secret}"'})
    assert secret not in server.log, [line for line in server.log.splitlines() if secret in line][:5]


# ---------------------------------------------------------------------------
# Security: secrets never logged
# ---------------------------------------------------------------------------

def test_secrets_never_appear_in_the_log(serve):
    """With --log-level debug, a token used in query, cookie, header, POST and failing requests never shows in the server log."""
    secret = "s3cret-token"
    server = serve("--token", secret, "--log-level", "debug")
    ws, base = server.ws_url, server.url
    bearer = {"Authorization": f"Bearer {secret}"}
    cookie = {"Cookie": f"session={secret}"}

    async def body():
        alice, _ = await join(f"{ws}/rooms/sec/ws?client_id=alice&token={secret}")
        await alice.send("{bad json")
        assert (await alice.recv_until(lambda f: f.get("type") == "error"))["type"] == "error"
        await alice.send("hello")
        await alice.messages(1)
        async with client(ws + "/ws/lobbyist", additional_headers=cookie) as lobbyist:
            await lobbyist.send("hi")
            assert await lobbyist.recv() == "You wrote: hi"
        async with client(ws + "/ws", additional_headers=bearer) as echo:
            await echo.send(b"binary")
            assert (await echo.closed())[0] == 1003
        async with client(f"{ws}/items/i/ws?token={secret}&q=3") as item:
            await item.send("hi")
            assert await item.recv() == f"Session cookie or query token value is: {secret}"
        async with client(f"{ws}/items/i/ws", additional_headers=cookie) as item:
            await item.send("z" * 70_000)
            assert (await item.closed())[0] == 1009
        for url, extra in ((f"{ws}/rooms/sec/ws?token={secret}&since=abc", {}),
                           (f"{ws}/items/i/ws?token={secret}&q=notanint", {}),
                           (f"{ws}/rooms/bad%20room/ws?token={secret}", {}),
                           (f"{ws}/nowhere?token={secret}", {}),
                           (f"{ws}/rooms/sec/ws?token={secret}", {"Origin": "http://evil.example"}),
                           (f"{ws}/rooms/sec/ws?token=wrong", {})):
            assert await handshake_status(url, additional_headers=extra) in (403, 404), url
        await alice.close()

    run(body(), 30)
    assert http("POST", base + "/rooms/sec/messages", {"text": "hi"}, bearer)[0] == 201
    assert http("POST", f"{base}/rooms/sec/messages?token={secret}", {"text": "hi"})[0] == 201
    assert http("POST", base + "/rooms/sec/messages", {"nope": 1}, cookie)[0] == 422
    assert http("POST", base + "/rooms/sec/messages", {"text": "x"},
                {**bearer, "Origin": "http://evil.example"})[0] == 403
    assert http("GET", f"{base}/stats?token={secret}")[0] == 200
    assert http("GET", f"{base}/nowhere?token={secret}", headers=bearer)[0] == 404
    server.stop()
    log = server.log
    assert "DEBUG" in log or "debug" in log.lower(), "debug logging did not switch on"
    assert secret not in log, [line for line in log.splitlines() if secret in line]
    assert "Traceback" not in log


# ---------------------------------------------------------------------------
# Limits: property-based abuse against a live server
# ---------------------------------------------------------------------------

ABUSE_LIMIT = 4096
_PREFIX, _SUFFIX = '{"type":"message","text":"', '"}'

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
room_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["message", "ping", "dance", "", None])},
    optional={"text": st.text(max_size=40) | json_values,
              "to": st.sampled_from(["alice", "bob", "nobody"]) | json_values}).map(json.dumps)
surrogate_frames = st.builds(
    lambda cp, where: {"text": _PREFIX + f"a\\u{cp:04x}b" + _SUFFIX,
                       "to": '{"type":"message","text":"x","to":"\\u%04x"}' % cp,
                       "type": '{"type":"\\u%04x","text":"x"}' % cp,
                       "bare": f"\\u{cp:04x}"}[where],
    st.integers(0xD800, 0xDFFF), st.sampled_from(["text", "to", "type", "bare"]))
def _sized_frame(size: int, char: str, wrapped: bool) -> str:
    """A frame of about ``size`` UTF-8 bytes: bare text or a JSON message, made of ``char``."""
    room = size - (len(_PREFIX) + len(_SUFFIX) if wrapped else 0)
    body = char * (room // len(char.encode()))
    return _PREFIX + body + _SUFFIX if wrapped else body


huge_frames = st.builds(_sized_frame, st.integers(ABUSE_LIMIT - 40, ABUSE_LIMIT + 40),
                        st.sampled_from(["h", "{", "é", "€", "😀"]), st.booleans())
abuse_actions = st.lists(st.one_of(
    json_values.map(json.dumps), room_frames, surrogate_frames, huge_frames,
    st.text(max_size=200), st.binary(max_size=64)), min_size=1, max_size=6)
abuse_routes = st.sampled_from(["/rooms/prop/ws", "/rooms/other/ws", "/ws/z-abuser", "/ws", "/items/1/ws?token=t"])
abuse_ends = st.sampled_from(["close", "abort", "abort_mid_frame", "fin"])


def test_limits_property_random_abuse_never_hurts_well_behaved_clients(serve):
    """Random JSON, surrogates, near-limit and binary frames and abrupt disconnects never break the server or two well-behaved clients."""
    server = serve("--rate", "0", "--max-message-size", str(ABUSE_LIMIT))
    room = server.ws_url + "/rooms/prop/ws?client_id="
    loop = asyncio.new_event_loop()

    def call(coro: Awaitable[Any], timeout: float = 30) -> Any:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def connect_good() -> tuple[Collector, Collector]:
        return tuple([Collector((await join(room + name))[0]) for name in ("alice", "bob")])

    alice, bob = call(connect_good())
    sent: dict[str, list[str]] = {"alice": [], "bob": []}
    counter = itertools.count()

    async def abuse(route: str, actions: list, end: str, index: int) -> None:
        url = server.ws_url + route
        if route.startswith("/rooms/"):
            url = with_query(url, client_id=f"z-{index}")
        ws = await ws_connect(url, open_timeout=5, close_timeout=2, max_queue=None)
        try:
            for n, action in enumerate(actions):
                name, talker = (("alice", alice), ("bob", bob))[n % 2]
                good = f"good {next(counter)}"
                sent[name].append(good)
                await talker.ws.send(good)
                with contextlib.suppress(websockets.ConnectionClosed):
                    await ws.send(action)
        finally:
            if end == "abort":
                ws.transport.abort()
            elif end == "abort_mid_frame":
                ws.transport.write(b"\x81\xfe\x03\xe8\x00\x00\x00\x00" + b"partial")  # 1000-byte frame, 7 sent
                ws.transport.abort()
            elif end == "fin":
                ws.transport.close()              # TCP FIN without a close frame
            else:
                await ws.close()

    async def settle() -> None:
        total = len(sent["alice"]) + len(sent["bob"])
        for who in (alice, bob):
            await wait_for_condition(lambda: len(who.texts(("alice", "bob"))) >= total, timeout=15)
            assert who.texts(("alice",)) == sent["alice"] and who.texts(("bob",)) == sent["bob"]
            ids = [f["id"] for f in who.frames if isinstance(f, dict) and f.get("type") == "message" and "id" in f]
            assert ids == sorted(set(ids)), "message ids out of order or repeated"
            assert not who.task.done(), f"a well-behaved client was disconnected: {who.ws.socket.close_code}"
        assert alice.texts(("alice", "bob")) == bob.texts(("alice", "bob")), "the two saw different orders"
        await wait_for_condition(lambda: connections_are(server, 2), timeout=10)
        await wait_for_condition(lambda: members_are(server, "prop", ["alice", "bob"]), timeout=10)
        assert await asyncio.to_thread(http, "GET", server.url + "/healthz") == (200, {"status": "ok"})

    @hypothesis_settings(max_examples=40, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(route=abuse_routes, actions=abuse_actions, end=abuse_ends)
    def property_holds(route: str, actions: list, end: str) -> None:
        call(abuse(route, actions, end, next(counter)))
        call(settle())

    try:
        property_holds()
        assert http("GET", server.url + "/rooms")[1] == {"rooms": [{"room": "prop", "count": 2}]}
    finally:
        async def shutdown() -> None:
            for who in (alice, bob):
                await who.stop()
                await who.ws.close()
        call(shutdown())
        loop.close()
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# Soak
# ---------------------------------------------------------------------------

def _rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak_connect_disconnect_cycles_leave_nothing_behind(serve):
    """10,000 concurrent connect/message/disconnect cycles (some aborted) leave no connections, members or memory growth."""
    server = serve("--rate", "0")
    ws = server.ws_url
    rooms = [f"soak{i}" for i in range(8)]

    async def cycle(i: int) -> None:
        kind = i % 6
        if kind <= 2:
            joined, _ = await join(f"{ws}/rooms/{rooms[i % 8]}/ws?client_id=s{i}")
            await joined.send({"type": "message", "text": f"cycle {i}"})
            await joined.recv_until(lambda f: f.get("type") == "message" and f["text"] == f"cycle {i}", timeout=30)
            if kind == 2:
                joined.socket.transport.abort()
            else:
                await joined.close()
        elif kind == 3:
            async with client(f"{ws}/ws/s{i}") as lobby:
                await lobby.send("hi")
                await lobby.recv_until(lambda f: f == "You wrote: hi", timeout=30)
        elif kind == 4:
            async with client(f"{ws}/ws") as echo:
                await echo.send("hi")
                assert await echo.recv(timeout=30) == "Message text was: hi"
        else:
            async with client(f"{ws}/items/{i}/ws?token=t") as item:
                await item.send("hi")
                await item.recv(timeout=30)
                item.socket.transport.abort()

    async def soak_round(count: int, start: int) -> None:
        gate = asyncio.Semaphore(24)        # 24 cycles in flight at any time

        async def one(i: int) -> None:
            async with gate:
                await cycle(i)

        await asyncio.gather(*(one(i) for i in range(start, start + count)))
        await wait_for_condition(lambda: connections_are(server, 1), timeout=30)   # just the watcher

    async def body() -> tuple[int, int]:
        watcher = Collector((await join(f"{ws}/rooms/soak0/ws?client_id=watcher"))[0])
        await soak_round(300, 0)            # warm-up: caches, allocator arenas
        baseline = _rss_kib(server.process.pid)
        await soak_round(10_000, 300)
        expected = [f"cycle {i}" for i in range(10_300) if i % 8 == 0 and i % 6 <= 2]
        await wait_for_condition(lambda: len(watcher.texts()) >= len(expected), timeout=30)
        assert sorted(watcher.texts()) == sorted(expected), "the watcher missed or repeated messages"
        ids = [f["id"] for f in watcher.frames if isinstance(f, dict) and f.get("type") == "message"]
        assert ids == list(range(ids[0], ids[0] + len(ids))), "message ids not consecutive"
        await watcher.stop()
        await watcher.ws.close()
        await wait_for_condition(lambda: connections_are(server, 0), timeout=30)
        return baseline, _rss_kib(server.process.pid)

    baseline, after = run(body(), 280)
    print(f"soak: server RSS {baseline} KiB after warm-up, {after} KiB after 10,000 cycles")
    assert after <= baseline + 20 * 1024, f"RSS grew from {baseline} KiB to {after} KiB"
    for name in rooms:
        assert http("GET", f"{server.url}/rooms/{name}/members")[1]["members"] == []
    assert http("GET", server.url + "/rooms")[1] == {"rooms": []}
    assert http("GET", server.url + "/stats")[1]["connections"] == 0
    assert_no_traceback(server)


# ---------------------------------------------------------------------------
# Scale-out: the Redis broker (SPEC section 10, broker rows of section 7)
# ---------------------------------------------------------------------------


def wait_health(server: ServerProcess, expected: int = 200, timeout: float = 15) -> Any:
    """Poll ``GET /healthz`` until it answers ``expected``; return the body."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = http("GET", server.url + "/healthz", timeout=2)
        if status == expected:
            return body
        assert time.monotonic() < deadline, f"/healthz still {status} {body} after {timeout} s:\n{server.log}"
        time.sleep(0.05)


def redis_node(serve: Callable, redis_server: Any, *args: str, ttl: float | None = None) -> ServerProcess:
    """``wschat.py serve --broker redis://...`` ready to chat (its pub/sub connection is up)."""
    url = redis_server.url + (f"?presence_ttl={ttl:g}" if ttl else "")
    server = serve("--broker", url, *args)
    wait_health(server)
    return server


async def ahttp(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    """``http`` off the event loop, so connected clients keep being served meanwhile."""
    return await asyncio.to_thread(http, method, url, body)


async def _members(server: ServerProcess, room: str, expected: list[str]) -> bool:
    """True once ``GET /rooms/{room}/members`` on ``server`` lists exactly ``expected``."""
    status, page = await ahttp("GET", f"{server.url}/rooms/{room}/members")
    return status == 200 and sorted(page["members"]) == sorted(expected)


async def _health(server: ServerProcess, expected: int) -> Any:
    """The /healthz body once it answers ``expected``, else None."""
    status, body = await ahttp("GET", server.url + "/healthz")
    return body if status == expected else None



def ids_of(frames: list[dict]) -> list[int]:
    return [frame["id"] for frame in frames]


# ---- Scale-out: messages across processes ----

def test_redis_two_processes_chat_both_ways_in_one_id_sequence(serve, any_redis):
    """Clients on two processes chat both ways; everyone sees the same gapless, increasing ids."""
    a, b = redis_node(serve, any_redis), redis_node(serve, any_redis)

    async def body() -> None:
        alice, _ = await join(room_url(a, "r", "alice"))
        bob, _ = await join(room_url(b, "r", "bob"))
        seen: dict[str, list[dict]] = {"alice": [], "bob": []}
        for turn in range(3):
            for sender, text in ((alice, f"from A {turn}"), (bob, f"from B {turn}")):
                await sender.send({"type": "message", "text": text})
                seen["alice"] += await alice.messages(1)
                seen["bob"] += await bob.messages(1)
        assert ids_of(seen["alice"]) == [1, 2, 3, 4, 5, 6]
        assert seen["alice"] == seen["bob"]
        assert [(m["from"], m["text"]) for m in seen["bob"][:2]] == [("alice", "from A 0"), ("bob", "from B 0")]
        status, page = await ahttp("GET", b.url + "/rooms/r/messages")
        assert status == 200 and page["messages"] == seen["alice"]
        await alice.close()
        await bob.close()

    run(body(), 30)


def test_redis_lobby_text_view_and_room_view_meet_across_processes(serve, redis_server):
    """The lobby text view on one process and the lobby's JSON view on another see each other."""
    a, b = redis_node(serve, redis_server), redis_node(serve, redis_server)

    async def body() -> None:
        async with client(a.ws_url + "/ws/ann") as ann:
            await wait_for_condition(lambda: _members(b, "lobby", ["ann"]), 10)
            bob, welcome = await join(room_url(b, "lobby", "bob"))
            assert "ann" in welcome["members"]
            assert await ann.recv() == "Client #bob joined the chat"
            await ann.send("hello from text")
            assert await ann.recv() == "You wrote: hello from text"
            (message,) = await bob.messages(1)
            assert (message["from"], message["text"], message["room"]) == ("ann", "hello from text", "lobby")
            await bob.send({"type": "message", "text": "hi ann"})
            assert await ann.recv() == "Client #bob says: hi ann"
            assert (await bob.messages(1))[0]["id"] == message["id"] + 1
            async with client(a.ws_url + "/ws/cy"):
                await bob.recv_until(lambda f: f["type"] == "presence" and "cy" in f["joined"])
                assert await ann.recv() == "Client #cy joined the chat"
            await bob.recv_until(lambda f: f["type"] == "presence" and "cy" in f["left"])
            assert await ann.recv() == "Client #cy left the chat"
            await bob.close()
            assert await ann.recv() == "Client #bob left the chat"

    run(body(), 30)


def test_redis_concurrent_publishers_on_three_processes_share_one_order(serve, any_redis):
    """3 publishers x 50 messages on 3 processes: everyone gets all 150 once, in one gapless id order."""
    nodes = [redis_node(serve, any_redis, "--rate", "0") for _ in range(3)]

    async def body() -> None:
        members = [(await join(room_url(node, "busy", f"p{i}")))[0] for i, node in enumerate(nodes)]

        async def publish(index: int) -> None:
            for n in range(50):
                await members[index].send({"type": "message", "text": f"p{index}-{n}"})

        await asyncio.gather(*(publish(i) for i in range(3)))
        received = [await member.messages(150, timeout=30) for member in members]
        assert ids_of(received[0]) == list(range(1, 151))
        assert received[0] == received[1] == received[2]
        for index in range(3):   # each publisher's messages keep the order it sent them in
            texts = [m["text"] for m in received[0] if m["from"] == f"p{index}"]
            assert texts == [f"p{index}-{n}" for n in range(50)]
        status, _ = await ahttp("POST", nodes[0].url + "/rooms/busy/messages", {"text": "end"})
        assert status == 201
        for member in members:   # nothing duplicated after the 150: the next one is the marker
            (marker,) = await member.messages(1)
            assert (marker["id"], marker["text"]) == (151, "end")
            await member.close()

    run(body(), 60)


def test_redis_direct_message_reaches_a_member_on_another_process(serve, any_redis):
    """A direct message crosses processes to its recipient and back to its sender, nobody else, unstored."""
    a, b = redis_node(serve, any_redis), redis_node(serve, any_redis)

    async def body() -> None:
        alice, _ = await join(room_url(a, "r", "alice"))
        bob, _ = await join(room_url(b, "r", "bob"))
        carol, _ = await join(room_url(b, "r", "carol"))
        await wait_for_condition(lambda: _members(a, "r", ["alice", "bob", "carol"]), 10)
        await alice.send({"type": "message", "text": "psst", "to": "bob"})
        for member in (bob, alice):
            (direct,) = await member.messages(1)
            assert (direct["from"], direct["to"], direct["text"]) == ("alice", "bob", "psst") and "id" not in direct
        await alice.send({"type": "message", "text": "psst", "to": "nobody"})
        assert "nobody" in (await alice.recv_until(lambda f: f["type"] == "error"))["error"]
        await bob.send("public")
        assert [m["text"] for m in await carol.messages(1)] == ["public"]   # carol never saw the DM
        status, page = await ahttp("GET", a.url + "/rooms/r/messages")
        assert [m["text"] for m in page["messages"]] == ["public"]
        for member in (alice, bob, carol):
            await member.close()

    run(body(), 30)


# ---- Scale-out: recovery, history and the HTTP API across processes ----

def test_redis_reconnect_with_since_on_another_process_recovers_the_gap(serve, any_redis):
    """A client that leaves process A resumes on process B with since+epoch and gets exactly what it missed."""
    a, b = redis_node(serve, any_redis), redis_node(serve, any_redis)

    async def body() -> None:
        alice, welcome = await join(room_url(a, "r", "alice"))
        epoch = welcome["epoch"]
        for n in range(3):
            await alice.send(f"seen {n}")
        last = (await alice.messages(3))[-1]["id"]
        await alice.close()
        for n in range(2):
            status, stored = await ahttp("POST", b.url + "/rooms/r/messages", {"text": f"missed {n}", "from": "ops"})
            assert status == 201 and stored["id"] == last + 1 + n and stored["from"] == "ops"
        async with client(room_url(b, "r", "bob")) as bob:
            await bob.send("missed 2")
            await bob.messages(1)

        alice, welcome = await join(room_url(b, "r", "alice", since=last, epoch=epoch))
        assert (welcome["recovered"], welcome["epoch"], welcome["last_id"]) == (True, epoch, last + 3)
        missed = await alice.messages(3)
        assert [m["text"] for m in missed] == ["missed 0", "missed 1", "missed 2"]
        assert ids_of(missed) == [last + 1, last + 2, last + 3]

        stale, welcome = await join(room_url(b, "r", "stale", since=last, epoch="not-" + epoch))
        assert (welcome["recovered"], welcome["epoch"]) == (False, epoch)
        assert ids_of(await stale.messages(last + 3)) == list(range(1, last + 4))

        trusting, welcome = await join(room_url(a, "r", "trusting", since=last + 2))   # no epoch: taken to match
        assert welcome["recovered"] is True and ids_of(await trusting.messages(1)) == [last + 3]

        status, _ = await ahttp("POST", a.url + "/rooms/r/messages", {"text": "marker"})
        assert status == 201
        for member in (alice, stale, trusting):   # exactly those: the next message is the marker
            assert (await member.messages(1))[0]["text"] == "marker"
            await member.close()

    run(body(), 30)


def test_redis_http_api_gives_the_same_answers_on_every_process(serve, any_redis):
    """GET /rooms, members, messages and /stats agree across processes sharing one Redis."""
    a, b = redis_node(serve, any_redis), redis_node(serve, any_redis)

    async def body() -> None:
        alice, _ = await join(room_url(a, "r", "alice"))
        bob, _ = await join(room_url(b, "r", "bob"))
        solo, _ = await join(room_url(a, "only-a", "solo"))
        await alice.send("one")
        await bob.messages(1)          # two processes: "one" must be stored before "two" is sent
        await bob.send("two")
        await alice.messages(2)
        expected_rooms = {"rooms": [{"room": "only-a", "count": 1}, {"room": "r", "count": 2}]}

        async def everyone_agrees() -> bool:
            answers = [await ahttp("GET", node.url + "/rooms") for node in (a, b)]
            return answers == [(200, expected_rooms)] * 2

        await wait_for_condition(everyone_agrees, 10)
        for node in (a, b):
            assert await _members(node, "r", ["alice", "bob"])
            assert await _members(node, "only-a", ["solo"])   # b has nobody there: read from Redis
            status, page = await ahttp("GET", node.url + "/rooms/r/messages?since=1")
            assert status == 200 and (page["last_id"], ids_of(page["messages"])) == (2, [2])
            assert [m["text"] for m in page["messages"]] == ["two"]
            status, stats = await ahttp("GET", node.url + "/stats")
            assert status == 200 and stats["connections"] == (2 if node is a else 1)
            assert stats["broker"] == {"url": any_redis.url, "ok": True, "status": "ok"}
        pages = [(await ahttp("GET", node.url + "/rooms/r/messages"))[1] for node in (a, b)]
        assert pages[0] == pages[1]
        for member in (alice, bob, solo):
            await member.close()

    run(body(), 30)


def test_redis_history_is_bounded_across_processes(serve, redis_server):
    """With --history 5 every process replays and serves only the last 5 messages."""
    a, b = (redis_node(serve, redis_server, "--history", "5") for _ in range(2))

    async def body() -> None:
        for n in range(1, 9):
            status, _ = await ahttp("POST", a.url + "/rooms/r/messages", {"text": f"m{n}"})
            assert status == 201
        status, page = await ahttp("GET", b.url + "/rooms/r/messages")
        assert status == 200 and (page["last_id"], ids_of(page["messages"])) == (8, [4, 5, 6, 7, 8])
        carol, welcome = await join(room_url(b, "r", "carol"))
        assert welcome["last_id"] == 8
        assert [m["text"] for m in await carol.messages(5)] == ["m4", "m5", "m6", "m7", "m8"]
        dave, welcome = await join(room_url(a, "r", "dave", since=2, epoch=welcome["epoch"]))
        assert welcome["recovered"] is False    # id 3 is no longer retained: a gap
        assert ids_of(await dave.messages(5)) == [4, 5, 6, 7, 8]
        await carol.close()
        await dave.close()

    run(body(), 30)


def test_redis_keys_stay_bounded_and_expire(serve, redis_server):
    """20 messages with --history 5 leave 5 in Redis; the members set carries a TTL."""
    import redis

    node = redis_node(serve, redis_server, "--history", "5")

    async def body() -> None:
        alice, _ = await join(room_url(node, "r", "alice"))
        for n in range(20):
            status, _ = await ahttp("POST", node.url + "/rooms/r/messages", {"text": f"m{n}"})
            assert status == 201
        await alice.messages(20)
        store = redis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await wait_for_condition(lambda: store.zcard("wschat:{r}:members") == 1, 10)
            history = store.lrange("wschat:{r}:history", 0, -1)
            assert [json.loads(frame)["id"] for frame in history] == [16, 17, 18, 19, 20]
            assert store.ttl("wschat:{r}:members") > 0
        finally:
            store.close()
        await alice.close()

    run(body(), 30)


# ---- Scale-out: presence across processes ----

def test_redis_presence_crosses_processes_and_a_killed_process_expires(serve, any_redis):
    """A join on B reaches A as presence; after B is SIGKILLed its members leave A within ttl + ttl/3."""
    ttl = 2.0
    a, b = redis_node(serve, any_redis, ttl=ttl), redis_node(serve, any_redis, ttl=ttl)

    async def body() -> None:
        alice, _ = await join(room_url(a, "r", "alice"))
        await wait_for_condition(lambda: _members(b, "r", ["alice"]), 10)
        bob, welcome = await join(room_url(b, "r", "bob"))
        assert sorted(welcome["members"]) == ["alice", "bob"] and welcome["count"] == 2
        joined = await alice.recv_until(lambda f: f["type"] == "presence" and "bob" in f["joined"])
        assert joined["count"] == 2
        b.stop(signal.SIGKILL)
        left = await alice.recv_until(lambda f: f["type"] == "presence" and "bob" in f["left"],
                                      timeout=ttl + ttl / 3 + 3)
        assert left["count"] == 1
        assert await _members(a, "r", ["alice"])
        status, rooms = await ahttp("GET", a.url + "/rooms")
        assert rooms == {"rooms": [{"room": "r", "count": 1}]}
        await alice.close()

    run(body(), 30)


# ---- Scale-out: faults (broker lost, broker unreachable) ----

def test_redis_lost_while_running_reports_503_and_recovers(serve, redis_server):
    """Redis gone: 503 with a reason and error frames, no crash; back: 200, clients told 1012, chat resumes."""
    node = redis_node(serve, redis_server)

    async def body() -> None:
        alice, welcome = await join(room_url(node, "r", "alice"))
        bob, _ = await join(room_url(node, "r", "bob"))
        redis_server.stop()
        down = await wait_for_condition(lambda: _health(node, 503), 15)
        assert down["status"] != "ok" and "redis" in down["reason"]
        await alice.send("while redis is away")
        error = await alice.recv_until(lambda f: f["type"] in ("error", "message"))
        assert error["type"] == "error" and "broker" in error["error"]
        status, _ = await ahttp("POST", node.url + "/rooms/r/messages", {"text": "nope"})
        assert status == 503
        assert node.process.poll() is None

        redis_server.start()
        await wait_for_condition(lambda: _health(node, 200), 20)
        for member in (alice, bob):
            assert (await member.closed(10))[0] == 1012
        alice, again = await join(room_url(node, "r", "alice", since=welcome["last_id"], epoch=welcome["epoch"]))
        assert again["epoch"] != welcome["epoch"] and again["recovered"] is False   # a flushed Redis
        bob, _ = await join(room_url(node, "r", "bob"))
        await alice.send("back again")
        assert [(m["id"], m["text"]) for m in await bob.messages(1)] == [(1, "back again")]
        await alice.close()
        await bob.close()

    run(body(), 60)
    assert node.process.poll() is None
    assert "Traceback" not in node.log


# ---- Scale-out: a busy or stalled Redis ----

def test_redis_a_thousand_simultaneous_joins_all_get_their_welcome(serve, any_redis):
    """1,000 room joins at once on a healthy Redis all succeed (redis-py's default pool failed about a third of
    300 with 1013 'Too many connections'), and /healthz stays 200 throughout."""
    node = redis_node(serve, any_redis, "--max-connections", "2000")

    async def one(i: int) -> Any:
        socket_ = await ws_connect(room_url(node, f"storm{i % 10}", f"c{i}"), open_timeout=60, close_timeout=2)
        return socket_, json.loads(await asyncio.wait_for(socket_.recv(), 60))

    async def body():
        joined = await asyncio.gather(*(one(i) for i in range(1000)))
        assert [welcome["type"] for _, welcome in joined] == ["welcome"] * 1000
        assert (await ahttp("GET", node.url + "/healthz"))[0] == 200
        await asyncio.gather(*(socket_.close() for socket_, _ in joined))

    run(body(), 120)
    assert "Too many connections" not in node.log and "unreachable" not in node.log


def test_redis_stalled_stores_each_message_once_and_never_delivers_what_it_refused(serve, redis_server):
    """Redis stopped (SIGSTOP) for 8 s while a client publishes: /healthz answers 503 within 5 s; each message
    is stored at most once; one its sender was told "not delivered" is never stored or delivered later;
    afterwards the chat goes on and /healthz is 200 again."""
    node = redis_node(serve, redis_server, "--rate", "0")
    stopped: dict[str, float] = {}

    async def publish(sender: Collector, text: str) -> bool:
        """Send one message and wait for its outcome: True delivered, False refused."""
        errors = sum(1 for f in sender.frames if isinstance(f, dict) and f.get("type") == "error")
        await sender.ws.send(text)
        outcome = await wait_for_condition(lambda: (text in sender.texts() and "delivered") or (
            sum(1 for f in sender.frames if isinstance(f, dict) and f.get("type") == "error") > errors
            and "refused"), timeout=15)
        return outcome == "delivered"

    async def watch_health() -> None:
        while "unhealthy" not in stopped:
            if (await ahttp("GET", node.url + "/healthz"))[0] == 503:
                stopped["unhealthy"] = time.monotonic()
            await asyncio.sleep(0.2)

    async def body():
        listener = Collector((await join(room_url(node, "stall", "listener")))[0])
        sender = Collector((await join(room_url(node, "stall", "sender")))[0])
        outcomes: dict[str, bool] = {}
        for i in range(5):
            outcomes[f"before {i}"] = await publish(sender, f"before {i}")
        os.kill(redis_server.process.pid, signal.SIGSTOP)
        stopped["at"] = time.monotonic()
        health = asyncio.ensure_future(watch_health())
        try:
            i = 0
            while time.monotonic() - stopped["at"] < 8:
                outcomes[f"during {i}"] = await publish(sender, f"during {i}")
                i += 1
        finally:
            os.kill(redis_server.process.pid, signal.SIGCONT)
        await asyncio.wait_for(health, 5)
        await wait_for_condition(lambda: _health(node, 200), 15)
        for i in range(5):
            outcomes[f"after {i}"] = await publish(sender, f"after {i}")
        await asyncio.sleep(1.0)   # proving a negative: nothing refused arrives late
        refused = {text for text, delivered in outcomes.items() if not delivered}
        delivered = [text for text, ok in outcomes.items() if ok]
        status, page = await ahttp("GET", node.url + "/rooms/stall/messages")
        stored = [m["text"] for m in page["messages"]]
        assert refused, "no publish was refused during the stall"
        assert all(outcomes[f"before {i}"] and outcomes[f"after {i}"] for i in range(5)), outcomes
        assert stored == delivered and len(set(stored)) == len(stored), (stored, outcomes)
        ids = [m["id"] for m in page["messages"]]
        assert ids == sorted(set(ids))
        assert listener.texts() == delivered and not refused & set(sender.texts())
        for who in (listener, sender):
            await who.stop()
            await who.ws.close()

    try:
        run(body(), 90)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(redis_server.process.pid, signal.SIGCONT)
    assert stopped["unhealthy"] - stopped["at"] <= 5.0, stopped
    assert "Traceback" not in node.log


KICK_APP = '''
import os
from wschat import create_app

app = create_app(broker=os.environ["REDIS_URL"], authenticate=lambda token: token)


@app.post("/kick/{user}")
async def kick(user: str):
    return {"closed": await app.state.chat.kick(user)}
'''


def test_redis_kick_and_delete_reach_every_process(serve, any_redis, tmp_path):
    """kick() on one process closes the client's connections on another (it returns what it closed itself);
    delete_message() removes the message from the shared history and every process's members are told."""
    (tmp_path / "kickapp.py").write_text(KICK_APP)
    env = {"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}", "REDIS_URL": any_redis.url}
    node_a, node_b = (serve(command=[sys.executable, "-m", "uvicorn", "kickapp:app"], cwd=tmp_path, env=env)
                      for _ in range(2))
    for node in (node_a, node_b):
        wait_health(node)

    async def body():
        alice, _ = await join(f"{node_a.ws_url}/rooms/r/ws?token=alice")
        bob, _ = await join(f"{node_b.ws_url}/rooms/r/ws?token=bob")
        carol = Collector((await join(f"{node_b.ws_url}/rooms/r/ws?token=carol"))[0])
        assert (await ahttp("POST", node_a.url + "/kick/bob")) == (200, {"closed": 0})
        assert await bob.closed(10) == (4003, "removed")
        await alice.send("to be deleted")
        await alice.send("to keep")
        await wait_for_condition(lambda: carol.texts() == ["to be deleted", "to keep"])
        doomed = next(f["id"] for f in carol.frames if isinstance(f, dict) and f.get("text") == "to be deleted")
        status, _ = await asyncio.to_thread(http, "DELETE", f"{node_a.url}/rooms/r/messages/{doomed}",
                                            headers={"Authorization": "Bearer alice"})
        assert status == 204
        await wait_for_condition(lambda: {"type": "deleted", "room": "r", "id": doomed} in carol.frames)
        status, page = await asyncio.to_thread(http, "GET", f"{node_b.url}/rooms/r/messages",
                                               headers={"Authorization": "Bearer carol"})
        assert [m["text"] for m in page["messages"]] == ["to keep"]
        await carol.stop()
        await carol.ws.close()
        await alice.close()

    run(body(), 40)
    for node in (node_a, node_b):
        assert "Traceback" not in node.log


def test_redis_flushall_closes_room_clients_with_1012_and_starts_a_new_epoch(serve, redis_server):
    """FLUSHALL under connected clients: the restarted id sequence closes them with 1012; since/epoch then says not recovered."""
    import redis

    node = redis_node(serve, redis_server)

    async def body() -> None:
        alice, welcome = await join(room_url(node, "r", "alice"))
        for n in range(3):
            assert (await ahttp("POST", node.url + "/rooms/r/messages", {"text": f"before {n}"}))[0] == 201
        assert ids_of(await alice.messages(3)) == [1, 2, 3]
        await asyncio.to_thread(lambda: redis.Redis.from_url(redis_server.url).flushall())
        status, posted = await ahttp("POST", node.url + "/rooms/r/messages", {"text": "after the flush"})
        assert status == 201 and posted["id"] == 1
        with pytest.raises(websockets.ConnectionClosed):
            frame = await alice.recv_until(lambda f: f["type"] == "message", timeout=10)
            pytest.fail(f"a client got a restarted id instead of a close: {frame}")
        assert alice.socket.close_code == 1012
        alice, again = await join(room_url(node, "r", "alice", since=3, epoch=welcome["epoch"]))
        assert again["epoch"] != welcome["epoch"] and again["recovered"] is False
        await alice.close()

    run(body(), 30)
    assert "Traceback" not in node.log


HOST_APP_ON_REDIS = '''
import os
from fastapi import FastAPI
from wschat import create_app

app = FastAPI()
app.mount("/chat", create_app(broker=os.environ["CHAT_BROKER"]))


@app.get("/up")
async def up():
    return {"up": True}
'''


def test_redis_mounted_app_first_healthz_is_ok(serve, redis_server, tmp_path):
    """A host app mounting create_app(broker=redis) at /chat: the very first GET /chat/healthz answers 200."""
    (tmp_path / "hostapp.py").write_text(HOST_APP_ON_REDIS)
    server = serve(command=[sys.executable, "-m", "uvicorn", "hostapp:app"], ready_path="/up",
                   env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}", "CHAT_BROKER": redis_server.url})
    assert "/chat" not in server.log            # nothing has touched wschat yet
    assert http("GET", server.url + "/chat/healthz") == (200, {"status": "ok"})


def test_redis_unreachable_at_start_exits_with_one_masked_line():
    """serve on an unreachable Redis exits non-zero at once with one line naming the URL, password masked."""
    port = free_port()
    url = f"redis://user:secretpw@127.0.0.1:{port}/0"
    result = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--port", str(free_port()),
                             "--broker", url], capture_output=True, text=True, timeout=20, cwd=HERE)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "secretpw" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert f"redis://user:***@127.0.0.1:{port}/0" in lines[0]


@pytest.mark.parametrize("url, expected", [
    ("redis+sentinel://127.0.0.1:{port}/0", "redis+sentinel://[:password@]host:port[,host:port...]/DB/SERVICE"),
    ("redis+cluster://127.0.0.1:x/", "redis+cluster://[:password@]host:port[,host:port...]/"),
    ("redis+sentinel://:secretpw@127.0.0.1:{port},127.0.0.1:{port}/0/mymaster",
     "cannot reach broker redis+sentinel://:***@127.0.0.1:{port},127.0.0.1:{port}/0/mymaster: No master found"),
    ("redis+cluster://:secretpw@127.0.0.1:{port}/", "cannot reach broker redis+cluster://:***@127.0.0.1:{port}/"),
])
def test_sentinel_and_cluster_urls_misspelt_or_unreachable_exit_with_one_line(url, expected):
    """A malformed Sentinel/Cluster URL names the form it should have; an unreachable one says so,
    password masked, in one line, within seconds."""
    port = free_port()
    result = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--port", str(free_port()),
                             "--broker", url.format(port=port)], capture_output=True, text=True, timeout=20, cwd=HERE)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode != 0 and len(output.splitlines()) == 1, output
    assert expected.format(port=port) in output and "secretpw" not in output


def test_redis_address_reads_the_three_shapes():
    """Hosts, ports (defaults 26379 for sentinels, 6379 for cluster nodes), db, service, password, presence_ttl."""
    sentinel = wschat.RedisAddress.parse("redis+sentinel://:p%40ss@a:26380,[::1],b/2/my%20master?presence_ttl=4")
    assert (sentinel.shape, sentinel.hosts) == (wschat.RedisShape.SENTINEL, (("a", 26380), ("::1", 26379), ("b", 26379)))
    assert (sentinel.db, sentinel.service, sentinel.password, sentinel.presence_ttl) == (2, "my master", "p@ss", 4.0)
    cluster = wschat.RedisAddress.parse("redis+cluster://u:pw@n1:7000,n2/")
    assert (cluster.shape, cluster.hosts, cluster.username, cluster.password) == (
        wschat.RedisShape.CLUSTER, (("n1", 7000), ("n2", 6379)), "u", "pw")
    single = wschat.RedisAddress.parse("redis://h:1/3?presence_ttl=2")
    assert (single.shape, single.url, single.presence_ttl) == (wschat.RedisShape.SINGLE, "redis://h:1/3", 2.0)
    assert wschat.mask_url("redis+sentinel://u:pw@a:1,b:2/0/m") == "redis+sentinel://u:***@a:1,b:2/0/m"


# ---- Scale-out: several workers in one server ----

async def _join_retrying(url: str, attempts: int = 20) -> tuple[Client, dict]:
    """Join, trying again on 1013 (a worker still connecting to Redis), as a client should."""
    for _ in range(attempts):
        try:
            return await join(url)
        except websockets.ConnectionClosed as exc:
            if exc.rcvd is None or exc.rcvd.code != 1013:
                raise
        await asyncio.sleep(0.2)   # backoff before retrying, as a real client does
    raise AssertionError(f"could not join {url}")


def test_redis_two_workers_share_rooms(serve, redis_server):
    """serve --workers 2 --broker redis://: ten clients on either worker share one id sequence."""
    server = serve("--workers", "2", "--broker", redis_server.url)
    wait_health(server)

    async def body() -> None:
        members = [(await _join_retrying(room_url(server, "r", f"c{i}")))[0] for i in range(10)]
        for i, member in enumerate(members):
            await member.send(f"hello from c{i}")
        received = [await member.messages(10, timeout=15) for member in members]
        assert ids_of(received[0]) == list(range(1, 11))
        assert all(seen == received[0] for seen in received)
        assert sorted(m["from"] for m in received[0]) == sorted(f"c{i}" for i in range(10))
        for member in members:
            await member.close()

    run(body(), 60)
    assert server.stop() is not None and server.process.poll() is not None


def test_cli_workers_with_memory_broker_is_refused():
    """serve --workers 2 without a shared broker exits non-zero with a message naming the fix."""
    result = subprocess.run([sys.executable, str(HERE / "wschat.py"), "serve", "--port", str(free_port()),
                             "--workers", "2"], capture_output=True, text=True, timeout=30, cwd=HERE)
    assert result.returncode != 0
    assert "--workers" in result.stderr and "redis://" in result.stderr


# ---- Beyond one Redis: Sentinel and Cluster ----

async def resume(server: ServerProcess, room: str, client_id: str, welcome: dict, last_id: int) -> tuple[Client, dict]:
    return await join(room_url(server, room, client_id, since=last_id, epoch=welcome["epoch"]))


class SteadyPublisher:
    """POSTs to a room every 20 ms until stopped: which posts were acknowledged (their ids,
    in order) and how many were refused (503: the broker is down). Any other answer fails."""

    def __init__(self, server: ServerProcess, room: str) -> None:
        self.url = f"{server.url}/rooms/{room}/messages"
        self.acknowledged: list[int] = []
        self.refused = 0
        self._stop = asyncio.Event()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            status, stored = await ahttp("POST", self.url, {"text": f"m{n}"})
            if status == 201:
                self.acknowledged.append(stored["id"])
            else:
                assert status == 503, (status, stored)
                self.refused += 1
            n += 1
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


def check_failover_kept(publisher: SteadyPublisher, replicated: list[int], stored: list[int]) -> None:
    """What a failover may and may not do to a room's messages: everything acknowledged and
    replicated before it is stored, once; ids stay strictly increasing; posts were refused
    while there was no master, and acknowledged again after."""
    assert publisher.refused > 0 and len(publisher.acknowledged) > len(replicated)
    assert publisher.acknowledged == sorted(set(publisher.acknowledged))
    assert stored == sorted(set(stored)) and set(replicated) <= set(stored)


def test_sentinel_failover_is_followed_without_restart(serve, own_sentinel_set):
    """SIGKILL the master under two processes: publishers get error frames, /healthz 503, room
    clients 1012; once a sentinel promotes the replica, clients resume with since on the same
    processes, every replicated message kept, and the sequence goes on."""
    servers = own_sentinel_set
    a, b = redis_node(serve, servers, "--rate", "0"), redis_node(serve, servers, "--rate", "0")

    async def body() -> None:
        alice, welcome = await join(room_url(a, "r", "alice"))
        bob, _ = await join(room_url(b, "r", "bob"))
        publisher = SteadyPublisher(b, "feed")   # traffic on another room throughout
        for n in range(5):
            await alice.send(f"before {n}")
        assert ids_of(await bob.messages(5)) == ids_of(await alice.messages(5)) == [1, 2, 3, 4, 5]
        await wait_for_condition(lambda: len(publisher.acknowledged) >= 20, 10)
        old_master = servers.current_master()
        assert redis_command(old_master, "WAIT", 1, 5000) == 1   # all so far are on the replica
        replicated = list(publisher.acknowledged)
        servers.master.kill()
        await alice.send("while there is no master")
        error = await alice.recv_until(lambda f: f["type"] in ("error", "message"), 10)
        assert error["type"] == "error" and "broker" in error["error"]
        for node in (a, b):
            down = await wait_for_condition(lambda: _health(node, 503), 15)
            assert "redis" in down["reason"]
        for member in (alice, bob):
            assert (await member.closed(30))[0] == 1012
        for node in (a, b):
            await wait_for_condition(lambda: _health(node, 200), 30)
        assert servers.current_master() == servers.replica.port

        alice, again = await resume(a, "r", "alice", welcome, 5)
        bob, again_b = await resume(b, "r", "bob", welcome, 5)
        assert (again["recovered"], again["last_id"]) == (again_b["recovered"], again_b["last_id"]) == (True, 5)
        await alice.send("after")
        for member in (alice, bob):
            assert [(m["id"], m["text"]) for m in await member.messages(1)] == [(6, "after")]
        status, page = await ahttp("GET", b.url + "/rooms/r/messages")
        assert [m["text"] for m in page["messages"]] == [f"before {n}" for n in range(5)] + ["after"]
        await wait_for_condition(lambda: len(publisher.acknowledged) >= len(replicated) + 10, 20)
        await publisher.stop()
        status, page = await ahttp("GET", a.url + "/rooms/feed/messages?since=0&limit=1000")
        check_failover_kept(publisher, replicated, ids_of(page["messages"]))
        await alice.close()
        await bob.close()

    run(body(), 90)
    for node in (a, b):
        assert node.process.poll() is None and "Traceback" not in node.log


def rooms_on_each_master(cluster: RedisCluster, count: int = 1) -> dict[int, list[str]]:
    """Room names whose slots land on each master: {master port: [room, ...]}."""
    found: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    for n in range(1000):
        owner = found.get(cluster.owner(f"wschat:{{room{n}}}:seq"))
        if owner is not None and len(owner) < count:
            owner.append(f"room{n}")
        if all(len(rooms) == count for rooms in found.values()):
            return found
    raise AssertionError(f"could not place rooms on every master: {found}")


def shard_subscribers(cluster: RedisCluster, room: str) -> dict[int, int]:
    """How many connections each master has subscribed to the room's shard channel."""
    channel = f"wschat:{{{room}}}:channel"
    return {port: int(redis_command(port, "PUBSUB", "SHARDNUMSUB", channel)[1]) for port in cluster.masters()}


def test_cluster_each_room_lives_on_its_own_master_and_only_where_it_has_members(serve, redis_cluster):
    """Rooms spread over the three masters; a room's shard channel is subscribed only on the
    master owning its slot, and only by processes that have members in it (until they leave)."""
    redis_cluster.flush()
    a, b = redis_node(serve, redis_cluster), redis_node(serve, redis_cluster)
    placed = rooms_on_each_master(redis_cluster)

    async def body() -> None:
        for port, (room,) in placed.items():
            alice, _ = await join(room_url(a, room, "alice"))
            bob, _ = await join(room_url(b, room, "bob"))
            await alice.send(f"hello {room}")
            assert [(m["id"], m["text"]) for m in await bob.messages(1)] == [(1, f"hello {room}")]
            expected = {other: (2 if other == port else 0) for other in placed}
            assert shard_subscribers(redis_cluster, room) == expected
            await bob.close()   # b has nobody left there: it unsubscribes, a stays
            await wait_for_condition(lambda: shard_subscribers(redis_cluster, room)[port] == 1, 10)
            assert redis_command(port, "HGET", f"wschat:{{{room}}}:seq", "id") == "1"
            await alice.close()

    run(body(), 60)
    for node in (a, b):
        assert "Traceback" not in node.log


def move_slot(cluster: RedisCluster, key: str, to_port: int) -> None:
    """Migrate ``key``'s slot, keys and all, to the master on ``to_port`` (what resharding does)."""
    masters = cluster.masters()
    source = cluster.owner(key)
    slot = redis_command(source, "CLUSTER", "KEYSLOT", key)
    redis_command(to_port, "CLUSTER", "SETSLOT", slot, "IMPORTING", masters[source])
    redis_command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", masters[to_port])
    keys = redis_command(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
    if keys:
        redis_command(source, "MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
    for port in masters:
        redis_command(port, "CLUSTER", "SETSLOT", slot, "NODE", masters[to_port])


def test_cluster_slot_migration_moves_the_room_and_its_clients_resume(serve, own_cluster):
    """Reshard a room's slot to another master under two processes: they subscribe it there,
    their clients are told 1012 and resume with since, and ids go on from where they were."""
    a, b = redis_node(serve, own_cluster), redis_node(serve, own_cluster)
    room = "moving"
    key = f"wschat:{{{room}}}:seq"

    async def body() -> None:
        alice, welcome = await join(room_url(a, room, "alice"))
        bob, _ = await join(room_url(b, room, "bob"))
        for n in range(3):
            await alice.send(f"before {n}")
        assert ids_of(await bob.messages(3)) == ids_of(await alice.messages(3)) == [1, 2, 3]
        source = own_cluster.owner(key)
        target = next(port for port in own_cluster.masters() if port != source)
        move_slot(own_cluster, key, target)
        for member in (alice, bob):
            assert (await member.closed(15))[0] == 1012
        alice, again = await resume(a, room, "alice", welcome, 3)
        bob, _ = await resume(b, room, "bob", welcome, 3)
        assert (again["recovered"], again["last_id"]) == (True, 3)
        subscribed = shard_subscribers(own_cluster, room)
        assert (subscribed[target], subscribed[source]) == (2, 0)
        await bob.send("after the move")
        for member in (alice, bob):
            assert [(m["id"], m["text"]) for m in await member.messages(1)] == [(4, "after the move")]
        await alice.close()
        await bob.close()

    run(body(), 60)
    for node in (a, b):
        assert "Traceback" not in node.log


def test_cluster_killed_master_during_traffic_fails_over_and_nothing_replicated_is_lost(serve, own_cluster):
    """A publisher posts every 20 ms while the master owning its room is SIGKILLed: posts get 201
    or 503, never a hang; the replica takes over; clients are told 1012 and resume with since;
    every post acknowledged before the last WAIT is there once, in strictly increasing ids."""
    a, b = redis_node(serve, own_cluster, "--rate", "0"), redis_node(serve, own_cluster, "--rate", "0")
    room = "busy"
    owner = own_cluster.owner(f"wschat:{{{room}}}:seq")
    victim = next(node for node in own_cluster.nodes if node.port == owner)

    async def body() -> None:
        alice, welcome = await join(room_url(a, room, "alice"))
        bob, _ = await join(room_url(b, room, "bob"))
        publisher = SteadyPublisher(a, room)
        await wait_for_condition(lambda: len(publisher.acknowledged) >= 20, 10)
        assert redis_command(owner, "WAIT", 1, 5000) == 1
        replicated = list(publisher.acknowledged)
        victim.kill()
        seen_by_bob = await bob.messages(len(replicated), 10)
        assert ids_of(seen_by_bob) == replicated == list(range(1, len(replicated) + 1))
        for member in (alice, bob):
            assert (await member.closed(30))[0] == 1012
        await wait_for_condition(lambda: _health(a, 200), 30)
        await wait_for_condition(lambda: len(publisher.acknowledged) >= len(replicated) + 10, 20)   # posting again
        await publisher.stop()
        assert own_cluster.owner(f"wschat:{{{room}}}:seq") != owner   # the replica owns the slot now

        alice, again = await resume(a, room, "alice", welcome, replicated[-1])
        assert again["recovered"] is True and again["last_id"] >= publisher.acknowledged[-1]
        status, page = await ahttp("GET", f"{b.url}/rooms/{room}/messages?since=0&limit=1000")
        check_failover_kept(publisher, replicated, ids_of(page["messages"]))
        await alice.close()

    run(body(), 120)
    for node in (a, b):
        assert node.process.poll() is None and "Traceback" not in node.log


# ---- Scale-out: the redis package is optional ----

def test_redis_package_is_optional_for_the_memory_broker():
    """Without the redis package wschat imports and serves; a redis:// broker names wschat[redis]."""
    script = (
        "import sys; sys.modules['redis'] = None\n"
        "import wschat\n"
        "from fastapi.testclient import TestClient\n"
        "with TestClient(wschat.create_app()) as c:\n"
        "    assert c.get('/healthz').json() == {'status': 'ok'}\n"
        "    with c.websocket_connect('/rooms/r/ws?client_id=a') as ws:\n"
        "        assert ws.receive_json()['type'] == 'welcome'\n"
        "        ws.send_text('hi')\n"
        "        assert ws.receive_json()['text'] == 'hi'\n"
        "try:\n"
        "    wschat.create_app(broker='redis://127.0.0.1:6379/0')\n"
        "except Exception as exc:\n"
        "    print('refused:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=HERE)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "wschat[redis]" in result.stdout
    assert "redis" not in result.stderr.lower()


def test_redis_package_is_optional_for_serve(serve):
    """``serve`` runs and chats with the redis package missing."""
    blocked = "import sys; sys.modules['redis'] = None; import wschat; wschat.main()"
    server = serve(command=[sys.executable, "-c", blocked, "serve"])

    async def body() -> None:
        alice, _ = await join(room_url(server, "r", "alice"))
        await alice.send("no redis needed")
        assert (await alice.messages(1))[0]["text"] == "no redis needed"
        await alice.close()

    run(body(), 20)


# ---------------------------------------------------------------------------
# The page in a real browser (Chromium via Playwright, against `wschat.py serve`)
# ---------------------------------------------------------------------------

def expect(*args: Any, **kwargs: Any) -> Any:
    """Playwright's auto-waiting ``expect``, imported late so the file loads without Playwright."""
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(*args, **kwargs)


WAIT = 10_000  # ms: generous expect() timeout for anything that crosses the network


def open_chat(context: Any, url: str, *, mode: str = "room", room: str | None = None, name: str | None = None,
              item: str | None = None, token: str | None = None, connect: bool = True) -> Any:
    """A new tab on the chat page, filled in and connected the way a person does it."""
    page = context.new_page()
    page.goto(url)
    page.get_by_label("Mode", exact=True).select_option(mode)
    for label, value in (("Room", room), ("Name", name), ("Item ID", item), ("Token", token)):
        if value is not None:
            page.get_by_label(label, exact=True).fill(value)
    if connect:
        page.get_by_role("button", name="Connect", exact=True).click()
    return page


def messages(page: Any) -> Any:
    return page.get_by_role("list", name="Messages")


def message_box(page: Any) -> Any:
    return page.get_by_role("textbox", name="Message", exact=True)


def say(page: Any, text: str) -> None:
    message_box(page).fill(text)
    message_box(page).press("Enter")


def off_thread(coro: Any, timeout: float = 30) -> Any:
    """``run`` in a worker thread, so asyncio never shares a thread with Playwright's sync API."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(run, coro, timeout).result()


def post_as(ws_url: str, room: str, name: str, *texts: str) -> None:
    """A real ``websockets`` client joins ``room``, sends ``texts`` and waits for each to come back."""
    async def body() -> None:
        sender, _ = await join(f"{ws_url}/rooms/{room}/ws?client_id={name}")
        try:
            for text in texts:
                await sender.send({"type": "message", "text": text})
                await sender.recv_until(lambda f: f.get("type") == "message" and f.get("text") == text, 10)
        finally:
            await sender.close()
    off_thread(body())


def test_page_two_tabs_chat_in_a_room(serve, browser):
    """Two tabs in one room see each other as members, exchange timestamped messages, keep focus, disconnect."""
    server = serve()
    context = browser.new_context()
    requested: list[str] = []
    context.on("request", lambda request: requested.append(request.url))
    try:
        alice = open_chat(context, server.url + "/", room="r1", name="alice")
        bob = open_chat(context, server.url + "/", room="r1", name="bob")
        expect(alice.get_by_role("status")).to_have_text("Connected to r1 as alice", timeout=WAIT)
        expect(bob.get_by_role("status")).to_have_text("Connected to r1 as bob", timeout=WAIT)
        for page in (alice, bob):
            members = page.get_by_role("list", name="Members").get_by_role("listitem")
            expect(members).to_have_text(["alice", "bob"], timeout=WAIT)
        say(alice, "hello bob")
        line = messages(bob).get_by_role("listitem")
        expect(line).to_have_text([re.compile(r"^\d{1,2}:\d{2}:\d{2}.*alice:\s*hello bob$")], timeout=WAIT)
        expect(messages(alice).get_by_role("listitem")).to_have_count(1, timeout=WAIT)
        expect(message_box(alice)).to_be_focused()
        expect(message_box(alice)).to_have_value("")
        alice.get_by_role("button", name="Disconnect", exact=True).click()
        expect(alice.get_by_role("status")).to_have_text(re.compile(r"^Disconnected"), timeout=WAIT)
        expect(bob.get_by_role("list", name="Members").get_by_role("listitem")).to_have_text(["bob"], timeout=WAIT)
        assert all(url.startswith(server.url + "/") for url in requested), requested  # self-contained: no CDN
    finally:
        context.close()


def test_page_lobby_mode_speaks_the_text_protocol(serve, browser):
    """Lobby mode shows the lobby's exact lines: joined, `You wrote`, `Client #id says`."""
    server = serve()
    context = browser.new_context()
    try:
        alice = open_chat(context, server.url + "/", mode="lobby", name="alice")
        expect(alice.get_by_role("status")).to_have_text("Connected (lobby)", timeout=WAIT)
        bob = open_chat(context, server.url + "/", mode="lobby", name="bob")
        expect(messages(alice)).to_contain_text("Client #bob joined the chat", timeout=WAIT)
        say(alice, "hi")
        expect(messages(alice).get_by_text("You wrote: hi", exact=True)).to_be_visible(timeout=WAIT)
        expect(messages(bob).get_by_text("Client #alice says: hi", exact=True)).to_be_visible(timeout=WAIT)
        expect(bob.get_by_role("list", name="Members")).to_be_hidden()
    finally:
        context.close()


def test_page_item_mode_needs_a_credential(serve, browser):
    """Item mode echoes the credential and item id; without a token the page reports it was refused."""
    server = serve()
    context = browser.new_context()
    try:
        page = open_chat(context, server.url + "/", mode="item", item="foo", token="s3cret")
        expect(page.get_by_role("status")).to_have_text("Connected (item)", timeout=WAIT)
        say(page, "hello")
        expect(messages(page).get_by_role("listitem")).to_have_text(
            ["Session cookie or query token value is: s3cret", "Message text was: hello, for item ID: foo"],
            timeout=WAIT)
        refused = open_chat(context, server.url + "/", mode="item", item="foo", token="")
        expect(refused.get_by_role("status")).to_have_text(re.compile(r"^Could not connect"), timeout=WAIT)
        expect(refused.get_by_role("button", name="Connect", exact=True)).to_be_visible()
        expect(message_box(refused)).to_be_disabled()
    finally:
        context.close()


def test_page_refused_room_says_why_and_does_not_retry(serve, browser):
    """A room connection refused at the handshake (wrong token) is reported once, not retried forever."""
    server = serve("--token", "right-token")
    context = browser.new_context()
    try:
        page = open_chat(context, server.url + "/", room="r", name="alice", token="wrong-token")
        status = page.get_by_role("status")
        expect(status).to_have_text(re.compile(r"^Could not connect.*check the token"), timeout=WAIT)
        # A scheduled retry keeps Connect hidden (the page still "wants" the connection).
        expect(page.get_by_role("button", name="Connect", exact=True)).to_be_visible()
        page.get_by_label("Token", exact=True).fill("right-token")
        page.get_by_role("button", name="Connect", exact=True).click()
        expect(status).to_have_text("Connected to r as alice", timeout=WAIT)
    finally:
        context.close()


def test_page_works_mounted_under_a_prefix(serve, browser, tmp_path):
    """Mounted at /chat in a host app, the page reached as /chat and /chat/ builds its WebSocket URLs from it."""
    (tmp_path / "hostapp.py").write_text(
        "from fastapi import FastAPI\nfrom wschat import create_app\n"
        "app = FastAPI()\napp.mount('/chat', create_app())\n")
    server = serve(command=[sys.executable, "-m", "uvicorn", "hostapp:app", "--app-dir", str(tmp_path)],
                   ready_path="/chat/healthz")
    context = browser.new_context()
    sockets: list[str] = []
    context.on("page", lambda page: page.on("websocket", lambda ws: sockets.append(ws.url)))
    try:
        alice = open_chat(context, server.url + "/chat", room="r4", name="alice")
        assert alice.url == server.url + "/chat/"  # Starlette redirects the bare prefix
        # A proxy may serve the page at /chat itself, without that redirect: put bob's tab there.
        bob = open_chat(context, server.url + "/chat/", room="r4", name="bob", connect=False)
        bob.evaluate("history.replaceState(null, '', '/chat')")
        bob.get_by_role("button", name="Connect", exact=True).click()
        expect(bob.get_by_role("status")).to_have_text("Connected to r4 as bob", timeout=WAIT)
        say(bob, "hi from /chat")
        expect(messages(alice)).to_contain_text("bob:hi from /chat", timeout=WAIT)
        assert sorted(sockets) == [f"{server.ws_url}/chat/rooms/r4/ws?client_id={name}" for name in ("alice", "bob")]
    finally:
        context.close()


def test_page_renders_untrusted_text_as_text(serve, browser):
    """Markup in a name or message shows literally; no element is created and no script runs."""
    server = serve()
    context = browser.new_context()
    dialogs: list[str] = []
    try:
        page = open_chat(context, server.url + "/", room="r5", name="<b>x</b>")
        page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
        expect(page.get_by_role("status")).to_have_text("Connected to r5 as <b>x</b>", timeout=WAIT)
        say(page, "<img src=x onerror=alert(1)>")
        expect(messages(page).get_by_text("<img src=x onerror=alert(1)>", exact=True)).to_be_visible(timeout=WAIT)
        say(page, "after")  # a round trip after the image would have failed to load
        expect(messages(page).get_by_text("after", exact=True)).to_be_visible(timeout=WAIT)
        expect(messages(page)).to_contain_text("<b>x</b>:")
        expect(page.get_by_role("list", name="Members").get_by_role("listitem")).to_have_text(["<b>x</b>"])
        expect(messages(page).locator("img")).to_have_count(0)
        expect(page.locator("b")).to_have_count(0)
        assert dialogs == []
    finally:
        context.close()


@pytest.mark.parametrize("broker", ["memory", "redis"])
def test_page_reconnects_after_restart_without_loss_or_duplicates(serve, browser, request, broker):
    """A tab survives a server restart: says it is reconnecting, resumes with since, shows every message once."""
    args = ("--broker", request.getfixturevalue("redis_server").url) if broker == "redis" else ()
    server = serve(*args)
    other_node = serve(*args) if broker == "redis" else None  # shares the room through Redis
    context = browser.new_context()
    try:
        page = open_chat(context, server.url + "/", room="r6", name="alice")
        status = page.get_by_role("status")
        expect(status).to_have_text("Connected to r6 as alice", timeout=WAIT)
        post_as(server.ws_url, "r6", "bob", "before 1", "before 2")
        expect(messages(page).get_by_text("before 2", exact=True)).to_be_visible(timeout=WAIT)
        server.stop()
        expect(status).to_contain_text("Reconnecting", timeout=WAIT)
        texts = ["before 1", "before 2", "gap 2", "after"]
        if other_node:  # the tab's server is down: a certain gap
            post_as(other_node.ws_url, "r6", "bob", "gap 1")
            texts.insert(2, "gap 1")
        server = serve(*args, port=server.port)
        post_as(server.ws_url, "r6", "bob", "gap 2")  # most likely while the tab is still backing off
        expect(status).to_have_text("Connected to r6 as alice", timeout=20_000)
        post_as(server.ws_url, "r6", "bob", "after")
        expect(messages(page).get_by_text("after", exact=True)).to_be_visible(timeout=WAIT)
        seen = messages(page).locator(".from + span").all_inner_texts()
        assert seen == texts, seen
        assert '"WebSocket /rooms/r6/ws?client_id=alice&since=2&epoch=' in server.log, server.log
        notices = messages(page).locator(".notice").all_inner_texts()
        # Memory broker: a new sequence (new epoch) the page announces; Redis: the same one, resumed.
        assert notices == (["The room's history restarted on the server."] if broker == "memory" else []), notices
    finally:
        context.close()


def test_page_after_a_kick_says_why_and_does_not_reconnect_and_drops_deleted_messages(serve, browser, tmp_path):
    """In the README's SaaS host: a deleted message disappears from an open page; a kicked user's page says
    it was removed (4003) and does not reconnect."""
    server = readme_saas_host(serve, tmp_path)
    root = SaasUser(server, "root")
    context = browser.new_context()
    try:
        assert context.request.post(server.url + "/login/bob").ok    # the page's session cookie
        page = open_chat(context, server.url + "/chat/", room="team-1")
        expect(page.get_by_role("status")).to_have_text(re.compile(r"^Connected to team-1 as bob"), timeout=WAIT)
        say(page, "first")
        say(page, "second")
        expect(messages(page).get_by_role("listitem")).to_have_count(2, timeout=WAIT)
        first = root.call("GET", "/chat/rooms/team-1/messages")[1]["messages"][0]
        assert root.call("DELETE", f"/chat/rooms/team-1/messages/{first['id']}")[0] == 204
        expect(messages(page).get_by_role("listitem")).to_have_count(1, timeout=WAIT)
        expect(messages(page).get_by_role("listitem")).to_contain_text(["second"])
        assert root.call("POST", "/admin/kick/bob") == (200, {"closed": 1})
        expect(page.get_by_role("status")).to_have_text("Removed by the server (code 4003, removed)", timeout=WAIT)
        expect(page.get_by_role("button", name="Connect", exact=True)).to_be_visible()   # no retry pending
        assert root.call("GET", "/chat/rooms/team-1/members")[1]["members"] == []
    finally:
        context.close()


def test_page_load_older_pages_back_through_the_kept_history(serve, browser, tmp_path):
    """With the SQLite broker and --history 3, the page shows the last 3 messages; "Load older" prepends the
    earlier ones, in order, until there are none."""
    server = serve("--broker", f"sqlite:///{tmp_path / 'chat.db'}", "--history", "3", "--rate", "0")
    for i in range(1, 9):
        assert http("POST", f"{server.url}/rooms/old/messages", {"text": f"note {i}"})[0] == 201
    context = browser.new_context()
    try:
        page = open_chat(context, server.url + "/", room="old", name="reader")
        items = messages(page).get_by_role("listitem")
        expect(items).to_have_count(3, timeout=WAIT)
        older = page.get_by_role("button", name="Load older")
        older.click()
        expect(items).to_have_count(8, timeout=WAIT)
        expect(items).to_contain_text([f"note {i}" for i in range(1, 9)])
        expect(older).to_be_hidden()
    finally:
        context.close()


def test_page_stats_view_shows_the_server_live_and_is_screenshotted(serve, browser):
    """The page's Stats view polls /stats: connections, rooms, received and delivered per second, slow clients
    dropped and the broker; drawn without any library; a screenshot goes to test-artifacts/."""
    server = serve("--rate", "0")
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    try:
        page = open_chat(context, server.url + "/", room="ops", name="operator")
        expect(page.get_by_role("status")).to_have_text("Connected to ops as operator", timeout=WAIT)
        page.get_by_role("button", name="Stats").click()
        stats = page.get_by_role("region", name="Stats")
        expect(stats).to_be_visible()
        expect(page.locator("#stat-connections")).to_have_text("1", timeout=WAIT)
        expect(page.locator("#stat-rooms")).to_have_text("1")
        expect(page.locator("#stat-broker")).to_have_text("ok")
        post_as(server.ws_url, "ops", "bot", *[f"metric {n}" for n in range(40)])
        expect(page.locator("#stat-out")).not_to_have_text(re.compile(r"^(-|0\.0)$"), timeout=WAIT)
        assert page.locator("#stat-line").get_attribute("points")
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / "page-stats-1280x800.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 1000
        page.get_by_role("button", name="Stats").click()
        expect(stats).to_be_hidden()
    finally:
        context.close()


def test_page_pings_keep_an_idle_tab_connected(serve, browser):
    """With --timeout 2 an idle tab stays on its first connection for 5 s: its pings keep it alive."""
    server = serve("--timeout", "2")
    context = browser.new_context()
    try:
        page = open_chat(context, server.url + "/", room="r7", name="alice")
        expect(page.get_by_role("status")).to_have_text("Connected to r7 as alice", timeout=WAIT)
        page.evaluate("""() => { window.statusLog = [];
            new MutationObserver(() => statusLog.push(document.getElementById('status').textContent))
              .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true}); }""")

        async def watch() -> list[str]:
            bob, _ = await join(f"{server.ws_url}/rooms/r7/ws?client_id=bob")
            left: list[str] = []
            deadline = time.monotonic() + 5  # 2.5 x the timeout; bob pings to stay in
            while time.monotonic() < deadline:
                try:
                    frame = await bob.recv(timeout=0.5)
                    left += frame.get("left", []) if frame.get("type") == "presence" else []
                except asyncio.TimeoutError:
                    await bob.send({"type": "ping"})
            await bob.send({"type": "message", "text": "still there?"})
            await bob.recv_until(lambda f: f.get("text") == "still there?")
            await bob.close()
            return left

        assert off_thread(watch()) == []
        expect(messages(page).get_by_text("still there?", exact=True)).to_be_visible(timeout=WAIT)
        expect(page.get_by_role("status")).to_have_text("Connected to r7 as alice")
        assert page.evaluate("statusLog") == []
        assert server.log.count('"WebSocket /rooms/r7/ws?client_id=alice" [accepted]') == 1, server.log
    finally:
        context.close()


@pytest.mark.parametrize("size", [(1280, 800), (390, 844)], ids=["desktop", "phone"])
def test_page_screenshots_room_mode(serve, browser, size):
    """The room page after a conversation, saved to test-artifacts/; the newest message is scrolled into view."""
    server = serve()
    width, height = size
    phone = width < 500
    context = browser.new_context(viewport={"width": width, "height": height}, is_mobile=phone, has_touch=phone,
                                  device_scale_factor=2 if phone else 1)
    try:
        page = open_chat(context, server.url + "/", room="general", name="alice")
        expect(page.get_by_role("status")).to_have_text("Connected to general as alice", timeout=WAIT)
        open_chat(context, server.url + "/", room="general", name="bob")
        expect(page.get_by_role("list", name="Members").get_by_role("listitem")).to_have_count(2, timeout=WAIT)
        post_as(server.ws_url, "general", "bob", *[f"Release checklist item {n}: done" for n in range(1, 25)],
                "Anything else before we ship? This line is long on purpose so that it wraps on a narrow screen.")
        say(page, "Ship it!")
        newest = messages(page).get_by_text("Ship it!", exact=True)
        expect(newest).to_be_visible(timeout=WAIT)
        assert page.evaluate("() => { const l = document.getElementById('messages');"
                             " return l.scrollHeight > l.clientHeight; }"), "the list should overflow here"
        expect(newest).to_be_in_viewport()
        expect(message_box(page)).to_be_focused()
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"page-room-{width}x{height}.png"
        page.screenshot(path=str(path))
        assert path.stat().st_size > 1000
    finally:
        context.close()

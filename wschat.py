"""wschat: a single-file, embeddable WebSocket chat microservice.

Rooms, presence, history and server-side push over WebSockets, built on FastAPI.
Three ways to use it:

* serve it: ``python wschat.py serve`` (or the ``wschat`` console script) and open
  http://127.0.0.1:8000/ in two browser tabs;
* mount it: ``app.mount("/chat", create_app())`` inside your FastAPI or Starlette app;
* copy it: this file is the whole product; it needs fastapi, uvicorn and click
  (plus ``redis`` for the optional Redis broker).

Push to rooms from your own code::

    from fastapi import FastAPI
    from wschat import create_app

    app = FastAPI()
    chat_app = create_app(history=500)
    app.mount("/chat", chat_app)

    @app.post("/invoices/{number}/paid")
    async def invoice_paid(number: int):
        await chat_app.state.chat.publish("billing", f"invoice {number} paid", sender="billing")

The README documents every route, option, close code and protocol frame; the section
banners below carry the same names.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import enum
import functools
import hashlib
import hmac
import inspect
import ipaddress
import itertools
import json
import logging
import math
import os
import queue
import re
import secrets
import socket
import struct
import sys
import threading
import time
import urllib.request
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator, Protocol
from urllib.parse import quote, unquote, urlsplit, urlunsplit

try:
    import fcntl
    import termios
except ImportError:   # not POSIX: the kernel's send queue is not asked (see _ServerTransport)
    fcntl = termios = None  # type: ignore[assignment]

import click
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette import status
from starlette.requests import HTTPConnection

__all__ = [
    "Connection",
    "ChatApp",
    "ConnectionManager",
    "MemoryBroker",
    "RedisBroker",
    "Settings",
    "SQLiteBroker",
    "ChatClient",
    "Draft",
    "Hooks",
    "Reject",
    "coalescing_websocket_protocol",
    "connect",
    "create_app",
    "main",
]
__version__ = "0.1.0"

logger = logging.getLogger("wschat")


# ---------------------------------------------------------------------------
# Errors and close codes
# ---------------------------------------------------------------------------

WS_1000_NORMAL_CLOSURE = status.WS_1000_NORMAL_CLOSURE
WS_1001_GOING_AWAY = status.WS_1001_GOING_AWAY
WS_1003_UNSUPPORTED_DATA = status.WS_1003_UNSUPPORTED_DATA
WS_1007_INVALID_PAYLOAD = status.WS_1007_INVALID_FRAME_PAYLOAD_DATA
WS_1008_POLICY_VIOLATION = status.WS_1008_POLICY_VIOLATION
WS_1009_MESSAGE_TOO_BIG = status.WS_1009_MESSAGE_TOO_BIG
WS_1011_INTERNAL_ERROR = status.WS_1011_INTERNAL_ERROR
WS_1012_SERVICE_RESTART = status.WS_1012_SERVICE_RESTART
WS_1013_TRY_AGAIN_LATER = status.WS_1013_TRY_AGAIN_LATER


class ProtocolError(ValueError):
    """A client frame wschat cannot act on: answered with an error frame, the connection stays open."""


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached right now: publishers get an error frame, /healthz answers 503."""


class RoomLimitReached(RuntimeError):
    """The broker holds ``max_rooms`` rooms: a join or message that would create another is refused."""


class Reject(Exception):
    """Raised by an ``on_message`` hook to refuse a message: its sender gets ``reason`` (an
    error frame, or HTTP 422) and nothing is stored or delivered."""

    def __init__(self, reason: str = "message refused") -> None:
        super().__init__(reason)
        self.reason = reason


class NotAllowed(Reject):
    """``authorize`` refused a message: an error frame over WebSocket, HTTP 403 over HTTP."""


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
BROKER_SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix", "redis+sentinel", "redis+cluster")
SINGLE_PROCESS_BROKERS = ("memory", "sqlite")


@dataclass(frozen=True)
class Settings:
    """Every option of ``wschat serve`` (one field per option) plus ``presence_interval``.

    ``tokens`` and ``allowed_origins`` are the repeatable ``--token`` and
    ``--allowed-origin``. Values are checked on creation: a bad one raises ValueError
    naming the field and the value.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    timeout: float = 300.0
    broker: str = "memory://"
    tokens: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    history: int = 100
    retain: int = 10_000
    max_message_size: int = 64 * 1024
    rate: float = 20.0
    max_connections: int = 10_000
    send_queue: int = 1024
    workers: int = 1
    log_level: str = "info"
    root_path: str = ""
    allowed_hosts: tuple[str, ...] = ()
    max_rooms: int = 10_000
    presence_interval: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _as_tuple(self.tokens))
        object.__setattr__(self, "allowed_origins", _as_tuple(self.allowed_origins))
        object.__setattr__(self, "allowed_hosts", _as_tuple(self.allowed_hosts))
        _require(0 < self.port < 65536, "port", self.port, "between 1 and 65535")
        _require(self.timeout >= 0, "timeout", self.timeout, "0 (off) or more seconds")
        _require(self.history >= 0, "history", self.history, "0 (keep none) or more")
        _require(self.retain >= 0, "retain", self.retain, "0 or more messages per room")
        _require(self.max_message_size >= 1, "max_message_size", self.max_message_size, "at least 1 byte")
        _require(self.rate >= 0, "rate", self.rate, "0 (off) or more messages per second")
        _require(self.max_connections >= 1, "max_connections", self.max_connections, "at least 1")
        _require(self.send_queue >= 1, "send_queue", self.send_queue, "at least 1")
        _require(self.workers >= 1, "workers", self.workers, "at least 1")
        _require(self.max_rooms >= 1, "max_rooms", self.max_rooms, "at least 1")
        _require(self.presence_interval > 0, "presence_interval", self.presence_interval, "more than 0 seconds")
        _require(self.log_level.lower() in LOG_LEVELS, "log_level", self.log_level, f"one of {LOG_LEVELS}")
        _require(urlsplit(self.broker).scheme in BROKER_SCHEMES, "broker", mask_url(self.broker),
                 "memory://, sqlite:///path, redis://host:port/db, redis+sentinel://... or redis+cluster://...")
        _require(all(t and t.strip() == t for t in self.tokens), "tokens", "<hidden>",
                 "non-empty, without surrounding spaces")
        _require(all(o == "*" or urlsplit(o).netloc for o in self.allowed_origins), "allowed_origins",
                 self.allowed_origins, "'*' or origins like https://example.com")
        _require(self.root_path == "" or (self.root_path.startswith("/") and not self.root_path.endswith("/")),
                 "root_path", self.root_path, "empty or like /chat")
        _require(all(_HOST_PATTERN.fullmatch(h) for h in self.allowed_hosts), "allowed_hosts", self.allowed_hosts,
                 "host names like chat.example.com or *.example.com (no scheme, no port), or '*'")

    @property
    def rate_burst(self) -> float:
        """Token-bucket size: a client may send 2 x rate messages at once before it is limited,
        and always at least one, so a rate below 1 still lets a message through now and then."""
        return max(2 * self.rate, 1.0)


_HOST_PATTERN = re.compile(r"\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*|\[[0-9A-Fa-f:.]+\]")


def _as_tuple(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _require(condition: bool, name: str, value: object, expected: str) -> None:
    if not condition:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def mask_url(url: str) -> str:
    """The URL with its password replaced by ***, safe to print and log (several hosts too)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{hosts}"))


ROUTE_GROUPS = frozenset({"page", "api", "rooms", "lobby", "echo", "items"})
TUTORIAL_ROUTES = frozenset({"echo", "items"})   # they echo what they are sent, credentials included
ACTIONS = ("join", "read", "members", "post", "list", "delete", "stats")


@dataclass(frozen=True)
class Hooks:
    """The embedding hooks of SPEC section 11: each optional, each a sync or async callable.

    * ``identify(connection) -> str | None``: who the request or handshake is (any cookie,
      header, ``scope["session"]``); None refuses it. ``authenticate(credential)`` is the
      shorthand that receives the credential string (cookie ``session``, query ``token``
      or a bearer header). With either, the identity is the client id.
    * ``authorize(identity, action, room) -> bool``: asked before every access (``ACTIONS``);
      False, or raising, refuses.
    * ``on_message(draft) -> str | None``: every message a client sends, before it is
      stored or delivered: None keeps it, a string replaces it, ``Reject`` refuses it.
    * ``on_published(message)``, ``on_join(room, client_id)``, ``on_leave(room, client_id)``:
      notifications, run in the background; what they raise is logged.

    Sync hooks run on the event loop: keep them quick, and make hooks that do I/O async.
    """

    identify: Callable[[HTTPConnection], Any] | None = None
    authenticate: Callable[[str], Any] | None = None
    authorize: Callable[[str | None, str, str | None], Any] | None = None
    on_message: Callable[[Draft], Any] | None = None
    on_published: Callable[[dict], Any] | None = None
    on_join: Callable[[str, str], Any] | None = None
    on_leave: Callable[[str, str], Any] | None = None

    def __post_init__(self) -> None:
        for name in ("identify", "authenticate", "authorize", "on_message", "on_published", "on_join", "on_leave"):
            _require(getattr(self, name) is None or callable(getattr(self, name)), name, getattr(self, name),
                     "a callable or None")
        _require(self.identify is None or self.authenticate is None, "identify", self.identify,
                 "given alone: identify= and authenticate= are two ways to do the same thing")

    @property
    def identifies(self) -> bool:
        """Whether an identity hook decides who clients are (else client ids are self-asserted)."""
        return self.identify is not None or self.authenticate is not None


def route_groups(routes: Iterable[str] | None, hooks: Hooks) -> frozenset[str]:
    """The route groups an app serves: ``routes`` as given, else all of them, except the
    tutorial routes when an identity hook is set (the item route would echo a session
    cookie back to page scripts)."""
    if routes is None:
        return ROUTE_GROUPS - TUTORIAL_ROUTES if hooks.identifies else ROUTE_GROUPS
    groups = frozenset(_as_tuple(routes))
    _require(groups <= ROUTE_GROUPS, "routes", sorted(groups - ROUTE_GROUPS), f"names from {sorted(ROUTE_GROUPS)}")
    return groups


async def _result_of(value: Any) -> Any:
    """What a sync or async hook returned."""
    return await value if inspect.isawaitable(value) else value


def _hook_name(hook: Callable) -> str:
    return getattr(hook, "__qualname__", None) or getattr(hook, "__name__", None) or repr(hook)


# ---------------------------------------------------------------------------
# Protocol: names, frames and events (pure functions)
# ---------------------------------------------------------------------------

LOBBY = "lobby"
MAX_LISTED_MEMBERS = 100   # welcome and presence frames list at most this many ids
PRESENCE_FRAMES_PER_SECOND = 2000   # per room: a room of N members hears presence every N/2000 s at most
_ROOM_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")   # always with fullmatch: "$" would let "room\n" through
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PONG_FRAME = '{"type":"pong"}'

# Views: how a connection sees its room. JSON is the room protocol, TEXT the lobby's
# tutorial texts; PLAIN connections (echo, item) belong to no room.
JSON_VIEW, TEXT_VIEW, PLAIN_VIEW = "json", "text", "plain"

encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def valid_room(name: object) -> bool:
    return isinstance(name, str) and _ROOM_NAME.fullmatch(name) is not None


def valid_client_id(client_id: object) -> bool:
    """1 to 64 characters, none of them a control character, all encodable as UTF-8."""
    return (isinstance(client_id, str) and 0 < len(client_id) <= 64
            and _CONTROL_CHARACTER.search(client_id) is None and _is_utf8(client_id))


def _is_utf8(text: str) -> bool:
    # Lone surrogates survive json.loads("\\ud800") but cannot be sent as a text frame.
    if text.isascii():
        return True
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def utf8_length(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def checked_text(text: object) -> str:
    """The chat text itself, or ProtocolError saying what is wrong with it."""
    if not isinstance(text, str):
        raise ProtocolError(f'"text" must be a string, got {type(text).__name__}')
    if not text:
        raise ProtocolError('"text" must not be empty')
    if not _is_utf8(text):
        raise ProtocolError('"text" is not valid Unicode (lone surrogate)')
    return text


@dataclass(frozen=True, slots=True)
class ClientCommand:
    """What a client frame on the room route asks for."""

    kind: str                   # "message" or "ping"
    text: str = ""
    to: str | None = None


_PING = ClientCommand("ping")


def parse_client_frame(frame: str) -> ClientCommand:
    """Read one room-route frame: a JSON object, or bare text meaning a message.

    A frame starting with ``{`` must be valid JSON; anything else is the text of a
    message, so people can type ``[sic]`` or ``42`` and mean it.
    """
    if not frame.lstrip().startswith("{"):
        return ClientCommand("message", checked_text(frame))
    try:
        data = json.loads(frame)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"invalid JSON: {exc}") from None
    kind = data.get("type")
    if kind == "ping":
        return _PING
    if kind != "message":
        expected = 'expected "message" or "ping"'
        raise ProtocolError(f'missing "type": {expected}' if kind is None else f"unknown type {kind!r}: {expected}")
    to = data.get("to")
    if to is not None and not valid_client_id(to):
        raise ProtocolError('"to" must be a client id: 1-64 characters, no control characters')
    return ClientCommand("message", checked_text(data.get("text")), to)


@dataclass(frozen=True, slots=True)
class Draft:
    """A message a client sent, as ``on_message`` sees it: before anything is stored or delivered."""

    room: str
    sender: str
    text: str
    to: str | None = None   # the recipient of a direct message
    source: str = "ws"      # "ws" (room route), "lobby" or "http" (POST)


def message_event(room: str, message_id: int | None, sender: str, text: str, *, to: str | None = None,
                  system: bool = False) -> dict:
    """A chat message as clients see it; direct messages carry ``to`` and no id, messages from
    host code ``"system": true``."""
    event: dict[str, Any] = {"type": "message"}
    if message_id is not None:
        event["id"] = message_id
    event.update({"room": room, "from": sender})
    if to is not None:
        event["to"] = to
    event.update({"text": text, "ts": time.time()})
    if system:
        event["system"] = True
    return event


def deleted_frame(room: str, message_id: int) -> str:
    return encode({"type": "deleted", "room": room, "id": message_id})


def presence_frame(room: str, joined: list[str], left: list[str], count: int) -> str:
    event: dict[str, Any] = {"type": "presence", "room": room, "joined": joined[:MAX_LISTED_MEMBERS],
                             "left": left[:MAX_LISTED_MEMBERS], "count": count}
    if len(joined) > MAX_LISTED_MEMBERS or len(left) > MAX_LISTED_MEMBERS:
        event["truncated"] = True   # the page then reloads GET /rooms/{room}/members
    return encode(event)


def error_frame(reason: str) -> str:
    return encode({"type": "error", "error": reason})


def plan_replay(retained: list[tuple[int, str]], last_id: int, since: int | None,
                epoch_matches: bool) -> tuple[list[tuple[int, str]], bool | None]:
    """Which retained messages a (re)connecting client gets, and whether that closes its gap.

    Without ``since`` the client gets all retained messages and no verdict. With it,
    the gap is recovered when the epoch matches and every id after ``since`` is still
    retained; otherwise the client gets everything retained and ``recovered`` is False.
    """
    if since is None:
        return retained, None
    first_retained = retained[0][0] if retained else last_id + 1
    if epoch_matches and first_retained - 1 <= since <= last_id:
        return [item for item in retained if item[0] > since], True
    return retained, False


# ---------------------------------------------------------------------------
# Connection manager
# ---------------------------------------------------------------------------

class ChatSocket(Protocol):
    """The part of Starlette's WebSocket the manager uses, so tests can pass a fake."""

    async def accept(self) -> None: ...
    async def receive(self) -> dict: ...
    async def send_text(self, data: str) -> None: ...
    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


RAW_SEND = "wschat.send"              # scope key: the ASGI server's own send, recorded by _Endpoint
RAW_RECEIVE = "wschat.receive"        # scope key: and its receive
SERVER_EXTENSION = "wschat.server"    # scope extension: a ServerSocket, offered by wschat's uvicorn protocol
CLOSE_TIMEOUT = 5.0                   # seconds a closing handshake may take before the TCP connection is dropped
INBOX_LIMIT = 16                      # frames handed over and not yet handled before a client is read no more
_WIRE = "wschat.wire"                 # message key: the frame bytes a server keeps for a shared message


class ServerSocket(Protocol):
    """What wschat's uvicorn protocol offers each connection, as the scope extension ``wschat.server``.

    With it a fan-out writes without a task per recipient, and the server enforces the
    per-connection bounds that plain ASGI cannot express (pings, held control frames,
    dropping a peer that never finishes closing). Without it (stock uvicorn, other
    servers, test fakes) everything still works through each connection's queue and writer.
    """

    def send_nowait(self, message: dict) -> bool:
        """Write one ``websocket.send`` message now if the socket can take it; False when it cannot."""

    def abort(self) -> None:
        """Drop the TCP connection at once: for a close frame that can never get out."""

    def open_connections(self) -> int:
        """TCP connections this server holds now: sockets, closing ones and half-received requests."""

    def attach(self, connection: AttachedConnection) -> None:
        """From now on pings and held control frames follow ``connection``'s limits."""

    def take_frames(self) -> bool:
        """From now on hand each received frame to the attached connection's ``frame_received``
        instead of the ASGI receive queue (which then carries only the disconnect). False, and
        nothing changes, while frames are still queued: they must be read first, in order."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class AttachedConnection(Protocol):
    """What the server asks of the connection attached to it (see ``ServerSocket.attach``)."""

    frame_limit: int            # control frames (pongs) it may hold for a client that stopped reading

    def ping_received(self) -> float:
        """A protocol PING arrived: 0 to answer it, else no PONG and read nothing more for that many seconds."""

    def overflowed(self) -> None:
        """The client holds ``frame_limit`` control frames it does not read: drop it as too slow."""

    def frame_received(self, message: dict) -> None:
        """A ``websocket.receive`` message, once ``take_frames`` said yes."""


def _server_socket(socket: ChatSocket) -> ServerSocket | None:
    extensions = getattr(socket, "scope", {}).get("extensions") or {}
    return extensions.get(SERVER_EXTENSION)


def _message_sender(socket: ChatSocket) -> Callable[[dict], Awaitable[None]]:
    """How a connection hands over ``websocket.send`` messages: to the server directly when
    the route recorded its send, else through the socket (fakes in tests, other wrappers)."""
    raw_send = getattr(socket, "scope", {}).get(RAW_SEND)
    if raw_send is not None:
        return raw_send

    async def send_text(message: dict) -> None:
        await socket.send_text(message["text"])
    return send_text


def text_message(frame: str) -> dict:
    """The ASGI message for one text frame. A fan-out builds it once and queues the same
    dict for every recipient, so a server can frame it once (see coalescing_websocket_protocol)."""
    return {"type": "websocket.send", "text": frame}


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up: the rate limit of SPEC section 7."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        """Spend a token if there is one."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def take_or_owe(self, now: float) -> float:
        """Spend a token, going into debt when there is none: 0 when there was one, else the
        seconds until the debt is paid and a token is back."""
        if self.take(now):
            return 0.0
        self.tokens -= 1
        return self.wait()

    def wait(self) -> float:
        """Seconds until the next token."""
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """Token buckets by key (an identity or an address) for requests with no connection of their own.

    It remembers at most ``max_keys`` buckets, forgetting the least recently used first,
    so a flood of new addresses costs bounded memory (a forgotten key starts full again).
    """

    def __init__(self, rate: float, burst: float, *, max_keys: int = 10_000) -> None:
        self._rate, self._burst, self._max_keys = rate, burst, max_keys
        self._buckets: collections.OrderedDict[str, TokenBucket] = collections.OrderedDict()

    def retry_after(self, key: str, now: float) -> float:
        """0 when ``key`` may go ahead now (and it is counted), else the seconds to wait."""
        if not self._rate:
            return 0.0
        bucket = self._buckets.pop(key, None) or TokenBucket(self._rate, self._burst, now)
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return 0.0 if bucket.take(now) else bucket.wait()


class Metrics:
    """The Prometheus metrics of SPEC section 13 for one app, on ``prometheus_client`` (the
    extra ``wschat[metrics]``). No label carries a room or a client id; close codes are
    grouped so that a client cannot make up new series (``_code_label``).

    Each is updated where the event happens, never per recipient of a fan-out. In one
    process each app has a registry of its own; under ``serve --workers N`` they are
    prometheus_client's multiprocess metrics (``PROMETHEUS_MULTIPROC_DIR``, which ``serve``
    sets), so any worker's ``/metrics`` covers every worker.
    """

    BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        import prometheus_client as prometheus
        self._prometheus = prometheus
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = prometheus.CollectorRegistry()
        where = {"registry": None if self.multiprocess else self.registry}
        gauge, counter = prometheus.Gauge, prometheus.Counter
        self.connections = gauge("wschat_connections", "WebSocket connections open now",
                                 multiprocess_mode="livesum", **where)
        self.accepted = counter("wschat_connections_accepted", "WebSocket connections accepted", **where)
        self.received = counter("wschat_messages_received", "Text frames received from clients", **where)
        self.delivered = counter("wschat_messages_delivered", "Frames handed to clients' sockets", **where)
        self.slow_dropped = counter("wschat_slow_clients_dropped", "Clients closed with 1013 for not keeping up",
                                    **where)
        self.disconnects = counter("wschat_disconnects", "Connections ended, by close code", ["code"], **where)
        self.rate_limited = counter("wschat_rate_limited", "Messages, pings and POSTs refused over --rate", **where)
        self.resumes = counter("wschat_resumes", "Reconnections with since, by whether the whole gap was recovered",
                               ["recovered"], **where)
        self.broker_up = gauge("wschat_broker_up", "1 while the broker answers, else 0", multiprocess_mode="livemin",
                               **where)
        self.publish_duration = prometheus.Histogram(
            "wschat_publish_duration_seconds", "From a message's acceptance to its hand-over to every local socket",
            buckets=self.BUCKETS, **where)

    @classmethod
    def create(cls) -> Metrics | None:
        """The metrics, or None without prometheus_client (``/metrics`` then answers 404)."""
        try:
            return cls()
        except ImportError:
            return None

    def render(self, broker_up: bool) -> tuple[bytes, str]:
        """The scrape: Prometheus text format, and its content type."""
        self.broker_up.set(1 if broker_up else 0)
        registry = self.registry
        if self.multiprocess:
            from prometheus_client import multiprocess
            registry = self._prometheus.CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        return self._prometheus.generate_latest(registry), self._prometheus.CONTENT_TYPE_LATEST


def _code_label(code: int | None) -> str:
    """A close code as a metric label: the standard ones as they are, application codes by
    range, anything else (or no close frame at all) as 1006."""
    if code is None or not 1000 <= code <= 4999:
        return "1006"
    if code < 1016:
        return str(code)
    return f"{code // 1000}xxx"


class ConnectionState(enum.Enum):
    """Where a Connection is in its life; the ConnectionManager makes every transition."""

    OPEN = "open"
    CLOSING = "closing"
    ENDED = "ended"


_OPEN = ConnectionState.OPEN   # for the per-recipient path: an enum attribute lookup costs ~60 ns


class Connection:
    """One accepted WebSocket: who it is, where it is, its outbound queue and its state.

    Its state (``ConnectionState``) changes only in the ConnectionManager::

        OPEN ──manager.close()──> CLOSING ──socket ends──> ENDED
          └───────────────── socket ends ───────────────────┘

    * OPEN: frames go both ways.
    * CLOSING: wschat decided to close it. The frames already queued go out and then
      the close frame (for a client dropped as too slow: the close frame alone).
      Nothing new is queued and it is no longer a member of its room. The manager's
      give-up timer drops the TCP connection if the socket has not ended
      ``CLOSE_TIMEOUT`` seconds later, because a client that stopped reading never
      lets the close frame out.
    * ENDED: the socket is gone (its reader saw the disconnect, or a send failed).

    ``push`` hands a frame over and returns at once, never waiting for the socket.
    Where the server offers ``ServerSocket.send_nowait`` and the socket can take the
    frame, it is written there and then, as ``websockets.broadcast()`` does. Otherwise
    it joins the connection's queue, and the connection's writer task sends it in order
    when the socket drains; so a socket that stops reading only ever delays itself.
    The writer starts with the first queued frame and then sleeps on a future between
    batches, which is much cheaper than a new task per batch. A queue holding
    ``frame_limit`` (``send_queue``) frames marks a client too slow: the manager drops it.
    """

    __slots__ = ("socket", "client_id", "identity", "room", "view", "credential", "state", "last_seen", "bucket",
                 "frame_limit", "idle_timer", "give_up", "handler", "inbox", "worker", "_manager", "_loop", "_send",
                 "_server", "_send_nowait", "_outbox", "_backlog", "_writer", "_wakeup", "_close_frame")

    def __init__(self, manager: ConnectionManager, socket: ChatSocket, *, client_id: str,
                 room: str | None, view: str, credential: str | None = None, identity: str | None = None) -> None:
        settings = manager.settings
        self.socket = socket
        self.client_id = client_id
        self.identity = identity             # from an identity hook; None when client ids are self-asserted
        self.room = room
        self.view = view
        self.credential = credential
        self.state = ConnectionState.OPEN
        self._manager = manager
        self._loop = manager.loop
        self.last_seen = self._loop.time()
        self.bucket = TokenBucket(settings.rate, manager.rate_burst, self.last_seen)
        self.frame_limit = settings.send_queue
        self.idle_timer: asyncio.TimerHandle | None = None    # the manager's: closes a silent client
        self.give_up: asyncio.TimerHandle | None = None       # the manager's: drops a close that never ends
        self.handler: Callable[[Connection, str], Any] | None = None   # what its frames go to (serve_connection)
        self.inbox: list[dict] | None = None   # frames the server handed over, waiting for the handler
        self.worker: asyncio.Task | None = None   # works through the inbox while it is not empty
        self._send = _message_sender(socket)
        self._server = _server_socket(socket)
        self._send_nowait = self._server.send_nowait if self._server is not None else None
        self._outbox: list[dict] = []
        self._backlog = 0                    # frames queued and not yet handed to the socket
        self._writer: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None   # set while the writer sleeps
        self._close_frame: tuple[int, str, bool] | None = None   # (code, reason, after the queue?)
        if self._server is not None:
            self._server.attach(self)

    def __repr__(self) -> str:
        return f"<Connection {self.client_id!r} room={self.room!r} view={self.view} {self.state.value}>"

    def push(self, frame: str) -> None:
        """Queue one text frame for this client; never waits."""
        self.push_message(text_message(frame))

    def push_message(self, message: dict) -> None:
        """Send or queue one ``websocket.send`` message, possibly shared with other connections."""
        if self.state is not _OPEN:
            return
        if not self._backlog and self._send_nowait is not None and self._send_nowait(message):
            return
        if self._backlog >= self.frame_limit:
            self._manager._overflowed(self)
            return
        self._outbox.append(message)
        self._backlog += 1
        self._wake_writer()

    def send_error(self, reason: str) -> None:
        """An error frame on the room route; a plain ``Error: ...`` line on text routes."""
        self.push(error_frame(reason) if self.view == JSON_VIEW else f"Error: {reason}")

    @property
    def pending(self) -> int:
        """Frames queued and not yet handed to the socket."""
        return self._backlog

    @property
    def writer(self) -> asyncio.Task | None:
        """The task sending this connection's queue, while there is one."""
        return self._writer

    # -- what the server asks (AttachedConnection) ------------------------------

    def ping_received(self) -> float:
        """Protocol PINGs count toward the rate; one over it gets no PONG, and its debt is
        paid before this client is read again, so a ping flood only ever slows itself."""
        if not self.bucket.rate:
            return 0.0
        wait = self.bucket.take_or_owe(self._loop.time())
        if wait:
            self._manager.count_rate_limited()
        return wait

    def overflowed(self) -> None:
        self._manager._overflowed(self)

    def frame_received(self, message: dict) -> None:
        self._manager._frame_pushed(self, message)

    # -- transitions, made by the manager ---------------------------------------

    def _begin_close(self, code: int, reason: str, *, after_queue: bool) -> None:
        self.state = ConnectionState.CLOSING
        if not after_queue:
            self._drop_queue()
        self._close_frame = (code, reason, after_queue)
        self._wake_writer()

    def _end(self) -> None:
        self.state = ConnectionState.ENDED
        self._drop_queue()
        self._wake_writer(start=False)
        # Let go of the server's socket: it points back here (attach), and without this the
        # pair would wait for the cyclic garbage collector instead of going when the socket does.
        self._server = self._send_nowait = None

    def _abort(self) -> None:
        """Drop the TCP connection without a closing handshake, where the server allows it."""
        if self._server is not None:
            self._server.abort()
        if self._writer is not None:
            self._writer.cancel()

    # -- the writer ----------------------------------------------------------------

    def _drop_queue(self) -> None:
        self._outbox = []
        self._backlog = 0

    @property
    def _queue_dropped(self) -> bool:
        return self.state is ConnectionState.ENDED or (self._close_frame is not None and not self._close_frame[2])

    def _wake_writer(self, *, start: bool = True) -> None:
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            wakeup.set_result(None)
        elif start and self._writer is None:
            self._writer = self._loop.create_task(self._write())

    async def _write(self) -> None:
        send = self._send
        try:
            while True:
                while self._outbox:
                    batch, self._outbox = self._outbox, []
                    for message in batch:
                        if self._queue_dropped:
                            break
                        await send(message)
                        if not self._queue_dropped:   # else the queue was emptied meanwhile
                            self._backlog -= 1
                if self.state is ConnectionState.CLOSING and self._close_frame is not None:
                    code, reason, _ = self._close_frame
                    self._close_frame = (code, reason, False)   # sent at most once
                    await self.socket.close(code, reason)
                    return
                if self.state is not ConnectionState.OPEN:
                    return
                self._wakeup = self._loop.create_future()
                await self._wakeup
        except Exception as exc:  # the peer vanished mid-send
            self._manager._send_failed(self, exc)
        finally:
            self._writer = self._wakeup = None


class MemberPhase(enum.Enum):
    """How far a room-protocol connection is into its room (see ``Room``)."""

    SYNCING = "syncing"
    CATCHING_UP = "catching up"
    LIVE = "live"


class Room:
    """This process's members of one room, and the one rule that fans a frame out to them.

    A room-protocol connection goes through three phases (``MemberPhase``)::

        add() ──> SYNCING ──welcome()──> CATCHING_UP ──first newer message──> LIVE
                                    └──────────────────────────────────────> LIVE

    * SYNCING: it is in the room; its welcome and history are being read. Whatever is
      delivered meanwhile is held for it and sent after its replay.
    * CATCHING_UP: its replay reached an id that the broker has not delivered here yet
      (Redis pub/sub runs a little behind its history): messages up to that id are skipped.
    * LIVE: it gets every frame as it is delivered.

    The lobby's text view is always live. Every path that sends to members (messages,
    direct messages, presence, ``broadcast``) goes through ``fan_out`` or ``send_to``,
    so nobody hears anything before its welcome, and nothing twice.

    ``epoch`` and ``last_id`` are the sequence delivered here; a message from another
    epoch, or not above ``last_id``, means the sequence started again.
    """

    __slots__ = ("name", "subscribed", "live", "text_view", "syncing", "catching_up", "clients", "announced",
                 "epoch", "last_id", "presence_pending", "presence_timer")

    def __init__(self, name: str, subscribed: asyncio.Future) -> None:
        self.name = name
        self.subscribed = subscribed                  # the broker's subscription, shared by entrants
        self.live: dict[Connection, None] = {}        # room-protocol connections in phase LIVE
        self.syncing: dict[Connection, list[tuple[int | None, dict]]] = {}   # SYNCING: what came meanwhile
        self.catching_up: dict[Connection, int] = {}  # CATCHING_UP: the id its replay reached
        self.text_view: dict[Connection, None] = {}   # the lobby's text view
        self.clients: dict[str, list[Connection]] = {}
        self.announced: set[str] = set()              # client ids announced to the broker from here
        self.epoch: str | None = None
        self.last_id = 0
        self.presence_pending: dict[str, bool] = {}   # presence not yet announced: id -> joined
        self.presence_timer: asyncio.TimerHandle | None = None

    # -- membership ----------------------------------------------------------

    def add(self, conn: Connection) -> None:
        """A new member: SYNCING on the room protocol, live on the text view."""
        self.clients.setdefault(conn.client_id, []).append(conn)
        if conn.view == TEXT_VIEW:
            self.text_view[conn] = None
        else:
            self.syncing[conn] = []

    def holds(self, conn: Connection) -> bool:
        return conn in self.clients.get(conn.client_id, ())

    def phase(self, conn: Connection) -> MemberPhase | None:
        if conn in self.syncing:
            return MemberPhase.SYNCING
        if conn in self.catching_up:
            return MemberPhase.CATCHING_UP
        if conn in self.live or conn in self.text_view:
            return MemberPhase.LIVE
        return None

    def welcome(self, conn: Connection, epoch: str, last_id: int) -> list[dict] | None:
        """SYNCING -> CATCHING_UP or LIVE, for a connection whose replay ends at ``last_id``.
        Returns what was held for it that the replay did not include (None: it left meanwhile)."""
        held = self.syncing.pop(conn, None)
        if held is None:
            return None
        if self.epoch is None:
            self.epoch = epoch   # so that a restarted sequence is noticed even before a delivery here
        if last_id > self.last_id:
            self.catching_up[conn] = last_id
        else:
            self.live[conn] = None
        return [message for message_id, message in held if message_id is None or message_id > last_id]

    def remove(self, conn: Connection) -> bool:
        """Forget a member; True when its client id has no connection left here."""
        self.live.pop(conn, None)
        self.text_view.pop(conn, None)
        self.syncing.pop(conn, None)
        self.catching_up.pop(conn, None)
        clients = self.clients[conn.client_id]
        clients.remove(conn)
        if clients:
            return False
        del self.clients[conn.client_id]
        return True

    def protocol_members(self) -> list[Connection]:
        """Room-protocol connections in every phase."""
        return [*self.live, *self.syncing, *self.catching_up]

    def continues(self, epoch: str, message_id: int) -> bool:
        """Whether a delivered message continues the sequence delivered here so far."""
        return (self.epoch is None or epoch == self.epoch) and message_id > self.last_id

    # -- the fan-out rule ------------------------------------------------------

    def fan_out(self, shared: dict, message_id: int | None = None) -> int:
        """Hand one shared message to every room-protocol member, by phase: LIVE ones get it
        now, CATCHING_UP ones once it is past their replay (and are LIVE from then on),
        SYNCING ones have it held for after their welcome. Returns how many got it now."""
        live = self.live
        recipients = tuple(live)   # a member dropped mid-loop leaves the room at once
        for conn in recipients:
            conn.push_message(shared)
        delivered = len(recipients)
        if self.catching_up:
            for conn, replayed in tuple(self.catching_up.items()):
                if message_id is None or message_id > replayed:
                    if message_id is not None:
                        del self.catching_up[conn]
                        live[conn] = None
                    conn.push_message(shared)
                    delivered += 1
        if self.syncing:
            for conn, held in tuple(self.syncing.items()):
                if len(held) >= conn.frame_limit:
                    conn.overflowed()   # a join that takes this long holds no more than a slow client
                else:
                    held.append((message_id, shared))
        return delivered

    def send_to(self, conn: Connection, shared: dict) -> None:
        """The fan-out rule for one room-protocol recipient (a direct message)."""
        held = self.syncing.get(conn)
        if held is None:
            conn.push_message(shared)
        elif len(held) >= conn.frame_limit:
            conn.overflowed()
        else:
            held.append((None, shared))


class ConnectionManager:
    """Rooms, members and fan-out for one app; reached by host code as ``app.state.chat``.

    Fan-out policy, in the spirit of ``websockets.broadcast()``: delivering a message is
    a synchronous loop that hands one shared, already-encoded frame to each recipient's
    connection and never waits for any socket (see ``Connection.push``). There is no
    backpressure on the sender: what bounds memory is each connection's ``send_queue``.
    A client whose queue already holds ``send_queue`` frames is too slow to keep up: it
    alone is closed with 1013 (its queue discarded) and counted in
    ``slow_clients_dropped``; everyone else carries on. This holds however many messages
    are published within one event-loop tick: the bound is counted in frames, per client.
    A client that vanishes mid-send is cleaned up once, quietly.

    The manager owns every connection's state (``ConnectionState``) and timers (idle
    timeout, close give-up), and each room's membership (``Room``). It is the
    ``BrokerListener`` of its broker.

    The seed tutorial's names are kept: ``connect``, ``disconnect``,
    ``send_personal_message``, ``broadcast`` and ``active_connections``.
    """

    def __init__(self, settings: Settings | None = None, *, broker: Broker | None = None,
                 hooks: Hooks | None = None) -> None:
        self.settings = settings or Settings()
        self.hooks = hooks or Hooks()
        self.broker: Broker = broker or broker_from_url(self.settings.broker, history=self.settings.history,
                                                        max_rooms=self.settings.max_rooms, retain=self.settings.retain)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self.rate_burst = self.settings.rate_burst   # read for every new connection
        self.post_limiter = RateLimiter(self.settings.rate, self.rate_burst)
        self._connections: dict[ChatSocket, Connection] = {}   # every connection not yet ENDED
        self._rooms: dict[str, Room] = {}
        self._notifications: set[asyncio.Task] = set()          # async notification hooks running
        self.metrics = Metrics.create()
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self.messages_in = 0
        self.messages_out = 0
        self.slow_clients_dropped = 0

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Start the broker; done lazily on first use, because a mounted app gets no lifespan."""
        if self._started:
            return
        self._start_lock = self._start_lock or asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self.loop = asyncio.get_running_loop()
            await self.broker.start(self)
            self._started = True

    async def stop(self, grace: float = 3.0) -> None:
        """Close every connection with 1001 and stop the broker."""
        if not self._started:
            return
        for conn in list(self._connections.values()):
            self.close(conn, WS_1001_GOING_AWAY, "server shutting down")
        writers = [conn.writer for conn in self._connections.values() if conn.writer is not None]
        if writers or self._notifications:   # close frames go out, hooks finish; nobody is waited for long
            await asyncio.wait([*writers, *self._notifications], timeout=grace)
        await self.broker.stop()
        self._started = False

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # -- connections ---------------------------------------------------------

    @property
    def active_connections(self) -> list[ChatSocket]:
        """Every socket currently connected to this app and open, as in the tutorial."""
        return [socket for socket, conn in self._connections.items() if conn.state is ConnectionState.OPEN]

    def new_guest_id(self) -> str:
        while True:
            guest = f"guest-{secrets.token_hex(4)}"
            if not any(guest in room.clients for room in self._rooms.values()):
                return guest

    def _held_connections(self, websocket: ChatSocket) -> int:
        """Connections counted toward ``max_connections``: every one not yet ended, and, where
        the server can tell, every TCP connection it holds (closing ones, half-received requests)."""
        held = len(self._connections)
        server = _server_socket(websocket)
        if server is not None:
            held = max(held, server.open_connections() - 1)   # not counting the one asking
        return held

    async def connect(self, websocket: ChatSocket, *, client_id: str | None = None, room: str | None = None,
                      view: str | None = None, since: int | None = None, epoch: str | None = None,
                      credential: str | None = None, identity: str | None = None) -> Connection | None:
        """Accept a socket and, with ``room``, join it: the room protocol by default,
        the lobby text view with ``view=TEXT_VIEW``. Returns None when the server is
        full (the socket was closed with 1013). Authorization is the caller's: the routes
        ask ``allowed(identity, "join", room)`` before they accept."""
        await self.start()
        if self._held_connections(websocket) >= self.settings.max_connections:
            await websocket.accept()
            await websocket.close(WS_1013_TRY_AGAIN_LATER, "too many connections, try again later")
            return None
        await websocket.accept()
        view = view or (JSON_VIEW if room is not None else PLAIN_VIEW)
        conn = Connection(self, websocket, client_id=client_id or self.new_guest_id(), room=room,
                          view=view, credential=credential, identity=identity)
        self._connections[websocket] = conn
        if self.metrics is not None:
            self.metrics.accepted.inc()
            self.metrics.connections.inc()
        self._watch_idle(conn)
        if room is not None:
            try:
                await self._enter(conn, since, epoch)
            except (BrokerUnavailable, RoomLimitReached) as exc:
                self.close(conn, WS_1013_TRY_AGAIN_LATER, _close_reason(exc))
            except Exception:
                logger.exception("could not join %r to room %r", conn.client_id, room)
                self.close(conn, WS_1011_INTERNAL_ERROR, "internal error")
            except BaseException:
                self.release(conn)
                raise
        return conn

    def close(self, conn: Connection, code: int = WS_1000_NORMAL_CLOSURE, reason: str = "", *,
              drop_queue: bool = False) -> None:
        """Close one connection: OPEN -> CLOSING. The frames already queued go out first
        (none with ``drop_queue``), then the close frame. It leaves its room now. If its
        socket has not ended ``CLOSE_TIMEOUT`` seconds later, the TCP connection is dropped."""
        if conn.state is not ConnectionState.OPEN:
            return
        conn._begin_close(code, reason, after_queue=not drop_queue)
        self._leave(conn)
        conn.give_up = self.loop.call_later(CLOSE_TIMEOUT, self._give_up, conn)

    def disconnect(self, target: Connection | ChatSocket) -> None:
        """Close a connection (1000) and forget it: it leaves its room and ``active_connections``
        at once. Safe to call twice, and on a socket that has already ended."""
        conn = target if isinstance(target, Connection) else self._connections.get(target)
        if conn is not None:
            self.close(conn, WS_1000_NORMAL_CLOSURE, "disconnected by the server")

    def release(self, conn: Connection, code: int | None = None) -> None:
        """The socket has ended (-> ENDED, with close ``code`` when one was seen): forget the
        connection, leave its room, stop its timers."""
        if conn.state is ConnectionState.ENDED:
            return
        if self.metrics is not None:
            self.metrics.connections.dec()
            self.metrics.disconnects.labels(code=_code_label(code)).inc()
        self._connections.pop(conn.socket, None)
        self._leave(conn)
        conn._end()
        for timer in (conn.idle_timer, conn.give_up):
            if timer is not None:
                timer.cancel()
        conn.idle_timer = conn.give_up = None

    async def frames(self, conn: Connection) -> AsyncIterator[str]:
        """The text frames a client sends, once they pass the limits of SPEC section 7.

        Binary frames close with 1003, frames over ``max_message_size`` with 1009; a
        client over its rate gets an error frame instead of delivery. Once wschat has
        decided to close a client this keeps reading (and ignoring) until the socket
        ends, so the close frame goes out before the handler returns. Frames a peer sent
        just before it left are still delivered, even if a send to it already failed.
        When the socket ends, the connection is released.
        """
        # The server's own receive where the route recorded it: Starlette's wrapper would be one
        # more frame held by every open socket, for state this loop does not need.
        receive = getattr(conn.socket, "scope", {}).get(RAW_RECEIVE) or conn.socket.receive
        server = conn._server if conn.handler is not None else None
        while True:
            if server is not None and server.take_frames():
                server = None   # frames now come through _frame_pushed; the queue brings the disconnect
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.release(conn, message.get("code"))
                return
            text = self._screen_frame(conn, message)
            if text is not None:
                yield text

    async def serve_connection(self, conn: Connection, handle: Callable[[Connection, str], Any]) -> None:
        """Feed every accepted frame of ``conn`` to ``handle`` (plain or async), in order, until
        its socket ends (then it is released).

        Where the server offers ``ServerSocket.take_frames``, frames are handed over as they
        arrive and worked through by a short task, and an idle connection waits on nothing
        but its disconnect. Reading each frame with ``await receive()`` instead left, for
        every connection, a chain of awaitables alive from one message to the next: at
        10,000 connections, ~100,000 young objects, and garbage-collector pauses of ~100 ms.
        """
        conn.handler = handle
        async for frame in self.frames(conn):
            result = handle(conn, frame)
            if result is not None:
                await result

    def _screen_frame(self, conn: Connection, message: dict) -> str | None:
        """The limits of SPEC section 7 for one received frame: its text, or None when refused."""
        if conn.state is ConnectionState.CLOSING:
            return None
        now = conn.last_seen = self.loop.time()
        self.messages_in += 1
        if self.metrics is not None:
            self.metrics.received.inc()
        text = message.get("text")
        limit, rate = self.settings.max_message_size, self.settings.rate
        if text is None:
            self.close(conn, WS_1003_UNSUPPORTED_DATA, "binary frames are not supported", drop_queue=True)
        elif len(text) > limit // 4 and utf8_length(text) > limit:
            self.close(conn, WS_1009_MESSAGE_TOO_BIG, f"message larger than {limit} bytes", drop_queue=True)
        elif rate and not conn.bucket.take(now):
            self.count_rate_limited()
            conn.send_error(f"rate limit exceeded: at most {rate:g} messages per second; not delivered")
        else:
            return text
        return None

    def _frame_pushed(self, conn: Connection, message: dict) -> None:
        # Screened when its turn comes, as a pulled frame is: errors and deliveries keep their order.
        if conn.inbox is None:
            conn.inbox = []
        conn.inbox.append(message)
        if len(conn.inbox) == INBOX_LIMIT and conn._server is not None:
            conn._server.pause_reading()   # a client faster than its handler waits in its own socket
        if conn.worker is None:
            conn.worker = self.loop.create_task(self._work_through(conn))

    async def _work_through(self, conn: Connection) -> None:
        try:
            while conn.inbox:
                batch, conn.inbox = conn.inbox, None
                if len(batch) >= INBOX_LIMIT and conn._server is not None:
                    conn._server.resume_reading()
                for message in batch:
                    text = self._screen_frame(conn, message)
                    result = conn.handler(conn, text) if text is not None else None  # type: ignore[misc]
                    if result is not None:
                        await result
        except Exception:
            logger.exception("handling a frame from %r failed", conn.client_id)
            self.close(conn, WS_1011_INTERNAL_ERROR, "internal error")
        finally:
            conn.worker = None

    def _watch_idle(self, conn: Connection, delay: float | None = None) -> None:
        # One timer per connection, re-armed lazily: receiving a frame costs nothing.
        if self.settings.timeout:
            conn.idle_timer = self.loop.call_later(delay or self.settings.timeout, self._check_idle, conn)

    def _check_idle(self, conn: Connection) -> None:
        conn.idle_timer = None
        idle = self.loop.time() - conn.last_seen
        if idle >= self.settings.timeout:
            self.close(conn, WS_1000_NORMAL_CLOSURE, "Session timeout")
        elif conn.state is ConnectionState.OPEN:
            self._watch_idle(conn, self.settings.timeout - idle)

    def _give_up(self, conn: Connection) -> None:
        conn.give_up = None
        if conn.state is ConnectionState.CLOSING:
            logger.info("closing %r took over %g s; dropping the connection", conn.client_id, CLOSE_TIMEOUT)
            conn._abort()
            self.release(conn)

    def _overflowed(self, conn: Connection) -> None:
        if conn.state is not ConnectionState.OPEN:
            return
        self.slow_clients_dropped += 1
        if self.metrics is not None:
            self.metrics.slow_dropped.inc()
        logger.info("dropping slow client %r: %d frames queued", conn.client_id, conn.pending)
        self.close(conn, WS_1013_TRY_AGAIN_LATER, "too slow: send queue full", drop_queue=True)

    def _count_delivered(self, count: int) -> None:
        self.messages_out += count
        if self.metrics is not None:
            self.metrics.delivered.inc(count)

    def count_rate_limited(self) -> None:
        """A message, ping or POST refused for going over ``rate``."""
        if self.metrics is not None:
            self.metrics.rate_limited.inc()

    def _send_failed(self, conn: Connection, exc: Exception) -> None:
        logger.debug("send to %r failed: %s", conn, exc.__class__.__name__)
        self.release(conn)

    # -- rooms ---------------------------------------------------------------

    async def _enter(self, conn: Connection, since: int | None, epoch: str | None) -> None:
        name = conn.room
        assert name is not None
        room = self._rooms.get(name)
        if room is None:
            # Subscribe before reading history, so no message falls between the two.
            room = self._rooms[name] = Room(name, asyncio.ensure_future(self.broker.subscribe(name)))
        room.add(conn)
        try:
            if room.subscribed.done():   # as for everyone after the room's first member
                room.subscribed.result()
            else:
                await asyncio.shield(room.subscribed)
            if conn.client_id not in room.announced and room.holds(conn):
                room.announced.add(conn.client_id)
                self.broker.join(name, conn.client_id)
                self._notify(self.hooks.on_join, name, conn.client_id)
            if conn.view == JSON_VIEW:
                await self._welcome(room, conn, since, epoch)
        except BaseException:
            self._leave(conn)
            raise

    async def _welcome(self, room: Room, conn: Connection, since: int | None, epoch: str | None) -> None:
        """Welcome, then the replay, then whatever arrived meanwhile: in id order, once each."""
        current_epoch, last_id, retained = await self.broker.history(room.name)
        members, count = await self.broker.roster(room.name, MAX_LISTED_MEMBERS)
        if conn.state is not ConnectionState.OPEN:
            return
        held = room.welcome(conn, current_epoch, last_id)
        if held is None:
            return
        replay, recovered = plan_replay(retained, last_id, since, epoch in (None, current_epoch))
        welcome = {"type": "welcome", "room": room.name, "client_id": conn.client_id, "members": members,
                   "count": count, "last_id": last_id, "epoch": current_epoch, "timeout": self.settings.timeout}
        if recovered is not None:
            welcome["recovered"] = recovered
            if self.metrics is not None:
                self.metrics.resumes.labels(recovered="true" if recovered else "false").inc()
        conn.push(encode(welcome))
        for _, frame in replay:
            conn.push(frame)
        for message in held:
            conn.push_message(message)

    def _leave(self, conn: Connection) -> None:
        room = self._rooms.get(conn.room) if conn.room is not None else None
        if room is None or not room.holds(conn):
            return
        if room.remove(conn) and conn.client_id in room.announced:
            room.announced.discard(conn.client_id)
            self.broker.leave(room.name, conn.client_id)
            self._notify(self.hooks.on_leave, room.name, conn.client_id)
        if not room.clients:
            if room.presence_timer is not None:
                room.presence_timer.cancel()
            del self._rooms[room.name]
            # Once the subscription settles, even if it failed half way; the broker keeps it
            # when somebody has come back to the room meanwhile.
            room.subscribed.add_done_callback(lambda _: self.broker.unsubscribe(room.name))

    # -- the broker's callbacks (BrokerListener) -------------------------------

    def local_members(self) -> dict[str, list[str]]:
        """Client ids this process has announced, per room (the Redis broker's heartbeat)."""
        return {name: list(room.announced) for name, room in self._rooms.items() if room.announced}

    def has_room(self, name: str) -> bool:
        """Whether this process has anyone in ``name``."""
        return name in self._rooms

    def resync(self, room_name: str) -> None:
        """The broker may have missed messages: room-protocol clients reconnect with ``since`` (1012)."""
        room = self._rooms.get(room_name)
        if room is not None:
            for conn in room.protocol_members():
                self.close(conn, WS_1012_SERVICE_RESTART, "broker reconnected; reconnect with since to resume")

    def deliver(self, room_name: str, message: dict, frame: str, epoch: str) -> None:
        """Fan one stored message out to this process's members of its room."""
        room = self._rooms.get(room_name)
        if room is None:
            return
        message_id = message["id"]
        if not room.continues(epoch, message_id):
            # The sequence started again (a flushed Redis): ids from before mean nothing now,
            # so every room-protocol member, whatever its phase, resumes with since.
            self.resync(room_name)
        room.epoch, room.last_id = epoch, message_id
        delivered = room.fan_out(text_message(frame), message_id)
        if room.text_view:
            delivered += self._deliver_text(room, message)
        self._count_delivered(delivered)
        if self.metrics is not None:
            self.metrics.publish_duration.observe(max(0.0, time.time() - message["ts"]))

    def _deliver_text(self, room: Room, message: dict) -> int:
        sender, text = message["from"], message["text"]
        own = text_message(f"You wrote: {text}")
        others = text_message(f"Client #{sender} says: {text}")
        for conn in tuple(room.text_view):
            conn.push_message(own if conn.client_id == sender else others)
        return len(room.text_view)

    def deliver_direct(self, room_name: str | None, message: dict) -> None:
        """A direct message: to the recipient's and the sender's connections only."""
        if room_name is None:   # sent without a room: wherever the recipient is connected
            rooms = list(self._rooms.values())
        else:
            rooms = [self._rooms[room_name]] if room_name in self._rooms else []
        sender, recipient, text = message["from"], message["to"], message["text"]
        # A copy for the sender goes to its own connections; host code has none, whatever a
        # client calls itself (a client named "server" must not read the host's messages).
        targets = (recipient,) if message.get("system") else tuple(dict.fromkeys((recipient, sender)))
        for room in rooms:
            shared = text_message(encode({**message, "room": room.name}))
            for client_id in targets:
                for conn in tuple(room.clients.get(client_id, ())):
                    if conn.view == TEXT_VIEW:
                        conn.push(f"You wrote: {text}" if client_id == sender
                                  else f"Client #{sender} says to you: {text}")
                    else:
                        room.send_to(conn, shared)
                    self._count_delivered(1)

    def presence_changed(self, room_name: str, client_id: str, joined: bool) -> None:
        """A client id joined or left a room anywhere: tell the text view now, the JSON view coalesced."""
        room = self._rooms.get(room_name)
        if room is None:
            return
        if room.text_view:
            line = text_message(f"Client #{client_id} {'joined' if joined else 'left'} the chat")
            for conn in tuple(room.text_view):
                if conn.client_id != client_id:
                    conn.push_message(line)
        if room.presence_pending.get(client_id) is (not joined):
            del room.presence_pending[client_id]   # joined and left again within one interval: no news
        else:
            room.presence_pending[client_id] = joined
        if room.presence_timer is None:
            # Big rooms hear about presence less often, so a connect storm into a room
            # of thousands costs each member a few frames, not one every interval.
            delay = max(self.settings.presence_interval, len(room.live) / PRESENCE_FRAMES_PER_SECOND)
            room.presence_timer = self.loop.call_later(delay, self._flush_presence, room)

    def _flush_presence(self, room: Room) -> None:
        # At most one presence frame per room per interval, shared by every member, so
        # a join storm costs each member a few frames rather than one per joiner.
        room.presence_timer = None
        changes, room.presence_pending = room.presence_pending, {}
        joined = [client_id for client_id, came in changes.items() if came]
        left = [client_id for client_id, came in changes.items() if not came]
        if joined or left:
            frame = presence_frame(room.name, joined, left, self.broker.count(room.name))
            room.fan_out(text_message(frame))

    def kicked(self, client_id: str, room: str | None, code: int, reason: str) -> int:
        """Close ``client_id``'s connections here (in ``room``, or all); how many were closed."""
        found = [conn for conn in self._connections.values() if conn.client_id == client_id
                 and conn.state is ConnectionState.OPEN and (room is None or conn.room == room)]
        for conn in found:
            self.close(conn, code, reason)
        return len(found)

    def deleted(self, room_name: str, message_id: int) -> None:
        """A retained message was deleted: room-protocol members are told to drop it."""
        room = self._rooms.get(room_name)
        if room is not None:
            self._count_delivered(room.fan_out(text_message(deleted_frame(room_name, message_id))))

    # -- hooks -----------------------------------------------------------------

    async def allowed(self, identity: str | None, action: str, room: str | None) -> bool:
        """The ``authorize`` hook's answer (True without one). A hook that raises refuses:
        fail closed, logged once with its traceback."""
        hook = self.hooks.authorize
        if hook is None:
            return True
        try:
            return bool(await _result_of(hook(identity, action, room)))
        except Exception:
            logger.exception("authorize hook %s raised for (%r, %r, %r); refused",
                             _hook_name(hook), identity, action, room)
            return False

    async def _screen(self, draft: Draft) -> str:
        """The ``on_message`` hook: the text to store and deliver, or Reject."""
        hook = self.hooks.on_message
        if hook is None:
            return draft.text
        try:
            result = await _result_of(hook(draft))
        except Reject:
            raise
        except Exception:
            logger.exception("on_message hook %s raised; message refused", _hook_name(hook))
            raise Reject("message refused") from None
        if result is None:
            return draft.text
        try:
            text = checked_text(result)
        except ProtocolError as exc:
            logger.error("on_message hook %s returned an unusable text (%s); message refused", _hook_name(hook), exc)
            raise Reject("message refused") from None
        limit = self.settings.max_message_size
        if utf8_length(text) > limit:
            raise Reject(f"message larger than {limit} bytes once rewritten")
        return text

    def _notify(self, hook: Callable | None, *args: Any) -> None:
        """Run a notification hook (on_published, on_join, on_leave) in the background: after
        what it reports, never delaying it. What it raises is logged, never raised into the chat."""
        if hook is not None:
            self.loop.call_soon(self._run_notification, hook, args)

    def _run_notification(self, hook: Callable, args: tuple) -> None:
        try:
            result = hook(*args)
        except Exception:
            logger.exception("hook %s raised", _hook_name(hook))
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._notifications.add(task)
            task.add_done_callback(functools.partial(self._notification_done, _hook_name(hook)))

    def _notification_done(self, name: str, task: asyncio.Task) -> None:
        self._notifications.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("hook %s raised", name, exc_info=task.exception())

    # -- client messages: one path for the room route, the lobby and POST -------

    async def submit(self, draft: Draft, identity: str | None, *, system: bool = False,
                     authorized: bool = False) -> dict | None:
        """A message a client sent, after the size, rate and validation checks: authorize
        ``"post"``, ``on_message``, then stored and delivered (a direct message: delivered
        to its recipient and its sender). Returns the stored message (None for a direct
        one). Raises Reject (NotAllowed when authorize says no), BrokerUnavailable,
        RoomLimitReached. What is stored is exactly what is delivered. ``authorized``: the
        caller has asked authorize already (POST does, before it reads the body)."""
        if not authorized and not await self.allowed(identity, "post", draft.room):
            raise NotAllowed(f"not allowed to post in room {draft.room!r}")
        if draft.to is not None and not await self.broker.is_member(draft.room, draft.to):
            raise Reject(f"no member {draft.to!r} in room {draft.room!r}")
        text = await self._screen(draft)
        if draft.to is None:
            return await self._store(draft.room, draft.sender, text, system=system)
        await self.broker.direct(draft.room, message_event(draft.room, None, draft.sender, text, to=draft.to))
        return None

    async def _store(self, room: str, sender: str, text: str, *, system: bool) -> dict:
        message, epoch = await self.broker.publish(room, sender, text, system=system)
        self._notify(self.hooks.on_published, {**message, "epoch": epoch})
        return message

    async def _submit_from(self, conn: Connection, draft: Draft) -> None:
        try:
            await self.submit(draft, conn.identity)
        except Reject as exc:
            conn.send_error(exc.reason)
        except (BrokerUnavailable, RoomLimitReached) as exc:
            conn.send_error(f"not delivered: {_close_reason(exc)}")

    # -- the room protocol ---------------------------------------------------

    async def handle_frame(self, conn: Connection, frame: str) -> None:
        """Act on one room-route frame: a message, a direct message or a ping."""
        try:
            command = parse_client_frame(frame)
        except ProtocolError as exc:
            conn.send_error(str(exc))
            return
        if command.kind == "ping":
            conn.push(PONG_FRAME)
            return
        await self._submit_from(conn, Draft(conn.room, conn.client_id, command.text, command.to,  # type: ignore[arg-type]
                                            "ws"))

    async def handle_text(self, conn: Connection, text: str) -> None:
        """Act on one lobby text-view frame: the whole frame is the message."""
        try:
            text = checked_text(text)
        except ProtocolError as exc:
            conn.send_error(str(exc))
            return
        await self._submit_from(conn, Draft(conn.room, conn.client_id, text, None, "lobby"))  # type: ignore[arg-type]

    # -- host API --------------------------------------------------------------

    async def publish(self, room: str, text: str, *, sender: str = "server") -> dict:
        """Publish a message to a room as ``sender``: stored, numbered, delivered to every member,
        marked ``"system": true`` (host code, not a client: no authorize, no on_message).

        Raises ValueError for a bad room name, sender or text, BrokerUnavailable when
        the broker cannot be reached, RoomLimitReached when it would create a room over
        ``max_rooms``. Returns the stored message."""
        _check_room(room)
        if not valid_client_id(sender):
            raise ValueError(f"sender must be 1-64 characters without control characters, got {sender!r}")
        try:
            text = checked_text(text)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        if utf8_length(text) > self.settings.max_message_size:
            raise ValueError(f"text is larger than max_message_size ({self.settings.max_message_size} bytes)")
        await self.start()
        return await self._store(room, sender, text, system=True)

    async def send_personal_message(self, message: str, to: ChatSocket | Connection | str, *,
                                    room: str | None = None, sender: str = "server") -> None:
        """Send ``message`` to one client.

        ``to`` a socket or Connection: the text goes to it as is (the tutorial's use).
        ``to`` a client id: a direct message frame (``"system": true``) to that client's
        connections only, in ``room`` or, without it, in every room where it is connected.
        """
        if isinstance(to, str):
            if room is not None:
                _check_room(room)
            await self.start()
            await self.broker.direct(room, message_event(room or "", None, sender, checked_text(message), to=to,
                                                         system=True))
            return
        conn = to if isinstance(to, Connection) else self._connections.get(to)
        if conn is None:
            raise LookupError("that socket is not connected to this manager")
        conn.push(message)

    async def broadcast(self, message: str, *, room: str | None = None) -> int:
        """Send ``message`` as is to every connection (of ``room``) in this process.

        Like the tutorial's broadcast, without its flaw: nothing here waits for a socket,
        and a client still joining gets it after its welcome. For chat messages with ids
        and history use ``publish``. Returns the number of connections reached."""
        shared = text_message(message)
        if room is None:
            rooms = list(self._rooms.values())
            roomless = [conn for conn in self._connections.values() if conn.room is None]
        else:
            rooms = [self._rooms[room]] if room in self._rooms else []
            roomless = []
        reached = len(roomless)
        for conn in roomless:
            conn.push_message(shared)
        for found in rooms:
            reached += found.fan_out(shared) + len(found.text_view)
            for conn in tuple(found.text_view):
                conn.push_message(shared)
        self._count_delivered(reached)
        return reached

    async def kick(self, client_id: str, *, room: str | None = None, code: int = 4003, reason: str = "removed") -> int:
        """Close ``client_id``'s connections, in ``room`` or everywhere, on every process with a
        broker; returns how many this process closed. The page does not reconnect after a
        close code 4000-4999. To keep the client out, let ``authorize`` refuse it too."""
        _require(code == 1000 or 3000 <= code <= 4999, "code", code, "1000 or 3000-4999")
        if room is not None:
            _check_room(room)
        await self.start()
        closed = self.kicked(client_id, room, code, reason)
        await self.broker.kick(client_id, room, code, reason)
        return closed

    async def delete_message(self, room: str, message_id: int) -> bool:
        """Remove a message from the retained history (every process's, with a broker) and tell
        the room's members (``{"type": "deleted", "room", "id"}``). False when no such message
        is retained. A client that was away keeps its copy."""
        _check_room(room)
        await self.start()
        return await self.broker.delete(room, message_id)

    async def members(self, room: str) -> list[str]:
        """Every client id connected to ``room`` (on any process, with a shared broker)."""
        _check_room(room)
        await self.start()
        return await self.broker.members(room)

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None) -> list[dict]:
        """Retained messages of ``room`` with id > ``since``, oldest first, at most ``limit``."""
        return (await self.history_page(room, since=since, limit=limit))["messages"]

    async def history_page(self, room: str, *, since: int | None = None, limit: int | None = None,
                           before: int | None = None) -> dict:
        """A page of ``room``'s history, oldest first: after ``since`` (at most ``limit``), or the
        latest ``limit`` (default ``history``) kept before ``before``, reaching as far back as
        the broker keeps (SQLite: ``retain``)."""
        _check_room(room)
        await self.start()
        epoch, last_id, retained = await self.broker.history(room)
        if before is not None:
            messages = await self.broker.page(room, before, limit or self.settings.history or 100)
        else:
            messages = [json.loads(frame) for message_id, frame in retained if since is None or message_id > since]
            messages = messages[:limit]
        return {"room": room, "epoch": epoch, "last_id": last_id, "messages": messages}

    async def rooms(self) -> dict[str, int]:
        """Rooms with at least one member, and how many members each has."""
        await self.start()
        return await self.broker.rooms()

    def stats(self) -> dict:
        healthy, reason = self.broker.health()
        return {"connections": len(self._connections), "rooms": len(self._rooms),
                "messages_in": self.messages_in, "messages_out": self.messages_out,
                "slow_clients_dropped": self.slow_clients_dropped,
                "broker": {"url": mask_url(self.broker.url), "ok": healthy, "status": reason}}

    def health(self) -> tuple[bool, str]:
        return self.broker.health()


def _check_room(room: str) -> None:
    if not valid_room(room):
        raise ValueError(f"room must be 1-64 of A-Z a-z 0-9 _ . -, got {room!r}")


def _close_reason(exc: BaseException) -> str:
    """A reason for a close frame or error frame (close reasons are limited to 123 bytes)."""
    text = f"broker unavailable: {exc}" if isinstance(exc, BrokerUnavailable) else str(exc)
    return text[:120]


# ---------------------------------------------------------------------------
# Brokers: where ids, history and presence live
# ---------------------------------------------------------------------------

class BrokerListener(Protocol):
    """Every call a broker makes into its manager (the ConnectionManager).

    The delivery callbacks come for every event, this process's own included, and may
    come before or after the broker call that caused them returns: the memory broker
    calls ``deliver`` inside ``publish``; the Redis broker calls it from its listener
    task, usually a little after ``publish`` returns.
    """

    def deliver(self, room: str, message: dict, frame: str, epoch: str) -> None:
        """A stored message (``frame`` is its encoding) of the sequence ``epoch``."""

    def deliver_direct(self, room: str | None, message: dict) -> None:
        """A direct message, in ``room`` or (None) wherever its recipient is."""

    def presence_changed(self, room: str, client_id: str, joined: bool) -> None:
        """A client id gained its first or lost its last connection to ``room``, on any process."""

    def resync(self, room: str) -> None:
        """Deliveries for ``room`` may have been missed (the broker reconnected)."""

    def kicked(self, client_id: str, room: str | None, code: int, reason: str) -> int:
        """Another process's ``kick``: close ``client_id``'s connections here."""

    def deleted(self, room: str, message_id: int) -> None:
        """A retained message of ``room`` was deleted, on any process."""

    def local_members(self) -> dict[str, list[str]]:
        """Client ids this process has in each room (for the broker's heartbeat)."""

    def has_room(self, room: str) -> bool:
        """Whether this process still has anyone in ``room``."""


class Broker(Protocol):
    """What the manager needs from a broker; see ``BrokerListener`` for the other direction."""

    url: str

    async def start(self, listener: BrokerListener) -> None: ...
    async def stop(self) -> None: ...
    def health(self) -> tuple[bool, str]: ...
    async def publish(self, room: str, sender: str, text: str, *, system: bool = False) -> tuple[dict, str]:
        """Store, number and deliver a message; the stored message and its sequence's epoch."""
    async def direct(self, room: str | None, message: dict) -> None: ...
    async def kick(self, client_id: str, room: str | None, code: int, reason: str) -> None:
        """Tell the other processes (the local one is the manager's)."""
    async def delete(self, room: str, message_id: int) -> bool: ...
    async def page(self, room: str, before: int, limit: int) -> list[dict]:
        """The latest ``limit`` kept messages with id < ``before``, oldest first."""
    async def history(self, room: str) -> tuple[str, int, list[tuple[int, str]]]: ...
    async def subscribe(self, room: str) -> None: ...
    def unsubscribe(self, room: str) -> None: ...
    def join(self, room: str, client_id: str) -> None: ...
    def leave(self, room: str, client_id: str) -> None: ...
    def count(self, room: str) -> int: ...
    async def roster(self, room: str, limit: int) -> tuple[list[str], int]: ...
    async def members(self, room: str) -> list[str]: ...
    async def is_member(self, room: str, client_id: str) -> bool: ...
    async def rooms(self) -> dict[str, int]: ...


def broker_from_url(url: str, *, history: int = 100, max_rooms: int = 10_000, retain: int = 10_000) -> Broker:
    """``memory://``, ``sqlite:///path``, or Redis (``redis://``, ``redis+sentinel://``,
    ``redis+cluster://``: see RedisAddress); Redis is imported only when asked for."""
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        return MemoryBroker(history=history, max_rooms=max_rooms)
    if scheme == "sqlite":
        return SQLiteBroker(url, history=history, max_rooms=max_rooms, retain=retain)
    return RedisBroker(url, history=history)


@dataclass
class _MemoryRoom:
    epoch: str
    retained: deque              # (id, frame): kept as the frame alone, nothing for the GC to walk
    last_id: int = 0             # the newest id given out
    members: dict[str, None] = field(default_factory=dict)
    subscribers: int = 0         # managers' subscriptions (one per local Room)
    pending: int = 0             # writes not yet committed (SQLite)
    committed_id: int = 0        # SQLite: the newest id committed, so seen; ids above it are being written


class MemoryBroker:
    """Everything in this process: the embedded default, and the double for tests.

    A room's sequence starts with its first message and lasts as long as the broker, so
    ids never restart while the process runs; a restarted broker starts every room
    again under a new epoch, so ids from before the restart are never trusted. A room
    is held while it has members or once it has had a message, and at most
    ``max_rooms`` rooms are held: a join or message that would create another raises
    RoomLimitReached. A room that was only joined is forgotten when its last member leaves.
    """

    url = "memory://"

    def __init__(self, *, history: int = 100, max_rooms: int = 10_000) -> None:
        self._history = history
        self._max_rooms = max_rooms
        self._listener: BrokerListener | None = None
        self._rooms: dict[str, _MemoryRoom] = {}

    async def start(self, listener: BrokerListener) -> None:
        self._listener = listener

    async def stop(self) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def _room(self, name: str) -> _MemoryRoom:
        room = self._rooms.get(name)
        if room is None:
            if len(self._rooms) >= self._max_rooms:
                raise RoomLimitReached(f"too many rooms: this server holds at most {self._max_rooms}")
            room = self._rooms[name] = _MemoryRoom(epoch=secrets.token_hex(6), retained=deque(maxlen=self._history))
        return room

    def _forget_if_idle(self, name: str) -> None:
        room = self._rooms.get(name)
        if room is not None and not (room.members or room.subscribers or room.last_id):
            del self._rooms[name]   # nothing to remember: no member, and no id was ever given out

    async def publish(self, room: str, sender: str, text: str, *, system: bool = False) -> tuple[dict, str]:
        sequence = self._room(room)
        sequence.last_id += 1
        message = message_event(room, sequence.last_id, sender, text, system=system)
        frame = encode(message)
        if self._history:
            sequence.retained.append((message["id"], frame))
        self._listener.deliver(room, message, frame, sequence.epoch)  # type: ignore[union-attr]
        self._forget_if_idle(room)
        return message, sequence.epoch

    async def direct(self, room: str | None, message: dict) -> None:
        self._listener.deliver_direct(room, message)  # type: ignore[union-attr]

    async def kick(self, client_id: str, room: str | None, code: int, reason: str) -> None:
        pass   # one process: the manager has closed them

    async def delete(self, room: str, message_id: int) -> bool:
        sequence = self._rooms.get(room)
        found = [item for item in sequence.retained if item[0] == message_id] if sequence else []
        if not found:
            return False
        sequence.retained.remove(found[0])  # type: ignore[union-attr]
        self._listener.deleted(room, message_id)  # type: ignore[union-attr]
        return True

    async def history(self, room: str) -> tuple[str, int, list[tuple[int, str]]]:
        sequence = self._rooms.get(room)
        if sequence is None:
            return "", 0, []   # reading an unknown room does not create it
        return sequence.epoch, sequence.last_id, list(sequence.retained)

    async def page(self, room: str, before: int, limit: int) -> list[dict]:
        sequence = self._rooms.get(room)
        older = [frame for message_id, frame in sequence.retained if message_id < before] if sequence else []
        return [json.loads(frame) for frame in older[-limit:]]

    async def subscribe(self, room: str) -> None:
        self._room(room).subscribers += 1

    def unsubscribe(self, room: str) -> None:
        found = self._rooms.get(room)
        if found is not None:
            found.subscribers -= 1
            self._forget_if_idle(room)

    def join(self, room: str, client_id: str) -> None:
        self._room(room).members[client_id] = None
        self._listener.presence_changed(room, client_id, True)  # type: ignore[union-attr]

    def leave(self, room: str, client_id: str) -> None:
        found = self._rooms.get(room)
        if found is not None:
            found.members.pop(client_id, None)
            self._forget_if_idle(room)
        self._listener.presence_changed(room, client_id, False)  # type: ignore[union-attr]

    def count(self, room: str) -> int:
        found = self._rooms.get(room)
        return len(found.members) if found is not None else 0

    async def roster(self, room: str, limit: int) -> tuple[list[str], int]:
        found = self._rooms.get(room)
        if found is None:
            return [], 0
        return list(itertools.islice(found.members, limit)), len(found.members)   # not a copy of thousands

    async def members(self, room: str) -> list[str]:
        found = self._rooms.get(room)
        return list(found.members) if found is not None else []

    async def is_member(self, room: str, client_id: str) -> bool:
        found = self._rooms.get(room)
        return found is not None and client_id in found.members

    async def rooms(self) -> dict[str, int]:
        return {name: len(room.members) for name, room in self._rooms.items() if room.members}


class _SQLiteFile:
    """The SQLite file, and the one thread that touches it (the event loop never waits on disk).

    Work is queued: writes (``write``) are grouped, everything queued since the last
    commit going into one transaction, so a busy room costs one fsync per batch, not per
    message; reads (``read``) run in order with them. Each caller gets a future, resolved
    on the event loop once its transaction has committed (or failed), in the order the
    work was queued; ``on_commit`` runs there first, for every write of the batch.

    The file is opened in WAL mode and ``locking_mode=EXCLUSIVE`` (this process alone
    uses it while it runs), with ``synchronous=NORMAL`` by default: a committed
    transaction is in the file (the WAL) before anyone hears of it, so ``kill -9`` loses
    nothing acknowledged, and no commit waits for an fsync (profiled, the fsync was most
    of what a message cost). ``?synchronous=full`` makes commits survive a power cut or a
    kernel crash too, at one fsync per commit.
    """

    SCHEMA_VERSION = "1"
    SCHEMA = (
        "CREATE TABLE IF NOT EXISTS wschat_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        "CREATE TABLE IF NOT EXISTS wschat_rooms (room TEXT PRIMARY KEY, epoch TEXT NOT NULL, last_id INTEGER NOT NULL)",
        "CREATE TABLE IF NOT EXISTS wschat_messages (room TEXT NOT NULL, id INTEGER NOT NULL, frame TEXT NOT NULL,"
        " PRIMARY KEY (room, id)) WITHOUT ROWID",
    )
    BATCH = 2000   # writes per transaction, at most

    def __init__(self, path: str, *, keep: int, synchronous: str = "normal") -> None:
        self.path = path
        self._keep = keep
        self._synchronous = synchronous
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._gathered: list[tuple] = []   # writes of this event-loop tick, handed over together
        self._trimmed: dict[str, int] = {}  # the file's thread: up to which id each room was trimmed
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_commit: Callable[[tuple], Any] = lambda write: None
        self.commits = 0          # transactions committed: fewer than writes, when they come in bursts

    # -- opening ----------------------------------------------------------------

    def open(self) -> Any:
        """Open and check the file (any thread): BrokerUnavailable naming it when it is not a
        wschat database, is read-only, or is locked by another process."""
        import sqlite3
        if os.path.exists(self.path) and not os.stat(self.path).st_mode & 0o222:
            # Its mode says read-only: honoured even where the OS would let us write (root).
            raise BrokerUnavailable(f"{self.path}: the file is read-only")
        try:
            db = sqlite3.connect(self.path, timeout=1.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise BrokerUnavailable(f"cannot open {self.path}: {exc}") from None
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            if db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
                raise BrokerUnavailable(f"{self.path}: cannot use write-ahead logging here")
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.execute("BEGIN IMMEDIATE")   # takes the exclusive lock now, and keeps it
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "wschat_meta" not in tables:
                raise BrokerUnavailable(f"{self.path} is not a wschat database (it holds other tables)")
            for statement in self.SCHEMA:
                db.execute(statement)
            db.execute("INSERT OR IGNORE INTO wschat_meta VALUES ('schema', ?)", (self.SCHEMA_VERSION,))
            version = db.execute("SELECT value FROM wschat_meta WHERE key = 'schema'").fetchone()[0]
            if version != self.SCHEMA_VERSION:
                raise BrokerUnavailable(f"{self.path}: wschat schema {version}, this wschat knows {self.SCHEMA_VERSION}")
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            db.close()
            raise BrokerUnavailable(f"{self.path}: {_sqlite_problem(exc)}") from None
        except BaseException:
            db.close()
            raise
        return db

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        opened: asyncio.Future = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(opened,), name=f"wschat-sqlite {self.path}",
                                        daemon=True)
        self._thread.start()
        await opened

    async def stop(self) -> None:
        if self._thread is not None:
            self._hand_over()      # what this tick wrote goes in before the end
            self._queue.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    # -- the caller's side --------------------------------------------------------

    def write(self, write: tuple) -> asyncio.Future:
        """Queue a write: ``("room", name, epoch)``, ``("message", room, id, frame, message)`` or
        ``("delete", room, id)``. Its future resolves once committed (delete: to whether a
        message was deleted). One tick's writes reach the thread as one item: waking it
        (and taking the GIL from the event loop) once per message cost more than the writes."""
        future = self._loop.create_future()  # type: ignore[union-attr]
        if not self._gathered:
            self._loop.call_soon(self._hand_over)  # type: ignore[union-attr]
        self._gathered.append((write, future))
        return future

    def read(self, query: Callable[[Any], Any]) -> asyncio.Future:
        """Run ``query(connection)`` in the file's thread, after what was queued before."""
        future = self._loop.create_future()  # type: ignore[union-attr]
        self._hand_over()
        self._queue.put((False, query, future))
        return future

    def _hand_over(self) -> None:
        if self._gathered:
            self._queue.put((True, self._gathered, None))
            self._gathered = []

    # -- the file's thread ------------------------------------------------------------

    def _run(self, opened: asyncio.Future) -> None:
        try:
            db = self.open()
        except BaseException as exc:
            self._loop.call_soon_threadsafe(_settle, opened, None, exc)  # type: ignore[union-attr]
            return
        self._loop.call_soon_threadsafe(_settle, opened, None, None)  # type: ignore[union-attr]
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    break
                batch = [item]
                while len(batch) < self.BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._queue.put(None)   # finish this batch first
                        break
                    batch.append(item)
                self._work(db, batch)
        finally:
            db.close()

    def _work(self, db: Any, batch: list[tuple]) -> None:
        writes: list[tuple] = []
        for is_write, work, future in batch:
            if is_write:
                writes.extend(work)
                continue
            self._commit(db, writes)
            writes = []
            try:
                result, error = work(db), None
            except Exception as exc:
                result, error = None, BrokerUnavailable(f"{self.path}: {_sqlite_problem(exc)}")
            self._loop.call_soon_threadsafe(_settle, future, result, error)  # type: ignore[union-attr]
        self._commit(db, writes)

    def _commit(self, db: Any, writes: list[tuple]) -> None:
        if not writes:
            return
        results: list[Any] = []
        error: BaseException | None = None
        try:
            db.execute("BEGIN IMMEDIATE")
            messages = [(write[1], write[2], write[3]) for write, _ in writes if write[0] == "message"]
            db.executemany("INSERT INTO wschat_messages VALUES (?, ?, ?)", messages)
            for write, _ in writes:
                results.append(self._apply(db, write))
            self._trim(db, messages)
            db.execute("COMMIT")
            self.commits += 1
        except Exception as exc:
            with contextlib.suppress(Exception):
                db.execute("ROLLBACK")
            error = BrokerUnavailable(f"{self.path}: {_sqlite_problem(exc)}")
            logger.error("could not commit to %s: %s", self.path, error)
        self._loop.call_soon_threadsafe(self._committed, writes, results, error)  # type: ignore[union-attr]

    @staticmethod
    def _apply(db: Any, write: tuple) -> Any:
        kind, room, *rest = write
        if kind == "message":
            return None   # inserted together, above
        if kind == "room":
            db.execute("INSERT OR IGNORE INTO wschat_rooms VALUES (?, ?, 0)", (room, rest[0]))
            return None
        # A deleted message may have been the newest: its id must outlive it (ids never restart).
        db.execute(_SAVE_LAST_ID, (room, room))
        return db.execute("DELETE FROM wschat_messages WHERE room = ? AND id = ?", (room, rest[0])).rowcount > 0

    def _trim(self, db: Any, messages: list[tuple]) -> None:
        """Keep the last ``keep`` messages of each room written to. A room's newest id lives in
        its newest message; wschat_rooms.last_id is brought up to date only when messages are
        removed, so an ordinary batch costs one insert statement, not three per room."""
        newest: dict[str, int] = {}
        for room, message_id, _ in messages:
            newest[room] = max(message_id, newest.get(room, 0))
        step = max(1, self._keep // 100)   # trim in steps: the file holds at most 1 % more for a while
        for room, last_id in newest.items():
            if last_id - self._keep >= self._trimmed.get(room, 0) + step:
                db.execute(_SAVE_LAST_ID, (room, room))
                db.execute("DELETE FROM wschat_messages WHERE room = ? AND id <= ?", (room, last_id - self._keep))
                self._trimmed[room] = last_id - self._keep

    def _committed(self, writes: list[tuple], results: list[Any], error: BaseException | None) -> None:
        # On the event loop, in the order committed: deliveries follow id order.
        for index, (write, future) in enumerate(writes):
            if error is None:
                self.on_commit(write)
            _settle(future, results[index] if error is None else None, error)


_SAVE_LAST_ID = ("UPDATE wschat_rooms SET last_id = max(last_id, coalesce((SELECT max(id) FROM wschat_messages"
                 " WHERE room = ?), 0)) WHERE room = ?")


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _sqlite_problem(exc: BaseException) -> str:
    """What a sqlite3 error means for an operator, in a few words."""
    text = str(exc)
    if "readonly" in text or "read-only" in text:
        return "the file is read-only"
    if "locked" in text:
        return "the file is locked by another process (another wschat?)"
    if "not a database" in text:
        return "not a wschat database (not an SQLite file)"
    return text


class SQLiteBroker(MemoryBroker):
    """Durable history on one node: each room's epoch, id sequence and last ``retain``
    messages in one SQLite file (the standard library's ``sqlite3``; no server).

    One process, like ``memory://``: presence and fan-out are the memory broker's. A
    message is numbered at once from the room's sequence (so ids stay strictly
    increasing, and in order), written, and acknowledged (delivered to anyone, answered,
    returned by ``publish``) only once its transaction has committed: ``kill -9`` at any
    moment loses nothing acknowledged. A restart keeps every room's epoch and last id, so
    a client resuming with ``since``/``epoch`` gets exactly what it missed.

    In memory: the rooms in use (members, subscribers, writes pending), each with its last
    ``history`` messages, which is what a join replays; older ones are read from the file
    (``page``). ``max_rooms`` counts the rooms in the file.
    """

    def __init__(self, url: str, *, history: int = 100, max_rooms: int = 10_000, retain: int = 10_000) -> None:
        super().__init__(history=history, max_rooms=max_rooms)
        self.url = url
        self.path, synchronous = _sqlite_path(url)
        self._file = _SQLiteFile(self.path, keep=max(retain, history), synchronous=synchronous)
        self._file.on_commit = self._committed
        self._loading: dict[str, asyncio.Future] = {}
        self._stored_rooms = 0          # rooms in the file
        self._health: tuple[bool, str] = (False, "opening the database")

    async def ping(self) -> None:
        """Open and check the file now (``serve`` does, before it starts): BrokerUnavailable naming it."""
        self._file.open().close()

    async def start(self, listener: BrokerListener) -> None:
        await super().start(listener)
        await self._file.start(asyncio.get_running_loop())
        self._stored_rooms = await self._file.read(
            lambda db: db.execute("SELECT count(*) FROM wschat_rooms").fetchone()[0])
        self._health = (True, "ok")

    async def stop(self) -> None:
        await self._file.stop()
        self._health = (False, "stopped")

    def health(self) -> tuple[bool, str]:
        return self._health

    # -- rooms: in memory while in use, in the file always -------------------------

    async def _loaded(self, name: str, *, create: bool) -> _MemoryRoom | None:
        """The room's sequence, read from the file if it is not in memory (once, however many
        ask at the same time); with ``create``, a new room (new epoch) if the file has none."""
        room = self._rooms.get(name)
        while room is None:
            loading = self._loading.get(name)
            if loading is None:
                loading = self._loading[name] = asyncio.ensure_future(self._load(name))
                loading.add_done_callback(lambda _: self._loading.pop(name, None))
            await asyncio.shield(loading)
            room = self._rooms.get(name)
            if room is None:
                if not create:
                    return None
                if self._stored_rooms >= self._max_rooms:
                    raise RoomLimitReached(f"too many rooms: this server holds at most {self._max_rooms}")
                room = self._rooms[name] = _MemoryRoom(epoch=secrets.token_hex(6), retained=deque(maxlen=self._history))
                self._stored_rooms += 1
                self._file.write(("room", name, room.epoch))
        return room

    async def _load(self, name: str) -> None:
        keep = self._history

        def query(db: Any) -> tuple[str, int, list[str]] | None:
            row = db.execute("SELECT epoch, max(last_id, coalesce((SELECT max(id) FROM wschat_messages WHERE room = ?),"
                             " 0)) FROM wschat_rooms WHERE room = ?", (name, name)).fetchone()
            if row is None:
                return None
            frames = db.execute("SELECT id, frame FROM wschat_messages WHERE room = ? ORDER BY id DESC LIMIT ?",
                                (name, keep)).fetchall()
            return row[0], row[1], frames[::-1]

        found = await self._file.read(query)
        if found is not None and name not in self._rooms:
            epoch, last_id, frames = found
            room = self._rooms[name] = _MemoryRoom(epoch=epoch, retained=deque(maxlen=self._history),
                                                   last_id=last_id, committed_id=last_id)
            room.retained.extend((message_id, frame) for message_id, frame in frames)

    def _forget_if_idle(self, name: str) -> None:
        room = self._rooms.get(name)
        if room is not None and not (room.members or room.subscribers or room.pending):
            del self._rooms[name]   # it is all in the file

    async def subscribe(self, room: str) -> None:
        (await self._loaded(room, create=True)).subscribers += 1  # type: ignore[union-attr]

    # -- messages ---------------------------------------------------------------------

    async def publish(self, room: str, sender: str, text: str, *, system: bool = False) -> tuple[dict, str]:
        sequence = await self._loaded(room, create=True)
        assert sequence is not None
        sequence.last_id += 1
        message = message_event(room, sequence.last_id, sender, text, system=system)
        sequence.pending += 1
        try:
            await self._file.write(("message", room, message["id"], encode(message), message))
        finally:
            sequence.pending -= 1
            self._forget_if_idle(room)
        return message, sequence.epoch

    def _committed(self, write: tuple) -> None:
        """A write is in the file: now it may be seen (on the event loop, in commit order)."""
        kind, room, *rest = write
        sequence = self._rooms.get(room)
        if kind == "message" and sequence is not None:
            _, frame, message = rest
            sequence.committed_id = message["id"]
            if self._history:
                sequence.retained.append((message["id"], frame))
            self._listener.deliver(room, message, frame, sequence.epoch)  # type: ignore[union-attr]
        elif kind == "delete" and sequence is not None:
            for item in [item for item in sequence.retained if item[0] == rest[0]]:
                sequence.retained.remove(item)

    async def history(self, room: str) -> tuple[str, int, list[tuple[int, str]]]:
        sequence = await self._loaded(room, create=False)
        if sequence is None:
            return "", 0, []
        # The committed id, not the last one given out: a message still being written is
        # not in the replay, so a join must not be told its replay covers it; it arrives
        # live once committed.
        result = sequence.epoch, sequence.committed_id, list(sequence.retained)
        self._forget_if_idle(room)
        return result

    async def page(self, room: str, before: int, limit: int) -> list[dict]:
        frames = await self._file.read(lambda db: [frame for (frame,) in db.execute(
            "SELECT frame FROM wschat_messages WHERE room = ? AND id < ? ORDER BY id DESC LIMIT ?",
            (room, before, limit))])
        return [json.loads(frame) for frame in reversed(frames)]

    async def delete(self, room: str, message_id: int) -> bool:
        deleted = await self._file.write(("delete", room, message_id))
        if deleted:
            self._listener.deleted(room, message_id)  # type: ignore[union-attr]
        return deleted


def _sqlite_path(url: str) -> tuple[str, str]:
    """``sqlite:///chat.db`` -> ``chat.db`` (relative), ``sqlite:////var/lib/chat.db`` -> absolute;
    and the ``synchronous`` of ``?synchronous=full`` (default normal)."""
    parts = urlsplit(url)
    _require(parts.path.startswith("/") and len(parts.path) > 1, "broker", url,
             "sqlite:///relative/path or sqlite:////absolute/path")
    query = dict(pair.partition("=")[::2] for pair in filter(None, parts.query.split("&")))
    synchronous = query.pop("synchronous", "normal").lower()
    _require(synchronous in ("normal", "full") and not query, "broker", url,
             "sqlite:///path, optionally with ?synchronous=full")
    return parts.path[1:], synchronous


class RedisShape(enum.Enum):
    """Which kind of Redis a ``RedisBroker`` talks to, named by its URL's scheme."""

    SINGLE = "redis"              # redis://, rediss://, unix://: one server
    SENTINEL = "redis+sentinel"   # a master found, and followed through failovers, by Sentinel
    CLUSTER = "redis+cluster"     # a Redis Cluster: rooms spread over its masters, sharded pub/sub


@dataclass(frozen=True)
class RedisAddress:
    """Where a ``RedisBroker``'s Redis is, read from the broker URL.

    * ``redis://[:password@]host:port/db`` (also ``rediss://``, ``unix://``): one server;
      ``url`` is handed to redis-py as it is;
    * ``redis+sentinel://[:password@]host1:port1,host2:port2/DB/SERVICE``: the sentinels
      and the service (master name) they watch; the password is the master's and the
      replicas', the sentinels take none (python-socketio's form);
    * ``redis+cluster://[:password@]host1:port1[,host2:port2...]/``: seed nodes of a
      cluster, which tell the rest.

    ``?presence_ttl=SECONDS`` on any of them is wschat's own option, removed from ``url``.
    """

    shape: RedisShape
    url: str
    hosts: tuple[tuple[str, int], ...] = ()
    db: int = 0
    service: str = ""
    username: str | None = None
    password: str | None = None
    presence_ttl: float | None = None

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        plain, ttl = _split_presence_ttl(url)
        parts = urlsplit(plain)
        if parts.scheme not in (RedisShape.SENTINEL.value, RedisShape.CLUSTER.value):
            return cls(RedisShape.SINGLE, plain, presence_ttl=ttl)
        shape = RedisShape(parts.scheme)
        sentinel = shape is RedisShape.SENTINEL
        form = ("redis+sentinel://[:password@]host:port[,host:port...]/DB/SERVICE" if sentinel
                else "redis+cluster://[:password@]host:port[,host:port...]/")
        userinfo, _, hostlist = parts.netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        hosts = tuple(_host_and_port(item, 26379 if sentinel else 6379) for item in hostlist.split(",") if item)
        path = [part for part in parts.path.split("/") if part]
        shaped = (len(path) == 2 and path[0].isdigit()) if sentinel else path in ([], ["0"])
        _require(bool(hosts) and None not in hosts and shaped, "broker", mask_url(url), form)
        return cls(shape, plain, hosts, int(path[0]) if sentinel else 0, unquote(path[1]) if sentinel else "",
                   unquote(username) or None, unquote(password) or None, ttl)


def _host_and_port(item: str, default_port: int) -> tuple[str, int] | None:
    """``host:port``, ``host``, ``[::1]:port`` or ``[::1]``; None when the port is not a port."""
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if rest else str(default_port))
    else:
        host, colon, port = item.partition(":")
        port = port if colon else str(default_port)
    return (host, int(port)) if host and port.isdigit() and 0 < int(port) < 65536 else None


def _blocking_sentinel_pool() -> type:
    """redis-py's SentinelConnectionPool with BlockingConnectionPool's waiting (see RedisBroker._new_client)."""
    from redis.asyncio import BlockingConnectionPool
    from redis.asyncio.sentinel import SentinelConnectionPool
    return type("BlockingSentinelConnectionPool", (SentinelConnectionPool, BlockingConnectionPool), {})


class SubscriberState(enum.Enum):
    """The pub/sub connection of one ``_RedisSubscriber``.

    ::

        CONNECTING --confirmed--> LISTENING --lost--> RECONNECTING --confirmed--> LISTENING
        (any) --no channels left (a Cluster master that owns none of our rooms)--> CLOSED
    """

    CONNECTING = "connecting"       # not connected yet: nothing was delivered, nothing missed
    LISTENING = "listening"
    RECONNECTING = "reconnecting"   # was listening: what was published meanwhile never reached us
    CLOSED = "closed"


class _RedisSubscriber:
    """One pub/sub connection to one Redis server, and the channels it holds there.

    On one server or a Sentinel master, one subscriber holds every channel. On a Cluster
    there is one per master that owns a subscribed room's slot, holding that room's
    channel with SSUBSCRIBE (sharded pub/sub). A channel is *stale* when messages
    published on it may not have reached us: every channel of a connection that was
    lost, and a channel that arrives from another subscriber (its slot moved, or its
    master failed over). Once Redis confirms a stale channel, the broker asks the
    room's clients to resume with ``since``.
    """

    def __init__(self, broker: RedisBroker, name: str, client: Any, *, sharded: bool) -> None:
        self.broker, self.name = broker, name
        self.channels: set[str] = set()
        self.stale: set[str] = set()
        self.state = SubscriberState.CONNECTING
        self._client = client            # None: a Cluster whose slots are not known yet
        self._sharded = sharded
        self._pubsub: Any = None
        self._confirmations: dict[str, asyncio.Future] = {}
        self._task = asyncio.ensure_future(self._run())

    async def add(self, channel: str) -> None:
        """Subscribe ``channel`` and wait for Redis to confirm it; BrokerUnavailable if it cannot."""
        confirmed = self._confirmations[channel] = asyncio.get_running_loop().create_future()
        self.channels.add(channel)
        try:
            if self._pubsub is not None:
                await self.broker._call(self._subscribe(self._pubsub, channel))
            elif self.state is not SubscriberState.CONNECTING:
                raise BrokerUnavailable(self.broker.health()[1])
            # else: the connection being made subscribes every channel in self.channels
            await self.broker._call(asyncio.wait_for(asyncio.shield(confirmed), 5))
        except BaseException:
            self.channels.discard(channel)
            raise
        finally:
            self._confirmations.pop(channel, None)

    def adopt(self, channel: str) -> None:
        """Take over a channel from another subscriber; it is stale until confirmed here."""
        self.channels.add(channel)
        self.stale.add(channel)
        if self._pubsub is not None:
            self.broker._spawn(self._quietly(self._subscribe(self._pubsub, channel)))

    async def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        self.stale.discard(channel)
        if not self.channels:   # a Cluster master none of our rooms live on any more
            await self.close()
        elif self._pubsub is not None:
            with contextlib.suppress(Exception):
                await (self._pubsub.sunsubscribe if self._sharded else self._pubsub.unsubscribe)(channel)

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def _subscribe(self, pubsub: Any, channel: str) -> Awaitable[Any]:
        return pubsub.ssubscribe(channel) if self._sharded else pubsub.subscribe(channel)

    @staticmethod
    async def _quietly(job: Awaitable[Any]) -> None:
        with contextlib.suppress(Exception):   # a lost connection is handled by _run
            await job

    async def _run(self) -> None:
        """Hold the connection: reconnect with backoff, resubscribe, hand moved channels on."""
        backoff = 0.1
        try:
            while True:
                await self.broker._reroute(self)
                if not self.channels:
                    return
                pubsub = None
                try:
                    if self._client is None:
                        raise BrokerUnavailable("the cluster's slots are not known yet")
                    pubsub = self._client.pubsub()
                    self._pubsub = pubsub
                    for channel in list(self.channels):
                        await self._subscribe(pubsub, channel)
                    while True:
                        # A bounded wait: a blocking read would trip the socket timeout when idle.
                        message = await pubsub.get_message(timeout=1.0)
                        if message is not None and self._handle(message):
                            backoff = 0.1
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.broker._failed(exc)
                    if self.state is SubscriberState.LISTENING:
                        self.state = SubscriberState.RECONNECTING
                    if self.state is SubscriberState.RECONNECTING:
                        self.stale |= self.channels
                    self.broker._subscriber_failed(self)
                finally:
                    self._pubsub = None
                    if pubsub is not None:
                        with contextlib.suppress(Exception):
                            await pubsub.aclose()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            self.state = SubscriberState.CLOSED
            self.broker._subscriber_closed(self)
            if self._client is not None and self._sharded:   # a Cluster master's own client
                with contextlib.suppress(Exception):
                    await self._client.aclose()

    def _handle(self, message: dict) -> bool:
        """One message from Redis; True when it confirmed a subscription."""
        kind, channel = message["type"], message["channel"]
        if kind in ("message", "smessage"):
            try:
                self.broker._dispatch(channel, message["data"])
            except Exception:   # one bad message must not cost every room a resync
                logger.exception("could not handle a message on %s", channel)
            return False
        if kind in ("subscribe", "ssubscribe"):
            if self.state is not SubscriberState.LISTENING:
                recovered = self.state is SubscriberState.RECONNECTING
                self.state = SubscriberState.LISTENING
                self.broker._subscriber_up(self, recovered)
            confirmed = self._confirmations.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            if channel in self.stale:
                self.stale.discard(channel)
                self.broker._resync(channel)
            return True
        if kind in ("unsubscribe", "sunsubscribe") and channel in self.channels:
            # Not asked for: Redis dropped the channel because its slot moved to another master.
            self.channels.discard(channel)
            self.broker._moved(channel)
        return False


class RedisBroker:
    """Rooms shared by every process on Redis: pub/sub fan-out, ids, history, presence.

    Three shapes of Redis (``RedisShape``, from the URL): one server, a Sentinel-watched
    master, or a Cluster. All keys of room R share the hash tag ``{R}``, so on a Cluster
    they live in one slot and the script that takes an id, stores and publishes runs
    there (all under ``wschat:``):

    * ``{R}:seq`` hash: ``id``, the last message id (HINCRBY), and ``epoch``;
    * ``{R}:history`` list: the last ``history`` frames, appended in the same Lua
      script that takes the id and publishes, so ids, history and fan-out agree;
    * ``{R}:sent:NONCE``: the id a publish got, kept ``RECEIPT_TTL`` seconds, so a
      retried script returns that id instead of storing the message again;
    * ``{R}:members`` sorted set of ``"NODE CLIENT_ID"`` scored by expiry time,
      refreshed by each process's heartbeat; a crashed process's members expire;
    * ``rooms`` sorted set of room names scored by expiry time.

    Channels: ``wschat:{R}:channel`` carries the room's messages, direct messages and
    presence; ``wschat:nodes`` carries direct messages sent without a room, and kicks.
    On a Cluster both are shard channels (SPUBLISH/SSUBSCRIBE): a room's traffic stays
    on the master that owns its slot and reaches only the processes subscribed there.
    Payloads start with one letter that says what follows:

    * ``m<epoch> <frame>`` (``PAYLOAD_MESSAGE``): a stored message of the sequence
      ``epoch``; ``frame`` is the message frame exactly as clients receive it;
    * ``d<json>`` (``PAYLOAD_DIRECT``): a direct message, never stored;
    * ``p+<node> <client id>`` and ``p-...`` (``PAYLOAD_PRESENCE``): a client id joined
      or left on one process;
    * ``x<id>`` (``PAYLOAD_DELETED``): a retained message was deleted;
    * ``k<json>`` (``PAYLOAD_KICK``, on ``wschat:nodes``): close a client's connections;
      the process that sent it ignores it (its manager already did).

    Subscriptions are held by ``_RedisSubscriber``s (one, or one per Cluster master),
    each subscribed to a room only while this process has members there. A subscriber
    whose connection is lost reconnects with backoff (on a Cluster, or through Sentinel,
    to whichever master owns its rooms by then) and asks its rooms' clients to resume
    with ``since``, because messages published meanwhile never reached it.

    A publish is stored at most once and, once its sender has been told "not
    delivered", never later: the script carries a nonce (retries return the first id)
    and a deadline in Redis's own clock, after which it refuses to run; the broker
    gives up on the answer only after that deadline. A health probe asks Redis (every
    master of a Cluster) the time every second on connections of its own, so a Redis
    that stops answering shows in ``/healthz`` within seconds, and the answer keeps the
    clock offset that deadlines are written in.
    """

    PREFIX = "wschat:"
    ROOMS = "wschat:rooms"
    NODES_CHANNEL = "wschat:nodes"
    PAYLOAD_MESSAGE, PAYLOAD_DIRECT, PAYLOAD_PRESENCE, PAYLOAD_DELETED, PAYLOAD_KICK = "m", "d", "p", "x", "k"
    POOL_SIZE = 64              # connections per process (per master on a Cluster)
    POOL_WAIT = 5.0             # seconds a caller waits for a pooled connection
    PUBLISH_DEADLINE = 3.0      # seconds after sending, in Redis's clock, past which the script refuses to run
    PUBLISH_TIMEOUT = 4.5       # seconds the broker waits for the script's answer (after the deadline, with margin)
    RECEIPT_TTL = 10            # seconds a publish's nonce is remembered: longer than any retry
    HEALTH_INTERVAL = 1.0       # seconds between health probes
    HEALTH_TIMEOUT = 2.0        # a probe unanswered this long: /healthz says Redis is not answering
    # KEYS: room hash, history, receipt, channel. ARGV: a new epoch, frame head and tail,
    # history size, deadline (ms, Redis clock), receipt TTL, PUBLISH or SPUBLISH.
    # Returns {id, epoch}; id 0: too late.
    PUBLISH_SCRIPT = """
        local stored = redis.call('GET', KEYS[3])
        if stored then return {tonumber(stored), redis.call('HGET', KEYS[1], 'epoch')} end
        local now = redis.call('TIME')
        if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[5]) then return {0, ''} end
        redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
        local id = redis.call('HINCRBY', KEYS[1], 'id', 1)
        if id == 1 then redis.call('DEL', KEYS[2]) end
        local frame = ARGV[2] .. id .. ARGV[3]
        local keep = tonumber(ARGV[4])
        if keep > 0 then
            redis.call('RPUSH', KEYS[2], frame)
            redis.call('LTRIM', KEYS[2], -keep, -1)
        end
        redis.call('SET', KEYS[3], id, 'EX', ARGV[6])
        local epoch = redis.call('HGET', KEYS[1], 'epoch')
        redis.call(ARGV[7], KEYS[4], 'm' .. epoch .. ' ' .. frame)
        return {id, epoch}
    """
    # KEYS: history, channel. ARGV: the frame prefix that names the id, id, PUBLISH or SPUBLISH.
    # Returns 1 when deleted.
    DELETE_SCRIPT = """
        for _, frame in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
            if string.sub(frame, 1, #ARGV[1]) == ARGV[1] then
                redis.call('LREM', KEYS[1], 1, frame)
                redis.call(ARGV[3], KEYS[2], 'x' .. ARGV[2])
                return 1
            end
        end
        return 0
    """
    # KEYS: room hash, history. ARGV: an epoch to set if the room has none ('' to leave it).
    # Returns {epoch, last id, frames}, read at one instant.
    HISTORY_SCRIPT = """
        if ARGV[1] ~= '' then redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) end
        local seq = redis.call('HMGET', KEYS[1], 'epoch', 'id')
        return {seq[1], seq[2], redis.call('LRANGE', KEYS[2], 0, -1)}
    """
    # KEYS: channel (it carries the room's hash tag, so a Cluster routes this to its shard).
    # ARGV: payload. SPUBLISH from a pipeline of redis-py's Cluster client goes through it.
    SPUBLISH_SCRIPT = "return redis.call('SPUBLISH', KEYS[1], ARGV[1])"

    def __init__(self, url: str, *, history: int = 100, presence_ttl: float | None = None) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise RuntimeError("the Redis broker needs the redis package: pip install 'wschat[redis]'") from None
        self.url = url
        self._aioredis = aioredis
        self.address = RedisAddress.parse(url)
        self.presence_ttl = presence_ttl or self.address.presence_ttl or 15.0
        self._sharded = self.address.shape is RedisShape.CLUSTER
        self._publish_command = "SPUBLISH" if self._sharded else "PUBLISH"
        self._history = history
        self._node = secrets.token_hex(6)
        self._listener: BrokerListener | None = None
        self._client: Any = None
        self._pubsub_client: Any = None   # one server or Sentinel: where subscribers connect
        self._scripts: dict[str, Any] = {}
        self._tasks: set[asyncio.Task] = set()
        self._commands: asyncio.Queue[tuple[str, str, str]] | None = None
        self._subscription_lock: asyncio.Lock | None = None
        self._subscribed: set[str] = set()
        self._subscribers: dict[str, _RedisSubscriber] = {}   # by Redis server, "host:port" on a Cluster
        self._turns: asyncio.Semaphore | None = None          # a Cluster: callers at once, at most POOL_SIZE
        self._first_attempt: asyncio.Event | None = None
        self._view: dict[str, dict[str, set[str]]] = {}      # room -> client id -> nodes
        self._error: str | None = None   # the last command's failure, until one succeeds
        self._stalled: str | None = None # the health probe's failure, until a probe is answered
        self._clock_offset = 0.0         # Redis's clock minus ours, from the health probe

    # -- lifecycle -----------------------------------------------------------

    def _new_client(self, *, pool_size: int | None = None, retries: int = 1) -> Any:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Fail fast (one retry covers a pooled connection that went stale) and let the
        # broker decide: callers get an error frame, not a hang. A blocking pool makes a
        # burst of callers (a thousand joins at once) wait for a connection rather than
        # fail with "Too many connections", which redis-py's default pool does at 100.
        # Subscribers take no retry at all: redis-py would reconnect and resubscribe
        # quietly, and nobody would know that messages were missed meanwhile.
        address, size = self.address, pool_size or self.POOL_SIZE
        options = dict(decode_responses=True, retry=Retry(NoBackoff(), retries),
                       socket_connect_timeout=2, socket_timeout=5)
        if address.shape is RedisShape.SINGLE:
            pool = self._aioredis.BlockingConnectionPool.from_url(
                address.url, max_connections=size, timeout=self.POOL_WAIT, **options)
            return self._aioredis.Redis(connection_pool=pool)
        credentials = dict(username=address.username, password=address.password)
        if address.shape is RedisShape.SENTINEL:
            from redis.asyncio.sentinel import Sentinel
            sentinels = Sentinel(list(address.hosts), sentinel_kwargs=dict(
                socket_connect_timeout=2, socket_timeout=2, retry=Retry(NoBackoff(), 0)))
            return sentinels.master_for(address.service, connection_pool_class=_blocking_sentinel_pool(),
                                        max_connections=size, timeout=self.POOL_WAIT, db=address.db,
                                        **credentials, **options)
        from redis.asyncio.cluster import ClusterNode, RedisCluster
        # Its limit is per master, and a pipeline takes one connection on each: _turn
        # keeps callers to `size` at once, so 2 x size is never reached.
        return RedisCluster(startup_nodes=[ClusterNode(host, port) for host, port in address.hosts],
                            max_connections=2 * size, **credentials, **options)

    def _node_client(self, host: str, port: int) -> Any:
        """A Cluster master's own one-connection client, for its subscriber."""
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        return self._aioredis.Redis(host=host, port=port, username=self.address.username,
                                    password=self.address.password, decode_responses=True,
                                    retry=Retry(NoBackoff(), 0), socket_connect_timeout=2, socket_timeout=5)

    @staticmethod
    async def _close_client(client: Any) -> None:
        with contextlib.suppress(Exception):
            await client.aclose()
        pool = getattr(client, "connection_pool", None)
        with contextlib.suppress(Exception):
            if pool is not None:
                await pool.disconnect()
            if getattr(pool, "sentinel_manager", None) is not None:
                await pool.sentinel_manager.aclose()

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless Redis answers now (``serve`` checks this before starting)."""
        client = self._new_client(pool_size=1)
        try:
            await asyncio.wait_for(client.ping(), 5)
        except Exception as exc:
            raise BrokerUnavailable(_describe_error(exc)) from None
        finally:
            await self._close_client(client)

    async def start(self, listener: BrokerListener) -> None:
        self._listener = listener
        self._client = self._new_client()
        if not self._sharded:
            self._pubsub_client = self._new_client(pool_size=2, retries=0)
        for name, source in (("publish", self.PUBLISH_SCRIPT), ("delete", self.DELETE_SCRIPT),
                             ("history", self.HISTORY_SCRIPT)):
            self._scripts[name] = self._client.register_script(source)
        self._commands = asyncio.Queue()
        self._subscription_lock = asyncio.Lock()
        self._turns = asyncio.Semaphore(self.POOL_SIZE) if self._sharded else None
        self._first_attempt = asyncio.Event()   # set once the first subscriber connected or failed
        for job in (self._run_commands(), self._heartbeat(), self._probe_health()):
            self._spawn(job)
        if self._sharded:
            with contextlib.suppress(Exception):   # unreachable: the subscriber keeps trying
                await asyncio.wait_for(self._client.initialize(), 3)
        self._subscriber_for(self.NODES_CHANNEL).channels.add(self.NODES_CHANNEL)
        # Be ready before the server accepts clients, but never block start-up for long:
        # an unreachable Redis is reported by /healthz and retried in the background.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), 3)

    async def stop(self) -> None:
        tasks = [*self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *(subscriber.close() for subscriber in list(self._subscribers.values())),
                             return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):   # best effort: others would expire us anyway
            await asyncio.wait_for(self._withdraw_members(), 2)
        for client in (self._client, self._pubsub_client):
            if client is not None:
                await self._close_client(client)

    async def _withdraw_members(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        for room, client_ids in self._listener.local_members().items():  # type: ignore[union-attr]
            for client_id in client_ids:
                pipe.zrem(self._key(room, "members"), self._member(client_id))
                self._send(pipe, self._channel(room), f"{self.PAYLOAD_PRESENCE}-{self._member(client_id)}")
        await pipe.execute()

    def health(self) -> tuple[bool, str]:
        if self._stalled is not None:
            return False, self._stalled
        if self._error is not None:
            return False, self._error
        states = {subscriber.state for subscriber in self._subscribers.values()}
        if SubscriberState.RECONNECTING in states:
            return False, "redis unreachable: reconnecting"
        if SubscriberState.LISTENING not in states:   # starting; a Cluster master's new subscriber does not count
            return False, "connecting to redis"
        return True, "ok"

    def _failed(self, exc: BaseException) -> BrokerUnavailable:
        reason = _describe_error(exc)
        if self._error is None:
            logger.warning("redis broker %s unreachable: %s", mask_url(self.url), reason)
        self._error = f"redis unreachable: {reason}"
        return BrokerUnavailable(reason)

    async def _call(self, awaitable: Awaitable[Any], timeout: float | None = None) -> Any:
        try:
            async with self._turn():
                result = await asyncio.wait_for(awaitable, timeout) if timeout else await awaitable
        except (OSError, asyncio.TimeoutError, self._aioredis.RedisError) as exc:
            raise self._failed(exc) from None
        self._error = None
        return result

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """On a Cluster, wait for one of POOL_SIZE turns: redis-py's Cluster client has no
        blocking pool, and past its connection limit it fails instead of waiting."""
        if self._turns is None:
            yield
            return
        await asyncio.wait_for(self._turns.acquire(), self.POOL_WAIT)
        try:
            yield
        finally:
            self._turns.release()

    async def _probe_health(self) -> None:
        """Every HEALTH_INTERVAL, ask Redis the time on a connection of its own (a full pool
        must not look like a dead Redis): unanswered within HEALTH_TIMEOUT, Redis is stalled.
        On a Cluster every master is asked: a room whose master is down is as bad as any."""
        client = self._new_client(pool_size=1)
        try:
            while True:
                sent = time.time()
                try:
                    seconds, micros = await asyncio.wait_for(self._redis_time(client), self.HEALTH_TIMEOUT)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._stalled is None:
                        logger.warning("redis broker %s not answering: %s", mask_url(self.url), _describe_error(exc))
                    self._stalled = f"redis not answering: {_describe_error(exc)}"
                else:
                    answered = time.time()
                    self._clock_offset = seconds + micros / 1e6 - (sent + answered) / 2
                    if self._stalled is not None:
                        logger.warning("redis broker %s answering again", mask_url(self.url))
                    self._stalled = None
                await asyncio.sleep(self.HEALTH_INTERVAL)
        finally:
            await self._close_client(client)

    async def _redis_time(self, client: Any) -> tuple[int, int]:
        if not self._sharded:
            return await client.time()
        answers = await client.time(target_nodes=client.PRIMARIES)
        return next(iter(answers.values())) if isinstance(answers, dict) else answers

    # -- names ---------------------------------------------------------------

    def _key(self, room: str, *part: str) -> str:
        return ":".join((f"{self.PREFIX}{{{room}}}", *part))

    def _channel(self, room: str) -> str:
        return self._key(room, "channel")

    def _room_of(self, channel: str) -> str | None:
        head = self.PREFIX + "{"
        return channel[len(head):channel.index("}")] if channel.startswith(head) else None

    def _member(self, client_id: str) -> str:
        """A member entry in Redis: which process holds the client id."""
        return f"{self._node} {client_id}"

    @staticmethod
    def _split_member(entry: str) -> tuple[str, str]:
        node, _, client_id = entry.partition(" ")
        return node, client_id

    def _renew(self, pipe: Any, room: str, client_ids: Iterable[str], expiry: float) -> None:
        pipe.zadd(self._key(room, "members"), {self._member(client_id): expiry for client_id in client_ids})
        pipe.expire(self._key(room, "members"), int(self.presence_ttl * 2) + 1)
        pipe.zadd(self.ROOMS, {room: expiry})

    def _send(self, target: Any, channel: str, payload: str) -> Any:
        """PUBLISH, or SPUBLISH on a Cluster, on the client (awaitable) or a pipeline (queued).
        SPUBLISH goes through a one-line EVAL, so the channel routes like a key of its room."""
        if not self._sharded:
            return target.publish(channel, payload)
        return target.eval(self.SPUBLISH_SCRIPT, 1, channel, payload)

    # -- messages ------------------------------------------------------------

    MESSAGE_HEAD = '{"type":"message","id":'   # every stored frame starts so, then its id and a comma

    async def publish(self, room: str, sender: str, text: str, *, system: bool = False) -> tuple[dict, str]:
        message = message_event(room, 0, sender, text, system=system)
        body = {key: value for key, value in message.items() if key not in ("type", "id")}
        head, tail = self.MESSAGE_HEAD, "," + encode(body)[1:]
        deadline_ms = int((time.time() + self._clock_offset + self.PUBLISH_DEADLINE) * 1000)
        receipt = self._key(room, "sent", secrets.token_hex(8))
        message_id, epoch = await self._call(self._scripts["publish"](
            keys=[self._key(room, "seq"), self._key(room, "history"), receipt, self._channel(room)],
            args=[secrets.token_hex(6), head, tail, self._history, deadline_ms, self.RECEIPT_TTL,
                  self._publish_command]), timeout=self.PUBLISH_TIMEOUT)
        if not message_id:
            raise self._failed(TimeoutError("redis ran the publish after its deadline; not stored"))
        message["id"] = int(message_id)
        return message, epoch

    async def direct(self, room: str | None, message: dict) -> None:
        channel = self._channel(room) if room else self.NODES_CHANNEL
        await self._call(self._send(self._client, channel, self.PAYLOAD_DIRECT + encode(message)))

    async def kick(self, client_id: str, room: str | None, code: int, reason: str) -> None:
        order = {"node": self._node, "client_id": client_id, "room": room, "code": code, "reason": reason}
        await self._call(self._send(self._client, self.NODES_CHANNEL, self.PAYLOAD_KICK + encode(order)))

    async def page(self, room: str, before: int, limit: int) -> list[dict]:
        frames = await self._call(self._client.lrange(self._key(room, "history"), 0, -1))
        return [message for message in map(json.loads, frames) if message["id"] < before][-limit:]

    async def delete(self, room: str, message_id: int) -> bool:
        deleted = await self._call(self._scripts["delete"](
            keys=[self._key(room, "history"), self._channel(room)],
            args=[f"{self.MESSAGE_HEAD}{message_id},", message_id, self._publish_command]))
        return bool(deleted)

    async def history(self, room: str) -> tuple[str, int, list[tuple[int, str]]]:
        # A joining client (we are subscribed) fixes the epoch it will resume from.
        new_epoch = secrets.token_hex(6) if room in self._subscribed else ""
        epoch, last_id, frames = await self._call(self._scripts["history"](
            keys=[self._key(room, "seq"), self._key(room, "history")], args=[new_epoch]))
        start = len(self.MESSAGE_HEAD)   # a frame starts with the head, its id, and a comma
        return epoch or "", int(last_id or 0), [(int(frame[start:frame.index(",", start)]), frame) for frame in frames]

    # -- subscriptions ---------------------------------------------------------

    async def subscribe(self, room: str) -> None:
        async with self._subscription_lock:  # type: ignore[union-attr]
            if room in self._subscribed:
                return
            self._view[room] = {}
            try:
                await self._subscriber_for(self._channel(room)).add(self._channel(room))
                self._subscribed.add(room)
            finally:
                if room not in self._subscribed:
                    self._view.pop(room, None)
        await self._load_members(room)

    def unsubscribe(self, room: str) -> None:
        self._spawn(self._unsubscribe(room))

    async def _unsubscribe(self, room: str) -> None:
        async with self._subscription_lock:  # type: ignore[union-attr]
            if room not in self._subscribed or self._listener.has_room(room):  # type: ignore[union-attr]
                return   # never subscribed, or somebody came back meanwhile
            self._subscribed.discard(room)
            self._view.pop(room, None)
            channel = self._channel(room)
            for subscriber in list(self._subscribers.values()):
                if channel in subscriber.channels:
                    await subscriber.remove(channel)

    def _spawn(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _owner(self, channel: str) -> tuple[str, Any]:
        """Which subscriber should hold ``channel``: its name, and the client it connects with."""
        if not self._sharded:
            return "redis", self._pubsub_client
        try:
            node = self._client.nodes_manager.get_node_from_slot(self._client.keyslot(channel))
        except Exception:   # slots not known yet (the cluster was unreachable), or uncovered
            return "unrouted", None
        return node.name, (node.host, node.port)

    def _subscriber_for(self, channel: str) -> _RedisSubscriber:
        name, client = self._owner(channel)
        subscriber = self._subscribers.get(name)
        if subscriber is None or subscriber.state is SubscriberState.CLOSED:
            if self._sharded and client is not None:
                client = self._node_client(*client)
            subscriber = self._subscribers[name] = _RedisSubscriber(self, name, client, sharded=self._sharded)
        return subscriber

    async def _reroute(self, subscriber: _RedisSubscriber) -> None:
        """Before a Cluster subscriber (re)connects: hand the channels whose slots another
        master owns now (a failover, a migration) to that master's subscriber."""
        if not self._sharded or not subscriber.channels:
            return
        if subscriber.state is not SubscriberState.CONNECTING or subscriber.name == "unrouted":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._client.nodes_manager.initialize(), 3)
        for channel in list(subscriber.channels):
            if self._owner(channel)[0] != subscriber.name:
                was_stale = channel in subscriber.stale or subscriber.state is not SubscriberState.CONNECTING
                subscriber.channels.discard(channel)
                subscriber.stale.discard(channel)
                target = self._subscriber_for(channel)
                if was_stale:
                    target.adopt(channel)
                else:
                    target.channels.add(channel)

    def _moved(self, channel: str) -> None:
        """Redis dropped a shard channel (its slot moved): subscribe it where it lives now."""
        self._spawn(self._rehome(channel))

    async def _rehome(self, channel: str) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._client.nodes_manager.initialize(), 3)
        room = self._room_of(channel)
        if channel == self.NODES_CHANNEL or (room is not None and room in self._subscribed):
            self._subscriber_for(channel).adopt(channel)

    def _subscriber_up(self, subscriber: _RedisSubscriber, recovered: bool) -> None:
        self._error = None
        self._first_attempt.set()  # type: ignore[union-attr]
        if recovered:
            logger.warning("redis broker %s reachable again (%s)", mask_url(self.url), subscriber.name)
            self._spawn(self._refresh_presence())

    def _subscriber_failed(self, subscriber: _RedisSubscriber) -> None:
        self._first_attempt.set()  # type: ignore[union-attr]

    def _subscriber_closed(self, subscriber: _RedisSubscriber) -> None:
        if self._subscribers.get(subscriber.name) is subscriber:
            del self._subscribers[subscriber.name]

    def _resync(self, channel: str) -> None:
        """Messages on ``channel`` may have been missed: its room's clients resume with since."""
        room = self._room_of(channel)
        if room is not None and room in self._subscribed:
            self._listener.resync(room)  # type: ignore[union-attr]

    def _dispatch(self, channel: str, data: str) -> None:
        room = self._room_of(channel)
        tag, body = data[:1], data[1:]
        if tag == self.PAYLOAD_MESSAGE and room is not None:
            epoch, _, frame = body.partition(" ")
            self._listener.deliver(room, json.loads(frame), frame, epoch)  # type: ignore[union-attr]
        elif tag == self.PAYLOAD_DIRECT:
            self._listener.deliver_direct(room, json.loads(body))  # type: ignore[union-attr]
        elif tag == self.PAYLOAD_DELETED and room is not None:
            self._listener.deleted(room, int(body))  # type: ignore[union-attr]
        elif tag == self.PAYLOAD_KICK:
            order = json.loads(body)
            if order["node"] != self._node:
                self._listener.kicked(order["client_id"], order["room"], order["code"], order["reason"])  # type: ignore[union-attr]
        elif tag == self.PAYLOAD_PRESENCE and room is not None:
            node, client_id = self._split_member(body[1:])
            if node != self._node:
                self._apply_presence(room, node, client_id, body[:1] == "+")

    # -- presence --------------------------------------------------------------

    def join(self, room: str, client_id: str) -> None:
        self._apply_presence(room, self._node, client_id, True)
        self._commands.put_nowait(("join", room, client_id))  # type: ignore[union-attr]

    def leave(self, room: str, client_id: str) -> None:
        self._apply_presence(room, self._node, client_id, False)
        self._commands.put_nowait(("leave", room, client_id))  # type: ignore[union-attr]

    def _apply_presence(self, room: str, node: str, client_id: str, joined: bool) -> None:
        """Update the room's view; tell the manager when a client id appears or disappears."""
        members = self._view.get(room)
        if members is None:
            return
        nodes = members.get(client_id)
        if joined:
            if nodes is None:
                members[client_id] = {node}
                self._listener.presence_changed(room, client_id, True)  # type: ignore[union-attr]
            else:
                nodes.add(node)
        elif nodes is not None and node in nodes:
            nodes.discard(node)
            if not nodes:
                del members[client_id]
                self._listener.presence_changed(room, client_id, False)  # type: ignore[union-attr]

    async def _run_commands(self) -> None:
        """Write joins and leaves in order, batching what queued up meanwhile (a join storm)."""
        assert self._commands is not None
        while True:
            batch = [await self._commands.get()]
            while not self._commands.empty() and len(batch) < 500:
                batch.append(self._commands.get_nowait())
            try:
                await self._write_presence(batch)
            except BrokerUnavailable:
                pass   # the heartbeat after the reconnect rewrites presence
            except Exception:
                logger.exception("could not write presence to redis")

    async def _write_presence(self, batch: list[tuple[str, str, str]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        expiry = time.time() + self.presence_ttl
        for action, room, client_id in batch:
            if action == "join":
                self._renew(pipe, room, [client_id], expiry)
                self._send(pipe, self._channel(room), f"{self.PAYLOAD_PRESENCE}+{self._member(client_id)}")
            else:
                pipe.zrem(self._key(room, "members"), self._member(client_id))
                self._send(pipe, self._channel(room), f"{self.PAYLOAD_PRESENCE}-{self._member(client_id)}")
        await self._call(pipe.execute())

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.presence_ttl / 3)
            await self._refresh_presence()

    async def _refresh_presence(self) -> None:
        """Renew this process's members, expire the dead, reconcile room views; never raises."""
        try:
            await self._renew_and_reconcile()
        except BrokerUnavailable:
            pass   # /healthz says so; the next heartbeat tries again
        except Exception:
            logger.exception("could not refresh presence in redis")

    async def _renew_and_reconcile(self) -> None:
        now = time.time()
        expiry = now + self.presence_ttl
        renew = self._client.pipeline(transaction=False)
        for room, client_ids in self._listener.local_members().items():  # type: ignore[union-attr]
            self._renew(renew, room, client_ids, expiry)
        renew.zremrangebyscore(self.ROOMS, "-inf", now)
        await self._call(renew.execute())
        rooms = list(self._subscribed)
        read = self._client.pipeline(transaction=False)
        for room in rooms:
            read.zrangebyscore(self._key(room, "members"), now, "+inf")
            read.zremrangebyscore(self._key(room, "members"), "-inf", now)
        results = await self._call(read.execute())
        for room, entries in zip(rooms, results[::2], strict=True):
            self._reconcile(room, entries)

    def _reconcile(self, room: str, entries: list[str]) -> None:
        """Other processes' members as Redis has them now; their crashed ones leave here."""
        members = self._view.get(room)
        if members is None:
            return
        alive: dict[str, set[str]] = {}
        for entry in entries:
            node, client_id = self._split_member(entry)
            if node != self._node:
                alive.setdefault(client_id, set()).add(node)
        for client_id, nodes in list(members.items()):
            for node in nodes - alive.get(client_id, set()) - {self._node}:
                self._apply_presence(room, node, client_id, False)
        for client_id, nodes in alive.items():
            for node in nodes - members.get(client_id, set()):
                self._apply_presence(room, node, client_id, True)

    async def _load_members(self, room: str) -> None:
        entries = await self._call(self._client.zrangebyscore(self._key(room, "members"), time.time(), "+inf"))
        members = self._view.get(room)
        if members is None:
            return
        for entry in entries:   # merged quietly: newcomers learn them from the welcome
            node, client_id = self._split_member(entry)
            if node != self._node:
                members.setdefault(client_id, set()).add(node)

    async def _stored_members(self, room: str) -> list[str]:
        """A room this process is not in: its members as Redis has them."""
        entries = await self._call(self._client.zrangebyscore(self._key(room, "members"), time.time(), "+inf"))
        return list(dict.fromkeys(self._split_member(entry)[1] for entry in entries))

    def count(self, room: str) -> int:
        return len(self._view.get(room, ()))

    async def roster(self, room: str, limit: int) -> tuple[list[str], int]:
        if room in self._subscribed:
            view = self._view.get(room, {})
            return list(itertools.islice(view, limit)), len(view)
        members = await self._stored_members(room)
        return members[:limit], len(members)

    async def members(self, room: str) -> list[str]:
        if room in self._subscribed:
            return list(self._view.get(room, ()))
        return await self._stored_members(room)

    async def is_member(self, room: str, client_id: str) -> bool:
        if room in self._subscribed:
            return client_id in self._view.get(room, ())
        return client_id in await self._stored_members(room)

    async def rooms(self) -> dict[str, int]:
        now = time.time()
        names = await self._call(self._client.zrangebyscore(self.ROOMS, now, "+inf"))
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.zrangebyscore(self._key(name, "members"), now, "+inf")
        counts = {name: len({self._split_member(entry)[1] for entry in entries})
                  for name, entries in zip(names, await self._call(pipe.execute()), strict=True)}
        return {name: count for name, count in counts.items() if count}


def _split_presence_ttl(url: str) -> tuple[str, float | None]:
    """``redis://host/0?presence_ttl=5``: wschat's own option, removed before redis-py sees the URL."""
    parts = urlsplit(url)
    kept, ttl = [], None
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        if key == "presence_ttl":
            ttl = float(value)
            _require(ttl > 0, "presence_ttl", value, "more than 0 seconds")
        else:
            kept.append(pair)
    return urlunsplit(parts._replace(query="&".join(kept))), ttl


def _describe_error(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if exc.__class__.__name__ == "MasterNotFoundError":   # redis-py appends the reprs of every sentinel client
        text = text.partition(" : ")[0] + " (no sentinel answered, or none watches that service)"
    return redact(text.splitlines()[0])[:200]


# ---------------------------------------------------------------------------
# Authentication and origin
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Admission:
    """Who was let in: ``identity`` from an identity hook (else None), and the credential used."""

    identity: str | None
    credential: str | None


class Gatekeeper:
    """Decides who may connect: the Origin check first, then an identity hook or tokens.

    ``identify(connection)`` sees the whole request or handshake; ``authenticate`` and
    tokens see credentials, read from the ``session`` cookie, the ``token`` query
    parameter and an ``Authorization: Bearer`` header, in that order: any one that
    passes admits the client. An identity hook replaces tokens. Tokens are compared as
    SHA-256 digests with ``hmac.compare_digest``, so neither content nor length leaks
    through timing.
    """

    def __init__(self, settings: Settings, hooks: Hooks | None = None) -> None:
        self._digests = [hashlib.sha256(token.encode()).digest() for token in settings.tokens]
        self._origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}
        hooks = hooks or Hooks()
        self._identify_hook = hooks.identify
        self._authenticate = hooks.authenticate

    @property
    def demo_mode(self) -> bool:
        return not self._digests and self._authenticate is None and self._identify_hook is None

    def origin_allowed(self, connection: HTTPConnection) -> bool:
        """Browsers send Origin; a handshake from another site is cross-site hijacking.

        Allowed: no Origin (not a browser), the page's own origin, and the
        ``allowed_origins`` (``*`` for any), so adding origins never locks out our page.
        """
        origin = connection.headers.get("origin")
        if origin is None or "*" in self._origins:
            return True
        origin = origin.rstrip("/").lower()
        if origin in self._origins:
            return True
        try:
            return urlsplit(origin).netloc == connection.headers.get("host", "").lower()
        except ValueError:   # not even a URL: certainly not our own origin
            return False

    async def admit(self, connection: HTTPConnection, *, credential_required: bool = False) -> Admission | None:
        """A WebSocket handshake: the Origin check, then ``identify``. None: refuse it."""
        if not self.origin_allowed(connection):
            logger.info("refused %s from origin %r", connection.url.path, connection.headers.get("origin"))
            return None
        return await self.identify(connection, credential_required=credential_required)

    async def identify(self, connection: HTTPConnection, *, credential_required: bool = False) -> Admission | None:
        """Who the client is, by an identity hook or tokens. None: refuse it."""
        credentials = _credentials(connection)
        if self._identify_hook is not None:
            identity = await self._identity_from_hook(connection)
            if identity is None or (credential_required and not credentials):
                return None
            return Admission(identity, credentials[0] if credentials else None)
        if self._authenticate is not None:
            for credential in credentials:
                identity = await self._identify(credential)
                if identity is not None:
                    return Admission(identity, credential)
            return None
        if self._digests:
            for credential in credentials:
                if self._token_matches(credential):
                    return Admission(None, credential)
            return None
        if credential_required and not credentials:
            return None
        return Admission(None, credentials[0] if credentials else None)

    def _token_matches(self, credential: str) -> bool:
        digest = hashlib.sha256(credential.encode("utf-8", "surrogatepass")).digest()
        matched = False
        for expected in self._digests:   # no early exit: every token is compared
            matched |= hmac.compare_digest(digest, expected)
        return matched

    async def _identify(self, credential: str) -> str | None:
        try:
            identity = await _result_of(self._authenticate(credential))  # type: ignore[misc]
        except Exception as exc:
            # Its argument is a secret, which a traceback's message could carry: the class only.
            logger.warning("authenticate hook raised %s; refusing the client", exc.__class__.__name__)
            return None
        return _checked_identity(identity, "authenticate")

    async def _identity_from_hook(self, connection: HTTPConnection) -> str | None:
        try:
            identity = await _result_of(self._identify_hook(connection))  # type: ignore[misc]
        except Exception:
            logger.exception("identify hook %s raised; refusing the client", _hook_name(self._identify_hook))
            return None
        return _checked_identity(identity, "identify")


def _checked_identity(identity: Any, hook: str) -> str | None:
    """An identity hook's answer as a client id; None (refuse) when it is none or not a valid one."""
    if identity is None:
        return None
    identity = str(identity)
    if not valid_client_id(identity):
        logger.error("%s hook returned an identity that is not a valid client id; refusing", hook)
        return None
    return identity


def _credentials(connection: HTTPConnection) -> list[str]:
    found = [connection.cookies.get("session"), connection.query_params.get("token")]
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        found.append(value.strip())
    return [credential for credential in found if credential]


# A value runs to the next separator; a quoted cookie value (session="ab12") to its closing quote.
_SECRET_PARAMETER = re.compile(r"(?i)\b(token|session|password|access_token)=(\"[^\"]*\"?|[^&\s\"';,]*)")
_BEARER_VALUE = re.compile(r"(?i)\b(bearer)\s+\"?[^\s\"']+\"?")
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*):[^@/\s]+@")


def redact(text: str, literals: Iterable[str] = ()) -> str:
    """``text`` with token and session values, bearer values, URL passwords and ``literals`` masked."""
    text = _SECRET_PARAMETER.sub(r"\1=***", text)
    text = _BEARER_VALUE.sub(r"\1 ***", text)
    text = _URL_PASSWORD.sub(r"\1:***@", text)
    for literal in literals:
        text = text.replace(literal, "***")
    return text


class _RedactSecrets(logging.Filter):
    """Masks secrets in log records (see ``redact``), and the configured tokens themselves
    wherever they appear: uvicorn logs query strings, and its debug log whole frames.

    One filter per logger, shared by every app in the process: the loggers are global."""

    MIN_LITERAL = 6   # shorter tokens would mask ordinary words

    def __init__(self, name: str = "") -> None:
        super().__init__(name)
        self.literals: set[str] = set()

    def _redact(self, value: Any) -> Any:
        if value is None or isinstance(value, (int, float)):
            return value
        text = value if isinstance(value, str) else str(value)
        redacted = redact(text, self.literals)
        return value if redacted == text else redacted

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._redact(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: self._redact(arg) for key, arg in record.args.items()}
        return True


def _redact_uvicorn_logs(tokens: Iterable[str]) -> None:
    """uvicorn logs every WebSocket path with its query string, tokens included."""
    for name in ("uvicorn.error", "uvicorn.access", "wschat"):
        target = logging.getLogger(name)
        found = [existing for existing in target.filters if isinstance(existing, _RedactSecrets)]
        redact = found[0] if found else _RedactSecrets()
        if not found:
            target.addFilter(redact)
        redact.literals.update(t for t in tokens if len(t) >= _RedactSecrets.MIN_LITERAL)


# ---------------------------------------------------------------------------
# App factory and routes
# ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PostedMessage:
    """Body of ``POST /rooms/{room}/messages``: ``{"text": ..., "from": optional}``."""

    text: str
    sender: str | None = None

    @classmethod
    def parse(cls, raw: bytes) -> PostedMessage:
        """The body, or HTTP 422 saying what is wrong with it."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError):
            raise HTTPException(422, 'body must be JSON: {"text": "...", "from": optional}') from None
        if not isinstance(data, dict):
            raise HTTPException(422, f"body must be a JSON object, got {type(data).__name__}")
        sender = data.get("from")
        if sender is not None and not valid_client_id(sender):
            raise HTTPException(422, '"from" must be a client id: 1-64 characters, no control characters')
        try:
            return cls(checked_text(data.get("text")), sender)
        except ProtocolError as exc:
            raise HTTPException(422, str(exc)) from None


BODY_OVERHEAD = 4096   # bytes a request body may have beyond max_message_size (JSON quoting, "from")


def _room_param(room: str = Path(description="1-64 of A-Z a-z 0-9 _ . -")) -> str:
    """The ``{room}`` of an HTTP route, checked as the WebSocket routes check it."""
    if not valid_room(room):
        raise HTTPException(422, f"room must be 1-64 of A-Z a-z 0-9 _ . -, got {room!r}")
    return room


def create_app(*, host: str = Settings.host, port: int = Settings.port, timeout: float = Settings.timeout,
               broker: str = Settings.broker, tokens: Iterable[str] = Settings.tokens,
               allowed_origins: Iterable[str] = Settings.allowed_origins, history: int = Settings.history,
               retain: int = Settings.retain, max_message_size: int = Settings.max_message_size, rate: float = Settings.rate,
               max_connections: int = Settings.max_connections, send_queue: int = Settings.send_queue,
               workers: int = Settings.workers, log_level: str = Settings.log_level,
               root_path: str = Settings.root_path, allowed_hosts: Iterable[str] = Settings.allowed_hosts,
               max_rooms: int = Settings.max_rooms, presence_interval: float = Settings.presence_interval,
               authenticate: Callable[[str], Any] | None = None,
               identify: Callable[[HTTPConnection], Any] | None = None,
               authorize: Callable[[str | None, str, str | None], Any] | None = None,
               on_message: Callable[[Draft], Any] | None = None,
               on_published: Callable[[dict], Any] | None = None,
               on_join: Callable[[str, str], Any] | None = None,
               on_leave: Callable[[str, str], Any] | None = None,
               routes: Iterable[str] | None = None) -> FastAPI:
    """A FastAPI app serving wschat. The app's ConnectionManager is ``app.state.chat``.

    Settings: one keyword per ``wschat serve`` option (see ``Settings``), plus
    ``presence_interval``; all have defaults. Hooks (SPEC section 11, see ``Hooks``):
    ``identify`` or ``authenticate`` decide who a client is (the identity is its client
    id, and replaces tokens), ``authorize`` what it may do, ``on_message`` what happens to
    its messages; ``on_published``, ``on_join`` and ``on_leave`` hear about the rest.
    ``routes``: the route groups served (``ROUTE_GROUPS``; by default all, but with an
    identity hook the tutorial routes ``echo`` and ``items`` only when named).
    """
    arguments = locals()
    config = Settings(**{name: arguments[name] for name in Settings.__dataclass_fields__})
    hooks = Hooks(identify=identify, authenticate=authenticate, authorize=authorize, on_message=on_message,
                  on_published=on_published, on_join=on_join, on_leave=on_leave)
    groups = route_groups(routes, hooks)
    chat = ConnectionManager(config, hooks=hooks)
    gate = Gatekeeper(config, hooks)
    # root_path is applied by the server (``serve`` hands it to uvicorn), as ASGI intends.
    app = ChatApp(_websocket_routes(chat, gate, groups), max_body=config.max_message_size + BODY_OVERHEAD,
                  title="wschat", version=__version__, lifespan=chat.lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat = chat
    app.state.gatekeeper = gate
    app.state.metrics_explained = False
    if config.allowed_hosts:
        app.guard_hosts(config.allowed_hosts)
    _redact_uvicorn_logs(config.tokens)
    if "page" in groups:
        _add_page(app)
    if "api" in groups:
        _add_http_routes(app, chat, gate)
    return app


def _add_page(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)


def _add_http_routes(app: FastAPI, chat: ConnectionManager, gate: Gatekeeper) -> None:
    async def access(request: Request) -> Admission:
        """Tokens or the identity hook guard everything but the page and /healthz; a
        cross-site write is refused."""
        if request.method != "GET" and not gate.origin_allowed(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "origin not allowed")
        admission = await gate.identify(request)
        if admission is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid credentials",
                                headers={"WWW-Authenticate": "Bearer"})
        return admission

    def allowed_to(action: str) -> Any:
        """A dependency: the caller may ``action`` in the path's room (authorize), or 403.
        The answer is the same whether the room exists or not."""
        async def check(admission: Admission = Depends(access), room: str = Depends(_room_param)) -> Admission:
            if not await chat.allowed(admission.identity, action, room):
                raise HTTPException(status.HTTP_403_FORBIDDEN, f"not allowed to {action} in room {room!r}")
            return admission
        return Depends(check)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        await chat.start()   # mounted apps get no lifespan: a readiness probe may come first
        healthy, reason = chat.health()
        if healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/stats")
    async def stats(admission: Admission = Depends(access)) -> dict:
        if not await chat.allowed(admission.identity, "stats", None):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "not allowed to read stats")
        await chat.start()
        return chat.stats()

    @app.get("/metrics")
    async def metrics(admission: Admission = Depends(access)) -> Response:
        if not await chat.allowed(admission.identity, "stats", None):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "not allowed to read stats")
        if chat.metrics is None:
            if not app.state.metrics_explained:   # once per app, not per scrape
                app.state.metrics_explained = True
                logger.warning("/metrics needs prometheus_client: pip install 'wschat[metrics]'")
            raise HTTPException(status.HTTP_404_NOT_FOUND, "metrics need prometheus_client: "
                                                           "pip install 'wschat[metrics]'")
        await chat.start()
        body, content_type = chat.metrics.render(chat.health()[0])
        return Response(body, media_type=content_type)

    @app.get("/rooms")
    async def rooms(admission: Admission = Depends(access)) -> dict:
        counts = await _broker_call(chat.rooms())
        listed = [{"room": name, "count": count} for name, count in sorted(counts.items())
                  if await chat.allowed(admission.identity, "list", name)]
        return {"rooms": listed}

    @app.get("/rooms/{room}/members", dependencies=[allowed_to("members")])
    async def members(room: str = Depends(_room_param)) -> dict:
        ids = await _broker_call(chat.members(room))
        return {"room": room, "members": ids, "count": len(ids)}

    @app.get("/rooms/{room}/messages", dependencies=[allowed_to("read")])
    async def messages(room: str = Depends(_room_param), since: int | None = Query(None, ge=0),
                       limit: int | None = Query(None, ge=1), before: int | None = Query(None, ge=1)) -> dict:
        if since is not None and before is not None:
            raise HTTPException(422, "give since (page forwards) or before (page backwards), not both")
        return await _broker_call(chat.history_page(room, since=since, limit=limit, before=before))

    @app.delete("/rooms/{room}/messages/{message_id}", status_code=status.HTTP_204_NO_CONTENT,
                dependencies=[allowed_to("delete")])
    async def delete_message(message_id: int, room: str = Depends(_room_param)) -> Response:
        if not await _broker_call(chat.delete_message(room, message_id)):
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no message {message_id} retained in room {room!r}")
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @app.post("/rooms/{room}/messages", status_code=status.HTTP_201_CREATED)
    async def post_message(request: Request, admission: Admission = allowed_to("post"),
                           room: str = Depends(_room_param)) -> dict:
        # The body is read here, after the credentials, authorize and the rate limit, never before.
        _check_post_rate(chat, request, admission)
        body = PostedMessage.parse(await _read_body(request, chat.settings.max_message_size + BODY_OVERHEAD))
        sender = body.sender or admission.identity or "server"
        if admission.identity is not None and sender != admission.identity:
            raise HTTPException(status.HTTP_403_FORBIDDEN, '"from" must be your own identity')
        if utf8_length(body.text) > chat.settings.max_message_size:
            raise HTTPException(413,   # Content Too Large
                                f"text is larger than {chat.settings.max_message_size} bytes")
        draft = Draft(room, sender, body.text, None, "http")
        try:   # a caller without an identity is host code: its messages are "system"
            return await _broker_call(chat.submit(draft, admission.identity, system=admission.identity is None,
                                                  authorized=True))
        except NotAllowed as exc:
            raise HTTPException(status.HTTP_403_FORBIDDEN, exc.reason) from None
        except Reject as exc:
            raise HTTPException(422, exc.reason) from None   # Unprocessable Content


def _check_post_rate(chat: ConnectionManager, request: Request, admission: Admission) -> None:
    """``rate`` applies to POSTs too, per caller: its identity, else its address."""
    key = admission.identity or (request.client.host if request.client else "")
    wait = chat.post_limiter.retry_after(key, time.monotonic())
    if wait:
        chat.count_rate_limited()
        raise HTTPException(status.HTTP_429_TOO_MANY_REQUESTS,
                            f"rate limit exceeded: at most {chat.settings.rate:g} messages per second; not stored",
                            headers={"Retry-After": str(math.ceil(wait))})


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(status.HTTP_413_REQUEST_ENTITY_TOO_LARGE, f"request body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _broker_call(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except BrokerUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"broker unavailable: {exc}") from None
    except RoomLimitReached as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None


class _Endpoint:
    """A WebSocket route as a bare ASGI app, so Starlette adds no wrapper of its own."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[WebSocket], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        scope[RAW_SEND], scope[RAW_RECEIVE] = send, receive
        await self.handler(WebSocket(scope, receive, send))


class ChatApp(FastAPI):
    """The FastAPI app ``create_app`` returns: FastAPI, with its WebSocket routes served
    ahead of FastAPI's own middleware stack.

    That stack (error and exception middleware, body limits, dependency solving, exit
    stacks) is built for HTTP. Held for the life of every open socket, each of its layers
    is a frame of memory, and at a handshake a call chain: a connection storm paid for
    all of them. So a WebSocket scope goes straight to wschat's entrance (the Host guard,
    if any, then the routes), unless middleware was added to this app after
    ``create_app``: then it goes through the whole stack, so that middleware sees it.
    """

    def __init__(self, websocket_routes: dict[str, _Endpoint], *, max_body: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_middleware(_WebSocketRouter, routes=websocket_routes, max_body=max_body)
        self._routes = _WebSocketRouter(self._whole_stack, websocket_routes, max_body)
        self._entrance: Any = self._routes
        self._own_middleware = len(self.user_middleware)

    def guard_hosts(self, allowed_hosts: Iterable[str] = ()) -> None:
        """Serve only loopback names and ``allowed_hosts`` (SPEC section 6), WebSockets included."""
        self.add_middleware(_HostGuard, allowed_hosts=allowed_hosts)
        self._entrance = _HostGuard(self._routes, allowed_hosts)
        self._own_middleware = len(self.user_middleware)

    async def _whole_stack(self, scope: dict, receive: Any, send: Any) -> None:
        await super().__call__(scope, receive, send)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket" and len(self.user_middleware) == self._own_middleware:
            await self._entrance(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)


class _WebSocketRouter:
    """Outermost ASGI middleware of wschat's app: its WebSocket routes go straight to
    their endpoints. FastAPI's per-request machinery (dependency solving, exit stacks,
    exception wrappers) is built for HTTP; held for the life of every open socket it
    cost a quarter of each connection's memory (8 of 33 KB). The four routes are matched
    by hand, too: Starlette's router is three more frames per open socket and a regular
    expression per route per handshake. Other paths go on to FastAPI, except a request
    that declares a body over ``max_body``: 413 before it is read.

    ``routes``: the endpoints by route group (``echo``, ``lobby``, ``items``, ``rooms``).
    """

    def __init__(self, app: Any, routes: dict[str, _Endpoint], max_body: int) -> None:
        self.app = app
        self.routes = routes
        self.max_body = max_body

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "websocket":
            endpoint = self._match(scope)
            await (endpoint or self.app)(scope, receive, send)
        elif scope["type"] == "http" and _declared_length(scope) > self.max_body:
            await _refuse_http(send, status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
                               f"request body larger than {self.max_body} bytes")
        else:
            await self.app(scope, receive, send)

    def _match(self, scope: dict) -> _Endpoint | None:
        """The endpoint for a WebSocket path, with ``path_params`` set as Starlette's router would."""
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):   # mounted: the routes are relative to the mount
            path = path[len(root):]
        parts = path.split("/")
        if len(parts) == 2 and parts[1] == "ws":                                          # /ws
            group, params = "echo", {}
        elif len(parts) == 3 and parts[1] == "ws" and parts[2]:                           # /ws/{client_id}
            group, params = "lobby", {"client_id": parts[2]}
        elif len(parts) == 4 and parts[1] == "items" and parts[2] and parts[3] == "ws":   # /items/{item_id}/ws
            group, params = "items", {"item_id": parts[2]}
        elif len(parts) == 4 and parts[1] == "rooms" and parts[2] and parts[3] == "ws":   # /rooms/{room}/ws
            group, params = "rooms", {"room": parts[2]}
        else:
            return None
        endpoint = self.routes.get(group)
        if endpoint is not None:
            scope["path_params"] = params
        return endpoint


def _declared_length(scope: dict) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


async def _refuse_http(send: Any, code: int, detail: str) -> None:
    """An HTTP error answered by ASGI middleware, in FastAPI's shape (``{"detail": ...}``)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": code,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class _HostGuard:
    """Against DNS rebinding (SPEC section 6): only requests whose ``Host`` is a loopback
    name or address, or one of ``allowed_hosts`` (``*.example.com`` matches subdomains,
    ``*`` anything), are served; any other gets HTTP 400, WebSocket handshakes too.

    A page on ``evil.test`` whose name the attacker re-points at 127.0.0.1 reaches a
    local server with ``Host: evil.test``; the Origin check alone cannot tell, because
    the page is then same-origin with itself.
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed = tuple(host.lower() for host in allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket") and not self.host_allowed(_header(scope, b"host")):
            await self._refuse(scope, send)
        else:
            await self.app(scope, receive, send)

    def host_allowed(self, host_header: str) -> bool:
        host = _host_name(host_header)
        if host is None:
            return False
        if _is_loopback(host) or "*" in self.allowed or host in self.allowed:
            return True
        return any(pattern.startswith("*.") and host.endswith(pattern[1:]) for pattern in self.allowed)

    async def _refuse(self, scope: dict, send: Any) -> None:
        logger.info("refused %s: Host %r is not allowed", scope.get("path"), _header(scope, b"host")[:100])
        if scope["type"] == "http":
            await _refuse_http(send, status.HTTP_400_BAD_REQUEST, "invalid Host header")
        elif "websocket.http.response" in scope.get("extensions", {}):
            body = b"invalid Host header"
            await send({"type": "websocket.http.response.start", "status": 400,
                        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": WS_1008_POLICY_VIOLATION})


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _host_name(host_header: str) -> str | None:
    """``example.com:8000`` -> ``example.com``, ``[::1]:8000`` -> ``[::1]``; None when malformed."""
    host = host_header.strip().lower()
    if host.startswith("["):
        name, _, port = host.partition("]")
        name += "]"
        port = port[1:] if port.startswith(":") else (None if port else "")
    else:
        name, _, port = host.partition(":")
    return name if name not in ("", "[]") and port is not None and (not port or port.isdigit()) else None


@functools.lru_cache(maxsize=256)   # asked for every request's Host; bounded against made-up ones
def _is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ``[::1]``: names no DNS answer can take over."""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def _int_param(websocket: WebSocket, name: str, minimum: int | None = None) -> int | None:
    """An optional integer query parameter; ValueError when it is not one."""
    raw = websocket.query_params.get(name)
    if raw is None:
        return None
    value = int(raw)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
    return value


def _websocket_routes(chat: ConnectionManager, gate: Gatekeeper, groups: frozenset[str]) -> dict[str, _Endpoint]:
    async def refuse(websocket: WebSocket, reason: str) -> None:
        await websocket.close(WS_1008_POLICY_VIOLATION, reason)   # before accepting: HTTP 403

    async def session(websocket: WebSocket, handle: Callable[[Connection, str], Any], *,
                      credential_required: bool = False, client_id: str | None = None, **where: Any) -> None:
        """Admit, authorize the join, connect, feed every accepted frame to ``handle``, always clean up."""
        admission = await gate.admit(websocket, credential_required=credential_required)
        if admission is None:
            return await refuse(websocket, "not allowed")
        client_id = admission.identity or client_id
        if client_id is not None and not valid_client_id(client_id):
            return await refuse(websocket, "invalid client id")
        room = where.get("room")
        if room is not None and not await chat.allowed(admission.identity, "join", room):
            return await refuse(websocket, "not allowed to join this room")
        conn = await chat.connect(websocket, client_id=client_id, credential=admission.credential,
                                  identity=admission.identity, **where)
        if conn is None:
            return
        try:
            await chat.serve_connection(conn, handle)
        finally:
            chat.release(conn)

    async def echo(websocket: WebSocket) -> None:
        await session(websocket, lambda conn, frame: conn.push(f"Message text was: {frame}"))

    async def lobby(websocket: WebSocket) -> None:
        await session(websocket, chat.handle_text, room=LOBBY, view=TEXT_VIEW,
                      client_id=websocket.path_params["client_id"])

    async def item(websocket: WebSocket) -> None:
        item_id = websocket.path_params["item_id"]
        try:
            q = _int_param(websocket, "q")
        except ValueError:
            return await refuse(websocket, "q must be an integer")

        def reply(conn: Connection, frame: str) -> None:
            conn.push(f"Session cookie or query token value is: {conn.credential}")
            if q is not None:
                conn.push(f"Query parameter q is: {q}")
            conn.push(f"Message text was: {frame}, for item ID: {item_id}")

        await session(websocket, reply, credential_required=True)

    async def room_chat(websocket: WebSocket) -> None:
        room = websocket.path_params["room"]
        if not valid_room(room):
            return await refuse(websocket, "invalid room name")
        try:
            since = _int_param(websocket, "since", minimum=0)
        except ValueError:
            return await refuse(websocket, "since must be a message id (an integer, 0 or more)")
        await session(websocket, chat.handle_frame, room=room, since=since,
                      epoch=websocket.query_params.get("epoch"), client_id=websocket.query_params.get("client_id"))

    endpoints = {"echo": echo, "lobby": lobby, "items": item, "rooms": room_chat}
    return {group: _Endpoint(endpoint) for group, endpoint in endpoints.items() if group in groups}


# ---------------------------------------------------------------------------
# Serving: uvicorn's protocols, bounded per connection and tuned for fan-out
# ---------------------------------------------------------------------------

MAX_REQUEST_HEAD = 64 * 1024     # bytes of request line and headers; a larger head is answered 431
REQUEST_HEAD_TIMEOUT = 10.0      # seconds a request head may take to arrive; then the connection is dropped
COALESCE_LIMIT = 64 * 1024       # bytes one tick's writes to a socket may gather before they are handed over
DEFAULT_FRAME_LIMIT = 1024       # pongs held for a socket that no wschat connection is attached to
_PONG = b"\x8a"                  # first byte of an unfragmented PONG frame (FIN + opcode 0xA)


class _WriteBatcher:
    """One callback per event-loop tick flushes every socket written to during that tick."""

    __slots__ = ("_loop", "_dirty")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[_ServerTransport] = []

    def mark(self, transport: _ServerTransport) -> None:
        if not self._dirty:
            self._loop.call_soon(self._flush)
        self._dirty.append(transport)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()


class _ServerTransport:
    """What wschat's protocols write to: the asyncio transport, with three duties added.

    * Coalescing. A fan-out hands each client several frames in a row; written one at
      a time they cost a system call each, which profiling showed to be most of a
      delivery's cost. One tick's writes become one ``write``, but they are handed over
      as soon as they pass ``COALESCE_LIMIT`` bytes: the transport's own flow control
      (``pause_writing`` above its high-water mark) must see them, or a loop publishing
      thousands of messages without yielding would pile them up here, unbounded.
    * Closing for real. ``close()`` waits until everything written has reached the
      peer (asyncio's buffer and the kernel's), then closes; a closing handshake that
      has begun (``give_up_later``) gets ``CLOSE_TIMEOUT`` seconds. After that the
      connection is dropped with a reset, so that neither this process nor the kernel
      keeps the socket and its buffers for a peer that stopped reading. (asyncio's own
      ``close()`` waits for its buffer forever, and the kernel keeps an orphaned
      socket with unsent data for minutes.)
    * Holding reads. ``hold_reading`` stops reading a client for a while (a ping flood
      pays its debt); uvicorn's own pause and resume still work underneath.

    Everything else goes to the real transport.
    """

    __slots__ = ("_transport", "_loop", "_batcher", "_chunks", "_size", "_give_up", "_hold", "_poll", "_paused",
                 "_closing", "_ended")

    batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # one per event loop

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        batcher = self.batchers.get(loop)
        if batcher is None:
            batcher = self.batchers[loop] = _WriteBatcher(loop)
        self._batcher = batcher
        self._chunks: list[bytes] = []
        self._size = 0
        self._give_up: asyncio.TimerHandle | None = None
        self._hold: asyncio.TimerHandle | None = None
        self._poll: asyncio.TimerHandle | None = None
        self._paused = False      # reading paused by the protocol itself
        self._closing = False     # close() was called: nothing more is written
        self._ended = False       # the connection is lost

    @classmethod
    def wrap(cls, transport: Any, loop: asyncio.AbstractEventLoop) -> _ServerTransport:
        """The same wrapper for the HTTP protocol and, after an upgrade, the WebSocket one."""
        return transport if isinstance(transport, cls) else cls(transport, loop)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if not self._chunks:
            self._batcher.mark(self)
        self._chunks.append(data)
        self._size += len(data)
        if self._size > COALESCE_LIMIT:
            self.flush()

    def flush(self) -> None:
        chunks, self._chunks, self._size = self._chunks, [], 0
        if chunks and not self._transport.is_closing():
            self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing or self._ended:
            return
        self.flush()
        self._closing = True   # reading goes on, so that a peer's reset or EOF still ends it early
        self.give_up_later()
        self._close_once_sent()

    def _close_once_sent(self) -> None:
        self._poll = None
        if self._ended:
            return
        if self._peer_reset():
            self.drop()
        elif self._unsent():
            self._poll = self._loop.call_later(0.1, self._close_once_sent)
        else:
            self._transport.close()

    def _peer_reset(self) -> bool:
        sock = self._transport.get_extra_info("socket")
        with contextlib.suppress(OSError, ValueError, AttributeError):
            return sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0
        return False

    def _unsent(self) -> int:
        """Bytes written and not yet sent: asyncio's buffer, plus the kernel's where it says (Linux)."""
        unsent = self._transport.get_write_buffer_size()
        sock = self._transport.get_extra_info("socket")
        if not unsent and sock is not None and fcntl is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                unsent = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return unsent

    def give_up_later(self) -> None:
        """Drop the connection CLOSE_TIMEOUT seconds from now unless it has ended by then."""
        if self._give_up is None and not self._ended:
            self._give_up = self._loop.call_later(CLOSE_TIMEOUT, self.drop)

    def drop(self) -> None:
        """Reset the connection now: nothing more is sent, and the kernel keeps nothing for it."""
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._chunks, self._size, self._closing = [], 0, True
        self._transport.abort()

    def hold_reading(self, seconds: float) -> None:
        self._transport.pause_reading()
        if self._hold is not None:
            self._hold.cancel()
        self._hold = self._loop.call_later(seconds, self._end_hold)

    def _end_hold(self) -> None:
        self._hold = None
        if not self._paused and not self.is_closing():
            self._transport.resume_reading()

    def pause_reading(self) -> None:
        self._paused = True
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if self._hold is None and not self._closing:
            self._transport.resume_reading()

    def ended(self) -> None:
        """The connection is lost: nothing is left to wait for, give up on or hold. The real
        transport is let go too: it points at the protocol, which points here, and that
        cycle would wait for the cyclic garbage collector instead of going with the socket."""
        self._ended = True
        for timer in (self._give_up, self._hold, self._poll):
            if timer is not None:
                timer.cancel()
        self._give_up = self._hold = self._poll = None
        self._chunks = []
        self._transport = _LOST  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class _SmallQueue:
    """What uvicorn's protocol uses of an asyncio.Queue (``put_nowait``, ``get``, ``empty``),
    for one consumer: a list and at most one future. An asyncio.Queue is three deques,
    ~2.5 KB held by every open socket, for what is here (frames going to
    ``take_frames``) the connect event and the disconnect."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class _SmallEvent:
    """What uvicorn's protocol uses of an asyncio.Event (``set``, ``clear``, ``is_set``,
    ``wait``), with one future instead of a deque of waiters (~0.7 KB per socket)."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = True
        self._waiters: list[asyncio.Future] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(True)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> bool:
        if self._set:
            return True
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return await waiter


class _LostTransport:
    """What a _ServerTransport forwards to once its connection is lost: closed, and empty."""

    def is_closing(self) -> bool:
        return True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def _nothing(self, *args: Any) -> None:
        return None

    write = close = abort = pause_reading = resume_reading = set_protocol = _nothing


_LOST = _LostTransport()


def coalescing_websocket_protocol(**kwargs: Any) -> asyncio.Protocol:
    """uvicorn's websockets-sansio protocol, bounded and tuned for fan-out (``serve`` uses it).

    Use it with your own uvicorn: ``uvicorn app:app --ws wschat:coalescing_websocket_protocol``.
    Where this uvicorn lacks what it relies on, uvicorn's own protocol is used instead.
    """
    protocol_class = _websocket_protocol_class()
    if protocol_class is None:
        from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol
        return AutoWebSocketsProtocol(**kwargs)  # type: ignore[misc, operator]
    return protocol_class(**kwargs)


def bounded_http_protocol(**kwargs: Any) -> asyncio.Protocol:
    """uvicorn's httptools protocol with request heads bounded in size and time (``serve`` uses it)."""
    protocol_class = _http_protocol_class()
    if protocol_class is None:
        from uvicorn.protocols.http.auto import AutoHTTPProtocol
        return AutoHTTPProtocol(**kwargs)  # type: ignore[misc, operator]
    return protocol_class(**kwargs)


# What the subclasses below rely on, checked against uvicorn 0.52.1 to 0.54.0 and websockets
# 14.1 to 17.4 (the websockets-sansio protocol exists from uvicorn 0.35, but `disconnected`,
# `close_timeout` and `pause_writing` only from 0.52.1):
# * WebSocketsSansIOProtocol: they override the methods in _SANSIO_NEEDS, read the instance
#   attributes in _SANSIO_ATTRIBUTES, replace `queue` and `writable` with smaller stand-ins
#   offering what the protocol uses of them (put_nowait/get/empty, set/clear/is_set/wait),
#   drop `request` and `response` once the handshake is accepted (read only until then),
#   and call handle_parser_exception and stop_keepalive;
# * websockets' ServerProtocol (`conn`): state, extensions, data_to_send, send_close, and
#   `parser`, the generator closed when the connection is lost;
# * HttpToolsProtocol: the methods in _HTTPTOOLS_NEEDS, `parser` dropped after an upgrade.
# Where any of it is missing, uvicorn's own protocol is used, with a warning: it works,
# without the fast path and without the per-connection bounds of SPEC section 7.
_SANSIO_NEEDS = ("connection_made", "connection_lost", "data_received", "pause_writing", "resume_writing",
                 "handle_connect", "handle_ping", "send_receive_event_to_app", "shutdown", "send",
                 "handle_parser_exception", "stop_keepalive")
_SANSIO_ATTRIBUTES = ("transport", "loop", "conn", "connections", "close_sent", "disconnected", "handshake_complete",
                      "initial_response", "writable", "close_timeout", "frames", "curr_msg_data_type", "logger",
                      "queue")
_HTTPTOOLS_NEEDS = ("connection_made", "connection_lost", "data_received", "on_headers_complete",
                    "on_response_complete", "handle_websocket_upgrade")
_HTTPTOOLS_ATTRIBUTES = ("transport", "loop", "pipeline", "logger", "parser")


def _lacks(cls: type, methods: Iterable[str], attributes: Iterable[str]) -> list[str]:
    """What ``cls`` is missing: methods, and attributes its ``__init__`` never assigns."""
    code = getattr(cls.__init__, "__code__", None)
    assigned = set(code.co_names) if code is not None else set()
    return [name for name in methods if not hasattr(cls, name)] + [name for name in attributes if name not in assigned]


def _usable(cls: type, methods: Iterable[str], attributes: Iterable[str]) -> bool:
    """Whether wschat's subclass of ``cls`` can work here; if not, the log says what is missing."""
    missing = _lacks(cls, methods, attributes)
    if missing:
        logger.warning("this uvicorn's %s lacks %s: using uvicorn's own", cls.__name__, ", ".join(missing))
    return not missing


@functools.lru_cache(maxsize=None)
def _websocket_protocol_class() -> type | None:
    try:
        from uvicorn.protocols.utils import ClientDisconnected
        from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
        from websockets.frames import Frame, Opcode
        from websockets.protocol import State
    except ImportError as exc:
        logger.warning("uvicorn's websockets-sansio protocol is unavailable (%s): using uvicorn's own", exc)
        return None
    if not _usable(WebSocketsSansIOProtocol, _SANSIO_NEEDS, _SANSIO_ATTRIBUTES):
        return None
    open_state = State.OPEN

    def wire(message: dict) -> bytes:
        # Server frames are unmasked and compression is off: the bytes are the same for
        # every recipient, so the first one frames the shared message for all the others.
        framed = message.get(_WIRE)
        if framed is None:
            framed = message[_WIRE] = Frame(Opcode.TEXT, message["text"].encode()).serialize(mask=False)
        return framed

    class CoalescingWebSocketProtocol(WebSocketsSansIOProtocol):
        """websockets-sansio with the changes fan-out and SPEC section 7 need.

        Fast path: writes are coalesced per loop tick (``_ServerTransport``); a text
        message shared by many recipients is framed once; the ``wschat.server`` scope
        extension (a ``ServerSocket``: this object) writes a message at once when the
        socket can take it. Bounds: a closing handshake gets ``CLOSE_TIMEOUT`` seconds
        and then the TCP connection is dropped; PINGs count toward the attached
        connection's rate (over it: no PONG, and the client is not read until its debt
        is paid); PONGs held for a client that does not read count toward its frame
        limit (over it: dropped as slow); invalid UTF-8 closes with 1007 and one log
        line; shutdown never fails on a connection that is already closing. Anything
        unusual (handshake, a negotiated extension) takes uvicorn's own path.
        """

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.queue = _SmallQueue()                # smaller stand-ins, held by every open socket
            self.writable = _SmallEvent()
            self.close_timeout = CLOSE_TIMEOUT        # uvicorn waits 10 s for the peer's close reply
            self.attached: AttachedConnection | None = None
            self.pushing = False                      # frames go to attached.frame_received (take_frames)
            self.direct = False                       # send_nowait may write: see _check_direct
            self.held_pongs = 0                       # pongs written while the transport is paused

        # -- the transport -------------------------------------------------------

        def connection_made(self, transport: Any) -> None:
            super().connection_made(_ServerTransport.wrap(transport, self.loop))

        def connection_lost(self, exc: Exception | None) -> None:
            self.direct = False
            self.transport.ended()
            super().connection_lost(exc)
            # Break the cycles a closed socket would otherwise leave for the cyclic garbage
            # collector (~70 objects each): the connection attached here, the scope pointing
            # back at this protocol (its extension, its send), and websockets' parser generator.
            self.attached, self.pushing = None, False
            scope = getattr(self, "scope", None)
            if scope is not None:
                scope["extensions"].pop(SERVER_EXTENSION, None)
                scope.pop(RAW_SEND, None)      # this protocol's own send and receive, recorded by _Endpoint
                scope.pop(RAW_RECEIVE, None)
            with contextlib.suppress(Exception):
                self.conn.parser.close()

        def pause_writing(self) -> None:
            super().pause_writing()
            self.direct = False

        def resume_writing(self) -> None:
            super().resume_writing()
            self.held_pongs = 0
            self._check_direct()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_closing()

        def _watch_closing(self) -> None:
            # A close frame sent or received: the peer has CLOSE_TIMEOUT to finish.
            if self.handshake_complete and self.conn.state is not State.OPEN:
                self.direct = False
                self.transport.give_up_later()

        def _check_direct(self) -> None:
            # send_nowait runs once per recipient of every message: rather than testing all of
            # this each time, it reads one flag, kept up to date where any of it changes
            # (accept, pause and resume of writing, a close frame, the connection lost).
            self.direct = self.writable.is_set() and self._plain_text_frames()

        # -- ServerSocket: what a wschat Connection may use ------------------------

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if scope is not None:   # the app's task starts later and sees the extension
                scope["extensions"][SERVER_EXTENSION] = self

        def attach(self, connection: AttachedConnection) -> None:
            self.attached = connection

        def take_frames(self) -> bool:
            if self.attached is None or not self.queue.empty():
                return False
            self.pushing = True
            return True

        def pause_reading(self) -> None:
            self.transport.pause_reading()

        def resume_reading(self) -> None:
            self.transport.resume_reading()

        def abort(self) -> None:
            self.transport.drop()

        def open_connections(self) -> int:
            return len(self.connections)

        def _plain_text_frames(self) -> bool:
            # Frames are ours to write: the handshake done, no extension, no close begun.
            return (not self.close_sent and not self.disconnected and self.handshake_complete
                    and self.initial_response is None and not self.conn.extensions
                    and self.conn.state is open_state)

        def send_nowait(self, message: dict) -> bool:
            if self.direct:
                self.transport.write(wire(message))
                return True
            return False

        async def send(self, message: Any) -> None:
            if message["type"] == "websocket.send" and "text" in message:
                if not self.writable.is_set():   # paused by the transport: this client is behind
                    await self.writable.wait()
                if self.disconnected:
                    raise ClientDisconnected()
                if self._plain_text_frames():
                    self.transport.write(wire(message))
                    return
            await super().send(message)
            if message["type"] == "websocket.accept":
                self.request = self.response = None   # the handshake is done: ~25 objects per socket fewer
                self._check_direct()
            self._watch_closing()

        # -- bounds on what a client can make the server hold ----------------------

        def handle_ping(self) -> None:
            # websockets queued a PONG for every PING of this read; which go out is ours to say.
            kept = [chunk for chunk in self.conn.data_to_send() if not chunk.startswith(_PONG) or self._answer_ping()]
            if kept:
                self.transport.write(b"".join(kept))

        def _answer_ping(self) -> bool:
            attached = self.attached
            if attached is not None:
                wait = attached.ping_received()
                if wait:
                    self.transport.hold_reading(wait)
                    return False
            if not self.writable.is_set():   # the client is not reading: its pongs pile up here
                self.held_pongs += 1
                if self.held_pongs > (attached.frame_limit if attached is not None else DEFAULT_FRAME_LIMIT):
                    if attached is not None:
                        attached.overflowed()
                    else:
                        self.transport.drop()
                    return False
            return True

        def send_receive_event_to_app(self) -> None:
            if self.close_sent:
                return super().send_receive_event_to_app()   # discarded there
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if self.curr_msg_data_type == "text":
                try:
                    message = {"type": "websocket.receive", "text": data.decode()}
                except UnicodeDecodeError:
                    # uvicorn would log a traceback per frame; one line is enough for a bad client.
                    self.frames = []
                    self.logger.info("%s - WebSocket sent invalid UTF-8; closing with 1007", _peer(self.client))
                    self.conn.send_close(WS_1007_INVALID_PAYLOAD, "invalid UTF-8")
                    self.handle_parser_exception()
                    return
            else:
                message = {"type": "websocket.receive", "bytes": data}
            if self.pushing:
                self.frames = []
                self.attached.frame_received(message)  # type: ignore[union-attr]
            else:
                super().send_receive_event_to_app()

        def shutdown(self) -> None:
            self.direct = False
            if self.handshake_complete and not self.close_sent and self.conn.state is not State.OPEN:
                # The peer's close (or a protocol error) already began the closing handshake:
                # nothing is left to send, and uvicorn's shutdown would raise InvalidState.
                self.stop_keepalive()
                self.transport.close()
                return
            super().shutdown()

    return CoalescingWebSocketProtocol


@functools.lru_cache(maxsize=None)
def _http_protocol_class() -> type | None:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError as exc:   # no httptools: uvicorn's h11 protocol bounds head size only
        logger.info("httptools unavailable (%s): request heads are bounded in size, not in time", exc)
        return None
    if not _usable(HttpToolsProtocol, _HTTPTOOLS_NEEDS, _HTTPTOOLS_ATTRIBUTES):
        return None

    class BoundedHttpProtocol(HttpToolsProtocol):
        """uvicorn's httptools protocol with request heads bounded (SPEC section 7).

        A head larger than ``MAX_REQUEST_HEAD`` is answered 431 without reading further;
        one not complete ``REQUEST_HEAD_TIMEOUT`` seconds after the connection opened (or
        after the previous response) is dropped. httptools itself limits neither. The
        connection counts in uvicorn's ``connections`` meanwhile, so toward wschat's
        ``max_connections``.
        """

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            self._head_size: int | None = None
            self._head_timer: asyncio.TimerHandle | None = None
            super().connection_made(_ServerTransport.wrap(transport, self.loop))
            self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_arrived()
            self.transport.ended()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            self._head_size = 0
            self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT, self._head_timed_out)

        def _head_arrived(self) -> None:
            self._head_size = None
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            self.logger.info("%s - request head not complete within %g s; connection dropped",
                             _peer(self.client), REQUEST_HEAD_TIMEOUT)
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            if self._head_size is not None:
                self._head_size += len(data)
            super().data_received(data)
            if self._head_size is not None and self._head_size > MAX_REQUEST_HEAD and not self.transport.is_closing():
                self._head_arrived()
                self.logger.info("%s - request head over %d bytes; answered 431", _peer(self.client), MAX_REQUEST_HEAD)
                body = b"request head (request line and headers) larger than 64 KiB"
                self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
                self.transport.close()

        def on_headers_complete(self) -> None:
            self._head_arrived()
            super().on_headers_complete()

        def handle_websocket_upgrade(self) -> None:
            super().handle_websocket_upgrade()
            # The socket is the WebSocket protocol's now; the parser pointing back at this
            # protocol would keep both alive until the cyclic garbage collector came by.
            self.parser = None  # type: ignore[assignment]

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self._head_size is None and not self.pipeline:
                self._await_head()   # keep-alive: the next request's head gets the same bound

    return BoundedHttpProtocol


def _peer(client: tuple[str, int] | None) -> str:
    return "%s:%d" % client if client else "-"


def _serving_protocols() -> dict[str, str]:
    """uvicorn's ``http`` and ``ws`` options for ``serve``: wschat's protocols where they work here."""
    module = _module_name()
    return {"http": f"{module}:bounded_http_protocol" if _http_protocol_class() else "auto",
            "ws": f"{module}:coalescing_websocket_protocol" if _websocket_protocol_class() else "auto"}


def _module_name() -> str:
    """How uvicorn imports this file (``wschat``, or whatever a copy is called)."""
    return os.path.splitext(os.path.basename(__file__))[0]


# ---------------------------------------------------------------------------
# Clients: wschat.connect for bots and scripts, and the terminal chat
# ---------------------------------------------------------------------------

_END = object()   # ends a ChatClient's iteration


class ChatClient:
    """One room of a wschat server, for bots and scripts: what ``wschat.connect`` returns.

    ``async for message in chat`` yields the room's frames as dicts (messages, direct
    messages, presence, deleted), each exactly once, across reconnects too: the replayed
    history of the first connection is yielded once, and after a reconnect the client
    resumes with ``since``/``epoch``, so it gets what it missed and nothing twice (a new
    epoch, a restarted sequence, is a new history). It pings inside the timeout the server
    announces, and reconnects with backoff (0.5 s doubling to 15 s, with jitter) until it
    is closed, or the server refuses it or removes it (1008, 4000-4999): then the
    iteration ends and ``close_code``/``close_reason`` say why. Error frames (a refused or
    rate-limited message) go to ``on_status("error", reason)`` and the log.

    Needs the ``websockets`` package (the extra ``wschat[client]``; uvicorn[standard] has it).
    """

    def __init__(self, url: str, *, room: str | None = None, client_id: str | None = None,
                 token: str | None = None, on_status: Callable[[str, str], Any] | None = None,
                 queue_size: int = 1024) -> None:
        self.base, self.room = _client_base(url, room)
        _check_room(self.room)
        self.client_id = client_id
        self.token = token
        self.epoch: str | None = None
        self.last_id = 0               # the newest message id yielded in this epoch
        self.close_code: int | None = None
        self.close_reason = ""
        self._on_status = on_status
        self._queue: asyncio.Queue = asyncio.Queue(queue_size)
        self._socket: Any = None
        self._connected = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._closing = False

    # -- use ------------------------------------------------------------------

    async def __aenter__(self) -> ChatClient:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    def __aiter__(self) -> ChatClient:
        return self

    async def __anext__(self) -> dict:
        message = await self._queue.get()
        if message is _END:
            self._queue.put_nowait(_END)   # every later call ends too
            raise StopAsyncIteration
        return message

    async def open(self) -> None:
        """Connect and read the welcome; ConnectionError when the server refuses."""
        welcome = await self._connect()
        self._runner = asyncio.ensure_future(self._run(welcome))

    async def send(self, text: str, to: str | None = None) -> None:
        """Send a message (to one member with ``to``); waits while reconnecting. ConnectionError
        when the connection ends under it: the message may not have been delivered."""
        command: dict[str, Any] = {"type": "message", "text": text}
        if to is not None:
            command["to"] = to
        await asyncio.wait_for(self._connected.wait(), 30)
        try:
            await self._socket.send(encode(command))
        except Exception as exc:
            raise ConnectionError(f"not sent, the connection closed: {exc}") from None

    async def history(self, limit: int | None = None) -> list[dict]:
        """The room's latest ``limit`` retained messages (default: what the server replays), oldest first."""
        query = f"?before={2 ** 53}&limit={limit}" if limit else ""
        return (await self._get(f"rooms/{self.room}/messages{query}"))["messages"]

    async def members(self) -> list[str]:
        return (await self._get(f"rooms/{self.room}/members"))["members"]

    async def close(self) -> None:
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self._socket is not None:
            with contextlib.suppress(Exception):
                await self._socket.close()
        self._end()

    # -- the connection ---------------------------------------------------------

    async def _connect(self) -> dict:
        from websockets.asyncio.client import connect as ws_connect
        from websockets.exceptions import InvalidStatus

        query = {"client_id": self.client_id, "token": self.token}
        if self.epoch is not None:
            query.update(since=str(self.last_id), epoch=self.epoch)
        url = self.base.replace("http", "ws", 1) + f"rooms/{self.room}/ws?" + "&".join(
            f"{key}={quote(value, safe='')}" for key, value in query.items() if value is not None)
        try:
            self._socket = await ws_connect(url, open_timeout=10, close_timeout=5, max_queue=64)
        except InvalidStatus as exc:
            raise ConnectionError(f"refused by the server: HTTP {exc.response.status_code}") from None
        welcome = json.loads(await asyncio.wait_for(self._socket.recv(), 10))
        if welcome.get("type") != "welcome":
            raise ConnectionError(f"no welcome from the server: {welcome}")
        self.client_id = welcome["client_id"]
        if welcome["epoch"] != self.epoch:
            self.epoch, self.last_id = welcome["epoch"], 0   # a new sequence: all of it is new
        self._connected.set()
        return welcome

    async def _run(self, welcome: dict) -> None:
        attempt = 0
        while True:
            pinger = asyncio.ensure_future(self._ping(welcome["timeout"]))
            try:
                await self._read()
            except Exception:
                pass
            finally:
                pinger.cancel()
                self._connected.clear()
            socket_, self._socket = self._socket, None
            self.close_code, self.close_reason = socket_.close_code, socket_.close_reason or ""
            if self._closing or self.close_code == WS_1008_POLICY_VIOLATION or 4000 <= (self.close_code or 0) <= 4999:
                self._status("closed", f"closed by the server: {self.close_code} {self.close_reason}".strip())
                return self._end()
            self._status("reconnecting", f"connection lost ({self.close_code} {self.close_reason})".strip())
            while True:
                await asyncio.sleep(min(15.0, 0.5 * 2 ** attempt) * (0.5 + secrets.randbelow(1000) / 2000))
                attempt += 1
                try:
                    welcome = await self._connect()
                    break
                except Exception as exc:   # refused, unreachable, a half-open socket: try again later
                    self._status("reconnecting", f"still away: {exc}")
            attempt = 0
            recovered = welcome.get("recovered")
            self._status("resumed" if recovered else "gap",
                         "reconnected, nothing missed" if recovered else "reconnected; some messages may be missing")

    async def _read(self) -> None:
        async for raw in self._socket:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "error":
                logger.warning("wschat server: %s", frame.get("error"))
                self._status("error", frame.get("error", ""))
                continue
            if kind not in ("message", "presence", "deleted"):
                continue   # pong
            if kind == "message" and "id" in frame:
                if frame["id"] <= self.last_id:
                    continue   # replayed again after a resume: already yielded
                self.last_id = frame["id"]
            await self._queue.put(frame)

    async def _ping(self, timeout: float) -> None:
        every = max(1.0, min(25.0, timeout / 3)) if timeout else 25.0
        with contextlib.suppress(Exception):
            while True:
                await asyncio.sleep(every)
                await self._socket.send(PING_COMMAND)

    async def _get(self, path: str) -> Any:
        request = urllib.request.Request(self.base + path, headers={"Authorization": f"Bearer {self.token}"}
                                         if self.token else {})

        def fetch() -> Any:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())
        return await asyncio.to_thread(fetch)

    def _status(self, event: str, detail: str) -> None:
        if self._on_status is not None:
            self._on_status(event, detail)

    def _end(self) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._queue.put_nowait(_END)


PING_COMMAND = '{"type":"ping"}'


def connect(url: str, *, room: str | None = None, client_id: str | None = None, token: str | None = None,
            on_status: Callable[[str, str], Any] | None = None) -> ChatClient:
    """A ``ChatClient`` for one room: ``async with wschat.connect("ws://host:8000/", room="general",
    client_id="bot") as chat:``, then ``await chat.send(text)`` and ``async for message in chat:``.

    ``url`` is the server's root (any mount prefix included) or a room route
    (``ws://host/rooms/general/ws``); ``room`` defaults to that route's room, else ``lobby``."""
    return ChatClient(url, room=room, client_id=client_id, token=token, on_status=on_status)


def _client_base(url: str, room: str | None) -> tuple[str, str]:
    """(the server's HTTP base URL ending in /, the room) from a ws:// or http:// URL."""
    parts = urlsplit(url)
    _require(parts.scheme in ("ws", "wss", "http", "https") and bool(parts.netloc), "url", url,
             "ws://host:port/ (or wss://, http://, https://), with any mount prefix")
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path or "/"
    found = re.fullmatch(r"(.*/)rooms/([^/]+)/ws", path)
    if found:
        path, room = found.group(1), room or found.group(2)
    if not path.endswith("/"):
        path += "/"
    return f"{scheme}://{parts.netloc}{path}", room or LOBBY


async def _terminal_chat(url: str, room: str | None, name: str | None, token: str | None) -> int:
    """``wschat chat``: each line typed is sent, each message printed; 0 on /quit or end of input."""
    def say(line: str) -> None:
        click.echo(line)

    def status(event: str, detail: str) -> None:
        say(f"! {detail}" if event == "error" else f"* {detail}")

    chat = connect(url, room=room, client_id=name, token=token, on_status=status)
    try:
        await chat.open()
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        say(f"* cannot connect to {chat.base}: {exc}")
        return 1
    say(f"* connected to {chat.room} as {chat.client_id} (/msg NAME TEXT for a direct message, /quit to leave)")
    lines: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def read_stdin() -> None:   # a thread: input() blocks, and the terminal is ours
        for line in iter(sys.stdin.readline, ""):
            loop.call_soon_threadsafe(lines.put_nowait, line.rstrip("\r\n"))
        loop.call_soon_threadsafe(lines.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True, name="wschat chat input").start()
    printer = asyncio.ensure_future(_print_messages(chat, say))
    try:
        while (line := await lines.get()) is not None and line != "/quit":
            direct = re.fullmatch(r"/msg\s+(\S+)\s+(.+)", line)
            if not line.strip():
                continue
            try:
                await (chat.send(direct.group(2), to=direct.group(1)) if direct else chat.send(line))
            except (ConnectionError, asyncio.TimeoutError) as exc:
                say(f"! {exc}")
            if printer.done():
                break
    finally:
        printer.cancel()
        await chat.close()
    return 0


async def _print_messages(chat: ChatClient, say: Callable[[str], None]) -> None:
    async for frame in chat:
        if frame["type"] == "message":
            when = time.strftime("%H:%M", time.localtime(frame["ts"]))
            who = f"{frame['from']} -> {frame['to']}" if frame.get("to") else frame["from"]
            say(f"[{when}] {who}: {frame['text']}")
        elif frame["type"] == "presence":
            for client_id in frame["joined"]:
                say(f"* {client_id} joined")
            for client_id in frame["left"]:
                say(f"* {client_id} left")
        elif frame["type"] == "deleted":
            say(f"* message {frame['id']} was deleted")


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>wschat</title>
<link rel="icon" href="data:,">
<style>
  :root { color-scheme: light dark; --accent: #2563eb; --muted: #6b7280; --line: #d1d5db; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 16px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
         display: flex; flex-direction: column; height: 100vh; height: 100dvh; }
  #stats-toggle { margin-left: auto; padding: .2rem .7rem; font-size: .85rem; }
  #stats { padding: .5rem 1rem; border-bottom: 1px solid var(--line); }
  #stats dl { display: flex; flex-wrap: wrap; gap: .4rem 1.6rem; margin: 0; }
  #stats dt { font-size: .8rem; color: var(--muted); }
  #stats dd { margin: 0; font-size: 1.25rem; font-variant-numeric: tabular-nums; }
  #stats dd[data-state="down"] { color: #b91c1c; }
  #stat-chart { display: block; width: 100%; max-width: 40rem; height: 3rem; margin-top: .4rem; }
  #stat-line { fill: none; stroke: var(--accent); stroke-width: 1; vector-effect: non-scaling-stroke; }
  #stat-note { margin: .2rem 0 0; color: var(--muted); font-size: .8rem; }
  header { display: flex; align-items: baseline; gap: 1rem; flex-wrap: wrap; padding: .6rem 1rem;
           border-bottom: 1px solid var(--line); }
  h1 { font-size: 1.2rem; margin: 0; }
  #status { margin: 0; color: var(--muted); font-size: .95rem; }
  #status[data-state="open"] { color: #15803d; }
  #status[data-state="retry"] { color: #b45309; }
  #status[data-state="error"] { color: #b91c1c; }
  form { margin: 0; }
  #settings { display: flex; flex-wrap: wrap; gap: .5rem .9rem; align-items: end; padding: .6rem 1rem;
              border-bottom: 1px solid var(--line); }
  .field { display: flex; flex-direction: column; gap: .15rem; font-size: .85rem; color: var(--muted); }
  .field[hidden] { display: none; }
  input, select, button { font: inherit; padding: .4rem .55rem; border: 1px solid var(--line);
                          border-radius: .4rem; min-width: 0; }
  input { width: 11rem; }
  button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
  button[hidden] { display: none; }
  button.secondary { background: transparent; color: inherit; border-color: var(--line); }
  main { flex: 1; display: grid; grid-template-columns: 1fr 14rem; min-height: 0; }
  main.solo { grid-template-columns: 1fr; }
  #conversation { display: flex; flex-direction: column; min-height: 0; }
  #older { align-self: center; margin: .4rem 0 0; font-size: .85rem; padding: .2rem .7rem; }
  #messages { list-style: none; margin: 0; padding: .6rem 1rem; overflow-y: auto; min-height: 0; flex: 1; }
  #messages li { padding: .2rem 0; overflow-wrap: anywhere; white-space: pre-wrap; }
  #messages .meta { color: var(--muted); font-size: .8rem; margin-right: .4rem; }
  #messages .from { font-weight: 600; margin-right: .35rem; }
  #messages .notice { color: var(--muted); font-style: italic; }
  #messages .error { color: #b91c1c; }
  #messages .system .from { color: var(--accent); }
  aside { border-left: 1px solid var(--line); padding: .6rem 1rem; overflow-y: auto; min-height: 0; }
  aside h2 { font-size: .95rem; margin: 0 0 .4rem; }
  #members { list-style: none; margin: 0; padding: 0; }
  #members li { padding: .1rem 0; overflow-wrap: anywhere; }
  #composer { display: flex; gap: .5rem; padding: .6rem 1rem; border-top: 1px solid var(--line); }
  #composer .field { flex: 1; }
  #composer input { width: 100%; }
  @media (max-width: 640px) {
    main { grid-template-columns: 1fr; grid-template-rows: 1fr auto; }
    aside { border-left: 0; border-top: 1px solid var(--line); max-height: 7rem; }
    input { width: 8.5rem; }
    body.connected #settings .field { display: none; }   /* room for the conversation */
  }
</style>
</head>
<body>
<header>
  <h1>wschat</h1>
  <p id="status" role="status" aria-live="polite" data-state="closed">Disconnected</p>
  <button id="stats-toggle" type="button" class="secondary" aria-expanded="false" aria-controls="stats">Stats</button>
</header>
<section id="stats" aria-label="Stats" hidden>
  <dl>
    <div><dt>Connections</dt><dd id="stat-connections">-</dd></div>
    <div><dt>Rooms</dt><dd id="stat-rooms">-</dd></div>
    <div><dt>Received/s</dt><dd id="stat-in">-</dd></div>
    <div><dt>Delivered/s</dt><dd id="stat-out">-</dd></div>
    <div><dt>Slow clients dropped</dt><dd id="stat-dropped">-</dd></div>
    <div><dt>Broker</dt><dd id="stat-broker">-</dd></div>
  </dl>
  <svg id="stat-chart" viewBox="0 0 120 30" preserveAspectRatio="none" role="img"
       aria-label="Delivered per second, last two minutes"><polyline id="stat-line" points=""></polyline></svg>
  <p id="stat-note"></p>
</section>
<form id="settings" autocomplete="off">
  <div class="field"><label for="mode">Mode</label>
    <select id="mode"><option value="room">room</option><option value="lobby">lobby</option>
    <option value="item">item</option></select></div>
  <div class="field" data-modes="room"><label for="room">Room</label>
    <input id="room" value="general" maxlength="64" spellcheck="false"></div>
  <div class="field" data-modes="room lobby"><label for="name">Name</label>
    <input id="name" maxlength="64" spellcheck="false" placeholder="optional in a room"></div>
  <div class="field" data-modes="item" hidden><label for="item">Item ID</label>
    <input id="item" value="foo" spellcheck="false"></div>
  <div class="field"><label for="token">Token</label>
    <input id="token" type="password" spellcheck="false"></div>
  <button id="connect" type="submit">Connect</button>
  <button id="disconnect" type="button" class="secondary" hidden>Disconnect</button>
</form>
<main>
  <section id="conversation">
    <button id="older" type="button" class="secondary" hidden>Load older</button>
    <ul id="messages" aria-label="Messages"></ul>
  </section>
  <aside id="member-panel">
    <h2 id="members-title">Members</h2>
    <ul id="members" aria-label="Members"></ul>
  </aside>
</main>
<form id="composer" autocomplete="off">
  <div class="field"><label for="message">Message</label>
    <input id="message" placeholder="Type and press Enter (/msg name text for a direct message)" disabled></div>
  <button id="send" type="submit" disabled>Send</button>
</form>
<script>
(function () {
  "use strict";
  var $ = function (id) { return document.getElementById(id); };
  var ROOM_NAME = /^[A-Za-z0-9_.\\-]{1,64}$/;
  var ws = null, wanted = false, attempt = 0, retryTimer = null, pingTimer = null;
  var joined = false;                // welcomed since Connect: only then is a lost room worth retrying
  var lastId = null, epoch = null, roomKey = null, members = new Set();
  var oldestId = null;               // the oldest message shown: "Load older" pages back from it

  function setStatus(text, state) { $("status").textContent = text; $("status").dataset.state = state; }

  function lineItem(parts, cls) {
    var li = document.createElement("li");
    if (cls) li.className = cls;
    parts.forEach(function (part) {
      var span = document.createElement("span");
      if (part[1]) span.className = part[1];
      span.textContent = part[0];            // untrusted text is only ever text
      li.appendChild(span);
    });
    return li;
  }
  function addLine(parts, cls) {
    var list = $("messages"), li = lineItem(parts, cls);
    var atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    if (atBottom || (cls || "").indexOf("incoming") < 0) list.scrollTop = list.scrollHeight;
    return li;
  }
  function notice(text, cls) { addLine([[text]], cls || "notice"); }

  function renderMembers(count) {
    var list = $("members");
    list.replaceChildren();
    Array.from(members).sort().forEach(function (id) {
      var li = document.createElement("li"); li.textContent = id; list.appendChild(li);
    });
    $("members-title").textContent = "Members (" + (count === undefined ? members.size : count) + ")";
  }

  function appBase() {               // the page is served at the app's root, under any prefix
    var path = location.pathname;
    return path.endsWith("/") ? path : path + "/";
  }
  function socketUrl(path, params) {
    var query = new URLSearchParams();
    Object.keys(params).forEach(function (key) {
      if (params[key] !== null && params[key] !== "") query.set(key, params[key]);
    });
    var qs = query.toString(), scheme = location.protocol === "https:" ? "wss://" : "ws://";
    return scheme + location.host + appBase() + path + (qs ? "?" + qs : "");
  }

  function mode() { return $("mode").value; }
  function showFields() {
    document.querySelectorAll("[data-modes]").forEach(function (el) {
      el.hidden = el.dataset.modes.split(" ").indexOf(mode()) < 0;
    });
    $("member-panel").hidden = mode() !== "room";
    document.querySelector("main").classList.toggle("solo", mode() !== "room");
  }

  function target() {
    var token = $("token").value, name = $("name").value.trim();
    if (mode() === "room") {
      var room = $("room").value.trim();
      if (!ROOM_NAME.test(room)) throw new Error("Room names are 1-64 of A-Z a-z 0-9 _ . -");
      var key = room + "\\u0000" + name;
      if (key !== roomKey) { roomKey = key; lastId = null; epoch = null; }
      var params = {client_id: name, token: token};
      if (lastId !== null) { params.since = lastId; params.epoch = epoch; }
      return socketUrl("rooms/" + encodeURIComponent(room) + "/ws", params);
    }
    if (mode() === "lobby") {
      if (!name) throw new Error("The lobby needs a name");
      return socketUrl("ws/" + encodeURIComponent(name), {token: token});
    }
    var item = $("item").value.trim();
    if (!item) throw new Error("Item mode needs an item ID");
    return socketUrl("items/" + encodeURIComponent(item) + "/ws", {token: token});
  }

  function setConnected(open) {
    $("message").disabled = $("send").disabled = !open;
    if (open) $("message").focus();
  }
  function setWanted(on) {
    wanted = on;
    document.body.classList.toggle("connected", on);
    $("connect").hidden = on; $("disconnect").hidden = !on;
    ["mode", "room", "name", "item", "token"].forEach(function (id) { $(id).disabled = on; });
  }

  function open() {
    var url;
    try { url = target(); } catch (err) { setStatus(err.message, "error"); setWanted(false); return; }
    setStatus(attempt ? "Reconnecting\\u2026" : "Connecting\\u2026", attempt ? "retry" : "closed");
    var socket = ws = new WebSocket(url), opened = false;
    socket.onopen = function () {
      opened = true;
      if (mode() !== "room") { setStatus("Connected (" + mode() + ")", "open"); attempt = 0; setConnected(true); }
    };
    socket.onmessage = function (event) {
      if (socket !== ws) return;
      if (mode() === "room") onRoomFrame(event.data); else addLine([[event.data]], "incoming");
    };
    socket.onclose = function (event) {
      if (socket !== ws) return;
      ws = null; clearInterval(pingTimer); setConnected(false);
      var why = "code " + event.code + (event.reason ? ", " + event.reason : "");
      var removed = event.code >= 4000 && event.code <= 4999;   // the application closed it: do not come back
      var fatal = removed || [1003, 1008, 1009].indexOf(event.code) >= 0;
      if (wanted && mode() === "room" && joined && !fatal) {
        var delay = Math.min(15000, 500 * Math.pow(2, attempt)) * (0.5 + Math.random() / 2);
        attempt += 1;
        setStatus("Connection lost (" + why + "). Reconnecting in " + (delay / 1000).toFixed(1) + " s\\u2026", "retry");
        retryTimer = setTimeout(open, delay);
      } else if (wanted && !opened && !joined) {
        setWanted(false);
        setStatus("Could not connect (" + why + "): refused or unreachable; check the token, room and name", "error");
      } else {
        setWanted(false);
        var said = removed ? "Removed by the server" : event.code === 1008 ? "Not allowed" : "Disconnected";
        setStatus(said + " (" + why + ")", fatal ? "error" : "closed");
      }
    };
  }

  function onRoomFrame(data) {
    var frame;
    try { frame = JSON.parse(data); } catch (err) { return; }
    if (frame.type === "welcome") {
      if (epoch !== null && frame.epoch !== epoch) {
        lastId = null; notice("The room's history restarted on the server.");
      }
      else if (frame.recovered === false) notice("Some messages may have been missed while disconnected.");
      epoch = frame.epoch; attempt = 0; joined = true;
      members = new Set(frame.members); renderMembers(frame.count);
      setStatus("Connected to " + frame.room + " as " + frame.client_id, "open");
      setConnected(true);
      clearInterval(pingTimer);
      var every = frame.timeout > 0 ? Math.max(250, Math.min(25000, frame.timeout * 1000 / 3)) : 25000;
      pingTimer = setInterval(function () { if (ws) ws.send('{"type":"ping"}'); }, every);
    } else if (frame.type === "message") {
      if (typeof frame.id === "number") {
        if (lastId !== null && frame.id <= lastId) return;     // already shown
        lastId = frame.id;
        if (oldestId === null) oldestId = frame.id;
      }
      var li = addLine(messageParts(frame), frame.system ? "incoming system" : "incoming");
      if (typeof frame.id === "number") li.dataset.id = String(frame.id);
      $("older").hidden = oldestId === null || oldestId <= 1;
    } else if (frame.type === "deleted") {
      var gone = $("messages").querySelector('li[data-id="' + String(Number(frame.id)) + '"]');
      if (gone) gone.remove();
    } else if (frame.type === "presence") {
      frame.joined.forEach(function (id) { members.add(id); });
      frame.left.forEach(function (id) { members.delete(id); });
      renderMembers(frame.count);
    } else if (frame.type === "error") {
      addLine([["Error: " + frame.error]], "error");
    }
  }

  var statsTimer = null, lastStats = null, rates = [];
  function pollStats() {             // GET stats every 2 s while the panel is open
    var token = $("token").value;
    fetch(appBase() + "stats", {headers: token ? {"Authorization": "Bearer " + token} : {}, credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (now) {
        var at = Date.now();
        $("stat-connections").textContent = String(now.connections);
        $("stat-rooms").textContent = String(now.rooms);
        $("stat-dropped").textContent = String(now.slow_clients_dropped);
        $("stat-broker").textContent = now.broker.ok ? "ok" : now.broker.status;
        $("stat-broker").dataset.state = now.broker.ok ? "up" : "down";
        if (lastStats) {
          var seconds = Math.max(0.001, (at - lastStats.at) / 1000);
          var inRate = (now.messages_in - lastStats.messages_in) / seconds;
          var outRate = (now.messages_out - lastStats.messages_out) / seconds;
          $("stat-in").textContent = inRate.toFixed(1);
          $("stat-out").textContent = outRate.toFixed(1);
          rates.push(outRate); if (rates.length > 60) rates.shift();
          var top = Math.max.apply(null, rates.concat([1]));
          $("stat-line").setAttribute("points", rates.map(function (rate, i) {
            return (i * 2).toFixed(0) + "," + (30 - 28 * rate / top).toFixed(1);
          }).join(" "));
        }
        now.at = at; lastStats = now;
        $("stat-note").textContent = "This server process; updated " + new Date(at).toLocaleTimeString();
      })
      .catch(function (err) { $("stat-note").textContent = "Stats unavailable (" + err.message + ")"; });
  }
  $("stats-toggle").addEventListener("click", function () {
    var show = $("stats").hidden;
    $("stats").hidden = !show;
    $("stats-toggle").setAttribute("aria-expanded", String(show));
    clearInterval(statsTimer);
    if (show) { lastStats = null; rates = []; pollStats(); statsTimer = setInterval(pollStats, 2000); }
  });
  $("mode").addEventListener("change", showFields);
  function messageParts(frame) {
    var when = new Date(frame.ts * 1000).toLocaleTimeString();
    var who = frame.to ? frame.from + " \\u2192 " + frame.to + ":" : frame.from + ":";
    return [[when, "meta"], [who, "from"], [frame.text]];
  }

  function loadOlder() {             // GET .../messages?before=: what the welcome's replay did not reach
    var room = $("room").value.trim(), token = $("token").value, button = $("older");
    if (oldestId === null) return;
    button.disabled = true;
    var url = appBase() + "rooms/" + encodeURIComponent(room) + "/messages?limit=50&before=" + oldestId;
    fetch(url, {headers: token ? {"Authorization": "Bearer " + token} : {}, credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (page) {
        var list = $("messages"), first = list.firstChild;
        page.messages.forEach(function (frame) {
          var li = lineItem(messageParts(frame), frame.system ? "incoming system" : "incoming");
          li.dataset.id = String(frame.id);
          list.insertBefore(li, first);
        });
        if (page.messages.length) oldestId = page.messages[0].id;
        button.hidden = !page.messages.length || oldestId <= 1;
      })
      .catch(function (err) { notice("Could not load older messages (" + err.message + ")", "error"); })
      .then(function () { button.disabled = false; });
  }

  $("older").addEventListener("click", loadOlder);
  $("settings").addEventListener("submit", function (event) {
    event.preventDefault();
    if (ws) return;
    $("messages").replaceChildren(); members.clear(); renderMembers(0);
    oldestId = null; $("older").hidden = true;
    attempt = 0; joined = false; setWanted(true); open();
  });
  $("disconnect").addEventListener("click", function () {
    setWanted(false); clearTimeout(retryTimer); clearInterval(pingTimer);
    if (ws) ws.close(1000); else setStatus("Disconnected", "closed");
  });
  $("composer").addEventListener("submit", function (event) {
    event.preventDefault();
    var input = $("message"), text = input.value;
    if (!ws || ws.readyState !== WebSocket.OPEN || !text) return;
    if (mode() === "room") {
      var direct = /^\\/msg\\s+(\\S+)\\s+([\\s\\S]+)$/.exec(text);
      var command = direct ? {type: "message", to: direct[1], text: direct[2]} : {type: "message", text: text};
      ws.send(JSON.stringify(command));
    } else {
      ws.send(text);
    }
    input.value = ""; input.focus();
  });
  $("name").value = "guest" + Math.floor(Math.random() * 9000 + 1000);
  showFields(); renderMembers(0);
})();
</script>
</body>
</html>
"""


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------

def _split_commas(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeatable options also take comma-separated lists (that is how env variables carry them)."""
    return tuple(part.strip() for value in values for part in value.split(",") if part.strip())


def _option(*names: str, env: str, **kwargs: Any) -> Callable:
    return click.option(*names, envvar=f"WSCHAT_{env}", show_envvar=True, show_default=True, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="wschat")
def main() -> None:
    """wschat: an embeddable WebSocket chat microservice (rooms, presence, history, push)."""


@main.command()
@_option("--host", env="HOST", default="127.0.0.1", help="Interface to bind; 0.0.0.0 for all.")
@_option("--port", env="PORT", default=8000, type=int, help="TCP port.")
@_option("--timeout", env="TIMEOUT", default=300.0, type=float,
         help="Close a connection silent this many seconds (1000 'Session timeout'); 0 disables.")
@_option("--broker", env="BROKER", default="memory://",
         help="memory:// (one process), sqlite:///chat.db (one process, history kept on disk), "
              "redis://host:port/db, redis+sentinel://host:port,.../DB/SERVICE or "
              "redis+cluster://host:port,.../ (Redis needs wschat[redis]).")
@_option("--token", "tokens", env="TOKENS", multiple=True, callback=_split_commas,
         help="Require this token on WebSockets and POST (repeatable; env: comma-separated). "
              "None: open demo mode.")
@_option("--allowed-origin", "allowed_origins", env="ALLOWED_ORIGIN", multiple=True, callback=_split_commas,
         help="Origin allowed to open WebSockets (repeatable, '*' for any). Default: same origin only.")
@_option("--history", env="HISTORY", default=100, type=int,
         help="Messages a join replays (and GET .../messages returns) per room; 0 keeps none.")
@_option("--retain", env="RETAIN", default=10000, type=int,
         help="Messages the sqlite broker keeps per room (GET .../messages?before=ID pages through them).")
@_option("--max-message-size", env="MAX_MESSAGE_SIZE", default=65536, type=int,
         help="Largest frame in bytes; bigger closes with 1009.")
@_option("--rate", env="RATE", default=20.0, type=float,
         help="Messages per second per connection (burst 2x); 0 disables.")
@_option("--max-connections", env="MAX_CONNECTIONS", default=10000, type=int,
         help="Connections per process; more are refused with 1013.")
@_option("--send-queue", env="SEND_QUEUE", default=1024, type=int,
         help="Frames queued per client before it counts as slow and is closed with 1013.")
@_option("--workers", env="WORKERS", default=1, type=int, help="Worker processes; more than 1 needs a Redis broker.")
@_option("--log-level", env="LOG_LEVEL", default="info", type=click.Choice(LOG_LEVELS, case_sensitive=False),
         help="Log level.")
@_option("--root-path", env="ROOT_PATH", default="", help="Path prefix when served behind a proxy, e.g. /chat.")
@_option("--allowed-host", "allowed_hosts", env="ALLOWED_HOST", multiple=True, callback=_split_commas,
         help="Host name this server answers to (repeatable; *.example.com for subdomains). Default: any, "
              "except in demo mode on a loopback address: loopback names only.")
@_option("--max-rooms", env="MAX_ROOMS", default=10000, type=int,
         help="Rooms the memory broker holds; a join or message that would create another is refused.")
def serve(**options: Any) -> None:
    """Serve the chat: the page at /, WebSockets and the HTTP API."""
    try:
        settings = Settings(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if settings.workers > 1 and urlsplit(settings.broker).scheme in SINGLE_PROCESS_BROKERS:
        raise click.UsageError(f"--workers above 1 needs a shared broker; {mask_url(settings.broker)} serves one "
                               "process: use --broker redis://host:6379/0")
    try:
        app = _serving_app(settings)
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if settings.broker != "memory://":
        _check_broker(app.state.chat.broker)
    if app.state.gatekeeper.demo_mode and not _is_loopback(settings.host):
        click.secho(f"warning: demo mode (no --token) on {settings.host}: anyone who can reach this port can chat",
                    fg="yellow", err=True)
    _run(app, settings)


def _serving_app(settings: Settings) -> FastAPI:
    """The app ``serve`` runs (in each worker): ``create_app``, plus the DNS-rebinding guard
    that a server bound to a loopback address in demo mode needs (SPEC section 6)."""
    app = create_app(**asdict(settings))
    if app.state.gatekeeper.demo_mode and _is_loopback(settings.host) and not settings.allowed_hosts:
        app.guard_hosts()
    return app


@main.command()
@click.argument("url")
@_option("--room", env="CHAT_ROOM", default=None, help="Room to join (default: the URL's room, else lobby).")
@_option("--name", env="CHAT_NAME", default=None, help="Your client id (default: a guest id from the server).")
@_option("--token", env="CHAT_TOKEN", default=None, help="Token, if the server wants one.")
def chat(url: str, room: str | None, name: str | None, token: str | None) -> None:
    """Chat in a room from the terminal: URL is the server, e.g. ws://127.0.0.1:8000/.

    Each line you type is sent; /msg NAME TEXT sends a direct message; /quit or end of
    input leaves. Messages print as [HH:MM] name: text. The connection comes back by
    itself after a restart, resuming where it left off.
    """
    try:
        status = asyncio.run(_terminal_chat(url, room, name, token))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except KeyboardInterrupt:
        status = 0
    sys.exit(status)


def _check_broker(broker: Broker) -> None:
    """Refuse to start on a broker that does not answer: one line, credentials masked."""
    try:
        asyncio.run(broker.ping())  # type: ignore[attr-defined]
    except BrokerUnavailable as exc:
        verb = "open" if isinstance(broker, SQLiteBroker) else "reach"
        raise click.ClickException(f"cannot {verb} broker {mask_url(broker.url)}: {exc}") from None


def _run(app: FastAPI, settings: Settings) -> None:
    import uvicorn  # only the CLI needs the server

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    click.echo(f"wschat {__version__}: open http://{host}:{settings.port}{settings.root_path}/ in a browser")
    _raise_file_limit(settings.max_connections)
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                   root_path=settings.root_path, ws_max_size=settings.max_message_size,
                   ws_per_message_deflate=False, timeout_graceful_shutdown=int(CLOSE_TIMEOUT),
                   h11_max_incomplete_event_size=MAX_REQUEST_HEAD, log_config=_log_config(settings.log_level),
                   **_serving_protocols())
    if settings.workers > 1:
        # Each worker process builds its own app from the same settings; their metrics
        # meet in one directory (prometheus_client's multiprocess mode), removed at exit.
        os.environ[_SETTINGS_VARIABLE] = json.dumps(asdict(settings))
        with _multiprocess_metrics():
            uvicorn.run(f"{_module_name()}:_app_from_environment", factory=True, workers=settings.workers,
                        **options)
    else:
        _freeze_start_up()
        uvicorn.run(app, **options)


_SETTINGS_VARIABLE = "WSCHAT_SETTINGS_JSON"


@contextlib.contextmanager
def _multiprocess_metrics() -> Iterator[None]:
    """PROMETHEUS_MULTIPROC_DIR for the workers: a fresh directory, unless one is set already."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR") or Metrics.create() is None:
        yield
        return
    import tempfile
    with tempfile.TemporaryDirectory(prefix="wschat-metrics-") as directory:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        try:
            yield
        finally:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _app_from_environment() -> FastAPI:
    """The app factory ``serve --workers N`` hands to uvicorn's worker processes."""
    app = _serving_app(Settings(**json.loads(os.environ[_SETTINGS_VARIABLE])))
    _freeze_start_up()
    return app


def _freeze_start_up() -> None:
    """``serve``'s garbage-collector policy (an embedding app's GC is its host's business).

    Python's cyclic collector walks every tracked object in a full collection: at 10,000
    connections (~50 each) that was 300-500 ms with the event loop stopped, several times
    a minute, and a connection storm paid a full collection at every 25 % of growth
    (~150 µs per connection). So what start-up built is frozen (moved out of the
    collector's sight), and so is whatever survives each full collection: the next one
    walks only what is newer. Frozen objects still go when their last reference does
    (a closed socket leaves no cycles: see the protocol's ``connection_lost``); only
    cyclic garbage among them would stay. Measured: bench/run.py scenarios 4 and 6.
    """
    import gc

    def freeze_survivors(phase: str, info: dict) -> None:
        if phase == "stop" and info["generation"] == 2:
            gc.freeze()

    gc.collect()
    gc.freeze()
    gc.callbacks.append(freeze_survivors)


def _raise_file_limit(max_connections: int) -> None:
    """Lift the soft limit on open files toward what ``max_connections`` needs (plus room for
    everything else), as far as the hard limit allows, so that the connection limit, not
    the file limit, is what a flood of sockets runs into."""
    try:
        import resource
    except ImportError:   # not POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < max_connections:
            logger.warning("open-file limit %d is below --max-connections %d", target, max_connections)


def _log_config(level: str) -> dict:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact": {"()": _RedactSecrets}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact"]
    level = "DEBUG" if level.lower() == "trace" else level.upper()
    config["loggers"]["wschat"] = {"handlers": ["default"], "level": level, "propagate": False}
    return config


if __name__ == "__main__":
    main()

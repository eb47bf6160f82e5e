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
import contextlib
import copy
import functools
import hashlib
import hmac
import inspect
import itertools
import json
import logging
import os
import re
import secrets
import time
import weakref
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Protocol
from urllib.parse import urlsplit, urlunsplit

import click
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, WebSocket
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field
from starlette import status
from starlette.requests import HTTPConnection
from starlette.routing import Router, WebSocketRoute

__all__ = [
    "Connection",
    "ConnectionManager",
    "MemoryBroker",
    "RedisBroker",
    "Settings",
    "coalescing_websocket_protocol",
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
WS_1008_POLICY_VIOLATION = status.WS_1008_POLICY_VIOLATION
WS_1009_MESSAGE_TOO_BIG = status.WS_1009_MESSAGE_TOO_BIG
WS_1011_INTERNAL_ERROR = status.WS_1011_INTERNAL_ERROR
WS_1013_TRY_AGAIN_LATER = status.WS_1013_TRY_AGAIN_LATER


class ProtocolError(ValueError):
    """A client frame wschat cannot act on: answered with an error frame, the connection stays open."""


class BrokerUnavailable(RuntimeError):
    """The broker cannot be reached right now: publishers get an error frame, /healthz answers 503."""


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
BROKER_SCHEMES = ("memory", "redis", "rediss", "unix")


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
    max_message_size: int = 64 * 1024
    rate: float = 20.0
    max_connections: int = 10_000
    send_queue: int = 1024
    workers: int = 1
    log_level: str = "info"
    root_path: str = ""
    presence_interval: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", _as_tuple(self.tokens))
        object.__setattr__(self, "allowed_origins", _as_tuple(self.allowed_origins))
        _require(0 < self.port < 65536, "port", self.port, "between 1 and 65535")
        _require(self.timeout >= 0, "timeout", self.timeout, "0 (off) or more seconds")
        _require(self.history >= 0, "history", self.history, "0 (keep none) or more")
        _require(self.max_message_size >= 1, "max_message_size", self.max_message_size, "at least 1 byte")
        _require(self.rate >= 0, "rate", self.rate, "0 (off) or more messages per second")
        _require(self.max_connections >= 1, "max_connections", self.max_connections, "at least 1")
        _require(self.send_queue >= 1, "send_queue", self.send_queue, "at least 1")
        _require(self.workers >= 1, "workers", self.workers, "at least 1")
        _require(self.presence_interval > 0, "presence_interval", self.presence_interval, "more than 0 seconds")
        _require(self.log_level.lower() in LOG_LEVELS, "log_level", self.log_level, f"one of {LOG_LEVELS}")
        _require(urlsplit(self.broker).scheme in BROKER_SCHEMES, "broker", mask_url(self.broker),
                 "memory:// or redis://host:port/db")
        _require(all(t and t.strip() == t for t in self.tokens), "tokens", "<hidden>",
                 "non-empty, without surrounding spaces")
        _require(all(o == "*" or urlsplit(o).netloc for o in self.allowed_origins), "allowed_origins",
                 self.allowed_origins, "'*' or origins like https://example.com")
        _require(self.root_path == "" or (self.root_path.startswith("/") and not self.root_path.endswith("/")),
                 "root_path", self.root_path, "empty or like /chat")

    @property
    def rate_burst(self) -> float:
        """Token-bucket size: a client may send 2 x rate messages at once before it is limited."""
        return 2 * self.rate


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
    """The URL with its password replaced by ***, safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = f"{parts.username}:" if parts.username else ":"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}***@{host}"))


# ---------------------------------------------------------------------------
# Protocol: names, frames and events (pure functions)
# ---------------------------------------------------------------------------

LOBBY = "lobby"
MAX_LISTED_MEMBERS = 100   # welcome and presence frames list at most this many ids
PRESENCE_FRAMES_PER_SECOND = 2000   # per room: a room of N members hears presence every N/2000 s at most
ROOM_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
_ROOM_NAME = re.compile(ROOM_PATTERN)
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")
PONG_FRAME = '{"type":"pong"}'

# Views: how a connection sees its room. JSON is the room protocol, TEXT the lobby's
# tutorial texts; PLAIN connections (echo, item) belong to no room.
JSON_VIEW, TEXT_VIEW, PLAIN_VIEW = "json", "text", "plain"

encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def valid_room(name: str) -> bool:
    return _ROOM_NAME.match(name) is not None


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


def message_event(room: str, message_id: int | None, sender: str, text: str, *, to: str | None = None) -> dict:
    """A chat message as clients see it; direct messages carry ``to`` and no id."""
    event: dict[str, Any] = {"type": "message"}
    if message_id is not None:
        event["id"] = message_id
    event.update({"room": room, "from": sender})
    if to is not None:
        event["to"] = to
    event.update({"text": text, "ts": time.time()})
    return event


def presence_frame(room: str, joined: list[str], left: list[str], count: int) -> str:
    event: dict[str, Any] = {"type": "presence", "room": room, "joined": joined[:MAX_LISTED_MEMBERS],
                             "left": left[:MAX_LISTED_MEMBERS], "count": count}
    if len(joined) > MAX_LISTED_MEMBERS or len(left) > MAX_LISTED_MEMBERS:
        event["truncated"] = True   # the page then reloads GET /rooms/{room}/members
    return encode(event)


def error_frame(reason: str) -> str:
    return encode({"type": "error", "error": reason})


def plan_replay(retained: list[tuple[dict, str]], last_id: int, since: int | None,
                epoch_matches: bool) -> tuple[list[tuple[dict, str]], bool | None]:
    """Which retained messages a (re)connecting client gets, and whether that closes its gap.

    Without ``since`` the client gets all retained messages and no verdict. With it,
    the gap is recovered when the epoch matches and every id after ``since`` is still
    retained; otherwise the client gets everything retained and ``recovered`` is False.
    """
    if since is None:
        return retained, None
    first_retained = retained[0][0]["id"] if retained else last_id + 1
    if epoch_matches and first_retained - 1 <= since <= last_id:
        return [item for item in retained if item[0]["id"] > since], True
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
SEND_NOWAIT = "wschat.send_nowait"    # scope extension: write a message now if the socket can take it
ABORT = "wschat.abort"                # scope extension: drop the TCP connection (a close that never goes out)
CLOSE_TIMEOUT = 5.0                   # seconds a close may take before the connection is given up
_WIRE = "wschat.wire"                 # message key: the frame bytes a server keeps for a shared message


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


class Connection:
    """One accepted WebSocket: who it is, where it is, and its outbound queue.

    ``push`` hands a frame over and returns at once, never waiting for the socket.
    Where the server offers ``wschat.send_nowait`` and the socket can take the frame,
    it is written there and then, as ``websockets.broadcast()`` does. Otherwise it
    joins the connection's queue, and the connection's writer task sends it in order
    when the socket drains; so a socket that stops reading only ever delays itself.
    The writer starts with the first queued frame and then sleeps on a future
    between batches, which is much cheaper than a new task per batch. A queue
    holding ``send_queue`` frames marks a client too slow: see ``ConnectionManager``.
    """

    __slots__ = ("socket", "client_id", "room", "view", "credential", "closed", "last_seen", "idle_timer", "in_room",
                 "_manager", "_loop", "_send", "_send_nowait", "_abort", "_outbox", "_backlog", "_limit",
                 "_writer", "_wakeup", "_close_request", "_close_timer", "_abandoned", "_tokens", "_stamp")

    def __init__(self, manager: ConnectionManager, socket: ChatSocket, *, client_id: str,
                 room: str | None, view: str, credential: str | None = None) -> None:
        self.socket = socket
        self.client_id = client_id
        self.room = room
        self.view = view
        self.credential = credential
        self.closed = False                  # no more frames are accepted
        self._manager = manager
        self._loop = manager.loop
        self._send = _message_sender(socket)
        extensions = getattr(socket, "scope", {}).get("extensions") or {}
        self._send_nowait = extensions.get(SEND_NOWAIT)
        self._abort = extensions.get(ABORT)
        self.last_seen = self._loop.time()
        self._outbox: list[dict] = []
        self._backlog = 0                    # frames queued and not yet handed to the socket
        self._limit = manager.settings.send_queue
        self._writer: asyncio.Task | None = None
        self._wakeup: asyncio.Future | None = None   # set while the writer sleeps
        self._close_request: tuple[int, str] | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._abandoned = False              # drop what is queued: the client is gone or too slow
        self._tokens = manager.settings.rate_burst
        self._stamp = self.last_seen
        self.idle_timer: asyncio.TimerHandle | None = None
        self.in_room = False

    def __repr__(self) -> str:
        return f"<Connection {self.client_id!r} room={self.room!r} view={self.view}>"

    def push(self, frame: str) -> None:
        """Queue one text frame for this client; never waits."""
        self.push_message(text_message(frame))

    def push_message(self, message: dict) -> None:
        """Send or queue one ``websocket.send`` message, possibly shared with other connections."""
        if self.closed:
            return
        if not self._backlog and self._send_nowait is not None and self._send_nowait(message):
            return
        if self._backlog >= self._limit:
            self._manager._overflowed(self)
            return
        self._outbox.append(message)
        self._backlog += 1
        self._wake_writer()

    def send_error(self, reason: str) -> None:
        """An error frame on the room route; a plain ``Error: ...`` line on text routes."""
        self.push(error_frame(reason) if self.view == JSON_VIEW else f"Error: {reason}")

    def close(self, code: int = WS_1000_NORMAL_CLOSURE, reason: str = "", *, discard: bool = False) -> None:
        """Close after the frames already queued, or at once with ``discard=True``."""
        if discard:
            self._abandon()
        if self._close_request is None:
            self.closed = True
            self._close_request = (code, reason)
            self._wake_writer()
            # A client that stopped reading never lets the close frame out: give up on it.
            self._close_timer = self._loop.call_later(CLOSE_TIMEOUT, self._manager._close_timed_out, self)

    def finish(self) -> None:
        """The socket is gone: accept nothing more, and let a sleeping writer end."""
        self.closed = True
        self._wake_writer(start=False)
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None

    def abort(self) -> None:
        """Drop the connection without a closing handshake, where the server allows it."""
        if self._abort is not None:
            self._abort()
        if self._writer is not None:
            self._writer.cancel()

    @property
    def pending(self) -> int:
        """Frames queued and not yet handed to the socket."""
        return self._backlog

    @property
    def writer(self) -> asyncio.Task | None:
        """The task sending this connection's queue, while there is one."""
        return self._writer

    @property
    def closing(self) -> bool:
        """wschat decided to close this client (not merely that its peer went away)."""
        return self._close_request is not None

    def _abandon(self) -> None:
        self._abandoned = True
        self._outbox = []
        self._backlog = 0

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
                        if self._abandoned:
                            break
                        await send(message)
                        if not self._abandoned:   # else the queue was emptied meanwhile
                            self._backlog -= 1
                if self._close_request is not None:
                    await self.socket.close(*self._close_request)
                    return
                if self.closed:
                    return
                self._wakeup = self._loop.create_future()
                await self._wakeup
        except Exception as exc:  # the peer vanished mid-send: the reader cleans up
            self.closed = True
            self._abandon()
            logger.debug("send to %r failed: %s", self, exc.__class__.__name__)
        finally:
            self._writer = self._wakeup = None

    def take_token(self, now: float, rate: float, burst: float) -> bool:
        """Token bucket: ``rate`` tokens a second, at most ``burst`` saved up."""
        tokens = min(burst, self._tokens + (now - self._stamp) * rate)
        self._stamp = now
        if tokens < 1:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1
        return True


class Room:
    """This process's view of one room: its connections by view and by client id."""

    __slots__ = ("name", "json_view", "text_view", "syncing", "catching_up", "clients", "joined", "last_id", "changes",
                 "flush_timer", "subscribed")

    def __init__(self, name: str, subscribed: asyncio.Future) -> None:
        self.name = name
        self.subscribed = subscribed                 # the broker's subscription, shared by entrants
        self.json_view: dict[Connection, None] = {}   # room-protocol connections, live
        self.text_view: dict[Connection, None] = {}   # the lobby's text view
        self.syncing: dict[Connection, list[tuple[int | None, dict]]] = {}   # awaiting history: what came
        self.catching_up: dict[Connection, int] = {}  # replayed up to an id the broker has not delivered yet
        self.last_id = 0                             # the last message id delivered here
        self.clients: dict[str, list[Connection]] = {}
        self.joined: set[str] = set()                # client ids announced to the broker
        self.changes: dict[str, bool] = {}           # presence not yet announced: id -> joined
        self.flush_timer: asyncio.TimerHandle | None = None


class ConnectionManager:
    """Rooms, members and fan-out for one app; reached by host code as ``app.state.chat``.

    Fan-out policy, in the spirit of ``websockets.broadcast()``: delivering a message is
    a synchronous loop that queues one shared, already-encoded frame on each
    recipient's connection and never waits for any socket. Each connection's own writer
    drains its queue. A client whose queue already holds ``send_queue`` frames is too
    slow to keep up: it alone is closed with 1013, its queue discarded, and it is
    counted in ``slow_clients_dropped``; everyone else carries on. A client that
    vanishes mid-send is cleaned up once, quietly, by its own reader.

    The seed tutorial's names are kept: ``connect``, ``disconnect``,
    ``send_personal_message``, ``broadcast`` and ``active_connections``.
    """

    def __init__(self, settings: Settings | None = None, *, broker: Broker | None = None) -> None:
        self.settings = settings or Settings()
        self.broker: Broker = broker or broker_from_url(self.settings.broker, history=self.settings.history)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set by start()
        self._connections: dict[ChatSocket, Connection] = {}
        self._rooms: dict[str, Room] = {}
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
            conn.close(WS_1001_GOING_AWAY, "server shutting down")
        writers = [conn.writer for conn in self._connections.values() if conn.writer is not None]
        if writers:   # the close frames go out; a client that never reads is not waited for
            await asyncio.wait(writers, timeout=grace)
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
        """Every socket currently connected to this app, as in the tutorial."""
        return list(self._connections)

    def new_guest_id(self) -> str:
        while True:
            guest = f"guest-{secrets.token_hex(4)}"
            if not any(guest in room.clients for room in self._rooms.values()):
                return guest

    async def connect(self, websocket: ChatSocket, *, client_id: str | None = None, room: str | None = None,
                      view: str | None = None, since: int | None = None, epoch: str | None = None,
                      credential: str | None = None) -> Connection | None:
        """Accept a socket and, with ``room``, join it: the room protocol by default,
        the lobby text view with ``view=TEXT_VIEW``. Returns None when the server is
        full (the socket was closed with 1013)."""
        await self.start()
        if len(self._connections) >= self.settings.max_connections:
            await websocket.accept()
            await websocket.close(WS_1013_TRY_AGAIN_LATER, "too many connections, try again later")
            return None
        await websocket.accept()
        view = view or (JSON_VIEW if room is not None else PLAIN_VIEW)
        conn = Connection(self, websocket, client_id=client_id or self.new_guest_id(), room=room,
                          view=view, credential=credential)
        self._connections[websocket] = conn
        self._watch_idle(conn)
        if room is not None:
            try:
                await self._enter(conn, since, epoch)
            except BrokerUnavailable as exc:
                conn.close(WS_1013_TRY_AGAIN_LATER, f"broker unavailable: {exc}"[:120])
            except Exception:
                logger.exception("could not join %r to room %r", conn.client_id, room)
                conn.close(WS_1011_INTERNAL_ERROR, "internal error")
            except BaseException:
                self.release(conn)
                raise
        return conn

    def disconnect(self, target: Connection | ChatSocket) -> None:
        """Close a connection (1000) and forget it: it leaves its room at once. Safe to call twice."""
        conn = target if isinstance(target, Connection) else self._connections.get(target)
        if conn is None:
            return
        conn.close(WS_1000_NORMAL_CLOSURE, "disconnected by the server")
        self.release(conn)

    def release(self, conn: Connection) -> None:
        """Forget a connection whose socket has ended: leave its room, stop its timer."""
        self._connections.pop(conn.socket, None)
        conn.finish()
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        self._leave(conn)

    async def frames(self, conn: Connection) -> AsyncIterator[str]:
        """The text frames a client sends, once they pass the limits of SPEC section 7.

        Binary frames close with 1003, frames over ``max_message_size`` with 1009; a
        client over its rate gets an error frame instead of delivery. Once wschat has
        decided to close a client this keeps reading (and ignoring) until the socket
        ends, so the close frame goes out before the handler returns. Frames a peer sent
        just before it left are still delivered, even if a send to it already failed.
        """
        receive = conn.socket.receive
        settings = self.settings
        limit, rate, burst = settings.max_message_size, settings.rate, settings.rate_burst
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if conn.closing:
                continue
            now = conn.last_seen = self.loop.time()
            self.messages_in += 1
            text = message.get("text")
            if text is None:
                conn.close(WS_1003_UNSUPPORTED_DATA, "binary frames are not supported", discard=True)
            elif len(text) > limit // 4 and utf8_length(text) > limit:
                conn.close(WS_1009_MESSAGE_TOO_BIG, f"message larger than {limit} bytes", discard=True)
            elif rate and not conn.take_token(now, rate, burst):
                conn.send_error(f"rate limit exceeded: at most {rate:g} messages per second; not delivered")
            else:
                yield text

    def _watch_idle(self, conn: Connection, delay: float | None = None) -> None:
        # One timer per connection, re-armed lazily: receiving a frame costs nothing.
        if self.settings.timeout:
            conn.idle_timer = self.loop.call_later(delay or self.settings.timeout, self._check_idle, conn)

    def _check_idle(self, conn: Connection) -> None:
        idle = self.loop.time() - conn.last_seen
        if idle >= self.settings.timeout:
            conn.idle_timer = None
            conn.close(WS_1000_NORMAL_CLOSURE, "Session timeout")
        else:
            self._watch_idle(conn, self.settings.timeout - idle)

    def _close_timed_out(self, conn: Connection) -> None:
        if conn.socket in self._connections:
            logger.info("closing %r timed out; dropping the connection", conn.client_id)
            conn.abort()
            self.release(conn)

    def _overflowed(self, conn: Connection) -> None:
        self.slow_clients_dropped += 1
        logger.info("dropping slow client %r: %d frames queued", conn.client_id, conn.pending)
        conn.close(WS_1013_TRY_AGAIN_LATER, "too slow: send queue full", discard=True)
        # Called from inside a fan-out loop over the room: leave it once that loop is done.
        self.loop.call_soon(self._leave, conn)

    # -- rooms ---------------------------------------------------------------

    async def _enter(self, conn: Connection, since: int | None, epoch: str | None) -> None:
        name = conn.room
        assert name is not None
        room = self._rooms.get(name)
        if room is None:
            # Subscribe before reading history, so no message falls between the two.
            room = self._rooms[name] = Room(name, asyncio.ensure_future(self.broker.subscribe(name)))
        conn.in_room = True
        room.clients.setdefault(conn.client_id, []).append(conn)
        if conn.view == TEXT_VIEW:
            room.text_view[conn] = None
        else:
            room.syncing[conn] = []
        try:
            await asyncio.shield(room.subscribed)
            if conn.client_id not in room.joined and conn.in_room:
                room.joined.add(conn.client_id)
                self.broker.join(name, conn.client_id)
            if conn.view == JSON_VIEW:
                await self._welcome(room, conn, since, epoch)
        except BaseException:
            self._leave(conn)
            raise

    async def _welcome(self, room: Room, conn: Connection, since: int | None, epoch: str | None) -> None:
        """Welcome, then the replay, then whatever arrived meanwhile: in id order, once each."""
        current_epoch, last_id, retained = await self.broker.history(room.name)
        members, count = await self.broker.roster(room.name, MAX_LISTED_MEMBERS)
        pending = room.syncing.pop(conn, None)
        if pending is None or conn.closed:
            return
        replay, recovered = plan_replay(retained, last_id, since, epoch in (None, current_epoch))
        welcome = {"type": "welcome", "room": room.name, "client_id": conn.client_id, "members": members,
                   "count": count, "last_id": last_id, "epoch": current_epoch, "timeout": self.settings.timeout}
        if recovered is not None:
            welcome["recovered"] = recovered
        conn.push(encode(welcome))
        for _, frame in replay:
            conn.push(frame)
        for message_id, message in pending:
            if message_id is None or message_id > last_id:
                conn.push_message(message)
        if last_id > room.last_id:
            # The history is ahead of the broker's deliveries here (Redis pub/sub lags a
            # little): skip what the replay already gave, then join the live fan-out.
            room.catching_up[conn] = last_id
        else:
            room.json_view[conn] = None

    def _leave(self, conn: Connection) -> None:
        if not conn.in_room:
            return
        conn.in_room = False
        room = self._rooms[conn.room]  # type: ignore[index]
        room.json_view.pop(conn, None)
        room.text_view.pop(conn, None)
        room.syncing.pop(conn, None)
        room.catching_up.pop(conn, None)
        clients = room.clients[conn.client_id]
        clients.remove(conn)
        if not clients:
            del room.clients[conn.client_id]
            if conn.client_id in room.joined:
                room.joined.discard(conn.client_id)
                self.broker.leave(room.name, conn.client_id)
        if not room.clients:
            if room.flush_timer is not None:
                room.flush_timer.cancel()
            del self._rooms[room.name]
            # Once the subscription settles, even if it failed half way; the broker keeps it
            # when somebody has come back to the room meanwhile.
            room.subscribed.add_done_callback(lambda _: self.broker.unsubscribe(room.name))

    def local_members(self) -> dict[str, list[str]]:
        """Client ids this process has announced, per room (the Redis broker's heartbeat)."""
        return {name: list(room.joined) for name, room in self._rooms.items() if room.joined}

    def has_room(self, name: str) -> bool:
        """Whether this process has anyone in ``name``."""
        return name in self._rooms

    def resync(self, room_name: str) -> None:
        """The broker may have missed messages: ask room-protocol clients to reconnect with ``since``."""
        room = self._rooms.get(room_name)
        if room is not None:
            for conn in [*room.json_view, *room.syncing, *room.catching_up]:
                conn.close(status.WS_1012_SERVICE_RESTART, "broker reconnected; reconnect with since to resume")

    # -- delivery (called by the broker) -------------------------------------

    def deliver(self, room_name: str, message: dict, frame: str) -> None:
        """Fan one stored message out to this process's members of its room."""
        room = self._rooms.get(room_name)
        if room is None:
            return
        message_id = message["id"]
        if message_id <= room.last_id:
            # Ids only grow within a sequence: this one started again (a flushed Redis).
            self.resync(room_name)
        room.last_id = message_id
        delivered = self._fan_out(room, text_message(frame), message_id)
        if room.text_view:
            delivered += self._deliver_text(room, message)
        self.messages_out += delivered

    def _fan_out(self, room: Room, shared: dict, message_id: int | None = None) -> int:
        """Hand one shared message to the room's protocol connections, each in its state."""
        for conn in room.json_view:
            conn.push_message(shared)
        delivered = len(room.json_view)
        for conn, replayed in list(room.catching_up.items()) if room.catching_up else ():
            if message_id is None or message_id > replayed:
                if message_id is not None:   # caught up: from now on an ordinary member
                    del room.catching_up[conn]
                    room.json_view[conn] = None
                conn.push_message(shared)
                delivered += 1
        for pending in room.syncing.values():
            pending.append((message_id, shared))
        return delivered

    def _deliver_text(self, room: Room, message: dict) -> int:
        sender, text = message["from"], message["text"]
        own = text_message(f"You wrote: {text}")
        others = text_message(f"Client #{sender} says: {text}")
        for conn in room.text_view:
            conn.push_message(own if conn.client_id == sender else others)
        return len(room.text_view)

    def deliver_direct(self, room_name: str | None, message: dict) -> None:
        """A direct message: to the recipient's and the sender's connections only."""
        if room_name is None:   # sent without a room: wherever the recipient is connected
            rooms = list(self._rooms.values())
        else:
            rooms = [self._rooms[room_name]] if room_name in self._rooms else []
        sender, recipient, text = message["from"], message["to"], message["text"]
        for room in rooms:
            frame = encode({**message, "room": room.name})
            for client_id in dict.fromkeys((recipient, sender)):
                for conn in room.clients.get(client_id, ()):
                    if conn.view == TEXT_VIEW:
                        conn.push(f"You wrote: {text}" if client_id == sender
                                  else f"Client #{sender} says to you: {text}")
                    elif conn in room.syncing:
                        room.syncing[conn].append((None, text_message(frame)))
                    else:
                        conn.push(frame)
                    self.messages_out += 1

    def presence_changed(self, room_name: str, client_id: str, joined: bool) -> None:
        """A client id joined or left a room anywhere: tell the text view now, the JSON view coalesced."""
        room = self._rooms.get(room_name)
        if room is None:
            return
        if room.text_view:
            line = text_message(f"Client #{client_id} {'joined' if joined else 'left'} the chat")
            for conn in room.text_view:
                if conn.client_id != client_id:
                    conn.push_message(line)
        if room.changes.get(client_id) is (not joined):
            del room.changes[client_id]   # joined and left again within one interval: no news
        else:
            room.changes[client_id] = joined
        if room.flush_timer is None:
            # Big rooms hear about presence less often, so a connect storm into a room
            # of thousands costs each member a few frames, not one every interval.
            delay = max(self.settings.presence_interval, len(room.json_view) / PRESENCE_FRAMES_PER_SECOND)
            room.flush_timer = self.loop.call_later(delay, self._flush_presence, room)

    def _flush_presence(self, room: Room) -> None:
        # At most one presence frame per room per interval, shared by every member, so
        # a join storm costs each member a few frames rather than one per joiner.
        room.flush_timer = None
        changes, room.changes = room.changes, {}
        joined = [client_id for client_id, came in changes.items() if came]
        left = [client_id for client_id, came in changes.items() if not came]
        if not (joined or left):
            return
        self._fan_out(room, text_message(presence_frame(room.name, joined, left, self.broker.count(room.name))))

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
        try:
            if command.to is None:
                await self.broker.publish(conn.room, conn.client_id, command.text)  # type: ignore[arg-type]
            else:
                await self._send_direct(conn, command.to, command.text)
        except BrokerUnavailable as exc:
            conn.send_error(f"not delivered, the broker is unavailable: {exc}")

    async def handle_text(self, conn: Connection, text: str) -> None:
        """Act on one lobby text-view frame: the whole frame is the message."""
        try:
            await self.broker.publish(conn.room, conn.client_id, checked_text(text))  # type: ignore[arg-type]
        except (ProtocolError, BrokerUnavailable) as exc:
            conn.send_error(str(exc))

    async def _send_direct(self, conn: Connection, to: str, text: str) -> None:
        room = conn.room
        assert room is not None
        if not await self.broker.is_member(room, to):
            conn.send_error(f"no member {to!r} in room {room!r}")
            return
        await self.broker.direct(room, message_event(room, None, conn.client_id, text, to=to))

    # -- host API --------------------------------------------------------------

    async def publish(self, room: str, text: str, *, sender: str = "server") -> dict:
        """Publish a message to a room as ``sender``: stored, numbered, delivered to every member.

        Raises ValueError for a bad room name, sender or text, BrokerUnavailable when
        the broker cannot be reached. Returns the stored message."""
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
        return await self.broker.publish(room, sender, text)

    async def send_personal_message(self, message: str, to: ChatSocket | Connection | str, *,
                                    room: str | None = None, sender: str = "server") -> None:
        """Send ``message`` to one client.

        ``to`` a socket or Connection: the text goes to it as is (the tutorial's use).
        ``to`` a client id: a direct message frame to that client's connections, in
        ``room`` or, without it, in every room where it is connected.
        """
        if isinstance(to, str):
            if room is not None:
                _check_room(room)
            await self.start()
            await self.broker.direct(room, message_event(room or "", None, sender, checked_text(message), to=to))
            return
        conn = to if isinstance(to, Connection) else self._connections.get(to)
        if conn is None:
            raise LookupError("that socket is not connected to this manager")
        conn.push(message)

    async def broadcast(self, message: str, *, room: str | None = None) -> int:
        """Send ``message`` as is to every connection (of ``room``) in this process.

        Like the tutorial's broadcast, without its flaw: nothing here waits for a socket.
        For chat messages with ids and history use ``publish``. Returns the number of
        connections reached."""
        shared = text_message(message)
        if room is None:
            targets = list(self._connections.values())
            reached = len(targets)
        else:
            found = self._rooms.get(room)
            if found is None:
                return 0
            targets = list(found.text_view)
            reached = len(targets) + self._fan_out(found, shared)   # after the welcome of anyone joining
        for conn in targets:
            conn.push_message(shared)
        self.messages_out += reached
        return reached

    async def members(self, room: str) -> list[str]:
        """Every client id connected to ``room`` (on any process, with a shared broker)."""
        _check_room(room)
        await self.start()
        return await self.broker.members(room)

    async def history(self, room: str, *, since: int | None = None, limit: int | None = None) -> list[dict]:
        """Retained messages of ``room`` with id > ``since``, oldest first, at most ``limit``."""
        return (await self.history_page(room, since=since, limit=limit))["messages"]

    async def history_page(self, room: str, *, since: int | None = None, limit: int | None = None) -> dict:
        _check_room(room)
        await self.start()
        epoch, last_id, retained = await self.broker.history(room)
        messages = [message for message, _ in retained if since is None or message["id"] > since]
        return {"room": room, "epoch": epoch, "last_id": last_id, "messages": messages[:limit]}

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


# ---------------------------------------------------------------------------
# Brokers: where ids, history and presence live
# ---------------------------------------------------------------------------

class Broker(Protocol):
    """What the manager needs from a broker. ``deliver``, ``deliver_direct`` and
    ``presence_changed`` of the manager are called back for every event, including
    this process's own."""

    url: str

    async def start(self, manager: ConnectionManager) -> None: ...
    async def stop(self) -> None: ...
    def health(self) -> tuple[bool, str]: ...
    async def publish(self, room: str, sender: str, text: str) -> dict: ...
    async def direct(self, room: str | None, message: dict) -> None: ...
    async def history(self, room: str) -> tuple[str, int, list[tuple[dict, str]]]: ...
    async def subscribe(self, room: str) -> None: ...
    def unsubscribe(self, room: str) -> None: ...
    def join(self, room: str, client_id: str) -> None: ...
    def leave(self, room: str, client_id: str) -> None: ...
    def count(self, room: str) -> int: ...
    async def roster(self, room: str, limit: int) -> tuple[list[str], int]: ...
    async def members(self, room: str) -> list[str]: ...
    async def is_member(self, room: str, client_id: str) -> bool: ...
    async def rooms(self) -> dict[str, int]: ...


def broker_from_url(url: str, *, history: int = 100) -> Broker:
    """``memory://`` or ``redis://host:port/db``; Redis is imported only when asked for."""
    if urlsplit(url).scheme == "memory":
        return MemoryBroker(history=history)
    return RedisBroker(url, history=history)


@dataclass
class _Sequence:
    epoch: str
    last_id: int = 0
    retained: deque = field(default_factory=deque)


class MemoryBroker:
    """Everything in this process: the embedded default, and the double for tests.

    A room's sequence starts with its first member or message and lasts as long as the
    broker; a restarted broker starts every room again under a new epoch, so ids from
    before the restart are never trusted.
    """

    url = "memory://"

    def __init__(self, *, history: int = 100) -> None:
        self._history = history
        self._manager: ConnectionManager | None = None
        self._sequences: dict[str, _Sequence] = {}
        self._members: dict[str, dict[str, None]] = {}

    async def start(self, manager: ConnectionManager) -> None:
        self._manager = manager

    async def stop(self) -> None:
        pass

    def health(self) -> tuple[bool, str]:
        return True, "ok"

    def _sequence(self, room: str) -> _Sequence:
        sequence = self._sequences.get(room)
        if sequence is None:
            sequence = self._sequences[room] = _Sequence(epoch=secrets.token_hex(6),
                                                         retained=deque(maxlen=self._history))
        return sequence

    async def publish(self, room: str, sender: str, text: str) -> dict:
        sequence = self._sequence(room)
        sequence.last_id += 1
        message = message_event(room, sequence.last_id, sender, text)
        frame = encode(message)
        if self._history:
            sequence.retained.append((message, frame))
        self._manager.deliver(room, message, frame)  # type: ignore[union-attr]
        return message

    async def direct(self, room: str | None, message: dict) -> None:
        self._manager.deliver_direct(room, message)  # type: ignore[union-attr]

    async def history(self, room: str) -> tuple[str, int, list[tuple[dict, str]]]:
        sequence = self._sequences.get(room)
        if sequence is None:
            if room not in self._members:
                return "", 0, []   # reading an unknown room does not create it
            sequence = self._sequence(room)
        return sequence.epoch, sequence.last_id, list(sequence.retained)

    async def subscribe(self, room: str) -> None:
        pass

    def unsubscribe(self, room: str) -> None:
        pass

    def join(self, room: str, client_id: str) -> None:
        self._members.setdefault(room, {})[client_id] = None
        self._manager.presence_changed(room, client_id, True)  # type: ignore[union-attr]

    def leave(self, room: str, client_id: str) -> None:
        members = self._members.get(room, {})
        members.pop(client_id, None)
        if not members:
            self._members.pop(room, None)
        self._manager.presence_changed(room, client_id, False)  # type: ignore[union-attr]

    def count(self, room: str) -> int:
        return len(self._members.get(room, ()))

    async def roster(self, room: str, limit: int) -> tuple[list[str], int]:
        members = self._members.get(room, {})
        return list(itertools.islice(members, limit)), len(members)

    async def members(self, room: str) -> list[str]:
        return list(self._members.get(room, ()))

    async def is_member(self, room: str, client_id: str) -> bool:
        return client_id in self._members.get(room, ())

    async def rooms(self) -> dict[str, int]:
        return {room: len(members) for room, members in self._members.items()}


class RedisBroker:
    """Rooms shared by every process on one Redis: pub/sub fan-out, ids, history, presence.

    Keys, for room R (all under ``wschat:``):

    * ``room:R`` hash: ``id``, the last message id (HINCRBY), and ``epoch``;
    * ``room:R:history`` list: the last ``history`` frames, appended in the same Lua
      script that takes the id and publishes, so ids, history and fan-out agree;
    * ``room:R:members`` sorted set of ``"NODE CLIENT_ID"`` scored by expiry time,
      refreshed by each process's heartbeat; a crashed process's members expire;
    * ``rooms`` sorted set of room names scored by expiry time.

    Channels: ``wschat:room:R`` carries the room's messages, direct messages and
    presence; ``wschat:nodes`` carries direct messages sent without a room. Each
    process holds one pub/sub connection, subscribed to a room only while it has
    members there. When that connection is lost the broker reconnects with backoff,
    resubscribes, and asks its room clients to reconnect with ``since``, because
    messages published meanwhile never reached it.
    """

    PREFIX = "wschat:"
    ROOM_PREFIX = "wschat:room:"        # room:R keys, and the room's channel
    ROOMS = "wschat:rooms"
    NODES_CHANNEL = "wschat:nodes"
    PUBLISH_SCRIPT = """
        redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
        local id = redis.call('HINCRBY', KEYS[1], 'id', 1)
        if id == 1 then redis.call('DEL', KEYS[2]) end
        local frame = ARGV[2] .. id .. ARGV[3]
        local keep = tonumber(ARGV[4])
        if keep > 0 then
            redis.call('RPUSH', KEYS[2], frame)
            redis.call('LTRIM', KEYS[2], -keep, -1)
        end
        redis.call('PUBLISH', ARGV[5], 'm' .. frame)
        return id
    """

    def __init__(self, url: str, *, history: int = 100, presence_ttl: float | None = None) -> None:
        try:
            import redis.asyncio as aioredis
        except ImportError:
            raise RuntimeError("the Redis broker needs the redis package: pip install 'wschat[redis]'") from None
        self.url = url
        self._aioredis = aioredis
        self._redis_url, url_ttl = _split_presence_ttl(url)
        self.presence_ttl = presence_ttl or url_ttl or 15.0
        self._history = history
        self._node = secrets.token_hex(6)
        self._manager: ConnectionManager | None = None
        self._client: Any = None
        self._pubsub: Any = None
        self._script: Any = None
        self._tasks: set[asyncio.Task] = set()
        self._commands: asyncio.Queue[tuple[str, str, str]] | None = None
        self._subscription_lock: asyncio.Lock | None = None
        self._subscribed: set[str] = set()
        self._confirmations: dict[str, asyncio.Future] = {}
        self._first_attempt: asyncio.Event | None = None
        self._view: dict[str, dict[str, set[str]]] = {}      # room -> client id -> nodes
        self._listening = False          # the pub/sub connection is up and subscribed
        self._lost = False               # it went down since: rooms need a resync
        self._error: str | None = None   # the last command's failure, until one succeeds

    # -- lifecycle -----------------------------------------------------------

    def _new_client(self) -> Any:
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # Fail fast (one retry covers a pooled connection that went stale) and let the
        # broker decide: callers get an error frame, not a hang.
        return self._aioredis.Redis.from_url(self._redis_url, decode_responses=True, retry=Retry(NoBackoff(), 1),
                                             socket_connect_timeout=2, socket_timeout=5)

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless Redis answers now (``serve`` checks this before starting)."""
        client = self._new_client()
        try:
            await asyncio.wait_for(client.ping(), 5)
        except Exception as exc:
            raise BrokerUnavailable(_describe_error(exc)) from None
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def start(self, manager: ConnectionManager) -> None:
        self._manager = manager
        self._client = self._new_client()
        self._script = self._client.register_script(self.PUBLISH_SCRIPT)
        self._commands = asyncio.Queue()
        self._subscription_lock = asyncio.Lock()
        self._first_attempt = asyncio.Event()   # set once the listener connected or failed
        for job in (self._listen(), self._run_commands(), self._heartbeat()):
            task = asyncio.ensure_future(job)
            self._tasks.add(task)
        # Be ready before the server accepts clients, but never block start-up for long:
        # an unreachable Redis is reported by /healthz and retried in the background.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), 3)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        with contextlib.suppress(Exception):   # best effort: others would expire us anyway
            await asyncio.wait_for(self._withdraw_members(), 2)
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def _withdraw_members(self) -> None:
        pipe = self._client.pipeline(transaction=False)
        for room, client_ids in self._manager.local_members().items():  # type: ignore[union-attr]
            for client_id in client_ids:
                pipe.zrem(self._key(room, "members"), self._member(client_id))
                pipe.publish(self._channel(room), f"p-{self._member(client_id)}")
        await pipe.execute()

    def health(self) -> tuple[bool, str]:
        if self._error is not None:
            return False, self._error
        if not self._listening:
            return False, "redis unreachable: reconnecting" if self._lost else "connecting to redis"
        return True, "ok"

    def _failed(self, exc: BaseException) -> BrokerUnavailable:
        reason = _describe_error(exc)
        if self._error is None:
            logger.warning("redis broker %s unreachable: %s", mask_url(self.url), reason)
        self._error = f"redis unreachable: {reason}"
        return BrokerUnavailable(reason)

    async def _call(self, awaitable: Awaitable[Any]) -> Any:
        try:
            result = await awaitable
        except (OSError, asyncio.TimeoutError, self._aioredis.RedisError) as exc:
            raise self._failed(exc) from None
        self._error = None
        return result

    # -- names ---------------------------------------------------------------

    def _key(self, room: str, *part: str) -> str:
        return ":".join((self.ROOM_PREFIX + room, *part))

    def _channel(self, room: str) -> str:
        return self.ROOM_PREFIX + room

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

    # -- messages ------------------------------------------------------------

    async def publish(self, room: str, sender: str, text: str) -> dict:
        message = message_event(room, 0, sender, text)
        body = {key: value for key, value in message.items() if key not in ("type", "id")}
        head, tail = '{"type":"message","id":', "," + encode(body)[1:]
        message_id = await self._call(self._script(
            keys=[self._key(room), self._key(room, "history")],
            args=[secrets.token_hex(6), head, tail, self._history, self._channel(room)]))
        message["id"] = int(message_id)
        return message

    async def direct(self, room: str | None, message: dict) -> None:
        channel = self._channel(room) if room else self.NODES_CHANNEL
        await self._call(self._client.publish(channel, "d" + encode(message)))

    async def history(self, room: str) -> tuple[str, int, list[tuple[dict, str]]]:
        pipe = self._client.pipeline(transaction=True)
        if room in self._subscribed:        # a joining client: fix the epoch it will resume from
            pipe.hsetnx(self._key(room), "epoch", secrets.token_hex(6))
        pipe.hmget(self._key(room), "epoch", "id")
        pipe.lrange(self._key(room, "history"), 0, -1)
        *_, (epoch, last_id), frames = await self._call(pipe.execute())
        return epoch or "", int(last_id or 0), [(json.loads(frame), frame) for frame in frames]

    # -- subscriptions and the listener ---------------------------------------

    async def subscribe(self, room: str) -> None:
        async with self._subscription_lock:  # type: ignore[union-attr]
            if room in self._subscribed:
                return
            if self._pubsub is None:
                raise BrokerUnavailable(self.health()[1])
            channel = self._channel(room)
            confirmed = self._confirmations[channel] = asyncio.get_running_loop().create_future()
            self._view[room] = {}
            try:
                await self._call(self._pubsub.subscribe(channel))
                await self._call(asyncio.wait_for(asyncio.shield(confirmed), 5))
                self._subscribed.add(room)
            finally:
                self._confirmations.pop(channel, None)
                if room not in self._subscribed:
                    self._view.pop(room, None)
        await self._load_members(room)

    def unsubscribe(self, room: str) -> None:
        self._spawn(self._unsubscribe(room))

    async def _unsubscribe(self, room: str) -> None:
        async with self._subscription_lock:  # type: ignore[union-attr]
            if room not in self._subscribed or self._manager.has_room(room):  # type: ignore[union-attr]
                return   # never subscribed, or somebody came back meanwhile
            self._subscribed.discard(room)
            self._view.pop(room, None)
            if self._pubsub is not None:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(self._channel(room))

    def _spawn(self, job: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _listen(self) -> None:
        """Hold the pub/sub connection: reconnect with backoff, resubscribe, resync rooms."""
        backoff = 0.1
        while True:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self.NODES_CHANNEL, *(self._channel(room) for room in self._subscribed))
                self._pubsub = pubsub
                while True:
                    # A bounded wait: a blocking read would trip the socket timeout when idle.
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    if message["channel"] == self.NODES_CHANNEL and message["type"] == "subscribe":
                        self._connected()
                        backoff = 0.1
                    try:
                        self._dispatch(message)
                    except Exception:   # one bad message must not cost every room a resync
                        logger.exception("could not handle a message on %s", message.get("channel"))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(exc)
                self._first_attempt.set()
                self._lost = self._lost or self._listening
                self._listening = False
            finally:
                self._pubsub = None
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _connected(self) -> None:
        self._listening = True
        self._error = None
        self._first_attempt.set()
        if self._lost:
            # Messages published while we were away never reached us: clients resume with since.
            self._lost = False
            logger.warning("redis broker %s reachable again", mask_url(self.url))
            for room in list(self._subscribed):
                self._manager.resync(room)  # type: ignore[union-attr]
            self._spawn(self._refresh_presence())

    def _dispatch(self, message: dict) -> None:
        kind, channel = message["type"], message["channel"]
        if kind == "subscribe":
            confirmed = self._confirmations.get(channel)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            return
        if kind != "message":
            return
        data = message["data"]
        room = channel[len(self.ROOM_PREFIX):] if channel.startswith(self.ROOM_PREFIX) else None
        tag, body = data[:1], data[1:]
        if tag == "m" and room is not None:
            self._manager.deliver(room, json.loads(body), body)  # type: ignore[union-attr]
        elif tag == "d":
            self._manager.deliver_direct(room, json.loads(body))  # type: ignore[union-attr]
        elif tag == "p" and room is not None:
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
                self._manager.presence_changed(room, client_id, True)  # type: ignore[union-attr]
            else:
                nodes.add(node)
        elif nodes is not None and node in nodes:
            nodes.discard(node)
            if not nodes:
                del members[client_id]
                self._manager.presence_changed(room, client_id, False)  # type: ignore[union-attr]

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
                pipe.publish(self._channel(room), f"p+{self._member(client_id)}")
            else:
                pipe.zrem(self._key(room, "members"), self._member(client_id))
                pipe.publish(self._channel(room), f"p-{self._member(client_id)}")
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
        for room, client_ids in self._manager.local_members().items():  # type: ignore[union-attr]
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
    return redact(text.splitlines()[0])[:200]


# ---------------------------------------------------------------------------
# Authentication and origin
# ---------------------------------------------------------------------------

Authenticate = Callable[[str], "str | None | Awaitable[str | None]"]


@dataclass(frozen=True, slots=True)
class Admission:
    """Who was let in: ``identity`` from the authenticate hook (else None), and the credential used."""

    identity: str | None
    credential: str | None


class Gatekeeper:
    """Decides who may connect: the Origin check first, then tokens or the authenticate hook.

    Credentials are read from the ``session`` cookie, the ``token`` query parameter
    and an ``Authorization: Bearer`` header, in that order; any one that passes
    admits the client. Tokens are compared as SHA-256 digests with
    ``hmac.compare_digest``, so neither content nor length leaks through timing.
    """

    def __init__(self, settings: Settings, authenticate: Authenticate | None = None) -> None:
        self._digests = [hashlib.sha256(token.encode()).digest() for token in settings.tokens]
        self._origins = {origin.rstrip("/").lower() for origin in settings.allowed_origins}
        self._authenticate = authenticate

    @property
    def demo_mode(self) -> bool:
        return not self._digests and self._authenticate is None

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
        """Who the client is, by tokens or the authenticate hook. None: refuse it."""
        credentials = _credentials(connection)
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
            identity = self._authenticate(credential)  # type: ignore[misc]
            if inspect.isawaitable(identity):
                identity = await identity
        except Exception as exc:
            logger.warning("authenticate hook raised %s; refusing the client", exc.__class__.__name__)
            return None
        if identity is None:
            return None
        identity = str(identity)
        if not valid_client_id(identity):
            logger.error("authenticate hook returned an identity that is not a valid client id; refusing")
            return None
        return identity


def _credentials(connection: HTTPConnection) -> list[str]:
    found = [connection.cookies.get("session"), connection.query_params.get("token")]
    scheme, _, value = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        found.append(value.strip())
    return [credential for credential in found if credential]


_SECRET_PARAMETER = re.compile(r"(?i)\b(token|session|password|access_token)=[^&\s\"']*")
_BEARER_VALUE = re.compile(r"(?i)\b(bearer)\s+[^\s\"']+")
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

class PostedMessage(BaseModel):
    """Body of ``POST /rooms/{room}/messages``."""

    text: str = Field(min_length=1)
    sender: str | None = Field(default=None, alias="from", min_length=1, max_length=64)


RoomName = Path(pattern=ROOM_PATTERN, description="1-64 of A-Z a-z 0-9 _ . -")


def create_app(*, authenticate: Authenticate | None = None, **settings: Any) -> FastAPI:
    """A FastAPI app serving wschat; keyword settings as in ``Settings`` (one per CLI option).

    ``authenticate`` is an optional sync or async callable ``credential -> identity |
    None``: when given it replaces tokens, and the identity it returns becomes the
    client id. The app's ConnectionManager is ``app.state.chat``.
    """
    config = Settings(**settings)
    chat = ConnectionManager(config)
    gate = Gatekeeper(config, authenticate)
    # root_path is applied by the server (``serve`` hands it to uvicorn), as ASGI intends.
    app = FastAPI(title="wschat", version=__version__, lifespan=chat.lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.chat = chat
    app.state.gatekeeper = gate
    app.add_middleware(_WebSocketRouter, routes=_websocket_routes(chat, gate))
    _redact_uvicorn_logs(config.tokens)
    _add_http_routes(app, chat, gate)
    return app


def _add_http_routes(app: FastAPI, chat: ConnectionManager, gate: Gatekeeper) -> None:
    async def access(request: Request) -> Admission:
        """Tokens guard everything but the page and /healthz; a cross-site POST is refused."""
        if request.method != "GET" and not gate.origin_allowed(request):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "origin not allowed")
        admission = await gate.identify(request)
        if admission is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing or invalid token",
                                headers={"WWW-Authenticate": "Bearer"})
        return admission

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        await chat.start()   # mounted apps get no lifespan: a readiness probe may come first
        healthy, reason = chat.health()
        if healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "reason": reason}, status.HTTP_503_SERVICE_UNAVAILABLE)

    @app.get("/stats", dependencies=[Depends(access)])
    async def stats() -> dict:
        await chat.start()
        return chat.stats()

    @app.get("/rooms", dependencies=[Depends(access)])
    async def rooms() -> dict:
        counts = await _broker_call(chat.rooms())
        return {"rooms": [{"room": name, "count": count} for name, count in sorted(counts.items())]}

    @app.get("/rooms/{room}/members", dependencies=[Depends(access)])
    async def members(room: str = RoomName) -> dict:
        ids = await _broker_call(chat.members(room))
        return {"room": room, "members": ids, "count": len(ids)}

    @app.get("/rooms/{room}/messages", dependencies=[Depends(access)])
    async def messages(room: str = RoomName, since: int | None = Query(None, ge=0),
                       limit: int | None = Query(None, ge=1)) -> dict:
        return await _broker_call(chat.history_page(room, since=since, limit=limit))

    @app.post("/rooms/{room}/messages", status_code=status.HTTP_201_CREATED)
    async def post_message(body: PostedMessage, room: str = RoomName,
                           admission: Admission = Depends(access)) -> dict:
        sender = body.sender or admission.identity or "server"
        if admission.identity is not None and sender != admission.identity:
            raise HTTPException(status.HTTP_403_FORBIDDEN, '"from" must be your own identity')
        if utf8_length(body.text) > chat.settings.max_message_size:
            raise HTTPException(413,   # Content Too Large
                                f"text is larger than {chat.settings.max_message_size} bytes")
        try:
            return await _broker_call(chat.publish(room, body.text, sender=sender))
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None   # Unprocessable Content


async def _broker_call(awaitable: Awaitable[Any]) -> Any:
    try:
        return await awaitable
    except BrokerUnavailable as exc:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, f"broker unavailable: {exc}") from None


class _Endpoint:
    """A WebSocket route as a bare ASGI app, so Starlette adds no wrapper of its own."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[WebSocket], Awaitable[None]]) -> None:
        self.handler = handler

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        scope[RAW_SEND] = send
        await self.handler(WebSocket(scope, receive, send))


class _WebSocketRouter:
    """Outermost ASGI middleware of wschat's app: its WebSocket routes go straight to
    their endpoints. FastAPI's per-request machinery (dependency solving, exit stacks,
    exception wrappers) is built for HTTP; held for the life of every open socket it
    cost a quarter of each connection's memory (8 of 33 KB). Other paths go on to FastAPI.
    """

    def __init__(self, app: Any, routes: list[WebSocketRoute]) -> None:
        self.app = app
        self.router = Router(routes=routes, default=app)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await (self.router if scope["type"] == "websocket" else self.app)(scope, receive, send)


def _int_param(websocket: WebSocket, name: str, minimum: int | None = None) -> int | None:
    """An optional integer query parameter; ValueError when it is not one."""
    raw = websocket.query_params.get(name)
    if raw is None:
        return None
    value = int(raw)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be at least {minimum}")
    return value


def _websocket_routes(chat: ConnectionManager, gate: Gatekeeper) -> list[WebSocketRoute]:
    async def refuse(websocket: WebSocket, reason: str) -> None:
        await websocket.close(WS_1008_POLICY_VIOLATION, reason)   # before accepting: HTTP 403

    async def session(websocket: WebSocket, handle: Callable[[Connection, str], Any], *,
                      credential_required: bool = False, client_id: str | None = None, **where: Any) -> None:
        """Admit, connect, feed every accepted frame to ``handle``, always clean up."""
        admission = await gate.admit(websocket, credential_required=credential_required)
        if admission is None:
            return await refuse(websocket, "not allowed")
        client_id = admission.identity or client_id
        if client_id is not None and not valid_client_id(client_id):
            return await refuse(websocket, "invalid client id")
        conn = await chat.connect(websocket, client_id=client_id, credential=admission.credential, **where)
        if conn is None:
            return
        try:
            async for frame in chat.frames(conn):
                result = handle(conn, frame)
                if result is not None:
                    await result
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

    return [WebSocketRoute("/ws", _Endpoint(echo)),
            WebSocketRoute("/ws/{client_id}", _Endpoint(lobby)),
            WebSocketRoute("/items/{item_id}/ws", _Endpoint(item)),
            WebSocketRoute("/rooms/{room}/ws", _Endpoint(room_chat))]


# ---------------------------------------------------------------------------
# Serving: uvicorn's WebSocket protocol, tuned for fan-out
# ---------------------------------------------------------------------------

class _WriteBatcher:
    """One callback per event-loop tick flushes every socket written to during that tick."""

    __slots__ = ("_loop", "_dirty")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._dirty: list[_CoalescingTransport] = []

    def mark(self, transport: _CoalescingTransport) -> None:
        if not self._dirty:
            self._loop.call_soon(self._flush)
        self._dirty.append(transport)

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for transport in dirty:
            transport.flush()


class _CoalescingTransport:
    """Gathers one event-loop tick of writes to a socket into a single ``write``.

    A fan-out hands each client several frames in a row; written one at a time they
    cost a system call each, which profiling showed to be most of a delivery's cost.
    Everything but ``write`` and ``close`` goes to the real transport.
    """

    __slots__ = ("_transport", "_batcher", "_chunks")

    def __init__(self, transport: asyncio.Transport, batcher: _WriteBatcher) -> None:
        self._transport = transport
        self._batcher = batcher
        self._chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._chunks:
            self._batcher.mark(self)
        self._chunks.append(data)

    def flush(self) -> None:
        chunks, self._chunks = self._chunks, []
        if chunks and not self._transport.is_closing():
            self._transport.write(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalescing_websocket_protocol(**kwargs: Any) -> asyncio.Protocol:
    """uvicorn's websockets-sansio protocol, tuned for fan-out (``serve`` uses it).

    Use it with your own uvicorn: ``uvicorn app:app --ws wschat:coalescing_websocket_protocol``.
    """
    return _coalescing_protocol_class()(**kwargs)


@functools.lru_cache(maxsize=None)
def _coalescing_protocol_class() -> type:
    from uvicorn.protocols.utils import ClientDisconnected
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.frames import Frame, Opcode
    from websockets.protocol import State

    def wire(message: dict) -> bytes:
        # Server frames are unmasked and compression is off: the bytes are the same for
        # every recipient, so the first one frames the shared message for all the others.
        framed = message.get(_WIRE)
        if framed is None:
            framed = message[_WIRE] = Frame(Opcode.TEXT, message["text"].encode()).serialize(mask=False)
        return framed

    class CoalescingWebSocketProtocol(WebSocketsSansIOProtocol):
        """websockets-sansio with a few changes for fan-out.

        Writes are coalesced per loop tick; a text message shared by many recipients is
        framed once; the ``wschat.send_nowait`` scope extension writes a message at once
        when the socket can take it (False when it cannot), so a fan-out needs no task
        per recipient; and ``wschat.abort`` drops a client whose close frame cannot get
        out because it stopped reading. Anything unusual (handshake, close, a
        negotiated extension) takes uvicorn's own path.
        """

        batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()   # one per event loop

        def connection_made(self, transport: Any) -> None:
            batcher = self.batchers.get(self.loop)
            if batcher is None:
                batcher = self.batchers[self.loop] = _WriteBatcher(self.loop)
            super().connection_made(_CoalescingTransport(transport, batcher))

        def handle_connect(self, event: Any) -> None:
            super().handle_connect(event)
            scope = getattr(self, "scope", None)
            if scope is not None:   # the app's task starts later and sees the extensions
                scope["extensions"][SEND_NOWAIT] = self.send_nowait
                scope["extensions"][ABORT] = self.transport.abort

        def _plain_text_frames(self) -> bool:
            # Cheapest tests first: this runs once per recipient of every message.
            return (not self.close_sent and not self.disconnected and self.handshake_complete
                    and self.initial_response is None and not self.conn.extensions
                    and self.conn.state is State.OPEN)

        def send_nowait(self, message: dict) -> bool:
            if self.writable.is_set() and self._plain_text_frames():
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

    return CoalescingWebSocketProtocol


def _websocket_protocol() -> str:
    """Our protocol where this uvicorn has websockets-sansio (0.35+), else uvicorn's choice."""
    try:
        import uvicorn.protocols.websockets.websockets_sansio_impl  # noqa: F401  (a probe)
    except ImportError:
        return "auto"
    _coalescing_protocol_class()
    return f"{_module_name()}:coalescing_websocket_protocol"


def _module_name() -> str:
    """How uvicorn imports this file (``wschat``, or whatever a copy is called)."""
    return os.path.splitext(os.path.basename(__file__))[0]


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
  #messages { list-style: none; margin: 0; padding: .6rem 1rem; overflow-y: auto; min-height: 0; }
  #messages li { padding: .2rem 0; overflow-wrap: anywhere; white-space: pre-wrap; }
  #messages .meta { color: var(--muted); font-size: .8rem; margin-right: .4rem; }
  #messages .from { font-weight: 600; margin-right: .35rem; }
  #messages .notice { color: var(--muted); font-style: italic; }
  #messages .error { color: #b91c1c; }
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
</header>
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
  <ul id="messages" aria-label="Messages"></ul>
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

  function setStatus(text, state) { $("status").textContent = text; $("status").dataset.state = state; }

  function addLine(parts, cls) {
    var list = $("messages"), li = document.createElement("li");
    if (cls) li.className = cls;
    parts.forEach(function (part) {
      var span = document.createElement("span");
      if (part[1]) span.className = part[1];
      span.textContent = part[0];            // untrusted text is only ever text
      li.appendChild(span);
    });
    var atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    list.appendChild(li);
    if (atBottom || cls !== "incoming") list.scrollTop = list.scrollHeight;
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
      var fatal = [1003, 1008, 1009].indexOf(event.code) >= 0;
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
        setStatus("Disconnected (" + why + ")", fatal ? "error" : "closed");
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
      }
      var when = new Date(frame.ts * 1000).toLocaleTimeString();
      var who = frame.to ? frame.from + " \\u2192 " + frame.to + ":" : frame.from + ":";
      addLine([[when, "meta"], [who, "from"], [frame.text]], "incoming");
    } else if (frame.type === "presence") {
      frame.joined.forEach(function (id) { members.add(id); });
      frame.left.forEach(function (id) { members.delete(id); });
      renderMembers(frame.count);
    } else if (frame.type === "error") {
      addLine([["Error: " + frame.error]], "error");
    }
  }

  $("mode").addEventListener("change", showFields);
  $("settings").addEventListener("submit", function (event) {
    event.preventDefault();
    if (ws) return;
    $("messages").replaceChildren(); members.clear(); renderMembers(0);
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
         help="memory:// (one process) or redis://host:port/db (needs wschat[redis]).")
@_option("--token", "tokens", env="TOKENS", multiple=True, callback=_split_commas,
         help="Require this token on WebSockets and POST (repeatable; env: comma-separated). "
              "None: open demo mode.")
@_option("--allowed-origin", "allowed_origins", env="ALLOWED_ORIGIN", multiple=True, callback=_split_commas,
         help="Origin allowed to open WebSockets (repeatable, '*' for any). Default: same origin only.")
@_option("--history", env="HISTORY", default=100, type=int, help="Messages kept per room; 0 keeps none.")
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
def serve(**options: Any) -> None:
    """Serve the chat: the page at /, WebSockets and the HTTP API."""
    try:
        settings = Settings(**options)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if settings.workers > 1 and urlsplit(settings.broker).scheme == "memory":
        raise click.UsageError("--workers above 1 needs a shared broker: add --broker redis://host:6379/0")
    try:
        app = create_app(**asdict(settings))
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    if settings.broker != "memory://":
        _check_broker(app.state.chat.broker)
    if app.state.gatekeeper.demo_mode and settings.host not in ("127.0.0.1", "localhost", "::1"):
        click.secho(f"warning: demo mode (no --token) on {settings.host}: anyone who can reach this port can chat",
                    fg="yellow", err=True)
    _run(app, settings)


def _check_broker(broker: Broker) -> None:
    """Refuse to start on a broker that does not answer: one line, credentials masked."""
    try:
        asyncio.run(broker.ping())  # type: ignore[attr-defined]
    except BrokerUnavailable as exc:
        raise click.ClickException(f"cannot reach broker {mask_url(broker.url)}: {exc}") from None


def _run(app: FastAPI, settings: Settings) -> None:
    import uvicorn  # only the CLI needs the server

    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    click.echo(f"wschat {__version__}: open http://{host}:{settings.port}{settings.root_path}/ in a browser")
    options = dict(host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                   root_path=settings.root_path, ws_max_size=settings.max_message_size,
                   ws=_websocket_protocol(), ws_per_message_deflate=False, timeout_graceful_shutdown=5,
                   log_config=_log_config(settings.log_level))
    if settings.workers > 1:
        # Each worker process builds its own app from the same settings.
        os.environ[_SETTINGS_VARIABLE] = json.dumps(asdict(settings))
        uvicorn.run(f"{_module_name()}:_app_from_environment", factory=True, workers=settings.workers, **options)
    else:
        uvicorn.run(app, **options)


_SETTINGS_VARIABLE = "WSCHAT_SETTINGS_JSON"


def _app_from_environment() -> FastAPI:
    """The app factory ``serve --workers N`` hands to uvicorn's worker processes."""
    return create_app(**json.loads(os.environ[_SETTINGS_VARIABLE]))


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

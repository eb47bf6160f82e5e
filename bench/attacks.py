#!/usr/bin/env python3
"""Hostile clients and a faulty Redis against a real `python wschat.py serve`.

    python bench/attacks.py                          # every attack, about 6 minutes
    python bench/attacks.py --quick                  # smaller numbers, shorter stalls
    python bench/attacks.py --only ping-flood --only redis-sigstop
    python bench/attacks.py --wschat /tmp/before/wschat.py --python /tmp/v1/bin/python

Each attack starts its own server on a free 127.0.0.1 port, pinned to core 0
(`taskset -c 0`); this script (the attacker) pins itself to core 1, and so does the
bystander: a separate process in room `calm` that sends {"type":"ping"} every 0.25 s
and times the {"type":"pong"}. For each attack it records what SPEC sections 6/7
promise (the attack function's docstring) and what happened: server RSS
before/peak/after (VmRSS, sampled every 50 ms), the TCP connections the server process
still holds (its socket fds whose local port is the server's; the bystander's is one)
and those it closed that the kernel still keeps trying to finish ("orphaned": FIN-WAIT-1
with unsent data and the like; FIN-WAIT-2 and TIME-WAIT not counted), whether it is alive, its exit status and time at SIGTERM, tracebacks in its log, and
the bystander's RTT (median before the attack, median and max during it). Every
process started is stopped by PID (SIGTERM, then SIGKILL). Output: one markdown table
on stdout, the raw figures as JSON (--json, default bench/attacks.json), server logs
in /tmp/attacks/logs/, progress on stderr.

An option the server does not know (e.g. --max-rooms) makes `serve` exit with a usage
error: that is reported as "option missing" and the attack runs without it. Redis:
redis-pool uses db 15 of the Redis on 127.0.0.1:6379 (FLUSHDB first; its own
redis-server when none answers there); redis-sigstop and redis-flush-catchup always
start their own `redis-server`. Standard library only.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRATCH = Path("/tmp/attacks")
LOGS = SCRATCH / "logs"
RUNNING: dict[int, subprocess.Popen] = {}   # every process we started, by pid
ATTACK_LIMIT_S = 120                          # hard stop per attack (SIGALRM)


class Config:
    wschat: Path = HERE.parent / "wschat.py"
    python: str = sys.executable
    quick: bool = False


CFG = Config()


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scale(full, quick):
    return quick if CFG.quick else full


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


class OptionMissing(Exception):
    """`serve` refused an option with a usage error."""


class AttackTimeout(Exception):
    pass


# ---- processes and /proc sampling -------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pinned(core: int) -> list[str]:
    return ["taskset", "-c", str(core)] if (os.cpu_count() or 1) > 1 and shutil.which("taskset") else []


def spawn(cmd: list[str], logfile: Path, *, env=None, cwd=None, stdin=subprocess.DEVNULL, stdout=None):
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(cmd, stdin=stdin, stdout=stdout or out, stderr=out, env=env, cwd=cwd,
                                start_new_session=True)
    RUNNING[proc.pid] = proc
    return proc


def stop_proc(proc: subprocess.Popen, grace: float = 12.0) -> dict:
    """SIGTERM (after SIGCONT: a stopped process never sees it), SIGKILL after `grace` s."""
    t, killed = time.monotonic(), False
    if proc.poll() is None:
        for sig in (signal.SIGCONT, signal.SIGTERM):
            try:
                os.kill(proc.pid, sig)
            except ProcessLookupError:
                pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            killed = True
            proc.kill()
            proc.wait()
    RUNNING.pop(proc.pid, None)
    return {"exit_status": proc.returncode, "exit_s": round(time.monotonic() - t, 2), "killed": killed}


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        return round(kb / 1024, 1)
    except (OSError, StopIteration):
        return None


def connections(pid: int, port: int) -> tuple[int, int] | tuple[None, None]:
    """TCP connections on local `port`: (those process `pid` holds an fd for, those it let go that
    the kernel is still trying to finish for it: FIN-WAIT-1, CLOSING, LAST-ACK, i.e. unsent data or
    an unacknowledged FIN). LISTEN is left out, and so are FIN-WAIT-2, TIME-WAIT and CLOSE: the
    server side is done there, only the peer has not closed. Also works after the process exited."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    try:
        held = orphaned = 0
        for table in ("tcp", "tcp6"):
            with open(f"/proc/net/{table}") as f:
                for col in (line.split() for line in f.readlines()[1:]):
                    if int(col[1].rsplit(":", 1)[1], 16) == port and col[3] != "0A":   # 0A: LISTEN
                        held += col[9] in inodes
                        orphaned += col[9] == "0" and col[3] not in ("05", "06", "07")
        return held, orphaned
    except OSError:
        return None, None


class Server:
    """`python wschat.py serve --port P ARGS` (or `app_cmd(port)`), pinned to core 0."""

    def __init__(self, name: str, args: list[str], *, app_cmd=None, prefix: str = "") -> None:
        self.port, self.prefix, self.exit_info = free_port(), prefix, None
        self.token = args[args.index("--token") + 1] if "--token" in args else None
        self.log_path = LOGS / f"{name}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("WSCHAT_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONPATH=str(CFG.wschat.parent))
        cmd = app_cmd(self.port) if app_cmd else [
            CFG.python, str(CFG.wschat), "serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc = spawn(pinned(0) + cmd, self.log_path, env=env, cwd=SCRATCH)
        self.pid = self.proc.pid
        self._wait_ready()
        self.baseline()
        threading.Thread(target=self._sample, daemon=True).start()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                RUNNING.pop(self.pid, None)
                missing = re.search(r"No such option:? '?(--[\w-]+)", self.log())
                if missing:
                    raise OptionMissing(missing.group(1))
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log().strip()[-300:]}")
            if request(self.port, "GET", self.prefix + "/healthz", timeout=1)[0]:
                return
            time.sleep(0.1)
        raise RuntimeError("server did not answer /healthz within 20 s")

    def _sample(self) -> None:
        while self.exit_info is None and (value := rss_mb(self.pid)) is not None:
            self.peak = max(self.peak, value)
            time.sleep(0.05)

    def baseline(self) -> None:
        """The attack starts now: RSS 'before' and the peak restart here."""
        self.rss_before = self.peak = rss_mb(self.pid) or 0.0
        self.t_attack = time.time()

    def rss(self) -> float | None:
        return rss_mb(self.pid)

    def conns(self) -> int | None:
        return connections(self.pid, self.port)[0]

    def orphaned(self) -> int | None:
        return connections(self.pid, self.port)[1]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def snapshot(self) -> dict:
        return {"rss_before_mb": self.rss_before, "rss_peak_mb": self.peak, "rss_after_mb": self.rss(),
                "conns_held": self.conns(), "orphaned": self.orphaned(), "alive": self.proc.poll() is None}

    def stop(self, grace: float = 12.0) -> dict:
        if self.exit_info is None:
            self.exit_info = stop_proc(self.proc, grace)
        return self.exit_info

    def path(self, room: str, client_id: str) -> str:
        token = f"&token={self.token}" if self.token else ""
        return f"{self.prefix}/rooms/{room}/ws?client_id={client_id}{token}"


# ---- HTTP -------------------------------------------------------------------

def request(port: int, method: str, path: str, body=None, headers=None, timeout: float = 10.0):
    """One request on a fresh connection: (status, lower-cased headers, body); status 0 on failure."""
    import http.client
    headers = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    except (OSError, http.client.HTTPException) as exc:
        return 0, {"error": repr(exc)}, b""
    finally:
        conn.close()


def post_bytes(port: int, room: str, text: str, headers=()) -> bytes:
    body = json.dumps({"text": text}).encode()
    head = [f"POST /rooms/{room}/messages HTTP/1.1", f"Host: 127.0.0.1:{port}", *headers,
            "Content-Type: application/json", f"Content-Length: {len(body)}"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def pipeline(port: int, requests: list[bytes], timeout: float = 30.0) -> list:
    """Send `requests` pipelined on one connection; their statuses ("error" when unanswered)."""
    out: list = []
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    except (OSError, asyncio.TimeoutError):
        return ["error"] * len(requests)
    try:
        writer.write(b"".join(requests))
        for _ in requests:
            head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)).decode("latin-1")
            size = re.search(r"(?im)^content-length: *(\d+)", head)
            await reader.readexactly(int(size.group(1)) if size else 0)
            out.append(int(head.split()[1]))
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError):
        out += ["error"] * (len(requests) - len(out))
    finally:
        writer.close()
    return out


def run_pipelines(port: int, batches: list[list[bytes]], timeout: float = 30.0) -> Counter:
    async def go():
        return await asyncio.gather(*(pipeline(port, b, timeout) for b in batches))
    return Counter(status for statuses in asyncio.run(go()) for status in statuses)


def stream_until_answer(port: int, head: bytes, total: int, *, limit_s: float, tail: bytes = b"",
                        watch=None) -> dict:
    """Send `head`, `total` filler bytes, then `tail`; stop as soon as the server answers or closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(head)
    sock.setblocking(False)
    chunk, sent, answer, t0 = b"a" * 65536, 0, None, time.monotonic()
    try:
        while answer is None and time.monotonic() - t0 < limit_s:
            readable, writable, _ = select.select([sock], [sock] if sent < total + len(tail) else [], [], 0.2)
            try:
                if readable:
                    data = sock.recv(65536)
                    answer = data.split(b"\r\n", 1)[0].decode(errors="replace") if data else "closed"
                elif writable:
                    sent += sock.send(chunk[: total - sent] if sent < total else tail[sent - total:])
            except BlockingIOError:
                pass
            except OSError as exc:
                answer = f"reset ({exc.__class__.__name__})"
            if answer is None and watch is not None and watch():
                answer = "aborted by the harness (server RSS above 2 GB)"
    finally:
        sock.close()
    return {"sent_mb": round(sent / 1e6, 2), "answer": answer or f"no answer in {limit_s:g} s",
            "seconds": round(time.monotonic() - t0, 2)}


def status_of(answer: str) -> str:
    """'HTTP/1.1 401 Unauthorized' -> '401'; 'closed', 'reset ...' stay as they are."""
    return answer.split(" ")[1] if answer.startswith("HTTP/") else answer


# ---- WebSocket client, by hand ------------------------------------------------

TEXT, BINARY, CLOSE, PING, PONG, EOF = 0x1, 0x2, 0x8, 0x9, 0xA, -1


def encode_frame(opcode: int, payload: bytes = b"") -> bytes:
    """One masked client frame."""
    n, key = len(payload), os.urandom(4)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    if n:
        mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
        payload = (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")
    return head + key + payload


def close_frame(code: int = 1000) -> bytes:
    return encode_frame(CLOSE, struct.pack("!H", code))


def close_code(payload: bytes) -> int:
    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005


def kind(frame) -> str:
    """What a received frame is: 'welcome', 'message', 'pong', 'close 1013', 'eof', 'timeout', ..."""
    if frame is None:
        return "timeout"
    op, payload = frame
    if op == CLOSE:
        return f"close {close_code(payload)}"
    if op == TEXT:
        try:
            return str(json.loads(payload).get("type", "text"))
        except (ValueError, AttributeError):
            return "text"
    return {EOF: "eof", PING: "ping", PONG: "pong", BINARY: "binary"}.get(op, f"op{op}")


class RawWS:
    """A blocking WebSocket client: the handshake by hand, then raw frames (server frames are
    unmasked and never fragmented by wschat)."""

    def __init__(self, port: int, path: str, *, host: str | None = None, headers=(), rcvbuf: int | None = None,
                 timeout: float = 10.0, before_handshake=None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        if before_handshake:
            before_handshake()
        lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version: 13", *headers]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 65536 and (chunk := self.sock.recv(4096)):
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        self.status = int(head.split()[1]) if head.startswith(b"HTTP/") else 0
        self.buf, self.pos = bytearray(rest), 0

    def send(self, opcode: int, payload: bytes = b"") -> None:
        self.sock.sendall(encode_frame(opcode, payload))

    def send_json(self, obj: dict) -> None:
        self.send(TEXT, json.dumps(obj).encode())

    def _next(self) -> tuple[int, bytes] | None:
        b, p = self.buf, self.pos
        if len(b) - p < 2:
            return None
        n, h = b[p + 1] & 0x7F, 2
        if n >= 126:
            h = 4 if n == 126 else 10
            if len(b) - p < h:
                return None
            n = int.from_bytes(b[p + 2:p + h], "big")
        if len(b) - p < h + n:
            return None
        self.pos = p + h + n
        return b[p] & 0x0F, bytes(b[p + h:p + h + n])

    def recv(self, timeout: float = 5.0) -> tuple[int, bytes] | None:
        """The next frame, (EOF, b"") when the connection ended, None on timeout."""
        deadline = time.monotonic() + timeout
        while (frame := self._next()) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(262144)
            except socket.timeout:
                return None
            except OSError:
                data = b""
            if not data:
                return EOF, b""
            if self.pos > 1 << 20:
                del self.buf[: self.pos]
                self.pos = 0
            self.buf += data
        return frame

    def until_close(self, timeout: float) -> tuple[str, int]:
        """Read until a close frame, EOF or the timeout: (how it ended, frames read before)."""
        deadline, count = time.monotonic() + timeout, 0
        while True:
            k = kind(self.recv(max(0.0, deadline - time.monotonic())))
            if k.startswith("close") or k in ("eof", "timeout"):
                return k, count
            count += 1

    def close(self) -> None:
        try:
            self.sock.setblocking(False)
            self.sock.send(close_frame())
        except OSError:
            pass
        self.sock.close()


def ws_outcome(port: int, path: str, **kw) -> str:
    """'HTTP 403', '101, welcome', '101, close 1008', ..."""
    try:
        ws = RawWS(port, path, timeout=5, **kw)
    except OSError as exc:
        return exc.__class__.__name__
    first = kind(ws.recv(3)) if ws.status == 101 else None
    ws.close()
    return f"101, {first}" if first else f"HTTP {ws.status}"


def stalled_client(srv: Server, room: str, cid: str) -> RawWS:
    """Joined (its first frame read), a tiny receive buffer, and it never reads again."""
    ws = RawWS(srv.port, srv.path(room, cid), rcvbuf=4096)
    ws.first = kind(ws.recv(5))
    return ws


# ---- the bystander and the per-attack frame -------------------------------------

def bystander_main(port: int, path: str) -> None:
    """Child process: a JSON ping every 0.25 s until stdin closes, then the RTTs as JSON on stdout."""
    samples, missed, errors, ws = [], [], [], None
    while not select.select([sys.stdin], [], [], 0.25)[0]:
        try:
            if ws is None:
                ws = RawWS(port, path, timeout=5)
                if ws.status != 101 or kind(ws.recv(5)) != "welcome":
                    errors.append(f"join refused ({ws.status})")
                    ws = None
                    continue
            t = time.perf_counter()
            ws.send_json({"type": "ping"})
            while True:
                k = kind(ws.recv(max(0.0, 5 - (time.perf_counter() - t))))
                if k == "pong":
                    samples.append((time.time(), (time.perf_counter() - t) * 1000))
                    break
                if k in ("timeout", "eof") or k.startswith("close"):
                    if k == "timeout":
                        missed.append(time.time())
                    else:
                        errors.append(k)
                    ws.close()
                    ws = None   # a late pong must not be matched to the next ping
                    break
        except OSError as exc:
            errors.append(repr(exc))
            ws = None
            time.sleep(0.5)
    print(json.dumps({"samples": samples, "missed": missed, "errors": errors[:10]}))


class Bystander:
    def __init__(self, srv: Server) -> None:
        self.proc = spawn(pinned(1) + [sys.executable, str(Path(__file__).resolve()), "--bystander",
                                       str(srv.port), srv.path("calm", "bystander")],
                          LOGS / "bystander.log", stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def stop(self, since: float) -> dict:
        try:
            data = json.loads(self.proc.communicate(timeout=15)[0])   # closing stdin tells it to stop
        except (subprocess.TimeoutExpired, ValueError) as exc:
            stop_proc(self.proc, 1)
            return {"error": repr(exc)}
        RUNNING.pop(self.proc.pid, None)
        base = [rtt for t, rtt in data["samples"] if t < since]
        during = [rtt for t, rtt in data["samples"] if t >= since]
        return {"rtt_base_ms": round(statistics.median(base), 2) if base else None,
                "rtt_median_ms": round(statistics.median(during), 2) if during else None,
                "rtt_max_ms": round(max(during), 2) if during else None, "pongs": len(during),
                "missed": sum(t >= since for t in data["missed"]), "errors": data["errors"]}


@dataclass
class Result:
    name: str
    expected: str
    observed: str = "not run"
    ok: bool | None = None
    figures: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    seconds: float = 0.0


@contextmanager
def served(r: Result, *args: str, optional=(), label: str | None = None, bystander: bool = True, **kw):
    """A server (and the bystander) for one attack; the standard figures land in r.figures
    (under `label`) when the block ends. `optional`: (flag, value) pairs dropped if unknown."""
    fig = r.figures.setdefault(label, {}) if label else r.figures
    optional = list(optional)
    while True:
        try:
            srv = Server(r.name + (f"-{label}" if label else ""),
                         [*args, *(x for pair in optional for x in pair)], **kw)
            break
        except OptionMissing as exc:
            if str(exc) not in [flag for flag, _ in optional]:
                raise
            r.missing.append(str(exc))
            optional = [pair for pair in optional if pair[0] != str(exc)]
    by = None
    try:
        if bystander:
            by = Bystander(srv)
            time.sleep(1.0)
        srv.baseline()
        yield srv
    finally:
        fig.update(srv.snapshot())
        if by:
            fig["bystander"] = by.stop(srv.t_attack)
        fig.update(srv.stop())
        fig["tracebacks"] = srv.log().count("Traceback (most recent call last)")


def _stats(srv: Server) -> dict:
    status, _, body = request(srv.port, "GET", srv.prefix + "/stats")
    return json.loads(body) if status == 200 else {"status": status}


# ---- redis --------------------------------------------------------------------

def redis_cmd(port: int, *args, db: int | None = None, timeout: float = 3.0) -> str:
    """One simple-reply command (PING, FLUSHDB, ...) over RESP; returns the reply line."""
    def enc(parts):
        parts = [str(p).encode() for p in parts]
        return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    replies = 1 + (db is not None)
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall((enc(["SELECT", db]) if db is not None else b"") + enc(args))
        data = b""
        while data.count(b"\r\n") < replies and (chunk := s.recv(4096)):
            data += chunk
    return data.split(b"\r\n")[replies - 1].decode()


@contextmanager
def own_redis():
    port = free_port()
    proc = spawn(pinned(1) + ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--daemonize", "no"], LOGS / f"redis-{port}.log")
    try:
        for _ in range(50):
            try:
                if redis_cmd(port, "PING", timeout=0.5) == "+PONG":
                    break
            except OSError:
                time.sleep(0.1)
        yield proc, port
    finally:
        stop_proc(proc, 5)


def pause(proc: subprocess.Popen, seconds: float) -> None:
    """SIGSTOP the process for `seconds`, then SIGCONT (also when interrupted)."""
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(proc.pid, signal.SIGCONT)


# ---- attacks ------------------------------------------------------------------
# Each takes a Result, fills r.figures, r.observed and r.ok (True: as SPEC says).
# Its docstring is the "expected" column.

def publish_many(port: int, room: str, count: int, size: int) -> Counter:
    reqs = [post_bytes(port, room, f"{i} " + "x" * size) for i in range(count)]
    return run_pipelines(port, [reqs[i::4] for i in range(4)])


def close_then_stall(r: Result) -> None:
    """TCP dropped <=5 s after a close the peer never finishes, counted in max_connections until
    then; at shutdown close 1001/1012 <=5 s, exit 0 or by SIGTERM <=10 s, no traceback."""
    n, cap, probes, held = scale(60, 30), 20, {}, {}
    with served(r, "--max-connections", str(cap), "--rate", "0", label="stall") as srv:
        clients = [stalled_client(srv, "R", f"c{i}") for i in range(n)]
        r.figures["stall"]["first_frames"] = dict(Counter(c.first for c in clients))
        publish_many(srv.port, "R", 200, 10_240)
        time.sleep(0.5)
        held["before close"] = connections(srv.pid, srv.port)
        for c in clients:
            c.sock.sendall(close_frame())
        t0 = time.monotonic()
        for at in (1, 6, 15):
            sleep_until(t0 + at)
            held[f"+{at}s"] = connections(srv.pid, srv.port)
            if at in (1, 6):
                probe = RawWS(srv.port, srv.path("R", f"probe{at}"), timeout=5)
                probes[f"+{at}s"] = kind(probe.recv(3))
                probe.sock.close()
        r.figures["stall"].update(held_and_orphaned=held, new_join=probes)
    # SIGTERM while clients are mid-close, silent (not reading) and half-closed.
    with served(r, "--rate", "0", label="sigterm", bystander=False) as srv:
        mid_close = [stalled_client(srv, "R", f"m{i}") for i in range(5)]
        silent = [stalled_client(srv, "R", f"s{i}") for i in range(5)]   # noqa: F841 (held open)
        half = [stalled_client(srv, "R", f"h{i}") for i in range(2)]
        normal = [RawWS(srv.port, srv.path("R", f"n{i}")) for i in range(3)]
        publish_many(srv.port, "R", 200, 10_240)
        for c in mid_close:
            c.sock.sendall(close_frame())
        for c in half:
            c.sock.shutdown(socket.SHUT_WR)
        closes: list = []
        readers = [threading.Thread(target=lambda c=c: closes.append((c.until_close(20)[0], time.monotonic())))
                   for c in normal]
        for t in readers:
            t.start()
        time.sleep(1)
        t_term = time.monotonic()
        srv.stop(grace=15)
        for t in readers:
            t.join(20)
        sleep_until(t_term + 6)
        r.figures["sigterm"]["orphaned_6s_after_sigterm"] = srv.orphaned()
        codes = Counter(k for k, _ in closes)
        slowest = max((t - t_term for _, t in closes), default=None)
        r.figures["sigterm"].update(normal_closes=dict(codes), normal_close_s=slowest and round(slowest, 2))
    st, sg = r.figures["stall"], r.figures["sigterm"]
    dropped = held["+6s"] == (1, 0) and probes.get("+6s") == "welcome"   # only the bystander left
    counted = not (sum(held["+1s"]) >= cap and probes.get("+1s") == "welcome")   # held ones must count
    clean = (sg["exit_status"] in (0, -signal.SIGTERM) and sg["exit_s"] <= 10 and not sg["killed"]
             and sg["tracebacks"] == 0 and codes["close 1001"] + codes["close 1012"] == len(normal)
             and (slowest or 99) <= 5)   # orphans left after exit: reported, not judged (SPEC is silent)
    r.ok = dropped and counted and clean
    r.observed = (f"TCP conns (by the process, orphaned in the kernel) before the close {held['before close']}, "
                  f"+1/+6/+15 s: {held['+1s']}/{held['+6s']}/{held['+15s']} (incl. the bystander); join at +1 s: {probes.get('+1s')}, at +6 s: "
                  f"{probes.get('+6s')}; SIGTERM: exit {sg['exit_status']} in {sg['exit_s']} s, normal clients "
                  f"{dict(codes)} within {sg['normal_close_s']} s, orphaned 6 s later {sg['orphaned_6s_after_sigterm']}, "
                  f"tracebacks {st['tracebacks'] + sg['tracebacks']}")


def ping_flood(r: Result) -> None:
    """PINGs beyond rate get no PONG; pending PONGs count toward send_queue, so the flooder is
    dropped (1013) like a slow client; memory bounded; others unaffected."""
    secs, rate = scale(20, 6), 20
    with served(r, "--rate", str(rate)) as srv:
        ws = stalled_client(srv, "flood", "flooder")
        chunk = encode_frame(PING, b"12345678") * 4096   # whole frames: a partial send resumes aligned
        off, total, blocked, ended = 0, 0, 0, None
        ws.sock.settimeout(0.5)
        t0 = time.monotonic()
        while time.monotonic() - t0 < secs:
            try:
                n = ws.sock.send(memoryview(chunk)[off:])
                total, off = total + n, (off + n) % len(chunk)
            except socket.timeout:
                blocked += 1
            except OSError as exc:
                ended = f"{exc.__class__.__name__} after {time.monotonic() - t0:.1f} s"
                break
        flood_peak, pings = srv.peak, total // (len(chunk) // 4096)
        pongs, last, deadline = 0, "timeout", time.monotonic() + 8   # now read what was queued for it
        while time.monotonic() < deadline:
            last = kind(ws.recv(max(0.0, deadline - time.monotonic())))
            pongs += last == "pong"
            if last.startswith("close") or last in ("eof", "timeout"):
                break
        else:
            last = "still receiving pongs after 8 s of reading"
        if last == "timeout":
            last = "not dropped (all read, no close frame)"
        r.figures.update(pings_sent=pings, send_blocked_0_5s=blocked, send_ended=ended, pongs_received=pongs,
                         flooder_end=last, rss_peak_during_flood_mb=flood_peak)
    allowed, by = rate * secs + 2 * rate, r.figures["bystander"]
    r.ok = (pongs <= allowed * 1.2 and (last == "close 1013" or flood_peak - r.figures["rss_before_mb"] < 50)
            and (by.get("rtt_median_ms") or 1e9) < 50)
    r.observed = (f"{pings} pings sent, {pongs} pongs (allowed ~{allowed}); flooder ended: {last}; "
                  f"RSS {r.figures['rss_before_mb']}->{flood_peak} MB; bystander median "
                  f"{by.get('rtt_median_ms')} ms, max {by.get('rtt_max_ms')} ms")


HOST_APP = '''"""wschat mounted in a host app; /burst publishes in one event-loop tick (bench/attacks.py)."""
from fastapi import FastAPI
import {module} as wschat

chat_app = wschat.create_app(rate=0, timeout=0)
app = FastAPI()
app.mount("/chat", chat_app)


@app.post("/burst")
async def burst(n: int = 5000, size: int = 10240) -> dict:
    chat = chat_app.state.chat
    filler = "x" * size
    for i in range(n):   # the memory broker's publish returns without yielding
        await chat.publish("R", f"{{i}} {{filler}}")
    return {{"published": n}}
'''


def publish_burst(r: Result) -> None:
    """Memory for a client that stops reading bounded by send_queue frames, also when many are
    published within one loop tick; it alone is closed 1013 and counted as dropped."""
    n, queue, size = 2000, 1024, 10_240   # above the default send_queue, also with --quick
    with served(r, "--rate", "0", label="posts") as srv:
        victim = stalled_client(srv, "R", "stalled")
        reqs = [post_bytes(srv.port, "R", f"{i} " + "x" * size) for i in range(n)]
        t0 = time.monotonic()
        statuses = run_pipelines(srv.port, [reqs[i::100] for i in range(100)], timeout=40)
        post_s = round(time.monotonic() - t0, 2)
        time.sleep(1)
        end, frames = victim.until_close(5)
        r.figures["posts"].update(statuses=dict(statuses), seconds=post_s, victim_end=f"{end} after {frames} frames",
                                  slow_clients_dropped=_stats(srv).get("slow_clients_dropped"))
    module = CFG.wschat.stem
    (SCRATCH / "host_app.py").write_text(HOST_APP.format(module=module))
    app_cmd = lambda port: [CFG.python, "-m", "uvicorn", "host_app:app", "--app-dir", str(SCRATCH),  # noqa: E731
                            "--host", "127.0.0.1", "--port", str(port), "--ws",
                            f"{module}:coalescing_websocket_protocol", "--ws-per-message-deflate", "false"]
    with served(r, label="host_burst", bystander=False, app_cmd=app_cmd, prefix="/chat") as srv:
        victim = stalled_client(srv, "R", "stalled")
        t0 = time.monotonic()
        status = request(srv.port, "POST", "/burst?n=5000", timeout=60)[0]
        burst_s = round(time.monotonic() - t0, 2)
        time.sleep(1)
        end, frames = victim.until_close(5)
        r.figures["host_burst"].update(status=status, seconds=burst_s, victim_end=f"{end} after {frames} frames",
                                       slow_clients_dropped=_stats(srv).get("slow_clients_dropped"))
    p, h = r.figures["posts"], r.figures["host_burst"]
    bound = queue * size / 1e6 * 2 + 30    # MB: send_queue frames twice (queue + socket buffer) plus slack
    grow = lambda f: f["rss_peak_mb"] - f["rss_before_mb"]   # noqa: E731
    r.ok = all(f["slow_clients_dropped"] == 1 and grow(f) < bound for f in (p, h))
    r.observed = (f"{n} POSTs: RSS +{grow(p):.0f} MB, dropped {p['slow_clients_dropped']}, victim {p['victim_end']}; "
                  f"host burst of 5000: RSS +{grow(h):.0f} MB, dropped {h['slow_clients_dropped']}, victim "
                  f"{h['victim_end']} (bound ~{bound:.0f} MB)")


def partial_heads(r: Result) -> None:
    """A request head not complete within 10 s is closed; other clients are served meanwhile."""
    n = scale(3000, 800)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard == resource.RLIM_INFINITY
                                                else max(soft, min(hard, n + 1000)), hard))
    with served(r) as srv:
        head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-A: ".encode()
        socks, failed, t_open = [], Counter(), time.monotonic()
        for _ in range(n):
            try:
                s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
                s.sendall(head)
                socks.append(s)
            except OSError as exc:
                failed[exc.__class__.__name__] += 1
        t0 = time.monotonic()
        poller, by_fd, closed, answers = select.poll(), {s.fileno(): s for s in socks}, set(), Counter()
        for s in socks:
            poller.register(s, select.POLLIN)

        def still_open() -> int:
            for fd, _ in poller.poll(0):
                try:
                    data = by_fd[fd].recv(4096)
                except OSError:
                    data = b""
                if data:
                    answers[data.split(b"\r\n", 1)[0].decode(errors="replace")] += 1
                else:
                    closed.add(fd)
                    poller.unregister(fd)
            return len(socks) - len(closed)

        meanwhile, marks = {}, {}
        for at in (1, 5, 8, 12, 20):
            sleep_until(t0 + at)
            if at in (1, 8):
                t = time.monotonic()
                status = request(srv.port, "GET", "/healthz", timeout=5)[0]
                joined = ws_outcome(srv.port, srv.path("R", f"probe{at}"))
                meanwhile[f"+{at}s"] = f"healthz {status}, join {joined}, {time.monotonic() - t:.2f} s"
            else:
                marks[f"+{at}s"] = {"client_open": still_open(), "server_held": srv.conns(),
                                    "orphaned": srv.orphaned()}
        for s in socks:
            s.close()
        r.figures.update(opened=len(socks), open_failed=dict(failed), open_s=round(t0 - t_open, 2),
                         still_open=marks, answers=dict(answers), meanwhile=meanwhile)
    r.ok = marks["+12s"]["client_open"] == 0 and all("healthz 200" in v and "welcome" in v
                                                      for v in meanwhile.values())
    r.observed = ("open at +5/+12/+20 s: " + "/".join(str(m["client_open"]) for m in marks.values())
                  + f" of {len(socks)}; meanwhile {meanwhile}")


def big_head(r: Result) -> None:
    """A request head over 64 KiB: 431, 400 or closed, without reading further."""
    total = scale(100, 20) * 1_000_000
    with served(r, bystander=False) as srv:
        head = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nX-Big: ".encode()
        res = stream_until_answer(srv.port, head, total, limit_s=20, watch=lambda: (srv.rss() or 0) > 2000)
        r.figures.update(res)
    answer = status_of(res["answer"])
    r.ok = (answer in ("431", "400", "closed") or answer.startswith("reset")) and res["sent_mb"] < 10
    r.observed = (f"answer '{res['answer']}' after {res['sent_mb']} MB sent; "
                  f"RSS {r.figures['rss_before_mb']}->{r.figures['rss_peak_mb']} MB")


def big_body_unauth(r: Result) -> None:
    """Refused by the token check (401) before the body is read; a body over
    max_message_size + 4 KiB: 413 without reading the rest."""
    total = scale(300, 50) * 1_000_000
    with served(r, "--token", "s3cret") as srv:
        def head(size: int, auth: str = "") -> bytes:
            return (f"POST /rooms/R/messages HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\n{auth}"
                    f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n").encode()
        prefix, tail = b'{"text": "', b'"}'   # valid JSON, so only the token check can refuse it
        unauth = stream_until_answer(srv.port, head(len(prefix) + total + len(tail)) + prefix, total, tail=tail,
                                     limit_s=30, watch=lambda: (srv.rss() or 0) > 2000)
        peak_unauth = srv.peak
        body = b'{"text": "' + b"a" * 999_988 + b'"}'
        auth = stream_until_answer(srv.port, head(len(body), "Authorization: Bearer s3cret\r\n") + body, 0,
                                   limit_s=15)
        r.figures.update(unauth=unauth, rss_peak_unauth_mb=peak_unauth, auth_1mb=auth)
    r.ok = status_of(unauth["answer"]) in ("401", "413") and unauth["sent_mb"] < 40 and \
        status_of(auth["answer"]) == "413"
    r.observed = (f"no token, {total // 1_000_000} MB body: {status_of(unauth['answer'])} after "
                  f"{unauth['sent_mb']} MB sent (RSS peak {peak_unauth} MB); token + 1 MB: {status_of(auth['answer'])}")


def post_flood(r: Result) -> None:
    """POST faster than rate per client: 429 with Retry-After beyond the burst (2 x rate); nothing stored."""
    rate, n = 5, 300
    with served(r, "--rate", str(rate), "--history", "1000", bystander=False) as srv:
        statuses, retry_after, t0 = Counter(), Counter(), time.monotonic()
        for i in range(n):
            status, headers, _ = request(srv.port, "POST", "/rooms/R/messages", {"text": f"m{i}"})
            statuses[status] += 1
            if status == 429:
                retry_after["with" if "retry-after" in headers else "without"] += 1
        elapsed = time.monotonic() - t0
        body = request(srv.port, "GET", "/rooms/R/messages?limit=1000")[2]
        stored = len(json.loads(body).get("messages", [])) if body else None
        r.figures.update(statuses=dict(statuses), retry_after=dict(retry_after), stored=stored,
                         seconds=round(elapsed, 2))
    allowed = int(2 * rate + rate * elapsed) + 1
    r.ok = statuses[429] > 0 and not retry_after["without"] and statuses[201] <= allowed and stored == statuses[201]
    r.observed = (f"{dict(statuses)} in {elapsed:.1f} s (allowed ~{allowed}); 429 Retry-After "
                  f"{dict(retry_after)}; stored {stored}")


def room_flood(r: Result) -> None:
    """Beyond max_rooms (here 1000): HTTP 503 with the reason; existing rooms unaffected; RSS bounded."""
    n, secs = scale(100_000, 10_000), scale(40, 10)
    with served(r, "--rate", "0", optional=[("--max-rooms", "1000")]) as srv:
        numbers, statuses = iter(range(n)), Counter()

        async def worker():   # 16 of these, each pipelining 100 POSTs at a time
            deadline = time.monotonic() + secs
            while time.monotonic() < deadline:
                batch = [post_bytes(srv.port, f"r{i}", "x") for _, i in zip(range(100), numbers)]
                if not batch:
                    return
                statuses.update(await pipeline(srv.port, batch, timeout=20))

        async def go():
            await asyncio.gather(*(worker() for _ in range(16)))
        t0 = time.monotonic()
        asyncio.run(go())
        elapsed = time.monotonic() - t0
        status, _, body = request(srv.port, "POST", "/rooms/brand-new-room/messages", {"text": "x"})
        existing = request(srv.port, "POST", "/rooms/r0/messages", {"text": "again"})[0]
        grown_kb = ((srv.rss() or 0) - srv.rss_before) * 1024
        r.figures.update(statuses=dict(statuses), seconds=round(elapsed, 1),
                         new_room_after=f"{status} {body[:80].decode(errors='replace')}",
                         existing_room_after=existing, rss_per_room_kb=round(grown_kb / max(1, statuses[201]), 2))
    rss = f"RSS {r.figures['rss_before_mb']}->{r.figures['rss_after_mb']} MB"
    if r.missing:
        r.ok = False
        r.observed = f"without --max-rooms: {statuses[201]} rooms created in {elapsed:.0f} s, {rss}"
    else:
        r.ok = statuses[503] > 0 and statuses[201] <= 1000 and existing == 201
        r.observed = f"{dict(statuses)}; existing room afterwards {existing}; {rss}"


def wait_text(ws: RawWS, text: str, timeout: float = 3.0) -> str:
    """'delivered' when a message frame with `text` arrives, 'error: ...' for an error frame."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        frame = ws.recv(left)
        k = kind(frame)
        if k == "error":
            return "error: " + json.loads(frame[1]).get("error", "")[:60]
        if k == "message" and json.loads(frame[1]).get("text") == text:
            return "delivered"
        if k in ("eof", "timeout") or k.startswith("close"):
            return k
    return "timeout"


def low_rate(r: Result) -> None:
    """rate below 1 (0.4): the bucket still holds one message (burst = max(2 x rate, 1)), delivered."""
    with served(r, "--rate", "0.4", bystander=False) as srv:
        listener, sender = (RawWS(srv.port, srv.path("R", cid)) for cid in ("listener", "sender"))
        listener.recv(3), sender.recv(3)
        sender.send_json({"type": "message", "text": "hello-1"})
        first = {"sender": wait_text(sender, "hello-1"), "listener": wait_text(listener, "hello-1")}
        sender.send_json({"type": "message", "text": "hello-2"})
        second = wait_text(sender, "hello-2")
        post = request(srv.port, "POST", "/rooms/Q/messages", {"text": "one"})[0]
        r.figures.update(first_message=first, second_at_once=second, first_post=post)
    r.ok = first == {"sender": "delivered", "listener": "delivered"} and post == 201
    r.observed = f"first WS message: {first}; second at once: {second}; first POST: {post}"


def newline_room(r: Result) -> None:
    """A room name or client id with a trailing newline (or any control character) is invalid on
    every route: WebSocket refused, HTTP 4xx."""
    with served(r, bystander=False) as srv:
        p = srv.port
        checks = {
            "WS room general%0A": ws_outcome(p, "/rooms/general%0A/ws?client_id=a"),
            "WS room general%09": ws_outcome(p, "/rooms/general%09/ws?client_id=a"),
            "GET members general%0A": request(p, "GET", "/rooms/general%0A/members")[0],
            "GET messages general%0A": request(p, "GET", "/rooms/general%0A/messages")[0],
            "POST general%0A": request(p, "POST", "/rooms/general%0A/messages", {"text": "x"})[0],
            "WS client_id bob%0A": ws_outcome(p, "/rooms/general/ws?client_id=bob%0A"),
            "WS lobby /ws/bob%0A": ws_outcome(p, "/ws/bob%0A"),
            "POST from 'bob\\n'": request(p, "POST", "/rooms/general/messages", {"text": "x", "from": "bob\n"})[0],
        }
        r.figures["checks"] = checks
    accepted = [k for k, v in checks.items() if v in (200, 201) or str(v).startswith("101")
                and not str(v).startswith("101, close")]
    r.ok = not accepted
    r.observed = ("all refused" if not accepted else "accepted: " + ", ".join(accepted)) + f" ({checks})"


def bad_utf8(r: Result) -> None:
    """Invalid UTF-8 in a text frame: close 1007, at most one log line, never a traceback."""
    secs, per_s = scale(10, 3), 50
    with served(r, bystander=False) as srv:
        log_before = len(srv.log())

        def one(i: int) -> str:
            try:
                ws = RawWS(srv.port, srv.path("R", f"u{i}"), timeout=5)
                ws.recv(3)
                ws.send(TEXT, b"bad \xff\xfe utf-8")
                end = ws.until_close(5)[0]
                ws.close()
                return end
            except OSError as exc:
                return exc.__class__.__name__
        t0, futures = time.monotonic(), []
        with ThreadPoolExecutor(32) as pool:
            for i in range(secs * per_s):   # a new connection every 20 ms
                sleep_until(t0 + i / per_s)
                futures.append(pool.submit(one, i))
            ends = Counter(f.result() for f in futures)
        time.sleep(1)
        lines = srv.log()[log_before:].splitlines()
        other = [x for x in lines if not any(k in x for k in ("connection open", "connection closed", '"WebSocket '))]
        conns = secs * per_s
        r.figures.update(ends=dict(ends), log_bytes=len("\n".join(lines)), log_lines_per_conn=round(len(lines) / conns, 2),
                         other_lines_per_conn=round(len(other) / conns, 2), sample_lines=other[:3])
    f = r.figures
    r.ok = ends["close 1007"] == conns and f["other_lines_per_conn"] <= 1 and f["tracebacks"] == 0
    r.observed = (f"{dict(ends)}; {f['log_lines_per_conn']} log lines/conn ({f['other_lines_per_conn']} beyond "
                  f"uvicorn's access lines), {f['tracebacks']} tracebacks, {f['log_bytes']} log bytes")


def token_in_log(r: Result) -> None:
    """--log-level debug: the server never echoes secrets (short or long tokens) into its log."""
    leaks = {}
    for token in ("ab12", "longsecret123"):
        with served(r, "--log-level", "debug", "--token", token, label=token, bystander=False) as srv:
            p = srv.port
            ws_outcome(p, f"/rooms/R/ws?client_id=q&token={token}")
            ws_outcome(p, "/rooms/R/ws?client_id=c", headers=[f"Cookie: session={token}"])
            ws_outcome(p, "/rooms/R/ws?client_id=d", headers=[f'Cookie: session="{token}"'])
            ws_outcome(p, "/rooms/R/ws?client_id=b", headers=[f"Authorization: Bearer {token}"])
            ws_outcome(p, f"/items/1/ws?token={token}&q=1")
            request(p, "GET", f"/rooms?token={token}")
            request(p, "GET", "/stats", headers={"Cookie": f'session="{token}"'})
            request(p, "POST", "/rooms/R/messages", {"text": "hi"}, headers={"Authorization": f"Bearer {token}"})
            request(p, "GET", f"/rooms?token={token}x")   # a near miss: a mistyped secret is a secret too
        hits = [line for line in srv.log().splitlines() if token in line]
        leaks[token] = len(hits)
        r.figures[token].update(lines_with_token=len(hits), sample=[h[:160] for h in hits[:3]])
    r.ok = not any(leaks.values())
    r.observed = "; ".join(f"'{t}': in {n} log lines" + (f" (e.g. {r.figures[t]['sample'][0]!r})" if n else "")
                           for t, n in leaks.items())


def dns_rebinding(r: Result) -> None:
    """Demo mode on loopback: a foreign Host gets HTTP 400 (WebSocket handshakes too);
    localhost and [::1] with any port are served."""
    with served(r, bystander=False) as srv:
        p, checks = srv.port, {}
        for host in (f"evil.test:{p}", f"localhost:{p}", f"[::1]:{p}"):
            hdrs = {"Host": host, "Origin": f"http://{host}"}
            checks[host] = {
                "ws": ws_outcome(p, "/rooms/R/ws?client_id=x", host=host, headers=[f"Origin: http://{host}"]),
                "post": request(p, "POST", "/rooms/R/messages", {"text": "hi"}, headers=hdrs)[0],
                "get_rooms": request(p, "GET", "/rooms", headers=hdrs)[0]}
        r.figures["checks"] = checks
    evil, good = checks[f"evil.test:{p}"], [checks[f"localhost:{p}"], checks[f"[::1]:{p}"]]
    r.ok = (evil == {"ws": "HTTP 400", "post": 400, "get_rooms": 400}
            and all(g == {"ws": "101, welcome", "post": 201, "get_rooms": 200} for g in good))
    r.observed = f"evil.test: {evil}; localhost: {good[0]}; [::1]: {good[1]}"


def mass_join(srv: Server, n: int, room: str) -> dict:
    """n clients join `room` at once while /healthz is polled every 0.25 s: one thread each, all
    TCP-connected first, then every handshake released at the same moment."""
    ends, health, sockets, ready, go, done = [], [], [], [], threading.Event(), threading.Event()

    def hold() -> None:
        ready.append(1)
        go.wait(30)

    def one(i: int) -> None:
        try:
            ws = RawWS(srv.port, srv.path(room, f"j{i}"), timeout=30, before_handshake=hold)
            sockets.append(ws)
            ends.append(kind(ws.recv(30)) if ws.status == 101 else f"HTTP {ws.status}")
        except OSError as exc:
            ends.append(exc.__class__.__name__)

    def poll() -> None:
        while not done.is_set():
            health.append(request(srv.port, "GET", "/healthz", timeout=2)[0])
            time.sleep(0.25)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)] + [threading.Thread(target=poll)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 15
    while len(ready) + len(ends) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    go.set()
    for t in threads[:-1]:
        t.join(40)
    seconds = round(time.monotonic() - t0, 2)
    time.sleep(1)
    done.set()
    threads[-1].join()
    for ws in sockets:
        ws.sock.close()
    return {"ends": dict(Counter(ends)), "seconds": seconds, "healthz": dict(Counter(health))}


def redis_pool(r: Result) -> None:
    """1,000 simultaneous joins on a healthy Redis all succeed (welcome), none 1013; /healthz stays 200."""
    try:
        system = redis_cmd(6379, "PING") == "+PONG"
    except OSError:
        system = False
    with nullcontext((None, 6379)) if system else own_redis() as (_, rport):
        r.figures["redis"] = f"{'' if system else 'own redis-server '}127.0.0.1:{rport} db 15"
        redis_cmd(rport, "FLUSHDB", db=15)
        with served(r, "--broker", f"redis://127.0.0.1:{rport}/15", "--rate", "0") as srv:
            for n in (300, 1000):
                r.figures[f"joins_{n}"] = mass_join(srv, n, f"pool{n}")
                time.sleep(1)
    joins = {n: r.figures[f"joins_{n}"] for n in (300, 1000)}
    r.ok = all(j["ends"] == {"welcome": n} and set(j["healthz"]) == {200} for n, j in joins.items())
    r.observed = "; ".join(f"{n} joins: {j['ends']} in {j['seconds']} s, /healthz {j['healthz']}"
                           for n, j in joins.items())


class Listener(threading.Thread):
    """A room client that resumes with since/epoch whenever it is closed; records what it got."""

    def __init__(self, port: int, room: str, cid: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.port, self.room, self.cid, self.stop_event = port, room, cid, stop
        self.got, self.texts, self.ends, self.recovered, self.ws = [], set(), Counter(), Counter(), None
        self.last = self.epoch = None

    def connect(self) -> bool:
        query = f"client_id={self.cid}" + (f"&since={self.last}&epoch={self.epoch}" if self.last else "")
        try:
            ws = RawWS(self.port, f"/rooms/{self.room}/ws?{query}", timeout=5)
            if ws.status == 101 and self.handle(ws.recv(10)) == "welcome":
                self.ws = ws
                return True
            self.ends[f"join: HTTP {ws.status}" if ws.status != 101 else "join refused"] += 1
            ws.sock.close()
        except OSError:
            pass
        time.sleep(0.5)
        return False

    def handle(self, frame) -> str:
        k = kind(frame)
        if k == "welcome":
            msg = json.loads(frame[1])
            self.epoch = msg["epoch"]
            self.recovered[str(msg.get("recovered"))] += 1
        elif k == "message" and (msg := json.loads(frame[1])).get("id") is not None:
            self.got.append((self.epoch, msg["id"], msg["text"]))
            self.texts.add(msg["text"])
            self.last = msg["id"]
        elif (k.startswith("close") or k == "eof") and self.ws is not None:
            self.ends[k] += 1
            self.ws.sock.close()
            self.ws = None
        return k

    def run(self) -> None:
        while not self.stop_event.is_set():
            if self.ws is not None or self.connect():
                self.handle(self.ws.recv(0.5))


class Publisher(Listener):
    """Stop-and-wait at <= 20/s: m00001, m00002 ... each ends 'delivered' (its own copy came back),
    'error: ...' (told not delivered) or 'unknown' (closed or no answer in 40 s)."""

    def run(self) -> None:
        self.outcomes, n = {}, 0
        while not self.stop_event.is_set():
            if self.ws is None and not self.connect():
                continue
            n += 1
            text, t, outcome = f"m{n:05d}", time.monotonic(), None
            self.ws.send_json({"type": "message", "text": text})
            while outcome is None:
                frame = self.ws.recv(0.5)
                k = self.handle(frame)
                if k == "error":
                    outcome = "error: " + json.loads(frame[1]).get("error", "")[:50]
                elif text in self.texts:
                    outcome = "delivered"
                elif self.ws is None:
                    outcome = f"unknown ({k})"
                elif time.monotonic() - t > 40:
                    outcome = "unknown (no answer in 40 s)"
            self.outcomes[text] = outcome
            time.sleep(max(0.0, 0.05 - (time.monotonic() - t)))


def redis_sigstop(r: Result) -> None:
    """Redis stalls (SIGSTOP 10 s, then 25 s): each message stored at most once, a sender told
    'not delivered' never sees it delivered later, /healthz 503 within 5 s of the stall."""
    with own_redis() as (redis_proc, rport):
        with served(r, "--broker", f"redis://127.0.0.1:{rport}/0", "--rate", "0", "--history", "5000") as srv:
            stop, health, windows = threading.Event(), [], []

            def probe():   # (sent, status, answered); one thread each, so a hung probe blocks no other
                t = time.time()
                health.append((t, request(srv.port, "GET", "/healthz", timeout=10)[0], time.time()))

            def poll():
                while not stop.is_set():
                    threading.Thread(target=probe, daemon=True).start()
                    time.sleep(0.5)
            listeners = [Listener(srv.port, "R", f"l{i}", stop) for i in range(2)]
            pub = Publisher(srv.port, "R", "pub", stop)
            for t in (*listeners, pub, threading.Thread(target=poll, daemon=True)):
                t.start()
            time.sleep(3)
            for secs in scale((10, 25), (5, 10)):
                t_stop = time.time()
                pause(redis_proc, secs)
                windows.append((t_stop, time.time()))
                deadline = time.monotonic() + 15   # until /healthz is 200 again, then 3 s more
                while time.monotonic() < deadline and not any(st == 200 and s > windows[-1][1]
                                                              for s, st, _ in health):
                    time.sleep(0.5)
                time.sleep(3)
            stop.set()
            time.sleep(2)
            body = request(srv.port, "GET", "/rooms/R/messages?limit=5000")[2]
            stored = [m["text"] for m in json.loads(body)["messages"]] if body else []
    failed = {t for t, o in pub.outcomes.items() if o.startswith("error")}
    delivered = {t for t, o in pub.outcomes.items() if o == "delivered"}
    seen = set(stored).union(*(c.texts for c in (*listeners, pub)))
    stalls = []
    for t_stop, t_cont in windows:
        first_503 = min((a for s, st, a in health if st == 503 and t_stop <= a <= t_cont + 5), default=None)
        back = min((a for s, st, a in health if st == 200 and s >= t_cont), default=None)
        stalls.append({"first_503_s": first_503 and round(first_503 - t_stop, 2),
                       "healthy_again_s": back and round(back - t_cont, 2),
                       "healthz_during": dict(Counter(st or "no answer" for s, st, _ in health if t_stop <= s < t_cont))})
    f = r.figures
    f.update(outcomes=dict(Counter(o.split(":")[0].split(" (")[0] for o in pub.outcomes.values())),
             error_reasons=dict(Counter(o for o in pub.outcomes.values() if o.startswith("error")).most_common(3)),
             told_failed_but_seen=sorted(failed & seen)[:20], stored=len(stored),
             stored_duplicates=len(stored) - len(set(stored)),
             listener_dup_ids={c.cid: len(c.got) - len({(e, i) for e, i, _ in c.got}) for c in listeners},
             listener_dup_texts={c.cid: len(c.got) - len(c.texts) for c in listeners},
             listener_missing_delivered={c.cid: len(delivered - c.texts) for c in listeners}, stalls=stalls,
             ends={c.cid: dict(c.ends) for c in (*listeners, pub)},
             recovered={c.cid: dict(c.recovered) for c in (*listeners, pub)})
    r.ok = (not failed & seen and not f["stored_duplicates"] and not any(f["listener_dup_ids"].values())
            and not any(f["listener_dup_texts"].values())
            and all(s["first_503_s"] is not None and s["first_503_s"] <= 5 and s["healthy_again_s"] is not None
                    for s in stalls))
    r.observed = (f"publisher {f['outcomes']}; told not delivered yet seen: {len(failed & seen)}; stored twice: "
                  f"{f['stored_duplicates']}; listeners' duplicate texts {f['listener_dup_texts']}; room clients "
                  f"closed: {f['ends']}; "
                  f"/healthz per stall: " + ", ".join(f"first 503 {s['first_503_s']} s ({s['healthz_during']})"
                                                       for s in stalls))


def redis_flush_catchup(r: Result) -> None:
    """FLUSHALL while clients are still catching up after their welcome: every room client of the
    room is closed with 1012, the catching-up ones included (best effort)."""
    joiners, retained = scale(100, 40), 1000
    with own_redis() as (_, rport):
        with served(r, "--broker", f"redis://127.0.0.1:{rport}/0", "--rate", "0", "--history", str(retained)) as srv:
            reqs = [post_bytes(srv.port, "R", f"pre{i} " + "x" * 1000) for i in range(retained)]
            r.figures["prefill"] = dict(run_pipelines(srv.port, [reqs[i::10] for i in range(10)]))
            old_epoch = json.loads(request(srv.port, "GET", "/rooms/R/messages?limit=1")[2])["epoch"]
            clients, flushed, stop = [], threading.Event(), threading.Event()

            def joiner(i: int) -> None:
                c = {"epoch": None, "frames": 0, "at_flush": None, "end": "still open"}
                clients.append(c)
                try:
                    ws = RawWS(srv.port, srv.path("R", f"j{i}"), rcvbuf=4096, timeout=5)
                except OSError as exc:
                    c["end"] = exc.__class__.__name__
                    return
                deadline = time.monotonic() + 14
                while (left := deadline - time.monotonic()) > 0:
                    frame = ws.recv(left)
                    k = kind(frame)
                    if k == "welcome":
                        c["epoch"] = json.loads(frame[1])["epoch"]
                    elif k == "message":
                        c["frames"] += 1
                        if not flushed.is_set():
                            time.sleep(0.005)   # read slowly until the flush: still catching up
                    elif k.startswith("close") or k == "eof":
                        c["end"] = k
                        break
                    if flushed.is_set() and c["at_flush"] is None:
                        c["at_flush"] = c["frames"]
                ws.sock.close()

            def publisher() -> None:   # keeps posting, so the server sees the ids go backwards
                for i in range(120):
                    if stop.is_set():
                        return
                    request(srv.port, "POST", "/rooms/R/messages", {"text": f"live{i}"}, timeout=5)
                    time.sleep(0.1)
            threads = [threading.Thread(target=publisher)]
            threads[0].start()
            t0 = time.monotonic()
            for i in range(joiners):   # joins spread over 1.5 s, the flush at +1 s
                threads.append(threading.Thread(target=joiner, args=(i,)))
                threads[-1].start()
                if not flushed.is_set() and time.monotonic() - t0 >= 1.0:
                    redis_cmd(rport, "FLUSHALL")
                    flushed.set()
                time.sleep(1.5 / joiners)
            for t in threads[1:]:
                t.join(20)
            stop.set()
            threads[0].join(15)
    old = [c for c in clients if c["epoch"] == old_epoch]
    catching = [c for c in old if (c["at_flush"] or 0) < retained]
    tally = lambda cs: dict(Counter(c["end"] for c in cs))   # noqa: E731
    r.figures.update(joiners=len(clients), old_epoch_joiners=tally(old), catching_up_at_flush=tally(catching),
                     new_epoch=tally([c for c in clients if c["epoch"] not in (None, old_epoch)]),
                     no_welcome=tally([c for c in clients if c["epoch"] is None]))
    r.ok = bool(old) and all(c["end"] == "close 1012" for c in old)
    r.observed = (f"joined before the flush: {tally(old)} (catching up at the flush: {tally(catching)}); "
                  f"joined after it: {r.figures['new_epoch']}; no welcome: {r.figures['no_welcome']}")


ATTACKS = {"close-then-stall": close_then_stall, "ping-flood": ping_flood, "publish-burst-to-stalled": publish_burst,
           "partial-heads": partial_heads, "big-head": big_head, "big-body-unauth": big_body_unauth,
           "post-flood": post_flood, "room-flood": room_flood, "low-rate": low_rate, "newline-room": newline_room,
           "bad-utf8": bad_utf8, "token-in-log": token_in_log, "dns-rebinding": dns_rebinding,
           "redis-pool": redis_pool, "redis-sigstop": redis_sigstop, "redis-flush-catchup": redis_flush_catchup}


# ---- report -------------------------------------------------------------------

def flatten(d: dict, prefix: str = "") -> list[str]:
    """Figures as 'key=value' items; small flat dicts stay on one item."""
    out = []
    for k, v in d.items():
        if k in ("sample", "sample_lines", "errors"):
            continue
        if isinstance(v, dict) and 0 < len(v) <= 4 and not any(isinstance(x, dict) for x in v.values()):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        out += flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"]
    return out


def render(results: list[Result]) -> str:
    cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")   # noqa: E731
    digest = hashlib.sha256(CFG.wschat.read_bytes()).hexdigest()[:12]
    lines = [f"wschat attacks: `{CFG.wschat}` (sha256 {digest}), server python `{CFG.python}`"
             f"{', --quick' if CFG.quick else ''}, {time.strftime('%Y-%m-%d %H:%M')}", "",
             "| attack | expected (SPEC 6/7) | observed | figures |", "| --- | --- | --- | --- |"]
    for r in results:
        verdict = {True: "OK", False: "DIFFERS", None: "?"}[r.ok]
        missing = f" (option missing: {', '.join(r.missing)})" if r.missing else ""
        lines.append(f"| {r.name} | {cell(r.expected)} | **{verdict}**{missing}: {cell(r.observed)} | "
                     f"{cell('; '.join(flatten(r.figures)))} |")
    return "\n".join(lines)


def on_alarm(signum, frame):
    raise AttackTimeout(f"attack exceeded {ATTACK_LIMIT_S} s")


def main() -> None:
    if sys.argv[1:2] == ["--bystander"]:
        return bystander_main(int(sys.argv[2]), sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wschat", type=Path, default=CFG.wschat, help="the wschat.py to attack")
    parser.add_argument("--python", default=sys.executable, help="interpreter with fastapi + uvicorn for it")
    parser.add_argument("--only", action="append", nargs="+", choices=list(ATTACKS), metavar="NAME",
                        help=f"run only these (repeatable): {', '.join(ATTACKS)}")
    parser.add_argument("--quick", action="store_true", help="smaller numbers, shorter stalls")
    parser.add_argument("--json", type=Path, default=HERE / "attacks.json", help="where to write the figures")
    opts = parser.parse_args()
    CFG.wschat, CFG.python, CFG.quick = opts.wschat.resolve(), opts.python, opts.quick
    LOGS.mkdir(parents=True, exist_ok=True)
    if (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})   # the attacker on core 1, the server on core 0
    signal.signal(signal.SIGALRM, on_alarm)
    results = []
    for name in [n for group in opts.only for n in group] if opts.only else list(ATTACKS):
        func = ATTACKS[name]
        r, t0 = Result(name, " ".join(func.__doc__.split())), time.monotonic()
        log(f"== {name}")
        signal.alarm(ATTACK_LIMIT_S)
        try:
            func(r)
        except Exception as exc:   # one broken attack must not hide the others
            traceback.print_exc()
            r.ok, r.observed = None, f"harness error: {exc!r}"
        finally:
            signal.alarm(0)
            for proc in list(RUNNING.values()):
                stop_proc(proc, 3)
        r.seconds = round(time.monotonic() - t0, 1)
        log(f"   {r.seconds} s: {r.observed}")
        results.append(r)
    print(render(results))
    opts.json.write_text(json.dumps({"wschat": str(CFG.wschat), "python": CFG.python, "quick": CFG.quick,
                                     "results": [r.__dict__ for r in results]}, indent=2, default=str))


if __name__ == "__main__":
    main()

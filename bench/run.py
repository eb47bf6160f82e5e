#!/usr/bin/env python3
"""Benchmark wschat against the FastAPI tutorial's ConnectionManager.

    python bench/run.py              # full run, about 9 minutes
    python bench/run.py --quick      # smoke run with small numbers
    python bench/run.py --scenario 3 # one scenario (repeatable: --scenario 1 --scenario 4)
    python bench/run.py --no-stock   # skip "wschat on stock uvicorn" (shorter run)
    python bench/run.py --compare 85b4ed1 --scenario 1   # add wschat.py as of a git commit, same run
    python bench/run.py --scenario 6 --no-stock          # many small rooms: memory vs SQLite broker vs baseline
    python bench/run.py --scenario 8                     # reconnect storm: SIGTERM + restart, memory vs SQLite

For each scenario, wschat (`wschat.py serve`), wschat on stock uvicorn
(bench/wschat_stock_app.py) and the baseline are started one after the other
(never together), each on core 0, with the C load generator on core 1; scenarios 6
and 8 also run wschat with a SQLite broker (8 restarts each server mid-run and has no
baseline; 7 and 8 leave out the stock server). The result is one markdown table (wschat,
baseline, wschat/baseline, then a value and a ratio to the baseline for each
other server) on stdout and bench/results.json. Progress goes to stderr. See
bench/README.md.

The harness itself is stdlib only. The servers need fastapi + uvicorn[standard]:
they run under --python (default: this interpreter if it has them, else
/tmp/benchvenv/bin/python).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
BUILD = BENCH / ".build"
LOADGEN_SRC = BENCH / "loadgen.c"
LOADGEN = BUILD / "loadgen"
WSCHAT = ROOT / "wschat.py"
FALLBACK_PYTHON = "/tmp/benchvenv/bin/python"

SERVER_CORE, LOADGEN_CORE = "0", "1"

# Every process we start, by pid, so that nothing outlives the run (also on
# Ctrl-C or an exception): see stop() and main()'s finally.
RUNNING: dict[int, subprocess.Popen] = {}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(RuntimeError):
    """A server or the load generator did not do its part; recorded, not fatal."""


# ---------------------------------------------------------------------------
# processes

def spawn(cmd: list[str], *, cwd: Path, logfile: Path, stdin=subprocess.DEVNULL,
          stdout=None, env: dict[str, str] | None = None) -> subprocess.Popen:
    out = open(logfile, "wb")
    # A new session: Ctrl-C reaches only this script, which then stops the
    # children itself, in order (server first, see run_one).
    proc = subprocess.Popen(cmd, cwd=cwd, stdin=stdin, stdout=stdout or out, stderr=out,
                            start_new_session=True, env=env)
    out.close()
    RUNNING[proc.pid] = proc
    return proc


def stop(proc: subprocess.Popen, grace: float) -> str:
    """SIGTERM, then SIGKILL after `grace` seconds. Returns how it ended."""
    how = "exited"
    if proc.poll() is None:
        how = "terminated"
        try:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            how = "killed"
            proc.kill()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                how = "unkillable"
    RUNNING.pop(proc.pid, None)
    for f in (proc.stdin, proc.stdout):
        if f:
            try:
                f.close()
            except OSError:
                pass
    return how


def stop_all() -> None:
    for proc in list(RUNNING.values()):
        stop(proc, grace=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_stat() -> dict[str, list[int]]:
    """Per-core jiffies from /proc/stat: user nice system idle iowait irq softirq steal ..."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and not line.startswith("cpu "):
            name, *fields = line.split()
            out[name] = [int(x) for x in fields]
    return out


def busy(fields: list[int]) -> int:
    return fields[0] + fields[1] + fields[2] + fields[5] + fields[6]  # user nice system irq softirq


def proc_ticks(pid: int) -> int:
    """utime+stime of one process, in jiffies (0 if it is gone)."""
    try:
        rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError, ValueError):
        return 0


def self_ticks() -> float:
    t = os.times()
    return (t.user + t.system) * CLK_TCK


class Background:
    """CPU used by processes other than ours (other users, other tests) while we measure.

    Other work on these two cores makes the figures meaningless, and this harness
    cannot prevent it, so it measures and reports it.
    """

    def __init__(self) -> None:
        self.stat, self.mine, self.t = cpu_stat(), self_ticks(), time.monotonic()

    def other_pct(self, our_ticks: float = 0) -> dict:
        """% of one core used by others since __init__; our_ticks = our children's jiffies."""
        stat, wall = cpu_stat(), time.monotonic() - self.t
        ticks = wall * CLK_TCK or 1
        total = sum(busy(stat[c]) - busy(self.stat[c]) for c in stat)
        steal = sum(stat[c][7] - self.stat[c][7] for c in stat)
        other = total - our_ticks - (self_ticks() - self.mine)
        return {"other_cpu_pct_of_core": round(max(other, 0) / ticks * 100, 1),
                "steal_pct_of_core": round(steal / ticks * 100, 1), "seconds": round(wall, 1)}


def wait_idle(max_wait: float, threshold: float) -> dict:
    """Wait (at most max_wait s) for other processes to use less than `threshold` % of a core."""
    deadline = time.monotonic() + max_wait
    while True:
        b = Background()
        time.sleep(1.0)
        load = b.other_pct()
        if load["other_cpu_pct_of_core"] < threshold or time.monotonic() >= deadline:
            return load
        log(f"    machine busy: other processes use {load['other_cpu_pct_of_core']:.0f}% of a core; waiting")


def tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ---------------------------------------------------------------------------
# the three servers

class Server:
    """How to start one server kind and how its WebSocket URLs look."""

    name = ""

    def __init__(self, python: str, logdir: Path):
        self.python = python
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def command(self, scenario: int) -> list[str]:
        raise NotImplementedError

    def cwd(self) -> Path:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def env(self) -> dict[str, str] | None:
        return None  # inherit ours

    def start(self, scenario: int) -> None:
        self.port = free_port()
        self.log = self.logdir / f"{self.name}-s{scenario}.log"
        self.cmd = ["taskset", "-c", SERVER_CORE, *self.command(scenario)]
        self.cmdline = shlex.join(self.cmd)
        self.launch()

    def launch(self) -> None:
        """Start self.cmd (logging to self.log) and wait until it answers."""
        self.proc = spawn(self.cmd, cwd=self.cwd(), logfile=self.log, env=self.env())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start:\n{tail(self.log)}")
            try:
                if self.ready():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise BenchError(f"{self.name} not ready after 30 s:\n{tail(self.log)}")

    def restart(self, scenario: int, tell) -> dict:
        """Scenario 8: SIGTERM, wait for the exit, at once the same command on the same port.

        `tell(line)` passes the moments to the load generator (CLOCK_MONOTONIC ns, the
        clock it stamps with): "term <ns>" right after the signal, "pid <pid> <ns>" once
        the new process answers.
        """
        old, old_log = self.proc, self.log
        t_term = time.monotonic_ns()
        old.send_signal(signal.SIGTERM)
        tell(f"term {t_term}")
        how, ticks = "exited", 0
        while old.poll() is None:   # an exited child stays readable in /proc until poll() reaps it
            ticks = proc_ticks(old.pid) or ticks
            if time.monotonic_ns() - t_term > 15e9:
                how = "killed after 15 s"
                old.kill()
                old.wait(timeout=10)
            time.sleep(0.01)
        t_exit = time.monotonic_ns()
        RUNNING.pop(old.pid, None)
        self.log = self.logdir / f"{self.name}-s{scenario}-restarted.log"
        self.launch()
        t_ready = time.monotonic_ns()
        tell(f"pid {self.proc.pid} {t_ready}")
        return {"old_end": how, "old_exit_code": old.returncode, "term_to_exit_s": (t_exit - t_term) / 1e9,
                "exit_to_ready_s": (t_ready - t_exit) / 1e9, "term_to_ready_s": (t_ready - t_term) / 1e9,
                "old_log": str(old_log), "new_log": str(self.log), "new_pid": self.proc.pid, "old_ticks": ticks}

    def stats(self) -> dict | None:
        return None

    def stop(self) -> str:
        if self.proc is None:
            return "not started"
        how = stop(self.proc, grace=2)
        self.proc = None
        return how


class WsChat(Server):
    name = "wschat"

    def __init__(self, python: str, logdir: Path, path: Path = WSCHAT):
        super().__init__(python, logdir)
        self.path = path

    def start(self, scenario: int) -> None:
        # wschat.py may be edited while a run goes on: record which version served
        self.version = wschat_version(self.path)
        super().start(scenario)

    def command(self, scenario: int) -> list[str]:
        cmd = [self.python, str(self.path), "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--rate", "0", "--timeout", "0", "--log-level", "warning"]
        if scenario in (4, 6, 8):
            cmd += ["--max-connections", "20000"]
        if scenario == 7:
            cmd += ["--max-connections", "60000"]
        return cmd

    def cwd(self) -> Path:
        # a scratch directory: whatever the server might write stays out of the repo
        return self.logdir

    def ready(self) -> bool:
        return http_get(self.port, "/healthz", timeout=1)[0] == 200

    def paths(self, scenario: int) -> dict:
        marks = {"presence": '"type":"presence"', "error": '"type":"error"'}
        if scenario in (4, 7):
            marks["welcome"] = '"type":"welcome"'   # a connection counts once welcomed
        if scenario == 6:
            return {"room": "/rooms/r%d/ws?client_id=c%d", **marks}
        if scenario == 8:
            # the loadgen appends &since=<last id>&epoch=<epoch> when it reconnects
            return {"room": "/rooms/storm%d/ws?client_id=c%d", "pub": "/rooms/storm%d/ws?client_id=pub", **marks}
        room = f"/rooms/bench{scenario}/ws"
        return {"sub": room + "?client_id=s%d", "pub": room + "?client_id=pub", **marks}

    def stats(self) -> dict | None:
        try:
            status, body = http_get(self.port, "/stats", timeout=5)
            return json.loads(body) if status == 200 else {"http_status": status}
        except (OSError, ValueError) as e:
            return {"error": repr(e)}


class WsChatCompare(WsChat):
    """wschat.py as of a git commit (``--compare REF``), served like wschat, in the same run."""

    name = "wschat_compare"

    def __init__(self, python: str, logdir: Path, ref: str):
        copy = logdir / f"wschat-{ref}" / "wschat.py"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{ref}:wschat.py"], capture_output=True,
                                        check=True, timeout=30).stdout)
        super().__init__(python, logdir, copy)
        self.ref = ref


class WsChatSqlite(WsChat):
    """wschat with the SQLite broker: `wschat.py serve ... --broker sqlite:///PATH`.

    PATH is absolute (so the URL has four slashes) and a fresh file in the log
    directory for every start. If `serve` rejects the URL (a wschat.py without that
    broker), the server exits at start and the column reads `error`.
    """

    name = "wschat_sqlite"

    def start(self, scenario: int) -> None:
        # scenario 8 restarts the server on this file (restart() does not come here)
        self.db = self.logdir / ("storm.db" if scenario == 8 else f"wschat-sqlite-s{scenario}.db")
        for f in (self.db, *(self.db.with_name(self.db.name + x) for x in ("-wal", "-shm", "-journal"))):
            f.unlink(missing_ok=True)
        super().start(scenario)

    def command(self, scenario: int) -> list[str]:
        return super().command(scenario) + ["--broker", f"sqlite:///{self.db}"]


class WsChatStock(WsChat):
    """wschat as embedders run it: create_app() served by uvicorn with its default settings.

    `wschat.py serve` uses its own WebSocket protocol (wschat:coalescing_websocket_protocol)
    and turns per-message-deflate off; this one gets uvicorn's defaults (ws="auto").
    Same app code, same URLs, same /healthz and /stats as wschat.
    """

    name = "wschat_stock"

    def command(self, scenario: int) -> list[str]:
        # bench/wschat_stock_app.py: create_app(rate=0, timeout=0, max_connections=20000)
        return [self.python, "-m", "uvicorn", "wschat_stock_app:app", "--app-dir", "bench",
                "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]

    def cwd(self) -> Path:
        return ROOT  # --app-dir bench is relative to it

    def env(self) -> dict[str, str] | None:
        # `import wschat` must find this repository's wschat.py
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ next to wschat.py
        return env


class Baseline(Server):
    name = "baseline"

    def command(self, scenario: int) -> list[str]:
        # Scenario 5 needs join announcements, which the tutorial does not make:
        # naive_server_joins.py is the tutorial plus one "joined the chat" broadcast.
        # Scenario 6 needs rooms: naive_rooms_server.py is the tutorial's per-room manager.
        app = {5: "naive_server_joins:app", 6: "naive_rooms_server:app"}.get(scenario, "naive_server:app")
        return [self.python, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning"]

    def cwd(self) -> Path:
        return BENCH

    def ready(self) -> bool:
        return http_get(self.port, "/", timeout=1)[0] in (200, 404)  # no route: any answer will do

    def paths(self, scenario: int) -> dict:
        if scenario == 6:
            return {"room": "/ws/r%d", "presence": None}  # the member index is not in its URL
        return {"sub": "/ws/%d", "pub": "/ws/pub",
                "presence": "joined the chat" if scenario == 5 else None}


# ---------------------------------------------------------------------------
# scenarios: loadgen arguments, full and --quick

def scenario_params(quick: bool) -> dict[int, dict]:
    if quick:
        return {
            1: dict(mode="fanout", subs=200, duration=3, warmup=0.5, inflight=10, concurrency=200),
            2: dict(mode="rate", subs=200, rate=20, duration=3, warmup=0.5, tail=2, concurrency=200),
            3: dict(mode="slow", subs=50, slow=5, size=16384, rate=100, duration=4, drain=2, concurrency=100),
            4: dict(mode="conns", subs=1000, concurrency=200),
            5: dict(mode="join", subs=200, concurrency=100, tail=2),
            6: dict(mode="rooms", rooms=100, members=10, interval=2, warmup=1, duration=5, drain=2,
                    concurrency=200),
            7: dict(mode="conns", subs=2000, concurrency=200, src_addrs=249, stall=10, connect_timeout=60),
            8: dict(mode="storm", rooms=20, members=50, rate=50, warmup=1, duration=2, tail=2, drain=2,
                    storm_timeout=30, backoff_min=0.05, backoff_max=2, concurrency=200),
        }
    return {
        1: dict(mode="fanout", subs=1000, duration=10, warmup=1, inflight=10, concurrency=200),
        2: dict(mode="rate", subs=1000, rate=20, duration=10, warmup=1, tail=2, concurrency=200),
        3: dict(mode="slow", subs=200, slow=5, size=16384, rate=100, duration=15, drain=5, concurrency=100),
        4: dict(mode="conns", subs=10000, concurrency=200),
        5: dict(mode="join", subs=1000, concurrency=100, tail=2),
        6: dict(mode="rooms", rooms=1000, members=10, interval=2, warmup=3, duration=30, drain=5,
                concurrency=200),
        # 50,000 from 249 source addresses (127.0.0.2-250); stall: give up after 15 s without progress
        7: dict(mode="conns", subs=50000, concurrency=200, src_addrs=249, stall=15, connect_timeout=300),
        # 100 rooms x 100 subscribers + 100 publisher connections; 200 messages/s = 2 per room per s
        8: dict(mode="storm", rooms=100, members=100, rate=200, warmup=2, duration=5, tail=5, drain=3,
                storm_timeout=60, backoff_min=0.05, backoff_max=2, concurrency=200),
    }


TITLES = {1: "fan-out", 2: "latency @ fixed rate", 3: "slow clients", 4: "idle connections",
          5: "join storm", 6: "many small rooms", 7: "50,000 idle connections", 8: "reconnect storm"}

# Servers that run only where they are the point, unless named in --servers.
ONLY_IN = {"wschat_sqlite": {6, 8}, "wschat_stock": {1, 2, 3, 4, 5, 6}}
# ... and where they cannot run at all: the tutorial has no resume (since=, epoch).
NEVER_IN = {"baseline": {8}}


def loadgen_timeout(p: dict) -> float:
    # connect (bounded at 120 s by the loadgen unless told) + the scenario's own phases + slack;
    # scenario 8: until the loadgen's "ready", before the restart
    return (p.get("connect_timeout", 120) + p.get("warmup", 0) + p.get("duration", 0) + p.get("drain", 0)
            + p.get("tail", 0) + 30)


class Lines:
    """The load generator's stdout, one line at a time, each within a deadline."""

    def __init__(self, proc: subprocess.Popen, logfile: Path):
        self.proc, self.logfile, self.buf = proc, logfile, b""

    def next(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"loadgen gave no result within {timeout:.0f} s")
            r, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    raise BenchError(f"loadgen exited ({self.proc.poll()}) without a result:\n{tail(self.logfile)}")
                self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line


def log_findings(path: Path) -> dict:
    """What a server log holds besides wschat's banner: at --log-level warning, normally nothing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    lines = [line for line in text.splitlines() if line.strip() and "open http://" not in line]
    first: list[str] = []
    for line in lines:
        if line.startswith((" ", "\t")) or line in first:
            continue   # traceback frames, repeats
        first.append(line[:200])
        if len(first) == 5:
            break
    return {"log": str(path), "lines": len(lines), "tracebacks": text.count("Traceback (most recent call last)"),
            "errors": sum(line.startswith("ERROR:") for line in lines),
            # the tutorial does not catch the disconnect when uvicorn closes it at shutdown (1012)
            "shutdown_disconnects": text.count("WebSocketDisconnect: (1012"),
            "too_many_open_files": text.count("Too many open files"), "first_lines": first}


def fd_usage(pid: int) -> dict:
    """Descriptors a process has open, and its RLIMIT_NOFILE (soft), from /proc."""
    out: dict = {}
    try:
        out["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                out["nofile_soft"], out["nofile_hard"] = (int(x) for x in line.split()[3:5])
    except (OSError, ValueError):
        pass
    return out


def run_one(server: Server, scenario: int, p: dict) -> dict:
    """Start the server, run the loadgen against it, stop both. Returns loadgen's JSON."""
    background = Background()
    server.start(scenario)
    paths = server.paths(scenario)
    args = [str(LOADGEN), "--port", str(server.port), "--pid", str(server.proc.pid), "--hold"]
    if "room" in paths:
        args += ["--room-path", paths["room"]]
    else:
        args += ["--sub-path", paths["sub"]]
    if "pub" in paths:
        args += ["--pub-path", paths["pub"]]   # scenario 8: a template, %d = room
    if paths.get("presence"):
        args += ["--presence", paths["presence"]]
    if paths.get("error"):
        args += ["--error-marker", paths["error"]]
    if paths.get("welcome"):
        args += ["--welcome", paths["welcome"]]
    for k, v in p.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    cmd = ["taskset", "-c", LOADGEN_CORE, *args]
    lg_log = server.logdir / f"loadgen-{server.name}-s{scenario}.log"
    lg = spawn(cmd, cwd=BENCH, logfile=lg_log, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    result = None
    try:
        lines = Lines(lg, lg_log)
        restart, old_ticks = None, 0
        if p["mode"] == "storm":
            if lines.next(loadgen_timeout(p)) != b"ready":
                raise BenchError(f"loadgen did not say ready:\n{tail(lg_log)}")

            def tell(line: str) -> None:
                lg.stdin.write(line.encode() + b"\n")
                lg.stdin.flush()

            restart = server.restart(scenario, tell)
            old_ticks = restart["old_ticks"]  # the first process's CPU (gone with it): Background needs it
            log(f"    restarted: SIGTERM -> exit {restart['term_to_exit_s']:.2f} s, "
                f"-> ready {restart['term_to_ready_s']:.2f} s")
            line = lines.next(p["storm_timeout"] + p["tail"] + p["drain"] + 30)
        else:
            line = lines.next(loadgen_timeout(p))
        result = json.loads(line)
        result["background"] = background.other_pct(proc_ticks(server.proc.pid) + proc_ticks(lg.pid) + old_ticks)
        result["loadgen_cmd"] = shlex.join(cmd)
        result["welcome_marker"] = paths.get("welcome")
        result["params"] = p
        if isinstance(server, WsChat):
            result["wschat_version"] = server.version
        result["server_cmd"] = server.cmdline
        result["server_fds"] = fd_usage(server.proc.pid)
        if restart is not None:
            result["restart"] = restart
            if isinstance(server, WsChat):
                # wschat.py may have changed in between: the version that came back
                result["wschat_version_after_restart"] = wschat_version(server.path)
        stats = server.stats()
        if stats is not None:
            result["server_stats"] = stats
        if server.proc.poll() is not None:
            result["server_exited"] = server.proc.returncode
            result["server_log_tail"] = tail(server.log)
        return result
    finally:
        # The server goes first: with the loadgen's sockets still open it cannot
        # start broadcasting "left the chat" to everyone (O(n^2) for the tutorial).
        server_end = server.stop()
        try:
            lg.stdin.close()  # EOF tells a --hold loadgen to exit
            lg.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            pass
        stop(lg, grace=2)
        log(f"    {server.name} stopped ({server_end})")
        if result is not None:
            result["server_end"] = server_end
            result["server_logs"] = [log_findings(Path(f)) for f in
                                     ([result["restart"]["old_log"]] if "restart" in result else []) + [server.log]]


# ---------------------------------------------------------------------------
# the table

def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"


def ratio(a, b) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return f"{a / b:.2f}"
    return "—"


WSCHAT_KINDS = ("wschat", "wschat_sqlite", "wschat_stock", "wschat_compare")


def metrics(scenario: int, r: dict, server: str) -> list[tuple[str, object]]:
    """(label, value) rows for one scenario's loadgen result."""
    mb = lambda kb: kb / 1024 if isinstance(kb, (int, float)) and kb >= 0 else None  # noqa: E731
    if scenario == 1:
        return [
            ("deliveries/s", r["deliveries_per_s"]),
            ("latency p50 (ms)", r["p50_ms"]),
            ("latency p99 (ms)", r["p99_ms"]),
            ("server CPU µs / delivery", r["server_cpu_us_per_delivery"]),
            ("loadgen CPU µs / delivery", r["loadgen_cpu_us_per_delivery"]),
        ]
    if scenario == 2:
        return [
            ("latency p50 (ms)", r["p50_ms"]),
            ("latency p99 (ms)", r["p99_ms"]),
            ("delivered (% of expected)",
             100.0 * r["window_msgs_delivered"] / r["expected"] if r["expected"] else None),
            ("server CPU µs / delivery", r["server_cpu_us_per_delivery"]),
        ]
    if scenario == 3:
        stats = r.get("server_stats") or {}
        return [
            (f"delivered to the {r['subs']} readers (%)", 100.0 * r["delivery_ratio"]),
            ("server RSS start (MB)", mb(r["rss_start_kb"])),
            ("server RSS max (MB)", mb(r["rss_max_kb"])),
            ("server RSS end (MB)", mb(r["rss_end_kb"])),
            (f"slow clients dropped (of {r['slow']}, seen by client)", r["slow_dropped"]),
            ("slow_clients_dropped (GET /stats)",
             stats.get("slow_clients_dropped") if server in WSCHAT_KINDS else None),
        ]
    if scenario == 4:
        return [
            ("connections open", r["connected"]),
            ("time to connect all (s)", r["connect_s"]),
            *connect_cost(r),
            ("server RSS before (MB)", mb(r["rss_before_kb"])),
            ("server RSS after (MB)", mb(r["rss_after_kb"])),
            ("RSS per connection (KB)", r["rss_per_conn_bytes"] / 1024 if r["connected"] else None),
            # the tutorial announces nothing on join; wschat's presence explains its connect time
            ("presence frames received while connecting",
             r["presence_frames"] if server in WSCHAT_KINDS else None),
            ("presence MB received while connecting",
             r["presence_bytes"] / 1e6 if server in WSCHAT_KINDS else None),
        ]
    if scenario == 5:
        return [
            ("members joined", r["members"]),
            ("time to join all (s)", r["connect_s"]),
            ("presence frames, total", r["presence_frames"]),
            ("presence bytes, total", r["presence_bytes"]),
            ("presence frames per member", r["presence_frames_per_member"]),
            ("presence bytes per member", r["presence_bytes_per_member"]),
        ]
    if scenario == 6:
        errors = (r["connect_failed"] + r["handshakes_unfinished"] + r["subs_closed_by_server"]
                  + r["protocol_errors"] + r["error_frames"])
        return [
            ("connections open", r["connected"]),
            ("time to connect all (s)", r["connect_s"]),
            ("deliveries/s expected (msgs sent × members)", r["expected_per_s"]),
            ("deliveries/s achieved", r["deliveries_per_s"]),
            ("latency p50 (ms)", r["p50_ms"]),
            ("latency p99 (ms)", r["p99_ms"]),
            (f"deliveries lost (expected − received, after ≤ {r['drain_limit_s']:g} s drain)", r["lost"]),
            ("delivered (% of expected, after drain)",
             100.0 * r["deliveries"] / r["expected_deliveries"] if r["expected_deliveries"] else None),
            ("server CPU µs / delivery", r["server_cpu_us_per_delivery"]),
            ("loadgen CPU µs / delivery", r["loadgen_cpu_us_per_delivery"]),
            ("server CPU (% of a core)", r["server_cpu_pct"]),
            ("server RSS after connecting (MB)", mb(r["rss_connected_kb"])),
            ("server RSS max while posting (MB)", mb(r["rss_max_kb"])),
            ("errors (failed connects, server closes, error frames)", errors),
        ]
    if scenario == 7:
        return [
            (f"connections open (of {r['conns']:,})", opened(r)),
            ("time to connect all (s)", r["connect_s"]),
            *connect_cost(r),
            ("server RSS after connecting (MB)", mb(r["rss_after_kb"])),
            ("RSS per connection (KB)", r["rss_per_conn_bytes"] / 1024 if r["connected"] else None),
            ("descriptor limit, server / loadgen (RLIMIT_NOFILE)",
             f"{r.get('server_fds', {}).get('nofile_soft', '?'):,} / {r['nofile_limit']:,}"),
            ("connecting stopped by", stopped_by(r)),
        ]
    if scenario == 8:
        rs = r.get("restart", {})
        cpu = r["server_cpu_ready_to_back_us"]
        wall = r["ready_to_back_s"]
        pct = lambda a, b: 100.0 * a / b if b else None  # noqa: E731
        return [
            ("subscribers + publisher connections", f"{r['subs']:,} + {r['pubs']:,}"),
            ("time to connect all at the start (s)", r["connect_s"]),
            ("SIGTERM → old server exited (s)", rs.get("term_to_exit_s")),
            ("SIGTERM → new server answers /healthz (s)", rs.get("term_to_ready_s")),
            ("SIGTERM → all subscribers welcomed again (s)",
             r["term_to_all_back_s"] if r["term_to_all_back_s"] >= 0 else "not all"),
            ("subscribers welcomed again", r["subs_back"]),
            ("resumed with recovered: true", r["subs_recovered"]),
            ("resumed with recovered: false", r["subs_not_recovered"]),
            ("messages replayed on resume (frames)", r["replayed_frames"]),
            ("messages acknowledged (echo to publisher)", r["msgs_acked_live"] + r["msgs_acked_by_replay"]),
            ("messages lost (acknowledged, some subscriber never got it)", r["lost_msgs"]),
            ("deliveries lost (of acknowledged × members)", r["lost_deliveries"]),
            ("duplicates (same message twice at a subscriber)", r["duplicates"]),
            ("publisher round trip before, p50 (ms)", r["rtt_before_p50_ms"]),
            ("publisher round trip before, p99 (ms)", r["rtt_before_p99_ms"]),
            ("publisher round trip before, max (ms)", r["rtt_before_max_ms"]),
            ("publisher round trip in the storm, p50 (ms)", r["rtt_storm_p50_ms"]),
            ("publisher round trip in the storm, p99 (ms)", r["rtt_storm_p99_ms"]),
            ("publisher round trip in the storm, max (ms)", r["rtt_storm_max_ms"]),
            ("messages not sent (room's publisher reconnecting)", r["msgs_skipped"]),
            ("messages sent, never acknowledged", r["msgs_unacked"]),
            ("server CPU, ready → all back (% of a core)", pct(cpu / 1e6, wall) if cpu >= 0 else None),
            ("server CPU µs per reconnect (ready → all back)",
             cpu / (r["subs"] + r["pubs"]) if cpu >= 0 else None),
        ]
    raise ValueError(scenario)


def opened(r: dict) -> int:
    """Connections that count: welcomed where the server sends a welcome, else handshaken."""
    return r["welcomed"] if r.get("welcome_marker") else r["connected"]


def connect_cost(r: dict) -> list[tuple[str, object]]:
    """Scenarios 4 and 7: what one connection costs while they are being opened."""
    n, cpu = opened(r), r["connect_server_cpu_us"]
    return [
        ("connections/s", n / r["connect_s"] if r["connect_s"] else None),
        ("server CPU µs per connection (connect phase)", cpu / n if n and cpu >= 0 else None),
        ("loadgen CPU µs per connection", r["connect_loadgen_cpu_us"] / n if n else None),
        ("server CPU while connecting (% of a core)",
         cpu / (r["connect_wall_s"] * 1e4) if r["connect_wall_s"] and cpu >= 0 else None),
    ]


def stopped_by(r: dict) -> str:
    if r.get("fd_error"):
        return f"loadgen: {r['fd_error']}"
    if r.get("connect_stalled"):
        return "no progress (stall limit)"
    if r["handshakes_unfinished"]:
        return "connect time limit"
    return "all connected"


def build_rows(results: dict, params: dict, extra: list[str]) -> list[list[str]]:
    """Table rows; two more cells for each of `extra` (wschat_stock, wschat_compare): its value, it/baseline."""
    rows = []
    for n, per_server in results.items():
        labels: list[str] = []
        values: dict[str, dict[str, object]] = {}
        for server, r in per_server.items():
            if "error" in r:
                continue
            for label, v in metrics(n, r, server):
                if label not in labels:
                    labels.append(label)
                values.setdefault(server, {})[label] = v
        if not labels:
            labels = ["(no result)"]
        def cell(server: str, label: str):
            if server not in per_server:
                return "not run"
            if "error" in per_server[server]:
                return "error"
            return values.get(server, {}).get(label)

        for label in labels:
            w, b = cell("wschat", label), cell("baseline", label)
            row = [f"{n} {TITLES[n]}", label, fmt(w), fmt(b), ratio(w, b)]
            for server in extra:
                s = cell(server, label)
                row += [fmt(s), ratio(s, b)]
            rows.append(row)
        if n == 5 and "baseline" in per_server:
            # what per-join broadcasting costs on paper: joiner k reaches k members
            m = params[5]["subs"]
            rows.append([f"{n} {TITLES[n]}", "join broadcasts n(n+1)/2 (computed, not measured)",
                         "—", fmt(m * (m + 1) // 2), "—"] + ["—", "—"] * len(extra))
    return rows


TABLE_HEAD = ["scenario", "metric", "wschat", "baseline", "wschat/baseline"]
EXTRA_HEADS = {"wschat_sqlite": ["wschat sqlite", "sqlite/baseline"],
               "wschat_stock": ["wschat on stock uvicorn", "stock/baseline"],
               "wschat_compare": ["wschat at --compare", "compare/baseline"]}


def json_keys(extra: list[str]) -> list[str]:
    return ["scenario", "metric", "wschat", "baseline", "ratio"] + [k for e in extra for k in (e, f"{e}_ratio")]


def markdown(rows: list[list[str]], extra: list[str]) -> str:
    head = TABLE_HEAD + [h for e in extra for h in EXTRA_HEADS[e]]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells, right: "| " + " | ".join(  # noqa: E731
        (c.rjust(w) if right and i >= 2 else c.ljust(w)) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join(("-" * (w + 1) + ":") if i >= 2 else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head, False), sep, *(line(r, True) for r in rows)])


def notes(results: dict) -> list[str]:
    """Things a reader of the table must know: errors, refused or dropped clients."""
    out = []
    for n, per_server in results.items():
        for server, r in per_server.items():
            where = f"scenario {n}, {server}"
            if "error" in r:
                out.append(f"{where}: ERROR {r['error']}")
                continue
            no_fd = r.get("connect_failed_no_fd", 0)   # socket() found no descriptor: see connect_notes
            if r.get("connect_failed", 0) > no_fd:
                out.append(f"{where}: {r['connect_failed'] - no_fd} of {r['conns']} connections failed "
                           f"(tcp {r['connect_failed_tcp'] - no_fd}, 4xx {r['connect_failed_4xx']}, "
                           f"5xx {r['connect_failed_5xx']}, other {r['connect_failed_other']})")
            if r.get("subs_closed_by_server"):
                out.append(f"{where}: server closed {r['subs_closed_by_server']} reading subscribers "
                           f"(close codes {r['close_codes']})")
            if r.get("msgs_timed_out"):
                out.append(f"{where}: {r['msgs_timed_out']} messages never reached every subscriber "
                           "(closed loop gave up on them after 2 s)")
            bg = r.get("background", {})
            if bg.get("other_cpu_pct_of_core", 0) >= 10 or bg.get("steal_pct_of_core", 0) >= 10:
                out.append(f"{where}: OTHER PROCESSES used {bg['other_cpu_pct_of_core']:.0f}% of a core "
                           f"(steal {bg['steal_pct_of_core']:.0f}%) during this run: its figures are disturbed")
            if r.get("handshakes_unfinished") and n != 7:
                out.append(f"{where}: only {r['connected']} of {r['conns']} connections were open when the "
                           f"loadgen's 120 s connect limit ran out ({r['handshakes_unfinished']} handshakes unfinished)")
            for found in r.get("server_logs", []):
                if found.get("errors") and found["errors"] == found.get("shutdown_disconnects"):
                    out.append(f"{where}: server log {Path(found['log']).name}: {found['errors']} errors, each a "
                               "WebSocketDisconnect (1012) at shutdown that the tutorial code does not catch "
                               "(expected)")
                elif found.get("lines"):
                    out.append(f"{where}: server log {Path(found['log']).name}: {found['lines']} lines, "
                               f"{found['tracebacks']} tracebacks"
                               + (f", {found['too_many_open_files']} 'Too many open files'"
                                  if found["too_many_open_files"] else "")
                               + f"; first: {' | '.join(found['first_lines'][:3])}")
            if n in (4, 7):
                out += connect_notes(where, r)
            if n == 8:
                out += storm_notes(where, server, r)
            if r.get("protocol_errors"):
                out.append(f"{where}: {r['protocol_errors']} connections sent frames the loadgen could not parse")
            if "server_exited" in r:
                out.append(f"{where}: server exited with {r['server_exited']} during the run")
            if r.get("error_frames"):
                out.append(f"{where}: the server sent {r['error_frames']} error frames")
            if n == 6 and r.get("msgs_skipped"):
                out.append(f"{where}: {r['msgs_skipped']} scheduled posts were skipped (the member was not open)")
            if n == 6 and r.get("lost"):
                out.append(f"{where}: {r['lost']:,} of {r['expected_deliveries']:,} expected deliveries "
                           f"({100.0 * r['lost'] / r['expected_deliveries']:.2f}%) had not arrived "
                           f"{r['drain_limit_s']:g} s after the last post")
            if n == 3 and r.get("msgs_not_taken_by_server_at_stop"):
                out.append(f"{where}: about {r['msgs_not_taken_by_server_at_stop']} of "
                           f"{r['msgs_planned']} messages were still unread by the server at the "
                           "end of publishing (it stopped reading the publisher)")
        if n in (1, 6):
            for server in ("wschat", "wschat_sqlite", "wschat_stock", "wschat_compare", "baseline"):
                r = per_server.get(server, {})
                if "loadgen_cpu_us_per_delivery" in r:
                    ok = r["loadgen_cpu_us_per_delivery"] < r["server_cpu_us_per_delivery"]
                    out.append(f"scenario {n}, {server}: loadgen CPU per delivery "
                               f"{r['loadgen_cpu_us_per_delivery']:.2f} µs vs server "
                               f"{r['server_cpu_us_per_delivery']:.2f} µs: "
                               + ("loadgen is cheaper, OK" if ok else "LOADGEN IS NOT CHEAPER: figures suspect"))
    return out


def connect_notes(where: str, r: dict) -> list[str]:
    """Scenarios 4 and 7: is the connect rate the server's, and how far did 7 get."""
    out = []
    n, cpu, wall = opened(r), r["connect_server_cpu_us"], r["connect_wall_s"]
    if n and cpu >= 0 and wall:
        pct = cpu / (wall * 1e4)
        lg = r["connect_loadgen_cpu_us"] / n
        if pct < 90:
            out.append(f"{where}: the server used only {pct:.0f}% of its core while connecting: connections/s "
                       f"is not limited by its CPU alone (the loadgen keeps {r['params']['concurrency']} handshakes "
                       f"in flight and used {100 * r['connect_loadgen_cpu_us'] / (wall * 1e6):.0f}% of its core)")
        if lg >= cpu / n:
            out.append(f"{where}: loadgen CPU per connection {lg:.0f} µs vs server {cpu / n:.0f} µs: "
                       "LOADGEN IS NOT CHEAPER: figures suspect")
    if n < r["conns"]:
        fds = r.get("server_fds", {})
        out.append(f"{where}: {n:,} of {r['conns']:,} connections opened; connecting stopped by {stopped_by(r)}; "
                   f"server holds {fds.get('open_fds', '?'):,} descriptors of its limit {fds.get('nofile_soft', '?'):,}, "
                   f"the loadgen's limit is {r['nofile_limit']:,}"
                   + (f"; {r['not_attempted']:,} never attempted" if r.get("not_attempted") else ""))
    return out


def storm_notes(where: str, server: str, r: dict) -> list[str]:
    """Scenario 8: what a reader must know about the restart."""
    out = []
    rs = r.get("restart", {})
    if rs.get("old_end") != "exited":
        out.append(f"{where}: the first server did not exit within 15 s of SIGTERM: {rs.get('old_end')}")
    if r["subs_back"] < r["subs"]:
        out.append(f"{where}: only {r['subs_back']:,} of {r['subs']:,} subscribers were welcomed again within "
                   f"{r['params']['storm_timeout']} s")
    if r["lost_msgs"]:
        ex = r.get("lost_examples", [])[:3]
        detail = "; ".join(f"id {e['id']} in room {e['room']} sent {e['sent_ms_after_term']:.0f} ms after SIGTERM, "
                           f"member {e['member']} resumed since={e['sub_since']} got welcome last_id="
                           f"{e['sub_welcome_last_id']}" for e in ex)
        must = " (with SQLite this MUST be 0)" if server == "wschat_sqlite" else ""
        out.append(f"{where}: {r['lost_msgs']} acknowledged messages ({r['lost_deliveries']} deliveries) never "
                   f"reached every subscriber of their room{must}, {r['lost_msgs_sent_before_term']} of them sent "
                   f"before the SIGTERM; e.g. {detail}")
    if r["duplicates"]:
        out.append(f"{where}: {r['duplicates']} duplicate deliveries (a subscriber got the same message twice)")
    if server == "wschat_sqlite" and (r["subs_not_recovered"] or r["epoch_changes"]):
        out.append(f"{where}: {r['subs_not_recovered']} resumes answered recovered: false and {r['epoch_changes']} "
                   "epoch changes, although SQLite keeps both")
    if r.get("foreign_frames"):
        out.append(f"{where}: {r['foreign_frames']} message frames carried no marker of this run's publisher")
    if r.get("resumes_without_recovered"):
        out.append(f"{where}: {r['resumes_without_recovered']} welcomes after a since= had no \"recovered\"")
    return out


# ---------------------------------------------------------------------------
# environment

def pick_python(requested: str | None) -> str:
    candidates = [requested] if requested else [sys.executable, FALLBACK_PYTHON]
    for py in candidates:
        if py and (shutil.which(py) or os.path.exists(py)):
            ok = subprocess.run([py, "-c", "import fastapi, uvicorn, websockets"], capture_output=True,
                                timeout=60).returncode == 0
            if ok:
                return py
    sys.exit(f"no Python with fastapi, uvicorn[standard] and websockets among {candidates}; "
             f"create one: python3 -m venv /tmp/benchvenv && "
             f"/tmp/benchvenv/bin/pip install fastapi 'uvicorn[standard]' click websockets")


def machine_info(python: str) -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    probe = ("import sys, json, importlib.metadata as m\n"
             "v = {'python': sys.version.split()[0]}\n"
             "for p in ('uvicorn', 'websockets', 'fastapi', 'starlette', 'uvloop', 'httptools', 'click'):\n"
             "    try: v[p] = m.version(p)\n"
             "    except Exception: v[p] = None\n"
             "try:\n"
             "    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol as A\n"
             "    v['uvicorn_ws_auto'] = A.__module__.rsplit('.', 1)[-1]\n"
             "except Exception: pass\n"
             "print(json.dumps(v))")
    versions = json.loads(subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                         timeout=60, check=True).stdout)
    gcc = subprocess.run(["gcc", "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    try:
        cc = Path("/proc/sys/net/ipv4/tcp_congestion_control").read_text().strip()
    except OSError:
        cc = None
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "server_python": python,
            **versions, "gcc": gcc, "tcp_congestion_control": cc, "harness_python": sys.version.split()[0]}


def wschat_version(path: Path = WSCHAT) -> dict:
    """sha256 of wschat.py as started, the git HEAD, and whether the file differs from HEAD."""
    v = {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()[:12]}
    if path != WSCHAT:
        return v
    try:
        v["git_head"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                       capture_output=True, text=True, timeout=30).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD", "--", "wschat.py"],
                               capture_output=True, timeout=30).returncode
        v["uncommitted_changes"] = dirty != 0
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def build_loadgen() -> None:
    BUILD.mkdir(exist_ok=True)
    if LOADGEN.exists() and LOADGEN.stat().st_mtime >= LOADGEN_SRC.stat().st_mtime:
        return
    log(f"building {LOADGEN.relative_to(ROOT)}")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(LOADGEN), str(LOADGEN_SRC)], check=True, timeout=120)


def raise_nofile() -> dict:
    """RLIMIT_NOFILE as high as it goes; children inherit it.

    The server needs a descriptor per connection (10k in scenario 4, 50k in 7), and so
    does the loadgen. Raising the hard limit takes CAP_SYS_RESOURCE (root, outside most
    containers) and stops at /proc/sys/fs/nr_open; otherwise the soft limit goes up to
    the hard one. Returns what happened, for the header and results.json.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    out: dict = {"before": [soft, hard]}
    try:
        want = int(Path("/proc/sys/fs/nr_open").read_text())
    except (OSError, ValueError):
        want = hard
    out["nr_open"] = want
    if hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        except (ValueError, OSError) as e:
            out["hard_limit_error"] = f"setrlimit({want}) refused: {e} (needs CAP_SYS_RESOURCE)"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    out["after"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return out


# ---------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short smoke run with small numbers")
    ap.add_argument("--scenario", type=int, action="append", choices=sorted(TITLES),
                    help="run only this scenario (repeatable)")
    ap.add_argument("--servers",
                    help="comma-separated subset of wschat,wschat_sqlite,wschat_stock,baseline (they always "
                         "run in that order; default: all, wschat_sqlite only in scenario 6; named here, "
                         "it runs in every scenario)")
    ap.add_argument("--no-stock", action="store_true",
                    help="skip wschat on stock uvicorn (same as leaving wschat_stock out of --servers)")
    ap.add_argument("--compare", metavar="GIT_REF",
                    help="also run wschat.py as of this commit, in the same run (a before/after comparison)")
    ap.add_argument("--rooms-interval", type=float, metavar="SECONDS",
                    help="scenario 6: seconds between one member's posts (default 2: 50,000 deliveries/s, which "
                         "saturates one core; 4 compares servers that keep up)")
    ap.add_argument("--python", help="interpreter for the servers (needs fastapi, uvicorn[standard])")
    ap.add_argument("--json", default=str(BENCH / "results.json"), help="where to write the results")
    ap.add_argument("--wait-idle", type=float, default=15, metavar="SECONDS",
                    help="before each run, wait up to this long for other processes to go quiet (default 15)")
    args = ap.parse_args()

    global SERVER_CORE, LOADGEN_CORE
    if shutil.which("taskset") is None:
        sys.exit("taskset not found (util-linux)")
    if shutil.which("gcc") is None:
        sys.exit("gcc not found")
    if (os.cpu_count() or 1) < 2:
        log("warning: fewer than 2 cores: server and loadgen share core 0, figures are not comparable")
        LOADGEN_CORE = "0"

    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    if Path.cwd() != ROOT:
        command = f"cd {shlex.quote(str(Path.cwd()))} && {command}"
    python = pick_python(args.python)
    nofile = raise_nofile()
    build_loadgen()
    machine = machine_info(python)
    params = scenario_params(args.quick)
    if args.rooms_interval:
        params[6]["interval"] = args.rooms_interval
    scenarios = sorted(set(args.scenario or params))
    kinds = ["wschat", "wschat_sqlite", "wschat_stock", "baseline"]
    wanted = [s.strip() for s in (args.servers or ",".join(kinds)).split(",") if s.strip()]
    if unknown := sorted(set(wanted) - set(kinds)):
        sys.exit(f"--servers: unknown {', '.join(unknown)}; choose from {','.join(kinds)}")
    only_in = {} if args.servers else ONLY_IN
    runs_in = lambda name, n: n in only_in.get(name, {n}) and n not in NEVER_IN.get(name, ())  # noqa: E731
    if args.no_stock:
        wanted = [s for s in wanted if s != "wschat_stock"]
    logdir = Path(tempfile.mkdtemp(prefix="wschat-bench-"))
    servers: list[Server] = []
    if "wschat" in wanted:
        servers.append(WsChat(python, logdir))
    if "wschat_sqlite" in wanted and any(runs_in("wschat_sqlite", n) for n in scenarios):
        servers.append(WsChatSqlite(python, logdir))
    if "wschat_stock" in wanted and any(runs_in("wschat_stock", n) for n in scenarios):
        servers.append(WsChatStock(python, logdir))
    if args.compare:
        servers.append(WsChatCompare(python, logdir, args.compare))
    if "baseline" in wanted:
        servers.append(Baseline(python, logdir))

    started = time.time()
    results: dict[int, dict[str, dict]] = {}
    interrupted = False
    try:
        for n in scenarios:
            results[n] = {}
            for server in servers:
                if not runs_in(server.name, n):
                    continue
                if isinstance(server, WsChat) and not server.path.exists():
                    results[n][server.name] = {"error": f"{WSCHAT.relative_to(ROOT)} does not exist"}
                    continue
                log(f"scenario {n} ({TITLES[n]}) against {server.name} ...")
                if args.wait_idle > 0:
                    wait_idle(args.wait_idle, threshold=10)
                t0 = time.monotonic()
                try:
                    results[n][server.name] = run_one(server, n, params[n])
                except (BenchError, ValueError, OSError, subprocess.SubprocessError) as e:
                    results[n][server.name] = {"error": str(e)}
                    log(f"    ERROR: {e}")
                log(f"    done in {time.monotonic() - t0:.1f} s")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping everything we started")
    finally:
        stop_all()

    elapsed = time.time() - started
    stock = any(isinstance(s, WsChatStock) for s in servers)
    extra = [s.name for s in servers if s.name in EXTRA_HEADS]
    rows = build_rows(results, params, extra)
    table = markdown(rows, extra)
    note_lines = notes(results)
    m = machine
    print(f"# wschat benchmark{' (QUICK smoke run: small numbers, not comparable)' if args.quick else ''}")
    print()
    print(f"command: `{command}`")
    print(f"machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}; server on core {SERVER_CORE}, "
          f"loadgen on core {LOADGEN_CORE}")
    print(f"software: Python {m['python']}, uvicorn {m['uvicorn']} (ws: {m.get('uvicorn_ws_auto')}), "
          f"websockets {m['websockets']}, fastapi {m['fastapi']}, starlette {m['starlette']}, "
          f"uvloop {m['uvloop']}, httptools {m['httptools']}; loadgen: {m['gcc']} -O2")
    print(f"baseline: bench/naive_server.py (FastAPI tutorial ConnectionManager; scenario 5: "
          f"bench/naive_server_joins.py = same + a 'joined the chat' broadcast; scenario 6: "
          f"bench/naive_rooms_server.py = the tutorial's manager with a list per room)")
    if any(isinstance(s, WsChatSqlite) for s in servers):
        print("wschat sqlite: `wschat.py serve ... --broker sqlite:///<log dir>/wschat-sqlite-sN.db` "
              "(a fresh file per run)")
    if stock:
        print("wschat on stock uvicorn: bench/wschat_stock_app.py (create_app() under `uvicorn` with its "
              f"default settings, ws: {m.get('uvicorn_ws_auto')}); the headline ratio is wschat/baseline")
    if args.compare:
        print(f"wschat at --compare: wschat.py as of git {args.compare}, served as wschat is")
    if 8 in scenarios:
        print("scenario 8 (reconnect storm): the wschat column is the memory broker, wschat sqlite is "
              "`--broker sqlite:///<log dir>/storm.db`; each server is SIGTERMed and started again mid-run; "
              "no baseline (the tutorial has no resume)")
    lim = nofile["after"]
    print(f"RLIMIT_NOFILE for servers and loadgen: soft {lim[0]:,}, hard {lim[1]:,}"
          + (f" (could not raise the hard limit to nr_open {nofile['nr_open']:,}: "
             f"{nofile['hard_limit_error']})" if "hard_limit_error" in nofile else ""))
    print(f"run took {elapsed:.0f} s{' (INTERRUPTED)' if interrupted else ''}; server/loadgen logs in {logdir}")
    versions = {json.dumps(r["wschat_version"], sort_keys=True) for per in results.values()
                for r in per.values() if "wschat_version" in r}
    for v in sorted(versions):
        v = json.loads(v)
        where = f"git HEAD {v.get('git_head')}" if "git_head" in v else v["path"]
        print(f"wschat.py: sha256 {v['sha256']}, {where}"
              f"{' + uncommitted changes' if v.get('uncommitted_changes') else ''}")
    if len(versions) > 1 + bool(args.compare):
        print("WARNING: wschat.py changed during the run; scenarios ran different versions (see results.json)")
    bgs = [r["background"]["other_cpu_pct_of_core"] for per in results.values() for r in per.values()
           if "background" in r]
    if bgs:
        print(f"other processes on this machine during the runs: {min(bgs):.0f}-{max(bgs):.0f}% of a core "
              "(should be near 0; see notes)")
    print()
    print(table)
    if note_lines:
        print()
        print("notes:")
        for line in note_lines:
            print(f"- {line}")
    out = {"command": command, "quick": args.quick, "interrupted": interrupted, "started_unix": started,
           "duration_s": round(elapsed, 1), "machine": machine, "cores": {"server": SERVER_CORE,
           "loadgen": LOADGEN_CORE}, "params": params, "logs": str(logdir), "rlimit_nofile": nofile,
           "results": {str(k): v for k, v in results.items()},
           "table": [dict(zip(json_keys(extra), r)) for r in rows],
           "notes": note_lines}
    Path(args.json).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    log(f"results written to {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    # SIGTERM/SIGHUP behave like Ctrl-C (and Ctrl-C works even where SIGINT was
    # inherited as ignored) so the finally-block always stops the children
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.default_int_handler)
    sys.exit(main())

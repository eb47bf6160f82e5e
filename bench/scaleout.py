#!/usr/bin/env python3
"""Scale-out: N wschat processes on one Redis, then on a 3-master Redis Cluster.

    python bench/scaleout.py                  # about 2 minutes
    python bench/scaleout.py --processes 3 --interval 0.5

Each topology gets fresh processes: the Redis side (one redis-server, or three
cluster-enabled ones joined by ``redis-cli --cluster create``, no replicas), then
``--processes`` wschat servers (``wschat.py serve --broker ... --rate 0 --timeout 0``),
then one C load generator (bench/loadgen.c, mode "rooms") per wschat process. Every
load generator joins the same ``--rooms`` rooms with ``--members`` members each, so a
room has members on every process and each message is delivered by every process:
one script run on Redis, one pub/sub copy per process, ``members x processes``
deliveries. Every member posts once per ``--interval`` seconds.

Pinning (2 cores): the wschat processes share core 0; Redis and the load generators
share core 1. CPU is read from /proc (utime + stime) for every process, over a window
inside the load generators' measuring window, so "CPU per delivery" is each side's own
cost, whatever shares its core. The output is one markdown table on stdout; progress
goes to stderr. Needs gcc, taskset, redis-server and redis-cli.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # noqa: E402  (the harness's process, CPU and loadgen helpers)

SERVER_CORE, SIDE_CORE = bench.SERVER_CORE, bench.LOADGEN_CORE


def start_redis(logdir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, int]:
    port = bench.free_port()
    directory = logdir / name
    directory.mkdir()
    proc = bench.spawn(["taskset", "-c", SIDE_CORE, shutil.which("redis-server") or "redis-server",
                        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                        "--dir", str(directory), *extra], cwd=directory, logfile=directory / "redis.log")
    wait_for(lambda: redis_cli(port, "PING") == "PONG", f"{name} did not start")
    return proc, port


def redis_cli(port: int, *command: str) -> str:
    done = subprocess.run(["redis-cli", "-p", str(port), *command], capture_output=True, text=True, timeout=30)
    return done.stdout.strip()


def wait_for(check, message: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise bench.BenchError(message)
        time.sleep(0.1)


def start_topology(kind: str, logdir: Path) -> tuple[list[subprocess.Popen], list[int], str]:
    """The Redis side: its processes, their ports and the broker URL wschat gets."""
    if kind == "one Redis":
        proc, port = start_redis(logdir, "redis")
        return [proc], [port], f"redis://127.0.0.1:{port}/0"
    nodes = [start_redis(logdir, f"cluster-{n}", "--cluster-enabled", "yes", "--cluster-port",
                         str(bench.free_port()), "--cluster-config-file", str(logdir / f"cluster-{n}" / "nodes.conf"))
             for n in range(3)]
    subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{port}" for _, port in nodes),
                    "--cluster-replicas", "0", "--cluster-yes"], check=True, timeout=60, capture_output=True)
    wait_for(lambda: all("cluster_state:ok" in redis_cli(port, "CLUSTER", "INFO") for _, port in nodes),
             "the cluster did not become ok")
    ports = [port for _, port in nodes]
    return [proc for proc, _ in nodes], ports, "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports) + "/"


def script_time(ports: list[int]) -> tuple[int, float]:
    """Scripts run and CPU µs Redis spent inside them (INFO commandstats), over all masters."""
    calls, usec = 0, 0.0
    for port in ports:
        for line in redis_cli(port, "INFO", "commandstats").splitlines():
            if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:")):
                fields = dict(item.split("=") for item in line.split(":", 1)[1].split(","))
                calls, usec = calls + int(fields["calls"]), usec + float(fields["usec"])
    return calls, usec


def measure(kind: str, args: argparse.Namespace, logdir: Path) -> dict:
    bench.log(f"{kind}: starting")
    redis_procs, ports, url = start_topology(kind, logdir)
    servers, loadgens = [], []
    try:
        idle = {p.pid: bench.proc_ticks(p.pid) for p in redis_procs}   # Redis's own housekeeping, at rest
        time.sleep(3)
        idle_us = sum(bench.proc_ticks(pid) - ticks for pid, ticks in idle.items()) / bench.CLK_TCK * 1e6 / 3
        for n in range(args.processes):
            port = bench.free_port()
            cmd = ["taskset", "-c", SERVER_CORE, args.python, str(bench.WSCHAT), "serve", "--host", "127.0.0.1",
                   "--port", str(port), "--rate", "0", "--timeout", "0", "--log-level", "warning",
                   "--max-connections", "20000", "--broker", url]
            servers.append((bench.spawn(cmd, cwd=bench.ROOT, logfile=logdir / f"wschat-{kind[:3]}-{n}.log"), port))
        for proc, port in servers:
            wait_for(lambda: bench.http_get(port, "/healthz", 1)[0] == 200, f"wschat on {port} not healthy")
        members = args.rooms * args.members
        for n, (proc, port) in enumerate(servers):
            cmd = ["taskset", "-c", SIDE_CORE, str(bench.LOADGEN), "--mode", "rooms", "--port", str(port),
                   "--pid", str(proc.pid), "--hold", "--room-path", f"/rooms/r%d/ws?client_id=g{n}m%d",
                   "--rooms", str(args.rooms), "--members", str(args.members), "--interval", str(args.interval),
                   "--warmup", str(args.warmup), "--duration", str(args.duration), "--drain", "3",
                   "--concurrency", "200", "--presence", '"type":"presence"', "--error-marker", '"type":"error"']
            logfile = logdir / f"loadgen-{kind[:3]}-{n}.log"
            loadgens.append((bench.spawn(cmd, cwd=bench.BENCH, logfile=logfile, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE), logfile))

        def connected(port: int) -> bool:
            status, body = bench.http_get(port, "/stats", 2)
            return status == 200 and json.loads(body)["connections"] >= members

        for _, port in servers:
            wait_for(lambda: connected(port), "the load generators did not connect", timeout=120)
        # The load generators measure from the end of their warm-up; sample CPU inside that window.
        time.sleep(args.warmup + 1)
        pids = {"redis": [p.pid for p in redis_procs], "wschat": [p.pid for p, _ in servers]}
        before = {pid: bench.proc_ticks(pid) for group in pids.values() for pid in group}
        scripts_before = script_time(ports)
        t0 = time.monotonic()
        time.sleep(max(1.0, args.duration - 2))
        seconds = time.monotonic() - t0
        scripts_after = script_time(ports)
        used = {pid: (bench.proc_ticks(pid) - ticks) / bench.CLK_TCK * 1e6 / seconds for pid, ticks in before.items()}
        reports = [json.loads(bench.Lines(lg, logfile).next(args.duration + 60)) for lg, logfile in loadgens]
    finally:
        for proc, _ in servers:
            bench.stop(proc, grace=5)
        for lg, _ in loadgens:
            bench.stop(lg, grace=5)
        for proc in redis_procs:
            bench.stop(proc, grace=5)
    deliveries = sum(r["deliveries_per_s"] for r in reports)
    messages = args.rooms * args.members * args.processes / args.interval
    redis_us = sum(used[pid] for pid in pids["redis"])      # CPU µs per second of wall time
    wschat_us = sum(used[pid] for pid in pids["wschat"])
    return {
        "topology": kind, "url": url, "processes": args.processes,
        "messages_per_s": messages, "expected_deliveries_per_s": messages * args.members * args.processes,
        "deliveries_per_s": deliveries,
        "p50_ms": max(r["p50_ms"] or 0 for r in reports), "p99_ms": max(r["p99_ms"] or 0 for r in reports),
        "errors": sum(r.get("error_frames", 0) + r.get("subs_closed_by_server", 0) for r in reports),
        "redis_idle_cpu_pct": idle_us / 1e4,
        "redis_cpu_pct": redis_us / 1e4, "redis_us_per_message": redis_us / messages,
        "redis_us_per_message_above_idle": (redis_us - idle_us) / messages,
        "redis_script_us_per_call": ((scripts_after[1] - scripts_before[1]) / (scripts_after[0] - scripts_before[0])
                                     if scripts_after[0] > scripts_before[0] else None),
        "redis_scripts_per_s": (scripts_after[0] - scripts_before[0]) / seconds,
        "redis_us_per_delivery": redis_us / deliveries if deliveries else None,
        "redis_cpu_split_pct": [round(used[pid] / 1e4, 1) for pid in pids["redis"]],
        "wschat_cpu_pct": wschat_us / 1e4, "wschat_us_per_delivery": wschat_us / deliveries if deliveries else None,
        "loadgen": reports,
    }


def table(results: list[dict]) -> str:
    rows = [("metric", *(r["topology"] for r in results))]
    def add(name: str, fmt, key: str) -> None:
        rows.append((name, *(fmt(r[key]) for r in results)))
    add("wschat processes", str, "processes")
    add("messages/s posted (offered)", lambda v: f"{v:,.0f}", "messages_per_s")
    add("deliveries/s expected", lambda v: f"{v:,.0f}", "expected_deliveries_per_s")
    add("deliveries/s achieved", lambda v: f"{v:,.0f}", "deliveries_per_s")
    add("latency p50 / p99 (ms, worst load generator)", lambda v: v, "latency")
    add("errors (error frames, server closes)", str, "errors")
    add("Redis CPU (% of a core, all its processes)", lambda v: f"{v:.1f}", "redis_cpu_pct")
    add("Redis CPU per master (% of a core)", lambda v: " / ".join(map(str, v)), "redis_cpu_split_pct")
    add("Redis CPU at rest, before the load (% of a core)", lambda v: f"{v:.1f}", "redis_idle_cpu_pct")
    add("Redis CPU µs per message", lambda v: f"{v:.1f}", "redis_us_per_message")
    add("Redis CPU µs per message, above rest", lambda v: f"{v:.1f}", "redis_us_per_message_above_idle")
    add("scripts run by Redis per second", lambda v: f"{v:,.0f}", "redis_scripts_per_s")
    add("Redis time inside a script, µs per call (commandstats)", lambda v: f"{v:.1f}", "redis_script_us_per_call")
    add("Redis CPU µs per delivery", lambda v: f"{v:.2f}", "redis_us_per_delivery")
    add("wschat CPU (% of a core, all processes)", lambda v: f"{v:.1f}", "wschat_cpu_pct")
    add("wschat CPU µs per delivery", lambda v: f"{v:.2f}", "wschat_us_per_delivery")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--processes", type=int, default=2, help="wschat processes (default 2)")
    ap.add_argument("--rooms", type=int, default=200)
    ap.add_argument("--members", type=int, default=5, help="members per room on each process (default 5)")
    ap.add_argument("--interval", type=float, default=2.0, help="seconds between one member's posts (default 2)")
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--duration", type=float, default=15)
    ap.add_argument("--python", help="interpreter for wschat (needs fastapi, uvicorn[standard], redis)")
    ap.add_argument("--json", default=str(bench.BENCH / "scaleout.json"))
    args = ap.parse_args()
    args.python = bench.pick_python(args.python)
    for tool in ("redis-server", "redis-cli", "taskset", "gcc"):
        if shutil.which(tool) is None:
            sys.exit(f"scaleout needs {tool}")
    bench.build_loadgen()
    bench.raise_nofile()
    logdir = Path(tempfile.mkdtemp(prefix="wschat-scaleout-"))
    results = []
    try:
        for kind in ("one Redis", "3-master Cluster"):
            result = measure(kind, args, logdir)
            result["latency"] = f'{result["p50_ms"]:.2f} / {result["p99_ms"]:.2f}'
            results.append(result)
    finally:
        bench.stop_all()
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    version = bench.wschat_version()
    print(f"command: `{command}`\nwschat.py: sha256 {version.get('sha256', '?')}, git {version.get('git_head', '?')}"
          f"{' + uncommitted changes' if version.get('uncommitted_changes') else ''}\n"
          f"load: {args.rooms} rooms x {args.members} members on each of {args.processes} processes, "
          f"each member posting every {args.interval:g} s; logs in {logdir}\n")
    print(table(results))
    Path(args.json).write_text(json.dumps({"command": command, "wschat": version, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

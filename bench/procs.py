"""Process and machine helpers of the fan-out suite (fanout.py, connections.py, run_all.py).

Standard library only, so that run_all.py can import it under any Python 3.11+ before the bench
venv exists. Everything here is synchronous and runs in the calling process's main thread
(the /proc readers may be called from any process: they read another process's files).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, TypeVar

CLK_TCK = os.sysconf("SC_CLK_TCK")
LOOPBACK = "127.0.0.1"
T = TypeVar("T")


# --- /proc readings -------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads), from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    # Field 2 (comm) may hold spaces and parentheses: split after its last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_mem_mb(pid: int) -> dict[str, float]:
    """Resident memory of `pid` in MiB: {"rss": VmRSS, "hwm": VmHWM (the peak)}."""
    out = {"rss": 0.0, "hwm": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = round(int(line.split()[1]) / 1024, 1)
        elif line.startswith("VmHWM:"):
            out["hwm"] = round(int(line.split()[1]) / 1024, 1)
    return out


def pids_cpu_s(pids: Sequence[int]) -> float:
    """The summed CPU seconds of several processes (e.g. the nodes of a cluster)."""
    return sum(proc_cpu_s(pid) for pid in pids)


def pids_mem_mb(pids: Sequence[int]) -> dict[str, float]:
    """The summed rss/hwm of several processes, in MiB."""
    mems = [proc_mem_mb(pid) for pid in pids]
    return {key: round(sum(m[key] for m in mems), 1) for key in ("rss", "hwm")}


def machine_cpu_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    busy = values[0] + values[1] + values[2] + values[5] + values[6]
    return busy / CLK_TCK, values[7] / CLK_TCK


def machine_busy(sample: float = 2.0) -> float:
    """Cores busy on the whole machine over the next `sample` seconds (blocks that long)."""
    before = machine_cpu_s()[0]
    time.sleep(sample)
    return (machine_cpu_s()[0] - before) / sample


def wait_quiet(limit: float, timeout: float, sample: float = 2.0) -> tuple[float, float]:
    """Block until the machine uses at most `limit` cores (other sessions' load skews every
    figure), for at most `timeout` seconds; returns (busy cores last seen, seconds waited)."""
    start = time.monotonic()
    while True:
        busy = machine_busy(sample)
        waited = time.monotonic() - start
        if busy <= limit or waited >= timeout:
            if busy > limit:
                print(
                    f"warning: machine still {busy:.2f} cores busy after {waited:.0f} s; "
                    "running anyway",
                    file=sys.stderr,
                    flush=True,
                )
            return round(busy, 2), round(waited, 1)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, kernel, this Python, load: recorded with every result set."""
    model = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "mem_total_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nofile_hard": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
        "somaxconn": _read_int("/proc/sys/net/core/somaxconn"),
        "ip_local_port_range": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _read_int(path: str) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


# --- limits ---------------------------------------------------------------------------------


def raise_nofile(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE to min(wanted, hard); returns the new soft
    limit. Used as a child's preexec_fn (then it runs in the forked child before exec)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target != soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# --- ports and processes --------------------------------------------------------------------


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port of `host` that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.3) -> bool:
    """True if a TCP connection to host:port succeeds now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_ports(proc: subprocess.Popen[bytes], ports: Sequence[int], timeout: float) -> None:
    """Wait until every port accepts connections, at most `timeout` seconds; raises
    RuntimeError if `proc` exits first or the time runs out."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while not port_accepts(port):
            code = proc.poll()
            if code is not None:
                raise RuntimeError(f"process {proc.pid} exited with {code} before port {port}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {port} not listening after {timeout} s")
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int | None:
    """SIGTERM `proc` by its PID, wait at most `timeout` s, then SIGKILL it (and wait at most
    10 s more); returns its exit code (None only if even SIGKILL did not end it in time)."""
    if proc.poll() is not None:
        return proc.returncode
    os.kill(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"process {proc.pid} ignored SIGTERM for {timeout} s: SIGKILL", file=sys.stderr)
    os.kill(proc.pid, signal.SIGKILL)
    try:
        return proc.wait(10)
    except subprocess.TimeoutExpired:
        return None


def percentile(sorted_values: Sequence[int], p: float) -> int | None:
    """The nearest-rank `p`th percentile of already sorted values (None when empty)."""
    if not sorted_values:
        return None
    rank = math.ceil(p / 100 * len(sorted_values))  # 1-based
    return sorted_values[min(len(sorted_values), max(1, rank)) - 1]


def ms(ns: int | None) -> float | None:
    """Nanoseconds as milliseconds, rounded to 0.01 ms (None stays None)."""
    return None if ns is None else round(ns / 1e6, 2)


def merge_counts(dicts: Sequence[dict[str, int]]) -> dict[str, int]:
    """Sum error-count dictionaries of several client processes."""
    out: dict[str, int] = {}
    for d in dicts:
        for key, n in d.items():
            out[key] = out.get(key, 0) + n
    return out


# --- parent <-> client-process messages -----------------------------------------------------


async def wait_message(conn: Connection, timeout: float) -> tuple[Any, ...] | None:
    """On a client process's event loop: the next message from the parent over the pipe
    `conn`, or None if none came within `timeout` s or the parent went away. The loop keeps
    serving the connections while it waits."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    fd = conn.fileno()
    loop.add_reader(fd, ready.set)
    try:
        await asyncio.wait_for(ready.wait(), max(0.0, timeout))
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)
        os.set_blocking(fd, True)  # uvloop leaves it non-blocking; results can be large
    try:
        message: tuple[Any, ...] = conn.recv()
    except EOFError:
        return None
    return message


def receive_from(
    conn: Connection, proc: BaseProcess, what: str, deadline: float
) -> tuple[Any, ...]:
    """In the parent: the next message of a client process, which must be tagged `what`.
    Raises RuntimeError if the process died first (or sent something else) and TimeoutError
    at `deadline` (time.monotonic())."""
    while True:
        if conn.poll(0.25):
            message: tuple[Any, ...] = conn.recv()
            if message[0] != what:
                raise RuntimeError(f"client {proc.pid}: expected {what!r}, got {message!r:.300}")
            return message
        if proc.exitcode is not None and not conn.poll(0):
            raise RuntimeError(f"client {proc.pid} exited ({proc.exitcode}) before {what!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what!r} from client {proc.pid} in time")


def end_children(children: Sequence[BaseProcess], timeout: float = 15.0) -> None:
    """Join the client processes; one still alive after `timeout` s is killed by its PID."""
    deadline = time.monotonic() + timeout
    for child in children:
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive() and child.pid is not None:
            os.kill(child.pid, signal.SIGKILL)
            child.join(5)


def run_loop(main: Coroutine[Any, Any, T], use_uvloop: bool) -> T:
    """Run `main` on uvloop when asked and installed, else on the stock asyncio loop."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            use_uvloop = False
        else:
            result: T = uvloop.run(main)  # untyped here when uvloop's stubs are not installed
            return result
    return asyncio.run(main)


def run_children(
    count: int,
    child: Callable[..., None],
    args: Any,
    orchestrate: Callable[..., dict[str, Any]],
    deadline: float,
    *,
    close_message: Any = None,
    end_timeout: float = 15.0,
) -> dict[str, Any]:
    """Fork `count` client processes running `child(index, args, pipe)` (before any event
    loop exists here), let `orchestrate(args, pipes, children, deadline)` drive them over
    their pipes, then (optionally send `close_message` and) end them by PID."""
    ctx = mp.get_context("fork")
    pipes: list[Connection] = []
    children = []
    for index in range(count):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=child, args=(index, args, theirs), daemon=True)
        proc.start()
        theirs.close()
        pipes.append(mine)
        children.append(proc)
    try:
        record: dict[str, Any] = orchestrate(args, pipes, children, deadline)
        return record
    finally:
        if close_message is not None:
            for conn in pipes:
                with contextlib.suppress(OSError):
                    conn.send(close_message)
        end_children(children, end_timeout)
